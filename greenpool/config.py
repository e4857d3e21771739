"""Configuration: pgdbpool's format in, validated immutable settings out.

The input is pgdbpool's dictionary (``type``, ``db``, ``groups``) so its users can switch
without rewriting their config; every key greenpool adds has a default. Validation happens
once, up front: an unknown key or a bad value is a :class:`ConfigError` that names the key
(with a "did you mean" for typos), never a late ``KeyError`` inside a request.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg2.extensions import parse_dsn

from .errors import ConfigError

MODES = ("gevent", "eventlet", "threaded", "non-threaded")
ROW_FACTORIES = ("tuple", "dict", "namedtuple")
#: libpq's target_session_attrs words for what a group may connect to.
ROLES = ("any", "primary", "standby", "prefer-standby")
LAG_POLICIES = ("use-primary", "fail")
#: when a returned connection's session is reset (see connection.reset_on_return)
RESET_POLICIES = ("auto", "always", "never")

# libpq keepalive defaults: a peer that vanished (power loss, partition) is noticed in about
# a minute instead of the kernel's two hours.
DEFAULT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


@dataclass(frozen=True)
class EndpointConfig:
    """One PostgreSQL server. The password is kept out of ``repr``."""

    host: str
    port: int = 5432
    dbname: str = "postgres"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    sslmode: str | None = None
    connect_timeout: float = 5.0
    retry_sleep: float | None = None
    statement_timeout: float | None = None
    temp_buffers_mb: int | None = None
    weight: int = 1
    keepalives: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_KEEPALIVES))
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How the endpoint is named in errors, logs and stats (never with the password)."""
        where = self.host if self.host.startswith("/") else f"{self.host}:{self.port}"
        return f"{where}/{self.dbname}"


@dataclass(frozen=True)
class GroupConfig:
    """Settings of one endpoint group; see the README's configuration table."""

    name: str
    connection_count: int = 10
    min_size: int = 0
    autocommit: bool = False
    readonly: bool = False
    timeout: float = 30.0
    max_waiting: int = 0
    max_lifetime: float = 3600.0
    max_idle: float = 600.0
    check_idle_after: float = 5.0
    statement_timeout: float | None = None
    row_factory: str = "tuple"
    endpoints: tuple[int, ...] = ()
    role: str = "any"
    max_lag: float | None = None
    on_lag: str = "use-primary"
    leak_threshold: float | None = None
    reset: str = "auto"
    on_return: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class PoolConfig:
    """The whole validated configuration."""

    mode: str
    endpoints: tuple[EndpointConfig, ...]
    groups: Mapping[str, GroupConfig]
    application_name: str = "greenpool"
    maintenance_interval: float = 1.0
    quarantine_initial: float = 0.5
    quarantine_max: float = 30.0
    role_check_interval: float = 2.0
    startup_timeout: float = 0.0


# --- value checkers -----------------------------------------------------------------------


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _number(path: str, value: Any, *, minimum: float = 0.0, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"expected a number of seconds, got {value!r}")
    if value < minimum:
        raise _fail(path, f"must be >= {minimum}, got {value!r}")
    return float(value)


def _integer(path: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"expected a whole number, got {value!r}")
    if value < minimum:
        raise _fail(path, f"must be >= {minimum}, got {value!r}")
    return value


def _boolean(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false, got {value!r}")
    return value


def _text(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"expected a non-empty string, got {value!r}")
    return value


def _callable(path: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise _fail(path, f"expected a function taking the psycopg2 connection, got {value!r}")
    return value


def _choice(path: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(path, f"expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _reject_unknown(path: str, given: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    for key in given:
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise _fail(f"{path}.{key}" if path else str(key), f"unknown key{suggestion}")


def _mapping(path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected a dictionary, got {type(value).__name__}")
    return value


# --- endpoints ----------------------------------------------------------------------------


def _ssl(path: str, value: Any) -> str | None:
    """pgdbpool took a bool or a libpq sslmode word; accept both."""
    if value is None:
        return None
    if value is True:
        return "require"
    if value is False:
        return "disable"
    return _choice(
        path, value, ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    )


def _keepalives(path: str, value: Any) -> Mapping[str, int]:
    if value is True:
        return dict(DEFAULT_KEEPALIVES)
    if value is False:
        return {"keepalives": 0}
    given = _mapping(path, value)
    _reject_unknown(path, given, DEFAULT_KEEPALIVES)
    merged = dict(DEFAULT_KEEPALIVES)
    for key, item in given.items():
        merged[key] = _integer(f"{path}.{key}", item)
    return merged


def _options(path: str, value: Any) -> Mapping[str, str]:
    given = _mapping(path, value)
    return {str(k): str(v) for k, v in given.items()}


_ENDPOINT_KEYS: dict[str, Callable[[str, Any], tuple[str, Any]]] = {
    "host": lambda p, v: ("host", _text(p, v)),
    "port": lambda p, v: ("port", _integer(p, v, minimum=1)),
    "name": lambda p, v: ("dbname", _text(p, v)),
    "dbname": lambda p, v: ("dbname", _text(p, v)),
    "user": lambda p, v: ("user", _text(p, v)),
    "pass": lambda p, v: ("password", str(v)),
    "password": lambda p, v: ("password", str(v)),
    "ssl": lambda p, v: ("sslmode", _ssl(p, v)),
    "sslmode": lambda p, v: ("sslmode", _ssl(p, v)),
    "connect_timeout": lambda p, v: ("connect_timeout", _number(p, v, minimum=0.001)),
    "connection_retry_sleep": lambda p, v: ("retry_sleep", _number(p, v)),
    # pgdbpool passes query_timeout straight to statement_timeout, i.e. milliseconds.
    "query_timeout": lambda p, v: ("statement_timeout", _number(p, v) / 1000.0),
    "statement_timeout": lambda p, v: ("statement_timeout", _number(p, v, allow_none=True)),
    "session_tmp_buffer": lambda p, v: ("temp_buffers_mb", _integer(p, v, minimum=1)),
    "weight": lambda p, v: ("weight", _integer(p, v, minimum=1)),
    "keepalives": lambda p, v: ("keepalives", _keepalives(p, v)),
    "options": lambda p, v: ("options", _options(p, v)),
}

# libpq parameters a DSN may carry, mapped onto pgdbpool's words; the rest become options.
_DSN_ALIASES = {"dbname": "name", "password": "pass", "sslmode": "ssl"}
_DSN_NUMERIC = {"port", "connect_timeout"}


def _dsn_to_keys(path: str, dsn: str) -> dict[str, Any]:
    try:
        parsed = parse_dsn(dsn)
    except Exception as exc:  # psycopg2.ProgrammingError: the message never echoes the DSN
        raise _fail(path, "not a valid libpq DSN or postgresql:// URI") from exc
    keys: dict[str, Any] = {}
    options: dict[str, str] = {}
    for key, value in parsed.items():
        if key in _DSN_NUMERIC:
            try:
                keys[key] = int(value)
            except ValueError:
                raise _fail(f"{path}.{key}", f"expected a whole number, got {value!r}") from None
        elif key in _DSN_ALIASES:
            keys[_DSN_ALIASES[key]] = value
        elif key in ("host", "user"):
            keys[key] = value
        else:
            options[key] = value
    if options:
        keys["options"] = options
    return keys


def parse_endpoint(path: str, raw: Any) -> EndpointConfig:
    """One entry of ``db``: a pgdbpool dict, a dict with ``dsn``, or a DSN/URI string."""
    if isinstance(raw, str):
        given: dict[str, Any] = _dsn_to_keys(path, raw)
    else:
        given = dict(_mapping(path, raw))
        if "dsn" in given:
            from_dsn = _dsn_to_keys(f"{path}.dsn", _text(f"{path}.dsn", given.pop("dsn")))
            given = {**from_dsn, **given}
    _reject_unknown(path, given, _ENDPOINT_KEYS)
    values: dict[str, Any] = {}
    for key, value in given.items():
        attr, checked = _ENDPOINT_KEYS[key](f"{path}.{key}", value)
        values[attr] = checked
    if "host" not in values:
        raise _fail(f"{path}.host", "missing: the server's address (or a Unix socket directory)")
    return EndpointConfig(**values)


# --- groups -------------------------------------------------------------------------------

_GROUP_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "connection_count": lambda p, v: _integer(p, v, minimum=1),
    "min_size": lambda p, v: _integer(p, v),
    "autocommit": _boolean,
    "readonly": _boolean,
    "timeout": lambda p, v: _number(p, v),
    "max_waiting": lambda p, v: _integer(p, v),
    "max_lifetime": lambda p, v: _number(p, v, minimum=1.0),
    "max_idle": lambda p, v: _number(p, v, minimum=0.1),
    "check_idle_after": lambda p, v: _number(p, v),
    "statement_timeout": lambda p, v: _number(p, v, allow_none=True),
    "row_factory": lambda p, v: _choice(p, v, ROW_FACTORIES),
    "endpoints": lambda p, v: v,  # resolved against ``db`` in _group_endpoints
    "role": lambda p, v: _choice(p, v, ROLES),
    "max_lag": lambda p, v: _number(p, v, allow_none=True),
    "on_lag": lambda p, v: _choice(p, v, LAG_POLICIES),
    "leak_threshold": lambda p, v: _number(p, v, minimum=0.001, allow_none=True),
    "reset": lambda p, v: _choice(p, v, RESET_POLICIES),
    "on_return": lambda p, v: _callable(p, v),
}


def _group_endpoints(path: str, value: Any, endpoints: tuple[EndpointConfig, ...]) -> tuple:
    """A group may name a subset of ``db`` by index or by ``host:port/dbname`` label."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(path, "expected a non-empty list of endpoint indexes or labels")
    labels = {ep.label: i for i, ep in enumerate(endpoints)}
    chosen = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(endpoints):
            chosen.append(item)
        elif isinstance(item, str) and item in labels:
            chosen.append(labels[item])
        else:
            raise _fail(path, f"{item!r} is not an index into db nor one of {sorted(labels)}")
    return tuple(chosen)


def parse_group(
    name: str, raw: Any, defaults: Mapping[str, Any], endpoints: tuple[EndpointConfig, ...]
) -> GroupConfig:
    path = f"groups.{name}"
    given = {**defaults, **_mapping(path, raw)}
    _reject_unknown(path, given, _GROUP_KEYS)
    values = {key: _GROUP_KEYS[key](f"{path}.{key}", value) for key, value in given.items()}
    if "endpoints" in values:
        values["endpoints"] = _group_endpoints(f"{path}.endpoints", values["endpoints"], endpoints)
    if "readonly" not in values and values.get("role") in ("standby", "prefer-standby"):
        values["readonly"] = True  # a read group: replaying a read after a failover is safe
    group = GroupConfig(name=name, **values)
    if group.min_size > group.connection_count:
        raise _fail(f"{path}.min_size", "must not exceed connection_count")
    return group


# --- the whole thing ----------------------------------------------------------------------

_TOP_KEYS = {
    "type": None,
    "db": None,
    "groups": None,
    "defaults": None,
    "application_name": None,
    "maintenance_interval": None,
    "quarantine_initial": None,
    "quarantine_max": None,
    "role_check_interval": None,
    "startup_timeout": None,
}


def parse_config(raw: Any) -> PoolConfig:
    """Validate a pgdbpool-style dictionary; raise :class:`ConfigError` naming the bad key."""
    if isinstance(raw, PoolConfig):
        return raw
    top = _mapping("config", raw)
    _reject_unknown("", top, _TOP_KEYS)
    mode = _choice("type", top.get("type", "gevent"), MODES)

    if "db" not in top:
        raise _fail("db", "missing: give one endpoint (dict or DSN) or a list of them")
    db = top["db"]
    entries = db if isinstance(db, (list, tuple)) else [db]
    if not entries:
        raise _fail("db", "the list of endpoints is empty")
    endpoints = tuple(parse_endpoint(f"db[{i}]", entry) for i, entry in enumerate(entries))

    defaults = _mapping("defaults", top.get("defaults", {}))
    _reject_unknown("defaults", defaults, _GROUP_KEYS)
    groups_raw = _mapping("groups", top.get("groups", {"default": {}}))
    if not groups_raw:
        raise _fail("groups", "no group configured")
    groups = {
        str(name): parse_group(str(name), spec, defaults, endpoints)
        for name, spec in groups_raw.items()
    }
    return PoolConfig(
        mode=mode,
        endpoints=endpoints,
        groups=groups,
        application_name=_text("application_name", top.get("application_name", "greenpool")),
        maintenance_interval=_number(
            "maintenance_interval", top.get("maintenance_interval", 1.0), minimum=0.01
        ),
        quarantine_initial=_number(
            "quarantine_initial", top.get("quarantine_initial", 0.5), minimum=0.001
        ),
        quarantine_max=_number("quarantine_max", top.get("quarantine_max", 30.0), minimum=0.001),
        role_check_interval=_number(
            "role_check_interval", top.get("role_check_interval", 2.0), minimum=0.01
        ),
        startup_timeout=_number("startup_timeout", top.get("startup_timeout", 0.0)),
    )
