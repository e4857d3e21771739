"""A steady load on a pool while a test changes it: tasks that borrow, query and count.

Every error a task meets is an application error (the promise under test is that there is
none); each loan also records the longest wait for a connection, and the backend pid it
ran on (to see which connections served).
"""

from __future__ import annotations

import time
from typing import Any

from modes import join_all, sleep, spawn


class Load:
    """``tasks`` borrowers of ``group`` running ``SELECT pg_backend_pid()`` until stopped,
    with ``pause`` seconds between loans (held ``hold`` seconds each)."""

    def __init__(self, pool: Any, group: str, tasks: int = 8, hold: float = 0.002,
                 pause: float = 0.0) -> None:
        self.pool = pool
        self.group = group
        self.hold = hold
        self.pause = pause
        self.errors: list[BaseException] = []
        self.loans = 0
        self.pids: set[int] = set()
        self.longest_wait = 0.0
        self._running = True
        self._tasks = [spawn(self._run) for _ in range(tasks)]

    def _run(self) -> None:
        while self._running:
            started = time.monotonic()
            try:
                with self.pool.handler(self.group) as db:
                    self.longest_wait = max(self.longest_wait, time.monotonic() - started)
                    (pid,) = db.query_one("SELECT pg_backend_pid()")
                    self.pids.add(int(pid))
                    if self.hold:
                        sleep(self.hold)
                self.loans += 1
            except Exception as exc:
                self.errors.append(exc)
            sleep(self.pause)

    def until(self, loans: int, timeout: float = 10.0) -> None:
        """Wait until ``loans`` more loans have completed."""
        goal = self.loans + loans
        deadline = time.monotonic() + timeout
        while self.loans < goal:
            if time.monotonic() > deadline:
                raise AssertionError(f"the load made only {self.loans} of {goal} loans in "
                                     f"{timeout} s; errors: {self.errors[:3]}")
            sleep(0.01)

    def stop(self) -> None:
        self._running = False
        join_all(self._tasks, 15)
        assert not self.errors, f"{len(self.errors)} application errors: {self.errors[:3]!r}"
