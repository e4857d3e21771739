"""Configuration: pgdbpool's format in, validated immutable settings out.

The input is pgdbpool's dictionary (``type``, ``db``, ``groups``) so its users can switch
without rewriting their config; every key greenpool adds has a default. Validation happens
once, up front, and covers every key: type, range, finiteness, units and the rules between
keys. Anything wrong is a :class:`ConfigError` that names the key, the value (never a secret's)
and what is allowed, raised by :func:`parse_config` (so by ``Pool()``), never a late
``KeyError``/``OverflowError`` inside a request.

Each key is declared once, as a field of the settings it fills (:mod:`.declare`): default,
checker with bounds and unit, other names, secret flag, documentation. The parser, its error
messages and the configuration reference (docs/_ext/configref.py) all read those fields.
pgdbpool's own key names live in :mod:`greenpool.compat.pgdbpool.dialect`.

The checks are hand-written rather than a schema library's: the format has aliases
(``pass``/``password``, ``name``/``dbname``), DSN strings, pgdbpool's millisecond
``query_timeout`` and secrets that must never be echoed, and a pool library should not pull
a large dependency (pydantic and its compiled core) into every application for a table of
~40 keys checked once at startup.

Modules: :mod:`.checks` (value checkers), :mod:`.declare` (what a declaration is),
:mod:`.endpoint`, :mod:`.group`, :mod:`.top` (each section's keys and reader),
:mod:`.environ` (libpq's ``PG*`` variables).
"""

from __future__ import annotations

from ..errors import ConfigError
from .checks import DAY, SECRET_OPTIONS
from .declare import Key, Setting, declared, default_of
from .endpoint import (
    DEFAULT_KEEPALIVES,
    MIN_RETRY_SLEEP,
    POOLER_MODES,
    SSLMODES,
    EndpointConfig,
    parse_endpoint,
)
from .endpoint import KEYS as ENDPOINT_KEYS
from .group import (
    CONNECTIONS_MAX,
    LAG_POLICIES,
    RESET_POLICIES,
    ROLES,
    ROW_FACTORIES,
    GroupConfig,
    parse_group,
)
from .group import KEYS as GROUP_KEYS
from .top import DEFAULT_GROUP, MODES, TOP_ONLY_KEYS, PoolConfig, parse_config
from .top import KEYS as TOP_KEYS

__all__ = [
    "CONNECTIONS_MAX",
    "DAY",
    "DEFAULT_GROUP",
    "DEFAULT_KEEPALIVES",
    "ENDPOINT_KEYS",
    "GROUP_KEYS",
    "LAG_POLICIES",
    "MIN_RETRY_SLEEP",
    "MODES",
    "POOLER_MODES",
    "RESET_POLICIES",
    "ROLES",
    "ROW_FACTORIES",
    "SECRET_OPTIONS",
    "SSLMODES",
    "TOP_KEYS",
    "TOP_ONLY_KEYS",
    "ConfigError",
    "EndpointConfig",
    "GroupConfig",
    "Key",
    "PoolConfig",
    "Setting",
    "declared",
    "default_of",
    "parse_config",
    "parse_endpoint",
    "parse_group",
]
