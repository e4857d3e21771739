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
