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

import os
import threading
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
from .listen import DEFAULT_MAX_BACKLOG, Gap, Listener
from .pool import Pool, fit_to_process

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


class _Making:
    """An ``init()`` under way: the config it makes a pool of, and how it ended for those
    who wait on it (``pool``, or the ``error`` to raise; neither: the maker was killed or
    interrupted, so a waiter tries again itself)."""

    __slots__ = ("config", "done", "error", "pool")

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        #: made at call time: a green Event in a patched process (the mode check has made
        #: sure the config's mode fits the process), a real one otherwise
        self.done = threading.Event()
        self.pool: Pool | None = None
        self.error: Exception | None = None


_making: _Making | None = None
#: guards ``_pool`` and ``_making`` only, never across a switch or a blocking call (making a
#: pool can take ``startup_timeout``: others wait on ``_Making.done`` instead)
_guard = threading.Lock()


def _after_fork_in_child() -> None:
    """A lock held by another thread at fork would stay held in the child for good, and an
    ``init()`` under way in another thread does not exist there."""
    global _guard, _making
    _guard = threading.Lock()
    _making = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def init(config: Mapping[str, Any] | PoolConfig, *, exist_ok: bool = False) -> Pool:
    """Create the process-wide pool. Call once per process (per gunicorn worker).

    While one is open a second call raises :class:`PoolError`, unless ``exist_ok`` and
    its config is the same: then it returns the open pool (the lazy "first use creates it"
    form, safe against racing callers). Calls racing an ``init()`` still under way (a
    ``startup_timeout`` wait) wait for it and share its pool, or its error; with another
    config they raise :class:`PoolError` at once. Either way one process makes one pool.
    """
    global _making
    # auto resolved; the Event a racing caller waits on must fit the process
    parsed = fit_to_process(parse_config(config))
    while True:
        with _guard:
            pool, making = _pool, _making
            if pool is not None and not pool.closed:
                if exist_ok and pool.config == parsed:
                    return pool
                raise PoolError(_init_refused(pool.config == parsed))
            if making is None:
                making = _making = _Making(parsed)
                mine = True
            elif making.config != parsed:
                raise PoolError(_init_refused(False))
            else:
                mine = False
        if mine:
            return _make(making)
        making.done.wait()
        if making.pool is not None:
            return making.pool
        if making.error is not None:
            raise making.error
        # the maker was interrupted (killed, KeyboardInterrupt): try again


def _init_refused(same: bool) -> str:
    if same:
        return ("greenpool.init() was already called; call greenpool.close() first (or "
                "init(config, exist_ok=True) to get the open pool)")
    return ("greenpool.init() was already called with another configuration; call "
            "greenpool.close() first")


def _make(making: _Making) -> Pool:
    """Make the pool for ``making`` and publish it, or its failure, to those waiting."""
    global _pool, _making
    try:
        pool = Pool(making.config)
        with _guard:
            current = _making is making
            if current:
                making.pool = _pool = pool
        if not current:  # close() (or a fork) came first: nothing may be left open
            pool.close()
            raise PoolClosed("greenpool.close() was called (or the process forked) while "
                             "greenpool.init() was under way; the pool it made is closed")
        return pool
    except Exception as exc:
        making.error = exc
        raise
    finally:
        with _guard:
            if _making is making:
                _making = None
        making.done.set()


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
    heartbeat: float = 5.0, max_backlog: int = DEFAULT_MAX_BACKLOG,
) -> Listener:
    """``greenpool.listen("write", ["jobs"])`` on the process-wide pool (see Pool.listen)."""
    return get_pool().listen(group, channels, timeout=timeout, heartbeat=heartbeat,
                             max_backlog=max_backlog)


def stats() -> dict[str, Any]:
    """Stats of the process-wide pool (see :meth:`Pool.stats`)."""
    return get_pool().stats()


def close() -> None:
    """Close the process-wide pool (idempotent); :func:`init` may be called again after.
    An ``init()`` still under way closes its pool and raises :class:`PoolClosed`."""
    global _pool, _making
    with _guard:
        pool, _pool = _pool, None
        _making = None  # an init() under way closes what it makes; a later one starts afresh
    if pool is not None:
        pool.close()
