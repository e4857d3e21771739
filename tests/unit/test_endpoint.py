"""The endpoint health state machine's transitions (pure logic: no server involved; the
same transitions are exercised against real servers in test_failover.py)."""

from __future__ import annotations

import time

from greenpool.config import EndpointConfig
from greenpool.endpoint import PROBING, QUARANTINED, UP, Endpoint


def make() -> Endpoint:
    return Endpoint(EndpointConfig(host="127.0.0.1"), quarantine_initial=0.5, quarantine_max=4)


def test_a_new_endpoint_starts_slowly_two_connects_in_flight_then_doubling():
    ep = make()
    assert ep.begin_connect(time.monotonic()) and ep.begin_connect(time.monotonic())
    assert not ep.begin_connect(time.monotonic())  # a cold pool does not storm one server
    ep.connect_succeeded("primary")
    ep.connect_succeeded("primary")
    assert sum(ep.begin_connect(time.monotonic()) for _ in range(10)) == 8  # 2 -> 4 -> 8


def test_a_burst_of_in_flight_failures_quarantines_once_for_the_initial_delay():
    ep = make()
    ep.ramp = None  # past its slow start
    for _ in range(5):
        assert ep.begin_connect(time.monotonic())
    for _ in range(5):
        ep.connect_failed("refused")
    assert ep.state == QUARANTINED and ep.quarantines == 1
    assert ep.quarantined_until - time.monotonic() <= 0.5
    assert ep.connect_errors == 5 and ep.connecting == 0


def test_only_one_prober_and_failed_probes_raise_the_ceiling_up_to_the_max():
    ep = make()
    assert ep.begin_connect(time.monotonic())
    ep.connect_failed("refused")
    ceilings = []
    for _ in range(6):
        ep.quarantined_until = 0.0  # the backoff expired
        ep.down_since -= 100  # a long outage: the backoff may grow up to quarantine_max
        assert ep.may_connect(time.monotonic())
        assert ep.begin_connect(time.monotonic())
        assert ep.state == PROBING and not ep.begin_connect(time.monotonic())  # one prober
        ep.connect_failed("refused")
        ceilings.append(ep.quarantined_until - time.monotonic())
    assert ceilings[-1] <= 4.0  # capped at quarantine_max
    assert max(ceilings) > 0.5  # and it did grow
    assert ep.quarantines == 1  # one outage, however many failed probes


def test_the_backoff_stays_within_a_quarter_of_the_outage():
    """A server down for 4 s is probed at least every second, however many probes failed:
    a short outage must not be followed by a long exile."""
    ep = make()
    assert ep.begin_connect(time.monotonic())
    ep.connect_failed("refused")
    delays = []
    for _ in range(8):
        ep.down_since = time.monotonic() - 4.0
        ep.quarantined_until = 0.0
        assert ep.begin_connect(time.monotonic())
        ep.connect_failed("refused")
        delays.append(ep.quarantined_until - time.monotonic())
    assert max(delays) <= 1.0 + 0.01, delays  # 4 s / 4 (quarantine_max is 4 here)


def test_recovery_is_a_slow_start_and_an_interrupted_probe_lets_the_next_one_in():
    ep = make()
    assert ep.begin_connect(time.monotonic())
    ep.connect_failed("refused")
    ep.quarantined_until = 0.0
    assert ep.begin_connect(time.monotonic())
    ep.connect_abandoned()  # the prober was killed: no verdict
    assert ep.state == QUARANTINED and ep.may_connect(time.monotonic())
    assert ep.begin_connect(time.monotonic())
    ep.connect_succeeded("primary")
    assert ep.state == UP and ep.ramp == 2
    assert ep.begin_connect(time.monotonic())
    assert ep.begin_connect(time.monotonic())
    assert not ep.begin_connect(time.monotonic())  # 2 in flight: the ramp's limit
    ep.connect_succeeded("primary")
    ep.connect_succeeded("primary")
    assert ep.ramp == 8 and ep.may_connect(time.monotonic())


def test_every_attempt_is_counted_as_it_ends_connected_failed_or_abandoned():
    """``connect_attempts`` is ``connects + connect_errors + connects_abandoned`` plus the
    attempts in flight: an attempt with no verdict (cut by its caller's time, interrupted,
    its first query after the login lost) is counted too, so the stats add up."""
    ep = make()
    ep.ramp = None

    def balance() -> int:
        stats = ep.export()
        return (int(stats["connect_attempts"]) - int(stats["connects"])
                - int(stats["connect_errors"]) - int(stats["connects_abandoned"]))

    for _ in range(6):
        assert ep.begin_connect(time.monotonic())
    assert balance() == ep.connecting == 6
    ep.connect_succeeded("standby")
    ep.connect_refused("password authentication failed")
    ep.connect_full("too many clients")
    ep.connect_cut(0.1)  # the caller's time ran out
    ep.connect_abandoned()  # interrupted, or its role query lost
    assert balance() == ep.connecting == 1
    ep.connect_failed("refused")
    assert balance() == ep.connecting == 0
    assert ep.export()["connects_abandoned"] == 2


def _pair() -> tuple[Endpoint, Endpoint]:
    """A primary and a standby sharing one record of the primary's WAL positions, as a
    pool's endpoints do."""
    from greenpool.primary_wal import PrimaryWal

    primary, standby = make(), make()
    shared = PrimaryWal()
    for ep in (primary, standby):
        ep.primary_wal = shared
        shared.join(ep)
    return primary, standby


def _probe_primary(ep: Endpoint, lsn: int, asked_at: float, system: int = 7) -> None:
    from greenpool.roles import RoleReport

    ep.observe(RoleReport("primary", None, 1, lsn, system=system, asked_at=asked_at))


def _probe_caught_up_standby(ep: Endpoint, at: int, heard: float | None = None) -> None:
    """Everything received replayed, up to ``at``; ``heard``: the receiver's word (None:
    hidden, a role without pg_read_all_stats)."""
    import math

    from greenpool.roles import RoleReport

    ep.observe(RoleReport("standby", math.inf if heard is None else heard, None, None,
                          receiver=4242, receiver_age=60.0, caught_up=at, system=7,
                          asked_at=time.monotonic()))


def test_a_caught_up_standby_nothing_vouches_for_has_an_unknown_lag_never_0():
    _, standby = _pair()
    _probe_caught_up_standby(standby, at=1000)
    assert standby.lag == float("inf")


def test_a_primary_seen_at_a_position_the_standby_has_bounds_its_lag_by_the_time_since():
    primary, standby = _pair()
    _probe_primary(primary, 1000, time.monotonic() - 2.0)
    _probe_caught_up_standby(standby, at=1000)
    assert standby.lag is not None and 2.0 <= standby.lag < 2.5
    _probe_primary(primary, 1000, time.monotonic())  # seen again: the standby is vouched for
    assert standby.lag is not None and standby.lag < 0.5


def test_a_primary_seen_beyond_the_standby_vouches_for_nothing_newer():
    primary, standby = _pair()
    _probe_primary(primary, 1000, time.monotonic() - 3.0)
    _probe_caught_up_standby(standby, at=1000)
    _probe_primary(primary, 1001, time.monotonic())  # a commit the standby has not got
    assert standby.lag is not None and standby.lag >= 3.0
    assert standby.lag_at_worst(time.monotonic()) >= 3.0


def test_the_receivers_word_vouches_where_no_primary_was_seen():
    _, standby = _pair()
    _probe_caught_up_standby(standby, at=1000, heard=0.25)
    assert standby.lag is not None and 0.25 <= standby.lag < 0.5


def test_an_old_primary_on_a_lower_timeline_vouches_for_no_standby():
    primary, standby = _pair()
    from greenpool.roles import RoleReport

    primary.observe(RoleReport("primary", None, 2, 500, system=7,
                               asked_at=time.monotonic() - 5.0))
    _probe_caught_up_standby(standby, at=1000)
    old = make()
    old.primary_wal = primary.primary_wal
    old.observe(RoleReport("primary", None, 1, 1000, system=7,
                           asked_at=time.monotonic()))  # split brain
    assert standby.lag is not None and standby.lag >= 5.0


def test_a_primary_of_another_cluster_vouches_for_no_standby():
    primary, standby = _pair()
    _probe_caught_up_standby(standby, at=1000)
    _probe_primary(primary, 10, time.monotonic(), system=8)  # a pool may span clusters
    assert standby.lag == float("inf")
