"""Fork safety for connects in flight: in a forked child, every connect a green task of the
parent had under way is the parent's; the child's copy must neither read nor write a byte
of it. The socket is pointed at /dev/null at fork and the copied task ends quietly."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2

try:
    from greenlet import GreenletExit as _TaskEnd
except ImportError:  # threaded-only installs: no greenlets to copy into a child
    _TaskEnd = BaseException


class InheritedAcrossFork(_TaskEnd):
    """Raised in a forked child into a connect the parent had in flight: the green task
    doing it was copied with the process. Its socket is the parent's (pointed at /dev/null
    in the child), so the copy gives up without reading a byte: the reply is the parent's.
    A ``GreenletExit``, so that the copied task ends quietly; nothing is to be accounted
    for in the child, which starts with no connects in flight."""


#: greenpool's connections that are being opened by a green wait callback right now
connects_in_flight: weakref.WeakSet[Any] = weakref.WeakSet()
#: how many times this process's line was forked (one cell, read on every wait: cheaper
#: than ``os.getpid()``, a system call): a wait that began under another count began in the
#: parent, and whatever ends it in the child is none of the server's business
forks = [0]


def _silence_connects_in_child() -> None:
    """At fork, in the child: every connect in flight is the parent's (see
    :class:`InheritedAcrossFork`). Only syscalls: the child may be about to ``exec``."""
    forks[0] += 1
    for conn in list(connects_in_flight):
        try:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.dup2(devnull, conn.fileno(), inheritable=False)
            finally:
                os.close(devnull)
        except (OSError, psycopg2.Error):
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_silence_connects_in_child)


@contextmanager
def still_connecting(conn: Any) -> Iterator[None]:
    """Treat ``conn`` as a connect in flight while the pool's first queries on it run (the
    role, lag and timeline measured at connect): a fork meanwhile points it at /dev/null in
    the child, so the child's copy of the task cannot touch the parent's session."""
    connects_in_flight.add(conn)
    try:
        yield
    finally:
        connects_in_flight.discard(conn)
