"""A Django connection as a greenpool loan: taken by one task, given back exactly once.

Django keeps one connection per alias per thread — per greenlet under gevent — and closes
it when a request ends (``close_old_connections``) or when code calls ``close()``. A greenlet
spawned by hand, or a task that never reaches the end-of-request signal, would keep its
connection forever. So each loan also watches the task that took it:

* a ``gevent.Greenlet`` (``gevent.spawn``, gunicorn's request greenlets, Celery's gevent
  pool): ``rawlink`` — the loan is given back as soon as the greenlet ends;
* a thread: an object kept in its ``threading.local``, which CPython drops as the thread
  ends — the loan is given back then;
* any other greenlet: a ``weakref.finalize`` on it — the loan is given back once the ended
  greenlet is collected (CPython: when its last reference goes).

Either callback runs where the task ended (gevent: in the hub, which must not block), so the
give-back itself — a ROLLBACK and maybe a DISCARD ALL, each bounded by connect_timeout — runs
in a task of its own.

Every cursor of the connection (Django's, and any made on ``connection.connection`` with
any ``cursor_factory``) is greenpool's tracking cursor (:mod:`greenpool.cursors`): it marks
the loan dirty when a statement may change the session (``SET``, ``SET ROLE`` from
``assume_role``, temp tables, ...; see :mod:`greenpool.sessionstate`), so only those loans
pay for ``DISCARD ALL``; its statements run through :meth:`Loan.run` (a deadline; a
statement that finds its server gone evicts that server's idle connections at once); and
it fails once its loan was given back.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import psycopg2

from ..connection import PooledConnection
from ..group import Group
from ..statement_failures import statement_failed


class Loan:
    """One connection of ``group`` lent to the task that called :meth:`take`."""

    __slots__ = ("__weakref__", "_unwatch", "bound", "discard", "group", "pc", "raw")

    def __init__(self, group: Group, timeout: float | None) -> None:
        self.group = group
        self.discard = ""
        self._unwatch: Any = None
        pc = group.acquire(timeout)
        self.pc: PooledConnection | None = pc
        try:
            raw = self.raw = pc.raw
            self.bound = _statement_bound(group, pc)
            pc.dirty = False  # every cursor of the connection tells the loan what it did
            raw.greenpool_loan = self  # its cursors run through run(), and fail once it ends
            self._unwatch = _watch_task(self)
        except BaseException:
            self.give_back()
            raise

    def give_back(self) -> None:
        """Back to the group (rolled back, reset if dirty, discarded if in doubt). Once."""
        pc, self.pc = self.pc, None
        if pc is None:
            return
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        pc.raw.greenpool_loan = None
        self.group.release(pc, discard=self.discard)

    def run(self, call: Any, *args: Any) -> Any:
        """One statement of a cursor of this loan (see :mod:`greenpool.cursors`): within
        the loan's bound; what its failure teaches the pool is learnt (the error still
        propagates: Django's ORM does not replay, and a write must never be replayed)."""
        try:
            if self.bound is None:
                return call(*args)
            with self.deadline():
                return call(*args)
        except psycopg2.Error as exc:
            pc = self.pc
            if pc is not None and statement_failed(exc, pc, self.group) == "demoted":
                self.discard = "wrong_role"  # a write reached a server demoted under us
            raise

    def deadline(self) -> Any:
        """The client-side bound of one statement: see :func:`_statement_bound`. Past it the
        statement is cancelled, psycopg2 closes the connection (so the loan discards it) and
        the caller gets an ``OperationalError``."""
        assert self.bound is not None
        return self.group._backend.deadline(self.bound, psycopg2.OperationalError(
            f"greenpool: no answer from the server within {self.bound:.1f} s "
            f"(statement_timeout plus connect_timeout): the connection is discarded"
        ))

    def given_back_for_ended_task(self) -> None:
        if self.pc is not None:
            self.group._backend.spawn(self.give_back)


def _statement_bound(group: Group, pc: PooledConnection) -> float | None:
    """``statement_timeout`` (the group's, else the endpoint's) plus ``connect_timeout``;
    None without a statement_timeout (or with 0). The server enforces statement_timeout
    itself, but not when it cannot run (SIGSTOP, a hung host whose kernel still
    acknowledges): then only a client-side bound frees the request and its slot. Without a
    statement_timeout the user asked for none: long statements (migrations) stay unbounded."""
    seconds = group.config.statement_timeout
    if seconds is None:
        seconds = pc.endpoint.config.statement_timeout
    if not seconds:  # None, or 0: PostgreSQL's "no timeout"
        return None
    return float(seconds) + float(pc.endpoint.config.connect_timeout)


def _watch_task(loan: Loan) -> Any:
    """Arrange for ``loan`` to be given back when the current task ends; returns the
    function that cancels that (called when Django gives the loan back itself). The
    callback holds the loan strongly: a task that ended without closing its connection
    leaves nothing else that would."""

    def ended(*_: Any) -> None:
        loan.given_back_for_ended_task()

    if green_mode() is None:
        return _watch_thread(ended)
    import greenlet

    task = greenlet.getcurrent()
    rawlink = getattr(task, "rawlink", None)
    if rawlink is not None and not task.dead:  # a gevent.Greenlet
        rawlink(ended)
        return lambda: task.unlink(ended)
    finalizer = weakref.finalize(task, ended)  # any other greenlet: once it is collected
    finalizer.atexit = False
    return finalizer.detach


class _Watch:
    """Lives in a thread's ``threading.local`` only: CPython drops it when the thread ends."""

    __slots__ = ("__weakref__",)


class _Watches(set[_Watch]):
    """The thread's watches (a set subclass, so that it can be referenced weakly)."""


_per_thread = threading.local()


def _watch_thread(ended: Any) -> Any:
    """The loan holds the returned ``unwatch``, and the finalizer holds the loan, so
    ``unwatch`` must reach the watch only weakly: else the watch would keep itself alive."""
    watches = getattr(_per_thread, "watches", None)
    if watches is None:
        watches = _per_thread.watches = _Watches()
    watch = _Watch()
    watches.add(watch)
    finalizer = weakref.finalize(watch, ended)
    finalizer.atexit = False
    watch_ref, watches_ref = weakref.ref(watch), weakref.ref(watches)
    del watch, watches

    def unwatch() -> None:
        finalizer.detach()
        found, found_in = watch_ref(), watches_ref()
        if found is not None and found_in is not None:
            found_in.discard(found)

    return unwatch


def green_mode() -> str | None:
    """'gevent' or 'eventlet' when that library monkey-patched threading, else None."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("threading"):
        return "gevent"
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("thread"):
        return "eventlet"
    return None
