"""One endpoint group: a bounded set of connections, a fair waiting line, exact accounting.

This module is the loan itself, the hot path: borrow (:meth:`Group.acquire`), return
(:meth:`Group.release`), the one way a connection is closed (:meth:`Group.discard`), the
placement a borrow checks, lifecycle and reporting. The group's state and invariants are
in :mod:`greenpool.group_base`, its room and connects in :mod:`greenpool.group_growth`, its
line in :mod:`greenpool.group_line`, retiring and live changes in
:mod:`greenpool.group_retiring`. How connections are made is the connector's job
(:mod:`greenpool.connector`), which endpoint they go to is placement's
(:mod:`greenpool.placement`), and upkeep is housekeeping's (:mod:`greenpool.housekeeping`).

A clean loan here: the borrow takes the most recently returned idle connection and checks
it (:func:`~greenpool.borrow_return.check_on_borrow`: a zero-timeout poll, no round trip);
the return resets it (:func:`~greenpool.borrow_return.reset_on_return`: no round trip for
a clean loan) and puts it back (:meth:`Group.reuse`). In the modes with one thread both
sections run without the lock's ``with``.

Why one module of this length: a clean loan runs in this module's frames and the two checks
it calls, so each call saved is saved on every loan; what a loan does not cross lives in the
modules named above.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

from .borrow_return import check_on_borrow, reset_on_return
from .concurrency.backend import Backend
from .config import GroupConfig
from .connection import PooledConnection, close_quietly, silence_inherited
from .endpoint import STANDBY, UNKNOWN, Endpoint
from .errors import PoolClosed, PoolError
from .group_base import DRAINED, _inherited_in_use, _monotonic
from .group_retiring import TRAVELS, GroupRetiring
from .placement import open_to, take_in_turn, where_to_be
from .roles import fits, read_role, role_of
from .slots import ATTACHED
from .stats import FOLD_AT
from .waiting import WaitLine

__all__ = ["DRAINED", "TRAVELS", "Group"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller_outside_greenpool() -> str:
    """``file:line in function`` of the innermost frame that is not greenpool's own."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == _PACKAGE_DIR:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "unknown"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


class Group(GroupRetiring):
    """The connections of one group, e.g. ``'write'`` or ``'read'``."""

    def __init__(
        self,
        config: GroupConfig,
        endpoints: Sequence[Endpoint],
        backend: Backend,
        application_name: str,
    ) -> None:
        super().__init__(config, endpoints, backend, application_name)
        self.connector.slots = self  # what the connector calls is in group_growth.py

    # --- borrowing ------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None, holder: Any = None) -> PooledConnection:
        """A healthy connection within ``timeout`` seconds (the group's default if None).
        With a ``holder``, its ``_pc`` is set to the connection before this returns: an
        exception raised as the call returns (a signal handler's) still finds it there,
        where the caller can give it back (a connection no caller has stays lent).

        Raises :class:`PoolTimeout` (:class:`NoHealthyEndpoint` when connecting kept
        failing), :class:`TooManyWaiters`, :class:`ConnectFailed` or :class:`PoolClosed`.

        The clean borrow (an idle connection that passes its check) runs in this one frame:
        each call saved here is saved on every loan.
        """
        now = _monotonic()
        wait_for = self.config.timeout if timeout is None else timeout
        pc: PooledConnection | None = None
        if self._spread_inline and now >= self._next_spread and wait_for > 0:
            pc = self._spread(now, now + wait_for)
        while pc is None:
            # the same section twice: under the lock, and as is where one thread runs it
            # as one step anyway (see group_base: ``with`` costs even NO_LOCK ~70 ns)
            if self._locking:
                with self._lock:
                    if self._closed:
                        raise self._closed_now()
                    if self._line or not self._idle:
                        break
                    pc = self._idle.pop() if self._turns is None else self._take_idle_in_turn()
            else:
                if self._closed:
                    raise self._closed_now()
                if self._line or not self._idle:
                    break
                pc = self._idle.pop() if self._turns is None else self._take_idle_in_turn()
            try:
                reason = check_on_borrow(pc, self.config, self._backend, now, now + wait_for)
                if not reason and self._roles_matter and not self._role_fits(pc):
                    reason = self._measured_again(pc, now + wait_for)
            except BaseException:  # interrupted while checking it: its state is unknown
                self.discard(pc, "interrupted")
                raise
            if reason:  # that one was dead: try the next idle one, else wait for a new one
                self._rejected(pc, reason, now, wait_for)
                pc = None
        if pc is None:
            pc = self._wait(now, wait_for, timeout is None)
        if self._leak_threshold is not None:
            pc.lent_from = _caller_outside_greenpool()
            pc.lent_at = _monotonic()
        timings = self.counters.timings
        if timings is not None:  # the wait ends here; the use time starts here
            pc.lent_at = lent_at = _monotonic()
            wait = timings.wait.values
            wait.append(lent_at - now)
            if len(wait) >= FOLD_AT:  # a use time is recorded per loan too: fold both
                timings.wait.fold()
                timings.use.fold()
        # last: an exception above leaves no loan behind (the connection, referenced by
        # nobody, is collected, and its slot counted back as orphaned)
        try:
            ref = pc.lent_ref
            if ref is None:
                ref = pc.lent_ref = weakref.ref(pc, self._lent.discard)
            self._lent.add(ref)
            if holder is not None:
                holder._pc = pc
            self.counters.acquires += 1  # handed out: failed calls count as what failed them
            return pc
        except BaseException:  # a signal handler's, as the add returns: no caller has it
            if pc.lent_ref is not None:
                self._lent.discard(pc.lent_ref)
            if holder is not None and holder._pc is pc:
                holder._pc = None
            self.discard(pc, "interrupted")
            raise

    def _closed_now(self) -> PoolClosed:
        return PoolClosed(f"group {self.name!r}: the pool is closed")

    def _rejected(self, pc: PooledConnection, reason: str, now: float, wait_for: float) -> None:
        """An idle connection failed its borrow check for ``reason``: discard it (its slot
        goes to a connect), or raise when the caller's time ran out during the check."""
        if reason == "check_timeout":  # the caller's time cut the ping short
            if pc.raw.closed:
                self.discard(pc, reason)
            else:
                self.reuse(pc)  # nothing was sent: it is as good as before
            raise self._timeout_error(wait_for)
        if reason in ("closed", "failed_check"):
            self.discard(pc, reason, reconnect=True)
            self.on_endpoint_failure(pc.endpoint)
        else:
            self.discard(pc, "drained" if pc.expires == DRAINED else reason)

    def _take_idle_in_turn(self) -> PooledConnection:
        idle = self._idle
        assert self._turns is not None
        index = take_in_turn([pc.endpoint for pc in idle], self._turns)
        pc = idle[index]
        del idle[index]
        return pc

    # --- placement on borrow --------------------------------------------------------------

    def _role_fits(self, pc: PooledConnection) -> bool:
        """Zero-round-trip role check on borrow: the server's last ParameterStatus. Only a
        *change* reported on this connection is news about the endpoint: an idle connection
        opened before a promotion still carries the old status until its next round trip."""
        role = role_of(pc.raw)
        if role != pc.role and role != UNKNOWN:
            pc.role = role
            pc.endpoint.observe_role(role)
        if not fits(self.config.role, pc.role if pc.role != UNKNOWN else pc.endpoint.role):
            return False
        return pc.endpoint in self.preferred_endpoints()

    def _measured_again(self, pc: PooledConnection, deadline: float) -> str:
        """A connection that does not fit now: '' if it does once its standby's lag, unknown
        or aged past ``max_lag`` since its last measurement, is measured on it (one round
        trip, bounded by the caller's time: a saturated group gets no probe from
        housekeeping), else the reason to discard it."""
        endpoint = pc.endpoint
        max_lag = self.config.max_lag
        now = _monotonic()
        if max_lag is None or endpoint.role != STANDBY or not endpoint.must_measure_lag(
                now, max_lag):
            return "wrong_role"
        seconds = min(endpoint.config.connect_timeout, deadline - now)
        if not seconds > 0:
            return "wrong_role"
        try:
            report = read_role(pc.raw, self._backend, seconds)
        except Exception:
            return "failed_check" if seconds == endpoint.config.connect_timeout else "lag_check"
        pc.role = report.role
        endpoint.observe(report)
        self._forget_placement()
        return "" if self._role_fits(pc) else "wrong_role"

    def _forget_placement(self) -> None:
        self._preferred_until = 0.0

    def preferred_endpoints(self) -> frozenset[Endpoint]:
        """Where this group should be now (:func:`placement.where_to_be`), recomputed at
        most every 50 ms: the borrow path asks it for every loan of a group with a role."""
        now = _monotonic()
        if now >= self._preferred_until:
            self._place(now)
        return self._preferred

    def usable_endpoints(self) -> frozenset[Endpoint]:
        """Those of :meth:`preferred_endpoints` a connection may be opened on or moved to
        for balance now (:func:`placement.open_to`); cached with them."""
        now = _monotonic()
        if now >= self._preferred_until:
            self._place(now)
        return self._usable

    def _place(self, now: float) -> None:
        """Compute where the group should be, from one view of what it may use now: the
        endpoints its connects skip (refused it, set it back), those that said they are
        full, and those a move of the group missed lately (not moved to). Cached until one
        of those ends by itself, or 50 ms; a change before that (a role, a lag, a refusal,
        a full server, a miss) forgets it at once (watchers)."""
        config = self.config
        refusals = self.connector.refusals
        refused = refusals.refused(now)
        # a tier only refusals keep the group from gives way to the next, unless the group
        # still has connections there (the sessions already open serve on; a copy of the
        # cells, one C call: other threads may change them), and never, for a primary
        # group, to its standbys (a tier only for connects that look for a promotion)
        held = {endpoint for state, endpoint in list(self._slot_cells.values())
                if state == ATTACHED}
        preferred = where_to_be(self.endpoints, config.role, config.max_lag, config.on_lag,
                                () if config.role == "primary" else refused - held)
        missed = {ep: until for ep, (until, _) in list(self._aims_missed.items())
                  if until > now}
        self._usable = open_to(preferred, refused | missed.keys(), now, config.role)
        self._preferred = preferred
        until = now + 0.05
        max_lag = config.max_lag
        if max_lag is not None:  # a lag going stale is news too, watcher or not
            until = min([until, *(at for ep in self.endpoints
                                  if (at := ep.fresh_until(max_lag)) > now)])
        ends = [refusals.until(ep) for ep in refused] + list(missed.values())
        ends += [ep.full_until for ep in preferred if ep.full_until > now]
        self._preferred_until = min([until, *ends])

    # --- returning ------------------------------------------------------------------------

    def release(self, pc: PooledConnection, discard: str = "") -> None:
        """Take a lent connection back: reset it and reuse it, or discard it and free its slot.

        ``discard`` forces a discard with that reason. Never loses the slot, even when the
        reset is interrupted; the interruption is re-raised after the accounting is done.
        Releasing a connection this group did not lend, or releasing it twice, raises
        :class:`PoolError` and changes nothing.
        """
        now = _monotonic()  # the use time ends, the idle time starts (see reset_on_return)
        try:
            # one atomic step: two releases cannot both pass (never lent: None, a KeyError too)
            self._lent.remove(pc.lent_ref)  # type: ignore[arg-type]
        except KeyError:
            if pc.generation != self._generation:
                return  # the parent's, lent at fork time: see after_fork_in_child
            raise PoolError(
                f"group {self.name!r}: this connection is not lent by this group (returned "
                f"twice, or taken from another group or pool); nothing was changed"
            ) from None
        timings = self.counters.timings
        if timings is not None and pc.lent_at:  # (folded with the wait times: see acquire)
            timings.use.values.append(now - pc.lent_at)
        if discard:
            self.discard(pc, discard)
            return
        if (pc.expires == DRAINED or self._size > self.config.connection_count) and (
                self._retired(pc)):
            return  # no reset for a connection that retires: its server may be gone
        try:
            reason = reset_on_return(pc, self.config, self._backend, now)
        except BaseException:
            self.discard(pc, "interrupted")
            raise
        # serving on in a rolling drain, past its lifetime: reuse decides again (the reset
        # may have waited on the server, and a drain or resize come meanwhile)
        if reason and (reason != "max_lifetime" or pc.expires != DRAINED):
            self.discard(pc, reason)
        else:
            self.reuse(pc)

    def reuse(self, pc: PooledConnection) -> None:
        """Put a clean connection we hold a slot for back in service: to the oldest waiter,
        else idle; or, while the group is imbalanced, retired so that its slot opens a
        connection where it belongs (load moves back even when every connection is busy)."""
        if pc.generation != self._generation:
            return  # the parent's, handed back by a task that went on in the child
        if (pc.expires == DRAINED or self._size > self.config.connection_count) and (
                self._retired(pc)):
            return
        if self._roles_matter and self._line and pc.endpoint not in self.preferred_endpoints():
            # A waiter gets it without a borrow check: not one the group should use now (a
            # standby that began to lag while housekeeping probed this very connection)
            self.discard(pc, "wrong_role")
            return
        if not self._locking and not self.imbalanced and not self._closed:
            # the common case of the section below, where one thread runs it as one step
            if self._line:
                self._line.serve(pc)
            else:
                self._idle.append(pc)
            return
        with self._lock:
            if self._closed:
                target = None
            else:
                target = self._move_target(pc) if self.imbalanced else None
                if target is None:
                    if self._line:
                        self._line.serve(pc)
                    else:
                        self._idle.append(pc)
                    return
        if target is None:
            self.discard(pc, "pool_closed", reconnect=False)
        else:
            self.discard(pc, "rebalance", reconnect=False)
            self._grow(1, target, if_idle=False)

    def discard(self, pc: PooledConnection, reason: str, reconnect: bool | None = None) -> None:
        """The one way a connection of this group (one it holds a slot for) is closed: with
        it goes its slot. A new connect takes the room at once if ``reconnect``; None: if
        waiters need one, else the room is freed. A borrow that found a connection dead
        reconnects at once: the connect finds out whether the server is gone (a quarantine)
        or only that connection was. (Housekeeping, in quiet times, does not: a server that
        ends idle sessions on purpose is not fought.)"""
        if pc.generation != self._generation:
            return  # the parent's: silenced and kept at fork, never closed here
        slot = pc.slot
        pc.slot = None
        # its connection leaves its endpoint's count in the step that counts its discard,
        # before the close: a count back cut short after it then finds no connection to
        # count as orphaned; one cut short before it, a connection to count so
        self.connector.close(pc, reason, slot.cell if slot is not None else None)
        if slot is not None:
            self._returned(slot, reconnect)

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close idle connections now, lent ones when they come back; fail every waiter;
        interrupt connects in flight."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._cancel_sweep is not None:
                self._cancel_sweep()
            idle = list(self._idle)
            self._idle.clear()
            self._line.fail_all(self._closed_error)
        for pc in idle:
            self.discard(pc, "pool_closed", reconnect=False)
        self.connector.stop()

    def after_fork_in_child(self) -> None:
        """Forget the parent's connections without disturbing the parent's sessions.

        Runs inside ``os.fork()`` in the child (also before every ``subprocess`` exec), so
        it only resets state and makes syscalls. Every connection the parent had, idle,
        lent, or in transit (being checked on borrow or reset on return by a task that goes
        on in the child), is pointed at /dev/null first: nothing the child does can reach
        the parent's sessions. Connections that may have been mid-query are never closed in
        the child: psycopg2 holds a connection's mutex across a green wait, so one that was
        mid-query in the parent has that mutex locked forever in the child, and closing it
        would hang. They are kept referenced instead. Whatever a parent's task later hands
        back in the child (a connection, a slot) carries the parent's generation and is
        ignored. Callers that were waiting in the parent are woken with an error.
        """
        idle = set(self._idle)
        inherited = self.connector.forget_after_fork()
        self._lock = self._backend.lock()  # a lock held by a parent thread would never be freed
        old_line = self._line
        self._idle.clear()
        self._lent.clear()
        self.holders.clear()
        self._line = WaitLine()
        self._sweep_armed = False  # a timer the parent armed returns at once here
        self._size = self._connecting = 0
        self._dead_slots = deque()
        self._slot_cells = {}
        self._connects = weakref.WeakSet()
        self._generation += 1
        if self.counters.timings is not None:  # a parent's thread may have held a fold lock
            self.counters.timings.after_fork()
        for pc in inherited:
            silence_inherited(pc)
        _inherited_in_use.extend(pc for pc in inherited if pc not in idle)
        for pc in idle:  # idle ones are not mid-query: closing only writes to /dev/null
            close_quietly(pc)
        old_line.fail_all(self._forked_error)

    # --- reporting ------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    def lent(self) -> list[PooledConnection]:
        return [pc for ref in list(self._lent) if (pc := ref()) is not None]

    @property
    def size(self) -> int:
        return self._size

    @property
    def waiting(self) -> int:
        return len(self._line)

    @property
    def role(self) -> str:
        return self.config.role

    def uses(self, endpoint: Endpoint) -> bool:
        return endpoint in self.endpoints or self.counts.get(endpoint, 0) > 0

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        if self._dead_slots:
            with self._lock:
                self._count_orphans()
        idle, in_use = len(self._idle), len(self._lent)
        return {
            "size": self._size,
            "max_size": self.config.connection_count,
            "min_size": self.config.min_size,
            "idle": idle,
            "in_use": in_use,
            "connecting": self._connecting,
            "waiting": len(self._line),
            **self.counters.export(),
        }

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<Group {self.name!r} size={s['size']}/{s['max_size']} idle={s['idle']} "
            f"in_use={s['in_use']} waiting={s['waiting']}>"
        )
