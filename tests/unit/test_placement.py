"""Placement and role tiers as pure rules: what is unknown is never taken as fresh or first.

No server is needed: endpoints are fed what a probe would have reported.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from greenpool.config import EndpointConfig
from greenpool.endpoint import PRIMARY, QUARANTINED, STANDBY, Endpoint
from greenpool.placement import (
    connect_order,
    left_unwatched,
    misplaced,
    move_target,
    open_to,
    standby_to_watch,
    unserved,
    where_to_be,
    without_primary,
)
from greenpool.roles import RoleReport

pytestmark = pytest.mark.timeout(10)


def _endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(EndpointConfig(host=f"10.0.0.{i}"), 0.5, 30.0) for i in range(n)]


def _standby(ep: Endpoint, lag: float | None) -> None:
    ep.observe_role(STANDBY)
    if lag is not None:
        ep.observe(RoleReport(STANDBY, lag, None, None, receiver=4242, receiver_age=60.0))


def _primary(ep: Endpoint, timeline: int | None) -> None:
    ep.observe_role(PRIMARY, timeline, 0 if timeline is not None else None)


def test_a_standby_of_unknown_lag_is_not_lent_by_a_max_lag_group() -> None:
    (ep,) = _endpoints(1)
    _standby(ep, lag=None)
    assert where_to_be([ep], "standby", 1.0, "fail") == frozenset()
    # ... but a connect may go there: it measures the lag before the connection is kept
    assert connect_order([ep], "standby", 1.0, "fail", {}, time.monotonic(), 0) == [ep]


def test_a_measured_fresh_standby_is_lent_and_a_lagging_one_is_not() -> None:
    fresh, lagging = _endpoints(2)
    _standby(fresh, lag=0.2)
    _standby(lagging, lag=25.0)
    assert where_to_be([fresh, lagging], "standby", 1.0, "fail") == frozenset({fresh})
    assert connect_order([lagging], "standby", 1.0, "fail", {}, time.monotonic(), 0) == []


def test_a_lag_measured_too_long_ago_is_unknown_again() -> None:
    (ep,) = _endpoints(1)
    _standby(ep, lag=0.1)
    assert where_to_be([ep], "standby", 1.0, "fail") == frozenset({ep})
    ep.lag_seen_at -= ep.role_stale_after + 1  # as if no probe ran since (non-threaded)
    assert where_to_be([ep], "standby", 1.0, "fail") == frozenset()


def test_unknown_lag_falls_back_to_the_primary_with_use_primary() -> None:
    standby, primary = _endpoints(2)
    _standby(standby, lag=None)
    _primary(primary, timeline=1)
    assert where_to_be([standby, primary], "standby", 1.0, "use-primary") == frozenset(
        {primary})


def test_without_max_lag_an_unmeasured_standby_is_used() -> None:
    (ep,) = _endpoints(1)
    _standby(ep, lag=None)
    assert where_to_be([ep], "standby", None, "fail") == frozenset({ep})


def test_two_primaries_one_of_unknown_timeline_neither_is_written_to() -> None:
    old, new = _endpoints(2)
    _primary(old, timeline=1)
    _primary(new, timeline=None)
    assert where_to_be([old, new], "primary", None, "fail") == frozenset()
    # the next connect goes to the one whose timeline is unknown, to learn it
    order = connect_order([old, new], "primary", None, "fail", {}, time.monotonic(), 0)
    assert order == [new]
    _primary(new, timeline=2)
    assert where_to_be([old, new], "primary", None, "fail") == frozenset({new})


def test_the_highest_timeline_wins_whatever_the_configuration_order() -> None:
    old, new = _endpoints(2)
    _primary(old, timeline=1)
    _primary(new, timeline=2)
    assert where_to_be([old, new], "primary", None, "fail") == frozenset({new})


def test_a_quarantined_endpoint_is_left_to_housekeeping_while_a_healthy_one_has_room() -> None:
    dead, healthy = _endpoints(2)
    dead.state, dead.quarantined_until = QUARANTINED, 0.0  # its backoff is over: probable
    now = time.monotonic()
    assert connect_order([dead, healthy], "any", None, "fail", {}, now, 0, probe=False) == [
        healthy]
    # where nobody else probes (non-threaded), a caller's connect may
    assert dead in connect_order([dead, healthy], "any", None, "fail", {}, now, 0, probe=True)


def test_a_full_server_takes_no_connect_for_a_moment_and_stays_up() -> None:
    full, other = _endpoints(2)
    assert full.begin_connect(time.monotonic())
    unhealthy = full.connect_error(False, "too_many_connections", "sorry, too many clients")
    assert not unhealthy
    assert full.state == "up" and full.quarantines == 0 and full.full == 1
    order = connect_order([full, other], "any", None, "fail", {}, time.monotonic(), 0)
    assert order == [other]


def test_a_lag_counts_at_its_worst_since_it_was_measured() -> None:
    """Replay may have stopped right after the measurement: 0.1 s of lag measured 1 s ago
    may be 1.1 s now, beyond a max_lag of 1 s, so it is measured again before use."""
    (ep,) = _endpoints(1)
    _standby(ep, lag=0.1)
    assert where_to_be([ep], "standby", 1.0, "fail") == frozenset({ep})
    ep.lag_seen_at -= 1.0
    assert where_to_be([ep], "standby", 1.0, "fail") == frozenset()
    assert connect_order([ep], "standby", 1.0, "fail", {}, time.monotonic(), 0) == [ep]
    assert where_to_be([ep], "standby", 5.0, "fail") == frozenset({ep})  # 1.1 s is fine here


def test_a_standby_group_with_nothing_to_use_retries_an_endpoint_seen_as_primary() -> None:
    """A proxy's replica listener that once landed on a primary, or a demoted primary: when
    nothing else can serve a standby group, connecting tells again, at most once a second."""
    (ep,) = _endpoints(1)
    _primary(ep, timeline=1)
    now = time.monotonic()
    assert connect_order([ep], "standby", None, "fail", {}, now, 0) == []
    assert connect_order([ep], "standby", None, "fail", {}, now + 1.5, 0) == [ep]


def test_a_standby_is_watched_for_its_promotion_only_while_no_primary_is_up() -> None:
    primary, first, second = _endpoints(3)
    _primary(primary, timeline=1)
    _standby(first, lag=0.1)
    _standby(second, lag=0.1)
    now = time.monotonic()
    assert not without_primary([primary, first, second])
    assert standby_to_watch([primary, first, second], set(), now) is None  # writes go there
    primary.state, primary.quarantined_until = QUARANTINED, now + 10  # its connect failed
    assert without_primary([primary, first, second])
    assert standby_to_watch([primary, first, second], set(), now) is first
    assert standby_to_watch([primary, first, second], {first}, now) is second  # one watch each
    assert standby_to_watch([primary, first, second], {first, second}, now) is None


def test_a_watch_makes_way_for_a_standby_nobody_watches_or_an_endpoint_of_unknown_role() -> None:
    primary, first, second, added = _endpoints(4)
    now = time.monotonic()
    primary.state, primary.quarantined_until = QUARANTINED, now + 10
    _standby(first, lag=0.1)
    _standby(second, lag=0.1)
    endpoints = [primary, first, second]
    assert left_unwatched(endpoints, {first}, now)  # the second: a round asks it
    assert not left_unwatched(endpoints, {first, second}, now)  # every standby watched
    # an endpoint a reconfiguration added, role never seen: it may be the primary
    assert left_unwatched([*endpoints, added], {first, second}, now)
    assert not left_unwatched([*endpoints, added], {first, second, added}, now)
    _primary(added, timeline=2)  # it answered as primary: writes go there, no watch
    assert not left_unwatched([*endpoints, added], {first}, now)


def test_an_endpoint_that_refused_the_group_is_no_place_to_move_to() -> None:
    """A group refused on one endpoint (a missing database, pg_hba, a password) keeps its
    connections on the other: the refusing one counts in no share, so the healthy one is
    never "above its share" and nothing is moved or asked for there."""
    healthy, refusing = _endpoints(2)
    now = time.monotonic()
    preferred = where_to_be([healthy, refusing], "any", None, "fail", {refusing})
    usable = open_to(preferred, {refusing}, now, "any")
    assert usable == frozenset({healthy})
    counts = {healthy: 6, refusing: 0}
    assert move_target(healthy, preferred, usable, counts, now) is None
    idle = [SimpleNamespace(endpoint=healthy) for _ in range(6)]
    assert misplaced(idle, preferred, usable, "any", counts) == []
    assert unserved(usable, counts) == []
    # not refused, it would take its share
    usable = open_to(preferred, (), now, "any")
    assert move_target(healthy, preferred, usable, counts, now) is refusing


def test_a_full_server_is_no_place_to_move_to_until_its_pause_ends() -> None:
    healthy, full = _endpoints(2)
    assert full.begin_connect(time.monotonic())
    full.connect_error(False, "too_many_connections", "sorry, too many clients")
    now = time.monotonic()
    preferred = where_to_be([healthy, full], "any", None, "fail")
    assert preferred == frozenset({healthy, full})  # its connections stay: they are healthy
    usable = open_to(preferred, (), now, "any")
    assert usable == frozenset({healthy})
    assert move_target(healthy, preferred, usable, {healthy: 4, full: 0}, now) is None
    assert move_target(full, preferred, usable, {healthy: 0, full: 4}, now) is None
    assert open_to(preferred, (), full.full_until, "any") == frozenset({healthy, full})


def test_a_tier_only_refusals_keep_the_group_from_gives_way_to_the_next() -> None:
    """A prefer-standby group whose standby refuses it reads from the primary rather than
    wait for a standby it may not log in to."""
    standby, primary = _endpoints(2)
    _standby(standby, lag=None)
    _primary(primary, timeline=1)
    eps = [standby, primary]
    assert where_to_be(eps, "prefer-standby", None, "fail") == frozenset({standby})
    assert where_to_be(eps, "prefer-standby", None, "fail", {standby}) == frozenset({primary})
    now = time.monotonic()
    assert connect_order(eps, "prefer-standby", None, "fail", {}, now, 0) == [standby]
    assert connect_order(eps, "prefer-standby", None, "fail", {}, now, 0,
                         refused={standby}) == [primary]
    # refused everywhere: the connections it has serve on where they are
    assert where_to_be(eps, "prefer-standby", None, "fail", {standby, primary}) == frozenset(
        {standby})


def test_an_endpoint_whose_role_is_unknown_is_no_place_for_a_group_with_a_role() -> None:
    """Added by reconfigure, never reached: a connect may go there (it measures the role),
    but no working connection moves towards it, and the known primary keeps the writes."""
    primary, added = _endpoints(2)
    _primary(primary, timeline=1)
    added.added_at = time.monotonic() + 1.0  # added after the primary was known
    now = time.monotonic()
    preferred = where_to_be([primary, added], "primary", None, "fail")
    assert primary in preferred  # its connections stay
    usable = open_to(preferred, (), now, "primary")
    assert usable == frozenset({primary})
    assert move_target(primary, preferred, usable, {primary: 6, added: 0}, now) is None
    assert unserved(usable, {primary: 6, added: 0}) == []
    assert added in connect_order([primary, added], "primary", None, "fail", {}, now, 0)
    # a group without a role may move there: any server serves it
    assert open_to(preferred, (), now, "any") == preferred


def test_a_new_pool_chooses_no_primary_before_every_endpoint_was_reached() -> None:
    """In a new pool an endpoint not reached yet may be the promoted primary of a split
    brain: the one that answered first is not chosen by speed (roles.EXPLORE_WAIT)."""
    first, slow = _endpoints(2)
    _primary(first, timeline=1)  # seen after both endpoints were made
    assert first not in where_to_be([first, slow], "primary", None, "fail")
    slow.first_attempt_at = time.monotonic() - 1.0  # explored: it did not answer in time
    preferred = where_to_be([first, slow], "primary", None, "fail")
    assert first in preferred
    assert open_to(preferred, (), time.monotonic(), "primary") == frozenset({first})
