"""LISTEN/NOTIFY: ``pool.listen(group, channels)`` delivers notifications without
blocking the hub, survives a lost server and a promotion (reporting the gap), and leaves
nothing on the server when it is closed or its task is killed.

Real servers and real faults: ``pg_ctl stop -m immediate`` and ``pg_ctl promote`` on a
streaming pair, ``pg_terminate_backend``, a backend stopped with SIGSTOP, killed greenlets,
``gevent.Timeout``. What is left on the server is read from ``pg_stat_activity`` of another
session (``pg_listening_channels()`` only ever shows the asking session's own channels).
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from endpoints import label
from faults import Ticker
from forking import run_in_forked_child
from gunicorn_example import EXAMPLE, request
from modes import GREEN, MODE, Timeout, join_all, sleep, spawn, wait_until

import greenpool
from greenpool import Gap, PoolTimeout

pytestmark = pytest.mark.timeout(120)

APP = "greenpool-listen-test"


def listening_sessions(cluster: Any, app: str = APP) -> int:
    """Sessions of ``app`` on ``cluster`` whose last statement was our LISTEN."""
    return int(cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND query LIKE 'LISTEN %%'", (app,))[0][0])


def listener_pid(cluster: Any) -> int:
    rows = cluster.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                           "AND query LIKE 'LISTEN %%'", (APP,))
    assert len(rows) == 1, rows
    return int(rows[0][0])


def group_stats(pool: Any, name: str = "g") -> dict[str, Any]:
    return pool.stats()["groups"][name]  # type: ignore[no-any-return]


def no_session_left(cluster: Any) -> None:
    wait_until(lambda: listening_sessions(cluster) == 0, 10, "the listener's session to end")


@pytest.fixture(autouse=True)
def no_listening_session_of_an_earlier_test(pg: Any) -> None:
    """Each test starts once no session of an earlier one is listed on the shared server
    (a closed listener's backend exits on its own time, later under load): counting the
    listening sessions then counts the test's own."""
    no_session_left(pg)


def test_notifications_arrive_in_order_on_every_channel_and_get_times_out(make_pool, pg):
    pool = make_pool({"g": {"exclusive_limit": 2}}, application_name=APP)
    with pool.listen("g", ["jobs", "Odd Name"]) as listener:
        assert listener.endpoint == label(pg)
        assert group_stats(pool)["listeners"] == 1
        assert group_stats(pool)["exclusive_open"] == 1
        assert listening_sessions(pg) == 1
        started = time.monotonic()
        assert listener.get(0.2) is None and not listener.closed
        assert time.monotonic() - started >= 0.19
        pg.execute("SELECT pg_notify('jobs', 'one'); SELECT pg_notify('Odd Name', 'two');"
                   "NOTIFY other, 'not ours'; SELECT pg_notify('jobs', 'three')")
        got = [listener.get(5) for _ in range(3)]
        assert [(n.channel, n.payload) for n in got] == [
            ("jobs", "one"), ("Odd Name", "two"), ("jobs", "three")]
        assert listener.get(0.1) is None
    assert listener.closed and listener.get(0) is None
    stats = group_stats(pool)
    assert stats["listeners"] == 0 and stats["exclusive_open"] == 0
    assert stats["listen_gaps"] == 0
    no_session_left(pg)


def test_a_terminated_session_is_replaced_and_the_gap_reported(make_pool, pg):
    pool = make_pool({"g": {}}, application_name=APP)
    with pool.listen("g", "jobs") as listener:
        pg.execute("SELECT pg_terminate_backend(%s)", (listener_pid(pg),))
        gap = listener.get(10)
        assert isinstance(gap, Gap), gap
        assert gap.previous == gap.endpoint == label(pg)
        assert gap.lost_at <= gap.resumed_at
        assert "terminat" in gap.reason or "lost" in gap.reason
        pg.execute("NOTIFY jobs, 'after'")
        assert listener.get(5).payload == "after"
        assert group_stats(pool)["listen_gaps"] == 1
        assert group_stats(pool)["exclusive_open"] == 1  # one slot through the reconnect


def test_bad_arguments_are_refused_at_once(make_pool):
    pool = make_pool({"g": {}})
    for bad in ([], [""], ["x" * 64], [None], ["a\0b"]):
        with pytest.raises(ValueError, match="listen"):
            pool.listen("g", bad)
    for heartbeat in (0, -1, float("nan"), "5"):
        with pytest.raises(ValueError, match="heartbeat"):
            pool.listen("g", "jobs", heartbeat=heartbeat)
    assert group_stats(pool)["exclusive_open"] == 0


def test_the_listeners_of_a_group_share_one_exclusive_limit_slot(make_pool, pg):
    """All listeners of a group share one connection: with ``exclusive_limit`` 1 a second
    listener joins it, while an ``exclusive()`` block finds the slot taken; the slot comes
    back when the last listener goes."""
    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP)
    with pool.listen("g", "jobs") as first, pool.listen("g", ["jobs", "other"]) as second:
        assert group_stats(pool)["exclusive_open"] == 1
        assert group_stats(pool)["listen_connections"] == 1
        assert group_stats(pool)["listeners"] == 2
        with pytest.raises(PoolTimeout, match="exclusive_limit"), pool.exclusive("g", timeout=0):
            pass
        assert listening_sessions(pg) == 1
        pg.execute("NOTIFY other, 'o'; NOTIFY jobs, 'j'")
        assert first.get(5).payload == "j"
        assert [second.get(5).payload for _ in range(2)] == ["o", "j"]
    assert group_stats(pool)["listeners"] == 0 and group_stats(pool)["exclusive_open"] == 0
    no_session_left(pg)
    with pool.exclusive("g", timeout=2):
        pass


def test_a_hundred_listeners_get_every_notification_without_blocking_the_hub(
    make_pool, pg_factory
):
    """100 tasks each iterate their own listener while 20 notifications are sent; every
    task gets all 20 in order, and a ticking task is never held up (green modes: the
    waits are the hub's; threaded: the threads' own)."""
    server = pg_factory(settings={"max_connections": 150})
    pool = make_pool({"g": {"exclusive_limit": 100, "timeout": 60}}, db=server.endpoint(),
                     application_name=APP)
    listeners = [pool.listen("g", "fanout") for _ in range(100)]
    assert group_stats(pool)["listeners"] == 100
    received: list[list[str]] = [[] for _ in listeners]

    def read(i: int) -> None:
        for item in listeners[i]:
            assert not isinstance(item, Gap)
            received[i].append(item.payload)
            if len(received[i]) == 20:
                return

    ticker = Ticker()
    tasks = [spawn(read, i) for i in range(100)]
    sleep(0.1)
    server.execute("SELECT pg_notify('fanout', i::text) FROM generate_series(1, 10) i")
    server.execute("SELECT pg_notify('fanout', i::text) FROM generate_series(11, 20) i")
    join_all(tasks, 30)
    gap = ticker.stop()
    assert [task.error for task in tasks] == [None] * 100
    assert all(r == [str(i) for i in range(1, 21)] for r in received)
    if GREEN:
        assert gap < 0.25, f"the hub was blocked for {gap:.3f} s"
    for listener in listeners:
        listener.close()
    assert group_stats(pool)["listeners"] == 0 and group_stats(pool)["exclusive_open"] == 0
    wait_until(lambda: listening_sessions(server) == 0, 15, "every listener session to end")


def test_the_listener_follows_a_promotion_and_reports_the_gap(make_pool, pg_factory):
    """Mid-stream, the primary is killed (``-m immediate``) and its standby promoted: the
    reader gets a Gap naming the lost and the new endpoint within a few seconds, then the
    notifications sent on the new primary."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool(
        {"write": {"role": "primary", "connection_count": 2}},
        db=[primary.endpoint(connect_timeout=2), standby.endpoint(connect_timeout=2)],
        application_name=APP, role_check_interval=0.3, quarantine_max=1,
    )
    listener = pool.listen("write", "jobs", heartbeat=1)
    assert listener.endpoint == label(primary)
    items: list[tuple[float, Any]] = []

    def read() -> None:
        for item in listener:
            items.append((time.monotonic(), item))

    reader = spawn(read)
    try:
        primary.execute("NOTIFY jobs, 'before'")
        wait_until(lambda: len(items) == 1, 10, "the first notification")
        primary.stop("immediate")
        killed_at = time.monotonic()
        standby.promote()
        wait_until(lambda: any(isinstance(i, Gap) for _, i in items), 15, "the gap")
        at, gap = next((t, i) for t, i in items if isinstance(i, Gap))
        assert at - killed_at < 10, f"resumed {at - killed_at:.1f} s after the crash"
        assert gap.previous == label(primary) and gap.endpoint == label(standby)
        assert listener.endpoint == label(standby)
        standby.execute("NOTIFY jobs, 'after'")
        wait_until(lambda: len(items) == 3, 10, "the notification on the new primary")
    finally:
        listener.close()
        join_all([reader], 10)
    assert reader.error is None
    assert [getattr(i, "payload", None) for _, i in items] == ["before", None, "after"]
    assert group_stats(pool, "write")["listen_gaps"] == 1
    no_session_left(standby)


def test_the_listener_moves_when_the_primary_moves_while_the_old_one_runs(
    make_pool, pg_factory
):
    """Split brain: the standby is promoted while the old primary keeps running, so the
    listener's connection is never lost. Its heartbeat asks placement, which now chooses
    the promoted server (higher timeline): the listener moves there and reports the gap."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool({"write": {"role": "primary"}},
                     db=[primary.endpoint(), standby.endpoint()], application_name=APP,
                     role_check_interval=0.1, maintenance_interval=0.05)
    with pool.listen("write", "jobs", heartbeat=0.2) as listener:
        assert listener.endpoint == label(primary)
        standby.promote()
        promoted_at = time.monotonic()
        gap = listener.get(15)
        assert isinstance(gap, Gap), gap
        assert time.monotonic() - promoted_at < 10
        assert gap.previous == label(primary) and gap.endpoint == label(standby)
        assert "no longer belongs" in gap.reason
        standby.execute("NOTIFY jobs, 'on the new primary'")
        assert listener.get(5).payload == "on the new primary"
    assert listening_sessions(primary) == 0
    no_session_left(standby)


def test_a_stalled_server_is_noticed_by_the_heartbeat_within_its_deadline(make_pool, pg):
    """The listener's backend is stopped with SIGSTOP (TCP stays up, nothing answers): the
    heartbeat's bounded SELECT 1 gives up, the listener reconnects and reports a gap."""
    pool = make_pool({"g": {}}, db=pg.endpoint(connect_timeout=1), application_name=APP)
    with pool.listen("g", "jobs", heartbeat=0.3) as listener:
        pid = listener_pid(pg)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            gap = listener.get(10)
            assert isinstance(gap, Gap), gap
            assert time.monotonic() - started < 5
            assert "heartbeat" in gap.reason
        finally:
            os.kill(pid, signal.SIGCONT)
        pg.execute("NOTIFY jobs, 'still here'")
        assert listener.get(5).payload == "still here"
    no_session_left(pg)


def test_close_from_another_task_wakes_the_reader_and_leaves_nothing(make_pool, pg):
    pool = make_pool({"g": {}}, application_name=APP)
    listener = pool.listen("g", "jobs")
    reader = spawn(lambda: list(listener))
    wait_until(lambda: listener._busy, 5, "the reader to wait")
    listener.close()
    join_all([reader], 5)
    assert reader.error is None and reader.result == []
    assert group_stats(pool)["listeners"] == 0 and group_stats(pool)["exclusive_open"] == 0
    no_session_left(pg)


def test_closing_the_pool_stops_its_listeners(make_pool, pg):
    pool = make_pool({"g": {}}, application_name=APP)
    listener = pool.listen("g", "jobs")
    reader = spawn(lambda: list(listener))
    wait_until(lambda: listener._busy, 5, "the reader to wait")
    pool.close()
    join_all([reader], 5)
    assert reader.error is None and listener.closed
    no_session_left(pg)


@pytest.mark.skipif(not GREEN, reason="killing a task needs greenlets")
def test_a_listener_killed_or_timed_out_mid_wait_leaves_nothing_behind(make_pool, pg):
    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP)
    listener = pool.listen("g", "jobs")
    reader = spawn(lambda: list(listener))
    wait_until(lambda: listener._busy, 5, "the reader to wait")
    if MODE == "gevent":
        reader._handle.kill(block=True, timeout=5)
    else:
        reader._handle.kill()
    assert reader.join(5)
    assert listener.closed
    assert group_stats(pool)["listeners"] == 0
    # the kill did not wait for the reader: it gives the slot back by itself, at once
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 2, "the slot back")
    no_session_left(pg)

    listener = pool.listen("g", "jobs", timeout=2)  # the slot came back
    with pytest.raises(Timeout), Timeout(0.2):
        listener.get()
    assert listener.closed
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 2, "the slot back")
    no_session_left(pg)


def test_a_listener_dropped_by_a_dead_reconnect_loop_can_still_be_closed(make_pool, pg_factory):
    """The server is gone for good: get(timeout) returns None while reconnecting (no
    hang), and close() still gives everything back."""
    server = pg_factory()
    pool = make_pool({"g": {}}, db=server.endpoint(connect_timeout=1), application_name=APP,
                     quarantine_max=0.5)
    listener = pool.listen("g", "jobs")
    server.stop("immediate")
    started = time.monotonic()
    assert listener.get(1.0) is None
    assert time.monotonic() - started < 4
    assert listener.endpoint is None and not listener.closed
    listener.close()
    assert group_stats(pool)["exclusive_open"] == 0 and group_stats(pool)["listeners"] == 0


def test_a_refused_reconnect_keeps_trying_and_never_shows_the_password(
    make_pool, pg_factory, caplog
):
    """The listener's session is terminated and its password changed meanwhile: reconnects
    are refused (a failure retrying cannot fix, for now), get(timeout) still returns on
    time, no log line, Gap or repr carries either password, and once the password is back
    the listener resumes and reports the gap."""
    import logging

    caplog.set_level(logging.DEBUG, logger="greenpool")
    server = pg_factory()
    secret, changed = "Listen-S3cret-pw", "Changed-S3cret-pw"
    server.create_user("listener", secret)
    pool = make_pool({"g": {}}, db=server.endpoint(user="listener", **{"pass": secret}),
                     application_name=APP, quarantine_max=0.5)
    listener = pool.listen("g", "jobs")
    server.execute(f"ALTER ROLE listener PASSWORD '{changed}'")
    server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE usename = 'listener'")
    for _ in range(3):
        started = time.monotonic()
        assert listener.get(0.5) is None
        assert time.monotonic() - started < 3
    assert listener.endpoint is None and not listener.closed
    server.execute(f"ALTER ROLE listener PASSWORD '{secret}'")
    gap = listener.get(15)
    assert isinstance(gap, Gap), gap
    shown = [repr(listener), repr(gap), *(r.getMessage() for r in caplog.records)]
    assert any("password authentication failed" in text for text in shown)
    for text in shown:
        assert secret not in text and changed not in text
    listener.close()


# --- the fan-out: one connection per group, bounded queues, gaps --------------------------


def hub_pid(cluster: Any) -> int:
    """The backend of the group's shared listening connection (the one session of APP).
    Waits (bounded) for the sessions an earlier test left to end: the server is shared, and
    a backend whose client went away (one resumed after SIGSTOP, say) exits on its own
    time; a second session of this test's own stays and fails the test."""
    rows: list[Any] = []

    def one_session() -> bool:
        rows[:] = cluster.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (APP,))
        return len(rows) == 1

    try:
        wait_until(one_session, 10, "one session of the listening connection")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {rows}") from None
    return int(rows[0][0])


def test_subscribers_woken_together_each_get_everything_in_order_whatever_the_others_do(
    make_pool, pg
):
    """One notification wakes every subscriber at once: one that closes another from its
    loop, one that blocks again mid fan-out and (green modes) one killed while waiting hold
    nobody up, and every other subscriber still gets every notification, in order."""
    pool = make_pool({"g": {}}, application_name=APP)
    n, sent = 12, 30
    subs = [pool.listen("g", "ch") for _ in range(n)]
    got: list[list[int]] = [[] for _ in range(n)]

    def read(i: int) -> None:
        for item in subs[i]:
            assert not isinstance(item, Gap)
            got[i].append(int(item.payload))
            if i == 0 and len(got[0]) == 10:
                subs[1].close()  # another subscriber, from inside this one's wake-up
            if i % 3 == 0:
                sleep(0.001)  # blocks again while the others are being woken

    tasks = [spawn(lambda i=i: read(i)) for i in range(n)]
    try:
        wait_until(lambda: all(sub._busy for sub in subs), 5, "every subscriber waiting")
        if GREEN:
            tasks[2]._handle.kill()  # killed while waiting: its listener closes
        else:
            subs[2].close()
        wait_until(lambda: subs[2].closed, 5, "the killed subscriber's listener to close")
        pg.execute("; ".join(f"SELECT pg_notify('ch', '{k}')" for k in range(sent)))
        others = [i for i in range(n) if i not in (1, 2)]
        wait_until(lambda: all(len(got[i]) == sent for i in others), 10, "every notification")
        assert all(got[i] == list(range(sent)) for i in others)
        assert got[1] == list(range(len(got[1]))) and got[2] == []
    finally:
        for sub in subs:
            sub.close()
        join_all(tasks, 5)
    no_session_left(pg)


def test_get_times_out_on_its_own_timeout_whatever_the_waits_before_it(make_pool, pg):
    """``get(timeout)`` returns None after its own timeout, never early and never held by an
    earlier wait's: the green modes time waits out lazily, one running timer per listener
    that a wait only re-aims (a longer wait after one cut short by a notification, a
    shorter one while that timer still runs, then the same again)."""
    pool = make_pool({"g": {}}, application_name=APP)

    def timed_get(listener: Any, timeout: float) -> float:
        started = time.monotonic()
        assert listener.get(timeout) is None
        took = time.monotonic() - started
        assert timeout - 0.005 <= took < timeout + 0.4, (timeout, took)
        return took

    def cut_short(listener: Any, timeout: float) -> None:
        """A wait of ``timeout`` that a notification ends after 0.1 s."""
        notifier = spawn(lambda: (sleep(0.1), pg.execute("NOTIFY t, 'x'")))
        assert listener.get(timeout).payload == "x"
        join_all([notifier], 5)

    with pool.listen("g", "t") as listener:
        timed_get(listener, 0.2)
        cut_short(listener, 0.3)  # its timer still runs...
        timed_get(listener, 0.5)  # ...and fires before this wait's deadline: re-aimed
        cut_short(listener, 2.0)
        timed_get(listener, 0.2)  # shorter than the running timer: not held by it
        timed_get(listener, 0.2)


@pytest.mark.skipif(MODE != "gevent", reason="an event loop per OS thread: gevent's hubs")
def test_a_get_in_another_threads_event_loop_gets_a_notification_at_once_and_times_out(
    make_pool, pg
):
    """A listener read in an OS thread with its own gevent hub (nothing else runs there):
    ``get(timeout)`` neither fails for want of anything keeping that loop up nor waits out
    its timeout for a notification (the reader's thread wakes it thread-safely), and the
    next ``get`` times out on time."""
    import gevent.monkey

    start_thread = gevent.monkey.get_original("_thread", "start_new_thread")
    pool = make_pool({"g": {}}, application_name=APP)
    listener = pool.listen("g", "t")
    results: list[tuple[Any, float]] = []

    def in_thread() -> None:
        for timeout in (5.0, 0.3):
            started = time.monotonic()
            try:
                results.append((listener.get(timeout), time.monotonic() - started))
            except BaseException as exc:
                results.append((exc, time.monotonic() - started))

    try:
        start_thread(in_thread, ())
        wait_until(lambda: listener._busy, 5, "the thread's get to wait")
        sent = time.monotonic()
        pg.execute("NOTIFY t, 'x'")
        wait_until(lambda: len(results) == 2, 10, "both gets to return")
        (item, _), (timed_out, took) = results
        assert getattr(item, "payload", item) == "x"
        assert time.monotonic() - sent < 4.5, "the notification waited for the timeout"
        assert timed_out is None and 0.29 <= took < 1.5, (timed_out, took)
    finally:
        listener.close()


def test_get_refuses_a_nan_timeout_at_once(make_pool, pg):
    """``get(nan)``: a clear error, not a wait that never ends (nor a timer re-aimed in a
    busy loop: NaN is never past)."""
    pool = make_pool({"g": {}}, application_name=APP)
    with pool.listen("g", "t") as listener:
        with pytest.raises(ValueError, match="timeout"):
            listener.get(float("nan"))
        assert not listener.closed and listener.get(0) is None


@pytest.mark.parametrize("timeout", [1e300, float("inf")])
def test_get_with_a_huge_timeout_waits_for_the_next_notification(make_pool, pg, timeout):
    """``get(1e300)`` or ``get(inf)`` is a wait without end in practice: it returns the
    next notification (no error from a clock or a timer that cannot hold the deadline, no
    closed listener)."""
    pool = make_pool({"g": {}}, application_name=APP)
    with pool.listen("g", "t") as listener:
        waiting = spawn(listener.get, timeout)
        wait_until(lambda: listener._busy, 5, "the get to wait")
        sleep(0.1)
        pg.execute("NOTIFY t, 'x'")
        join_all([waiting], 5)
        assert waiting.error is None and waiting.result.payload == "x"
        assert not listener.closed


def test_a_closed_listener_is_held_by_no_timer_of_an_earlier_wait(make_pool, pg):
    """A long ``get(timeout)`` cut short by a notification, then ``close()``: nothing is
    left referring to the listener's state (a lazily re-aimed timeout timer still running
    would keep it, and its hub, until the timeout's end: an hour here)."""
    pool = make_pool({"g": {}}, application_name=APP)
    listener = pool.listen("g", "t")
    notifier = spawn(lambda: (sleep(0.1), pg.execute("NOTIFY t, 'x'")))
    assert listener.get(3600).payload == "x"
    join_all([notifier], 5)
    sub = listener._sub
    listener.close()
    del listener
    gc.collect()
    assert gc.get_referrers(sub) == []


def test_a_gap_reaches_every_subscriber_after_a_reconnect(make_pool, pg):
    """Three subscribers on different channels share the connection; it is terminated:
    each gets one Gap, then what is sent after, on its own channels only."""
    pool = make_pool({"g": {}}, application_name=APP)
    subs = [pool.listen("g", "a"), pool.listen("g", ["a", "b"]), pool.listen("g", "c")]
    try:
        assert group_stats(pool)["listen_connections"] == 1
        pg.execute("SELECT pg_terminate_backend(%s)", (hub_pid(pg),))
        for sub in subs:
            gap = sub.get(10)
            assert isinstance(gap, Gap), gap
            assert gap.previous == gap.endpoint == label(pg)
        pg.execute("NOTIFY a, '1'; NOTIFY b, '2'; NOTIFY c, '3'")
        counts = (1, 2, 1)
        got = [[sub.get(5).payload for _ in range(n)] for sub, n in zip(subs, counts, strict=True)]
        assert got == [["1"], ["1", "2"], ["3"]]
        assert all(sub.get(0.1) is None for sub in subs)
        assert group_stats(pool)["listen_gaps"] == 3
    finally:
        for sub in subs:
            sub.close()
    no_session_left(pg)


def test_gap_lost_at_precedes_every_notification_lost(make_pool, pg):
    """The shared connection's backend is stopped (SIGSTOP); a NOTIFY committed meanwhile
    never reaches the client. The Gap's ``lost_at`` is no later than that commit, so
    re-reading "everything since lost_at" finds it."""
    pool = make_pool({"g": {}}, db=pg.endpoint(connect_timeout=1), application_name=APP)
    with pool.listen("g", "jobs", heartbeat=0.3) as listener:
        traffic_from = time.time()
        while time.time() < traffic_from + 1.5:  # busy: heartbeats go on all the same
            pg.execute("NOTIFY jobs, 'before'")
            assert listener.get(5).payload == "before"
            sleep(0.02)
        pid = hub_pid(pg)
        os.kill(pid, signal.SIGSTOP)
        try:
            sent_at = time.time()  # the commit comes after this
            pg.execute("NOTIFY jobs, 'lost'")
            gap = listener.get(10)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert isinstance(gap, Gap), gap
        assert "heartbeat" in gap.reason
        assert gap.lost_at <= sent_at, (gap.lost_at - sent_at)
        assert gap.lost_at > traffic_from + 0.9  # a heartbeat answered during the traffic
        pg.execute("NOTIFY jobs, 'after'")
        assert listener.get(5).payload == "after"


def test_a_listener_with_a_shorter_heartbeat_is_heard_at_once_by_a_running_hub(
    make_pool, pg
):
    """A hub running with a 30 s heartbeat; a listener asking for 0.3 s joins and the
    backend stops (SIGSTOP): it gets its Gap within its own heartbeat plus the round
    trip's bound, not after the hub's old 30 s."""
    pool = make_pool({"g": {}}, db=pg.endpoint(connect_timeout=1), application_name=APP)
    with pool.listen("g", "jobs", heartbeat=30) as _, pool.listen(
            "g", "jobs", heartbeat=0.3) as quick:
        pid = hub_pid(pg)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            gap = quick.get(10)
            waited = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert isinstance(gap, Gap) and "heartbeat" in gap.reason, gap
        assert waited < 4, waited


def test_a_notification_dropped_with_a_heartbeat_answer_is_after_the_gaps_lost_at(
    make_pool, pg
):
    """A subscriber at its ``max_backlog``; the shared backend is stopped (SIGSTOP) while a
    NOTIFY commits and the next heartbeat is sent, then resumed: the notification arrives
    with the heartbeat's answer and is dropped for the full subscriber. It was committed
    before that heartbeat was sent, so the Gap's ``lost_at`` must precede it (not be the
    heartbeat's send time)."""
    pool = make_pool({"g": {}}, db=pg.endpoint(connect_timeout=5), application_name=APP)
    with pool.listen("g", "feed", heartbeat=0.3, max_backlog=2) as slow:
        pg.execute("NOTIFY feed, 'fills'; NOTIFY feed, 'full'")
        wait_until(lambda: slow.backlog == 2, 5, "the slow subscriber's queue to fill")
        pid = hub_pid(pg)
        os.kill(pid, signal.SIGSTOP)
        try:
            committing_at = time.time()
            pg.execute("NOTIFY feed, 'dropped'")
            sleep(1.0)  # a heartbeat is sent (and waits for its answer) meanwhile
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: group_stats(pool)["listen_dropped"] == 1, 5,
                   "the notification to be dropped")
        assert [slow.get(5).payload for _ in range(2)] == ["fills", "full"]
        gap = slow.get(5)
        assert isinstance(gap, Gap) and "max_backlog" in gap.reason, gap
        assert gap.lost_at <= committing_at, gap.lost_at - committing_at


def test_gap_lost_at_is_safe_when_the_session_is_terminated_while_nobody_reads(make_pool, pg):
    """Subscribers busy elsewhere: a NOTIFY, then the session is terminated. Either the
    notification was received (it is queued before the Gap) or ``lost_at`` precedes it."""
    pool = make_pool({"g": {}}, application_name=APP)
    with pool.listen("g", "jobs", heartbeat=0.2) as listener:
        sleep(0.5)
        sent_at = time.time()
        pg.execute("NOTIFY jobs, 'maybe'")
        pg.execute("SELECT pg_terminate_backend(%s)", (hub_pid(pg),))
        sleep(0.5)  # nobody reads meanwhile
        items = []
        while not any(isinstance(i, Gap) for i in items):
            items.append(listener.get(10))
            assert items[-1] is not None
        gap = items[-1]
        if "maybe" not in [getattr(i, "payload", None) for i in items]:
            assert gap.lost_at <= sent_at


def test_a_listen_joining_a_channel_being_unlistened_waits_for_its_listen_again(
    make_pool, pg
):
    """The last holder of ``x`` closes, and the hub's ``UNLISTEN x`` is held up (SIGSTOP);
    a new listener of ``x`` meanwhile must not return before ``x`` is listened on again
    (else a notification committed between the UNLISTEN and the next LISTEN is lost)."""
    pool = make_pool({"g": {}}, db=pg.endpoint(connect_timeout=5), application_name=APP)
    with pool.listen("g", "y") as keeper:
        first = pool.listen("g", "x")
        pid = hub_pid(pg)
        os.kill(pid, signal.SIGSTOP)
        try:
            first.close()
            sleep(0.3)  # the reader sends UNLISTEN x and waits for the stopped backend

            task = spawn(lambda: pool.listen("g", "x", timeout=10))
            returned_early = task.join(0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        join_all([task], 10)
        assert task.error is None, task.error
        with task.result as second:
            assert not returned_early, "listen() returned while its channel was unlistened"
            pg.execute("NOTIFY x, 'after listen returned'")
            note = second.get(5)
            assert note is not None and note.payload == "after listen returned", note
        assert keeper.get(0) is None


def test_channel_names_are_the_exact_strings_pg_notify_takes(make_pool, pg):
    """``listen('Jobs')`` hears ``pg_notify('Jobs')`` and ``NOTIFY "Jobs"``, not ``NOTIFY
    Jobs`` (folded to ``jobs`` by PostgreSQL), which ``listen('jobs')`` hears."""
    pool = make_pool({"g": {}}, application_name=APP)
    with pool.listen("g", "Jobs") as upper, pool.listen("g", "jobs") as lower:
        pg.execute("SELECT pg_notify('Jobs', 'exact'); NOTIFY \"Jobs\", 'quoted'; "
                   "NOTIFY Jobs, 'folded'; SELECT pg_notify('jobs', 'lower')")
        assert [upper.get(5).payload for _ in range(2)] == ["exact", "quoted"]
        assert [lower.get(5).payload for _ in range(2)] == ["folded", "lower"]
        assert upper.get(0.2) is None and lower.get(0) is None


def test_a_slow_subscriber_is_bounded_and_owed_a_gap_while_the_others_get_everything(
    make_pool, pg
):
    """One subscriber reads nothing while 50 notifications come (``max_backlog`` 10): the
    fast one gets all 50; the slow one holds 10, the rest is counted as dropped (stats and
    Prometheus), and once it has read its queue it gets a Gap whose ``lost_at`` precedes
    what it missed, then new notifications again."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from greenpool.prometheus import register

    pool = make_pool({"g": {}}, application_name=APP)
    registry = prometheus_client.CollectorRegistry()
    register(pool, name="app", registry=registry)
    with pool.listen("g", "feed", max_backlog=10) as slow, pool.listen("g", "feed") as fast:
        sent_at = time.time()
        pg.execute("SELECT pg_notify('feed', i::text) FROM generate_series(1, 50) i")
        assert [fast.get(5).payload for _ in range(50)] == [str(i) for i in range(1, 51)]
        stats = group_stats(pool)
        assert (stats["listen_backlog"], stats["listen_backlog_max"]) == (10, 10)
        assert stats["listen_dropped"] == 40 and slow.backlog == 10
        value = registry.get_sample_value
        assert value("greenpool_listen_backlog_max", {"pool": "app", "group": "g"}) == 10
        assert value("greenpool_listen_dropped_total", {"pool": "app", "group": "g"}) == 40
        assert [slow.get(5).payload for _ in range(10)] == [str(i) for i in range(1, 11)]
        gap = slow.get(5)
        assert isinstance(gap, Gap) and "max_backlog" in gap.reason, gap
        assert "40 notifications" in gap.reason and gap.lost_at <= sent_at
        pg.execute("NOTIFY feed, 'again'")
        assert slow.get(5).payload == "again" and fast.get(5).payload == "again"
        assert group_stats(pool)["listen_backlog"] == 0


@pytest.mark.skipif(not GREEN, reason="killing a task needs greenlets")
def test_a_subscriber_killed_mid_get_leaves_the_others_listening(make_pool, pg):
    """Of two subscribers, the one alone on channel ``b`` is killed inside get(): the hub
    UNLISTENs ``b``, keeps the connection for the other, which still receives."""
    pool = make_pool({"g": {}}, application_name=APP)
    keeper = pool.listen("g", "a")
    victim = pool.listen("g", ["a", "b"])
    reader = spawn(lambda: list(victim))
    wait_until(lambda: victim._busy, 5, "the victim to wait")
    if MODE == "gevent":
        reader._handle.kill(block=True, timeout=5)
    else:
        reader._handle.kill()
    assert reader.join(5) and victim.closed
    assert group_stats(pool)["listeners"] == 1
    wait_until(lambda: pg.execute(
        "SELECT query FROM pg_stat_activity WHERE application_name = %s", (APP,)
    )[0][0].startswith("UNLISTEN"), 10, "b to be unlistened")
    pg.execute("NOTIFY a, 'still'; NOTIFY b, 'nobody'")
    assert keeper.get(5).payload == "still" and keeper.get(0.2) is None
    assert group_stats(pool)["exclusive_open"] == 1
    keeper.close()
    assert group_stats(pool)["exclusive_open"] == 0
    no_session_left(pg)


def test_non_threaded_subscribers_share_the_connection_read_by_whoever_waits(make_pool, pg):
    """No background task in non-threaded mode: the subscriber inside get() reads the
    connection and queues for the others, whose get(0) then returns at once."""
    pool = make_pool({"g": {}}, application_name=APP, type="non-threaded")
    with pool.listen("g", "jobs") as first, pool.listen("g", "jobs") as second:
        assert group_stats(pool)["listen_connections"] == 1
        pg.execute("NOTIFY jobs, 'one'; NOTIFY jobs, 'two'")
        assert first.get(5).payload == "one"
        assert [second.get(0).payload, second.get(0).payload] == ["one", "two"]
        assert first.get(0).payload == "two"
        pg.execute("SELECT pg_terminate_backend(%s)", (hub_pid(pg),))
        assert isinstance(first.get(10), Gap) and isinstance(second.get(0), Gap)
    assert group_stats(pool)["exclusive_open"] == 0
    no_session_left(pg)


@pytest.mark.parametrize("kind", ["non-threaded", None])
def test_a_listener_collected_unclosed_gives_the_slot_back_to_exclusive(make_pool, pg, kind):
    """The only listener of a group is garbage-collected without close(): an
    ``exclusive()`` that needs its slot gets it (non-threaded mode has no reader task to
    notice the collection; the slots' next use must) and its session ends."""
    import gc

    extra = {} if kind is None else {"type": kind}
    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP, **extra)
    listener = pool.listen("g", "jobs")
    assert listening_sessions(pg) == 1
    del listener
    gc.collect()
    with pool.exclusive("g", timeout=5) as conn:
        assert conn.closed == 0
    no_session_left(pg)
    assert group_stats(pool)["listeners"] == 0


def test_a_failed_first_connect_gives_the_slot_back_in_every_mode(make_pool, pg):
    """Nobody listens on the endpoint's port: listen() raises the connect's error, and the
    slot is free again at once (non-threaded mode has no reader task to give it back)."""
    from greenpool.testing.postgres import free_port

    for mode in {MODE, "non-threaded"}:
        pool = make_pool({"g": {"exclusive_limit": 1, "timeout": 1}}, type=mode,
                         db=dict(pg.endpoint(connect_timeout=1), port=free_port()),
                         application_name=APP, quarantine_initial=0.05, quarantine_max=0.1)
        for _ in range(2):
            with pytest.raises(greenpool.PoolError) as raised:
                pool.listen("g", "jobs", timeout=1)
            assert "exclusive_limit" not in str(raised.value), raised.value
            stats = group_stats(pool)
            assert (stats["exclusive_open"], stats["listeners"]) == (0, 0), (mode, stats)


@pytest.mark.skipif(not GREEN, reason="interrupting a task needs greenlets")
def test_a_listen_interrupted_while_connecting_leaves_nothing(make_pool, pg_factory):
    """The postmaster is stopped (the connect hangs) and listen() is cut by a Timeout: the
    Timeout reaches the caller at once, the subscriber is gone, and the reader stops
    waiting for its connect and gives the slot back by itself."""
    server = pg_factory()
    pool = make_pool({"g": {"exclusive_limit": 1}}, db=server.endpoint(connect_timeout=1),
                     application_name=APP)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(Timeout), Timeout(0.3):
            pool.listen("g", "jobs", timeout=10)
        assert time.monotonic() - started < 1.0  # not held up by the reader's connect
        assert group_stats(pool)["listeners"] == 0
        # the reader's wait for its connect is cut: the slot is back long before the
        # listen()'s 10 s (the connect task goes on, and closes what it opens)
        wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 3, "the slot back")
    finally:
        os.kill(server.pid, signal.SIGCONT)
    with pool.listen("g", "jobs", timeout=10) as listener:
        server.execute("NOTIFY jobs, 'works'")
        assert listener.get(5).payload == "works"


@pytest.mark.skipif(not GREEN, reason="interrupting a task needs greenlets")
@pytest.mark.parametrize("interruption", ["timeout", "kill"])
def test_a_listen_interrupted_against_a_black_hole_returns_at_once(
        make_pool, blackhole, interruption):
    """listen(timeout=8) on a server that never answers, cut by a gevent.Timeout or a kill:
    the interruption reaches the caller at once (not at the listen's 8 s), and the slot
    comes back by itself soon after."""
    pool = make_pool({"g": {"exclusive_limit": 1}},
                     db=blackhole.endpoint(connect_timeout=6), application_name=APP)
    started = time.monotonic()
    if interruption == "timeout":
        with pytest.raises(Timeout), Timeout(0.3):
            pool.listen("g", "jobs", timeout=8)
        took = time.monotonic() - started
    else:
        task = spawn(lambda: pool.listen("g", "jobs", timeout=8))
        wait_until(lambda: group_stats(pool)["listeners"] == 1, 5, "listen() to wait")
        sleep(0.2)  # its hub's reader waits for the connect
        killed_at = time.monotonic()
        task._handle.kill()
        assert task.join(5)
        took = time.monotonic() - killed_at
    assert took < 1.0, took
    assert group_stats(pool)["listeners"] == 0
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 3, "the slot back")


@pytest.mark.skipif(not GREEN, reason="interrupting a task needs greenlets")
@pytest.mark.parametrize("interruption", ["timeout", "kill"])
def test_a_get_interrupted_while_the_heartbeat_waits_on_a_stopped_backend_returns_at_once(
        make_pool, pg, interruption):
    """The listener's backend is stopped (SIGSTOP) and the reader waits up to connect_timeout
    (6 s) for a heartbeat's answer; a get() cut by a gevent.Timeout or a kill meanwhile
    reaches its caller at once, and the reader gives the slot back by itself when its
    round trip ends."""
    pool = make_pool({"g": {"exclusive_limit": 1}}, db=pg.endpoint(connect_timeout=6),
                     application_name=APP)
    listener = pool.listen("g", "jobs", heartbeat=0.3, timeout=10)
    pid = hub_pid(pg)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        hub = listener._hub  # a heartbeat sent after the stop waits up to its sending + 6 s
        wait_until(lambda: hub.busy_until > stopped_at + 6, 5,
                   "a heartbeat to wait for the stopped backend")
        if interruption == "timeout":
            started = time.monotonic()
            with pytest.raises(Timeout), Timeout(0.3):
                listener.get()
            took = time.monotonic() - started - 0.3
        else:
            task = spawn(listener.get)
            wait_until(lambda: listener._busy, 5, "get() to wait")
            killed_at = time.monotonic()
            task._handle.kill()
            assert task.join(5)
            took = time.monotonic() - killed_at
        assert took < 0.7, took
        assert listener.closed and group_stats(pool)["listeners"] == 0
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 10, "the slot back")
    no_session_left(pg)


def test_a_listener_moves_at_once_when_reconfigure_takes_its_endpoint_out_of_the_group(
        make_pool, pg_factory, pg, mode):
    """A group of the default role (any) listens on server A; reconfigure() replaces A by
    B while A keeps running (a change that keeps A moves nothing). The listener moves at
    once (its heartbeat is a minute away),
    each subscriber gets one Gap naming both, then B's notifications; A keeps no session."""
    old = pg_factory()
    groups = {"g": {"exclusive_limit": 2}}
    pool = make_pool(groups, db=old.endpoint(), application_name=APP)
    first = pool.listen("g", "jobs", heartbeat=60, timeout=10)
    second = pool.listen("g", "jobs", heartbeat=60, timeout=10)
    try:
        assert first.endpoint == label(old)
        # a change that keeps the endpoint in the group moves nothing: no Gap
        pool.reconfigure({"type": mode, "db": old.endpoint(), "application_name": APP,
                          "groups": {"g": {**groups["g"], "timeout": 7}}})
        assert first.get(0.5) is None and first.endpoint == label(old)
        pool.reconfigure({"type": mode, "db": pg.endpoint(), "groups": groups,
                          "application_name": APP})
        changed_at = time.monotonic()
        for listener in (first, second):
            gap = listener.get(10)
            assert isinstance(gap, Gap), gap
            assert gap.previous == label(old) and gap.endpoint == label(pg)
            assert "taken out of the group" in gap.reason
        assert time.monotonic() - changed_at < 5  # not at the next heartbeat
        with pool.handler("g", timeout=5) as db:
            db.execute("SELECT pg_notify('jobs', 'on the new server')")
        for listener in (first, second):
            assert listener.get(5).payload == "on the new server"
            assert listener.backlog == 0  # one Gap each, nothing else
        assert group_stats(pool)["discards_by_reason"].get("endpoint_removed", 0) >= 1
        wait_until(lambda: listening_sessions(old) == 0, 10, "A's session to end")
    finally:
        first.close()
        second.close()


def test_listen_and_get_keep_their_timeout_against_a_server_that_never_answers(
    make_pool, pg, blackhole
):
    """A black hole (TCP accepted, never a word) with a 3 s connect_timeout: listen(0.3)
    gives up after 0.3 s, not after the connect attempt; and while a listener's connection
    is re-made against a stopped postmaster, get(0.3) returns None on time (the reader
    task reconnects, not the caller; non-threaded mode has none, and may overrun)."""
    pool = make_pool({"g": {}}, db=blackhole.endpoint(connect_timeout=3), application_name=APP)
    started = time.monotonic()
    with pytest.raises(PoolTimeout):  # its own, or the connect's NoHealthyEndpoint
        pool.listen("g", "jobs", timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert group_stats(pool)["listeners"] == 0
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 10, "the slot back")

    # the listener's backend ends while the postmaster is stopped: reconnects hang
    server = pg
    pool = make_pool({"g": {}}, db=server.endpoint(connect_timeout=3), application_name=APP)
    with pool.listen("g", "jobs", timeout=10) as listener:
        backend = hub_pid(server)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            os.kill(backend, signal.SIGTERM)  # what pg_terminate_backend does
            for _ in range(4):
                started = time.monotonic()
                assert listener.get(0.3) is None
                assert time.monotonic() - started < 0.8
        finally:
            os.kill(server.pid, signal.SIGCONT)
        gap = listener.get(15)
        assert isinstance(gap, Gap), gap


def test_listeners_churning_concurrently_through_notifications_and_terminations(
    make_pool, pg
):
    """30 tasks open and close listeners on overlapping channels, read a little, while
    notifications stream and the shared session is terminated twice: no task fails, and
    at the end the group holds nothing (no slot, no listener, no session)."""
    import random

    pool = make_pool({"g": {"exclusive_limit": 2, "timeout": 10}}, application_name=APP,
                     quarantine_initial=0.05, quarantine_max=0.2)
    channels = ["a", "b", "c"]
    stop = [False]

    def churn(seed: int) -> int:
        rng = random.Random(seed)
        seen = 0
        for _ in range(15):
            names = rng.sample(channels, rng.randint(1, 3))
            with pool.listen("g", names, timeout=10, max_backlog=5) as listener:
                for _ in range(rng.randint(0, 3)):
                    if listener.get(rng.uniform(0, 0.02)) is not None:
                        seen += 1
        return seen

    def notify() -> None:
        while not stop[0]:
            pg.execute("SELECT pg_notify(c, 'x') FROM unnest(array['a','b','c']) c")
            sleep(0.01)

    notifier = spawn(notify)
    tasks = [spawn(churn, i) for i in range(30)]
    for _ in range(2):
        sleep(0.3)
        pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE application_name = %s", (APP,))
    join_all(tasks, 60)
    stop[0] = True
    join_all([notifier], 10)
    assert [t.error for t in tasks] == [None] * 30
    assert sum(t.result for t in tasks) > 0
    stats = group_stats(pool)
    assert (stats["listeners"], stats["exclusive_open"], stats["listen_backlog"]) == (0, 0, 0)
    no_session_left(pg)


class FanOutMachine:
    """Listeners open and close on overlapping channels, notifications go out, the shared
    session is terminated: every listener gets exactly what was sent on its channels while
    it was open, in order, or a Gap whose ``lost_at`` precedes what it missed; the group
    holds one connection (and one slot) while any listener is open, none otherwise.
    (A listener joining a channel the connection already listens on may also get one sent
    just before it joined, still on its way: those are skipped, never required.)"""

    CHANNELS = ("a", "b", "Mixed")

    @staticmethod
    def build(pool: Any, pg: Any) -> Any:
        from hypothesis import strategies as st
        from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

        class Machine(RuleBasedStateMachine):
            listeners = Bundle("listeners")

            def __init__(self) -> None:
                super().__init__()
                self.open: dict[Any, list[tuple[str, float]]] = {}
                self.first: dict[Any, int] = {}  # the first payload sent after it opened
                self.sent = 0

            def next_item(self, listener: Any, timeout: float) -> Any:
                """The next item, skipping what was sent before the listener opened."""
                while True:
                    item = listener.get(timeout)
                    if isinstance(item, Gap) or item is None:
                        return item
                    if int(item.payload) >= self.first[listener]:
                        return item

            @rule(target=listeners, channels=st.sets(
                st.sampled_from(FanOutMachine.CHANNELS), min_size=1, max_size=3))
            def listen(self, channels: set[str]) -> Any:
                listener = pool.listen("g", sorted(channels), timeout=10, max_backlog=50)
                self.open[listener] = []
                self.first[listener] = self.sent
                return listener

            @rule(listener=consumes(listeners))
            def close(self, listener: Any) -> None:
                self.read(listener)
                listener.close()
                del self.open[listener]
                assert listener.get(0) is None

            @rule(channel=st.sampled_from(FanOutMachine.CHANNELS), count=st.integers(1, 3))
            def notify(self, channel: str, count: int) -> None:
                sent_at = time.time()
                payloads = [str(self.sent + i) for i in range(count)]
                self.sent += count
                pg.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) p",
                           (channel, payloads))
                for listener, expected in self.open.items():
                    if channel in listener.channels:
                        expected.extend((p, sent_at) for p in payloads)

            @rule(listener=listeners)
            def read(self, listener: Any) -> None:
                if listener not in self.open:
                    return
                expected = self.open[listener]
                got = [self.next_item(listener, 10).payload for _ in expected]
                assert got == [p for p, _ in expected]
                expected.clear()
                assert self.next_item(listener, 0.02) is None

            @rule()
            def terminate(self) -> None:
                def sessions() -> list[Any]:
                    return pg.execute("SELECT pid FROM pg_stat_activity WHERE "
                                      "application_name = %s", (APP,))

                if self.open:  # the listening session, once those closed before it left
                    wait_until(lambda: len(sessions()) == 1, 10, "one session of the pool")
                rows = sessions()
                if not rows:
                    return
                pg.execute("SELECT pg_terminate_backend(%s)", (rows[0][0],))
                for listener, expected in self.open.items():
                    received = []
                    while True:
                        item = self.next_item(listener, 15)
                        assert item is not None, "no Gap after the session ended"
                        if isinstance(item, Gap):
                            break
                        received.append(item.payload)
                    assert received == [p for p, _ in expected[:len(received)]]
                    missed = expected[len(received):]
                    if missed:
                        assert item.lost_at <= missed[0][1], (item, missed)
                    expected.clear()

            @invariant()
            def one_connection_while_anyone_listens(self) -> None:
                stats = group_stats(pool)
                assert stats["listeners"] == len(self.open)
                assert stats["exclusive_open"] == (1 if self.open else 0), stats
                assert stats["listen_backlog_max"] <= 50

            def teardown(self) -> None:
                for listener in list(self.open):
                    listener.close()

        return Machine


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool_type", sorted({MODE, "non-threaded"}))
def test_listeners_coming_and_going_through_terminations_keep_their_promises(
    make_pool, pg, pool_type
):
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    pool = make_pool({"g": {"exclusive_limit": 1}}, type=pool_type, application_name=APP,
                     quarantine_initial=0.05, quarantine_max=0.2)
    machine = FanOutMachine.build(pool, pg)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=15, stateful_step_count=15, deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck)))
    no_session_left(pg)


# --- the example app's server-sent events -------------------------------------------------

def test_the_example_streams_committed_notes_as_server_sent_events(example_app, pg):
    status, stream = request(example_app, "GET", "/events")
    assert status == "200 OK"
    assert next(stream) == b"retry: 2000\n\n"
    assert greenpool.stats()["groups"]["write"]["listeners"] == 1
    status, body = request(example_app, "POST", "/notes", json.dumps({"body": "hi"}).encode())
    assert status.startswith("201")
    note_id = json.loads(b"".join(body))["id"]
    assert next(stream) == f"event: note\ndata: {note_id}\n\n".encode()
    stream.close()  # what gunicorn does when the client goes away
    assert greenpool.stats()["groups"]["write"]["listeners"] == 0
    wait_until(lambda: listening_sessions(pg) == 0, 10, "the stream's session to end")


def test_the_example_stream_ends_when_the_pool_closes(example_app):
    _, stream = request(example_app, "GET", "/events")
    assert next(stream) == b"retry: 2000\n\n"
    chunks: list[bytes] = []
    reader = spawn(lambda: chunks.extend(stream))
    wait_until(lambda: greenpool.stats()["groups"]["write"]["listeners"] == 1, 5, "listening")
    sleep(0.1)
    greenpool.close()
    join_all([reader], 5)
    assert reader.error is None and chunks == []


def test_the_example_serves_more_streams_than_exclusive_limit_on_one_connection(
    example_app, pg
):
    """Five streams with ``exclusive_limit`` 2: every stream is served, all of them share
    one server connection, and each gets the note."""
    streams = [request(example_app, "GET", "/events") for _ in range(5)]
    try:
        assert [status for status, _ in streams] == ["200 OK"] * 5
        for _, stream in streams:
            assert next(stream) == b"retry: 2000\n\n"
        write = greenpool.stats()["groups"]["write"]
        assert (write["listeners"], write["exclusive_open"]) == (5, 1)
        assert listening_sessions(pg) == 1
        _, body = request(example_app, "POST", "/notes", json.dumps({"body": "x"}).encode())
        note_id = json.loads(b"".join(body))["id"]
        for _, stream in streams:
            assert next(stream) == f"event: note\ndata: {note_id}\n\n".encode()
    finally:
        for _, stream in streams:
            stream.close()
    assert greenpool.stats()["groups"]["write"]["exclusive_open"] == 0


def test_the_example_encodes_a_note_once_for_all_its_streams(example_app):
    """Every stream of a worker sends the same bytes object for a note (one encoding per
    worker, not per client), and a note queued behind another goes in the same write."""
    streams = [request(example_app, "GET", "/events")[1] for _ in range(3)]
    try:
        for stream in streams:
            assert next(stream) == b"retry: 2000\n\n"
        ids = []
        for body in ("a", "b"):
            _, answer = request(example_app, "POST", "/notes", json.dumps({"body": body}).encode())
            ids.append(json.loads(b"".join(answer))["id"])
        wait_until(lambda: all(s.listener.backlog == 2 for s in streams), 5, "both notes queued")
        chunks = [next(stream) for stream in streams]
        assert chunks[0] == b"".join(f"event: note\ndata: {i}\n\n".encode() for i in ids)
        _, answer = request(example_app, "POST", "/notes", json.dumps({"body": "c"}).encode())
        chunks = [next(stream) for stream in streams]
        assert all(chunk is chunks[0] for chunk in chunks)
    finally:
        for stream in streams:
            stream.close()


def sse_events(stream: bytes) -> list[tuple[str, str]]:
    """(event type, data) of each event in ``stream``, parsed as the SSE spec says (lines
    end at CRLF, CR or LF; data lines are joined with LF; comments and retry ignored)."""
    events, kind, data = [], "message", []
    for line in re.split("\r\n|\r|\n", stream.decode()):
        if not line:
            if data:
                events.append((kind, "\n".join(data)))
            kind, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
    return events


def test_the_example_frames_any_payload_so_the_client_reads_it_back_whole(example_app, pg):
    """Payloads that anyone may NOTIFY the notes channel with: line breaks of each kind
    (a client cannot tell them apart: LF), an empty one, non-ASCII text, one that looks
    like a frame of its own. Each arrives as exactly one note event with its payload, in
    order, the same for every stream."""
    payloads = ["a\nb", "", "é ✓\r\nx\ry", "1\n\nevent: gap\ndata: {}", "ends\n",
                "\u2028 is no line break in SSE"]
    streams = [request(example_app, "GET", "/events")[1] for _ in range(2)]
    try:
        for stream in streams:
            assert next(stream) == b"retry: 2000\n\n"
        conn = pg.connect(dbname="listen_example_inprocess")
        try:
            with conn.cursor() as cur:
                for payload in payloads:
                    cur.execute("SELECT pg_notify('notes', %s)", (payload,))
        finally:
            conn.close()
        expected = [("note", re.sub("\r\n|\r", "\n", p)) for p in payloads]
        for stream in streams:
            received = b""
            while len(sse_events(received)) < len(expected):
                received += next(stream)
            assert sse_events(received) == expected
    finally:
        for stream in streams:
            stream.close()


def test_the_example_ends_every_stream_at_once_when_the_worker_stops(example_app):
    """end_streams() (the worker's SIGTERM): each stream's body ends cleanly, and a new
    /events is refused with a 503 while the rest of the app still answers."""
    responses = [request(example_app, "GET", "/events")[1] for _ in range(3)]
    for stream in responses:
        assert next(stream) == b"retry: 2000\n\n"
    chunks: list[list[bytes]] = [[] for _ in responses]
    readers = [spawn(lambda i=i: chunks[i].extend(responses[i])) for i in range(3)]
    wait_until(lambda: all(r._busy for r in (s.listener for s in responses)), 5, "waiting")
    started = time.monotonic()
    example_app.end_streams()
    join_all(readers, 5)
    assert time.monotonic() - started < 2
    assert [r.error for r in readers] == [None] * 3 and chunks == [[], [], []]
    status, _ = request(example_app, "GET", "/events")
    assert status.startswith("503")
    status, _ = request(example_app, "GET", "/notes")
    assert status == "200 OK"
    for stream in responses:
        stream.close()
    example_app._ending = False


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_a_forked_child_drops_the_parents_listener_and_its_session_survives(make_pool, pg):
    """The child starts with no listener and no exclusive slot taken (the parent's
    connection was silenced, never closed); it can listen on its own; the parent's
    listener still receives afterwards."""
    pool = make_pool({"g": {"exclusive_limit": 2}}, application_name=APP)
    listener = pool.listen("g", "jobs")
    block = pool.exclusive("g")
    block.__enter__()  # an exclusive block open across the fork, ended in both processes

    def in_child() -> str:  # what the child sees
        block.__exit__(None, None, None)  # the parent's slot: not given back here
        stats = pool.stats()["groups"]["g"]
        mine = pool.listen("g", "jobs", timeout=5)
        report = [listener.closed, stats["exclusive_open"], stats["listeners"], mine.endpoint]
        mine.close()
        return json.dumps(report)

    reported = json.loads(run_in_forked_child(in_child))
    assert reported == [True, 0, 0, label(pg)]
    block.__exit__(None, None, None)
    assert group_stats(pool)["exclusive_open"] == 1  # the listener's
    pg.execute("NOTIFY jobs, 'parent'")
    assert listener.get(5).payload == "parent"
    listener.close()


@pytest.mark.skipif(MODE != "gevent", reason="the example runs under gunicorn's gevent worker")
@pytest.mark.timeout(90)
def test_the_example_under_gunicorn_streams_a_note_and_drops_a_client_that_left(
    pg, tmp_path
):
    """Real gunicorn (``-k gevent``): a client reads ``GET /events`` over a socket, a note
    posted meanwhile arrives as an event; once the client hangs up, the next event's write
    fails, gunicorn closes the response and the listener's server session ends."""
    import http.client
    import socket
    import subprocess
    import sys

    pytest.importorskip("gunicorn")
    from greenpool.testing.postgres import free_port

    app_name = "greenpool-listen-gunicorn"
    name = "listen_example_gunicorn"
    pg.execute(f"DROP DATABASE IF EXISTS {name}")
    pg.create_database(name)
    config = {"db": pg.endpoint(name=name), "application_name": app_name,
              "groups": {"write": {"connection_count": 2, "timeout": 5},
                         "read": {"connection_count": 2, "timeout": 5}}}
    env = {**os.environ, "GREENPOOL_CONFIG": json.dumps(config)}
    done = subprocess.run([sys.executable, str(EXAMPLE / "app.py"), "schema"], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    port = free_port()
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", "1", "-c", str(EXAMPLE / "gunicorn.conf.py"),
             "-b", f"127.0.0.1:{port}"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        def answers() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                return False

        wait_until(answers, 30, "gunicorn to listen")

        def post(text: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("POST", "/notes", body=json.dumps({"body": text}),
                             headers={"Content-Type": "application/json"})
                reply = conn.getresponse()
                assert reply.status == 201, reply.read()
                return int(json.loads(reply.read())["id"])
            finally:
                conn.close()

        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = b""
        while b"retry: 2000" not in received:
            received += client.recv(4096)
        assert b"text/event-stream" in received
        wait_until(lambda: listening_sessions(pg, app_name) == 1, 10, "the stream's listener")
        note_id = post("streamed")
        while f"data: {note_id}".encode() not in received:
            chunk = client.recv(4096)
            assert chunk, received
            received += chunk
        assert b"event: note" in received
        client.close()
        left_at = time.monotonic()
        # the first write after the hang-up still succeeds (the peer answers it with a
        # reset); the next one fails, and gunicorn closes the response
        post("after the client left")
        post("after the client left, again")
        wait_until(lambda: listening_sessions(pg, app_name) == 0, 10,
                   "the listener of the client that left to end")
        assert time.monotonic() - left_at < 10  # well before the 15 s keep-alive
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


class GunicornExample:
    """examples/gunicorn under real gunicorn (``-k gevent``, its gunicorn.conf.py), on a
    database of its own; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, pg: Any, tmp_path: Path, app_name: str, workers: int = 1,
                 env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys

        from greenpool.testing.postgres import free_port

        self.app_name = app_name
        name = app_name.replace("-", "_")
        pg.execute(f"DROP DATABASE IF EXISTS {name}")
        pg.create_database(name)
        config = {"db": pg.endpoint(name=name), "application_name": app_name,
                  "groups": {"write": {"connection_count": 2, "exclusive_limit": 1,
                                       "timeout": 5},
                             "read": {"connection_count": 2, "timeout": 5}}}
        self.env = {**os.environ, "GREENPOOL_CONFIG": json.dumps(config), **(env or {})}
        done = subprocess.run([sys.executable, str(EXAMPLE / "app.py"), "schema"],
                              env=self.env, capture_output=True, text=True, timeout=30,
                              check=False)
        assert done.returncode == 0, done.stderr
        self.port = free_port()
        self.log = tmp_path / "gunicorn.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-w", str(workers), "-c",
                 str(EXAMPLE / "gunicorn.conf.py"), "-b", f"127.0.0.1:{self.port}"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self.answers, 30, "gunicorn to listen")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def answers(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            assert self.proc.poll() is None, self.log_text()[-3000:]
            return False

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read() or b"null")
        finally:
            conn.close()

    def stream(self, rcvbuf: int = 0) -> Any:
        """A raw socket that sent ``GET /events`` and read up to the first event."""
        import socket

        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.settimeout(10)
        client.connect(("127.0.0.1", self.port))
        client.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = b""
        while b"retry: 2000" not in received:
            chunk = client.recv(4096)
            assert chunk, received
            received += chunk
        return client

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def read_to_end(client: Any, deadline: float) -> bytes:
    """What the server sends until it closes the connection (or ``deadline`` seconds)."""
    client.settimeout(deadline)
    received = b""
    try:
        while True:
            chunk = client.recv(65536)
            if not chunk:
                return received
            received += chunk
    except OSError:
        return received + b"<timed out>"


gunicorn_only = pytest.mark.skipif(MODE != "gevent",
                                   reason="the example runs under gunicorn's gevent worker")


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_a_forked_child_that_keeps_running_never_reads_the_parents_connection(make_pool, pg):
    """The child lives on for a second (its event loop runs: a reader greenlet copied from
    the parent would wake there) while the parent's listener is sent notifications and
    heartbeats: the parent receives every one, with no Gap."""
    pool = make_pool({"g": {}}, application_name=APP)
    listener = pool.listen("g", "jobs", heartbeat=0.2)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            sleep(1.0)
            code = 0 if listener.closed else 3
        finally:
            os._exit(code)
    try:
        for i in range(5):
            pg.execute(f"NOTIFY jobs, '{i}'")
            sleep(0.1)
    finally:
        _, status = os.waitpid(child, 0)
    assert status == 0
    got = [listener.get(5) for _ in range(5)]
    assert [getattr(i, "payload", i) for i in got] == [str(i) for i in range(5)]
    assert listener.get(0.5) is None  # no Gap: the parent's connection was never touched
    listener.close()


@pytest.mark.skipif(MODE != "gevent", reason="only greenlets live on in a forked child; "
                    "eventlet's fork support is not exercised")
def test_a_get_copied_into_a_forked_child_returns_at_its_timeout(make_pool, pg):
    """A task waits in ``get(0.3)`` when the process forks: in the child its copy returns
    None by its timeout (the child's listener is closed), in the parent the wait is
    undisturbed and its next get receives."""
    pool = make_pool({"g": {}}, application_name=APP)
    listener = pool.listen("g", "jobs")
    got: list[object] = []
    waiting = spawn(lambda: got.append(listener.get(0.3)))
    wait_until(lambda: listener._busy, 5, "the get to wait")
    child = os.fork()
    if child == 0:
        code = 1
        try:
            sleep(1.0)
            code = 0 if got == [None] and listener.closed else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    join_all([waiting], 5)
    assert os.WEXITSTATUS(status) == 0, status
    assert got == [None] and not listener.closed
    pg.execute("NOTIFY jobs, 'after'")
    assert listener.get(5).payload == "after"
    listener.close()


@pytest.mark.skipif(not GREEN, reason="only greenlets live on in a forked child")
def test_a_child_forked_mid_heartbeat_neither_reports_a_loss_nor_evicts(make_pool, pg):
    """The reader greenlet waits for a heartbeat's answer (the backend is stopped) when
    the process forks: in the child its copy reads the silenced socket (EOF); it must end
    quietly, not log a lost connection nor report the endpoint failed."""
    import logging

    pool = make_pool({"g": {}}, db=pg.endpoint(connect_timeout=5), application_name=APP)
    listener = pool.listen("g", "jobs", heartbeat=0.2)
    pid = hub_pid(pg)
    failed: list[object] = []
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("greenpool").addHandler(handler)
    os.kill(pid, signal.SIGSTOP)
    try:
        sleep(0.6)  # a heartbeat is sent and waits for its answer
        pool._groups["g"].on_endpoint_failure = failed.append
        child = os.fork()
        if child == 0:
            code = 1
            try:
                sleep(1.0)
                code = 0 if not failed and not records else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
    finally:
        os.kill(pid, signal.SIGCONT)
        logging.getLogger("greenpool").removeHandler(handler)
    assert os.WEXITSTATUS(status) == 0, status
    listener.close()


@gunicorn_only
@pytest.mark.timeout(90)
def test_the_example_under_gunicorn_ends_its_streams_at_once_on_sigterm(pg, tmp_path):
    """Three open streams: SIGTERM to gunicorn ends each cleanly (the chunked body's last
    chunk), the worker's ``worker_exit`` runs (the pool is closed), and gunicorn is gone
    well within its 10 s graceful timeout."""
    pytest.importorskip("gunicorn")
    app = GunicornExample(pg, tmp_path, "greenpool-listen-sigterm")
    try:
        clients = [app.stream() for _ in range(3)]
        wait_until(lambda: app.call("GET", "/stats")[1]["groups"]["write"]["listeners"] == 3,
                   10, "three streams")
        assert listening_sessions(pg, app.app_name) == 1  # one connection for all three
        started = time.monotonic()
        os.killpg(app.proc.pid, signal.SIGTERM)
        ends = [read_to_end(c, 8) for c in clients]
        app.proc.wait(15)
        took = time.monotonic() - started
        for end in ends:
            assert end.endswith(b"0\r\n\r\n"), end[-200:]
        assert took < 5, f"gunicorn took {took:.1f} s to stop"
        assert "greenpool: pool closed in worker" in app.log_text()
    finally:
        app.stop()


@gunicorn_only
@pytest.mark.timeout(90)
def test_the_example_under_gunicorn_ends_its_streams_at_once_on_reload(pg, tmp_path):
    """SIGHUP (reload): the old worker's streams end cleanly within a few seconds, and a
    new stream is served by the new worker."""
    pytest.importorskip("gunicorn")
    app = GunicornExample(pg, tmp_path, "greenpool-listen-sighup")
    try:
        clients = [app.stream() for _ in range(2)]
        old_pid = app.call("GET", "/stats")[1]["pid"]
        started = time.monotonic()
        app.proc.send_signal(signal.SIGHUP)
        ends = [read_to_end(c, 8) for c in clients]
        took = time.monotonic() - started
        for end in ends:
            assert end.endswith(b"0\r\n\r\n"), end[-200:]
        assert took < 5, f"the streams lasted {took:.1f} s into the reload"
        wait_until(lambda: app.call("GET", "/stats")[1]["pid"] != old_pid, 15, "new worker")
        fresh = app.stream()
        fresh.close()
        assert app.proc.poll() is None
    finally:
        app.stop()


@gunicorn_only
@pytest.mark.timeout(120)
def test_the_example_under_gunicorn_drops_a_client_that_stopped_reading(pg, tmp_path):
    """A client keeps its connection but reads nothing while large notes stream: its queue
    stays within the example's backlog bound, a reading client gets everything, and once
    the socket buffers are full the stopped one's stream is cut after the write timeout."""
    pytest.importorskip("gunicorn")
    app = GunicornExample(pg, tmp_path, "greenpool-listen-stalled",
                          env={"EVENTS_WRITE_TIMEOUT": "1"})
    try:
        stalled = app.stream(rcvbuf=4096)
        reader = app.stream()
        got = bytearray()

        def read_all() -> None:
            read = read_to_end(reader, 60)
            got.extend(read)

        task = spawn(read_all)
        wait_until(lambda: app.call("GET", "/stats")[1]["groups"]["write"]["listeners"] == 2,
                   10, "two streams")
        worst = 0
        sender = pg.connect(dbname=app.app_name.replace("-", "_"))
        for _ in range(40):
            with sender.cursor() as cur:
                cur.execute("SELECT pg_notify('notes', repeat('x', 7990) || i) "
                            "FROM generate_series(1, 100) i")
            write = app.call("GET", "/stats")[1]["groups"]["write"]
            worst = max(worst, write["listen_backlog_max"])
            if write["listeners"] == 1:
                break
            sleep(0.3)
        assert write["listeners"] == 1, write
        assert worst <= 100
        sender.close()
        reader.shutdown(2)
        join_all([task], 30)
        assert got.count(b"event: note") >= 100 * (len(got) > 0)
        stalled.close()
    finally:
        app.stop()
