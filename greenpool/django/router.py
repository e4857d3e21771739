"""Reads to the replica alias, writes (and migrations) to ``default``.

Settings (both optional)::

    DATABASE_ROUTERS = ['greenpool.django.router.PrimaryReplicaRouter']
    GREENPOOL_WRITE_DATABASE = 'default'
    GREENPOOL_READ_DATABASE = 'replica'

A request reads its own writes: once a greenlet (or thread) wrote through the write alias,
or while it is inside an atomic block there, its reads go to the write alias too, until
Django gives that connection back (the end of the request). Replication lag then never
shows a request an older state than the one it just wrote.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connections


def _write_alias() -> str:
    return str(getattr(settings, "GREENPOOL_WRITE_DATABASE", "default"))


def _read_alias() -> str:
    return str(getattr(settings, "GREENPOOL_READ_DATABASE", "replica"))


class PrimaryReplicaRouter:
    """Django database router for a greenpool ``write`` alias and ``read`` alias."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        write = _write_alias()
        connection = connections[write]
        if connection.in_atomic_block or getattr(connection, "greenpool_wrote", False):
            return write
        return _read_alias()

    def db_for_write(self, model: Any, **hints: Any) -> str:
        write = _write_alias()
        connections[write].greenpool_wrote = True
        return write

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True  # both aliases are the same database

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return db == _write_alias()  # a replica is migrated by replication
