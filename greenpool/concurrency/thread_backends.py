"""The blocking modes: ``threaded`` (OS threads, real locks) and ``non-threaded`` (one caller,
no background work). They share the deadline that the blocking wait callback reads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .backend import Backend, Task, Waiter
from .waits import BlockingDeadline, blocking_wait_callback, install_wait_callback


class _ThreadTask:
    def __init__(self, func: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=func, name="greenpool-maintenance", daemon=True)
        self._thread.start()

    def kill(self) -> None:  # the loop exits on its own once the pool's stop signal is set
        pass


class _ThreadWaiter(threading.Event):
    item: Any = None
    error: BaseException | None = None
    deadline: float | None = None


class ThreadedBackend(Backend):
    name = "threaded"

    def lock(self) -> AbstractContextManager[Any]:
        return threading.Lock()

    def rlock(self) -> AbstractContextManager[Any]:
        return threading.RLock()

    def waiter(self) -> Waiter:
        return _ThreadWaiter()

    def spawn(self, func: Callable[[], None]) -> Task:
        return _ThreadTask(func)

    def deadline(self, seconds: float, error: BaseException) -> AbstractContextManager[Any]:
        return BlockingDeadline(seconds, error)

    def patch_driver(self) -> None:
        # Not over a green callback someone installed (a threaded pool in a gevent process):
        # replacing it would block that process's hub.
        install_wait_callback("blocking", blocking_wait_callback, only_if_none=True)


class _NeverWaiter:
    """With a single thread and no greenlets nobody else can hand a connection back."""

    item: Any = None
    error: BaseException | None = None
    deadline: float | None = None

    def set(self) -> None:
        pass

    def wait(self, timeout: float | None) -> bool:
        return False


class SingleBackend(Backend):
    """``non-threaded``: one caller at a time, no background work, no locking."""

    name = "non-threaded"
    can_wait = False

    def waiter(self) -> Waiter:
        return _NeverWaiter()

    deadline = ThreadedBackend.deadline
    patch_driver = ThreadedBackend.patch_driver
