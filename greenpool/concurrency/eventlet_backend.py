"""The ``eventlet`` mode."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .backend import Backend, Task, Waiter, is_address
from .green_deadline import GreenDeadline
from .waits import cancelling, connecting_wait, install_wait_callback


class _EventletWaiter:
    """eventlet's Event cannot time out cleanly; a zero semaphore can."""

    item: Any = None
    error: BaseException | None = None
    deadline: float | None = None

    def __init__(self, semaphore_class: Any) -> None:
        self._sem = semaphore_class(0)

    def set(self) -> None:
        self._sem.release()

    def wait(self, timeout: float | None) -> bool:
        return bool(self._sem.acquire(blocking=True, timeout=timeout))


class _EventletTask:
    def __init__(self, thread: Any) -> None:
        self._thread = thread

    def kill(self) -> None:
        self._thread.kill()


def _eventlet_getaddrinfo() -> Callable[..., Any]:
    """A ``getaddrinfo`` that never blocks eventlet's hub.

    eventlet's own green resolver (greendns: the hosts file, then DNS over green sockets;
    dnspython is one of eventlet's dependencies) when it is on, as it is unless
    ``EVENTLET_NO_GREENDNS=yes``. Then ``eventlet.green.socket.getaddrinfo`` is the blocking
    one, so the system resolver runs in eventlet's thread pool instead. That pool does not
    survive ``fork()`` (its threads are gone in the child, and a call would wait forever), so
    a child whose parent had started it resolves in place, blocking, but answering.
    """
    from eventlet.green import socket as green_socket
    from eventlet.support import greendns

    if green_socket.getaddrinfo is greendns.getaddrinfo:
        return green_socket.getaddrinfo
    from eventlet import patcher, tpool

    blocking = patcher.original("socket").getaddrinfo
    started_in: list[int] = []  # the process that started the thread pool through us

    def in_thread_pool(*args: Any) -> Any:
        pid = os.getpid()
        if not tpool._setup_already:
            started_in[:] = [pid]
        elif started_in and started_in[0] != pid:
            return blocking(*args)  # we started the pool before a fork: no threads here
        return tpool.execute(blocking, *args)

    return in_thread_pool


class EventletBackend(Backend):
    name = "eventlet"
    can_call_later = True

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eventlet warns about its own deprecation on import
            import eventlet
            import eventlet.hubs
            import eventlet.semaphore
        self._eventlet = eventlet
        self.current = eventlet.getcurrent
        self._semaphore = eventlet.semaphore.Semaphore
        self._getaddrinfo = _eventlet_getaddrinfo()
        self.event_loop = eventlet.hubs.get_hub  # type: ignore[method-assign]

    def waiter(self) -> Waiter:
        return _EventletWaiter(self._semaphore)

    def deadline(self, seconds: float, error: BaseException) -> AbstractContextManager[Any]:
        return GreenDeadline(self.call_later, self.current, seconds, error)

    def call_later(self, seconds: float, func: Callable[[], None]) -> Callable[[], None]:
        return self._eventlet.hubs.get_hub().schedule_call_global(seconds, func).cancel

    def sleep(self, seconds: float) -> None:
        self._eventlet.sleep(seconds)

    def spawn(self, func: Callable[[], None]) -> Task:
        return _EventletTask(self._eventlet.spawn(func))

    def resolve(self, host: str, port: int) -> str | None:
        if is_address(host):
            return None
        infos = self._getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        return str(infos[0][4][0]) if infos else None

    def patch_driver(self) -> None:
        from eventlet.hubs import trampoline
        from psycogreen.eventlet import eventlet_wait_callback

        def make() -> Callable[[Any], None]:
            connecting = connecting_wait(lambda fd: trampoline(fd, read=True),
                                         lambda fd: trampoline(fd, write=True))
            return cancelling(eventlet_wait_callback, connecting)

        install_wait_callback("eventlet", make)
