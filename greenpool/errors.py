"""The exceptions greenpool raises.

Pool errors subclass :class:`psycopg2.OperationalError`, so code that already catches the
driver's operational errors keeps working when it moves to greenpool. ``__module__`` is set
to the public package so tracebacks read ``greenpool.PoolTimeout``.
"""

from __future__ import annotations

import psycopg2


class PoolError(psycopg2.OperationalError):
    """Base class of every error raised by the pool itself (not by the server)."""


class PoolTimeout(PoolError):
    """No connection could be handed out within the acquire timeout."""


class TooManyWaiters(PoolError):
    """The group's waiting line is full (``max_waiting``); raised at once, without waiting."""


class PoolClosed(PoolError):
    """The pool was closed while acquiring, or before."""


class ConnectFailed(PoolError):
    """A connection attempt failed for a reason retrying cannot fix (e.g. bad password)."""


class NoHealthyEndpoint(PoolTimeout):
    """Every endpoint of the group failed within the acquire timeout."""


class CommitOutcomeUnknown(PoolError):
    """The connection broke during COMMIT: the transaction may or may not have been applied.

    Never retried by the pool; the application must check (or make the write idempotent).
    """


class TransactionAborted(PoolError):
    """A handler block ended cleanly but its transaction had failed; it was rolled back.

    Raised instead of silently "committing" a failed transaction (PostgreSQL answers such a
    COMMIT with ROLLBACK and psycopg2 reports success).
    """


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


for _cls in (
    PoolError,
    PoolTimeout,
    TooManyWaiters,
    PoolClosed,
    ConnectFailed,
    NoHealthyEndpoint,
    CommitOutcomeUnknown,
    TransactionAborted,
    ConfigError,
):
    _cls.__module__ = "greenpool"
del _cls
