"""pytest fixtures over :mod:`greenpool.testing.postgres`: ``pg`` and ``pg_factory``.

Opt in from your ``conftest.py``, after any monkey-patching::

    pytest_plugins = ["greenpool.testing.fixtures"]

or for one run with ``pytest -p greenpool.testing.fixtures``. A fixture of the same name in
your own ``conftest.py`` wins over these.

Why opt-in and not a ``pytest11`` entry point: an entry point loads in every pytest session of
every environment where greenpool is installed, including applications that never asked for
PostgreSQL servers; it would claim the fixture names ``pg`` and ``pg_factory`` there, and
import ``subprocess`` and ``socket`` users before a ``conftest.py`` could monkey-patch (gevent
and eventlet must patch first). greenpool's own tests opt in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from greenpool.testing.postgres import Cluster

__all__ = ["pg", "pg_factory"]


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """One started throwaway cluster shared by the whole session; do not stop it in tests."""
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_factory() -> Iterator[Callable[..., Cluster]]:
    """``make(start=True, standby_of=None, **Cluster_kwargs)``: extra clusters, gone after the test.

    Use these for anything destructive (stop, restart, promote); ``standby_of=primary``
    returns a started streaming standby of ``primary``.
    """
    made: list[Cluster] = []

    def make(start: bool = True, standby_of: Cluster | None = None, **kw: Any) -> Cluster:
        if standby_of is not None:
            cluster = standby_of.make_standby(**kw)
            made.append(cluster)
            return cluster
        cluster = Cluster(**kw)
        made.append(cluster)
        cluster.init()
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in reversed(made):
        cluster.destroy()
