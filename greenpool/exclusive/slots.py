"""The ``exclusive_limit`` of one group, as the pool, listeners and exclusive blocks use it.

:class:`ExclusiveSlots` ties the group's fair limit (:mod:`.limit`), its dedicated connect
tasks (:mod:`.connects`) and the check of their connections (:mod:`.capacity`) together: a
caller takes a unit, then waits for a connection, and gives the unit back when the
connection is closed. It also counts the listeners (each holds a unit while it lives) and
reports the group's ``exclusive_*`` statistics.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..concurrency.backend import Backend
from ..connection import PooledConnection, close_quietly
from ..errors import PoolClosed, PoolError, PoolTimeout
from ..stats import ExclusiveCounters
from .capacity import Capacity, Room
from .connects import Cancel, DedicatedConnects
from .limit import FairLimit

if TYPE_CHECKING:
    from ..endpoint import Endpoint
    from ..group import Group


class ExclusiveSlots:
    """The dedicated connections of one group: the ``exclusive_limit`` units, who waits for
    one, and the connections opened for their holders.

    ``room_needed(endpoint)``: the :class:`~.capacity.Room` the groups of the process may
    still need under each limit a session on that endpoint meets."""

    def __init__(
        self,
        group: Group,
        backend: Backend,
        room_needed: Callable[[Endpoint], Room],
    ) -> None:
        self.group = group
        self.limit = group.config.exclusive_limit
        self.counters = ExclusiveCounters()
        self._limit = FairLimit(backend, self.limit)
        self.capacity = Capacity(group, backend, room_needed, self.close_connection)
        self.connects = DedicatedConnects(group, backend, self.capacity, self.counters,
                                          self.close_connection)
        #: listeners open now (each holds one unit while it lives)
        self.listeners = 0
        self._listeners_lock = backend.lock()
        self._backend = backend
        #: what must run before these slots are next used: a non-threaded listener hub whose
        #: listener was garbage-collected unclosed has no task of its own to give its unit
        #: back (appended by the finalizer without a lock: it may run inside a locked section)
        self.orphans: deque[Callable[[], object]] = deque()
        #: bumped in a forked child: a unit taken in the parent is never given back here
        self.generation = 0

    # --- the limit ------------------------------------------------------------------------

    def take(self, timeout: float | None) -> None:
        """Hold one unit, waiting up to ``timeout`` (the group's acquire timeout if None)
        for one to be given back. Raises :class:`PoolTimeout`, :class:`PoolClosed`, or
        :class:`PoolError` when the group allows none."""
        self.reclaim()
        wait_for = self.group.config.timeout if timeout is None else timeout
        if self.limit == 0 and not self._limit.closed:
            raise PoolError(f"group {self.group.name!r}: exclusive connections are off for "
                            f"this group (exclusive_limit=0); raise exclusive_limit to use "
                            f"them")
        self._limit.take(wait_for, self._pool_closed, lambda: self._timeout_error(wait_for))

    def give(self) -> None:
        """Give a unit back: to the oldest waiter, else free it."""
        self._limit.give()

    def reclaim(self) -> None:
        """Let what garbage-collected listeners held be given back (see ``orphans``)."""
        while self.orphans:
            try:
                collect = self.orphans.popleft()
            except IndexError:
                return
            collect()

    def count_listener(self, change: int) -> None:
        with self._listeners_lock:
            self.listeners += change

    def _pool_closed(self) -> PoolClosed:
        return PoolClosed(f"group {self.group.name!r}: the pool is closed")

    def _timeout_error(self, wait_for: float) -> PoolTimeout:
        self.counters.timeouts += 1
        return PoolTimeout(
            f"group {self.group.name!r}: all {self.limit} exclusive connections "
            f"(exclusive_limit) are in use or being opened, and none was given back within "
            f"{wait_for:.2f} s; end exclusive blocks and close listeners sooner (many "
            f"subscribers can share one listener). A higher exclusive_limit helps only "
            f"where the server has spare connection slots: dedicated connections never "
            f"take the ones the groups need"
        )

    # --- connections ----------------------------------------------------------------------

    def deadline(self, timeout: float | None) -> float:
        """``time.monotonic()`` plus ``timeout`` (the group's acquire timeout if None)."""
        return time.monotonic() + (self.group.config.timeout if timeout is None else timeout)

    def open(self, deadline: float, caller_waits: bool = True,
             cancel: Cancel | None = None) -> PooledConnection:
        """A new dedicated connection for a caller holding a unit (see
        :meth:`DedicatedConnects.open <.connects.DedicatedConnects.open>`)."""
        return self.connects.open(deadline, caller_waits, cancel)

    def cancel(self, cancel: Cancel, why: str) -> None:
        """End the wait in :meth:`open` given ``cancel`` (see :meth:`DedicatedConnects.cancel
        <.connects.DedicatedConnects.cancel>`)."""
        self.connects.cancel(cancel, why)

    def close_connection(self, pc: PooledConnection, reason: str = "") -> None:
        """Close a dedicated connection (``reason``: why it is a discard, counted as the
        group's; none for a normal end). Its unit is the caller's to give back."""
        if pc.generation != self.group.generation:
            return  # the parent's, silenced at fork: never touched in the child
        if reason:
            self.group.counters.discards[reason] += 1
        close_quietly(pc)

    # --- reporting and lifecycle ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        self.reclaim()
        return {
            "exclusive_open": self._limit.taken,
            "exclusive_max": self.limit,
            "exclusive_waiting": self._limit.waiting,
            "exclusive_connecting": self.connects.running,
            "exclusive_no_room": self.capacity.no_room,
            "listeners": self.listeners,
            **self.counters.export(),
        }

    def close(self) -> None:
        """Refuse new units; every waiter gets :class:`PoolClosed`."""
        self.reclaim()
        self._limit.close(self._closed_error)
        self.connects.close(self._closed_error)

    def _closed_error(self) -> BaseException:
        return PoolClosed(f"group {self.group.name!r}: the pool was closed while waiting for "
                          f"an exclusive connection")

    def after_fork_in_child(self) -> None:
        """Forget the parent's dedicated connections (the group silenced them)."""
        self._listeners_lock = self._backend.lock()
        self.listeners = 0
        self.orphans = deque()
        self.generation += 1
        self.capacity.forget()
        self._limit.after_fork_in_child(self._forked_error)
        self.connects.after_fork_in_child(self._forked_error)

    def _forked_error(self) -> BaseException:
        return PoolError(f"group {self.group.name!r}: the process forked while this task "
                         f"waited for an exclusive connection; the wait belonged to the parent")
