"""What every cursor of a pooled connection tells its loan.

A loan is reset on return (``DISCARD ALL``) only when it may have changed the session, so
whoever watches a loan (the handler, Django's backend, a SQLAlchemy engine) may start it
clean only if nothing the loan does goes unseen. Hence every cursor made on a pooled
connection with ``raw.cursor()`` — whatever its ``cursor_factory``, explicit or the
connection's default, psycopg2.extras' or one's own, named or not — is a
:class:`TrackingCursor` in front of that class: a statement that may change the session
(:func:`greenpool.sessionstate.changes_session`, the one judge) marks the loan dirty; so do
``callproc`` and ``copy_*`` (what they run is not read), a ``WITH HOLD`` cursor (it
outlives its transaction), and the connection's ``set_client_encoding`` and ``reset``.
A ``cursor_factory`` that is a function, not a class, marks the loan dirty at once (its
cursors cannot be watched). Not seen: a cursor made by calling its class
(``RealDictCursor(raw)``), and what a function body does (``reset: 'always'`` is for
those).

A borrower that lends its connection on to user code names its loan
(``raw.greenpool_loan``: Django's, a SQLAlchemy engine's, a handler's once its raw
connection or cursor was asked for): a cursor made under one loan fails once that loan
ended, rather than run on the next borrower's connection (inside its transaction, maybe
while it waits on the socket itself), and its statements run through the loan's ``run``
(Django's: a deadline, what a failure teaches the pool).

The pool's own statements (the handler's, its round trips) run on :func:`own_cursor`: the
connection's default class, untracked (the handler judges each statement before it runs
it), so a clean loan's statement costs what it did.
"""

from __future__ import annotations

from typing import Any

import psycopg2
from psycopg2 import extensions

from .sessionstate import changes_session

#: ``own_cursor(raw)``: a cursor of ``raw``'s default class (the group's row factory;
#: behind a pooler, with its per-transaction settings), not tracked: for statements the
#: pool judges or sends itself. One C call, as ``raw.cursor()`` was before tracking.
own_cursor = extensions.connection.cursor


def _nobody() -> None:
    return None


def _dirty(conn: Any) -> None:
    pc = conn.greenpool_pc()
    if pc is not None:
        pc.dirty = True


def _given_back() -> psycopg2.InterfaceError:
    return psycopg2.InterfaceError(
        "cursor of a connection already given back to greenpool (opened before "
        "connection.close() or the end of the request, handler block or SQLAlchemy "
        "Connection that took it): open a new cursor on the connection you hold now")


class Loan:
    """The loan a borrower names for the cursors of its connection when it has nothing to
    add to their statements (a handler whose raw connection was asked for, a SQLAlchemy
    engine's): they fail once it ended."""

    __slots__ = ()

    @staticmethod
    def run(call: Any, *args: Any) -> Any:
        return call(*args)


def claim(raw: Any) -> None:
    """Cursors of ``raw`` made from here on belong to the loan under way (unless it is named
    already): once :func:`ended` is called for it, they fail instead of running on the next
    borrower's connection."""
    if getattr(raw, "greenpool_loan", False) is None:
        raw.greenpool_loan = Loan()


def ended(raw: Any) -> None:
    """The loan of ``raw`` ended: the cursors made under it fail from now on."""
    if getattr(raw, "greenpool_loan", None) is not None:
        raw.greenpool_loan = None


class TrackingConnection:
    """Mixed in front of psycopg2's connection class for every pooled connection."""

    #: the pool's record of this connection (a weak reference, set when it joins the
    #: pool), whose ``dirty`` the cursors set
    greenpool_pc: Any = staticmethod(_nobody)
    #: the loan a borrower named, with its ``run(call, *args)``; None where none is named
    greenpool_loan: Any = None
    cursor_factory: Any

    def cursor(self, name: Any = None, cursor_factory: Any = None, withhold: bool = False,
               scrollable: Any = None) -> Any:
        factory = cursor_factory or self.cursor_factory or extensions.cursor
        if isinstance(factory, type):
            factory = tracking(factory, name is not None)
        else:  # a function making cursors: no class to put the mixin in front of
            _dirty(self)
        return super().cursor(  # type: ignore[misc]
            name, cursor_factory=factory, withhold=withhold, scrollable=scrollable)

    def set_client_encoding(self, encoding: Any) -> Any:
        _dirty(self)  # a SET client_encoding
        return super().set_client_encoding(encoding)  # type: ignore[misc]

    def reset(self) -> Any:
        _dirty(self)  # RESET ALL: wipes what the group's configure hook set up
        return super().reset()  # type: ignore[misc]


class TrackingCursor:
    """Mixed in front of any cursor class: tells the loan what the cursor's statements may
    have done to the session (see the module docstring)."""

    connection: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._greenpool_loan = self.connection.greenpool_loan

    def _check_loan(self) -> Any:
        loan = self._greenpool_loan
        if loan is not self.connection.greenpool_loan:
            raise _given_back()
        return loan

    def execute(self, query: Any, vars: Any = None) -> Any:
        return self._read(super().execute, query, vars)  # type: ignore[misc]

    def executemany(self, query: Any, vars_list: Any) -> Any:
        return self._read(super().executemany, query, vars_list)  # type: ignore[misc]

    def _read(self, call: Any, query: Any, args: Any) -> Any:
        """A call whose SQL is read here: the loan is dirty if it may change the session."""
        loan = self._check_loan()
        conn = self.connection
        if changes_session(query, conn):
            _dirty(conn)
        if loan is None:
            return call(query, args)
        return loan.run(call, query, args)

    def _unread(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A call whose SQL is not read here: it may change anything."""
        loan = self._check_loan()
        _dirty(self.connection)
        if loan is None:
            return call(*args, **kwargs)
        return loan.run(lambda: call(*args, **kwargs))

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        return self._unread(super().callproc, procname, parameters)  # type: ignore[misc]

    def copy_expert(self, *args: Any, **kwargs: Any) -> Any:
        return self._unread(super().copy_expert, *args, **kwargs)  # type: ignore[misc]

    def copy_from(self, *args: Any, **kwargs: Any) -> Any:
        return self._unread(super().copy_from, *args, **kwargs)  # type: ignore[misc]

    def copy_to(self, *args: Any, **kwargs: Any) -> Any:
        return self._unread(super().copy_to, *args, **kwargs)  # type: ignore[misc]


class NamedTrackingCursor(TrackingCursor):
    """A server-side cursor: each fetch is a round trip, so each checks the loan too; a
    ``WITH HOLD`` one outlives its transaction (session state); closing it after its loan
    ended sends nothing (that loan's reset closed it on the server already)."""

    withhold: bool

    def execute(self, query: Any, vars: Any = None) -> Any:
        if self.withhold:
            self._check_loan()
            _dirty(self.connection)
        return super().execute(query, vars)

    def fetchone(self) -> Any:
        self._check_loan()
        return super().fetchone()  # type: ignore[misc]

    def fetchmany(self, size: Any = None) -> Any:
        self._check_loan()
        return super().fetchmany() if size is None else super().fetchmany(size)  # type: ignore[misc]

    def fetchall(self) -> Any:
        self._check_loan()
        return super().fetchall()  # type: ignore[misc]

    def scroll(self, value: Any, mode: Any = "relative") -> Any:
        self._check_loan()
        return super().scroll(value, mode)  # type: ignore[misc]

    def __iter__(self) -> Any:
        self._check_loan()
        return super().__iter__()  # type: ignore[misc]

    def __next__(self) -> Any:
        self._check_loan()
        return super().__next__()  # type: ignore[misc]

    def close(self) -> None:
        if self._greenpool_loan is self.connection.greenpool_loan:
            super().close()  # type: ignore[misc]


#: (factory, named) -> its tracking class; bounded: a class made per call (a factory
#: defined in a function) would otherwise fill it
_CLASSES: dict[tuple[type, bool], type] = {}
_CLASSES_MAX = 256


def tracking(factory: type, named: bool) -> type:
    """``factory`` with :class:`TrackingCursor` (or its named variant) in front; one class
    per factory, made on first use."""
    if issubclass(factory, NamedTrackingCursor if named else TrackingCursor):
        return factory
    made = _CLASSES.get((factory, named))
    if made is None:
        mixin = NamedTrackingCursor if named else TrackingCursor
        made = type(f"{mixin.__name__[:-6]}{factory.__name__}", (mixin, factory), {})
        if len(_CLASSES) >= _CLASSES_MAX:
            _CLASSES.clear()
        _CLASSES[(factory, named)] = made
    return made
