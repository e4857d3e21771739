"""Split brain is decided alike by every process, from the servers' own state
(timeline, then WAL position, then configuration order), and raised only for endpoints that
answer as primary now. Real primaries, promoted standbys and ``pg_ctl stop -m immediate``;
the role probe is bounded by a deadline (a backend stopped with SIGSTOP).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from endpoints import endpoint_stats, held_ports, label
from modes import GREEN, MODE, Timeout, join_all, sleep, spawn, wait_until

from greenpool.concurrency import backend_for
from greenpool.config import EndpointConfig
from greenpool.endpoint import PRIMARY, STANDBY, Endpoint
from greenpool.roles import candidates, primary_report, read_role

SPLIT = "split brain"


def split_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and SPLIT in r.getMessage()]


def write_port(pool: Any) -> int:
    with pool.handler("write") as db:
        return int(db.query_one("SELECT inet_server_port()")[0])


@pytest.fixture
def promoted_while_old_primary_runs(pg_factory) -> Iterator[tuple[Any, Any]]:
    """A primary and a standby of it, the standby then promoted while the primary runs on."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    yield primary, standby


def endpoints_of(*clusters: Any) -> list[Endpoint]:
    """Endpoints as one pool makes them: in configuration order, one set per pool."""
    return [Endpoint(EndpointConfig(host=c.host, port=c.port), 0.5, 30.0) for c in clusters]


def observe(endpoint: Endpoint, cluster: Any) -> None:
    """What group code does with a housekeeping probe: one bounded round trip, recorded."""
    conn = cluster.connect()
    try:
        report = read_role(conn, backend_for(MODE), 2.0)
    finally:
        conn.close()
    endpoint.observe_role(report.role, report.timeline, report.lsn)
    endpoint.lag = report.lag


def chosen(endpoints: list[Endpoint]) -> Endpoint:
    return candidates(endpoints, "primary", None, "use-primary")[0][0]


# --- the rule, fed from real servers -----------------------------------------------------------


def test_two_pools_started_before_and_after_a_promotion_choose_the_promoted_primary(
    promoted_while_old_primary_runs, caplog
):
    """One pool knew the old primary before the promotion, one starts after it and happens to
    see the old primary last: both choose the promoted standby (its timeline is higher, read
    right after ``pg_ctl promote``), and each reports the split once."""
    primary, standby = promoted_while_old_primary_runs
    early = endpoints_of(primary, standby)  # the old primary is first in the configuration
    observe(early[0], primary)
    observe(early[1], standby)
    assert [ep.role for ep in early] == [PRIMARY, STANDBY]
    assert chosen(early) is early[0]

    standby.promote()  # its new timeline is in its WAL file names at once
    late = endpoints_of(primary, standby)
    observe(late[1], standby)
    observe(late[0], primary)
    observe(early[1], standby)
    for _ in range(3):  # a few probe rounds, in opposite orders, with borrows in between
        for eps, order in ((early, (0, 1)), (late, (1, 0))):
            for i in order:
                observe(eps[i], (primary, standby)[i])
                assert chosen(eps) is eps[1]
    assert [ep.timeline for ep in early] == [ep.timeline for ep in late] == [1, 2]
    errors = split_errors(caplog)
    assert len(errors) == 2, "once per pool, not once per process nor once per call"
    for eps in (early, late):
        assert [ep.split_brain for ep in eps] == [1, 1]
    assert all(label(standby) in r.getMessage() and "timeline 2" in r.getMessage()
               for r in errors)


def test_an_old_primary_that_died_before_the_promotion_claims_nothing(pg_factory, caplog):
    """Its last answer as primary predates the promotion: no split brain, even while its
    endpoint still looks up (nobody has tried to connect since it died)."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    eps = endpoints_of(primary, standby)
    observe(eps[0], primary)
    observe(eps[1], standby)
    primary.stop("immediate")
    standby.promote()
    observe(eps[1], standby)
    assert eps[0].state == "up" and eps[0].role == PRIMARY  # stale, but not yet known so
    assert chosen(eps) is eps[1]
    assert not split_errors(caplog) and eps[0].split_brain == eps[1].split_brain == 0


def test_quarantined_probing_and_stale_primaries_are_not_claimants(
    promoted_while_old_primary_runs, caplog
):
    primary, standby = promoted_while_old_primary_runs
    standby.promote()
    eps = endpoints_of(primary, standby)
    observe(eps[0], primary)
    observe(eps[1], standby)
    observe(eps[0], primary)  # each answered since the other was first seen: both claim
    for state in ("quarantined", "probing"):
        eps[1].state = state  # what the health state machine sets (its own tests drive it)
        assert chosen(eps) is eps[0]
    eps[1].state = "up"
    eps[1].role_stale_after = 0.0  # its role was last seen longer ago than that
    assert chosen(eps) is eps[0]
    assert not split_errors(caplog)
    eps[1].role_stale_after = 60.0
    assert chosen(eps) is eps[1]
    assert len(split_errors(caplog)) == 1


# --- whole pools -------------------------------------------------------------------------------


def test_pools_made_before_and_after_a_promotion_write_to_the_same_primary(
    make_pool, promoted_while_old_primary_runs, caplog
):
    primary, standby = promoted_while_old_primary_runs
    db = [primary.endpoint(), standby.endpoint()]

    def make() -> Any:
        return make_pool({"write": {"role": "primary", "timeout": 2}}, db=db,
                         role_check_interval=0.1, maintenance_interval=0.05)

    early = make()
    assert write_port(early) == primary.port
    standby.promote()
    late = make()
    for pool in (early, late):
        wait_until(lambda: endpoint_stats(pool, standby)["timeline"] == 2, 5,  # noqa: B023
                   "housekeeping to read the promoted standby's timeline")
        wait_until(lambda: endpoint_stats(pool, primary)["split_brain"] == 1, 5,  # noqa: B023
                   "the split brain to be reported")
    assert write_port(early) == write_port(late) == standby.port
    assert len(split_errors(caplog)) == 2


def test_a_pool_never_reports_a_dead_old_primary_as_split_brain(make_pool, pg_factory, caplog):
    """The demo's case: the primary is stopped with ``-m immediate`` and stays dead while its
    standby is promoted; housekeeping keeps probing the dead one. Nothing is split."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool({"write": {"role": "primary", "timeout": 3}},
                     db=[primary.endpoint(), standby.endpoint()],
                     role_check_interval=0.1, maintenance_interval=0.05,
                     quarantine_initial=0.05, quarantine_max=0.1)
    assert write_port(pool) == primary.port
    primary.stop("immediate")
    standby.promote()
    wait_until(lambda: write_port(pool) == standby.port, 10, "writes to follow the promotion")
    attempts = endpoint_stats(pool, primary)["connect_attempts"]
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # borrows while the dead one is quarantined and probed
        assert write_port(pool) == standby.port
    assert endpoint_stats(pool, primary)["connect_attempts"] >= attempts + 3  # it was probed
    assert not split_errors(caplog)
    assert endpoint_stats(pool, primary)["split_brain"] == 0
    assert endpoint_stats(pool, standby)["split_brain"] == 0


# --- the probe's deadline ----------------------------------------------------------------------


@pytest.fixture
def stopped_backend(pg) -> Iterator[Callable[[], Any]]:
    """``stop()`` -> a connection whose server backend is stopped with SIGSTOP (resumed and
    closed at the end)."""
    stopped: list[tuple[Any, int]] = []

    def stop() -> Any:
        conn = pg.connect()
        stopped.append((conn, conn.get_backend_pid()))
        os.kill(stopped[-1][1], signal.SIGSTOP)
        return conn

    yield stop
    for conn, pid in stopped:
        os.kill(pid, signal.SIGCONT)
        conn.close()


@pytest.mark.skipif(not GREEN, reason="threaded mode needs socket-level timeouts: "
                    "backend.deadline() is a no-op there")
def test_role_probe_of_a_stalled_backend_gives_up_at_its_deadline(stopped_backend):
    conn = stopped_backend()
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match=r"role probe within 0\.30 s"):
        read_role(conn, backend_for(MODE), 0.3)
    assert 0.25 <= time.monotonic() - started < 1.5


@pytest.mark.skipif(not GREEN, reason="an outer green timeout exists only in the green modes")
def test_an_outer_timeout_during_the_probe_is_not_turned_into_a_probe_error(stopped_backend):
    conn = stopped_backend()
    conn.autocommit = False  # the probe switches it on; interrupted, it must not switch back
    outer = Timeout(0.2)
    with pytest.raises(type(outer)) as info, outer:
        read_role(conn, backend_for(MODE), 5.0)
    assert info.value is outer


def test_the_promotion_watch_sees_a_standby_as_none_and_its_promotion_with_the_new_timeline(
    pg_factory,
):
    """``primary_report``, the light question a waiting write group asks a standby many
    times a second, gives what the split-brain rule needs as the full probe does: nothing
    while in recovery, then, on the same connection opened before the promotion, the
    primary's new timeline and a WAL position."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    backend = backend_for(MODE)
    old, watched = primary.connect(), standby.connect()
    try:
        full = read_role(old, backend, 5.0)
        light = primary_report(old, backend, 5.0)
        assert light is not None and (light.role, light.timeline) == (PRIMARY, full.timeline)
        assert light.lsn is not None and light.lsn >= (full.lsn or 0)
        assert primary_report(watched, backend, 5.0) is None
        standby.promote()
        promoted = primary_report(watched, backend, 5.0)
        assert promoted is not None and promoted.role == PRIMARY
        assert promoted.timeline == (full.timeline or 0) + 1
    finally:
        old.close()
        watched.close()


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan])
def test_a_probe_with_no_time_left_sends_nothing(pg, seconds):
    conn = pg.connect()
    try:
        with pytest.raises(psycopg2.OperationalError, match="no time left"):
            read_role(conn, backend_for(MODE), seconds)
        assert read_role(conn, backend_for(MODE), 5.0).role == PRIMARY  # still usable
        assert conn.autocommit is True
    finally:
        conn.close()


# --- a fresh pool during a split brain ---------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_fresh_pool_never_writes_to_the_old_primary_during_a_split_brain(
    make_pool, promoted_while_old_primary_runs, caplog
):
    """Two primaries at once: the old one (timeline 1, first in the configuration) runs on
    after its standby was promoted (timeline 2). Fresh pools, used at once after ``Pool()``
    (no housekeeping round has run yet), send every one of their first 30 writes to the
    promoted one: none lands on the old primary."""
    primary, standby = promoted_while_old_primary_runs
    primary.execute("CREATE TABLE marks (port int)")
    wait_until(lambda: standby.execute("SELECT to_regclass('marks') IS NOT NULL")[0][0], 10,
               "the table to reach the standby")
    standby.promote()
    db = [primary.endpoint(), standby.endpoint()]
    ports = []
    for _ in range(4):  # each fresh pool starts its rotation at a random endpoint
        pool = make_pool({"write": {"role": "primary", "connection_count": 4, "timeout": 5}},
                         db=db)
        for _ in range(30):
            with pool.handler("write") as db_:
                ports.append(db_.query_one(
                    "INSERT INTO marks SELECT inet_server_port() RETURNING port")[0])
        pool.close()
    on_old = primary.execute("SELECT count(*) FROM marks")[0][0]
    assert (on_old, ports.count(primary.port)) == (0, 0), (
        f"{on_old} of {len(ports)} writes of fresh pools went to the old primary")
    assert ports == [standby.port] * len(ports)


@pytest.mark.timeout(60)
def test_a_split_brain_is_never_reported_with_an_unread_timeline(
    make_pool, promoted_while_old_primary_runs, caplog
):
    """Fresh pools meet both primaries of a split brain at once, before their first probe:
    right after ``Pool()`` each holds three connections together (connects to both
    servers). Whatever they log before their probes have read the timelines, no message
    says "timeline None"; once read, the split brain is reported naming timeline 2."""
    primary, standby = promoted_while_old_primary_runs
    standby.promote()
    with caplog.at_level(logging.INFO, logger="greenpool"):
        for _ in range(5):
            pool = make_pool({"write": {"role": "primary", "timeout": 5}},
                             db=[primary.endpoint(), standby.endpoint()],
                             role_check_interval=0.1, maintenance_interval=0.05)
            held_ports(pool, "write", 3)
            for _ in range(10):
                write_port(pool)
            wait_until(lambda: endpoint_stats(pool, standby)["timeline"] == 2  # noqa: B023
                       and endpoint_stats(pool, standby)["split_brain"] >= 1, 10,  # noqa: B023
                       "housekeeping to read the timelines and report the split brain")
            for _ in range(5):
                write_port(pool)
            pool.close()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "timeline None" in m], messages
    assert any("timeline 2" in r.getMessage() for r in split_errors(caplog))


@pytest.mark.timeout(60)
def test_a_group_full_of_connections_to_the_old_primary_still_moves_to_the_promoted_one(
    make_pool, promoted_while_old_primary_runs
):
    """Fresh pools fill their group (three connections held together right after
    ``Pool()``) while both servers answer as primary; the connections are then idle.
    Housekeeping's role probe must still reach the promoted server, although the group has
    no room for a probe connection and may have no idle connection to it: within a few
    probe rounds (0.1 s each) writes move there and stay there. Up to six fresh pools,
    since where a cold group's connects land first varies."""
    primary, standby = promoted_while_old_primary_runs
    standby.promote()
    stuck: list[dict[str, Any]] = []
    for _ in range(6):
        if stuck:
            break
        pool = make_pool({"write": {"role": "primary", "connection_count": 3, "timeout": 5}},
                         db=[primary.endpoint(), standby.endpoint()],
                         role_check_interval=0.1, maintenance_interval=0.05)
        held_ports(pool, "write", 3)
        deadline = time.monotonic() + 5
        while write_port(pool) != standby.port and time.monotonic() < deadline:
            sleep(0.02)
        ports = [write_port(pool) for _ in range(10)]
        if ports != [standby.port] * 10:
            stuck.append({"ports": ports, "endpoints": pool.stats()["endpoints"]})
        pool.close()
    assert not stuck, f"writes still went to the old primary 5 s on: {stuck}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("order", ["old primary first", "standby first"])
def test_a_busy_full_group_moves_its_writes_to_a_standby_promoted_meanwhile_and_stays(
    make_pool, promoted_while_old_primary_runs, order
):
    """A running ``role: 'primary'`` group (``connection_count`` 2) kept full by two writer
    tasks; its standby is promoted while the old primary runs on. Within a few
    ``role_check_interval`` (0.3 s) the writes land on the promoted server, and from the
    first one that does, none goes back to the old primary."""
    primary, standby = promoted_while_old_primary_runs
    primary.execute("CREATE TABLE marks (port int)")
    wait_until(lambda: standby.execute("SELECT to_regclass('marks') IS NOT NULL")[0][0], 10,
               "the table to reach the standby")
    db = [primary.endpoint(), standby.endpoint()]
    if order == "standby first":
        db.reverse()
    pool = make_pool({"write": {"role": "primary", "connection_count": 2}}, db=db,
                     role_check_interval=0.3, maintenance_interval=0.1)
    log: list[tuple[float, Any]] = []
    running = [True]

    def writer() -> None:
        while running[0]:
            try:
                with pool.handler("write", timeout=1) as db_:
                    port = db_.query_one("INSERT INTO marks SELECT inet_server_port() "
                                         "RETURNING port")[0]
                log.append((time.monotonic(), port))
            except Exception as exc:
                log.append((time.monotonic(), type(exc).__name__))
            sleep(0.02)

    tasks = [spawn(writer) for _ in range(2)]
    try:
        wait_until(lambda: len(log) >= 20, 10, "the writers to get going")
        assert {port for _, port in log} == {primary.port}, log
        standby.promote()
        promoted = time.monotonic()
        wait_until(lambda: any(port == standby.port for _, port in log), 10,
                   "a write to land on the promoted server")
        moved = next(at for at, port in log if port == standby.port)
        wait_until(lambda: log[-1][0] > moved + 3, 10, "writes for 3 s more")
    finally:
        running[0] = False
        join_all(tasks, 10)
    after = [port for at, port in log if at >= moved]
    assert primary.port not in after, (
        f"{after.count(primary.port)} of {len(after)} writes went back to the old primary "
        f"after the first one on the promoted server")
    assert moved - promoted < 3, f"writes moved {moved - promoted:.2f} s after the promotion"
    assert after.count(standby.port) >= 20, after
