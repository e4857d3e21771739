"""Changing a running pool: drain(), resize() and reconfigure() under load, on real servers.

The promise: no loan in flight is dropped and no caller sees an error, while connections
are replaced, the group's size changes, or endpoints are added and removed.
"""

from __future__ import annotations

import sys
import threading

import pytest
from lending import discards, group_stats, lend_all
from load import Load
from modes import MODE, join_all, sleep, spawn, wait_until

from greenpool import ConfigError, Pool

pytestmark = pytest.mark.skipif(MODE == "non-threaded", reason="background connects")


@pytest.fixture(scope="module")
def second_db(pg):
    """A second database on the shared server: a second endpoint without a second server."""
    name = "live_second"
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
        pg.create_database(name)
    return name


def _config(mode, db, **group):
    return {"type": mode, "db": db, "maintenance_interval": 0.1,
            "groups": {"g": {"connection_count": 4, "timeout": 10, **group}}}


def _pids(pool, group="g"):
    return {int(pc.raw.get_backend_pid()) for pc in pool.group(group).connector.opened
            if not pc.raw.closed}


@pytest.mark.timeout(90)
def test_drain_under_load_replaces_every_connection_without_an_error(pg, mode):
    """8 tasks borrow from 4 connections; drain() retires all 4 (idle now, lent on return)
    while the load goes on: zero errors, none of the old backends serves afterwards."""
    pool = Pool(_config(mode, pg.endpoint(), min_size=2))
    load = Load(pool, "g", tasks=8)
    try:
        load.until(200)
        before = _pids(pool)
        pool.drain()
        wait_until(lambda: not _pids(pool) & before, 10, "the old connections to close")
        load.pids.clear()
        load.until(200)
        assert not load.pids & before
        assert discards(pool, "g", "drained") >= 1  # (a few may expire on borrow instead)
    finally:
        load.stop()
        pool.close()
    assert load.longest_wait < 5


@pytest.mark.timeout(60)
def test_drain_retires_a_lent_connection_only_when_it_comes_back(pg, mode):
    """A connection lent across drain() keeps working inside its block; it is closed when
    returned, and the group lends its full size again."""
    pool = Pool(_config(mode, pg.endpoint()))
    try:
        lend_all(pool, "g", 4, within=10)
        with pool.handler("g") as db:
            (pid,) = db.query_one("SELECT pg_backend_pid()")
            pool.drain("g")
            assert group_stats(pool, "g")["idle"] == 0
            assert db.query_one("SELECT pg_backend_pid()") == (pid,)
        wait_until(lambda: pid not in _pids(pool), 5, "the lent connection to close")
        assert len(lend_all(pool, "g", 4, within=10)) == 4
        assert group_stats(pool, "g")["size"] <= 4
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_resize_grows_at_once_and_shrinks_as_loans_return(pg, mode):
    """resize() to 6 lends 6 at once; resize() to 2 while 5 are lent keeps those 5 working
    and closes them down to 2 as they come back; min_size follows."""
    pool = Pool(_config(mode, pg.endpoint()))
    try:
        pool.resize("g", 6, min_size=1)
        assert len(lend_all(pool, "g", 6, within=10)) == 6
        group = pool.group("g")
        held = [group.acquire(5) for _ in range(5)]
        pool.resize("g", 2)
        assert pool.config.groups["g"].min_size == 1
        for pc in held:
            group.release(pc)
        stats = group_stats(pool, "g")
        assert stats["size"] == 2 and stats["max_size"] == 2, stats
        assert len(lend_all(pool, "g", 2, within=10)) == 2
        with pytest.raises(ConfigError, match="min_size"):
            pool.resize("g", 2, min_size=3)
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_reconfigure_adds_and_removes_endpoints_under_load(pg_factory, mode, server_conns):
    """Load on one server; reconfigure() adds a second (connections reach it), then removes
    the first (its connections all close, lent ones as they return): zero errors."""
    a, b = pg_factory(), pg_factory()
    app = "live-endpoints"
    config = _config(mode, [a.endpoint()], connection_count=6)
    pool = Pool({**config, "application_name": app})
    load = Load(pool, "g", tasks=8, hold=0.005)
    try:
        load.until(100)
        pool.reconfigure({**config, "application_name": app, "db": [a.endpoint(), b.endpoint()]})
        wait_until(lambda: server_conns(app, cluster=b) > 0, 15, "connections on the new server")
        load.until(100)
        pool.reconfigure({**config, "application_name": app, "db": [b.endpoint()]})
        assert server_conns(app, cluster=a, expect=0, timeout=15) == 0
        load.until(100)
        assert [*pool.stats()["endpoints"]] == [f"{b.host}:{b.port}/postgres"]
        assert group_stats(pool, "g")["size"] <= 6
    finally:
        load.stop()
        pool.close()


@pytest.mark.timeout(60)
def test_reconfigure_applies_settings_that_travel_with_connections(pg, mode):
    """A new statement_timeout reaches every connection (by draining the group); a new
    weight alone retires none."""
    config = _config(mode, pg.endpoint())
    pool = Pool(config)
    try:
        lend_all(pool, "g", 4, within=10)
        pool.reconfigure({**config, "db": {**pg.endpoint(), "weight": 3}})
        assert discards(pool, "g") == 0
        pool.reconfigure({**config, "db": {**pg.endpoint(), "weight": 3},
                          "groups": {"g": {"connection_count": 4, "statement_timeout": 7}}})
        for _ in range(6):
            with pool.handler("g") as db:
                assert db.query_one("SHOW statement_timeout") == ("7s",)
    finally:
        pool.close()


@pytest.mark.skipif(MODE == "non-threaded", reason="auto never picks non-threaded")
@pytest.mark.timeout(60)
def test_reconfigure_of_a_pool_whose_mode_was_picked_for_it_keeps_that_mode(pg, mode):
    """A configuration without ``type`` (``auto``) applied to a running pool made from one
    without ``type`` too is no change of mode: it applies."""
    config = {k: v for k, v in _config(mode, pg.endpoint()).items() if k != "type"}
    pool = Pool(config)
    try:
        pool.reconfigure({**config, "groups": {"g": {"connection_count": 5}}})
        assert pool.config.mode == mode and pool.group("g").config.connection_count == 5
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_reconfigure_refuses_what_it_cannot_apply_live_and_changes_nothing(pg, mode):
    """Another mode, a group added or removed, a group's role: refused with a sentence that
    names the key; the pool goes on with its old configuration."""
    config = _config(mode, pg.endpoint())
    pool = Pool(config)
    try:
        other = "threaded" if mode != "threaded" else "gevent"
        for change, words in (
            ({"type": other}, "type: cannot change in a running pool"),
            ({"groups": {"g": {}, "h": {}}}, "a running pool keeps its groups"),
            ({"groups": {"g": {"role": "primary"}}}, "groups.g.role: cannot change"),
            ({"maintenance_interval": 3}, "maintenance_interval: cannot change"),
        ):
            with pytest.raises(ConfigError, match=words):
                pool.reconfigure({**config, **change})
        assert pool.config.groups["g"].role == "any" and pool.config.mode == mode
        assert len(lend_all(pool, "g", 4, within=10)) == 4
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_reconfigure_with_a_new_password_retires_connections_made_with_the_old(pg, mode):
    """The role's password changes (ALTER ROLE) and the new configuration carries it: the
    endpoint's connections are retired, the new ones log in with the new password."""
    import uuid

    from psycopg2 import sql as pgsql

    user = f"live_{uuid.uuid4().hex[:8]}"
    pg.create_user(user, "first")
    config = _config(mode, {**pg.endpoint(user=user), "pass": "first"})
    pool = Pool(config)
    try:
        before = set(lend_all(pool, "g", 4, within=10))
        pg.execute(pgsql.SQL("ALTER ROLE {} PASSWORD 'second'").format(pgsql.Identifier(user)))
        pool.reconfigure({**config, "db": {**pg.endpoint(user=user), "pass": "second"}})
        assert discards(pool, "g", "drained") == 4
        assert not set(lend_all(pool, "g", 4, within=10)) & before
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_reconfigure_retires_a_groups_connections_to_an_endpoint_it_no_longer_uses(
        pg, mode, server_conns, second_db):
    """Two endpoints (two databases of one server); the group's `endpoints` drops one that
    stays in `db`: the group's connections to it close, the group lends its full size."""
    app = "live-subset"
    db = [pg.endpoint(), pg.endpoint(name=second_db)]
    config = {**_config(mode, db), "application_name": app}
    pool = Pool(config)
    try:
        lend_all(pool, "g", 4, within=10)
        assert server_conns(app, dbname=second_db) > 0
        pool.reconfigure({**config, "groups": {"g": {"connection_count": 4, "timeout": 10,
                                                     "endpoints": [0]}}})
        assert server_conns(app, dbname=second_db, expect=0) == 0
        assert len(lend_all(pool, "g", 4, within=10)) == 4
        assert server_conns(app, dbname=second_db) == 0
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_reconfigure_at_random_under_load_keeps_the_books_and_fails_no_one(
        pg, mode, server_conns, second_db):
    """30 random configurations in a row under load (endpoints swapped, re-weighted, added
    and removed; sizes up and down; a setting that travels; a drain now and then): zero
    errors, and at rest the books balance and nothing is left on a removed endpoint."""
    import random

    from modes import sleep

    rng = random.Random(7)
    app = "live-random"
    a, b = pg.endpoint(), pg.endpoint(name=second_db)
    dbs = [[a], [a, b], [b], [{**b, "weight": 3}, a], [{**a, "weight": 2}, b]]
    base = {"type": mode, "maintenance_interval": 0.1, "application_name": app}
    pool = Pool({**base, "db": [a], "groups": {"g": {"connection_count": 6, "timeout": 10}}})
    load = Load(pool, "g", tasks=12, hold=0.003)
    try:
        load.until(50)
        for _ in range(30):
            count = rng.randint(2, 8)
            pool.reconfigure({**base, "db": rng.choice(dbs), "groups": {"g": {
                "connection_count": count, "min_size": min(2, count), "timeout": 10,
                "statement_timeout": rng.choice([None, 5])}}})
            if rng.random() < 0.3:
                pool.drain()
            sleep(rng.choice([0, 0.01, 0.05]))
        pool.reconfigure({**base, "db": [a], "groups": {"g": {"connection_count": 6,
                                                              "timeout": 10}}})
        load.until(100)
    finally:
        load.stop()
    try:
        wait_until(lambda: group_stats(pool, "g")["connecting"] == 0, 10, "connects to end")
        s = group_stats(pool, "g")
        assert s["size"] == s["idle"] + s["in_use"] + s["connecting"] <= 6, s
        assert s["connects"] - s["discards"] == s["idle"] + s["in_use"], s
        assert server_conns(app, dbname=second_db, expect=0) == 0
        assert len(lend_all(pool, "g", 6, within=10)) == 6
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_resize_down_while_loans_return_at_once_leaves_no_waiter_without_a_connection(
        pg, mode):
    """8 loans held, 30 callers waiting; resize to 1, then all 8 come back at once. Each
    return sees the group above its new count and closes its connection; threads doing so
    together must not close the last one too and leave the waiters with no connection and
    no connect under way (they timed out). A fast thread switch interval makes the returns
    interleave."""
    if MODE != "threaded":
        pytest.skip("returns interleave between a check and its accounting only in threads")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(3):
            pool = Pool(_config(mode, [pg.endpoint()], connection_count=8, min_size=0,
                                timeout=4))
            go, held, errors, served = threading.Event(), [], [], []

            def hold(pool=pool, go=go, held=held):
                with pool.handler("g") as db:
                    db.query_one("SELECT 1")
                    held.append(1)
                    go.wait(30)

            def wait(pool=pool, errors=errors, served=served):
                try:
                    with pool.handler("g") as db:
                        served.append(db.query_one("SELECT 1"))
                except Exception as exc:
                    errors.append(exc)

            holders = [spawn(hold) for _ in range(8)]
            wait_until(lambda held=held: len(held) == 8, 10, "8 loans held")
            waiters = [spawn(wait) for _ in range(30)]
            wait_until(lambda pool=pool: group_stats(pool, "g")["waiting"] == 30, 10,
                       "30 callers waiting")
            pool.resize("g", 1)
            go.set()
            for task in holders + waiters:
                task.join(30)
            try:
                assert not errors, f"{len(errors)} waiters failed: {errors[0]!r}"
                assert len(served) == 30
            finally:
                pool.close()
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.timeout(60)
def test_reconfigure_of_retry_sleep_keeps_the_connections_and_applies_to_the_next_quarantine(
        pg, mode):
    """``connection_retry_sleep`` only paces the pool's own retries: a new value keeps the
    endpoint's connections (nothing travels with them) and is its backoff from then on."""
    config = _config(mode, pg.endpoint())
    pool = Pool(config)
    try:
        before = set(lend_all(pool, "g", 4, within=10))
        pool.reconfigure({**config, "db": {**pg.endpoint(), "connection_retry_sleep": 45.0}})
        assert discards(pool, "g") == 0
        assert set(lend_all(pool, "g", 4, within=10)) == before
        (endpoint,) = pool.group("g").endpoints
        assert endpoint.backoff_max == 45.0  # the first quarantine's length, at least
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_removing_an_endpoint_frees_the_slots_of_connects_under_way_to_it_at_once(
        pg, mode, blackhole):
    """Both slots of a group are held by connects to a server that never answers; a
    reconfigure() that removes it for a healthy one lends a connection within the caller's
    short timeout, not after the black hole's connect_timeout; the books stay exact."""
    config = {"type": mode, "maintenance_interval": 0.1,
              "groups": {"g": {"connection_count": 2, "min_size": 2, "timeout": 2}}}
    pool = Pool({**config, "db": [blackhole.endpoint(connect_timeout=20)]})
    try:
        group = pool.group("g")
        hole = group.connector.endpoints[0]
        wait_until(lambda: hole.connecting == 2, 10, "two connects to the black hole")
        pool.reconfigure({**config, "db": [pg.endpoint()]})
        with pool.handler("g", timeout=3) as db:
            assert db.query_one("SELECT 1") == (1,)
        stats = group_stats(pool, "g")
        assert stats["size"] <= 2 and stats["connecting"] <= 2, stats
        assert all(pc.endpoint.label != f"{blackhole.host}:{blackhole.port}/blackhole"
                   for pc in group.connector.opened)
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_a_connect_under_way_to_an_endpoint_a_group_drops_never_reaches_that_group(
        pg, mode, second_db, server_conns):
    """Group g uses servers A and B, group h only B; while g's connect to B is held up (a
    proxy delays its login), reconfigure() takes B out of g. The connection that arrives
    is closed, never idle or lent in g; g and h keep exact books."""
    from delayproxy import DelayProxy

    app = "live-dropped"
    with DelayProxy(pg.port, 3.0, app.encode()) as proxy:
        a, b = pg.endpoint(), proxy.endpoint(pg, name=second_db)
        config = {"type": mode, "application_name": app, "maintenance_interval": 0.1,
                  "db": [a, b],
                  "groups": {"g": {"connection_count": 4, "min_size": 1, "endpoints": [0, 1]},
                             "h": {"connection_count": 2, "endpoints": [1]}}}
        pool = Pool(config)
        try:
            group = pool.group("g")
            wait_until(lambda: proxy.held() >= 1, 10, "g's connect to B to be held")
            pool.reconfigure({**config, "groups": {**config["groups"],
                                                   "g": {**config["groups"]["g"],
                                                         "endpoints": [0]}}})
            wait_until(lambda: discards(pool, "g", "endpoint_removed") == 1, 10,
                       "the held connect's connection to arrive and be closed")
            assert [pc.endpoint.label for pc in group.connector.opened
                    if not pc.raw.closed and pc.endpoint.label.endswith(second_db)] == []
            stats = group_stats(pool, "g")
            assert stats["size"] == stats["idle"] + stats["in_use"] + stats["connecting"], stats
            assert server_conns(app, dbname=second_db, expect=0) == 0  # closed, not leaked
            assert server_conns(app, dbname=pg.endpoint()["name"]) == stats["size"]
        finally:
            pool.close()


@pytest.mark.timeout(60)
def test_an_exclusive_connect_under_way_to_an_endpoint_reconfigure_removes_is_never_handed_out(
        pg, mode, second_db, server_conns):
    """An exclusive() waits for a dedicated connect to endpoint B (a proxy holds its login)
    when reconfigure() replaces B by A. The connection B's connect still opens is closed
    (``endpoint_removed``), never handed out: the block runs on A, and B keeps no session."""
    from delayproxy import DelayProxy

    app = "live-exclusive-removed"
    with DelayProxy(pg.port, 2.0, app.encode()) as proxy:
        groups = {"g": {"connection_count": 1, "min_size": 0, "exclusive_limit": 2,
                        "timeout": 10}}
        config = {"type": mode, "application_name": app, "maintenance_interval": 0.1,
                  "groups": groups}
        pool = Pool({**config, "db": proxy.endpoint(pg, name=second_db, connect_timeout=5)})
        try:
            def block() -> str:
                with pool.exclusive("g", timeout=10) as conn, conn.cursor() as cursor:
                    cursor.execute("SELECT current_database()")
                    return str(cursor.fetchone()[0])

            task = spawn(block)
            wait_until(lambda: proxy.held() >= 1, 10, "the dedicated connect to B to be held")
            pool.reconfigure({**config, "db": pg.endpoint()})
            join_all([task], 15)
            assert task.error is None, task.error
            assert task.result == pg.endpoint()["name"]  # A, not B
            wait_until(lambda: discards(pool, "g", "endpoint_removed") == 1, 10,
                       "the held connect's connection to arrive and be closed")
            assert server_conns(app, dbname=second_db, expect=0) == 0
        finally:
            pool.close()


@pytest.mark.timeout(60)
def test_a_connection_to_an_endpoint_the_group_no_longer_has_is_closed_as_it_is_delivered(
        pg, mode, second_db, server_conns):
    """A connect the group could not abandon (one housekeeping made in a slot it reserved)
    opens a connection to B; meanwhile reconfigure() takes B out of the group (B stays in
    the pool). Delivered, that connection is closed and its slot given back: it is never
    idle or lent, and the server's count matches the group's."""
    app = "live-delivered"
    config = {"type": mode, "application_name": app, "maintenance_interval": 60,
              "db": [pg.endpoint(), pg.endpoint(name=second_db)],
              "groups": {"g": {"connection_count": 2, "endpoints": [0, 1]}}}
    pool = Pool(config)
    try:
        group = pool.group("g")
        slot = group._reserve_slot()
        assert slot is not None
        with slot:
            pc = group.connector.probe(group.endpoints[1], slot.generation)
            assert pc is not None
            pool.reconfigure({**config, "groups": {"g": {"connection_count": 2,
                                                         "endpoints": [0]}}})
            group._deliver(slot, pc)
        assert pc.raw.closed
        stats = group_stats(pool, "g")
        assert (stats["size"], stats["idle"], stats["connecting"]) == (0, 0, 0), stats
        assert discards(pool, "g", "endpoint_removed") == 1
        assert server_conns(app, dbname=second_db, expect=0) == 0
        with pool.handler("g", timeout=5) as db:
            assert db.query_one("SELECT current_database()") == (pg.endpoint()["name"],)
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_resize_below_the_connects_under_way_keeps_only_the_new_count_trying(
        pg, mode, blackhole):
    """4 callers wait on a group of 4 whose one server never answers: 4 connects under way.
    resize() to 1: when their attempts time out, only one goes on trying (the group holds
    its new count, not 4, for as long as callers wait); swapped to a healthy server by
    reconfigure(), the callers are served."""
    from modes import Task

    config = {"type": mode, "maintenance_interval": 0.1,
              "groups": {"g": {"connection_count": 4, "timeout": 20}}}
    pool = Pool({**config, "db": [blackhole.endpoint(connect_timeout=0.5)]})
    try:
        def borrow():
            with pool.handler("g") as db:
                return db.query_one("SELECT 1")

        callers = [Task(borrow) for _ in range(4)]
        wait_until(lambda: group_stats(pool, "g")["connecting"] == 4, 10, "4 connects")
        pool.resize("g", 1)
        wait_until(lambda: group_stats(pool, "g")["size"] == 1, 10,
                   "the surplus connects to end after their attempt")
        assert group_stats(pool, "g")["waiting"] == 4
        pool.reconfigure({**config, "db": [pg.endpoint()],
                          "groups": {"g": {"connection_count": 1, "timeout": 20}}})
        for caller in callers:
            assert caller.join(15)
            assert caller.error is None and caller.result == (1,)
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_a_rolling_drain_never_lends_on_a_connection_to_an_endpoint_the_group_dropped(
        pg, mode, second_db):
    """4 connections to B lent, 4 callers waiting; reconfigure() moves the group to A, whose
    connects are slow (a proxy holds each login 1 s). As the B connections come back, the
    first two open replacements; the rolling drain would lend the others on to the waiters
    meanwhile, but they are to an endpoint the group no longer has: closed, every waiter
    is served on A."""
    from delayproxy import DelayProxy
    from modes import Task

    app = "live-rolling"
    with DelayProxy(pg.port, 1.0, app.encode()) as proxy:
        config = {"type": mode, "application_name": app, "maintenance_interval": 0.1,
                  "db": [proxy.endpoint(pg), pg.endpoint(name=second_db)],
                  "groups": {"g": {"connection_count": 4, "timeout": 20, "endpoints": [1]}}}
        pool = Pool(config)
        try:
            group = pool.group("g")
            held = [group.acquire(10) for _ in range(4)]
            got: list[str] = []

            def borrow():
                with pool.handler("g") as db:
                    got.append(db.query_one("SELECT current_database()")[0])

            callers = [Task(borrow) for _ in range(4)]
            wait_until(lambda: group_stats(pool, "g")["waiting"] == 4, 10, "4 waiters")
            pool.reconfigure({**config, "groups": {"g": {**config["groups"]["g"],
                                                         "endpoints": [0]}}})
            for pc in held:
                group.release(pc)
            for caller in callers:
                assert caller.join(15)
                assert caller.error is None
            assert got == [pg.endpoint()["name"]] * 4
        finally:
            pool.close()


@pytest.mark.timeout(240)
def test_live_changes_at_random_keep_the_books_and_lend_only_the_groups_endpoints(
        pg, mode, second_db, blackhole, server_conns):
    """A model (hypothesis) of live changes against real servers: A (healthy), B (a proxy
    that holds each login 0.3 s) and H (a black hole), in random sequences of reconfigure()
    of the group's endpoints, resize(), drain(), borrows and returns. After every step the
    books balance, no idle connection is to an endpoint the group does not have, and every
    loan made after a change is to one of the group's endpoints; at rest the server counts
    exactly the connections the pool holds open."""
    from delayproxy import DelayProxy
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        invariant,
        rule,
        run_state_machine_as_test,
    )
    from modes import sleep

    from greenpool import PoolError

    app = "live-model"
    with DelayProxy(pg.port, 0.3, app.encode()) as proxy:
        db = [pg.endpoint(), proxy.endpoint(pg, name=second_db),
              blackhole.endpoint(connect_timeout=0.5)]
        base = {"type": mode, "application_name": app, "maintenance_interval": 0.1, "db": db}

        def config(endpoints, count):
            return {**base, "groups": {"g": {"connection_count": count, "timeout": 0.5,
                                             "min_size": min(1, count),
                                             "endpoints": sorted(endpoints)}}}

        class LiveChanges(RuleBasedStateMachine):
            def __init__(self):
                super().__init__()
                self.endpoints, self.count = [0], 3
                self.pool = Pool(config(self.endpoints, self.count))
                self.group = self.pool.group("g")
                self.held = []

            @rule(endpoints=st.sets(st.sampled_from([0, 1, 2]), min_size=1),
                  count=st.integers(1, 4))
            def reconfigure(self, endpoints, count):
                self.endpoints, self.count = sorted(endpoints), count
                self.pool.reconfigure(config(self.endpoints, count))

            @rule(count=st.integers(1, 4))
            def resize(self, count):
                self.count = count
                self.pool.resize("g", count, min_size=min(1, count))

            @rule()
            def drain(self):
                self.pool.drain("g")

            @rule()
            def borrow(self):
                try:
                    pc = self.group.acquire(0.4)
                except PoolError:
                    return  # H may hold every connect, or the group is full
                assert pc.endpoint in self.group.endpoints, pc.endpoint
                self.held.append(pc)

            @rule(seconds=st.sampled_from([0.05, 0.35]))
            def time_passes(self, seconds):
                sleep(seconds)  # held logins to B complete, H's attempts time out

            @rule(index=st.integers(0, 7))
            def give_back(self, index):
                if self.held:
                    self.group.release(self.held.pop(index % len(self.held)))

            @invariant()
            def books_balance(self):
                with self.group._lock:
                    s = self.group.stats()
                    idle = list(self.group._idle)
                assert s["size"] == s["idle"] + s["in_use"] + s["connecting"], s
                assert all(pc.endpoint in self.group.endpoints for pc in idle)

            def teardown(self):
                try:
                    for pc in self.held:
                        self.group.release(pc)
                    # at rest on A alone (on H alone min_size keeps a connect trying)
                    self.pool.reconfigure(config([0], self.count))
                    a, b = self.pool._endpoints[:2]
                    wait_until(lambda: not a.connecting and not b.connecting, 10,
                               "the connects under way to A and B to end")
                    wait_until(lambda: group_stats(self.pool, "g")["connecting"] == 0, 10,
                               "the group's connects to end")
                    s = group_stats(self.pool, "g")
                    assert s["connects"] - s["discards"] == s["idle"] + s["in_use"], s
                    opened = sum(1 for pc in self.group.connector.opened if not pc.raw.closed)
                    assert opened == s["idle"], s
                    assert server_conns(app, expect=opened) == opened
                finally:
                    self.pool.close()

        run_state_machine_as_test(LiveChanges, settings=settings(
            max_examples=8, stateful_step_count=15, deadline=None, database=None,
            phases=[Phase.explicit, Phase.generate],  # shrinking replays for minutes
            suppress_health_check=list(HealthCheck)))


@pytest.mark.timeout(60)
def test_a_round_begun_before_an_endpoint_left_never_goes_on_to_that_endpoint(
        pg, mode, blackhole):
    """A connect's round tries one of two servers that never answer and would try the
    other next; while it waits on the first, reconfigure() keeps the first, takes the other
    out and adds a healthy server. The round must not go on to the endpoint taken out with
    its stale order (holding the group's only slot for another connect_timeout): no connect
    ever reaches it, and a caller is served from the healthy server."""
    from faults import BlackHole

    with BlackHole() as other:
        holes = {blackhole.port: blackhole.endpoint(connect_timeout=4),
                 other.port: other.endpoint(connect_timeout=4, name="other")}
        config = {"type": mode, "maintenance_interval": 0.1,
                  "groups": {"g": {"connection_count": 1, "min_size": 1, "timeout": 15}}}
        pool = Pool({**config, "db": list(holes.values())})
        try:
            group = pool.group("g")
            wait_until(lambda: any(ep.connecting for ep in group.connector.endpoints), 10,
                       "the round to try one black hole")
            (first,) = [ep for ep in group.connector.endpoints if ep.connecting]
            (removed,) = [ep for ep in group.connector.endpoints if ep is not first]
            pool.reconfigure({**config, "db": [holes[first.config.port], pg.endpoint()]})
            tried_removed: list[int] = []
            served = threading.Event()

            def watch() -> None:
                while not served.is_set():
                    tried_removed.append(removed.connecting)
                    sleep(0.02)

            watcher = spawn(watch)
            try:
                with pool.handler("g", timeout=15) as db:
                    assert db.query_one("SELECT 1") == (1,)
            finally:
                served.set()
                join_all([watcher], 2)
            assert not any(tried_removed), "a connect went on to the endpoint taken out"
            assert all(pc.endpoint is not removed for pc in group.connector.opened)
        finally:
            pool.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(MODE != "threaded", reason="a non-threaded pool, next to threaded tests")
def test_a_callers_own_connect_to_an_endpoint_a_signal_handler_drops_is_never_lent(
        pg, second_db):
    """non-threaded: the caller connects in its own time to B (a proxy delays its login);
    a signal handler calls reconfigure() meanwhile, replacing B by A. The connection that
    arrives is closed, and the caller, and every later one, is served from A."""
    import signal

    from delayproxy import DelayProxy

    app = "live-inline"
    with DelayProxy(pg.port, 1.0, app.encode()) as proxy:
        a, b = pg.endpoint(), proxy.endpoint(pg, name=second_db)
        config = {"type": "non-threaded", "application_name": app,
                  "groups": {"g": {"connection_count": 2, "timeout": 5}}}
        pool = Pool({**config, "db": [b]})
        previous = signal.signal(signal.SIGALRM,
                                 lambda *_: pool.reconfigure({**config, "db": [a]}))
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.4)
            for _ in range(3):
                with pool.handler("g", timeout=5) as db:
                    assert db.query_one("SELECT current_database()") == (a["name"],)
            assert discards(pool, "g", "endpoint_removed") == 1
            stats = group_stats(pool, "g")
            assert (stats["size"], stats["idle"], stats["connecting"]) == (1, 1, 0), stats
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            pool.close()


@pytest.mark.timeout(60)
def test_an_endpoint_removed_and_added_back_while_its_connections_are_lent_counts_them(
        pg, mode, server_conns, second_db):
    """An endpoint leaves the configuration while connections to it are lent, and comes
    back before they return: its reported open connections are those the process holds
    there (pg_stat_activity), and the group counts them on one endpoint, not on the one
    that left and, as none, on the one that came back; once returned they are retired."""
    app = "live-back"
    db = [pg.endpoint(), pg.endpoint(name=second_db)]
    config = {**_config(mode, db), "application_name": app}
    pool = Pool(config)
    try:
        group = pool.group("g")
        lent = [group.acquire() for _ in range(4)]
        second = group.endpoints[1]
        there = [pc for pc in lent if pc.endpoint is second]
        assert there and server_conns(app, dbname=second_db) == len(there)
        pool.reconfigure({**config, "db": db[:1]})
        pool.reconfigure(config)
        label = second.label
        assert pool.stats()["endpoints"][label]["open"] == len(there)
        counts = group.counts
        assert sorted(n for ep, n in counts.items() if ep.label == label) == [len(there)]
        pids = [pc.raw.get_backend_pid() for pc in there]
        for pc in lent:
            group.release(pc)
        assert pool.stats()["endpoints"][label]["open"] == 0
        assert all(pc.raw.closed for pc in there)  # retired (a rebalance may open others)
        wait_until(lambda: not pg.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)), 5,
            "the retired sessions to leave the server")
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_callers_after_the_timeout_was_lowered_wait_the_new_timeout(pg):
    """A caller waits with the default timeout (10 s); reconfigure() lowers it to 0.5 s; a
    caller after that waits 0.5 s, not until the older caller's deadline (one timer times
    out the default-timeout waiters, which used to expect deadlines in joining order)."""
    import time

    from greenpool import PoolTimeout

    config = {"type": MODE, "db": pg.endpoint(),
              "groups": {"g": {"connection_count": 1, "timeout": 10}}}
    pool = Pool(config)
    try:
        group = pool.group("g")
        held = group.acquire()
        outcome: list[BaseException] = []

        def older() -> None:
            try:
                group.release(group.acquire())
            except BaseException as exc:
                outcome.append(exc)

        first = spawn(older)
        wait_until(lambda: group.stats()["waiting"] == 1, 10, "the first caller to wait")
        pool.reconfigure({**config, "groups": {"g": {"connection_count": 1, "timeout": 0.5}}})
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            group.acquire()
        assert time.monotonic() - started < 2.0
        group.release(held)
        join_all([first], 10)
        assert not outcome  # the first caller, still within its 10 s, got the connection
    finally:
        pool.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("added", ["standby", "black hole"])
def test_adding_an_endpoint_to_a_primary_group_leaves_its_writes_on_the_primary(
        pg_factory, mode, added):
    """Writers borrow with a short timeout from a primary group on one primary;
    reconfigure() adds a streaming standby of it, or a host that never answers. Nothing
    changes for the loans: no connection to the primary is closed (as misplaced, or to move
    towards the endpoint whose role is not known yet), no caller fails, and the new
    endpoint's role is learned in the background."""
    from faults import BlackHole

    primary = pg_factory()
    with BlackHole() as hole:
        other = (pg_factory(standby_of=primary).endpoint() if added == "standby"
                 else hole.endpoint(connect_timeout=2))
        config = {"type": mode, "db": [primary.endpoint()], "maintenance_interval": 0.1,
                  "role_check_interval": 0.2,
                  "groups": {"w": {"role": "primary", "connection_count": 6, "timeout": 0.3}}}
        pool = Pool(config)
        load = Load(pool, "w", tasks=5, hold=0.005)
        try:
            load.until(100)
            before = group_stats(pool, "w")
            pool.reconfigure({**config, "db": [primary.endpoint(), other]})
            added_ep = next(ep for ep in pool.group("w").endpoints
                            if ep.config.port != primary.port)
            learned = ((lambda: added_ep.role == "standby") if added == "standby"
                       else (lambda: added_ep.state != "up"))
            wait_until(learned, 15, "the new endpoint's role (or death) to be learned")
            load.until(300)
            after = group_stats(pool, "w")
        finally:
            load.stop()  # asserts that no caller met an error
            pool.close()
    # the only connections closed are those that learned the new endpoint's role (a probe
    # within the group's room); the only connects, those and the group's growth to 6
    closed = {reason: count - before["discards_by_reason"].get(reason, 0)
              for reason, count in after["discards_by_reason"].items()}
    assert {reason for reason, count in closed.items() if count} <= {"probe"}, (before, after)
    probes = closed.get("probe", 0)
    assert after["connects"] - before["connects"] <= 1 + probes, (before, after)
