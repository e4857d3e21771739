"""Dedicated connections: a session of its own for ``LISTEN``, long sessions, advisory locks.

A pooled loan is reset on return, so session state (``LISTEN``, a session advisory lock, a
temp table) cannot outlive it, by design. ``with pool.exclusive('write') as conn:`` gives a
raw psycopg2 connection that belongs to the caller alone and is closed, never pooled, at
the end of the block. It is chosen like the group's connections (the group's connector
opens it: role, weights, quarantine, the connect deadline libpq ignores in green mode,
name resolution off the hub, the group's session settings) but it takes none of the
group's ``connection_count`` slots: each group has a separate bound, ``exclusive_limit``,
with a first-come-first-served line of its own for callers who find it reached.

Inside the pool's model:

* **Opened in the background**, like the group's own connections (connector.py): a caller
  waits for a dedicated connect task, and its timeout ends its wait, never an attempt. An
  attempt runs its whole ``connect_timeout``, so its failure judges the endpoint exactly as
  the group's connects do (a black hole is quarantined, "too many clients" is not), and a
  connection whose caller gave up goes to the next caller waiting for one (else it is
  closed). A task starts only for a caller whom no task under way covers (one that has
  spent over a quarter second in a round may be stuck on a black hole, and covers no one:
  a waiting caller looks again every quarter second, and a task that served one goes on
  for the next), never more than twice ``exclusive_limit`` at once.
  ``non-threaded`` mode has no background: it connects inline, as its groups do.
* **The groups come first**: a fresh dedicated connection asks its server (one query,
  bounded by ``connect_timeout``) how many connection slots are usable by ordinary roles
  (``max_connections`` less ``superuser_reserved_connections`` and ``reserved_connections``)
  and how many are in use, and is kept only if the slots left over still hold every
  connection this pool's groups may yet open on that server. Else it is closed, that
  server is tried last for a second, and when no endpoint that could serve the group has
  room the caller gets :class:`PoolTimeout` (as does every caller for that second, without
  a connect): dedicated connections use spare capacity only.
* **A session of its own, or a refusal**: through PgBouncer (any pooler that answers the
  login itself) the backend pid in the login's ``BackendKeyData`` is the pooler's invention,
  not the pid of the server session that runs the queries (a TCP proxy such as HAProxy
  passes the real one through). The same query compares them: an endpoint that turns out to
  be a pooler is refused with :class:`PoolError` unless it is declared ``pooler: 'session'``
  (a transaction-mode pooler would hand the "session" to other clients between
  transactions: a LISTEN would hear nothing, a lock would be held by a stranger). A
  self-addressed ``LISTEN`` + ``NOTIFY`` proves nothing there: an idle transaction pooler
  usually gives the next transaction the same server connection, which hears it.

Every path that can be interrupted gives its limit slot back before re-raising, and a
connection opened for a caller who was interrupted is closed.

Why one module of this length: the limit's slots, the line for them and the dedicated
connect tasks share one lock and one set of counts (a caller holds a slot while a task
connects for it); the waiting line itself is waiting.py's.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg2

from . import pooler
from .concurrency.backend import Backend
from .concurrency.fork import InheritedAcrossFork
from .connection import PooledConnection, close_quietly, round_trip
from .endpoint import UP
from .errors import ConnectFailed, NoHealthyEndpoint, PoolClosed, PoolError, PoolTimeout
from .roles import fits
from .stats import ExclusiveCounters
from .waiting import WaitLine

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .group import Group

logger = logging.getLogger("greenpool")

#: seconds an endpoint found without spare connection slots is not connected to again for a
#: dedicated connection (callers meanwhile are refused at once, without a connect)
NO_ROOM_PAUSE = 1.0
#: seconds in one round after which a dedicated connect task may be stuck (as group.py's)
STUCK_AFTER = 0.25

#: one round trip on a fresh dedicated connection: the session's real backend pid (to
#: compare with the login's), the slots ordinary roles may use, and the slots in use. Rows
#: of other roles' sessions hide their backend_type from an unprivileged role: a row with
#: a database and no visible type is counted as a client (the error is on the safe side).
#: Schema-qualified: a search_path that puts a schema before pg_catalog changes nothing.
_SESSION_CHECK = (
    "SELECT pg_catalog.pg_backend_pid(), "
    "pg_catalog.current_setting('max_connections')::int "
    "- pg_catalog.current_setting('superuser_reserved_connections')::int "
    "- coalesce(nullif(pg_catalog.current_setting('reserved_connections', true), '')::int, 0), "
    "(SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE datid IS NOT NULL "
    "AND coalesce(backend_type, 'client backend') = 'client backend')"
)
#: SQLSTATE classes of a session check that failed through no fault of the query (the
#: connection was lost, the session terminated or cancelled): try again on a new one
_CHECK_RETRIED = ("08", "57")


def missing_connections(group: Group) -> int:
    """How many more pooled connections ``group`` may open (its ``connection_count`` less
    those it has open): server room the group must find when its load grows."""
    return max(0, group.config.connection_count - sum(group.connector.counts.values()))


class _Retry(Exception):
    """A fresh connection failed its first query: no verdict on anything, try again."""


class ExclusiveSlots:
    """The ``exclusive_limit`` of one group: how many dedicated connections are open (or
    being opened), who waits for a slot, and who waits for a connection. All counts change
    under one lock, in sections that never block.

    ``room_needed(endpoint)``: how many connection slots on that endpoint's server the
    pool's groups may still need (the pool sums its groups)."""

    def __init__(
        self,
        group: Group,
        backend: Backend,
        room_needed: Callable[[Endpoint], int],
    ) -> None:
        self.group = group
        self.limit = group.config.exclusive_limit
        self.counters = ExclusiveCounters()
        self._backend = backend
        self._lock = backend.lock()
        self._line = WaitLine()
        self._taken = 0
        self._closed = False
        self._room_needed = room_needed
        #: callers (each holding a slot) waiting for a dedicated connect task's connection
        self._wanting = WaitLine()
        #: dedicated connect tasks under way; those beyond the callers wanting one are
        #: adrift (their callers gave up): the next caller takes over their connection
        self._connects = 0
        #: task id -> when its current round began: a task in one round longer than
        #: STUCK_AFTER may be waiting out a server that never answers, and no longer
        #: counts as covering a caller (another task is started, which tries the
        #: endpoints with attempts under way last)
        self._rounds: dict[int, float] = {}
        self._task_ids = itertools.count()
        #: endpoint -> (until when, why): found without spare slots for a dedicated one
        self._no_room: dict[Endpoint, tuple[float, str]] = {}
        self.no_room = 0  # callers refused because the groups need the server's slots
        #: listeners open now (each holds one slot while it lives)
        self.listeners = 0
        #: what must run before these slots are next used: a non-threaded listener hub whose
        #: listener was garbage-collected unclosed has no task of its own to give its slot
        #: back (appended by the finalizer without a lock: it may run inside a locked section)
        self.orphans: deque[Callable[[], object]] = deque()
        #: bumped in a forked child: a slot taken in the parent is never given back here
        self.generation = 0

    # --- the limit ------------------------------------------------------------------------

    def _room(self) -> bool:
        """Whether one more slot fits (lock held). Connect tasks need no room of their own:
        one starts only for a caller (holding a slot) whom no task covers, so there are
        never more than ``limit``; one whose caller gave up goes on for the next caller."""
        return self._taken < self.limit

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
            if self._room() and not self._line:
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
            self._line.abandon(waiter, self._lock, lambda _slot: self.give())
            raise
        if waiter.item is None:
            self._line.outcome(waiter, self._lock, lambda: self._timeout_error(wait_for))

    def reclaim(self) -> None:
        """Let what garbage-collected listeners held be given back (see ``orphans``)."""
        while self.orphans:
            try:
                collect = self.orphans.popleft()
            except IndexError:
                return
            collect()

    def count_listener(self, change: int) -> None:
        with self._lock:
            self.listeners += change

    def give(self) -> None:
        """Give a slot back: to the oldest waiter, else free it."""
        with self._lock:
            self._taken -= 1
            self._admit()

    def _admit(self) -> None:
        """Pass free room on to the slot line, oldest first (lock held)."""
        while self._line and not self._closed and self._room():
            self._taken += 1
            self._line.serve(True)

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

    def open(self, deadline: float, caller_waits: bool = True) -> PooledConnection:
        """A new connection of the group, outside its slots (the caller holds a limit slot),
        waited for until ``deadline``: a dedicated connect task opens it (each attempt
        bounded by its endpoint's ``connect_timeout`` alone), and a caller who stops waiting
        leaves it to the next one. Raises :class:`NoHealthyEndpoint` (nothing came in
        time), :class:`PoolTimeout` (the groups need the server's free slots),
        :class:`ConnectFailed`, :class:`PoolClosed`, or :class:`PoolError` (the endpoint is
        a pooler that gives no session of its own). Without ``caller_waits`` (a listener's
        reconnect round) running out of time is no caller's timeout, and is left out of the
        group's ``timeouts``."""
        group = self.group
        if group.closed:
            raise PoolClosed(f"group {group.name!r}: the pool is closed")
        self._refuse_if_no_room()
        if deadline <= time.monotonic():  # no time to wait: no connect for nobody
            raise self._no_connection_error(caller_waits)
        if not self._backend.can_wait:
            return self._open_inline(deadline, caller_waits)
        with self._lock:
            if self._closed:
                raise PoolClosed(f"group {group.name!r}: the pool is closed")
            waiter = self._backend.waiter()
            self._wanting.append(waiter)
        try:
            # a task stuck on a server that never answers covers no one: the caller looks
            # again every STUCK_AFTER, and starts a task (trying that server last) if need be
            while waiter.item is None and waiter.error is None:
                self._cover_callers()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or waiter.wait(min(remaining, STUCK_AFTER)):
                    break
        except BaseException:
            # a connection handed over meanwhile is closed: nobody will use it
            self._wanting.abandon(waiter, self._lock,
                                  lambda pc: self.close_connection(pc, "interrupted"))
            raise
        item = waiter.item
        if item is None:
            item = self._wanting.outcome(waiter, self._lock,
                                         lambda: self._no_connection_error(caller_waits))
        return self._handed(item)

    def _handed(self, pc: PooledConnection) -> PooledConnection:
        self.counters.opened += 1
        return pc

    def _no_connection_error(self, caller_waits: bool) -> NoHealthyEndpoint:
        connector = self.group.connector
        if not caller_waits:
            return NoHealthyEndpoint(f"group {self.group.name!r}: no dedicated connection "
                                     f"yet. Endpoints: {connector.describe()}")
        if connector.failing:
            return connector.no_endpoint_error()
        self.group.counters.timeouts += 1
        return NoHealthyEndpoint(
            f"group {self.group.name!r}: no dedicated connection within the timeout: a "
            f"connect is under way (an attempt may take up to connect_timeout, and goes on "
            f"for the next caller). Endpoints: {connector.describe()}")

    def _cover_callers(self) -> None:
        """Start a connect task if the callers waiting outnumber the tasks covering them (a
        rescue for callers whose tasks seem stuck only while some endpoint has no attempt
        under way: else it would join the stuck ones)."""
        with self._lock:
            if self._closed:
                return
            covering = self._covering()
            if covering >= len(self._wanting) or self._connects >= 2 * self.limit:
                return
            rescue = covering < self._connects  # the others may be stuck
            now = time.monotonic()
            if rescue and not any(not ep.connecting and ep.may_connect(now)
                                  for ep in self.group.endpoints):
                return  # each endpoint free to take an attempt has one under way: wait
            task_id = next(self._task_ids)
            self._rounds[task_id] = now
            self._connects += 1
            generation = self.generation
        self._start_connect(task_id, rescue, generation)

    def _start_connect(self, task_id: int, rescue: bool, generation: int) -> None:
        """Start a dedicated connect task (the caller counted it in ``_connects``)."""
        if self.group.connector.run_in_background(
                lambda: self._connect_task(generation, task_id, rescue)):
            return
        with self._lock:  # no task could start (a process limit on threads)
            self._connects -= 1
            self._rounds.pop(task_id, None)
            self._wanting.fail_all(lambda: PoolError(
                f"group {self.group.name!r}: a dedicated connect could not be started "
                f"({self.group.connector.cannot_start})"))
            self._admit()

    def _connect_task(self, generation: int, task_id: int, rescue: bool) -> None:
        """Rounds of connect attempts until one connection (or one verdict) is delivered,
        the pool closes, or no caller needs this task any more. A ``rescue`` task (started
        while the others seemed stuck) tries endpoints with attempts under way last."""
        connector = self.group.connector
        try:
            while not connector.stopped and generation == self.generation:
                self._rounds[task_id] = time.monotonic()
                last = self._short_now()
                if rescue:
                    last += [ep for ep in self.group.endpoints if ep.connecting]
                pc = connector.open_round(self.group.generation, last)
                if pc is not None and generation != self.generation:
                    connector.uncount(pc)  # a task of the parent's, going on in a forked
                    self.close_connection(pc)  # child: that wait is over
                    return
                delivered = False
                if pc is not None:
                    try:
                        error = self._vet(pc)
                    except _Retry:
                        pass
                    else:
                        self._deliver(pc if error is None else error)
                        delivered = True
                if not delivered:
                    fatal = connector.fatal_error()
                    if fatal is not None:
                        with self._lock:
                            if generation == self.generation:
                                self._wanting.fail_all(partial(ConnectFailed, str(fatal)))
                        return
                with self._lock:  # keep going only while a caller is not covered without us
                    # (a task stuck on a black hole covers no one: after serving the oldest
                    # caller, a rescue task goes on for the next)
                    if (generation != self.generation
                            or len(self._wanting) <= self._covering(besides=task_id)):
                        self._rounds.pop(task_id, None)  # now: the others count without it
                        return
                    if delivered:
                        continue
                    # pausing until an endpoint may take an attempt, it still covers its
                    # caller: another task would find no endpoint either
                    self._rounds[task_id] = math.inf
                connector.wait_for_next_chance()
        except InheritedAcrossFork:
            return
        finally:
            with self._lock:
                if generation == self.generation:
                    self._connects -= 1
                    self._rounds.pop(task_id, None)
                    self._admit()

    def _covering(self, besides: int | None = None) -> int:
        """How many connect tasks (other than ``besides``) cover a caller: those in a round
        begun under ``STUCK_AFTER`` ago, or pausing for an endpoint's next chance (lock
        held)."""
        now = time.monotonic()
        return sum(1 for task_id, since in self._rounds.items()
                   if task_id != besides and now - since < STUCK_AFTER)

    def _deliver(self, result: PooledConnection | BaseException) -> None:
        """Hand a new connection (or the verdict that replaces one) to the oldest caller
        waiting; a connection nobody waits for any more is closed."""
        with self._lock:
            waiting = bool(self._wanting) and not self._closed
            if waiting:
                waiter = self._wanting.popleft()
                if isinstance(result, BaseException):
                    waiter.error = result
                else:
                    waiter.item = result
                waiter.set()
        if not waiting and not isinstance(result, BaseException):
            self.close_connection(result, "unclaimed")

    def _open_inline(self, deadline: float, caller_waits: bool) -> PooledConnection:
        """``non-threaded``: connect now, each attempt also bounded by ``deadline`` (no
        background can finish it for another caller)."""
        group = self.group
        while True:
            try:
                pc = group.connector.open_now(deadline, group.generation)
            except NoHealthyEndpoint:
                if not caller_waits:
                    group.counters.timeouts -= 1  # the connector counted it as an acquire's
                raise
            try:
                error = self._vet(pc, deadline)
            except _Retry:
                continue
            if error is not None:
                raise error
            return self._handed(pc)

    def _vet(self, pc: PooledConnection, deadline: float = math.inf) -> BaseException | None:
        """None if the fresh ``pc`` may be a dedicated connection; else it is closed and
        the error for the caller is returned. Its query is bounded by ``connect_timeout``
        and ``deadline`` (an inline caller's). Raises :class:`_Retry` (``pc`` closed) when
        its first query was cut (connection lost, session ended), or when its server has
        no spare slot while another endpoint of the group may have."""
        group = self.group
        endpoint = pc.endpoint
        group.connector.uncount(pc)
        mode = pooler.mode_of(endpoint.config)
        if mode == pooler.TRANSACTION:
            self.close_connection(pc, "transaction_pooler")
            return PoolError(
                f"group {group.name!r}: {endpoint.label} is a transaction-mode pooler, "
                f"where a dedicated connection is no session of its own (a LISTEN would "
                f"hear nothing, a session lock would be held by another client); point the "
                f"group at the server or at a session-mode pooler (endpoint key "
                f"pooler: 'session')")
        raw = pc.raw
        try:
            autocommit = raw.autocommit
            raw.autocommit = True
            rows = round_trip(raw, _SESSION_CHECK, self._backend,
                              min(endpoint.config.connect_timeout,
                                  deadline - time.monotonic()))
            raw.autocommit = autocommit
        except psycopg2.Error as exc:
            self.close_connection(pc, "failed_check")
            if exc.pgcode is None or exc.pgcode.startswith(_CHECK_RETRIED):
                logger.info("group %r: a new dedicated connection to %s failed its first "
                            "query: %s", group.name, endpoint.label, exc)
                raise _Retry from None
            # the server refused the query itself: every new connection would, in a storm
            return PoolError(
                f"group {group.name!r}: {endpoint.label} refused the query a dedicated "
                f"connection begins with (it counts the server's connection slots in "
                f"pg_stat_activity): {str(exc).strip()}. The role needs to read "
                f"pg_catalog.pg_stat_activity and current_setting('max_connections')")
        except BaseException:
            self.close_connection(pc, "interrupted")
            raise
        assert rows is not None
        session_pid, usable, in_use = rows[0]
        login_pid = raw.info.backend_pid
        if mode != pooler.SESSION and session_pid != login_pid:
            self.close_connection(pc, "undeclared_pooler")
            return PoolError(
                f"group {group.name!r}: {endpoint.label} is a connection pooler (the login "
                f"reported backend pid {login_pid}, the session runs in {session_pid}), so "
                f"a dedicated connection there may be no session of its own: in "
                f"transaction mode a LISTEN would hear nothing and a session lock would be "
                f"held by another client. Point the group at the server; if the pooler's "
                f"pool_mode is session, say so with the endpoint key pooler: 'session'")
        needed = self._room_needed(endpoint)
        spare = int(usable) - int(in_use)
        if spare < needed:
            self.close_connection(pc, "no_room")
            why = (f"{endpoint.label} has {max(spare, 0)} connection slots left of "
                   f"{usable} usable by ordinary roles (max_connections less the reserved "
                   f"ones), and the pool's groups may still open {needed} there")
            with self._lock:
                self._no_room[endpoint] = (time.monotonic() + NO_ROOM_PAUSE, why)
            if self._short_everywhere() is None:
                raise _Retry  # another endpoint of the group may have room: try it first
            return self._no_room_error(why)
        return None

    def _refuse_if_no_room(self) -> None:
        """Refuse at once while every endpoint of the group was just found without spare
        slots (no connect is made for a caller who would be refused anyway)."""
        why = self._short_everywhere()
        if why is not None:
            raise self._no_room_error(why)

    def _short_everywhere(self) -> str | None:
        """Why every endpoint that could serve the group now (up, of a fitting or unknown
        role) was just found without spare slots; None if one was not."""
        if not self._no_room:
            return None
        now = time.monotonic()
        reasons = []
        for endpoint in self.group.endpoints:
            until, why = self._no_room.get(endpoint, (0.0, ""))
            if until > now:
                reasons.append(why)
            elif endpoint.state == UP and fits(self.group.config.role, endpoint.role):
                return None
        return "; ".join(reasons) or None

    def _short_now(self) -> list[Endpoint]:
        """The group's endpoints just found without spare slots (tried last)."""
        now = time.monotonic()
        return [ep for ep, (until, _) in list(self._no_room.items()) if until > now]

    def _no_room_error(self, why: str) -> PoolTimeout:
        self.no_room += 1
        return PoolTimeout(
            f"group {self.group.name!r}: no dedicated connection: {why}, and dedicated "
            f"connections may use only connection slots the groups do not need. Close "
            f"listeners or end exclusive blocks (many subscribers can share one listener), "
            f"or give the server more max_connections")

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
            "exclusive_connecting": self._connects,
            "exclusive_no_room": self.no_room,
            "listeners": self.listeners,
            **self.counters.export(),
        }

    def close(self) -> None:
        """Refuse new slots; every waiter gets :class:`PoolClosed`."""
        self.reclaim()
        with self._lock:
            self._closed = True
            self._line.fail_all(self._closed_error)
            self._wanting.fail_all(self._closed_error)

    def _closed_error(self) -> BaseException:
        return PoolClosed(f"group {self.group.name!r}: the pool was closed while waiting for "
                          f"an exclusive connection")

    def after_fork_in_child(self) -> None:
        """Forget the parent's dedicated connections (the group silenced them)."""
        self._lock = self._backend.lock()
        old_line, old_wanting = self._line, self._wanting
        self._line = WaitLine()
        self._wanting = WaitLine()
        self._taken = 0
        self._connects = 0
        self._rounds = {}
        self._no_room = {}
        self.listeners = 0
        self.orphans = deque()
        self.generation += 1
        for line in (old_line, old_wanting):
            line.fail_all(lambda: PoolError(
                f"group {self.group.name!r}: the process forked while this task waited for "
                f"an exclusive connection; the wait belonged to the parent"))


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
            if self._generation == slots.generation:  # else taken before a fork
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
