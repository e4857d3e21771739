"""greenpool.sql: texts read as PostgreSQL reads them (pure: no server).

What each reading means on a server is proven elsewhere: the session state a loan leaves in
test_sessionstate.py, the transactions through a pooler in test_pooler_statements.py.
"""

from __future__ import annotations

import time

import pytest

from greenpool import sql
from greenpool.sql import Unreadable, changes_session, statements


def ends_midway(text: str) -> bool:
    return any(statement.ends for statement in statements(text)[:-1])


def refusal(text: str) -> str:
    (statement,) = statements(text)
    return statement.label if statement.refuses_block else ""


# --- session state ----------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "/* /* */ */ SET search_path TO x", "/* /* */ */ SET ROLE r", "/* /* */ */ PREPARE p AS "
    "SELECT 1", "/* /* */ */ LISTEN ch", "SELECT 1; -- c\rSET search_path TO x",
    "SELECT \"set_config\"('search_path', 'x', false)",
    "SELECT set_config('search_path', 'x' /*, true)*/, false)",
    "SELECT set_config('search_path', 'x, true)', false)",
    "SELECT set_config('a', 'b', is_local => true)", "SELECT set_config('a', 'b', 'true')",
    "UPDATE ONLY pg_settings SET setting = 'x' WHERE name = 'search_path'",
    "UPDATE \"pg_settings\" SET setting = 'x'", "CREATE/**/TEMP TABLE t (i int)",
    "SELECT 1 INTO/**/TEMP t", "DECLARE c CURSOR WITH/**/HOLD FOR SELECT 1",
    "INSERT INTO t (v) VALUES (%s)", "INSERT INTO t DEFAULT VALUES", "COPY t FROM STDIN",
    "UPDATE t SET id = DEFAULT", "MERGE INTO t USING u ON t.id = u.id WHEN NOT MATCHED THEN "
    "INSERT VALUES (u.id)", "SELECT nextval('s')", "SELECT pg_catalog.setval('s', 1)",
    "WITH x AS (INSERT INTO t DEFAULT VALUES RETURNING id) SELECT * FROM x",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "RESET ALL",
    "SELECT pg_advisory_lock(1)", "SELECT dblink_connect('c', 'dbname=x')", "LOAD 'x'",
    "DO $$BEGIN END$$", "CALL p()", "CREATE TABLE pg_temp.t ()",
    "SELECT query_to_xml('SET ROLE r', false, false, '')",
    "ALTER TABLE t ADD COLUMN id serial",  # nextval() for every row: lastval()
    "SELECT '%s'",  # a placeholder inside a literal: psycopg2's quotes would split it
    "selec 1",  # unreadable
])
def test_session_changes_are_seen(text: str) -> None:
    assert changes_session(text)


@pytest.mark.parametrize("text", [
    "SELECT 1", "SELECT %s, %(a)s, %(a)s", "SELECT * FROM t WHERE id IN %s LIMIT %s",
    "SELECT 100 %% 7", "SET LOCAL search_path TO x", "SET LOCAL ROLE r",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('a', %s, true)", "SELECT pg_advisory_xact_lock(1)",
    "DECLARE c CURSOR FOR SELECT 1", "SELECT 'SET ROLE r; INSERT'", "SELECT currval('s')",
    "-- SET ROLE r\nSELECT 1", "SELECT $$; SET ROLE r$$", "DELETE FROM t WHERE id = %s",
    "UPDATE t SET v = %s WHERE id = %s", "BEGIN", "COMMIT", "SELECT \"offset\" FROM x",
])
def test_clean_statements_are_clean(text: str) -> None:
    assert not changes_session(text)


def test_a_text_too_long_to_parse_counts_as_changing() -> None:
    assert changes_session("SELECT 1 " + " " * sql.SESSION_CHECK_MAX)


DEEP = " + ".join(f"c{i}" for i in range(1500))  # ~3,000 levels of tree: too deep to build


def test_a_tree_too_deep_to_build_counts_as_changing_and_crashes_nothing() -> None:
    assert len(f"UPDATE t SET total = {DEEP}") < sql.SESSION_CHECK_MAX
    assert changes_session(f"UPDATE t SET total = {DEEP}")


def test_a_deep_statement_is_split_without_its_tree_where_its_kind_is_enough() -> None:
    """Only statements whose fields decide (a transaction's end, what refuses a block)
    need the tree; one too deep to build is then unreadable, never misread."""
    assert [s.kind for s in statements(f"EXPLAIN SELECT {DEEP}")] == ["ExplainStmt"]
    assert [s.kind for s in statements(f"CREATE TABLE t AS SELECT {DEEP}")] == [
        "CreateTableAsStmt"]
    assert [s.kind for s in statements(f"SELECT {DEEP}; COPY t TO STDOUT")] == [
        "SelectStmt", "CopyStmt"]
    with pytest.raises(Unreadable, match="nests too deeply"):
        statements(f"CREATE INDEX CONCURRENTLY i ON t (a) WHERE {DEEP} > 0")


def test_a_chained_end_is_an_end_that_chains() -> None:
    (commit,) = statements("COMMIT AND CHAIN")
    (rollback,) = statements("ROLLBACK AND CHAIN")
    (plain,) = statements("COMMIT")
    assert commit.ends and commit.chains and rollback.ends and rollback.chains
    assert plain.ends and not plain.chains


# --- transactions -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "SELECT 1; COMMIT; INSERT INTO t VALUES (1)", "select 1;commit;select 2",
    "BEGIN; INSERT INTO t VALUES (1); END; SELECT 1", "SELECT 1; ROLLBACK; SELECT 2",
    "ABORT; SELECT 1", "/* c */ COMMIT /* d */ ; SELECT 1", "COMMIT AND CHAIN; SELECT 1",
    "PREPARE TRANSACTION 'x'; SELECT 1", "SELECT ';'; COMMIT; SELECT 1",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; COMMIT; "
    "SELECT 1",
    # what the hand-written lexer missed
    "SELECT 1 -- c\r; COMMIT; INSERT INTO t VALUES (1)",
    "SELECT 1 /* begin atomic */; COMMIT; INSERT INTO t VALUES (1)",
    "SELECT 'begin atomic'; COMMIT; INSERT INTO t VALUES (1)",
    "SELECT 1 AS é$; COMMIT; INSERT INTO t VALUES ('$')",
    "SELECT $\U0001f600$x$\U0001f600$; COMMIT; INSERT INTO t VALUES (1)",
])
def test_texts_that_end_their_transaction_midway(text: str) -> None:
    assert ends_midway(text)


@pytest.mark.parametrize("text", [
    "COMMIT", "INSERT INTO t VALUES (1); COMMIT", "COMMIT;", "COMMIT; -- done",
    "SELECT 'a; commit; b'", "SELECT $$; commit; select 1$$", "SELECT $f$;commit;$f$, 1",
    "SELECT 1 /* ; commit; */; SELECT 2", "SELECT 1 -- ; commit;\n; SELECT 2",
    "SELECT \"x;commit;y\" FROM t", "SELECT E'\\';commit;'", "ROLLBACK TO SAVEPOINT s; SELECT 1",
    "ROLLBACK TO s; SELECT 1", "ROLLBACK TRANSACTION TO SAVEPOINT s; SELECT 1",
    "ROLLBACK WORK TO s; SELECT 1", "SELECT commit_ts FROM t; SELECT 1",
    "SELECT end_at; SELECT 1", "SELECT 1; SELECT 2", "SELECT $A$; commit; $a$ $A$; SELECT 1",
    "SELECT E'a\nb;commit;'; SELECT 1",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; "
    "SELECT f()",
])
def test_texts_that_do_not(text: str) -> None:
    assert not ends_midway(text)


@pytest.mark.parametrize(("text", "label"), [
    ("VACUUM t", "VACUUM"), ("/* a /* b */ c */ VACUUM t", "VACUUM"),
    ("CREATE DATABASE x", "CREATE DATABASE"), ("DROP DATABASE x", "DROP DATABASE"),
    ("CREATE TABLESPACE s LOCATION '/x'", "CREATE TABLESPACE"),
    ("ALTER SYSTEM SET work_mem = '8MB'", "ALTER SYSTEM"), ("DISCARD ALL", "DISCARD ALL"),
    ("CREATE UNIQUE INDEX CONCURRENTLY i ON t (x)", "CREATE INDEX CONCURRENTLY"),
    ("DROP INDEX CONCURRENTLY i", "DROP INDEX CONCURRENTLY"),
    ("REINDEX (CONCURRENTLY) TABLE t", "REINDEX"), ("REINDEX TABLE CONCURRENTLY t", "REINDEX"),
    ("REINDEX SCHEMA s", "REINDEX"), ("REINDEX DATABASE d", "REINDEX"),
    ("CLUSTER", "CLUSTER"), ("COMMIT PREPARED 'x'", "COMMIT PREPARED / ROLLBACK PREPARED"),
    ("ALTER TABLE t DETACH PARTITION p CONCURRENTLY",
     "ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY"),
    ("ALTER DATABASE d SET TABLESPACE s", "ALTER DATABASE ... SET TABLESPACE"),
    ("CREATE SUBSCRIPTION s CONNECTION '' PUBLICATION p", "CREATE SUBSCRIPTION"),
    ("DROP SUBSCRIPTION s", "DROP SUBSCRIPTION"),
    ("ALTER SUBSCRIPTION s REFRESH PUBLICATION", "ALTER SUBSCRIPTION ... REFRESH"),
    # refused by node and option, not by spelling
    ("ANALYZE t", ""), ("CLUSTER t USING i", ""), ("REINDEX TABLE t", ""),
    ("REINDEX (CONCURRENTLY false) TABLE t", ""), ("CREATE INDEX i ON t (x)", ""),
    ("ALTER TABLE t DETACH PARTITION p", ""), ("DISCARD PLANS", ""),
    ("ALTER DATABASE d SET work_mem = '8MB'", ""),
    ("CREATE SUBSCRIPTION s CONNECTION '' PUBLICATION p WITH (connect = false)", ""),
    ("CREATE SUBSCRIPTION s CONNECTION '' PUBLICATION p WITH (create_slot = off)", ""),
    ("INSERT INTO t VALUES ('index concurrently')", ""), ("-- c\rINSERT INTO t SELECT 1 AS "
                                                          "\nvacuum", ""),
    ("/* /* */ vacuum */ INSERT INTO t VALUES (1)", ""),
])
def test_statements_that_refuse_a_transaction_block(text: str, label: str) -> None:
    assert refusal(text) == label


def test_begin_and_the_read_only_refusals() -> None:
    assert [s.begins for s in statements("BEGIN; START TRANSACTION; SELECT 1")] == [
        True, True, False]
    assert statements("CREATE DATABASE x")[0].refused_read_only
    assert not statements("VACUUM")[0].refused_read_only


def test_unreadable_texts_say_where_not_what() -> None:
    with pytest.raises(Unreadable, match="at character 32") as info:
        statements("ALTER ROLE r PASSWORD 'secret' nonsense")
    assert "secret" not in str(info.value) and "nonsense" not in str(info.value)


def test_bulk_statement_texts_are_not_kept_alive_by_the_cache() -> None:
    before = len(sql._STATEMENTS)
    for i in range(50):
        text = f"INSERT INTO t VALUES {', '.join(['(1)'] * 2000)}; SELECT 1 -- {i}"
        assert not ends_midway(text)
    assert len(sql._STATEMENTS) == before


def _seconds(text: str) -> float:
    started = time.perf_counter()
    statements(text)
    changes_session(text)
    return time.perf_counter() - started


def test_reading_is_linear_in_the_text() -> None:
    """A 60 KB value made of ';/*' took the hand-written lexer seconds (quadratic)."""
    small = "INSERT INTO t VALUES ('" + ";/*" * 2_000 + "')"
    big = "INSERT INTO t VALUES ('" + ";/*" * 20_000 + "')"
    _seconds(small)
    assert _seconds(big) < 0.05
    rows = "INSERT INTO t VALUES " + ", ".join(f"({i}, ';/*')" for i in range(6_000))
    assert _seconds(rows) < 0.1


def test_a_long_text_is_parsed_off_the_hub(mode: str) -> None:
    """Through a pooler every text is parsed; a long one's parse (C, GIL released) runs in
    gevent's thread pool, so other greenlets run meanwhile instead of waiting for it."""
    if mode != "gevent":
        pytest.skip("the thread pool hand-off is gevent's (threads run meanwhile anyway)")
    import gevent

    from greenpool.concurrency import backend_for

    ticks = [0]
    running = [True]

    def ticker() -> None:
        while running[0]:
            ticks[0] += 1
            # not sleep(0): a ticker that never lets the hub idle holds the GIL and starves
            # the parsing thread (the parse took 14-44 s instead of well under one)
            gevent.sleep(0.001)

    task = gevent.spawn(ticker)
    gevent.sleep(0)
    try:
        before = ticks[0]
        text = "INSERT INTO t VALUES " + ", ".join(f"({i}, 'x')" for i in range(20_000))
        assert [s.kind for s in statements(text, backend_for("gevent").offload)] == [
            "InsertStmt"]
        assert ticks[0] > before
    finally:
        running[0] = False
        task.join(5)


def test_the_server_text_of_bytes_is_unknown_where_the_codec_reads_ascii_otherwise() -> None:
    """PostgreSQL reads a byte below 0x80 as ASCII; Python's shift_jis_2004 reads 0x5C as
    ``¥`` (and 0x7E as ``‾``). EUC_JP's reading agrees with the server's."""
    assert sql.server_text("E'¥'".encode("shift_jis_2004"), "shift_jis_2004") is None
    assert sql.server_text("E'\\'".encode("euc_jp"), "euc_jp") == "E'\\'"
    assert sql.server_text("E'¥'".encode("euc_jp"), "euc_jp") == "E'\\'"
    assert sql.server_text("SELECT 'é'".encode(), "utf_8") == "SELECT 'é'"
