"""A group's settings through a real PgBouncer, attacked: a readonly group never writes and
statement_timeout always applies (greenpool/pooler.py sends them with every transaction).

The attacks:

* a statement that merely *mentions* ``index`` and ``concurrently`` (a literal, a comment)
  must not be taken for ``CREATE INDEX CONCURRENTLY`` and sent without the settings; nor
  may a nested comment hide the first keyword;
* a text that ends its transaction midway (``SELECT 1; COMMIT; INSERT ...``) must not run
  the rest in a new transaction without the settings;
* a readonly autocommit group is refused what the server refuses a direct readonly
  connection (``CREATE DATABASE`` refuses a transaction block, so it travels without one);
* ``callproc`` and a ``WITH HOLD`` cursor in autocommit carry the settings too, and after a
  ``COMMIT`` sent as SQL; so does the transaction ``COMMIT AND CHAIN`` begins.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from greenpool import Pool
from greenpool.testing.pgbouncer import PgBouncer, available
from greenpool.testing.postgres import Cluster

TABLE = "greenpool_pooled_never"


# --- against a real PgBouncer ---------------------------------------------------------------

needs_pgbouncer = pytest.mark.skipif(not available(), reason="/usr/sbin/pgbouncer not installed")


@pytest.fixture(scope="module", params=("session", "transaction"))
def bouncer(request: pytest.FixtureRequest, pg: Cluster) -> Iterator[PgBouncer]:
    if not available():
        pytest.skip("/usr/sbin/pgbouncer not installed")
    pg.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (x text)")
    pg.execute("CREATE OR REPLACE FUNCTION greenpool_pooled_write() RETURNS int "
               f"LANGUAGE sql AS $$ INSERT INTO {TABLE} VALUES ('function') RETURNING 1 $$")
    with PgBouncer(pg, pool_mode=request.param, max_client_conn=100,
                   default_pool_size=10) as b:
        yield b
    pg.execute(f"DROP TABLE IF EXISTS {TABLE}")
    pg.execute("DROP FUNCTION IF EXISTS greenpool_pooled_write()")


def _readonly(bouncer: PgBouncer, pool_at: Any, autocommit: bool) -> Pool:
    return pool_at(bouncer.endpoint(pooler=str(bouncer.settings["pool_mode"])),
                 {"ro": {"readonly": True, "statement_timeout": 0.3, "autocommit": autocommit}})


def _rows(pg: Cluster) -> list[Any]:
    return pg.execute(f"SELECT x FROM {TABLE}")


WRITES = [
    f"INSERT INTO {TABLE} VALUES ('index concurrently')",
    f"/* /* */ vacuum */ INSERT INTO {TABLE} VALUES ('nested comment')",
    f"SELECT 1; COMMIT; INSERT INTO {TABLE} VALUES ('after commit')",
    f"BEGIN; SELECT 1; END; INSERT INTO {TABLE} VALUES ('after end')",
    "SELECT greenpool_pooled_write(), 'create index concurrently'",
]


@needs_pgbouncer
@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.parametrize("sql", WRITES)
def test_a_readonly_group_never_writes(bouncer: PgBouncer, pool_at: Any, pg: Cluster,
                                       autocommit: bool, sql: str) -> None:
    pool = _readonly(bouncer, pool_at, autocommit)
    with pytest.raises(psycopg2.Error), pool.handler("ro") as db, db.cursor() as cur:
        cur.execute(sql)
    assert _rows(pg) == []


@needs_pgbouncer
@pytest.mark.parametrize("autocommit", [True, False])
def test_callproc_and_a_held_cursor_of_a_readonly_group_never_write(
    bouncer: PgBouncer, pool_at: Any, pg: Cluster, autocommit: bool
) -> None:
    pool = _readonly(bouncer, pool_at, autocommit)
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("ro") as db, \
            db.cursor() as cur:
        cur.callproc("greenpool_pooled_write")
    with pool.handler("ro") as db:
        cur = db.cursor("held", withhold=True)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            cur.execute("SELECT greenpool_pooled_write()")
            cur.fetchall()
        db.rollback()
    with pool.handler("ro") as db:  # a held cursor still works, with the settings
        with db.cursor("held_ok", withhold=True) as cur:
            cur.execute("SELECT current_setting('transaction_read_only'), "
                        "current_setting('statement_timeout')")
            assert cur.fetchall() == [("on", "300ms")]
        db.commit()
    assert _rows(pg) == []


@needs_pgbouncer
@pytest.mark.parametrize("ended_by", ["COMMIT", "ROLLBACK"])
def test_calls_after_a_transaction_ended_as_sql_still_carry_the_settings(
    bouncer: PgBouncer, pool_at: Any, pg: Cluster, ended_by: str
) -> None:
    """A ``COMMIT`` sent as SQL leaves psycopg2 believing a transaction open: it sends no
    BEGIN before the next call, so settings sent alone would end at once."""
    pool = _readonly(bouncer, pool_at, False)
    with pool.handler("ro") as db:
        with db.cursor() as cur:
            cur.execute("SELECT 1")
            cur.execute(ended_by)
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                cur.callproc("greenpool_pooled_write")
        db.rollback()
        with db.cursor() as cur:
            cur.execute(ended_by)
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.callproc("pg_sleep", (2,))
        db.rollback()
        with db.cursor() as cur:
            cur.execute(ended_by)
        held = db.cursor("held_after_end", withhold=True)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            held.execute("SELECT greenpool_pooled_write()")
            held.fetchall()
        db.rollback()
        with db.cursor() as cur:
            cur.execute(ended_by)
        unheld = db.cursor("unheld_after_end")  # refused by the server, as directly
        with pytest.raises(psycopg2.errors.NoActiveSqlTransaction):
            unheld.execute("SELECT 1")
        db.rollback()
    assert _rows(pg) == []


@needs_pgbouncer
@pytest.mark.parametrize("autocommit", [True, False])
def test_a_chained_transaction_carries_the_settings(
    bouncer: PgBouncer, pool_at: Any, autocommit: bool
) -> None:
    """``COMMIT AND CHAIN`` begins the next transaction at once: it keeps READ ONLY, not
    the ``SET LOCAL`` statement_timeout; the settings are sent again after it."""
    pool = _readonly(bouncer, pool_at, autocommit)
    with pool.handler("ro") as db:
        with db.cursor() as cur:
            if autocommit:
                cur.execute("BEGIN")
            cur.execute("SELECT 1")
            cur.execute("COMMIT AND CHAIN -- and on")
            cur.execute("SHOW statement_timeout")
            assert cur.fetchall() == [("300ms",)]
            with pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(2)")
        db.rollback()


@needs_pgbouncer
@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.parametrize("sql", [
    "SELECT pg_sleep(2), 'index concurrently'",
    "/* /* */ vacuum */ SELECT pg_sleep(2)",
    "SELECT 1; ROLLBACK; SELECT pg_sleep(2)",
])
def test_statement_timeout_always_applies(bouncer: PgBouncer, pool_at: Any, autocommit: bool,
                                          sql: str) -> None:
    pool = _readonly(bouncer, pool_at, autocommit)
    with pytest.raises((psycopg2.errors.QueryCanceled, psycopg2.ProgrammingError)), \
            pool.handler("ro") as db, db.cursor() as cur:
        cur.execute(sql)


@needs_pgbouncer
def test_a_text_that_commits_midway_is_refused_before_it_is_sent(
    bouncer: PgBouncer, pool_at: Any, pg: Cluster
) -> None:
    pool = pool_at(bouncer.endpoint(pooler=str(bouncer.settings["pool_mode"])),
                 {"rw": {"statement_timeout": 0.3, "autocommit": True}})
    with pytest.raises(psycopg2.ProgrammingError, match="own execute"), \
            pool.handler("rw") as db, db.cursor() as cur:
        cur.execute(f"INSERT INTO {TABLE} VALUES ('before'); COMMIT; SELECT pg_sleep(2)")
    assert _rows(pg) == []  # nothing of it ran
    with pool.handler("rw") as db:  # the same statements one by one are fine
        db.execute(f"INSERT INTO {TABLE} VALUES ('one by one')")
        db.execute("SELECT 1")
    assert _rows(pg) == [("one by one",)]
    pg.execute(f"DELETE FROM {TABLE}")


# statements that refuse a transaction block; the ones a read-only transaction refuses name
# things that do not exist, so that they fail harmlessly if they were let through
OUTSIDE_A_BLOCK = [
    "CREATE DATABASE greenpool_pooled_never", "DROP DATABASE greenpool_pooled_none",
    "CREATE TABLESPACE greenpool_pooled_ts LOCATION '/nonexistent'",
    "DROP TABLESPACE greenpool_pooled_none",
    f"CREATE INDEX CONCURRENTLY greenpool_pooled_i ON {TABLE} (x)",
    "DROP INDEX CONCURRENTLY greenpool_pooled_none",
    "DROP SUBSCRIPTION greenpool_pooled_none",
    "ALTER DATABASE greenpool_pooled_none SET TABLESPACE pg_default",
    f"VACUUM {TABLE}", "DISCARD ALL", f"REINDEX TABLE CONCURRENTLY {TABLE}",
]


def _outcome(conn: Any, sql: str) -> str:
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
        return "ran"
    except psycopg2.errors.ReadOnlySqlTransaction:
        return "refused: read-only"
    except psycopg2.Error as exc:
        return f"failed otherwise: {type(exc).__name__}"


@needs_pgbouncer
def test_a_readonly_autocommit_group_is_refused_what_the_server_refuses_directly(
    bouncer: PgBouncer, pool_at: Any, pg: Cluster
) -> None:
    direct = pg.connect(options="-c default_transaction_read_only=on")
    direct.autocommit = True
    try:
        expected = {sql: _outcome(direct, sql) for sql in OUTSIDE_A_BLOCK}
    finally:
        direct.close()
    assert expected["CREATE DATABASE greenpool_pooled_never"] == "refused: read-only"
    pool = _readonly(bouncer, pool_at, True)
    got = {}
    for sql in OUTSIDE_A_BLOCK:
        with pool.handler("ro") as db:
            got[sql] = _outcome(db.connection, sql)
    assert got == expected
    assert pg.execute("SELECT count(*) FROM pg_database "
                      "WHERE datname = 'greenpool_pooled_never'") == [(0,)]


@needs_pgbouncer
@pytest.mark.parametrize("autocommit", [True, False])
def test_executemany_reports_the_rows_of_every_statement(bouncer: PgBouncer, pool_at: Any,
                                                         pg: Cluster, autocommit: bool) -> None:
    """psycopg2's executemany sums the rowcounts; through a pooler it runs the statements
    one by one (each may start a transaction) and must report the same sum."""
    pg.execute(f"INSERT INTO {TABLE} SELECT g::text FROM generate_series(1, 5) AS g")
    try:
        pool = pool_at(bouncer.endpoint(pooler=str(bouncer.settings["pool_mode"])),
                     {"rw": {"statement_timeout": 1, "autocommit": autocommit}})
        with pool.handler("rw") as db, db.cursor() as cur:
            cur.executemany(f"UPDATE {TABLE} SET x = x WHERE x::int <= %s", [(2,), (3,), (1,)])
            assert cur.rowcount == 6
            cur.execute(f"SELECT * FROM {TABLE}")
            assert cur.rowcount == 5
    finally:
        pg.execute(f"DELETE FROM {TABLE}")


@needs_pgbouncer
def test_pgdbpool_config_behind_a_declared_pooler(bouncer: PgBouncer) -> None:
    """pgdbpool's defaults include a 128 MB session_tmp_buffer, which cannot travel through
    a pooler: it is left out for an endpoint with a ``pooler`` key (it made init fail on a
    key the user never wrote), and its 5 s query_timeout still applies."""
    from greenpool.compat import pgdbpool

    mode = str(bouncer.settings["pool_mode"])
    pgdbpool.Connection.init({"db": bouncer.endpoint(pooler=mode),
                              "groups": {"g": {"connection_count": 2}}})
    try:
        with pgdbpool.Handler("g") as db:
            assert db.query("SHOW statement_timeout").fetchone()[0] == "5s"
    finally:
        pgdbpool.Connection.close()


@needs_pgbouncer
def test_a_sql_function_body_is_not_taken_for_a_transaction_end(bouncer: PgBouncer,
                                                                pool_at: Any) -> None:
    pool = pool_at(bouncer.endpoint(pooler=str(bouncer.settings["pool_mode"])),
                 {"rw": {"statement_timeout": 1}})
    with pool.handler("rw") as db, db.cursor() as cur:
        cur.execute("CREATE FUNCTION greenpool_pooled_f() RETURNS int LANGUAGE sql "
                    "BEGIN ATOMIC SELECT 1; SELECT 2; END; SELECT greenpool_pooled_f()")
        assert cur.fetchone() == (2,)
        db.rollback()  # nothing of it stays


@needs_pgbouncer
def test_connections_opened_before_a_dropping_pooler_was_detected_are_not_lent_again(
    pg: Cluster, pool_at: Any
) -> None:
    """``ignore_startup_parameters = options``: a group with only a statement_timeout cannot
    tell that its settings were dropped; once a readonly group finds out, the connections
    the other group opened before are discarded, not lent without their timeout."""
    from greenpool import pooler

    with PgBouncer(pg, pool_mode="transaction", ignore_startup_parameters="options") as b:
        try:
            pool = pool_at(b.endpoint(), {"rw": {"statement_timeout": 0.3, "connection_count": 1},
                                        "ro": {"readonly": True, "statement_timeout": 0.3}})
            with pool.handler("rw") as db:
                assert db.query_one("SHOW statement_timeout")[0] == "0"  # dropped, unseen
            with pool.handler("ro") as db:  # finds out
                assert db.query_one("SHOW transaction_read_only")[0] == "on"
            for _ in range(2):
                with pool.handler("rw") as db:
                    assert db.query_one("SHOW statement_timeout")[0] == "300ms"
            assert pool.stats()["groups"]["rw"]["discards_by_reason"].get("pooler_detected") == 1
        finally:
            pooler.forget_detected()


@needs_pgbouncer
def test_a_callproc_whose_server_connection_dies_raises_its_own_error(
    bouncer: PgBouncer, pool_at: Any, pg: Cluster
) -> None:
    """In autocommit the call runs in a transaction of greenpool's; when the server
    connection dies in it, the caller sees that error (not the failed ROLLBACK's), and no
    slot is lost."""
    pg.execute("CREATE OR REPLACE FUNCTION greenpool_pooled_die() RETURNS bool LANGUAGE sql "
               "AS $$ SELECT pg_terminate_backend(pg_backend_pid()) $$")
    pool = pool_at(bouncer.endpoint(pooler=str(bouncer.settings["pool_mode"])),
                 {"ro": {"readonly": True, "autocommit": True, "connection_count": 1}})
    with pytest.raises(psycopg2.OperationalError), pool.handler("ro") as db, \
            db.cursor() as cur:
        cur.callproc("greenpool_pooled_die")
    assert pool.stats()["groups"]["ro"]["in_use"] == 0
    with pool.handler("ro") as db:
        assert db.query_one("SHOW transaction_read_only")[0] == "on"


@needs_pgbouncer
def test_sqlalchemy_orm_updates_several_rows_through_pgbouncer(
    bouncer: PgBouncer, pool_at: Any, pg: Cluster
) -> None:
    """The ORM checks executemany's rowcount: with the last statement's count it raised
    StaleDataError ("expected to update 5 row(s); 1 were matched") on every flush that
    updated several rows through a pooler."""
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import Column, Integer, String
    from sqlalchemy.orm import Session, declarative_base

    from greenpool.sqlalchemy import create_engine

    base: Any = declarative_base()

    class Item(base):  # type: ignore[misc,valid-type]
        __tablename__ = "greenpool_pooled_items"
        id = Column(Integer, primary_key=True)
        v = Column(String)

    pg.execute("CREATE TABLE IF NOT EXISTS greenpool_pooled_items (id int primary key, v text)")
    try:
        pool = pool_at(bouncer.endpoint(pooler=str(bouncer.settings["pool_mode"])),
                     {"w": {"statement_timeout": 2}})
        engine = create_engine(pool, "w")
        with Session(engine) as session:
            session.add_all([Item(id=i, v="a") for i in range(5)])
            session.commit()
        with Session(engine) as session:
            for item in session.query(Item).all():
                item.v = "b"
            session.commit()
            for item in session.query(Item).all():
                session.delete(item)
            session.commit()
        assert pg.execute("SELECT count(*) FROM greenpool_pooled_items") == [(0,)]
    finally:
        pg.execute("DROP TABLE IF EXISTS greenpool_pooled_items")
