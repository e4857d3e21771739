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
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .config import PoolConfig, parse_config
from .connection import ConnectError, _statement_timeout_ms, connect_kwargs, open_connection
from .endpoint import PRIMARY, STANDBY, UNKNOWN
from .errors import ConfigError
from .pooler import (
    NONE,
    mode_of,
    prefix_verdict,
    read_server_defaults,
    trusts_server_defaults,
)
from .roles import fits, query_role, role_of

# The exit statuses of every ``greenpool`` command (the README's command table lists them).
OK = 0  # done; check: every group has an eligible endpoint
FAILED = 1  # it ran and found a failure: check: a group without endpoint; bench: nothing served
BAD_INPUT = 2  # bad command line or configuration
UNREACHABLE = 3  # the database (or the throwaway servers) could not be reached or started
BUG = 4  # an unexpected error inside greenpool
# interrupted by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)

PROBE_QUERY_SECONDS = 5.0  # the role/version queries of a probe, after its connect


class CheckFailed(Exception):
    """A problem the user must fix, said in one sentence (no traceback); ``status`` is the
    exit status the command ends with."""

    def __init__(self, message: str, status: int = BAD_INPUT) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status


class Interrupted(SystemExit):
    """SIGINT/SIGTERM/SIGHUP, raised where the process happens to be so cleanup runs.

    A ``SystemExit`` because gevent's hub passes those to the main greenlet without printing
    a traceback, wherever the signal handler ran (hub, main or another greenlet).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # signals since signals_as_exceptions() began
_held: list[int] = []  # the first signal, if it came inside shielded() and is not raised yet
_shields = 0  # > 0 inside shielded()


@contextmanager
def signals_as_exceptions() -> Iterator[list[int]]:
    """The first SIGINT/SIGTERM/SIGHUP raises :class:`Interrupted`; later ones are only
    recorded (in the yielded list), so the cleanup the first one started runs to its end."""

    def on_signal(signum: int, frame: Any) -> None:
        _received.append(signum)
        if len(_received) == 1:
            if _shields:
                _held.append(signum)
            else:
                raise Interrupted(signum)

    del _received[:], _held[:]
    previous = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
    try:
        yield _received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that a signal must not cut short (stopping servers, closing a pool): the
    first signal arriving inside is held, then raised as :class:`Interrupted` once the
    outermost shielded block is done."""
    global _shields
    _shields += 1
    try:
        yield
    finally:
        _shields -= 1
        if not _shields and _held:
            raise Interrupted(_held.pop())


_progress_line = [False]  # stdout ends in a progress line (no newline after it yet)


def write_progress(text: str) -> None:
    """Rewrite the live progress line (a carriage return, no newline)."""
    sys.stdout.write(f"\r{text}")
    sys.stdout.flush()
    _progress_line[0] = True


def end_progress() -> None:
    """End the progress line, if one is open: what follows (a report, or a sentence on
    stderr such as "interrupted") starts on a line of its own."""
    if _progress_line[0]:
        _progress_line[0] = False
        sys.stdout.write("\n")
        sys.stdout.flush()


def load_config(path: str | None) -> Mapping[str, Any] | PoolConfig:
    """The configuration from a file, or from the environment when ``path`` is None.

    Every way a file can be wrong (missing, a directory, unreadable, not UTF-8, not
    JSON/TOML, a ``.py`` that raises or exits, ``CONFIG`` missing or not a mapping) is a
    :class:`CheckFailed` naming the file and the problem.
    """
    if path is None:
        if os.environ.get("GREENPOOL_CONFIG"):
            return _json(os.environ["GREENPOOL_CONFIG"], "GREENPOOL_CONFIG")
        if os.environ.get("GREENPOOL_DSN"):
            return {"db": os.environ["GREENPOOL_DSN"]}
        raise CheckFailed("no configuration: give a file, or set GREENPOOL_CONFIG or "
                          "GREENPOOL_DSN")
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".json", ".toml", ".py"):
        raise CheckFailed(f"{path}: expected a .json, .toml or .py file")
    if kind == ".py":
        _readable(path)
        return _python(path)
    text = _text(path, _readable(path))
    if kind == ".json":
        return _json(text, path)
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CheckFailed(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise CheckFailed(f"{path}: not valid TOML (nested too deeply)") from None


def read_config(path: str | None) -> PoolConfig:
    """:func:`load_config`, parsed and validated; any problem is a :class:`CheckFailed`."""
    raw = load_config(path)
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise CheckFailed(f"bad configuration: {exc}") from None
    except (RecursionError, TypeError, ValueError, AttributeError, KeyError) as exc:
        # parse_config should say ConfigError for every bad value; until it does, one sentence
        raise CheckFailed(f"bad configuration: {type(exc).__name__}: {exc}") from None


def _readable(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise CheckFailed(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckFailed(f"{path}: is a directory, not a configuration file") from None
    except PermissionError:
        raise CheckFailed(f"{path}: cannot read it (permission denied)") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise CheckFailed(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})"
                          ) from None


def _text(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CheckFailed(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start})") from None


def _python(path: str) -> Mapping[str, Any] | PoolConfig:
    try:
        namespace = runpy.run_path(path, run_name="greenpool_config")
    except (Interrupted, KeyboardInterrupt):
        raise
    except SystemExit as exc:
        raise CheckFailed(f"{path}: called sys.exit({exc.code!r}) instead of defining "
                          "CONFIG") from None
    except SyntaxError as exc:
        raise CheckFailed(f"{path}: not valid Python (line {exc.lineno}: {exc.msg})") from None
    except BaseException as exc:  # the user's code: anything can come out
        raise CheckFailed(f"{path}: raised {type(exc).__name__} while loading: "
                          f"{_first_line(exc)}") from None
    if "CONFIG" not in namespace:
        raise CheckFailed(f"{path}: define the configuration as a variable named CONFIG")
    config = namespace["CONFIG"]
    if isinstance(config, PoolConfig):
        return config
    if not isinstance(config, Mapping):
        raise CheckFailed(f"{path}: CONFIG must be a dict, not {type(config).__name__}")
    return config


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc).strip()
    except Exception:  # a user exception whose __str__ fails
        text = ""
    return text.splitlines()[0][:300] if text else "(no message)"


def _json(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except RecursionError:
        raise CheckFailed(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise CheckFailed(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckFailed(f"{where}: expected a JSON object")
    return value


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
        row["error"] = _first_line(exc)
    return row


def _probe_into(row: dict[str, Any], config: PoolConfig, index: int) -> None:
    from .concurrency import backend_for

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
        role, lag = query_role(raw)
        row["rtt_ms"] = (time.perf_counter() - started) * 1000
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
                    _statement_timeout_ms(config.endpoints[i], group), group.readonly,
                    rows[i]["server_defaults"],
                    trusts_server_defaults(config.endpoints[i], group.reset)))
    return FAILED if failing else OK


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
