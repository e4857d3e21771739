"""One endpoint group: a bounded set of connections, a fair waiting line, exact accounting.

Invariants (all changed only under ``self._lock``, in sections that never block):

* ``_size`` counts *slots*: idle connections + lent connections + connects in progress. A
  slot is reserved before a connect starts, so the group never exceeds
  ``connection_count`` however greenlets interleave.
* Whoever holds a slot gives it back exactly once: by lending a connection (which comes back
  through :meth:`release`), by handing it to the oldest waiter, or by decrementing
  ``_size``. Every path that can be interrupted (``gevent.Timeout``, ``GreenletExit``, any
  ``BaseException``) gives its slot back before re-raising.
* Someone waits only if nothing is idle; a returned connection or a freed slot goes to the
  oldest waiter directly (first come, first served).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from .concurrency import Backend, Waiter
from .config import GroupConfig
from .connection import (
    ConnectError,
    PooledConnection,
    check_on_borrow,
    close_quietly,
    connect_kwargs,
    open_connection,
    reset_on_return,
    silence_inherited,
)
from .endpoint import UNKNOWN, UP, Endpoint
from .errors import ConnectFailed, NoHealthyEndpoint, PoolClosed, PoolTimeout, TooManyWaiters
from .roles import candidates, fits, query_role, role_of
from .stats import GroupCounters
from .waiting import SLOT, WaitLine

if TYPE_CHECKING:
    from .handler import Handler

logger = logging.getLogger("greenpool")

_monotonic = time.monotonic
_RECHECK_PAUSE = 0.02  # seconds between looks while another caller probes an endpoint
_ROLE_RECHECK = 1.0  # a standby's role is re-checked by connecting at most this often
_LIFETIME_JITTER = 0.1  # up to 10 % shorter, so connections opened together do not expire together

# Connections that were lent out when this process was forked from its parent; kept
# referenced so that they are never deallocated (see Group.after_fork_in_child).
_inherited_in_use: list[PooledConnection] = []


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


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
        self._endpoints = list(endpoints)
        self._kwargs = {
            ep: connect_kwargs(ep.config, config, application_name) for ep in self._endpoints
        }
        self._open_per_endpoint = dict.fromkeys(self._endpoints, 0)
        self._rotation = random.randrange(len(self._endpoints))
        self._idle: deque[PooledConnection] = deque()  # right end = most recently returned
        # smooth weighted round robin over endpoints on borrow (None: a single endpoint)
        self._turns = dict.fromkeys(self._endpoints, 0.0) if len(self._endpoints) > 1 else None
        self._lent: set[PooledConnection] = set()
        self._line = WaitLine()
        self._new_waiter = backend.waiter
        self._can_wait = backend.can_wait
        self._max_waiting = config.max_waiting or math.inf
        # whether waiters with the default timeout share one timer (see _sweep)
        self._line_keeps_time = backend.can_call_later and math.isfinite(config.timeout)
        self._sweep_armed = False
        self._cancel_sweep: Callable[[], None] | None = None
        self._size = 0
        self._closed = False
        self._generation = 0
        self._roles_matter = config.role != "any"
        self._preferred: frozenset[Endpoint] = frozenset(self._endpoints)
        self._preferred_until = 0.0
        self._leak_threshold = config.leak_threshold
        #: task identity -> the outermost handler block that task holds in this group (a
        #: nested block of the same task reuses its connection: see handler.py)
        self.holders: dict[Hashable, Handler] = {}
        #: Called with an endpoint whose connections proved dead: the pool evicts that
        #: endpoint's idle connections in every group at once.
        self.on_endpoint_failure: Callable[[Endpoint], None] = self.evict_idle

    # --- borrowing ------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> PooledConnection:
        """A healthy connection within ``timeout`` seconds (the group's default if None).

        Raises :class:`PoolTimeout` (or :class:`NoHealthyEndpoint` when connecting kept
        failing), :class:`TooManyWaiters`, :class:`ConnectFailed` or :class:`PoolClosed`.
        """
        now = _monotonic()
        wait_for = self.config.timeout if timeout is None else timeout
        counters = self.counters
        counters.acquires += 1
        with self._lock:
            if self._closed:
                raise PoolClosed(f"group {self.name!r}: the pool is closed")
            line = self._line
            if line:
                item: Any = None  # others were first: queue behind them
            elif self._idle:
                item = self._idle.pop() if self._turns is None else self._take_idle_in_turn()
            elif self._size < self.config.connection_count:
                self._size += 1
                item = SLOT
            else:
                item = None
            if item is None:
                if len(line) >= self._max_waiting or wait_for <= 0 or not self._can_wait:
                    self._refuse_to_wait(wait_for)
                waiter = self._new_waiter()
                line.append(waiter)
                if timeout is None and self._line_keeps_time:
                    waiter.deadline = now + wait_for
                    if not self._sweep_armed:
                        self._arm_sweep(wait_for)
                    own_timeout: float | None = None  # the line's timer times it out
                else:  # the microseconds spent joining the line are not worth a clock read
                    own_timeout = wait_for
        if item is not None:
            return self._prepare(item, now, now + wait_for)
        counters.waits += 1
        try:
            waiter.wait(own_timeout)
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            counters.wait_time += _monotonic() - now
        item = waiter.item
        if item is None:
            item = self._not_served(waiter, wait_for)
        if item is SLOT:
            return self._prepare(item, now, now + wait_for)
        return self._lend(item)  # handed over straight from release(): already clean

    def _take_idle_in_turn(self) -> PooledConnection:
        """The idle connection to lend in a group with several endpoints: the most recently
        returned one of the endpoint whose turn it is (smooth weighted round robin among
        the endpoints that have one idle). Plain last-in-first-out would send a light load
        to whichever endpoint's connections happen to be on top, whatever the weights."""
        idle, turns = self._idle, self._turns
        assert turns is not None
        latest: dict[Endpoint, int] = {}
        for i, pc in enumerate(idle):
            latest[pc.endpoint] = i  # the last one seen is the most recently returned
        if len(latest) == 1:
            return idle.pop()
        total, chosen = 0.0, None
        for endpoint in latest:
            weight = endpoint.config.weight
            total += weight
            turns[endpoint] += weight
            if chosen is None or turns[endpoint] > turns[chosen]:
                chosen = endpoint
        assert chosen is not None
        turns[chosen] -= total
        pc = idle[latest[chosen]]
        del idle[latest[chosen]]
        return pc

    def _lend(self, pc: PooledConnection) -> PooledConnection:
        self._lent.add(pc)
        if self._leak_threshold is not None:
            pc.lent_at = _monotonic()
            pc.lent_from = _caller_outside_greenpool()
        return pc

    def _warn_about_leaks(self, now: float) -> None:
        """One warning per lent connection held past ``leak_threshold``, naming the code
        that took it (a connection never returned starves the group)."""
        threshold = self.config.leak_threshold
        if threshold is None:
            return
        for pc in list(self._lent):
            if pc.lent_from is not None and now - pc.lent_at > threshold:
                logger.warning(
                    "group %r: a connection to %s has been held for %.1f s (leak_threshold "
                    "%.1f s); it was taken at %s",
                    self.name, pc.endpoint.label, now - pc.lent_at, threshold, pc.lent_from,
                )
                pc.lent_from = None  # once per loan

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
                self.counters.timeouts += 1
                waiter.error = PoolTimeout(self._busy_message(self.config.timeout))
                waiter.set()

    def _refuse_to_wait(self, wait_for: float) -> None:
        if len(self._line) >= self._max_waiting:
            raise TooManyWaiters(
                f"group {self.name!r}: {len(self._line)} callers already wait for a connection "
                f"(max_waiting={self.config.max_waiting}); shed load or raise connection_count"
            )
        self.counters.timeouts += 1
        raise PoolTimeout(self._busy_message(wait_for))

    def _not_served(self, waiter: Waiter, wait_for: float) -> Any:
        """The wait ended without a connection in hand: the pool closed, or the timeout
        (unless a hand-off raced with it: then that is taken)."""
        with self._lock:
            if not self._line.served(waiter):
                self._line.leave(waiter)
        if waiter.error is not None:
            raise waiter.error
        if waiter.item is None:
            self.counters.timeouts += 1
            raise PoolTimeout(self._busy_message(wait_for))
        return waiter.item

    def _abandon(self, waiter: Waiter) -> None:
        """A waiter was interrupted: leave the line, or pass on what it was just handed."""
        with self._lock:
            if not self._line.served(waiter):
                self._line.leave(waiter)
                return
        if waiter.item is SLOT:
            self._free_slot()
        elif waiter.item is not None:
            self._give_back(waiter.item)

    def _prepare(self, item: Any, now: float, deadline: float) -> PooledConnection:
        """Turn a reserved slot (an idle connection to check, or SLOT) into a lent connection."""
        try:
            if item is not SLOT:
                reason = check_on_borrow(item, self.config, self._backend, now)
                if not reason and self._roles_matter and not self._role_fits(item):
                    reason = "wrong_role"
                if not reason:
                    return self._lend(item)
                self._discard(item, reason)
                if reason in ("closed", "failed_check"):
                    self.on_endpoint_failure(item.endpoint)
                item = SLOT
            return self._lend(self._open(deadline))
        except BaseException:
            if item is not SLOT:  # interrupted while checking it: its state is unknown
                self._discard(item, "interrupted")
            self._free_slot()
            raise

    # --- connecting -----------------------------------------------------------------------

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
        return pc.endpoint in self._preferred_endpoints()

    def _preferred_endpoints(self) -> frozenset[Endpoint]:
        """:meth:`_where_to_be`, recomputed at most every 50 ms: the borrow path asks it
        for every loan of a group with a role."""
        now = _monotonic()
        if now >= self._preferred_until:
            self._preferred = self._where_to_be()
            self._preferred_until = now + 0.05
        return self._preferred

    def _where_to_be(self) -> frozenset[Endpoint]:
        """The endpoints this group should use now: the up endpoints of its first preference
        tier that has any (so not a standby that started to lag, not the primary once a
        preferred standby is back). Every endpoint when none is up: nothing to move to."""
        config = self.config
        for tier in candidates(self._endpoints, config.role, config.max_lag, config.on_lag):
            up = frozenset(ep for ep in tier if ep.state == UP)
            if up:
                return up
        return frozenset(self._endpoints)

    def _connect_order(self, now: float) -> list[Endpoint]:
        """Endpoints to try now: the first preference tier with any endpoint that can take a
        connect; within it fewest of our connections per weight first, ties rotating so no
        endpoint is favoured (each process starts at a random point)."""
        config = self.config
        for tier in candidates(self._endpoints, config.role, config.max_lag, config.on_lag):
            ready = [
                ep for ep in tier
                if ep.may_connect(now)
                and (config.role != "primary" or ep.role != "standby"
                     or now - ep.role_seen_at >= _ROLE_RECHECK)
            ]
            if not ready:
                continue
            if len(ready) == 1:
                return ready
            start = self._rotation % len(ready)
            self._rotation += 1
            rotated = ready[start:] + ready[:start]
            counts = self._open_per_endpoint
            return sorted(rotated, key=lambda ep: counts[ep] / ep.config.weight)
        return []

    def _open(self, deadline: float) -> PooledConnection:
        """Connect to the best endpoint that takes it, moving on when one fails, waiting out
        quarantines, until the deadline."""
        moved_on = False
        fatal: set[Endpoint] = set()
        while True:
            now = _monotonic()
            for endpoint in self._connect_order(now):
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    break
                if not endpoint.begin_connect(_monotonic()):
                    continue  # another caller probes it, or its slow start is at its limit
                pc = self._try_connect(endpoint, min(endpoint.config.connect_timeout, remaining),
                                       fatal)
                if pc is not None:
                    if moved_on:
                        self.counters.failovers += 1
                    return pc
                moved_on = True
            if fatal and fatal.issuperset(self._endpoints):
                raise ConnectFailed(
                    f"group {self.name!r}: {self._endpoint_list()}; retrying cannot help: fix "
                    f"the configuration (credentials, database name)"
                )
            remaining = deadline - _monotonic()
            if remaining <= 0:
                self.counters.timeouts += 1
                raise NoHealthyEndpoint(
                    f"group {self.name!r}: no endpoint took a connection within the acquire "
                    f"timeout. Endpoints: {self._endpoint_list()}. Check that the servers "
                    f"are up and reachable."
                )
            self._backend.sleep(min(remaining, self._next_chance()))

    def _next_chance(self) -> float:
        """How long until an endpoint of this group may take a connect attempt again."""
        now = _monotonic()
        waits = [
            ep.quarantined_until - now if ep.state == "quarantined" else _RECHECK_PAUSE
            for ep in self._endpoints
        ]
        return max(0.001, min(waits))

    def _try_connect(
        self, endpoint: Endpoint, seconds: float, fatal: set[Endpoint]
    ) -> PooledConnection | None:
        """One connect attempt the caller has claimed (``endpoint.begin_connect``)."""
        try:
            raw = open_connection(
                endpoint.config, self.config, self._kwargs[endpoint], self._backend, seconds
            )
        except ConnectError as exc:
            endpoint.connect_failed(exc.reason)
            self.counters.connect_errors += 1
            logger.info("group %r: cannot connect to %s", self.name, exc)
            if exc.fatal:
                fatal.add(endpoint)
            self.on_endpoint_failure(endpoint)
            return None
        except BaseException:
            endpoint.connect_abandoned()
            raise
        role = role_of(raw)
        if role == UNKNOWN and self.config.role != "any":  # PostgreSQL < 14: ask
            try:
                role, _ = query_role(raw)
            except BaseException:
                raw.close()
                endpoint.connect_abandoned()
                raise
        endpoint.connect_succeeded(role)
        if not fits(self.config.role, role) or (
            self._roles_matter and endpoint not in self._where_to_be()
        ):
            raw.close()  # e.g. a cold start met the primary first in a prefer-standby group
            endpoint.connection_closed()
            self.counters.discards["wrong_role"] += 1
            return None
        self.counters.connects += 1
        with self._lock:
            self._open_per_endpoint[endpoint] += 1
        lifetime = self.config.max_lifetime * (1 - _LIFETIME_JITTER * random.random())
        pc = PooledConnection(raw, endpoint, _monotonic() + lifetime, self._generation,
                              self._backend)
        pc.role = role
        return pc

    # --- returning ------------------------------------------------------------------------

    def release(self, pc: PooledConnection, discard: str = "") -> None:
        """Take a lent connection back: reset it and reuse it, or discard it and free its slot.

        ``discard`` forces a discard with that reason. Never loses the slot, even when the
        reset is interrupted; the interruption is re-raised after the accounting is done.
        """
        self._lent.discard(pc)
        if pc.generation != self._generation:  # the parent's, lent at fork time: see below
            return
        if discard:
            self._drop(pc, discard)
        else:
            self._settle(pc, reset_on_return, pc, self.config, self._backend)

    def _settle(self, pc: PooledConnection, judge: Callable[..., str], *args: Any) -> None:
        """Keep or discard a connection we hold a slot for, as ``judge(*args)`` decides (''
        keeps). An interruption while judging leaves it in an unknown state: discarded, slot
        freed, then re-raised."""
        try:
            reason = judge(*args)
        except BaseException:
            self._drop(pc, "interrupted")
            raise
        if reason:
            self._drop(pc, reason)
        else:
            self._give_back(pc)

    def _drop(self, pc: PooledConnection, reason: str) -> None:
        """Discard a connection and free its slot (to the oldest waiter, if any)."""
        self._discard(pc, reason)
        self._free_slot()

    def _give_back(self, pc: PooledConnection) -> None:
        """A clean connection: to the oldest waiter, else to the idle stack."""
        with self._lock:
            if not self._closed:
                if self._line:
                    self._line.serve(pc)
                else:
                    self._idle.append(pc)
                return
            self._size -= 1
        self._discard(pc, "pool_closed")

    def _free_slot(self) -> None:
        """A slot whose connection is gone: to the oldest waiter (who will connect), or free."""
        with self._lock:
            if self._line and not self._closed:
                self._line.serve(SLOT)
            else:
                self._size -= 1

    def _discard(self, pc: PooledConnection, reason: str) -> None:
        """Close ``pc`` and count why. The caller deals with its slot."""
        self.counters.discards[reason] += 1
        with self._lock:
            self._open_per_endpoint[pc.endpoint] -= 1
        pc.endpoint.connection_closed()
        close_quietly(pc)
        logger.debug("group %r: discarded a connection to %s (%s)", self.name, pc.endpoint, reason)

    def evict_idle(self, endpoint: Endpoint) -> None:
        """Close every idle connection to ``endpoint`` at once: one of its connections proved
        dead, so the rest are suspect, and checking them one borrow at a time would hand
        the failure to one caller after another."""
        with self._lock:
            gone = [pc for pc in self._idle if pc.endpoint is endpoint]
            for pc in gone:
                self._idle.remove(pc)
        for pc in gone:
            self._drop(pc, "evicted")

    # --- housekeeping ---------------------------------------------------------------------

    def maintain(self) -> None:
        """Retire idle connections past ``max_idle``/``max_lifetime``, drop dead ones, refill
        to ``min_size``, warn about leaks. Runs in the pool's background task, never on the
        request path."""
        now = _monotonic()
        self._warn_about_leaks(now)
        config = self.config
        with self._lock:
            if self._closed:
                return
            retire, suspect = [], []
            spare = self._size - config.min_size
            for pc in list(self._idle):  # oldest-returned first
                if pc.raw.closed or now >= pc.expires or (
                    spare > 0 and now - pc.last_used >= config.max_idle
                ):
                    retire.append(pc)
                    spare -= 1
                elif pc.readable():
                    suspect.append(pc)
            for pc in retire + suspect:
                self._idle.remove(pc)
            refill = 0
            if not self._line:
                refill = max(0, config.min_size - self._size + len(retire))
            self._size += refill
        for pc in retire:
            self._drop(pc, "closed" if pc.raw.closed else "expired")
        for pc in suspect:  # readable while idle: a NOTIFY, or the server went away
            self._settle(pc, check_on_borrow, pc, config, self._backend, now)
        for _ in range(refill):
            self._refill_one()
        if len(self._endpoints) > 1:
            self._rebalance()

    def _rebalance(self) -> None:
        """Move idle connections to where they belong: off endpoints whose role no longer
        fits, off fallback endpoints once a preferred one is up again, and off endpoints
        above their weighted share while another is below it (a restarted server gets its
        share back). Each moved connection is closed and reopened through the normal
        choice, which picks the endpoint with the fewest connections."""
        with self._lock:
            if self._closed or self._line:
                return
            moving = self._misplaced_idle()
            for pc in moving:
                self._idle.remove(pc)
        for pc in moving:
            self._drop(pc, "rebalance")
        for _ in moving:
            with self._lock:
                if self._closed or self._line or self._size >= self.config.connection_count:
                    return
                self._size += 1
            self._refill_one()

    def _misplaced_idle(self) -> list[PooledConnection]:
        config = self.config
        preferred = [ep for ep in self._where_to_be() if ep.state == UP]
        if not preferred:
            return []
        moving = [pc for pc in self._idle
                  if pc.endpoint not in preferred or not fits(config.role, pc.endpoint.role)]
        counts = {ep: self._open_per_endpoint[ep] for ep in preferred}
        total, weights = sum(counts.values()), sum(ep.config.weight for ep in preferred)
        share = {ep: total * ep.config.weight / weights for ep in preferred}
        if any(counts[ep] < int(share[ep]) for ep in preferred):
            for ep in preferred:
                excess = counts[ep] - math.ceil(share[ep])
                for pc in self._idle:
                    if excess <= 0:
                        break
                    if pc.endpoint is ep and pc not in moving:
                        moving.append(pc)
                        excess -= 1
        return moving

    def uses(self, endpoint: Endpoint) -> bool:
        return endpoint in self._open_per_endpoint

    @property
    def role(self) -> str:
        return self.config.role

    def probe_quarantined(self, endpoint: Endpoint) -> None:
        """Housekeeping's probe of a quarantined endpoint whose backoff expired: connect
        once; success brings it back up (the connection goes to the idle stack if a slot is
        free, else is closed)."""
        if not endpoint.begin_connect(_monotonic()):
            return
        pc = self._try_connect(endpoint, endpoint.config.connect_timeout, set())
        if pc is None:
            return
        with self._lock:
            keep = not self._closed and self._size < self.config.connection_count
            if keep:
                self._size += 1
        if keep:
            self._give_back(pc)
        else:
            self._discard(pc, "probe")

    def probe_role(self, endpoint: Endpoint) -> None:
        """Refresh ``endpoint``'s role and lag with one query: on one of our idle connections
        to it, else on a short-lived connection (an endpoint the group moved away from, e.g.
        a lagging standby, must still be watched to be used again)."""
        with self._lock:
            pc = next((c for c in self._idle if c.endpoint is endpoint), None)
            if pc is not None:
                self._idle.remove(pc)
        if pc is None:
            self._probe_with_own_connection(endpoint)
            return
        try:
            role, lag = query_role(pc.raw)
        except BaseException as exc:
            self._drop(pc, "failed_check")
            if not isinstance(exc, Exception):
                raise
            self.on_endpoint_failure(endpoint)
            return
        endpoint.observe_role(role)
        endpoint.lag = lag
        self._give_back(pc)

    def _probe_with_own_connection(self, endpoint: Endpoint) -> None:
        if not endpoint.begin_connect(_monotonic()):
            return
        try:
            raw = open_connection(endpoint.config, self.config, self._kwargs[endpoint],
                                  self._backend, endpoint.config.connect_timeout)
        except ConnectError as exc:
            endpoint.connect_failed(exc.reason)
            self.on_endpoint_failure(endpoint)
            return
        except BaseException:
            endpoint.connect_abandoned()
            raise
        try:
            role, lag = query_role(raw)
            endpoint.connect_succeeded(role)
            endpoint.lag = lag
            endpoint.connection_closed()
        except Exception:
            endpoint.connect_abandoned()
        finally:
            raw.close()

    def _refill_one(self) -> None:
        endpoint_timeout = max(ep.config.connect_timeout for ep in self._endpoints)
        try:
            pc = self._open(_monotonic() + endpoint_timeout)
        except BaseException:
            self._free_slot()
            raise
        self._give_back(pc)

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close idle connections now, lent ones when they come back; fail every waiter."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._cancel_sweep is not None:
                self._cancel_sweep()
            idle = list(self._idle)
            self._idle.clear()
            self._size -= len(idle)
            self._line.fail_all(self._closed_error)
        for pc in idle:
            self._discard(pc, "pool_closed")

    def _closed_error(self) -> BaseException:
        return PoolClosed(f"group {self.name!r}: the pool was closed while waiting")

    def after_fork_in_child(self) -> None:
        """Forget the parent's connections without disturbing the parent's sessions.

        Runs inside ``os.fork()`` in the child (also before every ``subprocess`` exec), so
        it only resets state and makes syscalls. Connections lent at fork time are never
        closed in the child: psycopg2 holds a connection's mutex across a green wait, so a
        connection that was mid-query in the parent has that mutex locked forever in the
        child, and closing it would hang. They are silenced and kept referenced instead.
        """
        idle, lent = list(self._idle), list(self._lent)
        self._lock = self._backend.lock()  # a lock held by a parent thread would never be freed
        self._idle.clear()
        self._lent.clear()
        self.holders.clear()
        self._line = WaitLine()
        self._sweep_armed = False  # a timer the parent armed returns at once here
        self._size = 0
        self._generation += 1
        self._open_per_endpoint = dict.fromkeys(self._endpoints, 0)
        for pc in idle + lent:
            silence_inherited(pc)
        _inherited_in_use.extend(lent)
        for pc in idle:  # idle ones are not mid-query: closing only writes to /dev/null
            close_quietly(pc)

    # --- reporting ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        idle, in_use = len(self._idle), len(self._lent)
        return {
            "size": self._size,
            "max_size": self.config.connection_count,
            "idle": idle,
            "in_use": in_use,
            "connecting": self._size - idle - in_use,
            "waiting": len(self._line),
            **self.counters.export(),
        }

    def _busy_message(self, wait_for: float) -> str:
        return (
            f"group {self.name!r}: no connection free within {wait_for:.2f} s "
            f"({len(self._lent)} of {self.config.connection_count} in use, "
            f"{len(self._line)} waiting); raise connection_count or timeout, "
            f"or look for code holding connections too long"
        )

    def _endpoint_list(self) -> str:
        return "; ".join(ep.describe() for ep in self._endpoints)

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<Group {self.name!r} size={s['size']}/{s['max_size']} idle={s['idle']} "
            f"in_use={s['in_use']} waiting={s['waiting']}>"
        )

