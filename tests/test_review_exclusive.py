"""Review of issue 13 (exclusive connections, LISTEN/NOTIFY): scenarios that broke it.

Real servers and real faults: a postmaster stopped with SIGSTOP (a connect that hangs),
``pg_ctl stop -m immediate`` and a restart of the same server, killed tasks, closes racing
a connect. What is left on the server is read from ``pg_stat_activity``.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Any

import pytest
from modes import GREEN, MODE, join_all, sleep, spawn, wait_until

from greenpool import Gap, PoolClosed

pytestmark = pytest.mark.timeout(120)

APP = "greenpool-review-listen"


def listening_sessions(cluster: Any) -> int:
    return int(cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND query LIKE 'LISTEN %%'", (APP,))[0][0])


def sessions(cluster: Any) -> int:
    return int(cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (APP,))[0][0])


def group_stats(pool: Any, name: str = "g") -> dict[str, Any]:
    return pool.stats()["groups"][name]  # type: ignore[no-any-return]


def test_closing_the_pool_while_a_listener_connects_leaves_no_session(make_pool, pg_factory):
    """Pool.close() (a worker shutting down) lands while listen() is still connecting (the
    postmaster is stopped with SIGSTOP, so the connect hangs): the listen() must not hand
    back, or leave behind, a connection that listens on the server for ever."""
    server = pg_factory()
    pool = make_pool({"g": {}}, db=server.endpoint(connect_timeout=10), application_name=APP)
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        opener = spawn(lambda: pool.listen("g", "jobs", timeout=10))
        wait_until(lambda: group_stats(pool)["exclusive_open"] == 1, 5, "the connect to start")
        sleep(0.2)
        pool.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    join_all([opener], 15)
    assert isinstance(opener.error, PoolClosed) or (
        opener.error is None and opener.result.closed), (opener.error, opener.result)
    wait_until(lambda: sessions(server) == 0, 10, "no session of the listener left")
    assert group_stats(pool)["exclusive_open"] == 0 and group_stats(pool)["listeners"] == 0


def test_a_listener_dropped_without_close_gives_its_slot_back(make_pool, pg):
    """``for n in pool.listen(...): break`` and forgetting the listener: once it is garbage
    collected its session ends and its exclusive_limit slot is free again."""
    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP)
    listener = pool.listen("g", "jobs")
    assert listener.get(0) is None
    del listener
    gc.collect()
    wait_until(lambda: listening_sessions(pg) == 0, 5, "the session to end")
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 5, "the slot to come back")
    assert group_stats(pool)["listeners"] == 0
    with pool.listen("g", "jobs", timeout=1):
        pass


def test_many_listeners_resume_after_a_restart_of_the_same_server(make_pool, pg_factory):
    """60 listeners; the server is killed (-m immediate) and restarted, not promoted: all
    resume, each reports one Gap before the notification sent after the restart."""
    server = pg_factory()
    n = 60
    pool = make_pool({"g": {"exclusive_limit": n}},
                     db=server.endpoint(connect_timeout=2), application_name=APP,
                     quarantine_max=1)
    listeners = [pool.listen("g", "jobs", heartbeat=1) for _ in range(n)]
    got: list[list[Any]] = [[] for _ in range(n)]

    def read(i: int) -> None:
        for item in listeners[i]:
            got[i].append(item)

    readers = [spawn(read, i) for i in range(n)]
    try:
        server.stop("immediate")
        sleep(0.5)
        server.start()
        restarted = time.monotonic()
        wait_until(lambda: all(any(isinstance(x, Gap) for x in g) for g in got), 30,
                   "every listener to resume")
        took = time.monotonic() - restarted
        server.execute("NOTIFY jobs, 'after'")
        wait_until(lambda: all(g and getattr(g[-1], "payload", None) == "after" for g in got),
                   10, "the notification after the restart")
    finally:
        for listener in listeners:
            listener.close()
        join_all(readers, 20)
    for g in got:
        assert [type(x).__name__ for x in g] == ["Gap", "Notify"], g
    assert took < 15, took
    assert group_stats(pool)["timeouts"] == 0  # reconnect rounds are no caller's timeout
    assert group_stats(pool)["listen_gaps"] == n
    wait_until(lambda: listening_sessions(server) == 0, 10, "every session to end")
