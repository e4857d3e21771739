"""A group's fair line: waiting for a connection when none is idle (asking for a connect
when the group has room), the one timer that times out waiters with the default timeout,
and what a caller whose time ran out (or who may not wait) is told."""

from __future__ import annotations

import math
from collections.abc import Callable

from .connection import PooledConnection
from .errors import PoolClosed, PoolError, TooManyWaiters
from .group_base import _monotonic
from .group_growth import GroupGrowth


class GroupLine(GroupGrowth):
    def _wait(self, now: float, wait_for: float, default_timeout: bool) -> PooledConnection:
        """Nothing idle (or others were first): ask for a connection if the group has room,
        and wait in line for whichever connection comes first."""
        counters = self.counters
        if not self._can_wait:
            return self._connect_inline(now + wait_for)
        spent = _monotonic() - now
        if spent > 0.001:  # borrow checks took time: wait only for what is left
            wait_for = max(0.0, wait_for - spent)
            default_timeout = False
            now += spent
        error = self.connector.fatal_error()
        if error is not None:
            raise error  # every endpoint refused this group: waiting cannot help
        with self._lock:
            line = self._line
            self._count_orphans()
            grow = self._size < self.config.connection_count and self._wants_connect(
                len(line) + 1)
            slot = self._take_slot() if grow else None
            refuse = len(line) >= self._max_waiting or wait_for <= 0
            if not refuse:
                waiter = self._new_waiter()
                line.append(waiter)
                if default_timeout and self._line_keeps_time:
                    waiter.deadline = deadline = now + wait_for
                    if not self._sweep_armed:
                        self._arm_sweep(wait_for)
                    elif deadline < self._sweep_at:  # the default timeout was lowered
                        self._rearm_sweep(wait_for)
                    own_timeout: float | None = None  # the line's timer times it out
                else:
                    own_timeout = wait_for
        if slot is not None and not self.connector.start(slot) and not refuse and not self._lent:
            # no connect can start and none is lent: nothing will come
            self._line.abandon(waiter, self._lock, self.reuse)
            raise self._timeout_error(wait_for)
        if refuse:
            self._refuse_to_wait(wait_for)
        counters.waits += 1
        try:
            waiter.wait(own_timeout)
        except BaseException:
            self._line.abandon(waiter, self._lock, self.reuse)
            raise
        finally:
            counters.wait_time += _monotonic() - now
        item, waiter.item = waiter.item, None  # the waiter may outlive this call (the hub's
        # pending wake-up holds it): only the caller holds the connection (see Group._lent)
        if item is None:  # closed, a failure retrying cannot fix, or the timeout
            item = self._line.outcome(waiter, self._lock, lambda: self._timeout_error(wait_for))
        return item  # handed over by release() or the connector: already clean

    def _arm_sweep(self, seconds: float) -> None:
        generation = self._generation
        self._cancel_sweep = self._backend.call_later(seconds, lambda: self._sweep(generation))
        self._sweep_armed = True
        self._sweep_at = _monotonic() + seconds

    def _rearm_sweep(self, seconds: float) -> None:
        """Sooner than it was armed for (under the lock)."""
        if self._cancel_sweep is not None:
            self._cancel_sweep()
        self._arm_sweep(seconds)

    def _sweep(self, generation: int) -> None:
        """The line's timer (green modes). Waiters with the group's default timeout do not
        each arm a timer of their own, which costs more than the rest of a hand-off: they
        joined in deadline order, so one timer, armed for the oldest one's deadline, times
        out every waiter whose deadline passed and re-arms for the next. While the line is
        busy it fires about once per ``timeout``; once nobody waits it is not re-armed.
        After ``reconfigure()`` lowered the timeout, a newer waiter's deadline comes before
        older ones': the whole line is looked at, and the timer armed for the soonest."""
        if generation != self._generation:
            return  # armed in the parent before a fork: this process's line is not its own
        now = _monotonic()
        with self._lock:
            self._sweep_armed = False
            expired = []
            soonest = math.inf
            for waiter in self._line:  # oldest first
                deadline = waiter.deadline
                if deadline is None:
                    continue  # a timeout of its own: its own timer
                if deadline > now:
                    soonest = min(soonest, deadline)
                else:
                    expired.append(waiter)
            if soonest < math.inf:
                self._arm_sweep(soonest - now)  # re-armed before anything can fail
            for waiter in expired:
                self._line.remove(waiter)
                waiter.error = self._timeout_error(self.config.timeout)
                waiter.set()

    def _refuse_to_wait(self, wait_for: float) -> None:
        if len(self._line) >= self._max_waiting:
            self.counters.refusals += 1
            raise TooManyWaiters(
                f"group {self.name!r}: {len(self._line)} callers already wait for a connection "
                f"(max_waiting={self.config.max_waiting}); shed load or raise connection_count"
            )
        raise self._timeout_error(wait_for)

    def _timeout_error(self, wait_for: float) -> PoolError:
        """What a caller whose time ran out gets: the reason no endpoint can be connected to
        when that is why, else a plain timeout."""
        return self.connector.timed_out(lambda: self._busy_message(wait_for))

    def _busy_message(self, wait_for: float) -> str:
        cannot_start = self.connector.cannot_start
        if cannot_start is not None:
            return (
                f"group {self.name!r}: no connection within {wait_for:.2f} s: a connect "
                f"could not be started ({cannot_start}); the process may have reached its "
                f"limit on threads (ulimit -u, a container's pids limit)"
            )
        if self._connecting and not self._lent:
            return (
                f"group {self.name!r}: no connection within {wait_for:.2f} s: "
                f"{self._connecting} connect(s) under way have not completed yet (each may "
                f"take up to connect_timeout). Endpoints: {self.connector.describe()}"
            )
        connecting = f", {self._connecting} connecting" if self._connecting else ""
        return (
            f"group {self.name!r}: no connection free within {wait_for:.2f} s "
            f"({len(self._lent)} of {self.config.connection_count} in use{connecting}, "
            f"{len(self._line)} waiting); raise connection_count or timeout, "
            f"or look for code holding connections too long"
        )

    def _fail_waiters(self, make_error: Callable[[], BaseException], generation: int) -> None:
        if generation != self._generation:
            return
        with self._lock:
            self._line.fail_all(make_error)

    def _closed_error(self) -> BaseException:
        return PoolClosed(f"group {self.name!r}: the pool was closed while waiting")

    def _forked_error(self) -> BaseException:
        return PoolError(f"group {self.name!r}: the process forked while this task waited; "
                         f"the wait belonged to the parent")
