"""One small adapter per pool, all with the same interface, each written the way that pool's
users write it under gevent.

Every adapter takes a :class:`Target` (where to connect) plus ``size``, ``autocommit`` and
``readonly``, and offers:

* ``session()``: a context manager lending one connection for a block; the object it yields
  has ``query(sql)`` (rows). A clean exit commits, an exception rolls back and propagates.
  Context managers are classes, never ``@contextmanager`` generators: a generator layer
  costs every pool a few microseconds per operation (more when the task switches inside
  it, waiting for a connection), and no user of these pools needs one.
* ``checkout()``: checkout and checkin only, no statement.
* ``close()``; ``retries``: exhaustion errors a retry loop absorbed (psycopg2.pool only).
* ``session_within(timeout)``: ``session()`` with a per-call acquire timeout, for the pools
  that have one (``acquire_timeout_errors`` names what they raise when it runs out).

``lazy=True`` builds the pool empty, so that it connects on demand (deadline storm).

Import this module only after ``gevent.monkey.patch_all()`` (see :mod:`benchmarks.worker`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

# psycopg2.pool raises at once on exhaustion; users wrap getconn in a bounded retry.
GETCONN_RETRY_SLEEP = 0.01  # seconds between attempts
GETCONN_RETRY_ATTEMPTS = 300  # so a caller gives up after about 3 s
ACQUIRE_TIMEOUT = 5  # seconds, for the pools that have an acquire timeout


@dataclass
class Target:
    """One or more loopback endpoints of throwaway clusters, plus session settings."""

    hosts: list[tuple[str, int]]
    user: str
    password: str
    dbname: str
    app_name: str
    extra: dict[str, str] = field(default_factory=dict)  # more libpq keywords

    def libpq_params(self, readonly: bool = False) -> dict[str, str]:
        params = {
            "host": ",".join(h for h, _ in self.hosts),
            "port": ",".join(str(p) for _, p in self.hosts),
            "dbname": self.dbname, "user": self.user, "password": self.password,
            "application_name": self.app_name, **self.extra,
        }
        if readonly:
            params["options"] = "-c default_transaction_read_only=on"
        return params

    def dsn(self, readonly: bool = False) -> str:
        def quote(v: str) -> str:
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"

        return " ".join(f"{k}={quote(v)}" for k, v in self.libpq_params(readonly).items())


class _Rows:
    """``query(sql)`` over a psycopg2 (or psycopg 3) connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def query(self, sql: str) -> list[Any]:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()


class _Entered:
    """A pool's own context manager with a ``query`` shim over what it yields: what a user
    of that pool writes as ``with pool.connection() as conn`` directly."""

    __slots__ = ("inner", "shim")

    def __init__(self, inner: Any, shim: Any) -> None:
        self.inner, self.shim = inner, shim

    def __enter__(self) -> Any:
        return self.shim(self.inner.__enter__())

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)


class _Borrowed:
    """A user's helper for a pool without a context manager of its own (psycopg2.pool,
    DBUtils): borrow, commit on a clean exit, roll back on an error, give back. A
    ``BaseException`` (gevent.Timeout, a kill) gets no rollback, as in the usual
    ``except Exception`` helper: what the pool then does with the connection is its own."""

    __slots__ = ("adapter", "conn", "statement")

    def __init__(self, adapter: Any, statement: bool = True) -> None:
        self.adapter, self.statement = adapter, statement
        self.conn: Any = None

    def __enter__(self) -> Any:
        conn = self.conn = self.adapter.borrow()
        return _Rows(conn) if self.statement else None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conn = self.conn
        try:
            if not self.statement:
                return
            if exc_type is None:
                try:
                    conn.commit()
                except Exception:
                    conn.rollback()
                    raise
            elif issubclass(exc_type, Exception):
                conn.rollback()
        finally:
            self.adapter.give_back(conn)


class Adapter:
    name = "?"
    psycopg2_based = True
    pooled = True
    # what a per-call acquire timeout raises; empty: the pool has no per-call timeout
    acquire_timeout_errors: tuple[type[BaseException], ...] = ()
    no_acquire_timeout = "no per-call acquire timeout"  # why deadline-storm is n/a for it

    def __init__(self, target: Target, size: int, autocommit: bool = True,
                 readonly: bool = False, lazy: bool = False) -> None:
        self.target, self.size = target, size
        self.autocommit, self.readonly, self.lazy = autocommit, readonly, lazy
        self.retries = 0

    def session(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def session_within(self, timeout: float) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError(self.no_acquire_timeout)

    def checkout(self) -> contextlib.AbstractContextManager[Any]:
        return self.session()

    def close(self) -> None:
        pass


class Raw(Adapter):
    """The floor: no pool, each greenlet on a psycopg2 connection of its own, opened on its
    first use and reused. With one greenlet that is one connection (overhead); with
    ``size`` greenlets it is the io-bound ceiling, where nobody ever waits for a connection.
    """

    name, pooled = "raw psycopg2", False
    no_acquire_timeout = "no pool"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.mine: dict[Any, _Rows] = {}

    def _rows(self) -> _Rows:
        import gevent
        import psycopg2

        me = gevent.getcurrent()
        rows = self.mine.get(me)
        if rows is None:
            conn = psycopg2.connect(self.target.dsn(self.readonly))
            conn.autocommit = self.autocommit
            rows = self.mine[me] = _Rows(conn)
        return rows

    def session(self) -> _RawSession:
        return _RawSession(self)

    def close(self) -> None:
        for rows in self.mine.values():
            rows.conn.close()


class _Borrowing(Adapter):
    """A pool without a context manager of its own: subclasses say how to borrow and give
    back, :class:`_Borrowed` does the rest."""

    def borrow(self) -> Any:
        raise NotImplementedError

    def give_back(self, conn: Any) -> None:
        raise NotImplementedError

    def session(self) -> _Borrowed:
        return _Borrowed(self)

    def checkout(self) -> _Borrowed:
        return _Borrowed(self, statement=False)


class _RawSession:
    __slots__ = ("adapter", "rows")

    def __init__(self, adapter: Raw) -> None:
        self.adapter = adapter

    def __enter__(self) -> _Rows:
        self.rows = self.adapter._rows()
        return self.rows

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None and not self.adapter.autocommit:
            self.rows.conn.commit()


class _Psycopg2Pool(_Borrowing):
    """psycopg2.pool with minconn == maxconn (a smaller minconn closes returned connections)."""

    no_acquire_timeout = "getconn() never waits (it raises at once when exhausted)"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        from psycopg2 import pool

        self.pool_error = pool.PoolError
        self.pool = self.pool_class(pool)(self.size, self.size, self.target.dsn(self.readonly))

    def pool_class(self, module: Any) -> Any:
        raise NotImplementedError

    def borrow(self) -> Any:
        conn = self._getconn()
        if conn.autocommit != self.autocommit:
            conn.autocommit = self.autocommit
        return conn

    def _getconn(self) -> Any:
        for _ in range(GETCONN_RETRY_ATTEMPTS):
            try:
                return self.pool.getconn()
            except self.pool_error as exc:
                if "exhausted" not in str(exc):
                    raise
                self.retries += 1
                time.sleep(GETCONN_RETRY_SLEEP)  # gevent's sleep after patch_all
        raise self.pool_error("connection pool exhausted (gave up retrying)")

    def give_back(self, conn: Any) -> None:
        self.pool.putconn(conn)


    def close(self) -> None:
        self.pool.closeall()


class Psycopg2Simple(_Psycopg2Pool):
    name = "psycopg2 SimpleConnectionPool"

    def pool_class(self, module: Any) -> Any:
        return module.SimpleConnectionPool


class Psycopg2Threaded(_Psycopg2Pool):
    name = "psycopg2 ThreadedConnectionPool"

    def pool_class(self, module: Any) -> Any:
        return module.ThreadedConnectionPool


class PsycopgPool(Adapter):
    """psycopg 3's psycopg_pool.ConnectionPool (psycopg detects gevent's patching itself)."""

    name, psycopg2_based = "psycopg_pool ConnectionPool", False
    no_acquire_timeout = ""  # connection(timeout=...)

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        from psycopg_pool import ConnectionPool, PoolTimeout

        self.acquire_timeout_errors = (PoolTimeout,)
        self.pool = ConnectionPool(
            self.target.dsn(self.readonly), min_size=0 if self.lazy else self.size,
            max_size=self.size, kwargs={"autocommit": self.autocommit},
            timeout=ACQUIRE_TIMEOUT, open=True,
        )
        if not self.lazy:
            self.pool.wait(30)

    def session(self) -> _Entered:
        return _Entered(self.pool.connection(), _Rows)

    def session_within(self, timeout: float) -> _Entered:
        return _Entered(self.pool.connection(timeout=timeout), _Rows)

    def checkout(self) -> Any:
        return self.pool.connection()

    def close(self) -> None:
        self.pool.close()


class SQLAlchemyQueuePool(Adapter):
    """create_engine(..., poolclass=QueuePool); the URL lists every host (libpq multi-host)."""

    name = "SQLAlchemy QueuePool"
    pre_ping = False
    no_acquire_timeout = "pool_timeout is per engine, not per call"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        from urllib.parse import quote

        from sqlalchemy import create_engine
        from sqlalchemy.pool import QueuePool

        t = self.target
        hosts = "&".join(f"host={h}:{p}" for h, p in t.hosts)
        url = f"postgresql+psycopg2://{t.user}:{quote(t.password)}@/{t.dbname}?{hosts}"
        params = t.libpq_params(self.readonly)
        connect_args = {k: v for k, v in params.items()
                        if k not in ("host", "port", "dbname", "user", "password")}
        self.engine = create_engine(
            url, poolclass=QueuePool, pool_size=self.size, max_overflow=0,
            pool_timeout=ACQUIRE_TIMEOUT, pool_pre_ping=self.pre_ping, connect_args=connect_args,
            isolation_level="AUTOCOMMIT" if self.autocommit else None,
        )

    def session(self) -> _Entered:
        return _Entered(self.engine.begin(), _SQLAlchemyRows)

    def checkout(self) -> Any:
        return self.engine.connect()

    def close(self) -> None:
        self.engine.dispose()


class _SQLAlchemyRows:
    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def query(self, sql: str) -> list[Any]:
        return list(self.conn.exec_driver_sql(sql).fetchall())


class SQLAlchemyPrePing(SQLAlchemyQueuePool):
    name, pre_ping = "SQLAlchemy QueuePool pre_ping", True


class DBUtilsPooledDB(_Borrowing):
    """DBUtils PooledDB, blocking when exhausted; a creator function sets autocommit."""

    name = "DBUtils PooledDB"
    no_acquire_timeout = "blocking=True waits without a timeout"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        import psycopg2
        from dbutils.pooled_db import PooledDB

        dsn, autocommit = self.target.dsn(self.readonly), self.autocommit

        def connect() -> Any:
            conn = psycopg2.connect(dsn)
            conn.autocommit = autocommit
            return conn

        self.pool = PooledDB(connect, mincached=self.size, maxcached=self.size,
                             maxconnections=self.size, blocking=True)

    def borrow(self) -> Any:
        return self.pool.connection()

    def give_back(self, conn: Any) -> None:
        conn.close()  # back to the pool


    def close(self) -> None:
        self.pool.close()


class PgDbPool(Adapter):
    """pgdbpool: its config has no port and no application_name, so libpq's PGPORT and
    PGAPPNAME environment variables carry them (a comma list of ports for several hosts)."""

    name = "pgdbpool"
    no_acquire_timeout = "Handler() takes no timeout"

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        from pgdbpool import pool

        t = self.target
        params = t.libpq_params(self.readonly)
        os.environ["PGPORT"] = params["port"]
        os.environ["PGAPPNAME"] = t.app_name
        for key, env in (("load_balance_hosts", "PGLOADBALANCEHOSTS"),):
            if key in params:
                os.environ[env] = params[key]
        self.module = pool
        pool.Connection.init({
            "type": "threaded",
            "db": {"host": params["host"], "name": t.dbname, "user": t.user,
                   "pass": t.password, "query_timeout": 30000},
            "groups": {"g": {"connection_count": self.size, "autocommit": self.autocommit}},
        })

    def session(self) -> _Entered:
        return _Entered(self.module.Handler("g"), _PgDbPoolRows)

    def checkout(self) -> Any:
        return self.module.Handler("g")


class _PgDbPoolRows:
    __slots__ = ("db",)

    def __init__(self, db: Any) -> None:
        self.db = db

    def query(self, sql: str) -> list[Any]:
        return list(self.db.query(sql).fetchall())


class GreenPool(Adapter):
    """greenpool; its groups are lazy already (``min_size`` 0), so ``lazy`` changes nothing."""

    name = "greenpool"
    no_acquire_timeout = ""  # handler(group, timeout=...)

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        import greenpool

        self.acquire_timeout_errors = (greenpool.PoolTimeout,)
        t = self.target
        self.pool = greenpool.Pool({
            "db": [{"host": h, "port": p, "name": t.dbname, "user": t.user, "pass": t.password}
                   for h, p in t.hosts],
            "application_name": t.app_name,
            "groups": {"g": {"connection_count": self.size, "autocommit": self.autocommit,
                             "readonly": self.readonly, "role": "any",
                             "timeout": ACQUIRE_TIMEOUT}},
        })

    def session(self) -> Any:
        return self.pool.handler("g")  # its block object has query() itself

    def session_within(self, timeout: float) -> Any:
        return self.pool.handler("g", timeout=timeout)

    def checkout(self) -> Any:
        return self.pool.handler("g")

    def close(self) -> None:
        self.pool.close()


ADAPTERS: dict[str, type[Adapter]] = {
    "raw": Raw,
    "simple": Psycopg2Simple,
    "threaded": Psycopg2Threaded,
    "psycopg_pool": PsycopgPool,
    "sqlalchemy": SQLAlchemyQueuePool,
    "sqlalchemy_preping": SQLAlchemyPrePing,
    "dbutils": DBUtilsPooledDB,
    "pgdbpool": PgDbPool,
    "greenpool": GreenPool,
}
