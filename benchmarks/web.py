"""Workload 6, gunicorn: the example app under ``gunicorn -k gevent -w 1``, loaded by ``wrk``.

greenpool serves with ``examples/gunicorn/app.py`` as it is; each peer serves the same app
through :mod:`benchmarks.webapp`. Each (pool, repetition) gets its own gunicorn, bound to a
free loopback port, waited for through ``/health``, and stopped by its PID. ``wrk`` runs in
its own process: a warm-up (which also opens the pool's connections), then the measured run
of ``GET /notes/<id>`` over the seeded notes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from greenpool.testing.postgres import Cluster, free_port

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "gunicorn"
LUA = HERE / "wrk_notes.lua"
PEERS = ("greenpool", "simple", "dbutils")  # greenpool and the best two peers
PEER_ENV = "GREENPOOL_BENCH_PEER"  # read by benchmarks.webapp
READ_SIZE, WRITE_SIZE = 10, 5  # per group; GET /notes/<id> uses read, /health both
ACQUIRE_TIMEOUT = 5  # seconds, as the adapters' (see adapters.ACQUIRE_TIMEOUT)
NOTES = 1000  # seeded notes; wrk picks ids among them at random
CONNECTIONS = 100  # wrk's open connections (-c)
BOOT_TIMEOUT = 30.0  # seconds for gunicorn to answer /health
STOP_TIMEOUT = 15.0  # seconds after SIGTERM before SIGKILL
WRK_SLACK = 30  # seconds beyond the requested duration before wrk is killed


def skip_reason() -> str | None:
    """Why the workload cannot run here, or None."""
    if shutil.which("wrk") is None:
        return "wrk not installed (apt-get install wrk)"
    if find_spec("gunicorn") is None:
        return "gunicorn not installed (pip install gunicorn)"
    return None


def pool_config(cluster: Cluster, app_name: str) -> dict[str, Any]:
    """GREENPOOL_CONFIG for the app; the peers' shim reads its sizes and endpoint too."""
    return {"db": cluster.endpoint(), "application_name": app_name, "groups": {
        "read": {"connection_count": READ_SIZE, "autocommit": True, "timeout": ACQUIRE_TIMEOUT},
        "write": {"connection_count": WRITE_SIZE, "timeout": ACQUIRE_TIMEOUT},
    }}


def prepare(cluster: Cluster) -> tuple[int, int]:
    """The app's own ``schema`` command, then NOTES notes (once); the range of their ids."""
    env = {**os.environ, "GREENPOOL_CONFIG": json.dumps(pool_config(cluster, "bench-schema"))}
    done = subprocess.run([sys.executable, str(EXAMPLE / "app.py"), "schema"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"app.py schema failed: {done.stderr.strip()[-400:]}")
    cluster.execute("INSERT INTO notes (body) SELECT 'note ' || g FROM generate_series(1, %s) g "
                    "WHERE NOT EXISTS (SELECT 1 FROM notes)", (NOTES,))
    first, last = cluster.execute("SELECT min(id), max(id) FROM notes")[0]
    return int(first), int(last)


def run(peer: str, cluster: Cluster, app_name: str, ids: tuple[int, int],
        durations: tuple[int, int]) -> dict[str, Any]:
    """One gunicorn for ``peer``, one warm-up and one measured wrk run: plain numbers."""
    why = skip_reason()
    if why:
        return {"skipped": why}
    warmup, seconds = durations
    started = time.monotonic()
    with tempfile.NamedTemporaryFile(prefix="bench-gunicorn-", suffix=".log") as log:
        try:
            with serving(peer, pool_config(cluster, app_name), Path(log.name)) as port:
                wrk(port, ids, warmup)
                result = wrk(port, ids, seconds)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            return {"failed": f"{exc} | {_tail(Path(log.name))}"}
        result["log_tracebacks"] = Path(log.name).read_text(errors="replace").count("Traceback")
    result["wall_s"] = round(time.monotonic() - started, 2)
    return result


@contextlib.contextmanager
def serving(peer: str, config: dict[str, Any], log: Path) -> Iterator[int]:
    """gunicorn serving the app on a free loopback port, until the block ends."""
    port = free_port()
    env = {**os.environ, "GREENPOOL_CONFIG": json.dumps(config)}
    app_uri = "app:application"
    if peer != "greenpool":
        env[PEER_ENV], app_uri = peer, "benchmarks.webapp:application"
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"),
           "-k", "gevent", "-w", "1", "-b", f"127.0.0.1:{port}", app_uri]
    with open(log, "wb") as out:  # its own session: the SIGKILL fallback reaches the worker
        proc = subprocess.Popen(cmd, cwd=HERE.parent, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(proc, port)
        yield port
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int) -> None:
    """Poll /health (both groups answer) until BOOT_TIMEOUT; fail early if gunicorn exits."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode} at start")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        time.sleep(0.05)
    raise RuntimeError(f"gunicorn not healthy after {BOOT_TIMEOUT} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to gunicorn's master (graceful: worker_exit closes the pool), then SIGKILL
    to its process group, which is its own (start_new_session), if it does not exit."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wrk(port: int, ids: tuple[int, int], seconds: int) -> dict[str, Any]:
    """One wrk run (1 thread, CONNECTIONS connections); the numbers its Lua ``done`` wrote."""
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(LUA),
           f"http://127.0.0.1:{port}", "--", str(ids[0]), str(ids[1])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + WRK_SLACK,
                          check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return summarize(json.loads(line[len("WRK "):]))


def summarize(w: dict[str, float]) -> dict[str, Any]:
    """wrk's counters as the report's numbers (latencies in ms)."""
    socket_errors = w["connect"] + w["read"] + w["write"] + w["timeout"]
    return {
        "rps": w["requests"] / (w["duration_us"] / 1e6), "requests": int(w["requests"]),
        "p50_ms": w["p50_us"] / 1e3, "p99_ms": w["p99_us"] / 1e3, "max_ms": w["max_us"] / 1e3,
        "non2xx": int(w["non2xx"]), "socket_errors": int(socket_errors),
        "errors": int(w["non2xx"] + socket_errors),
        "socket_error_kinds": {k: int(w[k]) for k in ("connect", "read", "write", "timeout")},
    }


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:])[-400:]
    return ""
