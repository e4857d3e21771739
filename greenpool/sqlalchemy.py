"""SQLAlchemy on greenpool: an ``Engine`` whose connections are greenpool loans.

One engine per group: ``create_engine(pool, 'write')``, ``create_engine(pool, 'read')``.
SQLAlchemy's own pool is replaced, not stacked: :class:`GreenpoolPool` is a
``sqlalchemy.pool.Pool`` whose checkout is ``group.acquire()`` and whose checkin is
``group.release()``, so the group's bound, fair waiting line, roles, failover and
``BaseException`` safety are the engine's. There is no second pool and no overflow.

How SQLAlchemy's pool duties map onto greenpool's:

* **connection records**: one ``_ConnectionRecord`` per greenpool connection, reused for
  every loan of it, so SQLAlchemy's ``connect`` event (the dialect's setup, the user's
  listeners) runs once per server connection, as under ``QueuePool``, not once per loan;
* **invalidation**: a connection SQLAlchemy invalidates (a disconnect error, a
  ``GreenletExit`` or timeout mid-statement, ``invalidate()``) is discarded by greenpool and
  its slot freed; SQLAlchemy's pool-wide invalidation after a disconnect becomes greenpool's
  eviction of that endpoint's idle connections;
* **reset on return**: greenpool's alone (the rollback judged by the server's transaction
  status, ``DISCARD ALL`` when the loan may have changed the session, each bounded).
  SQLAlchemy's ``reset_on_return`` is off, so a returned connection is never rolled back
  twice; a ``Connection`` still ends its own transaction first, as always;
* **recycle, pre-ping**: greenpool's ``max_lifetime`` and its borrow check;
* **``connect`` listeners** run when the engine first meets a connection and again, before
  the engine's next checkout of it, after every ``DISCARD ALL`` that wiped their setup (a
  dirty loan by anyone): a ``SET search_path`` made there holds on every loan. Their setup
  is this engine's, not the group's, so a loan of an engine with listeners of the user's
  is always reset on return (another borrower of the group must not inherit it): one
  ``DISCARD ALL`` and the listeners again per loan. Setup every borrower of the group
  shares costs nothing per loan in the group's ``configure`` hook instead.

Which loans may have changed the session, so that a clean one costs no ``DISCARD ALL``:
every cursor of a greenpool connection tells its loan (:mod:`greenpool.cursors`), the
dialect's, ``checkout`` listeners', a ``Connection``'s and raw ones
(``conn.connection.cursor()``, ``engine.raw_connection()``) alike. On an engine made by
the ``greenpool`` engine plugin (which :func:`create_engine` and :func:`engine_options`
use) a loan starts clean when it is taken, before any listener runs; on a
:class:`GreenpoolPool` handed to ``sqlalchemy.create_engine`` by hand, every loan is reset.

Why one module of this length: the pool class SQLAlchemy subclasses and the engine plugin
share one loan table
(:meth:`GreenpoolPool.loan_of`); :class:`RoutingSession`, its one other job (30 lines), stays
beside them so that the integration is one import.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Union, cast

from sqlalchemy import create_engine as _sa_create_engine
from sqlalchemy import event
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import CreateEnginePlugin, Engine
from sqlalchemy.engine.url import URL
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool as _SAPool
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.sql import Select

from .cursors import Loan, ended
from .errors import ConfigError

if TYPE_CHECKING:
    from .connection import PooledConnection
    from .group import Group
    from .pool import Pool

__all__ = [
    "GreenpoolPool",
    "RoutingSession",
    "create_engine",
    "engine_options",
]

PoolSource = Union["Pool", Callable[[], "Pool"]]

#: SQLAlchemy pool arguments that would build or tune a second pool, and what replaces each
_REFUSED = {
    "poolclass": "greenpool is the pool",
    "creator": "greenpool opens the connections (configure the endpoints in its 'db')",
    "pool_size": "the group's connection_count",
    "max_overflow": "none: connection_count is the bound, never exceeded",
    "pool_timeout": "the group's timeout, or greenpool_timeout=",
    "pool_recycle": "the group's max_lifetime",
    "pool_pre_ping": "the group's check_idle_after (a borrow check is always on)",
    "pool_use_lifo": "greenpool hands out the most recently returned connection",
    "pool_reset_on_return": "greenpool resets on return, once (see the group's reset key)",
    "isolation_level": (
        "the group's autocommit (an engine-wide isolation level is set once per connection "
        "and would not survive greenpool's reset); per transaction, use "
        "Connection.execution_options(isolation_level=...), which costs a reconnect"
    ),
}


class GreenpoolPool(_SAPool):
    """A SQLAlchemy ``Pool`` that lends the connections of one greenpool group.

    ``pool`` is a :class:`greenpool.Pool`, or a function returning one (for example
    ``greenpool.get_pool``), called on the first checkout: a gunicorn worker can create the
    engine at import and the greenpool pool after ``monkey.patch_all()``.
    ``timeout`` overrides the group's acquire timeout for this engine.
    """

    def __init__(
        self,
        pool: PoolSource,
        group: str,
        *,
        timeout: float | None = None,
        track_statements: bool = False,
        echo: Any = None,
        logging_name: str | None = None,
        events: Any = None,
        dialect: Any = None,
        _dispatch: Any = None,
    ) -> None:
        super().__init__(
            cast(Any, self._hand_over),
            recycle=-1,
            echo=echo,
            logging_name=logging_name,
            reset_on_return=None,
            events=events,
            dialect=dialect,
            pre_ping=False,
            _dispatch=_dispatch,
        )
        self._source = pool
        self._group_name = group
        self._group: Group | None = None
        self._timeout = timeout
        #: a loan starts clean (the cursors tell it what they did; the plugin also knows
        #: which ``connect`` listeners are the dialect's); else every loan is dirty and
        #: reset with DISCARD ALL. Set by the engine plugin
        self.track_statements = track_statements
        #: id(raw connection) -> its loan, while SQLAlchemy holds it
        self._loans: dict[int, PooledConnection] = {}
        #: the SQLAlchemy record of each greenpool connection, reused for every loan of it
        self._records: weakref.WeakKeyDictionary[PooledConnection, _ConnectionRecord] = (
            weakref.WeakKeyDictionary()
        )
        #: a record made for a loan, until its connect step picks the loan up
        self._pending: weakref.WeakKeyDictionary[_ConnectionRecord, PooledConnection] = (
            weakref.WeakKeyDictionary()
        )
        #: each connection's ``resets`` when this engine's ``connect`` listeners last ran on
        #: it: after a ``DISCARD ALL`` since, they run again before the next checkout
        self._set_up_at: weakref.WeakKeyDictionary[PooledConnection, int] = (
            weakref.WeakKeyDictionary()
        )
        #: the ``connect`` listeners SQLAlchemy itself installed (the dialect's: client-side
        #: setup that survives ``DISCARD ALL``), set by the engine plugin. Any other is the
        #: user's, whose session state is this engine's own: its loans are reset on return
        #: and it runs again after each reset. None: unknown, all of them count as the user's
        self.dialect_listeners: frozenset[Any] | None = None

    # --- the group ------------------------------------------------------------------------

    @property
    def group(self) -> Group:
        """The greenpool group this pool lends from. A function given as the pool is asked
        again once its pool was closed (``greenpool.close()`` then ``init()`` again)."""
        group = self._group
        if group is None or (group.closed and callable(self._source)):
            source = self._source
            pool = source() if callable(source) else source
            group = self._group = pool.group(self._group_name)
        return group

    def loan_of(self, dbapi_connection: Any) -> PooledConnection | None:
        """The greenpool loan behind a raw connection SQLAlchemy holds, or None."""
        return self._loans.get(id(dbapi_connection))

    def _borrow(self) -> PooledConnection:
        pc = self.group.acquire(self._timeout)
        self._loans[id(pc.raw)] = pc
        pc.raw.greenpool_loan = Loan()  # raw cursors kept past the loan fail
        if self.track_statements and not self.user_listeners():
            # clean before any listener runs: every cursor made on the connection from
            # here (the dialect's, ``checkout`` listeners', a Connection's, raw ones) tells
            # the loan what it did (greenpool.cursors)
            pc.dirty = False
        return pc

    # --- SQLAlchemy's Pool interface ------------------------------------------------------

    def user_listeners(self) -> list[Any]:
        """The ``connect`` listeners beyond the dialect's: their setup (``SET search_path``,
        ...) is this engine's, not the group's session."""
        own = self.dialect_listeners or frozenset()
        return [fn for fn in self.dispatch.connect if fn not in own]

    def _do_get(self) -> _ConnectionRecord:
        pc = self._borrow()
        record = self._records.get(pc)
        if record is not None and record.dbapi_connection is pc.raw:
            if self._set_up_at.get(pc) != pc.resets:
                self._set_up_again(pc, record)
            return record
        # a connection this engine has not seen: a record whose connect step (run by
        # SQLAlchemy next, with its connect events) adopts the loan
        record = _ConnectionRecord(self, connect=False)
        self._pending[record] = pc
        return record

    def _hand_over(self, record: _ConnectionRecord) -> Any:
        """The pool's creator: the raw connection of the loan made for ``record``; or, when
        SQLAlchemy reconnects a record it invalidated during checkout, a new loan."""
        pc = self._pending.pop(record, None)
        if pc is None:
            pc = self._borrow()
        self._records[pc] = record
        self._set_up_at[pc] = pc.resets  # SQLAlchemy runs the connect listeners next
        return pc.raw

    def _set_up_again(self, pc: PooledConnection, record: _ConnectionRecord) -> None:
        """A ``DISCARD ALL`` wiped what this engine's ``connect`` listeners set up on
        ``pc`` (any borrower's dirty loan): run the user's again (the dialect's own set up
        the client side only, which a reset leaves alone). If one fails, the
        connection is discarded, as SQLAlchemy closes a connection whose listeners fail."""
        try:
            for listener in self.user_listeners():
                listener(pc.raw, record)
        except BaseException:
            self._loans.pop(id(pc.raw), None)
            self._records.pop(pc, None)
            ended(pc.raw)
            self.group.release(pc, discard="invalidated")
            raise
        self._set_up_at[pc] = pc.resets

    def _do_return_conn(self, record: Any) -> None:
        raw = record.dbapi_connection
        if raw is None:
            return  # invalidated (already discarded) or detached (given back on close)
        pc = self._loans.pop(id(raw), None)
        if pc is not None:
            ended(raw)
            self.group.release(pc)  # greenpool's reset; a failed one discards

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        """SQLAlchemy closes a connection only to be rid of it (invalidation, a failed
        connect event, a detached connection's close): greenpool discards it and frees
        its slot. A connection this pool does not hold on loan is left alone: it may be
        idle in the group or lent to someone else by now."""
        pc = self._loans.pop(id(connection), None)
        if pc is None:
            return
        ended(connection)
        self._records.pop(pc, None)
        self.group.release(pc, discard="invalidated")

    def _invalidate(self, connection: Any, exception: BaseException | None = None,
                    _checkin: bool = True) -> None:
        """SQLAlchemy's pool-wide invalidation after a disconnect: greenpool evicts the idle
        connections to that connection's server (in every group), now, instead of
        recycling every connection older than this moment on its next checkout."""
        pc = self.loan_of(getattr(connection, "dbapi_connection", None))
        if pc is not None:
            self.group.on_endpoint_failure(pc.endpoint)
        if _checkin and getattr(connection, "is_valid", False):
            connection.invalidate(exception)

    def dispose(self) -> None:
        """Nothing to close: the connections are the greenpool pool's (close that one)."""

    def recreate(self) -> GreenpoolPool:
        self.logger.info("Pool recreating")
        made = self.__class__(
            self._source,
            self._group_name,
            timeout=self._timeout,
            track_statements=self.track_statements,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )
        made.dialect_listeners = self.dialect_listeners
        return made

    def status(self) -> str:
        if self._group is None:
            return f"GreenpoolPool group={self._group_name!r} (not resolved yet)"
        return f"GreenpoolPool {self._group!r}"


# --- the engine plugin ----------------------------------------------------------------------


def _default_source() -> Pool:
    from . import get_pool

    return get_pool()


class GreenpoolPlugin(CreateEnginePlugin):
    """``create_engine(url, plugins=['greenpool'], greenpool_group='write')``, or
    ``?plugin=greenpool&greenpool_group=write`` in the URL: the engine's pool is a
    :class:`GreenpoolPool` (of ``greenpool_pool``, default the process-wide pool), and
    statements that change the session are tracked."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        query = url.query
        group = kwargs.pop("greenpool_group", None) or query.get("greenpool_group")
        source = kwargs.pop("greenpool_pool", None) or _default_source
        timeout = kwargs.pop("greenpool_timeout", None)
        if timeout is None and "greenpool_timeout" in query:
            timeout = query["greenpool_timeout"]
        if not isinstance(group, str) or not group:
            raise ConfigError(
                f"greenpool_group: {group!r} is not a group name; give the greenpool group "
                f"this engine lends from, e.g. greenpool_group='write'"
            )
        for key, instead in _REFUSED.items():
            if key in kwargs or key in query:
                value = kwargs[key] if key in kwargs else query[key]
                raise ConfigError(
                    f"{key}={value!r}: refused on a greenpool engine (group {group!r}), so "
                    f"that SQLAlchemy does not pool on top of greenpool; instead: {instead}"
                )
        if "pool" in kwargs:
            raise ConfigError(f"pool: the greenpool plugin provides the pool of group {group!r}")
        if timeout is not None:
            given = timeout
            try:
                timeout = float(timeout)
            except (TypeError, ValueError):
                timeout = None
            if isinstance(given, bool) or timeout is None or not 0 <= timeout <= 86400:
                raise ConfigError(f"greenpool_timeout: {given!r} is not allowed; give seconds "
                                  f"from 0 to 86400, or None for the group's timeout")
        if not callable(source):
            source.group(group)  # an unknown group: ConfigError now, not on first use
        # the pool's logging options mean the same here (Flask-SQLAlchemy sets echo_pool)
        kwargs["pool"] = GreenpoolPool(source, group, timeout=timeout,
                                       echo=kwargs.pop("echo_pool", None),
                                       logging_name=kwargs.pop("pool_logging_name", None))

    def update_url(self, url: URL) -> URL:
        return url.difference_update_query(["greenpool_group", "greenpool_timeout"])

    def engine_created(self, engine: Engine) -> None:
        pool = engine.pool
        if isinstance(pool, GreenpoolPool):
            pool.track_statements = True
            pool.dialect_listeners = frozenset(pool.dispatch.connect)


plugins.register("greenpool", __name__, "GreenpoolPlugin")


def engine_options(
    pool: PoolSource | None = None, group: str = "write", *, timeout: float | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``sqlalchemy.create_engine`` (Flask-SQLAlchemy's
    ``SQLALCHEMY_ENGINE_OPTIONS`` / ``engine_options``) that put the engine on ``group``.
    ``pool`` defaults to the process-wide pool (``greenpool.init``), looked up on first use."""
    options: dict[str, Any] = {"plugins": ["greenpool"], "greenpool_group": group}
    if pool is not None:
        options["greenpool_pool"] = pool
    if timeout is not None:
        options["greenpool_timeout"] = timeout
    return options


def create_engine(
    pool: PoolSource | None = None,
    group: str = "write",
    url: str | URL = "postgresql+psycopg2://",
    *,
    timeout: float | None = None,
    **kwargs: Any,
) -> Engine:
    """An ``Engine`` whose connections are loans of greenpool ``group``. The URL only names
    the dialect (psycopg2): where to connect is greenpool's configuration. Other keyword
    arguments go to ``sqlalchemy.create_engine`` (``echo``, ``execution_options``, ...);
    pool-sizing ones are refused with a :class:`ConfigError` naming greenpool's key."""
    options = engine_options(pool, group, timeout=timeout)
    extra: Mapping[str, Any] = kwargs
    if "plugins" in extra:
        options["plugins"] = [*options["plugins"], *extra["plugins"]]
        extra = {k: v for k, v in extra.items() if k != "plugins"}
    return _sa_create_engine(url, **options, **extra)


# --- reads to 'read', writes to 'write' ------------------------------------------------------


class RoutingSession(Session):
    """A ``Session`` over two engines: plain ``SELECT``s go to ``read``; flushes, DML,
    ``SELECT ... FOR UPDATE`` and textual SQL go to ``write``.

    Once a transaction has used ``write``, its later reads go there too, so it reads its
    own writes (a standby would not have them yet); that ends with the transaction. A new
    transaction reads from ``read`` again, which may lag behind the primary: read what you
    just committed through a plain ``Session(write_engine)``.

    ``sessionmaker(class_=RoutingSession, write=write_engine, read=read_engine)``.
    """

    def __init__(self, *args: Any, write: Engine, read: Engine, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_engine = write
        self.read_engine = read
        self._wrote = False

    def get_bind(self, mapper: Any = None, *, clause: Any = None, **kwargs: Any) -> Any:
        if self._wrote:
            return self.write_engine
        if not self._flushing and isinstance(clause, Select) and clause._for_update_arg is None:
            return self.read_engine
        self._wrote = True
        return self.write_engine


@event.listens_for(RoutingSession, "after_transaction_end")
def _transaction_ended(session: Session, transaction: Any) -> None:
    if isinstance(session, RoutingSession) and transaction.parent is None:
        session._wrote = False
