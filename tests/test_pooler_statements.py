"""Statements through a real PgBouncer, in both pool modes: the group's settings reach every
transaction, whatever the text, and valid texts run.

greenpool reads each text with PostgreSQL's parser (greenpool.sql) to find where its
transactions end and which statements refuse a transaction block; a text the server reads
differently would run part of itself without ``statement_timeout``/``readonly``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from greenpool import ConnectFailed, Pool
from greenpool.testing.pgbouncer import PgBouncer, available
from greenpool.testing.postgres import Cluster

pytestmark = pytest.mark.skipif(not available(), reason="/usr/sbin/pgbouncer not installed")

T = "greenpool_ps_t"


@pytest.fixture(scope="module", params=("session", "transaction"))
def bouncer(request: pytest.FixtureRequest, pg: Cluster) -> Iterator[PgBouncer]:
    pg.execute(f"CREATE TABLE IF NOT EXISTS {T} (x text)")
    pg.execute("CREATE TABLE IF NOT EXISTS greenpool_ps_parts (k int) PARTITION BY RANGE (k)")
    pg.execute("CREATE TABLE IF NOT EXISTS greenpool_ps_reindexed (k int PRIMARY KEY)")
    with PgBouncer(pg, pool_mode=request.param, max_client_conn=100, default_pool_size=10) as b:
        yield b
    pg.execute(f"DROP TABLE IF EXISTS {T}, greenpool_ps_parts, greenpool_ps_reindexed, "
               "greenpool_ps_part")


@pytest.fixture
def empty(pg: Cluster, bouncer: PgBouncer) -> Iterator[Callable[[], list[Any]]]:
    pg.execute(f"TRUNCATE {T}")
    yield lambda: pg.execute(f"SELECT x FROM {T}")
    pg.execute(f"TRUNCATE {T}")


def _group(bouncer: PgBouncer, pool_at: Any, autocommit: bool, readonly: bool = True,
           timeout: float = 0.5) -> Pool:
    return pool_at(bouncer.endpoint(pooler=str(bouncer.settings["pool_mode"])),
                 {"g": {"readonly": readonly, "statement_timeout": timeout,
                        "autocommit": autocommit}})


# a COMMIT that the hand-written lexer did not see, and a write after it
HIDDEN_COMMITS = [
    f"SELECT 1 -- c\r; COMMIT; INSERT INTO {T} VALUES ('cr')",
    f"SELECT 1 /* begin atomic */; COMMIT; INSERT INTO {T} VALUES ('comment')",
    f"SELECT 'begin atomic'; COMMIT; INSERT INTO {T} VALUES ('literal')",
    f"SELECT 1 AS x\u20ac$a$; COMMIT; INSERT INTO {T} VALUES ('identifier') -- $a$",
    f"SELECT $\U0001f600$ $$ $\U0001f600$; COMMIT; INSERT INTO {T} VALUES ('tag') -- $$",
]


@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.parametrize("text", HIDDEN_COMMITS)
def test_a_hidden_commit_is_refused_before_anything_is_sent(
    bouncer: PgBouncer, pool_at: Any, empty: Callable[[], list[Any]], autocommit: bool,
    text: str,
) -> None:
    pool = _group(bouncer, pool_at, autocommit)
    with pytest.raises(psycopg2.ProgrammingError, match="own execute"), \
            pool.handler("g") as db, db.cursor() as cur:
        cur.execute(text)
    assert empty() == []


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_named_cursor_s_query_is_one_statement(
    bouncer: PgBouncer, pool_at: Any, empty: Callable[[], list[Any]], autocommit: bool,
) -> None:
    pool = _group(bouncer, pool_at, autocommit)
    with pytest.raises(psycopg2.ProgrammingError, match="one statement"), \
            pool.handler("g") as db:
        cur = db.cursor("named", withhold=True)
        cur.execute(f"SELECT 1; COMMIT; INSERT INTO {T} VALUES ('after a declare')")
    assert empty() == []


@pytest.mark.parametrize("autocommit", [True, False])
def test_statement_timeout_after_a_hidden_commit(bouncer: PgBouncer, pool_at: Any,
                                                 autocommit: bool) -> None:
    pool = _group(bouncer, pool_at, autocommit, readonly=False)
    started = time.monotonic()
    with pytest.raises(psycopg2.Error), pool.handler("g") as db, db.cursor() as cur:
        cur.execute("SELECT 1 -- c\r; COMMIT; SELECT pg_sleep(1.5)")
    assert time.monotonic() - started < 1.2


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_write_spelled_like_vacuum_keeps_the_settings(
    bouncer: PgBouncer, pool_at: Any, empty: Callable[[], list[Any]], autocommit: bool,
) -> None:
    pool = _group(bouncer, pool_at, autocommit)
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("g") as db, \
            db.cursor() as cur:
        cur.execute(f"-- c\rINSERT INTO {T} SELECT 'v' AS \nvacuum")
    assert empty() == []


def test_a_statement_that_may_run_in_a_block_keeps_its_transaction_settings(
    bouncer: PgBouncer, pool_at: Any, empty: Callable[[], list[Any]],
) -> None:
    """``DROP SUBSCRIPTION IF EXISTS`` runs inside a block when there is nothing to drop:
    without autocommit it is sent with the settings, as is the rest of its transaction."""
    readonly = _group(bouncer, pool_at, autocommit=False)
    with pytest.raises(psycopg2.Error), readonly.handler("g") as db, db.cursor() as cur:
        cur.execute("DROP SUBSCRIPTION IF EXISTS greenpool_ps_none")
        cur.execute(f"INSERT INTO {T} VALUES ('after drop subscription')")
    assert empty() == []
    timed = _group(bouncer, pool_at, autocommit=False, readonly=False)
    with pytest.raises(psycopg2.errors.QueryCanceled), timed.handler("g") as db, \
            db.cursor() as cur:
        cur.execute("DROP SUBSCRIPTION IF EXISTS greenpool_ps_none")
        cur.execute("SELECT pg_sleep(1)")


@pytest.mark.parametrize(("text", "value"), [
    ("SAVEPOINT a; SELECT 1; ROLLBACK TRANSACTION TO SAVEPOINT a; SELECT 'rolled back'",
     "rolled back"),
    ("SAVEPOINT a; ROLLBACK WORK TO a; SELECT 'work'", "work"),
    ("SELECT $A$ $a$; COMMIT; $a$ $A$", " $a$; COMMIT; $a$ "),  # tags are case-sensitive
    ("SELECT E'a'\n'\\'; COMMIT; SELECT 1 -- '", "a'; COMMIT; SELECT 1 -- "),
])
def test_valid_texts_run(bouncer: PgBouncer, pool_at: Any, text: str, value: str) -> None:
    pool = _group(bouncer, pool_at, autocommit=False)
    with pool.handler("g") as db, db.cursor() as cur:
        cur.execute(text)
        assert cur.fetchone()[0] == value
        cur.execute("SHOW statement_timeout")
        assert cur.fetchone()[0] == "500ms"


def test_statements_that_refuse_a_block_run_alone(bouncer: PgBouncer, pool_at: Any,
                                                  pg: Cluster) -> None:
    pg.execute("DROP TABLE IF EXISTS greenpool_ps_part")
    pg.execute("CREATE TABLE greenpool_ps_part PARTITION OF greenpool_ps_parts "
               "FOR VALUES FROM (0) TO (10)")
    pool = _group(bouncer, pool_at, autocommit=True, readonly=False, timeout=5)
    with pool.handler("g") as db:
        db.query("CLUSTER")
        db.query("REINDEX (CONCURRENTLY) TABLE greenpool_ps_reindexed")
        db.query("ALTER TABLE greenpool_ps_parts DETACH PARTITION greenpool_ps_part "
                 "CONCURRENTLY")
        db.query("VACUUM (ANALYZE) greenpool_ps_part")


def test_a_long_text_does_not_stall_the_caller(bouncer: PgBouncer, pool_at: Any,
                                               empty: Callable[[], list[Any]]) -> None:
    """60 KB of ';/*' in a value took the hand-written lexer seconds (quadratic)."""
    pool = _group(bouncer, pool_at, autocommit=True, readonly=False)
    value = ";/*" * 20_000
    with pool.handler("g") as db, db.cursor() as cur:
        started = time.monotonic()
        cur.execute(f"INSERT INTO {T} VALUES (%s)", [value])
        assert time.monotonic() - started < 0.5
    assert empty() == [(value,)]


def test_old_style_literals_are_refused_at_connect(pg_factory: Callable[..., Cluster],
                                                   pool_at: Any) -> None:
    server = pg_factory(settings={"standard_conforming_strings": "off"})
    with PgBouncer(server, pool_mode="transaction") as b:
        pool = pool_at(b.endpoint(pooler="transaction"), {"g": {"timeout": 5}})
        with pytest.raises(ConnectFailed, match="standard_conforming_strings=off"), \
                pool.handler("g"):
            pass


def test_a_detected_pooler_still_gets_the_session_reset(pg_factory: Callable[..., Cluster],
                                                        pool_at: Any) -> None:
    """Its mode is unknown: a session-mode PgBouncer pins the server connection, and what a
    loan left there reaches the next one unless it is reset."""
    server = pg_factory()
    with PgBouncer(server, pool_mode="session") as b:
        pool = pool_at(b.endpoint(), {"g": {"statement_timeout": 0.4, "connection_count": 1}})
        with pool.handler("g") as db:
            db.execute("SET search_path TO greenpool_ps_elsewhere")
        with pool.handler("g") as db:
            assert db.query_one("SHOW search_path")[0] == '"$user", public'
            assert db.query_one("SHOW statement_timeout")[0] == "400ms"


@pytest.mark.parametrize("autocommit", [True, False])
def test_every_cursor_class_carries_the_settings(
    bouncer: PgBouncer, pool_at: Any, empty: Callable[[], list[Any]], autocommit: bool,
) -> None:
    """The handler's own statements and raw cursors of any class (given per cursor, or set
    as the connection's default by the user) carry the group's readonly setting."""
    import psycopg2.extras

    pool = _group(bouncer, pool_at, autocommit)
    with pool.handler("g") as db:
        db.connection.cursor_factory = psycopg2.extras.NamedTupleCursor
        for factory in (None, psycopg2.extras.RealDictCursor, psycopg2.extensions.cursor):
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), \
                    db.cursor(**({} if factory is None else {"cursor_factory": factory})) as c:
                c.execute(f"INSERT INTO {T} VALUES ('raw')")
            db.rollback()
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            db.query(f"INSERT INTO {T} VALUES ('own')")
        db.rollback()
    assert empty() == []
