"""libpq's environment variables fill what the configuration leaves out.

libpq users set ``PGHOST``, ``PGPORT``, ``PGPASSWORD``… and expect every client to honour
them; pgdbpool's config has no ``port`` at all, so its users set ``PGPORT``. libpq reads these
variables itself only for parameters the caller does not pass, and greenpool always passes
``host``, ``port``, ``dbname``, ``connect_timeout``, ``application_name`` and, when it has
session settings, ``options``. So the variables for those (and the ones greenpool must know
itself: the password, to scrub it from driver messages; ``sslmode``, to check it) are read
here, into the configuration, where they are validated like any key (an error names the
variable) and hidden like any secret.

Every other libpq variable (``PGSSLROOTCERT``, ``PGSSLCERT``, ``PGPASSFILE``, ``PGSERVICE``,
``PGGSSENCMODE``, …) concerns a parameter greenpool never passes, so libpq applies it as
usual, untouched.

A key given in the configuration always wins over the environment; an empty variable counts
as unset.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("greenpool")

#: variable -> the endpoint setting (greenpool's key for it) it fills when none of its keys
#: is given
ENDPOINT_VARIABLES: dict[str, str] = {
    "PGHOST": "host",
    "PGPORT": "port",
    "PGDATABASE": "dbname",
    "PGUSER": "user",
    "PGPASSWORD": "password",
    "PGSSLMODE": "sslmode",
    "PGCONNECT_TIMEOUT": "connect_timeout",
}
#: ``options`` is sent whenever greenpool has session settings, so libpq would drop it
OPTION_VARIABLES: dict[str, str] = {"PGOPTIONS": "options"}
#: top-level keys
TOP_VARIABLES: dict[str, str] = {"PGAPPNAME": "application_name"}

Sources = dict[str, str]  # filled key -> the variable it came from


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value else None


def _converted(name: str, value: str) -> Any:
    """Numbers as the config wants them; anything else stays a string for the config's own
    check to reject, naming the variable."""
    stripped = value.strip()  # also \x1c-\x1f, which int() does not take
    if name == "PGPORT" and re.fullmatch(r"[0-9]{1,9}", stripped):
        return int(stripped)
    if name == "PGCONNECT_TIMEOUT" and re.fullmatch(r"-?[0-9]{1,9}", stripped):
        return int(stripped)
    return value


def fill_endpoint(
    given: Mapping[str, Any], env: Mapping[str, str] | None = None,
    setting_of: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], Sources]:
    """``given`` (one ``db`` entry) with the environment's values for the settings it leaves
    out, and where each filled value came from. ``setting_of`` maps a key to the setting it
    sets (pgdbpool's ``pass`` to ``password``; by default, as the endpoint keys do); a key
    it does not map sets its namesake."""
    env = os.environ if env is None else env
    setting_of = _endpoint_settings() if setting_of is None else setting_of
    filled = dict(given)
    present = {setting_of.get(key, key) for key in filled}
    sources: Sources = {}
    for name, key in ENDPOINT_VARIABLES.items():
        value = _get(env, name)
        if value is None or key in present:
            continue
        converted = _converted(name, value)
        if name == "PGCONNECT_TIMEOUT" and isinstance(converted, int) and converted <= 0:
            # libpq reads 0 as "wait for ever"; every greenpool connect has a deadline
            logger.warning("PGCONNECT_TIMEOUT=%s (no timeout) ignored: greenpool bounds "
                           "every connect and keeps its default", value)
            continue
        filled[key] = converted
        sources[key] = name
    for name, option in OPTION_VARIABLES.items():
        value = _get(env, name)
        options = filled.get("options", {})
        if value is None or not isinstance(options, Mapping) or option in options:
            continue
        filled["options"] = {**options, option: value}
        sources["options"] = name
    return filled, sources


def _endpoint_settings() -> dict[str, str]:
    """Endpoint key -> the setting it sets, from the declarations (imported here: the
    endpoint module reads this one while it loads)."""
    from .endpoint import KEYS

    return {key: found.field for key, found in KEYS.items()}


def fill_top(given: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The top-level keys, with ``PGAPPNAME`` as the ``application_name`` if none is given."""
    env = os.environ if env is None else env
    filled = dict(given)
    for name, key in TOP_VARIABLES.items():
        value = _get(env, name)
        if value is not None and key not in filled:
            filled[key] = value
    return filled


def has_host(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``PGHOST`` names a server, so a config without ``db`` can still connect."""
    return _get(os.environ if env is None else env, "PGHOST") is not None


def where(path: str, key: str, sources: Sources) -> str:
    """How a key is named in an error: ``$PGPORT as db[0].port`` for one from the
    environment. It ends with the key, so secrets are still recognised by name."""
    return f"${sources[key]} as {path}.{key}" if key in sources else f"{path}.{key}"
