"""Whether a fresh dedicated connection may be kept: a session of its own, in spare room.

One round trip (:data:`SESSION_CHECK`, bounded by ``connect_timeout``) asks the server the
session's real backend pid and, for each limit the server enforces on a new session of this
role in this database, how many sessions it allows and how many it counts:

* **the groups come first**: three limits refuse a login. ``max_connections`` (less
  ``superuser_reserved_connections`` and ``reserved_connections``) counts the client
  backends; a role's ``CONNECTION LIMIT`` (``pg_roles.rolconnlimit``) counts its sessions;
  a database's (``pg_database.datconnlimit``) counts the sessions in it. The last two do
  not bind a superuser, and -1 is no limit. The connection is kept only if each limit still
  leaves room for every connection the groups of every live pool of this process may yet
  open under it (:func:`room_needed`). Else it is closed, that server is tried last for
  :data:`NO_ROOM_PAUSE`, and while no endpoint that could serve the group has room every
  caller gets :class:`PoolTimeout` at once, without a connect;
* **a session of its own, or a refusal**: behind PgBouncer (any pooler that answers the
  login itself) the backend pid of the login's ``BackendKeyData`` is the pooler's invention,
  not the pid of the session that runs the queries (a TCP proxy such as HAProxy passes the
  real one through). An endpoint that turns out to be a pooler is refused with
  :class:`PoolError` unless declared ``pooler: 'session'`` (a transaction-mode pooler would
  hand the "session" to other clients between transactions: a LISTEN would hear nothing, a
  lock would be held by a stranger). A self-addressed ``LISTEN`` + ``NOTIFY`` proves nothing
  there: an idle transaction pooler usually gives the next transaction the same server
  connection, which hears it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg2

from .. import pooler
from ..concurrency.backend import Backend
from ..connection import PooledConnection, round_trip
from ..endpoint import UP
from ..errors import PoolError, PoolTimeout
from ..roles import fits

if TYPE_CHECKING:
    from ..endpoint import Endpoint
    from ..group import Group

logger = logging.getLogger("greenpool")

#: seconds an endpoint found without spare connection slots is not connected to again for a
#: dedicated connection (callers meanwhile are refused at once, without a connect)
NO_ROOM_PAUSE = 1.0

#: one round trip on a fresh dedicated connection: the session's real backend pid (to
#: compare with the login's), then for each limit a login meets (see :class:`Room`) the
#: sessions it allows (-1: none binds) and the sessions it counts (then the role and the
#: database those are, for the message), as PostgreSQL counts
#: them: ``max_connections`` counts client backends; a role's ``CONNECTION LIMIT`` the
#: login role's backends (walsenders too, background workers never); a database's those
#: in it (autovacuum workers too). A superuser is bound by neither of the last two. Rows of
#: other roles' sessions hide their backend_type from an unprivileged role: a row with no
#: visible type is counted as a client (the error is on the safe side). One scan of
#: pg_stat_activity; schema-qualified: a search_path that puts a schema before pg_catalog
#: changes nothing.
SESSION_CHECK = (
    "SELECT pg_catalog.pg_backend_pid(), "
    "pg_catalog.current_setting('max_connections')::int "
    "- pg_catalog.current_setting('superuser_reserved_connections')::int "
    "- coalesce(nullif(pg_catalog.current_setting('reserved_connections', true), '')::int, 0), "
    "count(*) FILTER (WHERE a.datid IS NOT NULL AND a.kind = 'client backend'), "
    "CASE WHEN r.rolsuper THEN -1 ELSE r.rolconnlimit END, "
    "count(*) FILTER (WHERE a.usesysid = r.oid AND a.kind IN ('client backend', 'walsender')), "
    "CASE WHEN r.rolsuper THEN -1 ELSE d.datconnlimit END, "
    "count(*) FILTER (WHERE a.datid = d.oid "
    "AND a.kind IN ('client backend', 'walsender', 'autovacuum worker')), "
    "session_user, pg_catalog.current_database() "
    "FROM pg_catalog.pg_roles r, pg_catalog.pg_database d, "
    "(SELECT datid, usesysid, coalesce(backend_type, 'client backend') AS kind "
    "FROM pg_catalog.pg_stat_activity) a "
    "WHERE r.rolname = session_user AND d.datname = pg_catalog.current_database() "
    "GROUP BY r.rolsuper, r.rolconnlimit, d.datconnlimit"
)
#: SQLSTATE classes of a session check that failed through no fault of the query (the
#: connection was lost, the session terminated or cancelled): try again on a new one
_CHECK_RETRIED = ("08", "57")


def missing_connections(group: Group, counts: Mapping[Endpoint, int] | None = None) -> int:
    """How many more pooled connections ``group`` may open (its ``connection_count`` less
    those it has open, ``counts`` if given): server room the group must find when its load
    grows."""
    open_now = sum((group.counts if counts is None else counts).values())
    return max(0, group.config.connection_count - open_now)


class Room(NamedTuple):
    """Connections the groups may yet open under each limit a login to one endpoint meets:
    its server's ``max_connections``, its role's ``CONNECTION LIMIT``, its database's."""

    server: int
    role: int
    database: int


def room_needed(endpoint: Endpoint, groups: Iterable[Group]) -> Room:
    """How many more connections ``groups`` (those of every live pool of the process: the
    limits are the server's, not one pool's) may open under each limit a session on
    ``endpoint`` counts against: on its server (the same host and port), as its role (the
    same ``user`` there), in its database (the same ``dbname`` there). A group counts once
    per limit, however many of its endpoints share it: it opens at most its missing
    connections in all."""
    here = endpoint.config
    server = role = database = 0
    for group in groups:
        try:
            counts = group.counts  # its endpoints, and those it still has connections on
        except RuntimeError:  # a non-threaded pool's group, changed by its thread meanwhile:
            counts = dict.fromkeys(group.endpoints, 0)  # unknown, so none counted as open
        missing = missing_connections(group, counts)
        if not missing:
            continue
        there = [ep.config for ep in counts
                 if ep.config.host == here.host and ep.config.port == here.port]
        if not there:
            continue
        server += missing
        if any(config.user == here.user for config in there):
            role += missing
        if any(config.dbname == here.dbname for config in there):
            database += missing
    return Room(server, role, database)


def short_of(endpoint: Endpoint, limits: Sequence[Any], needed: Room) -> str | None:
    """Why a new session on ``endpoint`` leaves too little room for the groups, or None:
    ``limits`` are :data:`SESSION_CHECK`'s counts (each limit, then the sessions it counts,
    this one among them); ``needed`` what the groups may yet open under each."""
    usable, clients, role_limit, role_sessions, db_limit, db_sessions, role, database = limits
    buckets = (
        (usable, clients, needed.server,
         f"connection slots left of {usable} usable by ordinary roles (max_connections less "
         f"the reserved ones)"),
        (role_limit, role_sessions, needed.role,
         f"connection slots left under role {role}'s CONNECTION LIMIT {role_limit}"),
        (db_limit, db_sessions, needed.database,
         f"connection slots left under database {database}'s CONNECTION LIMIT {db_limit}"),
    )
    for limit, in_use, room, what in buckets:
        spare = int(limit) - int(in_use)
        if int(limit) >= 0 and spare < room:
            return (f"{endpoint.label} has {max(spare, 0)} {what}, and the groups of this "
                    f"process may still open {room} there")
    return None


class Retry(Exception):
    """A fresh connection failed its first query, or its server has no spare slot while
    another endpoint of the group may have: it is closed; no verdict yet, try again."""


class Capacity:
    """The check of one group's fresh dedicated connections, and the endpoints just found
    without spare slots.

    ``room_needed(endpoint)``: the :class:`Room` the groups of the process may still need
    under each limit a session on that endpoint meets (:func:`room_needed`).
    ``close(pc, reason)`` closes a dedicated connection, counting the discard."""

    def __init__(self, group: Group, backend: Backend, room_needed: Callable[[Endpoint], Room],
                 close: Callable[[PooledConnection, str], None]) -> None:
        self.group = group
        self._backend = backend
        self._room_needed = room_needed
        self._close = close
        #: endpoint -> (until when, why): found without spare slots for a dedicated one
        self._no_room: dict[Endpoint, tuple[float, str]] = {}
        self.no_room = 0  # callers refused because the groups need the server's slots

    def vet(self, pc: PooledConnection, deadline: float = math.inf) -> BaseException | None:
        """None if the fresh ``pc`` may be a dedicated connection; else it is closed and
        the error for the caller is returned. Its query is bounded by ``connect_timeout``
        and ``deadline`` (an inline caller's). Raises :class:`Retry` (``pc`` closed) when
        its first query was cut (connection lost, session ended), or when its server has
        no spare slot while another endpoint of the group may have."""
        group = self.group
        endpoint = pc.endpoint
        mode = pooler.mode_of(endpoint.config)
        if mode == pooler.TRANSACTION:
            self._close(pc, "transaction_pooler")
            return PoolError(
                f"group {group.name!r}: {endpoint.label} is a transaction-mode pooler, "
                f"where a dedicated connection is no session of its own (a LISTEN would "
                f"hear nothing, a session lock would be held by another client); point the "
                f"group at the server or at a session-mode pooler (endpoint key "
                f"pooler: 'session')")
        raw = pc.raw
        try:
            autocommit = raw.autocommit
            raw.autocommit = True
            rows = round_trip(raw, SESSION_CHECK, self._backend,
                              min(endpoint.config.connect_timeout,
                                  deadline - time.monotonic()))
            raw.autocommit = autocommit
        except psycopg2.Error as exc:
            self._close(pc, "failed_check")
            if exc.pgcode is None or exc.pgcode.startswith(_CHECK_RETRIED):
                logger.info("group %r: a new dedicated connection to %s failed its first "
                            "query: %s", group.name, endpoint.label, exc)
                raise Retry from None
            # the server refused the query itself: every new connection would, in a storm
            return PoolError(
                f"group {group.name!r}: {endpoint.label} refused the query a dedicated "
                f"connection begins with (it counts the server's connection slots in "
                f"pg_stat_activity): {str(exc).strip()}. The role needs to read "
                f"pg_catalog.pg_stat_activity and current_setting('max_connections')")
        except BaseException:
            self._close(pc, "interrupted")
            raise
        assert rows is not None
        session_pid, *limits = rows[0]
        login_pid = raw.info.backend_pid
        if mode != pooler.SESSION and session_pid != login_pid:
            self._close(pc, "undeclared_pooler")
            return PoolError(
                f"group {group.name!r}: {endpoint.label} is a connection pooler (the login "
                f"reported backend pid {login_pid}, the session runs in {session_pid}), so "
                f"a dedicated connection there may be no session of its own: in "
                f"transaction mode a LISTEN would hear nothing and a session lock would be "
                f"held by another client. Point the group at the server; if the pooler's "
                f"pool_mode is session, say so with the endpoint key pooler: 'session'")
        why = short_of(endpoint, limits, self._room_needed(endpoint))
        if why is not None:
            self._close(pc, "no_room")
            # one assignment: atomic, and readers copy the dict before they iterate
            self._no_room[endpoint] = (time.monotonic() + NO_ROOM_PAUSE, why)
            if self._short_everywhere() is None:
                raise Retry  # another endpoint of the group may have room: try it first
            return self._no_room_error(why)
        return None

    def refuse_if_no_room(self) -> None:
        """Refuse at once while every endpoint of the group was just found without spare
        slots (no connect is made for a caller who would be refused anyway)."""
        why = self._short_everywhere()
        if why is not None:
            raise self._no_room_error(why)

    def short_now(self) -> list[Endpoint]:
        """The group's endpoints just found without spare slots (tried last)."""
        now = time.monotonic()
        return [ep for ep, (until, _) in list(self._no_room.items()) if until > now]

    def forget(self) -> None:
        """Forget what was found (a forked child's servers are counted anew)."""
        self._no_room = {}

    def _short_everywhere(self) -> str | None:
        """Why every endpoint that could serve the group now (up, of a fitting or unknown
        role) was just found without spare slots; None if one was not."""
        if not self._no_room:
            return None
        now = time.monotonic()
        no_room = dict(self._no_room)
        reasons = []
        for endpoint in self.group.endpoints:
            until, why = no_room.get(endpoint, (0.0, ""))
            if until > now:
                reasons.append(why)
            elif endpoint.state == UP and fits(self.group.config.role, endpoint.role):
                return None
        return "; ".join(reasons) or None

    def _no_room_error(self, why: str) -> PoolTimeout:
        self.no_room += 1
        return PoolTimeout(
            f"group {self.group.name!r}: no dedicated connection: {why}, and dedicated "
            f"connections may use only connection slots the groups do not need. Close "
            f"listeners or end exclusive blocks (many subscribers can share one listener), "
            f"or raise that limit (max_connections, or ALTER ROLE / ALTER DATABASE ... "
            f"CONNECTION LIMIT)")
