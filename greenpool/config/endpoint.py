"""One server: the endpoint keys, declared once each, and how an entry of ``db`` is read."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from psycopg2.extensions import parse_dsn

from ..compat.pgdbpool import dialect as pgdbpool
from ..errors import ConfigError
from . import checks, environ
from .checks import SECRET_OPTIONS, fail, short
from .declare import Custom, Seconds, Text, Whole, declared, key_table, read, setting

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: what an endpoint is: PostgreSQL itself, or a pooler (PgBouncer) in that pool mode
POOLER_MODES = ("none", "session", "transaction")
#: A retry pause (and a first quarantine) shorter than this is a connect storm, not a backoff.
MIN_RETRY_SLEEP = 0.01

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
#: temp_buffers is at most 2**30 - 1 blocks of 8 kB.
_TEMP_BUFFERS_MAX_MB = (2**30 - 1) * 8 // 1024
_STATEMENT_TIMEOUT_MAX = pgdbpool.STATEMENT_TIMEOUT_MAX_MS / 1000.0

_MULTI_HOST = ("a libpq multi-host list cannot be used here (greenpool resolves and "
               "balances each server itself): list each server as its own entry of `db`")


def _host(path: str, value: Any) -> str:
    host = checks.text(path, value)
    if "," in host:
        raise fail(path, f"{short.repr(host)}: {_MULTI_HOST}")
    return str(host)


@dataclass(frozen=True)
class _Port(Whole):
    def __call__(self, path: str, value: Any) -> Any:
        if isinstance(value, str) and "," in value:
            raise fail(path, f"{short.repr(value)}: {_MULTI_HOST}")
        return super().__call__(path, value)


def _sslmode(path: str, value: Any) -> str | None:
    """pgdbpool took a bool or a libpq sslmode word; both keys accept both."""
    if value is None:
        return None
    if value is True:
        return "require"
    if value is False:
        return "disable"
    return checks.choice(path, value, SSLMODES)


def statement_timeout(path: str, value: Any) -> float | None:
    """Seconds; sent to the server as whole milliseconds, so below 1 ms would round to 0,
    which PostgreSQL reads as "no timeout". 0 itself is accepted and means exactly that."""
    seconds = checks.number(path, value, maximum=_STATEMENT_TIMEOUT_MAX, allow_none=True)
    if seconds is None or seconds == 0:
        return seconds
    if round(seconds * 1000) < 1:  # as greenpool.connection sends it
        raise fail(path, f"{value!r} s is below 1 ms and would round to 0, which turns the "
                         "timeout off; give at least 0.001 (or 0 to mean no timeout)")
    return float(seconds)


STATEMENT_TIMEOUT_ALLOWED = f"0, or 0.001 to {_STATEMENT_TIMEOUT_MAX} seconds, or `None`"


def _keepalives(path: str, value: Any) -> Mapping[str, int]:
    if value is True:
        return dict(DEFAULT_KEEPALIVES)
    if value is False:
        return {"keepalives": 0}
    given = checks.mapping(path, value)
    checks.reject_unknown(path, given, DEFAULT_KEEPALIVES)
    merged = dict(DEFAULT_KEEPALIVES)
    for key, item in given.items():
        merged[key] = checks.integer(f"{path}.{key}", item, maximum=_KEEPALIVE_MAX[key])
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


#: libpq parameters that are endpoint keys of their own: in ``options`` they would bypass
#: their checks (and the endpoint's label would lie about where it connects)
_OWN_KEYS = ("host", "port", "dbname", "user", "password", "sslmode", "connect_timeout")


def _options(path: str, value: Any) -> Mapping[str, str]:
    """Other libpq parameters: known keywords only, string or whole-number values."""
    given = checks.mapping(path, value)
    options: dict[str, str] = {}
    for key, item in given.items():
        if not isinstance(key, str) or not _libpq_knows(key):
            raise fail(f"{path}.{short.repr(key) if not isinstance(key, str) else key}",
                       "not a libpq connection parameter")
        where = f"{path}.{key}"
        if key in _OWN_KEYS:
            raise fail(where, f"give it as the endpoint key `{key}`, not in options")
        if isinstance(item, int) and not isinstance(item, bool):
            try:
                options[key] = str(item)
            except ValueError:  # beyond sys.get_int_max_str_digits(): no parameter's value
                raise fail(where, f"expected a string or a whole number; got "
                                  f"{short.repr(item)}") from None
        elif isinstance(item, str):
            if "\x00" in item:
                raise fail(where, "must not contain a NUL character")
            if key == "hostaddr" and "," in item:
                raise fail(where, _MULTI_HOST)
            options[key] = item
        else:
            raise fail(where, f"expected a string or a whole number; got "
                              f"{checks.shown(where, item)}")
    return options


def _keepalive_words() -> tuple[str, str]:
    """The reference's default and allowed text for ``keepalives``, from the values above."""
    on = DEFAULT_KEEPALIVES
    default = (f"on: {on['keepalives_idle']} s idle, {on['keepalives_interval']} s interval, "
               f"{on['keepalives_count']} probes")
    top = _KEEPALIVE_MAX
    allowed = (f"`True`/`False` or a dict: `keepalives` 0/1, `keepalives_idle` and "
               f"`keepalives_interval` 0 to {top['keepalives_idle']}, `keepalives_count` 0 to "
               f"{top['keepalives_count']}")
    return default, allowed


@dataclass(frozen=True, repr=False)
class EndpointConfig:
    """One PostgreSQL server. Its repr shows neither the password nor a secret option."""

    host: str = setting(check=Custom(_host, "non-empty string, no `,`"), doc=(
        "address, name, or Unix socket directory; names are resolved through gevent, so DNS "
        "never blocks the hub"), default_text="(required)")
    port: int = setting(5432, check=_Port(1, 65535), doc="TCP port")
    dbname: str = setting("postgres", check=Text(), doc="database")
    user: str | None = setting(None, check=Text(optional=True), doc="role to log in as",
                               default_text="libpq's")
    password: str | Callable[[], str | None] | None = setting(
        None, check=Custom(checks.password, (
            "string, a function taking no argument that returns one, or `None` (libpq's "
            "`.pgpass` may still supply one)")), secret=True, default_text="none", doc=(
            "never appears in errors, logs or reprs; a function is asked at each new "
            "connection (see [Credentials that change](operations.md#credentials-that-change))"))
    sslmode: str | None = setting(None, check=Custom(_sslmode, (
        "`True` (`require`), `False` (`disable`), an sslmode word (`disable` … "
        "`verify-full`), or `None`")), doc="TLS mode", default_text="libpq's")
    connect_timeout: float = setting(5.0, check=Seconds(0.001, 3600.0), doc=(
        "seconds per connect attempt, enforced by the pool in every mode; also bounds the "
        "pool's own round trips on return and in housekeeping"))
    retry_sleep: float | None = setting(
        None, check=Seconds(MIN_RETRY_SLEEP, 3600.0, optional=True), own_key=False,
        doc="first pause before this endpoint is tried again after a failed connect",
        default_text="`quarantine_initial`")
    statement_timeout: float | None = setting(
        None, check=Custom(statement_timeout, STATEMENT_TIMEOUT_ALLOWED), default_text="none",
        doc="statement timeout, in seconds; 0 means none")
    temp_buffers_mb: int | None = setting(
        None, check=Whole(1, _TEMP_BUFFERS_MAX_MB), own_key=False, doc="`temp_buffers` in MB",
        default_text="none")
    weight: int = setting(1, check=Whole(1, 1000), doc=(
        "share of connections, and of borrows, when a group spans several endpoints"))
    keepalives: Mapping[str, int] = setting(
        factory=lambda: dict(DEFAULT_KEEPALIVES),
        check=Custom(_keepalives, _keepalive_words()[1]), default_text=_keepalive_words()[0],
        doc="TCP keepalives, so a vanished peer is noticed in about a minute")
    options: Mapping[str, str] = setting(
        factory=dict, check=Custom(_options, "dict of libpq parameter to string or whole "
                                             "number"), doc=(
            "any other libpq connection parameter; unknown names (libpq is asked) and those "
            "with a key of their own are refused; `password`/`sslpassword` values are hidden"))
    #: None: not said (a pooler is detected by its refusal of ``options``); else ``none``
    #: (PostgreSQL itself), ``session`` or ``transaction`` (a pooler in that pool mode)
    pooler: str | None = setting(
        None, check=Custom(lambda p, v: checks.choice(p, v, POOLER_MODES),
                           ", ".join(f"`{m}`" for m in POOLER_MODES)),
        default_text="detected", doc=(
            "the endpoint is PostgreSQL itself, or a pooler (PgBouncer) in that pool mode; "
            "without the key a refusal of `options` marks it `transaction`"))

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
            if f.metadata["setting"].secret:
                value = None if value is None else "***"
            elif f.name == "options":
                value = {k: ("***" if k in SECRET_OPTIONS else v) for k, v in value.items()}
            shown.append(f"{f.name}={value!r}")
        return f"EndpointConfig({', '.join(shown)})"

    __str__ = __repr__


#: every key of an entry of ``db``: greenpool's, then pgdbpool's
KEYS = key_table(EndpointConfig, pgdbpool.ENDPOINT_KEYS, pgdbpool.ENDPOINT_TRANSLATIONS)
_SETTING_OF = {key: found.field for key, found in KEYS.items()}


# --- reading an entry of ``db`` -----------------------------------------------------------

_DSN_NUMERIC = ("port", "connect_timeout")


#: libpq's DSN parse errors, less the token of the DSN each quotes (it may be the password).
#: The token may hold a `"` itself, so quotes cannot be paired: each form is matched whole.
_LIBPQ_DSN_ERRORS = (
    (re.compile(r'missing "=" after ".*" in connection info string'),
     'missing "=" after a word in connection info string'),
    (re.compile(r'invalid connection option ".*"'), "invalid connection option"),
    (re.compile(r'unexpected character ".*" at position (\d+) in URI '
                r'\(expected ":" or "/"\): ".*"'),
     r'unexpected character at position \1 in URI (expected ":" or "/")'),
    # "invalid percent-encoded token: …", "missing key/value separator "=" in URI …: …"
    (re.compile(r'([^"]*(?:"[=\]]"[^"]*)?): ".*"'), r"\1"),
)


def _masked(libpq_message: str) -> str:
    """libpq's DSN parse error without the DSN's token it quotes; a form not known here is
    left out whole if it quotes anything."""
    first = libpq_message.strip().splitlines()[0] if libpq_message.strip() else ""
    for form, without_token in _LIBPQ_DSN_ERRORS:
        found = form.fullmatch(first)
        if found:
            return found.expand(without_token)
    return "" if '"' in first else first


#: said whenever a value read from a DSN is refused: it is not shown, since a password with
#: an unencoded ``@`` or ``/`` makes libpq read part of it as the host, port or database
_DSN_HIDDEN = ("the value is not shown because the DSN may hold the password; in a "
               "postgresql:// URI, write `@`, `/` and `:` in a user name, password or "
               "database name percent-encoded (`%40`, `%2F`, `%3A`)")
_URI_PREFIXES = ("postgresql://", "postgres://")  # libpq's, matched as libpq does


def _uri_splits_credentials(dsn: str) -> bool:
    """Whether libpq reads part of a URI's user name or password as its host, port or
    database. libpq takes the credentials up to the first ``@``, and only when no ``/``
    comes first; an ``@`` left after them, before the query, was one of theirs."""
    prefix = next((p for p in _URI_PREFIXES if dsn.startswith(p)), None)
    if prefix is None:
        return False
    body = dsn[len(prefix):]
    ends = [i for i in (body.find("@"), body.find("/")) if i >= 0]
    if ends and body[min(ends)] == "@":
        body = body[min(ends) + 1:]
    return "@" in body.split("?", 1)[0]


def _dsn_to_keys(path: str, dsn: str) -> dict[str, Any]:
    """A libpq DSN or URI as endpoint keys: the parameters with a key of their own, and the
    rest in ``options``. No error shows a value of the DSN (see ``_DSN_HIDDEN``)."""
    # The raise happens outside the ``except``: libpq's error must not even be the
    # ``__context__`` of ours, since its message echoes the DSN's tokens.
    problem = None
    try:
        parsed = parse_dsn(dsn)
    except Exception as exc:  # psycopg2.ProgrammingError
        problem = _masked(str(exc).removeprefix("invalid dsn: "))
    if problem is not None:
        detail = f" (libpq: {problem})" if problem else ""
        raise fail(path, f"not a valid libpq DSN or postgresql:// URI{detail}; the DSN "
                         "is not shown because it may hold the password")
    if _uri_splits_credentials(dsn):
        raise fail(path, "an `@` after the URI's user name and password: libpq would read "
                         f"part of them as the host or database; {_DSN_HIDDEN}")
    keys: dict[str, Any] = {}
    options: dict[str, str] = {}
    for key, value in parsed.items():
        if key in ("host", "hostaddr", "port") and "," in value:
            raise fail(f"{path}.{key}", f"{_MULTI_HOST}; {_DSN_HIDDEN}")
        if key in _DSN_NUMERIC:
            number = int(value) if re.fullmatch(r"\s*[0-9]{1,9}\s*", value) else None
            if number is None:
                raise fail(f"{path}.{key}", f"expected a whole number; {_DSN_HIDDEN}")
            keys[key] = number
        elif key in _OWN_KEYS:
            keys[key] = value
        else:
            options[key] = value
    if options:
        keys["options"] = options
    return keys


def _given(path: str, raw: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """The keys of one ``db`` entry: a dict, a DSN string, or a dict with ``dsn`` whose own
    keys override the DSN's (and whose ``options`` add to the DSN's); and which of them
    were read from the DSN alone."""
    if isinstance(raw, str):
        keys = _dsn_to_keys(path, checks.text(f"{path}.dsn", raw))
        return keys, frozenset(keys)
    given = dict(checks.mapping(path, raw))
    if "dsn" not in given:
        return given, frozenset()
    from_dsn = _dsn_to_keys(f"{path}.dsn", checks.text(f"{path}.dsn", given.pop("dsn")))
    if "options" in from_dsn and "options" in given:
        extra = checks.mapping(f"{path}.options", given["options"])
        given["options"] = {**from_dsn.pop("options"), **extra}
    explicit = {KEYS[key].field for key in given if key in KEYS}
    kept = {key: value for key, value in from_dsn.items() if KEYS[key].field not in explicit}
    return {**kept, **given}, frozenset(kept)


def _read_dsn_values(path: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a DSN gave, checked like any key, but refused without their value."""
    refused = None
    try:
        return read(path, given, KEYS)
    except ConfigError:
        # which key: the first the checks refuse (read checks them in this order)
        refused = next((key for key in given if not _accepts(path, key, given[key])), None)
    # raised outside the ``except``: the checker's message, which shows the value, must
    # not even be our error's ``__context__``
    if refused is None:
        raise fail(path, f"the DSN's settings are not valid; {_DSN_HIDDEN}")
    allowed = declared(EndpointConfig)[KEYS[refused].field].allowed
    raise fail(f"{path}.{refused}", f"not valid (allowed: {allowed}); {_DSN_HIDDEN}")


def _accepts(path: str, key: str, value: Any) -> bool:
    try:
        KEYS[key].check(f"{path}.{key}", value)
    except ConfigError:
        return False
    return True


def parse_endpoint(path: str, raw: Any) -> EndpointConfig:
    """One entry of ``db``: a pgdbpool dict, a dict with ``dsn``, or a DSN/URI string."""
    given, dsn_keys = _given(path, raw)
    # libpq's PG* variables fill the gaps
    given, sources = environ.fill_endpoint(given, setting_of=_SETTING_OF)
    checks.reject_unknown(path, given, KEYS)
    values = _read_dsn_values(path, {k: v for k, v in given.items() if k in dsn_keys})
    values.update(read(path, {k: v for k, v in given.items() if k not in dsn_keys}, KEYS,
                       where=lambda key: environ.where(path, key, sources)))
    if "host" not in values:
        raise fail(f"{path}.host", "missing: the server's address (or a Unix socket directory)"
                                   "; give it, or set PGHOST")
    if values.get("pooler") in ("session", "transaction") and "temp_buffers_mb" in values:
        raise fail(f"{path}.session_tmp_buffer", "temp_buffers cannot travel through a pooler "
                   "(it is fixed once a session has used a temporary table): set it on the "
                   "server with ALTER ROLE ... SET temp_buffers, or drop this key")
    return EndpointConfig(**values)
