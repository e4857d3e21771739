"""``with pool.handler('write') as db:`` — one connection and one transaction for a block.

A clean exit commits; an exception rolls back and propagates. What is committed is judged
by the server-reported transaction status, so a ``BEGIN`` sent by hand on an autocommit
group is committed (or rolled back) too, and a transaction that failed inside the block is
never reported as committed.

Nesting: a ``handler()`` for the same group inside a block of the same greenlet (or
thread) reuses the connection already held instead of taking a second one (which could
deadlock a group of size 1). Without autocommit the inner block runs in a SAVEPOINT: its
exception rolls back only its own work; its clean exit commits nothing — the outermost
block decides.

Replays: a statement is re-run on a fresh connection (another endpoint if its server is
gone) only when re-running cannot duplicate a write and cannot lose earlier work:

* it was the first statement of its transaction (always so in autocommit), and
* its connection died and the group is read-only (the server itself refuses writes there)
  or the handler was opened with ``idempotent=True``; or it was refused with SQLSTATE
  25006 by a server that is now a standby while the group wants the primary (nothing was
  written, so it is re-run once on the primary).

Everything else propagates: in particular a write whose connection died is never re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union

import psycopg2
import psycopg2.extras
from psycopg2 import extensions

from .endpoint import STANDBY
from .errors import CommitOutcomeUnknown, TransactionAborted
from .roles import failure_kind, role_of

if TYPE_CHECKING:
    from .connection import PooledConnection
    from .group import Group
    from .pool import Pool

Statement = Union[str, "tuple[str, Any]"]

_IDLE = extensions.TRANSACTION_STATUS_IDLE
_INTRANS = extensions.TRANSACTION_STATUS_INTRANS
_INERROR = extensions.TRANSACTION_STATUS_INERROR


class Handler:
    """The object bound by ``with ... as db``. Not reusable after its block ends."""

    __slots__ = (
        "_group", "_idempotent", "_outer", "_pc", "_pool", "_savepoint", "_task", "_timeout"
    )

    def __init__(
        self, pool: Pool, group: Group, timeout: float | None, idempotent: bool = False
    ) -> None:
        self._pool = pool
        self._group = group
        self._timeout = timeout
        self._idempotent = idempotent
        self._pc: PooledConnection | None = None
        self._outer: Handler | None = None
        self._savepoint: str | None = None
        self._task: Any = None

    # --- the block ------------------------------------------------------------------------

    def __enter__(self) -> Handler:
        holders = self._group.holders
        task = self._pool._current_task()
        outer = holders.get(task)
        if outer is not None:
            self._outer = outer
            self._pc = outer._pc
            raw = self._pc.raw  # type: ignore[union-attr]
            if not raw.autocommit:
                self._savepoint = f"greenpool_{id(self):x}"
                with raw.cursor() as cursor:
                    cursor.execute(f"SAVEPOINT {self._savepoint}")
            return self
        self._pc = self._group.acquire(self._timeout)
        self._task = task
        holders[task] = self
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._outer is not None:
            self._exit_nested(exc_type is None)
            self._pc = None
            return
        pc = self._pc
        self._pc = None
        self._group.holders.pop(self._task, None)
        if pc is None:
            return
        raw = pc.raw
        if exc_type is None and (raw.closed or raw.get_transaction_status() != _IDLE):
            try:
                self._commit_at_exit(pc)
            except BaseException:
                self._group.release(pc)
                raise
        self._group.release(pc)  # rolls back whatever is still open, or discards

    def _exit_nested(self, clean: bool) -> None:
        if self._savepoint is None or self._pc is None:
            return
        raw = self._pc.raw
        if clean:
            with raw.cursor() as cursor:
                cursor.execute(f"RELEASE SAVEPOINT {self._savepoint}")
        elif not raw.closed and raw.get_transaction_status() in (_INTRANS, _INERROR):
            try:
                with raw.cursor() as cursor:
                    cursor.execute(f"ROLLBACK TO SAVEPOINT {self._savepoint}")
            except psycopg2.Error:
                pass  # the outer block will roll the whole transaction back

    def _commit_at_exit(self, pc: PooledConnection) -> None:
        """The block ended cleanly with a transaction open, or with its connection lost."""
        raw = pc.raw
        where = f"group {self._group.name!r} on {pc.endpoint.label}"
        if raw.closed:
            if raw.autocommit:
                return
            raise TransactionAborted(
                f"{where}: the connection was lost inside the block (the error was caught); "
                f"nothing was committed"
            )
        status = raw.get_transaction_status()
        if status == _IDLE:
            return
        if status == _INTRANS:
            self._commit(raw, where, self._group, pc)
            return
        if status == _INERROR:
            raise TransactionAborted(
                f"{where}: a statement failed inside the block and its error was caught; "
                f"the transaction was rolled back, not committed"
            )
        raise TransactionAborted(f"{where}: the connection is in an unknown state; not committed")

    @staticmethod
    def _commit(
        raw: Any, where: str, group: Group | None = None, pc: PooledConnection | None = None
    ) -> None:
        try:
            if raw.autocommit:  # a BEGIN sent by hand: psycopg2's commit() would skip it
                with raw.cursor() as cursor:
                    cursor.execute("COMMIT")
            else:
                raw.commit()
        except psycopg2.Error as exc:
            if raw.closed:
                if group is not None and pc is not None:
                    group.on_endpoint_failure(pc.endpoint)
                raise CommitOutcomeUnknown(
                    f"{where}: the connection broke during COMMIT, so the transaction may or "
                    f"may not have been applied; it is not retried. Check before retrying."
                ) from exc
            raise

    # --- what the block can do ------------------------------------------------------------

    @property
    def connection(self) -> Any:
        """The raw psycopg2 connection, for what this API does not cover.

        Do not close it or keep it past the block; the pool resets it on return.
        """
        if self._pc is None:
            raise RuntimeError("the handler is used outside its 'with' block")
        return self._pc.raw

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """A new cursor (with the group's row factory unless ``cursor_factory`` is given)."""
        return self.connection.cursor(*args, **kwargs)

    def query(self, sql: str, params: Any = None) -> list[Any] | int:
        """Run one statement: its rows if it returns rows, else the number of rows affected."""
        return self._run(_rows_or_count, sql, params)

    def query_one(self, sql: str, params: Any = None) -> Any:
        """The first row of the result, or None."""
        return self._run(_first_row, sql, params)

    def execute(self, statements: str | Iterable[Statement], params: Any = None) -> int:
        """Run one statement, a ``;``-separated script, or a list of statements (each a
        string or a ``(sql, params)`` pair) on one cursor. Returns the rows affected."""
        items: list[Statement] = (
            [(statements, params)] if isinstance(statements, str) else list(statements)
        )
        return self._run(_affected_rows, items)

    def executemany(self, sql: str, params_seq: Sequence[Any], page_size: int = 100) -> None:
        """Run ``sql`` for each parameter set, batching round trips (``execute_batch``)."""
        with self.connection.cursor() as cursor:
            psycopg2.extras.execute_batch(cursor, sql, params_seq, page_size=page_size)

    # --- replays --------------------------------------------------------------------------

    _MAX_REPLAYS = 3

    def _run(self, work: Callable[..., Any], *args: Any) -> Any:
        """Run ``work(cursor, *args)``; re-run it on a fresh connection where that is safe."""
        replays = 0
        while True:
            raw = self._current().raw
            first = raw.get_transaction_status() == _IDLE
            try:
                with raw.cursor() as cursor:
                    return work(cursor, *args)
            except psycopg2.Error as exc:
                kind = failure_kind(exc, raw)
                if kind == "lost":
                    self._group.on_endpoint_failure(self._current().endpoint)
                if not kind or not first or replays >= self._MAX_REPLAYS:
                    raise
                if not self._may_replay(kind, raw):
                    raise
                self._replace_connection("lost" if kind == "lost" else "wrong_role")
                replays += 1
                self._group.counters.replays += 1

    def _may_replay(self, kind: str, raw: Any) -> bool:
        if self._savepoint is not None or (self._outer is not None and self._outer._savepoint):
            return False
        if kind == "lost":
            return self._group.config.readonly or self._idempotent
        # 25006 in a group that wants the primary, and the server now says it is a standby
        # (a read-only transaction asked for by the caller is not a role problem)
        role = role_of(raw)
        if role == STANDBY:
            self._current().endpoint.observe_role(role)
        return self._group.role == "primary" and role == STANDBY

    def _current(self) -> PooledConnection:
        if self._pc is None:
            raise RuntimeError("the handler is used outside its 'with' block")
        return self._pc

    def _replace_connection(self, reason: str) -> None:
        """Give the broken (or wrong-role) connection back and take another in its place."""
        root = self._outer or self
        old = self._current()
        self._pc = root._pc = None
        self._group.release(old, discard=reason)
        new = self._group.acquire(self._timeout)
        self._pc = root._pc = new

    def commit(self) -> None:
        """Commit now (inside a nested block this commits the outer transaction too)."""
        raw = self.connection
        if raw.get_transaction_status() != _IDLE:
            self._commit(raw, f"group {self._group.name!r}", self._group, self._pc)

    def rollback(self) -> None:
        """Roll back now, even on an autocommit connection with a hand-made ``BEGIN``."""
        raw = self.connection
        if raw.autocommit:
            if raw.get_transaction_status() != _IDLE:
                with raw.cursor() as cursor:
                    cursor.execute("ROLLBACK")
        else:
            raw.rollback()

    def __repr__(self) -> str:
        where = self._pc.endpoint.label if self._pc is not None else "not in a block"
        return f"<Handler group={self._group.name!r} {where}>"


# What the statement methods run on a cursor (module-level: no closure per call).


def _rows_or_count(cursor: Any, sql: str, params: Any) -> list[Any] | int:
    cursor.execute(sql, params)
    if cursor.description is None:
        return int(cursor.rowcount)
    return cursor.fetchall()


def _first_row(cursor: Any, sql: str, params: Any) -> Any:
    cursor.execute(sql, params)
    return None if cursor.description is None else cursor.fetchone()


def _affected_rows(cursor: Any, items: list[Statement]) -> int:
    total = 0
    for item in items:
        sql, args = (item, None) if isinstance(item, str) else item
        cursor.execute(sql, args)
        if cursor.rowcount > 0:
            total += cursor.rowcount
    return total
