"""Every group through a real PgBouncer (Debian's 1.18), in session and in transaction mode.

What must hold: the group's settings (statement_timeout, readonly, the readonly
of a standby group) reach the server although PgBouncer refuses the ``options`` startup
parameter, without leaving session state on a server connection in transaction mode; roles
are found by query (PgBouncer's ``in_hot_standby`` is stale after a promotion); a server
stopped behind PgBouncer makes acquires fail within their timeout with a pool error, and
serving resumes within seconds of its return; PgBouncer's own errors are judged like the
server's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from modes import wait_until

from greenpool import ConnectFailed, NoHealthyEndpoint, Pool, PoolError
from greenpool.connection import is_pooled
from greenpool.roles import role_of
from greenpool.testing.pgbouncer import PgBouncer, available
from greenpool.testing.postgres import Cluster

pytestmark = pytest.mark.skipif(not available(), reason="/usr/sbin/pgbouncer not installed")

POOL_MODES = ("session", "transaction")


def client(b: PgBouncer, **kw: Any) -> Any:
    """A plain psycopg2 client through ``b`` (autocommit), outside any pool."""
    c = b.cluster
    conn = psycopg2.connect(host=b.host, port=b.port, dbname=b.dbname, user=c.user,
                            password=c.password, connect_timeout=5, **kw)
    conn.autocommit = True
    return conn


def one(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


@pytest.fixture
def pools(mode: str) -> Iterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(db: Any, groups: dict[str, Any], **top: Any) -> Pool:
        pool = Pool({"type": mode, "db": db, "groups": groups, **top})
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


@pytest.fixture(scope="module", params=POOL_MODES)
def bouncer(request: pytest.FixtureRequest, pg: Cluster) -> Iterator[PgBouncer]:
    """The shared server behind a PgBouncer in each pool mode."""
    with PgBouncer(pg, pool_mode=request.param, max_client_conn=200,
                   default_pool_size=20) as b:
        yield b


def pool_mode(b: PgBouncer) -> str:
    return str(b.settings["pool_mode"])


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False])
def test_settings_reach_the_server(bouncer: PgBouncer, pools: Any, autocommit: bool) -> None:
    pool = pools(bouncer.endpoint(pooler=pool_mode(bouncer)), {
        "ro": {"readonly": True, "statement_timeout": 0.3, "autocommit": autocommit},
        "rw": {"statement_timeout": 0.4, "autocommit": autocommit, "row_factory": "dict"},
    })
    for _ in range(3):  # every transaction, not only the first
        with pool.handler("ro") as db:
            assert db.query_one("SHOW statement_timeout")[0] == "300ms"
            assert db.query_one("SHOW transaction_read_only")[0] == "on"
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("ro") as db:
            db.query("CREATE TABLE greenpool_pgb_never (x int)")
        with pytest.raises(psycopg2.errors.QueryCanceled), pool.handler("ro") as db:
            db.query("SELECT pg_sleep(3)")
        with pool.handler("rw") as db:
            assert db.query_one("SHOW statement_timeout")["statement_timeout"] == "400ms"
            assert db.query_one("SHOW transaction_read_only")["transaction_read_only"] == "off"
            with db.cursor() as cur:  # the raw cursor carries the settings too
                cur.execute("SHOW statement_timeout")
                assert cur.fetchone()["statement_timeout"] == "400ms"


def test_a_hand_made_transaction_and_statements_outside_one(bouncer: PgBouncer,
                                                            pools: Any) -> None:
    pool = pools(bouncer.endpoint(pooler=pool_mode(bouncer)),
                 {"g": {"readonly": True, "statement_timeout": 0.3, "autocommit": True}})
    with pool.handler("g") as db:
        db.execute("BEGIN")  # a BEGIN by hand on autocommit keeps the settings to its end
        assert db.query_one("SHOW statement_timeout")[0] == "300ms"
        assert db.query_one("SHOW transaction_read_only")[0] == "on"
        db.commit()
        db.query("VACUUM pg_class")  # refuses a transaction block: sent without settings
        db.executemany("SELECT %s", [(1,), (2,)])


def test_a_pooler_is_detected_without_the_key(pg: Cluster, pools: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with PgBouncer(pg, pool_mode="transaction") as b:
        pool = pools(b.endpoint(), {"g": {"readonly": True, "statement_timeout": 0.3}})
        with caplog.at_level(logging.WARNING, "greenpool"), pool.handler("g") as db:
            assert db.query_one("SHOW statement_timeout")[0] == "300ms"
            assert db.query_one("SHOW transaction_read_only")[0] == "on"
        warned = [r.getMessage() for r in caplog.records if "refused the `options`" in
                  r.getMessage()]
        assert len(warned) == 1 and "pooler: 'transaction'" in warned[0]


def test_a_pooler_that_drops_options_is_detected_by_a_readonly_group(
    pg: Cluster, pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``ignore_startup_parameters = options`` makes PgBouncer drop the settings silently;
    the readonly group's connection then reports default_transaction_read_only=off."""
    with PgBouncer(pg, pool_mode="transaction", ignore_startup_parameters="options") as b:
        pool = pools(b.endpoint(), {"g": {"readonly": True, "statement_timeout": 0.3}})
        with caplog.at_level(logging.WARNING, "greenpool"), pool.handler("g") as db:
            assert db.query_one("SHOW statement_timeout")[0] == "300ms"
            assert db.query_one("SHOW transaction_read_only")[0] == "on"
        assert any("dropped the `options`" in r.getMessage() for r in caplog.records)


def test_pooler_none_fails_fast_and_says_what_to_do(bouncer: PgBouncer, pools: Any) -> None:
    pool = pools(bouncer.endpoint(pooler="none"), {"g": {"readonly": True, "timeout": 30}})
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as info, pool.handler("g"):
        pass
    assert time.monotonic() - started < 10
    assert not isinstance(info.value, NoHealthyEndpoint)
    assert "unsupported startup parameter" in str(info.value)
    assert "pooler: 'transaction'" in str(info.value)


def test_session_tmp_buffer_cannot_travel_through_a_pooler(bouncer: PgBouncer) -> None:
    from greenpool import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"session_tmp_buffer.*ALTER ROLE"):
        parse_config({"db": bouncer.endpoint(pooler="transaction", session_tmp_buffer=16)})


# --- nothing left on a server connection (transaction mode) ---------------------------------


def test_nothing_greenpool_does_stays_on_a_server_connection(
    pg_factory: Callable[..., Cluster], pools: Any
) -> None:
    """One server connection shared by every client (default_pool_size=1): whatever a
    group's loans leave on it, a plain client through the same PgBouncer would see. The
    server logs every statement: greenpool sends no DISCARD ALL there."""
    server = pg_factory(settings={"log_statement": "all"})
    with PgBouncer(server, pool_mode="transaction", default_pool_size=1) as b:
        pool = pools(b.endpoint(pooler="transaction"), {
            "ro": {"readonly": True, "statement_timeout": 0.3, "autocommit": True},
            "rw": {"statement_timeout": 0.4},
            "standby": {"role": "prefer-standby", "statement_timeout": 0.5},
        })
        for group in ("ro", "rw", "standby", "ro", "rw"):
            with pool.handler(group) as db:
                db.query("SELECT 1")
                db.cursor().execute("SELECT 2")  # a dirty loan: the return reset runs
        plain = client(b)
        try:
            assert one(plain, "SHOW statement_timeout") == "0"
            assert one(plain, "SHOW transaction_read_only") == "off"
            assert one(plain, "SHOW default_transaction_read_only") == "off"
        finally:
            plain.close()
        assert "session_changed" not in pool.stats()["groups"]["rw"]["discards_by_reason"]
    log = server.logfile.read_text(errors="replace")
    assert "SELECT 2" in log and "DISCARD" not in log.upper()


def test_the_session_mode_reset_still_discards(pg_factory: Callable[..., Cluster],
                                               pools: Any) -> None:
    """Session mode pins a client to one server connection: DISCARD ALL cleans it, and the
    group's settings, which travel per transaction, survive it."""
    server = pg_factory(settings={"log_statement": "all"})
    with PgBouncer(server, pool_mode="session") as b:
        pool = pools(b.endpoint(pooler="session"),
                     {"g": {"statement_timeout": 0.4, "connection_count": 1}})
        with pool.handler("g") as db:
            db.execute("SET work_mem = '7MB'")
        with pool.handler("g") as db:
            assert db.query_one("SHOW work_mem")[0] != "7MB"
            assert db.query_one("SHOW statement_timeout")[0] == "400ms"
    assert "DISCARD ALL" in server.logfile.read_text(errors="replace")


# --- roles ------------------------------------------------------------------------------


@pytest.fixture
def pair(pg_factory: Callable[..., Cluster]) -> tuple[Cluster, Cluster]:
    primary = pg_factory()
    return primary, pg_factory(standby_of=primary)


def test_pgbouncer_reports_a_stale_in_hot_standby(pair: tuple[Cluster, Cluster],
                                                  pools: Any) -> None:
    """Measured: after its server is promoted PgBouncer still tells new clients
    ``in_hot_standby=on`` (from the server connection it logged in first). So greenpool
    asks the server by query through a pooler, and a primary group works at once."""
    _, standby = pair
    with PgBouncer(standby, pool_mode="transaction") as b:
        first = client(b)
        assert first.get_parameter_status("in_hot_standby") == "on"
        standby.promote()
        wait_until(lambda: standby.execute("SELECT pg_is_in_recovery()")[0][0] is False, 30,
                   "the promotion")
        later = client(b)
        try:
            assert later.get_parameter_status("in_hot_standby") == "on"  # stale
            assert one(later, "SELECT pg_is_in_recovery()") is False
        finally:
            first.close()
            later.close()
        pool = pools(b.endpoint(pooler="transaction"), {"write": {"role": "primary",
                                                                  "timeout": 10}})
        with pool.handler("write") as db:
            assert db.query_one("SELECT pg_is_in_recovery()")[0] is False
            assert is_pooled(db.connection) and role_of(db.connection) == "unknown"


@pytest.mark.parametrize("pooled", POOL_MODES)
def test_primary_and_standby_groups_each_behind_their_own_pgbouncer(
    pair: tuple[Cluster, Cluster], pools: Any, pooled: str
) -> None:
    primary, standby = pair
    with PgBouncer(primary, pool_mode=pooled) as bp, PgBouncer(standby, pool_mode=pooled) as bs:
        pool = pools([bp.endpoint(pooler=pooled), bs.endpoint(pooler=pooled)], {
            "write": {"role": "primary", "timeout": 10},
            "read": {"role": "standby", "timeout": 10, "max_lag": 30},
            "prefer": {"role": "prefer-standby", "timeout": 10, "autocommit": True},
        }, role_check_interval=0.2)
        for _ in range(3):
            with pool.handler("write") as db:
                assert db.query_one("SELECT pg_is_in_recovery()")[0] is False
                db.query("CREATE TABLE IF NOT EXISTS greenpool_pgb_roles (x int)")
            for group in ("read", "prefer"):
                with pool.handler(group) as db:
                    assert db.query_one("SELECT pg_is_in_recovery()")[0] is True
                    assert db.query_one("SHOW transaction_read_only")[0] == "on"
        roles = {e["role"] for e in pool.stats()["endpoints"].values()}
        assert roles == {"primary", "standby"}


# --- faults -----------------------------------------------------------------------------


@pytest.mark.parametrize("pooled", POOL_MODES)
def test_server_stopped_behind_pgbouncer(pg_factory: Callable[..., Cluster], pools: Any,
                                         pooled: str) -> None:
    """PgBouncer set up as the README says: a statement waiting for a server connection
    gives up after query_wait_timeout (default 120 s: greenpool cannot see that wait), and
    it tries the server's login again after server_login_retry (default 15 s)."""
    server = pg_factory()
    with PgBouncer(server, pool_mode=pooled, server_login_retry=1, query_wait_timeout=2,
                   server_connect_timeout=2) as b:
        pool = pools(b.endpoint(pooler=pooled, connect_timeout=2), {
            "any": {"timeout": 2, "connection_count": 2},
            "write": {"role": "primary", "timeout": 2, "statement_timeout": 1},
        })
        for group in ("any", "write"):
            with pool.handler(group) as db:
                assert db.query_one("SELECT 1")[0] == 1
        server.stop("immediate")
        errors: list[BaseException] = []
        for _ in range(3):
            for group in ("any", "write"):
                started = time.monotonic()
                with pytest.raises(psycopg2.OperationalError) as info, \
                        pool.handler(group) as db:
                    db.query("SELECT 1")
                assert time.monotonic() - started < 2 + 2 + 1.5  # timeout + a wait in the pooler
                errors.append(info.value)
        # a connection idle in the pool may fail its first statement; the acquires after
        # it answer with the pool's own error
        assert all(isinstance(e, PoolError) for e in errors[2:]), errors
        server.start()
        back = time.monotonic()

        def serves() -> bool:
            try:
                for group in ("any", "write"):
                    with pool.handler(group, timeout=0.5) as db:
                        db.query("SELECT 1")
                return True
            except psycopg2.OperationalError:
                return False

        wait_until(serves, 15, "serving again")
        assert time.monotonic() - back < 8


def test_query_wait_timeout_is_transient(pg: Cluster, pools: Any) -> None:
    """A real query_wait_timeout: the only server connection is pinned by a session-mode
    client, so greenpool's first query through PgBouncer waits, and PgBouncer gives up."""
    with PgBouncer(pg, pool_mode="session", default_pool_size=1, query_wait_timeout=1) as b:
        holder = client(b)
        try:
            one(holder, "SELECT 1")
            pool = pools(b.endpoint(pooler="session"), {"g": {"timeout": 2.5}})
            with pytest.raises(NoHealthyEndpoint) as info, pool.handler("g"):
                pass
            assert "query_wait_timeout" in str(info.value)
        finally:
            holder.close()
        with pool.handler("g", timeout=10) as db:  # transient: it serves once freed
            assert db.query_one("SELECT 1")[0] == 1


def test_no_more_connections_allowed_is_transient(pg: Cluster, pools: Any) -> None:
    with PgBouncer(pg, pool_mode="transaction", max_client_conn=2) as b:
        held = [client(b), client(b)]
        try:
            pool = pools(b.endpoint(pooler="transaction"), {"g": {"timeout": 1.5}})
            with pytest.raises(NoHealthyEndpoint) as info, pool.handler("g"):
                pass
            assert "no more connections allowed" in str(info.value)
        finally:
            for conn in held:
                conn.close()
        with pool.handler("g", timeout=10) as db:
            assert db.query_one("SELECT 1")[0] == 1


def test_a_missing_pooler_database_is_fatal(bouncer: PgBouncer, pools: Any) -> None:
    pool = pools(bouncer.endpoint(name="nodb", pooler=pool_mode(bouncer)),
                 {"g": {"timeout": 30}})
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as info, pool.handler("g"):
        pass
    assert not isinstance(info.value, NoHealthyEndpoint)
    assert time.monotonic() - started < 10
    assert "no such database" in str(info.value)


def test_a_server_connection_that_crashes_mid_transaction(bouncer: PgBouncer, pg: Cluster,
                                                          pools: Any) -> None:
    """The server backend dies mid-transaction: PgBouncer closes the client (libpq says
    "server closed the connection unexpectedly"; PgBouncer's ``server conn crashed?`` text
    is judged with the recorded message in unit/test_failure_classification.py). The loan
    fails as a lost connection, not a pool error, and the next one is served."""
    pool = pools(bouncer.endpoint(pooler=pool_mode(bouncer)), {"g": {"timeout": 5}})
    with pytest.raises(psycopg2.OperationalError) as info, pool.handler("g") as db:
        pid = db.query_one("SELECT pg_backend_pid()")[0]
        pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        db.query("SELECT 1")
    assert not isinstance(info.value, PoolError)
    with pool.handler("g") as db:
        assert db.query_one("SELECT 1")[0] == 1


def test_the_role_probe_reads_tuples_for_a_dict_group(pg: Cluster) -> None:
    """Not a pooler matter, found here: the probe's columns repeat names, so a group's
    ``row_factory: 'dict'`` cursor lost columns and every probe failed."""
    import psycopg2.extras

    from greenpool.roles import read_role

    raw = psycopg2.connect(pg.dsn(), cursor_factory=psycopg2.extras.RealDictCursor)
    try:
        assert read_role(raw).role == "primary"
    finally:
        raw.close()


@pytest.mark.timeout(60)
def test_a_role_query_cut_by_the_callers_deadline_judges_nothing(pg: Cluster) -> None:
    """Behind a pooler a connect's role query proves the server is there. A slow login (a
    proxy holds it 1.2 s) leaves the inline connect's caller less than ``connect_timeout``
    for that query, which the server (another proxy) holds 6 s: the caller's deadline cuts
    it, which says nothing of the server. The caller gets a PoolTimeout saying its time
    ran out, and the endpoint is not quarantined."""
    from delayproxy import DelayProxy
    from modes import MODE

    from greenpool import PoolTimeout
    from greenpool.endpoint import UP

    if MODE != "threaded":
        pytest.skip("non-threaded runs once, in the threaded process")
    with PgBouncer(pg, pool_mode="transaction") as bouncer, \
            DelayProxy(bouncer.port, 6.0, b"pg_is_in_recovery") as slow_query, \
            DelayProxy(slow_query.port, 1.2, b"user") as slow_login:
        pool = Pool({"type": "non-threaded",
                     "db": bouncer.endpoint(port=slow_login.port, pooler="transaction",
                                            connect_timeout=2),
                     "groups": {"w": {"connection_count": 1}}})
        try:
            group = pool.group("w")
            started = time.monotonic()
            with pytest.raises(PoolTimeout, match="cut short"):
                group.acquire(timeout=2.5)
            assert time.monotonic() - started < 3.0
            assert (slow_login.held(), slow_query.held()) == (1, 1)
            assert group.endpoints[0].state == UP
        finally:
            pool.close()



@pytest.mark.timeout(60)
def test_a_connect_failing_after_close_judges_nothing(pg: Cluster, pools: Any,
                                                      caplog: Any) -> None:
    """``close()`` while a connect's role query waits behind the pooler (a proxy holds it),
    then the way to the server goes away (the proxy stops): a connect of a closed pool that
    fails says nothing anyone will act on; it was judged a failed connect and logged as the
    endpoint's quarantine (``server closed the connection unexpectedly``)."""
    from delayproxy import DelayProxy
    from modes import join_all, spawn

    from greenpool.endpoint import QUARANTINED

    with PgBouncer(pg, pool_mode="transaction") as bouncer, \
            caplog.at_level("WARNING", logger="greenpool"):
        with DelayProxy(bouncer.port, 3.0, b"pg_is_in_recovery") as proxy:
            pool = pools(bouncer.endpoint(port=proxy.port, pooler="transaction",
                                          connect_timeout=10), {"g": {"connection_count": 1}})
            group = pool.group("g")
            (endpoint,) = group.endpoints
            failures: list[BaseException] = []

            def borrow() -> None:
                try:
                    group.release(group.acquire(10))
                except PoolError as exc:
                    failures.append(exc)

            taker = spawn(borrow)
            wait_until(lambda: proxy.held() >= 1, 10, "the role query to be held")
            pool.close()
            join_all([taker], 10)
        wait_until(lambda: not endpoint.connecting, 10, "the connect to end")
        assert failures  # the borrower was told the pool closed
        assert endpoint.state != QUARANTINED
        assert not [r for r in caplog.records if "quarantined" in r.getMessage()]
