"""Spawning, joining and interrupting tasks in the test process's concurrency mode.

The mode is chosen per test process (``GREENPOOL_TEST_MODE``, see conftest.py) because gevent
and eventlet monkey-patching are process-wide.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

MODE = os.environ.get("GREENPOOL_TEST_MODE", "gevent")
GREEN = MODE in ("gevent", "eventlet")

if MODE == "gevent":
    import gevent

    Timeout: Any = gevent.Timeout
elif MODE == "eventlet":
    import eventlet

    Timeout = eventlet.Timeout
else:
    Timeout = None


class Task:
    """A started task whose result or exception is kept for the test to check."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event() if not GREEN else None

        def run() -> None:
            try:
                self.result = func(*args)
            except BaseException as exc:
                self.error = exc
            finally:
                if self._done is not None:
                    self._done.set()

        if MODE == "gevent":
            self._handle: Any = gevent.spawn(run)
        elif MODE == "eventlet":
            self._handle = eventlet.spawn(run)
        else:
            self._handle = threading.Thread(target=run, daemon=True)
            self._handle.start()

    def join(self, timeout: float) -> bool:
        if MODE == "gevent":
            self._handle.join(timeout)
            return bool(self._handle.dead)
        if MODE == "eventlet":
            with eventlet.Timeout(timeout, False):
                self._handle.wait()
                return True
            return False
        assert self._done is not None
        return self._done.wait(timeout)


def spawn(func: Callable[..., Any], *args: Any) -> Task:
    return Task(func, *args)


def join_all(tasks: list[Task], timeout: float) -> None:
    """Wait for every task; fail the test if any is still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    for task in tasks:
        if not task.join(max(0.0, deadline - time.monotonic())):
            raise AssertionError(f"a task did not finish within {timeout} s")


def sleep(seconds: float) -> None:
    if MODE == "gevent":
        gevent.sleep(seconds)
    elif MODE == "eventlet":
        eventlet.sleep(seconds)
    else:
        time.sleep(seconds)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition the code under test offers no event for (e.g. a server-side view)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        sleep(0.005)
