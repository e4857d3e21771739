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



def test_waking_many_waiters_at_once_wakes_each_in_order_and_skips_the_gone():
    """``wake_all`` (a fan-out's wake-up): every waiting task wakes, in the order given; a
    waiter that already timed out is not switched into (its task's next sleep runs its
    full length), and a task that blocks again after waking does not hold up the others."""
    from modes import MODE

    from greenpool.concurrency import backend_for

    backend = backend_for(MODE)
    waiters = [backend.waiter() for _ in range(4)]
    woke: list[int] = []
    naps: list[float] = []
    gone: list[bool] = []

    def wait(i: int) -> None:
        if i == 2:
            gone.append(waiters[i].wait(0.01))  # gone before the wake-up
            started = time.monotonic()
            sleep(0.3)
            naps.append(time.monotonic() - started)
            return
        assert waiters[i].wait(10) is True
        woke.append(i)
        sleep(0.05)  # blocks again at once

    tasks = [spawn(lambda i=i: wait(i)) for i in range(4)]
    wait_until(lambda: gone, 5, "the third wait to time out")
    backend.wake_all(waiters)
    join_all(tasks, 5)
    assert gone == [False] and sorted(woke) == [0, 1, 3]
    if backend.name in ("gevent", "eventlet"):  # one thread: woken in the order given
        assert woke == [0, 1, 3]
    assert naps and naps[0] >= 0.29, naps
