"""greenpool against SimpleConnectionPool in one process, alternating, for a loaded machine.

``python -m benchmarks.ab_overhead [--rounds N] [--out FILE]``

The overhead workload runs each pool in a process of its own, one after another: on a
machine whose load swings (other test suites on the same 2 cores), two pools a few seconds
apart see different machines, and the ratio of the two moves twofold between repetitions.
Here both pools live in one process, on one throwaway server, and take turns in chunks of
``CHUNK`` loans, so a swing in the load hits both alike. Per round: each pool's µs per clean
loan (checkout + ``SELECT 1`` + checkin, the overhead workload's loop) and client CPU per
loan, greenpool's dirty loan, and one ``SELECT 1`` round trip on a held connection. Printed:
the medians over the rounds of greenpool ÷ SimpleConnectionPool (ops/s, i.e. the inverse of
the µs ratio) and of the dirty loan's extra cost in round trips; then, on a server that logs
every statement, how many statements a clean and a dirty greenpool loan send (the exact
count). ``--out`` keeps it all as JSON.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

from greenpool.testing.postgres import Cluster  # noqa: E402

from .adapters import GreenPool, Psycopg2Simple, Target  # noqa: E402
from .workloads import DIRTYING  # noqa: E402

CHUNK = 200
#: the one CPU the client and the server's processes share during the measurement
PINNED_CPU = 0


def pin_to_one_cpu(postmaster: int, cpu: int = PINNED_CPU) -> None:
    """Run this process and the server (the postmaster, so every backend it forks after,
    and the children it has) on one CPU. Unpinned, the kernel places each backend on its
    own: one on the client's core answers a loan in ~16 µs, one on the other core in
    ~75 µs with 4 times the client's CPU (cross-core wake-ups on this VM), and which a pool's
    hot connection gets is chance, fixed for a whole run: single runs swung from 0.2x to
    8x. Pinned, both pools meet the same machine."""
    os.sched_setaffinity(0, {cpu})
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children")
    for pid in [postmaster, *map(int, children.read_text().split())]:
        os.sched_setaffinity(pid, {cpu})


def _loans(adapter: Any, sql: str) -> tuple[float, float]:
    """(wall µs, client CPU µs) per loan over one chunk."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(CHUNK):
        with adapter.session() as db:
            db.query(sql)
    return ((time.perf_counter() - wall) / CHUNK * 1e6,
            (time.process_time() - cpu) / CHUNK * 1e6)


def _round_trip(adapter: Any) -> float:
    with adapter.session() as db:
        started = time.perf_counter()
        for _ in range(CHUNK):
            db.query("SELECT 1")
        return (time.perf_counter() - started) / CHUNK * 1e6


def measure(rounds: int) -> dict[str, Any]:
    with Cluster(settings={"max_connections": 100}) as pg:
        assert pg.pid is not None
        pin_to_one_cpu(pg.pid)
        target = Target([(pg.host, pg.port)], pg.user, pg.password, pg.dbname, "bench-ab")
        gp, simple = GreenPool(target, 10), Psycopg2Simple(target, 10)
        try:
            for adapter in (gp, simple):  # warm-up: connect, caches
                _loans(adapter, "SELECT 1")
                _loans(adapter, DIRTYING)
            rows = []
            for _ in range(rounds):
                gp_us, gp_cpu = _loans(gp, "SELECT 1")
                simple_us, simple_cpu = _loans(simple, "SELECT 1")
                dirty_us, _ = _loans(gp, DIRTYING)
                clean_us, _ = _loans(gp, "SELECT 1")
                trip_us = _round_trip(gp)
                rows.append({"gp_us": gp_us, "simple_us": simple_us, "gp_cpu_us": gp_cpu,
                             "simple_cpu_us": simple_cpu, "dirty_us": dirty_us,
                             "clean_us": clean_us, "round_trip_us": trip_us})
        finally:
            gp.close()
            simple.close()

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in rows)

    return {
        "rounds": rounds, "chunk": CHUNK,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "ops_ratio": med(lambda r: r["simple_us"] / r["gp_us"]),
        "cpu_ratio": med(lambda r: r["gp_cpu_us"] / r["simple_cpu_us"]),
        "gp_us": med(lambda r: r["gp_us"]), "simple_us": med(lambda r: r["simple_us"]),
        "gp_cpu_us": med(lambda r: r["gp_cpu_us"]),
        "simple_cpu_us": med(lambda r: r["simple_cpu_us"]),
        "reset_round_trips": med(lambda r: (r["dirty_us"] - r["clean_us"]) / r["round_trip_us"]),
        "rows": rows,
    }


def count_statements(loans: int = 200) -> dict[str, Any]:
    """Statements the server receives per greenpool loan, clean and dirty, counted in its log
    (``log_statement = all``, a server of its own): the exact round-trip count that the
    timings above can only estimate. A clean loan should send 1 (its ``SELECT 1``), a dirty
    one 2 (its statement and the ``DISCARD ALL``)."""
    with Cluster(settings={"log_statement": "all"}) as pg:
        target = Target([(pg.host, pg.port)], pg.user, pg.password, pg.dbname, "bench-ab")
        gp = GreenPool(target, 1)
        counts: dict[str, Any] = {}
        try:
            _loans(gp, "SELECT 1")  # connect first: its statements are not counted
            for kind, sql in (("clean", "SELECT 1"), ("dirty", DIRTYING)):
                with open(pg.logfile, "rb") as log:
                    offset = log.seek(0, 2)
                for _ in range(loans):
                    with gp.session() as db:
                        db.query(sql)
                time.sleep(0.5)  # the logger writes asynchronously
                with open(pg.logfile, "rb") as log:
                    log.seek(offset)
                    text = log.read().decode(errors="replace")
                lines = [line.split("statement: ", 1)[1] for line in text.splitlines()
                         if "statement: " in line]
                kinds: dict[str, int] = {}
                for line in lines:
                    kinds[line] = kinds.get(line, 0) + 1
                counts[kind] = {"per_loan": len(lines) / loans, "statements": kinds}
        finally:
            gp.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_overhead",
                                     description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = measure(args.rounds)
    result["server_statements"] = count_statements()
    brief = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(brief, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
