"""Passwords that change: an endpoint's ``password`` may be a function, asked at each connect.

An RDS IAM token lives 15 minutes, a Vault lease rotates: a password fixed at startup stops
working while the pool runs. So ``password`` may be a callable taking no argument; every new
connection asks it (in the connect task, never on a borrow), and connections already open
keep working (PostgreSQL checks a password only at login).

Only the password may be a function. Host, port, database and user name the endpoint
(its label, its role, where placement counts connections); changing those is a new endpoint,
which is what ``Pool.reconfigure`` is for.

The call is bounded by what is left of the attempt's ``connect_timeout``:

* green modes (gevent, eventlet) call it in the connect greenlet, under the mode's timeout.
  It must cooperate (do its I/O through the patched socket module, as any library does in a
  patched process): a function that blocks without yielding blocks the hub, and no timeout
  can interrupt it. One that outlives its bound that way is a failure, with a warning that
  says so, rather than a silent stall;
* threaded modes call it in a helper thread and wait for it up to the bound; one that hangs
  is left behind and the attempt fails; later attempts wait on it (within their own
  bound) rather than start another call, so a hung function costs one thread, not one
  per attempt.

A failure (it raised, hung, returned something that is not a string, or took longer than
the time it left the server, which then did not answer) fails that attempt only: it says
nothing about the server, so the endpoint is neither quarantined nor evicted;
connects leave it alone for a moment and ask again. Its value never appears in a log, an
error or a repr; errors name the function's exception type only (its traceback is logged,
since it is the application's own).
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from .concurrency.backend import Backend
from .concurrency.originals import original_start_thread

logger = logging.getLogger("greenpool")

#: ``ConnectError.kind`` of a connect that failed for want of a password from the function
KIND = "credentials"
_GREEN = ("gevent", "eventlet")


class PasswordUnavailable(Exception):
    """The password function gave no usable password in time (the message says why, never
    the value)."""


class _Overran(BaseException):
    """Raised into a green password call past its bound. Private: never escapes. Not an
    ``Exception``: a function that retries on any error (a retry decorator, a vault client)
    would swallow it, and its call would run unbounded, holding the connect for good."""


def is_supplied(password: Any) -> bool:
    """Whether the configured ``password`` is a function to ask at each connect."""
    return callable(password)


def password_now(supplier: Callable[[], Any], label: str, backend: Backend,
                 seconds: float) -> str | None:
    """Ask ``supplier`` for the password of a connect to ``label`` within ``seconds``."""
    started = time.monotonic()
    if backend.name in _GREEN:
        value = _in_task(supplier, label, backend, seconds)
        took = time.monotonic() - started
        if took > seconds + 0.05:  # the timeout could not fire: it never yielded
            logger.warning(
                "endpoint %s: the password function ran %.2f s without yielding to the event "
                "loop (its bound was %.2f s) and blocked every other task meanwhile; make it "
                "cooperative (patched I/O) or cache its result", label, took, seconds)
            raise PasswordUnavailable(f"the password function blocked the event loop for "
                                      f"{took:.2f} s (bound {seconds:.2f} s)")
    else:
        value = _in_thread(supplier, label, seconds)
    if value is None or (isinstance(value, str) and value and "\x00" not in value):
        return value
    what = "an empty string" if value == "" else (
        "a string with a NUL character" if isinstance(value, str) else
        f"a {type(value).__name__}")
    raise PasswordUnavailable(f"the password function returned {what}, not a password "
                              f"string (or None)")


def _original_lock() -> Any:
    """A lock of the real ``_thread`` module, whichever library patched it."""
    if "eventlet.patcher" in sys.modules:
        from eventlet import patcher

        return patcher.original("_thread").allocate_lock()
    from gevent.monkey import get_original

    return get_original("_thread", "allocate_lock")()


def _failed(label: str, exc: BaseException) -> PasswordUnavailable:
    """The failure as a connect error. Neither the log nor the error holds the exception's
    text (a vault client's message may quote the token): its type and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    logger.warning("endpoint %s: the password function raised %s%s (its message is not "
                   "logged: it may hold a secret)", label, type(exc).__name__, where)
    return PasswordUnavailable(f"the password function raised {type(exc).__name__}")


def _in_task(supplier: Callable[[], Any], label: str, backend: Backend, seconds: float) -> Any:
    overran = _Overran()
    failure: PasswordUnavailable | None = None
    try:
        with backend.deadline(seconds, overran):
            return supplier()
    except _Overran as exc:
        if exc is not overran:
            raise
        failure = PasswordUnavailable(f"the password function gave no answer within "
                                      f"{seconds:.2f} s")
    except Exception as exc:
        failure = _failed(label, exc)
    raise failure  # outside the except: the function's exception is not even its context


#: per password function (by id; kept referenced so that the id stays its own), the done
#: lock of a call that outlived its caller's bound: the next connects wait on it rather
#: than each leave one more thread behind
_overdue: dict[int, tuple[Callable[[], Any], Any]] = {}


def _in_thread(supplier: Callable[[], Any], label: str, seconds: float) -> Any:
    started = time.monotonic()
    hung = _overdue.get(id(supplier), (None, None))[1]
    if hung is not None:
        if not hung.acquire(timeout=seconds):
            raise PasswordUnavailable(f"the password function gave no answer within "
                                      f"{seconds:.2f} s to a call begun earlier (none more "
                                      f"is started until it returns)")
        hung.release()  # done: every waiter on it sees so
        _overdue.pop(id(supplier), None)
        seconds = max(seconds - (time.monotonic() - started), 0.001)
    done = _original_lock()  # real OS threads on both sides, whatever a library patched
    done.acquire()
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, supplier()))
        except BaseException as exc:
            box.append((False, exc))
        finally:
            done.release()

    original_start_thread()(run, ())
    if not done.acquire(timeout=seconds):
        _overdue[id(supplier)] = (supplier, done)
        raise PasswordUnavailable(f"the password function gave no answer within "
                                  f"{seconds:.2f} s (it is left running)")
    ok, value = box[0]
    if ok:
        return value
    raise _failed(label, value) from None
