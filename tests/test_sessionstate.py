"""Whether a loan may have left session state: judged from the text, proven on a server.

A false "changes the session" costs one round trip on return; a false "does not" passes
state to the next borrower. Here the judgement is checked against what PostgreSQL leaves in
the session: through a pool of one connection (the next loan sees it, or not), and as a
property over texts generated from a small grammar of session-changing and
transaction-control forms, with comments, quoting and casing varied.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg2 import sql as pgsql

from greenpool.sessionstate import changes_session
from greenpool.testing.postgres import Cluster

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
    "SELECT dblink_connect('c', 'dbname=x')", "INSERT INTO t VALUES (%s)",
    "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 2",
]
CLEAN = [
    "SELECT 1", "UPDATE t SET v = 1 WHERE id = %s", "DELETE FROM settings WHERE name = %s",
    "SET LOCAL statement_timeout = 0", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET CONSTRAINTS ALL DEFERRED", "SELECT set_config('app.tenant', %s, true)",
    "SELECT pg_advisory_xact_lock(1)", "SELECT * FROM temp_log", "SELECT * FROM reset_tokens",
    "DECLARE c CURSOR FOR SELECT 1", "BEGIN", "COMMIT", "SELECT \"offset\", setting FROM x",
]
blank = st.sampled_from(["", " ", "\n", "\t ", "  -- note\n", "/* c */ ", "\n/* a\nb */\n",
                         "-- c\r", "/* /* nested */ */"])


def mixed_case(text: str, flips: list[bool]) -> str:
    """``text`` with the letters outside quotes and placeholders in the case ``flips`` says
    (names in double quotes, literals and ``%s`` keep theirs)."""
    out, quote = [], ""
    flips = flips + [False] * (len(text) - len(flips))
    for i, (c, flip) in enumerate(zip(text, flips, strict=False)):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"$":
            quote = c
        elif not (i and text[i - 1] == "%"):
            c = c.upper() if flip else c.lower()
        out.append(c)
    return "".join(out)


@given(st.sampled_from(CLEAN), blank, st.lists(st.booleans(), max_size=80))
def test_clean_statements_in_any_case_and_layout_are_clean(sql, lead, flips):
    assert not changes_session(lead + mixed_case(sql, flips))


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
    assert changes_session("SELECT 'a\\'")  # a backslash, and no connection to say how


# --- on a server --------------------------------------------------------------------------------

ROLE = "greenpool_ss_role"
#: everything a session keeps that a next borrower could see, as one row
PROBE = (
    "SELECT pg_backend_pid(), current_setting('search_path'), current_user::text, "
    "(SELECT count(*) FROM pg_catalog.pg_prepared_statements), "
    "(SELECT count(*) FROM pg_catalog.pg_listening_channels()), "
    "(SELECT count(*) FROM pg_catalog.pg_cursors), "
    "(SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = pg_my_temp_schema()), "
    "public.greenpool_ss_lastval(), "
    "(SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
    "AND pid = pg_backend_pid())"
)


@pytest.fixture(scope="module")
def server(pg: Cluster) -> Iterator[Cluster]:
    pg.execute(f"DO $$BEGIN CREATE ROLE {ROLE}; EXCEPTION WHEN duplicate_object THEN END$$")
    pg.execute("CREATE TABLE IF NOT EXISTS public.greenpool_ss_serial (id serial, v text)")
    pg.execute(f"GRANT ALL ON public.greenpool_ss_serial, public.greenpool_ss_serial_id_seq "
               f"TO {ROLE}")
    pg.execute("CREATE OR REPLACE FUNCTION public.greenpool_ss_lastval() RETURNS bigint "
               "LANGUAGE plpgsql AS $$BEGIN RETURN lastval(); "
               "EXCEPTION WHEN OTHERS THEN RETURN NULL; END$$")
    yield pg


DISGUISED_SESSION_CHANGES = [
    "/* /* */ */ SET search_path TO greenpool_ss_x", "/* /* */ */ SET ROLE " + ROLE,
    "/* /* */ */ PREPARE greenpool_ss_p AS SELECT 1", "/* /* */ */ LISTEN greenpool_ss_ch",
    "SELECT 1; -- c\rSET search_path TO greenpool_ss_x",
    "SELECT \"set_config\"('search_path', 'greenpool_ss_x', false)",
    "SELECT set_config('search_path', 'greenpool_ss_x' /*, true)*/, false)",
    "SELECT set_config('search_path', 'greenpool_ss_x, true)', false)",
    "UPDATE ONLY pg_settings SET setting = 'greenpool_ss_x' WHERE name = 'search_path'",
    "UPDATE \"pg_settings\" SET setting = 'greenpool_ss_x' WHERE name = 'search_path'",
    "CREATE/**/TEMP TABLE greenpool_ss_t (i int)", "SELECT 1 AS i INTO/**/TEMP greenpool_ss_t",
    "DECLARE greenpool_ss_c CURSOR WITH/**/HOLD FOR SELECT 1",
    "INSERT INTO greenpool_ss_serial (v) VALUES ('x')",
    "SELECT query_to_xml('SELECT set_config(''search_path'', ''greenpool_ss_x'', false)', "
    "false, false, '')",
]


@pytest.mark.parametrize("text", DISGUISED_SESSION_CHANGES)
def test_the_next_borrower_gets_a_clean_session(server: Cluster, make_pool: Any,
                                                text: str) -> None:
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}})
    with pool.handler("g") as db:
        before = db.query_one(PROBE)
    with pool.handler("g") as db:
        db.execute(text)
        assert db.query_one(PROBE) != before  # the statement did leave state
    with pool.handler("g") as db:
        assert db.query_one(PROBE) == before  # same backend, nothing of it left


# --- the property: visible to the next borrower <=> judged as changing the session --------------

@st.composite
def gap(draw: Callable[..., Any]) -> str:
    """White space and comments as PostgreSQL's scanner reads them."""
    return draw(st.sampled_from([
        " ", "\n", "\t", " /* c */ ", "/* /* nested */ ; SET ROLE x; */", " -- c\r",
        " -- ; COMMIT\n", "/**/",
    ]))


# Forms of statements: ``~`` is a gap (white space or a comment), ``$T$`` a dollar-quote tag;
# letters outside quotes get a random case. ``@`` becomes the form's index (distinct names).
CHANGING_FORMS = [
    "set~search_path~to greenpool_ss_x", "set session search_path = 'greenpool_ss_x'",
    "select set_config('search_path', $T$greenpool_ss_x$T$, false)",
    "select \"set_config\"('search_path', 'greenpool_ss_x', false)",
    "select pg_catalog.set_config('search_path', 'greenpool_ss_x',~false)",
    f"set~role {ROLE}", "prepare~greenpool_ss_p@ as select $T$x$T$", "listen~greenpool_ss_ch",
    "create~temp~table greenpool_ss_t@ (i int)", "create temporary~table greenpool_ss_u@ ()",
    "select 1 as i into~temp greenpool_ss_t2@",
    "declare greenpool_ss_c@ cursor with~hold for select 1",
    "insert~into public.greenpool_ss_serial (v) values ('x')", "select pg_advisory_lock(42)",
    "update only pg_settings set setting = 'greenpool_ss_x' where name = 'search_path'",
    "update \"pg_settings\" set setting = 'greenpool_ss_x' where name = 'search_path'",
    "do $T$ begin perform set_config('search_path', 'greenpool_ss_x', false); end $T$",
]
CLEAN_FORMS = [
    "select~1", "select $T$SET ROLE x; LISTEN c$T$", "select '''; SET search_path TO y; --'",
    "select 1 as \"; PREPARE p AS SELECT 1\"", "set local search_path~to greenpool_ss_x",
    "select set_config('search_path', 'greenpool_ss_x',~true)",
    "select pg_advisory_xact_lock(42)",
    "select currval('public.greenpool_ss_serial_id_seq'::regclass) where false",
]


@st.composite
def form(draw: Callable[..., Any], forms: list[str]) -> str:
    template = draw(st.sampled_from(forms)).replace(
        "$T$", draw(st.sampled_from(["$$", "$A$", "$b_1$", "$\u00e9$"])))
    first, *rest = template.split("~")
    text = first + "".join(draw(gap()) + part for part in rest)
    return mixed_case(text, draw(st.lists(st.booleans(), min_size=len(text),
                                          max_size=len(text))))


@st.composite
def script(draw: Callable[..., Any]) -> tuple[str, bool]:
    """A text, and whether it ends by rolling back (then the session may keep less than
    the text asked for: the judgement may be a false 'changes')."""
    changing = draw(st.lists(form(CHANGING_FORMS), max_size=2, unique=True))
    clean = draw(st.lists(form(CLEAN_FORMS), min_size=0 if changing else 1, max_size=2,
                          unique=True))
    forms = draw(st.permutations(changing + clean))
    forms = [text.replace("@", str(i)) for i, text in enumerate(forms)]  # distinct names
    explicit = draw(st.booleans())
    end = draw(st.sampled_from(["COMMIT", "end", "Commit Work", "ROLLBACK", "abort"]))
    if draw(st.booleans()):
        forms = ["SAVEPOINT s", *forms, draw(st.sampled_from(
            ["RELEASE SAVEPOINT s", "ROLLBACK TO SAVEPOINT s", "rollback transaction to s"]))]
    if explicit:
        forms = [draw(st.sampled_from(["BEGIN", "start transaction", "Begin Work"])), *forms,
                 end]
    elif "SAVEPOINT s" in forms:
        forms = forms[1:-1]  # savepoints need an explicit block
    rolled_back = (explicit and end.lower() in ("rollback", "abort")) or any(
        f.lower().startswith("rollback") for f in forms)
    return ";".join(draw(gap()) + form for form in forms) + draw(st.sampled_from(["", ";"])), (
        rolled_back)


@pytest.fixture(scope="module")
def session(server: Cluster) -> Iterator[Any]:
    conn = psycopg2.connect(host=server.host, port=server.port, dbname=server.dbname,
                            user=server.user, password=server.password)
    conn.autocommit = True
    yield conn
    conn.close()


def _probe(conn: Any) -> Any:
    with conn.cursor() as cur:
        cur.execute(PROBE)
        return cur.fetchone()


def _each_form_alone(test: Callable[..., None]) -> Callable[..., None]:
    """Every form, plainly spelled, as an explicit example (then hypothesis varies them)."""
    for template in CHANGING_FORMS + CLEAN_FORMS:
        plain = template.replace("~", " ").replace("$T$", "$$").replace("@", "0")
        test = example(case=(plain, False))(test)
    return test


@settings(max_examples=300, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@_each_form_alone
@given(case=script())
def test_visible_to_the_next_borrower_iff_judged_changing(session: Any,
                                                         case: tuple[str, bool]) -> None:
    text, rolled_back = case
    with session.cursor() as cur:
        cur.execute("DISCARD ALL")
    before = _probe(session)
    try:
        with session.cursor() as cur:
            cur.execute(text)
    except psycopg2.Error:  # (the generator avoids errors; an error rolls back)
        rolled_back = True
    if session.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        with session.cursor() as cur:  # what the pool does with a loan left in a transaction
            cur.execute("ROLLBACK")  # (psycopg2's rollback() does nothing in autocommit)
    visible = _probe(session) != before
    judged = changes_session(text, session)
    assert judged or not visible, f"state left but judged clean: {text!r}"
    if not rolled_back:
        assert visible or not judged, f"judged changing but nothing left: {text!r}"


def test_a_long_rendered_text_is_judged_at_once(server: Cluster, make_pool: Any) -> None:
    """60 KB of ';/*' in a literal: the hand-written scanner took seconds (quadratic), and
    froze every other greenlet meanwhile; a text that long is not parsed at all."""
    pool = make_pool({"g": {"connection_count": 1}})
    value = ";/*" * 20_000
    with pool.handler("g") as db:
        query = pgsql.SQL("SELECT length({})").format(pgsql.Literal(value))
        started = time.monotonic()
        assert db.query_one(query)[0] == len(value)
        assert time.monotonic() - started < 0.5


def test_old_style_literals_are_read_the_server_s_way(pg_factory: Callable[..., Cluster],
                                                      mode: str) -> None:
    """With standard_conforming_strings=off a backslash escapes a quote: the parser (which
    reads the standard way) would end this literal early and miss the SET."""
    from greenpool import Pool

    server = pg_factory(settings={"standard_conforming_strings": "off",
                                  "escape_string_warning": "off"})
    pool = Pool({"type": mode, "db": server.endpoint(),
                 "groups": {"g": {"connection_count": 1, "autocommit": True}}})
    try:
        with pool.handler("g") as db:
            db.execute("SELECT 'a\\' , ' ; SET search_path TO greenpool_ss_x; --'")
            assert db.query_one("SHOW search_path")[0] == "greenpool_ss_x"
        with pool.handler("g") as db:
            assert db.query_one("SHOW search_path")[0] == '"$user", public'
    finally:
        pool.close()


def test_the_parser_reads_each_distinct_text_once_clean_or_dirty(monkeypatch) -> None:
    from greenpool import sessionstate, sql

    calls: list[str] = []
    parse = sql._parse
    monkeypatch.setattr(sql, "_parse", lambda text: calls.append(text) or parse(text))
    texts = ["SELECT 41 AS once", "INSERT INTO once_t VALUES (1)", "SET work_mem = '4MB'"]
    verdicts = [[sessionstate.changes_session(t) for t in texts] for _ in range(5)]
    assert verdicts == [[False, True, True]] * 5
    assert sorted(calls) == sorted(texts)


@pytest.mark.parametrize("standard_strings", ["on", "off"])
def test_a_character_the_connection_sends_as_a_backslash_is_read_as_one(
        pg: Cluster, make_pool: Any, standard_strings: str) -> None:
    """In EUC_JP, psycopg2 sends ``¥`` as the byte of ``\\``: the server reads ``E'¥'`` (or,
    with standard_conforming_strings off, ``'¥'``) as a quote escaped, and the SET hidden in
    what looks like the next literal runs. The text is judged as the server reads it."""
    name = f"greenpool_ss_euc_{standard_strings}"
    pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    pg.execute(f"CREATE DATABASE {name} ENCODING 'EUC_JP' LC_COLLATE 'C' LC_CTYPE 'C' "
               f"TEMPLATE template0")
    try:
        pg.execute(f"ALTER DATABASE {name} SET standard_conforming_strings = {standard_strings}")
        pool = make_pool({"g": {"connection_count": 1, "autocommit": True}},
                         db=pg.endpoint(name=name))
        literal = "E'¥'" if standard_strings == "on" else "'¥'"
        text = f"SELECT {literal}, '; SET search_path TO greenpool_ss_x; --'"
        with pool.handler("g") as db:
            before = db.query_one("SHOW search_path")[0]
            db.query(text)
            assert db.query_one("SHOW search_path")[0] == "greenpool_ss_x"  # it did run
        with pool.handler("g") as db:
            assert db.query_one("SHOW search_path")[0] == before
        pool.close()
    finally:
        pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_non_ascii_text_judged_on_one_encoding_is_judged_again_on_another() -> None:
    """Clean as UTF-8 sends it, a SET as EUC_JP does: the verdict of a text with non-ASCII
    characters is never taken from the fast path's cache, which knows no connection."""
    from greenpool import sessionstate

    class Conn:  # a connection's encoding and settings, all the judgement reads of it
        def __init__(self, encoding: str) -> None:
            self.encoding = encoding
            self.info = self

        def parameter_status(self, name: str) -> str:
            return "on"

    text = "SELECT E'¥', '; SET search_path TO x; --'"
    assert not changes_session(text, Conn("UTF8"))
    assert not changes_session(text, Conn("UTF8"))
    assert text not in sessionstate.CLEAN
    assert changes_session(text, Conn("EUC_JP"))
    assert changes_session(text)  # no connection: the encoding is unknown


def test_a_text_whose_encoding_reads_an_ascii_byte_otherwise_counts_as_changing() -> None:
    """SHIFT_JIS_2004 sends ``¥`` as 0x5C, which Python's codec reads back as ``¥`` and the
    server as ``\\``: ``U&"¥0070g_temp"`` is ``pg_temp`` to the server. What the server
    reads is not known here: unknown, so changing."""
    class Conn:
        encoding = "SHIFT_JIS_2004"

        def __init__(self) -> None:
            self.info = self

        def parameter_status(self, name: str) -> str:
            return "on"

    assert changes_session('CREATE TABLE U&"¥0070g_temp".leak (x int)', Conn())
    assert not changes_session("SELECT 'ｶﾅ'", Conn())  # nothing of the kind in it
