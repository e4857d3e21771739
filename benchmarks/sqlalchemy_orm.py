"""SQLAlchemy ORM read loop: greenpool's engine against SQLAlchemy's own ``QueuePool``.

``python -m benchmarks.sqlalchemy_orm`` (about 1 minute) starts one throwaway cluster, seeds
1000 rows, and runs each engine in a fresh process under ``monkey.patch_all()`` (plus
psycogreen), repetitions interleaved in a seeded shuffled order. The same ORM code runs on
every engine; only ``create_engine`` differs:

* ``greenpool``: ``greenpool.sqlalchemy.create_engine(pool, 'g')``, a group of 10 connections
  (transactions, acquire timeout 5 s);
* ``QueuePool``: ``create_engine(url, pool_size=10, max_overflow=0, pool_timeout=5)``, with
  and without ``pool_pre_ping`` (greenpool always checks on borrow, cheaply).

Two loads, each a fresh ``Session`` per operation, ``session.get(Item, id)`` with an id drawn
at random (a new session: always one ``SELECT``, then the ``ROLLBACK`` that ends its
transaction):

* ``single``: one greenlet, back to back: ops/s and the client's CPU per operation;
* ``contention``: 100 greenlets on the 10 connections after a warm-up that opens all of
  them: ops/s, p50/p99 latency, errors, Jain's fairness over operations per greenlet,
  greenlets that completed none, and the peak of the engine's server connections
  (``pg_stat_activity``, sampled every 20 ms by a connection of its own): it must not exceed
  10.

Results: ``benchmarks/results/sqlalchemy_orm.md`` and ``sqlalchemy_orm.json`` (every
repetition). ``--reps N`` (default 3), ``--quick``, ``--out DIR``.
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
from pathlib import Path
from typing import Any
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
ENGINES = ("greenpool", "queuepool", "queuepool_preping")
LABELS = {"greenpool": "greenpool engine", "queuepool": "SQLAlchemy QueuePool",
          "queuepool_preping": "SQLAlchemy QueuePool pre_ping"}
SIZE, GREENLETS, ROWS, ACQUIRE_TIMEOUT = 10, 100, 1000, 5
FULL = {"single": 2.0, "warmup": 0.5, "contention": 2.0}
QUICK = {"single": 0.5, "warmup": 0.3, "contention": 0.7}
WORKER_TIMEOUT = 90


# --- the worker (a fresh process per engine and repetition) ---------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
    import gevent
    import psycopg2
    from sqlalchemy import Integer, String, create_engine
    from sqlalchemy.orm import DeclarativeBase, Session, mapped_column

    class Base(DeclarativeBase):
        pass

    class Item(Base):  # no annotations: they would be strings here (future annotations)
        __tablename__ = "bench_items"
        id = mapped_column(Integer, primary_key=True)
        name = mapped_column(String(40))
        price = mapped_column(Integer)

    t = spec["target"]
    app = spec["app"]
    pool = None
    if spec["engine"] == "greenpool":
        import greenpool
        from greenpool.sqlalchemy import create_engine as greenpool_engine

        pool = greenpool.Pool({
            "db": {"host": t["host"], "port": t["port"], "name": t["dbname"],
                   "user": t["user"], "pass": t["password"]},
            "application_name": app,
            "groups": {"g": {"connection_count": SIZE, "timeout": ACQUIRE_TIMEOUT}},
        })
        engine = greenpool_engine(pool, "g")
    else:
        url = (f"postgresql+psycopg2://{t['user']}:{quote(t['password'])}@{t['host']}:{t['port']}/"
               f"{t['dbname']}?application_name={app}")
        engine = create_engine(url, pool_size=SIZE, max_overflow=0,
                               pool_timeout=ACQUIRE_TIMEOUT,
                               pool_pre_ping=spec["engine"] == "queuepool_preping")
    rng = random.Random(spec["seed"])
    durations = spec["durations"]

    def read() -> None:
        with Session(engine) as session:
            item = session.get(Item, rng.randint(1, ROWS))
            assert item is not None and item.price >= 0

    result: dict[str, Any] = {}
    try:
        # single: one greenlet, back to back
        for _ in range(100):
            read()
        ops, start, cpu = 0, time.perf_counter(), time.process_time()
        deadline = start + durations["single"]
        while time.perf_counter() < deadline:
            for _ in range(20):
                read()
            ops += 20
        elapsed = time.perf_counter() - start
        result["single_ops_s"] = ops / elapsed
        result["single_cpu_us"] = (time.process_time() - cpu) / ops * 1e6

        # contention: GREENLETS on SIZE connections, every connection opened first
        held = [engine.connect() for _ in range(SIZE)]
        for conn in held:
            conn.close()
        peak = [0]
        sampling = [True]
        admin = psycopg2.connect(host=t["host"], port=t["port"], dbname=t["dbname"],
                                 user=t["user"], password=t["password"],
                                 application_name="bench-sampler")
        admin.autocommit = True

        def sample() -> None:
            with admin.cursor() as cur:
                while sampling[0]:
                    cur.execute("SELECT count(*) FROM pg_stat_activity "
                                "WHERE application_name = %s", (app,))
                    peak[0] = max(peak[0], cur.fetchone()[0])
                    gevent.sleep(0.02)

        counts = [0] * GREENLETS
        latencies: list[float] = []
        errors: dict[str, int] = {}
        begin = time.perf_counter()
        window_start = begin + durations["warmup"]
        window_end = window_start + durations["contention"]

        def run(i: int) -> None:
            while True:
                t0 = time.perf_counter()
                if t0 >= window_end:
                    return
                try:
                    read()
                except Exception as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    gevent.sleep(0.01)
                    continue
                t1 = time.perf_counter()
                if window_start <= t1 <= window_end:
                    counts[i] += 1
                    latencies.append(t1 - t0)

        sampler = gevent.spawn(sample)
        jobs = [gevent.spawn(run, i) for i in range(GREENLETS)]
        gevent.joinall(jobs, timeout=durations["warmup"] + durations["contention"] + 30)
        gevent.killall(jobs, timeout=5)
        sampling[0] = False
        sampler.join(timeout=5)
        admin.close()
        total = sum(counts)
        squares = sum(c * c for c in counts)
        ordered = sorted(latencies) or [float("nan")]
        result.update(
            contention_ops_s=total / durations["contention"],
            p50_ms=ordered[len(ordered) // 2] * 1e3,
            p99_ms=ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1e3,
            errors=sum(errors.values()), error_kinds=errors,
            fairness=(total * total) / (GREENLETS * squares) if squares else 0.0,
            starved=sum(1 for c in counts if c == 0),
            peak_server_connections=peak[0],
        )
    finally:
        engine.dispose()
        if pool is not None:
            pool.close()
    return result


# --- the orchestrator -----------------------------------------------------------------------


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.sqlalchemy_orm", "--worker", json.dumps(spec)],
            cwd=HERE.parent, capture_output=True, text=True, timeout=WORKER_TIMEOUT,
            check=False)
    except subprocess.TimeoutExpired:
        return {"failed": f"killed after {WORKER_TIMEOUT} s (hung)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])  # type: ignore[no-any-return]
    return {"failed": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def report(raw: dict[str, Any]) -> str:
    m = raw["machine"]
    lines = [
        "# SQLAlchemy ORM read loop: greenpool's engine against QueuePool",
        "",
        f"{raw['reps']} repetitions (medians), {m['nproc']} cores, PostgreSQL "
        f"{m['postgres']}, SQLAlchemy {m['sqlalchemy']}, load average "
        f"{' '.join(m['loadavg_start'])} at the start. `python -m benchmarks.sqlalchemy_orm`"
        f"{' --quick' if raw['quick'] else ''}.",
        "",
        "| engine | single ops/s | client CPU µs/op | contention ops/s | p50 ms | p99 ms | "
        "fairness | starved | errors | peak server connections (bound 10) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ENGINES:
        runs = [r for r in raw["runs"][name] if "failed" not in r]
        if not runs:
            failed = raw["runs"][name][0].get("failed", "no run") if raw["runs"][name] else "-"
            lines.append(f"| {LABELS[name]} | failed: {failed} |||||||||")
            continue
        peak = max(r["peak_server_connections"] for r in runs)
        lines.append(
            f"| {LABELS[name]} | {_median(runs, 'single_ops_s'):,.0f} | "
            f"{_median(runs, 'single_cpu_us'):.0f} | {_median(runs, 'contention_ops_s'):,.0f} | "
            f"{_median(runs, 'p50_ms'):.1f} | {_median(runs, 'p99_ms'):.1f} | "
            f"{_median(runs, 'fairness'):.2f} | {_median(runs, 'starved'):.0f} | "
            f"{sum(r['errors'] for r in runs)} | {peak} (max) |")
    lines.append("")
    for key, what in (("single_ops_s", "single ops/s"), ("contention_ops_s", "contention ops/s")):
        lines.append(f"Per repetition ({what}): " + "; ".join(
            f"{LABELS[n]} " + ", ".join(f"{r.get(key, float('nan')):,.0f}"
                                         for r in raw["runs"][n]) for n in ENGINES) + ".")
    lines.append("")
    return "\n".join(lines)


def run_suite(reps: int = 3, quick: bool = False, out: Path = HERE / "results") -> Path:
    """The whole benchmark on a throwaway cluster of its own; the path of its report.

    The hook for a suite runner: ``run_suite(args.reps, args.quick, out)`` is all
    ``benchmarks/run.py`` would need to call to include it."""
    from importlib import metadata

    from greenpool.testing.postgres import Cluster

    durations = QUICK if quick else FULL
    raw: dict[str, Any] = {"reps": reps, "quick": quick, "runs": {name: [] for name in ENGINES}}
    with Cluster(settings={"max_connections": 300}) as pg:
        pg.execute("CREATE TABLE bench_items (id int PRIMARY KEY, name varchar(40), price int)")
        pg.execute("INSERT INTO bench_items SELECT i, 'item ' || i, mod(i, 97) "
                   "FROM generate_series(1, %s) i", (ROWS,))
        # settle the fresh server first (statistics, the seed's dirty pages): the first
        # engine to run must not pay for them
        pg.execute("VACUUM ANALYZE bench_items")
        pg.execute("CHECKPOINT")
        raw["machine"] = {
            "nproc": os.cpu_count(),
            "postgres": pg.execute("SHOW server_version")[0][0],
            "sqlalchemy": metadata.version("sqlalchemy"),
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        }
        target = {"host": pg.host, "port": pg.port, "dbname": pg.dbname, "user": pg.user,
                  "password": pg.password}
        for rep in range(reps):
            order = list(ENGINES)
            random.Random(f"sqlalchemy-orm:{rep}").shuffle(order)
            for name in order:
                spec = {"engine": name, "target": target, "durations": durations,
                        "app": f"bench-sqla-{name}-{rep}", "seed": rep}
                res = _run_worker(spec)
                raw["runs"][name].append(res)
                brief = {k: round(v, 2) if isinstance(v, float) else v
                         for k, v in res.items() if not isinstance(v, dict)}
                print(f"rep {rep} {name:18} {brief}", flush=True)
    raw["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sqlalchemy_orm.json").write_text(json.dumps(raw, indent=1))
    text = report(raw)
    (out / "sqlalchemy_orm.md").write_text(text + "\n")
    print(text)
    return out / "sqlalchemy_orm.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sqlalchemy_orm",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        out = worker(json.loads(args.worker))
        print("\nRESULT " + json.dumps(out), flush=True)
        return 0
    run_suite(args.reps, args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
