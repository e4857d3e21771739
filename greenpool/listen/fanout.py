"""The fan-out state of one group's hub: its subscribers, which channels each wants, their
queues, and handing what the connection received to each of them (``deliver``).

State shared with the subscribers changes under ``_lock``, in sections that never block:
any task may join, leave, read its queue or be garbage-collected while the reader task
(reader.py) delivers. The reader is woken through a pipe (``poke``) when the subscribers
change what it must do.

**Lazy timeouts** (green modes): a subscriber waiting in ``get(timeout)`` does not arm an
event-loop timer per wait (with hundreds of subscribers, arming and cancelling one per
delivered event cost about 0.5 µs, a sixth of the fan-out; benchmarks/sse_cost.py).
Each subscriber has one timer that is left running: a wait only notes its deadline, and
when the timer fires it wakes the subscriber if the current wait's deadline has passed,
else re-arms for it. An SSE route waiting ``get(15)`` between events pays for one timer
per 15 s. A wait whose deadline comes before the running timer's arms one of its own, as
does a wait in another thread's event loop than the reader's (the lazy timer, left running
unreferenced, would neither run there nor keep that loop up).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, deque
from typing import Any

from ..concurrency import Backend, Waiter
from ..connection import PooledConnection
from ..exclusive import ExclusiveSlots
from .subscriber import Gap, Item, Subscriber

try:  # the unpatched write: eventlet's green os.write waits for the fd (a switch) while
    from posix import write as _write  # we hold the lock; the pipe is non-blocking anyway
except ImportError:  # not POSIX
    _write = os.write


class FanOut:
    """The subscribers of one group's shared listening connection and their queues; the
    connection's life is :class:`~greenpool.listen.reader.Hub`'s, which extends this."""

    def __init__(self, slots: ExclusiveSlots, backend: Backend, counters: Counter[str]) -> None:
        self.slots = slots
        self.group = slots.group
        self.backend = backend
        self.inline = not backend.can_wait  # non-threaded: no reader task
        self.counters = counters  # the group's ``listen_dropped``, kept across hubs
        self._lock = backend.lock()
        self.loop = backend.event_loop()  # the reader's (it is started from here)
        self.subs: dict[Subscriber, None] = {}  # in order of arrival
        self._by_channel: dict[str, dict[Subscriber, None]] = {}
        self._active: set[str] = set()  # LISTENed on the current connection
        self.orphans: deque[Subscriber] = deque()  # appended by finalizers, no lock there
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
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    # --- subscribers (any task) ---------------------------------------------------------

    def join(self, sub: Subscriber, heartbeat: float) -> bool:
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

    def leave(self, sub: Subscriber) -> bool:
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

    def _forget(self, sub: Subscriber) -> None:
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
        if sub.cancel_timer is not None:  # the lazy timer would keep sub and hub until it fires
            cancel, sub.cancel_timer, sub.timer_at = sub.cancel_timer, None, 0.0
            cancel()
        sub.wake()

    def _poke(self) -> None:
        """Wake the reader task (the pipe is open while the hub is); it takes no lock."""
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

    def next_item(self, sub: Subscriber) -> Item | None:
        """Under the lock: ``sub``'s next item, or a Gap it is owed once its queue is empty
        and the hub is listening again."""
        if sub.queue:
            return sub.queue.popleft()
        if sub.lost is not None and self.pc is not None and self._active.issuperset(
                sub.channels):
            return self._gap_for(sub)
        return None

    def _gap_for(self, sub: Subscriber) -> Gap:
        assert sub.lost is not None and self.pc is not None
        reason, lost_at, previous = sub.lost
        if sub.dropped:
            reason = f"{reason} ({sub.dropped} notifications not delivered)"
        sub.lost, sub.dropped = None, 0
        self.slots.counters.gaps += 1
        return Gap(reason, lost_at, time.time(), previous, self.pc.endpoint.label)

    # --- lazy timeouts of waiting subscribers (green modes) -------------------------------

    def time_wait(self, sub: Subscriber, deadline: float) -> bool:
        """Under the lock, before ``sub`` waits until ``deadline``: True if its lazy timer
        will wake it in time (then no timer of its own is needed)."""
        if not self.backend.can_call_later or self.backend.event_loop() is not self.loop:
            return False  # another thread's loop (gevent): its wait's own timer keeps it up
        if sub.timer_at == 0.0:
            self._arm(sub, deadline)
        elif sub.timer_at > deadline:
            return False  # the running timer would be late for this shorter wait
        sub.wait_until = deadline
        return True

    def _arm(self, sub: Subscriber, deadline: float) -> None:
        """Under the lock: start ``sub``'s lazy timer for ``deadline``."""
        sub.cancel_timer = self.backend.call_later(max(0.0, deadline - time.monotonic()),
                                                   lambda: self._timer_fired(sub))
        sub.timer_at = deadline

    def _timer_fired(self, sub: Subscriber) -> None:
        """A subscriber's lazy timer (in the event loop): wake its wait if that wait's
        deadline has passed, re-arm for it if not; nothing if it waits without one. A
        closed subscriber's wait is woken whatever its deadline (in a forked child a task
        copied from the parent waits on a subscriber closed without a wake-up)."""
        waiter = None
        with self._lock:
            sub.timer_at, sub.cancel_timer = 0.0, None
            deadline = sub.wait_until
            if deadline is None:
                return
            if not (sub.closed or self.finished) and deadline > time.monotonic():
                self._arm(sub, deadline)
                return
            sub.wait_until = None
            waiter, sub.waiter = sub.waiter, None
        if waiter is not None:
            waiter.set()

    # --- delivery (the reader) -----------------------------------------------------------

    def deliver(self, raw: Any) -> None:
        """Hand what the connection received to the subscribers of each channel."""
        notes = list(raw.notifies)
        del raw.notifies[:]
        if not notes:
            return
        woken: dict[Subscriber, None] = {}
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
            waiters = []
            for sub in woken:
                waiter, sub.waiter = sub.waiter, None
                if waiter is not None:
                    waiters.append(waiter)
        self.backend.wake_all(waiters)
        if dropped:
            self.counters["dropped"] += dropped

    def mark_started(self) -> None:
        """Under no lock: subscribers whose channels are all listened on may return."""
        with self._lock:
            for sub in self.subs:
                if not sub.started and self._active.issuperset(sub.channels):
                    sub.started = True
                    sub.wake()

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

    def stats(self) -> tuple[int, int, int]:
        """(connections, total backlog, largest backlog) of this hub."""
        with self._lock:
            sizes = [len(s.queue) for s in self.subs]
            return (1 if self.pc is not None else 0, sum(sizes), max(sizes, default=0))

    def finish(self) -> None:
        """Give the connection and the slot back (the reader's part, reader.py)."""
        raise NotImplementedError

    def orphaned(self, sub: Subscriber) -> None:
        """A listener was garbage-collected unclosed: the hub removes it at its next round
        (no lock here: this may run inside any locked section) and is woken for that."""
        self.orphans.append(sub)
        if self.inline:  # no reader task: the slots' next use collects it
            self.slots.orphans.append(self.take_orphans)
        else:
            self._poke()
