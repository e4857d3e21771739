"""Moved to :mod:`greenpool.testing.postgres`; this name stays for one release.

The 0.1.0 previews announced ``greenpool.throwaway`` to users (CHANGELOG), so their test
suites may import it: they get the same objects and a ``DeprecationWarning`` naming the new
module. Nothing in greenpool imports it.
"""

from __future__ import annotations

import warnings

from greenpool.testing.postgres import (
    Cluster,
    ClusterError,
    PostgresNotFound,
    destroy_all,
    find_pg_bin,
    free_port,
)

__all__ = ["Cluster", "ClusterError", "PostgresNotFound", "destroy_all", "find_pg_bin",
           "free_port"]

warnings.warn("greenpool.throwaway moved to greenpool.testing.postgres", DeprecationWarning,
              stacklevel=2)
