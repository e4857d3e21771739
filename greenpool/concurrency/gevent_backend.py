"""The ``gevent`` mode."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .backend import Backend, Task, is_address
from .green_deadline import GreenDeadline
from .waits import gevent_wait_callback, install_wait_callback


def gevent_waiter_class(base: Any) -> type:
    """A waiter that *is* a gevent ``Waiter`` (a subclass of the compiled one), not an
    ``Event``: a waiting line needs only "wake this one greenlet", once, on the hot path of
    every hand-off under contention, and one object per wait is cheaper than three.
    ``item``/``error`` default on the class, so making one costs no dictionary.
    A wake-up that arrives after the waiter gave up (its timer fired, or it was killed) is
    only stored by gevent's ``Waiter``, never switched into.
    """

    class GeventWaiter(base):
        item: Any = None
        error: BaseException | None = None
        deadline: float | None = None

        def set(self) -> None:
            self.hub.loop.run_callback(self.switch, True)

        def wait(self, timeout: float | None) -> bool:
            if timeout is None:
                return bool(self.get())
            timer = self.hub.loop.timer(timeout)
            timer.start(self.switch, False)
            try:
                return bool(self.get())
            finally:
                timer.close()

    return GeventWaiter


def _switch_each(waiters: list[Any]) -> None:
    """In the hub: switch to each waiter in turn; each switches back when it blocks again."""
    for waiter in waiters:
        waiter.switch(True)  # gevent's Waiter reports an error to the hub, never raises


class GeventBackend(Backend):
    name = "gevent"
    can_call_later = True

    def __init__(self) -> None:
        import gevent
        import gevent.hub
        import gevent.socket

        self._gevent = gevent
        self.current = gevent.getcurrent
        #: the class itself: with no argument its compiled constructor finds the hub
        self.waiter = gevent_waiter_class(gevent.hub.Waiter)  # type: ignore[method-assign]
        self._getaddrinfo = gevent.socket.getaddrinfo
        self.event_loop = gevent.get_hub  # type: ignore[method-assign]

    def wake_all(self, waiters: list[Any]) -> None:
        """One event-loop callback for the lot, as gevent's ``Event`` wakes its links, not one
        per waiter (a fan-out to hundreds of subscribers; measured in sse_cost.py)."""
        if not waiters:
            return
        hub: Any = self.event_loop()
        if any(waiter.hub is not hub for waiter in waiters):
            for waiter in waiters:  # another thread's hub sleeps until told (thread-safely)
                if waiter.hub is hub:
                    waiter.set()
                else:
                    waiter.hub.loop.run_callback_threadsafe(waiter.switch, True)
            return
        hub.loop.run_callback(_switch_each, waiters)

    def deadline(self, seconds: float, error: BaseException) -> AbstractContextManager[Any]:
        return GreenDeadline(self._timer, self.current, seconds, error)

    def _timer(self, seconds: float, func: Callable[[], None]) -> Callable[[], None]:
        """A deadline's timer: it keeps the hub alive, as a ``Timeout`` does (a body waiting
        on nothing else gets the deadline's error, not ``LoopExit``)."""
        timer = self._gevent.get_hub().loop.timer(seconds)
        timer.start(func)
        return timer.close

    def call_later(self, seconds: float, func: Callable[[], None]) -> Callable[[], None]:
        timer = self._gevent.get_hub().loop.timer(seconds, ref=False)  # never keeps a hub alive
        timer.start(func)
        return timer.close

    def sleep(self, seconds: float) -> None:
        self._gevent.sleep(seconds)

    def spawn(self, func: Callable[[], None]) -> Task:
        return self._gevent.spawn(func)

    def resolve(self, host: str, port: int) -> str | None:
        if is_address(host):
            return None
        infos = self._getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        return str(infos[0][4][0]) if infos else None

    def offload(self, func: Callable[[Any], Any], arg: Any) -> Any:
        return self._gevent.get_hub().threadpool.apply(func, (arg,))

    def patch_driver(self) -> None:
        install_wait_callback("gevent", gevent_wait_callback)
