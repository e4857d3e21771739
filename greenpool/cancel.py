"""Cancel a statement on the server when its caller gives up on it.

A statement interrupted on the client (a ``gevent.Timeout``, a kill, a deadline of ours)
keeps running on the server until it ends by itself: under load every timeout would leave
work behind and make the overload worse. Only a cancel request stops it.

Why not ``connection.cancel()``: once the wait callback has raised, psycopg2 closes the
connection (``closed == 2``) and frees its cancel object, so the call comes too late, and
calling it from another thread races with that free. Instead, while the interruption is
still inside our wait callback (the connection still open), we ask the libpq that psycopg2
has already loaded for a cancel object of our own (``PQcancelCreate``, libpq >= 17, bounded
by the connection's ``connect_timeout``; else ``PQgetCancel``). That copies the server's
address and the backend's key, no I/O. The blocking request then runs in a plain OS thread
(ctypes releases the GIL), never on the hub, and frees the object itself: psycopg2 freeing
its own cannot race with it.

Best effort by nature: with no libpq found (not Linux, or a driver that hides it) nothing is
cancelled and the statement runs to its end, as before. At most :data:`MAX_IN_FLIGHT` cancels
run at once (a server that does not answer would otherwise collect one thread per timeout).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from typing import Any

from psycopg2 import extensions

logger = logging.getLogger("greenpool")

_ACTIVE = extensions.TRANSACTION_STATUS_ACTIVE
#: cancels running at once, at most; more are skipped (and logged at DEBUG)
MAX_IN_FLIGHT = 8

#: a token per cancel request counted in flight: set add/discard are atomic under the GIL
#: (no lock needed), and discarding a token twice uncounts it once
_in_flight: set[object] = set()
if hasattr(os, "register_at_fork"):  # a child has none of the parent's threads
    os.register_at_fork(after_in_child=_in_flight.clear)
_libpq: Any = None
_libpq_loaded = False


def _find_libpq() -> str | None:
    """The path of the libpq psycopg2 uses, as this process has loaded it.

    psycopg2-binary bundles its own (under ``psycopg2_binary.libs``). Another driver in the
    process (psycopg 3's binary package) may have loaded a second one, whose structures
    need not match psycopg2's connection: when it is not clear which copy is psycopg2's,
    there is no cancel rather than a wrong one.
    """
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.rsplit(None, 1)[-1] for line in maps if "/libpq" in line}
    except OSError:
        return ctypes.util.find_library("pq")
    loaded = {path for path in loaded if ".so" in path}
    ours = [path for path in loaded if "psycopg2" in path]
    if len(ours) == 1:
        return ours[0]
    if len(loaded) == 1 and not ours:
        return loaded.pop()
    return None


def _load() -> Any:
    global _libpq, _libpq_loaded
    if _libpq_loaded:
        return _libpq
    _libpq_loaded = True
    path = _find_libpq()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)  # already loaded: the same handle, no second copy
    except OSError:
        return None
    voidp = ctypes.c_void_p
    if hasattr(lib, "PQcancelCreate"):
        lib.PQcancelCreate.restype = voidp
        lib.PQcancelCreate.argtypes = [voidp]
        lib.PQcancelBlocking.argtypes = [voidp]
        lib.PQcancelFinish.argtypes = [voidp]
    lib.PQgetCancel.restype = voidp
    lib.PQgetCancel.argtypes = [voidp]
    lib.PQcancel.argtypes = [voidp, ctypes.c_char_p, ctypes.c_int]
    lib.PQfreeCancel.argtypes = [voidp]
    _libpq = lib
    return lib


def cancel_job(conn: Any) -> Callable[[], None] | None:
    """What cancels the statement ``conn`` is running, as a blocking call for another thread;
    None if it runs none (connecting, idle) or there is no way to cancel.

    Must be called while ``conn`` is still open: in the wait callback that was interrupted.
    """
    try:
        if conn.closed or conn.info.transaction_status != _ACTIVE:
            return None
        lib = _load()
        if lib is None:
            return None
        pgconn = conn.pgconn_ptr
        if not pgconn:
            return None
        if hasattr(lib, "PQcancelCreate"):
            handle = lib.PQcancelCreate(pgconn)
            if handle:
                return lambda: _cancel_new(lib, handle)
        handle = lib.PQgetCancel(pgconn)
        if handle:
            return lambda: _cancel_old(lib, handle)
    except Exception:  # best effort: never turn an interruption into another error
        logger.debug("greenpool: could not prepare a cancel request", exc_info=True)
    return None


def _cancel_new(lib: Any, handle: int) -> None:
    try:
        lib.PQcancelBlocking(handle)  # bounded by the connection's connect_timeout
    finally:
        lib.PQcancelFinish(handle)


def _cancel_old(lib: Any, handle: int) -> None:
    errbuf = ctypes.create_string_buffer(256)
    try:
        lib.PQcancel(handle, errbuf, 256)
    finally:
        lib.PQfreeCancel(handle)


def run_cancel(job: Callable[[], None], start_thread: Callable[..., Any]) -> bool:
    """Run ``job`` in a new OS thread started by ``start_thread`` (the unpatched
    ``_thread.start_new_thread``); False if too many cancels are already in flight."""
    # who runs and uncounts it, settled by one atomic pop of the token: the thread, if it
    # begins, or this caller when starting it raised before it began (an exception can
    # also land after the thread started, as start_new_thread returns: then the thread
    # owns it, and runs the job). Counted inside the try: an exception landing as the add
    # returns is this caller's to uncount too. Counted, then checked: threads that ask at
    # once may all back out, but never more than the bound run
    token = object()
    owner = [token]
    try:
        _in_flight.add(token)
        if len(_in_flight) > MAX_IN_FLIGHT:
            _in_flight.discard(token)
            logger.debug("greenpool: %d cancel requests in flight; skipping one",
                         MAX_IN_FLIGHT)
            return False
        start_thread(_run_and_count, (job, owner))
    except BaseException:
        if _claimed(owner) is not None:  # else the thread began: it uncounts
            _in_flight.discard(token)
        raise
    return True


def _claimed(owner: list[object]) -> object | None:
    """The token of ``owner``, for the first to ask (None for the second)."""
    try:
        return owner.pop()
    except IndexError:
        return None


def _run_and_count(job: Callable[[], None], owner: list[object]) -> None:
    token = _claimed(owner)
    if token is None:
        return  # the caller's start was interrupted and it took the job back
    try:
        job()
    except BaseException:
        pass  # nobody to tell: the statement may simply have ended meanwhile
    finally:
        _in_flight.discard(token)


def cancels_in_flight() -> int:
    """How many cancel requests are running now (for tests and debugging)."""
    return len(_in_flight)
