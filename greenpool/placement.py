"""Placement: which endpoint a group should use, connect to, borrow from, or move off.

Pure functions over endpoints and counts. Nothing here knows about slots, waiting lines or
how connections are made, so each rule can be read (and tested) on its own:

* :func:`where_to_be` — the endpoints a group should use now (its first preference tier
  with an endpoint up that has not refused the group);
* :func:`open_to` — those of them a connection may be opened on or moved to for balance
  now: the one view of "usable now" that every balancing rule below reads;
* :func:`connect_order` — where the next connect goes: fewest of the group's connections
  per unit of weight first, ties rotating;
* :func:`take_in_turn` — which idle connection a borrow takes (smooth weighted round robin
  over the endpoints that have one idle);
* :func:`move_target` / :func:`misplaced` — whether connections should move to another
  endpoint (a restarted server gets its share back, a preferred one returns).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from .endpoint import PRIMARY, STANDBY, UNKNOWN, UP, Endpoint
from .roles import candidates, fits

#: A standby is re-tried by a ``primary`` group (it may have been promoted) at most this often.
ROLE_RECHECK = 0.5


def where_to_be(
    endpoints: Sequence[Endpoint],
    role: str,
    max_lag: float | None,
    on_lag: str,
    refused: Collection[Endpoint] = (),
) -> frozenset[Endpoint]:
    """The up endpoints of the first preference tier with one up that has not ``refused``
    the group (so not a standby that started to lag, not the primary once a preferred
    standby is back, not a tier only a refusal keeps the group from). When every up
    endpoint refused the group, the first tier with one up: the connections it has there
    serve on. When none is up, every endpoint of every tier: nothing better to move to.
    Never an endpoint no tier lists (a standby whose lag is unknown, for a group that must
    not use the primary)."""
    tiers = candidates(endpoints, role, max_lag, on_lag)
    fallback: frozenset[Endpoint] = frozenset()
    for tier in tiers:
        up = frozenset(ep for ep in tier if ep.state == UP)
        if up and not up <= frozenset(refused):
            return up
        fallback = fallback or up
    return fallback or frozenset(ep for tier in tiers for ep in tier)


def open_to(
    preferred: frozenset[Endpoint], barred: Collection[Endpoint], now: float, role: str
) -> frozenset[Endpoint]:
    """Those of ``preferred`` a connection may be opened on or moved to for balance now:
    up, not ``barred`` for the group (it refused the group or set it back, so its connects
    skip it; a move's connect there landed elsewhere lately), not full (it said so:
    connects leave it alone until ``full_until``), and, for a group with a ``role``, of a
    known role (one never reached may be a standby, or a host not reachable yet: a connect
    that needs to be made measures it, no working connection is closed to find out). Only
    these count in
    the shares: an endpoint the group cannot reach now is never "below its share", so no
    working connection is closed to go where no connect can follow. Connections already on
    another endpoint of ``preferred`` stay (a full server's are healthy)."""
    return frozenset(ep for ep in preferred
                     if ep.state == UP and ep not in barred and now >= ep.full_until
                     and (role == "any" or ep.role != UNKNOWN))


def connect_order(
    endpoints: Sequence[Endpoint],
    role: str,
    max_lag: float | None,
    on_lag: str,
    counts: Mapping[Endpoint, int],
    now: float,
    rotation: int,
    probe: bool = True,
    refused: Collection[Endpoint] = (),
) -> list[Endpoint]:
    """Endpoints to try now: the first preference tier with an endpoint that may take a
    connect and has not ``refused`` the group (a tier only refusals keep it from gives way
    to the next); within it fewest of the group's connections per weight first, ties
    rotating from ``rotation`` so that a fleet of workers does not all pick the first one.
    Without ``probe`` (housekeeping probes quarantined endpoints), a quarantined endpoint is
    tried only when no endpoint of its tier is up: a caller's connect is not spent on a
    probe that may hang for ``connect_timeout`` while a healthy endpoint has room."""
    for tier in candidates(endpoints, role, max_lag, on_lag, connecting=True):
        ready = [
            ep for ep in tier
            if ep.may_connect(now) and ep not in refused
            and (role != "primary" or ep.role != STANDBY or now - ep.role_seen_at >= ROLE_RECHECK)
        ]
        if not probe and len(ready) > 1:
            up = [ep for ep in ready if ep.state == UP]
            ready = up or ready
        if len(ready) > 1:
            start = rotation % len(ready)
            ready = ready[start:] + ready[:start]
            ready.sort(key=lambda ep: (ep.cut(now), counts.get(ep, 0) / ep.config.weight))
        if ready:
            return ready
    if role == "standby":
        # nothing else to try: a server last seen as primary may be a standby now (demoted,
        # or a proxy's listener now routed elsewhere); connecting tells, at most every ROLE_RECHECK
        return [ep for ep in endpoints if ep.role == PRIMARY and ep.may_connect(now)
                and now - ep.role_seen_at >= ROLE_RECHECK]
    return []


def without_primary(endpoints: Sequence[Endpoint]) -> bool:
    """No endpoint is a primary that is up: a ``primary`` group has nowhere to write until
    a standby is promoted (or the old primary is back)."""
    return not any(ep.role == PRIMARY and ep.state == UP for ep in endpoints)


def standby_to_watch(
    endpoints: Sequence[Endpoint], watched: Collection[Endpoint], now: float
) -> Endpoint | None:
    """The standby a ``primary`` group with callers waiting should watch for its promotion
    (the first one up, not yet ``watched``, that may take a connect); None while a primary
    is up: writes go there, and the split-brain rule decides between primaries."""
    if not without_primary(endpoints):
        return None
    return next((ep for ep in endpoints if ep.role == STANDBY and ep.state == UP
                 and ep not in watched and ep.may_connect(now)), None)


def left_unwatched(
    endpoints: Sequence[Endpoint], watched: Collection[Endpoint], now: float
) -> bool:
    """Whether an endpoint no watch covers may take a connect now: a standby not
    ``watched`` (it may be the one promoted), or one up whose role was never seen (added by
    ``Pool.reconfigure``: it may be the primary). A watching task makes way for a round of
    connects then: while every connect task of a group watches, nothing else asks them."""
    return standby_to_watch(endpoints, watched, now) is not None or any(
        ep.role == UNKNOWN and ep.state == UP and ep not in watched and ep.may_connect(now)
        for ep in endpoints)


def take_in_turn(endpoints_of_idle: Sequence[Endpoint], turns: dict[Endpoint, float]) -> int:
    """The index, in the idle stack, of the connection a borrow takes: the most recently
    returned one of the endpoint whose turn it is (smooth weighted round robin among the
    endpoints with one idle). Plain last-in-first-out would send a light load to whichever
    endpoint's connections happen to be on top, whatever the weights."""
    latest: dict[Endpoint, int] = {}
    for i, endpoint in enumerate(endpoints_of_idle):
        latest[endpoint] = i  # the last one seen is the most recently returned
    if len(latest) == 1:
        return len(endpoints_of_idle) - 1
    total, chosen = 0.0, None
    for endpoint in latest:
        weight = endpoint.config.weight
        total += weight
        turns[endpoint] = turns.get(endpoint, 0.0) + weight
        if chosen is None or turns[endpoint] > turns[chosen]:
            chosen = endpoint
    assert chosen is not None
    turns[chosen] -= total
    return latest[chosen]


def _shares(usable: Iterable[Endpoint], counts: Mapping[Endpoint, int]) -> dict[Endpoint, float]:
    eps = list(usable)
    total = sum(counts.get(ep, 0) for ep in eps)
    weights = sum(ep.config.weight for ep in eps)
    return {ep: total * ep.config.weight / weights for ep in eps} if weights else {}


def move_target(
    source: Endpoint,
    preferred: frozenset[Endpoint],
    usable: frozenset[Endpoint],
    counts: Mapping[Endpoint, int],
    now: float,
) -> Endpoint | None:
    """An endpoint a connection to ``source`` should move to, or None.

    A connection moves when ``source`` is not a preferred endpoint, or holds more than its
    weighted share of the ``usable`` ones (:func:`open_to`) while a usable endpoint that
    may take a connect now holds less than its own (rounded so that a balanced group never
    moves back and forth). One on a preferred endpoint not usable now stays."""
    ready = [ep for ep in usable if ep.may_connect(now)]
    if not ready:
        return None
    if source in preferred:
        if source not in usable:
            return None
        shares = _shares(usable, counts)
        if counts.get(source, 0) <= math.ceil(shares[source]):
            return None
        ready = [ep for ep in ready if counts.get(ep, 0) < int(shares[ep])]
        if not ready:
            return None
    return min(ready, key=lambda ep: counts.get(ep, 0) / ep.config.weight)


def misplaced(
    idle: Sequence[Any],
    preferred: frozenset[Endpoint],
    usable: frozenset[Endpoint],
    role: str,
    counts: Mapping[Endpoint, int],
) -> list[Any]:
    """Idle connections (anything with an ``endpoint``) that should move: off endpoints whose
    role no longer fits, off fallback endpoints once a preferred one is up, and off
    ``usable`` endpoints (:func:`open_to`) above their weighted share while another usable
    one is below it."""
    up = frozenset(ep for ep in preferred if ep.state == UP)
    if not up:
        return []
    moving = [pc for pc in idle if pc.endpoint not in up or not fits(role, pc.endpoint.role)]
    shares = _shares(usable, counts)
    if any(counts.get(ep, 0) < int(shares[ep]) for ep in usable):
        for ep in usable:
            excess = counts.get(ep, 0) - math.ceil(shares[ep])
            for pc in idle:
                if excess <= 0:
                    break
                if pc.endpoint is ep and pc not in moving:
                    moving.append(pc)
                    excess -= 1
    return moving


def unserved(usable: frozenset[Endpoint], counts: Mapping[Endpoint, int]) -> list[Endpoint]:
    """``usable`` endpoints (:func:`open_to`) that hold none of the group's connections: a
    group with room opens one on each, so that even a light load is spread by weight."""
    return [ep for ep in usable if not counts.get(ep, 0)]
