"""Failover drills under load against a real Patroni cluster
(greenpool.testing.patroni): one etcd, three PostgreSQL nodes with ``synchronous_mode:
true``, HAProxy in front.

One cluster serves the whole module (it takes ~10 s to start); before each drill the
``restored`` fixture brings it back to one leader and two streaming replicas, with every
Patroni and etcd running, replay resumed and an empty ``drill`` table. Each drill runs 50
tasks (25 writers on a ``write`` group with role primary, 25 readers on a ``read`` group with
role standby and ``max_lag``) through a pool listing the three nodes (``direct``) or, where
noted, HAProxy's two listeners (``haproxy``). Times are measured from the load's own records
and Patroni's REST API, polled with deadlines; nothing waits a fixed time for an outcome.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from machine import turn
from modes import MODE
from patroni_load import TABLE, Load, wait_for

from greenpool import Pool
from greenpool.testing.patroni import PatroniCluster, PatroniNode, missing

#: a drill's bound, plus waiting for the other modes' test runs to finish their drills (see
#: the ``patroni`` fixture)
pytestmark = pytest.mark.timeout(480)
#: eventlet runs the kill drill (direct endpoints) only, to keep CI within its budget (the
#: module takes about 2 minutes per mode); eventlet shares gevent's cooperative waits
NOT_IN_EVENTLET = pytest.mark.skipif(MODE == "eventlet", reason=(
    "in eventlet mode only the kill drill through direct endpoints runs (CI budget); the"
    " others run in gevent and threaded mode"))

MAX_LAG = 1.0
ROLE_CHECK = 0.25
SECRET = "Patroni-S3cret-pw"
# a lag is measured every ROLE_CHECK, so a read may be that much older than max_lag
# (plus scheduling on 2 shared cores)
STALE_BOUND = MAX_LAG + ROLE_CHECK + 0.5
RESUME_SLACK = 1.0  # writes resume within Patroni's failover (or switchover) time + this


@pytest.fixture(scope="module")
def patroni() -> Iterator[PatroniCluster]:
    reason = missing(haproxy=True)
    if reason:
        pytest.skip(reason)
    # the drills time failovers against Patroni's own timers: the modes' test runs, which
    # run at once, take turns for the whole module rather than share the 2 cores
    with turn("patroni", timeout=360), PatroniCluster(
            synchronous_mode=True, haproxy=True, password=SECRET) as cluster:
        yield cluster
        logs = [p for p in cluster.root.rglob("*") if p.is_file() and p.suffix in (".log", "")
                and "log" in p.name]
        leaked = [str(p) for p in logs if SECRET in p.read_text(errors="replace")]
        assert logs and not leaked, f"the password is in {leaked}"


def _restore(pc: PatroniCluster) -> None:
    pc.resume_etcd()
    for node in pc.nodes:
        node.resume()
        node.start()
    pc.wait_for(lambda: pc.leader() is not None, 60, "a leader")
    pc.maintenance(False)
    for node in pc.nodes:
        try:
            if node.execute("SELECT pg_is_in_recovery() AND pg_is_wal_replay_paused()")[0][0]:
                node.execute("SELECT pg_wal_replay_resume()")
        except psycopg2.Error:
            pass  # not up yet: Patroni starts it with replay running
    pc.wait_healthy(90)


@pytest.fixture
def restored(patroni: PatroniCluster) -> Iterator[PatroniCluster]:
    """The shared cluster healthy, with an empty ``drill`` table on every node."""
    _restore(patroni)
    leader = patroni.leader()
    assert leader is not None
    leader.execute(f"DROP TABLE IF EXISTS {TABLE}")
    leader.execute(f"CREATE TABLE {TABLE} (id bigint NOT NULL)")  # no unique index: see Load
    leader.execute(f"CREATE INDEX ON {TABLE} (id)")
    wait_for(lambda: all(_has_table(n) for n in patroni.nodes), 30, "the table on every node")
    yield patroni
    _restore(patroni)


def _has_table(node: PatroniNode) -> bool:
    try:
        return bool(node.execute(f"SELECT to_regclass('{TABLE}') IS NOT NULL")[0][0])
    except psycopg2.Error:
        return False


def make_pool(pc: PatroniCluster, via: str, read_connections: int = 30) -> Any:
    """The drills' pool: 10 write connections for 25 writers, and by default 30 read
    connections for 25 readers: room for housekeeping's role and lag probes on idle
    connections (a saturated group gets none: its borrows measure a lag that went stale)."""
    groups: dict[str, Any] = {
        "write": {"role": "primary", "connection_count": 10, "timeout": 30},
        "read": {"role": "standby", "connection_count": read_connections, "timeout": 30,
                 "autocommit": True, "max_lag": MAX_LAG},
    }
    if via == "direct":
        db = [node.endpoint(connect_timeout=2) for node in pc.nodes]
    else:
        db = [pc.haproxy_endpoint("primary", connect_timeout=2),
              pc.haproxy_endpoint("replica", connect_timeout=2)]
        groups["write"]["endpoints"] = [0]
        groups["read"]["endpoints"] = [1]
    # housekeeping probes roles at most once a round: rounds of ROLE_CHECK let the role
    # checks run every ROLE_CHECK (with the default round of 1 s they run once a second)
    return Pool({"type": MODE, "db": db, "groups": groups, "role_check_interval": ROLE_CHECK,
                 "maintenance_interval": ROLE_CHECK, "quarantine_initial": 0.05,
                 "quarantine_max": 1.0})


def _rows(node: PatroniNode) -> list[int]:
    return [r[0] for r in node.execute(f"SELECT id FROM {TABLE}")]


def _new_leader(pc: PatroniCluster, old: PatroniNode, timeout: float) -> PatroniNode:
    """The node Patroni reports as the new leader, once it accepts writes (Patroni may
    report the leader before its promotion ends: seen up to 5 s before, in threaded mode)."""
    found: list[PatroniNode] = []

    def elected() -> bool:
        leader = pc.leader()
        if leader is None or leader is old:
            return False
        try:
            if leader.execute("SELECT pg_is_in_recovery()")[0][0]:
                return False
        except psycopg2.Error:
            return False
        found.append(leader)
        return True

    wait_for(elected, timeout, "Patroni to elect a new leader that accepts writes",
             interval=0.02)
    return found[0]


def _started(load: Load, pc: PatroniCluster) -> None:
    """Wait for load on the leader and on at least one replica."""
    wait_for(lambda: len(load.acked) >= 100 and len(load.reads) >= 100, 30,
             "writes and reads under way")


# --- 1. the leader dies --------------------------------------------------------------------


@pytest.mark.parametrize("via", ["direct", pytest.param("haproxy", marks=NOT_IN_EVENTLET)])
def test_leader_killed_writes_resume_on_new_leader_and_no_acknowledged_write_is_lost(
    restored: PatroniCluster, via: str
) -> None:
    """Drill 1: the leader's PostgreSQL and Patroni are SIGKILLed under load. Writes resume on
    the new leader within 1 s of Patroni reporting it, promoted (its failover time + 1 s); with
    synchronous_mode every acknowledged write is on the new leader, no write reported failed
    is, and no id is there twice (nothing whose outcome was unknown was replayed)."""
    pc = restored
    old = pc.leader()
    assert old is not None
    pool = make_pool(pc, via)
    load = Load(pool).start()
    try:
        _started(load, pc)
        killed = time.monotonic()
        old.kill()
        new = _new_leader(pc, old, pc.failover_time + 10)
        elected = time.monotonic()
        resumed = wait_for(lambda: load.first_ack_on(new.port, killed) is not None,
                           pc.failover_time + 10, "a write acknowledged by the new leader")
        wait_for(lambda: len(load.acks_on(new.port, killed)) >= 200, 20, "200 new writes")
    finally:
        load.stop()
        pool.close()
    first = load.first_ack_on(new.port, killed)
    assert first is not None
    print(f"\n[{MODE}/{via}] kill->Patroni leader promoted {elected - killed:.2f} s,"
          f" kill->first write {first - killed:.2f} s (seen {resumed - killed:.2f} s);"
          f" {load.summary()}")
    # through HAProxy the new leader is in its listener only at its next check (every 0.3 s)
    slack = RESUME_SLACK + (0.3 if via == "haproxy" else 0.0)
    assert first - killed <= elected - killed + slack, (
        f"writes resumed {first - killed:.2f} s after the kill, Patroni had a leader after"
        f" {elected - killed:.2f} s")
    assert not load.acks_on(old.port, killed + 0.5), "a dead server acknowledged writes"
    load.check_rows(_rows(new))


# --- 2. the old leader comes back as a replica ----------------------------------------------


@NOT_IN_EVENTLET
def test_old_leader_returns_as_replica_used_for_reads_never_for_writes_and_never_stale(
    restored: PatroniCluster,
) -> None:
    """Drill 2: after a failover the killed leader is started again; Patroni rewinds it
    (pg_rewind, or re-initialises it) and it streams from the new leader. The read group
    uses it again, the write group never does, and no read anywhere is older than max_lag
    (plus one role check)."""
    pc = restored
    old = pc.leader()
    assert old is not None
    pool = make_pool(pc, "direct")
    load = Load(pool).start()
    try:
        _started(load, pc)
        killed = time.monotonic()
        old.kill()
        new = _new_leader(pc, old, pc.failover_time + 10)
        wait_for(lambda: load.first_ack_on(new.port, killed) is not None, 15,
                 "writes on the new leader")
        old.start()
        wait_for(lambda: pc.streaming(old), 60, "the old leader to stream from the new one")
        back = time.monotonic()
        try:
            wait_for(lambda: len(load.reads_on(old.port, back)) >= 50, 20,
                     "reads served by the old leader again")
        except AssertionError as exc:
            from greenpool.roles import PROBE_SQL
            try:
                probe: Any = old.execute(PROBE_SQL)
                receiver: Any = old.execute("SELECT pid, status, receive_start_lsn,"
                                            " latest_end_lsn FROM pg_stat_wal_receiver")
            except psycopg2.Error as err:
                probe = receiver = repr(err)
            raise AssertionError(f"{exc}; endpoints: {pool.stats()['endpoints']};"
                                 f" read group: {pool.stats()['groups']['read']};"
                                 f" probe on the old leader: {probe}; its receiver:"
                                 f" {receiver}") from None
        # keep the load on a little longer: writes must still all go to the new leader
        wait_for(lambda: len(load.acks_on(new.port, back)) >= 200, 20, "200 writes after it")
    finally:
        load.stop()
        pool.close()
    print(f"\n[{MODE}] old leader streaming {back - killed:.2f} s after the kill; longest"
          f" time without a read {load.longest_read_gap(killed, back):.2f} s; {load.summary()}")
    assert not load.acks_on(old.port, killed + 0.5), "the demoted server acknowledged writes"
    assert all(r.in_recovery for r in load.reads_on(old.port, killed))
    stale = load.stale_reads(STALE_BOUND)
    assert not stale, f"{len(stale)} reads older than {STALE_BOUND} s, e.g. {stale[:3]}"
    load.check_rows(_rows(new))


# --- 3. planned switchover -------------------------------------------------------------------


@NOT_IN_EVENTLET
@pytest.mark.parametrize("via", ["direct", "haproxy"])
def test_switchover_reads_see_no_error_and_writes_pause_no_longer_than_it(
    restored: PatroniCluster, via: str
) -> None:
    """Drill 3: ``patronictl switchover`` to a replica under load. The read group sees no
    error at all; the longest time without an acknowledged write is no longer than the
    switchover command took (+ 1 s); nothing acknowledged is lost."""
    pc = restored
    old = pc.leader()
    assert old is not None
    pool = make_pool(pc, via)
    load = Load(pool).start()
    try:
        _started(load, pc)
        began = time.monotonic()
        pc.switchover()
        ended = time.monotonic()
        new = pc.leader()
        assert new is not None and new is not old
        wait_for(lambda: len(load.acks_on(new.port, ended)) >= 200, 20,
                 "200 writes on the new leader")
        settled = time.monotonic()
    finally:
        load.stop()
        pool.close()
    gap = load.longest_write_gap(began - 1.0, settled)
    print(f"\n[{MODE}/{via}] switchover {ended - began:.2f} s, longest write gap {gap:.2f} s;"
          f" {load.summary()}")
    assert not load.read_errors, f"read errors: {load.read_errors[:5]}"
    assert gap <= ended - began + RESUME_SLACK
    load.check_rows(_rows(new))


@NOT_IN_EVENTLET
def test_haproxy_replica_listener_routed_to_the_primary_for_a_moment_is_read_from_again(
    restored: PatroniCluster,
) -> None:
    """Drill 3b: HAProxy's replica listener routes to the leader (restarted with a
    ``/primary`` check: every session cut, reconnects land on the primary) until the read
    group has seen the primary and dropped its connections there, then to the replicas
    again (what a switchover through HAProxy does by chance). Reads go to the replicas
    again within a few role checks, and none waits out its timeout."""
    pc = restored
    pool = make_pool(pc, "haproxy")
    load = Load(pool).start()
    try:
        _started(load, pc)
        pc.restart_haproxy(replica_check="/primary")
        listener = f"127.0.0.1:{pc.replica_port}/postgres"

        def read_group_gave_up() -> bool:
            state = pool.stats()["endpoints"][listener]
            return bool(state["role"] == "primary" and state["open"] == 0)

        # the read group found a primary there and has dropped its connections
        wait_for(read_group_gave_up, 15, "the read group to see a primary and drop its connections")
        seen = pool.stats()["endpoints"][listener]
        pc.restart_haproxy()
        fixed = time.monotonic()
        try:
            back = wait_for(
                lambda: sum(r.in_recovery for r in load.reads if r.start > fixed) >= 100,
                10 * ROLE_CHECK + 5, "reads on the replicas again")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; endpoints: {pool.stats()['endpoints']};"
                                 f" read errors: {load.read_errors[-3:]}") from None
    finally:
        pc.restart_haproxy()
        load.stop()
        pool.close()
    print(f"\n[{MODE}] reads on replicas again {back - fixed:.2f} s after the listener was fixed;"
          f" {load.summary()}; while misrouted: {seen}")
    assert not [e for e in load.read_errors if e[0] > fixed + 10 * ROLE_CHECK]


# --- 4. the leader cut off from etcd -------------------------------------------------------------


@NOT_IN_EVENTLET
def test_leader_cut_off_from_etcd_acknowledges_no_write_after_it_demotes(
    restored: PatroniCluster,
) -> None:
    """Drill 4: etcd is frozen (SIGSTOP), so the leader cannot renew its lock and demotes
    itself (read-only). No write is acknowledged by it once it is no longer the leader, every
    acknowledged write survives, and writes resume once etcd is back and a leader elected."""
    pc = restored
    old = pc.leader()
    assert old is not None
    pool = make_pool(pc, "direct")
    load = Load(pool).start()
    try:
        _started(load, pc)
        cut = time.monotonic()
        pc.pause_etcd()

        def demoted() -> bool:
            try:
                return bool(old.execute("SELECT pg_is_in_recovery()")[0][0])
            except psycopg2.Error:
                return False

        demoted_at = wait_for(demoted, pc.ttl + pc.retry_timeout + 15,
                              "the leader to demote itself", interval=0.05)
        # a second of load with no leader anywhere
        wait_for(lambda: time.monotonic() > demoted_at + 1.0, 5, "load with no leader")
        pc.resume_etcd()
        resumed = time.monotonic()
        pc.wait_healthy(60)  # a leader, and the others streaming from it
        leader = pc.leader()
        assert leader is not None
        try:
            wait_for(lambda: len(load.acks_on(leader.port, resumed)) >= 100, 30,
                     "writes on the leader elected after etcd came back")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; leader {leader}; endpoints:"
                                 f" {pool.stats()['endpoints']}; write group:"
                                 f" {pool.stats()['groups']['write']}; errors:"
                                 f" {load.write_errors[-3:]}") from None
    finally:
        pc.resume_etcd()
        load.stop()
        pool.close()
    print(f"\n[{MODE}] etcd frozen -> leader demoted {demoted_at - cut:.2f} s; {load.summary()}")
    # 0.2 s: an acknowledgement is stamped when its task runs again, not when it arrived
    late = [a for a in load.acked if demoted_at + 0.2 < a[2] < resumed]
    assert not late, f"writes acknowledged while no server was leader: {late[:5]}"
    load.check_rows(_rows(leader))


# --- 5. a replica whose replay is paused ---------------------------------------------------------


@NOT_IN_EVENTLET
@pytest.mark.parametrize("read_connections", [
    pytest.param(30, id="room"),
    pytest.param(10, id="saturated"),
])
def test_replica_with_paused_replay_is_left_by_max_lag_group_and_taken_back(
    restored: PatroniCluster, read_connections: int
) -> None:
    """Drill 5: ``pg_wal_replay_pause()`` on one replica under write load (Patroni in
    maintenance mode, or it would resume the replay at its next loop). Once its lag
    passes max_lag (measured every role check) the read group stops reading from it, reads go
    on on the other replica without error, and once replay resumes it is read from again. No
    read is older than max_lag (plus one role check)."""
    pc = restored
    leader = pc.leader()
    assert leader is not None
    lagging = pc.replicas()[0]
    pool = make_pool(pc, "direct", read_connections)
    load = Load(pool).start()
    try:
        wait_for(lambda: len(load.reads_on(lagging.port)) >= 50, 30, "reads on both replicas")
        pc.maintenance(True)
        if read_connections < load.readers:
            # saturated: no probe runs, a lag is measured only by a new connection (when the
            # last measurement went stale); pause right after one, so the check is certain
            since = lagging.execute("SELECT now()")[0][0]
            with contextlib.suppress(AssertionError):  # none in 10 s: pause all the same
                wait_for(lambda: lagging.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                    " 'greenpool' AND backend_start > %s", (since,))[0][0] > 0, 10,
                    "a fresh lag measurement")
        paused = time.monotonic()
        lagging.execute("SELECT pg_wal_replay_pause()")
        left_by = paused + MAX_LAG + ROLE_CHECK + 0.5
        wait_for(lambda: time.monotonic() > left_by and len(load.reads) > 200
                 and len(load.acked) > 200, 30, "load while it lags")
        wait_for(lambda: time.monotonic() > left_by + 2.0, 5, "two more seconds of load")
        resumed = time.monotonic()
        lagging.execute("SELECT pg_wal_replay_resume()")
        back = wait_for(lambda: len(load.reads_on(lagging.port, resumed)) >= 20, 15,
                        "reads on the replica once it caught up")
        pc.maintenance(False)
    finally:
        load.stop()
        pool.close()
    late = [r for r in load.reads_on(lagging.port, left_by) if r.start < resumed]
    print(f"\n[{MODE}] reads on it again {back - resumed:.2f} s after replay resumed;"
          f" {load.summary()}")
    assert not late, f"{len(late)} reads from the lagging replica after it passed max_lag"
    assert not load.read_errors, f"read errors: {load.read_errors[:5]}"
    stale = load.stale_reads(STALE_BOUND)
    assert not stale, f"{len(stale)} reads older than {STALE_BOUND} s, e.g. {stale[:3]}"
    load.check_rows(_rows(leader))
