"""What the server shows of a pool's sessions, by application_name, and a group's stats:
for the tests of listeners and exclusive connections."""

from __future__ import annotations

from typing import Any


def sessions(cluster: Any, app: str) -> int:
    """Client sessions of ``app`` on ``cluster``."""
    return int(cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,))[0][0])


def listening_sessions(cluster: Any, app: str) -> int:
    """Sessions of ``app`` on ``cluster`` whose last statement was a LISTEN."""
    return int(cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND query LIKE 'LISTEN %%'", (app,))[0][0])


def group_stats(pool: Any, name: str = "g") -> dict[str, Any]:
    return pool.stats()["groups"][name]  # type: ignore[no-any-return]
