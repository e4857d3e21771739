"""The dedicated connect tasks of one group: connections opened in the background for callers.

Like the group's own connections (connector.py), a caller waits for a connect task, and its
timeout ends its wait, never an attempt. An attempt runs its whole ``connect_timeout``, so
its failure judges the endpoint exactly as the group's connects do (a black hole is
quarantined, "too many clients" is not), and a connection whose caller gave up goes to the
next caller waiting for one (else it is closed). A task starts only for a caller whom no
task under way covers (one that has spent over :data:`~greenpool.connection.STUCK_AFTER`
in a round may be stuck on a black hole, and covers no one: a waiting caller looks again
that often, and a task that served one goes on for the next), never more than twice
``exclusive_limit`` at once. ``non-threaded`` mode has no background: it connects inline,
as its groups do. Every fresh connection is vetted (:mod:`.capacity`) before a caller gets it.
"""

from __future__ import annotations

import itertools
import math
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from ..concurrency.backend import Backend, Waiter
from ..concurrency.fork import InheritedAcrossFork
from ..connection import STUCK_AFTER, PooledConnection
from ..errors import ConnectFailed, PoolClosed, PoolError
from ..stats import ExclusiveCounters
from ..waiting import WaitLine
from .capacity import Capacity, Retry

if TYPE_CHECKING:
    from ..group import Group


class _Task:
    """A connect task's token, held by the task's own function (and nowhere else): it is
    counted as running while the token lives, so a task that ends before its accounting
    (an exception on its first instruction, where no ``finally`` reaches) stops being
    counted once its function is collected."""

    __slots__ = ("__weakref__",)


class Cancel:
    """Lets another task end a wait in :meth:`DedicatedConnects.open` at once, with
    :class:`PoolError` (``why``): a listener hub whose last subscriber left stops waiting for
    its connect. Once cancelled, a later wait with it ends at once too."""

    __slots__ = ("cancelled", "waiter", "why")

    def __init__(self) -> None:
        self.cancelled = False
        self.waiter: Waiter | None = None  # the wait under way (DedicatedConnects' lock)
        self.why = ""


class DedicatedConnects:
    """Callers (each holding an ``exclusive_limit`` unit) waiting for a connection, and the
    tasks opening connections for them. All counts change under one lock, in sections that
    never block. ``close(pc, reason)`` closes a dedicated connection, counting the discard."""

    def __init__(self, group: Group, backend: Backend, capacity: Capacity,
                 counters: ExclusiveCounters,
                 close: Callable[[PooledConnection, str], None]) -> None:
        self.group = group
        self._backend = backend
        self._capacity = capacity
        self._counters = counters
        self._close = close
        self._lock = backend.lock()
        self._closed = False
        #: callers waiting for a dedicated connect task's connection
        self._wanting = WaitLine()
        #: task id -> token of each task under way (see _Task); those beyond the callers
        #: wanting one are adrift (their callers gave up): the next caller takes over
        #: their connection
        self._tasks: weakref.WeakValueDictionary[int, _Task] = weakref.WeakValueDictionary()
        #: task id -> when its current round began: a task in one round longer than
        #: STUCK_AFTER may be waiting out a server that never answers, and no longer
        #: counts as covering a caller (another task is started, which tries the
        #: endpoints with attempts under way last)
        self._rounds: dict[int, float] = {}
        self._task_ids = itertools.count()
        #: bumped in a forked child: the parent's tasks and callers mean nothing there
        self._generation = 0

    @property
    def running(self) -> int:
        """Connect tasks under way."""
        return len(self._tasks)

    @property
    def waiting(self) -> int:
        """Callers waiting for a connection."""
        return len(self._wanting)

    def open(self, deadline: float, caller_waits: bool = True,
             cancel: Cancel | None = None) -> PooledConnection:
        """A new connection of the group, outside its slots, waited for until ``deadline``:
        a dedicated connect task opens it (each attempt bounded by its endpoint's
        ``connect_timeout`` alone), and a caller who stops waiting leaves it to the next
        one. Raises what ``Connector.timed_out`` says when nothing came in time,
        :class:`PoolTimeout` (the groups need the server's free slots),
        :class:`ConnectFailed`, :class:`PoolClosed`, or :class:`PoolError` (the endpoint
        is a pooler that gives no session of its own). Without ``caller_waits`` (a
        listener's connects: each subscriber counts its own) running out of time is no
        caller's timeout, and is left out of the group's ``timeouts``. ``cancel``: how
        another task may end this wait (:meth:`cancel`)."""
        group = self.group
        if group.closed:
            raise PoolClosed(f"group {group.name!r}: the pool is closed")
        self._capacity.refuse_if_no_room()
        if deadline <= time.monotonic():  # no time to wait: no connect for nobody
            raise self._no_connection_error(caller_waits, "no_time")
        if not self._backend.can_wait:
            return self._open_inline(deadline, caller_waits)
        with self._lock:
            if self._closed:
                raise PoolClosed(f"group {group.name!r}: the pool is closed")
            if cancel is not None and cancel.cancelled:
                raise PoolError(cancel.why)
            waiter = self._backend.waiter()
            self._wanting.append(waiter)
            if cancel is not None:
                cancel.waiter = waiter
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
            self._wanting.abandon(waiter, self._lock, lambda pc: self._close(pc, "interrupted"))
            raise
        finally:
            if cancel is not None:
                cancel.waiter = None
        item = waiter.item
        if item is None:
            item = self._wanting.outcome(waiter, self._lock,
                                         lambda: self._no_connection_error(caller_waits))
        return self._handed(item)

    def cancel(self, cancel: Cancel, why: str) -> None:
        """End the wait ``cancel`` was given to (and any later one) with ``why``: the wait
        leaves the line; its connect task goes on for the next caller, else closes what it
        opens (``unclaimed``)."""
        with self._lock:
            cancel.cancelled, cancel.why = True, why
            waiter = cancel.waiter
            if waiter is None or self._wanting.served(waiter):
                return
            self._wanting.leave(waiter)
            waiter.error = PoolError(why)
        waiter.set()

    def _handed(self, pc: PooledConnection) -> PooledConnection:
        self._counters.opened += 1
        return pc

    def _no_connection_error(self, caller_waits: bool, how: str = "waited") -> PoolError:
        """A caller's time ran out: ``how`` it went: ``waited`` for the connect tasks,
        ``inline`` (its own connect cut short by it), or ``no_time`` (none to start one)."""
        connector = self.group.connector
        if how == "no_time":
            why = "no time was left to open one"
        elif how == "inline":
            why = ("the connect was cut short by it (an attempt may take up to "
                   "connect_timeout)")
        elif caller_waits:
            why = ("a connect is under way (an attempt may take up to connect_timeout, and "
                   "goes on for the next caller)")
        else:
            why = "none yet, a connect is under way"
        name = self.group.name
        error = connector.timed_out(
            lambda: (f"group {name!r}: no dedicated connection within the timeout: {why}. "
                     f"Endpoints: {connector.describe()}"), count=False)
        if caller_waits:  # a dedicated caller's timeout is counted with the dedicated ones
            self._counters.timeouts += 1
        return error

    def _cover_callers(self) -> None:
        """Start a connect task if the callers waiting outnumber the tasks covering them (a
        rescue for callers whose tasks seem stuck only while some endpoint has no attempt
        under way: else it would join the stuck ones)."""
        with self._lock:
            if self._closed:
                return
            covering = self._covering()
            limit = self.group.config.exclusive_limit
            if covering >= len(self._wanting) or self.running >= 2 * limit:
                return
            rescue = covering < self.running  # the others may be stuck
            now = time.monotonic()
            if rescue and not any(not ep.connecting and ep.may_connect(now)
                                  for ep in self.group.endpoints):
                return  # each endpoint free to take an attempt has one under way: wait
            task_id = next(self._task_ids)
            self._rounds[task_id] = now
            token = self._tasks[task_id] = _Task()
            generation = self._generation
        self._start(task_id, rescue, generation, token)

    def _start(self, task_id: int, rescue: bool, generation: int, token: _Task) -> None:
        """Start a dedicated connect task (the caller counted it in ``running``; a task
        that never begins uncounts itself, even when starting it was interrupted). The
        task's function is what holds ``token``."""

        def not_started() -> None:
            with self._lock:
                self._tasks.pop(task_id, None)
                self._rounds.pop(task_id, None)

        task = partial(self._task, generation, task_id, rescue, token)
        if self.group.connector.run_in_background(task, not_started):
            return
        with self._lock:  # no task could start (a process limit on threads)
            self._wanting.fail_all(lambda: PoolError(
                f"group {self.group.name!r}: a dedicated connect could not be started "
                f"({self.group.connector.cannot_start})"))

    def _task(self, generation: int, task_id: int, rescue: bool, token: _Task) -> None:
        """Rounds of connect attempts until one connection (or one verdict) is delivered,
        the pool closes, or no caller needs this task any more. A ``rescue`` task (started
        while the others seemed stuck) tries endpoints with attempts under way last."""
        connector = self.group.connector
        try:
            while not connector.stopped and generation == self._generation:
                self._rounds[task_id] = time.monotonic()
                last = self._capacity.short_now()
                if rescue:
                    last += [ep for ep in self.group.endpoints if ep.connecting]
                pc = connector.open_round(self.group.generation, last)
                if pc is not None and generation != self._generation:
                    # a task of the parent's, going on in a forked child: that wait is over
                    self._close(pc, "")
                    return
                delivered = False
                if pc is not None:
                    try:
                        error = self._capacity.vet(pc)
                    except Retry:
                        pass
                    else:
                        if error is not None or self._still_placed(pc):
                            self._deliver(pc if error is None else error)
                            delivered = True
                if not delivered:
                    fatal = connector.fatal_error()
                    if fatal is not None:
                        with self._lock:
                            if generation == self._generation:
                                self._wanting.fail_all(partial(ConnectFailed, str(fatal)))
                        return
                with self._lock:  # keep going only while a caller is not covered without us
                    # (a task stuck on a black hole covers no one: after serving the oldest
                    # caller, a rescue task goes on for the next)
                    if (generation != self._generation
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
                if generation == self._generation:
                    self._tasks.pop(task_id, None)
                    self._rounds.pop(task_id, None)

    def _covering(self, besides: int | None = None) -> int:
        """How many connect tasks (other than ``besides``) cover a caller: those in a round
        begun under ``STUCK_AFTER`` ago, or pausing for an endpoint's next chance (lock
        held)."""
        now = time.monotonic()
        tasks = self._tasks  # (a task that ended before its accounting is not there)
        return sum(1 for task_id, since in self._rounds.items()
                   if task_id != besides and now - since < STUCK_AFTER and task_id in tasks)

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
            self._close(result, "unclaimed")

    def _open_inline(self, deadline: float, caller_waits: bool) -> PooledConnection:
        """``non-threaded``: connect now, each attempt also bounded by ``deadline`` (no
        background can finish it for another caller)."""
        group = self.group
        while True:
            pc = group.connector.open_now(deadline, group.generation)
            if pc is None:
                raise self._no_connection_error(caller_waits, "inline")
            try:
                error = self._capacity.vet(pc, deadline)
            except Retry:
                continue
            if error is not None:
                raise error
            if self._still_placed(pc):
                return self._handed(pc)

    def _still_placed(self, pc: PooledConnection) -> bool:
        """After the vet's round trip, before a caller gets ``pc``: a connection whose
        endpoint left the group meanwhile (``reconfigure()``) is closed, never handed out
        (the connector's own check covered the connect only)."""
        misplaced = self.group.connector.misplaced(pc.endpoint, pc.role)
        if misplaced:
            self._close(pc, misplaced)
        return not misplaced

    def close(self, make_error: Callable[[], BaseException]) -> None:
        """Start no more tasks; every caller waiting gets ``make_error()``."""
        with self._lock:
            self._closed = True
            self._wanting.fail_all(make_error)

    def after_fork_in_child(self, make_error: Callable[[], BaseException]) -> None:
        """Forget the parent's tasks and callers (its callers get ``make_error()``)."""
        self._lock = self._backend.lock()
        old_wanting, self._wanting = self._wanting, WaitLine()
        self._tasks = weakref.WeakValueDictionary()
        self._rounds = {}
        self._generation += 1
        old_wanting.fail_all(make_error)
