"""Real faults for the tests: a server that never answers, a probe for a blocked hub, and
an exception placed where a signal handler's could land.

Nothing here is mocked: :class:`BlackHole` is a real listening socket and :class:`Ticker`
measures real wall-clock gaps, so a test that passes proves the behaviour on a real network
stack and a real event loop.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sys
import time
from collections.abc import Iterator
from types import CodeType
from typing import Any

from modes import join_all, sleep, spawn


class BlackHole:
    """A TCP listener that completes the handshake and then never says a word.

    It listens but never accepts: the kernel finishes the handshake for up to ``backlog``
    clients and buffers what they send, so a client sees a connected socket whose reads
    hang -- the classic wedged server or dropped-packet firewall. No thread is needed.
    """

    def __init__(self, host: str = "127.0.0.1", backlog: int = 1024) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.bind((host, 0))
            self._sock.listen(backlog)
        except BaseException:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]

    def __repr__(self) -> str:
        return f"<BlackHole {self.host}:{self.port}>"

    def endpoint(self, **overrides: Any) -> dict[str, Any]:
        """A pgdbpool-format endpoint pointing here (the credentials are never checked)."""
        return {"host": self.host, "port": self.port, "name": "blackhole",
                "user": "blackhole", "pass": "blackhole", **overrides}

    def close(self) -> None:
        """Stop listening; queued clients get a reset, new ones are refused."""
        self._sock.close()

    def __enter__(self) -> BlackHole:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Ticker:
    """Ticks every 10 ms in its own task; a long gap means the event loop was blocked.

    Works in every test mode (a greenlet, or a thread in threaded mode).
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.stamps: list[float] = []
        self._running = True
        self._task = spawn(self._run)

    def _run(self) -> None:
        while self._running:
            self.stamps.append(time.monotonic())
            sleep(self.interval)

    def stop(self) -> float:
        """Stop and return the longest interval between ticks (including the last one)."""
        self._running = False
        join_all([self._task], 2)
        stamps = [*self.stamps, time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(stamps))


@contextlib.contextmanager
def raising_once_at_the_call_of(code: CodeType, exc: BaseException) -> Iterator[list[str]]:
    """``exc`` raised once, on the first instruction of the next call of ``code`` in this
    thread, where a signal handler's exception can land (before the function ran a line).
    A real signal cannot be aimed at one instruction: a trace function raises it there (an
    exception a trace function raises is raised in the frame it traces). The yielded list
    says whether it fired."""
    fired: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code and not fired:
            fired.append(code.co_name)
            raise exc

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield fired
    finally:
        sys.settrace(previous)
