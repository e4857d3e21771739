"""``greenpool check CONFIG``: can every group get a connection, and from which endpoint?

Connects once to each endpoint (with the pool's own connect deadline, so a hung server
costs ``connect_timeout``, not forever) and prints a table: reachable, server version,
detected role, replay lag, round-trip time, TLS. Then one line per group. The exit status
is 0 only when every group has at least one eligible endpoint.

CONFIG is a ``.json``, ``.toml`` or ``.py`` file (the Python file defines ``CONFIG``), or,
with no argument, the environment: ``GREENPOOL_CONFIG`` (the configuration as JSON) or
``GREENPOOL_DSN`` (one endpoint, one group called ``default``).
"""

from __future__ import annotations

import json
import os
import runpy
import time
from typing import Any

from .config import PoolConfig, parse_config
from .connection import ConnectError, connect_kwargs, open_connection
from .endpoint import PRIMARY, STANDBY, UNKNOWN
from .errors import ConfigError
from .roles import fits, query_role, role_of


class CheckFailed(Exception):
    """A problem the user must fix, said in one sentence (no traceback)."""


def load_config(path: str | None) -> dict[str, Any]:
    """The configuration from a file, or from the environment when ``path`` is None."""
    if path is None:
        if os.environ.get("GREENPOOL_CONFIG"):
            return _json(os.environ["GREENPOOL_CONFIG"], "GREENPOOL_CONFIG")
        if os.environ.get("GREENPOOL_DSN"):
            return {"db": os.environ["GREENPOOL_DSN"]}
        raise CheckFailed("no configuration: give a file, or set GREENPOOL_CONFIG or "
                          "GREENPOOL_DSN")
    if not os.path.exists(path):
        raise CheckFailed(f"{path}: no such file")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            return _json(handle.read(), path)
    if path.endswith(".toml"):
        import tomllib

        with open(path, "rb") as handle:
            try:
                return tomllib.load(handle)
            except tomllib.TOMLDecodeError as exc:
                raise CheckFailed(f"{path}: not valid TOML ({exc})") from None
    if path.endswith(".py"):
        namespace = runpy.run_path(path)
        if "CONFIG" not in namespace:
            raise CheckFailed(f"{path}: define the configuration as a variable named CONFIG")
        return dict(namespace["CONFIG"])
    raise CheckFailed(f"{path}: expected a .json, .toml or .py file")


def _json(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckFailed(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckFailed(f"{where}: expected a JSON object")
    return value


def _probe(config: PoolConfig, index: int) -> dict[str, Any]:
    from .concurrency import backend_for

    endpoint = config.endpoints[index]
    group = next(iter(config.groups.values()))
    backend = backend_for(config.mode)
    row: dict[str, Any] = {"endpoint": endpoint.label, "reachable": False, "role": UNKNOWN,
                           "version": "", "lag": None, "rtt_ms": None, "tls": "", "error": ""}
    try:
        raw = open_connection(endpoint, group,
                              connect_kwargs(endpoint, group, f"{config.application_name}-check"),
                              backend, endpoint.connect_timeout)
    except ConnectError as exc:
        row["error"] = exc.reason
        return row
    try:
        started = time.perf_counter()
        role, lag = query_role(raw)
        row["rtt_ms"] = (time.perf_counter() - started) * 1000
        reported = role_of(raw)
        row.update(reachable=True, role=reported if reported != UNKNOWN else role,
                   lag=lag, version=raw.info.parameter_status("server_version") or "",
                   tls="yes" if raw.info.ssl_in_use else "no")
    except Exception as exc:
        row["error"] = str(exc).strip().splitlines()[0]
    finally:
        raw.close()
    return row


def run(path: str | None) -> int:
    try:
        config = parse_config(load_config(path))
    except ConfigError as exc:
        print(f"greenpool check: bad configuration: {exc}")
        return 2
    except CheckFailed as exc:
        print(f"greenpool check: {exc}")
        return 2
    if config.mode == "gevent":
        from gevent import monkey

        monkey.patch_all()
    rows = [_probe(config, i) for i in range(len(config.endpoints))]
    print(f"{'endpoint':<32} {'reachable':<9} {'version':<8} {'role':<8} {'lag s':>6} "
          f"{'rtt ms':>7} {'tls':<3}  error")
    for row in rows:
        lag = f"{row['lag']:.1f}" if row["lag"] is not None else "-"
        rtt = f"{row['rtt_ms']:.1f}" if row["rtt_ms"] is not None else "-"
        print(f"{row['endpoint']:<32} {'yes' if row['reachable'] else 'NO':<9} "
              f"{row['version'][:8]:<8} {row['role']:<8} {lag:>6} {rtt:>7} {row['tls']:<3}  "
              f"{row['error']}")
    failing = 0
    print()
    for name, group in config.groups.items():
        members = group.endpoints or tuple(range(len(rows)))
        eligible = [rows[i]["endpoint"] for i in members
                    if rows[i]["reachable"] and _eligible(group.role, rows[i], group.max_lag)]
        if not eligible:
            failing += 1
        status = f"ok via {', '.join(eligible)}" if eligible else "NO eligible endpoint"
        print(f"group {name!r} (role {group.role}): {status}")
    return 1 if failing else 0


def _eligible(group_role: str, row: dict[str, Any], max_lag: float | None) -> bool:
    role = row["role"]
    if group_role == "prefer-standby":
        return role in (PRIMARY, STANDBY, UNKNOWN)
    if not fits(group_role, role):
        return False
    lagging = max_lag is not None and row["lag"] is not None and row["lag"] > max_lag
    return not (group_role == "standby" and lagging)
