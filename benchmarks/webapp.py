"""The example app (examples/gunicorn/app.py) on a peer pool, for the gunicorn workload.

gunicorn loads ``benchmarks.webapp:application`` with examples/gunicorn/gunicorn.conf.py,
whose ``pythonpath`` makes ``app`` importable. Only the app's module-level name
``greenpool`` is replaced, by :class:`PeerPools`: its ``handler()``, ``init()``,
``get_pool()``, ``close()`` and ``stats()`` are backed by a peer adapter per group (see
:mod:`benchmarks.adapters`); every other attribute (the exception classes, ``parse_config``)
is greenpool's own. So the routes, the error-to-status mapping and the pool's life cycle
(``open_pool()`` in ``post_worker_init``, ``close_pool()`` in ``worker_exit``) run as they
do on greenpool, and the comparison measures the pools, not two different apps.

The peer is named by the environment variable ``GREENPOOL_BENCH_PEER``; where to connect,
the group sizes and autocommit come from the app's own ``GREENPOOL_CONFIG``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import app as example  # examples/gunicorn/app.py, via gunicorn.conf.py's pythonpath
import greenpool

from .adapters import ADAPTERS, Adapter, Target
from .web import PEER_ENV


class PeerDb:
    """The part of greenpool's handler that the app's routes call: ``query`` (rows, or the
    row count of a statement that returns none) and ``query_one`` (first row or None)."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def query(self, sql: str, params: Any = None) -> list[Any] | int:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description is not None else cur.rowcount

    def query_one(self, sql: str, params: Any = None) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()


class PeerPools:
    """Stands in for the ``greenpool`` module inside the app: one adapter per group."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.groups: dict[str, Adapter] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(greenpool, name)  # exceptions, parse_config: unchanged

    def init(self, config: Any) -> PeerPools:
        """Open the adapters; the app calls it after gevent patched (post_worker_init)."""
        cls = ADAPTERS[self.peer]
        if cls.psycopg2_based:  # greenpool does this itself; the peers need it done for them
            from psycogreen.gevent import patch_psycopg

            patch_psycopg()
        raw = json.loads(os.environ["GREENPOOL_CONFIG"])
        target = _target(raw)
        self.groups = {
            name: cls(target, int(group.get("connection_count", 10)),
                      autocommit=bool(group.get("autocommit", False)))
            for name, group in raw.get("groups", example.DEFAULT_GROUPS).items()
        }
        return self

    def get_pool(self) -> PeerPools:
        if self.groups is None:
            raise greenpool.PoolError("not initialised")  # what open_pool() expects
        return self

    def close(self) -> None:
        groups, self.groups = self.groups, None
        for adapter in (groups or {}).values():
            adapter.close()

    @contextlib.contextmanager
    def handler(self, group: str, timeout: float | None = None) -> Iterator[PeerDb]:
        """The adapter's session (commit on clean exit, rollback on exception). The peers
        have no per-call acquire timeout, so ``timeout`` (used by /health) is ignored."""
        with self.get_pool().groups[group].session() as rows:  # type: ignore[index]
            yield PeerDb(rows.conn)

    def stats(self) -> dict[str, Any]:
        groups = self.groups or {}
        return {"peer": ADAPTERS[self.peer].name,
                "groups": {name: {"size": a.size, "getconn_retries": a.retries}
                           for name, a in groups.items()}}


def _target(raw: dict[str, Any]) -> Target:
    """The benchmark's endpoint, given in GREENPOOL_CONFIG as one pgdbpool-style dict."""
    db = raw["db"]
    return Target([(db["host"], int(db["port"]))], db["user"], db["pass"], db["name"],
                  raw.get("application_name", example.DEFAULT_APPLICATION_NAME))


example.greenpool = PeerPools(os.environ[PEER_ENV])
application = example.application  # its __module__ stays "app": the config's hooks find it
