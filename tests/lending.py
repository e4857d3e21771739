"""Helpers that ask a group for everything it should be able to lend, at once.

A slot lost by the pool's bookkeeping shows only when every slot is needed together: one
borrow at a time keeps working on a group that has silently shrunk. These helpers hold all
``connection_count`` connections at the same time and use each one.
"""

from __future__ import annotations

import time
from typing import Any


def group_stats(pool: Any, name: str) -> dict[str, Any]:
    return pool.stats()["groups"][name]  # type: ignore[no-any-return]


def discards(pool: Any, name: str, reason: str | None = None) -> int:
    """How many connections the group discarded (for ``reason``, or for any reason)."""
    stats = group_stats(pool, name)
    if reason is None:
        return int(stats["discards"])
    return int(stats["discards_by_reason"].get(reason, 0))


def lend_all(pool: Any, name: str, count: int, within: float) -> list[int]:
    """Hold ``count`` connections of group ``name`` at the same time, each taken within what
    is left of ``within`` seconds, run ``SELECT 1`` on each, give them all back; the backend
    pid of each. Raises the pool's error (with the group's stats) when one cannot be had."""
    group = pool.group(name)
    deadline = time.monotonic() + within
    held: list[Any] = []
    try:
        for _ in range(count):
            try:
                held.append(group.acquire(timeout=max(0.0, deadline - time.monotonic())))
            except Exception as exc:
                raise AssertionError(
                    f"group {name!r} lent only {len(held)} of {count} connections at once: "
                    f"{type(exc).__name__}: {exc}; stats {group_stats(pool, name)}"
                ) from exc
        pids = []
        for pc in held:
            with pc.raw.cursor() as cursor:
                cursor.execute("SELECT 1, pg_backend_pid()")
                one, pid = cursor.fetchone()
                assert one == 1
                pids.append(int(pid))
        return pids
    finally:
        for pc in held:
            group.release(pc)
