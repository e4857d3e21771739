"""How long a group's connect task pauses between rounds when no endpoint may take an
attempt (pure logic over endpoint states: no server involved)."""

from __future__ import annotations

import time

import pytest

from greenpool.concurrency.thread_backends import SingleBackend
from greenpool.config import EndpointConfig, GroupConfig
from greenpool.connector import Connector
from greenpool.endpoint import QUARANTINED, Endpoint
from greenpool.stats import GroupCounters

pytestmark = pytest.mark.timeout(10)


def test_a_set_back_endpoint_whose_quarantine_ended_is_waited_for_not_polled() -> None:
    """The group's setback on the endpoint outlasts its quarantine (which ended with no
    probe yet: nothing else connects there). The round skips it until the setback ends, so
    the pause lasts that long, instead of a new round every millisecond meanwhile."""
    endpoint = Endpoint(EndpointConfig(host="127.0.0.1"), 0.5, 30)
    connector = Connector(GroupConfig(name="g"), [endpoint], SingleBackend(), "app",
                          GroupCounters())
    now = time.monotonic()
    connector.refusals.set_back(endpoint, "configure hook failed (55P03)", now)
    endpoint.state, endpoint.quarantined_until = QUARANTINED, now - 0.1
    assert connector._next_chance() > 0.4
    endpoint.quarantined_until = now + 2  # a quarantine that outlasts the setback
    assert connector._next_chance() > 1.9


def test_a_server_that_said_it_is_full_is_waited_for_not_polled() -> None:
    """A full server (``too many clients``) is left alone by connects for a jittered pause;
    the connect task sleeps that long instead of looking every 20 ms meanwhile."""
    endpoint = Endpoint(EndpointConfig(host="127.0.0.1"), 0.5, 30)
    connector = Connector(GroupConfig(name="g"), [endpoint], SingleBackend(), "app",
                          GroupCounters())
    assert connector._next_chance() == pytest.approx(0.02)  # nothing to wait for
    endpoint.full_until = time.monotonic() + 0.2
    assert connector._next_chance() > 0.15
