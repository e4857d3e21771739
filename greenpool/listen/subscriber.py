"""What a subscriber asks for and receives: channel names, the items of its stream
(``Notify`` and :class:`Gap`), and its bounded queue as the hub sees it.

**Channel names** are the exact strings ``pg_notify()`` takes and ``Notify.channel`` shows:
``listen(g, 'Jobs')`` sends ``LISTEN "Jobs"`` and hears ``pg_notify('Jobs', ...)`` and
``NOTIFY "Jobs"``, never ``NOTIFY Jobs`` (which PostgreSQL folds to ``jobs``).

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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Union

import psycopg2

from ..concurrency import Waiter

_MAX_CHANNEL_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: a longer name would be truncated
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


class Subscriber:
    """A subscriber's state as the hub sees it (the :class:`Listener` is only a handle, so
    that a listener dropped without ``close()`` can be garbage-collected)."""

    __slots__ = ("busy", "cancel_timer", "channels", "closed", "deadline", "dropped", "lost",
                 "max_backlog", "queue", "start_error", "started", "timer_at", "wait_until",
                 "waiter")

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
        #: monotonic deadline of the current get() wait, None when it has none (or none waits)
        self.wait_until: float | None = None
        #: when the hub's lazy timer for this subscriber fires (0: not armed; green modes)
        self.timer_at = 0.0
        self.cancel_timer: Callable[[], None] | None = None  # stops that timer

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set()

