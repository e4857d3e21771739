"""psycopg2's wait callbacks, one per kind of mode.

Every mode installs a psycopg2 wait callback of ours. In the green modes it waits as
psycogreen's does (gevent's own loop; eventlet's wraps psycogreen's), plus one thing: when
the wait is interrupted (a timeout, a kill) while a statement runs, it
asks the server to cancel that statement, from an OS thread (see cancel.py). In the blocking
modes it is a ``poll()`` loop that honours the running thread's :meth:`Backend.deadline`:
a gevent timeout cannot reach a blocking libpq call, so without it a stalled server would
hold a thread for ever.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
from psycopg2 import extensions

from ..cancel import cancel_job, run_cancel
from ..open_blocks import block_open
from .fork import InheritedAcrossFork, connects_in_flight, forks
from .originals import POLLIN, original_select, original_start_thread

_STATUS_SETUP = extensions.STATUS_SETUP
_POLL_OK = extensions.POLL_OK
_POLL_READ = extensions.POLL_READ
_POLL_WRITE = extensions.POLL_WRITE


def cancel_interrupted(conn: Any) -> None:
    """A wait on ``conn`` was interrupted: cancel its running statement, off the hub."""
    job = cancel_job(conn)
    if job is not None:
        try:
            run_cancel(job, original_start_thread())
        except Exception:
            pass  # best effort: the interruption itself is what the caller must see


def interrupted(conn: Any, began: int, opening: bool) -> None:
    """A wait on ``conn`` that began at fork count ``began`` was ended by an exception;
    ``opening``: the wait was the connect's (it began in psycopg2's setup status, which
    its first poll leaves for a private "connecting" one).

    A connect's connection is closed at once: psycopg2 never hands it to anyone, and the
    exception's traceback holds it (through the callback's frames) until a garbage
    collection, its half-open session kept on the server meanwhile (up to
    ``authentication_timeout``, a minute; ``DROP DATABASE`` waits for it). A statement's is
    cancelled on the server. A wait the process was forked in is the parent's: the child
    touches neither (closing a half-done TLS handshake writes to the shared socket)."""
    if forks[0] != began:
        return
    if opening:
        try:
            conn.close()
        except Exception:
            pass  # best effort: the interruption itself is what the caller must see
    else:
        cancel_interrupted(conn)


def cancelling(wait: Callable[..., None],
               connecting: Callable[[Any], None] | None = None) -> Callable[[Any], None]:
    """``wait`` (psycogreen's callback) that, when interrupted, cancels the statement it was
    waiting for or closes the connection it was opening (:func:`interrupted`). It must
    happen here: once the callback has raised, psycopg2 closes a statement's connection
    and the chance is gone. A try block costs nothing until something raises.
    ``connecting`` (see :func:`connecting_wait`) waits for greenpool's own connects, which
    a fork must be able to take from the child's copy of their task."""

    def cancelling_wait(conn: Any) -> None:
        began, opening = forks[0], conn.status == _STATUS_SETUP
        try:
            if connecting is not None and opening and getattr(conn, "greenpool_owned", False):
                connecting(conn)
            else:
                wait(conn)
        except BaseException:
            interrupted(conn, began, opening)
            raise

    return cancelling_wait


def connecting_wait(wait_read: Callable[[int], Any],
                    wait_write: Callable[[int], Any]) -> Callable[[Any], None]:
    """The wait of one of greenpool's connects in a green mode (``wait_read``/``wait_write``:
    the loop's I/O waits). The connect is tracked while it runs, so that a fork meeting it
    in flight points its socket at /dev/null in the child, and the child's copy of the task
    gives up (:class:`InheritedAcrossFork`) before it polls: else it would read the reply
    the parent waits for, and answer it (a TLS alert that ends the parent's handshake)."""
    getpid = os.getpid

    def wait_connecting(conn: Any) -> None:
        pid = getpid()
        connects_in_flight.add(conn)
        try:
            while True:
                if getpid() != pid:
                    raise InheritedAcrossFork("a connect of the parent process, in the child")
                state = conn.poll()
                if state == _POLL_OK:
                    return
                if state == _POLL_READ:
                    wait_read(conn.fileno())
                elif state == _POLL_WRITE:
                    wait_write(conn.fileno())
                else:
                    raise psycopg2.OperationalError(f"unexpected poll state {state!r}")
        finally:
            connects_in_flight.discard(conn)

    return wait_connecting


def gevent_wait_callback() -> Callable[[Any], None]:
    """psycopg2's non-blocking protocol, each wait a gevent I/O wait (what psycogreen does),
    in one frame with the cancel on interruption: this runs for every statement. A connect
    of greenpool's is tracked while it runs, so that a fork meeting it in flight cannot let
    the child's copy of the task read the parent's handshake.

    A wait the process was forked in (a ``subprocess`` child of a gevent app can run the
    parent's green tasks before it execs) ends in the child with an error, its connection
    pointed at /dev/null; it must not cancel: the request would carry the parent's backend
    key to the server and cancel the parent's statement, which goes on unharmed otherwise."""
    from gevent.socket import wait_read, wait_write

    _connecting_wait = connecting_wait(wait_read, wait_write)

    def gevent_wait(conn: Any) -> None:
        began, opening = forks[0], conn.status == _STATUS_SETUP
        if opening and getattr(conn, "greenpool_owned", False):
            try:
                _connecting_wait(conn)
            except BaseException:
                interrupted(conn, began, opening)
                raise
            return
        try:
            while True:
                state = conn.poll()
                if state == _POLL_OK:
                    return
                if state == _POLL_READ:
                    wait_read(conn.fileno())
                elif state == _POLL_WRITE:
                    wait_write(conn.fileno())
                else:
                    raise psycopg2.OperationalError(f"unexpected poll state {state!r}")
        except BaseException:
            interrupted(conn, began, opening)
            raise

    return gevent_wait


class _Deadlines(threading.local):
    """The running thread's earliest driver deadline, or None."""

    current: BlockingDeadline | None = None


_deadlines = _Deadlines()
_POLL_OK = extensions.POLL_OK
_POLL_READ = extensions.POLL_READ
_POLL_WRITE = extensions.POLL_WRITE


def blocking_wait_callback() -> Callable[[Any], None]:
    """The wait callback of the blocking modes: psycopg2 in its non-blocking protocol, waited
    for with ``poll()`` up to the thread's deadline. Past it, the running statement is
    cancelled and the deadline's error raised; psycopg2 then closes the connection, which
    the pool discards. Without a deadline it waits as long as a blocking call would."""
    poll_class = original_select("poll")
    monotonic = time.monotonic
    pollin, pollout = POLLIN, getattr(select, "POLLOUT", 4)

    def blocking_wait(conn: Any) -> None:
        began, opening = forks[0], conn.status == _STATUS_SETUP
        try:
            deadline = _deadlines.current
            while True:
                state = conn.poll()
                if state == _POLL_OK:
                    return
                if state == _POLL_READ:
                    mask = pollin
                elif state == _POLL_WRITE:
                    mask = pollout
                else:
                    raise psycopg2.OperationalError(f"unexpected poll state {state!r}")
                timeout_ms = None
                if deadline is not None:
                    left = deadline.at - monotonic()
                    if left <= 0:  # raised only if its block is open (see BlockingDeadline)
                        deadline = _in_force(deadline, sys._getframe())
                        if deadline is not None:
                            left = deadline.at - monotonic()
                            if left <= 0:
                                raise deadline.error
                    if deadline is not None:
                        timeout_ms = int(left * 1000) + 1
                poller = poll_class()
                poller.register(conn.fileno(), mask)
                poller.poll(timeout_ms)
        except BaseException:
            interrupted(conn, began, opening)
            raise

    return blocking_wait


class BlockingDeadline:
    """:meth:`Backend.deadline` of the blocking modes: read by :func:`blocking_wait`, so it
    bounds the driver's waits (connects, queries), not arbitrary code in the body.

    Its ``__exit__`` can be cut short before its first line (an exception from a signal
    handler), leaving it in force on the thread after its block: every later wait would
    raise its error, which belongs to a call long gone. So an expired deadline is raised
    only while its ``with`` block is still open (:mod:`greenpool.open_blocks`); one whose
    block is over is dropped for the one it had replaced."""

    __slots__ = ("_entered_at", "_entered_in", "_saved", "_seconds", "at", "error")

    def __init__(self, seconds: float, error: BaseException) -> None:
        self._seconds = seconds
        self.error = error
        self.at = 0.0
        self._saved: BlockingDeadline | None = None
        self._entered_in: Any = None
        self._entered_at = 0

    def __enter__(self) -> None:
        caller = self._entered_in = sys._getframe(1)
        self._entered_at = caller.f_lasti
        saved = self._saved = _deadlines.current
        at = self.at = time.monotonic() + self._seconds
        if saved is None or at < saved.at:  # a nested deadline never extends an outer one
            _deadlines.current = self

    def __exit__(self, *exc_info: object) -> None:
        _deadlines.current = self._saved
        self._entered_in = None

    def in_force(self, running: Any) -> bool:
        frame = self._entered_in
        return frame is not None and block_open(frame, self._entered_at, running) is not False


def _in_force(deadline: BlockingDeadline | None, running: Any) -> BlockingDeadline | None:
    """``deadline``, or the first one it replaced whose block is still open (the thread's
    deadline becomes that one)."""
    while deadline is not None and not deadline.in_force(running):
        deadline = deadline._saved
    _deadlines.current = deadline
    return deadline


#: one callback object per kind, so re-installing is recognised (and idempotent)
_WAIT_CALLBACKS: dict[str, Callable[[Any], None]] = {}


def install_wait_callback(
    kind: str, make: Callable[[], Callable[[Any], None]], *, only_if_none: bool = False
) -> None:
    callback = _WAIT_CALLBACKS.get(kind)
    if callback is None:
        callback = _WAIT_CALLBACKS.setdefault(kind, make())
    current = extensions.get_wait_callback()
    if current is callback or (only_if_none and current is not None):
        return
    extensions.set_wait_callback(callback)
