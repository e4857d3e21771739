"""greenpool: a PostgreSQL connection pool for servers that run on greenlets.

Quick use::

    from gevent import monkey; monkey.patch_all()
    import greenpool

    greenpool.init({'db': {...}, 'groups': {'write': {'connection_count': 10}}})
    with greenpool.handler('write') as db:
        db.query('INSERT INTO t VALUES (%s)', ('x',))

``init``/``handler``/``stats``/``close`` work on one process-wide :class:`Pool`; create
:class:`Pool` objects yourself when you want several.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .config import PoolConfig, parse_config
from .errors import (
    CommitOutcomeUnknown,
    ConfigError,
    ConnectFailed,
    NoHealthyEndpoint,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyWaiters,
    TransactionAborted,
)
from .exclusive import Exclusive
from .handler import Handler
from .listen import Gap, Listener
from .pool import Pool

__version__ = "0.1.0"

__all__ = [
    "CommitOutcomeUnknown",
    "ConfigError",
    "ConnectFailed",
    "Exclusive",
    "Gap",
    "Handler",
    "Listener",
    "NoHealthyEndpoint",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolTimeout",
    "TooManyWaiters",
    "TransactionAborted",
    "close",
    "exclusive",
    "get_pool",
    "handler",
    "init",
    "listen",
    "parse_config",
    "stats",
]

_pool: Pool | None = None


def init(config: Mapping[str, Any] | PoolConfig) -> Pool:
    """Create the process-wide pool. Call once per process (per gunicorn worker)."""
    global _pool
    if _pool is not None and not _pool.closed:
        raise PoolError("greenpool.init() was already called; call greenpool.close() first")
    _pool = Pool(config)
    return _pool


def get_pool() -> Pool:
    """The process-wide pool; raises :class:`PoolError` before :func:`init`."""
    if _pool is None:
        raise PoolError("greenpool is not initialised: call greenpool.init(config) first")
    return _pool


def handler(
    group: str | None = None, *, timeout: float | None = None, idempotent: bool = False
) -> Handler:
    """``with greenpool.handler('write') as db:`` on the process-wide pool."""
    return get_pool().handler(group, timeout=timeout, idempotent=idempotent)


def exclusive(group: str | None = None, *, timeout: float | None = None) -> Exclusive:
    """``with greenpool.exclusive('write') as conn:`` on the process-wide pool."""
    return get_pool().exclusive(group, timeout=timeout)


def listen(
    group: str | None, channels: str | Iterable[str], *, timeout: float | None = None,
    heartbeat: float = 5.0,
) -> Listener:
    """``greenpool.listen("write", ["jobs"])`` on the process-wide pool (see Pool.listen)."""
    return get_pool().listen(group, channels, timeout=timeout, heartbeat=heartbeat)


def stats() -> dict[str, Any]:
    """Stats of the process-wide pool (see :meth:`Pool.stats`)."""
    return get_pool().stats()


def close() -> None:
    """Close the process-wide pool (idempotent); :func:`init` may be called again after."""
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None
