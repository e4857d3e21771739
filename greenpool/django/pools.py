"""From ``settings.DATABASES`` to greenpool pools: one group per alias, one pool per database.

Every alias whose ENGINE is ``greenpool.django`` and that names the same database (NAME,
USER, PASSWORD, time zone, endpoint settings, pool-level settings) shares one
:class:`~greenpool.Pool`; each alias is a group of it, named after the alias. Sharing a pool
is what lets the groups share what the pool learns about its servers: a server found dead by
the ``default`` group's request evicts the ``replica`` group's idle connections to it too,
and one role probe serves both.

``OPTIONS`` of an alias (everything optional)::

    'OPTIONS': {
        'connection_count': 10,        # or MAX_CONNS (django-db-geventpool's name)
        'timeout': 5,                  # acquire timeout: PoolTimeout after it
        'role': 'primary',             # any greenpool group key
        'servers': ['10.0.0.1:5432', {'host': '10.0.0.2', 'port': 5432, 'weight': 2}],
        'connect_timeout': 3,          # endpoint keys apply to every server ...
        'sslmode': 'require',          # ... and so do other libpq parameters
        'greenpool': {'type': 'gevent', 'role_check_interval': 1},   # pool-level keys
    }

Pools are made on first use in each process (after gunicorn forked the worker and gevent
patched it), never at import time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .. import config as greenpool_config
from ..config import ConfigError, EndpointConfig
from ..group import Group
from ..pool import Pool

logger = logging.getLogger("greenpool.django")

ENGINE = "greenpool.django"
#: Group keys an alias may set in OPTIONS. ``autocommit`` follows Django's AUTOCOMMIT,
#: ``row_factory`` must stay tuples (Django reads rows by index), ``endpoints`` comes from
#: ``servers``, and ``on_return`` is a Python hook Django settings have no use for.
_NOT_IN_OPTIONS = frozenset({"autocommit", "row_factory", "endpoints"})
GROUP_KEYS = frozenset(greenpool_config.GROUP_KEYS) - _NOT_IN_OPTIONS
#: Endpoint keys an alias may set in OPTIONS; they apply to each of its servers. Those of
#: the settings that DATABASES and ``servers`` give are not.
ENDPOINT_KEYS = frozenset(
    key for key, found in greenpool_config.ENDPOINT_KEYS.items()
    if found.field not in ("host", "port", "dbname", "user", "password", "weight"))
#: Keys of the ``'greenpool'`` dict: settings of the whole pool.
POOL_KEYS = frozenset(key for key, found in greenpool_config.TOP_KEYS.items()
                      if found.field not in ("endpoints", "groups", "on_event"))
#: OPTIONS that Django's postgresql backend reads itself.
DJANGO_KEYS = frozenset({"isolation_level", "assume_role"})

_pools: dict[tuple[Any, ...], Pool] = {}
#: (alias, id(settings_dict), NAME, time zone) -> its group and pool (see group_for)
_cached: dict[tuple[Any, ...], tuple[Group, Pool]] = {}
_lock = threading.Lock()  # cooperative once gevent patched threading; no I/O under it


def split_options(alias: str, settings_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The alias's OPTIONS sorted into ``group``, ``endpoint``, ``libpq``, ``pool`` and
    ``servers``; a key that fits nowhere raises ImproperlyConfigured naming it."""
    options = dict(settings_dict.get("OPTIONS") or {})
    where = f"DATABASES[{alias!r}]['OPTIONS']"
    if "pool" in options:
        raise ImproperlyConfigured(
            f"{where}['pool']: that is Django's own psycopg 3 pool; with ENGINE {ENGINE!r} "
            f"greenpool is the pool. Remove 'pool' (size it with 'connection_count')"
        )
    group: dict[str, Any] = {}
    endpoint: dict[str, Any] = {}
    libpq: dict[str, Any] = {}
    pool = options.pop("greenpool", None) or {}
    if not isinstance(pool, Mapping):
        raise ImproperlyConfigured(f"{where}['greenpool']: must be a dict of pool settings "
                                   f"({', '.join(sorted(POOL_KEYS))})")
    unknown = sorted(set(pool) - POOL_KEYS)
    if unknown:
        raise ImproperlyConfigured(f"{where}['greenpool']: unknown key {unknown[0]!r}; "
                                   f"allowed: {', '.join(sorted(POOL_KEYS))}")
    servers = options.pop("servers", None)
    if "MAX_CONNS" in options:  # django-db-geventpool's name
        if "connection_count" in options:
            raise ImproperlyConfigured(f"{where}: give MAX_CONNS or connection_count, not both")
        options["connection_count"] = options.pop("MAX_CONNS")
    if "REUSE_CONNS" in options:
        options.pop("REUSE_CONNS")
        logger.info("%s['REUSE_CONNS'] is ignored: greenpool keeps idle connections until "
                    "max_idle, and min_size of them always", where)
    for key, value in options.items():
        if key in GROUP_KEYS:
            group[key] = value
        elif key in ENDPOINT_KEYS:
            endpoint[key] = value
        elif key in DJANGO_KEYS:
            continue
        elif key in _NOT_IN_OPTIONS:
            raise ImproperlyConfigured(
                f"{where}[{key!r}]: not settable here (autocommit follows AUTOCOMMIT, rows are "
                f"tuples for Django, a group's servers are 'servers')"
            )
        else:
            libpq[key] = value  # greenpool's config asks libpq whether it knows the name
    return {"group": group, "endpoint": endpoint, "libpq": libpq, "pool": dict(pool),
            "servers": servers}


def _servers(alias: str, settings_dict: Mapping[str, Any], servers: Any) -> list[dict[str, Any]]:
    where = f"DATABASES[{alias!r}]['OPTIONS']['servers']"
    if servers is None:
        host = settings_dict.get("HOST") or "localhost"
        port = settings_dict.get("PORT") or EndpointConfig.port
        return [{"host": host, "port": int(port)}]
    if isinstance(servers, (str, Mapping)) or not servers:
        raise ImproperlyConfigured(f"{where}: a non-empty list of 'host:port' strings or "
                                   f"dicts with host, port and weight")
    found = []
    for item in servers:
        if isinstance(item, str):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit():
                raise ImproperlyConfigured(f"{where}: {item!r} is not 'host:port'")
            found.append({"host": host, "port": int(port)})
        elif isinstance(item, Mapping) and set(item) <= {"host", "port", "weight"}:
            found.append(dict(item))
        else:
            raise ImproperlyConfigured(f"{where}: {item!r} is not 'host:port' or a dict of "
                                       f"host, port and weight")
    return found


_KEY = ("NAME", "USER", "PASSWORD", "time zone", "endpoint", "libpq", "pool")


def _database_key(settings_dict: Mapping[str, Any], parts: Mapping[str, Any],
                  time_zone: str | None) -> tuple[Any, ...]:
    """What must be equal for two aliases to share a pool (the servers may differ)."""
    return (
        settings_dict.get("NAME"), settings_dict.get("USER") or None,
        settings_dict.get("PASSWORD") or None, time_zone,
        _frozen(parts["endpoint"]), _frozen(parts["libpq"]), _frozen(parts["pool"]),
    )


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def group_for(alias: str, settings_dict: Mapping[str, Any], time_zone: str | None) -> Group:
    """The greenpool group of ``alias``, making its pool on first use in this process.
    Asked on every loan: the answer is cached until the alias's NAME changes or its pool
    is closed."""
    if _forked[0]:
        _drop_misfits_after_fork()
    cache_key = (alias, id(settings_dict), settings_dict.get("NAME"), time_zone)
    cached = _cached.get(cache_key)
    if cached is not None and not cached[1].closed:
        return cached[0]
    parts = split_options(alias, settings_dict)
    key = _database_key(settings_dict, parts, time_zone)
    pool = _pool(key, alias, settings_dict, time_zone, alone=False)
    try:
        group = pool.group(alias)
    except ConfigError:
        # the alias came to name this database after its pool was made (Django's test
        # runner points mirror aliases at the test database): a pool of its own
        pool = _pool((*key, alias), alias, settings_dict, time_zone, alone=True)
        group = pool.group(alias)
    _cached[cache_key] = (group, pool)
    return group


def _pool(key: tuple[Any, ...], alias: str, settings_dict: Mapping[str, Any],
          time_zone: str | None, alone: bool) -> Pool:
    pool = _pools.get(key)
    if pool is None or pool.closed:
        with _lock:
            pool = _pools.get(key)
            if pool is None or pool.closed:
                pool = _pools[key] = _make_pool(alias, settings_dict, key[:len(_KEY)],
                                                time_zone, alone)
    return pool


def _make_pool(alias: str, settings_dict: Mapping[str, Any], key: tuple[Any, ...],
               time_zone: str | None, alone: bool) -> Pool:
    from django.db import connections

    members = {alias: settings_dict}
    for other, other_dict in () if alone else connections.settings.items():
        if other != alias and other_dict.get("ENGINE") == ENGINE:
            try:
                other_parts = split_options(other, other_dict)
            except ImproperlyConfigured:
                continue  # reported when that alias is used
            if _database_key(other_dict, other_parts, time_zone) == key:
                members[other] = other_dict
    db: list[dict[str, Any]] = []
    labels: dict[tuple[str, int], int] = {}
    groups: dict[str, Any] = {}
    pool_keys: dict[str, Any] = {}
    for name, member in members.items():
        parts = split_options(name, member)
        pool_keys = parts["pool"]
        indices = []
        for server in _servers(name, member, parts["servers"]):
            at = (str(server["host"]), int(server.get("port", EndpointConfig.port)))
            if labels.get(at) in indices:
                raise ImproperlyConfigured(f"DATABASES[{name!r}]['OPTIONS']['servers']: "
                                           f"{at[0]}:{at[1]} is listed twice")
            if at not in labels:
                labels[at] = len(db)
                options = dict(parts["libpq"])
                if time_zone and parts["endpoint"].get("pooler") in (None, "none"):
                    # Django then finds it set and sends no SET TIME ZONE per loan
                    extra = f"-c TimeZone={time_zone}"
                    options["options"] = f"{options['options']} {extra}" if "options" in \
                        options else extra
                db.append({
                    **parts["endpoint"], "host": at[0], "port": at[1],
                    "name": member.get("NAME") or EndpointConfig.dbname,
                    "user": member.get("USER") or None,
                    "pass": member.get("PASSWORD") or None, "options": options,
                    **({"weight": server["weight"]} if "weight" in server else {}),
                })
            indices.append(labels[at])
        groups[name] = {**parts["group"], "autocommit": bool(member.get("AUTOCOMMIT", True)),
                        "endpoints": indices}
        if time_zone and parts["endpoint"].get("pooler") in ("session", "transaction"):
            groups[name]["configure"] = _time_zone_hook(time_zone, parts["group"].get("configure"))
    config = {"application_name": "greenpool-django", "type": _detected_mode(), **pool_keys,
              "db": db, "groups": groups}
    try:
        return Pool(config)
    except ConfigError as exc:
        raise ImproperlyConfigured(f"DATABASES[{alias!r}]: {exc}") from exc


def _time_zone_hook(time_zone: str, then: Any) -> Any:
    """Django's time zone for a connection that may be behind a pooler, as the group's
    ``configure`` hook (run when a connection opens and after each ``DISCARD ALL``): a
    pooler refuses ``-c TimeZone`` in ``options``. PgBouncer keeps ``TimeZone`` per client
    and sets it on whichever server connection the client's transaction gets (measured
    with 1.18: two clients on one server connection each read their own), so a ``SET TIME
    ZONE`` made once by this client holds on every transaction, in either pool mode, and
    leaves nothing to another client. Where the server's own zone is already Django's
    (``ALTER DATABASE ... SET TimeZone``), nothing is sent. Django checks the zone the
    server reports at each loan and sets it again should it differ. Without the ``pooler``
    key the zone travels in the startup packet, as directly (no round trip)."""

    def set_time_zone(raw: Any) -> None:
        if raw.info.parameter_status("TimeZone") != time_zone:
            with raw.cursor() as cursor:
                cursor.execute("SELECT pg_catalog.set_config('TimeZone', %s, false)",
                               (time_zone,))
        if then is not None:
            then(raw)

    return set_time_zone


def _detected_mode() -> str:
    """The mode that fits this process when OPTIONS['greenpool'] names none: gevent under
    gunicorn's gevent worker (or any gevent-patched process), threaded for ``manage.py``
    commands and threaded servers, which never patch."""
    from .loans import green_mode

    return green_mode() or "threaded"


#: set in a child process by os.fork(); checked (and cleared) by the next group_for
_forked = [False]


def _note_fork() -> None:
    _forked[0] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_note_fork)


def _drop_misfits_after_fork() -> None:
    """Forget pools inherited through a fork that no longer fit this process's mode.

    A query in gunicorn's master before it forks (``--preload`` with an app that touches
    the database while loading) makes a *threaded* pool there; the gevent worker patches
    after the fork and would inherit it: its real locks and threads then block the whole
    hub, and the worker hangs. Such a pool is dropped, not closed (greenpool already pointed
    the parent's connections at /dev/null in the child, and closing one that was mid-query
    could hang); the next use makes a pool in the right mode (or, if ``OPTIONS['greenpool']
    ['type']`` names one that does not fit, fails with a clear error)."""
    _forked[0] = False
    mode = _detected_mode()
    with _lock:
        for key, pool in list(_pools.items()):
            if pool.config.mode != mode:
                del _pools[key]
                logger.info("greenpool.django: the pool inherited through fork was made "
                            "for %s mode; this process runs %s: a new pool is made",
                            pool.config.mode, mode)
        for cache_key, (_, pool) in list(_cached.items()):
            if pool.config.mode != mode:
                del _cached[cache_key]


def close_all() -> None:
    """Close every pool this process made (gunicorn's ``worker_exit``, tests); the next use
    makes them again from the settings of that moment."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
        _cached.clear()
    for pool in pools:
        pool.close()


def pools(make: bool = False) -> dict[str, Pool]:
    """This process's open pools, each named by the aliases it serves (its groups, sorted,
    joined by ``+``: the same name in every worker): the handle to export them::

        for name, pool in pools(make=True).items():
            greenpool.prometheus.register(pool, name=name)   # or greenpool.otel.instrument

    Pools are made on first use; ``make=True`` makes them now for every alias whose ENGINE
    is greenpool's (in a worker at startup, e.g. gunicorn's ``post_worker_init``, so they are
    exported before the first request). A pool closed by :func:`close_all` is not in the
    answer; the one made after it must be exported again."""
    if make:
        from django.db import connections

        for alias in connections:
            connection = connections[alias]
            if connection.settings_dict.get("ENGINE") == ENGINE:
                group_for(alias, connection.settings_dict, connection.timezone_name)
    found: dict[str, Pool] = {}
    for pool in list(_pools.values()):
        if not pool.closed:
            name = base = "+".join(sorted(pool.config.groups))
            n = 1
            while name in found:  # a mirror alias's pool of its own (Django's test runner)
                n += 1
                name = f"{base}#{n}"
            found[name] = pool
    return found


def stats() -> dict[str, Any]:
    """``Pool.stats()`` of each live pool, merged: groups are named by alias."""
    merged: dict[str, Any] = {"groups": {}, "endpoints": {}}
    for pool in list(_pools.values()):
        if not pool.closed:
            found = pool.stats()
            merged["groups"].update(found["groups"])
            merged["endpoints"].update(found["endpoints"])
    return merged
