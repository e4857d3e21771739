"""Through PgBouncer: the contention and io-bound workloads, directly and through a real
PgBouncer in transaction mode, for greenpool and the two fastest peers, in one run.

``python -m benchmarks.pgbouncer`` (about 3 minutes with the default 3 repetitions) starts one
throwaway cluster and one PgBouncer in front of it (``greenpool.testing.pgbouncer``: loopback,
a free port, trust auth on the client side). Every (workload, pool, route) runs in a fresh
process under ``monkey.patch_all()`` plus psycogreen, repetitions interleaved in a seeded
shuffled order, so each pool's direct and PgBouncer runs see the same machine. The workloads
and adapters are the suite's own (:mod:`benchmarks.workloads`, :mod:`benchmarks.adapters`),
with the suite's parameters:

* ``contention``: 200 greenlets, 10 connections, ``SELECT 1`` back to back, 1.2 s measured
  after a 0.5 s warm-up;
* ``iobound``: 500 greenlets, 20 connections, ``SELECT pg_sleep(0.02)``, 3 s after 0.6 s.

The pools: greenpool, psycopg2's ``SimpleConnectionPool`` (with its bounded getconn retry)
and DBUtils ``PooledDB``: the fastest peers of the committed suite results, the same two the
gunicorn workload takes. Through PgBouncer, greenpool's endpoint carries
``pooler: 'transaction'`` (as the README says to configure it); the peers connect to it as
to PostgreSQL. PgBouncer's ``default_pool_size`` (20) is at least every client pool, so it
never queues a transaction: what the route costs is the extra hop and PgBouncer's CPU,
which shares the 2 cores with the client and the server.

Results: ``benchmarks/results/pgbouncer.md`` and ``pgbouncer.json`` (every repetition). It
does not go through ``run.py`` and never touches ``raw.json``. ``--reps N`` (default 3),
``--quick``, ``--out DIR``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--worker" in sys.argv:  # a worker: patch before all else
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .adapters import ACQUIRE_TIMEOUT, ADAPTERS, Adapter, GreenPool, Target

HERE = Path(__file__).resolve().parent
PEERS = ("greenpool", "simple", "dbutils")
ROUTES = ("direct", "pgbouncer")
WORKLOADS = ("contention", "iobound")
IOBOUND_SLEEP = 0.02  # as run.py
# (warm-up, measured) seconds, as run.py's FULL and QUICK
FULL = {"contention": (0.5, 1.2), "iobound": (0.6, 3.0)}
QUICK = {"contention": (0.3, 0.5), "iobound": (0.6, 1.0)}
SIZES = {"contention": 10, "iobound": 20}
GREENLETS = {"contention": 200, "iobound": 500}
BOUNCER_SETTINGS = {"default_pool_size": 20, "max_client_conn": 200}
WORKER_TIMEOUT = 90


class GreenPoolThroughPooler(GreenPool):
    """greenpool with ``pooler: 'transaction'`` on its endpoints; otherwise :class:`GreenPool`
    (whose ``__init__`` builds its config inline, hence the copy here)."""

    name = "greenpool (pooler: transaction)"

    def __init__(self, target: Target, size: int, autocommit: bool = True,
                 readonly: bool = False, lazy: bool = False) -> None:
        Adapter.__init__(self, target, size, autocommit=autocommit, readonly=readonly,
                         lazy=lazy)
        import greenpool

        self.acquire_timeout_errors = (greenpool.PoolTimeout,)
        t = self.target
        self.pool = greenpool.Pool({
            "db": [{"host": h, "port": p, "name": t.dbname, "user": t.user, "pass": t.password,
                    "pooler": "transaction"} for h, p in t.hosts],
            "application_name": t.app_name,
            "groups": {"g": {"connection_count": self.size, "autocommit": self.autocommit,
                             "readonly": self.readonly, "role": "any",
                             "timeout": ACQUIRE_TIMEOUT}},
        })


# --- the worker (a fresh process per workload, pool, route and repetition) ------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    cls: type[Adapter] = ADAPTERS[spec["peer"]]
    if spec["peer"] == "greenpool" and spec["route"] == "pgbouncer":
        cls = GreenPoolThroughPooler
    if cls.psycopg2_based:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
    from . import workloads

    adapter = cls(Target(**spec["target"]), spec["size"])
    try:
        cpu = time.process_time()
        result: dict[str, Any] = getattr(workloads, spec["workload"])(adapter, **spec["params"])
        result["client_cpu_us"] = _per_op(time.process_time() - cpu, result, spec["params"])
        return result
    finally:
        adapter.close()


def _per_op(cpu_s: float, result: dict[str, Any], params: dict[str, Any]) -> float | None:
    """CPU seconds spent over the whole workload (warm-up included) per operation, in µs:
    the operations counted are the window's only, so they are scaled to the whole run at
    the window's rate. Less disturbed by the machine's other load than ops/s."""
    ops = result["ops_s"] * (params["warmup"] + params["seconds"])
    return cpu_s / ops * 1e6 if ops else None


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (/proc), for PgBouncer's own CPU."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# --- the orchestrator -----------------------------------------------------------------------


def worker_spec(peer: str, route: str, workload: str, rep: int, where: Any, cluster: Any,
                durations: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """``where`` is the cluster or the PgBouncer (both have ``host`` and ``port``)."""
    target = Target([(where.host, where.port)], cluster.user, cluster.password, cluster.dbname,
                    f"bench-pgb-{peer}-{route}-{workload}-{rep}")
    warmup, seconds = durations[workload]
    params: dict[str, Any] = {"greenlets": GREENLETS[workload], "warmup": warmup,
                              "seconds": seconds}
    if workload == "iobound":
        params.update(size=SIZES[workload], sleep=IOBOUND_SLEEP)
    return {"peer": peer, "route": route, "workload": workload, "target": asdict(target),
            "size": SIZES[workload], "params": params}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.pgbouncer", "--worker", json.dumps(spec)],
            cwd=HERE.parent, capture_output=True, text=True, timeout=WORKER_TIMEOUT,
            check=False)
    except subprocess.TimeoutExpired:
        return {"failed": f"killed after {WORKER_TIMEOUT} s (hung)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            result["wall_s"] = round(time.monotonic() - started, 2)
            return result
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
    return {"failed": f"exit {proc.returncode}: {tail}"}


def _uptime() -> str:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "load average: " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_info(cluster: Any, bouncer_binary: str) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for name in ("greenpool", "gevent", "psycopg2-binary", "psycogreen", "DBUtils"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    bouncer = subprocess.run([bouncer_binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.splitlines()
    return {
        "nproc": os.cpu_count(),
        "postgres": cluster.execute("SHOW server_version")[0][0],
        "pgbouncer": bouncer[0] if bouncer else "?",
        "packages": versions,
        "uptime_start": _uptime(),
    }


def run_suite(reps: int = 3, quick: bool = False, out: Path = HERE / "results") -> Path:
    """The whole benchmark on a cluster and a PgBouncer of its own; the path of its report.

    ``run_suite(args.reps, args.quick, out)`` is all ``benchmarks/run.py`` would need to call
    to include it."""
    from greenpool.testing.pgbouncer import BINARY, PgBouncer, available
    from greenpool.testing.postgres import Cluster

    if not available():
        raise SystemExit(f"PgBouncer not found at {BINARY} (apt-get install pgbouncer)")
    durations = QUICK if quick else FULL
    raw: dict[str, Any] = {
        "reps": reps, "quick": quick, "bouncer_settings": BOUNCER_SETTINGS,
        "runs": {w: {p: {r: [] for r in ROUTES} for p in PEERS} for w in WORKLOADS},
    }
    with Cluster(settings={"max_connections": 300}) as pg, \
            PgBouncer(pg, **BOUNCER_SETTINGS) as bouncer:
        raw["machine"] = machine_info(pg, BINARY)
        assert bouncer._proc is not None  # started: the helper keeps its process
        bouncer_pid = bouncer._proc.pid
        print(raw["machine"]["uptime_start"], flush=True)
        for rep in range(reps):
            for workload in WORKLOADS:
                order = [(p, r) for p in PEERS for r in ROUTES]
                random.Random(f"pgbouncer:{workload}:{rep}").shuffle(order)
                for peer, route in order:
                    where = bouncer if route == "pgbouncer" else pg
                    spec = worker_spec(peer, route, workload, rep, where, pg, durations)
                    ticks = _cpu_ticks(bouncer_pid)
                    res = run_worker(spec)
                    if route == "pgbouncer" and "ops_s" in res:
                        used = (_cpu_ticks(bouncer_pid) - ticks) / os.sysconf("SC_CLK_TCK")
                        res["pgbouncer_cpu_us"] = _per_op(used, res, spec["params"])
                    raw["runs"][workload][peer][route].append(res)
                    brief = {k: round(v, 2) if isinstance(v, float) else v
                             for k, v in res.items()
                             if k in ("ops_s", "p99_ms", "errors", "starved", "failed",
                                      "client_cpu_us", "pgbouncer_cpu_us")}
                    print(f"rep {rep} {workload:10} {peer:9} {route:9} {brief}", flush=True)
    raw["machine"]["uptime_end"] = _uptime()
    out.mkdir(parents=True, exist_ok=True)
    (out / "pgbouncer.json").write_text(json.dumps(raw, indent=1))
    text = report(raw)
    (out / "pgbouncer.md").write_text(text + "\n")
    print(text)
    return out / "pgbouncer.md"


# --- the report -----------------------------------------------------------------------------

LABELS = {"greenpool": "greenpool", "simple": "psycopg2 SimpleConnectionPool",
          "dbutils": "DBUtils PooledDB"}


def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if "failed" not in r]


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in _ok(runs) if key in r]
    return statistics.median(values) if values else float("nan")


def _main_key(workload: str) -> str:
    return "ops_s" if workload == "contention" else "pct_of_limit"


def _fmt(workload: str, value: float) -> str:
    return f"{value:,.0f}" if workload == "contention" else f"{value:.1f} %"


def target_line(raw: dict[str, Any], workload: str) -> str:
    """greenpool through PgBouncer against the best peer through the same PgBouncer."""
    key = _main_key(workload)
    runs = raw["runs"][workload]
    ours = _median(runs["greenpool"]["pgbouncer"], key)
    best = max((p for p in PEERS if p != "greenpool"),
               key=lambda p: _median(runs[p]["pgbouncer"], key))
    theirs = _median(runs[best]["pgbouncer"], key)
    ratio = ours / theirs if theirs else float("nan")
    per_rep = [a[key] / b[key] for a, b in zip(runs["greenpool"]["pgbouncer"],
                                               runs[best]["pgbouncer"], strict=False)
               if key in a and key in b and b[key]]
    verdict = "met" if ratio >= 1.0 else "**NOT met**"
    if per_rep and min(per_rep) < 1.0 <= max(per_rep):
        verdict += " by the medians, within the noise of this run"
    what = "ops/s" if workload == "contention" else "share of the limit"
    spread = (f"median {statistics.median(per_rep):.2f}, range {min(per_rep):.2f}–"
              f"{max(per_rep):.2f}" if per_rep else "none")
    return (f"- {workload}: greenpool {_fmt(workload, ours)} against the best peer, "
            f"{LABELS[best]}, {_fmt(workload, theirs)} ({what}, both through PgBouncer): "
            f"{ratio:.2f}×, {verdict}. Per repetition ({spread}): "
            + ", ".join(f"{r:.2f}" for r in per_rep) + ".")


def report(raw: dict[str, Any]) -> str:
    m = raw["machine"]
    lines = [
        "# Through PgBouncer (transaction mode) and directly",
        "",
        f"{raw['reps']} repetitions (medians), {m['nproc']} cores shared by the client, "
        f"PostgreSQL {m['postgres']} and {m['pgbouncer']} (`pool_mode = transaction`, "
        f"`default_pool_size = {raw['bouncer_settings']['default_pool_size']}`). "
        f"`python -m benchmarks.pgbouncer`{' --quick' if raw['quick'] else ''}.",
        "",
        "The machine was busy with other work (other sessions' tests and benchmarks) "
        "during this run; `uptime`:",
        f"- start: `{m['uptime_start']}`",
        f"- end: `{m.get('uptime_end', '?')}`",
        "",
        "Absolute numbers move with that load; each pool's direct and PgBouncer runs are "
        "interleaved in the same run, so the ratios are what compare.",
        "",
        "## contention (200 greenlets, 10 connections, `SELECT 1`)",
        "",
        "| pool | direct ops/s | PgBouncer ops/s | PgBouncer ÷ direct | p50 / p99 ms direct "
        "| p50 / p99 ms PgBouncer | fairness (starved) direct | fairness (starved) PgBouncer "
        "| errors (direct + PgBouncer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _rows(raw, "contention")
    lines += [
        "",
        "## io-bound (500 greenlets, 20 connections, `SELECT pg_sleep(0.02)`; limit "
        "1000 ops/s)",
        "",
        "| pool | direct % of limit | PgBouncer % of limit | PgBouncer ÷ direct "
        "| p99 ÷ ideal direct | p99 ÷ ideal PgBouncer | fairness (starved) direct "
        "| fairness (starved) PgBouncer | errors (direct + PgBouncer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += _rows(raw, "iobound")
    lines += ["", "psycopg2's `PoolError` here is its bounded getconn retry giving up after "
              "3 s: a starved greenlet's error, as in the suite."]
    lines += [
        "",
        "## CPU per operation (µs; warm-up included, less disturbed by other load)",
        "",
        "| pool | contention: client direct | client via PgBouncer | PgBouncer's own "
        "| io-bound: client direct | client via PgBouncer | PgBouncer's own |",
        "|---|---|---|---|---|---|---|",
    ]
    for peer in PEERS:
        cpu: list[float] = []
        for workload in WORKLOADS:
            runs = raw["runs"][workload][peer]
            cpu += [_median(runs["direct"], "client_cpu_us"),
                      _median(runs["pgbouncer"], "client_cpu_us"),
                      _median(runs["pgbouncer"], "pgbouncer_cpu_us")]
        lines.append(f"| {LABELS[peer]} | " + " | ".join(f"{c:.0f}" for c in cpu) + " |")
    lines += ["", "## greenpool against the best peer through the same PgBouncer", ""]
    lines += [target_line(raw, w) for w in WORKLOADS]
    lines += ["", "## Per repetition", ""]
    for workload in WORKLOADS:
        key = _main_key(workload)
        for peer in PEERS:
            cells = []
            for route in ROUTES:
                values = [_fmt(workload, r[key]) if key in r else "failed"
                          for r in raw["runs"][workload][peer][route]]
                cells.append(f"{route} " + ", ".join(values))
            pairs = zip(raw["runs"][workload][peer]["direct"],
                        raw["runs"][workload][peer]["pgbouncer"], strict=False)
            ratios = [f"{b[key] / a[key]:.2f}" for a, b in pairs
                      if key in a and key in b and a[key]]
            cells.append("PgBouncer ÷ direct " + ", ".join(ratios))
            lines.append(f"- {workload}, {LABELS[peer]}: " + "; ".join(cells) + ".")
    failures = [f"{w} {p} {r}: {run['failed']}" for w in WORKLOADS for p in PEERS
                for r in ROUTES for run in raw["runs"][w][p][r] if "failed" in run]
    if failures:
        lines += ["", "Failed runs:", *(f"- {f}" for f in failures)]
    lines.append("")
    return "\n".join(lines)


def _rows(raw: dict[str, Any], workload: str) -> list[str]:
    key = _main_key(workload)
    rows = []
    for peer in PEERS:
        d, b = raw["runs"][workload][peer]["direct"], raw["runs"][workload][peer]["pgbouncer"]
        direct, bounced = _median(d, key), _median(b, key)
        ratio = bounced / direct if direct else float("nan")
        kinds: dict[str, int] = {}
        for run in _ok(d) + _ok(b):
            for kind, n in run.get("error_kinds", {}).items():
                kinds[kind] = kinds.get(kind, 0) + n
        errors = f"{sum(kinds.values())}" + (f" ({', '.join(sorted(kinds))})" if kinds else "")
        if workload == "contention":
            lat = [f"{_median(x, 'p50_ms'):.1f} / {_median(x, 'p99_ms'):.1f}" for x in (d, b)]
        else:
            lat = [f"{_median(x, 'p99_vs_ideal'):.2f}×" for x in (d, b)]
        fair = [f"{_median(x, 'fairness'):.2f} ({_median(x, 'starved'):.0f})" for x in (d, b)]
        name = f"**{LABELS[peer]}**" if peer == "greenpool" else LABELS[peer]
        rows.append(f"| {name} | {_fmt(workload, direct)} | {_fmt(workload, bounced)} | "
                    f"{ratio:.2f} | {lat[0]} | {lat[1]} | {fair[0]} | {fair[1]} | {errors} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pgbouncer",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render pgbouncer.md from pgbouncer.json in --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        print("\nRESULT " + json.dumps(result), flush=True)
        return 0
    if args.report_only:
        raw = json.loads((args.out / "pgbouncer.json").read_text())
        (args.out / "pgbouncer.md").write_text(report(raw) + "\n")
        return 0
    run_suite(args.reps, args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
