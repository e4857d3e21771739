"""pgdbpool's API on greenpool: switch by changing one import line.

Both of pgdbpool's import forms work::

    import greenpool.compat.pgdbpool as dbpool             # was: import pgdbpool as dbpool
    from greenpool.compat.pgdbpool import pool as dbpool   # was: from pgdbpool import pool ...

See :mod:`greenpool.compat.pgdbpool.pool` and docs/migrating.md for what differs and why.
The API is imported on first use, not with this package: greenpool's configuration reads
pgdbpool's key names from :mod:`.dialect` while greenpool itself is being imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import pool
    from .pool import (
        Connection,
        DBConnectionError,
        DBOfflineError,
        DBQueryError,
        Handler,
        UnconfiguredGroupError,
    )

__all__ = [
    "Connection",
    "DBConnectionError",
    "DBOfflineError",
    "DBQueryError",
    "Handler",
    "UnconfiguredGroupError",
    "pool",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.pool")
    return module if name == "pool" else getattr(module, name)
