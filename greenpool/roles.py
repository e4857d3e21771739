"""Roles: detecting primary/standby, choosing endpoints for a group (what a failed statement
means lives in statement_failures.py).

**Split brain** (two endpoints answer as primary, e.g. an old primary still running after a
promotion). Every process chooses alike, from what the servers said in their probes, never
from when it happened to notice something: among the primaries that are up (not quarantined,
not being probed) and whose role is not stale (seen within ``Endpoint.role_stale_after``),
the one on the **highest timeline** (a promotion starts a new one), then with the **highest
current WAL position**, then the first in the configuration. The others are skipped.

It is raised (logged at ERROR, counted in ``split_brain``) only for endpoints that answer as
primary *now*: each of those must also have answered after this process first saw the others
as primary, so a dead old primary whose last answer predates the promotion is no claimant.
Once per change of the claimants, remembered on the endpoints (which belong to one pool).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg2
from psycopg2 import extensions

from .concurrency.backend import Backend
from .endpoint import PRIMARY, STANDBY, UNKNOWN, UP, Endpoint

logger = logging.getLogger("greenpool")

# A primary's WAL position: the end of the WAL inserted so far, which every commit already
# visible there precedes (with synchronous_commit off a commit is visible before its WAL is
# written, so pg_current_wal_lsn() alone may not cover it). The insert position reads past
# the header of a new page, which holds no record, so where nothing but that header follows
# the written position, the written position it is: a standby that received all there is
# has reached it.
_WAL_END = (
    "CASE WHEN ins - wr = CASE "
    "WHEN mod(wr - '0/0'::pg_lsn, pg_size_bytes(current_setting('wal_segment_size'))) = 0 "
    "THEN 40 WHEN mod(wr - '0/0'::pg_lsn, current_setting('wal_block_size')::numeric) = 0 "
    "THEN 24 ELSE 0 END THEN wr ELSE ins END"
)
_PRIMARY_POSITIONS = (
    "CASE WHEN NOT r THEN pg_current_wal_lsn() END AS wr, "
    "CASE WHEN NOT r THEN pg_current_wal_insert_lsn() END AS ins"
)

# One round trip. For a standby: the pid of its WAL receiver if that receiver streams (or
# may: a role without pg_read_all_stats sees the pid, not the status), how long that process
# has lived (NULL where hidden); then, read once so that they agree, its receive and replay
# positions: where they are equal (it replayed everything it received), that position, and
# how long ago its receiver last heard from the primary if that message said the primary
# had nothing beyond it (NULL where hidden: pg_read_all_stats); and the time since the last
# replayed commit (the primary wrote past what the standby shows only after that commit:
# a bound however far replay is, on the two hosts' clocks). Caught up is not fresh: a
# stalled link looks the same (``primary_wal``). A receiver says "streaming" before it has even
# connected, so one that keeps restarting against a dead primary looks streaming for a
# moment each time: ``Endpoint.observe_lag`` believes a receiver only once it has lived a
# while. For a primary: its current WAL file (the timeline is its first 8 hex digits,
# right after a promotion: pg_control_checkpoint() shows the new timeline only after the
# next checkpoint) and WAL position (``_WAL_END``). Then the cluster's system identifier
# (a primary and its physical standbys share it: positions compare within a cluster only,
# and a pool may span several). The role is read once (OFFSET 0 keeps the subqueries from
# being inlined), so the columns agree.
PROBE_SQL = (
    "SELECT r, "
    "CASE WHEN r THEN (SELECT pid FROM pg_stat_wal_receiver "
    "WHERE coalesce(status, 'streaming') = 'streaming' LIMIT 1) END AS receiver, "
    "CASE WHEN r THEN (SELECT extract(epoch FROM now() - a.backend_start) "
    "FROM pg_stat_activity AS a JOIN pg_stat_wal_receiver AS w USING (pid) LIMIT 1) END, "
    "CASE WHEN rcv = rpl THEN rcv::text END, "
    "CASE WHEN rcv = rpl THEN (SELECT extract(epoch FROM now() - last_msg_receipt_time) "
    "FROM pg_stat_wal_receiver WHERE latest_end_lsn <= rcv LIMIT 1) END, "
    "CASE WHEN r AND pg_last_xact_replay_timestamp() <= now() "
    "THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END, "
    "CASE WHEN NOT r THEN pg_walfile_name(wr) END, "
    f"CASE WHEN NOT r THEN ({_WAL_END})::text END, "
    "(SELECT system_identifier FROM pg_control_system()) "
    f"FROM (SELECT r, {_PRIMARY_POSITIONS}, "
    "CASE WHEN r THEN pg_last_wal_receive_lsn() END AS rcv, "
    "CASE WHEN r THEN pg_last_wal_replay_lsn() END AS rpl "
    "FROM (SELECT pg_is_in_recovery() AS r OFFSET 0) AS q OFFSET 0) AS s"
)

#: PROBE_SQL's primary half: on a standby one function call, no statistics view read
PRIMARY_SQL = (
    "SELECT r, CASE WHEN NOT r THEN pg_walfile_name(wr) END, "
    f"CASE WHEN NOT r THEN ({_WAL_END})::text END "
    f"FROM (SELECT r, {_PRIMARY_POSITIONS} "
    "FROM (SELECT pg_is_in_recovery() AS r OFFSET 0) AS q OFFSET 0) AS s"
)

#: The lag of a standby nothing vouches for (its WAL receiver is not streaming, or it
#: replayed all it received and neither the primary nor its receiver says when that was
#: everything): unknown, beyond any max_lag.
LAG_UNKNOWN = math.inf

_STATUS_IDLE = extensions.TRANSACTION_STATUS_IDLE
_PLAIN = extensions.cursor  # tuples, whatever the group's row_factory (its columns repeat names)


class RoleReport(NamedTuple):
    """What one probe learned about a server."""

    role: str
    #: standby: the most its data can be behind as the standby alone tells (the time since
    #: its last replayed commit; all replayed: or since its receiver last heard that the
    #: primary had nothing more), LAG_UNKNOWN when it cannot tell or its receiver does not
    #: stream; primary: None
    lag: float | None
    #: primary: the timeline it writes on, and its current WAL position in bytes
    timeline: int | None
    lsn: int | None
    #: standby: the pid of its streaming WAL receiver (None: none streams), and how many
    #: seconds that process has lived (None where the server hides it: a role without
    #: pg_read_all_stats)
    receiver: int | None = None
    receiver_age: float | None = None
    #: standby: the WAL position it has received and replayed, when it replayed all it
    #: received (the primary's sightings may then vouch for it: ``primary_wal``)
    caught_up: int | None = None
    #: the cluster's system identifier (PROBE_SQL only): whose WAL positions compare
    system: int | None = None
    #: when the probe was sent (monotonic): the server answered for this moment or later
    asked_at: float = 0.0


class _ProbeDeadline(Exception):
    """Raised into a probe that outlived its deadline. Private: never escapes."""


def role_of(raw: Any) -> str:
    """The role the server reported, at no round trip (PostgreSQL >= 14); else UNKNOWN."""
    status = raw.get_parameter_status("in_hot_standby")
    if status is None:
        return UNKNOWN
    return STANDBY if status == "on" else PRIMARY


def _lsn_bytes(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def read_role(
    raw: Any, backend: Backend | None = None, seconds: float | None = None
) -> RoleReport:
    """Role, replay lag, timeline and WAL position, in one round trip bounded by ``seconds``
    (under ``backend.deadline``; no bound when either is None). A probe that runs out of
    time raises ``psycopg2.OperationalError``; the connection is then in an unknown state
    and must be discarded. Never leaves a transaction open."""
    asked_at = time.monotonic()
    (in_recovery, receiver, receiver_age, caught_up, heard, behind, walfile, lsn,
     system) = _one_row(raw, PROBE_SQL, backend, seconds)
    if in_recovery:
        bounds = [float(b) for b in (behind, heard if caught_up is not None else None)
                  if b is not None]
        return RoleReport(
            STANDBY, LAG_UNKNOWN if receiver is None or not bounds else min(bounds),
            None, None, receiver, None if receiver_age is None else float(receiver_age),
            None if caught_up is None else _lsn_bytes(caught_up), system, asked_at)
    return RoleReport(PRIMARY, None, int(walfile[:8], 16), _lsn_bytes(lsn), system=system,
                      asked_at=asked_at)


def primary_report(
    raw: Any, backend: Backend | None = None, seconds: float | None = None
) -> RoleReport | None:
    """The report of a primary (timeline, WAL position), or None while the server is in
    recovery: the lightest round trip that tells a promotion and what the split-brain rule
    needs (a write group watching a standby asks it many times a second). Bounded and
    failing like :func:`read_role`."""
    asked_at = time.monotonic()
    in_recovery, walfile, lsn = _one_row(raw, PRIMARY_SQL, backend, seconds)
    if in_recovery:
        return None
    return RoleReport(PRIMARY, None, int(walfile[:8], 16), _lsn_bytes(lsn), asked_at=asked_at)


def _one_row(raw: Any, sql: str, backend: Backend | None, seconds: float | None) -> Any:
    """The first row of ``sql``, in autocommit, under a deadline of ``seconds``."""
    if seconds is not None and not seconds > 0:  # also NaN: no time left, send nothing
        raise psycopg2.OperationalError(f"no time left for the role probe ({seconds!r} s)")
    bounded = backend is not None and seconds is not None and seconds != math.inf
    deadline = _ProbeDeadline()
    autocommit = raw.autocommit
    try:
        raw.autocommit = True  # never leave a transaction behind
        try:
            if bounded:
                assert backend is not None and seconds is not None
                with backend.deadline(seconds, deadline), \
                        raw.cursor(cursor_factory=_PLAIN) as cursor:
                    cursor.execute(sql)
                    return cursor.fetchone()
            with raw.cursor(cursor_factory=_PLAIN) as cursor:
                cursor.execute(sql)
                return cursor.fetchone()
        finally:
            # Interrupted mid-query (a deadline, a kill), the connection is busy or closed:
            # touching it would raise and hide the interruption. Its caller discards it.
            if not raw.closed and raw.get_transaction_status() == _STATUS_IDLE:
                raw.autocommit = autocommit
    except _ProbeDeadline as exc:
        if exc is not deadline:
            raise
        raise psycopg2.OperationalError(f"no answer to the role probe within {seconds:.2f} s"
                                        ) from None


def query_role(
    raw: Any, backend: Backend | None = None, seconds: float | None = None
) -> tuple[str, float | None]:
    """Role and the lag the standby alone vouches for (see :func:`read_role`; the pool's
    sightings of the primary may vouch for less: ``primary_wal``)."""
    report = read_role(raw, backend, seconds)
    return report.role, report.lag


def fits(group_role: str, role: str) -> bool:
    """May a connection to a server of ``role`` serve a group of ``group_role``?"""
    if group_role == "primary":
        return role != STANDBY
    if group_role == "standby":
        return role != PRIMARY
    return True


def must_measure(group_role: str, max_lag: float | None, several: bool, role: str) -> bool:
    """Whether a new connection's server must be asked, one round trip, what its login did
    not say: the role on PostgreSQL < 14; for a ``max_lag`` group, a standby's lag; where
    ``several`` endpoints may be primary, a primary's timeline (so that a new pool never
    picks a primary by configuration order in a split brain)."""
    if group_role == "any":
        return False
    if role == UNKNOWN:
        return True
    if role == STANDBY:
        return max_lag is not None
    return several


def _answering(primaries: list[Endpoint], now: float) -> list[Endpoint]:
    """Primaries that are up and whose role is not stale: those the rule chooses among."""
    return [
        ep for ep in primaries
        if ep.state == UP and now - ep.role_seen_at <= ep.role_stale_after
    ]


def _claimants(live: list[Endpoint]) -> list[Endpoint]:
    """Those of ``live`` that answered as primary since every other one was first seen as
    primary: they were primaries at the same time, not one after the other."""
    newest = max(ep.primary_since or 0.0 for ep in live)
    return [ep for ep in live if ep.role_seen_at >= newest]


def _precedence(ep: Endpoint) -> tuple[int, int, int]:
    """The split-brain order: timeline, then WAL position, then configuration order."""
    return (ep.timeline if ep.timeline is not None else -1,
            ep.wal_lsn if ep.wal_lsn is not None else -1,
            -ep.rank)


#: seconds a new pool waits for an endpoint it has never reached before it chooses a primary
#: without it: a promoted primary of a split brain answers a connect as fast as the old one,
#: an unreachable host (a black hole) must not hold every new pool for ``connect_timeout``
EXPLORE_WAIT = 0.5


def unexplored(ep: Endpoint) -> bool:
    """Up, role never seen, no connect to it has failed, and the first attempt (if any)
    began less than ``EXPLORE_WAIT`` ago: a connect will tell soon."""
    if ep.role != UNKNOWN or ep.state != UP or ep.connect_errors:
        return False
    started = ep.first_attempt_at
    return not started or time.monotonic() - started < EXPLORE_WAIT


def _exploring(endpoints: Sequence[Endpoint], primaries: list[Endpoint]) -> bool:
    """Whether the choice of a primary waits for an endpoint never reached: only while no
    primary was known before that endpoint was added (a new pool: it may be the promoted
    primary of a split brain). A primary already known keeps the writes while an endpoint
    added since (``Pool.reconfigure``) is explored in the background: it was the rule's
    choice before the newcomer existed, and is until the newcomer answers."""
    newcomers = [ep.added_at for ep in endpoints if unexplored(ep)]
    if not newcomers:
        return False
    first = min(newcomers)
    return not any(ep.primary_since is not None and ep.primary_since < first
                   for ep in primaries)


def _chosen_primary(endpoints: Sequence[Endpoint], primaries: list[Endpoint]) -> Endpoint | None:
    """The primary a ``primary`` group uses; None while the rule cannot choose: primaries
    answer together and one of them has an unknown timeline, or an endpoint that is up has
    never been reached (see :func:`_exploring`). The next connect learns what is missing;
    configuration order is no rule."""
    if _exploring(endpoints, primaries):
        return None
    if len(primaries) == 1:
        only = primaries[0]
        if only.split_reported:
            only.split_reported.clear()
        return only
    live = _answering(primaries, time.monotonic())
    claiming = _claimants(live) if len(live) > 1 else live
    for ep in endpoints:
        if ep.split_reported and ep not in claiming:
            ep.split_reported.clear()  # it claims nothing now: a later claim is news
    if len(live) > 1 and any(ep.timeline is None for ep in live):
        return None
    chosen = max(live or primaries, key=_precedence)  # nobody answers now: still a rule
    if len(claiming) < 2:
        return chosen
    together = frozenset(claiming)
    if not all(together in ep.split_reported for ep in claiming):  # loudly, once per change
        for ep in claiming:
            ep.split_reported.add(together)
            ep.split_brain += 1
            ep.on_event("split_brain", "it claims to be primary together with "
                        + ", ".join(sorted(o.label for o in claiming if o is not ep)))
        logger.error(
            "split brain: %s all answer as primary; using %s (highest timeline, then highest "
            "WAL position, then first configured). Fence the other one.",
            ", ".join(f"{ep.label} (timeline {ep.timeline}, lsn {ep.wal_lsn})"
                      for ep in claiming),  # never None here: see above
            chosen.label,
        )
    return chosen


def candidates(
    endpoints: Sequence[Endpoint],
    group_role: str,
    max_lag: float | None,
    on_lag: str,
    connecting: bool = False,
) -> list[list[Endpoint]]:
    """The group's endpoints in tiers of preference (first tier first). Health is not
    considered here; a later tier is used only when no endpoint of an earlier one can
    take a connection.

    What is unknown is never taken for the convenient case: a standby whose lag is not
    known (never measured, or measured too long ago) is no fresh standby for a ``max_lag``
    group, and a primary whose timeline is unknown is not chosen while another answers
    too. With ``connecting``, the tiers say where a *connect* may go, and those unknowns
    are in the first tier: a connect measures them (``Connector._attempt``) and keeps the
    connection only if it then fits. An endpoint whose role was never seen is in the first
    tier either way (it may be the standby a group prefers: a new pool does not settle on
    the primary it happened to reach first), but no connection moves towards it
    (``placement.open_to``)."""
    if group_role == "any":
        return [list(endpoints)]
    primaries = [ep for ep in endpoints if ep.role == PRIMARY]
    standbys = [ep for ep in endpoints if ep.role == STANDBY]
    unknown = [ep for ep in endpoints if ep.role == UNKNOWN]
    if group_role == "primary":
        chosen = _chosen_primary(endpoints, primaries) if primaries else None
        first = [chosen] if chosen is not None else []
        if chosen is None and connecting:
            first = [ep for ep in primaries if ep.timeline is None]
        # A standby may have been promoted since we last looked: connecting tells.
        return [first + unknown, standbys]
    if max_lag is None:
        fresh, unmeasured, lagging = standbys, [], []
    else:
        # a lag measured t seconds ago may be lag + t now (replay may have stopped since):
        # fresh only while that worst case is within max_lag, then measured again
        now = time.monotonic()
        unmeasured = [ep for ep in standbys if ep.must_measure_lag(now, max_lag)]
        fresh = [ep for ep in standbys
                 if ep not in unmeasured and ep.lag_at_worst(now) <= max_lag]
        lagging = [ep for ep in standbys if ep not in fresh and ep not in unmeasured]
    tiers = [fresh + unknown + (unmeasured if connecting else [])]
    if group_role == "prefer-standby":
        tiers.append(primaries)
        if on_lag == "use-primary":
            tiers.append(lagging)
    elif (lagging or unmeasured) and on_lag == "use-primary":
        tiers.append(primaries)
    return tiers
