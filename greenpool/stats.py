"""Counters a group keeps about itself, exported by ``Pool.stats()`` under stable keys."""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from math import fsum
from operator import add
from typing import Any

#: Upper bounds (seconds) of the duration histograms' buckets, for every exporter: a clean
#: loan's wait is tens of microseconds, a connect through TLS tens of milliseconds, a stuck
#: wait the acquire timeout. Prometheus' ``le`` labels and OpenTelemetry's explicit bucket
#: boundaries are these.
TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: values a :class:`Timing` keeps unfolded before the loan path folds them itself (128 KiB)
FOLD_AT = 16384
_NO_COUNTS = (0,) * (len(TIME_BUCKETS) + 1)
_NO_VALUES = array("d")  # assigned to the slice of values a fold took: deletes them


class Timing:
    """A histogram of durations whose cost on the loan path is one append: the code where a
    duration ends appends it to ``values`` (an ``array('d')``: 8 bytes a value), and
    :meth:`fold` turns what is there into bucket counts (one per bucket of
    :data:`TIME_BUCKETS`, then one above the last) and a total, with a sort, 17 bisects and
    a sum, all in C. Exporters fold at collection; the loan path folds on the spot only once
    :data:`FOLD_AT` values wait (memory stays bounded when nothing collects).

    Exact in every mode, and through interruptions: an append is one atomic step under the
    GIL; a fold computes the new counts and total aside, then publishes them and deletes the
    values it took in one statement without a call in it, where neither a signal handler
    (a ``KeyboardInterrupt``) nor another thread can run, so a fold interrupted anywhere
    counts its values once or leaves them all for the next (an append racing with it lands
    after the values taken, and stays). Counts and total are one tuple, so a reader never
    sees one without the other. Folds are serialised by a lock of their own, taken on the
    loan path only by the fold every :data:`FOLD_AT` loans. ``sinks`` get every folded
    batch as well (the OpenTelemetry exporter's buffer), after the counts."""

    __slots__ = ("_fold_lock", "_state", "sinks", "values")

    def __init__(self) -> None:
        self.values = array("d")
        #: (counts, total), replaced whole by each fold
        self._state: tuple[tuple[int, ...], float] = (_NO_COUNTS, 0.0)
        self.sinks: tuple[Callable[[list[float]], object], ...] = ()
        self._fold_lock = threading.Lock()

    def record(self, seconds: float) -> None:
        """One duration, off the loan path (the loan path appends to ``values`` itself)."""
        self.values.append(seconds)
        if len(self.values) >= FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Count the values recorded since the last fold; pass them to the sinks."""
        with self._fold_lock:
            values = self.values
            taken = len(values)
            if not taken:
                return
            batch = sorted(values[:taken])
            counts, total = self._state
            added, below = [], 0
            for bound in TIME_BUCKETS:
                upto = bisect_right(batch, bound)  # a value equal to a bound is in its bucket
                added.append(upto - below)
                below = upto
            added.append(taken - below)
            state = (tuple(map(add, counts, added)), total + fsum(batch))
            # the commit: one statement, no call in it (see the class's docstring)
            self._state, values[:taken] = state, _NO_VALUES
            for sink in self.sinks:
                sink(batch)

    def after_fork(self) -> None:
        """In a forked child: its histograms count its own loans only (the parent reports
        its own, values not folded yet included), and a parent's thread may have held the
        fold lock."""
        self._fold_lock = threading.Lock()
        del self.values[:]
        self._state = (_NO_COUNTS, 0.0)

    @property
    def counts(self) -> list[int]:
        """Per bucket, as folded so far."""
        return list(self._state[0])

    @property
    def total(self) -> float:
        """The sum of the values folded so far."""
        return self._state[1]

    @property
    def count(self) -> int:
        self.fold()
        return sum(self._state[0])

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last (folds first)."""
        return self.snapshot()[0]

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """:meth:`cumulative` and the total of the same values (folds first): a fold by
        another thread in between cannot give a sum that is not the buckets'."""
        self.fold()
        counts, total = self._state
        pairs, running = [], 0
        for bound, count in zip((*TIME_BUCKETS, float("inf")), counts, strict=True):
            running += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return pairs, total


@dataclass
class GroupTimings:
    """A group's duration histograms, kept once an exporter asked for them (see
    :func:`timings_of`): ``wait`` (acquire call to connection in hand, successful acquires),
    ``use`` (in hand to returned), ``create`` (a connect's duration, successful connects)."""

    wait: Timing = field(default_factory=Timing)
    use: Timing = field(default_factory=Timing)
    create: Timing = field(default_factory=Timing)

    def after_fork(self) -> None:
        for timing in (self.wait, self.use, self.create):
            timing.after_fork()


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
    #: dedicated callers whose time ran out: exclusive_limit stayed reached, or no
    #: connection was opened in time (the group's own ``timeouts`` count its borrowers)
    timeouts: int = 0
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
