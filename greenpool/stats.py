"""Counters a group keeps about itself, exported by ``Pool.stats()`` under stable keys."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Upper bounds (seconds) of the duration histograms' buckets, for every exporter: a clean
#: loan's wait is tens of microseconds, a connect through TLS tens of milliseconds, a stuck
#: wait the acquire timeout. Prometheus' ``le`` labels and OpenTelemetry's explicit bucket
#: boundaries are these.
TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Timing:
    """A histogram of durations, cheap enough for the borrow path: one bisect of a
    17-bound tuple and two additions (exact under cooperative scheduling; in threaded mode
    as exact as the other counters, which are not locked either). Exporters read ``counts``
    (one per bucket of :data:`TIME_BUCKETS`, then one above the last) and ``total`` at
    collection. ``sinks`` get every value as well (the OpenTelemetry exporter's buffer)."""

    __slots__ = ("counts", "sinks", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(TIME_BUCKETS) + 1)
        self.total = 0.0
        self.sinks: tuple[Callable[[float], object], ...] = ()

    def record(self, seconds: float) -> None:
        self.counts[bisect_left(TIME_BUCKETS, seconds)] += 1
        self.total += seconds
        if self.sinks:  # a test is cheaper than an empty loop, on every loan
            for sink in self.sinks:
                sink(seconds)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        pairs, running = [], 0
        for bound, count in zip((*TIME_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return pairs


@dataclass
class GroupTimings:
    """A group's duration histograms, kept once an exporter asked for them (see
    :func:`timings_of`): ``wait`` (acquire call to connection in hand, successful acquires),
    ``use`` (in hand to returned), ``create`` (a connect's duration, successful connects)."""

    wait: Timing = field(default_factory=Timing)
    use: Timing = field(default_factory=Timing)
    create: Timing = field(default_factory=Timing)


@dataclass
class GroupCounters:
    """Monotonic counters; gauges (size, idle, ...) are read from the group when exported."""

    acquires: int = 0
    waits: int = 0
    wait_time: float = 0.0
    timeouts: int = 0
    connects: int = 0
    connect_errors: int = 0
    failovers: int = 0
    replays: int = 0
    refusals: int = 0  # acquires shed at once by max_waiting (TooManyWaiters)
    discards: Counter[str] = field(default_factory=Counter)
    #: duration histograms; None (nothing timed, nothing paid) until an exporter wants them
    timings: GroupTimings | None = None

    def export(self) -> dict[str, Any]:
        return {
            "acquires": self.acquires,
            "waits": self.waits,
            "wait_time": round(self.wait_time, 6),
            "timeouts": self.timeouts,
            "connects": self.connects,
            "connect_errors": self.connect_errors,
            "failovers": self.failovers,
            "replays": self.replays,
            "refusals": self.refusals,
            "discards": sum(self.discards.values()),
            "discards_by_reason": dict(self.discards),
        }


@dataclass
class ExclusiveCounters:
    """Counters of a group's dedicated connections (``pool.exclusive()``, ``pool.listen()``),
    exported beside the group's own under ``exclusive_*`` and ``listen_*`` keys."""

    opened: int = 0  # dedicated connections opened, a listener's reconnects included
    timeouts: int = 0  # callers refused because exclusive_limit stayed reached
    gaps: int = 0  # listener reconnects, each one a window where notifications may be lost

    def export(self) -> dict[str, Any]:
        return {
            "exclusive_opened": self.opened,
            "exclusive_timeouts": self.timeouts,
            "listen_gaps": self.gaps,
        }


def timings_of(group: Any) -> GroupTimings:
    """``group``'s duration histograms, switched on by the first exporter that asks."""
    counters: GroupCounters = group.counters
    if counters.timings is None:
        counters.timings = GroupTimings()
    return counters.timings
