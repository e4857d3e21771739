"""``pool.listen('write', ['jobs'])``: notifications fanned out from one connection per group.

Every :class:`Listener` (subscriber) of a group in this process shares one **hub**: one
dedicated connection of the group (one ``exclusive_limit`` slot, see exclusive.py), in
autocommit, on which the hub sends ``LISTEN`` for a channel when its first subscriber comes
and ``UNLISTEN`` when its last one goes. The connection is closed when the last subscriber
of the group leaves (no linger: the slot is free for ``exclusive()`` at once, and a new
subscriber reconnects in one round trip). A subscriber gets every notification committed
after ``listen()`` returned; one that joins a channel already listened on may also get one
committed just before (it was on its way to the hub), never fewer.

**Who reads the connection.** Where the mode has background tasks (gevent, eventlet,
threaded) one reader task per hub (a greenlet, or a thread) is its only user: it reads
notifications as they come, whatever the subscribers are doing, so a slow subscriber never
holds the server's NOTIFY queue; it sends the LISTEN/UNLISTEN the subscribers ask for,
the heartbeat, and reconnects. ``get(timeout)`` only waits on the subscriber's own queue, so
it returns on time even while the hub reconnects. In ``non-threaded`` mode there is no
background task: the subscriber that waits in ``get()`` does the reader's work inline
(delivery happens only while some subscriber waits, and a reconnect may overrun its
``timeout`` by one ``connect_timeout``).

**Bounded queues.** Each subscriber queues at most ``max_backlog`` items. One that falls
behind its bound is dropped from delivery: what comes meanwhile is not queued for it (its
``dropped`` count grows), and once it has read its queue down to half, it gets a
:class:`Gap` and delivery resumes. Memory stays bounded, the other subscribers and the
server are not held up, and the subscriber learns exactly what a reconnect would tell it.

**Gap.** A Gap reaches every subscriber after a reconnect (or after it fell behind), before
anything received later. ``lost_at`` is the moment from which nothing is promised: the
send time of the last heartbeat the server answered (every ``heartbeat`` seconds, traffic or
not), or of the ``LISTEN`` that began the session. PostgreSQL delivers every notification
committed before a statement to a listening session before that statement's answer, so
everything committed before ``lost_at`` was received: re-reading what changed since
``lost_at`` is safe (it may re-read up to one heartbeat more than needed).

**Channel names** are the exact strings ``pg_notify()`` takes and ``Notify.channel`` shows:
``listen(g, 'Jobs')`` sends ``LISTEN "Jobs"`` and hears ``pg_notify('Jobs', ...)`` and
``NOTIFY "Jobs"``, never ``NOTIFY Jobs`` (which PostgreSQL folds to ``jobs``).

**Fork.** A child gets nothing of the parent's hubs: its copies of the parent's listeners
are closed, the parent's connection is never touched there, and a reader greenlet copied
into the child stops at its next wake-up without reading.
"""

from __future__ import annotations

import logging
import math
import os
import select
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Union

import psycopg2
from psycopg2 import sql

from .concurrency import Backend, Waiter
from .connection import PooledConnection, libpq_connect_timeout, round_trip
from .endpoint import UNKNOWN
from .errors import PoolClosed, PoolError, PoolTimeout
from .exclusive import ExclusiveSlots
from .roles import role_of

try:  # the unpatched write: eventlet's green os.write waits for the fd (a switch) while
    from posix import write as _write  # we hold the lock; the pipe is non-blocking anyway
except ImportError:  # not POSIX
    _write = os.write

logger = logging.getLogger("greenpool")

_MAX_CHANNEL_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: a longer name would be truncated
_RETRY_PAUSE = 0.2  # seconds between reconnect rounds while no endpoint takes one...
_RETRY_PAUSE_MAX = 2.0  # ...doubling up to this while the outage lasts
_RECONNECT_ROUND = 1.0  # seconds of connect attempts between looks at the subscribers
_END_MARGIN = 3.0  # seconds a closer waits for the reader beyond its current call's bound
DEFAULT_MAX_BACKLOG = 1000  # items a subscriber may have queued before it is dropped


@dataclass(frozen=True)
class Gap:
    """A marker in a listener's stream: notifications may have been missed since
    ``lost_at`` (the connection was lost or moved, or this listener fell behind its
    ``max_backlog``). Everything committed before ``lost_at`` was delivered: re-read the
    state changed since then. Times are ``time.time()`` seconds."""

    reason: str  #: why delivery stopped
    lost_at: float
    resumed_at: float
    previous: str  #: label of the endpoint listened on when it stopped
    endpoint: str  #: label of the endpoint listened on now


Item = Union["psycopg2.extensions.Notify", Gap]


def channel_names(channels: str | Iterable[str]) -> tuple[str, ...]:
    """The channels as a tuple of distinct names, or ValueError saying what is wrong."""
    names = (channels,) if isinstance(channels, str) else tuple(channels)
    if not names:
        raise ValueError("listen(): give at least one channel name")
    for name in names:
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError(f"listen(): a channel name must be a non-empty string without "
                             f"NUL, not {name!r}")
        if len(name.encode()) > _MAX_CHANNEL_BYTES:
            raise ValueError(f"listen(): channel name {name[:20]!r}... is longer than "
                             f"{_MAX_CHANNEL_BYTES} bytes; PostgreSQL would truncate it")
    return tuple(dict.fromkeys(names))


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


class _Retry(Exception):
    """To a subscriber that joined a hub whose maker failed to take its slot (timed out,
    interrupted): start over with a hub of its own, within its own timeout."""


class _Sub:
    """A subscriber's state as the hub sees it (the :class:`Listener` is only a handle, so
    that a listener dropped without ``close()`` can be garbage-collected)."""

    __slots__ = ("busy", "channels", "closed", "deadline", "dropped", "lost", "max_backlog",
                 "queue", "start_error", "started", "waiter")

    def __init__(self, channels: tuple[str, ...], max_backlog: int, deadline: float) -> None:
        self.channels = channels
        self.deadline = deadline  # of listen(): how long the first connect may try
        self.max_backlog = max_backlog
        self.queue: deque[Item] = deque()
        self.started = False  # every channel is listened on
        self.start_error: BaseException | None = None
        self.closed = False
        self.busy = False  # a task is inside get()
        self.waiter: Waiter | None = None
        #: (reason, lost_at, previous endpoint) while this subscriber owes a Gap
        self.lost: tuple[str, float, str] | None = None
        self.dropped = 0  # notifications not queued since ``lost`` was set

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set()


class _Hub:
    """One group's shared listening connection and its subscribers (see the module doc).

    State shared with the subscribers changes under ``_lock``, in sections that never
    block. The connection itself is used by one task at a time: the reader task, or in
    non-threaded mode the subscriber inside ``get()``.
    """

    def __init__(self, slots: ExclusiveSlots, backend: Backend, counters: Counter[str]) -> None:
        self.slots = slots
        self.group = slots.group
        self.backend = backend
        self.inline = not backend.can_wait  # non-threaded: no reader task
        self.counters = counters  # the group's ``listen_dropped``, kept across hubs
        self._lock = backend.lock()
        self._wait = _readable_wait(backend)
        self.subs: dict[_Sub, None] = {}  # in order of arrival
        self._by_channel: dict[str, dict[_Sub, None]] = {}
        self._active: set[str] = set()  # LISTENed on the current connection
        self.orphans: deque[_Sub] = deque()  # appended by finalizers, no lock there
        self.pc: PooledConnection | None = None
        self.heartbeat = math.inf  # the smallest of the subscribers'
        self._check_at = 0.0
        self.good_at = 0.0  # time.time(): everything committed before was received
        self.holds_slot = False
        self.ever_connected = False
        self.last_error = ""
        self._lost_info: tuple[str, float, str] | None = None  # the loss a Gap will report
        self.ended = False  # no subscriber may join (the hub is over or ending)
        self.finished = False  # giving everything back has begun (it happens once)
        self.given_back = False  # ... and is over: the slot is free
        self._end_waiters: list[Waiter] = []
        self._failed_rounds = 0  # connect rounds failed in a row (the pause doubles)
        #: monotonic time by which the reader's current blocking call (a connect, a round
        #: trip) ends at the latest: how long a closer waits for the reader to give back
        self.busy_until = 0.0
        self._pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # --- subscribers (any task) ---------------------------------------------------------

    def join(self, sub: _Sub, heartbeat: float) -> bool:
        """Add ``sub``; False if this hub is ending (the caller makes a new one)."""
        with self._lock:
            if self.ended:
                return False
            self.subs[sub] = None
            for name in sub.channels:
                self._by_channel.setdefault(name, {})[sub] = None
            if heartbeat < self.heartbeat:  # the next heartbeat no later than this one's
                self.heartbeat = heartbeat
                self._check_at = min(self._check_at, time.monotonic() + heartbeat)
            if self.pc is not None and self._active.issuperset(sub.channels):
                sub.started = True
            self._poke()
        self.slots.count_listener(1)
        return True

    def leave(self, sub: _Sub) -> bool:
        """Remove ``sub`` (idempotent); True if it was the last one (the hub is ending)."""
        with self._lock:
            if sub not in self.subs:
                sub.closed = True
                return False
            self._forget(sub)
            last = not self.subs
            if last:
                self.ended = True
            self._poke()
        self.slots.count_listener(-1)
        return last

    def _forget(self, sub: _Sub) -> None:
        """Under the lock: ``sub`` leaves the maps and is woken."""
        sub.closed = True
        del self.subs[sub]
        for name in sub.channels:
            peers = self._by_channel.get(name)
            if peers is not None:
                peers.pop(sub, None)
                if not peers:
                    del self._by_channel[name]
        sub.queue.clear()
        sub.wake()

    def _poke(self) -> None:
        """Under the lock: wake the reader task (the pipe is open while the hub is)."""
        if not self.finished and not self.inline:
            try:
                _write(self._wake_w, b"x")
            except OSError:
                pass  # full: the reader wakes anyway

    def take_orphans(self) -> int:
        """Remove the subscribers garbage-collected without close(); how many."""
        count = 0
        while self.orphans:
            try:
                sub = self.orphans.popleft()
            except IndexError:
                break
            if self.leave(sub):
                count += 1
                if self.inline:
                    self.finish()
        return count

    def next_item(self, sub: _Sub) -> Item | None:
        """Under the lock: ``sub``'s next item, or a Gap it is owed once its queue is empty
        and the hub is listening again."""
        if sub.queue:
            return sub.queue.popleft()
        if sub.lost is not None and self.pc is not None and self._active.issuperset(
                sub.channels):
            return self._gap_for(sub)
        return None

    def _gap_for(self, sub: _Sub) -> Gap:
        assert sub.lost is not None and self.pc is not None
        reason, lost_at, previous = sub.lost
        if sub.dropped:
            reason = f"{reason} ({sub.dropped} notifications not delivered)"
        sub.lost, sub.dropped = None, 0
        self.slots.counters.gaps += 1
        return Gap(reason, lost_at, time.time(), previous, self.pc.endpoint.label)

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

    def close(self) -> None:
        """Pool.close(): every subscriber is closed, the reader ends."""
        with self._lock:
            self.ended = True
            subs = list(self.subs)
            for sub in subs:
                self._forget(sub)
            self._poke()
        for _ in subs:
            self.slots.count_listener(-1)
        if self.inline:
            self.finish()

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
            self._fail_start(exc if isinstance(exc, PoolClosed) else _Retry())
            self.finish()
            raise

    def _fail_start(self, error: BaseException) -> None:
        with self._lock:
            self.ended = True
            subs = [s for s in self.subs if not s.started]
            for sub in subs:
                sub.start_error = error
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
            self._deliver(raw)
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
            self._deliver(raw)
        if time.monotonic() >= self._check_at:  # whatever the traffic: lost_at stays fresh
            self._check(pc)
        return True

    def _deliver(self, raw: Any) -> None:
        """Hand what the connection received to the subscribers of each channel."""
        notes = list(raw.notifies)
        del raw.notifies[:]
        if not notes:
            return
        woken: dict[_Sub, None] = {}
        dropped = 0
        with self._lock:
            label = self.pc.endpoint.label if self.pc is not None else ""
            for note in notes:
                for sub in self._by_channel.get(note.channel, ()):
                    queue = sub.queue
                    if sub.lost is not None:
                        if len(queue) > sub.max_backlog // 2 or self.pc is None:
                            sub.dropped += 1
                            dropped += 1
                            continue
                        queue.append(self._gap_for(sub))
                    elif len(queue) >= sub.max_backlog:
                        sub.lost = (f"this listener fell behind its max_backlog "
                                    f"({sub.max_backlog})", self.good_at, label)
                        sub.dropped = 1
                        dropped += 1
                        continue
                    queue.append(note)
                    woken[sub] = None
            for sub in woken:
                sub.wake()
        if dropped:
            self.counters["dropped"] += dropped

    def _check(self, pc: PooledConnection) -> None:
        """A heartbeat: the server answers (so everything committed before it was sent has
        been received), and the group still belongs on it."""
        raw = pc.raw
        sent_at = time.time()
        self._bounded_by(pc.endpoint.config.connect_timeout)
        try:
            round_trip(raw, "SELECT 1", self.backend, pc.endpoint.config.connect_timeout)
        except psycopg2.Error as exc:
            self._lost(pc, f"heartbeat failed: {_one_line(exc)}", "failed_check")
            return
        self._deliver(raw)  # before good_at moves: these may be older than sent_at
        self.good_at = sent_at
        self._check_at = time.monotonic() + self.heartbeat
        role = role_of(raw)
        if role == UNKNOWN:
            role = pc.endpoint.role
        if not self.group.connector.belongs(pc.endpoint, role):
            self._lost(pc, f"the group no longer belongs on {pc.endpoint.label} "
                           f"(role {role})", "wrong_role", failed=False)

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
        self._deliver(raw)
        self._started()

    def _started(self) -> None:
        """Under no lock: subscribers whose channels are all listened on may return."""
        with self._lock:
            for sub in self.subs:
                if not sub.started and self._active.issuperset(sub.channels):
                    sub.started = True
                    sub.wake()

    def _lost(self, pc: PooledConnection, reason: str, discard: str, failed: bool = True) -> None:
        if self._forked():  # a copied reader read the silenced socket: nothing was lost
            return
        self._deliver(pc.raw)  # what came before the loss is still news
        lost_at = self.good_at
        with self._lock:
            self.pc = None
            self._active = set()
            self._lost_info = (reason, lost_at, pc.endpoint.label)
            for sub in self.subs:
                if sub.lost is None:
                    sub.lost = (reason, lost_at, pc.endpoint.label)
        self.slots.close_connection(pc, discard)
        if failed:
            self.group.on_endpoint_failure(pc.endpoint)  # its idle peers are suspect
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
            pc = self.slots.open(time.monotonic() + budget, caller_waits=first)
        except (PoolError, psycopg2.Error) as exc:
            self.last_error = _one_line(exc)
            if isinstance(exc, PoolClosed) or (first and pending):
                self._fail_start(exc)
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
        self._started()
        self._failed_rounds = 0
        if was_lost is not None:
            logger.warning("group %r: listening again on %s; notifications since the loss "
                           "may be missing", self.group.name, pc.endpoint.label)

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

    def stats(self) -> tuple[int, int, int]:
        """(connections, total backlog, largest backlog) of this hub."""
        with self._lock:
            sizes = [len(s.queue) for s in self.subs]
            return (1 if self.pc is not None else 0, sum(sizes), max(sizes, default=0))


def _orphaned(hub: _Hub, sub: _Sub) -> None:
    """A listener was garbage-collected unclosed: the hub removes it at its next round (no
    lock here: this may run inside any locked section) and is woken for that."""
    hub.orphans.append(sub)
    if hub.inline:  # no reader task: the slots' next use collects it
        hub.slots.orphans.append(hub.take_orphans)
    elif not hub.finished:
        try:
            _write(hub._wake_w, b"x")
        except OSError:
            pass


class Listener:
    """Notifications of some channels, read by one task at a time.

    ``for item in listener:`` yields ``psycopg2.extensions.Notify`` objects (``channel``,
    ``payload``, ``pid``) and :class:`Gap` markers until the listener is closed;
    :meth:`get` with a timeout returns None when nothing came (an SSE route's keep-alive
    tick). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, hub: _Hub, sub: _Sub, heartbeat: float) -> None:
        self.channels = sub.channels
        self.heartbeat = heartbeat
        self.max_backlog = sub.max_backlog
        self._hub = hub
        self._sub = sub
        self._finalizer = weakref.finalize(self, _orphaned, hub, sub)
        self._finalizer.atexit = False

    @property
    def closed(self) -> bool:
        return self._sub.closed

    @property
    def _busy(self) -> bool:
        """A task is inside :meth:`get` (for tests that wait for a reader to block)."""
        return self._sub.busy

    @property
    def backlog(self) -> int:
        """Items queued for this listener and not read yet."""
        return len(self._sub.queue)

    @property
    def endpoint(self) -> str | None:
        """Label of the endpoint listened on now (None while reconnecting or closed)."""
        pc = self._hub.pc
        return pc.endpoint.label if pc is not None and not self.closed else None

    def wait_started(self, deadline: float, timeout: float) -> None:
        """Until every channel is listened on; the hub's error, or PoolTimeout."""
        hub, sub = self._hub, self._sub
        while True:
            with hub._lock:
                if sub.started and not sub.closed:
                    return
                error = sub.start_error
                closed = sub.closed
                remaining = deadline - time.monotonic()
                waiter = None
                if error is None and not closed and remaining > 0 and not hub.inline:
                    waiter = sub.waiter = hub.backend.waiter()
            if error is not None:
                self.close()
                raise error
            if closed:
                self.close()
                raise PoolClosed(f"group {hub.group.name!r}: the listener was closed (the "
                                 f"pool was closed) while it connected")
            if remaining <= 0:
                self.close()
                why = f"; last error: {hub.last_error}" if hub.last_error else ""
                raise PoolTimeout(f"group {hub.group.name!r}: not listening on "
                                  f"{list(self.channels)} within {timeout:.2f} s{why}")
            if waiter is not None:
                waiter.wait(remaining)
            else:
                hub.step(deadline)

    def close(self) -> None:
        """Stop listening (from any task): the channels nobody else wants are UNLISTENed,
        and the last listener of a group closes the shared connection (waiting at most one
        round trip for that). A task blocked in :meth:`get` wakes and gets None (its
        ``for`` loop ends). Idempotent."""
        self._finalizer.detach()
        hub = self._hub
        if hub.leave(self._sub):
            if hub.inline:
                hub.finish()
            else:
                hub.end_wait()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Item]:
        while True:
            item = self.get()
            if item is None:
                return
            yield item

    def __repr__(self) -> str:
        state = "closed" if self.closed else (self.endpoint or "reconnecting")
        return (f"<Listener group={self._hub.group.name!r} channels={list(self.channels)} "
                f"{state}>")

    # --- reading --------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Item | None:
        """The next notification or :class:`Gap`; None once closed, or when ``timeout``
        seconds passed with nothing to return. Any exception out of here (a kill, a
        ``gevent.Timeout``) closes the listener."""
        deadline = None if timeout is None else time.monotonic() + timeout
        hub, sub = self._hub, self._sub
        with hub._lock:
            if sub.closed:
                return None
            if sub.busy:
                raise RuntimeError("a listener is read by one task at a time")
            sub.busy = True
        try:
            return self._next(deadline)
        except BaseException:
            self.close()
            raise
        finally:
            sub.busy = False

    def _next(self, deadline: float | None) -> Item | None:
        hub, sub = self._hub, self._sub
        while True:
            with hub._lock:
                if sub.closed:
                    return None
                item = hub.next_item(sub)
                if item is not None:
                    return item
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                waiter = None
                if not hub.inline:
                    if hub.ended:
                        sub.closed = True
                        return None
                    waiter = sub.waiter = hub.backend.waiter()
            if waiter is not None:
                waiter.wait(remaining)
            elif not hub.step(deadline):
                self.close()
                return None


class Listeners:
    """The hubs of a pool (one per group at most), so that ``Pool.close()`` can stop them
    and ``stats()`` report their subscribers' backlog."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._lock = backend.lock()
        self._hubs: dict[str, _Hub] = {}
        self._dropped: dict[str, Counter[str]] = {}

    def listen(self, slots: ExclusiveSlots, channels: tuple[str, ...], *,
               timeout: float | None, heartbeat: float, max_backlog: int) -> Listener:
        name = slots.group.name
        deadline = slots.deadline(timeout)
        sub = _Sub(channels, max_backlog, deadline)
        with self._lock:
            hub = self._hubs.get(name)
            new = hub is None or not hub.join(sub, heartbeat)
            if new:
                counters = self._dropped.setdefault(name, Counter())
                hub = self._hubs[name] = _Hub(slots, self._backend, counters)
                hub.join(sub, heartbeat)
        assert hub is not None
        listener = Listener(hub, sub, heartbeat)
        if new:
            try:
                hub.start(timeout, deadline)
            except BaseException:
                listener._finalizer.detach()
                raise
        wait = slots.group.config.timeout if timeout is None else timeout
        try:
            listener.wait_started(deadline, wait)
        except _Retry:
            listener.close()
            left = deadline - time.monotonic()
            return self.listen(slots, channels, timeout=max(0.0, left),
                               heartbeat=heartbeat, max_backlog=max_backlog)
        except BaseException:  # interrupted while waiting: leave the hub as it was
            listener.close()
            raise
        return listener

    def stats(self, group: str) -> dict[str, Any]:
        hub = self._hubs.get(group)
        if hub is not None:
            hub.take_orphans()
        connections, backlog, largest = hub.stats() if hub is not None else (0, 0, 0)
        return {"listen_connections": connections, "listen_backlog": backlog,
                "listen_backlog_max": largest,
                "listen_dropped": self._dropped.get(group, Counter())["dropped"]}

    def close_all(self) -> None:
        """Close every listener; the readers end on their own (see :meth:`wait_ended`)."""
        with self._lock:
            hubs = list(self._hubs.values())
        for hub in hubs:
            hub.close()

    def wait_ended(self) -> None:
        """Wait for the readers to give their connections and slots back (bounded)."""
        with self._lock:
            hubs = list(self._hubs.values())
        for hub in hubs:
            hub.end_wait()

    def after_fork_in_child(self) -> None:
        for hub in list(self._hubs.values()):
            hub.after_fork_in_child()
        self._lock = self._backend.lock()
        self._hubs = {}
