"""The handler API against a real server: a first use, commit/rollback rules, nesting."""

from __future__ import annotations

import os
import threading
import time

import psycopg2
import pytest
from modes import GREEN, MODE, join_all, spawn, wait_until

import greenpool
from greenpool import CommitOutcomeUnknown, TransactionAborted
from greenpool.pool import _live_pools


@pytest.fixture
def table(pg):
    pg.execute("DROP TABLE IF EXISTS t; CREATE TABLE t (id serial PRIMARY KEY, v text)")
    yield "t"
    pg.execute("DROP TABLE IF EXISTS t")


def count(pg, value):
    return pg.execute("SELECT count(*) FROM t WHERE v = %s", (value,))[0][0]


def test_a_handler_commits_at_a_clean_exit_and_rolls_back_on_an_error(pg, mode, table):
    greenpool.init(
        {
            "type": mode,
            "db": [pg.endpoint()],
            "groups": {
                "write": {"connection_count": 10, "autocommit": False},
                "read": {"connection_count": 20, "autocommit": True},
            },
        }
    )
    try:
        with greenpool.handler("write") as db:
            assert db.query("INSERT INTO t (v) VALUES (%s)", ("x",)) == 1
            rows = db.query("SELECT id, v FROM t WHERE v = %s", ("x",))
        assert [v for _, v in rows] == ["x"]
        assert count(pg, "x") == 1  # committed at clean exit

        with pytest.raises(ZeroDivisionError), greenpool.handler("write") as db:
            db.query("INSERT INTO t (v) VALUES (%s)", ("gone",))
            1 / 0  # noqa: B018
        assert count(pg, "gone") == 0  # rolled back

        with greenpool.handler("read") as db:
            assert db.query("SELECT v FROM t WHERE v = %s", ("x",)) == [("x",)]
    finally:
        greenpool.close()


def test_init_twice_is_an_error_and_close_allows_again(pg, mode):
    config = {"type": mode, "db": pg.endpoint(), "groups": {"g": {}}}
    greenpool.init(config)
    try:
        with pytest.raises(greenpool.PoolError, match="already"):
            greenpool.init(config)
    finally:
        greenpool.close()
    greenpool.init(config)
    greenpool.close()
    with pytest.raises(greenpool.PoolError, match="not initialised"):
        greenpool.handler("g")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exist_ok", [False, True], ids=["init", "init_exist_ok"])
def test_racing_inits_make_one_pool(pg, mode, server_conns, exist_ok):
    """Threads (greenlets in the green modes) call init() at once, each blocked in the
    startup wait of whichever pool it makes: one pool, connection_count connections."""
    racers = 20 if GREEN else 8
    app = f"init-race-{exist_ok}"
    config = {"type": mode, "db": pg.endpoint(), "application_name": app,
              "startup_timeout": 10, "groups": {"g": {"connection_count": 2, "min_size": 2}}}
    start = threading.Barrier(racers, timeout=10)

    def race():
        start.wait()
        return greenpool.init(config, exist_ok=True) if exist_ok else greenpool.init(config)

    tasks = [spawn(race) for _ in range(racers)]
    try:
        join_all(tasks, 30)
        pools = {id(task.result) for task in tasks if task.error is None}
        errors = [task.error for task in tasks if task.error is not None]
        assert len(pools) == 1, f"{len(pools)} pools, errors: {errors}"
        if exist_ok or GREEN:  # every green racer arrives while the first is connecting
            assert not errors, errors
        else:  # a thread that comes after the first init returned is refused, as ever
            assert all(isinstance(e, greenpool.PoolError) and "already" in str(e)
                       for e in errors), errors
        assert greenpool.get_pool() is next(t.result for t in tasks if t.error is None)
        assert server_conns(application_name=app, expect=2) == 2
    finally:
        greenpool.close()
    assert server_conns(application_name=app, expect=0) == 0


@pytest.mark.timeout(60)
def test_init_under_way_is_shared_by_the_same_config_and_refuses_another(pg, mode,
                                                                        blackhole):
    """A caller racing an init() still in its startup wait: with the same config it waits
    and shares the outcome (here the startup failure), with another it is refused at once."""
    config = {"type": mode, "db": blackhole.endpoint(connect_timeout=1),
              "startup_timeout": 1.5, "groups": {"g": {}}}
    first = spawn(greenpool.init, config)
    wait_until(lambda: any(p.config.endpoints[0].port == blackhole.port
                           for p in list(_live_pools)), 10, "the first init under way")
    started = time.monotonic()
    with pytest.raises(greenpool.PoolError, match="another configuration"):
        greenpool.init({"type": mode, "db": pg.endpoint(), "groups": {"g": {}}})
    assert time.monotonic() - started < 1.0  # refused without waiting
    second = spawn(greenpool.init, config)
    join_all([first, second], 20)
    assert isinstance(first.error, greenpool.NoHealthyEndpoint), first.error
    assert second.error is first.error
    with pytest.raises(greenpool.PoolError, match="not initialised"):
        greenpool.get_pool()


@pytest.mark.timeout(60)
@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_init_in_a_child_forked_while_the_parent_held_the_init_lock(pg, mode, server_conns):
    """The lock that makes init() atomic, held by another task at fork, is made anew in
    the child: the child's init() must not hang on it."""
    app = "init-after-fork"
    config = {"type": mode, "db": pg.endpoint(), "application_name": app,
              "groups": {"g": {"connection_count": 1}}}
    read_end, write_end = os.pipe()
    with greenpool._guard:
        child = os.fork()
        if child == 0:  # the child: init, one query, close; a hang is killed by the parent
            code = 1
            try:
                os.close(read_end)
                greenpool.init(config)
                with greenpool.handler("g") as db:
                    os.write(write_end, str(db.query("SELECT 1")[0][0]).encode())
                greenpool.close()
                code = 0
            finally:
                os._exit(code)
    os.close(write_end)
    status: list[int] = []

    def exited() -> bool:
        pid, code = os.waitpid(child, os.WNOHANG)
        if pid:
            status.append(code)
        return bool(pid)

    try:
        wait_until(exited, 20, "the child's init, query and close")
    finally:
        if not status:
            os.kill(child, 9)
            os.waitpid(child, 0)
        reported = os.read(read_end, 16).decode()
        os.close(read_end)
    assert status == [0] and reported == "1", (status, reported)
    assert server_conns(application_name=app, expect=0) == 0


def test_manual_begin_on_autocommit_is_rolled_back_on_error(make_pool, pg, table):
    pool = make_pool({"read": {"connection_count": 1, "autocommit": True}})
    with pytest.raises(RuntimeError), pool.handler("read") as db:
        db.execute("BEGIN")
        db.query("INSERT INTO t (v) VALUES ('manual')")
        raise RuntimeError
    with pool.handler("read") as db:  # the same (only) connection comes back clean
        assert db.connection.info.transaction_status == 0
    assert count(pg, "manual") == 0
    assert pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
    ) == [(0,)]


def test_query_returns_rows_or_rowcount_and_execute_runs_many(make_pool, table):
    pool = make_pool({"g": {"row_factory": "dict"}})
    with pool.handler("g") as db:
        assert db.execute(
            ["INSERT INTO t (v) VALUES ('a')", ("INSERT INTO t (v) VALUES (%s)", ("b",))]
        ) == 2
        db.executemany("INSERT INTO t (v) VALUES (%s)", [("c",), ("d",)])
        assert db.query("UPDATE t SET v = v WHERE v IN ('a', 'b')") == 2
        assert db.query_one("SELECT v FROM t WHERE v = 'c'") == {"v": "c"}
        assert db.query_one("SELECT v FROM t WHERE v = 'nope'") is None
        assert len(db.query("SELECT * FROM t")) == 4
        with db.cursor() as cursor:
            cursor.execute("SELECT 1 AS one")
            assert cursor.fetchone() == {"one": 1}


def test_execute_takes_what_query_takes(make_pool, pg, table):
    """psycopg2.sql objects and bytes, alone, in a list, or with their parameters."""
    from psycopg2 import sql

    pool = make_pool({"g": {}})
    insert = sql.SQL("INSERT INTO {} (v) VALUES (%s)").format(sql.Identifier("t"))
    with pool.handler("g") as db:
        assert db.execute(insert, ("composed",)) == 1
        assert db.execute(b"INSERT INTO t (v) VALUES ('bytes')") == 1
        assert db.execute(sql.SQL("INSERT INTO t (v) VALUES ('sql')")) == 1
        assert db.execute([(insert, ("in a list",)), b"INSERT INTO t (v) VALUES ('b2')"]) == 2
    assert count(pg, "composed") == count(pg, "bytes") == count(pg, "in a list") == 1


def test_nested_handler_reuses_connection_with_savepoint(make_pool, pg, table):
    pool = make_pool({"g": {"connection_count": 1, "timeout": 1}})
    with pool.handler("g") as outer:
        outer.query("INSERT INTO t (v) VALUES ('outer')")
        with pool.handler("g") as inner:  # a pool of one: a second acquire would deadlock
            assert inner.connection is outer.connection
            inner.query("INSERT INTO t (v) VALUES ('kept')")
        with pytest.raises(ValueError), pool.handler("g") as inner:
            inner.query("INSERT INTO t (v) VALUES ('undone')")
            raise ValueError
        assert outer.query("SELECT count(*) FROM t")[0][0] == 2
    assert count(pg, "outer") == 1 and count(pg, "kept") == 1 and count(pg, "undone") == 0


def test_caught_sql_error_is_not_committed_silently(make_pool, pg, table):
    pool = make_pool({"g": {}})
    with pytest.raises(TransactionAborted, match="rolled back"), pool.handler("g") as db:
        db.query("INSERT INTO t (v) VALUES ('lost')")
        with pytest.raises(psycopg2.errors.UndefinedTable):
            db.query("SELECT * FROM no_such_table")
    assert count(pg, "lost") == 0
    with pool.handler("g") as db:  # and the connection is usable again
        assert db.query("SELECT 1") == [(1,)]


def test_connection_killed_before_commit_raises_outcome_unknown(make_pool, pg, table):
    pool = make_pool({"g": {"connection_count": 1}})
    with pytest.raises(CommitOutcomeUnknown), pool.handler("g") as db:
        db.query("INSERT INTO t (v) VALUES ('maybe')")
        pid = db.query("SELECT pg_backend_pid()")[0][0]
        pg.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    assert count(pg, "maybe") == 0
    with pool.handler("g") as db:  # the broken connection was replaced
        assert db.query("SELECT pg_backend_pid()")[0][0] != pid
    assert pool.stats()["groups"]["g"]["discards"] == 1


def _lose_the_connection_mid_transaction(db, pg, autocommit):
    """BEGIN (by hand where the group autocommits), one INSERT, then the backend is
    terminated and the next statement's error is caught, as a caller might."""
    if autocommit:
        db.execute("BEGIN")
    db.query("INSERT INTO t (v) VALUES ('lost')")
    pid = db.query("SELECT pg_backend_pid()")[0][0]
    pg.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    with pytest.raises(psycopg2.OperationalError):
        db.query("INSERT INTO t (v) VALUES ('lost too')")
    return pid


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transactional"])
def test_commit_of_a_transaction_lost_with_its_connection_raises(make_pool, pg, table,
                                                                 autocommit):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": autocommit}})
    with pytest.raises(TransactionAborted, match="lost"), pool.handler("g") as db:
        pid = _lose_the_connection_mid_transaction(db, pg, autocommit)
        with pytest.raises(TransactionAborted, match="lost"):
            db.commit()
        # the block's clean exit says it again: the connection is gone for good
    assert count(pg, "lost") == 0
    with pool.handler("g") as db:  # the lost connection was replaced
        assert db.query("SELECT pg_backend_pid()")[0][0] != pid


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transactional"])
def test_clean_exit_of_a_transaction_lost_with_its_connection_raises(make_pool, pg, table,
                                                                     autocommit):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": autocommit}})
    with pytest.raises(TransactionAborted, match="lost"), pool.handler("g") as db:
        _lose_the_connection_mid_transaction(db, pg, autocommit)
    assert count(pg, "lost") == 0


def test_autocommit_statement_lost_outside_a_transaction_leaves_nothing_to_report(
    make_pool, pg, table
):
    """Each autocommit statement is its own transaction: the one whose connection died
    raised, the ones before it were committed, and a clean exit has nothing to add."""
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}})
    with pool.handler("g") as db:
        db.query("INSERT INTO t (v) VALUES ('kept')")
        pid = db.query("SELECT pg_backend_pid()")[0][0]
        pg.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        with pytest.raises(psycopg2.OperationalError):
            db.query("SELECT 1")
        db.commit()  # nothing open: nothing to commit, nothing lost
    assert count(pg, "kept") == 1


def test_statement_timeout_and_readonly_are_session_settings(make_pool, table):
    pool = make_pool({"ro": {"readonly": True, "statement_timeout": 0.2, "autocommit": True}})
    with pool.handler("ro") as db:
        with pytest.raises(psycopg2.errors.QueryCanceled):
            db.query("SELECT pg_sleep(2)")
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            db.query("INSERT INTO t (v) VALUES ('no')")
        assert db.query("SHOW default_transaction_read_only") == [("on",)]


def test_statement_timeout_in_seconds_reaches_the_server_as_the_same_milliseconds(make_pool):
    pool = make_pool({"g": {"statement_timeout": 1.001}})  # 1000.9999999999999 ms as a float
    with pool.handler("g") as db:
        assert db.query("SHOW statement_timeout") == [("1001ms",)]


def test_settings_changed_in_a_block_are_restored(make_pool):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": False}})
    with pool.handler("g") as db:
        db.connection.autocommit = True
        db.connection.set_session(readonly=True)
    with pool.handler("g") as db:
        assert db.connection.autocommit is False
        assert db.connection.readonly is None
        db.connection.autocommit = True  # flipped and nothing else: restored, not discarded
        assert db.query("SHOW default_transaction_read_only") == [("off",)]
    with pool.handler("g") as db:
        assert db.connection.autocommit is False
    assert pool.stats()["groups"]["g"]["discards_by_reason"] == {"session_changed": 1}


@pytest.mark.parametrize("factory", [None, "RealDictCursor", "NamedTupleCursor"])
def test_a_cursor_kept_past_its_block_cannot_reach_the_next_borrower(make_pool, table,
                                                                     factory):
    """``db.cursor()`` is the block's: used after it (the connection is lent again by then)
    it raises instead of running inside the next borrower's transaction."""
    import psycopg2.extras

    pool = make_pool({"write": {"connection_count": 1}})
    kwargs = {} if factory is None else {"cursor_factory": getattr(psycopg2.extras, factory)}
    with pool.handler("write") as db:
        pid = db.query_one("SELECT pg_backend_pid()")[0]
        kept = db.cursor(**kwargs)
    with pool.handler("write") as db:
        db.query("INSERT INTO t (v) VALUES ('next')")
        assert db.query_one("SELECT pg_backend_pid()")[0] == pid  # the same connection
        with pytest.raises(psycopg2.InterfaceError, match="already given back"):
            kept.execute("SELECT 1")
        db.query("INSERT INTO t (v) VALUES ('still fine')")
    with pool.handler("write") as db:
        assert db.query("SELECT count(*) FROM t")[0][0] == 2


def test_unknown_group_names_the_configured_ones(make_pool):
    pool = make_pool({"write": {}, "read": {}})
    with pytest.raises(greenpool.ConfigError, match=r"'nope'.*\['read', 'write'\]"):
        pool.handler("nope")
