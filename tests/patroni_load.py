"""Load for the Patroni drills (tests/test_patroni.py): writers and readers through a pool,
every outcome recorded with its time and the server that gave it, and the checks made from
those records afterwards.

Writers insert unique ids (no unique index: a write the pool replayed after its outcome was
unknown would show up as a duplicate) and classify each outcome: acknowledged (the block
exited cleanly), failed before the commit (nothing was written), or unknown (the commit's
connection broke). Readers read ``max(id)`` with the server's port and role. A read is stale
by more than ``bound`` seconds if some write acknowledged ``bound`` seconds before the read
began has an id above what the read saw.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from modes import join_all, sleep, spawn

from greenpool import CommitOutcomeUnknown

TABLE = "drill"


@dataclass
class Read:
    start: float
    end: float
    port: int
    in_recovery: bool
    max_id: int


@dataclass
class Load:
    """``writers`` + ``readers`` tasks on ``pool``'s ``write`` and ``read`` groups."""

    pool: Any
    writers: int = 25
    readers: int = 25
    read_group: str = "read"
    acked: list[tuple[int, int, float]] = field(default_factory=list)  # (id, port, time)
    failed: set[int] = field(default_factory=set)  # certainly not written
    unknown: set[int] = field(default_factory=set)  # the commit's outcome is unknown
    write_errors: list[tuple[float, str]] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    read_errors: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._running = False
        self._tasks: list[Any] = []

    # -- running ------------------------------------------------------------------------

    def start(self) -> Load:
        self._running = True
        self._tasks = [spawn(self._writer) for _ in range(self.writers)]
        self._tasks += [spawn(self._reader) for _ in range(self.readers)]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._running = False
        join_all(self._tasks, timeout)

    def _writer(self) -> None:
        while self._running:
            i = next(self._ids)
            committing = False
            try:
                with self.pool.handler("write") as db:
                    row = db.query_one(f"INSERT INTO {TABLE} VALUES (%s) "
                                       "RETURNING inet_server_port()", (i,))
                    committing = True  # the block's exit commits
            except CommitOutcomeUnknown as exc:
                self.unknown.add(i)
                self.write_errors.append((time.monotonic(), repr(exc)))
            except Exception as exc:
                # raised by the INSERT (no commit sent), or by the exit before its COMMIT
                (self.unknown if committing else self.failed).add(i)
                self.write_errors.append((time.monotonic(), repr(exc)))
                sleep(0.01)
            else:
                self.acked.append((i, row[0], time.monotonic()))

    def _reader(self) -> None:
        while self._running:
            start = time.monotonic()
            try:
                with self.pool.handler(self.read_group) as db:
                    row = db.query_one(f"SELECT coalesce(max(id), 0), inet_server_port(), "
                                       f"pg_is_in_recovery() FROM {TABLE}")
            except Exception as exc:
                self.read_errors.append((time.monotonic(), repr(exc)))
                sleep(0.01)
            else:
                self.reads.append(Read(start, time.monotonic(), row[1], row[2], row[0]))
            sleep(0.002)

    # -- what happened ------------------------------------------------------------------

    def acks_on(self, port: int, after: float = 0.0) -> list[tuple[int, int, float]]:
        return [a for a in self.acked if a[1] == port and a[2] > after]

    def reads_on(self, port: int, after: float = 0.0) -> list[Read]:
        return [r for r in self.reads if r.port == port and r.start > after]

    def first_ack_on(self, port: int, after: float) -> float | None:
        return min((a[2] for a in self.acks_on(port, after)), default=None)

    def longest_write_gap(self, start: float, end: float) -> float:
        """Longest time without an acknowledged write within [start, end]."""
        stamps = sorted([start, end] + [a[2] for a in self.acked if start < a[2] < end])
        return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)

    def longest_read_gap(self, start: float, end: float) -> float:
        """Longest time without a completed read within [start, end]."""
        stamps = sorted([start, end] + [r.end for r in self.reads if start < r.end < end])
        return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)

    def stale_reads(self, bound: float) -> list[tuple[Read, int]]:
        """Reads that missed a write acknowledged more than ``bound`` s before they began,
        each with the highest such id."""
        acks = sorted((t, i) for i, _port, t in self.acked)
        times = [t for t, _ in acks]
        best = list(itertools.accumulate((i for _, i in acks), max))
        stale = []
        for read in self.reads:
            n = bisect.bisect_left(times, read.start - bound)
            if n and best[n - 1] > read.max_id:
                stale.append((read, best[n - 1]))
        return stale

    def check_rows(self, rows: list[int]) -> None:
        """The table's ids against the outcomes: every acknowledged write is there, once; no
        write reported failed is; nothing else is but writes whose outcome was unknown."""
        ids = set(rows)
        duplicates = len(rows) - len(ids)
        acked = {i for i, _port, _t in self.acked}
        lost = acked - ids
        written_after_failing = ids & self.failed
        unexplained = ids - acked - self.unknown
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {sorted(lost)[:10]}"
        assert duplicates == 0, f"{duplicates} ids written twice (a replayed write)"
        assert not written_after_failing, (
            f"{len(written_after_failing)} writes reported failed are in the table, e.g."
            f" {sorted(written_after_failing)[:10]}")
        assert not unexplained, f"ids nobody wrote: {sorted(unexplained)[:10]}"

    def summary(self) -> str:
        return (f"{len(self.acked)} writes acknowledged, {len(self.failed)} failed,"
                f" {len(self.unknown)} unknown; {len(self.reads)} reads,"
                f" {len(self.read_errors)} read errors")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll until ``predicate()``; the time it first held. Fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        sleep(interval)
    return time.monotonic()
