"""``with pool.handler('write') as db:`` — one connection and one transaction for a block.

A clean exit commits; an exception rolls back and propagates. What is committed is judged
by the server-reported transaction status, so a ``BEGIN`` sent by hand on an autocommit
group is committed (or rolled back) too, and a transaction that failed inside the block, or
was open when its connection was lost, is never reported as committed.

Nesting: a ``handler()`` for the same group inside a block of the same greenlet (or
thread) reuses the connection already held instead of taking a second one (which could
deadlock a group of size 1). Without autocommit the inner block runs in a SAVEPOINT: its
exception rolls back only its own work; its clean exit commits nothing — the outermost
block decides. A statement error caught inside it rolls back to its savepoint and raises
TransactionAborted at its exit. ``commit()``/``rollback()`` act on the whole transaction,
then give each open nested block a fresh savepoint. docs/quickstart.md has the full table.

Session state: the handler marks a loan dirty when a statement may change the session (see
sessionstate.py) or the raw cursor/connection is used; only a dirty loan is reset on return.

The clean loan (``with pool.handler() as db: db.query(sql)``, the path every request takes)
is what this module keeps cheap: one object of 7 slots per block (what only a nest, a lost
connection or a given-up block needs is made on demand); the task asked at entry and by
each statement (a block is its task's); the nesting table looked up and written once at
entry, cleared at exit; and
``query()`` runs a statement already known clean in its own frame, on the task that
entered the block, without the replay loop (which it enters only when the statement fails).

Replays: a statement is re-run on a fresh connection (another endpoint if its server is
gone) only when re-running cannot duplicate a write and cannot lose earlier work:

* it was the first statement of its transaction (always so in autocommit), the loan has
  not changed the session (a fresh connection would lack that state), and
* its connection died and the group is read-only (the server itself refuses writes there)
  or the handler was opened with ``idempotent=True``; or it was refused with SQLSTATE
  25006 by a server that is now a standby while the group wants the primary (nothing was
  written, so it is re-run once on the primary).

Everything else propagates: in particular a write whose connection died is never re-run.

Why one module of this length: the block, its nesting (savepoints), the commit by server
status and the replays all act on the one connection a nest holds and on its epoch;
split, each would reach into the others' state. What a failure teaches the pool is
statement_failures.py's, which SQL dirties the session sessionstate.py's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

import psycopg2
import psycopg2.extras
from psycopg2 import extensions
from psycopg2 import sql as pgsql

from .cursors import claim, own_cursor
from .errors import CommitOutcomeUnknown, TransactionAborted
from .open_blocks import block_open
from .sessionstate import CLEAN, changes_session
from .statement_failures import statement_failed

if TYPE_CHECKING:
    from .connection import PooledConnection
    from .group import Group

Statement = Union[str, bytes, pgsql.Composable, "tuple[Any, Any]"]

logger = logging.getLogger("greenpool")
_getframe = sys._getframe

_IDLE = extensions.TRANSACTION_STATUS_IDLE
_INTRANS = extensions.TRANSACTION_STATUS_INTRANS
_INERROR = extensions.TRANSACTION_STATUS_INERROR


class _BlockState:
    """What a block keeps beyond its connection: made only when a block nests, loses its
    connection or is given up, so a plain block (the clean loan) carries none of it."""

    __slots__ = ("epoch", "given_up", "lost_open", "nest", "savepoint")

    def __init__(self) -> None:
        #: outermost block: bumped whenever the transaction ends or the connection is
        #: replaced inside the nest; a nested block records it at entry: its savepoint
        #: exists only while that epoch is current
        self.epoch = 0
        #: outermost block: its open nested blocks, innermost last
        self.nest: list[Handler] = []
        #: nested block: the name of its savepoint (None: autocommit, none)
        self.savepoint: str | None = None
        #: outermost block: a statement found the connection lost while a transaction was
        #: open. Needed on autocommit, where a closed connection otherwise means "nothing
        #: pending" and the server can no longer say a hand-made BEGIN was open
        self.lost_open = False
        #: a later block of the same task found this block's connection closed and took
        #: its place (see Handler._give_up)
        self.given_up = False


_NO_STATE = _BlockState()  # read, never written: the state of a block that has none


class Handler:
    """The object bound by ``with ... as db``: single-use, and bound to the task that
    entered it (a second ``with``, or use from another greenlet or thread, raises
    ``RuntimeError`` and takes nothing).

    Made for every loan, so it holds only what every loan needs (each slot set here costs
    every loan); the rest is in a :class:`_BlockState` made on demand. It holds no
    reference to the pool of its own: its group does (``on_endpoint_failure``)."""

    __slots__ = ("_entered_at", "_entered_in", "_group", "_idempotent", "_outer", "_pc",
                 "_state", "_task", "_timeout")

    def __init__(self, group: Group, timeout: float | None, idempotent: bool = False) -> None:
        self._group = group
        self._timeout = timeout
        self._idempotent = idempotent
        #: the connection; only the outermost block of a nest holds it (nested blocks read
        #: it through ``_outer``, so a replay that replaces it is seen at every level)
        self._pc: PooledConnection | None = None
        self._outer: Handler | None = None  # the outermost block, for a nested one
        self._state: _BlockState = _NO_STATE
        #: the task that entered the block; set once, first thing on entry, and never
        #: cleared: it is also what makes the handler single-use
        self._task: Any = None
        #: outermost block: the frame whose ``with`` entered it and that statement's offset,
        #: so a later block of the task can tell whether this one is still open (its
        #: ``__exit__`` can be cut short before its first line: see open_blocks.py)
        self._entered_in: Any = None
        self._entered_at = 0

    def _own_state(self) -> _BlockState:
        """This block's state, made on first need (``_state`` is shared until then)."""
        state = self._state
        if state is _NO_STATE:
            state = self._state = _BlockState()
        return state

    # --- the block ------------------------------------------------------------------------

    def __enter__(self) -> Handler:
        if self._task is not None:
            raise RuntimeError(
                f"this handler of group {self._group.name!r} was already used for a 'with' "
                f"block; a handler is single-use: call handler({self._group.name!r}) again"
            )
        group = self._group
        task = self._task = group.current_task()  # a failed entry cannot be retried
        holders = group.holders
        outer = holders.get(task)
        if outer is not None and outer._pc is not None:
            if outer._pc.raw.closed:  # its connection is gone: no block can go on inside it
                outer._give_up(task, "closed")
            elif outer._still_open():
                self._enter_nested(outer, outer._pc)
                return self
            else:
                outer._abandoned(task)
        caller = self._entered_in = _getframe(1)
        self._entered_at = caller.f_lasti
        try:
            # stored by acquire: a signal handler's exception as it returns still finds it
            pc = group.acquire(self._timeout, self)
            pc.dirty = False  # this handler sees everything the loan does from here
            holders[task] = self
        except BaseException:  # no block, no holder (acquire's own error: nothing taken)
            if holders.get(task) is self:
                del holders[task]
            taken, self._pc, self._entered_in = self._pc, None, None
            if taken is not None:
                group.release(taken, discard="interrupted")
            raise
        return self

    def _enter_nested(self, outer: Handler, pc: PooledConnection) -> None:
        """Enter inside ``outer`` (the task's outermost block): on its connection, in a
        savepoint unless autocommit."""
        raw = pc.raw
        root = outer._own_state()
        if not raw.autocommit:
            savepoint = f"greenpool_{id(self):x}"
            with own_cursor(raw) as cursor:
                cursor.execute(f"SAVEPOINT {savepoint}")
            mine = self._own_state()
            mine.savepoint = savepoint
            mine.epoch = root.epoch
        self._outer = outer
        root.nest.append(self)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        outer = self._outer
        if outer is not None:
            self._outer = None
            nest = outer._state.nest
            if self in nest:
                nest.remove(self)
            self._exit_nested(outer, exc_type is None)
            return
        pc = self._pc
        if pc is None:  # not in a block, or a replay lost the connection and found none
            self._entered_in = None
            holders = self._group.holders
            if self._task is not None and holders.get(self._task) is self:
                del holders[self._task]
            if self._state.given_up and exc_type is None:
                raise TransactionAborted(
                    f"group {self._group.name!r}: this block's connection was lost, and a "
                    f"later block of the same task took a new one; nothing of this block "
                    f"is known to be committed")
            return
        self._pc = self._entered_in = None
        group = self._group
        group.holders.pop(self._task, None)
        raw = pc.raw
        if exc_type is None and (raw.closed or raw.get_transaction_status() != _IDLE):
            try:
                self._commit_open(pc, explicit=False)
            except BaseException:
                group.release(pc)
                raise
        group.release(pc)  # rolls back whatever is still open, or discards

    def _still_open(self) -> bool:
        """Whether this outermost block is still open, seen from a block of its task being
        entered (two frames down from here); unknown counts as open."""
        frame = self._entered_in
        return frame is None or block_open(frame, self._entered_at, _getframe(2)) is not False

    def _abandoned(self, task: Any) -> None:
        """This block ended without its ``__exit__`` running (an exception from a signal
        handler on its first instruction): nothing of it was committed, and the exception
        told its caller so. Its connection, in a transaction nobody will end, is discarded."""
        logger.warning(
            "group %r: a block of this task ended without its exit running (an exception "
            "from a signal handler as it ended); its connection is discarded, its "
            "uncommitted work rolled back by the server", self._group.name)
        self._give_up(task, "interrupted")

    @staticmethod
    def give_up_blocks_of_ended_tasks(group: Group, ended: Callable[[Any], bool]) -> int:
        """Give up the blocks whose task has ended (housekeeping asks, from its own task):
        one is still recorded only if its ``__exit__`` was cut short, and its task will never
        enter the next block that would give it up. How many."""
        stale = [(task, block) for task, block in list(group.holders.items()) if ended(task)]
        for task, block in stale:
            block._abandoned(task)
        return len(stale)

    def _give_up(self, task: Any, reason: str) -> None:
        """A later block of the same task found this one's connection closed, or this block
        over: its ``__exit__`` may never run (a signal handler's exception can skip it), so
        its discarded connection is not taken for a live outer block; if it does exit, it
        says so (TransactionAborted) rather than nothing."""
        state = self._own_state()
        pc, self._pc, self._entered_in, state.given_up = self._pc, None, None, True
        holders = self._group.holders
        if holders.get(task) is self:
            del holders[task]
        if pc is not None:
            self._group.release(pc, discard=reason)

    def _exit_nested(self, outer: Handler, clean: bool) -> None:
        """End a nested block: release its savepoint, or roll back to it. A caught error
        inside it (the transaction failed) rolls back to the savepoint and raises
        TransactionAborted here: the block's work is gone, and saying nothing would let the
        outer block commit as if it were not. Without a savepoint (autocommit) or after the
        transaction it belonged to ended (commit, rollback, replay), there is nothing to do."""
        mine = self._state
        savepoint = mine.savepoint
        pc = outer._pc
        if savepoint is None or mine.epoch != outer._state.epoch or pc is None or pc.raw.closed:
            return
        raw = pc.raw
        status = raw.get_transaction_status()
        if clean and status == _INTRANS:
            with own_cursor(raw) as cursor:
                cursor.execute(f"RELEASE SAVEPOINT {savepoint}")
            return
        if status not in (_INTRANS, _INERROR):
            return
        undo = f"ROLLBACK TO SAVEPOINT {savepoint}; RELEASE SAVEPOINT {savepoint}"
        if not clean:
            try:
                with own_cursor(raw) as cursor:
                    cursor.execute(undo)
            except psycopg2.Error:
                pass  # the exception in flight says more; the outer block rolls back
            return
        aborted = TransactionAborted(
            f"group {self._group.name!r} on {pc.endpoint.label}: a statement failed inside a "
            f"nested block and its error was caught; the block's work was rolled back to its "
            f"savepoint, the outer transaction goes on"
        )
        try:
            with own_cursor(raw) as cursor:
                cursor.execute(undo)
        except psycopg2.Error as exc:
            raise aborted from exc
        raise aborted

    def _commit_open(self, pc: PooledConnection, explicit: bool) -> None:
        """Commit what is open, by the server-reported status. A failed transaction is
        never reported as committed: TransactionAborted (explicit ``commit()`` also rolls it
        back at once, so the block can go on)."""
        raw = pc.raw
        if raw.closed:
            where = self._where(pc)
            if not raw.autocommit:
                raise TransactionAborted(
                    f"{where}: the connection was lost inside the block (the error was "
                    f"caught); nothing was committed"
                )
            if (self._outer or self)._state.lost_open:
                raise TransactionAborted(
                    f"{where}: the connection was lost inside the block while a transaction "
                    f"was open (the error was caught); that transaction was not committed"
                )
            return  # autocommit, nothing open: each statement committed (or raised) alone
        status = raw.get_transaction_status()
        if status == _IDLE:
            return
        if status == _INTRANS:
            self._commit(raw, pc)
            return
        where = self._where(pc)  # only now: a clean exit builds no message
        if status == _INERROR:
            aborted = TransactionAborted(
                f"{where}: a statement failed inside the block and its error was caught; "
                f"the transaction was rolled back, not committed"
            )
            if explicit:
                try:
                    _rollback(raw)
                except psycopg2.Error as exc:
                    raise aborted from exc
            raise aborted
        raise TransactionAborted(f"{where}: the connection is in an unknown state; not committed")

    def _where(self, pc: PooledConnection) -> str:
        return f"group {self._group.name!r} on {pc.endpoint.label}"

    def _commit(self, raw: Any, pc: PooledConnection) -> None:
        try:
            if raw.autocommit:  # a BEGIN sent by hand: psycopg2's commit() would skip it
                with own_cursor(raw) as cursor:
                    cursor.execute("COMMIT")
            else:
                raw.commit()
        except psycopg2.Error as exc:
            if raw.closed:
                self._group.on_endpoint_failure(pc.endpoint)
                raise CommitOutcomeUnknown(
                    f"{self._where(pc)}: the connection broke during COMMIT, so the transaction "
                    f"may or may not have been applied; it is not retried. Check before retrying."
                ) from exc
            raise

    # --- what the block can do ------------------------------------------------------------

    @property
    def connection(self) -> Any:
        """The raw psycopg2 connection, for what this API does not cover.

        Do not close it or keep it past the block. Using it marks the loan as one that may
        have changed the session: the pool resets the session on return (one round trip).
        """
        pc = self._current()
        pc.dirty = True
        claim(pc.raw)  # its cursors fail once the loan ended (the reset on return ends it)
        return pc.raw

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """A new cursor (with the group's row factory unless ``cursor_factory`` is given).
        Like :attr:`connection`, it makes the pool reset the session on return."""
        return self.connection.cursor(*args, **kwargs)

    def query(self, sql: str, params: Any = None) -> list[Any] | int:
        """Run one statement: its rows if it returns rows, else the number of rows affected."""
        pc = self._pc
        if pc is None or sql.__class__ is not str or sql not in CLEAN:
            return self._run(sql, _rows_or_count, sql, params)
        task = self._group.current_task()
        if task is not self._task and task != self._task:  # (a thread id: equal, not same)
            return self._run(sql, _rows_or_count, sql, params)  # says whose block it is
        # The clean loan's statement: a text known not to change the session, in the
        # outermost block, on the task that entered it. What _run does on its first pass,
        # without the questions answered above.
        raw = pc.raw
        first = raw.get_transaction_status() == _IDLE
        session_set = pc.dirty
        try:
            with own_cursor(raw) as cursor:  # _rows_or_count, inline (a frame less per loan)
                cursor.execute(sql, params)
                if cursor.description is None:
                    return int(cursor.rowcount)
                return cursor.fetchall()
        except psycopg2.Error as exc:
            if not self._replaced(exc, pc, first, session_set, 0):
                raise
        return self._run(sql, _rows_or_count, sql, params, replays=1)

    def query_one(self, sql: str, params: Any = None) -> Any:
        """The first row of the result, or None."""
        return self._run(sql, _first_row, sql, params)

    def execute(self, statements: Statement | Iterable[Statement], params: Any = None) -> int:
        """Run one statement, a ``;``-separated script, or a list of statements (each what
        :meth:`query` takes: a string, bytes or a ``psycopg2.sql`` object, or a ``(sql,
        params)`` pair) on one cursor. Returns the rows affected."""
        items: list[Any] = (
            [(statements, params)] if _is_one_statement(statements)
            else list(cast("Iterable[Any]", statements))
        )
        changes = False
        for item in items:
            sql = item[0] if isinstance(item, (tuple, list)) else item
            if self._changes(sql):
                changes = True
                break
        return self._run(changes, _affected_rows, items)

    def executemany(self, sql: str, params_seq: Sequence[Any], page_size: int = 100) -> None:
        """Run ``sql`` for each parameter set, batching round trips (``execute_batch``)."""
        pc = self._current()
        if changes_session(sql, pc.raw):
            pc.dirty = True
        raw = pc.raw
        open_before = raw.get_transaction_status() != _IDLE
        try:
            with own_cursor(raw) as cursor:
                psycopg2.extras.execute_batch(cursor, sql, params_seq, page_size=page_size)
        except psycopg2.Error as exc:
            if statement_failed(exc, pc, self._group) == "lost" and open_before:
                (self._outer or self)._own_state().lost_open = True
            raise

    def _changes(self, sql: Any) -> bool:
        """May ``sql`` change the session (read with the held connection's settings)?"""
        pc = self._pc
        if pc is None:
            pc = self._held()
        return changes_session(sql, pc.raw if pc is not None else None)

    def _held(self) -> PooledConnection | None:
        if self._pc is not None:
            return self._pc
        return self._outer._pc if self._outer is not None else None

    # --- replays --------------------------------------------------------------------------

    _MAX_REPLAYS = 3

    def _run(
        self, changes: bool | Statement, work: Callable[..., Any], *args: Any, replays: int = 0
    ) -> Any:
        """Run ``work(cursor, *args)``; re-run it on a fresh connection where that is safe.
        ``changes``: whether the work may change the session (the reset on return must
        run), or the one statement to ask that of (:func:`changes_session`, read with the
        held connection's settings). ``replays``: how many times it was re-run already."""
        pc = self._current()
        if changes.__class__ is not bool:
            changes = changes_session(changes, pc.raw)
        while True:
            if replays:
                pc = self._current()
            raw = pc.raw
            first = raw.get_transaction_status() == _IDLE
            # state set by earlier statements would be missing on a fresh connection
            session_set = pc.dirty
            if changes:
                pc.dirty = True
            try:
                with own_cursor(raw) as cursor:
                    return work(cursor, *args)
            except psycopg2.Error as exc:
                if not self._replaced(exc, pc, first, session_set, replays):
                    raise
                replays += 1

    def _replaced(
        self, exc: psycopg2.Error, pc: PooledConnection, first: bool, session_set: bool,
        replays: int,
    ) -> bool:
        """A statement failed with ``exc`` on ``pc``: learn from it; True when it may be
        re-run and a fresh connection took ``pc``'s place. ``first``: it was the first
        statement of its transaction; ``session_set``: the loan had changed the session
        before it."""
        kind = statement_failed(exc, pc, self._group)
        if kind == "lost" and not first:  # the transaction went with the connection
            (self._outer or self)._own_state().lost_open = True
        if not first or session_set or replays >= self._MAX_REPLAYS:
            return False
        if not self._may_replay(kind):
            return False
        self._replace_connection(pc, "lost" if kind == "lost" else "wrong_role")
        self._group.counters.replays += 1
        return True

    def _may_replay(self, kind: str) -> bool:
        """A lost connection: where the group or the caller says statements may re-run.
        ``demoted`` (a refused write on a server now standby, in a primary group): always,
        on the primary (a read-only transaction the caller asked for is no role problem)."""
        if kind == "lost":
            return self._group.config.readonly or self._idempotent
        return kind == "demoted"

    def _current(self) -> PooledConnection:
        """The connection of the block, for the task that entered it."""
        pc = self._pc
        if pc is None:
            outer = self._outer
            pc = outer._pc if outer is not None else None
            if pc is None:
                raise RuntimeError(
                    f"this handler of group {self._group.name!r} is used outside its 'with' "
                    f"block"
                )
        if self._task != self._group.current_task():
            raise RuntimeError(
                f"this handler of group {self._group.name!r} belongs to the task that entered "
                f"its 'with' block; another greenlet or thread must open its own "
                f"with handler({self._group.name!r})"
            )
        return pc

    def _replace_connection(self, old: PooledConnection, reason: str) -> None:
        """Give the broken (or wrong-role) connection back and take another in its place.
        Every level of a nest sees the new one: only the outermost block holds it."""
        root = self._outer or self
        root._pc = None
        root._end_savepoints()
        self._group.release(old, discard=reason)
        new = self._group.acquire(self._timeout)
        new.dirty = False
        root._pc = new

    def commit(self) -> None:
        """Commit now, by the server-reported status. In a nested block this commits the
        whole transaction, the outer blocks' work too (there is one transaction per
        connection). A transaction that failed (a statement's error was caught) is rolled
        back and ``TransactionAborted`` raised: it is never reported as committed. So is one
        whose connection was lost, autocommit or not (the block's exit raises again)."""
        pc = self._current()
        raw = pc.raw
        if raw.closed or raw.get_transaction_status() != _IDLE:
            root = self._outer or self
            root._end_savepoints()
            try:
                self._commit_open(pc, explicit=True)
            finally:
                self._renew_savepoints(root, raw)

    def rollback(self) -> None:
        """Roll back now, even on an autocommit connection with a hand-made ``BEGIN``. In a
        nested block this rolls back the whole transaction, like :meth:`commit`."""
        raw = self._current().raw
        if raw.get_transaction_status() != _IDLE:
            root = self._outer or self
            root._end_savepoints()
            try:
                _rollback(raw)
            finally:
                self._renew_savepoints(root, raw)

    def _end_savepoints(self) -> None:
        """The outermost block's transaction ended or its connection was replaced: the
        savepoints of its nested blocks are gone (a block with no state has none)."""
        state = self._state
        if state is not _NO_STATE:
            state.epoch += 1

    @staticmethod
    def _renew_savepoints(root: Handler, raw: Any) -> None:
        """After a commit or rollback inside a nest, give each open nested block a fresh
        savepoint, so an error leaving it still undoes only what it did since then."""
        state = root._state
        if not state.nest or raw.closed or raw.get_transaction_status() != _IDLE:
            return
        for nested in state.nest:
            mine = nested._state
            if mine.savepoint is not None:
                with own_cursor(raw) as cursor:
                    cursor.execute(f"SAVEPOINT {mine.savepoint}")
                mine.epoch = state.epoch

    def __repr__(self) -> str:
        pc = self._held()
        where = pc.endpoint.label if pc is not None else "not in a block"
        return f"<Handler group={self._group.name!r} {where}>"


def _rollback(raw: Any) -> None:
    if raw.autocommit:  # psycopg2's rollback() is a no-op here
        with own_cursor(raw) as cursor:
            cursor.execute("ROLLBACK")
    else:
        raw.rollback()


# What the statement methods run on a cursor (module-level: no closure per call).


def _rows_or_count(cursor: Any, sql: str, params: Any) -> list[Any] | int:
    cursor.execute(sql, params)
    if cursor.description is None:
        return int(cursor.rowcount)
    return cursor.fetchall()


def _first_row(cursor: Any, sql: str, params: Any) -> Any:
    cursor.execute(sql, params)
    return None if cursor.description is None else cursor.fetchone()


def _is_one_statement(statements: Any) -> bool:
    return isinstance(statements, (str, bytes, bytearray, memoryview, pgsql.Composable))


def _affected_rows(cursor: Any, items: list[Any]) -> int:
    total = 0
    for item in items:
        sql, args = item if isinstance(item, (tuple, list)) else (item, None)
        cursor.execute(sql, args)
        if cursor.rowcount > 0:
            total += cursor.rowcount
    return total
