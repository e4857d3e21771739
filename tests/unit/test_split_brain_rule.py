"""The split-brain rule as pure data: pools that saw the same primaries in any order choose
the same one (the rule fed from real servers: test_split_brain.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from greenpool.config import EndpointConfig
from greenpool.endpoint import PRIMARY, Endpoint
from greenpool.roles import candidates


def chosen(endpoints: list[Endpoint]) -> Endpoint:
    return candidates(endpoints, "primary", None, "use-primary")[0][0]


_state = st.tuples(st.integers(1, 3), st.integers(0, 2))  # (timeline, WAL position)


@settings(max_examples=200, deadline=None)
@given(st.lists(_state, min_size=2, max_size=4), st.randoms(use_true_random=False))
def test_every_process_chooses_alike_whatever_it_saw_first(states, rnd) -> None:
    """Pools that saw the same primaries in different orders (each at least twice, as
    housekeeping does) choose the same one: highest timeline, then WAL position, then the
    first configured."""
    picks = []
    for _ in range(3):
        eps = [Endpoint(EndpointConfig(host=f"10.0.0.{i}"), 0.5, 30.0)
               for i in range(len(states))]
        sightings = [i for i in range(len(states)) for _ in range(2)]
        rnd.shuffle(sightings)
        sightings += range(len(states))  # a full round last: everyone answered since
        for i in sightings:
            eps[i].observe_role(PRIMARY, *states[i])
            chosen(eps)
        picks.append(eps.index(chosen(eps)))
    best = max(range(len(states)), key=lambda i: (*states[i], -i))
    assert picks == [best] * 3

