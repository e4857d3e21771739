"""Connect failures: which ones retrying cannot fix, and what the operator is told to do.

Every verdict a real server or a real PgBouncer can produce is tested against one: a scram
role with a wrong password, a missing database, a role with no pg_hba.conf line, a missing
role (under trust auth: with password auth PostgreSQL hides whether the role exists),
max_connections and a role's and a database's CONNECTION LIMIT reached, a server shutting
down, and through PgBouncer the refused `options` startup parameter, an unknown database and
max_client_conn.
The rest (a server starting up or in recovery, PgBouncer's query_wait_timeout and crashed
server connections, a reset during login) cannot be produced on demand here: those are
tested with the message strings the servers send, recorded from PostgreSQL 15, PgBouncer
1.18 and libpq, in tests/unit/test_failure_classification.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from greenpool import ConnectFailed, PoolTimeout, parse_config
from greenpool.concurrency import backend_for
from greenpool.connection import ConnectError, connect_kwargs, open_connection
from greenpool.testing.pgbouncer import PgBouncer, available
from greenpool.testing.postgres import Cluster, free_port

# --- real servers -----------------------------------------------------------------------------

_HBA = """\
local   all      all                     scram-sha-256
host    all      postgres  127.0.0.1/32  scram-sha-256
host    all      refused   127.0.0.1/32  reject
host    trustdb  all       127.0.0.1/32  trust
host    all      alice     127.0.0.1/32  scram-sha-256
host    all      limited   127.0.0.1/32  scram-sha-256
"""


@pytest.fixture(scope="module")
def auth_server() -> Iterator[Cluster]:
    """A server whose pg_hba.conf has gaps, 4 connection slots (1 reserved), a scram role
    ``alice``, a role with CONNECTION LIMIT 0, a trust-auth database ``trustdb`` and a
    database ``closeddb`` with CONNECTION LIMIT 0."""
    with Cluster(settings={"max_connections": 4, "superuser_reserved_connections": 1}) as c:
        (c.datadir / "pg_hba.conf").write_text(_HBA)
        c.execute("SELECT pg_reload_conf()")
        c.create_user("alice", "right-pw")
        c.execute("CREATE ROLE limited LOGIN PASSWORD 'limited-pw' CONNECTION LIMIT 0")
        c.create_database("trustdb")
        c.create_database("closeddb")
        c.execute("ALTER DATABASE closeddb CONNECTION LIMIT 0")
        yield c


def attempt(mode: str, db: dict[str, Any], seconds: float = 5.0) -> ConnectError:
    """One real connect through open_connection; the ConnectError it must raise."""
    config = parse_config({"type": mode, "db": db})
    endpoint, group = config.endpoints[0], next(iter(config.groups.values()))
    kwargs = connect_kwargs(endpoint, group, "greenpool-test-failures")
    with pytest.raises(ConnectError) as info:
        raw = open_connection(endpoint, group, kwargs, backend_for(mode), seconds)
        raw.close()
    exc = info.value
    assert exc.__cause__ is None and exc.__context__ is None  # the driver's error is not chained
    assert exc.label == endpoint.label and exc.label in str(exc)
    return exc


def server(c: Cluster, **overrides: Any) -> dict[str, Any]:
    return {"host": c.host, "port": c.port, "name": "postgres", **overrides}


@pytest.mark.parametrize(
    ("overrides", "kind", "words"),
    [
        ({"user": "alice", "pass": "wrong-pw"}, "authentication", "password authentication failed"),
        ({"user": "alice", "pass": "right-pw", "name": "nodb"}, "no_database", '"nodb" does not'),
        ({"user": "nobody", "pass": "x"}, "pg_hba", "no pg_hba.conf entry"),
        ({"user": "refused", "pass": "x"}, "pg_hba", "pg_hba.conf rejects connection"),
        ({"user": "ghost", "name": "trustdb"}, "no_role", 'role "ghost" does not exist'),
        ({"user": "alice"}, "no_password", "no password supplied"),
    ],
)
def test_real_fatal_failures(auth_server: Cluster, mode: str, overrides: dict[str, Any],
                             kind: str, words: str) -> None:
    exc = attempt(mode, server(auth_server, **overrides))
    assert (exc.fatal, exc.kind) == (True, kind)
    assert words in exc.reason and exc.hint in str(exc)
    assert "wrong-pw" not in str(exc) and "right-pw" not in str(exc)


def test_real_slot_shortage_is_transient(auth_server: Cluster, mode: str) -> None:
    """A role's and a database's CONNECTION LIMIT, reserved slots, then no slot at all: all
    retried, each named for the limit it met."""
    limited = attempt(mode, server(auth_server, user="limited", **{"pass": "limited-pw"}))
    assert (limited.fatal, limited.kind) == (False, "role_connection_limit")
    assert "ALTER ROLE" in str(limited)
    closed = attempt(mode, server(auth_server, user="alice", name="closeddb",
                                  **{"pass": "right-pw"}))
    assert (closed.fatal, closed.kind) == (False, "database_connection_limit")
    assert "ALTER DATABASE" in str(closed)
    held = []
    try:
        for _ in range(3):
            held.append(psycopg2.connect(host=auth_server.host, port=auth_server.port,
                                         dbname="postgres", user="alice", password="right-pw"))
        reserved = attempt(mode, server(auth_server, user="alice", **{"pass": "right-pw"}))
        assert "reserved" in reserved.reason
        assert (reserved.fatal, reserved.kind) == (False, "too_many_connections")
        held.append(auth_server.connect())
        full = attempt(mode, server(auth_server, user="postgres",
                                    **{"pass": auth_server.password}))
        assert "too many clients" in full.reason
        assert (full.fatal, full.kind) == (False, "too_many_connections")
    finally:
        for conn in held:
            conn.close()


def test_real_refused_and_silent_servers_are_transient(mode: str, blackhole: Any) -> None:
    refused = attempt(mode, {"host": "127.0.0.1", "port": free_port()})
    assert (refused.fatal, refused.kind) == (False, "refused")
    silent = attempt(mode, {"host": blackhole.host, "port": blackhole.port}, seconds=0.3)
    assert (silent.fatal, silent.kind) == (False, "timeout")


def test_real_shutting_down_is_transient(pg_factory: Any, mode: str) -> None:
    """A smart shutdown waits for the open session and turns new ones away meanwhile."""
    cluster = pg_factory()
    held = cluster.connect()
    try:
        cluster._pg_ctl("stop", "-m", "smart", "-W")
        deadline = time.monotonic() + 10
        while True:
            exc = attempt(mode, cluster.endpoint())
            if exc.kind != "refused" and "shutting down" in exc.reason:
                break
            assert time.monotonic() < deadline, exc.reason
            time.sleep(0.05)  # the postmaster may not have seen the signal yet
        assert (exc.fatal, exc.kind) == (False, "shutting_down")
    finally:
        held.close()
        # the smart shutdown now completes; let it, so the fixture's stop does not race it
        deadline = time.monotonic() + 10
        while cluster.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_pool_fails_fast_on_a_wrong_password(auth_server: Cluster, mode: str) -> None:
    """The acquire gives up at once with ConnectFailed, not after the 30 s acquire timeout."""
    from greenpool import Pool

    pool = Pool({"type": mode, "db": server(auth_server, user="alice", **{"pass": "wrong-pw"}),
                 "groups": {"g": {"timeout": 30}}})
    try:
        started = time.monotonic()
        with pytest.raises(ConnectFailed) as info, pool.handler("g"):
            pass
        assert time.monotonic() - started < 10
        assert "password authentication failed" in str(info.value)
        assert "wrong-pw" not in str(info.value)
    finally:
        pool.close()


def test_a_fatal_failure_does_not_quarantine_a_healthy_server(auth_server: Cluster,
                                                              mode: str) -> None:
    from greenpool import Pool

    pool = Pool({"type": mode, "db": server(auth_server, user="alice", **{"pass": "wrong-pw"}),
                 "groups": {"g": {"timeout": 5}}})
    try:
        with pytest.raises(ConnectFailed), pool.handler("g"):
            pass
        (stats,) = pool.stats()["endpoints"].values()
        assert stats["state"] == "up" and stats["quarantines"] == 0
    finally:
        pool.close()


@pytest.mark.parametrize(("overrides", "limit"), [
    ({"user": "limited", "pass": "limited-pw"}, "ALTER ROLE"),
    ({"user": "alice", "pass": "right-pw", "name": "closeddb"}, "ALTER DATABASE"),
])
def test_a_connection_limit_refusal_names_the_limit_and_quarantines_nothing(
    auth_server: Cluster, mode: str, overrides: dict[str, Any], limit: str
) -> None:
    """A group whose connects meet a role's (or a database's) CONNECTION LIMIT: its callers
    are told which limit and how to raise it, not to check that the servers are up (they
    are); the endpoint is left alone for a moment like a full server, never quarantined."""
    from greenpool import NoHealthyEndpoint, Pool

    pool = Pool({"type": mode, "db": server(auth_server, **overrides),
                 "groups": {"g": {"timeout": 1}}})
    try:
        with pytest.raises(NoHealthyEndpoint) as info, pool.handler("g"):
            pass
        message = str(info.value)
        assert "too many connections for" in message and limit in message, message
        assert "up and reachable" not in message, message
        (stats,) = pool.stats()["endpoints"].values()
        assert stats["state"] == "up" and stats["quarantines"] == 0, stats
        assert stats["full"] >= 1, stats
    finally:
        pool.close()


# --- a real PgBouncer -------------------------------------------------------------------------

needs_pgbouncer = pytest.mark.skipif(not available(), reason="/usr/sbin/pgbouncer not installed")


@pytest.fixture(scope="module")
def bouncer(pg: Cluster) -> Iterator[PgBouncer]:
    with PgBouncer(pg, max_client_conn=3) as b:
        yield b


@needs_pgbouncer
def test_pgbouncer_refuses_the_options_startup_parameter(bouncer: PgBouncer, mode: str) -> None:
    # pooler 'none': the user says it is PostgreSQL, so no detection (tests/test_pgbouncer.py)
    exc = attempt(mode, bouncer.endpoint(statement_timeout=5, pooler="none"))
    assert (exc.fatal, exc.kind) == (True, "pooler_startup_parameter")
    assert "unsupported startup parameter: options" in exc.reason
    assert "pooler: 'transaction'" in exc.hint and "statement_timeout" in exc.hint


@needs_pgbouncer
def test_pool_through_pgbouncer_fails_fast_on_the_options_parameter(
    bouncer: PgBouncer, mode: str
) -> None:
    from greenpool import Pool

    pool = Pool({"type": mode, "db": bouncer.endpoint(pooler="none"),
                 "groups": {"g": {"timeout": 30, "readonly": True}}})
    try:
        started = time.monotonic()
        with pytest.raises(ConnectFailed) as info, pool.handler("g"):
            pass
        assert not isinstance(info.value, PoolTimeout)
        assert time.monotonic() - started < 10
        assert "unsupported startup parameter" in str(info.value)
    finally:
        pool.close()


@needs_pgbouncer
def test_pgbouncer_without_options_works(bouncer: PgBouncer, make_pool: Any) -> None:
    pool = make_pool({"g": {}}, db=bouncer.endpoint())
    with pool.handler("g") as db:
        assert db.query_one("SELECT 1")[0] == 1


@needs_pgbouncer
def test_pgbouncer_unknown_database_is_fatal(bouncer: PgBouncer, mode: str) -> None:
    exc = attempt(mode, bouncer.endpoint(name="nodb"))
    assert (exc.fatal, exc.kind) == (True, "no_database")
    assert "no such database: nodb" in exc.reason


@needs_pgbouncer
def test_pgbouncer_max_client_conn_is_transient(bouncer: PgBouncer, mode: str) -> None:
    b = bouncer
    held = []
    try:
        while True:  # fill max_client_conn (other tests' clients may still be leaving)
            try:
                held.append(psycopg2.connect(host=b.host, port=b.port, dbname=b.dbname,
                                             user=b.cluster.user, password=b.cluster.password))
            except psycopg2.OperationalError:
                break
            assert len(held) <= 3
        exc = attempt(mode, b.endpoint())
        assert (exc.fatal, exc.kind) == (False, "pooler_full")
        assert "no more connections allowed" in exc.reason
    finally:
        for conn in held:
            conn.close()
