"""A fair counting limit: at most ``limit`` holders, the others served first come, first served.

The line is the groups' own (:class:`~greenpool.waiting.WaitLine`): a unit given back goes
straight to the oldest waiter, so a caller that gives one back and asks again cannot
overtake it, and a waiter that gives up (a timeout, a kill, any ``BaseException``) leaves
the line or passes on the unit a hand-off raced in with its end. Used for ``exclusive_limit``
(the dedicated connections and listeners of one group).
"""

from __future__ import annotations

from collections.abc import Callable

from ..concurrency.backend import Backend
from ..waiting import WaitLine


class FairLimit:
    """``limit`` units, taken with :meth:`take` and given back with :meth:`give` exactly once
    each. Every count changes under one lock, in sections that never block."""

    def __init__(self, backend: Backend, limit: int) -> None:
        self.limit = limit
        self._backend = backend
        self._lock = backend.lock()
        self._line = WaitLine()
        self.taken = 0
        self.closed = False

    @property
    def waiting(self) -> int:
        return len(self._line)

    def take(self, wait_for: float, closed: Callable[[], BaseException],
             timed_out: Callable[[], BaseException]) -> None:
        """Hold one unit, waiting up to ``wait_for`` seconds for one to be given back.
        Raises ``closed()`` once :meth:`close` ran, ``timed_out()`` when none came in time
        (at once when ``wait_for`` is 0 or this mode cannot wait)."""
        with self._lock:
            if self.closed:
                raise closed()
            if self.taken < self.limit and not self._line:
                self.taken += 1
                return
            refuse = wait_for <= 0 or not self._backend.can_wait
            if not refuse:
                waiter = self._backend.waiter()
                self._line.append(waiter)
        if refuse:
            raise timed_out()
        try:
            waiter.wait(wait_for)
        except BaseException:
            self._line.abandon(waiter, self._lock, lambda _unit: self.give())
            raise
        if waiter.item is None:
            self._line.outcome(waiter, self._lock, timed_out)

    def give(self) -> None:
        """Give a unit back: to the oldest waiter, else free it."""
        with self._lock:
            self.taken -= 1
            while self._line and not self.closed and self.taken < self.limit:
                self.taken += 1
                self._line.serve(True)

    def close(self, make_error: Callable[[], BaseException]) -> None:
        """Refuse new takers; every waiter gets ``make_error()``."""
        with self._lock:
            self.closed = True
            self._line.fail_all(make_error)

    def after_fork_in_child(self, make_error: Callable[[], BaseException]) -> None:
        """Forget the parent's holders (never given back here); its waiters get
        ``make_error()``."""
        self._lock = self._backend.lock()
        old_line, self._line = self._line, WaitLine()
        self.taken = 0
        old_line.fail_all(make_error)
