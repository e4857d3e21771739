"""Exclusive connections: ``pool.exclusive(group)`` opens a dedicated connection
chosen like the group's (role, quarantine, settings), outside its slots, bounded by
``exclusive_limit``, closed at the end; interruptions never leak it or its slot.

Real servers throughout: a primary and its streaming standby for roles, a stopped cluster
for a dead endpoint, a black-hole listener for a connect that hangs.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg2
import pytest
from endpoints import label
from modes import GREEN, MODE, Timeout, join_all, sleep, spawn, wait_until

import greenpool
from greenpool import ConfigError, PoolClosed, PoolError, PoolTimeout

pytestmark = pytest.mark.timeout(90)

APP = "greenpool-exclusive-test"


def backend_pid(conn: Any) -> int:
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def scalar(conn: Any, sql: str) -> Any:
    with conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def group_stats(pool: Any, name: str = "g") -> dict[str, Any]:
    return pool.stats()["groups"][name]  # type: ignore[no-any-return]


def test_a_dedicated_connection_is_outside_the_slots_keeps_its_session_and_is_closed(
    make_pool, server_conns, pg
):
    """With a group of one connection lent out, exclusive() still connects, with the
    group's settings; session state lives for the block; at its end the server session is
    gone, nothing went back to the idle set, and stats counted it."""
    pool = make_pool({"g": {"connection_count": 1, "statement_timeout": 7, "autocommit": True}},
                     application_name=APP)
    with pool.handler("g") as db:
        lent_pid = db.query_one("SELECT pg_backend_pid()")[0]
        with pool.exclusive("g") as conn:
            assert backend_pid(conn) != lent_pid
            assert scalar(conn, "SHOW statement_timeout") == "7s"
            assert conn.autocommit is True
            conn.cursor().execute("SELECT pg_advisory_lock(4242)")
            assert scalar(conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                "AND objid = 4242") == 1
            stats = group_stats(pool)
            assert stats["exclusive_open"] == 1 and stats["size"] == 1
            # placement balances only pooled connections: this one is not counted there
            assert sum(pool.group("g").counts.values()) == 1
            assert pool.stats()["endpoints"][label(pg)]["open"] == 2
            assert server_conns(application_name=APP) == 2
    stats = group_stats(pool)
    assert stats["exclusive_open"] == 0 and stats["exclusive_opened"] == 1
    assert stats["idle"] == 1 and stats["size"] == 1  # the pooled one only
    assert stats["discards"] == 0  # a normal end is not a discard
    assert server_conns(application_name=APP, expect=1) == 1
    # the session ended: its advisory lock is gone with it
    assert pg.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                      "AND objid = 4242")[0][0] == 0


def test_module_api_mirrors_the_pool(pg, mode):
    greenpool.init({"type": mode, "db": pg.endpoint(), "groups": {"g": {}}})
    try:
        with greenpool.exclusive("g") as conn:
            assert scalar(conn, "SELECT 1") == 1
            assert greenpool.stats()["groups"]["g"]["exclusive_open"] == 1
        assert greenpool.stats()["groups"]["g"]["exclusive_open"] == 0
    finally:
        greenpool.close()


def test_an_open_transaction_is_rolled_back_at_the_end(make_pool, pg):
    pool = make_pool({"g": {}})
    with pool.exclusive("g") as conn:
        conn.cursor().execute("CREATE TABLE excl_rolled_back (id int)")
        assert conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert pg.execute("SELECT to_regclass('excl_rolled_back') IS NULL")[0][0] is True


def test_the_limit_holds_and_times_out_clearly(make_pool):
    pool = make_pool({"g": {"exclusive_limit": 2}})
    with pool.exclusive("g"), pool.exclusive("g"):
        started = time.monotonic()
        with pytest.raises(PoolTimeout) as caught, pool.exclusive("g", timeout=0.3):
            pass
        elapsed = time.monotonic() - started
        assert "exclusive_limit" in str(caught.value) and "'g'" in str(caught.value)
        assert 0.25 <= elapsed < 3, elapsed
        stats = group_stats(pool)
        assert stats["exclusive_open"] == 2 and stats["exclusive_timeouts"] == 1
    assert group_stats(pool)["exclusive_open"] == 0
    with pool.exclusive("g") as conn:  # the slots came back
        assert scalar(conn, "SELECT 1") == 1


def test_no_time_to_wait_is_a_timeout_that_says_so_on_a_healthy_server(make_pool):
    """``exclusive(timeout=0)`` with room under ``exclusive_limit``: no connect can start in
    no time, so the caller gets a PoolTimeout that says so (not that a connect is under way,
    nor that the endpoints are unhealthy), counted once; nothing is opened."""
    from greenpool import NoHealthyEndpoint

    pool = make_pool({"g": {"exclusive_limit": 2}})
    with pytest.raises(PoolTimeout, match="no time was left") as caught, \
            pool.exclusive("g", timeout=0):
        pass
    assert not isinstance(caught.value, NoHealthyEndpoint)
    stats = group_stats(pool)
    assert (stats["exclusive_timeouts"], stats["timeouts"], stats["exclusive_open"],
            stats["exclusive_connecting"]) == (1, 0, 0, 0), stats


def test_a_waiter_gets_the_slot_given_back_first_come_first_served(make_pool):
    pool = make_pool({"g": {"exclusive_limit": 1}})
    order: list[int] = []

    def wait_for_one(i: int) -> None:
        with pool.exclusive("g", timeout=20):
            order.append(i)
            sleep(0.02)

    with pool.exclusive("g"):
        tasks = []
        for i in range(3):
            tasks.append(spawn(wait_for_one, i))
            wait_until(lambda i=i: group_stats(pool)["exclusive_waiting"] == i + 1, 10,
                       f"waiter {i} in line")
    join_all(tasks, 30)
    assert [task.error for task in tasks] == [None] * 3
    assert order == [0, 1, 2]
    assert group_stats(pool)["exclusive_open"] == 0


def test_the_role_decides_where_it_connects_and_a_dead_endpoint_is_skipped(
    make_pool, pg_factory
):
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    dead = pg_factory()
    dead.stop("immediate")
    pool = make_pool(
        {"write": {"role": "primary"}, "read": {"role": "standby"}},
        db=[dead.endpoint(connect_timeout=2), standby.endpoint(), primary.endpoint()],
    )
    for _ in range(4):
        with pool.exclusive("write") as conn:
            assert scalar(conn, "SELECT inet_server_port()") == primary.port
        with pool.exclusive("read") as conn:
            assert scalar(conn, "SELECT inet_server_port()") == standby.port
            assert scalar(conn, "SHOW default_transaction_read_only") == "on"
    assert pool.stats()["endpoints"][label(dead)]["state"] != "up"


def test_exclusive_limit_is_validated_and_zero_turns_it_off(make_pool, pg):
    for bad in (-1, 1.5, "3", True, 10**9):
        with pytest.raises(ConfigError) as caught:
            greenpool.Pool({"db": pg.endpoint(), "groups": {"g": {"exclusive_limit": bad}}})
        assert "groups.g.exclusive_limit" in str(caught.value)
        assert "whole number" in str(caught.value)
    pool = make_pool({"g": {"exclusive_limit": 0}})
    with pytest.raises(PoolError, match="exclusive_limit=0"), pool.exclusive("g"):
        pass
    with pytest.raises(ConfigError, match="not configured"):
        pool.exclusive("nope")


def test_an_exception_inside_the_block_closes_the_connection_and_frees_the_slot(
    make_pool, server_conns
):
    """A BaseException that is not an Exception (what a kill or a timeout is) inside the
    block: the server session ends and the slot is free again. Every mode."""

    class Interrupted(BaseException):
        pass

    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP)
    with pytest.raises(Interrupted), pool.exclusive("g") as conn:
        conn.cursor().execute("SELECT 1")
        raise Interrupted
    assert group_stats(pool)["exclusive_open"] == 0
    assert server_conns(application_name=APP, expect=0) == 0
    with pool.exclusive("g", timeout=1):
        pass


@pytest.mark.skipif(not GREEN, reason="killing a task needs greenlets")
def test_killed_or_timed_out_waiters_and_connects_leak_nothing(make_pool, blackhole,
                                                                server_conns):
    """A greenlet killed while waiting for a slot, one timed out mid-statement, and one
    killed while connecting to a server that never answers: afterwards every slot is free
    and no session is left on the server; the connect goes on in the background until the
    pool closes."""
    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP)
    with pool.exclusive("g"):
        waiter = spawn(lambda: pool.exclusive("g", timeout=30).__enter__())
        wait_until(lambda: group_stats(pool)["exclusive_waiting"] == 1, 10, "a waiter")
        _kill(waiter)
        assert group_stats(pool)["exclusive_waiting"] == 0
    assert group_stats(pool)["exclusive_open"] == 0

    def sleeps_in_block() -> None:
        with Timeout(0.3), pool.exclusive("g") as conn:
            conn.cursor().execute("SELECT pg_sleep(30)")

    task = spawn(sleeps_in_block)
    join_all([task], 10)
    assert isinstance(task.error, Timeout)
    assert group_stats(pool)["exclusive_open"] == 0
    assert server_conns(application_name=APP, expect=0) == 0

    hole = make_pool({"h": {"exclusive_limit": 1}},
                     db=blackhole.endpoint(connect_timeout=30))
    connecting = spawn(lambda: hole.exclusive("h").__enter__())
    wait_until(lambda: group_stats(hole, "h")["exclusive_open"] == 1, 10, "a connect")
    sleep(0.1)
    _kill(connecting)
    stats = group_stats(hole, "h")
    assert stats["exclusive_open"] == 0
    # the attempt goes on in the background (for the next caller) until the pool closes
    assert stats["exclusive_connecting"] == 1
    hole.close()
    wait_until(lambda: hole._endpoints[0].connecting == 0, 10, "the attempt to be given up")
    assert group_stats(hole, "h")["exclusive_connecting"] == 0


def _kill(task: Any) -> None:
    if MODE == "gevent":
        task._handle.kill(block=True, timeout=5)
    else:
        task._handle.kill()
        sleep(0.05)
    assert task.join(5)


def test_closing_the_pool_fails_waiters_and_refuses_new_blocks(make_pool):
    pool = make_pool({"g": {"exclusive_limit": 1}})
    with pool.exclusive("g"):
        waiter = spawn(lambda: pool.exclusive("g", timeout=30).__enter__())
        wait_until(lambda: group_stats(pool)["exclusive_waiting"] == 1, 10, "a waiter")
        pool.close()
        join_all([waiter], 10)
        assert isinstance(waiter.error, PoolClosed)
    with pytest.raises(PoolClosed):
        pool.exclusive("g")


def test_prometheus_shows_exclusive_connections(make_pool):
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from greenpool.prometheus import register

    registry = prometheus_client.CollectorRegistry()
    pool = make_pool({"g": {"exclusive_limit": 3}})
    register(pool, name="excl", registry=registry)

    def scrape() -> dict[str, float]:
        text = prometheus_client.generate_latest(registry).decode()
        return {s.name: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.labels.get("pool") == "excl"}

    with pool.exclusive("g"):
        samples = scrape()
        assert samples["greenpool_exclusive_connections"] == 1
        assert samples["greenpool_exclusive_connections_max"] == 3
        assert samples["greenpool_exclusive_connections_pending"] == 0
        assert samples["greenpool_exclusive_connections_created_total"] == 1
    samples = scrape()
    assert samples["greenpool_exclusive_connections"] == 0
    assert samples["greenpool_exclusive_connections_timeouts_total"] == 0
    assert samples["greenpool_listeners"] == 0


def test_short_exclusive_blocks_are_not_spent_on_an_endpoint_that_never_answers(
    make_pool, pg, blackhole
):
    """A group over a real server and a black hole (``connect_timeout`` 5), ten
    ``exclusive(timeout=0.5)`` blocks one after another: an attempt the caller's deadline
    cut on the black hole makes later connects try it last, so at most one block fails and
    every other one is connected to the real server."""
    pool = make_pool({"g": {"connection_count": 4}},
                     db=[pg.endpoint(), blackhole.endpoint(connect_timeout=5)])
    outcomes = []
    for _ in range(10):
        started = time.monotonic()
        try:
            with pool.exclusive("g", timeout=0.5) as conn:
                outcomes.append(scalar(conn, "SELECT inet_server_port()"))
        except PoolError as exc:
            outcomes.append(f"{type(exc).__name__} after {time.monotonic() - started:.2f} s")
    failed = [o for o in outcomes if o != pg.port]
    assert len(failed) <= 1 and all(isinstance(o, str) for o in failed), (
        outcomes, pool.stats()["endpoints"])


@pytest.mark.skipif(MODE != "threaded", reason="a signal lands in a thread's start")
def test_an_interrupt_while_its_connect_task_starts_leaves_no_waiter_and_no_session(
    make_pool, server_conns, pg
):
    """A KeyboardInterrupt from a signal handler lands in the main thread while it starts
    the dedicated connect thread (``Thread.start`` waits for it to run). Mocked: the
    interrupt is raised right after the thread started, where the signal would land. The
    caller gets it; it leaves the line, so the connection the task opens is closed as
    unclaimed: no slot, waiter, task or session is left."""
    pool = make_pool({"g": {"exclusive_limit": 2}}, application_name=APP)
    backend = pool._backend
    real_spawn = backend.spawn

    def interrupted_spawn(func: Any) -> Any:
        real_spawn(func)
        raise KeyboardInterrupt

    backend.spawn = interrupted_spawn
    try:
        with pytest.raises(KeyboardInterrupt), pool.exclusive("g", timeout=5):
            pass
    finally:
        del backend.spawn
    slots = pool._exclusive["g"]
    assert slots.connects.waiting == 0
    wait_until(lambda: group_stats(pool)["exclusive_connecting"] == 0, 10, "the task to end")
    assert group_stats(pool)["exclusive_open"] == 0
    assert server_conns(application_name=APP, expect=0) == 0
    with pool.exclusive("g", timeout=5) as conn:
        assert scalar(conn, "SELECT 1") == 1


@pytest.mark.skipif(MODE != "gevent", reason="only greenlets live on in a forked child")
def test_a_block_waiting_for_its_connection_at_a_fork_gives_back_no_slot_in_the_child(
    make_pool, blackhole
):
    """A greenlet waits for its dedicated connection (a server that never answers) when
    the process forks: in the child it fails, and gives back no slot, since the child never
    counted one for it (the count went to -1: one block more than exclusive_limit)."""
    import json
    import os

    import gevent

    pool = make_pool({"g": {"exclusive_limit": 1}},
                     db=blackhole.endpoint(connect_timeout=10))
    errors: list[str] = []

    def block() -> None:
        try:
            with pool.exclusive("g", timeout=8):
                pass
        except PoolError as exc:
            errors.append(type(exc).__name__)

    task = gevent.spawn(block)
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 1, 5, "the block's slot")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report what it sees, then leave without cleanup
        code = 1
        try:
            os.close(read_end)
            task.join(5)
            os.write(write_end, json.dumps([errors, group_stats(pool)["exclusive_open"]])
                     .encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    reported = json.loads(os.read(read_end, 4096).decode())
    os.close(read_end)
    task.kill()
    assert status == 0
    assert reported == [["PoolError"], 0]
