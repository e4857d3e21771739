"""Helpers for tests with several endpoints: how the pool names a throwaway cluster, its
stats, and where a group's connections land."""

from __future__ import annotations

from typing import Any


def label(cluster: Any) -> str:
    """How the pool names a throwaway cluster's endpoint in stats and errors."""
    return f"{cluster.host}:{cluster.port}/{cluster.dbname}"


def endpoint_stats(pool: Any, cluster: Any) -> dict[str, Any]:
    return pool.stats()["endpoints"][label(cluster)]  # type: ignore[no-any-return]


def held_ports(pool: Any, group_name: str, n: int) -> list[int]:
    """Hold ``n`` connections of a group at once; the server port of each."""
    group = pool.group(group_name)
    held = [group.acquire() for _ in range(n)]
    try:
        ports = []
        for pc in held:
            with pc.raw.cursor() as cursor:
                cursor.execute("SELECT inet_server_port()")
                ports.append(cursor.fetchone()[0])
        return ports
    finally:
        for pc in held:
            group.release(pc)
