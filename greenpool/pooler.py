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

import psycopg2
import psycopg2.errors
from psycopg2 import extensions
from psycopg2 import sql as pgsql

from .config import EndpointConfig

logger = logging.getLogger("greenpool")

NONE, SESSION, TRANSACTION = "none", "session", "transaction"
_IDLE = extensions.TRANSACTION_STATUS_IDLE
_OPEN = (extensions.TRANSACTION_STATUS_INTRANS, extensions.TRANSACTION_STATUS_INERROR)

#: addresses found to be poolers by their refusal of ``options`` (no ``pooler`` key given);
#: mutated in place only: the borrow path reads it directly
detected_addresses: set[tuple[str, int, str]] = set()
_detected = detected_addresses


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


# Statements that refuse a transaction block, matched at the start of the text only (after
# its comments): a keyword further in (``INSERT ... VALUES ('index concurrently')``) must not
# cost the statement its settings.
_OWN_TRANSACTION = re.compile(
    r"(?:vacuum|discard\s+all|alter\s+system|(?:create|drop)\s+(?:database|tablespace)"
    r"|(?:create|alter|drop)\s+subscription|reindex\s+(?:\([^)]*\)\s*)?(?:system|database)"
    r"|reindex\s+(?:\([^)]*\)\s*)?(?:index|table|schema)\s+concurrently"
    r"|(?:commit|rollback)\s+prepared|alter\s+database\s+\S+\s+set\s+tablespace"
    r"|create\s+(?:unique\s+)?index\s+concurrently|drop\s+index\s+concurrently)\b"
)
# Of those, the ones a read-only transaction refuses (measured on PostgreSQL 15 with
# default_transaction_read_only=on): a readonly group cannot send them with its setting, so
# through a pooler greenpool refuses them itself, as the server would directly.
_READ_ONLY_REFUSES = re.compile(
    r"(?:(?:create|drop)\s+(?:database|tablespace)|(?:create|alter|drop)\s+subscription"
    r"|alter\s+database|create\s+(?:unique\s+)?index|drop\s+index)\b"
)
# A statement that ends the transaction: whatever follows it in the same text would run in
# a new transaction without the settings
_ENDS_TRANSACTION = re.compile(
    r"(?:commit|end|abort|rollback|prepare\s+transaction)\b(?!\s+(?:to|prepared)\b)")
_BEGIN_ATOMIC = re.compile(r"\bbegin\s+atomic\b")
_MAYBE_ENDING = re.compile(r";\s*(?:commit|end|abort|rollback|prepare|--|/\*)")
_OUTSIDE: dict[str, bool] = {}
_OUTSIDE_MAX = 4096
_CACHED_TEXT_MAX = 2048


def _skip_blank(text: str, at: int) -> int:
    """The index of the first character from ``at`` that is neither white space nor part of
    a comment (``/* */`` comments nest in PostgreSQL)."""
    n = len(text)
    while at < n:
        if text[at].isspace():
            at += 1
        elif text.startswith("--", at):
            newline = text.find("\n", at)
            at = n if newline < 0 else newline + 1
        elif text.startswith("/*", at):
            depth, at = 1, at + 2
            while at < n and depth:
                if text.startswith("/*", at):
                    depth, at = depth + 1, at + 2
                elif text.startswith("*/", at):
                    depth, at = depth - 1, at + 2
                else:
                    at += 1
        else:
            break
    return at


def _first_words(text: str) -> str:
    """The start of ``text`` from its first keyword on, lowered (enough for the patterns;
    a bulk INSERT's text is not copied whole)."""
    at = _skip_blank(text, 0)
    return text[at:at + 256].lower()


def runs_outside_transaction(text: str) -> bool:
    """Whether ``text`` may refuse to run inside a transaction block (then it is sent
    without the settings). Cached per distinct text."""
    if len(text) > _CACHED_TEXT_MAX:  # a bulk statement's text is not kept alive
        return _OWN_TRANSACTION.match(_first_words(text)) is not None
    known = _OUTSIDE.get(text)
    if known is None:
        known = _OWN_TRANSACTION.match(_first_words(text)) is not None
        if len(_OUTSIDE) >= _OUTSIDE_MAX:
            _OUTSIDE.clear()
        _OUTSIDE[text] = known
    return known


def read_only_refuses(text: str) -> bool:
    """Whether a read-only transaction refuses ``text`` (one that runs outside a block)."""
    return _READ_ONLY_REFUSES.match(_first_words(text)) is not None


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")


_NOTABLE = re.compile(r"[;'\"$]|--|/\*")  # where a statement, literal or comment may end
_STRING_BODY = re.compile(r"(?:[^']|'')*'")  # the rest of '...' (standard_conforming_strings)
_ESCAPE_STRING_BODY = re.compile(r"(?:[^'\\]|''|\\.)*'", re.S)  # the rest of E'...'


def _statements(text: str) -> list[str]:
    """``text`` split at its top-level semicolons (not those in literals, quoted names,
    dollar-quoted bodies or comments), each part lowered from its first keyword on. Jumps
    from one notable character to the next (a bulk INSERT's text is long)."""
    lowered = text.lower()
    parts: list[str] = []
    start = at = 0
    n = len(lowered)
    while True:
        found = _NOTABLE.search(lowered, at)
        if found is None:
            break
        at = found.start()
        ch = lowered[at]
        if ch == ";":
            parts.append(lowered[_skip_blank(lowered, start):at])
            start = at = at + 1
        elif ch in "-/":
            at = _skip_blank(lowered, at)
        elif ch == "'":
            escapes = at > 0 and lowered[at - 1] == "e" and (
                at < 2 or not (lowered[at - 2].isalnum() or lowered[at - 2] in "_$"))
            body = (_ESCAPE_STRING_BODY if escapes else _STRING_BODY).match(lowered, at + 1)
            at = n if body is None else body.end()
        elif ch == '"':
            close = lowered.find('"', at + 1)
            at = n if close < 0 else close + 1
        elif at > 0 and (lowered[at - 1].isalnum() or lowered[at - 1] in "_$"):
            at += 1  # a $ inside a name, or a parameter like $1
        else:
            tag = _DOLLAR_TAG.match(lowered, at)
            if tag is None:
                at += 1
            else:
                close = lowered.find(tag.group(), tag.end())
                at = n if close < 0 else close + len(tag.group())
    parts.append(lowered[_skip_blank(lowered, start):])
    return parts


def ends_transaction_midway(text: str) -> bool:
    """Whether ``text`` ends its transaction (``COMMIT``, ``ROLLBACK``, ...) and then goes on
    with more statements: those would run in a new transaction that no settings reach."""
    if ";" not in text:
        return False
    lowered = text.lower()
    # a cheap look first: an ending statement is at the start, or after a ';' and blanks
    if _MAYBE_ENDING.search(lowered) is None and (
            _ENDS_TRANSACTION.match(lowered[_skip_blank(lowered, 0):]) is None):
        return False
    parts = [part for part in _statements(text) if part]
    in_body = False  # a function body of SQL statements: BEGIN ATOMIC ...; ...; END
    for part in parts[:-1]:
        if in_body:
            in_body = not part.startswith("end")
        elif _BEGIN_ATOMIC.search(part):
            in_body = True
        elif _ENDS_TRANSACTION.match(part):
            return True
    return False


def _as_text(query: Any, conn: Any) -> str | None:
    if isinstance(query, str):
        return query
    if isinstance(query, (bytes, bytearray, memoryview)):
        return bytes(query).decode("utf-8", "replace")
    if isinstance(query, pgsql.Composable):
        return query.as_string(conn)
    return None


def _with_prefix(prefix: str, query: Any, conn: Any) -> Any:
    """``query`` with the settings in front, or unchanged when they must not go there."""
    text = _as_text(query, conn)
    if text is None or runs_outside_transaction(text):
        return query  # (psycopg2 refuses a query of another type with its own error)
    if isinstance(query, str):
        return prefix + query
    if isinstance(query, pgsql.Composable):
        return pgsql.Composed([pgsql.SQL(prefix), query])
    return prefix.encode() + bytes(query)


def _check(prefix: str, query: Any, conn: Any) -> None:
    """Refuse, before sending, what the settings cannot cover through a pooler, where the
    server would have applied them to a direct connection."""
    text = _as_text(query, conn)
    if text is None:
        return
    if ends_transaction_midway(text):
        raise psycopg2.ProgrammingError(
            "through a pooler the group's statement_timeout/readonly travel with each "
            "transaction, and this text ends its transaction (COMMIT, ROLLBACK, ...) and then "
            "goes on: send the statements after that in their own execute()")
    if ("READ ONLY" in prefix and conn.autocommit and runs_outside_transaction(text)
            and read_only_refuses(text)):
        raise psycopg2.errors.ReadOnlySqlTransaction(
            f"cannot execute {' '.join(_first_words(text).split()[:2]).upper()} in a "
            "read-only transaction (greenpool refused it: a readonly group behind a pooler "
            "cannot send it with its readonly setting)")


class _PerTransactionCursor:
    """Mixed in front of the group's cursor class on a pooler connection: the first
    statement of a transaction carries the group's settings."""

    connection: Any
    name: Any
    withhold: bool

    def _prefix_now(self) -> str:
        conn = self.connection
        prefix: str = conn.greenpool_prefix
        if prefix and conn.get_transaction_status() == _IDLE:
            return prefix
        return ""

    def _with_settings(self, call: Any) -> Any:
        """For calls whose SQL we do not compose (named cursors, COPY, callproc): the
        settings go first in a round trip of their own (psycopg2 sends its BEGIN before).
        In autocommit they would end with that round trip, so the call gets a transaction
        of its own that carries them, committed at once as autocommit would."""
        self.__dict__.pop("_many_rowcount", None)
        conn = self.connection
        prefix = self._prefix_now()
        if not prefix:
            return call()
        with extensions.cursor(conn) as plain:
            if not conn.autocommit:
                plain.execute(prefix)
                return call()
            plain.execute("BEGIN; " + prefix)
            try:
                result = call()
            except Exception:
                if not conn.closed and conn.get_transaction_status() in _OPEN:
                    try:  # the call's own error is the one to raise
                        plain.execute("ROLLBACK")
                    except psycopg2.Error:
                        pass
                raise
            # (a BaseException leaves the transaction open: the pool's return path rolls
            # it back within its bound or discards the connection)
            plain.execute("COMMIT")
            return result

    def execute(self, query: Any, vars: Any = None) -> Any:
        self.__dict__.pop("_many_rowcount", None)
        conn = self.connection
        if not conn.greenpool_prefix:
            return super().execute(query, vars)  # type: ignore[misc]
        execute = super().execute  # type: ignore[misc]
        if self.name is not None:  # a DECLARE: psycopg2 composes it, so apply first
            if conn.autocommit and not self.withhold:  # psycopg2/the server refuse it
                return execute(query, vars)
            return self._with_settings(lambda: execute(query, vars))
        _check(conn.greenpool_prefix, query, conn)
        prefix = self._prefix_now()
        if prefix:
            query = _with_prefix(prefix, query, conn)
        return execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> Any:
        # psycopg2's executemany bypasses execute(): in autocommit each statement is a
        # transaction of its own and needs the settings, so run them one by one here
        if not self.connection.greenpool_prefix:
            return super().executemany(query, vars_list)  # type: ignore[misc]
        total = 0
        for vars in vars_list:
            self.execute(query, vars)
            count = super().rowcount  # type: ignore[misc]
            total = -1 if count < 0 or total < 0 else total + count
        self._many_rowcount = total  # what psycopg2's executemany reports: the sum
        return None

    @property
    def rowcount(self) -> int:
        many = self.__dict__.get("_many_rowcount")
        return int(super().rowcount if many is None else many)  # type: ignore[misc]

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        callproc = super().callproc  # type: ignore[misc]
        return self._with_settings(lambda: callproc(procname, parameters))

    def copy_expert(self, *args: Any, **kwargs: Any) -> Any:
        copy_expert = super().copy_expert  # type: ignore[misc]
        return self._with_settings(lambda: copy_expert(*args, **kwargs))

    def copy_from(self, *args: Any, **kwargs: Any) -> Any:
        copy_from = super().copy_from  # type: ignore[misc]
        return self._with_settings(lambda: copy_from(*args, **kwargs))

    def copy_to(self, *args: Any, **kwargs: Any) -> Any:
        copy_to = super().copy_to  # type: ignore[misc]
        return self._with_settings(lambda: copy_to(*args, **kwargs))


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
