"""LISTEN/NOTIFY: ``pool.listen(group, channels)`` delivers notifications without
blocking the hub, survives a lost server and a promotion (reporting the gap), and leaves
nothing on the server when it is closed or its task is killed.

Real servers and real faults: ``pg_ctl stop -m immediate`` and ``pg_ctl promote`` on a
streaming pair, ``pg_terminate_backend``, a backend stopped with SIGSTOP, killed greenlets,
``gevent.Timeout``. What is left on the server is read from ``pg_stat_activity`` of another
session (``pg_listening_channels()`` only ever shows the asking session's own channels).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
from endpoints import label
from faults import Ticker
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


def test_listeners_count_against_exclusive_limit(make_pool):
    pool = make_pool({"g": {"exclusive_limit": 1}})
    with pool.listen("g", "jobs"):
        with pytest.raises(PoolTimeout, match="exclusive_limit"):
            pool.listen("g", "jobs", timeout=0.2)
        with pytest.raises(PoolTimeout, match="exclusive_limit"), pool.exclusive("g", timeout=0):
            pass
    assert group_stats(pool)["listeners"] == 0
    with pool.listen("g", "jobs", timeout=2):
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
    assert group_stats(pool)["listeners"] == 0 and group_stats(pool)["exclusive_open"] == 0
    no_session_left(pg)

    listener = pool.listen("g", "jobs", timeout=2)  # the slot came back
    with pytest.raises(Timeout), Timeout(0.2):
        listener.get()
    assert listener.closed
    assert group_stats(pool)["exclusive_open"] == 0
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


def test_the_example_refuses_a_stream_over_the_limit_with_a_503(example_app):
    streams = [request(example_app, "GET", "/events")[1] for _ in range(2)]
    try:
        for stream in streams:
            next(stream)
        started = time.monotonic()
        status, body = request(example_app, "GET", "/events")
        assert status.startswith("503"), status
        assert json.loads(b"".join(body))["error"] == "PoolTimeout"
        assert time.monotonic() - started < 5
    finally:
        for stream in streams:
            stream.close()


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_a_forked_child_drops_the_parents_listener_and_its_session_survives(make_pool, pg):
    """The child starts with no listener and no exclusive slot taken (the parent's
    connection was silenced, never closed); it can listen on its own; the parent's
    listener still receives afterwards."""
    pool = make_pool({"g": {"exclusive_limit": 2}}, application_name=APP)
    listener = pool.listen("g", "jobs")
    block = pool.exclusive("g")
    block.__enter__()  # an exclusive block open across the fork, ended in both processes
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report what it sees, then leave without cleanup
        code = 1
        try:
            os.close(read_end)
            block.__exit__(None, None, None)  # the parent's slot: not given back here
            stats = pool.stats()["groups"]["g"]
            mine = pool.listen("g", "jobs", timeout=5)
            report = [listener.closed, stats["exclusive_open"], stats["listeners"],
                      mine.endpoint]
            mine.close()
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    reported = json.loads(os.read(read_end, 512).decode())
    os.close(read_end)
    assert status == 0
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
    from greenpool.throwaway import free_port

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
