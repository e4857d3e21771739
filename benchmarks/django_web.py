"""Django under ``gunicorn -k gevent -w 1``, loaded by ``wrk``: greenpool's backend against
django-db-geventpool and Django's own pool (psycopg 3 + psycopg_pool), in one run.

The app is the test project (``tests/django_project``): ``GET /notes/<id>`` is one ORM read
(``filter(id=…).values_list(…).first()``) over the seeded notes. Each contender gets the
same bound (``SIZE`` connections) and acquire timeout, and its own gunicorn per repetition,
started cold: readiness is polled on ``/stats/``, which touches no database, so wrk's
warm-up is a start-up burst of ``CONNECTIONS`` concurrent requests on an empty pool. A
thread samples ``pg_stat_activity`` every few milliseconds from gunicorn's start to its
stop: "server connections at peak" covers the burst, and must not exceed ``SIZE``.

Run alone (needs wrk, gunicorn, Django, and the peers: ``pip install
'greenpool[django,bench-django]'``)::

    python -m benchmarks.django_web --reps 3            # about 1.5 minutes
    python -m benchmarks.django_web --reps 1 --seconds 2 --out /tmp/dj

Registration hook for the orchestrator: :data:`NAME`, :func:`skip_reason`,
:func:`prepare`, :func:`run` (one contender, one repetition: plain numbers) and
:func:`render` (a markdown table from ``{contender: [results]}``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from greenpool.testing.postgres import Cluster, free_port

from . import web

NAME = "django"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROJECT = ROOT / "tests" / "django_project"
CONTENDERS = ("greenpool", "geventpool", "django-pool")
#: the Python modules each contender needs, beyond Django and gunicorn
NEEDS = {"greenpool": (), "geventpool": ("django_db_geventpool", "psycopg"),
         "django-pool": ("psycopg", "psycopg_pool")}
SIZE = 10  # every contender's bound on connections (one gunicorn worker)
ACQUIRE_TIMEOUT = 5  # seconds
NOTES = 1000
DATABASE = "djbench"
BOOT_TIMEOUT = 30.0
SAMPLE_EVERY = 0.005  # seconds between pg_stat_activity samples


def skip_reason(contender: str | None = None) -> str | None:
    """Why the workload (or one contender) cannot run here, or None."""
    why = web.skip_reason()
    if why:
        return why
    if find_spec("django") is None:
        return "Django not installed (pip install 'greenpool[django]')"
    for module in NEEDS.get(contender or "", ()):
        if find_spec(module) is None:
            return f"{module} not installed (pip install 'greenpool[bench-django]')"
    return None


def databases(contender: str, cluster: Cluster, app_name: str) -> dict[str, Any]:
    """``DATABASES`` for ``contender``, each configured the way its users configure it."""
    common = {"NAME": DATABASE, "USER": cluster.user, "PASSWORD": cluster.password,
              "HOST": cluster.host, "PORT": cluster.port, "CONN_MAX_AGE": 0}
    if contender == "greenpool":
        return {"default": {**common, "ENGINE": "greenpool.django", "OPTIONS": {
            "connection_count": SIZE, "timeout": ACQUIRE_TIMEOUT,
            "greenpool": {"application_name": app_name}}}}
    if contender == "geventpool":  # its README: MAX_CONNS, REUSE_CONNS, CONN_MAX_AGE 0
        return {"default": {**common,
                            "ENGINE": "django_db_geventpool.backends.postgresql_psycopg3",
                            "OPTIONS": {"MAX_CONNS": SIZE, "REUSE_CONNS": SIZE,
                                        "application_name": app_name}}}
    if contender == "django-pool":  # Django >= 5.1: psycopg 3 and psycopg_pool
        return {"default": {**common, "ENGINE": "django.db.backends.postgresql", "OPTIONS": {
            "pool": {"min_size": 0, "max_size": SIZE, "timeout": ACQUIRE_TIMEOUT},
            "application_name": app_name}}}
    raise ValueError(f"unknown contender {contender!r}; known: {', '.join(CONTENDERS)}")


def _env(dbs: dict[str, Any]) -> dict[str, str]:
    return {**os.environ, "GREENPOOL_DJANGO_DATABASES": json.dumps(dbs),
            "DJANGO_SETTINGS_MODULE": "djproject.settings",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(PROJECT)])}


def prepare(cluster: Cluster) -> tuple[int, int]:
    """The project's migrations, then NOTES notes (once); the range of their ids."""
    if not cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)):
        cluster.create_database(DATABASE)
    env = _env(databases("greenpool", cluster, "bench-django-migrate"))
    done = subprocess.run([sys.executable, str(PROJECT / "manage.py"), "migrate", "-v", "0"],
                          env=env, cwd=PROJECT, capture_output=True, text=True, timeout=120,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed: {done.stderr.strip()[-400:]}")
    conn = cluster.connect(dbname=DATABASE)
    try:
        with conn.cursor() as cursor:
            cursor.execute("INSERT INTO notes_note (body, created) SELECT 'note ' || g, now() "
                           "FROM generate_series(1, %s) g WHERE NOT EXISTS "
                           "(SELECT 1 FROM notes_note)", (NOTES,))
            cursor.execute("SELECT min(id), max(id) FROM notes_note")
            first, last = cursor.fetchone()
    finally:
        conn.close()
    return int(first), int(last)


class _Peak:
    """The most client backends of ``app_name`` seen, sampled from a thread of its own."""

    def __init__(self, cluster: Cluster, app_name: str) -> None:
        self.most = 0
        self._done = threading.Event()
        self._conn = cluster.connect()
        self._app_name = app_name
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        with self._conn.cursor() as cursor:
            while not self._done.wait(SAMPLE_EVERY):
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name "
                               "= %s AND backend_type = 'client backend'", (self._app_name,))
                self.most = max(self.most, int(cursor.fetchone()[0]))

    def stop(self) -> int:
        self._done.set()
        self._thread.join(10)
        self._conn.close()
        return self.most


def run(contender: str, cluster: Cluster, ids: tuple[int, int],
        durations: tuple[int, int], rep: int = 0) -> dict[str, Any]:
    """One cold gunicorn for ``contender``, wrk's warm-up (the start-up burst) and measured
    run: requests/s, latencies, errors, and the peak of server connections."""
    why = skip_reason(contender)
    if why:
        return {"skipped": why}
    warmup, seconds = durations
    app_name = f"bench-django-{contender}-{rep}"
    started = time.monotonic()
    peak = _Peak(cluster, app_name)
    with tempfile.NamedTemporaryFile(prefix="bench-django-", suffix=".log") as log:
        try:
            with _serving(databases(contender, cluster, app_name), Path(log.name)) as port:
                burst = web.wrk(port, ids, warmup)
                result = web.wrk(port, ids, seconds)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            peak.stop()
            return {"failed": f"{exc} | {web._tail(Path(log.name))}"}
        finally:
            most = peak.stop()
        result["log_tracebacks"] = Path(log.name).read_text(errors="replace").count("Traceback")
    result["burst_errors"] = burst["errors"]
    result["peak_server_conns"] = most
    result["bound"] = SIZE
    result["wall_s"] = round(time.monotonic() - started, 2)
    return result


@contextlib.contextmanager
def _serving(dbs: dict[str, Any], log: Path) -> Iterator[int]:
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(PROJECT / "gunicorn.conf.py"),
           "-k", "gevent", "-w", "1", "-b", f"127.0.0.1:{port}", "djproject.wsgi:application"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=_env(dbs), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, port)
        yield port
    finally:
        web._stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], port: int) -> None:
    """Poll ``/stats/`` (no database: the pool stays cold) until BOOT_TIMEOUT."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode} at start")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/stats/")
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        time.sleep(0.05)
    raise RuntimeError(f"gunicorn not ready after {BOOT_TIMEOUT} s")


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    """A markdown table of medians (and the worst peak) per contender."""
    lines = [
        f"Django view `GET /notes/<id>` (one ORM read) under `gunicorn -k gevent -w 1`, wrk "
        f"`-t1 -c{web.CONNECTIONS}`; bound {SIZE} connections, acquire timeout "
        f"{ACQUIRE_TIMEOUT} s. Medians over repetitions; peak = most server connections "
        f"seen from gunicorn's cold start (the warm-up is the start-up burst) to its stop.",
        "",
        "| backend | requests/s | p50 ms | p99 ms | errors | burst errors | peak conns "
        "(bound) | reps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for contender, runs in results.items():
        good = [r for r in runs if "rps" in r]
        if not good:
            why = next((r.get("skipped") or r.get("failed") for r in runs), "no run")
            lines.append(f"| {contender} | – | – | – | – | – | – | {why} |")
            continue
        med = {k: statistics.median(r[k] for r in good) for k in ("rps", "p50_ms", "p99_ms")}
        peak = max(r["peak_server_conns"] for r in good)
        over = " **over the bound**" if peak > SIZE else ""
        lines.append(
            f"| {contender} | {med['rps']:.0f} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | "
            f"{sum(r['errors'] for r in good)} | {sum(r['burst_errors'] for r in good)} | "
            f"{peak} ({SIZE}){over} | {len(good)} |")
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    found = {}
    for dist in ("django", "gunicorn", "gevent", "psycopg2-binary", "psycopg", "psycopg-pool",
                 "django-db-geventpool"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up")
    parser.add_argument("--seconds", type=int, default=5, help="seconds of the measured run")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender {unknown[0]!r}; known: {', '.join(CONTENDERS)}")
    why = skip_reason()
    if why:
        print(f"skipped: {why}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
    load_before = os.getloadavg()
    order = random.Random(12)
    with Cluster(settings={"max_connections": 300}) as cluster:
        ids = prepare(cluster)
        for rep in range(args.reps):
            for contender in order.sample(contenders, len(contenders)):
                res = run(contender, cluster, ids, (args.warmup, args.seconds), rep)
                results[contender].append(res)
                print(f"rep {rep} {contender}: {json.dumps(res)}", flush=True)
    table = render(results)
    (out / "django_web.json").write_text(json.dumps(
        {"versions": versions(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
         "load_average": {"before": load_before, "after": os.getloadavg()},
         "results": results}, indent=1) + "\n")
    (out / "django_web.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
