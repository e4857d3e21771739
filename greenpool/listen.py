"""``pool.listen('write', ['jobs'])``: notifications that survive a lost server or a failover.

A :class:`Listener` owns one dedicated connection of the group (see exclusive.py: it holds
one ``exclusive_limit`` slot for its whole life), in autocommit, on which it has sent
``LISTEN`` for each channel. Reading it waits for the socket without blocking the hub (the
mode's cooperative ``select``; a real one in the blocking modes) and, every ``heartbeat``
seconds of silence, sends a bounded ``SELECT 1`` and asks placement whether the group still
belongs on that server: a server that went away, or a primary that moved, is noticed
within one heartbeat (at once when the server closed the socket).

When the connection is lost (or must move) the listener connects again through the
group's connector (role, quarantine, connect deadline), sends ``LISTEN`` again, and puts a
:class:`Gap` in the stream before anything else it reads: notifications sent while it was
away are lost (PostgreSQL queues them only for sessions listening at the time), and the
caller must re-read whatever state they announce.

It stops on :meth:`Listener.close` (from any task) or when the task reading it is killed or
interrupted: any exception out of :meth:`Listener.get` closes the connection (ending the
session, so nothing stays listening on the server) and gives the slot back.
"""

from __future__ import annotations

import logging
import os
import select
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Union

import psycopg2
from psycopg2 import sql

from .concurrency import Backend
from .connection import PooledConnection, close_raw, round_trip
from .endpoint import UNKNOWN
from .errors import PoolClosed, PoolError
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
_RECONNECT_ROUND = 1.0  # seconds of connect attempts between looks at close()


@dataclass(frozen=True)
class Gap:
    """A marker in a listener's stream: the connection was lost (or moved) and has been
    re-established, so notifications sent in between may have been missed. Re-read the
    state they would have announced. Times are ``time.time()`` seconds."""

    reason: str  #: why the old connection ended
    lost_at: float
    resumed_at: float
    previous: str  #: label of the endpoint that was lost
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


class _Held:
    """What a listener holds on the server and in the pool, apart from the listener itself,
    so that a listener dropped without :meth:`Listener.close` is still given back (see
    :meth:`ExclusiveSlots.reclaim`): its connection, its limit slot, its wake-up pipe."""

    __slots__ = ("fds", "holds_slot", "pc")

    def __init__(self, fds: tuple[int, ...]) -> None:
        self.pc: PooledConnection | None = None
        self.holds_slot = False
        self.fds = fds

    def release(self, slots: ExclusiveSlots) -> None:
        """Give everything back (once; the caller makes sure nobody else uses it)."""
        pc, self.pc = self.pc, None
        try:
            if pc is not None:
                slots.close_connection(pc)
        finally:
            if self.holds_slot:
                self.holds_slot = False
                slots.count_listener(-1)
                slots.give()
            fds, self.fds = self.fds, ()
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _orphaned(orphans: deque[_Held], held: _Held) -> None:
    """A listener was garbage-collected unclosed: end its session now (a driver call, no
    lock: this may run inside any locked section) and leave the rest to the slots."""
    if held.pc is not None:
        close_raw(held.pc.raw)
    orphans.append(held)


class Listener:
    """Notifications of some channels, read by one task at a time.

    ``for item in listener:`` yields ``psycopg2.extensions.Notify`` objects (``channel``,
    ``payload``, ``pid``) and :class:`Gap` markers until the listener is closed;
    :meth:`get` with a timeout returns None when nothing came (an SSE route's keep-alive
    tick). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        slots: ExclusiveSlots,
        channels: tuple[str, ...],
        backend: Backend,
        heartbeat: float,
        on_close: Callable[[Listener], None] | None = None,
    ) -> None:
        self.channels = channels
        self.heartbeat = heartbeat
        self._slots = slots
        self._group = slots.group
        self._backend = backend
        self._lock = backend.lock()
        self._wait = _readable_wait(backend)
        self._pending: deque[Item] = deque()
        self._busy = False  # a task is inside get()
        self._closing = False  # close() was asked
        self._closed = False  # everything given back
        self._check_at = 0.0
        self._on_close = on_close
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._held = _Held((self._wake_r, self._wake_w))
        # dropped without close(): the slots give it all back at their next use
        self._finalizer = weakref.finalize(self, _orphaned, slots.orphans, self._held)
        self._finalizer.atexit = False  # at exit the process ends the sessions itself
        #: (reason, when, endpoint label) of the latest loss, for the Gap that follows it
        self._lost_info = ("", 0.0, "")

    @property
    def _pc(self) -> PooledConnection | None:
        return self._held.pc

    @_pc.setter
    def _pc(self, pc: PooledConnection | None) -> None:
        self._held.pc = pc

    @property
    def _holds_slot(self) -> bool:
        return self._held.holds_slot

    @_holds_slot.setter
    def _holds_slot(self, holds: bool) -> None:
        self._held.holds_slot = holds

    # --- life cycle -----------------------------------------------------------------------

    def start(self, timeout: float | None) -> Listener:
        """Take a limit slot, connect and LISTEN within ``timeout`` (the group's acquire
        timeout if None); any failure closes the listener and propagates."""
        with self._lock:
            self._busy = True  # a close() meanwhile (Pool.close()) is acted on below
        try:
            deadline = self._slots.deadline(timeout)
            self._slots.take(timeout)
            self._holds_slot = True
            self._slots.count_listener(1)
            pc = self._slots.open(deadline)
            self._listen_on(pc)
        except BaseException:
            with self._lock:
                self._busy = False
            self._shut()
            raise
        with self._lock:
            self._busy = False
            closing = self._closing
        if closing:  # else the session would listen on the server for ever
            self._shut()
            raise PoolClosed(f"group {self._group.name!r}: the listener was closed (the "
                             f"pool was closed) while it connected")
        return self

    def close(self) -> None:
        """Stop listening (from any task): the connection is closed, so the server forgets
        the session's LISTENs, and the slot is given back. A task blocked in :meth:`get`
        wakes and gets None (its ``for`` loop ends). Idempotent."""
        with self._lock:
            if self._closed or self._closing:
                return
            self._closing = True
            busy = self._busy
            if busy:  # under the lock: _shut() closes the pipe only after it sets _closed
                try:
                    _write(self._wake_w, b"x")
                except OSError:
                    pass  # the pipe is full: the reader will wake anyway
        if not busy:
            self._shut()

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    @property
    def endpoint(self) -> str | None:
        """Label of the endpoint listened on now (None while reconnecting or closed)."""
        pc = self._pc
        return pc.endpoint.label if pc is not None else None

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
        return f"<Listener group={self._group.name!r} channels={list(self.channels)} {state}>"

    # --- reading --------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Item | None:
        """The next notification or :class:`Gap`; None once closed, or when ``timeout``
        seconds passed with nothing to return. A reconnect in progress may overrun
        ``timeout`` by up to one ``connect_timeout``. Any exception out of here (a kill,
        a ``gevent.Timeout``) closes the listener."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closing or self._closed:
                return None
            if self._busy:
                raise RuntimeError("a listener is read by one task at a time")
            self._busy = True
        try:
            item = self._next(deadline)
        except BaseException:
            with self._lock:
                self._busy = False
            self._shut()
            raise
        with self._lock:
            self._busy = False
            closing = self._closing
        if closing:
            self._shut()
            return None
        return item

    def _next(self, deadline: float | None) -> Item | None:
        while True:
            if self._closing:
                return None
            if self._pending:
                return self._pending.popleft()
            pc = self._pc
            if pc is None:
                self._reconnect(deadline)
                if self._pc is None:
                    return None  # closing, or out of time
                continue
            raw = pc.raw
            if raw.notifies:
                self._pending.extend(raw.notifies)
                del raw.notifies[:]
                continue
            now = time.monotonic()
            wait = self._check_at - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            ready = self._wait([raw.fileno(), self._wake_r], max(0.0, wait))
            if self._closing:
                return None
            if ready and raw.fileno() in ready:
                try:
                    raw.poll()  # reads what came: notifications, status changes, or EOF
                except psycopg2.Error as exc:
                    self._lost(pc, f"connection lost: {' '.join(str(exc).split())}", "broken")
                    continue
                self._check_at = time.monotonic() + self.heartbeat
                continue
            if time.monotonic() >= self._check_at:
                self._check(pc)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _check(self, pc: PooledConnection) -> None:
        """A heartbeat: the server answers, and the group still belongs on it."""
        raw = pc.raw
        try:
            round_trip(raw, "SELECT 1", self._backend, pc.endpoint.config.connect_timeout)
        except psycopg2.Error as exc:
            self._lost(pc, f"heartbeat failed: {' '.join(str(exc).split())}", "failed_check")
            return
        self._check_at = time.monotonic() + self.heartbeat
        role = role_of(raw)
        if role == UNKNOWN:
            role = pc.endpoint.role
        if not self._group.connector.belongs(pc.endpoint, role):
            self._lost(pc, f"the group no longer belongs on {pc.endpoint.label} "
                           f"(role {role})", "wrong_role", failed=False)

    # --- losing and regaining the connection ----------------------------------------------

    def _lost(self, pc: PooledConnection, reason: str, discard: str, failed: bool = True) -> None:
        raw = pc.raw
        if not raw.closed and raw.notifies:  # what came before the loss is still news
            self._pending.extend(raw.notifies)
        self._pc = None
        self._lost_info = (reason, time.time(), pc.endpoint.label)
        self._slots.close_connection(pc, discard)
        if failed:
            self._group.on_endpoint_failure(pc.endpoint)  # its idle peers are suspect
        logger.warning("group %r: listener on %s: %s; reconnecting", self._group.name,
                       pc.endpoint.label, reason)

    def _reconnect(self, deadline: float | None) -> None:
        """Connect and LISTEN again, until it works, the listener closes or ``deadline``;
        on success a :class:`Gap` is queued."""
        pause = _RETRY_PAUSE
        while not self._closing:
            budget = _RECONNECT_ROUND  # short rounds, so a close() is seen between them
            if deadline is not None:
                budget = min(budget, deadline - time.monotonic())
                if budget <= 0:
                    return
            try:
                pc = self._slots.open(time.monotonic() + budget, caller_waits=False)
                self._listen_on(pc)
            except PoolClosed:
                self._closing = True
                return
            except (PoolError, psycopg2.Error) as exc:
                logger.info("group %r: listener cannot reconnect yet: %s", self._group.name, exc)
                rest = pause if deadline is None else min(pause, deadline - time.monotonic())
                if rest > 0:
                    self._wait([self._wake_r], rest)  # a close() ends the pause
                pause = min(pause * 2, _RETRY_PAUSE_MAX)
                continue
            reason, lost_at, previous = self._lost_info
            self._slots.counters.gaps += 1
            self._pending.appendleft(Gap(reason, lost_at, time.time(), previous,
                                         pc.endpoint.label))
            logger.warning("group %r: listener resumed on %s; notifications since the loss "
                           "may be missing", self._group.name, pc.endpoint.label)
            return

    def _listen_on(self, pc: PooledConnection) -> None:
        """LISTEN on every channel (bounded round trips), then make ``pc`` the listener's.
        The connection is closed if that fails or is interrupted."""
        try:
            raw = pc.raw
            raw.autocommit = True  # LISTEN takes effect, and notifications arrive, outside
            statement = sql.SQL("; ").join(                     # transactions only
                sql.SQL("LISTEN {}").format(sql.Identifier(name)) for name in self.channels
            ).as_string(raw)
            round_trip(raw, statement, self._backend, pc.endpoint.config.connect_timeout)
        except BaseException:
            self._slots.close_connection(pc, "failed_listen")
            raise
        self._pc = pc
        self._check_at = time.monotonic() + self.heartbeat

    def _shut(self) -> None:
        """Give everything back, once: the connection, the slot, the wake-up pipe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer.detach()
        try:
            self._held.release(self._slots)
        finally:
            if self._on_close is not None:
                self._on_close(self)

    def after_fork_in_child(self) -> None:
        """In the child: the connection was silenced with the group's; drop it untouched."""
        self._finalizer.detach()
        self._lock = self._backend.lock()  # a parent's thread may have held it at fork
        self._pc = None
        self._holds_slot = False
        self._closing = self._closed = True
        self._held.release(self._slots)  # only the pipe is left to close


class Listeners:
    """The live listeners of a pool, held weakly, so that ``Pool.close()`` can stop them."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Listener] = weakref.WeakSet()

    def add(self, listener: Listener) -> None:
        self._live.add(listener)

    def discard(self, listener: Listener) -> None:
        self._live.discard(listener)

    def close_all(self) -> None:
        for listener in list(self._live):
            listener.close()

    def after_fork_in_child(self) -> None:
        for listener in list(self._live):
            listener.after_fork_in_child()
        self._live = weakref.WeakSet()
