"""pgdbpool's configuration dialect: its key names, the one unit it wrote differently, and
the defaults and keys of its own that its API (:mod:`.pool`) carries over.

greenpool reads pgdbpool's configuration as it is (``type``, ``db``, ``name``, ``pass``…), so
code can switch pools by changing an import line; this module is the one place that knows
pgdbpool's names. Each maps onto a greenpool setting (a field of the settings dataclasses in
:mod:`greenpool.config`), which declares its default, bounds and documentation once.
It imports nothing of greenpool's but the value checkers and the errors, so the
configuration can read it while it is itself being imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...config import checks
from ...errors import ConfigError

#: pgdbpool's top-level key -> the PoolConfig field it sets
TOP_KEYS = {"type": "mode", "db": "endpoints"}

#: pgdbpool's key in an entry of ``db`` -> the EndpointConfig field it sets
ENDPOINT_KEYS = {
    "name": "dbname",
    "pass": "password",
    "ssl": "sslmode",
    "query_timeout": "statement_timeout",
    "connection_retry_sleep": "retry_sleep",
    "session_tmp_buffer": "temp_buffers_mb",
}

#: PostgreSQL's statement_timeout is an int of milliseconds.
STATEMENT_TIMEOUT_MAX_MS = 2**31 - 1


@dataclass(frozen=True)
class QueryTimeout:
    """pgdbpool passes ``query_timeout`` straight to ``statement_timeout``: milliseconds,
    kept by greenpool in seconds. Below 1 ms would round to 0, which turns it off."""

    allowed: str = f"0, or 1 to {STATEMENT_TIMEOUT_MAX_MS} ms"
    doc: str = ("pgdbpool's, in **milliseconds** (below 1 ms refused: it would round to 0, "
                "which turns it off)")

    def __call__(self, path: str, value: Any) -> float:
        ms = checks.number(path, value, maximum=STATEMENT_TIMEOUT_MAX_MS, unit="milliseconds")
        if 0 < ms < 1:
            raise checks.fail(path, f"{value!r} ms would round to 0, which turns the timeout "
                                    "off; give at least 1 (or 0 to mean no timeout)")
        return float(ms) / 1000.0


#: pgdbpool's keys read in a unit of their own: the checker that gives greenpool's value
ENDPOINT_TRANSLATIONS = {"query_timeout": QueryTimeout()}


# --- pgdbpool's own defaults, for its API (Connection.init) -------------------------------

#: pgdbpool's ``type`` when none is given, and its words for the concurrency mode
DEFAULT_TYPE = "threaded"
TYPES = ("threaded", "non-threaded", "gevent", "eventlet")
#: pgdbpool's defaults, applied through libpq's PGOPTIONS to every connection of the process:
#: a 5 s statement_timeout and 128 MB of temp_buffers. Kept (per connection, not by
#: rewriting the process environment) since pgdbpool code relies on them without knowing.
DEFAULT_QUERY_TIMEOUT_MS = 5000
DEFAULT_SESSION_TMP_BUFFER_MB = 128
#: keys pgdbpool writes into the caller's config dict; ignored if a used dict comes back
_PGDBPOOL_INTERNAL = ("connections", "connection_iter")


def _endpoint(entry: Any, first: Mapping[str, Any]) -> Any:
    """One ``db`` entry with pgdbpool's session defaults, taken from the first entry as
    pgdbpool does (it sets them once for the whole process) unless the entry has its own."""
    if isinstance(entry, str):
        entry = {"dsn": entry}
    if not isinstance(entry, Mapping):
        return entry  # parse_config names the problem
    entry = dict(entry)
    if "query_timeout" not in entry and "statement_timeout" not in entry:
        entry["query_timeout"] = first.get("query_timeout", DEFAULT_QUERY_TIMEOUT_MS)
    # temp_buffers cannot travel through a pooler (the config refuses the key there): the
    # default is left out for an endpoint that says it is one, a key the user gave is not
    behind_pooler = entry.get("pooler") in ("session", "transaction")
    if "session_tmp_buffer" not in entry and not behind_pooler:
        entry["session_tmp_buffer"] = first.get("session_tmp_buffer",
                                                DEFAULT_SESSION_TMP_BUFFER_MB)
    return entry


def _group(name: str, spec: Any) -> Any:
    if not isinstance(spec, Mapping):
        return spec
    spec = {k: v for k, v in spec.items() if k not in _PGDBPOOL_INTERNAL}
    if spec.pop("sqlprepare", False):
        raise ConfigError(
            f"groups.{name}.sqlprepare: not supported: it needs WEBcodeX1's pg_extensions "
            f"prepared-query functions run on every new connection; remove the key (or set "
            f"it to false) and call the functions with db.query()"
        )
    return spec


def translate(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """pgdbpool's ``type`` word and the greenpool config for ``config`` (mode unresolved:
    ``type`` is left out), with pgdbpool's session defaults. The caller's dict is not
    changed."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a dictionary, got {type(config).__name__}")
    raw = {k: v for k, v in config.items() if k != "type"}
    kind = config.get("type", DEFAULT_TYPE)
    if kind not in TYPES:
        raise ConfigError(f"type: expected {', '.join(TYPES[:-1])} or {TYPES[-1]}; "
                          f"got {checks.short.repr(kind)}")
    db = raw.get("db")
    if db is not None:
        entries = list(db) if isinstance(db, (list, tuple)) else [db]
        first = entries[0] if entries and isinstance(entries[0], Mapping) else {}
        raw["db"] = [_endpoint(entry, first) for entry in entries]
    groups = raw.get("groups")
    if isinstance(groups, Mapping):
        raw["groups"] = {name: _group(name if isinstance(name, str) else
                                      checks.short.repr(name), spec)
                         for name, spec in groups.items()}
    return str(kind), raw
