"""Dedicated connections: a session of its own for ``LISTEN``, long sessions, advisory locks.

A pooled loan is reset on return, so session state (``LISTEN``, a session advisory lock, a
temp table) cannot outlive it, by design. ``with pool.exclusive('write') as conn:`` gives a
raw psycopg2 connection that belongs to the caller alone and is closed, never pooled, at
the end of the block. It is chosen like the group's connections (the group's connector
opens it: role, weights, quarantine, the connect deadline libpq ignores in green mode,
name resolution off the hub, the group's session settings) but it takes none of the
group's ``connection_count`` slots: each group has a separate bound, ``exclusive_limit``,
with a first-come-first-served line of its own for callers who find it reached.

Every path that can be interrupted gives its limit slot back before re-raising, and a
connection opened for a caller who was interrupted is closed.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from . import pooler
from .concurrency import Backend, Waiter
from .connection import PooledConnection, close_quietly
from .errors import NoHealthyEndpoint, PoolClosed, PoolError, PoolTimeout
from .stats import ExclusiveCounters
from .waiting import WaitLine

if TYPE_CHECKING:
    from .group import Group


class ExclusiveSlots:
    """The ``exclusive_limit`` of one group: how many dedicated connections are open (or
    being opened), and who waits for one. All counts change under one lock, in sections
    that never block."""

    def __init__(self, group: Group, backend: Backend) -> None:
        self.group = group
        self.limit = group.config.exclusive_limit
        self.counters = ExclusiveCounters()
        self._backend = backend
        self._lock = backend.lock()
        self._line = WaitLine()
        self._taken = 0
        self._closed = False
        #: listeners open now (each holds one slot while it lives)
        self.listeners = 0
        #: what listeners dropped without close() held (``listen._Held``), appended by their
        #: finalizers at garbage collection (no lock there: it may run inside a locked
        #: section) and given back by :meth:`reclaim` on the next use of these slots
        self.orphans: deque[Any] = deque()
        #: bumped in a forked child: a slot taken in the parent is never given back here
        self.generation = 0

    # --- the limit ------------------------------------------------------------------------

    def take(self, timeout: float | None) -> None:
        """Hold one slot, waiting up to ``timeout`` (the group's acquire timeout if None)
        for one to be given back. Raises :class:`PoolTimeout`, :class:`PoolClosed`, or
        :class:`PoolError` when the group allows none."""
        self.reclaim()
        wait_for = self.group.config.timeout if timeout is None else timeout
        name = self.group.name
        with self._lock:
            if self._closed:
                raise PoolClosed(f"group {name!r}: the pool is closed")
            if self.limit == 0:
                raise PoolError(f"group {name!r}: exclusive connections are off for this "
                                f"group (exclusive_limit=0); raise exclusive_limit to use them")
            if self._taken < self.limit and not self._line:
                self._taken += 1
                return
            refuse = wait_for <= 0 or not self._backend.can_wait
            if not refuse:
                waiter = self._backend.waiter()
                self._line.append(waiter)
        if refuse:
            raise self._timeout_error(wait_for)
        try:
            waiter.wait(wait_for)
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.item is not None:
            return
        with self._lock:
            served = self._line.served(waiter)
            if not served:
                self._line.leave(waiter)
        if waiter.error is not None:
            raise waiter.error
        if waiter.item is None:
            raise self._timeout_error(wait_for)

    def reclaim(self) -> None:
        """Give back what garbage-collected listeners held: connections, slots."""
        while self.orphans:
            try:
                held = self.orphans.popleft()
            except IndexError:
                return
            held.release(self)

    def count_listener(self, change: int) -> None:
        with self._lock:
            self.listeners += change

    def give(self) -> None:
        """Give a slot back: to the oldest waiter, else free it."""
        with self._lock:
            if self._line and not self._closed:
                self._line.serve(True)
            else:
                self._taken -= 1

    def _abandon(self, waiter: Waiter) -> None:
        """A waiter was interrupted: leave the line, or pass on the slot it was just given."""
        with self._lock:
            if not self._line.served(waiter):
                self._line.leave(waiter)
                return
        if waiter.item is not None:
            self.give()

    def _timeout_error(self, wait_for: float) -> PoolTimeout:
        self.counters.timeouts += 1
        return PoolTimeout(
            f"group {self.group.name!r}: all {self.limit} exclusive connections "
            f"(exclusive_limit) are in use and none was given back within {wait_for:.2f} s; "
            f"end exclusive blocks and close listeners sooner, or raise exclusive_limit"
        )

    # --- connections ----------------------------------------------------------------------

    def deadline(self, timeout: float | None) -> float:
        """``time.monotonic()`` plus ``timeout`` (the group's acquire timeout if None)."""
        return time.monotonic() + (self.group.config.timeout if timeout is None else timeout)

    def open(self, deadline: float, caller_waits: bool = True) -> PooledConnection:
        """A new connection of the group, outside its slots (the caller holds a limit slot):
        rounds of attempts, each bounded by its endpoint's ``connect_timeout``, started
        until ``deadline``. Raises what the group's connects raise
        (:class:`NoHealthyEndpoint`, :class:`ConnectFailed`, :class:`PoolClosed`).
        Without ``caller_waits`` (a listener's reconnect round) running out of time is no
        caller's timeout, and is left out of the group's ``timeouts``."""
        group = self.group
        if group.closed:
            raise PoolClosed(f"group {group.name!r}: the pool is closed")
        try:
            pc = group.connector.open_now(deadline, group.generation)
        except NoHealthyEndpoint:
            if not caller_waits:
                group.counters.timeouts -= 1  # the connector counted it as an acquire's
            raise
        group.connector.uncount(pc)
        self.counters.opened += 1
        if pooler.mode_of(pc.endpoint.config) == pooler.TRANSACTION:
            self.close_connection(pc)
            raise PoolError(
                f"group {group.name!r}: {pc.endpoint.label} is a transaction-mode pooler, "
                f"where a dedicated connection is no session of its own (a LISTEN would "
                f"hear nothing, a session lock would be held by another client); point the "
                f"group at the server or at a session-mode pooler (endpoint key "
                f"pooler: 'session')")
        return pc

    def close_connection(self, pc: PooledConnection, reason: str = "") -> None:
        """Close a dedicated connection (``reason``: why it is a discard, counted as the
        group's; none for a normal end). Its limit slot is the caller's to give back."""
        if pc.generation != self.group.generation:
            return  # the parent's, silenced at fork: never touched in the child
        if reason:
            self.group.counters.discards[reason] += 1
        pc.endpoint.connection_closed()
        close_quietly(pc)

    # --- reporting and lifecycle ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        self.reclaim()
        return {
            "exclusive_open": self._taken,
            "exclusive_max": self.limit,
            "exclusive_waiting": len(self._line),
            "listeners": self.listeners,
            **self.counters.export(),
        }

    def close(self) -> None:
        """Refuse new slots; every waiter gets :class:`PoolClosed`."""
        self.reclaim()
        with self._lock:
            self._closed = True
            self._line.fail_all(self._closed_error)

    def _closed_error(self) -> BaseException:
        return PoolClosed(f"group {self.group.name!r}: the pool was closed while waiting for "
                          f"an exclusive connection")

    def after_fork_in_child(self) -> None:
        """Forget the parent's dedicated connections (the group silenced them)."""
        self._lock = self._backend.lock()
        old_line = self._line
        self._line = WaitLine()
        self._taken = 0
        self.listeners = 0
        self.orphans = deque()
        self.generation += 1
        old_line.fail_all(lambda: PoolError(
            f"group {self.group.name!r}: the process forked while this task waited for an "
            f"exclusive connection; the wait belonged to the parent"))


class Exclusive:
    """``with pool.exclusive('write') as conn:``: a raw psycopg2 connection of the caller's
    own for the block (the group's autocommit and session settings; a transaction left open
    is rolled back when it is closed at the end). Single-use."""

    __slots__ = ("_generation", "_pc", "_slots", "_timeout", "_used")

    def __init__(self, slots: ExclusiveSlots, timeout: float | None) -> None:
        self._slots = slots
        self._timeout = timeout
        self._pc: PooledConnection | None = None
        self._used = False
        self._generation = slots.generation

    def __enter__(self) -> Any:
        if self._used:
            raise RuntimeError("an exclusive() block is single-use: call exclusive() again")
        self._used = True
        slots = self._slots
        deadline = slots.deadline(self._timeout)  # one bound for the slot and the connect
        self._generation = slots.generation
        slots.take(self._timeout)
        try:
            self._pc = slots.open(deadline)
        except BaseException:
            slots.give()
            raise
        return self._pc.raw

    def __exit__(self, *exc_info: object) -> None:
        pc, self._pc = self._pc, None
        if pc is None:
            return
        try:
            self._slots.close_connection(pc)
        finally:
            if self._generation == self._slots.generation:  # else taken before a fork
                self._slots.give()

    @property
    def endpoint(self) -> str | None:
        """The label of the endpoint the connection is to (None outside the block)."""
        return self._pc.endpoint.label if self._pc is not None else None

    def __repr__(self) -> str:
        where = self.endpoint or "not in a block"
        return f"<Exclusive group={self._slots.group.name!r} {where}>"
