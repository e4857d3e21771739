"""Dedicated connections (``exclusive()``, ``listen()``) inside the pool's model: they never
take the server connection slots the groups need, never quarantine a full server, are
refused through a pooler that gives no session of their own, and are opened in the
background so that a caller's timeout bounds its wait, never an attempt.

Real servers throughout: a cluster with a low ``max_connections`` (or a role's or a
database's ``CONNECTION LIMIT``, or two pools of the process sharing it), a real PgBouncer,
and a black-hole listener for a server that accepts TCP and never answers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import psycopg2
import pytest
from delayproxy import DelayProxy
from endpoints import label
from faults import BlackHole
from modes import MODE, join_all, sleep, spawn, wait_until

from greenpool import NoHealthyEndpoint, PoolError, PoolTimeout
from greenpool.testing.pgbouncer import available as pgbouncer_available
from greenpool.testing.postgres import free_port

pytestmark = pytest.mark.timeout(120)

APP = "greenpool-dedicated-test"


def group_stats(pool: Any, name: str) -> dict[str, Any]:
    return pool.stats()["groups"][name]  # type: ignore[no-any-return]


def connect_directly(cluster: Any) -> Any:
    e = cluster.endpoint()
    return psycopg2.connect(host=e["host"], port=e["port"], dbname=e["name"], user=e["user"],
                            password=e["pass"])


def test_listeners_and_exclusive_blocks_leave_the_groups_the_slots_they_need(pg_factory):
    """max_connections 20 (17 for ordinary roles), groups of 5 and 5, exclusive_limit 60:
    a listener, then 40 exclusive blocks held open, then one more in the other group; those
    beyond the spare slots are refused
    with PoolTimeout (which does not advise raising exclusive_limit), and afterwards both
    groups still serve every one of their connections at once; the endpoint was never
    quarantined and no group connection was evicted."""
    from greenpool import Pool

    server = pg_factory(settings={"max_connections": 20})
    pool = Pool({"type": MODE, "db": server.endpoint(), "application_name": APP,
                 "groups": {"write": {"connection_count": 5, "exclusive_limit": 60},
                            "read": {"connection_count": 5, "exclusive_limit": 60}}})
    listeners: list[Any] = []
    refusals: list[str] = []
    blocks = ExitStack()
    try:
        listeners.append(pool.listen("write", "ch0", timeout=3))
        held = 0
        for _ in range(40):
            try:
                blocks.enter_context(pool.exclusive("write", timeout=3))
                held += 1
            except PoolTimeout as exc:
                refusals.append(str(exc))
        assert 0 < held < 40
        with pytest.raises(PoolTimeout) as caught, pool.exclusive("read", timeout=3):
            pass
        refusals.append(str(caught.value))
        assert listeners, refusals[:1]
        assert refusals and all("groups" in r and "slots" in r for r in refusals), refusals[:1]
        assert not any("raise exclusive_limit" in r for r in refusals)

        def hold_all(group: str) -> list[int]:
            """Every connection of ``group`` at once, each held by a task of its own."""
            pids: list[int] = []
            release = []

            def hold() -> None:
                with pool.handler(group, timeout=5) as db:
                    pids.append(db.query_one("SELECT pg_backend_pid()")[0])
                    wait_until(lambda: bool(release), 20, "the release")

            tasks = [spawn(hold) for _ in range(5)]
            try:
                wait_until(lambda: len(pids) == 5 or any(t.error is not None for t in tasks), 20,
                           "five held connections")
            finally:
                release.append(True)
                join_all(tasks, 20)
            assert [t.error for t in tasks] == [None] * 5
            return pids

        for group in ("write", "read"):
            assert len(set(hold_all(group))) == 5
        endpoint = pool.stats()["endpoints"][label(server)]
        assert endpoint["state"] == "up" and endpoint["quarantines"] == 0, endpoint
        for group in ("write", "read"):
            assert group_stats(pool, group)["discards_by_reason"].get("evicted", 0) == 0
        # every listener still works
        server.execute("NOTIFY ch0, 'still here'")
        assert listeners[0].get(5).payload == "still here"
    finally:
        blocks.close()
        for listener in listeners:
            listener.close()
        pool.close()


def test_too_many_clients_met_by_a_dedicated_connect_quarantines_and_evicts_nothing(
    pg_factory
):
    """The server is full (other clients took every slot): exclusive() fails within its
    timeout, but the endpoint stays up, the group's idle connections stay, and the group
    keeps serving."""
    from greenpool import Pool

    server = pg_factory(settings={"max_connections": 12})
    pool = Pool({"type": MODE, "db": server.endpoint(), "application_name": APP,
                 "groups": {"g": {"connection_count": 2, "min_size": 2}}})
    others: list[Any] = []
    try:
        pool.wait(10)
        wait_until(lambda: group_stats(pool, "g")["idle"] == 2, 10, "two idle connections")
        try:
            while True:
                others.append(connect_directly(server))
        except psycopg2.OperationalError as exc:
            assert "too many clients" in str(exc)
        with pytest.raises(PoolTimeout), pool.exclusive("g", timeout=1):
            pass
        endpoint = pool.stats()["endpoints"][label(server)]
        assert endpoint["state"] == "up" and endpoint["quarantines"] == 0, endpoint
        stats = group_stats(pool, "g")
        assert stats["discards_by_reason"].get("evicted", 0) == 0 and stats["idle"] == 2
        with pool.handler("g", timeout=2) as db:
            assert db.query_one("SELECT 1")[0] == 1
    finally:
        for conn in others:
            conn.close()
        pool.close()


@pytest.mark.skipif(not pgbouncer_available(), reason="needs /usr/sbin/pgbouncer")
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_an_undeclared_pooler_is_refused_for_dedicated_connections(make_pool, pg, pool_mode):
    """Through PgBouncer that the configuration does not declare, with a group that sends
    no ``options`` (so nothing refused them): the login's backend pid is PgBouncer's own,
    not the session's, so exclusive() and listen() refuse with a PoolError that names the
    pooler and the ``pooler: 'session'`` key, and leave no slot taken. (A transaction-mode
    listener would otherwise hear nothing.) Pooled loans through it still work."""
    from greenpool.testing.pgbouncer import PgBouncer

    with PgBouncer(pg, pool_mode=pool_mode, max_client_conn=50) as bouncer:
        pool = make_pool({"g": {"exclusive_limit": 2}}, db=bouncer.endpoint(),
                         application_name=APP)
        with pytest.raises(PoolError, match="pooler") as caught, \
                pool.exclusive("g", timeout=5):
            pass
        assert "pooler: 'session'" in str(caught.value)
        with pytest.raises(PoolError, match="pooler"):
            pool.listen("g", "jobs", timeout=5)
        stats = group_stats(pool, "g")
        assert stats["exclusive_open"] == 0 and stats["listeners"] == 0
        with pool.handler("g", timeout=5) as db:
            assert db.query_one("SELECT 1")[0] == 1


@contextmanager
def tcp_proxy(cluster: Any) -> Iterator[int]:
    """HAProxy in TCP mode in front of ``cluster``; yields its port."""
    port = free_port("127.0.0.1")
    root = tempfile.mkdtemp(prefix="greenpool-haproxy-")
    config = os.path.join(root, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(f"defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n"
                f"  timeout server 60s\nlisten pg\n  bind 127.0.0.1:{port}\n"
                f"  server s1 {cluster.host}:{cluster.port}\n")
    proc = subprocess.Popen(["haproxy", "-f", config], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no haproxy"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy")
def test_a_tcp_proxy_is_no_pooler_and_gives_a_session(make_pool, pg):
    """Through HAProxy (TCP mode) the login reports the real backend pid, so the pooler
    check lets dedicated connections through: a listener hears its notification."""
    with tcp_proxy(pg) as port:
        pool = make_pool({"g": {}}, db=pg.endpoint(port=port), application_name=APP)
        with pool.exclusive("g", timeout=5) as conn:
            assert conn.cursor() is not None
        with pool.listen("g", "through_proxy", timeout=5) as listener:
            pg.execute("NOTIFY through_proxy, 'hello'")
            assert listener.get(5).payload == "hello"


def test_exclusive_and_listen_timeouts_bound_the_wait_and_the_attempt_judges_the_server(
    make_pool, blackhole
):
    """Against a server that accepts TCP and never answers (connect_timeout 1.5):
    exclusive(timeout=0.3) and listen(timeout=0.3) return after about 0.3 s, while the
    attempt goes on in the background for its whole connect_timeout and then quarantines
    the endpoint, as a group connect's would (an attempt cut by a caller's time is no
    verdict, so it never would be)."""
    pool = make_pool({"g": {"exclusive_limit": 4}},
                     db=blackhole.endpoint(connect_timeout=1.5))
    for call in (lambda: pool.exclusive("g", timeout=0.3).__enter__(),
                 lambda: pool.listen("g", "jobs", timeout=0.3)):
        started = time.monotonic()
        with pytest.raises(PoolTimeout):  # exclusive: NoHealthyEndpoint, one of them
            call()
        assert time.monotonic() - started < 0.6
    stats = group_stats(pool, "g")
    assert stats["exclusive_open"] == 0 and stats["exclusive_connecting"] >= 1
    wait_until(lambda: pool.stats()["endpoints"][label_of(blackhole)]["quarantines"] == 1,
               5, "the background attempt to quarantine the black hole")
    wait_until(lambda: group_stats(pool, "g")["exclusive_connecting"] == 0, 5,
               "the connect task to end")


def test_a_listener_reconnecting_to_two_black_holes_returns_within_its_timeout(
    make_pool, pg_factory
):
    """A listener whose server died, in a group whose other two endpoints never answer
    (connect_timeout 2): each get(0.3) returns None after about 0.3 s, never one
    connect_timeout per endpoint; the black holes end up quarantined by the background
    attempts; once the server is back the listener resumes with a Gap."""
    server = pg_factory()
    with BlackHole() as hole1, BlackHole() as hole2:
        pool = make_pool({"g": {"exclusive_limit": 6}},
                         db=[server.endpoint(weight=100), hole1.endpoint(connect_timeout=2),
                             hole2.endpoint(connect_timeout=2)])
        with pool.listen("g", "jobs", timeout=10) as listener:
            assert listener.endpoint == label(server)
            server.stop("immediate")
            durations = []
            for _ in range(8):
                started = time.monotonic()
                item = listener.get(0.3)
                durations.append(time.monotonic() - started)
                assert item is None
            assert max(durations) < 0.3 + 0.35, durations
            wait_until(lambda: all(pool.stats()["endpoints"][label_of(h)]["quarantines"] >= 1
                                   for h in (hole1, hole2)), 6, "both black holes judged")
            server.start()
            deadline = time.monotonic() + 20
            item = None
            while item is None and time.monotonic() < deadline:
                item = listener.get(0.5)
            assert type(item).__name__ == "Gap", item


def test_a_storm_of_listeners_on_a_small_server_never_starves_the_groups(pg_factory):
    """30 listeners asked for at once on a server of 20 connections: however many get in,
    every group connection can still be opened afterwards and nothing was quarantined."""
    from greenpool import Pool

    server = pg_factory(settings={"max_connections": 20})
    pool = Pool({"type": MODE, "db": server.endpoint(), "application_name": APP,
                 "groups": {"write": {"connection_count": 4, "exclusive_limit": 40},
                            "read": {"connection_count": 4}}})
    opened: list[Any] = []

    def one(i: int) -> None:
        try:
            opened.append(pool.listen("write", f"s{i}", timeout=5))
        except PoolError:
            pass

    try:
        tasks = [spawn(one, i) for i in range(30)]
        join_all(tasks, 60)
        for group in ("write", "read"):
            held = []
            release = []

            def hold(group: str = group, held: list[int] = held,
                     release: list[bool] = release) -> None:
                with pool.handler(group, timeout=5):
                    held.append(1)
                    wait_until(lambda: bool(release), 20, "the release")

            holders = [spawn(hold) for _ in range(4)]
            wait_until(lambda held=held, holders=holders: len(held) == 4 or any(
                t.error is not None for t in holders), 20, "four held connections")
            release.append(True)
            join_all(holders, 20)
            assert [t.error for t in holders] == [None] * 4
        endpoint = pool.stats()["endpoints"][label(server)]
        assert endpoint["quarantines"] == 0, endpoint
        assert group_stats(pool, "write")["exclusive_connecting"] == 0
    finally:
        for listener in opened:
            listener.close()
        pool.close()


def label_of(hole: BlackHole) -> str:
    return f"{hole.host}:{hole.port}/blackhole"


def test_connections_whose_callers_gave_up_serve_the_next_callers_and_leak_nothing(
    make_pool, server_conns
):
    """Forty exclusive(timeout=0.004) blocks one after another: connects outlive their
    callers and go to the next caller waiting (some blocks get a connection although no
    connect fits in 4 ms of their own); afterwards no slot, connect task or session is
    left."""
    pool = make_pool({"g": {"exclusive_limit": 5}}, application_name=APP)
    served = 0
    for _ in range(40):
        try:
            with pool.exclusive("g", timeout=0.004) as conn:
                conn.cursor().execute("SELECT 1")
                served += 1
        except PoolError:
            pass
    assert served >= 1
    wait_until(lambda: group_stats(pool, "g")["exclusive_connecting"] == 0, 10,
               "the connect tasks to end")
    assert group_stats(pool, "g")["exclusive_open"] == 0
    assert server_conns(application_name=APP, expect=0) == 0


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
def test_non_threaded_pools_vet_dedicated_connections_inline(pg_factory, server_conns):
    """``non-threaded`` has no background: a dedicated connect runs inline, and the same
    rule holds: blocks beyond the server's spare slots are refused with PoolTimeout, the
    group still opens all its connections, and nothing is left open at the end."""
    from greenpool import Pool

    server = pg_factory(settings={"max_connections": 12})
    pool = Pool({"type": "non-threaded", "db": server.endpoint(), "application_name": APP,
                 "groups": {"g": {"connection_count": 3, "exclusive_limit": 20}}})
    blocks: list[Any] = []
    try:
        with pytest.raises(PoolTimeout, match="slots"):
            for _ in range(20):
                block = pool.exclusive("g", timeout=3)
                block.__enter__()
                blocks.append(block)
        assert blocks
        handlers = [pool.group("g").acquire(3) for _ in range(3)]
        for pc in handlers:
            pool.group("g").release(pc)
    finally:
        for block in blocks:
            block.__exit__(None, None, None)
        pool.close()
    # backends leave asynchronously after their clients disconnect
    assert server_conns(application_name=APP, cluster=server, expect=0) == 0


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
def test_non_threaded_connects_cut_by_the_callers_time_leave_no_session(pg, server_conns):
    """``non-threaded`` cuts an inline connect at the caller's deadline: the half-open
    session ends at once, not when a garbage collection happens to free it (the cut's
    traceback held it in a reference cycle; the collector is off here to prove it)."""
    import gc

    from greenpool import Pool

    pool = Pool({"type": "non-threaded", "db": pg.endpoint(), "application_name": APP,
                 "groups": {"g": {"exclusive_limit": 5}}})
    gc.disable()
    try:
        for _ in range(40):
            try:
                with pool.exclusive("g", timeout=0.005):
                    pass
            except PoolError:
                pass
        assert server_conns(application_name=APP, expect=0, timeout=3) == 0
    finally:
        gc.enable()
        pool.close()


def test_a_dedicated_connection_goes_to_an_endpoint_with_spare_slots(pg_factory, pg):
    """A group over two servers, one of which has fewer spare slots than the pool's groups
    may still open there: every dedicated connection goes to the other one, without
    refusing a caller."""
    from greenpool import Pool

    small = pg_factory(settings={"max_connections": 12})
    others = []
    try:
        while True:  # leave 2 slots for ordinary roles: fewer than the groups' 3
            in_use = small.execute("SELECT count(*) FROM pg_stat_activity "
                                   "WHERE backend_type = 'client backend'")[0][0]
            if in_use >= 12 - 3 - 2:
                break
            others.append(connect_directly(small))
        pool = Pool({"type": MODE, "db": [small.endpoint(), pg.endpoint()],
                     "application_name": APP,
                     "groups": {"g": {"connection_count": 3, "exclusive_limit": 6}}})
        try:
            ports = []
            for _ in range(6):
                with pool.exclusive("g", timeout=5) as conn, conn.cursor() as cursor:
                    cursor.execute("SELECT inet_server_port()")
                    ports.append(cursor.fetchone()[0])
            assert ports == [pg.port] * 6, ports
        finally:
            pool.close()
    finally:
        for conn in others:
            conn.close()


def test_callers_behind_a_connect_stuck_on_a_black_hole_are_served_by_a_live_server(
    make_pool, pg, blackhole
):
    """A black hole (``connect_timeout`` 10, weighted to be tried first) and a real server;
    callers of ``exclusive(timeout=3)``, alone and two at once: a connect stuck on the black
    hole stops covering its caller after a quarter second, and every caller is connected to
    the real server well within its timeout (none waits out the black hole)."""
    pool = make_pool({"g": {"exclusive_limit": 5}},
                     db=[dict(blackhole.endpoint(connect_timeout=10), weight=1000),
                         dict(pg.endpoint(), weight=1)])
    ports: list[Any] = []

    def block(delay: float) -> None:
        sleep(delay)
        started = time.monotonic()
        with pool.exclusive("g", timeout=3) as conn:
            cur = conn.cursor()
            cur.execute("SELECT inet_server_port()")
            ports.append((cur.fetchone()[0], time.monotonic() - started))

    tasks = [spawn(block, 0.0), spawn(block, 0.4)]
    join_all(tasks, 10)
    assert [t.error for t in tasks] == [None, None], [t.error for t in tasks]
    assert [p for p, _ in ports] == [pg.port, pg.port], ports
    assert all(took < 2 for _, took in ports), ports


def test_a_caller_waiting_out_a_lone_black_hole_starts_one_connect(make_pool, blackhole):
    """The only endpoint never answers (``connect_timeout`` 10); ``exclusive(timeout=1.5)``
    looks again every quarter second, yet starts no second attempt on the server that one
    already waits on: one connect task, one attempt under way. The caller is told a connect
    is under way, not that the endpoint is unhealthy: it has not failed yet."""
    pool = make_pool({"g": {"exclusive_limit": 5}},
                     db=blackhole.endpoint(connect_timeout=10))
    with pytest.raises(PoolTimeout, match="a connect is under way") as caught, \
            pool.exclusive("g", timeout=1.5):
        pass
    assert not isinstance(caught.value, NoHealthyEndpoint)
    assert group_stats(pool, "g")["exclusive_connecting"] == 1
    assert pool._endpoints[0].connecting == 1


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
def test_non_threaded_vetting_query_is_cut_at_the_callers_deadline(pg, server_conns):
    """``non-threaded`` vets a dedicated connection inline: through a proxy that holds its
    first query (the session check) for 8 s, ``exclusive(timeout=0.5)`` returns after its
    0.5 s, not after the endpoint's ``connect_timeout`` of 5 s, and leaves no session; the
    caller is told its time cut the connect short, not that the server is unhealthy."""
    from greenpool import Pool

    with DelayProxy(pg.port, 8, b"pg_stat_activity") as proxy:
        pool = Pool({"type": "non-threaded", "application_name": APP,
                     "db": pg.endpoint(port=proxy.port, connect_timeout=5),
                     "groups": {"g": {"exclusive_limit": 5}}})
        try:
            started = time.monotonic()
            with pytest.raises(PoolTimeout, match="cut short") as caught, \
                    pool.exclusive("g", timeout=0.5):
                pass
            assert not isinstance(caught.value, NoHealthyEndpoint)  # the server is fine
            took = time.monotonic() - started
            assert proxy.held() == 1
            assert took < 2, took
        finally:
            pool.close()
    # (the proxy keeps its side to the server while it holds the query: counted once gone)
    assert server_conns(application_name=APP, expect=0) == 0


def test_the_session_check_is_read_from_pg_catalog_whatever_the_search_path(pg_factory):
    """A database whose search_path puts ``public`` before ``pg_catalog``, where a table
    named ``pg_stat_activity`` (without the columns of the view) exists: dedicated
    connections still count the server's real sessions, and connect."""
    from greenpool import Pool

    server = pg_factory()
    server.execute("CREATE TABLE public.pg_stat_activity (x int)")
    server.execute("ALTER DATABASE postgres SET search_path = public, pg_catalog")
    pool = Pool({"type": MODE, "db": server.endpoint(), "groups": {"g": {}}})
    try:
        with pool.exclusive("g", timeout=5) as conn:
            conn.cursor().execute("SELECT 1")
        assert group_stats(pool, "g")["discards_by_reason"] == {}
    finally:
        pool.close()


def test_a_server_that_refuses_the_session_check_gets_a_clear_error_not_a_connect_storm(
    pg_factory
):
    """A hardened server where PUBLIC may not read ``pg_stat_activity``: an unprivileged
    role's ``exclusive()`` fails at once with a PoolError that says what the role needs,
    after one connect (not one new connection every few milliseconds until the timeout)."""
    from greenpool import Pool

    server = pg_factory()
    server.create_user("plain", "plain-secret")
    server.execute("REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC")
    pool = Pool({"type": MODE, "db": server.endpoint(user="plain", **{"pass": "plain-secret"}),
                 "groups": {"g": {}}})
    try:
        started = time.monotonic()
        with pytest.raises(PoolError, match="pg_stat_activity") as caught, \
                pool.exclusive("g", timeout=3):
            pass
        assert not isinstance(caught.value, (PoolTimeout, NoHealthyEndpoint))
        assert time.monotonic() - started < 2
        assert pool.stats()["endpoints"][label(server)]["connects"] == 1
    finally:
        pool.close()


def hold_at_once(pool: Any, group: str, count: int) -> list[BaseException | None]:
    """``count`` loans of ``group`` held at the same time, each by a task of its own: their
    errors (None for a loan that was served)."""
    held: list[int] = []
    release: list[bool] = []

    def hold() -> None:
        with pool.handler(group, timeout=5) as db:
            db.query_one("SELECT 1")
            held.append(1)
            wait_until(lambda: bool(release), 20, "the release")

    tasks = [spawn(hold) for _ in range(count)]
    try:
        wait_until(lambda: len(held) == count or any(t.error is not None for t in tasks), 20,
                   f"{count} held connections")
    finally:
        release.append(True)
        join_all(tasks, 20)
    return [t.error for t in tasks]


@pytest.mark.parametrize("limit", ["role", "database"])
def test_a_role_or_database_connection_limit_leaves_the_groups_their_connections(
    pg_factory, limit
):
    """The role (or the database) has CONNECTION LIMIT 4 and the group connection_count 3,
    on a server of many more max_connections: a listener fits (3 left for the group), an
    exclusive block then does not, and is refused with PoolTimeout naming the limit; the
    group still holds its 3 connections at once. (Counting max_connections alone let the
    block in, and the group's third connect met "too many connections for role".)"""
    from greenpool import Pool

    server = pg_factory(settings={"autovacuum": "off"})  # a worker would count in the database
    server.create_user("app", "app-pw")
    endpoint = server.endpoint(user="app", **{"pass": "app-pw"})
    if limit == "role":
        server.execute("ALTER ROLE app CONNECTION LIMIT 4")
    else:
        server.create_database("appdb", owner="app")
        server.execute("ALTER DATABASE appdb CONNECTION LIMIT 4")
        endpoint["name"] = "appdb"
    pool = Pool({"type": MODE, "db": endpoint, "application_name": APP,
                 "groups": {"g": {"connection_count": 3, "exclusive_limit": 3}}})
    try:
        with pool.listen("g", "jobs", timeout=5) as listener:
            with pytest.raises(PoolTimeout, match="CONNECTION LIMIT 4") as caught, \
                    pool.exclusive("g", timeout=3):
                pass
            assert f"{limit} " in str(caught.value)
            assert hold_at_once(pool, "g", 3) == [None] * 3
            with pool.handler("g", timeout=5) as db:  # (in the listener's database)
                db.query_one("SELECT pg_notify('jobs', 'still here')")
            assert listener.get(5).payload == "still here"
        endpoint_stats = pool.stats()["endpoints"][label(server).replace(
            "/postgres", f"/{endpoint['name']}")]
        assert endpoint_stats["quarantines"] == 0 and endpoint_stats["full"] == 0
    finally:
        pool.close()


def test_dedicated_connections_leave_room_for_the_groups_of_every_pool_of_the_process(
    pg_factory
):
    """Two pools of one process on one server of 6 usable slots (max_connections 9, 3
    reserved): pool A's group of 2 and pool B's group of 3 leave room for one dedicated
    connection. A's first exclusive block gets it, its second is refused (the rule counts
    B's group too); meanwhile both groups hold all their connections at once. Once B is
    closed its room is A's to use."""
    from greenpool import Pool

    server = pg_factory(settings={"max_connections": 9, "superuser_reserved_connections": 3})
    server.create_user("app", "app-pw")
    endpoint = server.endpoint(user="app", **{"pass": "app-pw"})
    a = Pool({"type": MODE, "db": endpoint, "application_name": APP,
              "groups": {"a": {"connection_count": 2, "exclusive_limit": 3}}})
    b = Pool({"type": MODE, "db": endpoint, "application_name": APP,
              "groups": {"b": {"connection_count": 3}}})
    try:
        with a.exclusive("a", timeout=3) as conn:
            conn.cursor().execute("SELECT 1")
            with pytest.raises(PoolTimeout, match="groups of this process may still open 5"), \
                    a.exclusive("a", timeout=3):
                pass
            assert hold_at_once(b, "b", 3) == [None] * 3
            assert hold_at_once(a, "a", 2) == [None] * 2
            b.close()

            def admitted() -> bool:
                try:
                    with a.exclusive("a", timeout=1):
                        return True
                except PoolTimeout:
                    return False

            wait_until(admitted, 10, "an exclusive block in the room B left")
    finally:
        a.close()
        b.close()
