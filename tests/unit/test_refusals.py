"""What a group remembers of connect failures retrying cannot fix, as a pure rule: an
endpoint that refused is left alone for its pause, and callers fail at once only when
every endpoint refused."""

from __future__ import annotations

import pytest

from greenpool.config import EndpointConfig
from greenpool.endpoint import Endpoint
from greenpool.refusals import Refusals

pytestmark = pytest.mark.timeout(10)


def _endpoints(n: int, backoff_max: float = 30.0) -> list[Endpoint]:
    return [Endpoint(EndpointConfig(host=f"10.0.0.{i}"), 0.5, backoff_max) for i in range(n)]


def test_an_endpoint_that_refused_is_left_alone_until_its_pause_ends() -> None:
    first, second = _endpoints(2)
    refusals = Refusals([first, second])
    refusals.remember(first, "password authentication failed", now=100.0)
    assert refusals.blocks(first, 100.0) and refusals.blocks(first, 129.9)
    assert not refusals.blocks(first, 130.0)  # the endpoints' longest backoff_max
    assert not refusals.blocks(second, 100.0)
    assert refusals.refused(110.0) == {first} and refusals.refused(130.0) == set()
    refusals.forget(first)  # a connect to it succeeded
    assert not refusals.blocks(first, 110.0)


def test_callers_fail_at_once_only_when_every_endpoint_refused_naming_each() -> None:
    first, second = _endpoints(2)
    refusals = Refusals([first, second])
    assert refusals.error("write", [first, second], 0.0) is None
    refusals.remember(first, "database \"x\" does not exist", now=0.0)
    assert refusals.error("write", [first, second], 1.0) is None  # the second may serve
    refusals.remember(second, "password authentication failed", now=0.0)
    error = refusals.error("write", [first, second], 1.0)
    assert error is not None
    text = str(error)
    assert "group 'write'" in text and first.label in text and second.label in text
    assert "retrying cannot help" in text
    assert refusals.error("write", [first, second], 31.0) is None  # the pause is over


def test_a_new_configuration_forgets_the_refusals_of_endpoints_taken_out() -> None:
    first, second = _endpoints(2)
    refusals = Refusals([first, second])
    refusals.remember(first, "no pg_hba.conf entry", now=0.0)
    refusals.remember(second, "no pg_hba.conf entry", now=0.0)
    (short,) = _endpoints(1, backoff_max=5.0)
    refusals.apply([second, short], kept={second, short})
    assert refusals.refused(1.0) == {second}
    refusals.apply([short], kept={short})
    refusals.remember(short, "no pg_hba.conf entry", now=0.0)
    assert refusals.blocks(short, 4.9) and not refusals.blocks(short, 5.0)  # its own pause


def test_after_a_setback_one_connect_tries_again_and_holds_the_others_off() -> None:
    """A setback's pause over: the first connect that asks may go, the others keep away
    while it runs (up to its bound); its verdict (another setback, a success) or its end
    without one (a server failure, cut short) decides what comes next."""
    (endpoint,) = _endpoints(1)
    refusals = Refusals([endpoint])
    refusals.set_back(endpoint, "configure hook failed (55P03)", now=0.0)
    assert not refusals.claim(endpoint, 0.4, hold=2.0)  # the setback's pause: 0.5 s
    assert refusals.claim(endpoint, 0.5, hold=2.0) and refusals.retrying(endpoint)
    assert not refusals.claim(endpoint, 0.6, hold=2.0) and refusals.blocks(endpoint, 2.4)
    refusals.set_back(endpoint, "configure hook failed (40P01)", now=1.0)  # its verdict
    assert not refusals.retrying(endpoint)  # a second setback in a row: 1 s
    assert refusals.blocks(endpoint, 1.9) and not refusals.blocks(endpoint, 2.0)
    refusals.settle(endpoint)  # (the verdict stands: settling lifts only a hold)
    assert refusals.blocks(endpoint, 1.9)
    assert refusals.claim(endpoint, 2.0, hold=2.0)
    refusals.settle(endpoint)  # ended without a verdict of the group's own
    assert refusals.claim(endpoint, 2.1, hold=2.0) and not refusals.blocks(endpoint, 2.1)
    assert refusals.error("g", [endpoint], 2.1) is None  # never "retrying cannot help"


def test_a_final_refusal_is_not_held_nor_lifted_by_a_claim() -> None:
    (endpoint,) = _endpoints(1)
    refusals = Refusals([endpoint])
    refusals.remember(endpoint, "password authentication failed", now=0.0)
    assert not refusals.claim(endpoint, 29.9, hold=2.0)
    assert refusals.claim(endpoint, 30.0, hold=2.0) and refusals.claim(endpoint, 30.0, hold=2.0)
    refusals.settle(endpoint)
    assert refusals.describe([endpoint]) == f"{endpoint.label}: password authentication failed"


def test_setbacks_in_a_row_double_the_pause_up_to_the_longest_and_a_success_starts_over(
) -> None:
    """A hook that fails for a passing reason each time is tried less and less often (0.5,
    1, 2, ... s, at most the endpoint's longest backoff); a connect that succeeds starts
    the count over; a setback never makes callers fail at once."""
    (endpoint,) = _endpoints(1, backoff_max=3.0)
    refusals = Refusals([endpoint])
    pauses = []
    for _ in range(5):
        refusals.set_back(endpoint, "lock timeout", now=0.0)
        pauses.append(refusals.until(endpoint))
    assert pauses == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert refusals.error("g", [endpoint], 0.0) is None
    refusals.forget(endpoint)
    refusals.set_back(endpoint, "lock timeout", now=10.0)
    assert refusals.until(endpoint) == 10.5


def test_failures_of_connects_begun_before_the_latest_setback_are_no_news() -> None:
    """Connects that began together (a burst of callers) and fail one after the other for
    the same held lock are one setback: the later ones neither double nor lengthen the
    pause, and their ends do not lift the hold of the one connect that tries again."""
    (endpoint,) = _endpoints(1)
    refusals = Refusals([endpoint])
    for failed_at in (0.10, 0.11, 0.12):  # three connects, all begun at 0.0
        refusals.set_back(endpoint, "lock timeout", now=failed_at, began=0.0)
    assert refusals.until(endpoint) == pytest.approx(0.6)  # the first backoff, once
    assert refusals.claim(endpoint, 0.6, hold=2.0)  # the one that tries again
    refusals.set_back(endpoint, "lock timeout", now=0.65, began=0.05)  # a slow one of the burst
    refusals.settle(endpoint, claimed=0.3)  # another connect's end
    assert refusals.retrying(endpoint) and refusals.blocks(endpoint, 2.5)
    refusals.set_back(endpoint, "lock timeout", now=0.7, began=0.6)  # the retry's verdict
    assert refusals.until(endpoint) == pytest.approx(1.7)  # a setback in a row: 1 s
