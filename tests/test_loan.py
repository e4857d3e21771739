"""A loan is clean: nothing committed silently, no session state passed on.

Every test borrows the *same* backend twice (a group of one, checked with
pg_backend_pid()) and asserts that the second borrower sees nothing of the first one's
session.
"""

from __future__ import annotations

import psycopg2
import pytest

from greenpool import ConfigError, Pool, TransactionAborted


@pytest.fixture
def table(pg):
    pg.execute("DROP TABLE IF EXISTS loan_t; CREATE TABLE loan_t (v text)")
    yield "loan_t"
    pg.execute("DROP TABLE IF EXISTS loan_t")


def rows(pg, value):
    return pg.execute("SELECT count(*) FROM loan_t WHERE v = %s", (value,))[0][0]


def last_statement(pg, pid):
    """What the backend ran last, as the server saw it (no round trip of the pool's own)."""
    return pg.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))[0][0]


# --- 1. commit() on a failed transaction ------------------------------------------------


@pytest.mark.parametrize("autocommit", [False, True])
def test_explicit_commit_of_a_failed_transaction_raises_and_commits_nothing(
    make_pool, pg, table, autocommit
):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": autocommit}})
    with pool.handler("g") as db:
        if autocommit:
            db.execute("BEGIN")  # by hand, on an autocommit group
        db.query("INSERT INTO loan_t VALUES ('lost')")
        with pytest.raises(psycopg2.errors.UndefinedTable):
            db.query("SELECT * FROM no_such_table")
        with pytest.raises(TransactionAborted, match="rolled back, not committed"):
            db.commit()
        # rolled back at once: the block goes on with a healthy connection
        assert db.query("SELECT 1") == [(1,)]
        db.query("INSERT INTO loan_t VALUES ('after')")
    assert rows(pg, "lost") == 0
    assert rows(pg, "after") == 1
    assert pool.stats()["groups"]["g"]["discards"] == 0


def test_explicit_commit_after_connection_lost_raises(make_pool, pg, table):
    pool = make_pool({"g": {"connection_count": 1}})
    with pytest.raises(TransactionAborted, match="lost"), pool.handler("g") as db:  # at exit too
        db.query("INSERT INTO loan_t VALUES ('gone')")
        pid = db.query("SELECT pg_backend_pid()")[0][0]
        pg.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        with pytest.raises(psycopg2.OperationalError):
            db.query("SELECT 1")
        with pytest.raises(TransactionAborted, match="lost"):
            db.commit()
    assert rows(pg, "gone") == 0


# --- 2. every loan starts from the group's configured session ---------------------------

# (what the first borrower runs, what the next borrower runs, what it must see)
STATES = {
    "search_path": (["SET search_path TO pg_catalog"], "SHOW search_path", [('"$user", public',)]),
    "statement_timeout": (["SET statement_timeout = 0"], "SHOW statement_timeout", [("1s",)]),
    "temp_table": (["CREATE TEMP TABLE loan_tmp (i int)"],
                   "SELECT count(*) FROM pg_class WHERE relname = 'loan_tmp'", [(0,)]),
    "prepared": (["PREPARE loan_p AS SELECT 1"], "SELECT count(*) FROM pg_prepared_statements",
                 [(0,)]),
    "listen": (["LISTEN loan_channel"], "SELECT count(*) FROM pg_listening_channels()", [(0,)]),
    "advisory_lock": (["SELECT pg_advisory_lock(4242)"],
                      "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                      "AND pid = pg_backend_pid()", [(0,)]),
    "with_hold_cursor": (["BEGIN", "DECLARE loan_c CURSOR WITH HOLD FOR SELECT 1", "COMMIT"],
                         "SELECT count(*) FROM pg_cursors", [(0,)]),
    "set_config": (["SELECT set_config('application_name', 'changed', false)"],
                   "SHOW application_name", [("gp-loan",)]),
    "role": (["SET ROLE pg_read_all_data"], "SELECT current_user = session_user", [(True,)]),
}


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transaction"])
@pytest.mark.parametrize("state", sorted(STATES))
def test_session_state_does_not_pass_to_the_next_borrower(make_pool, pg, state, autocommit):
    setup, probe, expected = STATES[state]
    pool = make_pool({"g": {"connection_count": 1, "autocommit": autocommit,
                            "statement_timeout": 1}}, application_name="gp-loan")
    with pool.handler("g") as db:
        pid = db.query("SELECT pg_backend_pid()")[0][0]
        for sql in setup:
            db.query(sql)
    if state == "advisory_lock":  # nobody else could take it while it leaked
        assert pg.execute("SELECT pg_try_advisory_lock(4242), pg_advisory_unlock(4242)") == [
            (True, True)]
    with pool.handler("g") as db:
        assert db.query("SELECT pg_backend_pid()")[0][0] == pid  # the same session
        assert db.query(probe) == expected
    assert pool.stats()["groups"]["g"]["discards"] == 0


def test_readonly_group_stays_readonly(make_pool, pg, table):
    pool = make_pool({"ro": {"connection_count": 1, "readonly": True, "autocommit": True}})
    with pool.handler("ro") as db:
        pid = db.query("SELECT pg_backend_pid()")[0][0]
        db.query("SET default_transaction_read_only = off")
        db.query("INSERT INTO loan_t VALUES ('allowed in this loan')")
    with pool.handler("ro") as db:
        assert db.query("SELECT pg_backend_pid()")[0][0] == pid
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            db.query("INSERT INTO loan_t VALUES ('refused')")
    assert rows(pg, "refused") == 0


def test_a_clean_loan_costs_no_reset_and_a_dirty_one_exactly_one(make_pool, pg):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}})
    with pool.handler("g") as db:
        pid = db.query("SELECT pg_backend_pid()")[0][0]
        db.query("UPDATE pg_class SET relname = relname WHERE false")  # SET, but not a session's
    assert last_statement(pg, pid) == "UPDATE pg_class SET relname = relname WHERE false"
    with pool.handler("g") as db:
        db.query("SET search_path TO pg_catalog")
    assert last_statement(pg, pid) == "DISCARD ALL"


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
def test_a_transaction_ended_by_sql_leaves_the_next_borrower_a_real_transaction(
        make_pool, pg, table, end):
    """A clean loan (nothing dirtied the session) whose transaction was ended by a COMMIT or
    ROLLBACK sent as SQL: the server is idle, psycopg2 still thinks a transaction is open.
    The return puts psycopg2 right, so the next borrower's work is one transaction again
    (its error rolls all of it back) instead of statements committed one by one."""
    pg.execute("INSERT INTO loan_t VALUES ('seed')")
    pool = make_pool({"g": {"connection_count": 1, "autocommit": False}})
    with pool.handler("g") as db:  # an UPDATE leaves no session state: a clean loan
        db.query("UPDATE loan_t SET v = 'first' WHERE v = 'seed'")
        db.query(end)
    with pytest.raises(ValueError), pool.handler("g") as db:
        db.query("UPDATE loan_t SET v = 'second'")
        raise ValueError("roll it back")
    assert rows(pg, "second") == 0
    assert rows(pg, "first" if end == "COMMIT" else "seed") == 1


@pytest.mark.parametrize("use", ["connection", "cursor", "hand_loan"])
def test_raw_access_makes_the_loan_dirty(make_pool, pg, use):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}})
    group = pool.group("g")
    if use == "hand_loan":
        pc = group.acquire()
        with pc.raw.cursor() as cursor:
            cursor.execute("SET search_path TO pg_catalog")
        group.release(pc)
    else:
        with pool.handler("g") as db:
            cursor = db.cursor() if use == "cursor" else db.connection.cursor()
            with cursor:
                cursor.execute("SET search_path TO pg_catalog")
    with pool.handler("g") as db:
        assert db.query("SHOW search_path") == [('"$user", public',)]


def test_reset_never_keeps_the_session_and_always_resets_every_loan(make_pool, pg):
    pool = make_pool({"never": {"connection_count": 1, "autocommit": True, "reset": "never"},
                      "always": {"connection_count": 1, "autocommit": True, "reset": "always"}})
    with pool.handler("never") as db:
        db.query("SET search_path TO pg_catalog")
    with pool.handler("never") as db:
        assert db.query("SHOW search_path") == [("pg_catalog",)]
    with pool.handler("always") as db:
        pid = db.query("SELECT pg_backend_pid()")[0][0]
    assert last_statement(pg, pid) == "DISCARD ALL"


def test_on_return_hook_runs_on_dirty_loans_after_the_reset(make_pool, pg):
    seen = []

    def on_return(raw):
        with raw.cursor() as cursor:
            cursor.execute("SHOW search_path")
            seen.append(cursor.fetchone()[0])

    pool = make_pool({"g": {"connection_count": 1, "autocommit": True, "on_return": on_return}})
    with pool.handler("g") as db:
        db.query("SELECT 1")
    assert seen == []  # clean: not called
    with pool.handler("g") as db:
        db.query("SET search_path TO pg_catalog")
    assert seen == ['"$user", public']  # after DISCARD ALL


def test_a_failing_hook_discards_the_connection(make_pool, pg):
    def on_return(raw):
        raise ValueError("no")

    pool = make_pool({"g": {"connection_count": 1, "autocommit": True, "on_return": on_return}})
    with pool.handler("g") as db:
        db.connection  # noqa: B018 (raw access: dirty)
    stats = pool.stats()["groups"]["g"]
    assert stats["discards_by_reason"] == {"reset_failed": 1} and stats["size"] == 0


def test_reset_keys_are_validated(pg):
    for bad in ({"reset": "sometimes"}, {"on_return": "not a function"}):
        with pytest.raises(ConfigError, match=f"groups.g.{next(iter(bad))}"):
            Pool({"db": pg.endpoint(), "groups": {"g": bad}})


def test_a_replay_is_refused_once_the_session_was_changed(make_pool, pg):
    """A fresh connection would lack the SET: replaying there could read other data."""
    pool = make_pool({"ro": {"connection_count": 2, "readonly": True, "autocommit": True}})
    with pool.handler("ro") as db:
        db.query("SET search_path TO pg_catalog")
        pid = db.query("SELECT pg_backend_pid()")[0][0]
        pg.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        with pytest.raises(psycopg2.OperationalError):
            db.query("SELECT 1")
    assert pool.stats()["groups"]["ro"]["replays"] == 0
