"""Prometheus export (``pip install 'greenpool[prometheus]'``).

A collector that reads :meth:`Pool.stats` at scrape time, so it costs nothing between
scrapes and never drifts from what the pool reports. Names follow what HikariCP users
graph (``*_connections_active``, ``*_connections_idle``, ``*_connections_pending``,
``*_connections_max``, timeouts, acquire time) with psycopg_pool's counters alongside::

    from greenpool.prometheus import register
    register(pool)                      # onto prometheus_client's default registry

Labels: ``pool`` (a name you choose), ``group``, and ``endpoint`` (``host:port/db``, never
credentials) with ``role`` for endpoint metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from .pool import Pool

_GROUP_GAUGES = (
    ("connections_active", "in_use", "Connections lent out"),
    ("connections_idle", "idle", "Idle connections"),
    ("connections_pending", "waiting", "Callers waiting for a connection"),
    ("connections", "size", "Connections open or opening"),
    ("connections_max", "max_size", "Most connections the group may hold"),
)
_GROUP_COUNTERS = (
    ("connections_acquired", "acquires", "Connections handed out"),
    ("connections_waits", "waits", "Acquires that had to wait"),
    ("connections_timeout", "timeouts", "Acquires that timed out"),
    ("connections_created", "connects", "Connections opened"),
    ("connection_errors", "connect_errors", "Failed connect attempts"),
    ("failovers", "failovers", "Acquires that moved on after an endpoint failed"),
    ("replays", "replays", "Statements re-run after their connection died"),
)


class PoolCollector(Collector):
    def __init__(self, pool: Pool, name: str = "default", prefix: str = "greenpool") -> None:
        self.pool = pool
        self.name = name
        self.prefix = prefix

    def collect(self) -> Iterator[Any]:
        stats = self.pool.stats()
        p = self.prefix
        labels = ["pool", "group"]
        for metric, key, doc in _GROUP_GAUGES:
            family = GaugeMetricFamily(f"{p}_{metric}", doc, labels=labels)
            for group, values in stats["groups"].items():
                family.add_metric([self.name, group], values[key])
            yield family
        for metric, key, doc in _GROUP_COUNTERS:
            counter = CounterMetricFamily(f"{p}_{metric}", doc, labels=labels)
            for group, values in stats["groups"].items():
                counter.add_metric([self.name, group], values[key])
            yield counter
        wait = CounterMetricFamily(f"{p}_connections_acquire_wait_seconds",
                                   "Time spent waiting for a connection", labels=labels)
        discards = CounterMetricFamily(f"{p}_connections_discarded", "Connections thrown away",
                                       labels=[*labels, "reason"])
        for group, values in stats["groups"].items():
            wait.add_metric([self.name, group], values["wait_time"])
            for reason, count in values["discards_by_reason"].items():
                discards.add_metric([self.name, group, reason], count)
        yield wait
        yield discards
        yield from self._endpoints(stats["endpoints"])

    def _endpoints(self, endpoints: dict[str, dict[str, Any]]) -> Iterator[Any]:
        p, labels = self.prefix, ["pool", "endpoint", "role"]
        up = GaugeMetricFamily(f"{p}_endpoint_up", "1 when the endpoint takes connections",
                               labels=labels)
        open_ = GaugeMetricFamily(f"{p}_endpoint_connections", "Connections open to it",
                                  labels=labels)
        lag = GaugeMetricFamily(f"{p}_endpoint_lag_seconds", "Replay lag of a standby",
                                labels=labels)
        quarantines = CounterMetricFamily(f"{p}_endpoint_quarantines", "Times quarantined",
                                          labels=labels)
        attempts = CounterMetricFamily(f"{p}_endpoint_connect_attempts", "Connect attempts",
                                       labels=labels)
        for label, values in endpoints.items():
            key = [self.name, label, str(values["role"])]
            up.add_metric(key, 1 if values["state"] == "up" else 0)
            open_.add_metric(key, values["open"])
            if values["lag"] is not None:
                lag.add_metric(key, values["lag"])
            quarantines.add_metric(key, values["quarantines"])
            attempts.add_metric(key, values["connect_attempts"])
        yield from (up, open_, lag, quarantines, attempts)


def register(
    pool: Pool, name: str = "default", registry: CollectorRegistry | None = None
) -> PoolCollector:
    """Export ``pool`` on ``registry`` (prometheus_client's default one if None)."""
    collector = PoolCollector(pool, name)
    (registry or REGISTRY).register(collector)
    return collector
