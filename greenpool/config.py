"""Configuration: pgdbpool's format in, validated immutable settings out.

The input is pgdbpool's dictionary (``type``, ``db``, ``groups``) so its users can switch
without rewriting their config; every key greenpool adds has a default. Validation happens
once, up front, and covers every key: type, range, finiteness, units and the rules between
keys. Anything wrong is a :class:`ConfigError` that names the key, the value (never a secret's)
and what is allowed, raised by :func:`parse_config` (so by ``Pool()``), never a late
``KeyError``/``OverflowError`` inside a request.

The checks are hand-written rather than a schema library's: the format has aliases
(``pass``/``password``, ``name``/``dbname``), DSN strings, pgdbpool's millisecond
``query_timeout`` and secrets that must never be echoed, and a pool library should not pull
a large dependency (pydantic and its compiled core) into every application for a table of
~40 keys checked once at startup.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from psycopg2.extensions import parse_dsn

from . import environ
from .errors import ConfigError

MODES = ("auto", "gevent", "eventlet", "threaded", "non-threaded")
ROW_FACTORIES = ("tuple", "dict", "namedtuple")
#: libpq's target_session_attrs words for what a group may connect to.
ROLES = ("any", "primary", "standby", "prefer-standby")
LAG_POLICIES = ("use-primary", "fail")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: when a returned connection's session is reset (see borrow_return.reset_on_return)
RESET_POLICIES = ("auto", "always", "never")
#: what an endpoint is: PostgreSQL itself, or a pooler (PgBouncer) in that pool mode
POOLER_MODES = ("none", "session", "transaction")

# libpq keepalive defaults: a peer that vanished (power loss, partition) is noticed in about
# a minute instead of the kernel's two hours.
DEFAULT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
#: Linux's limits for the keepalive socket options (TCP_KEEPIDLE/INTVL: 32767 s, CNT: 127).
_KEEPALIVE_MAX = {"keepalives": 1, "keepalives_idle": 32767, "keepalives_interval": 32767,
                  "keepalives_count": 127}

#: libpq connection parameters whose value is a secret: redacted in reprs, never echoed.
SECRET_OPTIONS = frozenset({"password", "sslpassword"})
#: Endpoint parameters that have their own key; in ``options`` they would bypass its checks
#: (and the endpoint's label would lie about where it connects).
_OWN_KEYS = {"host": "host", "port": "port", "dbname": "name", "user": "user",
             "password": "pass", "sslmode": "ssl", "connect_timeout": "connect_timeout"}

DAY = 86400.0
#: PostgreSQL's statement_timeout is an int of milliseconds.
_STATEMENT_TIMEOUT_MAX_MS = 2**31 - 1
#: PostgreSQL's ceiling for max_connections: no group can usefully hold more.
_CONNECTIONS_MAX = 262143
#: temp_buffers is at most 2**30 - 1 blocks of 8 kB.
_TEMP_BUFFERS_MAX_MB = (2**30 - 1) * 8 // 1024
#: A retry pause (and a first quarantine) shorter than this is a connect storm, not a backoff.
MIN_RETRY_SLEEP = 0.01

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60


def _doc(meaning: str, allowed: str, *, keys: tuple[str, ...] = (), default: str = "") -> dict:
    """A field's documentation: the configuration reference is generated from it.

    ``keys`` are the configuration keys that set the field (when not the field's own name),
    ``default`` describes a default the field's value cannot show (libpq's, derived).
    """
    return {"doc": meaning, "allowed": allowed, "keys": keys, "default": default}


@dataclass(frozen=True, repr=False)
class EndpointConfig:
    """One PostgreSQL server. Its repr shows neither the password nor a secret option."""

    host: str = field(metadata=_doc(
        "address, name, or Unix socket directory; names are resolved through gevent, so DNS "
        "never blocks the hub", "non-empty string, no `,`", default="(required)"))
    port: int = field(default=5432, metadata=_doc(
        'TCP port',
        '1 to 65535'))
    dbname: str = field(default="postgres", metadata=_doc(
        'database (give one of the two keys)',
        'non-empty string', keys=('name', 'dbname')))
    user: str | None = field(default=None, metadata=_doc(
        'role to log in as',
        'string, or `None`', default="libpq's"))
    password: str | Callable[[], str | None] | None = field(default=None, metadata=_doc(
        "never appears in errors, logs or reprs; a function is asked at each new connection "
        "(see [Credentials that change](operations.md#credentials-that-change))",
        "string, a function taking no argument that returns one, or `None` (libpq's `.pgpass`"
        " may still supply one)",
        keys=('pass', 'password'), default='none'))
    sslmode: str | None = field(default=None, metadata=_doc(
        'TLS mode',
        "`True` (`require`), `False` (`disable`), or an sslmode word (`disable` … "
        "`verify-full`)",
        keys=('ssl', 'sslmode'), default="libpq's"))
    connect_timeout: float = field(default=5.0, metadata=_doc(
        "seconds per connect attempt, enforced by the pool in every mode; also bounds the "
        "pool's own round trips on return and in housekeeping",
        '0.001 to 3600'))
    retry_sleep: float | None = field(default=None, metadata=_doc(
        'first pause before this endpoint is tried again after a failed connect',
        "0.01 to 3600, or `None`",
        keys=('connection_retry_sleep',), default='`quarantine_initial`'))
    statement_timeout: float | None = field(default=None, metadata=_doc(
        "statement timeout; `query_timeout` is pgdbpool's, in **milliseconds** (below 1 ms "
        "refused: it would round to 0, which turns it off); 0 means none",
        "`statement_timeout`: 0, or 0.001 to 2147483.647 seconds, or `None`; `query_timeout`:"
        " 0, or 1 to 2147483647 ms",
        keys=('statement_timeout', 'query_timeout'), default='none'))
    temp_buffers_mb: int | None = field(default=None, metadata=_doc(
        '`temp_buffers` in MB',
        '1 to 8388607', keys=('session_tmp_buffer',), default='none'))
    weight: int = field(default=1, metadata=_doc(
        'share of connections, and of borrows, when a group spans several endpoints',
        '1 to 1000'))
    keepalives: Mapping[str, int] = field(
        default_factory=lambda: dict(DEFAULT_KEEPALIVES), metadata=_doc(
            "TCP keepalives, so a vanished peer is noticed in about a minute",
            "`True`/`False` or a dict: `keepalives` 0/1, `keepalives_idle` and "
            "`keepalives_interval` 0 to 32767, `keepalives_count` 0 to 127",
            default="on: 30 s idle, 10 s interval, 3 probes"))
    options: Mapping[str, str] = field(default_factory=dict, metadata=_doc(
        "any other libpq connection parameter; unknown names (libpq is asked) and those with "
        "a key of their own are refused; `password`/`sslpassword` values are hidden",
        "dict of libpq parameter to string or whole number", default="`{}`"))
    #: None: not said (a pooler is detected by its refusal of ``options``); else ``none``
    #: (PostgreSQL itself), ``session`` or ``transaction`` (a pooler in that pool mode)
    pooler: str | None = field(default=None, metadata=_doc(
        "the endpoint is PostgreSQL itself, or a pooler (PgBouncer) in that pool mode; without "
        "the key a refusal of `options` marks it `transaction`",
        "`none`, `session`, `transaction`", default="detected"))

    @property
    def label(self) -> str:
        """How the endpoint is named in errors, logs and stats (never with the password)."""
        where = self.host if self.host.startswith("/") else f"{self.host}:{self.port}"
        return f"{where}/{self.dbname}"

    def secrets(self) -> tuple[str, ...]:
        """The secret values this endpoint holds, for scrubbing them out of driver messages."""
        found = [self.password if isinstance(self.password, str) else ""]
        found += [v for k, v in self.options.items() if k in SECRET_OPTIONS]
        return tuple(s for s in found if s)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "password":
                value = None if value is None else "***"
            elif f.name == "options":
                value = {k: ("***" if k in SECRET_OPTIONS else v) for k, v in value.items()}
            shown.append(f"{f.name}={value!r}")
        return f"EndpointConfig({', '.join(shown)})"

    __str__ = __repr__


@dataclass(frozen=True)
class GroupConfig:
    """Settings of one endpoint group (the configuration reference is generated from it)."""

    name: str
    connection_count: int = field(default=10, metadata=_doc(
        'most connections the group holds (open + opening), never exceeded',
        '1 to 262143'))
    min_size: int = field(default=0, metadata=_doc(
        'connections kept open and warmed up by housekeeping',
        '0 to `connection_count`'))
    autocommit: bool = field(default=False, metadata=_doc(
        'each statement commits by itself',
        'bool'))
    readonly: bool = field(default=False, metadata=_doc(
        "sessions start read-only (through a pooler: `SET TRANSACTION READ ONLY` per "
        "transaction); a default against mistakes, not a security boundary",
        'bool', default='`False` (`True` for roles `standby` and `prefer-standby`)'))
    timeout: float = field(default=30.0, metadata=_doc(
        "acquire timeout in seconds, waiting plus connecting; `handler(group, timeout=…)` "
        "overrides it",
        '0 to 86400'))
    max_waiting: int = field(default=0, metadata=_doc(
        'longest waiting line; beyond it `TooManyWaiters` is raised at once',
        '0 (unbounded) to 1000000'))
    max_lifetime: float = field(default=3600.0, metadata=_doc(
        "seconds before a connection is replaced; each gets up to 10 % less, so connections "
        "opened together do not expire together",
        '1 to 2592000 (30 days)'))
    max_idle: float = field(default=600.0, metadata=_doc(
        'idle seconds before housekeeping closes a connection (never below `min_size`)',
        '0.1 to 2592000'))
    check_idle_after: float = field(default=5.0, metadata=_doc(
        "a connection idle longer gets a `SELECT 1` on borrow; a fresher one only when its "
        "socket is readable",
        '0 to 86400'))
    statement_timeout: float | None = field(default=None, metadata=_doc(
        'seconds, set in the startup packet (through a pooler: with each transaction)',
        'as the endpoint key', default="the endpoint's"))
    row_factory: str = field(default="tuple", metadata=_doc(
        'shape of the rows `query` returns',
        '`tuple`, `dict`, `namedtuple`'))
    endpoints: tuple[int, ...] = field(default=(), metadata=_doc(
        'the subset of `db` the group uses',
        "non-empty list of indexes into `db` or `host:port/dbname` labels, each once",
        default='all'))
    role: str = field(default="any", metadata=_doc(
        "libpq's `target_session_attrs` words; roles are detected, never configured",
        '`primary`, `standby`, `prefer-standby`, `any`'))
    max_lag: float | None = field(default=None, metadata=_doc(
        'seconds of replay lag beyond which a standby is skipped while another qualifies',
        '0 to 86400, or `None`', default='none'))
    on_lag: str = field(default="use-primary", metadata=_doc(
        'what to do when every standby lags',
        '`use-primary`, `fail`'))
    leak_threshold: float | None = field(default=None, metadata=_doc(
        'seconds a connection may be held before one warning names the code that took it',
        '0.001 to 86400, or `None`', default='none'))
    reset: str = field(default="auto", metadata=_doc(
        "when a returned session is reset with `DISCARD ALL`: `auto` only after a loan that "
        "may have changed it",
        '`auto`, `always`, `never`'))
    on_return: Callable[[Any], None] | None = field(default=None, metadata=_doc(
        "function taking the psycopg2 connection, run after each reset (Python configurations"
        " only)",
        'a callable, or `None`', default='none'))
    #: run with the psycopg2 connection when it opens and again after each ``DISCARD ALL``,
    #: so setup made per connection survives the reset
    configure: Callable[[Any], None] | None = field(default=None, metadata=_doc(
        "function taking the psycopg2 connection, run when it opens and after each `DISCARD "
        "ALL`; a transaction it leaves open is committed; if it raises, the connect fails "
        "(Python configurations only; not for a transaction-mode pooler)",
        "a callable, or `None`", default="none"))
    #: dedicated connections (``pool.exclusive()``, ``pool.listen()``) open at once, outside
    #: ``connection_count``; 0 turns them off for the group
    exclusive_limit: int = field(default=10, metadata=_doc(
        "most dedicated connections (`exclusive()` blocks and listeners) open at once, outside "
        "`connection_count`; 0 turns them off", "0 to 262143"))


@dataclass(frozen=True)
class PoolConfig:
    """The whole validated configuration."""

    mode: str = field(metadata=_doc(
        'concurrency mode; `auto` picks the one the process runs on at `Pool()`',
        "`auto`, `gevent`, `eventlet`, `threaded`, `non-threaded`",
        keys=('type',), default='`auto`'))
    endpoints: tuple[EndpointConfig, ...] = field(metadata=_doc(
        "the servers: one endpoint or a list (dicts, or libpq DSN / `postgresql://` strings, "
        "or dicts with `dsn` plus overrides)",
        'see Endpoint keys', keys=('db',), default='(required, unless `PGHOST` is set)'))
    groups: Mapping[str, GroupConfig] = field(metadata=_doc(
        'named groups of connections',
        'dict of group name to group keys', default='`{"default": {}}`'))
    application_name: str = field(default="greenpool", metadata=_doc(
        '`application_name` of every session',
        'non-empty string'))
    maintenance_interval: float = field(default=1.0, metadata=_doc(
        'seconds between housekeeping rounds',
        '0.01 to 3600'))
    quarantine_initial: float = field(default=0.5, metadata=_doc(
        "first quarantine of a failed endpoint, in seconds (an endpoint's "
        "`connection_retry_sleep` overrides it)",
        '0.01 to 3600, and at most `quarantine_max`'))
    quarantine_max: float = field(default=30.0, metadata=_doc(
        "longest quarantine; each failed probe doubles the ceiling, never beyond a quarter of"
        " how long the endpoint has been down",
        '0.01 to 86400, and at least `quarantine_initial`'))
    role_check_interval: float = field(default=2.0, metadata=_doc(
        'seconds between probes of role and replay lag (only when a group has a `role`)',
        '0.01 to 3600'))
    startup_timeout: float = field(default=0.0, metadata=_doc(
        "`Pool()` waits this long for every group to get one connection; no live endpoint at "
        "all raises `NoHealthyEndpoint`",
        '0 to 3600'))
    on_event: Callable[[Any], object] | None = field(default=None, metadata=_doc(
        "called with each `greenpool.events.PoolEvent` (endpoint and group state changes)",
        "a function, or `None`", default="none"))

#: The top-level key that sets no field of its own: its values land in each GroupConfig.
TOP_ONLY_KEYS = {"defaults": _doc("group keys applied to every group; a group's own keys win",
                                  "dict of group keys", default="`{}`")}


# --- value checkers -----------------------------------------------------------------------


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _is_secret(path: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return last in ("pass", "password", "dsn", *SECRET_OPTIONS)


def _shown(path: str, value: Any) -> str:
    """How a bad value appears in an error: shortened, and a secret only by its type."""
    if _is_secret(path):
        return f"a {type(value).__name__} (not shown: it is a secret)"
    return _short.repr(value)


def _range_text(minimum: float, maximum: float, open_min: bool) -> str:
    low = f"> {minimum:g}" if open_min else f">= {minimum:g}"
    return f"{low} and <= {maximum:g}"


def _number(
    path: str,
    value: Any,
    *,
    minimum: float = 0.0,
    maximum: float = DAY,
    open_min: bool = False,
    allow_none: bool = False,
    unit: str = "seconds",
) -> Any:
    """A finite int or float within [minimum, maximum] (``open_min``: above minimum)."""
    if value is None and allow_none:
        return None
    allowed = f"a number of {unit} {_range_text(minimum, maximum, open_min)}"
    if allow_none:
        allowed += ", or null"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"expected {allowed}; got {_shown(path, value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if math.isnan(number) or math.isinf(number):
        raise _fail(path, f"expected {allowed}; got {_short.repr(value)} (not a finite number)")
    if number < minimum or (open_min and number == minimum) or number > maximum:
        raise _fail(path, f"expected {allowed}; got {_short.repr(value)}")
    return number


def _integer(path: str, value: Any, *, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        what = "true/false" if isinstance(value, bool) else _shown(path, value)
        raise _fail(path, f"expected a whole number from {minimum} to {maximum}; got {what}")
    if not minimum <= value <= maximum:
        shown = _short.repr(value)
        raise _fail(path, f"expected a whole number from {minimum} to {maximum}; got {shown}")
    return int(value)


def _boolean(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false; got {_shown(path, value)}")
    return value


def _text(path: str, value: Any, *, allow_none: bool = False) -> Any:
    """A non-empty string without NUL (libpq cannot carry one; psycopg2 would fail later)."""
    if value is None and allow_none:
        return None
    allowed = "a non-empty string" + (", or null" if allow_none else "")
    if not isinstance(value, str) or not value:
        raise _fail(path, f"expected {allowed}; got {_shown(path, value)}")
    if "\x00" in value:
        raise _fail(path, "must not contain a NUL character")
    return value


def _password(path: str, value: Any) -> Any:
    """``None`` means "no password" (libpq's .pgpass/environment may still supply one); a
    function taking no argument is asked at each connect (:mod:`greenpool.credentials`)."""
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise _fail(path, f"expected a string, a function returning one, or null; got a "
                          f"{type(value).__name__} (not shown: it is a secret)")
    if "\x00" in value:
        raise _fail(path, "must not contain a NUL character (value not shown: it is a secret)")
    return value


def _callable(path: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise _fail(path, f"expected a function taking the psycopg2 connection, got {value!r}")
    return value


def _event_callback(path: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise _fail(path, f"expected a function taking a greenpool.events.PoolEvent, got "
                          f"{_short.repr(value)}")
    return value


def _choice(path: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(path, f"expected one of {', '.join(choices)}; got {_shown(path, value)}")
    return value


def _reject_unknown(path: str, given: Mapping[Any, Any], known: Mapping[str, Any]) -> None:
    for key in given:
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            name = _short.repr(key) if not isinstance(key, str) else key
            raise _fail(f"{path}.{name}" if path else name, f"unknown key{suggestion}")


def _mapping(path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected a dictionary, got {type(value).__name__}")
    return value


def _statement_timeout(path: str, value: Any) -> float | None:
    """Seconds; sent to the server as whole milliseconds, so below 1 ms would round to 0,
    which PostgreSQL reads as "no timeout". 0 itself is accepted and means exactly that."""
    maximum = _STATEMENT_TIMEOUT_MAX_MS / 1000.0
    seconds = _number(path, value, maximum=maximum, allow_none=True)
    if seconds is None or seconds == 0:
        return seconds
    if round(seconds * 1000) < 1:  # as greenpool.connection sends it
        raise _fail(path, f"{value!r} s is below 1 ms and would round to 0, which turns the "
                          "timeout off; give at least 0.001 (or 0 to mean no timeout)")
    return float(seconds)


def _query_timeout(path: str, value: Any) -> float:
    """pgdbpool passes query_timeout straight to statement_timeout: milliseconds."""
    ms = _number(path, value, maximum=_STATEMENT_TIMEOUT_MAX_MS, unit="milliseconds")
    if 0 < ms < 1:
        raise _fail(path, f"{value!r} ms would round to 0, which turns the timeout off; "
                          "give at least 1 (or 0 to mean no timeout)")
    return float(ms) / 1000.0


# --- endpoints ----------------------------------------------------------------------------

_MULTI_HOST = ("a libpq multi-host list cannot be used here (greenpool resolves and "
               "balances each server itself): list each server as its own entry of `db`")


def _host(path: str, value: Any) -> str:
    host = _text(path, value)
    if "," in host:
        raise _fail(path, f"{_short.repr(host)}: {_MULTI_HOST}")
    return str(host)


def _port(path: str, value: Any) -> int:
    if isinstance(value, str) and "," in value:
        raise _fail(path, f"{_short.repr(value)}: {_MULTI_HOST}")
    return _integer(path, value, minimum=1, maximum=65535)


def _ssl(path: str, value: Any) -> str | None:
    """pgdbpool took a bool or a libpq sslmode word; accept both."""
    if value is None:
        return None
    if value is True:
        return "require"
    if value is False:
        return "disable"
    return _choice(path, value, SSLMODES)


def _keepalives(path: str, value: Any) -> Mapping[str, int]:
    if value is True:
        return dict(DEFAULT_KEEPALIVES)
    if value is False:
        return {"keepalives": 0}
    given = _mapping(path, value)
    _reject_unknown(path, given, DEFAULT_KEEPALIVES)
    merged = dict(DEFAULT_KEEPALIVES)
    for key, item in given.items():
        merged[key] = _integer(f"{path}.{key}", item, maximum=_KEEPALIVE_MAX[key])
    return merged


def _libpq_knows(keyword: str) -> bool:
    """Whether libpq accepts ``keyword`` as a connection parameter (asked of libpq itself)."""
    if not re.fullmatch(r"[a-z_]+", keyword):
        return False
    try:
        parse_dsn(f"{keyword}=x")
    except Exception:
        return False
    return True


def _options(path: str, value: Any) -> Mapping[str, str]:
    """Other libpq parameters: known keywords only, string or whole-number values."""
    given = _mapping(path, value)
    options: dict[str, str] = {}
    for key, item in given.items():
        if not isinstance(key, str) or not _libpq_knows(key):
            raise _fail(f"{path}.{_short.repr(key) if not isinstance(key, str) else key}",
                        "not a libpq connection parameter")
        where = f"{path}.{key}"
        if key in _OWN_KEYS:
            raise _fail(where, f"give it as the endpoint key `{_OWN_KEYS[key]}`, not in options")
        if isinstance(item, int) and not isinstance(item, bool):
            options[key] = str(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise _fail(where, "must not contain a NUL character")
            if key == "hostaddr" and "," in item:
                raise _fail(where, _MULTI_HOST)
            options[key] = item
        else:
            raise _fail(where, f"expected a string or a whole number; got {_shown(where, item)}")
    return options


_ENDPOINT_KEYS: dict[str, Callable[[str, Any], tuple[str, Any]]] = {
    "host": lambda p, v: ("host", _host(p, v)),
    "port": lambda p, v: ("port", _port(p, v)),
    "name": lambda p, v: ("dbname", _text(p, v)),
    "dbname": lambda p, v: ("dbname", _text(p, v)),
    "user": lambda p, v: ("user", _text(p, v, allow_none=True)),
    "pass": lambda p, v: ("password", _password(p, v)),
    "password": lambda p, v: ("password", _password(p, v)),
    "ssl": lambda p, v: ("sslmode", _ssl(p, v)),
    "sslmode": lambda p, v: ("sslmode", _ssl(p, v)),
    "connect_timeout": lambda p, v: (
        "connect_timeout", _number(p, v, minimum=0.001, maximum=3600.0)),
    "connection_retry_sleep": lambda p, v: (
        "retry_sleep", _number(p, v, minimum=MIN_RETRY_SLEEP, maximum=3600.0, allow_none=True)),
    "query_timeout": lambda p, v: ("statement_timeout", _query_timeout(p, v)),
    "statement_timeout": lambda p, v: ("statement_timeout", _statement_timeout(p, v)),
    "session_tmp_buffer": lambda p, v: (
        "temp_buffers_mb", _integer(p, v, minimum=1, maximum=_TEMP_BUFFERS_MAX_MB)),
    "weight": lambda p, v: ("weight", _integer(p, v, minimum=1, maximum=1000)),
    "keepalives": lambda p, v: ("keepalives", _keepalives(p, v)),
    "options": lambda p, v: ("options", _options(p, v)),
    "pooler": lambda p, v: ("pooler", _choice(p, v, POOLER_MODES)),
}
# Aliases that name the same setting: giving both is ambiguous.
_SAME_SETTING = (("name", "dbname"), ("pass", "password"), ("ssl", "sslmode"),
                 ("query_timeout", "statement_timeout"))

# libpq parameters a DSN may carry, mapped onto pgdbpool's words; the rest become options.
_DSN_ALIASES = {"dbname": "name", "password": "pass", "sslmode": "ssl"}
_DSN_NUMERIC = {"port", "connect_timeout"}


def _masked(libpq_message: str) -> str:
    """libpq's DSN parse error with every quoted token hidden: it may echo the password."""
    first = libpq_message.strip().splitlines()[0] if libpq_message.strip() else ""
    return re.sub(r'"[^"]*"', '"…"', first)


def _dsn_to_keys(path: str, dsn: str) -> dict[str, Any]:
    # The raise happens outside the ``except``: libpq's error must not even be the
    # ``__context__`` of ours, since its message echoes the DSN's tokens.
    problem = None
    try:
        parsed = parse_dsn(dsn)
    except Exception as exc:  # psycopg2.ProgrammingError
        problem = _masked(str(exc).removeprefix("invalid dsn: "))
    if problem is not None:
        detail = f" (libpq: {problem})" if problem else ""
        raise _fail(path, f"not a valid libpq DSN or postgresql:// URI{detail}; the DSN "
                          "is not shown because it may hold the password")
    keys: dict[str, Any] = {}
    options: dict[str, str] = {}
    for key, value in parsed.items():
        if key in ("host", "hostaddr", "port") and "," in value:
            raise _fail(f"{path}.{key}", f"{_short.repr(value)}: {_MULTI_HOST}")
        if key in _DSN_NUMERIC:
            number = int(value) if re.fullmatch(r"\s*[0-9]{1,9}\s*", value) else None
            if number is None:
                raise _fail(f"{path}.{key}",
                            f"expected a whole number; got {_short.repr(value)}")
            keys[key] = number
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
        given: dict[str, Any] = _dsn_to_keys(path, _text(f"{path}.dsn", raw))
    else:
        given = dict(_mapping(path, raw))
        if "dsn" in given:
            from_dsn = _dsn_to_keys(f"{path}.dsn", _text(f"{path}.dsn", given.pop("dsn")))
            if "options" in from_dsn and "options" in given:
                extra = _mapping(f"{path}.options", given["options"])
                given["options"] = {**from_dsn.pop("options"), **extra}
            for a, b in _SAME_SETTING:  # an explicit key overrides the DSN's
                if a in given and b in from_dsn:
                    from_dsn.pop(b)
                if b in given and a in from_dsn:
                    from_dsn.pop(a)
            given = {**from_dsn, **given}
    given, sources = environ.fill_endpoint(given)  # libpq's PG* variables fill the gaps
    _reject_unknown(path, given, _ENDPOINT_KEYS)
    for a, b in _SAME_SETTING:
        if a in given and b in given:
            raise _fail(f"{path}.{b}", f"`{a}` and `{b}` are the same setting: give one")
    values: dict[str, Any] = {}
    for key, value in given.items():
        attr, checked = _ENDPOINT_KEYS[key](environ.where(path, key, sources), value)
        values[attr] = checked
    if "host" not in values:
        raise _fail(f"{path}.host", "missing: the server's address (or a Unix socket directory)"
                                    "; give it, or set PGHOST")
    if values.get("pooler") in ("session", "transaction") and "temp_buffers_mb" in values:
        raise _fail(f"{path}.session_tmp_buffer", "temp_buffers cannot travel through a pooler "
                    "(it is fixed once a session has used a temporary table): set it on the "
                    "server with ALTER ROLE ... SET temp_buffers, or drop this key")
    return EndpointConfig(**values)


# --- groups -------------------------------------------------------------------------------

_GROUP_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "connection_count": lambda p, v: _integer(p, v, minimum=1, maximum=_CONNECTIONS_MAX),
    "min_size": lambda p, v: _integer(p, v, maximum=_CONNECTIONS_MAX),
    "autocommit": _boolean,
    "readonly": _boolean,
    "timeout": lambda p, v: _number(p, v),
    "max_waiting": lambda p, v: _integer(p, v, maximum=10**6),
    "max_lifetime": lambda p, v: _number(p, v, minimum=1.0, maximum=30 * DAY),
    "max_idle": lambda p, v: _number(p, v, minimum=0.1, maximum=30 * DAY),
    "check_idle_after": lambda p, v: _number(p, v),
    "statement_timeout": _statement_timeout,
    "row_factory": lambda p, v: _choice(p, v, ROW_FACTORIES),
    "endpoints": lambda p, v: v,  # resolved against ``db`` in _group_endpoints
    "role": lambda p, v: _choice(p, v, ROLES),
    "max_lag": lambda p, v: _number(p, v, allow_none=True),
    "on_lag": lambda p, v: _choice(p, v, LAG_POLICIES),
    "leak_threshold": lambda p, v: _number(p, v, minimum=0.001, allow_none=True),
    "reset": lambda p, v: _choice(p, v, RESET_POLICIES),
    "on_return": lambda p, v: _callable(p, v),
    "configure": lambda p, v: _callable(p, v),
    "exclusive_limit": lambda p, v: _integer(p, v, maximum=_CONNECTIONS_MAX),
}


def _group_endpoints(path: str, value: Any, endpoints: tuple[EndpointConfig, ...]) -> tuple:
    """A group may name a subset of ``db`` by index or by ``host:port/dbname`` label."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(path, "expected a non-empty list of endpoint indexes or labels")
    labels = {ep.label: i for i, ep in enumerate(endpoints)}
    chosen: list[int] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(endpoints):
            index = item
        elif isinstance(item, str) and item in labels:
            index = labels[item]
        else:
            raise _fail(path, f"{_short.repr(item)} is not an index into db (0 to "
                              f"{len(endpoints) - 1}) nor one of {sorted(labels)}")
        if index in chosen:
            raise _fail(path, f"{_short.repr(item)} names db[{index}] a second time")
        chosen.append(index)
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
        raise _fail(f"{path}.min_size", f"{group.min_size} exceeds connection_count "
                                        f"({group.connection_count}); allowed: 0 to "
                                        f"connection_count")
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
    "on_event": None,
}


def _endpoints(db: Any) -> tuple[EndpointConfig, ...]:
    entries = db if isinstance(db, (list, tuple)) else [db]
    if not entries:
        raise _fail("db", "the list of endpoints is empty")
    endpoints = tuple(parse_endpoint(f"db[{i}]", entry) for i, entry in enumerate(entries))
    seen: dict[str, int] = {}
    for i, ep in enumerate(endpoints):
        if ep.label in seen:  # stats, errors and group subsets name endpoints by label
            raise _fail(f"db[{i}]", f"{ep.label} is already db[{seen[ep.label]}]; "
                                    "list each server and database once")
        seen[ep.label] = i
    return endpoints


def parse_config(raw: Any) -> PoolConfig:
    """Validate a pgdbpool-style dictionary; raise :class:`ConfigError` naming the bad key."""
    if isinstance(raw, PoolConfig):
        return raw
    top = _mapping("config", raw)
    _reject_unknown("", top, _TOP_KEYS)
    top = environ.fill_top(top)
    mode = _choice("type", top.get("type", "auto"), MODES)

    if "db" not in top and not environ.has_host():
        raise _fail("db", "missing: give one endpoint (dict or DSN) or a list of them, or "
                          "set PGHOST")
    endpoints = _endpoints(top.get("db", {}))

    defaults = _mapping("defaults", top.get("defaults", {}))
    _reject_unknown("defaults", defaults, _GROUP_KEYS)
    groups_raw = _mapping("groups", top.get("groups", {"default": {}}))
    if not groups_raw:
        raise _fail("groups", "no group configured")
    groups = {}
    for name, spec in groups_raw.items():
        if not isinstance(name, str) or not name:
            raise _fail(f"groups.{_short.repr(name)}", "a group's name must be a non-empty string")
        groups[name] = parse_group(name, spec, defaults, endpoints)

    quarantine_initial = _number("quarantine_initial", top.get("quarantine_initial", 0.5),
                                 minimum=MIN_RETRY_SLEEP, maximum=3600.0)
    quarantine_max = _number("quarantine_max", top.get("quarantine_max", 30.0),
                             minimum=MIN_RETRY_SLEEP, maximum=DAY)
    if quarantine_initial > quarantine_max:
        raise _fail("quarantine_initial", f"{quarantine_initial:g} exceeds quarantine_max "
                                          f"({quarantine_max:g}); allowed: up to quarantine_max")
    return PoolConfig(
        mode=mode,
        endpoints=endpoints,
        groups=groups,
        application_name=_text("application_name", top.get("application_name", "greenpool")),
        maintenance_interval=_number(
            "maintenance_interval", top.get("maintenance_interval", 1.0), minimum=0.01,
            maximum=3600.0,
        ),
        quarantine_initial=quarantine_initial,
        quarantine_max=quarantine_max,
        role_check_interval=_number(
            "role_check_interval", top.get("role_check_interval", 2.0), minimum=0.01,
            maximum=3600.0,
        ),
        startup_timeout=_number("startup_timeout", top.get("startup_timeout", 0.0),
                                maximum=3600.0),
        on_event=_event_callback("on_event", top.get("on_event")),
    )
