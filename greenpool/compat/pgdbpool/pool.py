"""pgdbpool 1.0.2's names and behaviour, served by a greenpool :class:`~greenpool.Pool`.

What pgdbpool code does keeps working: ``Connection.init(config)`` with pgdbpool's config,
``with Handler('group') as db:``, ``db.query()`` returning a cursor (``.fetchone()``,
``.rowcount``, iteration) whose rows read as ``row[0]`` and ``row['col']`` (psycopg2's own
``DictCursor``), ``db.commit()``, and pgdbpool's four exceptions.

What greenpool fixes stays fixed (docs/migrating.md lists every difference):

* an exception leaving the block rolls back (pgdbpool committed it);
* waiting for a connection is bounded by the group's ``timeout`` (pgdbpool polled for ever);
* no ``SELECT now()`` ping before every statement: a dead connection is found by the pool;
* a missing ``type`` (pgdbpool's ``threaded``) means "whatever this process runs on": gevent
  or eventlet if that library patched ``threading``, OS threads otherwise, so the same config
  works in a threaded server and under ``gunicorn -k gevent`` (and never ends in ``LoopExit``).

The pool is created on the first ``Handler`` of the process, not by ``Connection.init``:
``init`` often runs at import, which under ``gunicorn --preload`` is the master, before the
worker monkey-patches. ``init`` still validates the whole config at once.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any

import psycopg2
import psycopg2.extras

from ...concurrency.detection import process_mode
from ...config import PoolConfig, parse_config
from ...errors import (
    ConfigError,
    ConnectFailed,
    NoHealthyEndpoint,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyWaiters,
)
from ...pool import Pool
from . import dialect

logger = logging.getLogger("greenpool")

class DBConnectionError(PoolError):
    """No connection could be lent: a connect failed for a reason retrying cannot fix (a
    wrong password, a missing database), every connection stayed busy for the group's
    ``timeout``, the waiting line was full, or the pool was closed."""


class DBOfflineError(DBConnectionError):
    """No server of the group answered within the group's ``timeout``."""


class DBQueryError(Exception):
    """A statement (or the commit) failed; ``__cause__`` is psycopg2's error, and ``pgcode``
    / ``pgerror`` are copied from it. The message is ``repr()`` of it, as in pgdbpool."""

    def __init__(self, message: str, pgcode: str | None = None, pgerror: str | None = None):
        super().__init__(message)
        self.pgcode = pgcode
        self.pgerror = pgerror


class UnconfiguredGroupError(ConfigError):
    """The group is not in the config (or ``Connection.init`` was never called)."""


for _cls in (DBConnectionError, DBOfflineError, DBQueryError, UnconfiguredGroupError):
    _cls.__module__ = __name__
del _cls


def _lend_error(exc: PoolError) -> PoolError:
    """pgdbpool's exception for a greenpool error about lending a connection; any other pool
    error (a commit whose outcome is unknown, an aborted transaction) is greenpool's own."""
    if isinstance(exc, NoHealthyEndpoint):
        return DBOfflineError(str(exc))
    if isinstance(exc, (PoolTimeout, TooManyWaiters, ConnectFailed, PoolClosed)):
        return DBConnectionError(str(exc))
    return exc


def _query_error(exc: psycopg2.Error) -> DBQueryError:
    return DBQueryError(repr(exc), exc.pgcode, exc.pgerror)


# --- the config --------------------------------------------------------------------------


def _mode(pgdbpool_type: str) -> str:
    """greenpool's mode for pgdbpool's ``type``: ``threaded`` means "callers run
    concurrently", which in a gevent (eventlet) patched process are greenlets."""
    return process_mode() if pgdbpool_type == dialect.DEFAULT_TYPE else pgdbpool_type


# --- the API ------------------------------------------------------------------------------


class Connection:
    """pgdbpool's process-wide pool, as class methods."""

    _type: str = dialect.DEFAULT_TYPE
    _config: PoolConfig | None = None
    _pool: Pool | None = None
    _lock = threading.Lock()

    @classmethod
    def init(cls, config: Mapping[str, Any]) -> None:
        """Validate ``config`` (pgdbpool's format; greenpool's keys are accepted too) and
        make it the process's pool; a pool made by an earlier ``init`` is closed.
        Connections open on demand (``min_size`` keeps some open)."""
        kind, raw = dialect.translate(config)
        # validated now, whatever the mode: a bad config fails at init, not on a request
        parsed = parse_config({**raw, "type": "non-threaded"})
        with cls._lock:
            old, cls._pool = cls._pool, None
            cls._type, cls._config = kind, parsed
        if old is not None:
            old.close()

    @classmethod
    def pool(cls) -> Pool:
        """The greenpool :class:`~greenpool.Pool` behind the handlers (made on first use, in
        the mode that fits this process); for stats and for greenpool's own API."""
        pool = cls._pool
        if pool is not None:
            return pool
        with cls._lock:
            if cls._pool is None:
                if cls._config is None:
                    raise UnconfiguredGroupError(
                        "not configured: call Connection.init(config) first")
                mode = _mode(cls._type)
                logger.info("greenpool.compat.pgdbpool: type %r runs in greenpool's %r mode",
                            cls._type, mode)
                cls._pool = Pool(dataclasses.replace(cls._config, mode=mode))
            return cls._pool

    @classmethod
    def get_threading_model(cls) -> str:
        """pgdbpool's ``type`` word (``threaded`` when the config has none)."""
        return cls._type

    @classmethod
    def get_max_pool_size(cls, group: str) -> int:
        """The group's ``connection_count``."""
        if cls._config is None or group not in cls._config.groups:
            raise UnconfiguredGroupError(f"group {group!r} is not configured")
        return cls._config.groups[group].connection_count

    @classmethod
    def close(cls) -> None:
        """Close the pool (not in pgdbpool, which never closed); ``init`` may follow."""
        with cls._lock:
            pool, cls._pool, cls._config = cls._pool, None, None
        if pool is not None:
            pool.close()


def _dict_cursor(cursor: Any, sql: Any, params: Any) -> Any:
    """Run ``sql`` on a new DictCursor of ``cursor``'s connection and return it, executed:
    a client-side cursor holds every row, so it stays readable after the block."""
    dict_cursor = cursor.connection.cursor(cursor_factory=psycopg2.extras.DictCursor)
    dict_cursor.execute(sql, params)
    return dict_cursor


def _prepared(cursor: Any, params: Any) -> Any:
    dict_cursor = cursor.connection.cursor(cursor_factory=psycopg2.extras.DictCursor)
    dict_cursor.callproc('"SQLPrepare"."ExecuteQuery"', params)
    row = dict_cursor.fetchone()
    return None if row is None else row[0]


class GivenBackConnection:
    """What ``conn_ref`` is after its block: the connection is back in the pool, maybe
    lent to another task already, so this is not it. Its plain attributes (``autocommit``,
    ``closed``, ``dsn``, ``isolation_level``, ...) read as they were at the block's end;
    anything else (``cursor()``, ``commit()``, setting an attribute) raises psycopg2's
    ``InterfaceError``, as a closed psycopg2 connection does."""

    __slots__ = ("_values",)

    _KEPT = ("autocommit", "closed", "deferrable", "dsn", "encoding", "isolation_level",
             "protocol_version", "readonly", "server_version", "status")

    def __init__(self, raw: Any) -> None:
        values: dict[str, Any] = {}
        for name in self._KEPT if raw is not None else ():
            try:
                values[name] = getattr(raw, name)
            except psycopg2.Error:  # not readable any more (closed): left out
                pass
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise self._refused(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise self._refused(name)

    @staticmethod
    def _refused(name: str) -> psycopg2.InterfaceError:
        return psycopg2.InterfaceError(
            f"conn_ref.{name}: the connection went back to the pool at the end of its "
            f"'with Handler(...)' block (it may be lent to another task now); use it "
            f"inside the block")

    def __repr__(self) -> str:
        return f"<greenpool.compat.pgdbpool connection given back to the pool at {id(self):#x}>"


class Handler:
    """``with Handler('group') as db:`` — one connection and one transaction for the block.

    A clean exit commits, an exception rolls back (pgdbpool committed in both cases). The
    connection is taken at ``with``, not at ``Handler()``, so a handler never entered holds
    nothing. ``timeout`` (seconds) overrides the group's wait for this block.
    """

    __slots__ = ("_db", "_given_back", "_group")

    def __init__(self, group: str, timeout: float | None = None) -> None:
        pool = Connection.pool()
        if group not in pool.config.groups:
            raise UnconfiguredGroupError(
                f"group {group!r} is not configured; configured groups: "
                f"{sorted(pool.config.groups)}")
        self._group = group
        self._db = pool.handler(group, timeout=timeout)
        self._given_back: GivenBackConnection | None = None

    def __enter__(self) -> Handler:
        db = self._db
        try:
            db.__enter__()
        except PoolError as exc:
            mapped = _lend_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        if db._entered_in is not None:  # an outermost block: its with statement is our caller's
            caller = db._entered_in = sys._getframe(1)
            db._entered_at = caller.f_lasti
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        held = self._db._held()
        self._given_back = GivenBackConnection(held.raw if held is not None else None)
        try:
            self._db.__exit__(exc_type, exc, tb)
        except PoolError:
            raise
        except psycopg2.Error as error:  # the COMMIT failed (pgdbpool only logged it)
            raise _query_error(error) from error

    def _call(self, changes: bool, work: Any, *args: Any) -> Any:
        db = self._db
        try:
            return db._run(changes, work, *args)
        except PoolError as exc:  # a replay could not get a connection
            mapped = _lend_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        except psycopg2.Error as exc:
            raise _query_error(exc) from exc

    def query(self, statement: Any, params: Any = None) -> Any:
        """Run one statement; the executed ``DictCursor`` (iterate it, ``fetchone()``,
        ``fetchall()``, ``rowcount``), as in pgdbpool. Errors are :class:`DBQueryError`."""
        db = self._db
        changes = db._changes(statement)
        return self._call(changes, _dict_cursor, statement, params)

    def query_prepared(self, params: Any) -> Any:
        """pgdbpool's call of ``"SQLPrepare"."ExecuteQuery"`` (WEBcodeX1's pg_extensions):
        the first column of its first row. A failure is :class:`DBQueryError` (pgdbpool
        returned a JSON error string instead)."""
        if params is None:
            raise ValueError("query_prepared(): params must be given")
        return self._call(True, _prepared, params)

    def commit(self) -> None:
        """Commit now (for groups without autocommit); the block may go on."""
        try:
            self._db.commit()
        except PoolError:
            raise
        except psycopg2.Error as exc:
            raise _query_error(exc) from exc

    def rollback(self) -> None:
        """Roll back now (not in pgdbpool, whose only way was an exception it committed)."""
        try:
            self._db.rollback()
        except PoolError:
            raise
        except psycopg2.Error as exc:
            raise _query_error(exc) from exc

    @property
    def conn_ref(self) -> Any:
        """The raw psycopg2 connection, as pgdbpool exposed it (its use makes the pool reset
        the session on return). After the block, a :class:`GivenBackConnection`: pgdbpool
        code reads ``conn_ref`` there (its connections stayed open and reachable by anyone),
        but ours is back in the pool, so it reads as it was and refuses any use."""
        if self._given_back is not None:
            return self._given_back
        return self._db.connection

    def __repr__(self) -> str:
        return f"<greenpool.compat.pgdbpool.Handler {self._db!r}>"
