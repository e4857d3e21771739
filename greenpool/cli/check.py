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

import time
from typing import Any

from ..config import PoolConfig
from ..connection import ConnectError, connect_kwargs, open_connection, statement_timeout_ms
from ..endpoint import PRIMARY, STANDBY, UNKNOWN
from ..pooler import (
    NONE,
    mode_of,
    prefix_verdict,
    read_server_defaults,
    trusts_server_defaults,
)
from ..primary_wal import PrimaryWal
from ..roles import fits, read_role, role_of
from .config_file import read_config
from .process import FAILED, OK, first_line

PROBE_QUERY_SECONDS = 5.0  # the role/version queries of a probe, after its connect


def _probe(config: PoolConfig, index: int) -> dict[str, Any]:
    import gevent

    endpoint = config.endpoints[index]
    row: dict[str, Any] = {"endpoint": endpoint.label, "reachable": False, "role": UNKNOWN,
                           "version": "", "lag": None, "rtt_ms": None, "tls": "", "error": ""}
    budget = endpoint.connect_timeout + PROBE_QUERY_SECONDS
    try:
        with gevent.Timeout(budget, False):  # a stalled server costs the budget, not forever
            _probe_into(row, config, index)
            return row
        row["error"] = f"no answer within {budget:.1f} s"
    except Exception as exc:  # any failure is this endpoint's row, not a crash
        row["reachable"] = False
        row["error"] = first_line(exc)
    return row


def _probe_into(row: dict[str, Any], config: PoolConfig, index: int) -> None:
    from ..concurrency.modes import backend_for

    endpoint = config.endpoints[index]
    group = next(iter(config.groups.values()))
    try:
        raw = open_connection(endpoint, group,
                              connect_kwargs(endpoint, group, f"{config.application_name}-check"),
                              backend_for("gevent"), endpoint.connect_timeout)
    except ConnectError as exc:
        row["error"] = " ".join(exc.reason.split())
        return
    try:
        started = time.perf_counter()
        report = read_role(raw)
        role, lag = report.role, report.lag
        row["rtt_ms"] = (time.perf_counter() - started) * 1000
        row["report"], row["answered_at"] = report, time.monotonic()
        reported = role_of(raw)
        if mode_of(endpoint) != NONE:  # what the server enforces behind the pooler
            row["server_defaults"] = read_server_defaults(raw)
        row.update(reachable=True, role=reported if reported != UNKNOWN else role,
                   lag=lag, version=_short_version(raw.info.parameter_status("server_version")),
                   tls="yes" if raw.info.ssl_in_use else "no")
    finally:
        raw.close()


def run(path: str | None) -> int:
    """Probe every endpoint at once; the exit status says whether every group can serve.

    The probes run concurrently on gevent whatever the configuration's mode (this process
    is not the application), so the whole check takes one connect timeout plus
    ``PROBE_QUERY_SECONDS`` at most.
    """
    from gevent import monkey

    monkey.patch_all()
    import gevent

    config = read_config(path)
    tasks = [gevent.spawn(_probe, config, i) for i in range(len(config.endpoints))]
    try:
        gevent.joinall(tasks, raise_error=True)
    finally:
        gevent.killall(tasks)
    rows = [task.value for task in tasks]
    _vouch_for_standbys(rows)
    print(f"{'endpoint':<32} {'reachable':<9} {'version':<8} {'role':<8} {'lag s':>6} "
          f"{'rtt ms':>7} {'tls':<3}  error")
    for row in rows:
        lag = f"{row['lag']:.1f}" if row["lag"] is not None else "-"
        rtt = f"{row['rtt_ms']:.1f}" if row["rtt_ms"] is not None else "-"
        print(f"{row['endpoint']:<32} {'yes' if row['reachable'] else 'NO':<9} "
              f"{row['version']:<8} {row['role']:<8} {lag:>6} {rtt:>7} {row['tls']:<3}  "
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
        for i in members:  # through a pooler: must the settings travel per transaction?
            if rows[i].get("server_defaults") is not None:
                print(f"  through {rows[i]['endpoint']}: " + prefix_verdict(
                    statement_timeout_ms(config.endpoints[i], group), group.readonly,
                    rows[i]["server_defaults"],
                    trusts_server_defaults(config.endpoints[i], group.reset)))
    return FAILED if failing else OK


def _vouch_for_standbys(rows: list[dict[str, Any]]) -> None:
    """A standby that replayed all it received is at most as far behind as the time since
    a primary, probed alongside, was at a position it has (``primary_wal``)."""
    seen = PrimaryWal()
    for row in rows:
        report = row.get("report")
        if report is not None and report.lsn is not None and report.system is not None:
            seen.saw(report.system, report.timeline, report.lsn, report.asked_at)
    for row in rows:
        report = row.get("report")
        if report is not None and report.caught_up is not None and report.system is not None:
            reached = seen.reached_at(report.system, report.caught_up)
            bound = max(0.0, row["answered_at"] - reached)
            row["lag"] = min(row["lag"], bound)


def _eligible(group_role: str, row: dict[str, Any], max_lag: float | None) -> bool:
    role = row["role"]
    if group_role == "prefer-standby":
        return role in (PRIMARY, STANDBY, UNKNOWN)
    if not fits(group_role, role):
        return False
    lagging = max_lag is not None and row["lag"] is not None and row["lag"] > max_lag
    return not (group_role == "standby" and lagging)


def _short_version(reported: str | None) -> str:
    """``15.18`` of ``15.18 (Debian 15.18-0+deb12u1)``: the number, whole, whatever its length."""
    return (reported or "").split(" ", 1)[0]
