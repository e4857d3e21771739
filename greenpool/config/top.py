"""The whole configuration: the top-level keys, declared once each, and :func:`parse_config`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..compat.pgdbpool import dialect as pgdbpool
from . import checks, environ
from .checks import DAY, fail, short
from .declare import (
    Custom,
    Hook,
    OneOf,
    Seconds,
    Setting,
    Text,
    declared,
    key_table,
    read,
    setting,
)
from .endpoint import MIN_RETRY_SLEEP, EndpointConfig, parse_endpoint
from .group import KEYS as GROUP_KEYS
from .group import GroupConfig, parse_group

MODES = ("auto", "gevent", "eventlet", "threaded", "non-threaded")
#: the group a configuration without ``groups`` has
DEFAULT_GROUP = "default"


def _endpoints(path: str, db: Any) -> tuple[EndpointConfig, ...]:
    entries = db if isinstance(db, (list, tuple)) else [db]
    if not entries:
        raise fail(path, "the list of endpoints is empty")
    endpoints = tuple(parse_endpoint(f"{path}[{i}]", entry) for i, entry in enumerate(entries))
    seen: dict[str, int] = {}
    for i, ep in enumerate(endpoints):
        if ep.label in seen:  # stats, errors and group subsets name endpoints by label
            raise fail(f"{path}[{i}]", f"{ep.label} is already {path}[{seen[ep.label]}]; "
                                       "list each server and database once")
        seen[ep.label] = i
    return endpoints


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """The whole validated configuration."""

    mode: str = setting("auto", check=OneOf(MODES), own_key=False, doc=(
        "concurrency mode; `auto` picks the one the process runs on at `Pool()`"))
    endpoints: tuple[EndpointConfig, ...] = setting(
        check=Custom(_endpoints, "see Endpoint keys"), own_key=False,
        default_text="(required, unless `PGHOST` is set)", doc=(
            "the servers: one endpoint or a list (dicts, or libpq DSN / `postgresql://` "
            "strings, or dicts with `dsn` plus overrides)"))
    groups: Mapping[str, GroupConfig] = setting(
        check=Custom(checks.mapping, "dict of group name to group keys"),
        default_text=f'`{{"{DEFAULT_GROUP}": {{}}}}`', doc="named groups of connections")
    application_name: str = setting("greenpool", check=Text(),
                                    doc="`application_name` of every session")
    maintenance_interval: float = setting(1.0, check=Seconds(0.01, 3600.0),
                                          doc="seconds between housekeeping rounds")
    quarantine_initial: float = setting(
        0.5, check=Seconds(MIN_RETRY_SLEEP, 3600.0, note=", and at most `quarantine_max`"),
        doc=("first quarantine of a failed endpoint, in seconds (an endpoint's "
             "`connection_retry_sleep` overrides it)"))
    quarantine_max: float = setting(
        30.0, check=Seconds(MIN_RETRY_SLEEP, DAY, note=", and at least `quarantine_initial`"),
        doc=("longest quarantine; each failed probe doubles the ceiling, never beyond a "
             "quarter of how long the endpoint has been down"))
    role_check_interval: float = setting(2.0, check=Seconds(0.01, 3600.0), doc=(
        "seconds between probes of role and replay lag (only when a group has a `role`)"))
    startup_timeout: float = setting(0.0, check=Seconds(0.0, 3600.0), doc=(
        "`Pool()` waits this long for every group to get one connection; no live endpoint "
        "at all raises `NoHealthyEndpoint`"))
    on_event: Callable[[Any], object] | None = setting(
        None, check=Hook(taking="a greenpool.events.PoolEvent", allowed="a function, or `None`"),
        default_text="none",
        doc="called with each `greenpool.events.PoolEvent` (endpoint and group state changes)")


#: The top-level key that sets no field of its own: its values land in each GroupConfig.
TOP_ONLY_KEYS = {"defaults": Setting(
    check=Custom(checks.mapping, "dict of group keys"), default_text="`{}`",
    doc="group keys applied to every group; a group's own keys win")}
#: every top-level key that sets a field: greenpool's, then pgdbpool's
KEYS = key_table(PoolConfig, pgdbpool.TOP_KEYS)
#: the top-level keys parse_config accepts
ACCEPTED = frozenset({*KEYS, *TOP_ONLY_KEYS})


def _groups(top: Mapping[str, Any], endpoints: tuple[EndpointConfig, ...]) -> dict:
    defaults = checks.mapping("defaults", top.get("defaults", {}))
    checks.reject_unknown("defaults", defaults, GROUP_KEYS)
    groups_raw = checks.mapping("groups", top.get("groups", {DEFAULT_GROUP: {}}))
    if not groups_raw:
        raise fail("groups", "no group configured")
    groups = {}
    for name, spec in groups_raw.items():
        if not isinstance(name, str) or not name:
            raise fail(f"groups.{short.repr(name)}", "a group's name must be a non-empty string")
        groups[name] = parse_group(name, spec, defaults, endpoints)
    return groups


def _key_of(name: str) -> str:
    """The key that sets field ``name`` (``db`` for ``endpoints``), for errors about it."""
    return next(key for key, found in KEYS.items() if found.field == name)


def _in_declared_order(top: Mapping[str, Any]) -> dict[str, Any]:
    """The given keys that set a field, in the order of the fields: errors come in the same
    order whatever the order of the dict."""
    order = {name: i for i, name in enumerate(declared(PoolConfig))}
    return dict(sorted(((k, v) for k, v in top.items() if k in KEYS),
                       key=lambda item: order[KEYS[item[0]].field]))


def parse_config(raw: Any) -> PoolConfig:
    """Validate a pgdbpool-style dictionary; raise :class:`ConfigError` naming the bad key.
    A key not given takes its field's default."""
    if isinstance(raw, PoolConfig):
        return raw
    top = checks.mapping("config", raw)
    checks.reject_unknown("", top, dict.fromkeys(ACCEPTED))
    top = environ.fill_top(top)
    given = _in_declared_order(top)
    values = read("", {k: v for k, v in given.items() if KEYS[k].field == "mode"}, KEYS)
    db = _key_of("endpoints")
    if db in given:
        values["endpoints"] = _endpoints(db, given[db])
    elif environ.has_host():
        values["endpoints"] = _endpoints(db, {})  # one endpoint, all from the environment
    else:
        raise fail(db, "missing: give one endpoint (dict or DSN) or a list of them, or "
                       "set PGHOST")
    values["groups"] = _groups(top, values["endpoints"])
    values.update(read("", {k: v for k, v in given.items()
                            if KEYS[k].field not in ("mode", "endpoints", "groups")}, KEYS))
    config = PoolConfig(**values)
    if config.quarantine_initial > config.quarantine_max:
        raise fail("quarantine_initial", f"{config.quarantine_initial:g} exceeds "
                                         f"quarantine_max ({config.quarantine_max:g}); "
                                         "allowed: up to quarantine_max")
    return config
