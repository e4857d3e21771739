"""A credential rotation and a ``drain()`` under the contention workload.

``python -m benchmarks.rotation`` (about 15 seconds) starts one throwaway cluster and a
login role, then runs, in one gevent process, the suite's contention workload (200
greenlets, 10 connections, ``SELECT 1`` back to back) on a pool whose password is a
function. While it runs:

1. **rotation**: the role's password changes (``ALTER ROLE ... PASSWORD``), the function
   starts returning the new one (both under one lock the function takes, as a secrets
   store would switch), and ``pool.drain()`` replaces every connection;
2. **drain**: a second ``pool.drain()`` alone, a few seconds later.

Each loan's latency (wait for a connection plus ``SELECT 1``) is recorded with its end
time. The targets: zero application errors, and no loan in the second after each event
slower than the slowest loan of the steady state before it plus one connect (the median
of 20 connects measured under the same load). Results: ``benchmarks/results/rotation.md``
and ``rotation.json``; ``--seconds`` sets each phase's length, ``--out DIR`` the output.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.lock  # noqa: E402
import greenpool  # noqa: E402
import psycopg2  # noqa: E402
from greenpool.testing.postgres import Cluster  # noqa: E402
from psycopg2 import sql as pgsql  # noqa: E402

HERE = Path(__file__).resolve().parent
GREENLETS, SIZE = 200, 10  # the suite's contention workload


def _connect_time(cluster: Cluster, user: str, password: str) -> float:
    started = time.monotonic()
    psycopg2.connect(host=cluster.host, port=cluster.port, dbname="postgres", user=user,
                     password=password).close()
    return time.monotonic() - started


def run(seconds: float) -> dict[str, Any]:
    cluster = Cluster()
    cluster.init()
    cluster.start()
    try:
        return _measure(cluster, seconds)
    finally:
        cluster.destroy()


def _measure(cluster: Cluster, seconds: float) -> dict[str, Any]:
    user = f"bench_{uuid.uuid4().hex[:8]}"
    store = {"password": "first-" + uuid.uuid4().hex}
    cluster.create_user(user, store["password"])
    switching = gevent.lock.Semaphore()
    asked = [0]

    def password() -> str:
        with switching:  # a rotation in progress is waited out, as a secrets store would
            asked[0] += 1
            return store["password"]

    pool = greenpool.Pool({
        "db": {"host": cluster.host, "port": cluster.port, "user": user, "pass": password},
        "application_name": "bench-rotation",
        "groups": {"g": {"connection_count": SIZE, "autocommit": True, "timeout": 10}},
    })
    loans: list[tuple[float, float]] = []  # (end, latency)
    errors: dict[str, int] = {}
    running = True

    def borrower() -> None:
        while running:
            t0 = time.monotonic()
            try:
                with pool.handler("g") as db:
                    db.query("SELECT 1")
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                gevent.sleep(0.01)
                continue
            t1 = time.monotonic()
            loans.append((t1, t1 - t0))

    pool.wait(10)
    jobs = [gevent.spawn(borrower) for _ in range(GREENLETS)]
    gevent.sleep(seconds)
    connects = [_connect_time(cluster, user, store["password"]) for _ in range(20)]
    one_connect = statistics.median(connects)
    events: dict[str, float] = {}
    gevent.sleep(seconds)
    with switching:
        new = "second-" + uuid.uuid4().hex
        cluster.execute(pgsql.SQL("ALTER ROLE {} PASSWORD %s").format(pgsql.Identifier(user)),
                        (new,))
        store["password"] = new
    events["rotation"] = time.monotonic()
    pool.drain()
    gevent.sleep(seconds)
    events["drain"] = time.monotonic()
    pool.drain()
    gevent.sleep(seconds)
    running = False
    gevent.joinall(jobs, timeout=30)
    stats = pool.stats()["groups"]["g"]
    pool.close()

    result: dict[str, Any] = {
        "greenlets": GREENLETS, "connections": SIZE, "phase_s": seconds,
        "errors": sum(errors.values()), "error_kinds": errors,
        "one_connect_ms": one_connect * 1e3,
        "loans": len(loans), "password_asked": asked[0],
        "drained": stats["discards_by_reason"].get("drained", 0),
        "connects": stats["connects"],
    }
    first = min(events.values())
    steady = [lat for end, lat in loans if end < first]
    result["steady_max_ms"] = max(steady) * 1e3
    result["steady_p99_ms"] = _p99(steady) * 1e3
    for name, at in events.items():
        window = [lat for end, lat in loans if at <= end < at + 1.0]
        result[f"{name}_max_ms"] = max(window, default=0.0) * 1e3
        result[f"{name}_p99_ms"] = _p99(window) * 1e3
        result[f"{name}_loans"] = len(window)
        bound = result["steady_max_ms"] + result["one_connect_ms"]
        result[f"{name}_met"] = result["errors"] == 0 and result[f"{name}_max_ms"] <= bound
    return result


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def report(result: dict[str, Any]) -> str:
    bound = result["steady_max_ms"] + result["one_connect_ms"]
    lines = [
        "# Credential rotation and drain() under contention",
        "",
        f"{result['greenlets']} greenlets, {result['connections']} connections, `SELECT 1` "
        f"back to back; the password is a function; {result['phase_s']:g} s per phase. "
        f"One connect under this load: {result['one_connect_ms']:.1f} ms (median of 20). "
        f"Steady state before: slowest loan {result['steady_max_ms']:.1f} ms, p99 "
        f"{result['steady_p99_ms']:.1f} ms.",
        "",
        "| event | loans in the next second | p99 ms | slowest ms | bound ms | target |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("rotation", "drain"):
        met = "met" if result[f"{name}_met"] else "**NOT met**"
        lines.append(f"| {name} | {result[f'{name}_loans']} | {result[f'{name}_p99_ms']:.1f} "
                     f"| {result[f'{name}_max_ms']:.1f} | {bound:.1f} | {met} |")
    lines += [
        "",
        f"Application errors: {result['errors']} {result['error_kinds'] or ''}. Connections "
        f"opened: {result['connects']} ({result['connections']} first, the rest "
        f"replacements), {result['drained']} closed as drained; the password function was "
        f"asked {result['password_asked']} times. The bound is the slowest steady-state loan "
        f"plus one connect: a caller waited at most for one new connection.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rotation")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    result = run(args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rotation.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (args.out / "rotation.md").write_text(text)
    print(text)
    return 0 if result["rotation_met"] and result["drain_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
