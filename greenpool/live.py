"""What a new configuration changes in a running pool, and whether it can be applied live.

``Pool.reconfigure`` applies a change without dropping a loan in flight: endpoints added,
removed or changed (weight, password, options ...), group settings, sizes. What a running
pool cannot change without being rebuilt (its mode, its groups and their roles, its
housekeeping's timing) is refused here, whole, before anything is touched, with a sentence
that names the key and what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .config import EndpointConfig, PoolConfig
from .errors import ConfigError

#: top-level keys a running pool cannot change: its tasks and endpoints were built from them
_FIXED_TOP = ("mode", "application_name", "maintenance_interval", "quarantine_initial",
              "quarantine_max", "role_check_interval")
#: group keys a running group cannot change (its role decides where every connection is and
#: what housekeeping probes; the dedicated slots were counted with the limit)
_FIXED_GROUP = ("role", "exclusive_limit")
#: endpoint keys whose change leaves its open connections as good as new ones
_ENDPOINT_ONLY_POOL = ("weight", "connect_timeout", "retry_sleep")


@dataclass(frozen=True)
class Plan:
    """The endpoints by label: kept unchanged, kept with new settings (their connections to
    retire unless only ``weight``/``connect_timeout``/``retry_sleep`` changed), added, removed."""

    changed: dict[str, EndpointConfig]
    retire: frozenset[str]
    added: tuple[EndpointConfig, ...]
    removed: frozenset[str]


def plan(old: PoolConfig, new: PoolConfig) -> Plan:
    """What applying ``new`` over ``old`` means, or :class:`ConfigError` saying why it
    cannot be applied live."""
    key = {"mode": "type"}
    for name in _FIXED_TOP:
        if getattr(old, name) != getattr(new, name):
            raise ConfigError(
                f"{key.get(name, name)}: cannot change in a running pool ({getattr(old, name)!r}"
                f" -> {getattr(new, name)!r}); close the pool and create a new one")
    if set(old.groups) != set(new.groups):
        gone, made = sorted(set(old.groups) - set(new.groups)), sorted(
            set(new.groups) - set(old.groups))
        what = "; ".join(part for part in (gone and f"removed {gone}", made and f"added {made}")
                         if part)
        raise ConfigError(f"groups: a running pool keeps its groups ({what}); change their "
                          f"settings live, or close the pool and create a new one")
    for name, group in new.groups.items():
        for field_name in _FIXED_GROUP:
            before, after = getattr(old.groups[name], field_name), getattr(group, field_name)
            if before != after:
                raise ConfigError(f"groups.{name}.{field_name}: cannot change in a running pool"
                                  f" ({before!r} -> {after!r}); add a new group under another "
                                  f"name and move the code to it, or restart")
    before = {ep.label: ep for ep in old.endpoints}
    after = {ep.label: ep for ep in new.endpoints}
    changed = {label: ep for label, ep in after.items() if label in before and ep != before[label]}
    retire = frozenset(label for label, ep in changed.items()
                       if _differs_beyond(before[label], ep, _ENDPOINT_ONLY_POOL))
    return Plan(
        changed=changed,
        retire=retire,
        added=tuple(ep for label, ep in after.items() if label not in before),
        removed=frozenset(before) - frozenset(after),
    )


def _differs_beyond(a: EndpointConfig, b: EndpointConfig, ignored: tuple[str, ...]) -> bool:
    return any(getattr(a, f.name) != getattr(b, f.name) for f in fields(a)
               if f.name not in ignored)
