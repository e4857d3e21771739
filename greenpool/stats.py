"""Counters a group keeps about itself, exported by ``Pool.stats()`` under stable keys."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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
