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
