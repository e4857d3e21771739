"""Real faults: a black-hole endpoint, restarts, a dead server, bad credentials, full server."""

from __future__ import annotations

import time

import pytest
from faults import Ticker
from modes import GREEN, MODE, join_all, sleep, spawn, wait_until

from greenpool import ConnectFailed, NoHealthyEndpoint, Pool, PoolTimeout


def test_black_hole_endpoint_fails_within_timeout_and_never_blocks(blackhole, mode):
    """Each attempt is bounded by the endpoint's connect_timeout (0.3 s
    here; in threaded mode libpq's own, whole seconds, at least 2), never by the caller's
    time; the caller's own timeout ends its wait and names the endpoint's failure."""
    timeout = 1.0 if GREEN else 3.0
    pool = Pool({"type": mode, "db": blackhole.endpoint(connect_timeout=0.3),
                 "groups": {"g": {"timeout": timeout}}})
    try:
        ticker = Ticker()
        sleep(0.05)
        started = time.monotonic()
        with pytest.raises(NoHealthyEndpoint) as info, pool.handler("g"):
            pass
        elapsed = time.monotonic() - started
        max_gap = ticker.stop()
    finally:
        pool.close()
    assert timeout - 0.05 <= elapsed <= timeout + 0.3, elapsed
    assert max_gap < 0.1, f"the event loop was blocked for {max_gap:.3f} s"
    assert f"127.0.0.1:{blackhole.port}" in str(info.value)
    assert "no answer" in str(info.value) or "timeout expired" in str(info.value)
    stats = pool.stats()["groups"]["g"]
    assert stats["connect_errors"] >= 1
    # a connect still in flight when the pool closed ends on its own and frees its slot
    wait_until(lambda: pool.stats()["groups"]["g"]["size"] == 0, 5, "the slot to be freed")


def test_server_restart_under_a_live_pool(make_pool, pg_factory):
    """After `pg_ctl restart -m fast`, no caller sees an error."""
    server = pg_factory()
    pool = make_pool({"g": {"connection_count": 5}}, db=server.endpoint())
    group = pool.group("g")
    warm = [group.acquire() for _ in range(5)]
    old_pids = set()
    for pc in warm:
        old_pids.add(pc.raw.get_backend_pid())
        group.release(pc)
    assert group.stats()["idle"] == 5

    server.restart(mode="fast")

    def work(i):
        with pool.handler("g") as db:
            db.query("SELECT pg_sleep(0.01)")
            return db.query("SELECT pg_backend_pid()")[0][0]

    tasks = [spawn(work, i) for i in range(20)]
    join_all(tasks, 30)
    assert [t.error for t in tasks if t.error] == []
    assert not ({t.result for t in tasks} & old_pids)
    stats = group.stats()
    assert stats["discards"] == 5 and stats["size"] <= 5


def test_idle_sessions_terminated_by_the_server_are_replaced(make_pool, pg, server_conns):
    app = "gp-terminated"
    pool = make_pool({"g": {"connection_count": 3}}, application_name=app)
    group = pool.group("g")
    warm = [group.acquire() for _ in range(3)]
    for pc in warm:
        group.release(pc)
    killed = pg.execute(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
        "WHERE application_name = %s",
        (app,),
    )[0][0]
    assert killed == 3
    # pg_terminate_backend only sends the signal: wait until the sessions are really gone
    assert server_conns(application_name=app, expect=0) == 0
    for _ in range(5):
        with pool.handler("g") as db:
            assert db.query("SELECT 1") == [(1,)]
    assert group.stats()["discards"] == 3


def test_server_down_then_back(make_pool, pg_factory):
    server = pg_factory()
    pool = make_pool({"g": {"connection_count": 2, "timeout": 0.5}}, db=server.endpoint())
    with pool.handler("g") as db:
        db.query("SELECT 1")
    server.stop(mode="immediate")
    started = time.monotonic()
    with pytest.raises(NoHealthyEndpoint) as info, pool.handler("g") as db:
        db.query("SELECT 1")
    assert time.monotonic() - started < 0.5 + 0.3 + (2 if not GREEN else 0)
    assert f"127.0.0.1:{server.port}" in str(info.value)
    server.start()
    with pool.handler("g", timeout=5) as db:
        assert db.query("SELECT 1") == [(1,)]
    # the request's connection, and perhaps housekeeping's probe (kept: a slot was free);
    # once no connect is under way, every slot is an idle connection the server really
    # has, none lost or leaked
    wait_until(lambda: pool.stats()["groups"]["g"]["connecting"] == 0, 5, "connects to end")
    stats = pool.stats()["groups"]["g"]
    assert stats["size"] == stats["idle"] >= 1

    def on_server() -> int:
        return int(server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'greenpool'")[0][0])

    wait_until(lambda: on_server() == stats["size"], 5, "the server to see the pool's slots")


def test_wrong_password_fails_at_once_and_never_shows_it(pg, mode, caplog):
    endpoint = dict(pg.endpoint(), **{"pass": "Sup3rS3cret-wrong"})
    pool = Pool({"type": mode, "db": endpoint, "groups": {"g": {"timeout": 10}}})
    try:
        started = time.monotonic()
        with pytest.raises(ConnectFailed) as info, pool.handler("g"):
            pass
        assert time.monotonic() - started < 2
        assert "password authentication failed" in str(info.value)
        for text in (str(info.value), repr(pool), repr(pool.config), caplog.text):
            assert "Sup3rS3cret" not in text
        assert pool.stats()["groups"]["g"]["size"] == 0
    finally:
        pool.close()


def test_server_max_connections_reached(make_pool, pg_factory):
    """A full server is a retryable failure: clear error, exact accounting, recovery."""
    server = pg_factory(settings={"max_connections": 6, "superuser_reserved_connections": 3})
    server.create_user("app", "app-pw")
    endpoint = dict(server.endpoint(), user="app", **{"pass": "app-pw"})
    pool = make_pool({"g": {"connection_count": 5, "timeout": 0.6}}, db=endpoint)
    group = pool.group("g")
    held = [group.acquire() for _ in range(3)]  # the server's 3 slots for ordinary users
    with pytest.raises(NoHealthyEndpoint) as info:
        group.acquire()
    assert "too many clients" in str(info.value) or "reserved" in str(info.value)
    # the connect asked for keeps trying in the background only while someone needs it
    wait_until(lambda: group.stats()["connecting"] == 0, 5, "the refused connect to end")
    assert group.stats()["size"] == 3
    group.release(held.pop())
    with pool.handler("g", timeout=0.6) as db:
        assert db.query("SELECT 1") == [(1,)]
    for pc in held:
        group.release(pc)


@pytest.mark.skipif(MODE != "threaded", reason="runs once, in the threaded test process")
def test_non_threaded_mode_never_waits(pg):
    pool = Pool({"type": "non-threaded", "db": pg.endpoint(), "groups": {"g": {
        "connection_count": 1, "timeout": 5}}})
    try:
        with pool.handler("g") as db:
            assert db.query("SELECT 1") == [(1,)]
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                pool.group("g").acquire()
            assert time.monotonic() - started < 0.1  # nobody could ever give one back
    finally:
        pool.close()


@pytest.mark.timeout(90)
def test_a_full_server_is_not_a_dead_server(make_pool, pg_factory):
    """Three pools share a server with room for 7 ordinary sessions, and want 12 between
    them. Each holds one connection first; under load their further connects meet "too many
    clients", which says the server is full, not gone: no healthy idle connection is evicted
    for it, in any group, and the endpoint is never quarantined for it. So every pool keeps
    serving work on what it holds. (Without the first connection, which pool gets none of
    the 7 is a race of the connects: pools keep what they opened.)"""
    from endpoints import endpoint_stats

    server = pg_factory(settings={"max_connections": 10, "superuser_reserved_connections": 3})
    server.create_user("app", "app-pw")
    endpoint = dict(server.endpoint(), user="app", **{"pass": "app-pw"})
    pools = [make_pool({"g": {"connection_count": 4, "timeout": 1, "autocommit": True}},
                       db=endpoint, application_name=f"gp-full-{i}") for i in range(3)]
    served = [0, 0, 0]
    for pool in pools:
        with pool.handler("g") as db:
            db.query("SELECT 1")

    def work(i: int, task: int) -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                with pools[i].handler("g") as db:
                    db.query("SELECT pg_sleep(%s)", (0.01 * (1 + (task % 4) * 3),))
                served[i] += 1
            except PoolTimeout:  # a full server may leave a caller without one
                pass
            sleep(0.005 * task)  # idle gaps: connections sit idle while others connect

    tasks = [spawn(work, i, task) for i in range(3) for task in range(5)]
    join_all(tasks, 30)
    assert [t.error for t in tasks if t.error] == []
    log = server.logfile.read_text(errors="replace")
    assert "too many clients" in log or "slots are reserved" in log, "the server never filled"
    assert all(served), served
    evicted = [p.stats()["groups"]["g"]["discards_by_reason"].get("evicted", 0) for p in pools]
    quarantines = [endpoint_stats(p, server)["quarantines"] for p in pools]
    assert (evicted, quarantines) == ([0, 0, 0], [0, 0, 0]), (
        f"evicted per pool {evicted}, quarantines per pool {quarantines}")
