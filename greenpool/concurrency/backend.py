"""What the pool asks of a concurrency mode: the :class:`Backend` interface and the small
protocols it hands out (a one-shot :class:`Signal`, a :class:`Waiter` that carries an item,
a background :class:`Task`). Each mode's module fills in the differences.

Why the cooperative modes use no lock at all: under gevent and eventlet a greenlet only
switches when it blocks, and the pool's critical sections never block (no I/O, no logging,
no waiting inside them), so they are atomic by construction. A lock there would only add
cost (not even ``nullcontext``'s two Python calls: see :class:`NoLock`). In ``threaded``
mode the same sections run under a real ``threading.Lock``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Protocol

from .originals import POLLIN, original_select


class Signal(Protocol):
    """A one-shot wake-up for one waiter."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None) -> bool: ...


class Waiter(Signal, Protocol):
    """A signal that also carries what its task is woken with: a connection or a slot
    (``item``), or an error. One object per waiting task: it is made on every wait."""

    item: Any
    error: BaseException | None
    #: set when the group's line times this waiter out (see :meth:`Backend.call_later`)
    deadline: float | None


class Task(Protocol):
    def kill(self) -> None: ...


class NoLock:
    """The lock of a mode with one thread: ``with`` on it does nothing, in two C calls.
    ``"".format`` takes any arguments and returns ``''`` (falsy, so an exception raised in
    the block propagates), and a builtin method is not bound again when looked up on the
    class; ``nullcontext``'s ``__enter__``/``__exit__`` are Python calls, about 100 ns more
    per section, and a borrow and a return each take one."""

    __slots__ = ()
    __enter__ = __exit__ = "".format


NO_LOCK: AbstractContextManager[Any] = NoLock()  # type: ignore[assignment]


class Backend:
    """What the pool needs from a concurrency model. Subclasses fill in the differences."""

    name = "?"
    #: True when other tasks can run while one waits (a wait can be satisfied by someone).
    can_wait = True
    #: True when :meth:`call_later` works (the green modes, which have an event loop).
    can_call_later = False

    def lock(self) -> AbstractContextManager[Any]:
        return NO_LOCK

    def rlock(self) -> AbstractContextManager[Any]:
        """A lock its holder may take again (an endpoint's methods call each other)."""
        return nullcontext()

    def waiter(self) -> Waiter:
        """A fresh one-shot waiter (``item`` and ``error`` None)."""
        raise NotImplementedError

    def event_loop(self) -> object | None:
        """The event loop the calling task runs in (green modes; one per thread), so that a
        timer armed by one task is known to run where another's does. None: no loop."""
        return None

    def wake_all(self, waiters: list[Waiter]) -> None:
        """``set()`` each of ``waiters``, in order (a fan-out wakes many at once)."""
        for waiter in waiters:
            waiter.set()

    def deadline(self, seconds: float, error: BaseException) -> AbstractContextManager[Any]:
        """Raise ``error`` if the body is still blocked after ``seconds``.

        Needed because with a green wait callback libpq ignores ``connect_timeout``: only the
        event loop can interrupt a hung connect. The blocking modes' wait callback reads the
        thread's deadline instead: there it bounds the driver's waits only.
        """
        return nullcontext()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def call_later(self, seconds: float, func: Callable[[], None]) -> Callable[[], None] | None:
        """Run ``func`` in the event loop after ``seconds``; return what cancels it. None
        where the mode has no event loop: there each waiter times out on its own."""
        return None

    def spawn(self, func: Callable[[], None]) -> Task | None:
        """Start a background task, or return None where the mode has no background work."""
        return None

    #: Identity of the running task: a greenlet, or a thread id. A plain function, not a
    #: method: the handler asks on every block.
    current: Callable[[], Hashable] = staticmethod(threading.get_ident)

    def task_ended(self, task: Hashable) -> bool:
        """Whether the task ``current`` named ``task`` has ended: it can hold nothing any
        more (a thread id no longer running; a greenlet that is dead)."""
        dead = getattr(task, "dead", None)
        if dead is not None:
            return bool(dead)
        return all(thread.ident != task for thread in threading.enumerate())

    def resolve(self, host: str, port: int) -> str | None:
        """An IP address for ``host`` without blocking the hub, or None to let libpq resolve."""
        return None

    def offload(self, func: Callable[[Any], Any], arg: Any) -> Any:
        """``func(arg)``, a C call that releases the GIL (a long text's parse), run where it
        does not block the hub. Inline here: threads run meanwhile anyway."""
        return func(arg)

    def patch_driver(self) -> None:
        """Make psycopg2 cooperate with this mode (idempotent)."""

    def poller(self, fd: int) -> Callable[[], object]:
        """A zero-timeout "does ``fd`` have something to say?" check, truthy when it has data
        or was hung up; never a switch. Made once per connection: a registered ``poll``
        object costs one syscall per check where ``select()`` also builds its fd sets."""
        poll_class = original_select("poll")
        if poll_class is None:  # no poll() on this platform
            real_select = original_select("select")
            return lambda: real_select([fd], [], [], 0)[0]
        poller = poll_class()
        poller.register(fd, POLLIN)
        return partial(poller.poll, 0)


def is_address(host: str) -> bool:
    """True when ``host`` needs no resolving: an IP address or a Unix socket directory."""
    if host.startswith("/"):
        return True  # a Unix socket directory: nothing to resolve
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False
