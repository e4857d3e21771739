"""Issue 3, roles and balancing: replay lag (max_lag/on_lag), standby groups when the standby
is down, weights. Real primaries and streaming standbys started by the tests; replication
lag made real with ``pg_wal_replay_pause()``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import psycopg2.errors
import pytest
from endpoints import endpoint_stats, held_ports, label
from modes import wait_until

from greenpool import NoHealthyEndpoint, PoolTimeout


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
