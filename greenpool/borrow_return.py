"""What a pooled connection goes through when it is lent (:func:`check_on_borrow`) and when
it comes back (:func:`reset_on_return`): the two steps of every loan, so the cheapest code of
the package.

The rules come from measured driver behaviour, each kept by a test:

* An idle connection whose server went away still says ``closed == 0``; its socket is
  readable, though. So borrowing costs one zero-timeout poll, and a real ``SELECT 1`` is
  only sent when the socket is readable or the connection sat idle for a while.
* psycopg2's ``rollback()`` does nothing in autocommit mode, so the reset on return is
  judged by the server-reported transaction status, not by the autocommit flag.
* A loan that may have changed the session (``PooledConnection.dirty``: the handler sets
  it for SQL that can, and for any use of the raw cursor or connection) is reset with one
  ``DISCARD ALL``, which also restores the startup packet's settings (the group's
  ``statement_timeout``, ``readonly``). A clean loan costs no round trip. Through a
  transaction-mode pooler no ``DISCARD ALL`` is sent (see :func:`_reset_session`).
* The borrow check is bounded by the caller's remaining time, the rollback and reset on
  return by ``connect_timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg2
from psycopg2 import extensions

from . import pooler
from .concurrency.backend import Backend
from .config import GroupConfig
from .connection import (
    PooledConnection,
    RoundTripTimeout,
    bounded,
    configure,
    is_pooled,
    outside_transaction,
    round_trip,
)
from .cursors import ended

logger = logging.getLogger("greenpool")

_STATUS_IDLE = extensions.TRANSACTION_STATUS_IDLE
_PSYCOPG_READY = extensions.STATUS_READY
_STATUS_OPEN = (extensions.TRANSACTION_STATUS_INTRANS, extensions.TRANSACTION_STATUS_INERROR)


#: addresses found to be poolers (pooler.py's set, mutated in place there): while it is empty,
#: as it is but behind an undeclared pooler, a loan's whole cost of this rule is one truth test
_poolers_found = pooler.detected_addresses


def _settings_dropped(pc: PooledConnection) -> bool:
    """Opened before its endpoint was found to be a pooler that drops ``options`` (another
    group's readonly connection finds that out): its settings never reached the server;
    a new connection carries them with each transaction. Callers test ``_poolers_found``
    first."""
    return not is_pooled(pc.raw) and pooler.mode_of(pc.endpoint.config) != pooler.NONE


def check_on_borrow(
    pc: PooledConnection,
    group: GroupConfig,
    backend: Backend,
    now: float,
    deadline: float | None = None,
) -> str:
    """'' if ``pc`` may be handed out, else the reason to discard it.

    Costs one zero-timeout poll; sends ``SELECT 1`` only when the socket has something to say
    (a closed server, a NOTIFY) or the connection sat idle longer than ``check_idle_after``.
    The ping is bounded by ``connect_timeout`` and by ``deadline`` (the caller's, in
    ``time.monotonic()`` terms) when that comes first. A ping cut short by the caller's
    deadline says nothing about the server: the reason is then ``check_timeout``, not
    ``failed_check``. A caller with no time left at all (``timeout=0``) gets a connection
    that sat idle past ``check_idle_after`` unpinged when its socket shows nothing: that
    free check is all it has time for (a readable one is ``check_timeout``, still open).
    """
    raw = pc.raw
    if raw.closed:
        return "closed"
    if _poolers_found and _settings_dropped(pc):
        return "pooler_detected"
    if now >= pc.expires:
        return "max_lifetime"
    idle_for = now - pc.last_used
    if idle_for >= group.max_idle:
        return "max_idle"
    if idle_for < group.check_idle_after and not pc.readable():
        return ""
    bound = pc.endpoint.config.connect_timeout
    cut_by_caller = False
    if deadline is not None:
        left = deadline - time.monotonic()
        if not left > 0 and not pc.readable():
            return ""  # no time for a ping, and the free check found nothing: lend it
        if not left >= bound:
            bound, cut_by_caller = left, True
    try:
        outside_transaction(raw, "SELECT 1", backend, bound)
    except RoundTripTimeout:
        return "check_timeout" if cut_by_caller else "failed_check"
    except psycopg2.Error:
        return "failed_check"
    del raw.notifies[:]
    return ""


def reset_on_return(
    pc: PooledConnection, group: GroupConfig, backend: Backend, now: float
) -> str:
    """Bring ``pc`` back to the group's configured session and mark it used at ``now`` (the
    return's ``time.monotonic()``, taken by the caller, which also ends the use time with
    it); '' if reusable, else the reason to discard it.

    A clean loan costs no round trip beyond the rollback of a transaction left open. A
    dirty one (see :attr:`PooledConnection.dirty`; every loan with ``reset: 'always'``)
    costs one more: ``DISCARD ALL``, then the group's ``on_return`` hook if it has one.
    Each round trip is bounded by the endpoint's ``connect_timeout``. May raise a
    BaseException (timeout, kill); the caller then discards.
    """
    raw = pc.raw
    if raw.closed:
        return "broken"
    if _poolers_found and _settings_dropped(pc):
        return "pooler_detected"
    autocommit = raw.autocommit
    status = raw.get_transaction_status()
    if status != _STATUS_IDLE:
        if status not in _STATUS_OPEN:
            return "unknown_state"  # a command still running, or the link is gone
        bound = pc.endpoint.config.connect_timeout
        try:
            if autocommit:  # psycopg2's rollback() is a no-op here
                round_trip(raw, "ROLLBACK", backend, bound)
            else:
                bounded(backend, bound, "ROLLBACK", raw.rollback)
        except psycopg2.Error:
            return "reset_failed"
        if raw.get_transaction_status() != _STATUS_IDLE:
            return "reset_failed"
    elif not autocommit and raw.status != _PSYCOPG_READY:
        # a COMMIT or ROLLBACK sent as SQL: the server is idle, but psycopg2 still thinks a
        # transaction is open and would not send BEGIN for the next borrower. Its own
        # rollback() puts it right (the server only warns that nothing was open).
        try:
            bounded(backend, pc.endpoint.config.connect_timeout, "ROLLBACK", raw.rollback)
        except psycopg2.Error:
            return "reset_failed"
    if raw.readonly is not None or raw.isolation_level is not None or raw.deferrable is not None:
        # psycopg2 may have sent these to the server as SETs (in autocommit) or kept them
        # client-side; which one depends on history we cannot see. Start afresh instead.
        return "session_changed"
    if autocommit != group.autocommit:
        raw.autocommit = group.autocommit
    if pc.dirty or group.reset == "always":
        ended(raw)  # (a loan that lent its raw connection on is dirty)
        reason = _reset_session(pc, group, backend)
        if reason:
            return reason
    pc.dirty = True  # until a handler takes it again
    if raw.notices:
        del raw.notices[:]
    if raw.notifies:
        del raw.notifies[:]
    if now >= pc.expires:
        return "max_lifetime"
    pc.last_used = now
    return ""


def _user_hook_ran(group: GroupConfig, failed: str, call: Callable[..., Any], *args: Any) -> bool:
    """Run a user's hook on return; False (logged, the connection to be discarded) when it
    raised anything but a driver error, which the caller judges like its own statements."""
    try:
        call(*args)
    except psycopg2.Error:
        raise
    except Exception:
        logger.warning("group %r: %s; the connection is discarded", group.name, failed,
                       exc_info=True)
        return False
    return True


def _reset_session(pc: PooledConnection, group: GroupConfig, backend: Backend) -> str:
    """``DISCARD ALL`` (unless ``reset: 'never'``) and the user's hook, on an idle connection
    with the group's autocommit flag; '' if the session is the configured one again."""
    raw = pc.raw
    bound = pc.endpoint.config.connect_timeout
    # Through a transaction-mode pooler the loan's session state (if it made any, which it
    # must not) is on whatever server connection ran it, and DISCARD ALL would run on
    # whichever the pooler picks now: it cannot undo anything, so it is not sent. The
    # group's settings always travel per transaction there (pooler.trusts_server_defaults),
    # so there is nothing to restore either.
    discard = group.reset != "never" and pooler.discards_reach(pc.endpoint.config)
    try:
        if discard:
            pc.resets += 1  # (before: a DISCARD ALL cut short may have run)
            outside_transaction(raw, "DISCARD ALL", backend, bound)
            if group.configure is not None:
                if raw.autocommit != group.autocommit:
                    raw.autocommit = group.autocommit
                if not _user_hook_ran(group, "the configure hook failed after the reset",
                                      configure, raw, group, backend, bound):
                    return "reset_failed"
        hook = group.on_return
        if hook is not None and not _user_hook_ran(
                group, "the on_return hook failed", bounded, backend, bound,
                "the on_return hook", hook, raw):
            return "reset_failed"
    except psycopg2.Error:
        return "reset_failed"
    if raw.closed or raw.get_transaction_status() != _STATUS_IDLE:
        return "reset_failed"
    if raw.autocommit != group.autocommit:
        raw.autocommit = group.autocommit
    info = raw.info
    datestyle = info.parameter_status("DateStyle") or "ISO"
    encoding = info.parameter_status("client_encoding") or raw.encoding
    if not datestyle.startswith("ISO") or _norm(encoding) != _norm(raw.encoding):
        # psycopg2 set these at connect and parses by them; the reset undid its setting
        return "session_changed"
    return ""


def _norm(encoding: str) -> str:
    return encoding.upper().replace("-", "").replace("_", "")
