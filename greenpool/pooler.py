"""Through a server-side pooler (PgBouncer): how a group's settings reach the server.

Directly, ``statement_timeout`` and ``readonly`` travel in the startup packet's ``options``.
PgBouncer refuses that parameter (``FATAL: unsupported startup parameter: options``), or,
told to ignore it, drops it silently. And in transaction pooling mode any session state
(a ``SET``) stays on a *server* connection that the next transaction of another client
gets. So through a pooler the settings travel with every transaction instead, in the same
round trip as its first statement::

    SET LOCAL statement_timeout = 500; SET TRANSACTION READ ONLY; <the statement>

``SET LOCAL`` and ``SET TRANSACTION`` end with their transaction, so nothing outlives it, in
either pool mode. Behind a session-mode pooler, what the server already enforces on the
connection's session with the group's value (:class:`ServerDefaults`, read once per
connection) is left out; with nothing left, no text is read at all: that is the sound
set-up (docs/pgbouncer.md; :func:`trusts_server_defaults` says why not in
transaction mode).

In autocommit the text is one simple query, which PostgreSQL runs as one implicit
transaction block: the settings cover the statement and end with it (a ``BEGIN`` in the
text turns the block into an explicit transaction, which keeps them).

Where each transaction ends is read from exactly what will be sent (psycopg2's parameters
filled in) by PostgreSQL's own parser (:mod:`greenpool.sql`): a text that ends its
transaction and goes on, or that the parser cannot read, is refused before it is sent. A
statement that refuses to run inside a transaction block (by node and option: ``VACUUM``,
``CREATE DATABASE``, ``... INDEX CONCURRENTLY``, ``DISCARD ALL``, ...) is sent without the
settings only when it is the whole text in autocommit; anywhere else the server decides.

How the pool knows: the endpoint key ``pooler`` (``session`` / ``transaction``; ``none``
means PostgreSQL itself), or, when the key is not given, detection: the first refusal of
``options`` marks that address as a pooler for the life of the process (its mode unknown:
the settings travel per transaction, and a dirty loan is still reset with ``DISCARD ALL``, as
a session-mode pooler needs) and the connect is retried at once without it, with one warning
saying to set the key. A pooler that drops ``options`` silently
(``ignore_startup_parameters = options``) is caught the same way by a readonly group, whose
connection then reports ``default_transaction_read_only=off``; a group with only a
``statement_timeout`` cannot tell, which is what the key is for.

Roles: PgBouncer reports ``in_hot_standby`` at login from a cached server connection, so a
server promoted behind it is still reported as a standby to new clients (measured with
PgBouncer 1.18). A connection through a pooler therefore hides that status
(:func:`greenpool.roles.role_of` says "unknown"), and the connector asks the server by query
instead (bounded by ``connect_timeout``); the answer is kept on the connection and the
endpoint, and housekeeping's probes (queries already) keep it fresh.

Why one module of this length: the settings prefix, the per-transaction decision it rests
on and the detection that decides whether a prefix is needed at all are one rule seen from
three sides; split apart, each part would have to restate the others' assumptions.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import psycopg2
import psycopg2.errors
from psycopg2 import extensions

from . import sql
from .config import EndpointConfig

logger = logging.getLogger("greenpool")

NONE, SESSION, TRANSACTION = "none", "session", "transaction"
_IDLE = extensions.TRANSACTION_STATUS_IDLE
_OPEN = (extensions.TRANSACTION_STATUS_INTRANS, extensions.TRANSACTION_STATUS_INERROR)
_PSYCOPG_READY = extensions.STATUS_READY

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


def discards_reach(endpoint: EndpointConfig) -> bool:
    """Whether a session reset (``DISCARD ALL``) reaches the session the loan used: not
    through a pooler said to be in transaction mode. A detected pooler's mode is unknown,
    so it gets both the per-transaction settings and the reset."""
    return endpoint.pooler != TRANSACTION


#: why a connection through a pooler is refused when the server reads literals the old way
NONSTANDARD_STRINGS = (
    "the server reports standard_conforming_strings=off: through a pooler greenpool reads "
    "each text to keep the group's settings on every transaction, and with that setting off "
    "a backslash in a literal would make the server end the literal where greenpool does "
    "not (set standard_conforming_strings = on for this database or role)")


def nonstandard_strings(raw: Any) -> bool:
    return bool(raw.info.parameter_status("standard_conforming_strings") == "off")


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


def settings_prefix(statement_timeout_ms: int | None, readonly: bool,
                    server: ServerDefaults | None = None) -> str:
    """The text sent before the first statement of each transaction ('' for none): what
    the group asks for and the server (``server``, its sessions' defaults) does not already
    enforce on every session of that pooler database."""
    parts = []
    # enforced: the session's default and its value now (a session SET left by a previous
    # client of the server session, without a server_reset_query, is not a default)
    if statement_timeout_ms is not None and not (
            server is not None and server.statement_timeout_ms == int(statement_timeout_ms)
            and "statement_timeout" not in server.left_set):
        parts.append(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}; ")
    if readonly and not (server is not None and server.read_only
                         and "default_transaction_read_only" not in server.left_set):
        parts.append("SET TRANSACTION READ ONLY; ")
    return "".join(parts)


def trusts_server_defaults(endpoint: EndpointConfig, reset: str) -> bool:
    """Whether what the server enforces (:class:`ServerDefaults`) may stand in for the
    prefix: only where the server session is this connection's alone and a dirty loan's
    ``DISCARD ALL`` returns it to those defaults (a pooler said to be in session mode, the
    group's reset on). In transaction mode the server connection is shared: a session
    ``SET`` left on it by any client (a greenpool loan too: no ``DISCARD ALL`` reaches it
    there) reaches transactions that carry no prefix, and the pooler may open another
    server connection, logged in before or after the role's settings changed."""
    return endpoint.pooler == SESSION and reset != "never"


class ServerDefaults(NamedTuple):
    """The settings every session of a pooler's server connections starts with, read from
    ``pg_settings.reset_val``: the value at login (``postgresql.conf``, ``ALTER DATABASE /
    ROLE ... SET``), which no client's ``SET`` changes (a ``SET`` changes ``setting``
    only, and ``RESET`` goes back to ``reset_val``). So another client of the pooler that
    left a session ``SET`` on the server connection cannot fool it, as it could fool a
    ``SHOW``. ``left_set``: names whose current value differs from that default (some
    client left a session ``SET`` on this server connection): not enforced on this
    session; ``greenpool check`` warns."""

    statement_timeout_ms: int | None
    read_only: bool
    sources: dict[str, str]
    left_set: tuple[str, ...]


#: one round trip; ``source`` says where the current value came from ("user", "database",
#: "database user", "configuration file", "default", or "session" when a client SET it)
SERVER_DEFAULTS_QUERY = (
    "SELECT name, reset_val, setting, source FROM pg_catalog.pg_settings "
    "WHERE name IN ('statement_timeout', 'default_transaction_read_only')")


def server_defaults(rows: list[tuple[str, str, str, str]]) -> ServerDefaults:
    """:class:`ServerDefaults` from the rows of :data:`SERVER_DEFAULTS_QUERY`."""
    found = {name: (reset, current, source) for name, reset, current, source in rows}
    timeout = found.get("statement_timeout")
    read_only = found.get("default_transaction_read_only")
    return ServerDefaults(
        statement_timeout_ms=int(timeout[0]) if timeout and timeout[0].isdigit() else None,
        read_only=bool(read_only and read_only[0] == "on"),
        sources={name: source for name, (_, _, source) in found.items()},
        left_set=tuple(sorted(name for name, (reset, current, _) in found.items()
                              if reset != current)))


def read_server_defaults(raw: Any) -> ServerDefaults:
    """One query on ``raw`` (in autocommit: it opens no transaction), bounded by the caller."""
    autocommit = raw.autocommit
    raw.autocommit = True
    try:
        with extensions.cursor(raw) as cur:
            cur.execute(SERVER_DEFAULTS_QUERY)
            rows = [tuple(row) for row in cur.fetchall()]
    finally:
        if not raw.closed:
            raw.autocommit = autocommit
    return server_defaults(rows)


def _as_text(raw: Any, query: bytes) -> str:
    """What the server will read in ``query``, or ``ProgrammingError`` when that is not known
    (see :func:`greenpool.sql.server_text`)."""
    text = sql.server_text(query, extensions.encodings.get(raw.encoding, "utf-8"))
    if text is None:
        raise psycopg2.ProgrammingError(
            f"this text holds a character that the connection's encoding ({raw.encoding}) "
            "sends as an ASCII byte the server reads otherwise (SHIFT_JIS_2004 sends ¥ as "
            "\\): through a pooler greenpool must read the text as the server does to send the "
            "group's statement_timeout/readonly with it, so it does not send it")
    return text


def _read(raw: Any, text: str) -> tuple[sql.Statement, ...]:
    """``text``'s statements as the server will read them, or ``ProgrammingError``."""
    if nonstandard_strings(raw):
        raise psycopg2.ProgrammingError(NONSTANDARD_STRINGS)
    try:
        return sql.statements(text, raw.greenpool_offload)
    except sql.Unreadable as exc:
        raise psycopg2.ProgrammingError(
            f"{exc}; through a pooler greenpool must know where each transaction begins and "
            "ends to send the group's statement_timeout/readonly with it, so it does not "
            "send a text it cannot read") from None


def _plan(raw: Any, prefix: str, text: str) -> tuple[bool, bool]:
    """Whether ``text`` (exactly what will be sent) takes the settings in front, and
    whether after it (it ends with ``COMMIT AND CHAIN``: the chained transaction needs them
    too); raises what a pooler cannot send with them, where the server would have applied
    them to a direct connection."""
    found = _read(raw, text)
    if any(statement.ends for statement in found[:-1]):
        raise psycopg2.ProgrammingError(
            "through a pooler the group's statement_timeout/readonly travel with each "
            "transaction, and this text ends its transaction (COMMIT, ROLLBACK, ...) and then "
            "goes on: send the statements after that in their own execute()")
    if len(found) == 1 and found[0].refuses_block and raw.autocommit:
        # alone in autocommit: it runs in no block, so the settings cannot go with it
        if "READ ONLY" in prefix and found[0].refused_read_only:
            raise psycopg2.errors.ReadOnlySqlTransaction(
                f"cannot execute {found[0].label} in a read-only transaction (greenpool "
                "refused it: a readonly group behind a pooler cannot send it with its "
                "readonly setting)")
        return False, False
    return bool(found), bool(found) and found[-1].chains


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
        Where psycopg2 sends no BEGIN (autocommit, or after a ``COMMIT`` sent as SQL) they
        would end with that round trip, so the call gets a transaction of its own that
        carries them, committed at once as the server would have run it alone."""
        self.__dict__.pop("_many_rowcount", None)
        conn = self.connection
        prefix = self._prefix_now()
        if not prefix:
            return call()
        with extensions.cursor(conn) as plain:
            if not conn.autocommit and conn.status == _PSYCOPG_READY:
                plain.execute(prefix)  # psycopg2 sends BEGIN first: they last the call
                return call()
            # autocommit, or psycopg2 believes a transaction open that a COMMIT or ROLLBACK
            # sent as SQL ended (the server is idle): it sends no BEGIN of its own
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
            declared = self.mogrify(query, vars)  # type: ignore[attr-defined]
            if len(_read(conn, _as_text(conn, declared))) > 1:
                raise psycopg2.ProgrammingError(
                    "a named cursor's query is one statement; through a pooler the ones after "
                    "it could run outside the transaction that carries the group's settings")
            if not self.withhold and (conn.autocommit or conn.status != _PSYCOPG_READY):
                # no BEGIN of psycopg2's before it: the server refuses it (or, in the
                # transaction it knows open, it has the settings already)
                return execute(query, vars)
            return self._with_settings(lambda: execute(query, vars))
        # what will be sent, exactly (placeholders filled): that is what the server reads
        text = self.mogrify(query, vars)  # type: ignore[attr-defined]
        prefix = self._prefix_now()
        in_front, after = _plan(conn, conn.greenpool_prefix, _as_text(conn, text))
        if in_front and prefix:
            text = prefix.encode() + text
        if after:  # (a newline ends a trailing ``--`` comment)
            text += b"\n;" + conn.greenpool_prefix.encode()
        return execute(text)

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


#: psycopg2's slot for a connection's default cursor class (read by its C ``cursor()``)
_DEFAULT_FACTORY: Any = extensions.connection.__dict__["cursor_factory"]


class ThroughPooler:
    """Mixed in front of the connection class for an endpoint behind a pooler."""

    #: the settings sent with the first statement of each transaction
    greenpool_prefix = ""
    #: runs a long text's parse off the hub (the pool's ``Backend.offload``)
    greenpool_offload: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = None  # the per-transaction plain cursor, not psycopg2's

    @property
    def cursor_factory(self) -> Any:
        return _DEFAULT_FACTORY.__get__(self)

    @cursor_factory.setter
    def cursor_factory(self, factory: Any) -> None:
        """The default class (which ``own_cursor``, the pool's, makes) carries the settings
        too, whoever sets it (``psycopg2.connect(cursor_factory=)``, a user)."""
        _DEFAULT_FACTORY.__set__(
            self, _per_transaction(factory or extensions.cursor))

    def cursor(self, name: Any = None, cursor_factory: Any = None, withhold: bool = False,
               scrollable: Any = None) -> Any:
        factory = _per_transaction(cursor_factory or self.cursor_factory)
        return super().cursor(  # type: ignore[misc]
            name, cursor_factory=factory, withhold=withhold, scrollable=scrollable)

    def get_parameter_status(self, parameter: str) -> Any:
        # the pooler reports a cached server's role, stale after a promotion: ask by query
        if parameter == "in_hot_standby":
            return None
        return super().get_parameter_status(parameter)  # type: ignore[misc]


def prefix_verdict(statement_timeout_ms: int | None, readonly: bool,
                   server: ServerDefaults, trusted: bool) -> str:
    """One sentence for ``greenpool check``: does a group with these settings need the
    per-transaction prefix through this pooler, and why (``trusted``: see
    :func:`trusts_server_defaults`)."""
    prefix = settings_prefix(statement_timeout_ms, readonly, server if trusted else None)
    where = ", ".join(f"{name} from {source}" for name, source in sorted(server.sources.items()))
    if not readonly and server.read_only:
        source = server.sources.get("default_transaction_read_only")
        return ("WARNING: the server starts every transaction read-only "
                f"(default_transaction_read_only from {source}), and this group is not "
                "readonly: its writes will fail")
    if not (statement_timeout_ms is not None or readonly):
        return "no settings to send"
    if not prefix:
        said = " and ".join(part for part in (
            f"statement_timeout = {statement_timeout_ms} ms"
            if statement_timeout_ms is not None else "",
            "default_transaction_read_only = on" if readonly else "") if part)
        verdict = f"the server enforces {said} ({where}): no per-transaction prefix is sent"
    elif not settings_prefix(statement_timeout_ms, readonly, server):
        verdict = (f"the server enforces it ({where}), but only a session-mode pooler with "
                   f"the group's reset keeps the server session this connection's own: "
                   f"each transaction carries {prefix.strip()!r}")
    else:
        verdict = (f"the server does not enforce it all (statement_timeout "
                   f"{server.statement_timeout_ms} ms, default_transaction_read_only "
                   f"{'on' if server.read_only else 'off'}): each transaction carries "
                   f"{prefix.strip()!r}")
    if server.left_set:
        verdict += (f"; WARNING: a client left a session SET of {', '.join(server.left_set)} "
                    "on this server connection (in transaction mode it reaches other clients)")
    return verdict
