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
