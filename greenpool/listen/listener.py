"""The public handle, :class:`Listener`, and :class:`Listeners`, the hubs of a pool (one per
group at most) through which ``Pool.listen()`` joins or makes a hub."""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ..concurrency import Backend
from ..errors import PoolClosed, PoolTimeout
from ..exclusive import ExclusiveSlots
from .reader import Hub, RetryStart
from .subscriber import Item, Subscriber


class Listener:
    """Notifications of some channels, read by one task at a time.

    ``for item in listener:`` yields ``psycopg2.extensions.Notify`` objects (``channel``,
    ``payload``, ``pid``) and :class:`Gap` markers until the listener is closed;
    :meth:`get` with a timeout returns None when nothing came (an SSE route's keep-alive
    tick). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, hub: Hub, sub: Subscriber, heartbeat: float) -> None:
        self.channels = sub.channels
        self.heartbeat = heartbeat
        self.max_backlog = sub.max_backlog
        self._hub = hub
        self._sub = sub
        self._finalizer = weakref.finalize(self, hub.orphaned, sub)
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
                if isinstance(error, PoolTimeout) and time.monotonic() >= deadline:
                    # the hub's connect ran out of the time of the callers it served, and
                    # counted none: each one it fails counts its own timeout
                    hub.slots.counters.timeouts += 1
                raise error
            if closed:
                self.close()
                raise PoolClosed(f"group {hub.group.name!r}: the listener was closed (the "
                                 f"pool was closed) while it connected")
            if remaining <= 0:
                self.close()
                why = f"; last error: {hub.last_error}" if hub.last_error else ""
                busy = (f"group {hub.group.name!r}: not listening on {list(self.channels)} "
                        f"within {timeout:.2f} s{why}")
                # told like any caller whose time ran out, counted as a dedicated one
                hub.slots.counters.timeouts += 1
                raise hub.group.connector.timed_out(
                    lambda: busy, count=False)  # noqa: B023 (called now)
            if waiter is not None:
                waiter.wait(remaining)
            else:
                hub.step(deadline)

    def close(self) -> None:
        """Stop listening (from any task): the channels nobody else wants are UNLISTENed,
        and the last listener of a group closes the shared connection (waiting at most one
        round trip for that; an interruption of ``get()`` or ``listen()``, or an exception
        leaving the ``with`` block, does not wait). A task blocked in :meth:`get` wakes and
        gets None (its ``for`` loop ends). Idempotent."""
        if self._leave():
            self._hub.end_wait()

    def _leave(self) -> bool:
        """Leave the hub without waiting for its reader: True if this was its last
        subscriber and the reader task is still to give the connection and slot back (it
        does so by itself: a connect it waits for is cut, a round trip ends within its
        bound). An exception in flight (a kill, a ``gevent.Timeout``) leaves this way, so
        that it reaches its catcher at once."""
        self._finalizer.detach()
        hub = self._hub
        if not hub.leave(self._sub):
            return False
        if hub.inline:
            hub.finish()
            return False
        return True

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:  # an exception in flight is not held up by the reader
            self._leave()

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
        seconds passed with nothing to return (a NaN ``timeout``: ValueError). Any exception
        out of here (a kill, a ``gevent.Timeout``) closes the listener."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline != deadline:  # NaN: no wait could ever end (nor time out) by it
            raise ValueError(f"Listener.get(): timeout must be a number of seconds or None, "
                             f"not {timeout!r}")
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
            self._leave()  # the interruption surfaces at once, not after the reader's call
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
                if remaining is not None:
                    if remaining <= 0:
                        return None
                    # a longer wait raises OverflowError in a thread (the loop waits again)
                    remaining = min(remaining, threading.TIMEOUT_MAX)
                waiter = None
                if not hub.inline:
                    if hub.ended:
                        sub.closed = True
                        return None
                    waiter = sub.waiter = hub.backend.waiter()
                    if deadline is not None and hub.time_wait(sub, deadline):
                        remaining = None  # the subscriber's lazy timer wakes it (fanout.py)
            if waiter is None:
                if not hub.step(deadline):
                    self.close()
                    return None
                continue
            try:
                waiter.wait(remaining)
            finally:
                sub.wait_until = None


class Listeners:
    """The hubs of a pool (one per group at most), so that ``Pool.close()`` can stop them
    and ``stats()`` report their subscribers' backlog."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._lock = backend.lock()
        self._hubs: dict[str, Hub] = {}
        self._dropped: dict[str, Counter[str]] = {}

    def listen(self, slots: ExclusiveSlots, channels: tuple[str, ...], *,
               timeout: float | None, heartbeat: float, max_backlog: int) -> Listener:
        name = slots.group.name
        deadline = slots.deadline(timeout)
        sub = Subscriber(channels, max_backlog, deadline)
        with self._lock:
            hub = self._hubs.get(name)
            new = hub is None or not hub.join(sub, heartbeat)
            if new:
                counters = self._dropped.setdefault(name, Counter())
                hub = self._hubs[name] = Hub(slots, self._backend, counters)
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
        except RetryStart:
            listener.close()
            left = deadline - time.monotonic()
            return self.listen(slots, channels, timeout=max(0.0, left),
                               heartbeat=heartbeat, max_backlog=max_backlog)
        except BaseException:  # interrupted while waiting: leave the hub as it was, at
            listener._leave()  # once (a first connect the hub waits for is cut)
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

    def recheck(self) -> None:
        """The groups changed (``reconfigure()``): each hub checks at once that its group
        still belongs where it listens, and moves if not (one Gap per subscriber)."""
        with self._lock:
            hubs = list(self._hubs.values())
        for hub in hubs:
            hub.check_now()

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
