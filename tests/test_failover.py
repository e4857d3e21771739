"""Multi-endpoint failover: roles, promotion, losing and regaining endpoints,
quarantine with backoff, replays. Every test runs against real servers it starts itself
(destructive steps only on clusters from ``pg_factory``) and real faults: ``pg_ctl stop -m
immediate``, ``pg_ctl promote``, a black-hole listener, ``pg_terminate_backend``.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from endpoints import endpoint_stats, held_ports, label
from faults import Ticker
from forking import run_in_forked_child
from modes import GREEN, MODE, join_all, sleep, spawn, wait_until

from greenpool import CommitOutcomeUnknown, NoHealthyEndpoint, PoolClosed, PoolTimeout

SECRET = "Failover-S3cret-pw"


def max_gap(stamps: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(sorted(stamps))), default=0.0)


# --- 1. roles ---------------------------------------------------------------------------------


def test_roles_send_writes_to_the_primary_and_reads_to_the_standby(make_pool, pg_factory):
    """Check 1: with a primary and a streaming standby, every `write` (role primary)
    connection lands on the primary, every `read` (standby) and `prefer` (prefer-standby)
    connection on the standby, even the very first ones of a pool that knows no roles yet;
    and a write through `read` fails cleanly with ReadOnlySqlTransaction: nothing retried
    elsewhere, no endpoint marked down.

    Each group starts at a random endpoint, so each group is checked first thing on 8 fresh
    pools: a group that keeps a connection to the wrong server when it happens to try that
    one first fails with probability 1 - 2**-8."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    groups = {
        "write": {"role": "primary", "connection_count": 4},
        "read": {"role": "standby", "connection_count": 4, "autocommit": True},
        "prefer": {"role": "prefer-standby", "connection_count": 4, "autocommit": True},
    }
    expected = {"write": primary.port, "read": standby.port, "prefer": standby.port}
    for name, port in expected.items():
        for _ in range(8):
            fresh = make_pool(groups, db=[standby.endpoint(), primary.endpoint()])
            assert held_ports(fresh, name, 3) == [port] * 3, name
            fresh.close()
    pool = make_pool(groups, db=[standby.endpoint(), primary.endpoint()])
    assert held_ports(pool, "write", 4) == [primary.port] * 4
    assert held_ports(pool, "read", 4) == [standby.port] * 4
    assert held_ports(pool, "prefer", 4) == [standby.port] * 4

    with pool.handler("write") as db:
        db.execute("CREATE TABLE written (id int)")
        assert db.query_one("SELECT inet_server_port()") == (primary.port,)
    wait_until(lambda: standby.execute("SELECT to_regclass('written') IS NOT NULL")[0][0],
               10, "the new table to reach the standby")

    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("read") as db:
        db.execute("CREATE TABLE must_not_exist (id int)")
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("read") as db:
        db.execute("INSERT INTO written VALUES (1)")
    assert primary.execute("SELECT to_regclass('must_not_exist') IS NULL")[0][0] is True
    assert primary.execute("SELECT count(*) FROM written")[0][0] == 0  # not retried there

    endpoints = pool.stats()["endpoints"]
    assert endpoints[label(primary)]["role"] == "primary"
    assert endpoints[label(standby)]["role"] == "standby"
    for name in (label(primary), label(standby)):
        assert endpoints[name]["state"] == "up" and endpoints[name]["quarantines"] == 0
    groups = pool.stats()["groups"]
    assert groups["read"]["replays"] == 0 and groups["read"]["failovers"] == 0


# --- 2. promotion under write load --------------------------------------------------------------


def test_promotion_under_write_load_moves_writes_and_loses_no_acknowledged_write(
    make_pool, pg_factory
):
    """Check 2: 50 tasks insert unique ids through `write` while the standby is promoted and
    the old primary crashes. Afterwards writes succeed on the new primary without a pool
    restart, every acknowledged id is on the new primary, every failure is a clear
    psycopg2/greenpool error, and no task hangs.

    Replication is made synchronous so that an acknowledged commit is on the standby too:
    then a missing id could only be the pool's fault (e.g. reporting success for a commit
    whose outcome it did not see)."""
    primary = pg_factory()
    primary.execute("CREATE TABLE acked (id int PRIMARY KEY)")
    standby = pg_factory(standby_of=primary)
    primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
    primary.execute("ALTER SYSTEM SET synchronous_commit = 'on'")
    primary.execute("SELECT pg_reload_conf()")
    wait_until(
        lambda: primary.execute(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
        )[0][0] == 1,
        10,
        "the standby to become synchronous",
    )
    pool = make_pool(
        {"write": {"role": "primary", "connection_count": 10, "timeout": 10}},
        db=[primary.endpoint(), standby.endpoint()],
        role_check_interval=0.5,
        quarantine_max=2,
    )
    ids = itertools.count()
    acked: list[tuple[int, int]] = []  # (id, server port) of acknowledged inserts
    errors: list[BaseException] = []
    running = [True]

    def writer() -> None:
        while running[0]:
            i = next(ids)
            try:
                with pool.handler("write") as db:
                    row = db.query_one(
                        "INSERT INTO acked VALUES (%s) RETURNING inet_server_port()", (i,)
                    )
            except Exception as exc:
                errors.append(exc)
                sleep(0.01)
            else:
                acked.append((i, row[0]))

    tasks = [spawn(writer) for _ in range(50)]
    try:
        wait_until(lambda: len(acked) >= 200, 10, "200 writes on the old primary")
        standby.promote()
        primary.stop("immediate")
        wait_until(
            lambda: sum(port == standby.port for _, port in acked) >= 200,
            20,
            "200 writes acknowledged by the promoted standby",
        )
    finally:
        running[0] = False
        join_all(tasks, 15)  # bounded: a hung writer fails the test here

    assert {port for _, port in acked} == {primary.port, standby.port}
    with pool.handler("write") as db:
        assert db.query_one("SELECT inet_server_port()") == (standby.port,)
    stored = {row[0] for row in standby.execute("SELECT id FROM acked")}
    lost = sorted(i for i, _ in acked if i not in stored)
    assert lost == [], f"{len(lost)} acknowledged writes are missing: {lost[:20]}"
    for exc in errors:
        assert isinstance(exc, psycopg2.Error), repr(exc)
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
    assert endpoint_stats(pool, standby)["role"] == "primary"
    # the old primary is found down: at once if a connect went there after the crash, else
    # by housekeeping's next look (writes may have moved without any connect to it)
    wait_until(lambda: endpoint_stats(pool, primary)["state"] != "up", 10,
               "the crashed old primary to be found down")


def test_writers_waiting_for_a_primary_get_the_promoted_standby_on_a_connection_already_open(
    make_pool, pg_factory
):
    """The primary crashes (`pg_ctl stop -m immediate`) and writers wait; no primary is up,
    so the write group keeps one connection open on the standby and asks it whether it was
    promoted every PROMOTION_POLL, instead of a connect to it every half second. Then
    `pg_ctl promote`: a write runs on that very connection (its backend started before the
    promotion: no connect after it) within PROMPT seconds of the promote (well below the
    half second a standby used to wait for its next connect, and the 5 s
    role_check_interval here), and while the writers waited the standby saw at most one
    connect from the write group, however long they waited (no connect storm)."""
    prompt = 0.35
    primary = pg_factory()
    primary.execute("CREATE TABLE promoted_writes (id int)")
    standby = pg_factory(standby_of=primary)
    wait_until(lambda: standby.execute(
        "SELECT to_regclass('promoted_writes') IS NOT NULL")[0][0], 10, "the table on the standby")
    pool = make_pool({"write": {"role": "primary", "connection_count": 4, "timeout": 30}},
                     db=[primary.endpoint(), standby.endpoint()], role_check_interval=5)
    with pool.handler("write") as db:
        assert db.query_one("SELECT inet_server_port()") == (primary.port,)
    primary.stop("immediate")
    # (monotonic time acknowledged, server port, the backend's start, the server's clock)
    acked: list[tuple[float, int, Any, Any]] = []
    errors: list[BaseException] = []
    running = [True]

    def writer() -> None:
        while running[0]:
            try:
                with pool.handler("write") as db:
                    row = db.query_one(
                        "INSERT INTO promoted_writes VALUES (1) RETURNING inet_server_port(),"
                        " (SELECT backend_start FROM pg_stat_activity"
                        " WHERE pid = pg_backend_pid()), clock_timestamp()")
            except psycopg2.Error as exc:  # a dead idle connection to the old primary
                errors.append(exc)
                sleep(0.01)
            else:
                acked.append((time.monotonic(), *row))

    tasks = [spawn(writer) for _ in range(6)]
    try:
        wait_until(lambda: endpoint_stats(pool, primary)["state"] != "up"
                   and standby.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                       " backend_type = 'client backend' AND"
                                       " application_name <> 'greenpool-throwaway'")[0][0] >= 1,
                   10, "the primary quarantined and the write group on the standby")
        connects_before = endpoint_stats(pool, standby)["connect_attempts"]
        sleep(1.5)  # writers wait: three times the old connect interval to a standby
        connects_waiting = endpoint_stats(pool, standby)["connect_attempts"] - connects_before
        assert not acked
        server_before = standby.execute("SELECT clock_timestamp()")[0][0]
        before = time.monotonic()
        standby.promote()
        wait_until(lambda: bool(acked), 10, "a write on the promoted standby")
    finally:
        running[0] = False
        join_all(tasks, 15)
    assert {port for _, port, _, _ in acked} == {standby.port}
    # the watched connection goes to the first writer in line; writers served later by new
    # connections may be acknowledged first on a busy machine: what counts is that a write
    # ran on a connection opened before the promotion, within PROMPT of it
    watched = [at for at, _, backend_start, _ in acked if backend_start < server_before]
    assert watched, "no write ran on a connection opened before the promotion"
    assert min(watched) - before <= prompt, (
        f"the first write on the watched connection came {min(watched) - before:.3f} s "
        f"after the promote")
    assert connects_waiting <= 1, f"{connects_waiting} connects to the standby while waiting"
    for exc in errors:
        assert str(exc).strip()


def test_a_write_group_with_fewer_connections_than_standbys_finds_the_one_it_does_not_watch(
    make_pool, pg_factory
):
    """One write connection, two standbys, the primary crashed, writers wait: the group's one
    connect task watches the first standby, and every half second makes way for a round of
    connects that asks the other one. The second standby is promoted: writes land on it
    within about that half second (a watch that never made way would hold the group until
    the writers' timeout; role checks, every 5 s here, would not reach a full group)."""
    primary = pg_factory()
    primary.execute("CREATE TABLE promoted_writes (id int)")
    first = pg_factory(standby_of=primary)
    second = pg_factory(standby_of=primary)
    for standby in (first, second):
        wait_until(lambda s=standby: s.execute(
            "SELECT to_regclass('promoted_writes') IS NOT NULL")[0][0], 10, "the table")
    pool = make_pool({"write": {"role": "primary", "connection_count": 1, "timeout": 30}},
                     db=[primary.endpoint(), first.endpoint(), second.endpoint()],
                     role_check_interval=5)
    with pool.handler("write") as db:
        assert db.query_one("SELECT inet_server_port()") == (primary.port,)
    primary.stop("immediate")
    acked: list[tuple[float, int]] = []
    running = [True]

    def writer() -> None:
        while running[0]:
            try:
                with pool.handler("write") as db:
                    row = db.query_one("INSERT INTO promoted_writes VALUES (1)"
                                       " RETURNING inet_server_port()")
            except psycopg2.Error:  # the dead idle connection to the old primary
                sleep(0.01)
            else:
                acked.append((time.monotonic(), row[0]))

    tasks = [spawn(writer) for _ in range(3)]
    try:
        wait_until(lambda: endpoint_stats(pool, primary)["state"] != "up", 10,
                   "the primary quarantined")
        sleep(0.6)  # the watch of the first standby is under way
        before = time.monotonic()
        second.promote()
        wait_until(lambda: bool(acked), 10, "a write on the promoted standby")
    finally:
        running[0] = False
        join_all(tasks, 15)
    first_at, port = min(acked)
    assert port == second.port
    assert first_at - before <= 1.5, f"first write {first_at - before:.3f} s after promote"


def pool_backends(cluster: Any) -> int:
    """The pool's sessions on ``cluster`` (not the test's own, not this query's)."""
    return int(cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        " AND application_name <> 'greenpool-throwaway' AND pid <> pg_backend_pid()")[0][0])


def write_forever(pool: Any, acked: list[tuple[float, int]], running: list[bool]) -> None:
    """Write through group ``write`` until ``running[0]`` is False: (time, server port)
    of each acknowledged write; a write that fails waits a moment and tries again."""
    while running[0]:
        try:
            with pool.handler("write") as db:
                row = db.query_one("SELECT inet_server_port()")
        except psycopg2.Error:  # the dead idle connection to the old primary
            sleep(0.01)
        else:
            acked.append((time.monotonic(), row[0]))


def test_a_write_group_whose_connects_all_watch_reaches_a_primary_added_by_reconfigure(
    make_pool, pg_factory, mode
):
    """One write connection, the primary crashed, writers wait: the group's one connect
    task watches the standby. A reconfiguration adds another primary (the database moved):
    writes land on it within about a ROLE_RECHECK. Nothing else asks an endpoint added to a
    full group (housekeeping's role probe needs room in it), so a watch that never made way
    for a round held the writers until their timeout."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    moved = pg_factory()
    groups = {"write": {"role": "primary", "connection_count": 1, "timeout": 30}}
    pool = make_pool(groups, db=[primary.endpoint(), standby.endpoint()],
                     role_check_interval=5)
    with pool.handler("write") as db:
        assert db.query_one("SELECT inet_server_port()") == (primary.port,)
    primary.stop("immediate")
    acked: list[tuple[float, int]] = []
    running = [True]
    tasks = [spawn(write_forever, pool, acked, running) for _ in range(3)]
    try:
        wait_until(lambda: pool_backends(standby) == 1, 10, "the watch of the standby")
        sleep(0.3)
        before = time.monotonic()
        pool.reconfigure({"type": mode, "groups": groups, "role_check_interval": 5,
                          "db": [primary.endpoint(), standby.endpoint(), moved.endpoint()]})
        wait_until(lambda: bool(acked), 20, "a write on the added primary")
    finally:
        running[0] = False
        join_all(tasks, 35)
    first_at, port = min(acked)
    assert port == moved.port
    assert first_at - before <= 2.0, f"first write {first_at - before:.3f} s after reconfigure"


def test_a_watched_standby_taken_out_by_reconfigure_is_let_go_while_writers_wait(
    make_pool, pg_factory, mode
):
    """The primary crashed, writers wait, the write group watches the standby; then a
    reconfiguration takes the standby out. The watch ends at once: its session on the
    standby closes while the writers still wait (not at their timeout), and the group's
    room adds up."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    groups = {"write": {"role": "primary", "connection_count": 2, "timeout": 30}}
    pool = make_pool(groups, db=[primary.endpoint(), standby.endpoint()],
                     role_check_interval=5)
    group = pool.group("write")
    with pool.handler("write") as db:
        db.query_one("SELECT 1")
    primary.stop("immediate")
    acked: list[tuple[float, int]] = []
    running = [True]
    tasks = [spawn(write_forever, pool, acked, running) for _ in range(3)]
    try:
        wait_until(lambda: pool_backends(standby) == 1, 10, "the watch of the standby")
        pool.reconfigure({"type": mode, "groups": groups, "role_check_interval": 5,
                          "db": [primary.endpoint()]})
        wait_until(lambda: pool_backends(standby) == 0, 3, "the watch to let the standby go")
        stats = group.stats()
        assert stats["waiting"] > 0 and not acked  # the writers still wait
        assert stats["size"] == stats["idle"] + stats["in_use"] + stats["connecting"], stats
    finally:
        running[0] = False
        pool.close()  # the writers wait for a primary that is gone: PoolClosed ends them
        join_all(tasks, 10)


def test_closing_the_pool_during_a_watch_ends_it_and_the_writers_leaving_no_session_or_slot(
    make_pool, pg_factory
):
    """The primary crashed, writers wait, the write group watches the standby; then the
    pool is closed. Every writer gets PoolClosed, the watch's session on the standby
    closes, no connect task is left (no thread, in threaded mode), and the group's room
    and its per-endpoint counts are back to zero."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool({"write": {"role": "primary", "connection_count": 2, "timeout": 30}},
                     db=[primary.endpoint(), standby.endpoint()], role_check_interval=5)
    group = pool.group("write")
    with pool.handler("write") as db:
        db.query_one("SELECT 1")
    primary.stop("immediate")

    def write() -> int:
        with pool.handler("write") as db:
            return int(db.query_one("SELECT inet_server_port()")[0])

    threads_before = set(threading.enumerate())
    writers = [spawn(write) for _ in range(3)]
    wait_until(lambda: pool_backends(standby) == 1, 10, "the watch of the standby")
    pool.close()
    join_all(writers, 10)
    assert all(isinstance(writer.error, PoolClosed) for writer in writers), [
        repr(writer.error) for writer in writers]
    wait_until(lambda: pool_backends(standby) == 0, 5, "the watch's session to close")
    wait_until(lambda: set(threading.enumerate()) <= threads_before, 5, "no task left")
    stats = group.stats()
    assert (stats["size"], stats["in_use"], stats["connecting"]) == (0, 0, 0), stats
    assert sorted(group.counts.values()) == [0, 0]


def _create_temp_table(raw: Any) -> None:
    with raw.cursor() as cursor:  # a hot standby refuses it: read-only transaction
        cursor.execute("CREATE TEMP TABLE IF NOT EXISTS session_scratch (id int)")


def test_a_write_group_watches_no_standby_that_refuses_it_for_good(make_pool, pg_factory):
    """A write group whose configure hook writes (a temporary table) cannot connect to a
    standby: a failure retrying cannot fix, which rounds of connects leave alone for the
    group's pause. The primary crashes and writers wait for 2 s: the watch leaves that
    standby alone too (it used to connect to it again every few milliseconds, each failing
    the same way). A read group makes the standby known as one."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool({"write": {"role": "primary", "connection_count": 2, "timeout": 2,
                                "configure": _create_temp_table},
                      "read": {"role": "standby", "connection_count": 1}},
                     db=[primary.endpoint(), standby.endpoint()], role_check_interval=5)
    with pool.handler("write") as db:
        assert db.query_one("SELECT inet_server_port()") == (primary.port,)
    with pool.handler("read") as db:
        assert db.query_one("SELECT inet_server_port()") == (standby.port,)
    primary.stop("immediate")
    before = endpoint_stats(pool, standby)["connect_attempts"]

    def write() -> BaseException | None:
        try:
            with pool.handler("write"):
                return None
        except Exception as exc:
            return exc

    tasks = [spawn(write) for _ in range(3)]
    join_all(tasks, 10)
    attempts = endpoint_stats(pool, standby)["connect_attempts"] - before
    assert all(isinstance(task.result, NoHealthyEndpoint) for task in tasks), [
        repr(task.result) for task in tasks]
    assert attempts <= 2, f"{attempts} connects to the refusing standby in 2 s"


@pytest.mark.skipif(MODE != "gevent", reason="greenlets are copied into a forked child")
@pytest.mark.timeout(60)
def test_a_standby_watch_copied_into_a_forked_child_ends_there_without_a_count(
    make_pool, pg_factory
):
    """The process forks while the write group watches the standby. The child's copy of
    the watching task ends touching nothing (the child has no connection to the standby:
    its counts stay at 0, not -1 from closing the parent's); the parent's watch goes on,
    and hands the standby to its writer once promoted."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool({"write": {"role": "primary", "connection_count": 1, "timeout": 20}},
                     db=[primary.endpoint(), standby.endpoint()], role_check_interval=5)
    group = pool.group("write")
    with pool.handler("write") as db:
        db.query_one("SELECT 1")
    primary.stop("immediate")

    def write() -> int:
        with pool.handler("write") as db:
            return int(db.query_one("SELECT inet_server_port()")[0])

    writer = spawn(write)
    wait_until(lambda: endpoint_stats(pool, standby)["open"] == 1
               and pool_backends(standby) == 1, 10, "the watch of the standby")

    def in_child() -> str:
        sleep(1.0)  # the copied watch task runs in the child meanwhile
        return json.dumps({"open": endpoint_stats(pool, standby)["open"],
                           "counts": sorted(group.counts.values()), **group.stats()})

    report = json.loads(run_in_forked_child(in_child))
    assert report["open"] == 0 and report["counts"] == [0, 0], report
    assert report["size"] == report["connecting"] == 0, report
    standby.promote()
    join_all([writer], 15)
    assert writer.error is None, repr(writer.error)
    assert writer.result == standby.port


# --- 3. losing one of two endpoints under read load ---------------------------------------------


def test_losing_one_endpoint_is_invisible_to_readers_and_its_return_is_used(
    make_pool, pg_factory, server_conns
):
    """Check 3: under a steady read load through a readonly autocommit group spanning two
    servers, crashing one causes no error and no task waits more than 1 s between two
    successful reads; once it is started again, connections spread back onto it within
    15 s by themselves."""
    first, second = pg_factory(), pg_factory()
    app = "gp-failover-readers"
    pool = make_pool(
        {"read": {"role": "any", "autocommit": True, "readonly": True,
                  "connection_count": 8, "timeout": 5}},
        db=[first.endpoint(), second.endpoint()],
        application_name=app,
    )
    successes: list[list[tuple[float, int]]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    running = [True]

    def reader(mine: list[tuple[float, int]]) -> None:
        while running[0]:
            try:
                with pool.handler("read") as db:
                    port = db.query_one("SELECT inet_server_port()")[0]
            except Exception as exc:
                errors.append(exc)
            else:
                mine.append((time.monotonic(), port))
            sleep(0.005)

    def ports_since(t: float) -> set[int]:
        return {port for mine in successes for stamp, port in mine if stamp >= t}

    tasks = [spawn(reader, mine) for mine in successes]
    try:
        wait_until(lambda: ports_since(0) == {first.port, second.port}, 10,
                   "reads served by both servers")
        crashed_at = time.monotonic()
        second.stop("immediate")
        sleep(2.0)  # the read load keeps running against one server
        after_crash = time.monotonic()
        assert errors == []
        for mine in successes:
            stamps = [stamp for stamp, _ in mine if stamp >= crashed_at - 0.5]
            assert stamps and stamps[-1] > after_crash - 1.0, "a reader stopped making progress"
            assert max_gap([crashed_at, *stamps, after_crash]) < 1.0
        assert ports_since(crashed_at + 1.0) == {first.port}

        second.start()
        wait_until(
            lambda: endpoint_stats(pool, second)["open"] > 0
            and endpoint_stats(pool, first)["open"] > 0,
            15,
            "connections to spread back over both servers",
        )
        assert server_conns(application_name=app, cluster=second) > 0
        assert server_conns(application_name=app, cluster=first) > 0
        restarted_at = time.monotonic()
        wait_until(lambda: ports_since(restarted_at) == {first.port, second.port}, 10,
                   "reads served by both servers again")
    finally:
        running[0] = False
        join_all(tasks, 10)
    assert errors == []
    assert endpoint_stats(pool, second)["state"] == "up"


def test_a_light_load_follows_the_weights_not_the_top_of_the_idle_stack(make_pool, pg, pg_factory):
    """One task reading in sequence never needs more than one connection: a plain
    last-in-first-out pool would send every read to the same server. Reads go round the
    endpoints in proportion to their weights instead (1:3 here)."""
    light, heavy = pg, pg_factory()
    pool = make_pool(
        {"read": {"role": "any", "autocommit": True, "connection_count": 4, "timeout": 5}},
        db=[light.endpoint(weight=1), heavy.endpoint(weight=3)],
    )
    assert sorted(held_ports(pool, "read", 4)) == sorted([light.port] + [heavy.port] * 3)
    ports = []
    for _ in range(400):
        with pool.handler("read") as db:
            ports.append(db.query_one("SELECT inet_server_port()")[0])
    heavy_share = ports.count(heavy.port) / len(ports)
    assert 0.7 <= heavy_share <= 0.8, heavy_share
    assert pool.stats()["groups"]["read"]["connects"] == 4  # balanced, not reconnected


def test_a_recovered_endpoint_is_probed_when_its_quarantine_ends_and_gets_its_share(
    make_pool, pg, pg_factory
):
    """Housekeeping runs every 30 s here, yet a restarted server is probed as soon as its
    quarantine (at most 0.4 s) is over, without any traffic, and connections move back onto
    it right away: the time a recovered server stays unused is the backoff, not the
    housekeeping interval."""
    flaky = pg_factory()
    pool = make_pool(
        {"read": {"role": "any", "autocommit": True, "connection_count": 4, "timeout": 5}},
        db=[pg.endpoint(), flaky.endpoint()],
        maintenance_interval=30, quarantine_initial=0.2, quarantine_max=0.4,
    )
    assert sorted(held_ports(pool, "read", 4)) == sorted([pg.port, flaky.port] * 2)
    flaky.stop("immediate")

    def read_until_quarantined() -> bool:
        with pool.handler("read") as db:
            db.query_one("SELECT 1")
        return endpoint_stats(pool, flaky)["state"] == "quarantined"

    wait_until(read_until_quarantined, 10, "the stopped server to be quarantined")
    flaky.start()
    started = time.monotonic()
    wait_until(lambda: endpoint_stats(pool, flaky)["state"] == "up", 5, "the probe")
    wait_until(lambda: endpoint_stats(pool, flaky)["open"] >= 1, 5, "a connection back on it")
    assert time.monotonic() - started < 3  # far below the 30 s housekeeping interval


# --- 4. a black hole first in the list -----------------------------------------------------------


def test_black_hole_first_fails_over_within_the_connect_timeout(make_pool, pg, blackhole):
    """Check 4: with a never-answering endpoint listed before a real one, acquires move on
    to the real endpoint within the black hole's per-attempt connect timeout (0.5 s; libpq's
    whole seconds, at least 2, in threaded mode), and the event loop never blocks."""
    per_attempt = 0.5 if GREEN else 2.0
    pool = make_pool(
        {"g": {"connection_count": 3, "timeout": 10}},
        db=[blackhole.endpoint(connect_timeout=0.5), pg.endpoint()],
    )
    ticker = Ticker()
    sleep(0.05)
    started = time.monotonic()
    ports = held_ports(pool, "g", 3)
    elapsed = time.monotonic() - started
    gap = ticker.stop()
    assert ports == [pg.port] * 3
    assert elapsed < per_attempt + 0.6, elapsed
    if GREEN:
        assert gap < 0.1, f"the event loop was blocked for {gap:.3f} s"
    hole = pool.stats()["endpoints"][f"127.0.0.1:{blackhole.port}/blackhole"]
    assert hole["connect_attempts"] >= 1 and hole["connect_errors"] >= 1
    assert hole["state"] in ("quarantined", "probing") and hole["quarantines"] >= 1
    assert hole["last_error"]
    assert endpoint_stats(pool, pg)["state"] == "up"
    assert pool.stats()["groups"]["g"]["failovers"] >= 1


# --- 5. everything down, then back ---------------------------------------------------------------


def test_all_endpoints_down_raises_no_healthy_endpoint_then_recovers_by_itself(
    make_pool, pg_factory
):
    """Check 5: with every endpoint down, NoHealthyEndpoint comes within the acquire
    timeout and names each endpoint, its state and its last error, never the password;
    started again, an endpoint is found up by housekeeping alone, and handlers work."""
    first, second = pg_factory(password=SECRET), pg_factory(password=SECRET)
    timeout = 1.0
    pool = make_pool(
        {"g": {"connection_count": 2, "timeout": timeout}},
        db=[first.endpoint(), second.endpoint()],
        quarantine_max=1.0,
    )
    assert sorted(held_ports(pool, "g", 2)) == sorted([first.port, second.port])
    first.stop("immediate")
    second.stop("immediate")

    started = time.monotonic()
    with pytest.raises(NoHealthyEndpoint) as info, pool.handler("g") as db:
        db.query("SELECT 1")
    elapsed = time.monotonic() - started
    assert timeout - 0.3 <= elapsed <= timeout + 0.3, elapsed
    message = str(info.value)
    for cluster in (first, second):
        assert label(cluster) in message
    assert message.count("refused") >= 2, message
    assert "quarantined" in message or "probing" in message, message
    assert SECRET not in message and SECRET not in repr(pool.stats())
    for cluster in (first, second):
        stats = endpoint_stats(pool, cluster)
        assert stats["state"] != "up" and stats["quarantines"] >= 1
        assert "refused" in stats["last_error"]

    second.start()
    wait_until(lambda: endpoint_stats(pool, second)["state"] == "up", 10,
               "housekeeping to find the restarted server up, without any request")
    with pool.handler("g") as db:
        assert db.query_one("SELECT inet_server_port()") == (second.port,)
    assert endpoint_stats(pool, first)["state"] != "up"


# --- 6. what must not quarantine -----------------------------------------------------------------


def test_exhaustion_timeouts_and_sql_errors_never_quarantine(make_pool, pg, pg_factory):
    """Check 6: PoolTimeout from exhaustion, a statement timeout (QueryCanceled) and SQL
    errors leave every endpoint up with no quarantine, and nothing is replayed: not even
    in a readonly group, where a lost connection would be."""
    other = pg_factory()
    pool = make_pool(
        {
            "small": {"connection_count": 1, "timeout": 0.2},
            "slow": {"autocommit": True, "readonly": True, "statement_timeout": 0.1},
        },
        db=[pg.endpoint(), other.endpoint()],
    )
    small = pool.group("small")
    held = small.acquire()
    try:
        with pytest.raises(PoolTimeout), pool.handler("small"):
            pass
    finally:
        small.release(held)

    started = time.monotonic()
    with pytest.raises(psycopg2.errors.QueryCanceled), pool.handler("slow") as db:
        db.query("SELECT pg_sleep(2)")
    assert time.monotonic() - started < 1.0  # cancelled once, not re-run
    with pytest.raises(psycopg2.errors.SyntaxError), pool.handler("slow") as db:
        db.query("SELEC 1")
    with pytest.raises(psycopg2.errors.UndefinedTable), pool.handler("small") as db:
        db.query("SELECT * FROM no_such_table")
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("slow") as db:
        db.query("CREATE TABLE never (id int)")
    for _ in range(4):  # the pool still works, on either endpoint
        with pool.handler("slow") as db:
            assert db.query("SELECT 1") == [(1,)]

    stats = pool.stats()
    for name in (label(pg), label(other)):
        ep = stats["endpoints"][name]
        assert (ep["state"], ep["quarantines"], ep["connect_errors"]) == ("up", 0, 0), ep
    for name in ("small", "slow"):
        assert stats["groups"][name]["failovers"] == 0
        assert stats["groups"][name]["replays"] == 0


# --- 7. backoff -----------------------------------------------------------------------------------


def test_backoff_of_a_dead_endpoint_is_visible_and_bounded(make_pool, pg_factory, pg):
    """Check 7: 200 requests over about 3 s, each needing a new connection, through a group
    spanning a stopped server and a live one: all succeed on the live one, and the dead one
    sees a handful of connect attempts spaced by the backoff (at least quarantine_initial
    apart, at most quarantine_max plus a little), not one attempt per request."""
    dead = pg_factory()
    dead.stop("immediate")
    initial, ceiling = 0.25, 1.0
    pool = make_pool(
        {"g": {"connection_count": 4, "timeout": 5}},
        db=[dead.endpoint(), pg.endpoint()],
        quarantine_initial=initial,
        quarantine_max=ceiling,
        maintenance_interval=0.1,
    )
    group = pool.group("g")
    attempts_seen: list[tuple[float, int]] = []  # (when first seen, connect_attempts)
    ports = []
    started = time.monotonic()
    for i in range(200):
        pc = group.acquire()
        try:
            with pc.raw.cursor() as cursor:
                cursor.execute("SELECT inet_server_port()")
                ports.append(cursor.fetchone()[0])
        finally:
            group.release(pc, discard="test: every request connects anew")
        count = endpoint_stats(pool, dead)["connect_attempts"]
        if count and (not attempts_seen or count != attempts_seen[-1][1]):
            attempts_seen.append((time.monotonic(), count))
        sleep(max(0.0, started + (i + 1) * 0.015 - time.monotonic()))
    window = time.monotonic() - started

    assert ports == [pg.port] * 200
    stats = endpoint_stats(pool, dead)
    attempts = stats["connect_attempts"]
    assert 2 <= attempts <= window / initial + 2, (attempts, window, attempts_seen)
    assert stats["connect_errors"] == attempts and stats["connects"] == 0
    assert stats["state"] in ("quarantined", "probing")
    # from the first failure on, each change seen is one attempt, spaced as the backoff says
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(attempts_seen)]
    assert all(n == 1 for _, n in steps), attempts_seen
    assert all(initial - 0.05 <= dt <= ceiling + 0.3 for dt, _ in steps), attempts_seen


# --- replays ---------------------------------------------------------------------------------


def _terminate_and_wait(cluster: Any, server_conns: Any, app: str) -> None:
    killed = cluster.execute(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
        "WHERE application_name = %s", (app,)
    )[0][0]
    assert killed == 1
    # pg_terminate_backend only signals: wait until the session is really gone
    assert server_conns(application_name=app, cluster=cluster, expect=0) == 0


def test_idempotent_handler_replays_its_first_statement_after_a_lost_connection(
    make_pool, pg, server_conns
):
    """A read through an `idempotent=True` handler of a read-write group is re-run on a new
    connection when its backend was terminated before it ran (single endpoint: the replay
    reconnects to the same server); the same fault on a plain handler, or on a statement
    that is not the first of its transaction, raises the driver's OperationalError."""
    app = "gp-failover-replay"
    pool = make_pool({"g": {"connection_count": 1, "autocommit": False, "timeout": 5}},
                     application_name=app)
    with pool.handler("g") as db:
        old_pid = db.query_one("SELECT pg_backend_pid()")[0]

    with pool.handler("g", idempotent=True) as db:
        _terminate_and_wait(pg, server_conns, app)
        new_pid = db.query_one("SELECT pg_backend_pid()")[0]
    assert new_pid != old_pid
    assert pool.stats()["groups"]["g"]["replays"] == 1

    with pytest.raises(psycopg2.OperationalError) as info, pool.handler("g") as db:
        _terminate_and_wait(pg, server_conns, app)
        db.query("SELECT pg_backend_pid()")
    assert not isinstance(info.value, NoHealthyEndpoint)

    with pytest.raises(psycopg2.OperationalError), pool.handler("g", idempotent=True) as db:
        db.query("SELECT 1")
        _terminate_and_wait(pg, server_conns, app)
        db.query("SELECT 2")  # not the first statement of its transaction: never re-run

    assert pool.stats()["groups"]["g"]["replays"] == 1
    with pool.handler("g") as db:  # and the pool is fine afterwards
        assert db.query("SELECT 1") == [(1,)]


def test_a_known_clean_query_is_replayed_like_any_statement(make_pool, pg, server_conns):
    """query() runs a statement already known clean without the replay loop, until it
    fails: a lost connection under an idempotent handler still re-runs it on a new one,
    and a plain handler still raises the driver's error."""
    app = "gp-failover-replay-query"
    pool = make_pool({"g": {"connection_count": 1, "autocommit": True, "timeout": 5}},
                     application_name=app)
    with pool.handler("g") as db:
        old_pid = db.query("SELECT pg_backend_pid()")[0][0]  # known clean from here on

    with pool.handler("g", idempotent=True) as db:
        _terminate_and_wait(pg, server_conns, app)
        new_pid = db.query("SELECT pg_backend_pid()")[0][0]
    assert new_pid != old_pid
    assert pool.stats()["groups"]["g"]["replays"] == 1

    with pytest.raises(psycopg2.OperationalError), pool.handler("g") as db:
        _terminate_and_wait(pg, server_conns, app)
        db.query("SELECT pg_backend_pid()")
    assert pool.stats()["groups"]["g"]["replays"] == 1
    with pool.handler("g") as db:
        assert db.query("SELECT 1") == [(1,)]


def test_commit_outcome_unknown_is_never_retried(make_pool, pg_factory, server_conns):
    """A connection that breaks during COMMIT raises CommitOutcomeUnknown, even on an
    idempotent handler, and the transaction is not re-run. The COMMIT is held by a
    synchronous standby that does not exist, and its backend is terminated meanwhile (the
    server then keeps the locally committed transaction)."""
    server = pg_factory(settings={"synchronous_standby_names": "nobody"})
    server.execute("CREATE TABLE t (id int)")  # synchronous_commit is off by default here
    app = "gp-failover-commit"
    pool = make_pool({"g": {"connection_count": 1, "timeout": 5}}, db=server.endpoint(),
                     application_name=app)

    def terminate_during_commit() -> None:
        wait_until(
            lambda: server.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND wait_event = 'SyncRep'", (app,)
            )[0][0] == 1,
            10,
            "the COMMIT to wait for the synchronous standby",
        )
        _terminate_and_wait(server, server_conns, app)

    killer = spawn(terminate_during_commit)
    with pytest.raises(CommitOutcomeUnknown) as info, pool.handler("g", idempotent=True) as db:
        db.execute("SET LOCAL synchronous_commit = on")
        db.execute("INSERT INTO t VALUES (1)")
    join_all([killer], 15)
    assert killer.error is None, killer.error
    assert str(info.value).strip()
    assert server.execute("SELECT count(*) FROM t")[0][0] == 1  # committed once, not twice
    assert pool.stats()["groups"]["g"]["replays"] == 0
    assert endpoint_stats(pool, server)["state"] == "up"


# --- an endpoint that refuses the group ------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("role", ["any", "primary"])
@pytest.mark.parametrize("refusal", ["missing database", "configure hook"])
def test_an_endpoint_that_refuses_the_group_costs_it_no_connection_elsewhere(
        pg, mode, role, refusal):
    """One of two endpoints refuses the group for good (its database is missing there, or
    the group's configure hook fails there): its health is untouched, so it stays up. Under
    load the group keeps its connections on the healthy endpoint: none is closed to move
    towards the refusing one (where no connect can follow) and no connect is made again."""
    from load import Load

    from greenpool import Pool

    if refusal == "missing database":
        refusing, group = pg.endpoint(name="failover_no_such_db"), {}
    else:
        name = "failover_hook_refused"
        if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
            pg.create_database(name)

        def hook(raw: Any) -> None:
            if raw.info.dbname == name:
                raise RuntimeError("this group may not use that database")

        refusing, group = pg.endpoint(name=name), {"configure": hook}
    pool = Pool({"type": mode, "db": [pg.endpoint(), refusing], "maintenance_interval": 0.1,
                 "groups": {"g": {"connection_count": 4, "role": role, "timeout": 10,
                                  **group}}})
    load = Load(pool, "g", tasks=6, hold=0.005)
    try:
        g = pool.group("g")
        wait_until(lambda: g.connector.refusals.refused(time.monotonic()), 10, "the refusal")
        load.until(50, timeout=30)
        before = pool.stats()["groups"]["g"]
        load.until(1000, timeout=60)
        after = pool.stats()["groups"]["g"]
    finally:
        load.stop()
        pool.close()
    moved = {reason: after["discards_by_reason"].get(reason, 0)
             - before["discards_by_reason"].get(reason, 0) for reason in ("rebalance",
                                                                          "wrong_role")}
    assert moved == {"rebalance": 0, "wrong_role": 0}
    assert after["connects"] - before["connects"] <= 1, (before, after)


@pytest.mark.timeout(90)
def test_connections_open_before_every_endpoint_refused_the_group_serve_on(pg, mode):
    """The group's password is changed on the server (the secret rotated there first) while
    its other endpoint refuses it anyway (a missing database): every new login is refused,
    but the sessions it holds are fine. They serve on: none is closed to move towards an
    endpoint no connect can reach, and no caller fails."""
    from load import Load

    from greenpool import Pool

    user, old = "failover_rotated", "Rotated-pw-1"
    if not pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)):
        pg.create_user(user, old)
    pg.execute(f"ALTER ROLE {user} PASSWORD '{old}'")
    creds = {"user": user, "pass": old}
    pool = Pool({"type": mode, "maintenance_interval": 0.1,
                 "db": [pg.endpoint(**creds), pg.endpoint(name="failover_no_such_db", **creds)],
                 "groups": {"g": {"connection_count": 3, "min_size": 3, "timeout": 10}}})
    load = Load(pool, "g", tasks=3, hold=0.005)
    try:
        g = pool.group("g")
        wait_until(lambda: g.size == 3 and g.connector.refusals.refused(time.monotonic()), 10,
                   "three connections and the missing database's refusal")
        load.until(50, timeout=30)
        pg.execute(f"ALTER ROLE {user} PASSWORD 'Rotated-pw-2'")
        before = pool.stats()["groups"]["g"]
        load.until(500, timeout=60)
        after = pool.stats()["groups"]["g"]
    finally:
        load.stop()  # asserts that no caller met an error
        pool.close()
    assert after["discards"] == before["discards"], (before, after)
    assert after["size"] == 3


@pytest.mark.timeout(90)
def test_a_primary_group_whose_primary_refuses_new_logins_serves_on_its_open_sessions(
        pg_factory, mode):
    """A primary group over a primary and its standby. Its password is rotated on the server
    (it replicates to the standby) and one of its sessions is cut: the reconnect is refused.
    The sessions still open on the primary serve on: the standbys are never where a primary
    group should be, so none is closed as of the wrong role, and no caller fails."""
    from load import Load

    from greenpool import Pool

    primary = pg_factory()
    user, old = "failover_primary_rotated", "Rotated-pw-1"
    primary.create_user(user, old)
    standby = pg_factory(standby_of=primary)
    creds = {"user": user, "pass": old}
    pool = Pool({"type": mode, "maintenance_interval": 0.1,
                 "db": [primary.endpoint(**creds), standby.endpoint(**creds)],
                 "groups": {"w": {"role": "primary", "connection_count": 4, "min_size": 4,
                                  "timeout": 10}}})
    load = Load(pool, "w", tasks=3, hold=0.005)
    try:
        g = pool.group("w")
        wait_until(lambda: g.size == 4, 20, "four connections")
        load.until(50, timeout=30)
        primary.execute(f"ALTER ROLE {user} PASSWORD 'Rotated-pw-2'")
        before = pool.stats()["groups"]["w"]
        (victim,) = primary.execute("SELECT pid FROM pg_stat_activity WHERE usename = %s "
                                    "AND state = 'idle' LIMIT 1", (user,))[0]
        primary.execute("SELECT pg_terminate_backend(%s)", (victim,))
        wait_until(lambda: g.connector.refusals.refused(time.monotonic()), 20,
                   "the reconnect to be refused")
        load.until(500, timeout=60)
        after = pool.stats()["groups"]["w"]
    finally:
        # the cut session's own loan (if one ran on it then: its statement or its COMMIT)
        # is the only one that may fail
        cut = [e for e in load.errors if isinstance(e, (psycopg2.OperationalError,
                                                         CommitOutcomeUnknown))]
        assert len(cut) <= 1, cut
        load.errors[:] = [e for e in load.errors if e not in cut]
        load.stop()  # asserts that no other caller met an error
        pool.close()
    wrong_role = (after["discards_by_reason"].get("wrong_role", 0)
                  - before["discards_by_reason"].get("wrong_role", 0))
    assert wrong_role == 0, (before, after)


@pytest.mark.timeout(90)
def test_a_full_server_is_aimed_at_less_and_less_not_at_every_return(pg, pg_factory, mode):
    """The second endpoint is a server whose connection slots other clients hold (it answers
    "too many clients": up, not quarantined). A busy group finds it below its share; a move
    towards it lands back on the healthy server, and the group then leaves it alone for a
    backoff that doubles at each miss, instead of closing a working connection to aim at it
    again every second or at every return."""
    from load import Load

    from greenpool import Pool

    full = pg_factory(settings={"max_connections": 4, "superuser_reserved_connections": 1})
    full.create_user("app", "app-pw")
    hogs = [psycopg2.connect(full.dsn(user="app", password="app-pw")) for _ in range(3)]
    try:
        pool = Pool({"type": mode, "maintenance_interval": 0.1, "quarantine_initial": 1.0,
                     "db": [pg.endpoint(), full.endpoint(user="app", **{"pass": "app-pw"})],
                     "groups": {"g": {"connection_count": 4, "timeout": 10}}})
        load = Load(pool, "g", tasks=6, hold=0.005)
        try:
            full_ep = next(ep for ep in pool.group("g").endpoints if ep.config.port == full.port)
            group = pool.group("g")
            wait_until(lambda: full_ep.full > 0 and group.size == 4 and not group._connecting,
                       10, "the full server to say so, and the group to be full")
            before = pool.stats()["groups"]["g"]
            started = time.monotonic()
            while time.monotonic() - started < 5:
                load.until(50, timeout=30)
            after = pool.stats()["groups"]["g"]
        finally:
            load.stop()
            pool.close()
    finally:
        for hog in hogs:
            hog.close()
    moved = (after["discards_by_reason"].get("rebalance", 0)
             - before["discards_by_reason"].get("rebalance", 0))
    # at most 2 moves at once (the slow start of moves), aimed at about 0, 1 and 3 s: not
    # about 8 a second (housekeeping looks every 0.1 s here)
    assert moved <= 8, (before, after)
    assert after["connects"] - before["connects"] <= moved + 1, (before, after)
