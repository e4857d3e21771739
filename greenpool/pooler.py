"""Through a server-side pooler (PgBouncer): how a group's settings reach the server.

Directly, ``statement_timeout`` and ``readonly`` travel in the startup packet's ``options``.
PgBouncer refuses that parameter (``FATAL: unsupported startup parameter: options``), or,
told to ignore it, drops it silently. And in transaction pooling mode any session state
(a ``SET``) stays on a *server* connection that the next transaction of another client
gets. So through a pooler the settings travel with every transaction instead, in the same
round trip as its first statement::

    SET LOCAL statement_timeout = 500; SET TRANSACTION READ ONLY; <the statement>

``SET LOCAL`` and ``SET TRANSACTION`` end with their transaction, so nothing outlives it, in
either pool mode. In autocommit the text is one simple query, which PostgreSQL runs as one
implicit transaction block: the settings cover the statement and end with it (a ``BEGIN``
in the text turns the block into an explicit transaction, which keeps them). Statements
that refuse to run inside a transaction block (``VACUUM``, ``CREATE DATABASE``, ``... INDEX
CONCURRENTLY``, ``DISCARD ALL``, ...) are sent as they are, without the settings.

How the pool knows: the endpoint key ``pooler`` (``session`` / ``transaction``; ``none``
means PostgreSQL itself), or, when the key is not given, detection: the first refusal of
``options`` marks that address as a pooler for the life of the process (treated as
``transaction``, which is correct in both modes) and the connect is retried at once without
it, with one warning saying to set the key. A pooler that drops ``options`` silently
(``ignore_startup_parameters = options``) is caught the same way by a readonly group, whose
connection then reports ``default_transaction_read_only=off``; a group with only a
``statement_timeout`` cannot tell, which is what the key is for.

Roles: PgBouncer reports ``in_hot_standby`` at login from a cached server connection, so a
server promoted behind it is still reported as a standby to new clients (measured with
PgBouncer 1.18). A connection through a pooler therefore hides that status
(:func:`greenpool.roles.role_of` says "unknown"), and the connector asks the server by query
instead (bounded by ``connect_timeout``); the answer is kept on the connection and the
endpoint, and housekeeping's probes (queries already) keep it fresh.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from psycopg2 import extensions
from psycopg2 import sql as pgsql

from .config import EndpointConfig

logger = logging.getLogger("greenpool")

NONE, SESSION, TRANSACTION = "none", "session", "transaction"
_IDLE = extensions.TRANSACTION_STATUS_IDLE

#: addresses found to be poolers by their refusal of ``options`` (no ``pooler`` key given)
_detected: set[tuple[str, int, str]] = set()


def _address(endpoint: EndpointConfig) -> tuple[str, int, str]:
    return (endpoint.host, endpoint.port, endpoint.dbname)


def mode_of(endpoint: EndpointConfig) -> str:
    """``none`` (PostgreSQL itself), ``session`` or ``transaction``."""
    if endpoint.pooler is not None:
        return endpoint.pooler
    return TRANSACTION if _address(endpoint) in _detected else NONE


def may_detect(endpoint: EndpointConfig) -> bool:
    """Whether a refusal of ``options`` by this endpoint may switch it to pooler mode: only
    when the user said nothing about a pooler and sent no ``options`` of their own (those
    cannot travel another way)."""
    return endpoint.pooler is None and "options" not in endpoint.options


def detected(endpoint: EndpointConfig, how: str = "refused") -> None:
    """``endpoint`` refused (or dropped) ``options``: from now on it is treated as a
    transaction pooler."""
    address = _address(endpoint)
    if address in _detected:
        return
    _detected.add(address)
    logger.warning(
        "endpoint %s %s the `options` startup parameter: it is a connection pooler "
        "(PgBouncer). greenpool now sends statement_timeout and readonly with each "
        "transaction instead; set `pooler: 'transaction'` (or 'session') on this endpoint "
        "to say so and skip the first attempt", endpoint.label, how)


def dropped_options(raw: Any) -> bool:
    """A readonly group's connection told ``default_transaction_read_only=off`` although
    ``options`` asked for ``on``: a pooler ignored the parameter (PgBouncer's
    ``ignore_startup_parameters = options``). PostgreSQL < 14 does not report it: None."""
    return bool(raw.get_parameter_status("default_transaction_read_only") == "off")


def forget_detected() -> None:
    """For tests: every address is PostgreSQL itself again until it refuses ``options``."""
    _detected.clear()


def settings_prefix(statement_timeout_ms: int | None, readonly: bool) -> str:
    """The text sent before the first statement of each transaction ('' for none)."""
    parts = []
    if statement_timeout_ms is not None:
        parts.append(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}; ")
    if readonly:
        parts.append("SET TRANSACTION READ ONLY; ")
    return "".join(parts)


_OWN_TRANSACTION = re.compile(
    r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*"
    r"(?:vacuum|discard\s+all|alter\s+system|(?:create|drop)\s+(?:database|tablespace)"
    r"|(?:create|alter|drop)\s+subscription|reindex\s+(?:system|database)"
    r"|(?:commit|rollback)\s+prepared|alter\s+database\s+\S+\s+set\s+tablespace)\b"
    r"|.*\bindex\b.*\bconcurrently\b",
    re.S,
)
_OUTSIDE: dict[str, bool] = {}
_OUTSIDE_MAX = 4096


def runs_outside_transaction(text: str) -> bool:
    """Whether ``text`` may refuse to run inside a transaction block (then it is sent
    without the settings). Cached per distinct text."""
    known = _OUTSIDE.get(text)
    if known is None:
        known = _OWN_TRANSACTION.match(text.lower()) is not None
        if len(_OUTSIDE) >= _OUTSIDE_MAX:
            _OUTSIDE.clear()
        _OUTSIDE[text] = known
    return known


def _with_prefix(prefix: str, query: Any, conn: Any) -> Any:
    """``query`` with the settings in front, or unchanged when they must not go there."""
    if isinstance(query, str):
        return query if runs_outside_transaction(query) else prefix + query
    if isinstance(query, (bytes, bytearray, memoryview)):
        text = bytes(query)
        if runs_outside_transaction(text.decode("utf-8", "replace")):
            return query
        return prefix.encode() + text
    if isinstance(query, pgsql.Composable):
        if runs_outside_transaction(query.as_string(conn)):
            return query
        return pgsql.Composed([pgsql.SQL(prefix), query])
    return query  # psycopg2 will refuse it with its own error


class _PerTransactionCursor:
    """Mixed in front of the group's cursor class on a pooler connection: the first
    statement of a transaction carries the group's settings."""

    connection: Any
    name: Any

    def _prefix_now(self) -> str:
        conn = self.connection
        prefix: str = conn.greenpool_prefix
        if prefix and conn.get_transaction_status() == _IDLE:
            return prefix
        return ""

    def _apply_first(self) -> None:
        """For calls whose SQL we do not compose (named cursors, COPY, callproc): the
        settings go first in a round trip of their own (psycopg2 sends its BEGIN before)."""
        prefix = self._prefix_now()
        if prefix and not self.connection.autocommit:
            with extensions.cursor(self.connection) as plain:
                plain.execute(prefix)

    def execute(self, query: Any, vars: Any = None) -> Any:
        prefix = self._prefix_now()
        if prefix:
            if self.name is not None:  # a DECLARE: psycopg2 composes it, so apply first
                self._apply_first()
            else:
                query = _with_prefix(prefix, query, self.connection)
        return super().execute(query, vars)  # type: ignore[misc]

    def executemany(self, query: Any, vars_list: Any) -> Any:
        # psycopg2's executemany bypasses execute(): in autocommit each statement is a
        # transaction of its own and needs the settings, so run them one by one here
        if not self.connection.greenpool_prefix:
            return super().executemany(query, vars_list)  # type: ignore[misc]
        for vars in vars_list:
            self.execute(query, vars)
        return None

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        self._apply_first()
        return super().callproc(procname, parameters)  # type: ignore[misc]

    def copy_expert(self, *args: Any, **kwargs: Any) -> Any:
        self._apply_first()
        return super().copy_expert(*args, **kwargs)  # type: ignore[misc]

    def copy_from(self, *args: Any, **kwargs: Any) -> Any:
        self._apply_first()
        return super().copy_from(*args, **kwargs)  # type: ignore[misc]

    def copy_to(self, *args: Any, **kwargs: Any) -> Any:
        self._apply_first()
        return super().copy_to(*args, **kwargs)  # type: ignore[misc]


_CURSOR_CLASSES: dict[type, type] = {}


def _per_transaction(factory: type) -> type:
    if issubclass(factory, _PerTransactionCursor):
        return factory
    made = _CURSOR_CLASSES.get(factory)
    if made is None:
        made = type(f"PerTransaction{factory.__name__}", (_PerTransactionCursor, factory), {})
        _CURSOR_CLASSES[factory] = made
    return made


class ThroughPooler:
    """Mixed in front of the connection class for an endpoint behind a pooler."""

    #: the settings sent with the first statement of each transaction
    greenpool_prefix = ""
    cursor_factory: Any

    def cursor(self, name: Any = None, cursor_factory: Any = None, withhold: bool = False,
               scrollable: Any = None) -> Any:
        factory = _per_transaction(cursor_factory or self.cursor_factory or extensions.cursor)
        return super().cursor(  # type: ignore[misc]
            name, cursor_factory=factory, withhold=withhold, scrollable=scrollable)

    def get_parameter_status(self, parameter: str) -> Any:
        # the pooler reports a cached server's role, stale after a promotion: ask by query
        if parameter == "in_hot_standby":
            return None
        return super().get_parameter_status(parameter)  # type: ignore[misc]
