"""The waiting line of a group: strict first-come-first-served, with direct hand-off.

A queue that waiters ``get()`` from is not fair: a greenlet that returns a connection and
asks again at once can take it back ahead of everyone already waiting. Here a returned
(or newly opened) connection is *given* to the oldest waiter, whose signal is then set; no
one can overtake. Each waiter is a small object (a :class:`~.concurrency.backend.Waiter`)
so that a waiter that gives up (timeout, kill) can be taken out of the line, and so that a
hand-off that raced with its giving up is never lost (see :meth:`Group._abandon`).

All methods are called with the group's lock held; none of them blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from .concurrency.backend import Waiter


class WaitLine(deque[Waiter]):
    """The waiters of a group, oldest first. A ``deque`` itself, so that "is anyone
    waiting?" on every borrow and return is a C-level truth test, not a method call."""

    __slots__ = ()

    def leave(self, waiter: Waiter) -> None:
        """Take a waiter that gave up out of the line (it may already have been served)."""
        try:
            self.remove(waiter)
        except ValueError:
            pass

    def serve(self, item: Any) -> None:
        """Give ``item`` to the oldest waiter. The caller checked that someone waits."""
        waiter = self.popleft()
        waiter.item = item
        waiter.set()

    @staticmethod
    def served(waiter: Waiter) -> bool:
        return waiter.item is not None or waiter.error is not None

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Wake every waiter with an error of its own (used by close)."""
        while self:
            waiter = self.popleft()
            waiter.error = make_error()
            waiter.set()
