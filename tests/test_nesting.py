"""Nested handler blocks: one test per row of the README's nesting table, and the handler's
ownership rules."""

from __future__ import annotations

import contextlib

import psycopg2
import pytest
from faults import raising_once_at_the_call_of
from modes import join_all, spawn

from greenpool import TransactionAborted


@pytest.fixture
def table(pg):
    pg.execute("DROP TABLE IF EXISTS nest_t; CREATE TABLE nest_t (v text)")
    yield "nest_t"
    pg.execute("DROP TABLE IF EXISTS nest_t")


def committed(pg):
    return sorted(row[0] for row in pg.execute("SELECT v FROM nest_t"))


def insert(db, value):
    db.query("INSERT INTO nest_t VALUES (%s)", (value,))


@pytest.fixture
def pool(make_pool):
    return make_pool({"g": {"connection_count": 1, "timeout": 1}})


# --- the table, row by row ----------------------------------------------------------------


def test_clean_nested_exit_keeps_its_work_for_the_outer_block_to_decide(pool, pg, table):
    with pytest.raises(RuntimeError), pool.handler("g") as outer:
        insert(outer, "outer")
        with pool.handler("g") as inner:
            assert inner.connection is outer.connection
            insert(inner, "inner")
        assert committed(pg) == []  # nothing committed by the inner exit
        raise RuntimeError  # the outer block decides: all rolled back
    assert committed(pg) == []
    with pool.handler("g"), pool.handler("g") as inner:
        insert(inner, "inner")
    assert committed(pg) == ["inner"]


def test_exception_leaving_a_nested_block_undoes_only_its_work(pool, pg, table):
    with pool.handler("g") as outer:
        insert(outer, "outer")
        with pytest.raises(ValueError), pool.handler("g") as inner:
            insert(inner, "undone")
            raise ValueError
        insert(outer, "after")
    assert committed(pg) == ["after", "outer"]


def test_error_caught_inside_a_nested_block_raises_at_its_exit_and_outer_goes_on(
    pool, pg, table
):
    with pool.handler("g") as outer:
        insert(outer, "outer")
        with pytest.raises(TransactionAborted, match="savepoint"), pool.handler("g") as inner:
            insert(inner, "inner")
            with pytest.raises(psycopg2.errors.UndefinedTable):
                inner.query("SELECT * FROM no_such_table")
        assert outer.query("SELECT 1") == [(1,)]  # not InFailedSqlTransaction
        insert(outer, "after")
    assert committed(pg) == ["after", "outer"]  # the inner block's work is gone, and said so


def test_commit_in_a_nested_block_commits_all_and_the_block_goes_on(pool, pg, table):
    with pool.handler("g") as outer:
        insert(outer, "outer")
        with pool.handler("g") as middle:
            with pool.handler("g") as inner:
                insert(inner, "inner")
                inner.commit()
                assert committed(pg) == ["inner", "outer"]
                insert(inner, "after-commit")
            # no InvalidSavepointSpecification at the exits
            assert middle.query("SELECT 1") == [(1,)]
        insert(outer, "outer-after")
    assert committed(pg) == ["after-commit", "inner", "outer", "outer-after"]


def test_exception_after_a_nested_commit_undoes_only_what_followed(pool, pg, table):
    with pool.handler("g") as outer:
        with pytest.raises(KeyError), pool.handler("g") as inner:
            insert(inner, "kept")
            inner.commit()
            insert(inner, "undone")
            raise KeyError
        insert(outer, "outer")
    assert committed(pg) == ["kept", "outer"]


def test_rollback_in_a_nested_block_rolls_back_the_whole_transaction(pool, pg, table):
    with pool.handler("g") as outer:
        insert(outer, "outer")
        with pool.handler("g") as inner:
            insert(inner, "inner")
            inner.rollback()
            insert(inner, "after")
        insert(outer, "outer-after")
    assert committed(pg) == ["after", "outer-after"]


def test_commit_of_a_failed_transaction_in_a_nested_block_raises(pool, pg, table):
    with pool.handler("g") as outer:
        insert(outer, "outer")
        with pool.handler("g") as inner:
            with pytest.raises(psycopg2.errors.UndefinedTable):
                inner.query("SELECT * FROM no_such_table")
            with pytest.raises(TransactionAborted, match="not committed"):
                inner.commit()
            insert(inner, "inner-after")
    assert committed(pg) == ["inner-after"]


def test_replay_in_a_three_level_nest_reaches_every_level(make_pool, pg):
    pool = make_pool({"ro": {"connection_count": 2, "readonly": True, "autocommit": True}})
    with pool.handler("ro") as outer:
        with pool.handler("ro") as middle:
            with pool.handler("ro") as inner:
                old = inner.query("SELECT pg_backend_pid()")[0][0]
                pg.execute("SELECT pg_terminate_backend(%s, 5000)", (old,))
                new = inner.query("SELECT pg_backend_pid()")[0][0]  # replayed
                assert new != old
            assert middle.query("SELECT pg_backend_pid()") == [(new,)]
        assert outer.query("SELECT pg_backend_pid()") == [(new,)]
    stats = pool.stats()["groups"]["ro"]
    assert stats["replays"] == 1 and stats["in_use"] == 0


def test_no_replay_inside_a_transaction_nest(make_pool, pg):
    pool = make_pool({"g": {"connection_count": 2}})
    with pytest.raises(psycopg2.OperationalError), pool.handler("g", idempotent=True) as outer:
        with pool.handler("g") as inner:  # a savepoint: a transaction is open
            pid = inner.query("SELECT pg_backend_pid()")[0][0]
            pg.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            inner.query("SELECT 1")
        outer.query("SELECT 1")
    assert pool.stats()["groups"]["g"]["replays"] == 0


def test_autocommit_nest_has_no_savepoints(make_pool, pg, table):
    pool = make_pool({"a": {"connection_count": 1, "autocommit": True}})
    with pool.handler("a"):
        with pytest.raises(ValueError), pool.handler("a") as inner:
            insert(inner, "committed-at-once")
            raise ValueError
        assert committed(pg) == ["committed-at-once"]


# --- ownership (the handler side; the group side is in group.py's tests) -----------------


def test_a_handler_is_single_use(pool):
    handler = pool.handler("g")
    with handler as db:
        db.query("SELECT 1")
        with pytest.raises(RuntimeError, match="single-use"), handler:
            pass
        assert pool.stats()["groups"]["g"]["in_use"] == 1
    with pytest.raises(RuntimeError, match="single-use"), handler:
        pass
    with pytest.raises(RuntimeError, match="outside its 'with' block"):
        handler.query("SELECT 1")
    stats = pool.stats()["groups"]["g"]
    assert stats["in_use"] == 0 and stats["acquires"] == 1


def test_a_handler_belongs_to_the_task_that_entered_it(pool):
    errors = []
    with pool.handler("g") as db:

        def other_task():
            for use in (lambda: db.query("SELECT 1"), lambda: db.connection, db.commit,
                        lambda: db.__enter__()):
                try:
                    use()
                except RuntimeError as exc:
                    errors.append(str(exc))

        join_all([spawn(other_task)], 5)
        assert db.query("SELECT 1") == [(1,)]  # still the owner's
    assert len(errors) == 4
    assert all("task" in e or "single-use" in e for e in errors)
    stats = pool.stats()["groups"]["g"]
    assert stats["in_use"] == 0 and stats["acquires"] == 1 and stats["size"] == 1


def test_a_failed_entry_leaves_the_handler_unusable_and_nothing_taken(make_pool):
    from greenpool import PoolTimeout

    pool = make_pool({"g": {"connection_count": 1, "timeout": 0.05}})
    held = pool.group("g").acquire(timeout=10)  # its connect may take longer on a loaded machine
    handler = pool.handler("g")
    with pytest.raises(PoolTimeout), handler:
        pass
    pool.group("g").release(held)
    with pytest.raises(RuntimeError, match="single-use"), handler:
        pass
    assert pool.stats()["groups"]["g"]["in_use"] == 0


def test_a_replay_that_finds_no_connection_leaves_nothing_behind(pg_factory, mode):
    from greenpool import Pool, PoolTimeout

    server = pg_factory()
    pool = Pool({"type": mode, "db": server.endpoint(connect_timeout=0.3),
                 "groups": {"ro": {"connection_count": 1, "readonly": True, "autocommit": True,
                                   "timeout": 0.5}}})
    try:
        with pytest.raises((PoolTimeout, psycopg2.OperationalError)), pool.handler("ro") as db:
            db.query("SELECT 1")
            server.stop(mode="immediate")
            db.query("SELECT 1")  # lost: replayed, but no connection can be had
        group = pool.group("ro")
        assert group.holders == {}
        assert group.stats()["in_use"] == 0
        server.start()
        with pool.handler("ro", timeout=5) as db:  # the same task, a fresh outermost block
            assert db.query("SELECT 1") == [(1,)]
    finally:
        pool.close()


# --- a block whose exit was cut short -------------------------------------------------------


class CutShort(Exception):
    """What a signal handler raises (KeyboardInterrupt, Celery's SoftTimeLimitExceeded)."""


def exit_cut_short_once():
    """The next ``Handler.__exit__`` raises CutShort on its first instruction, before it
    ran a line, as an exception from a signal handler can."""
    from greenpool.handler import Handler

    return raising_once_at_the_call_of(Handler.__exit__.__code__, CutShort())


def _enter_and_cut(pool, value):
    with exit_cut_short_once() as fired, pytest.raises(CutShort), \
            pool.handler("g") as db:
        insert(db, value)
    assert fired, "the exit was not cut short"


@pytest.mark.parametrize("next_block", ["the same statement again", "a later statement",
                                        "another function"])
def test_a_block_whose_exit_was_cut_short_is_not_nested_into(pool, pg, table, next_block,
                                                              caplog):
    """Its transaction will never be committed: a later block of the task that joined it
    would lose its work without a word. It takes a connection of its own, and the cut block's
    connection (its transaction open) is discarded."""
    group = pool.group("g")
    if next_block == "the same statement again":
        for value in ("cut", "kept"):
            with contextlib.ExitStack() as cut:
                if value == "cut":
                    cut.enter_context(exit_cut_short_once())
                    cut.enter_context(pytest.raises(CutShort))
                with pool.handler("g") as db:
                    insert(db, value)
    else:
        if next_block == "a later statement":
            with exit_cut_short_once(), pytest.raises(CutShort), pool.handler("g") as db:
                insert(db, "cut")
        else:
            _enter_and_cut(pool, "cut")
        with caplog.at_level("WARNING", logger="greenpool"), pool.handler("g") as db:
            insert(db, "kept")
        assert "ended without its exit running" in caplog.text
    assert committed(pg) == ["kept"]
    assert group.holders == {}
    stats = pool.stats()["groups"]["g"]
    assert stats["in_use"] == 0 and stats["discards_by_reason"].get("interrupted") == 1


def test_a_block_inside_a_generator_suspended_in_its_own_block_still_nests(pool, pg, table):
    """A block held open by a suspended generator (a context manager written with
    ``contextlib.contextmanager``) is open: a block entered meanwhile nests in it."""

    @contextlib.contextmanager
    def unit_of_work():
        with pool.handler("g") as db:
            yield db

    with unit_of_work() as outer:
        insert(outer, "outer")
        with pool.handler("g") as inner:
            assert inner.connection is outer.connection
            insert(inner, "inner")
    assert committed(pg) == ["inner", "outer"]


def test_a_block_whose_task_ended_after_its_exit_was_cut_short_is_given_up(make_pool):
    """A task (a greenlet per request, a worker thread) whose block's exit was cut short and
    that then ends has no next block to give the cut block up: housekeeping does, so its
    connection, in a transaction nobody will end, does not stay lent to a task that is gone
    (the group's one connection would be lost for good)."""
    pool = make_pool({"g": {"connection_count": 1, "timeout": 1}}, maintenance_interval=0.1)
    fired = []

    def cut():
        with exit_cut_short_once() as cut_now, pytest.raises(CutShort), \
                pool.handler("g") as db:
            db.query("SELECT 1")
        fired.extend(cut_now)

    join_all([spawn(cut)], timeout=10)
    assert fired, "the exit was not cut short"
    with pool.handler("g", timeout=5) as db:  # another task: the group's one connection
        assert db.query("SELECT 1") == [(1,)]
    stats = pool.stats()["groups"]["g"]
    assert stats["discards_by_reason"].get("interrupted") == 1 and not pool.group("g").holders
