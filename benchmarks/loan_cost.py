"""What one clean loan costs the client, counted rather than timed: load-independent.

``python -m benchmarks.loan_cost [--loans N] [--no-callgrind] [--out FILE]``

Timings on a shared machine move with its load (``ab_overhead`` alternates the pools so
that a swing hits both alike, and still needs many rounds). Two counts do not move:

* **bytecodes**: the Python bytecodes one loan executes, by function (``sys.settrace``
  with opcode events, 100 loans after a warm-up), for greenpool and psycopg2's
  SimpleConnectionPool through the same adapters (:mod:`benchmarks.adapters`), so both do
  the same work: checkout + ``SELECT 1`` + fetch + checkin;
* **instructions** (if ``valgrind`` is installed): the client's user-space CPU
  instructions per loan, ``valgrind --tool=callgrind`` of a process running ``N`` loans
  minus one running none, so start-up and connects cancel out (repeatable to about ±1 %;
  the kernel's share, a system call like the borrow check's ``poll``, is not counted).

Each child process holds both pools, on one throwaway server started here, and lends from
one: as in ``ab_overhead``, both share the process's gevent hub and psycopg2 wait callback
(greenpool's, installed by its pool), whose costs depend on the process's history (how deep
the C stack was when the hub first ran sets what every switch to it copies), not on the
pool.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from greenpool.testing.postgres import Cluster

_CHILD = r"""
from gevent import monkey
monkey.patch_all()
from psycogreen.gevent import patch_psycopg
patch_psycopg()
import collections, json, sys
from benchmarks.adapters import GreenPool, Psycopg2Simple, Target
target = Target(**json.loads(sys.argv[1]))
which, loans, trace = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "trace"
both = {"greenpool": GreenPool(target, 10), "simple": Psycopg2Simple(target, 10)}

def run(adapter, n):
    for _ in range(n):
        with adapter.session() as db:
            db.query("SELECT 1")

for adapter in both.values():  # connects, caches, the interpreter's specialisation
    run(adapter, 300)
adapter = both[which]
if trace:
    counts = collections.Counter()
    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"] += 1
        return tracer
    sys.settrace(tracer)
    run(adapter, loans)
    sys.settrace(None)
    del counts[f"<string>:run"]  # the loop itself
    print(json.dumps({k: v / loans for k, v in counts.most_common()}))
else:
    run(adapter, loans)
for adapter in both.values():
    adapter.close()
"""

POOLS = ("greenpool", "simple")


def _child(target: dict[str, Any], which: str, loans: int, mode: str,
           wrap: list[str] | None = None) -> str:
    cmd = [*(wrap or []), sys.executable, "-c", _CHILD, json.dumps(target), which, str(loans),
           mode]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env,
                          timeout=900).stdout


def bytecodes(target: dict[str, Any], loans: int = 100) -> dict[str, Any]:
    result = {}
    for which in POOLS:
        by_function = json.loads(_child(target, which, loans, "trace"))
        result[which] = {"per_loan": round(sum(by_function.values()), 1),
                         "by_function": by_function}
    return result


def _instructions(target: dict[str, Any], which: str, loans: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        _child(target, which, loans, "run",
               ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("callgrind wrote no summary")


def instructions(target: dict[str, Any], loans: int) -> dict[str, Any]:
    per_loan = {which: (_instructions(target, which, loans) - _instructions(target, which, 0))
                / loans for which in POOLS}
    return {"loans": loans, "per_loan": {k: round(v) for k, v in per_loan.items()},
            "ratio": round(per_loan["greenpool"] / per_loan["simple"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loan_cost", description=__doc__)
    parser.add_argument("--loans", type=int, default=4000, help="loans per callgrind run")
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with Cluster() as pg:
        target = {"hosts": [(pg.host, pg.port)], "user": pg.user, "password": pg.password,
                  "dbname": pg.dbname, "app_name": "bench-loan-cost"}
        result: dict[str, Any] = {"bytecodes": bytecodes(target)}
        if not args.no_callgrind and shutil.which("valgrind"):
            result["instructions"] = instructions(target, args.loans)
    brief = {"bytecodes_per_loan": {k: v["per_loan"] for k, v in result["bytecodes"].items()},
             **({"instructions": result["instructions"]} if "instructions" in result else {})}
    print(json.dumps(brief, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
