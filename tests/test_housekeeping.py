"""Housekeeping's role and lag probe keeps the group's accounting exact when it fails.

The probe borrows an idle connection of a group (or opens one within the group's room); when
the server does not answer it, that connection is discarded and its slot must go back to
the group. Real faults only: ``pg_ctl restart -m fast`` under a warm pool, and a backend
stopped with SIGSTOP while the probe waits on it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from endpoints import endpoint_stats, label
from lending import discards, group_stats, lend_all
from modes import GREEN, MODE, sleep, wait_until

from greenpool import ConnectFailed, PoolTimeout

SIZE = 3
PROBING = {"role_check_interval": 0.05, "maintenance_interval": 0.1}


def primary_group(**extra):
    return {"g": {"role": "primary", "connection_count": SIZE, "timeout": 5, **extra}}


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
@pytest.mark.timeout(120)
def test_role_probe_on_connections_a_restart_killed_gives_every_slot_back(make_pool, pg_factory):
    """Four ``pg_ctl restart -m fast`` of a warm primary: each time housekeeping's next role
    probe meets a dead idle connection and discards it (with its dead peers). After each
    restart the group still lends all ``connection_count`` connections at the same time."""
    server = pg_factory()
    pool = make_pool(primary_group(), db=server.endpoint(), **PROBING)
    old_pids = set(lend_all(pool, "g", SIZE, within=5))  # warm: SIZE idle connections
    for restart in range(4):
        # a probe (every 50 ms) may hold one idle connection for a moment
        wait_until(lambda: group_stats(pool, "g")["idle"] == SIZE, 5, "every connection idle")
        before = discards(pool, "g")
        server.restart("fast")
        wait_until(lambda b=before: discards(pool, "g") >= b + SIZE, 10,
                   "housekeeping to discard the connections the restart killed")
        wait_until(lambda: group_stats(pool, "g")["connecting"] == 0, 10, "connects to end")
        pids = lend_all(pool, "g", SIZE, within=5)
        assert len(set(pids)) == SIZE and not set(pids) & old_pids, f"restart {restart + 1}"
        old_pids |= set(pids)
    stats = group_stats(pool, "g")
    assert stats["size"] <= SIZE and stats["in_use"] == 0


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
@pytest.mark.timeout(120)
def test_role_probe_timed_out_on_a_stalled_backend_gives_its_slot_back(make_pool, pg_factory):
    """The idle connection the role probe takes (the most recently returned one) has its
    backend stopped with SIGSTOP: the probe gets no answer within ``connect_timeout`` and
    discards it. Twice; after each time the group still lends all its connections at once."""
    server = pg_factory()
    pool = make_pool(primary_group(), db=server.endpoint(connect_timeout=0.5), **PROBING)
    group = pool.group("g")
    for stall in range(2):
        lend_all(pool, "g", SIZE, within=5)
        # the returns' resets are round trips, during which a probe may take a returned one
        wait_until(lambda: group_stats(pool, "g")["idle"] == SIZE, 5, "every connection idle")
        latest = group._idle[-1].raw.get_backend_pid()  # the one the next probe takes
        before = discards(pool, "g", "failed_check")
        os.kill(latest, signal.SIGSTOP)
        try:
            wait_until(lambda b=before: discards(pool, "g", "failed_check") > b, 10,
                       "the role probe to give up on the stalled backend")
        finally:
            os.kill(latest, signal.SIGCONT)
        wait_until(lambda: group_stats(pool, "g")["connecting"] == 0, 10, "connects to end")
        assert len(set(lend_all(pool, "g", SIZE, within=5))) == SIZE, f"stall {stall + 1}"


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
@pytest.mark.timeout(120)
def test_role_probe_of_a_stalled_standby_leaves_a_primary_group_its_room(make_pool, pg_factory):
    """A ``role: 'primary'`` group (``connection_count`` 3) over a primary and its standby.
    The standby's postmaster is stopped with SIGSTOP, so housekeeping's next role probe of
    it hangs in its connect (``connect_timeout`` 3). That probe is not the group's business
    (it never uses a standby) and must not hold its room: with two connections lent, a
    borrow with 1 s to spare gets a third one, on the primary, while the probe hangs."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool({"w": {"role": "primary", "connection_count": 3}},
                     db=[primary.endpoint(connect_timeout=3), standby.endpoint(connect_timeout=3)],
                     role_check_interval=0.3, maintenance_interval=0.1)
    group = pool.group("w")
    held = [group.acquire(timeout=10)]
    stopped = None
    try:
        wait_until(lambda: endpoint_stats(pool, standby)["role"] == "standby", 10,
                   "housekeeping to probe the standby")
        wait_until(lambda: group.stats()["connecting"] == 0, 10, "the group's connects to end")
        for pc in group._take_idle(list):  # the probe must find the group with room
            group.discard(pc, "rebalance")
        (to_standby,) = [ep for ep in group.endpoints if ep.label == label(standby)]
        wait_until(lambda: to_standby.connecting == 0, 10, "probes of the standby to end")
        attempts = to_standby.connect_attempts
        stopped = standby.pid
        os.kill(stopped, signal.SIGSTOP)
        wait_until(lambda: to_standby.connect_attempts > attempts and to_standby.connecting, 10,
                   "a role probe to hang in its connect to the stalled standby")
        held.append(group.acquire(timeout=1))  # two lent (idle or new)
        started = time.monotonic()
        try:
            pc = group.acquire(timeout=1)
        except PoolTimeout as exc:
            raise AssertionError(f"no third connection while the probe hangs: {exc}; "
                                 f"group {group.stats()}") from None
        took = time.monotonic() - started
        held.append(pc)
        assert to_standby.connecting, "the probe ended before the third borrow did"
        for pc in held:
            assert pc.endpoint.label == label(primary)
            with pc.raw.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                assert cursor.fetchone() == (False,)
        assert took < 1.5
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        for pc in held:
            group.release(pc)


# --- refresh pings of idle connections ---------------------------------------------------


@pytest.mark.skipif(not GREEN, reason="housekeeping pings in a green task")
@pytest.mark.timeout(60)
def test_a_stalled_ping_does_not_hold_healthy_idle_connections_hostage(make_pool, pg):
    """Housekeeping pings min_size connections due for a refresh one at a time: with the
first one's backend stopped (SIGSTOP), its ping waits, but the healthy one stays idle
and serves a borrower with a 1 s budget (it is not taken out for a ping at the same time)."""
    pool = make_pool({"g": {"connection_count": 2, "min_size": 2, "max_idle": 1.0}},
                     db=pg.endpoint(connect_timeout=4), maintenance_interval=0.1)
    group = pool.group("g")
    first, second = group.acquire(timeout=5), group.acquire(timeout=5)
    stalled = first.raw.get_backend_pid()
    group.release(first)  # the oldest returned: pinged first
    group.release(second)
    os.kill(stalled, signal.SIGSTOP)
    try:
        wait_until(lambda: group.stats()["idle"] == 1, 3, "housekeeping to take one")
        with pool.handler("g", timeout=1.0) as db:
            assert db.query_one("SELECT pg_backend_pid()")[0] != stalled
    finally:
        os.kill(stalled, signal.SIGCONT)


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
@pytest.mark.timeout(120)
def test_standby_back_with_every_group_full_is_measured_and_then_read_from(
    make_pool, pg_factory
):
    """A standby whose lag is unknown (its WAL receiver stopped; an old leader rewound and
    back as a replica) starts streaming again while every group is full and busy. No group
    should be on it, so housekeeping measures it on a short-lived connection of its own,
    not within a group's room: its lag is known again within a few role checks (it stayed
    unknown for good when those probes waited for room, which the busy groups, or probes of
    the other endpoints, always took first). Once connections come back, the max_lag group
    reads from it."""
    primary = pg_factory()
    primary.execute("CREATE TABLE ticks (id serial)")
    serving, back = pg_factory(standby_of=primary), pg_factory(standby_of=primary)
    conninfo = str(back.execute("SELECT setting FROM pg_settings"
                                " WHERE name = 'primary_conninfo'")[0][0])

    def set_conninfo(value: str) -> None:
        back.execute("ALTER SYSTEM SET primary_conninfo = %s", (value,))
        back.execute("SELECT pg_reload_conf()")

    set_conninfo("")  # its WAL receiver stops: lag unknown
    wait_until(lambda: back.execute("SELECT count(*) FROM pg_stat_wal_receiver")[0][0] == 0,
               10, "the WAL receiver to stop")
    groups = {"write": {"role": "primary", "connection_count": 1, "timeout": 5},
              "read": {"role": "standby", "max_lag": 1, "connection_count": 2, "timeout": 5,
                       "autocommit": True}}
    pool = make_pool(groups, db=[primary.endpoint(), serving.endpoint(), back.endpoint()],
                     **PROBING, quarantine_initial=0.05)
    def lag(cluster) -> float:
        measured = endpoint_stats(pool, cluster)["lag"]
        return float("inf") if measured is None else float(measured)

    wait_until(lambda: lag(back) == float("inf") and lag(serving) <= 1, 10,
               "housekeeping to measure both standbys")
    write, read = pool.group("write"), pool.group("read")
    held = [(write, write.acquire()), (read, read.acquire()), (read, read.acquire())]
    try:
        assert [pc.endpoint.label for _g, pc in held] == [label(primary)] + [label(serving)] * 2
        set_conninfo(conninfo)  # it streams again
        wait_until(lambda: back.execute("SELECT count(*) FROM pg_stat_wal_receiver"
                                        " WHERE status = 'streaming'")[0][0] == 1,
                   10, "the WAL receiver to stream")
        primary.execute("INSERT INTO ticks DEFAULT VALUES")  # something to replay
        try:  # its receiver counts once it has lived RECEIVER_SETTLE (1 s)
            wait_until(lambda: lag(back) <= 1, 5,
                       "the returned standby's lag to be measured while every group is full")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {endpoint_stats(pool, back)}") from None
    finally:
        for group, pc in held:
            group.release(pc)

    def read_port() -> int:
        with pool.handler("read") as db:
            return int(db.query_one("SELECT inet_server_port()")[0])

    wait_until(lambda: read_port() == back.port, 10, "a read served by the returned standby")


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
@pytest.mark.timeout(60)
def test_a_full_group_still_finds_out_that_an_endpoint_it_has_no_connection_on_died(
        make_pool, pg_factory):
    """A standby group over two standbys, full with its one connection on the first. The
    second, where the group may go but has no connection, stops: housekeeping finds it out
    (one short-lived connection, outside the full group), so it is not reported up while
    dead (as an old primary was, after a failover under load)."""
    primary = pg_factory()
    first, second = pg_factory(standby_of=primary), pg_factory(standby_of=primary)
    pool = make_pool({"r": {"role": "standby", "connection_count": 1, "timeout": 10}},
                     db=[first.endpoint(), second.endpoint()], **PROBING)
    group = pool.group("r")
    held = group.acquire()
    try:
        wait_until(lambda: endpoint_stats(pool, second)["role"] == "standby", 10,
                   "housekeeping to learn the second standby's role")
        dead = second if held.endpoint.label == label(first) else first  # the one it lacks
        assert group.counts.get(held.endpoint) == 1 and sum(group.counts.values()) == 1
        dead.stop("immediate")
        wait_until(lambda: endpoint_stats(pool, dead)["state"] != "up", 10,
                   "housekeeping to find the stopped standby down")
    finally:
        group.release(held, discard="test")


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
def test_role_probes_leave_an_endpoint_alone_for_a_group_it_refused(make_pool, pg):
    """A primary group's configure hook raises: the endpoint refused the group ("retrying
    cannot help"). Housekeeping's role probes, every 50 ms, open no connection for that
    group meanwhile: each one ran the broken hook again, failing and logging it with its
    traceback for as long as the process lived."""
    calls = []

    def broken(raw):
        calls.append(time.monotonic())
        raise RuntimeError("broken hook")

    pool = make_pool({"g": {"role": "primary", "timeout": 1, "configure": broken}}, **PROBING)
    with pytest.raises(ConnectFailed), pool.handler("g"):
        pass
    # (a connect begun before the refusal may still run the hook: let those end)
    wait_until(lambda: pool._endpoints[0].connecting == 0, 5, "connects under way to end")
    refused_at = time.monotonic()
    errors = group_stats(pool, "g")["connect_errors"]
    sleep(0.5)  # ten role checks
    assert [round(t - refused_at, 2) for t in calls if t > refused_at] == []
    assert group_stats(pool, "g")["connect_errors"] == errors


@pytest.mark.timeout(60)
def test_a_quarantine_probe_interrupted_while_it_reads_the_role_leaves_the_endpoint_free(
        make_pool, pg):
    """The probe of a quarantined endpoint is killed (a ``KeyboardInterrupt``, a greenlet's
    kill) while it waits for its role query: no verdict, and the endpoint must not stay
    ``probing``, where no connect or probe may touch it again (every borrow failed with
    NoHealthyEndpoint for the pool's life, the server up). The next probe brings it up."""
    from faults import raising_once_at_the_call_of

    from greenpool.endpoint import QUARANTINED, UP
    from greenpool.roles import read_role

    pool = make_pool({"g": {"connection_count": 1}}, db=pg.endpoint(connect_timeout=2),
                     quarantine_initial=0.1, quarantine_max=0.1)
    pool._housekeeping.stop()  # its probe is the one run here, by hand
    group = pool.group("g")
    (endpoint,) = group.endpoints
    held = group.acquire(5)  # the group is full: none of its own connects runs meanwhile
    try:
        # a connect failure as the connector records it (the server itself stays up)
        assert endpoint.begin_connect(time.monotonic())
        endpoint.connect_failed("connection refused")
        assert endpoint.state == QUARANTINED
        wait_until(lambda: endpoint.may_connect(time.monotonic()), 5, "the quarantine to end")
        probe = pool._housekeeping._probe_outside_groups
        with raising_once_at_the_call_of(read_role.__code__, KeyboardInterrupt()) as fired, \
                pytest.raises(KeyboardInterrupt):
            probe(group, endpoint)
        assert fired
        assert (endpoint.state, endpoint.connecting) == (QUARANTINED, 0)
        probe(group, endpoint)
        assert endpoint.state == UP
    finally:
        group.release(held)


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
@pytest.mark.timeout(60)
def test_a_fork_while_a_quarantine_probe_reads_the_role_leaves_the_probe_to_the_parent(
        make_pool, pg):
    """The probe's role query (held 1.5 s by a proxy) is under way when the process forks;
    the child lives on 3 s (in the green modes with its copy of the probe). The child's copy
    must neither read the parent's reply nor close its session: the parent's probe brings
    the endpoint up."""
    from delayproxy import DelayProxy
    from forking import fork_a_bystander
    from modes import join_all, spawn

    from greenpool.endpoint import QUARANTINED, UP

    with DelayProxy(pg.port, 1.5, b"pg_is_in_recovery") as proxy:
        pool = make_pool({"g": {"connection_count": 1}},
                         db=proxy.endpoint(pg, connect_timeout=5),
                         quarantine_initial=0.1, quarantine_max=0.1)
        pool._housekeeping.stop()  # its probe is the one run here, by hand
        group = pool.group("g")
        (endpoint,) = group.endpoints
        held = group.acquire(10)  # the group is full: none of its own connects runs meanwhile
        try:
            assert endpoint.begin_connect(time.monotonic())
            endpoint.connect_failed("connection refused")  # as the connector records it
            assert endpoint.state == QUARANTINED
            wait_until(lambda: endpoint.may_connect(time.monotonic()), 5, "the quarantine end")
            before = proxy.held()
            prober = spawn(pool._housekeeping._probe_outside_groups, group, endpoint)
            wait_until(lambda: proxy.held() > before, 10, "the probe's role query, held")
            child = fork_a_bystander(3)
            join_all([prober], 10)
            _, status = os.waitpid(child, 0)
            assert status == 0
            assert prober.error is None, prober.error
            assert endpoint.state == UP
        finally:
            group.release(held)
