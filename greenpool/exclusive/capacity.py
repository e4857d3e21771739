"""Whether a fresh dedicated connection may be kept: a session of its own, in spare room.

One round trip (:data:`SESSION_CHECK`, bounded by ``connect_timeout``) asks the server the
session's real backend pid, how many connection slots ordinary roles may use
(``max_connections`` less ``superuser_reserved_connections`` and ``reserved_connections``) and
how many are in use:

* **the groups come first**: the connection is kept only if the slots left over still hold
  every connection this pool's groups may yet open on that server. Else it is closed, that
  server is tried last for :data:`NO_ROOM_PAUSE`, and while no endpoint that could serve
  the group has room every caller gets :class:`PoolTimeout` at once, without a connect;
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
from collections.abc import Callable
from typing import TYPE_CHECKING

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
#: compare with the login's), the slots ordinary roles may use, and the slots in use. Rows
#: of other roles' sessions hide their backend_type from an unprivileged role: a row with
#: a database and no visible type is counted as a client (the error is on the safe side).
#: Schema-qualified: a search_path that puts a schema before pg_catalog changes nothing.
SESSION_CHECK = (
    "SELECT pg_catalog.pg_backend_pid(), "
    "pg_catalog.current_setting('max_connections')::int "
    "- pg_catalog.current_setting('superuser_reserved_connections')::int "
    "- coalesce(nullif(pg_catalog.current_setting('reserved_connections', true), '')::int, 0), "
    "(SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE datid IS NOT NULL "
    "AND coalesce(backend_type, 'client backend') = 'client backend')"
)
#: SQLSTATE classes of a session check that failed through no fault of the query (the
#: connection was lost, the session terminated or cancelled): try again on a new one
_CHECK_RETRIED = ("08", "57")


def missing_connections(group: Group) -> int:
    """How many more pooled connections ``group`` may open (its ``connection_count`` less
    those it has open): server room the group must find when its load grows."""
    return max(0, group.config.connection_count - sum(group.counts.values()))


class Retry(Exception):
    """A fresh connection failed its first query, or its server has no spare slot while
    another endpoint of the group may have: it is closed; no verdict yet, try again."""


class Capacity:
    """The check of one group's fresh dedicated connections, and the endpoints just found
    without spare slots.

    ``room_needed(endpoint)``: how many connection slots on that endpoint's server the
    pool's groups may still need (the pool sums its groups). ``close(pc, reason)`` closes a
    dedicated connection, counting the discard."""

    def __init__(self, group: Group, backend: Backend, room_needed: Callable[[Endpoint], int],
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
        session_pid, usable, in_use = rows[0]
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
        needed = self._room_needed(endpoint)
        spare = int(usable) - int(in_use)
        if spare < needed:
            self._close(pc, "no_room")
            why = (f"{endpoint.label} has {max(spare, 0)} connection slots left of "
                   f"{usable} usable by ordinary roles (max_connections less the reserved "
                   f"ones), and the pool's groups may still open {needed} there")
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
            f"or give the server more max_connections")
