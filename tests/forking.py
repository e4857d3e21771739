"""Run a function in a child made with ``os.fork()`` and bring its answer back to the test.

The fork tests ask what the child sees (its own connections, its counters, its listeners)
after the parent's state was copied into it. The child runs the function, writes its answer
to a pipe and leaves with ``os._exit`` (no cleanup: the exit hooks and the pool's objects
are the parent's copies); the parent reads it, within a deadline, and reaps the child by its
PID. While it waits, the parent runs none of its own tasks (the real ``select``, as the
blocking read it replaces): what the child sees is not raced by the parent's hub. Two
gevent traps are stepped around: its ``os.close`` of a pipe waits for the hub to run (so the
pipe's ends are closed with ``posix.close``, else the parent's own write end would hide the
child's exit), and its ``os.waitpid`` never learns of a child that exited while the hub was
held (so the child is reaped by ``posix.waitpid``, ``WNOHANG`` looks between short sleeps).
"""

from __future__ import annotations

import os
import posix
import signal
import struct
import time
import traceback
from collections.abc import Callable

from greenpool.concurrency.originals import original_select

_OK, _FAILED = b"o", b"e"
_LENGTH = struct.Struct("!Q")  # the answer's length, before it


class ChildFailed(AssertionError):
    """The function raised in the child: the message is the child's traceback."""


def run_in_forked_child(fn: Callable[[], object], timeout: float = 30.0) -> str:
    """``str(fn())`` as the forked child returned it. Raises :class:`ChildFailed` (the
    child's traceback) if ``fn`` raised there, and an :class:`AssertionError` if the child
    gave no answer within ``timeout`` seconds (it is then killed) or exited otherwise than
    after answering."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: answer, then leave without cleanup
        code = 1
        try:
            posix.close(read_end)
            try:
                answer = _OK + str(fn()).encode()
            except BaseException:
                answer = _FAILED + traceback.format_exc().encode()
            answer = _LENGTH.pack(len(answer)) + answer
            while answer:
                answer = answer[os.write(write_end, answer):]
            code = 0
        finally:
            os._exit(code)
    posix.close(write_end)
    received: bytes | None = None
    try:
        received = _read_answer(read_end, time.monotonic() + timeout)
    finally:
        posix.close(read_end)
        if received is None:  # no answer in time (or an interruption): the child is stuck
            os.kill(child, signal.SIGKILL)
        status = _reap(child, time.monotonic() + 10)
    if received is None:
        raise AssertionError(f"the forked child gave no answer within {timeout} s")
    if received[:1] == _FAILED:
        raise ChildFailed(received[1:].decode(errors="replace"))
    if received[:1] != _OK or status != 0:
        raise AssertionError(f"the forked child exited with status {status} without an "
                             f"answer: {received!r}")
    return received[1:].decode()


def _reap(child: int, deadline: float) -> int:
    """The exit status of ``child``, reaped by its PID (it has answered, or was killed)."""
    while True:
        try:
            pid, status = posix.waitpid(child, os.WNOHANG)
        except ChildProcessError:  # gevent's child watcher reaped it, and kept its status
            pid, status = os.waitpid(child, os.WNOHANG)
        if pid == child:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"the forked child {child} did not exit after its answer")
        time.sleep(0.005)


def _read_answer(fd: int, deadline: float) -> bytes | None:
    """The answer the child writes to the pipe ``fd``; None if the deadline came first, or
    what arrived if the child closed the pipe (exited) before it was whole."""
    select = original_select("select")
    received = b""
    wanted = _LENGTH.size
    while len(received) < wanted:
        left = deadline - time.monotonic()
        if left <= 0 or not select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return received[_LENGTH.size:]
        received += chunk
        if wanted == _LENGTH.size and len(received) >= wanted:
            wanted += _LENGTH.unpack_from(received)[0]
    return received[_LENGTH.size:]


def fork_a_bystander(seconds: float) -> int:
    """Fork a child that lets its copies of the parent's tasks run for ``seconds`` (the
    mode's sleep: a gevent child runs them on its hub) and leaves without cleanup; the
    child's PID, for the parent to reap. For tests that a fork mid-operation leaves the
    parent's session to the parent."""
    from modes import sleep

    child = os.fork()
    if child == 0:
        try:
            sleep(seconds)
        finally:
            os._exit(0)
    return child
