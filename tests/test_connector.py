"""Connections are opened by the pool, not by the caller who asks.

On real servers with real faults: a caller's
timeout ends its wait, never a connect in flight; only the server's behaviour judges the
server; slots are never lost; load moves back under saturation.
"""

from __future__ import annotations

import random
import time

import pytest
from delayproxy import DelayProxy
from endpoints import endpoint_stats, held_ports
from modes import GREEN, MODE, join_all, sleep, spawn, wait_until

from greenpool import NoHealthyEndpoint, Pool, PoolTimeout

pytestmark = pytest.mark.timeout(60)


def app_conns(cluster, app: str) -> int:
    return int(cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,))[0][0])


# --- 1. a short caller budget never quarantines a healthy server ----------------------------


def test_a_tiny_caller_budget_times_out_the_caller_not_the_server(make_pool, pg):
    pool = make_pool({"g": {"connection_count": 2}, "h": {"connection_count": 2},
                      "other": {"connection_count": 2}})
    # each budget asks an empty group: the first connect may well finish within a later budget
    for name, budget in (("g", 0.0), ("h", 0.0005)):
        with pytest.raises(PoolTimeout) as info, pool.handler(name, timeout=budget):
            pass
        assert not isinstance(info.value, NoHealthyEndpoint), info.value
    stats = pool.stats()["endpoints"][f"127.0.0.1:{pg.port}/postgres"]
    assert stats["state"] == "up" and stats["quarantines"] == 0 and stats["connect_errors"] == 0
    with pool.handler("other", timeout=0.5) as db:  # the same, healthy server
        assert db.query("SELECT 1") == [(1,)]
    # the connect the impatient caller asked for was not thrown away: it serves the next one
    wait_until(lambda: pool.stats()["groups"]["g"]["idle"] >= 1, 5, "the connect to finish")
    connects = pool.stats()["groups"]["g"]["connects"]
    with pool.handler("g", timeout=0.5) as db:
        assert db.query("SELECT 1") == [(1,)]
    assert pool.stats()["groups"]["g"]["connects"] == connects


# --- 2. no livelock when deadlines are near the connect time --------------------------------


def test_deadlines_near_the_connect_time_do_not_livelock(make_pool, pg):
    app = "gp-deadline-storm"
    pool = make_pool({"g": {"connection_count": 2}}, application_name=app)
    rng = random.Random(16)
    served, timed_out = [0], [0]
    stop_at = time.monotonic() + 2.0

    def caller() -> None:
        while time.monotonic() < stop_at:
            try:
                with pool.handler("g", timeout=rng.uniform(0.0005, 0.02)) as db:
                    db.query("SELECT 1")
                served[0] += 1
            except PoolTimeout:
                timed_out[0] += 1
                sleep(0.001)

    tasks = [spawn(caller) for _ in range(10)]
    join_all(tasks, 20)
    stats = pool.stats()["groups"]["g"]
    assert [t.error for t in tasks if t.error] == []
    assert stats["connects"] <= 2, stats  # nothing half-made was thrown away
    assert stats["discards"] == 0, stats
    assert served[0] > 100, (served, timed_out)
    assert app_conns(pg, app) == 2


# --- 3. a failed refill never loses a slot --------------------------------------------------


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
def test_a_refill_that_fails_keeps_every_slot_until_the_server_is_back(make_pool, pg_factory):
    app = "gp-refill"
    server = pg_factory(start=False)
    pool = make_pool({"g": {"connection_count": 3, "min_size": 3}}, db=server.endpoint(),
                     application_name=app, maintenance_interval=0.05,
                     quarantine_initial=0.05, quarantine_max=0.2)
    wait_until(lambda: pool.stats()["endpoints"][f"127.0.0.1:{server.port}/postgres"]
               ["connect_errors"] >= 2, 10, "refill attempts to fail")
    server.start()
    wait_until(lambda: pool.stats()["groups"]["g"]["idle"] == 3, 10, "the refill to complete")
    stats = pool.stats()["groups"]["g"]
    assert stats["size"] == 3 and stats["connecting"] == 0
    wait_until(lambda: app_conns(server, app) == 3, 5, "the server to see 3 connections")
    group = pool.group("g")
    held = [group.acquire(timeout=1) for _ in range(3)]  # the group holds all three
    for pc in held:
        group.release(pc)


# --- 4. load moves back to a restarted server while the group is saturated ------------------


def test_a_restarted_server_gets_its_share_back_under_saturation(make_pool, pg_factory):
    first, second = pg_factory(), pg_factory()
    pool = make_pool(
        {"read": {"role": "any", "autocommit": True, "readonly": True,
                  "connection_count": 6, "timeout": 5}},
        db=[first.endpoint(), second.endpoint()],
        quarantine_initial=0.1, quarantine_max=0.3,
    )
    reads: list[tuple[float, int]] = []
    errors: list[BaseException] = []
    running = [True]

    def reader() -> None:
        while running[0]:
            try:
                with pool.handler("read") as db:
                    port = db.query_one("SELECT inet_server_port(), pg_sleep(0.005)")[0]
                reads.append((time.monotonic(), port))
            except Exception as exc:
                errors.append(exc)

    tasks = [spawn(reader) for _ in range(20)]  # more readers than connections: saturated
    try:
        wait_until(lambda: {p for _, p in reads} == {first.port, second.port}, 10,
                   "reads on both servers")
        second.stop("immediate")
        crashed = time.monotonic()
        wait_until(lambda: any(t > crashed + 0.5 for t, _ in reads), 10, "reads after crash")
        second.start()
        restarted = time.monotonic()
        wait_until(lambda: any(t > restarted + 3 for t, _ in reads), 15, "reads after restart")
        assert pool.stats()["groups"]["read"]["waiting"] > 0  # still saturated
    finally:
        running[0] = False
        join_all(tasks, 15)
    assert errors == []  # a readonly group replays what the crash cut off
    window = [p for t, p in reads if restarted + 1 <= t <= restarted + 3]
    share = window.count(second.port) / len(window)
    assert share >= 0.25, share


# --- 5. min_size connections stay usable through a quiet period -----------------------------


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
def test_min_size_connections_are_kept_fresh_in_the_background(make_pool):
    pool = make_pool({"g": {"connection_count": 3, "min_size": 2, "max_idle": 0.6}},
                     maintenance_interval=0.05)
    group = pool.group("g")
    wait_until(lambda: group.stats()["idle"] == 2, 5, "warm-up to min_size")
    connects = group.stats()["connects"]
    # a quiet period longer than max_idle ...
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        sleep(0.05)
    # ... and the borrow needs no connect: the kept connections were pinged, not dropped
    held = [group.acquire(timeout=1) for _ in range(2)]
    for pc in held:
        group.release(pc)
    stats = group.stats()
    assert stats["connects"] == connects, stats
    assert stats["discards"] == 0, stats


# --- 6. role probes stay within the group's budget ------------------------------------------


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
def test_role_probes_of_a_saturated_group_open_no_extra_connections(make_pool, pg):
    app = "gp-role-budget"
    pool = make_pool({"w": {"role": "primary", "connection_count": 1}}, application_name=app,
                     role_check_interval=0.05, maintenance_interval=0.05)
    group = pool.group("w")
    held = group.acquire(timeout=2)
    try:
        most = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            most = max(most, app_conns(pg, app))
            sleep(0.02)
        assert most == 1
        assert group.stats()["connects"] == 1
    finally:
        group.release(held)


# --- 7. a burst is served by returned connections, not by growing to the maximum ------------


@pytest.mark.skipif(MODE == "non-threaded", reason="a burst needs concurrent callers")
def test_a_burst_does_not_grow_the_group_to_its_maximum(make_pool, pg):
    """psycopg_pool's spike scenario: connects are slow (post_auth_delay makes each take a
    whole second on the real server), 5 connections are warm, 50 callers of 2 ms work
    arrive at once. The returned connections serve them; the group grows by one connect
    at a time while callers wait, so it stays far below its maximum."""
    pool = make_pool({"g": {"connection_count": 10, "min_size": 5, "timeout": 10}},
                     db=pg.endpoint(options={"options": "-c post_auth_delay=1"}),
                     maintenance_interval=0.05)
    group = pool.group("g")
    wait_until(lambda: group.stats()["idle"] == 5, 15, "warm-up to min_size")
    waits: list[float] = []

    def client() -> None:
        started = time.monotonic()
        with pool.handler("g") as db:
            waits.append(time.monotonic() - started)
            db.query("SELECT pg_sleep(0.002)")

    tasks = [spawn(client) for _ in range(50)]
    join_all(tasks, 20)
    assert [t.error for t in tasks if t.error] == []
    assert group.stats()["size"] <= 7, group.stats()
    waits.sort()
    assert waits[len(waits) // 2] < 0.5, waits  # nobody waited for a slow connect of its own


# --- 8. a light load is spread over the endpoints ------------------------------------------


def test_sequential_handlers_are_spread_over_both_endpoints(make_pool, pg, pg_factory):
    other = pg_factory()
    pool = make_pool({"g": {"connection_count": 4, "autocommit": True}},
                     db=[pg.endpoint(), other.endpoint()])
    ports = []
    for _ in range(6):
        with pool.handler("g", timeout=5) as db:
            ports.append(db.query_one("SELECT inet_server_port(), pg_sleep(0.02)")[0])
    assert set(ports) == {pg.port, other.port}, ports
    assert pool.stats()["groups"]["g"]["size"] == 2  # one connection each: no more


def test_probe_connections_are_counted_in_the_endpoint_budget(make_pool, pg, pg_factory):
    """A recovered endpoint of a full group is probed by at most one short-lived connection,
    which is never kept: the group's size never exceeds connection_count."""
    flaky = pg_factory()
    pool = make_pool({"g": {"connection_count": 2, "autocommit": True, "timeout": 5}},
                     db=[pg.endpoint(), flaky.endpoint()],
                     quarantine_initial=0.1, quarantine_max=0.2)
    assert sorted(held_ports(pool, "g", 2)) == sorted([pg.port, flaky.port])
    flaky.stop("immediate")
    group = pool.group("g")
    held = [group.acquire(timeout=5) for _ in range(2)]  # the dead one is replaced on pg
    try:
        wait_until(lambda: endpoint_stats(pool, flaky)["state"] == "quarantined"
                   or endpoint_stats(pool, flaky)["connect_errors"] > 0, 5, "the crash seen")
        flaky.start()
        if GREEN or MODE == "threaded":
            wait_until(lambda: endpoint_stats(pool, flaky)["state"] == "up", 10, "the probe")
        assert group.stats()["size"] <= 2
    finally:
        for pc in held:
            group.release(pc)


def test_non_threaded_mode_connects_inline_and_says_it_cannot_wait(pg):
    """Non-threaded mode has no background: the connect runs in the caller, and an exhausted
    group fails at once with a message that claims no wait it never made."""
    from greenpool import Pool

    pool = Pool({"type": "non-threaded", "db": pg.endpoint(),
                 "groups": {"g": {"connection_count": 1, "timeout": 30}}})
    try:
        group = pool.group("g")
        held = group.acquire()
        started = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            group.acquire()
        assert time.monotonic() - started < 1
        assert "30.00 s" not in str(info.value)
        assert "nobody can return one while you wait" in str(info.value)
        group.release(held)
        pc = group.acquire()  # the slot came back: no connect was lost
        group.release(pc)
        assert group.stats()["size"] == 1 and group.stats()["connects"] == 1
    finally:
        pool.close()


# --- non-threaded mode: inline connects -------------------------------------------------------


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
@pytest.mark.parametrize("budget", [0.3, 1.2])
def test_non_threaded_acquire_from_a_black_hole_ends_within_its_timeout(blackhole, budget):
    """``non-threaded`` connects inline, in the caller. Against a server that accepts TCP and
    never answers, with a ``connect_timeout`` (3 s) longer than the caller's ``timeout``, the
    acquire still ends within its timeout (plus a small margin) with a pool error."""
    from greenpool import Pool

    pool = Pool({"type": "non-threaded", "db": blackhole.endpoint(connect_timeout=3),
                 "groups": {"g": {"connection_count": 2}}})
    try:
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.group("g").acquire(timeout=budget)
        elapsed = time.monotonic() - started
        assert elapsed <= budget + (0.2 if budget < 1 else 0.3), elapsed
        stats = pool.stats()["groups"]["g"]
        assert stats["size"] == 0 and stats["in_use"] == 0  # no slot kept by the attempt
    finally:
        pool.close()


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
def test_non_threaded_sequential_loans_are_spread_over_both_endpoints(pg, pg_factory):
    """A light load in ``non-threaded`` mode (one loan at a time) still opens a connection
    on each endpoint of the group, as the background modes do: both servers serve loans."""
    from greenpool import Pool

    other = pg_factory()
    pool = Pool({"type": "non-threaded", "db": [pg.endpoint(), other.endpoint()],
                 "groups": {"g": {"connection_count": 4, "autocommit": True}}})
    try:
        ports = []
        for _ in range(8):
            with pool.handler("g", timeout=5) as db:
                ports.append(db.query_one("SELECT inet_server_port()")[0])
        assert set(ports) == {pg.port, other.port}, ports
        opened = {label: ep["open"] for label, ep in pool.stats()["endpoints"].items()}
        assert all(count >= 1 for count in opened.values()), opened
        assert pool.stats()["groups"]["g"]["size"] <= 4
    finally:
        pool.close()


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
@pytest.mark.parametrize("budget", [0.0, 0.05])
def test_non_threaded_tiny_budget_on_a_healthy_server_is_a_plain_timeout(pg, budget):
    """``non-threaded`` connects inline, within the caller's time. A budget too short for
    the first connect to a healthy server is the caller's: a plain PoolTimeout, not
    NoHealthyEndpoint (which sends the operator to check the servers). The server's answer
    to the login is held 1 s by a proxy (a warm local server can log in within a few ms)."""
    with DelayProxy(pg.port, 1.0, b"user") as proxy:
        pool = Pool({"type": "non-threaded", "db": pg.endpoint(port=proxy.port),
                     "groups": {"g": {}}})
        try:
            with pytest.raises(PoolTimeout) as info, pool.handler("g", timeout=budget):
                pass
            assert not isinstance(info.value, NoHealthyEndpoint), info.value
            (stats,) = pool.stats()["endpoints"].values()
            assert stats["state"] == "up" and stats["connect_errors"] == 0, stats
            assert proxy.held() == (1 if budget else 0)  # the one attempt the time allowed
        finally:
            pool.close()


# --- a black hole beside a healthy server ------------------------------------------------------


@pytest.mark.skipif(MODE == "non-threaded", reason="a warm group needs background connects")
@pytest.mark.timeout(90)
def test_a_black_hole_does_not_stop_a_warm_group_from_growing_on_a_healthy_server(
    make_pool, pg, blackhole
):
    """A group over two endpoints, a black hole (accepts TCP, never answers; connect_timeout
    3 s) first and a healthy server second. Warm: two connections are held throughout.
    Then rounds 1 to 7, round k holding k connections at once, each taken with a 1 s
    timeout (28 acquires); each round starts while the black hole is being probed again,
    if it is. The healthy server has room for all of them (connection_count 10), so every
    acquire succeeds however long the black hole keeps its connects hanging."""
    pool = make_pool({"g": {"connection_count": 10, "autocommit": True}},
                     db=[blackhole.endpoint(connect_timeout=3), pg.endpoint()])
    group = pool.group("g")
    warm = [group.acquire(timeout=15) for _ in range(2)]
    failures: list[str] = []
    hole = f"{blackhole.host}:{blackhole.port}/blackhole"

    def probed() -> bool:
        return bool(pool.stats()["endpoints"][hole]["state"] == "probing")

    try:
        for k in range(1, 8):
            deadline = time.monotonic() + 5  # the moment a new connection is hardest to get
            while not probed() and time.monotonic() < deadline:
                sleep(0.01)
            held = []
            try:
                for _ in range(k):
                    try:
                        held.append(group.acquire(timeout=1))
                    except PoolTimeout as exc:
                        failures.append(f"round {k}: {type(exc).__name__}: {exc}")
                for pc in held:
                    with pc.raw.cursor() as cursor:
                        cursor.execute("SELECT inet_server_port()")
                        assert cursor.fetchone()[0] == pg.port
            finally:
                for pc in held:
                    group.release(pc)
    finally:
        for pc in warm:
            group.release(pc)
    assert not failures, f"{len(failures)} of 28 acquires failed; first: {failures[0]}"


# --- non-threaded mode: a replaced connection is opened on the next borrow -------------


def test_non_threaded_a_dead_idle_connection_does_not_lose_its_slot(pg):
    """non-threaded: the borrow check finds the idle connection's backend gone and the group
replaces it. No background task can open the replacement in this mode (there is none), so
the slot must not stay 'connecting' for good: the next borrows are served."""
    pool = Pool({"type": "non-threaded", "db": pg.endpoint(), "application_name": "rv-nt",
                 "groups": {"g": {"connection_count": 1}}})
    try:
        with pool.handler("g", timeout=2) as db:
            pid = db.query_one("SELECT pg_backend_pid()")[0]
        pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: pool.group("g")._idle[0].readable(), 5, "the backend to go")
        served = []
        for _ in range(2):
            try:
                with pool.handler("g", timeout=2) as db:
                    served.append(db.query_one("SELECT 1")[0])
            except PoolTimeout:
                pass
        stats = pool.stats()["groups"]["g"]
        assert stats["connecting"] == 0, stats
        assert served == [1, 1], stats
    finally:
        pool.close()



# --- a busy group is busy, whatever its standby's lag went unmeasured meanwhile ----------


def test_a_busy_max_lag_standby_group_times_out_busy_not_for_want_of_an_endpoint(
        make_pool, pg_factory):
    """A ``max_lag`` standby group whose only connection is lent: the lag measured when it
    was opened ages past ``max_lag`` (housekeeping, which would measure it again, is slow
    here). The server is fine and the group merely busy: a caller whose time runs out gets
    a plain PoolTimeout, not NoHealthyEndpoint (which sends the operator to the servers)."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool({"r": {"role": "standby", "max_lag": 0.5, "autocommit": True,
                            "connection_count": 1}},
                     db=[primary.endpoint(), standby.endpoint()], role_check_interval=60,
                     maintenance_interval=60)
    with pool.handler("r", timeout=5) as db:
        assert db.query_one("SELECT inet_server_port()")[0] == standby.port
        wait_until(lambda: standby.port not in {
            ep.config.port for ep in pool.group("r").preferred_endpoints()}, 10,
            "the lag measured at the connect to age past max_lag")
        other = spawn(lambda: pool.handler("r", timeout=0.3).__enter__())
        assert other.join(10)
    assert isinstance(other.error, PoolTimeout), other.error
    assert not isinstance(other.error, NoHealthyEndpoint), other.error
    assert endpoint_stats(pool, standby)["state"] == "up"


# --- an endpoint being probed is still down for a group that never tried it ---------------


def test_a_caller_timing_out_while_its_dead_endpoint_is_probed_is_told_the_endpoint_is_why(
        blackhole, mode):
    """Another group found the one endpoint dead (a black hole) and quarantined it; while
    its probe waits out ``connect_timeout`` the endpoint is *probing*. A group that never
    tried it has no failure of its own, and its connect task waits for the probe: its
    caller whose time runs out is told NoHealthyEndpoint, not a PoolTimeout about connects
    under way."""
    pool = Pool({"type": mode, "db": blackhole.endpoint(connect_timeout=2.0),
                 "quarantine_initial": 0.05, "quarantine_max": 0.1,
                 "groups": {"a": {"timeout": 2.5}, "b": {"timeout": 0.3}}})
    try:
        with pytest.raises(NoHealthyEndpoint), pool.handler("a"):
            pass
        label = f"127.0.0.1:{blackhole.port}/blackhole"
        wait_until(lambda: pool.stats()["endpoints"][label]["state"] == "probing", 5,
                   "the next probe of the black hole")
        with pytest.raises(PoolTimeout) as info, pool.handler("b"):
            pass
        assert pool.stats()["endpoints"][label]["state"] == "probing"  # (still: 2 s each)
    finally:
        pool.close()
    assert isinstance(info.value, NoHealthyEndpoint), info.value
    assert pool.stats()["groups"]["b"]["timeouts"] == 1
