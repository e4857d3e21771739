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

Django's cursors are greenpool's too: :class:`TrackingCursor` marks the loan dirty when a
statement may change the session (``SET``, ``SET ROLE`` from ``assume_role``, temp tables,
...; see :mod:`greenpool.sessionstate`), so only those loans pay for ``DISCARD ALL``; and a
statement that finds its server gone evicts that server's idle connections at once.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import psycopg2
from psycopg2 import extensions

from ..connection import PooledConnection
from ..group import Group
from ..sessionstate import changes_session
from ..statement_failures import statement_failed

#: raw connection -> its loan, while lent to Django
_loans: dict[Any, Loan] = {}


class TrackingCursor(extensions.cursor):
    """psycopg2's cursor, telling the loan what its statements did to the session.

    It belongs to the loan it was opened in: once that loan is given back, the connection
    stays open and is lent again, so a cursor kept past ``close()`` (or a server-side
    iterator left unfinished at the end of a request) would otherwise run its statements on
    the next borrower's connection — inside its transaction, maybe while it waits on the
    socket itself. It fails instead, as with Django's own backend (whose connection is closed
    by then)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._greenpool_loan = _loans.get(self.connection)

    def _check_loan(self) -> None:
        if _loans.get(self.connection) is not self._greenpool_loan:
            raise psycopg2.InterfaceError(
                "cursor of a connection already given back to greenpool (opened before "
                "connection.close() or the end of the request that took it)"
            )

    def execute(self, query: Any, vars: Any = None) -> Any:
        self._check_loan()
        if changes_session(query, self.connection):
            _dirty(self.connection)
        loan = self._greenpool_loan
        try:
            if loan is None or loan.bound is None:
                return super().execute(query, vars)
            with loan.deadline():
                return super().execute(query, vars)
        except psycopg2.Error as exc:
            _failed(self.connection, exc)
            raise

    def executemany(self, query: Any, vars_list: Any) -> Any:
        self._check_loan()
        if changes_session(query, self.connection):
            _dirty(self.connection)
        loan = self._greenpool_loan
        try:
            if loan is None or loan.bound is None:
                return super().executemany(query, vars_list)
            with loan.deadline():
                return super().executemany(query, vars_list)
        except psycopg2.Error as exc:
            _failed(self.connection, exc)
            raise

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        self._check_loan()
        _dirty(self.connection)  # a function may change anything
        return super().callproc(procname, parameters)


class NamedTrackingCursor(TrackingCursor):
    """A server-side cursor (``QuerySet.iterator()``): every fetch is a round trip, so each
    checks the loan too; closing it after its loan ended sends nothing (the loan's
    ``DISCARD ALL`` closed it on the server already)."""

    def fetchone(self) -> Any:
        self._check_loan()
        return super().fetchone()

    def fetchmany(self, size: Any = None) -> Any:
        self._check_loan()
        return super().fetchmany() if size is None else super().fetchmany(size)

    def fetchall(self) -> Any:
        self._check_loan()
        return super().fetchall()

    def scroll(self, value: Any, mode: Any = "relative") -> Any:
        self._check_loan()
        return super().scroll(value, mode)

    def __iter__(self) -> Any:
        self._check_loan()
        return super().__iter__()

    def __next__(self) -> Any:
        self._check_loan()
        return super().__next__()

    def close(self) -> None:
        if _loans.get(self.connection) is self._greenpool_loan:
            super().close()


def _dirty(raw: Any) -> None:
    loan = _loans.get(raw)
    if loan is not None and loan.pc is not None:
        loan.pc.dirty = True


def _failed(raw: Any, exc: psycopg2.Error) -> None:
    """What the pool learns from a failed statement (the error still propagates: Django's
    ORM does not replay, and a write must never be replayed)."""
    loan = _loans.get(raw)
    if loan is None or loan.pc is None:
        return
    if statement_failed(exc, loan.pc, loan.group) == "demoted":
        loan.discard = "wrong_role"  # a write reached a server that was demoted under us


class Loan:
    """One connection of ``group`` lent to the task that called :meth:`take`."""

    __slots__ = ("__weakref__", "_unwatch", "bound", "discard", "group", "pc", "raw",
                 "saved_factory")

    def __init__(self, group: Group, timeout: float | None) -> None:
        self.group = group
        self.discard = ""
        self._unwatch: Any = None
        pc = group.acquire(timeout)
        self.pc: PooledConnection | None = pc
        try:
            raw = self.raw = pc.raw
            self.bound = _statement_bound(group, pc)
            pc.dirty = False  # TrackingCursor sees every statement Django sends from here
            self.saved_factory = raw.cursor_factory
            raw.cursor_factory = TrackingCursor
            _loans[raw] = self
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
        raw = pc.raw
        _loans.pop(raw, None)
        if not raw.closed:
            raw.cursor_factory = self.saved_factory
        self.group.release(pc, discard=self.discard)

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
