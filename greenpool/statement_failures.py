"""What a failed statement teaches the pool, learnt in one place for every caller (the
handler, Django's cursors).

:func:`failure_kind` reads the error and the connection: ``lost`` (the connection or its
server is gone), ``read_only`` (a write reached a server that refuses writes), or ``''`` (an
ordinary error: the endpoint is fine). :func:`statement_failed` acts on it: a lost
connection makes the idle connections to its endpoint suspect; a refused write on a server
that now reports itself a standby is news about the endpoint, and in a group that wants the
primary it means the server was demoted under us (``demoted``: the connection has the wrong
role; a statement that may be re-run can be, elsewhere). :func:`passing` tells an error that
running the same statement again later may not meet (a lock, a deadlock, a timeout) from
one it always will (a syntax error, a missing object, a permission).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg2 import extensions

from .endpoint import STANDBY
from .roles import role_of

if TYPE_CHECKING:
    from .connection import PooledConnection
    from .group import Group

_LOST_STATES = ("57P01", "57P02", "57P03")  # admin/crash shutdown, cannot connect now
_UNKNOWN = extensions.TRANSACTION_STATUS_UNKNOWN
#: SQLSTATE classes and codes of errors that depend on the moment, not on the statement:
#: transaction rollback (serialization failure, deadlock), insufficient resources (out of
#: memory, disk full, too many connections), lock not available (``lock_timeout``, ``NOWAIT``),
#: query canceled (``statement_timeout``, a cancel request)
_PASSING_CLASSES = ("40", "53")
_PASSING_CODES = ("55P03", "57014")


def _of_this_statement(exc: BaseException) -> bool:
    """An ERROR (not FATAL): the session lives on. A connection-class SQLSTATE at that
    severity is the statement's own (dblink or postgres_fdw failing to reach another
    server), not news about this connection."""
    diag = getattr(exc, "diag", None)
    return diag is not None and diag.severity_nonlocalized == "ERROR"


def passing(exc: BaseException) -> bool:
    """Whether the server refused the statement for a reason of the moment (see
    ``_PASSING_CLASSES``), so that running it again later may succeed."""
    code = getattr(exc, "pgcode", None) or ""
    return code[:2] in _PASSING_CLASSES or code in _PASSING_CODES


def failure_kind(exc: BaseException, raw: Any) -> str:
    """'lost' (the connection or server is gone), 'read_only' (a write reached a standby),
    or '' (an ordinary error: the endpoint is fine)."""
    code = getattr(exc, "pgcode", None)
    if code == "25006":
        return "read_only"
    if raw.closed or (code and (code.startswith("08") or code in _LOST_STATES)
                      and not _of_this_statement(exc)):
        return "lost"
    if raw.get_transaction_status() == _UNKNOWN:
        return "lost"
    return ""


def statement_failed(exc: BaseException, pc: PooledConnection, group: Group) -> str:
    """Learn from ``exc``, raised by a statement on ``pc`` lent by ``group``; return its kind:
    :func:`failure_kind`'s, or ``demoted`` for a refused write in a group that wants the
    primary, on a server that now says it is a standby. The error itself is the caller's to
    raise (or to answer with a replay where that is safe)."""
    raw = pc.raw
    kind = failure_kind(exc, raw)
    if kind == "lost":
        group.on_endpoint_failure(pc.endpoint)
    elif kind == "read_only":
        role = role_of(raw)  # the server's last ParameterStatus: no round trip
        if role == STANDBY:
            pc.endpoint.observe_role(role)
            if group.role == "primary":
                return "demoted"
    return kind
