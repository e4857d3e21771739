"""Roles and balancing: replay lag (max_lag/on_lag), standby groups when the standby
is down, weights. Real primaries and streaming standbys started by the tests; replication
lag made real with ``pg_wal_replay_pause()``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import psycopg2.errors
import pytest
from endpoints import endpoint_stats, held_ports, label
from modes import MODE, wait_until

from greenpool import NoHealthyEndpoint, PoolTimeout


def _measured_fresh(pool: Any, standby: Any, within: float = 0.5) -> bool:
    """The pool knows the standby's data to be at most ``within`` seconds old (a measured
    lag is a bound: the pool's last sight of the primary, never an exact 0)."""
    lag = endpoint_stats(pool, standby)["lag"]
    return lag is not None and lag <= within


def _link_speaks(standby: Any) -> None:
    """Have the standby's WAL receiver ping its primary after 0.5 s of silence, so that its
    word (``pg_stat_wal_receiver``) vouches for it behind an idle primary where the pool
    sees no primary (a pool of standbys only, or ``non-threaded`` mode)."""
    standby.execute("ALTER SYSTEM SET wal_receiver_timeout = '1s'")
    standby.execute("SELECT pg_reload_conf()")


def read_port(pool: Any, group_name: str) -> int:
    with pool.handler(group_name) as db:
        return int(db.query_one("SELECT inet_server_port()")[0])


def test_lagging_standby_sends_prefer_standby_reads_to_the_primary_and_back(
    make_pool, pg_factory
):
    """max_lag with on_lag 'use-primary': once housekeeping measures the standby's replay lag
    above max_lag, reads of a prefer-standby group go to the primary; when replay resumes,
    they return to the standby by themselves. A 'standby' group with on_lag 'fail' and no
    connection yet gets no connection at all while the only standby lags."""
    primary = pg_factory()
    primary.execute("CREATE TABLE ticks (id serial PRIMARY KEY)")
    standby = pg_factory(standby_of=primary)
    primary.execute("INSERT INTO ticks DEFAULT VALUES")
    wait_until(lambda: standby.execute("SELECT count(*) FROM ticks")[0][0] == 1, 10,
               "the first commit to be replayed (so replay has a timestamp)")
    pool = make_pool(
        {
            "write": {"role": "primary"},
            "read": {"role": "prefer-standby", "max_lag": 0.5, "autocommit": True,
                     "connection_count": 4},
            "strict": {"role": "standby", "max_lag": 0.5, "on_lag": "fail",
                       "autocommit": True, "timeout": 1},
        },
        db=[primary.endpoint(), standby.endpoint()],
        role_check_interval=0.2,
        maintenance_interval=0.1,
    )
    # roles first (a fresh prefer-standby group may start on the primary: test_failover)
    assert read_port(pool, "write") == primary.port
    # a WAL receiver younger than RECEIVER_SETTLE is not believed yet: its lag reads inf
    wait_until(lambda: _measured_fresh(pool, standby), 10,
               "housekeeping to measure the streaming standby")
    assert held_ports(pool, "read", 4) == [standby.port] * 4
    assert endpoint_stats(pool, standby)["role"] == "standby"

    standby.execute("SELECT pg_wal_replay_pause()")
    primary.execute("INSERT INTO ticks DEFAULT VALUES")  # received by the standby, not replayed
    wait_until(lambda: (endpoint_stats(pool, standby)["lag"] or 0) > 0.5, 10,
               "housekeeping to measure the replay lag")
    wait_until(lambda: read_port(pool, "read") == primary.port, 5,
               "reads to move to the primary")
    assert held_ports(pool, "read", 4) == [primary.port] * 4
    with pytest.raises(PoolTimeout), pool.handler("strict") as db:
        db.query("SELECT 1")

    standby.execute("SELECT pg_wal_replay_resume()")
    wait_until(lambda: (endpoint_stats(pool, standby)["lag"] or 0) <= 0.5, 10,
               "housekeeping to see the standby caught up")
    wait_until(lambda: read_port(pool, "read") == standby.port, 15,
               "reads to come back to the standby")
    with pool.handler("strict") as db:
        assert db.query_one("SELECT inet_server_port()") == (standby.port,)
    for cluster in (primary, standby):
        assert endpoint_stats(pool, cluster)["quarantines"] == 0  # lag is not a failure


def test_standby_down_prefer_standby_falls_back_read_only_and_standby_group_does_not(
    make_pool, pg_factory
):
    """With the standby stopped, a prefer-standby group reads from the primary without an
    error, still read-only (its default), while a 'standby' group never uses the primary:
    it raises NoHealthyEndpoint naming the standby."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool(
        {
            "write": {"role": "primary"},
            "prefer": {"role": "prefer-standby", "autocommit": True, "timeout": 3},
            "standby": {"role": "standby", "autocommit": True, "timeout": 1},
        },
        db=[standby.endpoint(), primary.endpoint()],
    )
    # roles first (a fresh prefer-standby group may start on the primary: test_failover)
    assert read_port(pool, "write") == primary.port
    assert read_port(pool, "standby") == standby.port
    assert read_port(pool, "prefer") == standby.port
    standby.stop("immediate")

    assert read_port(pool, "prefer") == primary.port
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("prefer") as db:
        assert db.query_one("SELECT inet_server_port()") == (primary.port,)
        db.execute("CREATE TABLE must_not_exist (id int)")
    assert primary.execute("SELECT to_regclass('must_not_exist') IS NULL")[0][0] is True

    with pytest.raises(NoHealthyEndpoint) as info, pool.handler("standby") as db:
        db.query("SELECT 1")
    assert label(standby) in str(info.value)
    assert endpoint_stats(pool, primary)["state"] == "up"


def test_connections_spread_by_weight_fewest_open_first(make_pool, pg, pg_factory):
    """Balancing: a group spanning two servers with weights 3 and 1 holds its connections in
    that proportion."""
    other = pg_factory()
    pool = make_pool(
        {"g": {"connection_count": 8}},
        db=[dict(pg.endpoint(), weight=1), dict(other.endpoint(), weight=3)],
    )
    ports = Counter(held_ports(pool, "g", 8))
    assert ports == {other.port: 6, pg.port: 2}
    assert endpoint_stats(pool, other)["open"] == 6 and endpoint_stats(pool, pg)["open"] == 2


# --- a standby whose WAL receiver does not stream has unknown lag ---------------------------

APP_USER, APP_PASSWORD = "app_reader", "app-reader-pw"  # an ordinary login role, no superuser


@pytest.fixture(params=["superuser", "ordinary user"])
def replicated(request, pg_factory) -> tuple[Any, Any, dict[str, Any]]:
    """A primary with a table ``rows`` and a streaming standby, and the credentials the pool
    uses: the superuser, or a plain login role that cannot read the WAL receiver's status
    (``pg_stat_wal_receiver`` shows it the receiver's pid only)."""
    primary = pg_factory()
    primary.execute("CREATE TABLE rows (id int)")
    primary.create_user(APP_USER, APP_PASSWORD)
    primary.execute(f"GRANT SELECT ON rows TO {APP_USER}")
    standby = pg_factory(standby_of=primary)
    creds = {} if request.param == "superuser" else {"user": APP_USER, "pass": APP_PASSWORD}
    return primary, standby, creds


def _conninfo(standby: Any) -> str:
    return str(standby.execute("SELECT setting FROM pg_settings "
                               "WHERE name = 'primary_conninfo'")[0][0])


def _set_conninfo(standby: Any, conninfo: str) -> None:
    standby.execute("ALTER SYSTEM SET primary_conninfo = %s", (conninfo,))
    standby.execute("SELECT pg_reload_conf()")


def _cut_wal_receiver(standby: Any) -> str:
    """Stop the standby's WAL receiver (an empty primary_conninfo); the old conninfo."""
    conninfo = _conninfo(standby)
    _set_conninfo(standby, "")
    wait_until(lambda: standby.execute("SELECT count(*) FROM pg_stat_wal_receiver")[0][0] == 0,
               10, "the WAL receiver to stop")
    return conninfo


def _rows(cluster: Any) -> int:
    return int(cluster.execute("SELECT count(*) FROM rows")[0][0])


def _lag_groups() -> dict[str, Any]:
    common = {"max_lag": 1, "autocommit": True, "timeout": 1}
    return {
        "strict": {"role": "standby", "on_lag": "fail", **common},
        "prefer": {"role": "prefer-standby", "on_lag": "use-primary", **common},
    }


def _primary_dies_after_the_standby_missed_5_rows(primary: Any, standby: Any) -> None:
    """The standby misses 5 committed rows, then its primary is stopped with ``-m
    immediate`` and the standby's receiver tries the dead primary again and again."""
    conninfo = _cut_wal_receiver(standby)
    primary.execute("INSERT INTO rows SELECT generate_series(1, 5)")
    primary.stop("immediate")
    _set_conninfo(standby, conninfo)
    assert _rows(standby) == 0
    assert standby.execute("SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()") == [
        (True,)]  # what the old probe read as "lag 0"


def test_standby_whose_primary_died_is_not_served_by_a_max_lag_group(make_pool, replicated):
    """Receive LSN == replay LSN on a standby cut off from its dead primary, yet its lag is
    unknown: a ``max_lag=1, on_lag='fail'`` group raises instead of serving the stale rows,
    in a pool that measured the standby streaming before and in one started after."""
    primary, standby, creds = replicated
    db = [primary.endpoint(**creds), standby.endpoint(**creds)]
    groups = {"strict": _lag_groups()["strict"]}
    before = make_pool(groups, db=db, role_check_interval=0.1, maintenance_interval=0.05)
    wait_until(lambda: _measured_fresh(before, standby), 10,
               "housekeeping to measure the streaming standby")

    _primary_dies_after_the_standby_missed_5_rows(primary, standby)
    after = make_pool(groups, db=db, role_check_interval=0.1, maintenance_interval=0.05)
    for pool in (before, after):
        wait_until(lambda: endpoint_stats(pool, standby)["lag"] == float("inf"), 10,  # noqa: B023
                   "housekeeping to find the WAL receiver not streaming")
        with pytest.raises(PoolTimeout), pool.handler("strict") as db:
            db.query("SELECT count(*) FROM rows")
        assert endpoint_stats(pool, standby)["state"] == "up"  # unknown lag is no failure


def test_an_idle_connection_to_a_standby_cut_off_is_not_lent(make_pool, replicated):
    """Same fault, but the group holds an idle connection to the standby from before."""
    primary, standby, creds = replicated
    pool = make_pool({"strict": _lag_groups()["strict"]},
                     db=[primary.endpoint(**creds), standby.endpoint(**creds)],
                     role_check_interval=0.1, maintenance_interval=0.05)
    wait_until(lambda: _measured_fresh(pool, standby), 10,
               "housekeeping to measure the streaming standby")
    with pool.handler("strict") as db:
        assert db.query_one("SELECT inet_server_port(), count(*) FROM rows") == (standby.port, 0)
    _primary_dies_after_the_standby_missed_5_rows(primary, standby)
    wait_until(lambda: endpoint_stats(pool, standby)["lag"] == float("inf"), 10,
               "housekeeping to find the WAL receiver not streaming")
    with pytest.raises(PoolTimeout), pool.handler("strict") as db:
        db.query("SELECT count(*) FROM rows")


def test_standby_with_its_wal_receiver_cut_sends_reads_to_the_primary_and_back(
    make_pool, replicated
):
    """The primary runs, the standby's WAL receiver is cut and 5 rows are missing there: a
    prefer-standby group with ``on_lag='use-primary'`` reads them on the primary, the
    ``fail`` group raises; once the receiver streams again, reads return to the standby."""
    primary, standby, creds = replicated
    pool = make_pool(_lag_groups(), db=[primary.endpoint(**creds), standby.endpoint(**creds)],
                     role_check_interval=0.1, maintenance_interval=0.05)
    wait_until(lambda: _measured_fresh(pool, standby), 10,
               "housekeeping to measure the streaming standby")
    # a fresh prefer-standby group may start on the primary, then moves (test_failover)
    wait_until(lambda: read_port(pool, "prefer") == standby.port, 5, "reads on the standby")

    conninfo = _cut_wal_receiver(standby)
    primary.execute("INSERT INTO rows SELECT generate_series(1, 5)")
    assert _rows(standby) == 0
    wait_until(lambda: endpoint_stats(pool, standby)["lag"] == float("inf"), 10,
               "housekeeping to find the WAL receiver not streaming")
    wait_until(lambda: read_port(pool, "prefer") == primary.port, 5, "reads to move")
    with pool.handler("prefer") as db:
        assert db.query_one("SELECT inet_server_port(), count(*) FROM rows") == (primary.port, 5)
    with pytest.raises(PoolTimeout), pool.handler("strict") as db:
        db.query("SELECT count(*) FROM rows")

    _set_conninfo(standby, conninfo)
    wait_until(lambda: (endpoint_stats(pool, standby)["lag"] or 0) <= 1, 15,
               "housekeeping to see the receiver streaming again")
    wait_until(lambda: _rows(standby) == 5, 10, "the standby to catch up")
    with pool.handler("strict") as db:
        assert db.query_one("SELECT inet_server_port(), count(*) FROM rows") == (standby.port, 5)
    wait_until(lambda: read_port(pool, "prefer") == standby.port, 15,
               "prefer-standby reads to come back to the standby")


@pytest.mark.timeout(90)
def test_a_standby_whose_walsender_is_stalled_is_not_served_beyond_max_lag(
    make_pool, replicated
):
    """The primary's walsender is stopped with SIGSTOP (a stalled replication link: the
    standby's WAL receiver still says "streaming", everything it received is replayed) and
    a row is committed on the primary. No read of a ``max_lag=1`` group may miss that row
    once it is surely more than 1 s old; the standby's lag goes beyond max_lag and the
    group refuses (``on_lag='fail'``)."""
    import os
    import signal

    primary, standby, creds = replicated
    pool = make_pool({"strict": _lag_groups()["strict"]},
                     db=[primary.endpoint(**creds), standby.endpoint(**creds)],
                     role_check_interval=0.2, maintenance_interval=0.05)
    wait_until(lambda: _measured_fresh(pool, standby), 10,
               "housekeeping to measure the streaming standby")
    with pool.handler("strict") as db:
        assert db.query_one("SELECT inet_server_port(), count(*) FROM rows") == (standby.port, 0)
    ((walsender,),) = primary.execute("SELECT pid FROM pg_stat_replication")
    os.kill(walsender, signal.SIGSTOP)
    try:
        primary.execute("INSERT INTO rows VALUES (1)")
        committed = time.monotonic()  # the row exists on the primary from before this
        refused = None
        while refused is None:
            assert time.monotonic() - committed < 15, (
                "the group still lends the stalled standby", pool.stats()["endpoints"])
            asked = time.monotonic()
            try:
                with pool.handler("strict") as db:
                    port, count = db.query_one("SELECT inet_server_port(), count(*) FROM rows")
            except PoolTimeout as exc:
                refused = exc
                continue
            assert (port, count) != (standby.port, 0) or asked - committed <= 1, (
                f"a read {asked - committed:.2f} s after the commit missed the row (max_lag 1)",
                pool.stats()["endpoints"])
        assert endpoint_stats(pool, standby)["lag"] > 1
        assert standby.execute("SELECT status FROM pg_stat_wal_receiver") == [("streaming",)]
    finally:
        os.kill(walsender, signal.SIGCONT)


@pytest.mark.timeout(90)
def test_an_idle_healthy_standby_stays_fresh_for_a_max_lag_group(make_pool, replicated):
    """The primary writes nothing for longer than ``max_lag`` (its walsender sends nothing
    then: the standby's receiver has not heard from it for over max_lag), yet the pool's
    own sightings of the primary's WAL position vouch for the standby: a ``max_lag=3``
    group keeps reading there, at the default ``role_check_interval`` (2 s)."""
    primary, standby, creds = replicated
    pool = make_pool({"strict": {"role": "standby", "max_lag": 3, "on_lag": "fail",
                                 "autocommit": True, "timeout": 1}},
                     db=[primary.endpoint(**creds), standby.endpoint(**creds)])
    silent = ("SELECT extract(epoch FROM now() - last_msg_receipt_time) > 4 "
              "FROM pg_stat_wal_receiver")
    wait_until(lambda: standby.execute(silent) == [(True,)], 45,
               "the standby's receiver to hear nothing for 4 s (an idle primary)")
    reads = 0
    until = time.monotonic() + 5  # over two default role checks
    while time.monotonic() < until:
        with pool.handler("strict") as db:
            assert db.query_one("SELECT inet_server_port()") == (standby.port,)
        reads += 1
        assert endpoint_stats(pool, standby)["lag"] <= 3
    assert standby.execute(silent) == [(True,)]  # it stayed idle: the primary vouched
    assert reads > 10


# --- a standby whose lag the pool has not measured yet ---------------------------------------


@pytest.fixture
def lagging_standby(pg_factory) -> tuple[Any, Any]:
    """A primary and a standby whose replay is paused and more than 2.5 s behind (real lag:
    a commit received but not replayed)."""
    primary = pg_factory()
    primary.execute("CREATE TABLE ticks (id serial PRIMARY KEY)")
    standby = pg_factory(standby_of=primary)
    primary.execute("INSERT INTO ticks DEFAULT VALUES")
    wait_until(lambda: standby.execute("SELECT count(*) FROM ticks")[0][0] == 1, 10,
               "the first commit to be replayed (so replay has a timestamp)")
    standby.execute("SELECT pg_wal_replay_pause()")
    primary.execute("INSERT INTO ticks DEFAULT VALUES")
    wait_until(lambda: standby.execute(
        "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn() AND "
        "extract(epoch FROM now() - pg_last_xact_replay_timestamp()) > 2.5")[0][0], 15,
        "the standby to lag 2.5 s behind (max_lag 1 plus a margin)")
    return primary, standby


STRICT = {"strict": {"role": "standby", "max_lag": 1, "on_lag": "fail", "autocommit": True,
                     "connection_count": 2, "timeout": 0.5}}


def _first_reads_of_fresh_pools(new_pool: Any) -> list[str]:
    """Three fresh pools, each asked for a connection three times right after ``Pool()``:
    what each acquire got (an error's text, or the port it was lent)."""
    outcomes = []
    for _ in range(3):
        pool = new_pool()
        try:
            for _ in range(3):
                try:
                    with pool.handler("strict") as db:
                        port = db.query_one("SELECT inet_server_port()")[0]
                    outcomes.append(f"lent a connection to port {port}")
                except PoolTimeout as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")
        finally:
            pool.close()
    return outcomes


@pytest.mark.timeout(90)
def test_a_fresh_max_lag_group_never_reads_from_a_standby_lagging_beyond_it(
    lagging_standby, mode
):
    """The standby lags far beyond ``max_lag``. A fresh pool knows no lag before its first
    probe, yet its ``standby`` group with ``on_lag='fail'`` never lends a connection to it,
    not even on its very first acquires: each raises, and says the standby lags."""
    from greenpool import Pool

    primary, standby = lagging_standby
    db = [primary.endpoint(), standby.endpoint()]
    outcomes = _first_reads_of_fresh_pools(
        lambda: Pool({"type": mode, "db": db, "groups": STRICT}))
    assert not [o for o in outcomes if o.startswith("lent")], outcomes
    assert all("lag" in o for o in outcomes), outcomes


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
@pytest.mark.timeout(90)
def test_a_non_threaded_max_lag_group_never_reads_from_a_standby_lagging_beyond_it(
    lagging_standby,
):
    """The same in ``non-threaded`` mode, which has no housekeeping to probe the lag."""
    from greenpool import Pool

    primary, standby = lagging_standby
    db = [primary.endpoint(), standby.endpoint()]
    outcomes = _first_reads_of_fresh_pools(
        lambda: Pool({"type": "non-threaded", "db": db, "groups": STRICT}))
    assert not [o for o in outcomes if o.startswith("lent")], outcomes
    assert all("lag" in o for o in outcomes), outcomes


# --- a primary group and an endpoint it has never reached ------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process mode", "non-threaded"])
@pytest.mark.parametrize("order", ["primary first", "black hole first"])
def test_a_new_primary_group_waits_briefly_for_an_endpoint_that_never_answers(
    pg, blackhole, mode, kind, order
):
    """A new pool's ``role: 'primary'`` group over a healthy primary and a black hole
    (``connect_timeout`` 3 each): before it writes it waits for the endpoint it has never
    reached (a promoted primary would answer as fast), but at most 0.5 s, not the black
    hole's ``connect_timeout``: its first loan, on the primary, comes within 1.5 s of
    ``Pool()``."""
    from greenpool import Pool

    if kind == "non-threaded" and MODE != "threaded":
        pytest.skip("non-threaded runs once, in the threaded test process")
    db = [pg.endpoint(connect_timeout=3), blackhole.endpoint(connect_timeout=3)]
    if order == "black hole first":
        db.reverse()
    started = time.monotonic()
    pool = Pool({"type": mode if kind == "process mode" else "non-threaded", "db": db,
                 "groups": {"w": {"role": "primary", "connection_count": 3}}})
    try:
        group = pool.group("w")
        errors = []
        while True:
            try:
                pc = group.acquire(timeout=1)
                break
            except PoolTimeout as exc:
                errors.append(f"{type(exc).__name__} after {time.monotonic() - started:.2f} s")
                assert time.monotonic() - started < 10, errors
        took = time.monotonic() - started
        try:
            with pc.raw.cursor() as cursor:
                cursor.execute("SELECT inet_server_port()")
                assert cursor.fetchone() == (pg.port,)
        finally:
            group.release(pc)
        assert took < 1.5, (f"first loan {took:.2f} s after Pool()", errors,
                            pool.stats()["endpoints"])
    finally:
        pool.close()


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
@pytest.mark.timeout(120)
def test_non_threaded_prefer_standby_reads_return_to_a_standby_that_caught_up(pg_factory):
    """A non-threaded prefer-standby group with ``max_lag`` 1 (no housekeeping: its borrows
    measure the lag). The standby lags (replay paused, a commit on the primary): reads fall
    back to the primary. Once replay resumes and the standby has caught up, reads return
    to the standby as soon as the lagging measurement is stale (``role_stale_after``, 6 s)
    and a borrow measures again (at most once a second), and stay there. The primary is
    idle then and no housekeeping probes it: what vouches for the caught-up standby is its
    WAL receiver, which hears from the primary at least every 0.5 s here."""
    from greenpool import Pool
    from greenpool.endpoint import ROLE_STALE_AFTER

    primary = pg_factory()
    primary.execute("CREATE TABLE ticks (id serial PRIMARY KEY)")
    standby = pg_factory(standby_of=primary)
    _link_speaks(standby)
    primary.execute("INSERT INTO ticks DEFAULT VALUES")
    wait_until(lambda: standby.execute("SELECT count(*) FROM ticks")[0][0] == 1, 10,
               "the first commit to be replayed (so replay has a timestamp)")
    pool = Pool({"type": "non-threaded", "db": [primary.endpoint(), standby.endpoint()],
                 "groups": {"r": {"role": "prefer-standby", "max_lag": 1.0, "autocommit": True,
                                  "connection_count": 4}}})
    try:
        # a fresh prefer-standby group may start on the primary, then moves (test_failover)
        wait_until(lambda: read_port(pool, "r") == standby.port, 10, "reads on the standby")
        standby.execute("SELECT pg_wal_replay_pause()")
        primary.execute("INSERT INTO ticks DEFAULT VALUES")  # received, not replayed
        wait_until(lambda: read_port(pool, "r") == primary.port, 20,
                   "reads to fall back to the primary while the standby lags")
        fell_back = time.monotonic()  # the lag was measured just before

        standby.execute("SELECT pg_wal_replay_resume()")
        wait_until(lambda: standby.execute("SELECT count(*) FROM ticks")[0][0] == 2, 10,
                   "the standby to catch up")
        within = ROLE_STALE_AFTER + 2  # stale, then the next once-a-second look, and slack
        while read_port(pool, "r") != standby.port:
            assert time.monotonic() - fell_back < within, (
                f"reads still on the primary {time.monotonic() - fell_back:.1f} s after they "
                f"fell back, the standby caught up: {pool.stats()['endpoints']}")
            time.sleep(0.1)
        assert [read_port(pool, "r") for _ in range(10)] == [standby.port] * 10
    finally:
        pool.close()


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
@pytest.mark.timeout(60)
def test_non_threaded_max_lag_group_lends_soon_after_the_wal_receiver_restarted(pg_factory):
    """The standby's WAL receiver is killed and restarts; right after the new one streams,
    a new non-threaded ``role: 'standby'`` group with ``max_lag`` 5 and ``on_lag`` 'fail'
    is asked for a connection again and again. A receiver younger than a second has an
    unknown lag, but the group measures again once it has settled: its first loan comes
    within about 2 s of the restart, not after the lag measurement goes stale (6 s). The
    pool sees no primary: what vouches for the idle standby is its WAL receiver, which
    hears from the primary at least every 0.5 s here."""
    import os
    import signal

    from greenpool import Pool

    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    _link_speaks(standby)
    receiver = "SELECT pid FROM pg_stat_wal_receiver WHERE status = 'streaming'"
    wait_until(lambda: standby.execute(receiver), 10, "the WAL receiver to stream")
    old = standby.execute(receiver)[0][0]
    os.kill(old, signal.SIGTERM)
    wait_until(lambda: standby.execute(receiver) not in ([], [(old,)]), 20,
               "a new WAL receiver to stream")
    restarted = time.monotonic()
    pool = Pool({"type": "non-threaded", "db": [standby.endpoint()],
                 "groups": {"r": {"role": "standby", "max_lag": 5.0, "on_lag": "fail",
                                  "connection_count": 2}}})
    try:
        group = pool.group("r")
        errors = []
        while True:
            try:
                pc = group.acquire(timeout=0.5)
                break
            except PoolTimeout as exc:
                errors.append(f"{time.monotonic() - restarted:.2f} s: {exc}")
                assert time.monotonic() - restarted < 15, errors
                time.sleep(0.1)
        first_loan = time.monotonic() - restarted
        try:
            with pc.raw.cursor() as cursor:
                cursor.execute("SELECT pg_is_in_recovery()")
                assert cursor.fetchone() == (True,)
        finally:
            group.release(pc)
        assert first_loan < 2.5, (f"first loan {first_loan:.2f} s after the restart", errors)
    finally:
        pool.close()


@pytest.mark.timeout(90)
def test_a_prefer_standby_group_whose_standby_refuses_it_reads_from_the_primary(
        make_pool, pg_factory):
    """The group's configure hook fails on the standby (a refusal retrying cannot fix): the
    standby stays up, so its tier is not empty, but the group may not use it; reads go to
    the primary rather than wait for a standby the group cannot log in to."""
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)

    def hook(raw: Any) -> None:
        if raw.info.port == standby.port:
            raise RuntimeError("this group may not read from the standby")

    pool = make_pool({"r": {"role": "prefer-standby", "connection_count": 2, "timeout": 5,
                            "configure": hook}},
                     db=[standby.endpoint(), primary.endpoint()], maintenance_interval=0.1)
    for _ in range(20):
        with pool.handler("r") as db:
            assert db.query_one("SELECT inet_server_port()") == (primary.port,)
