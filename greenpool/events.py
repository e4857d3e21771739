"""Endpoint and group state changes, handed to the application's ``on_event`` callback.

For alerting: the pool calls ``on_event(event)`` (a top-level configuration key) with a
:class:`PoolEvent` when an endpoint is quarantined or back, promoted or demoted, lagging
beyond a group's ``max_lag`` or caught up, seen in a split brain, and when a group cannot
connect to any endpoint (and when it can again).

Events are noticed wherever the pool learns them (a connect task, housekeeping, a borrow
that sees a new role), in sections that must not block. So they are only queued there; a
task of their own (a greenlet, or a thread in ``threaded`` mode) calls the callback, one
event at a time, in order. The callback may block (send an HTTP request) without holding
up a borrow; an exception it raises is logged and the next event is delivered.
``non-threaded`` mode has no background: the callback runs where the event was noticed.
A callback slower than the events come keeps the latest ``QUEUE_MAX`` of them (the older
ones are dropped, with a warning): alerting lags, memory does not grow.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from .concurrency.backend import Backend

logger = logging.getLogger("greenpool")

#: events kept for a callback that cannot keep up
QUEUE_MAX = 1000
#: every ``PoolEvent.kind``
KINDS = ("quarantined", "back", "promoted", "demoted", "lagging", "caught_up", "split_brain",
         "cannot_connect", "connected")


def no_event(kind: str, detail: str) -> None:
    """The ``on_event`` of an endpoint or connector that nobody listens to yet."""


@dataclass(frozen=True)
class PoolEvent:
    """One state change. ``endpoint`` is the endpoint's label (``host:port/dbname``, never a
    password), ``group`` the group's name where the change is the group's; ``detail`` a
    sentence for a human; ``at`` the wall-clock time (``time.time()``)."""

    kind: str
    endpoint: str | None
    group: str | None
    detail: str
    at: float


class Events:
    """The queue between where events are noticed and the callback."""

    def __init__(self, callback: Callable[[PoolEvent], object] | None, backend: Backend) -> None:
        self.callback = callback
        self._backend = backend
        self._queue: deque[PoolEvent] = deque(maxlen=QUEUE_MAX)
        self.dropped = 0
        self._lock = backend.lock()
        self._delivering = False
        self._pid = os.getpid()

    def emit(self, kind: str, *, endpoint: str | None = None, group: str | None = None,
             detail: str = "") -> None:
        """Queue an event (never blocks, never raises) and make sure a task delivers it."""
        if self.callback is None:
            return
        if len(self._queue) == QUEUE_MAX:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("the on_event callback cannot keep up: %d events wait; the "
                               "oldest are dropped from now on", QUEUE_MAX)
        self._queue.append(PoolEvent(kind, endpoint, group, detail, time.time()))
        with self._lock:
            self._forget_if_forked()
            if self._delivering:
                return
            self._delivering = True
        try:
            task = self._backend.spawn(partial(self._deliver, os.getpid()))
        except Exception:
            task = None
        if task is None:  # non-threaded (or no task could start): here and now
            self._deliver(os.getpid())

    def _forget_if_forked(self) -> None:
        """In a child forked since the last look (the caller holds the lock): the parent's
        queued events and delivering task are the parent's; only the last event, just
        noticed here, is kept."""
        if self._pid != os.getpid():
            self._pid, self._delivering = os.getpid(), False
            while len(self._queue) > 1:
                self._queue.popleft()

    def _deliver(self, pid: int) -> None:
        while True:
            with self._lock:
                if os.getpid() != pid:  # a green task the forked child inherited: the parent's
                    return
                if not self._queue:
                    self._delivering = False
                    return
                event = self._queue.popleft()
            callback = self.callback
            if callback is None:
                continue
            try:
                callback(event)
            except Exception:
                logger.warning("the on_event callback raised on a %r event; the pool goes on",
                               event.kind, exc_info=True)
            except BaseException:  # this task ends (killed, a signal): the next emit starts one
                with self._lock:
                    self._delivering = False
                raise
