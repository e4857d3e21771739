"""Prometheus export (``pip install 'greenpool[prometheus]'``).

One collector per registry exports every pool registered on it, each under its own ``pool``
label, so several pools share the default registry::

    from greenpool.prometheus import register
    register(app_pool, name="app")      # onto prometheus_client's default registry
    register(jobs_pool, name="jobs")    # same collector, another pool label

It reads :meth:`Pool.stats` at scrape time, so it costs nothing between scrapes and never
drifts from what the pool reports; the three duration histograms (wait, use, create) are
the one thing recorded as loans happen, switched on for a pool when it is registered (an
append per loan, folded at scrape: see :class:`~greenpool.stats.Timing`). Names follow
Prometheus' conventions (a ``_total`` counter, base units, ``_seconds`` histograms) and
what HikariCP users graph (``*_connections_active``, ``*_connections_idle``,
``*_connections_pending``, ``*_connections_max``). ``PoolCollector().describe()`` lists
every family; docs/observability.md's list is checked against it.

Labels: ``pool`` (the name given to :func:`register`), ``group``, and ``endpoint``
(``host:port/db``, never credentials). An endpoint's series keep the same labels through
a failover: its role and its health state are separate gauges with one series per value
(``greenpool_endpoint_role{role="primary"} 1``, ``{role="standby"} 0``, ...), so counters
never restart and ``greenpool_endpoint_up`` is one series per endpoint for alerts.

``greenpool_endpoint_up`` is 1 only while the endpoint's state is ``up``: its last connect
attempt succeeded, so the pool opens connections to it. ``quarantined`` (a connect failed;
no attempt until the backoff ends) and ``probing`` (the backoff ended and one connect is
testing whether it is back) are both 0: a probe is a question, not an answer, and counting
it as up would flap the gauge 0→1→0 on every probe of a long outage. The three states are
in ``greenpool_endpoint_state{state}``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from .endpoint import PRIMARY, PROBING, QUARANTINED, STANDBY, UNKNOWN, UP
from .pool import Pool
from .stats import GroupTimings, timings_of

__all__ = ["PoolCollector", "register", "unregister"]

_GROUP_GAUGES = (
    ("connections_active", "in_use", "Connections lent out"),
    ("connections_idle", "idle", "Idle connections"),
    ("connections_pending", "waiting", "Callers waiting for a connection"),
    ("connections_connecting", "connecting", "Connections being opened"),
    ("connections", "size", "Connections open or opening"),
    ("connections_max", "max_size", "Most connections the group may hold"),
    ("connections_min", "min_size", "Idle connections the group keeps open (min_size)"),
    ("exclusive_connections", "exclusive_open",
     "Dedicated connections open or opening (exclusive() blocks and listeners)"),
    ("exclusive_connections_max", "exclusive_max", "The group's exclusive_limit"),
    ("exclusive_connections_pending", "exclusive_waiting",
     "Callers waiting for an exclusive_limit slot"),
    ("listeners", "listeners",
     "Listeners open (all of a group's share one dedicated connection)"),
    ("listen_connections", "listen_connections",
     "The group's shared listening connection: 1 while listening, else 0"),
    ("listen_backlog", "listen_backlog", "Notifications queued for listeners, not read yet"),
    ("listen_backlog_max", "listen_backlog_max", "The largest queue of one listener"),
)
_GROUP_COUNTERS = (
    ("connections_acquired", "acquires", "Connections handed out"),
    ("connections_waits", "waits", "Acquires that had to wait"),
    ("connections_timeouts", "timeouts", "Acquires that timed out"),
    ("connections_created", "connects", "Connections opened"),
    ("connections_connect_errors", "connect_errors", "Failed connect attempts"),
    ("failovers", "failovers", "Acquires that moved on after an endpoint failed"),
    ("replays", "replays", "Statements re-run after their connection died"),
    ("connections_refused", "refusals", "Acquires shed at once because max_waiting was reached"),
    ("exclusive_connections_created", "exclusive_opened",
     "Dedicated connections opened, listener reconnects included"),
    ("exclusive_connections_timeouts", "exclusive_timeouts",
     "Callers refused because exclusive_limit stayed reached"),
    ("listen_gaps", "listen_gaps",
     "Gaps reported to listeners (after a reconnect, or when one fell behind)"),
    ("listen_dropped", "listen_dropped",
     "Notifications not queued for a listener that fell behind its max_backlog"),
)
_ENDPOINT_COUNTERS = (
    ("endpoint_quarantines", "quarantines", "Times the endpoint was quarantined"),
    ("endpoint_connect_attempts", "connect_attempts", "Connect attempts to the endpoint"),
    ("endpoint_connects", "connects", "Connections opened to the endpoint"),
    ("endpoint_connect_errors", "connect_errors", "Failed connect attempts to the endpoint"),
    ("endpoint_split_brain", "split_brain",
     "Times the endpoint claimed primary while another did too"),
)
#: the duration histograms: (metric, GroupTimings attribute, help)
_GROUP_HISTOGRAMS = (
    ("connections_wait_seconds", "wait",
     "Time from asking for a connection to having one (successful acquires)"),
    ("connections_use_seconds", "use", "Time a connection was lent, from acquire to return"),
    ("connections_create_seconds", "create", "Time a successful connect took"),
)
_STATES = (UP, PROBING, QUARANTINED)
_ROLES = (PRIMARY, STANDBY, UNKNOWN)


class PoolCollector(Collector):
    """Exports every pool added to it, labelled by name; :func:`register` keeps one per
    registry. Pools are held weakly; a closed or garbage-collected pool drops out of the next
    scrape and frees its name (so ``close()`` then ``init()`` then ``register()`` works)."""

    def __init__(self, pool: Pool | None = None, name: str = "default",
                 prefix: str = "greenpool") -> None:
        self.prefix = prefix
        self._pools: dict[str, weakref.ref[Pool]] = {}
        self._lock = threading.Lock()
        if pool is not None:
            self.add(pool, name)

    def add(self, pool: Pool, name: str) -> None:
        """Export ``pool`` as ``pool=name``; a name already taken by another pool is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"register(): name must be a non-empty string, not {name!r}")
        with self._lock:
            held = self._pools.get(name)
            current = held() if held is not None else None
            if current is not None and current is not pool and not current.closed:
                raise ValueError(f"register(): a pool named {name!r} is already exported on "
                                 "this registry; give each pool its own name")
            self._pools[name] = weakref.ref(pool)
        for group in pool.config.groups:
            timings_of(pool.group(group))  # histograms are recorded from now on

    def remove(self, name: str) -> bool:
        """Stop exporting the pool called ``name``; False if there was none."""
        with self._lock:
            return self._pools.pop(name, None) is not None

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [name for name, ref in self._pools.items() if ref() is not None]

    def describe(self) -> list[Any]:
        """The families without samples, so registering never calls ``stats()``."""
        return [*self._families([]), *self._histograms({})]

    def _histograms(self, timings: dict[str, dict[str, GroupTimings | None]]) -> Iterator[Any]:
        for metric, kind, doc in _GROUP_HISTOGRAMS:
            family = HistogramMetricFamily(f"{self.prefix}_{metric}", doc,
                                           labels=["pool", "group"], unit="seconds")
            for name, groups in timings.items():
                for group, recorded in groups.items():
                    if recorded is not None:
                        timing = getattr(recorded, kind)
                        family.add_metric([name, group], *timing.snapshot())
            yield family

    def collect(self) -> Iterator[Any]:
        with self._lock:
            pools = [(name, ref()) for name, ref in self._pools.items()]
        snapshot = [(name, pool.stats()) for name, pool in pools
                    if pool is not None and not pool.closed]
        timings = {name: {group: pool.group(group).counters.timings
                          for group in pool.config.groups}
                   for name, pool in pools if pool is not None and not pool.closed}
        yield from self._families(snapshot)
        yield from self._histograms(timings)

    def _families(self, snapshot: list[tuple[str, dict[str, Any]]]) -> Iterator[Any]:
        p = self.prefix
        labels = ["pool", "group"]
        for metric, key, doc in _GROUP_GAUGES:
            family = GaugeMetricFamily(f"{p}_{metric}", doc, labels=labels)
            for name, stats in snapshot:
                for group, values in stats["groups"].items():
                    family.add_metric([name, group], values[key])
            yield family
        for metric, key, doc in _GROUP_COUNTERS:
            counter = CounterMetricFamily(f"{p}_{metric}", doc, labels=labels)
            for name, stats in snapshot:
                for group, values in stats["groups"].items():
                    counter.add_metric([name, group], values[key])
            yield counter
        wait = CounterMetricFamily(f"{p}_connections_acquire_wait_seconds",
                                   "Time spent waiting for a connection", labels=labels)
        discards = CounterMetricFamily(f"{p}_connections_discarded", "Connections thrown away",
                                       labels=[*labels, "reason"])
        for name, stats in snapshot:
            for group, values in stats["groups"].items():
                wait.add_metric([name, group], values["wait_time"])
                for reason, count in values["discards_by_reason"].items():
                    discards.add_metric([name, group, reason], count)
        yield wait
        yield discards
        yield from self._endpoints(snapshot)

    def _endpoints(self, snapshot: list[tuple[str, dict[str, Any]]]) -> Iterator[Any]:
        p, labels = self.prefix, ["pool", "endpoint"]
        up = GaugeMetricFamily(f"{p}_endpoint_up",
                               "1 while the endpoint's state is up (its last connect succeeded)",
                               labels=labels)
        state = GaugeMetricFamily(f"{p}_endpoint_state",
                                  "1 for the endpoint's health state: up, probing, quarantined",
                                  labels=[*labels, "state"])
        role = GaugeMetricFamily(f"{p}_endpoint_role",
                                 "1 for the endpoint's detected role: primary, standby, unknown",
                                 labels=[*labels, "role"])
        open_ = GaugeMetricFamily(f"{p}_endpoint_connections", "Connections open to it",
                                  labels=labels)
        lag = GaugeMetricFamily(f"{p}_endpoint_lag_seconds", "Replay lag of a standby",
                                labels=labels)
        counters = [(CounterMetricFamily(f"{p}_{metric}", doc, labels=labels), key)
                    for metric, key, doc in _ENDPOINT_COUNTERS]
        for name, stats in snapshot:
            for label, values in stats["endpoints"].items():
                key = [name, label]
                up.add_metric(key, 1 if values["state"] == UP else 0)
                for value in _STATES:
                    state.add_metric([*key, value], 1 if values["state"] == value else 0)
                for value in _ROLES:
                    role.add_metric([*key, value], 1 if values["role"] == value else 0)
                open_.add_metric(key, values["open"])
                lag.add_metric(key, _lag_value(values))
                for counter, stat in counters:
                    counter.add_metric(key, values[stat])
        yield from (up, state, role, open_, lag)
        yield from (counter for counter, _ in counters)


def _lag_value(values: dict[str, Any]) -> float:
    """The lag series of every endpoint, whatever its role, so that no series ends at a
    failover: a standby's measured lag (``+Inf`` while unknown: beyond any ``max_lag``), 0
    for a primary (it is the source), NaN when nothing is known yet (role unknown)."""
    if values["lag"] is not None:
        return float(values["lag"])
    return 0.0 if values["role"] == PRIMARY else math.nan


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, PoolCollector] = (
    weakref.WeakKeyDictionary())
_registering = threading.Lock()


def register(
    pool: Pool, name: str = "default", registry: CollectorRegistry | None = None
) -> PoolCollector:
    """Export ``pool`` as ``pool=name`` on ``registry`` (prometheus_client's default one if
    None). Every pool on one registry shares one collector; each needs its own ``name``
    (a second pool under a taken name raises ``ValueError``; the same pool again is a no-op).
    """
    target = registry if registry is not None else REGISTRY
    with _registering:
        collector = _collectors.get(target)
        if collector is None:
            collector = PoolCollector()
            collector.add(pool, name)
            target.register(collector)
            _collectors[target] = collector
        else:
            collector.add(pool, name)
    return collector


def unregister(name: str = "default", registry: CollectorRegistry | None = None) -> bool:
    """Stop exporting the pool called ``name``; the collector leaves the registry with its
    last pool. False if no such pool was registered."""
    target = registry if registry is not None else REGISTRY
    with _registering:
        collector = _collectors.get(target)
        if collector is None or not collector.remove(name):
            return False
        if not collector.names:
            target.unregister(collector)
            del _collectors[target]
        return True
