"""Bounded, fair waiting: the line is first come first served and never exceeds its limits."""

from __future__ import annotations

import time

import pytest
from modes import GREEN, join_all, sleep, spawn, wait_until

from greenpool import PoolClosed, PoolTimeout, TooManyWaiters


def test_200_tasks_on_5_connections(make_pool, pg):
    """All succeed, never more than 5 server connections, ~2 s, FIFO."""
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
    """Group of 2, both held, a third acquire raises after 0.3 s."""
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


def test_default_and_own_timeouts_in_one_line_each_end_on_time(make_pool):
    """Waiters with the group's timeout (timed out together by the line's timer in the green
    modes) and waiters with a timeout of their own, interleaved in one line: each times out
    at its own deadline, the others stay in line, and one that is still there is served."""
    pool = make_pool({"g": {"connection_count": 1, "timeout": 0.6}})
    group = pool.group("g")
    held = group.acquire()

    def wait(timeout):
        started = time.monotonic()
        try:
            with pool.handler("g", timeout=timeout):
                return "served", time.monotonic() - started
        except PoolTimeout:
            return "timeout", time.monotonic() - started

    tasks = {}
    for name, timeout in (("default_1", None), ("own_0.2", 0.2), ("default_2", None),
                          ("own_3", 3.0)):
        tasks[name] = spawn(wait, timeout)
        in_line = len(tasks)
        wait_until(lambda n=in_line: group.stats()["waiting"] == n, 5, f"{name} in line")
    wait_until(lambda: group.stats()["waiting"] == 1, 5, "three waiters to time out")
    group.release(held)
    join_all(list(tasks.values()), 5)
    outcome = {name: task.result for name, task in tasks.items()}
    assert [outcome[n][0] for n in tasks] == ["timeout", "timeout", "timeout", "served"], outcome
    assert 0.15 <= outcome["own_0.2"][1] <= 0.45, outcome
    assert 0.55 <= outcome["default_1"][1] <= 0.9, outcome
    assert 0.55 <= outcome["default_2"][1] <= 0.9, outcome
    assert group.stats()["timeouts"] == 3 and group.stats()["waiting"] == 0


def test_a_waiter_is_timed_out_from_its_own_arrival(make_pool):
    """The line's timer is armed for the oldest waiter; when that one is served first, the
    next waiter still gets its whole timeout (not the remainder of the first one's)."""
    pool = make_pool({"g": {"connection_count": 1, "timeout": 0.5}})
    group = pool.group("g")
    held = group.acquire()
    first = spawn(group.acquire)
    wait_until(lambda: group.stats()["waiting"] == 1, 5, "the first waiter")
    sleep(0.2)
    group.release(held)
    join_all([first], 5)
    assert first.error is None
    started = time.monotonic()
    with pytest.raises(PoolTimeout):
        group.acquire()
    assert 0.45 <= time.monotonic() - started <= 0.8
    group.release(first.result)


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
    assert group.stats()["refusals"] == 1  # counted, and exported to Prometheus
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


