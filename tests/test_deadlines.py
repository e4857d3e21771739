"""Every round trip the pool makes is bounded, and an interrupted statement is cancelled on
the server. Real faults: a backend (or the postmaster) stopped with
SIGSTOP and resumed with SIGCONT, a black-hole listener, gevent timeouts and kills."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psycopg2
import pytest
from faults import Ticker, raising_once_at_the_call_of
from modes import GREEN, MODE, Timeout, join_all, sleep, spawn, wait_until

from greenpool import PoolTimeout
from greenpool.borrow_return import check_on_borrow
from greenpool.cancel import cancels_in_flight
from greenpool.connection import RoundTripTimeout, round_trip

MARGIN = 0.25  # scheduling slack on a shared 2-core machine


@contextlib.contextmanager
def stopped(pid):
    """The process ``pid`` (a backend, a postmaster) frozen: its sockets stay open, silent."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def backend_pid(raw):
    with raw.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    raw.rollback()  # leave it idle, as a returned connection is
    return pid


def running(pg, app, text="pg_sleep"):
    return pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'active' "
        "AND query LIKE %s", (app, f"%{text}%"))[0][0]


# --- 3. bounded round trips -------------------------------------------------------------


def test_borrow_check_is_bounded_by_the_callers_deadline(make_pool):
    pool = make_pool({"g": {"connection_count": 1, "check_idle_after": 0}})
    group = pool.group("g")
    pc = group.acquire()
    try:
        with stopped(backend_pid(pc.raw)):
            start = time.monotonic()
            reason = check_on_borrow(pc, group.config, pool._backend, start, start + 0.3)
            took = time.monotonic() - start
    finally:
        group.release(pc, discard="test")
    assert reason == "check_timeout"  # cut by the caller: says nothing about the server
    assert 0.25 <= took < 0.3 + MARGIN


def test_borrow_check_with_no_time_left_lends_a_quiet_connection_unpinged(make_pool):
    """``timeout=0`` on a quiet group: the ping needs time the caller does not have, and the
    free check (a zero-timeout poll) found nothing, so the idle connection is lent."""
    pool = make_pool({"g": {"connection_count": 1, "check_idle_after": 0}})
    group = pool.group("g")
    pc = group.acquire()
    try:
        now = time.monotonic()
        assert check_on_borrow(pc, group.config, pool._backend, now, now - 1) == ""
    finally:
        group.release(pc)
    again = group.acquire(timeout=0)
    try:
        with again.raw.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        group.release(again)


def test_borrow_check_with_no_time_left_sends_nothing_to_a_readable_connection(make_pool, pg):
    pool = make_pool({"g": {"connection_count": 1, "check_idle_after": 0, "autocommit": True}})
    group = pool.group("g")
    pc = group.acquire()
    try:
        with pc.raw.cursor() as cursor:
            cursor.execute("LISTEN greenpool_deadlines")
        pg.execute("NOTIFY greenpool_deadlines")
        deadline = time.monotonic() + 5
        while not pc.readable():  # the notification is on its way
            assert time.monotonic() < deadline, "the NOTIFY never arrived"
            time.sleep(0.01)
        now = time.monotonic()
        assert check_on_borrow(pc, group.config, pool._backend, now, now - 1) == "check_timeout"
        assert not pc.raw.closed  # still usable: nothing was sent
        with pc.raw.cursor() as cursor:
            cursor.execute("UNLISTEN *")
    finally:
        group.release(pc)


def test_borrow_check_without_deadline_is_bounded_by_connect_timeout(make_pool, pg):
    pool = make_pool({"g": {"connection_count": 1, "check_idle_after": 0}},
                     db=pg.endpoint(connect_timeout=0.4))
    group = pool.group("g")
    pc = group.acquire()
    try:
        with stopped(backend_pid(pc.raw)):
            start = time.monotonic()
            reason = check_on_borrow(pc, group.config, pool._backend, start)
            took = time.monotonic() - start
    finally:
        group.release(pc, discard="test")
    assert reason == "failed_check"
    assert 0.35 <= took < 0.4 + MARGIN


def test_acquire_with_a_stalled_idle_connection_keeps_its_timeout(make_pool, pg):
    """The idle connection is pinged on borrow and its backend is stalled (SIGSTOP):
    acquire(timeout=0.3) still answers within its timeout, in every mode."""
    pool = make_pool({"g": {"connection_count": 1, "check_idle_after": 0}},
                     db=pg.endpoint(connect_timeout=1))
    group = pool.group("g")
    pc = group.acquire()
    pid = backend_pid(pc.raw)
    group.release(pc)
    with stopped(pid):
        start = time.monotonic()
        with contextlib.suppress(PoolTimeout):
            group.release(group.acquire(timeout=0.3))
        took = time.monotonic() - start
    assert took < 0.3 + MARGIN


def test_reset_on_return_is_bounded_by_connect_timeout(make_pool, pg):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}},
                     db=pg.endpoint(connect_timeout=0.4))
    with pool.handler("g") as db:
        db.query("SET search_path TO pg_catalog")  # dirty: DISCARD ALL on return
        pid = db.query("SELECT pg_backend_pid()")[0][0]
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
    took = time.monotonic() - start
    os.kill(pid, signal.SIGCONT)
    assert took < 0.4 + MARGIN
    stats = pool.stats()["groups"]["g"]
    assert stats["discards_by_reason"] == {"reset_failed": 1} and stats["in_use"] == 0


def test_rollback_on_return_is_bounded_by_connect_timeout(make_pool, pg):
    pool = make_pool({"g": {"connection_count": 1}}, db=pg.endpoint(connect_timeout=0.4))
    pid = None
    with pytest.raises(KeyError), pool.handler("g") as db:
        pid = db.query("SELECT pg_backend_pid()")[0][0]  # a transaction is open
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        raise KeyError
    took = time.monotonic() - start
    os.kill(pid, signal.SIGCONT)
    assert took < 0.4 + MARGIN
    assert pool.stats()["groups"]["g"]["discards_by_reason"] == {"reset_failed": 1}


def test_round_trip_helper_returns_rows_and_is_bounded(make_pool):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}})
    group = pool.group("g")
    pc = group.acquire()
    try:
        assert round_trip(pc.raw, "SELECT %s", pool._backend, 1, (7,)) == [(7,)]
        assert round_trip(pc.raw, "SET search_path TO public", pool._backend, 1) is None
        with pytest.raises(RoundTripTimeout), stopped(backend_pid(pc.raw)):
            round_trip(pc.raw, "SELECT 1", pool._backend, 0.2)
        assert pc.raw.closed
        for nothing in (0, -1, float("nan")):
            with pytest.raises(RoundTripTimeout, match="no time left"):
                round_trip(pc.raw, "SELECT 1", pool._backend, nothing)
    finally:
        group.release(pc, discard="test")


def test_connect_to_a_black_hole_is_bounded_in_every_mode(blackhole):
    """Threaded mode used libpq's connect_timeout: whole seconds, at least 2."""
    from greenpool import Pool

    pool = Pool({"type": MODE, "db": blackhole.endpoint(connect_timeout=0.3),
                 "groups": {"g": {"timeout": 0.3}}})
    try:
        start = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.group("g").acquire()
        assert time.monotonic() - start < 0.3 + MARGIN
    finally:
        pool.close()


# --- 4. interrupted statements are cancelled on the server -------------------------------


@pytest.mark.skipif(not GREEN, reason="a thread cannot be interrupted from outside")
@pytest.mark.parametrize("how", ["timeout", "kill"])
def test_interrupted_statement_is_cancelled_on_the_server(make_pool, pg, how):
    app = f"gp-cancel-{how}"
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}}, application_name=app)
    started = []

    def victim():
        with Timeout(0.3 if how == "timeout" else 10), pool.handler("g") as db:
            started.append(True)
            db.query("SELECT pg_sleep(3)")

    task = spawn(victim)
    wait_until(lambda: running(pg, app) == 1, 5, "pg_sleep to start")
    if how == "kill":
        if MODE == "gevent":
            task._handle.kill(block=False)
        else:
            task._handle.kill()
    join_all([task], 5)
    gave_up = time.monotonic()
    wait_until(lambda: running(pg, app) == 0, 1.0, "the server to stop the statement")
    assert time.monotonic() - gave_up < 1.0
    assert pool.stats()["groups"]["g"]["in_use"] == 0


def test_a_pool_round_trip_past_its_bound_is_cancelled(make_pool, pg):
    """In threaded mode too: the wait callback's deadline raises and cancels."""
    app = "gp-cancel-bound"
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}}, application_name=app)
    group = pool.group("g")
    pc = group.acquire()
    try:
        start = time.monotonic()
        with pytest.raises(RoundTripTimeout):
            round_trip(pc.raw, "SELECT pg_sleep(3)", pool._backend, 0.3)
        assert time.monotonic() - start < 0.3 + MARGIN
        wait_until(lambda: running(pg, app) == 0, 1.0, "the server to stop the statement")
    finally:
        group.release(pc, discard="test")


@pytest.mark.skipif(not GREEN, reason="the hub is what must not block")
def test_cancel_never_blocks_the_hub_even_when_the_server_does_not_answer(pg_factory, mode):
    """The postmaster, which takes cancel requests, is frozen: the cancel hangs in its
    thread; the hub goes on ticking. Once the postmaster resumes, the cancel lands."""
    from greenpool import Pool

    server = pg_factory()
    app = "gp-cancel-stalled"
    pool = Pool({"type": mode, "db": server.endpoint(), "application_name": app,
                 "groups": {"g": {"connection_count": 1, "autocommit": True}}})
    try:
        with pool.handler("g") as db:  # opened before the postmaster freezes
            db.query("SELECT 1")
        ticker = Ticker()
        with stopped(server.pid):
            with pytest.raises(Timeout), Timeout(0.3), pool.handler("g") as db:
                db.query("SELECT pg_sleep(3)")
            sleep(0.3)  # the cancel request is stuck meanwhile
            assert cancels_in_flight() == 1
        assert ticker.stop() < 0.1
        wait_until(lambda: running(server, app) == 0, 1.5, "the cancel to land")
        wait_until(lambda: cancels_in_flight() == 0, 3, "the cancel thread to end")
    finally:
        pool.close()


def test_a_statement_that_ends_on_its_own_is_not_cancelled(make_pool, pg):
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True}})
    with pool.handler("g") as db:
        db.query("SELECT pg_sleep(0.05)")
        with pytest.raises(psycopg2.errors.DivisionByZero):
            db.query("SELECT 1/0")
    assert cancels_in_flight() == 0


# --- the borrow check ----------------------------------------------------------------------


@pytest.mark.skipif(not GREEN, reason="the borrow check's deadline is a green timeout")
@pytest.mark.timeout(60)
def test_the_borrow_check_answers_within_the_callers_timeout(make_pool, pg):
    """An idle connection past check_idle_after is pinged on borrow (connection.py
check_on_borrow): with its backend stalled (SIGSTOP), acquire(timeout=0.5) answers within
the caller's budget, not after the ping's own bound (connect_timeout, 3 s)."""
    pool = make_pool({"g": {"connection_count": 2, "check_idle_after": 0.2}},
                     db=pg.endpoint(connect_timeout=3))
    group = pool.group("g")
    pc = group.acquire(timeout=5)
    stalled = pc.raw.get_backend_pid()
    group.release(pc)
    sleep(0.4)  # idle past check_idle_after: the next borrow pings it
    os.kill(stalled, signal.SIGSTOP)
    try:
        started = time.monotonic()
        try:
            group.release(group.acquire(timeout=0.5))
        except PoolTimeout:
            pass
        took = time.monotonic() - started
    finally:
        os.kill(stalled, signal.SIGCONT)
    assert took < 1.0, took



@pytest.mark.skipif(MODE != "threaded", reason="the blocking modes' deadline; runs once")
def test_a_deadline_whose_exit_was_cut_short_bounds_nothing_after_its_block(pg):
    """A signal handler's exception on the first instruction of a driver deadline's exit
    leaves it set on the thread; once its block is over it must bound nothing (every later
    wait of the thread raised its error, a private one, into code that never asked)."""
    from greenpool.concurrency.thread_backends import ThreadedBackend
    from greenpool.concurrency.waits import BlockingDeadline

    backend = ThreadedBackend()
    backend.patch_driver()
    error = RuntimeError("the deadline of a block that is over")
    with raising_once_at_the_call_of(BlockingDeadline.__exit__.__code__,
                                     KeyboardInterrupt()) as fired, \
            pytest.raises(KeyboardInterrupt), backend.deadline(0.05, error):
        pass
    assert fired
    time.sleep(0.1)  # the deadline has passed
    conn = pg.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.05)")  # waits past it: the error is not raised
            cursor.fetchall()
    finally:
        conn.close()


@pytest.mark.skipif(not GREEN, reason="the green modes' deadline is an event-loop timer")
@pytest.mark.parametrize("cut", ["exit cut short", "exit ran"])
def test_a_green_deadline_throws_only_into_its_open_block(cut):
    """A signal handler's exception on the first instruction of a green deadline's exit
    leaves its timer armed; when it fires, the block is over and its error (a private one,
    for a round trip long gone) must not be thrown into whatever the task does then. While
    the block is open it is thrown."""
    from greenpool.concurrency.green_deadline import GreenDeadline
    from greenpool.concurrency.modes import backend_for

    backend = backend_for(MODE)
    error = RuntimeError("the deadline of a block that is over")
    if cut == "exit cut short":
        with raising_once_at_the_call_of(GreenDeadline.__exit__.__code__,
                                         KeyboardInterrupt()) as fired, \
                pytest.raises(KeyboardInterrupt), backend.deadline(0.05, error):
            pass
        assert fired
    else:
        with backend.deadline(0.05, error):
            pass
    sleep(0.3)  # the deadline passes while the task waits, after its block: nothing thrown
    with pytest.raises(RuntimeError) as raised, backend.deadline(0.05, error):
        sleep(5)
    assert raised.value is error


@pytest.mark.skipif(not GREEN, reason="the green modes' deadline is an event-loop timer")
def test_a_green_deadline_cut_short_throws_nothing_into_the_next_pass_of_its_loop():
    """The same ``with`` statement run again in the same frame: to the frames it is the same
    block, open again. The first pass's exit is cut short; its timer fires during the second
    pass, whose own deadline is the one in force: nothing is thrown."""
    from greenpool.concurrency.green_deadline import GreenDeadline
    from greenpool.concurrency.modes import backend_for

    backend = backend_for(MODE)
    error = RuntimeError("the deadline of the first pass")
    interrupted = []
    with raising_once_at_the_call_of(GreenDeadline.__exit__.__code__,
                                     KeyboardInterrupt()) as fired:
        for seconds, nap in ((0.05, 0.0), (5.0, 0.3)):
            try:
                with backend.deadline(seconds, error):
                    sleep(nap)
            except KeyboardInterrupt:
                interrupted.append(seconds)
    assert fired and interrupted == [0.05]


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
@pytest.mark.timeout(60)
def test_a_non_threaded_connect_measuring_its_server_answers_within_the_callers_timeout(pg):
    """A primary group over two endpoints measures a new connection's timeline at connect:
    one round trip after the login, which the server (through a proxy) holds 3 s. The
    inline connect's caller still gets its answer within its own timeout, and the endpoint
    is not judged for it (the caller's time ran out, not the server's)."""
    from delayproxy import DelayProxy

    from greenpool import Pool
    from greenpool.endpoint import UP
    from greenpool.testing.postgres import free_port

    with DelayProxy(pg.port, 3.0, b"pg_is_in_recovery") as proxy:
        pool = Pool({"type": "non-threaded",
                     "db": [proxy.endpoint(pg), pg.endpoint(port=free_port())],
                     "groups": {"w": {"connection_count": 2, "role": "primary"}}})
        try:
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                pool.group("w").acquire(timeout=0.5)
            assert time.monotonic() - started < 0.8
            assert proxy.held() >= 1  # the measuring query was the one held
            assert pool.group("w").endpoints[0].state == UP
        finally:
            pool.close()
