"""pgdbpool's API on greenpool: switch by changing one import line.

Both of pgdbpool's import forms work::

    import greenpool.compat.pgdbpool as dbpool             # was: import pgdbpool as dbpool
    from greenpool.compat.pgdbpool import pool as dbpool   # was: from pgdbpool import pool ...

See :mod:`greenpool.compat.pgdbpool.pool` and docs/migrating.md for what differs and why.
"""

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
