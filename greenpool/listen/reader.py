"""The reader of a hub's connection: connecting and LISTEN, the heartbeat, LISTEN/UNLISTEN
as channels come and go, noticing a loss and reconnecting, giving everything back.

**Who reads the connection.** Where the mode has background tasks (gevent, eventlet,
threaded) one reader task per hub (a greenlet, or a thread) is its only user: it reads
notifications as they come, whatever the subscribers are doing, so a slow subscriber never
holds the server's NOTIFY queue; it sends the LISTEN/UNLISTEN the subscribers ask for,
the heartbeat, and reconnects. ``get(timeout)`` only waits on the subscriber's own queue, so
it returns on time even while the hub reconnects. In ``non-threaded`` mode there is no
background task: the subscriber that waits in ``get()`` does the reader's work inline
(delivery happens only while some subscriber waits, and a reconnect may overrun its
``timeout`` by one ``connect_timeout``).

**Fork.** A child gets nothing of the parent's hubs: its copies of the parent's listeners
are closed, the parent's connection is never touched there, and a reader greenlet copied
into the child stops at its next wake-up without reading.

One module for the connection's whole session (start, read loop, heartbeat, sync, loss,
reconnect, finish): these steps share the reader's private state and hand off to each other,
and they fit in under 500 lines together.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections import Counter
from collections.abc import Callable

import psycopg2
from psycopg2 import sql

from ..concurrency import Backend
from ..connection import PooledConnection, libpq_connect_timeout, round_trip
from ..endpoint import UNKNOWN
from ..errors import PoolClosed, PoolError
from ..exclusive import Cancel, ExclusiveSlots
from ..roles import role_of
from .fanout import FanOut
from .subscriber import Subscriber

logger = logging.getLogger("greenpool")

_RETRY_PAUSE = 0.2  # seconds between reconnect rounds while no endpoint takes one...
_RETRY_PAUSE_MAX = 2.0  # ...doubling up to this while the outage lasts
_RECONNECT_ROUND = 1.0  # seconds of connect attempts between looks at the subscribers
_END_MARGIN = 3.0  # seconds a closer waits for the reader beyond its current call's bound


def _readable_wait(backend: Backend) -> Callable[[list[int], float | None], list[int]]:
    """``wait(fds, timeout)``: the fds that became readable (empty on timeout), waiting in
    the mode's own way: a green ``select`` in the green modes, a real poll in the others."""
    if backend.name == "gevent":
        import gevent.select

        green_select = gevent.select.select
        return lambda fds, timeout: green_select(fds, [], [], timeout)[0]
    if backend.name == "eventlet":
        from eventlet.green import select as eventlet_select

        eventlet_s = eventlet_select.select
        return lambda fds, timeout: eventlet_s(fds, [], [], timeout)[0]
    poll_class = getattr(select, "poll", None)
    if poll_class is None:
        return lambda fds, timeout: select.select(fds, [], [], timeout)[0]

    def poll_wait(fds: list[int], timeout: float | None) -> list[int]:
        poller = poll_class()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        return [fd for fd, _ in poller.poll(ms)]

    return poll_wait


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class RetryStart(Exception):
    """To a subscriber that joined a hub whose maker failed to take its slot (timed out,
    interrupted): start over with a hub of its own, within its own timeout."""


class Hub(FanOut):
    """One group's shared listening connection and its subscribers (see the package doc).

    The connection is used by one task at a time: the reader task, or in non-threaded mode
    the subscriber inside ``get()``.
    """

    def __init__(self, slots: ExclusiveSlots, backend: Backend, counters: Counter[str]) -> None:
        super().__init__(slots, backend, counters)
        self._wait = _readable_wait(backend)
        self._failed_rounds = 0  # connect rounds failed in a row (the pause doubles)
        #: monotonic time by which the reader's current blocking call (a connect, a round
        #: trip) ends at the latest: how long a closer waits for the reader to give back
        self.busy_until = 0.0
        self._pid = os.getpid()
        #: ends the reader's wait for a connect once the hub is over (no subscriber left,
        #: the pool closed): it gives its slot back at once, not at the connect's deadline
        self._connect_cancel = Cancel()

    def leave(self, sub: Subscriber) -> bool:
        last = super().leave(sub)
        if last:
            self._cut_connect()
        return last

    def close(self) -> None:
        super().close()
        self._cut_connect()

    def check_now(self) -> None:
        """The group changed (``reconfigure()``): the reader checks at once, not at the next
        heartbeat, that the group still belongs where it listens."""
        self._check_at = 0.0
        self._poke()

    def _cut_connect(self) -> None:
        """The hub is over: a connect the reader waits for is no longer its (the connect
        task goes on for another caller, or closes what it opens)."""
        if not self.inline:
            self.slots.cancel(self._connect_cancel, f"group {self.group.name!r}: the "
                              f"listening connection is no longer needed")

    def end_wait(self) -> None:
        """Wait until the reader has given everything back: at most until its current
        blocking call (a connect, a round trip) ends, plus a moment."""
        if self.inline:
            return
        with self._lock:
            if self.given_back:  # not merely begun: the slot may not be free yet
                return
            waiter = self.backend.waiter()
            self._end_waiters.append(waiter)
        waiter.wait(max(self.busy_until - time.monotonic(), 0.0) + _END_MARGIN)

    def _bounded_by(self, seconds: float) -> None:
        """The reader is about to block for at most ``seconds``."""
        self.busy_until = time.monotonic() + seconds

    # --- starting -----------------------------------------------------------------------

    def start(self, timeout: float | None, deadline: float) -> None:
        """By the subscriber that made this hub: take the slot, then start the reader (or,
        non-threaded, connect here). A failure is every waiting subscriber's."""
        try:
            self.slots.take(max(0.0, deadline - time.monotonic()) if timeout is not None
                            else None)
            self.holds_slot = True
            if self.inline:
                self._connect(deadline, first=True)
            else:
                task = self.backend.spawn(self._run)
                if task is None:
                    raise PoolError("this mode cannot start a reader task")
        except BaseException as exc:
            # the others waited for this caller's slot: they try on their own (own timeout)
            self._fail_start(exc if isinstance(exc, PoolClosed) else RetryStart())
            self.finish()
            raise

    def _fail_start(self, error: BaseException, covered: list[Subscriber] | None = None) -> None:
        """Every subscriber waiting gets ``error``; with ``covered`` (those a failed connect
        was waited for), the others get :class:`RetryStart`: they joined after its time was
        set, which says nothing of theirs."""
        with self._lock:
            self.ended = True
            subs = [s for s in self.subs if not s.started]
            for sub in subs:
                sub.start_error = error if covered is None or sub in covered else RetryStart()
                self._forget(sub)
            over = not self.subs
        for _ in subs:
            self.slots.count_listener(-1)
        if over and self.inline:  # no reader task to give the slot back
            self.finish()

    # --- the reader's work (the reader task, or a waiting subscriber when inline) --------

    def _run(self) -> None:
        """The reader task: until no subscriber is left, the pool closes, or a fork."""
        try:
            while self.step(None):
                pass
        except BaseException as exc:
            if self._forked():
                return
            if isinstance(exc, Exception):
                logger.exception("group %r: the listening connection's reader failed",
                                 self.group.name)
            self.close()
            if not isinstance(exc, Exception):
                raise
        finally:
            self.finish()

    def _forked(self) -> bool:
        return os.getpid() != self._pid

    def step(self, until: float | None) -> bool:
        """One round of the reader's work, waiting at most until ``until`` (monotonic);
        False when the hub is over."""
        if self._forked():
            return False
        self.take_orphans()
        with self._lock:
            if not self.subs or (self.ended and not self.inline):
                self.ended = True
                return False
            wanted = set(self._by_channel)
        pc = self.pc
        if pc is None:
            self._connect(until, first=not self.ever_connected)
            return True
        if wanted != self._active:
            self._sync(pc, wanted)
            return True
        raw = pc.raw
        if raw.notifies:
            self.deliver(raw)
        now = time.monotonic()
        wait = self._check_at - now
        if until is not None:
            wait = min(wait, until - now)
        fds = [raw.fileno()] if self.inline else [raw.fileno(), self._wake_r]
        ready = self._wait(fds, max(0.0, wait))
        if self._forked():
            return False
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass
        if raw.fileno() in ready:
            try:
                raw.poll()  # reads what came: notifications, status changes, or EOF
            except psycopg2.Error as exc:
                self._lost(pc, f"connection lost: {_one_line(exc)}", "broken")
                return True
            self.deliver(raw)
        if time.monotonic() >= self._check_at:  # whatever the traffic: lost_at stays fresh
            self._check(pc)
        return True

    def _check(self, pc: PooledConnection) -> None:
        """A heartbeat: the group still belongs on the endpoint (asked first: an endpoint
        ``reconfigure()`` took out is left at once, whatever its server does), the server
        answers (so everything committed before it was sent has been received), and the
        group still belongs there with the role it reports now."""
        if self._misplaced(pc, pc.role):
            return
        raw = pc.raw
        sent_at = time.time()
        self._bounded_by(pc.endpoint.config.connect_timeout)
        try:
            round_trip(raw, "SELECT 1", self.backend, pc.endpoint.config.connect_timeout)
        except psycopg2.Error as exc:
            self._lost(pc, f"heartbeat failed: {_one_line(exc)}", "failed_check")
            return
        self.deliver(raw)  # before good_at moves: these may be older than sent_at
        self.good_at = sent_at
        self._check_at = time.monotonic() + self.heartbeat
        role = role_of(raw)
        if role == UNKNOWN:
            role = pc.endpoint.role
        self._misplaced(pc, role)

    def _misplaced(self, pc: PooledConnection, role: str) -> bool:
        """Whether the group may no longer use ``pc`` (its server reporting ``role``), as
        the connector judges every connection: then it is dropped and the hub reconnects."""
        misplaced = self.group.connector.misplaced(pc.endpoint, role)
        if not misplaced:
            return False
        why = ("it was taken out of the group" if misplaced == "endpoint_removed"
               else f"role {role}")
        self._lost(pc, f"the group no longer belongs on {pc.endpoint.label} ({why})",
                   misplaced)
        return True

    def _sync(self, pc: PooledConnection, wanted: set[str]) -> None:
        """LISTEN the channels a new subscriber wants, UNLISTEN those nobody wants now."""
        adding = sorted(wanted - self._active)
        dropping = sorted(self._active - wanted)
        parts = [sql.SQL("LISTEN {}").format(sql.Identifier(n)) for n in adding]
        parts += [sql.SQL("UNLISTEN {}").format(sql.Identifier(n)) for n in dropping]
        raw = pc.raw
        with self._lock:  # a subscriber joining a channel being dropped waits for its LISTEN
            self._active.difference_update(dropping)
        self._bounded_by(pc.endpoint.config.connect_timeout)
        try:
            statement = sql.SQL("; ").join(parts).as_string(raw)
            round_trip(raw, statement, self.backend, pc.endpoint.config.connect_timeout)
        except psycopg2.Error as exc:
            self._lost(pc, f"LISTEN failed: {_one_line(exc)}", "failed_listen")
            return
        with self._lock:
            self._active = set(wanted)
        self.deliver(raw)
        self.mark_started()

    def _lost(self, pc: PooledConnection, reason: str, discard: str) -> None:
        """The hub's connection is gone (or no longer the group's): every subscriber is owed
        a Gap, and the reader reconnects. One session's end says nothing about its server
        (``pg_terminate_backend``, one backend stalled or killed): nothing else of the
        pool is evicted or quarantined for it; only a failed reconnect, judged by the
        connector like any connect, is evidence about the endpoint."""
        if self._forked():  # a copied reader read the silenced socket: nothing was lost
            return
        self.deliver(pc.raw)  # what came before the loss is still news
        lost_at = self.good_at
        with self._lock:
            self.pc = None
            self._active = set()
            self._lost_info = (reason, lost_at, pc.endpoint.label)
            for sub in self.subs:
                if sub.lost is None:
                    sub.lost = (reason, lost_at, pc.endpoint.label)
        self.slots.close_connection(pc, discard)
        logger.warning("group %r: listening connection on %s: %s; reconnecting",
                       self.group.name, pc.endpoint.label, reason)

    def _connect(self, until: float | None, first: bool) -> None:
        """One round of connect attempts and LISTEN; on failure a pause (a poke ends it).
        The first connect of a hub hands its error to the subscribers waiting for it."""
        with self._lock:
            wanted = set(self._by_channel)
            pending = [s for s in self.subs if not s.started]
        budget = _RECONNECT_ROUND
        if first and pending:  # as long as the subscribers wait for it
            budget = max(s.deadline for s in pending) - time.monotonic()
        if until is not None:
            budget = min(budget, until - time.monotonic())
        if budget <= 0:
            return
        slowest = max((e.config.connect_timeout for e in self.group.connector.endpoints),
                      default=0.0)
        self._bounded_by(budget + libpq_connect_timeout(slowest) + 0.5)
        try:
            # no caller's timeout: each subscriber waiting counts its own (wait_started)
            pc = self.slots.open(time.monotonic() + budget, caller_waits=False,
                                 cancel=self._connect_cancel)
        except (PoolError, psycopg2.Error) as exc:
            if self._connect_cancel.cancelled:
                return  # the hub is over: step() ends it (no error for anyone, no pause)
            self.last_error = _one_line(exc)
            if isinstance(exc, PoolClosed) or (first and pending):
                self._fail_start(exc, None if isinstance(exc, PoolClosed) else pending)
                if isinstance(exc, PoolClosed):
                    self.close()
                return
            logger.info("group %r: listening connection cannot reconnect yet: %s",
                        self.group.name, self.last_error)
            self._pause(until)
            return
        sent_at = time.time()
        self._bounded_by(pc.endpoint.config.connect_timeout)
        try:
            raw = pc.raw
            raw.autocommit = True  # LISTEN takes effect, and notifications arrive, outside
            statement = sql.SQL("; ").join(                     # transactions only
                sql.SQL("LISTEN {}").format(sql.Identifier(n)) for n in sorted(wanted)
            ).as_string(raw)
            round_trip(raw, statement, self.backend, pc.endpoint.config.connect_timeout)
        except psycopg2.Error as exc:
            self.slots.close_connection(pc, "failed_listen")
            self.last_error = _one_line(exc)
            self._pause(until)
            return
        except BaseException:
            self.slots.close_connection(pc, "failed_listen")
            raise
        self._check_at = time.monotonic() + self.heartbeat
        self.good_at = sent_at
        was_lost = self._lost_info
        with self._lock:
            self.pc = pc
            self._active = set(wanted)
            self.ever_connected = True
            self.last_error = ""
            self._lost_info = None
            for sub in self.subs:
                if sub.lost is not None and len(sub.queue) <= sub.max_backlog // 2:
                    sub.queue.append(self._gap_for(sub))
                    sub.wake()
        self.mark_started()
        self._failed_rounds = 0
        if was_lost is not None:
            logger.warning("group %r: listening again on %s; notifications since the loss "
                           "may be missing", self.group.name, pc.endpoint.label)
        # a reconfigure() during the LISTEN asked for a check that setting _check_at undid
        self._misplaced(pc, pc.role)

    def _pause(self, until: float | None) -> None:
        pause = min(_RETRY_PAUSE * 2 ** min(self._failed_rounds, 8), _RETRY_PAUSE_MAX)
        self._failed_rounds += 1
        if until is not None:
            pause = min(pause, until - time.monotonic())
        if pause > 0:
            if self.inline:
                self.backend.sleep(pause)
            else:
                self._wait([self._wake_r], pause)

    def finish(self) -> None:
        """Give everything back, once: the connection, the slot, the pipe (never in a
        forked child: the parent's are not ours)."""
        with self._lock:
            if self.finished:
                return
            self.ended = self.finished = True
            subs = list(self.subs)
            for sub in subs:
                self._forget(sub)
        for _ in subs:
            self.slots.count_listener(-1)
        if self._forked():
            return
        pc, self.pc = self.pc, None
        try:
            if pc is not None:
                self.slots.close_connection(pc)
        finally:
            if self.holds_slot:
                self.holds_slot = False
                self.slots.give()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            with self._lock:  # a closer that came meanwhile is waiting: wake it too
                self.given_back = True
                waiters, self._end_waiters = self._end_waiters, []
            for waiter in waiters:
                waiter.set()

    def after_fork_in_child(self) -> None:
        """In the child: drop everything untouched (the group silenced the connection)."""
        self._lock = self.backend.lock()
        self.ended = self.finished = self.given_back = True
        self.pc = None
        self.holds_slot = False
        for sub in self.subs:
            sub.closed = True
        self.subs = {}
        self._by_channel = {}

