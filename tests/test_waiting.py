"""Bounded, fair waiting: the line is first come first served and never exceeds its limits."""

from __future__ import annotations

import time

import pytest
from modes import GREEN, join_all, sleep, spawn, wait_until

from greenpool import PoolClosed, PoolTimeout, TooManyWaiters


def test_200_tasks_on_5_connections(make_pool, pg):
    """Issue 2, check 2: all succeed, never more than 5 server connections, ~2 s, FIFO."""
    app = "gp-fifo-200"
    pool = make_pool({"g": {"connection_count": 5, "timeout": 30}}, application_name=app)
    arrived, served, peak = [], [], {"server": 0, "pool": 0}
    done = []

    def monitor():
        admin = pg.connect()
        try:
            with admin.cursor() as cur:
                while not done:
                    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                (app,))
                    peak["server"] = max(peak["server"], cur.fetchone()[0])
                    peak["pool"] = max(peak["pool"], pool.stats()["groups"]["g"]["size"])
                    sleep(0.01)
        finally:
            admin.close()

    def work(i):
        arrived.append(i)
        with pool.handler("g") as db:
            served.append(i)
            db.query("SELECT pg_sleep(0.05)")
        return i

    watcher = spawn(monitor)
    started = time.monotonic()
    tasks = [spawn(work, i) for i in range(200)]
    join_all(tasks, 30)
    elapsed = time.monotonic() - started
    done.append(True)
    join_all([watcher], 5)

    assert [t.error for t in tasks if t.error] == []
    assert sorted(t.result for t in tasks) == list(range(200))
    assert 0 < peak["server"] <= 5 and peak["pool"] <= 5
    assert 3.0 >= elapsed >= 1.9, elapsed  # ideal: 200 x 0.05 / 5 = 2.0 s
    stats = pool.stats()["groups"]["g"]
    assert stats["connects"] == 5 and stats["in_use"] == 0 and stats["waiting"] == 0
    if GREEN:  # tasks arrive in spawn order; those that had to wait are served in that order
        assert served[5:] == arrived[5:]


def test_waiters_are_served_in_arrival_order(make_pool):
    """Deterministic FIFO in every mode: each waiter is in line before the next one comes,
    and with one connection only one waiter runs at a time, so the order seen is the order
    of hand-off (threads may wake in any order once several are released)."""
    pool = make_pool({"g": {"connection_count": 1, "timeout": 10}})
    group = pool.group("g")
    held = group.acquire()
    served = []

    def waiter(i):
        with pool.handler("g"):
            served.append(i)

    tasks = []
    for i in range(20):
        tasks.append(spawn(waiter, i))
        wait_until(lambda i=i: group.stats()["waiting"] == i + 1, 5, f"waiter {i} in line")
    group.release(held)
    join_all(tasks, 10)
    assert served == list(range(20))


def test_acquire_timeout_is_honoured(make_pool):
    """Issue 2, check 3: group of 2, both held, a third acquire raises after 0.3 s."""
    pool = make_pool({"g": {"connection_count": 2}})
    group = pool.group("g")
    held = [group.acquire(), group.acquire()]
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info, pool.handler("g", timeout=0.3):
        pass
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed <= 0.4, elapsed
    message = str(info.value)
    assert "'g'" in message and "2 of 2 in use" in message and "waiting" in message
    stats = group.stats()
    assert stats["timeouts"] == 1 and stats["waiting"] == 0
    for pc in held:
        group.release(pc)
    with pool.handler("g", timeout=0.3) as db:
        assert db.query("SELECT 1") == [(1,)]


def test_max_waiting_bounds_the_line(make_pool):
    pool = make_pool({"g": {"connection_count": 1, "max_waiting": 2, "timeout": 5}})
    group = pool.group("g")
    held = group.acquire()
    waiters = [spawn(lambda: pool.handler("g").__enter__().__exit__(None, None, None))
               for _ in range(2)]
    wait_until(lambda: group.stats()["waiting"] == 2, 5, "two waiters")
    started = time.monotonic()
    with pytest.raises(TooManyWaiters, match="max_waiting=2"):
        group.acquire()
    assert time.monotonic() - started < 0.1  # at once, no waiting
    group.release(held)
    join_all(waiters, 5)
    assert [w.error for w in waiters] == [None, None]


def test_close_wakes_waiters_with_pool_closed(make_pool):
    pool = make_pool({"g": {"connection_count": 1, "timeout": 10}})
    group = pool.group("g")
    held = group.acquire()
    waiter = spawn(group.acquire)
    wait_until(lambda: group.stats()["waiting"] == 1, 5, "a waiter")
    started = time.monotonic()
    pool.close()
    join_all([waiter], 5)
    assert isinstance(waiter.error, PoolClosed)
    assert time.monotonic() - started < 1
    group.release(held)  # returned after close: closed, not pooled
    assert held.raw.closed
    assert group.stats()["size"] == 0
    with pytest.raises(PoolClosed):
        pool.handler("g").__enter__()



def test_a_waiter_signal_wakes_once_and_never_late():
    """The one-shot wake-up under every waiter: a set() before wait() is not lost, a wait
    times out, and a set() that arrives after its waiter gave up never cuts short whatever
    that task blocks on next (it would otherwise return a connection-less 'served' into an
    unrelated wait)."""
    from modes import MODE

    from greenpool.concurrency import backend_for

    backend = backend_for(MODE)
    early = backend.signal()
    early.set()
    assert early.wait(5) is True

    started = time.monotonic()
    assert backend.signal().wait(0.05) is False
    assert time.monotonic() - started >= 0.045

    late = backend.signal()
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
