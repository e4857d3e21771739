"""Retiring a group's connections: drained or surplus ones as they come back, moves to
where the group belongs, evicting an endpoint's idle ones, and the live changes
(``Pool.drain``, ``resize``, ``reconfigure``) that mark connections for it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .config import GroupConfig
from .connection import PooledConnection
from .endpoint import Endpoint
from .group_base import DRAINED, _monotonic
from .group_line import GroupLine
from .placement import move_target

#: group settings that travel with each connection (startup packet, cursor factory, the
#: configure hook): a change retires the group's connections
TRAVELS = ("autocommit", "readonly", "statement_timeout", "row_factory", "configure")
_MOVES_IN_FLIGHT = 2  # a connection moves only while fewer connects than this are under way


class GroupRetiring(GroupLine):
    def _retired(self, pc: PooledConnection) -> bool:
        """Close a drained connection (or one beyond a lowered ``connection_count``) as it
        comes back; with callers waiting, a new connection takes its room at once. A drain
        under load rolls: while callers wait and ``_MOVES_IN_FLIGHT`` replacements are under
        way, a drained connection serves on (False) instead of leaving its room empty for
        a connect's time, so a caller waits at most about one connect, not one per
        replacement; not one to an endpoint the group no longer has, which is never lent
        again."""
        if self._size > self.config.connection_count:
            # looked at without the lock: threads returning at once may all see the surplus,
            # so whether the room goes to a waiter is decided under it (reconnect=None)
            self.discard(pc, "resized", reconnect=None)
            return True
        if self._line and self._connecting >= _MOVES_IN_FLIGHT and (
                pc.endpoint in self.endpoints):  # never one to an endpoint taken out
            return False
        self.discard(pc, "drained", reconnect=True if self._line else None)
        return True

    def _move_target(self, pc: PooledConnection) -> Endpoint | None:
        if self._connecting >= _MOVES_IN_FLIGHT:
            return None  # within the slow start: at most this many connects under way
        target = move_target(pc.endpoint, self.preferred_endpoints(), self.usable_endpoints(),
                             self._attached_counts(), _monotonic())
        if target is None and not self._connecting:
            self.imbalanced = False  # nothing more to move: returns stop looking
        return target

    def _take_idle(
        self, choose: Callable[[list[PooledConnection]], list[PooledConnection]]
    ) -> list[PooledConnection]:
        """Take the idle connections ``choose`` picks (given them oldest-returned first).
        Their slots stay held: give each back (:meth:`reuse`) or :meth:`discard` it."""
        with self._lock:
            if self._closed:
                return []
            self._count_orphans()
            taken = choose(list(self._idle))
            for pc in taken:
                self._idle.remove(pc)
            return taken

    def _evict_idle(self, endpoint: Endpoint) -> None:
        """Close every idle connection to ``endpoint`` at once: one of its connections proved
        dead, so the rest are suspect, and checking them one borrow at a time would hand
        the failure to one caller after another."""
        for pc in self._take_idle(lambda idle: [c for c in idle if c.endpoint is endpoint]):
            self.discard(pc, "evicted")

    def drain(self, endpoint: Endpoint | None = None) -> int:
        """Retire every connection of the group (only those to ``endpoint`` if given): idle
        ones now, lent ones (and those a task holds for a check) when they come back,
        connects under way once they have served one caller. New connections serve
        meanwhile. Returns how many idle ones were closed now."""
        with self._lock:
            if endpoint is None:
                self._retire_before = _monotonic()
        for pc in self._opened():
            if endpoint is None or pc.endpoint is endpoint:
                pc.expires = DRAINED
        idle = self._take_idle(lambda idle: [pc for pc in idle if pc.expires == DRAINED])
        for pc in idle:
            self.discard(pc, "drained", reconnect=None)
        self._refill()
        return len(idle)

    def _opened(self) -> list[PooledConnection]:
        """Every connection the group's connector opened that is still alive (idle, lent,
        or in a task's hands)."""
        while True:
            try:  # another thread may add one while we copy
                return [pc for pc in list(self.connector.opened)
                        if pc.generation == self._generation]
            except RuntimeError:
                continue

    def apply(self, config: GroupConfig, endpoints: Sequence[Endpoint]) -> bool:
        """Take a new configuration of this group (same name and role) and endpoint list
        (``Pool.reconfigure``): what only the pool reads applies at once; a setting that
        travels with each connection (autocommit, readonly, statement_timeout, row_factory,
        configure) or a changed endpoint retires the connections it concerns, as drain does.
        Connects under way to an endpoint taken out are abandoned, their room free at once.
        Connections beyond a lowered ``connection_count`` are closed as they come back.
        Whether the connections must be drained."""
        old = self.config
        left = [ep for ep in self.endpoints if ep not in endpoints]
        with self._lock:
            self.config = config
            self._max_waiting = config.max_waiting or math.inf
            self._line_keeps_time = self._backend.can_call_later and math.isfinite(
                config.timeout)
            self._leak_threshold = config.leak_threshold
            if list(endpoints) != self.endpoints:
                self.endpoints = list(endpoints)
                turns = self._turns or {}
                self._turns = ({ep: turns.get(ep, 0.0) for ep in self.endpoints}
                               if len(self.endpoints) > 1 else None)
                self._spread_inline = not self._can_wait and len(self.endpoints) > 1
                for endpoint in self.endpoints:
                    if self._forget_placement not in endpoint._watchers:
                        endpoint.watch(self._forget_placement)
            self._preferred_until = 0.0
        self.connector.apply(config, self.endpoints)
        # connects under way to an endpoint taken out give their room back now (and one
        # that still opens a connection brings it to _deliver, which closes it)
        self._abandon_connects(left)
        travels = any(getattr(old, key) != getattr(config, key) for key in TRAVELS)
        surplus = self._take_idle(lambda idle: idle[:max(0, self._size - config.connection_count)])
        for pc in surplus:
            self.discard(pc, "resized", reconnect=None)
        if travels:
            self.drain()
        else:
            for endpoint in left:  # still in the pool's configuration, no longer this group's
                self.drain(endpoint)
            self._refill()
        return travels
