"""The waiting line of a group: strict first-come-first-served, with direct hand-off.

A queue that waiters ``get()`` from is not fair: a greenlet that returns a connection and
asks again at once can take it back ahead of everyone already waiting. Here a returned
(or newly opened) connection is *given* to the oldest waiter, whose signal is then set; no
one can overtake. Each waiter is a small object (a :class:`~.concurrency.backend.Waiter`)
so that a waiter that gives up (timeout, kill) can be taken out of the line, and so that a
hand-off that raced with its giving up is never lost (:meth:`WaitLine.abandon`,
:meth:`WaitLine.outcome`). One line serves a group's borrowers and the dedicated
connections' two lines (a slot, then a connection).

All methods but :meth:`~WaitLine.abandon` and :meth:`~WaitLine.outcome` (which take the
lock themselves: they run after the wait) are called with the owner's lock held; none of
them blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
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

    def abandon(
        self, waiter: Waiter, lock: AbstractContextManager[Any], pass_on: Callable[[Any], None]
    ) -> None:
        """``waiter`` was interrupted (or will not wait after all): leave the line, or pass on
        what it was handed meanwhile, which it will not use."""
        with lock:
            if not self.served(waiter):
                self.leave(waiter)
                return
        if waiter.item is not None:
            pass_on(waiter.item)

    def outcome(
        self,
        waiter: Waiter,
        lock: AbstractContextManager[Any],
        timed_out: Callable[[], BaseException],
    ) -> Any:
        """What a wait that ended with nothing in hand comes to: the item a hand-off raced
        in with its end, else the error it was woken with, else ``timed_out()``."""
        with lock:
            if not self.served(waiter):
                self.leave(waiter)
        if waiter.error is not None:
            raise waiter.error
        if waiter.item is None:
            raise timed_out()
        return waiter.item

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """Wake every waiter with an error of its own (used by close)."""
        while self:
            waiter = self.popleft()
            waiter.error = make_error()
            waiter.set()
