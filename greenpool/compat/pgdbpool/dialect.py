"""pgdbpool's words in greenpool's configuration: its key names, and the one unit it wrote
differently.

greenpool reads pgdbpool's configuration as it is (``type``, ``db``, ``name``, ``pass``…), so
code can switch pools by changing an import line; these are the only places that know
pgdbpool's names. Each maps onto a greenpool setting (a field of the settings dataclasses in
:mod:`greenpool.config`), which declares its default, bounds and documentation once.
This module imports nothing of greenpool's but the value checkers, so the configuration
can read it while it is itself being imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import checks

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
