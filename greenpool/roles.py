"""Roles: detecting primary/standby, choosing endpoints for a group, classifying failures.

Choosing for a group of role ``primary`` when two endpoints both claim to be primary (split
brain, e.g. an old primary still running after a promotion): the one **most recently seen
being promoted** wins; if none was seen being promoted, the first in the configuration.
The other is skipped, and the event is logged at ERROR and counted (``split_brain``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from psycopg2 import extensions

from .endpoint import PRIMARY, QUARANTINED, STANDBY, UNKNOWN, Endpoint

logger = logging.getLogger("greenpool")

# One round trip: the role, and for a standby how far behind the primary its replay is
# (0 when everything received is replayed, so an idle primary does not look like lag).
PROBE_SQL = (
    "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN "
    "CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END END"
)

_LOST_STATES = ("57P01", "57P02", "57P03")  # admin/crash shutdown, cannot connect now


def role_of(raw: Any) -> str:
    """The role the server reported, at no round trip (PostgreSQL >= 14); else UNKNOWN."""
    status = raw.get_parameter_status("in_hot_standby")
    if status is None:
        return UNKNOWN
    return STANDBY if status == "on" else PRIMARY


def query_role(raw: Any) -> tuple[str, float | None]:
    """Role and replay lag by query (servers older than 14, and housekeeping probes)."""
    autocommit = raw.autocommit
    raw.autocommit = True  # never leave a transaction behind
    try:
        with raw.cursor() as cursor:
            cursor.execute(PROBE_SQL)
            in_recovery, lag = cursor.fetchone()
    finally:
        if not raw.closed:
            raw.autocommit = autocommit
    return (STANDBY if in_recovery else PRIMARY), (float(lag) if lag is not None else None)


def fits(group_role: str, role: str) -> bool:
    """May a connection to a server of ``role`` serve a group of ``group_role``?"""
    if group_role == "primary":
        return role != STANDBY
    if group_role == "standby":
        return role != PRIMARY
    return True


def failure_kind(exc: BaseException, raw: Any) -> str:
    """'lost' (the connection or server is gone), 'read_only' (a write reached a standby),
    or '' (an ordinary error: the endpoint is fine)."""
    code = getattr(exc, "pgcode", None)
    if code == "25006":
        return "read_only"
    if raw.closed or (code and (code.startswith("08") or code in _LOST_STATES)):
        return "lost"
    if raw.get_transaction_status() == extensions.TRANSACTION_STATUS_UNKNOWN:
        return "lost"
    return ""


_reported_split: frozenset[Endpoint] = frozenset()


def _chosen_primary(primaries: list[Endpoint]) -> Endpoint:
    """The primary a ``primary`` group uses. An endpoint that is quarantined claims nothing
    now; among reachable ones that all claim to be primary, the most recently promoted."""
    global _reported_split
    claiming = [ep for ep in primaries if ep.state != QUARANTINED] or primaries
    if len(claiming) == 1:
        return claiming[0]
    seen = [ep for ep in claiming if ep.promoted_at is not None]
    chosen = max(seen, key=lambda ep: ep.promoted_at or 0.0) if seen else claiming[0]
    if frozenset(claiming) != _reported_split:  # loudly, but once per change
        _reported_split = frozenset(claiming)
        for ep in claiming:
            ep.split_brain += 1
        logger.error(
            "split brain: %s all claim to be primary; using %s (most recently promoted, else "
            "first configured). Fence the other one.",
            ", ".join(ep.label for ep in claiming),
            chosen.label,
        )
    return chosen


def candidates(
    endpoints: Sequence[Endpoint], group_role: str, max_lag: float | None, on_lag: str
) -> list[list[Endpoint]]:
    """The group's endpoints in tiers of preference (first tier first). Health is not
    considered here; a later tier is used only when no endpoint of an earlier one can
    take a connection."""
    if group_role == "any":
        return [list(endpoints)]
    primaries = [ep for ep in endpoints if ep.role == PRIMARY]
    standbys = [ep for ep in endpoints if ep.role == STANDBY]
    unknown = [ep for ep in endpoints if ep.role == UNKNOWN]
    if group_role == "primary":
        chosen = [_chosen_primary(primaries)] if primaries else []
        # A standby may have been promoted since we last looked: connecting tells.
        return [chosen + unknown, standbys]
    fresh = [ep for ep in standbys if max_lag is None or ep.lag is None or ep.lag <= max_lag]
    lagging = [ep for ep in standbys if ep not in fresh]
    tiers = [fresh + unknown]
    if group_role == "prefer-standby":
        tiers.append(primaries)
        if on_lag == "use-primary":
            tiers.append(lagging)
    elif lagging and on_lag == "use-primary":
        tiers.append(primaries)
    return tiers
