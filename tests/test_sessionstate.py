"""The classifier that decides whether a loan must be reset (no server needed: pure text).

A false "changes the session" costs one round trip on return; a false "does not" passes
state to the next borrower. The server-side proof that each state is reset is in
test_loan.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from psycopg2 import sql as pgsql

from greenpool.sessionstate import changes_session

CHANGING = [
    "SET search_path TO x", "set statement_timeout = 0", "RESET ALL", "SET ROLE r",
    "SET SESSION AUTHORIZATION u", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SELECT set_config('a', 'b', false)", "SELECT pg_catalog.set_config(%s, %s, %s)",
    "CREATE TEMP TABLE t (i int)", "CREATE TEMPORARY TABLE t (i int)",
    "CREATE GLOBAL TEMPORARY TABLE t ()", "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
    "SELECT * INTO TEMP t FROM u", "CREATE TABLE pg_temp.t ()", "PREPARE p AS SELECT 1",
    "LISTEN ch", "LOAD 'auto_explain'", "SELECT pg_advisory_lock(1)",
    "SELECT pg_try_advisory_lock_shared(1, 2)", "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "DO $$BEGIN PERFORM 1; END$$", "CALL p()", "UPDATE pg_settings SET setting = 'x'",
    "SELECT dblink_connect('c', 'dbname=x')",
]
CLEAN = [
    "SELECT 1", "UPDATE t SET v = 1 WHERE id = %s", "INSERT INTO t VALUES (%s)",
    "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 2",
    "SET LOCAL statement_timeout = 0", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET CONSTRAINTS ALL DEFERRED", "SELECT set_config('app.tenant', %s, true)",
    "SELECT pg_advisory_xact_lock(1)", "INSERT INTO temp_log VALUES (1)",
    "SELECT * FROM reset_tokens", "DECLARE c CURSOR FOR SELECT 1", "BEGIN", "COMMIT",
    "DELETE FROM settings WHERE name = %s", "SELECT offset, setting FROM x",
]
blank = st.sampled_from(["", " ", "\n", "\t ", "  -- note\n", "/* c */ ", "\n/* a\nb */\n"])


def mixed_case(text: str, flips: list[bool]) -> str:
    flips = flips + [False] * (len(text) - len(flips))
    return "".join(c.upper() if f else c.lower() for c, f in zip(text, flips, strict=False))


@given(st.sampled_from(CLEAN), blank, st.lists(st.booleans(), max_size=80))
def test_clean_statements_in_any_case_and_layout_are_clean(sql, lead, flips):
    statement = lead + mixed_case(sql, flips)
    if "%s" in sql:
        statement = lead + sql  # placeholders must keep their case
    assert not changes_session(statement)


@given(st.sampled_from(CHANGING), blank, st.lists(st.booleans(), max_size=80))
def test_changing_statements_in_any_case_and_layout_are_seen(sql, lead, flips):
    assert changes_session(lead + mixed_case(sql, flips))


@given(st.lists(st.sampled_from(CLEAN), max_size=3), st.sampled_from(CHANGING), blank)
def test_a_changing_statement_anywhere_in_a_script_is_seen(before, sql, lead):
    assert changes_session("; ".join([*before, lead + sql]))


def test_other_forms_of_sql():
    assert changes_session(b"SET search_path TO x")
    assert not changes_session(b"SELECT 1")
    assert changes_session(pgsql.SQL("SET search_path TO x"))  # no connection to render it
    assert changes_session(object())  # unreadable: assume the worst
