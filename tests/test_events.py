"""The on_event hook: endpoint and group state changes reported for alerting, with real
faults (pg_ctl stop -m immediate, promote, a port nothing listens on)."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from lending import lend_all
from modes import MODE, sleep, wait_until

from greenpool import Pool, PoolError
from greenpool.events import KINDS, PoolEvent

pytestmark = pytest.mark.skipif(MODE == "non-threaded", reason="background connects")


def _label(cluster):
    return f"{cluster.host}:{cluster.port}/postgres"


def _kinds(events, endpoint=None, group=None):
    return [e.kind for e in events
            if (endpoint is None or e.endpoint == endpoint) and (group is None or e.group == group)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(90)
def test_events_report_a_server_stopped_and_started_again(pg_factory, mode):
    """pg_ctl stop -m immediate: the endpoint is reported quarantined and the group unable
    to connect; after the restart: back, and connected."""
    server = pg_factory()
    events: list[PoolEvent] = []
    pool = Pool({"type": mode, "db": server.endpoint(connect_timeout=1),
                 "groups": {"g": {"connection_count": 2, "timeout": 1}},
                 "maintenance_interval": 0.1, "quarantine_initial": 0.1, "quarantine_max": 0.5,
                 "on_event": events.append})
    try:
        lend_all(pool, "g", 2, within=10)
        server.stop("immediate")
        with pytest.raises(PoolError), pool.handler("g") as db:
            db.query("SELECT 1")
        wait_until(lambda: "quarantined" in _kinds(events, _label(server)), 10, "quarantined")
        wait_until(lambda: "cannot_connect" in _kinds(events, group="g"), 10, "cannot_connect")
        server.start()
        wait_until(lambda: "back" in _kinds(events, _label(server)), 15, "back")
        lend_all(pool, "g", 2, within=10)
        wait_until(lambda: "connected" in _kinds(events, group="g"), 10, "connected")
    finally:
        pool.close()
    assert {e.kind for e in events} <= set(KINDS)
    assert all(isinstance(e.at, float) and e.detail for e in events)


@pytest.mark.timeout(120)
def test_events_report_a_promotion_and_the_split_brain_it_makes(pg_factory, mode):
    """A standby promoted while its old primary still runs: "promoted" for the standby,
    and "split_brain" for both claimants."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    events: list[PoolEvent] = []
    pool = Pool({"type": mode, "db": [primary.endpoint(), standby.endpoint()],
                 "groups": {"w": {"role": "primary", "connection_count": 2, "timeout": 10}},
                 "maintenance_interval": 0.1, "role_check_interval": 0.05,
                 "on_event": events.append})
    try:
        lend_all(pool, "w", 2, within=10)
        standby.promote()
        wait_until(lambda: "promoted" in _kinds(events, _label(standby)), 15, "promoted")
        wait_until(lambda: "split_brain" in _kinds(events, _label(primary)), 15, "split brain")
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_events_report_a_standby_lagging_once_its_primary_is_gone(pg_factory, mode):
    """A read group with max_lag: the primary stopped -m immediate leaves the standby's
    WAL receiver without a source, its lag unknown: "lagging" for the standby."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    events: list[PoolEvent] = []
    pool = Pool({"type": mode, "db": [primary.endpoint(), standby.endpoint()],
                 "groups": {"r": {"role": "standby", "max_lag": 5, "connection_count": 2,
                                  "timeout": 10}},
                 "maintenance_interval": 0.1, "role_check_interval": 0.05,
                 "on_event": events.append})
    try:
        lend_all(pool, "r", 1, within=10)
        primary.stop("immediate")
        wait_until(lambda: "lagging" in _kinds(events, _label(standby)), 30, "lagging")
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_on_event_runs_off_the_borrow_path_and_its_exceptions_are_logged(pg, mode, caplog):
    """A callback that blocks for a second and then raises: borrows meanwhile take no longer
    than usual, the exception is logged, and the next events (a group on the dead endpoint
    alone cannot connect) are still delivered."""
    delivered: list[PoolEvent] = []

    def on_event(event):
        delivered.append(event)
        sleep(1.0)
        raise RuntimeError("alerting is down")

    dead = {"host": "127.0.0.1", "port": _free_port(), "pass": "x", "connect_timeout": 1}
    pool = Pool({"type": mode, "db": [pg.endpoint(), dead],
                 "groups": {"g": {"connection_count": 4, "timeout": 5},
                            "dead": {"endpoints": [1], "timeout": 1}},
                 "maintenance_interval": 0.1, "quarantine_initial": 0.1, "quarantine_max": 0.2,
                 "on_event": on_event})
    try:
        with caplog.at_level(logging.WARNING, logger="greenpool"):
            lend_all(pool, "g", 4, within=10)  # one connect per endpoint: the dead one fails
            wait_until(lambda: delivered, 10, "a first event")
            started = time.monotonic()
            for _ in range(20):
                with pool.handler("g") as db:
                    db.query("SELECT 1")
            assert time.monotonic() - started < 0.9
            with pytest.raises(PoolError), pool.handler("dead") as db:
                db.query("SELECT 1")
            wait_until(lambda: "cannot_connect" in [e.kind for e in delivered], 10,
                       "a second event")
            wait_until(lambda: "on_event callback raised" in caplog.text, 5, "the log line")
    finally:
        pool.close()


def test_on_event_must_be_a_function(pg):
    """A value that cannot be called is refused when the configuration is read."""
    from greenpool import ConfigError
    from greenpool.config import parse_config

    with pytest.raises(ConfigError, match="on_event: expected a function taking a"):
        parse_config({"db": pg.endpoint(), "on_event": "alerts"})


@pytest.mark.timeout(30)
def test_a_callback_that_cannot_keep_up_keeps_the_latest_events(mode, caplog):
    """A callback blocked while 1005 events come: the oldest few are dropped with one
    warning, the latest 1000 are delivered in order once it goes on."""
    import threading

    from greenpool.concurrency import backend_for
    from greenpool.events import QUEUE_MAX, Events

    go = threading.Event()
    seen: list[str] = []

    def callback(event):
        if not seen:
            go.wait(10)
        seen.append(event.detail)

    events = Events(callback, backend_for(mode))
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        events.emit("back", detail="0")
        wait_until(lambda: not events._queue, 5, "the first event to be taken")
        for i in range(1, QUEUE_MAX + 5):
            events.emit("back", detail=str(i))
        go.set()
        wait_until(lambda: len(seen) == QUEUE_MAX + 1, 10, "the rest to be delivered")
    assert seen[:2] == ["0", "5"] and seen[-1] == str(QUEUE_MAX + 4)
    assert events.dropped == 4 and "cannot keep up" in caplog.text


@pytest.mark.timeout(120)
def test_events_report_a_switchover_as_promoted_and_demoted(pg_factory, mode):
    """A switchover: the primary stopped cleanly, its standby promoted, the old primary
    started again as a standby of the new one: "promoted" for the one, "demoted" for the
    other."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    events: list[PoolEvent] = []
    pool = Pool({"type": mode, "db": [primary.endpoint(connect_timeout=1), standby.endpoint()],
                 "groups": {"w": {"role": "primary", "connection_count": 2, "timeout": 10},
                            "r": {"role": "standby", "connection_count": 2, "timeout": 10}},
                 "maintenance_interval": 0.1, "role_check_interval": 0.05,
                 "quarantine_initial": 0.1, "quarantine_max": 0.3, "on_event": events.append})
    try:
        lend_all(pool, "w", 1, within=10)
        lend_all(pool, "r", 1, within=10)
        primary.stop("fast")
        standby.promote()
        (primary.datadir / "standby.signal").touch()
        primary._append_conf({"primary_conninfo": f"host={standby.host} port={standby.port} "
                                                  f"user={standby.user} "
                                                  f"password={standby.password}"})
        primary.start()
        wait_until(lambda: "promoted" in _kinds(events, _label(standby)), 30, "promoted")
        wait_until(lambda: "demoted" in _kinds(events, _label(primary)), 30, "demoted")
    finally:
        pool.close()


class _TaskEnded(BaseException):
    """What kills the delivering task from inside the callback (as greenlet.kill or a
    signal handler's exception would)."""


@pytest.mark.timeout(30)
def test_events_are_still_delivered_after_the_delivering_task_was_killed_in_the_callback(
        mode):
    """The callback's first call ends its task with a BaseException; the events emitted
    after it are delivered by a new task (the queue was not left marked as being
    delivered forever)."""
    from greenpool.concurrency import backend_for, resolve_mode
    from greenpool.events import Events

    if MODE == "non-threaded":
        pytest.skip("non-threaded delivers in the emitting caller: nothing to restart")
    seen = []

    def callback(event):
        seen.append(event.kind)
        if len(seen) == 1:
            raise _TaskEnded()

    events = Events(callback, backend_for(resolve_mode(mode)))
    events.emit("quarantined", endpoint="a")
    wait_until(lambda: seen == ["quarantined"], 10, "the first event")
    sleep(0.1)  # the killed task's unwinding
    events.emit("back", endpoint="a")
    wait_until(lambda: seen == ["quarantined", "back"], 10, "the event after the kill")


@pytest.mark.timeout(30)
def test_events_queued_at_fork_are_delivered_by_the_parent_only(mode):
    """Three events queued for a slow callback, then fork: a green delivering task goes on
    in the child too, and must not deliver the parent's queue there a second time (each
    forked worker would re-send the parent's alerts). Only the call in flight at the fork
    completes in both."""
    import json
    import os

    from greenpool.concurrency import backend_for, resolve_mode
    from greenpool.events import Events

    if MODE == "non-threaded":
        pytest.skip("non-threaded delivers in the emitting caller: nothing is queued")
    seen = []

    def callback(event):
        sleep(0.3)
        seen.append(event.kind)

    events = Events(callback, backend_for(resolve_mode(mode)))
    for kind in ("quarantined", "back", "promoted"):
        events.emit(kind, endpoint="a")
    sleep(0.1)  # the first call is in flight
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it delivered, then leave at once
        try:
            sleep(1.5)
            os.write(write, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    in_child = json.loads(os.read(read, 4096) or b"[]")
    os.close(read)
    wait_until(lambda: len(seen) == 3, 10, "the parent's deliveries")
    assert seen == ["quarantined", "back", "promoted"]
    assert in_child in ([], ["quarantined"]), in_child
