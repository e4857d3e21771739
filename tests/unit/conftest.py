"""tests/unit: the tests that need no server, run in seconds (``pytest tests/unit``).

tests/conftest.py still runs first (it picks the mode and monkey-patches before anything
else is imported); here, a test that asks for a server fails at once, naming the reason,
instead of quietly starting one: the fixtures that start servers are replaced, and a
throwaway cluster refuses to initialise or start.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from greenpool.testing.postgres import Cluster

NO_SERVER = "tests/unit runs without a server: a test that needs one belongs in tests/"


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(NO_SERVER)


@pytest.fixture(scope="session", autouse=True)
def no_cluster_starts() -> Iterator[None]:
    """Cluster.init/start refuse for the whole unit session (session-scoped: hypothesis
    refuses function-scoped fixtures around its examples)."""
    saved = Cluster.init, Cluster.start
    Cluster.init, Cluster.start = _refuse, _refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        Cluster.init, Cluster.start = saved  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def pg() -> Any:
    raise RuntimeError(NO_SERVER)


@pytest.fixture
def pg_factory() -> Any:
    raise RuntimeError(NO_SERVER)


@pytest.fixture
def make_pool() -> Any:
    raise RuntimeError(NO_SERVER)


@pytest.fixture
def server_conns() -> Any:
    raise RuntimeError(NO_SERVER)
