"""One endpoint group: a bounded set of connections, a fair waiting line, exact accounting.

This is the hot path. How connections are made is the connector's job
(:mod:`greenpool.connector`), which endpoint they go to is placement's
(:mod:`greenpool.placement`), and upkeep is housekeeping's (:mod:`greenpool.housekeeping`).

Invariants (all changed only under ``self._lock``, in sections that never block):

* ``_size`` counts *slots* (:mod:`greenpool.slots`): idle connections + lent connections
  + connects in progress (``_connecting``). Room is taken only by making a :class:`Slot`
  (:meth:`_take_slot`), before a connect starts, so the group never exceeds
  ``connection_count`` however tasks interleave.
* A slot is given back only through its object, which lets that happen once: a connect
  task's slot when the connect ends without a connection, a connection's slot
  (``pc.slot``) when the group discards it (:meth:`discard`). A slot whose
  holder vanished without giving it back (a signal handler's exception between two lines)
  is collected and counted back at the group's next look (:meth:`orphaned`).
* Live changes (:meth:`drain`, :meth:`apply`) never take a loan back: they mark
  connections (``expires = DRAINED``) that are then retired through :meth:`discard` when
  they come back, and a lowered ``connection_count`` is reached as loans return (no slot
  is taken while ``_size`` is at or above it).
* Someone waits only if nothing is idle; a returned or new connection goes to the oldest
  waiter directly (first come, first served). A waiter never connects itself: it asks the
  connector, and whatever connection comes first serves the oldest waiter.

Why one module of this length: the group's bookkeeping (idle stack, waiting line, slots,
lent set, generation) changes under its one lock, in sections that rely on each other's
invariants; split, each part would reach into the others' private state. What can stand
alone already does: placement.py, waiting.py, slots.py, borrow_return.py, connector.py.
"""

from __future__ import annotations

import math
import os
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from .borrow_return import check_on_borrow, reset_on_return
from .concurrency.backend import Backend
from .config import GroupConfig
from .connection import PooledConnection, close_quietly, silence_inherited
from .connector import Connector
from .endpoint import STANDBY, UNKNOWN, UP, Endpoint
from .errors import PoolClosed, PoolError, PoolTimeout, TooManyWaiters
from .placement import connect_order, move_target, take_in_turn, unserved, where_to_be
from .roles import fits, read_role, role_of
from .slots import CONNECTING, RETURNED, Slot
from .stats import FOLD_AT, GroupCounters
from .waiting import WaitLine

if TYPE_CHECKING:
    from .handler import Handler

_monotonic = time.monotonic

# Connections that were lent out, or being opened, when this process was forked from its
# parent; kept referenced so that they are never deallocated (see after_fork_in_child).
_inherited_in_use: list[PooledConnection] = []
#: group settings that travel with each connection (startup packet, cursor factory, the
#: configure hook): a change retires the group's connections
TRAVELS = ("autocommit", "readonly", "statement_timeout", "row_factory", "configure")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MOVES_IN_FLIGHT = 2  # a connection moves only while fewer connects than this are under way
_STUCK_AFTER = 0.25  # seconds: a connect under way this long may be stuck (_wants_connect)
_SPREAD_EVERY = 1.0  # seconds between a non-threaded group's looks for where to spread
#: ``PooledConnection.expires`` of a connection to retire when it comes back (drain, an
#: endpoint removed, a setting that travels with the connection changed)
DRAINED = -1.0


def _caller_outside_greenpool() -> str:
    """``file:line in function`` of the innermost frame that is not greenpool's own."""
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == _PACKAGE_DIR:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "unknown"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


class Group:
    """The connections of one group, e.g. ``'write'`` or ``'read'``."""

    def __init__(
        self,
        config: GroupConfig,
        endpoints: Sequence[Endpoint],
        backend: Backend,
        application_name: str,
    ) -> None:
        self.config = config
        self.name = config.name
        self.counters = GroupCounters()
        self._backend = backend
        self._lock = backend.lock()
        self.endpoints = list(endpoints)
        self.connector = Connector(config, self.endpoints, backend, application_name,
                                   self.counters)
        self.connector.slots = self
        #: connects that began before this (monotonic) deliver a connection to retire
        self._retire_before = 0.0
        self._idle: deque[PooledConnection] = deque()  # right end = most recently returned
        # smooth weighted round robin over endpoints on borrow (None: a single endpoint)
        self._turns: dict[Endpoint, float] | None = (
            dict.fromkeys(self.endpoints, 0.0) if len(self.endpoints) > 1 else None
        )
        self._lent: set[PooledConnection] = set()
        self._line = WaitLine()
        self._new_waiter = backend.waiter
        self._can_wait = backend.can_wait
        #: non-threaded with several endpoints: no background opens a connection on each
        #: endpoint or measures a standby's lag again, so a borrow does it now and then
        #: (see _spread)
        self._spread_inline = not backend.can_wait and len(self.endpoints) > 1
        self._next_spread = 0.0
        self._max_waiting = config.max_waiting or math.inf
        # whether waiters with the default timeout share one timer (see _sweep)
        self._line_keeps_time = backend.can_call_later and math.isfinite(config.timeout)
        self._sweep_armed = False
        self._cancel_sweep: Callable[[], None] | None = None
        self._size = 0
        self._connecting = 0  # slots held by connect tasks
        #: (state, endpoint) of slots collected while held, counted back at the next look
        self._orphans: deque[tuple[int, Endpoint | None]] = deque()
        #: the slots this group made, weakly (a collected one is orphaned): those still
        #: CONNECTING are the connects under way
        self._connects: weakref.WeakSet[Slot] = weakref.WeakSet()
        self._closed = False
        self._generation = 0
        self._roles_matter = config.role != "any"
        self._preferred: frozenset[Endpoint] = frozenset(self.endpoints)
        self._preferred_until = 0.0
        for endpoint in self.endpoints:  # a new role or lag is news at once, not in 50 ms
            endpoint.watch(self._forget_placement)
        #: set by housekeeping (and when an endpoint comes back) while connections should
        #: move to another endpoint: only then does a return look at placement
        self.imbalanced = False
        self._leak_threshold = config.leak_threshold
        #: task identity -> the outermost handler block that task holds in this group (a
        #: nested block of the same task reuses its connection: see handler.py)
        self.holders: dict[Hashable, Handler] = {}
        #: the identity of the running task (a greenlet, a thread id): the key of holders
        self.current_task: Callable[[], Hashable] = backend.current
        #: Called with an endpoint whose connections proved dead: the pool evicts that
        #: endpoint's idle connections in every group at once.
        self.on_endpoint_failure: Callable[[Endpoint], None] = self.evict_idle

    # --- borrowing ------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> PooledConnection:
        """A healthy connection within ``timeout`` seconds (the group's default if None).

        Raises :class:`PoolTimeout` (:class:`NoHealthyEndpoint` when connecting kept
        failing), :class:`TooManyWaiters`, :class:`ConnectFailed` or :class:`PoolClosed`.

        The clean borrow (an idle connection that passes its check) runs in this one frame:
        each call saved here is saved on every loan.
        """
        now = _monotonic()
        wait_for = self.config.timeout if timeout is None else timeout
        self.counters.acquires += 1
        pc: PooledConnection | None = None
        if self._spread_inline and now >= self._next_spread and wait_for > 0:
            pc = self._spread(now, now + wait_for)
        while pc is None:
            with self._lock:
                if self._closed:
                    raise PoolClosed(f"group {self.name!r}: the pool is closed")
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
        self._lent.add(pc)
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
        return pc

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
                    waiter.deadline = now + wait_for
                    if not self._sweep_armed:
                        self._arm_sweep(wait_for)
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
        item = waiter.item
        if item is None:  # closed, a failure retrying cannot fix, or the timeout
            item = self._line.outcome(waiter, self._lock, lambda: self._timeout_error(wait_for))
        return item  # handed over by release() or the connector: already clean

    def _wants_connect(self, waiters: int) -> bool:
        """Whether ``waiters`` callers need one more connect than is under way. Cold (none
        lent, so none will come back) every waiter gets one; warm, the group grows one
        connect at a time, because a returned connection usually comes sooner than a new
        one (a burst does not grow the group to its maximum for nothing). A connect under
        way longer than ``_STUCK_AFTER`` (a black hole holds it for ``connect_timeout``) no
        longer stops a warm group from growing on its other endpoints."""
        connecting = self._connecting
        if self.connector.fatal_error() is not None:
            return False
        if not self._lent:
            return waiters > connecting
        if connecting:
            now = _monotonic()
            connecting = sum(1 for slot in self._connects
                             if slot.state == CONNECTING and now - slot.since < _STUCK_AFTER)
        return waiters > connecting and connecting == 0

    def _spread(self, now: float, deadline: float) -> PooledConnection | None:
        """``non-threaded``: one connect attempt, within the caller's
        time, to the first endpoint where a connect should go and the group has none (an
        endpoint no light load reached, a standby whose lag must be measured again). None
        when there is none, no room, or the attempt failed: the borrow goes on as usual, and
        the next look is a second away."""
        config = self.config
        counts = self.connector.counts
        targets = [ep for ep in connect_order(self.endpoints, config.role, config.max_lag,
                                              config.on_lag, counts, now, 0)
                   if not counts.get(ep) and ep.state == UP and not ep.cut(now)]
        if not targets:
            self._next_spread = now + _SPREAD_EVERY  # nothing to do: look again later
            return None
        with self._lock:
            if self._closed or self._size >= config.connection_count:
                return None
            slot = self._take_slot()
        with slot:
            pc = self.connector.try_once(targets[0], slot.generation, deadline)
            if pc is None:
                self._next_spread = now + _SPREAD_EVERY  # it failed: not at every borrow
                slot.give_back(reconnect=False)
                return None
            self._attach(slot, pc)
            return pc

    def _connect_inline(self, deadline: float) -> PooledConnection:
        """``non-threaded``: nobody else can return a connection, so connect now if the
        group has room, else refuse at once."""
        with self._lock:
            self._count_orphans()
            slot = self._take_slot() if self._size < self.config.connection_count else None
        if slot is None:
            self.counters.timeouts += 1
            raise PoolTimeout(
                f"group {self.name!r}: all {self.config.connection_count} connections are in "
                f"use, and in non-threaded mode nobody can return one while you wait; return "
                f"connections before taking another, or raise connection_count"
            )
        with slot:
            pc = self.connector.open_now(deadline, slot.generation)
            self._attach(slot, pc)
            return pc

    def _take_idle_in_turn(self) -> PooledConnection:
        idle = self._idle
        assert self._turns is not None
        index = take_in_turn([pc.endpoint for pc in idle], self._turns)
        pc = idle[index]
        del idle[index]
        return pc

    def _arm_sweep(self, seconds: float) -> None:
        generation = self._generation
        self._cancel_sweep = self._backend.call_later(seconds, lambda: self._sweep(generation))
        self._sweep_armed = True

    def _sweep(self, generation: int) -> None:
        """The line's timer (green modes). Waiters with the group's default timeout do not
        each arm a timer of their own, which costs more than the rest of a hand-off: they
        joined in deadline order, so one timer, armed for the oldest one's deadline, times
        out every waiter whose deadline passed and re-arms for the next. While the line is
        busy it fires about once per ``timeout``; once nobody waits it is not re-armed."""
        if generation != self._generation:
            return  # armed in the parent before a fork: this process's line is not its own
        now = _monotonic()
        with self._lock:
            self._sweep_armed = False
            expired = []
            for waiter in self._line:  # oldest first
                deadline = waiter.deadline
                if deadline is None:
                    continue  # a timeout of its own: its own timer
                if deadline > now:
                    self._arm_sweep(deadline - now)  # re-armed before anything can fail
                    break
                expired.append(waiter)
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
        error = self.connector.fatal_error()
        if error is not None:
            return error
        if self.connector.failing:  # the latest connects all failed: say why
            return self.connector.no_endpoint_error()
        self.counters.timeouts += 1
        return PoolTimeout(self._busy_message(wait_for))

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
            config = self.config
            self._preferred = where_to_be(self.endpoints, config.role, config.max_lag,
                                          config.on_lag)
            until = now + 0.05
            max_lag = config.max_lag
            if max_lag is not None:  # a lag going stale is news too, watcher or not
                until = min([until, *(at for ep in self.endpoints
                                      if (at := ep.fresh_until(max_lag)) > now)])
            self._preferred_until = until
        return self._preferred

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
            self._lent.remove(pc)  # one atomic step: two releases cannot both pass
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
            return
        try:
            reason = reset_on_return(pc, self.config, self._backend, now)
        except BaseException:
            self.discard(pc, "interrupted")
            raise
        if reason == "max_lifetime" and pc.expires == DRAINED:
            reason = ""  # serving on in a rolling drain: reuse decides again
        if reason:
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

    def _retired(self, pc: PooledConnection) -> bool:
        """Close a drained connection (or one beyond a lowered ``connection_count``) as it
        comes back; with callers waiting, a new connection takes its room at once. A drain
        under load rolls: while callers wait and ``_MOVES_IN_FLIGHT`` replacements are under
        way, a drained connection serves on (False) instead of leaving its room empty for
        a connect's time, so a caller waits at most about one connect, not one per
        replacement."""
        if self._size > self.config.connection_count:
            # looked at without the lock: threads returning at once may all see the surplus,
            # so whether the room goes to a waiter is decided under it (reconnect=None)
            self.discard(pc, "resized", reconnect=None)
            return True
        if self._line and self._connecting >= _MOVES_IN_FLIGHT:
            return False
        self.discard(pc, "drained", reconnect=True if self._line else None)
        return True

    def _move_target(self, pc: PooledConnection) -> Endpoint | None:
        if self._connecting >= _MOVES_IN_FLIGHT:
            return None  # within the slow start: at most this many connects under way
        target = move_target(pc.endpoint, self.preferred_endpoints(), self.connector.counts,
                             _monotonic())
        if target is None and not self._connecting:
            self.imbalanced = False  # nothing more to move: returns stop looking
        return target

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
        self.connector.close(pc, reason)
        if slot is not None and slot.state != RETURNED:
            was, slot.state = slot.state, RETURNED
            self._slot_returned(slot.generation, was, reconnect)

    # --- slots (greenpool.slots) ------------------------------------------------------------

    def _take_slot(self) -> Slot:
        """Room for one more connection (the caller holds the lock and checked the room)."""
        self._size += 1
        self._connecting += 1
        slot = Slot(self, self._generation)
        self._connects.add(slot)
        return slot

    def _attach(self, slot: Slot, pc: PooledConnection) -> None:
        """A connect in ``slot`` opened ``pc`` for a caller who takes it at once."""
        with self._lock:
            slot.attach(pc)
            self._connecting -= 1

    def returned(self, slot: Slot, was: int, reconnect: bool | None) -> None:
        """A connect or probe ended without a connection (``Slot.give_back``): the room goes
        to a connect if waiters need one, else it is freed."""
        self._slot_returned(slot.generation, was, reconnect)

    def _slot_returned(self, generation: int, was: int, reconnect: bool | None) -> None:
        if generation != self._generation:
            return  # taken before a fork: this process never counted it
        with self._lock:
            self._size -= 1
            if was == CONNECTING:
                self._connecting -= 1
            if self._closed or not self._can_wait:
                return
            wanted = self._wants_connect(len(self._line)) if reconnect is None else reconnect
            wanted = wanted and self._size < self.config.connection_count  # (resize lowered it)
            slot = self._take_slot() if wanted else None
        if slot is not None:
            self.connector.start(slot)

    def orphaned(self, generation: int, was: int, endpoint: Endpoint | None) -> None:
        """A slot collected while held (its holder vanished mid-line): only recorded here,
        since this may run inside any code, even our own locked sections."""
        if generation == self._generation:
            self._orphans.append((was, endpoint))

    def _count_orphans(self) -> None:
        """Give back the room of orphaned slots (called with the lock held)."""
        orphans = self._orphans
        while orphans:
            was, endpoint = orphans.popleft()
            self._size -= 1
            if was == CONNECTING:
                self._connecting -= 1
            elif endpoint is not None:  # its connection was lost in transit, unclosed
                self.connector.forget(endpoint)
                self.counters.discards["orphaned"] += 1

    # --- what the connector calls (connector.Slots) ---------------------------------------

    def _deliver(self, slot: Slot, pc: PooledConnection) -> None:
        if slot.generation != self._generation:  # opened by a task inherited across fork
            silence_inherited(pc)
            _inherited_in_use.append(pc)
            slot.state = RETURNED
            return
        starts: list[Slot] = []
        targets: list[Endpoint | None] = []
        if slot.since < self._retire_before or slot.since < pc.endpoint.retire_before:
            pc.expires = DRAINED  # begun before a drain: it serves once, then is retired
        with self._lock:
            slot.attach(pc)
            self._connecting -= 1
            closed = self._closed
            surplus = self._size > self.config.connection_count  # resize() lowered it
            if not closed and not surplus:
                if self._line:
                    self._line.serve(pc)
                else:
                    self._idle.append(pc)
                if self._size < self.config.connection_count:
                    if self._wants_connect(len(self._line)):
                        targets.append(None)  # waiters remain: grow by one more
                    elif self._turns is not None:
                        targets.extend(self._unserved_endpoints())
                    starts = [self._take_slot() for _ in targets]
        if closed or surplus:
            self.discard(pc, "pool_closed" if closed else "resized",
                         reconnect=False if closed else None)
            return
        for new, target in zip(starts, targets, strict=True):
            self.connector.start(new, target)

    def _unserved_endpoints(self) -> list[Endpoint]:
        """A group with room and several endpoints opens one connection on each preferred
        endpoint that has none, so that even a light load is spread by weight."""
        room = self.config.connection_count - self._size
        if room <= 0 or self._connecting:
            return []
        return unserved(self.preferred_endpoints(), self.connector.counts)[:room]

    def still_needed(self, slot: Slot) -> bool:
        """After a failed round of connects: keep trying (True), or the slot is given back
        (nobody waits and the group is at ``min_size``)."""
        if slot.generation != self._generation:
            slot.state = RETURNED
            return False
        with self._lock:
            if not self._closed and (self._line or self._size <= self.config.min_size):
                return True
            slot.state = RETURNED
            self._connecting -= 1
            self._size -= 1
            return False

    def fail_waiters(self, make_error: Callable[[], BaseException], generation: int) -> None:
        if generation != self._generation:
            return
        with self._lock:
            self._line.fail_all(make_error)

    def endpoint_failed(self, endpoint: Endpoint) -> None:
        self.on_endpoint_failure(endpoint)

    # --- what housekeeping calls (underscored: the package's, not the public surface) -----

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

    def _grow(self, count: int, target: Endpoint | None = None, *, if_idle: bool = True) -> int:
        """Start up to ``count`` connects within the group's room (refill, probes, moves);
        the number started. With ``if_idle``, only while nobody waits."""
        with self._lock:
            self._count_orphans()
            if self._closed or (if_idle and self._line):
                return 0
            count = max(0, min(count, self.config.connection_count - self._size))
            slots = [self._take_slot() for _ in range(count)]
        for slot in slots:
            self.connector.start(slot, target)
        return count

    def _reserve_slot(self) -> Slot | None:
        """One slot of the group's room for a connect housekeeping makes itself (a role
        probe); None when the group is full. Hold it in ``with``: attach it with
        :meth:`_deliver`, or give it back."""
        with self._lock:
            if self._closed or self._size >= self.config.connection_count:
                return None
            return self._take_slot()

    @property
    def generation(self) -> int:
        return self._generation

    def evict_idle(self, endpoint: Endpoint) -> None:
        """Close every idle connection to ``endpoint`` at once: one of its connections proved
        dead, so the rest are suspect, and checking them one borrow at a time would hand
        the failure to one caller after another."""
        for pc in self._take_idle(lambda idle: [c for c in idle if c.endpoint is endpoint]):
            self.discard(pc, "evicted")

    def lent(self) -> list[PooledConnection]:
        return list(self._lent)

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
        return endpoint in self.connector.counts

    # --- live changes (Pool.drain, resize, reconfigure) ---------------------------------

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
        self.refill()
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

    def refill(self) -> None:
        """Open what the group lacks now: a connect per waiter beyond those under way, and
        up to ``min_size`` (housekeeping would at its next round)."""
        with self._lock:
            if self._closed:
                return
            room = self.config.connection_count - self._size
            wanted = max(len(self._line) - self._connecting, self.config.min_size - self._size)
            count = max(0, min(room, wanted))
            slots = [self._take_slot() for _ in range(count)] if self._can_wait else []
        for slot in slots:
            self.connector.start(slot)

    def apply(self, config: GroupConfig, endpoints: Sequence[Endpoint]) -> bool:
        """Take a new configuration of this group (same name and role) and endpoint list
        (``Pool.reconfigure``): what only the pool reads applies at once; a setting that
        travels with each connection (autocommit, readonly, statement_timeout, row_factory,
        configure) or a changed endpoint retires the connections it concerns, as drain does.
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
        travels = any(getattr(old, key) != getattr(config, key) for key in TRAVELS)
        surplus = self._take_idle(lambda idle: idle[:max(0, self._size - config.connection_count)])
        for pc in surplus:
            self.discard(pc, "resized", reconnect=None)
        if travels:
            self.drain()
        else:
            for endpoint in left:  # still in the pool's configuration, no longer this group's
                self.drain(endpoint)
            self.refill()
        return travels

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

    def _closed_error(self) -> BaseException:
        return PoolClosed(f"group {self.name!r}: the pool was closed while waiting")

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
        self._orphans = deque()
        self._connects = weakref.WeakSet()
        self._generation += 1
        for pc in inherited:
            silence_inherited(pc)
        _inherited_in_use.extend(pc for pc in inherited if pc not in idle)
        for pc in idle:  # idle ones are not mid-query: closing only writes to /dev/null
            close_quietly(pc)
        old_line.fail_all(self._forked_error)

    def _forked_error(self) -> BaseException:
        return PoolError(f"group {self.name!r}: the process forked while this task waited; "
                         f"the wait belonged to the parent")

    # --- reporting ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        if self._orphans:
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

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<Group {self.name!r} size={s['size']}/{s['max_size']} idle={s['idle']} "
            f"in_use={s['in_use']} waiting={s['waiting']}>"
        )
