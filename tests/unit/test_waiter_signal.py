"""The one-shot wake-up under every waiter of the fair line, in this process's mode."""

from __future__ import annotations

import time

from modes import join_all, sleep, spawn, wait_until


def test_a_waiter_signal_wakes_once_and_never_late():
    """The one-shot wake-up under every waiter: a set() before wait() is not lost, a wait
    times out, and a set() that arrives after its waiter gave up never cuts short whatever
    that task blocks on next (it would otherwise return a connection-less 'served' into an
    unrelated wait)."""
    from modes import MODE

    from greenpool.concurrency import backend_for

    backend = backend_for(MODE)
    early = backend.waiter()
    early.set()
    assert early.wait(5) is True

    started = time.monotonic()
    assert backend.waiter().wait(0.05) is False
    assert time.monotonic() - started >= 0.045

    late = backend.waiter()
    timed_out, naps = [], []

    def waiter():
        timed_out.append(late.wait(0.01))
        started = time.monotonic()
        sleep(0.3)  # set() lands during this nap
        naps.append(time.monotonic() - started)

    task = spawn(waiter)
    wait_until(lambda: timed_out, 5, "the wait to time out")
    late.set()
    join_all([task], 5)
    assert timed_out == [False]
    assert naps and naps[0] >= 0.29, naps

