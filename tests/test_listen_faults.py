"""Listeners under real faults and races: a postmaster stopped with SIGSTOP (a connect that
hangs), ``pg_ctl stop -m immediate`` and a restart or a promotion, terminated sessions,
closes from another task at any moment, a pool closed under a listener. What is left on
the server is read from ``pg_stat_activity``.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Any

import pytest
from endpoints import label
from gunicorn_example import request
from listening import group_stats, listening_sessions, sessions
from modes import join_all, sleep, spawn, wait_until

from greenpool import Gap, PoolClosed

pytestmark = pytest.mark.timeout(120)

APP = "greenpool-listen-faults"


def test_closing_the_pool_while_a_listener_connects_leaves_no_session(make_pool, pg_factory):
    """Pool.close() (a worker shutting down) lands while listen() is still connecting (the
    postmaster is stopped with SIGSTOP, so the connect hangs): the listen() must not hand
    back, or leave behind, a connection that listens on the server for ever."""
    server = pg_factory()
    pool = make_pool({"g": {}}, db=server.endpoint(connect_timeout=10), application_name=APP)
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        opener = spawn(lambda: pool.listen("g", "jobs", timeout=10))
        wait_until(lambda: group_stats(pool)["exclusive_open"] == 1, 5, "the connect to start")
        sleep(0.2)
        pool.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    join_all([opener], 15)
    assert isinstance(opener.error, PoolClosed) or (
        opener.error is None and opener.result.closed), (opener.error, opener.result)
    wait_until(lambda: sessions(server, APP) == 0, 10, "no session of the listener left")
    assert group_stats(pool)["exclusive_open"] == 0 and group_stats(pool)["listeners"] == 0


def test_a_listener_dropped_without_close_gives_its_slot_back(make_pool, pg):
    """``for n in pool.listen(...): break`` and forgetting the listener: once it is garbage
    collected its session ends and its exclusive_limit slot is free again."""
    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP)
    listener = pool.listen("g", "jobs")
    assert listener.get(0) is None
    del listener
    gc.collect()
    wait_until(lambda: listening_sessions(pg, APP) == 0, 5, "the session to end")
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 5, "the slot to come back")
    assert group_stats(pool)["listeners"] == 0
    with pool.listen("g", "jobs", timeout=1):
        pass


def test_many_listeners_resume_after_a_restart_of_the_same_server(make_pool, pg_factory):
    """60 listeners; the server is killed (-m immediate) and restarted, not promoted: all
    resume, each reports one Gap before the notification sent after the restart."""
    server = pg_factory()
    n = 60
    pool = make_pool({"g": {"exclusive_limit": n}},
                     db=server.endpoint(connect_timeout=2), application_name=APP,
                     quarantine_max=1)
    listeners = [pool.listen("g", "jobs", heartbeat=1) for _ in range(n)]
    got: list[list[Any]] = [[] for _ in range(n)]

    def read(i: int) -> None:
        for item in listeners[i]:
            got[i].append(item)

    readers = [spawn(read, i) for i in range(n)]
    try:
        server.stop("immediate")
        sleep(0.5)
        server.start()
        restarted = time.monotonic()
        wait_until(lambda: all(any(isinstance(x, Gap) for x in g) for g in got), 30,
                   "every listener to resume")
        took = time.monotonic() - restarted
        server.execute("NOTIFY jobs, 'after'")
        wait_until(lambda: all(g and getattr(g[-1], "payload", None) == "after" for g in got),
                   10, "the notification after the restart")
    finally:
        for listener in listeners:
            listener.close()
        join_all(readers, 20)
    for g in got:
        assert [type(x).__name__ for x in g] == ["Gap", "Notify"], g
    assert took < 15, took
    assert group_stats(pool)["timeouts"] == 0  # reconnect rounds are no caller's timeout
    assert group_stats(pool)["listen_gaps"] == n
    wait_until(lambda: listening_sessions(server, APP) == 0, 10, "every session to end")


def test_the_largest_payload_arrives_whole_and_a_too_large_one_is_the_senders_error(
    make_pool, pg
):
    pool = make_pool({"g": {}}, application_name=APP)
    with pool.listen("g", "big") as listener:
        payload = "é" * 3999 + "x"  # 7999 bytes: PostgreSQL's most
        pg.execute("SELECT pg_notify('big', %s)", (payload,))
        got = listener.get(5)
        assert got is not None and got.payload == payload
        with pytest.raises(Exception, match="payload string too long"):
            pg.execute("SELECT pg_notify('big', %s)", ("y" * 8000,))
        pg.execute("NOTIFY big, 'small'")
        assert listener.get(5).payload == "small"


def test_the_gap_comes_before_anything_sent_after_the_reconnect(make_pool, pg_factory):
    """Notifications are sent all through the outage and after it: the reader sees the
    ones before, one Gap, then only ones sent after the loss, in order."""
    server = pg_factory()
    pool = make_pool({"g": {}}, db=server.endpoint(connect_timeout=2), application_name=APP,
                     quarantine_max=0.5)
    with pool.listen("g", "seq", heartbeat=0.5) as listener:
        server.execute("NOTIFY seq, '0'")
        assert listener.get(5).payload == "0"
        server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = %s AND query LIKE 'LISTEN %%'", (APP,))
        sent = 0
        items: list[Any] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                len([i for i in items if not isinstance(i, Gap)]) < 5):
            sent += 1
            server.execute(f"NOTIFY seq, '{sent}'")
            item = listener.get(0.05)
            if item is not None:
                items.append(item)
        assert isinstance(items[0], Gap), items
        assert sum(isinstance(i, Gap) for i in items) == 1
        numbers = [int(i.payload) for i in items[1:]]
        assert numbers == sorted(numbers) and len(numbers) >= 5


def test_close_racing_reconnects_never_leaks(make_pool, pg_factory, blackhole):
    """The listener's server is gone and its other endpoint a black hole: reconnects are
    in flight when close() comes, from another task, at many points in time."""
    server = pg_factory()
    pool = make_pool({"g": {"exclusive_limit": 1}},
                     db=[server.endpoint(connect_timeout=0.5),
                         blackhole.endpoint(connect_timeout=0.5)],
                     application_name=APP, quarantine_initial=0.1, quarantine_max=0.3)
    raced = 0
    for delay in (0.0, 0.05, 0.2, 0.45, 0.7) * 2:
        listener = pool.listen("g", "jobs", timeout=10)
        if listener.endpoint != label(server):
            listener.close()
            continue
        raced += 1
        reader = spawn(lambda lst=listener: list(lst))
        server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = %s AND query LIKE 'LISTEN %%'", (APP,))
        sleep(delay)
        listener.close()
        join_all([reader], 10)
        assert reader.error is None, reader.error
        assert listener.closed
        stats = group_stats(pool)
        assert stats["exclusive_open"] == 0 and stats["listeners"] == 0, stats
        wait_until(lambda: listening_sessions(server, APP) == 0, 10, "no listening session")
    assert raced >= 3, raced


def test_a_notification_read_with_the_loss_is_delivered_before_the_gap(make_pool, pg_factory):
    """A notification and the end of the session are in the socket together (nobody read
    in between): the notification was received, so it comes first, then the Gap."""
    server = pg_factory()
    pool = make_pool({"g": {}}, db=server.endpoint(connect_timeout=2), application_name=APP)
    with pool.listen("g", "seq") as listener:
        pid = int(server.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                                 "AND query LIKE 'LISTEN %%'", (APP,))[0][0])
        server.execute("NOTIFY seq, 'last words'")
        server.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        first, second = listener.get(5), listener.get(5)
        assert getattr(first, "payload", None) == "last words", (first, second)
        assert isinstance(second, Gap), second


def test_fifty_listeners_follow_a_promotion_each_with_one_gap(make_pool, pg_factory):
    """50 listeners on a primary that is killed while its standby is promoted: every one
    resumes on the new primary with exactly one Gap, then gets what is sent there, and
    reconnect rounds during the outage are not reported as the group's timeouts."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    n = 50
    pool = make_pool({"write": {"role": "primary", "exclusive_limit": n}},
                     db=[primary.endpoint(connect_timeout=1), standby.endpoint(connect_timeout=1)],
                     application_name=APP, role_check_interval=0.3, quarantine_max=1)
    listeners = [pool.listen("write", "jobs", heartbeat=1) for _ in range(n)]
    got: list[list[Any]] = [[] for _ in range(n)]

    def read(i: int) -> None:
        for item in listeners[i]:
            got[i].append(item)

    readers = [spawn(read, i) for i in range(n)]
    try:
        primary.stop("immediate")
        standby.promote()
        wait_until(lambda: all(any(isinstance(x, Gap) for x in g) for g in got), 30,
                   "every listener to resume")
        standby.execute("NOTIFY jobs, 'after'")
        wait_until(lambda: all(g and getattr(g[-1], "payload", None) == "after" for g in got),
                   10, "the notification on the new primary")
    finally:
        for listener in listeners:
            listener.close()
        join_all(readers, 20)
    for g in got:
        assert [type(x).__name__ for x in g] == ["Gap", "Notify"], g
        assert (g[0].previous, g[0].endpoint) == (label(primary), label(standby)), g[0]
    stats = group_stats(pool, "write")
    assert stats["listen_gaps"] == n and stats["timeouts"] == 0, stats
    wait_until(lambda: listening_sessions(standby, APP) == 0, 10, "every session to end")


def test_the_example_stream_closed_before_its_first_chunk_closes_its_listener(
    example_app,
):
    """A WSGI server may close the response before iterating it (the client left while the
    headers were sent): PEP 3333's close() must end the listener then too, not leave it to
    the garbage collector (a generator closed unstarted never runs its finally)."""
    import greenpool

    status, stream = request(example_app, "GET", "/events")
    assert status == "200 OK"
    assert greenpool.stats()["groups"]["write"]["listeners"] == 1
    listener = stream.listener  # held: the garbage collector cannot help
    stream.close()
    assert listener.closed
    assert greenpool.stats()["groups"]["write"]["listeners"] == 0
    assert greenpool.stats()["groups"]["write"]["exclusive_open"] == 0


def test_close_from_another_task_at_random_moments_of_a_read(make_pool, pg):
    """close() from another task (a thread in threaded mode) while the reader is anywhere
    in get(): entering, waiting, returning a notification, leaving. The reader ends without
    an error, and nothing is left: slot, listener count, session."""
    import random

    rng = random.Random(7)
    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP)
    for _ in range(30):
        listener = pool.listen("g", "race", timeout=5)
        pg.execute("NOTIFY race, 'a'; NOTIFY race, 'b'")

        def read(lst: Any = listener) -> int:
            count = 0
            while lst.get(0.001 * rng.randint(0, 3)) is not None or not lst.closed:
                count += 1
            return count

        reader = spawn(read)
        sleep(rng.uniform(0, 0.01))
        listener.close()
        join_all([reader], 10)
        assert reader.error is None, reader.error
        assert listener.closed and listener.get(0) is None
        stats = group_stats(pool)
        assert (stats["exclusive_open"], stats["listeners"]) == (0, 0), stats
    wait_until(lambda: listening_sessions(pg, APP) == 0, 10, "no listening session")


def test_pool_close_while_the_heartbeat_waits_on_a_stopped_backend(make_pool, pg):
    """The listener's backend is stopped (SIGSTOP) and its heartbeat is waiting for the
    answer when the pool is closed: the reader ends within the heartbeat's bound
    (connect_timeout), and once the backend runs again no session is left."""
    pool = make_pool({"g": {}}, db=pg.endpoint(connect_timeout=1), application_name=APP)
    listener = pool.listen("g", "jobs", heartbeat=0.2)
    pid = int(pg.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                         "AND query LIKE 'LISTEN %%'", (APP,))[0][0])
    reader = spawn(lambda: list(listener))
    os.kill(pid, signal.SIGSTOP)
    try:
        sleep(0.4)  # the heartbeat is sent and waits
        started = time.monotonic()
        pool.close()
        join_all([reader], 5)
        assert time.monotonic() - started < 3
    finally:
        os.kill(pid, signal.SIGCONT)
    assert reader.error is None, reader.error
    assert listener.closed
    wait_until(lambda: pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                  (pid,))[0][0] == 0, 10, "the stopped session to end")



@pytest.mark.timeout(30)
def test_each_listener_whose_time_runs_out_on_a_down_server_is_told_why_and_counted(make_pool):
    """Two ``listen()`` callers, the second joining while the connect begun for the first is
    under way, wait for that connect, to a server that refuses connections: each is told
    the endpoint is why (``NoHealthyEndpoint``, not a plain timeout) after its own timeout,
    and counts once in the group's ``exclusive_timeouts`` (its borrowers' ``timeouts`` stay
    untouched): the shared connect counts no one, each caller its own time running out."""
    from greenpool import NoHealthyEndpoint
    from greenpool.testing.postgres import free_port

    pool = make_pool({"g": {"exclusive_limit": 4}},
                     db={"host": "127.0.0.1", "port": free_port(), "name": "down", "user": "down",
                         "pass": "down", "connect_timeout": 2})
    errors: list[BaseException] = []

    def subscribe() -> None:
        try:
            with pool.listen("g", "ch", timeout=0.6):
                pass
        except Exception as exc:  # recorded for the assertions
            errors.append(exc)

    first = spawn(subscribe)
    sleep(0.1)  # the second joins while the connect begun for the first is under way
    join_all([first, spawn(subscribe)], 10)
    assert [type(e) for e in errors] == [NoHealthyEndpoint] * 2, errors
    stats = pool.stats()["groups"]["g"]
    assert (stats["exclusive_timeouts"], stats["timeouts"]) == (2, 0), stats


@pytest.mark.parametrize("fault", ["terminated", "stalled"])
def test_losing_the_listening_session_evicts_no_pooled_connection(make_pool, pg, fault):
    """The listener's own session ends while its server stays healthy: terminated
    (``pg_terminate_backend``) or stalled (SIGSTOP, its heartbeat gives up). That says
    nothing about the server: the hub reconnects and reports a Gap, and every idle pooled
    connection of every group on that server survives, none evicted or quarantined."""
    app = f"{APP}-evicts"
    groups = {"write": {"connection_count": 3, "min_size": 3, "exclusive_limit": 1},
              "read": {"connection_count": 3, "min_size": 3, "exclusive_limit": 0}}
    pool = make_pool(groups, db=pg.endpoint(connect_timeout=1), application_name=app)
    wait_until(lambda: all(g["idle"] == 3 for g in pool.stats()["groups"].values()), 15,
               "both groups to fill")
    pooled = {int(pc.raw.get_backend_pid()) for name in groups
              for pc in pool.group(name).connector.opened}
    with pool.listen("write", "jobs", heartbeat=0.3, timeout=10) as listener:
        pid = int(listener._hub.pc.raw.get_backend_pid())
        if fault == "terminated":
            pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        else:
            os.kill(pid, signal.SIGSTOP)
        try:
            gap = listener.get(10)
        finally:
            if fault == "stalled":
                os.kill(pid, signal.SIGCONT)
        assert isinstance(gap, Gap), gap
        pg.execute("NOTIFY jobs, 'after'")
        assert listener.get(5).payload == "after"
    for name in groups:
        by_reason = group_stats(pool, name)["discards_by_reason"]
        assert by_reason.get("evicted", 0) == 0, (name, by_reason)
    alive = {int(row[0]) for row in pg.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,))}
    assert pooled <= alive, pooled - alive
    endpoint = pool.stats()["endpoints"][label(pg)]
    assert (endpoint["state"], endpoint["quarantines"]) == ("up", 0), endpoint
