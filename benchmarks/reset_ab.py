"""What the session check costs and saves, in one process, taking turns.

``python -m benchmarks.reset_ab [--rounds N] [--chunk N] [--out FILE]``

As :mod:`benchmarks.ab_overhead` does, every pool lives in one process on one throwaway
server and they take turns in chunks of loans, so a swing in the machine's load hits all
alike. Per round, µs and client CPU µs per loan of:

* psycopg2's ``SimpleConnectionPool`` (no check, no reset) and greenpool (``reset:
  'auto'``), clean loans cycling through ``DISTINCT`` different ``SELECT`` texts: the
  parser (:func:`greenpool.sql._parse`, counted) must run once per distinct text, not per
  loan, so a clean loan stays a set lookup;
* greenpool ``reset: 'auto'`` against ``reset: 'always'`` (a ``DISCARD ALL`` on every
  loan), on the clean loans and on a loan of one ``INSERT`` (dirty under ``auto`` too: a
  serial default leaves ``currval()``), so users can choose with numbers.

Printed: the medians over the rounds, and the parser's calls during the measured loans.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import greenpool  # noqa: E402
from greenpool import sql  # noqa: E402
from greenpool.testing.postgres import Cluster  # noqa: E402

from .adapters import Psycopg2Simple, Target  # noqa: E402

DISTINCT = 20
TEXTS = [f"SELECT {i} AS c" for i in range(DISTINCT)]
INSERT = "INSERT INTO reset_ab (x) VALUES (1)"


class _Greenpool:
    def __init__(self, pg: Cluster, reset: str) -> None:
        self.pool = greenpool.Pool({
            "db": [pg.endpoint()], "application_name": f"bench-reset-{reset}",
            "groups": {"g": {"connection_count": 1, "autocommit": True, "reset": reset}}})

    def session(self) -> Any:
        return self.pool.handler("g")

    def close(self) -> None:
        self.pool.close()


def _loans(adapter: Any, texts: list[str], chunk: int) -> tuple[float, float]:
    """(wall µs, client CPU µs) per loan over one chunk, one statement per loan."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(chunk):
        with adapter.session() as db:
            db.query(texts[i % len(texts)])
    return ((time.perf_counter() - wall) / chunk * 1e6,
            (time.process_time() - cpu) / chunk * 1e6)


def measure(rounds: int, chunk: int) -> dict[str, Any]:
    parses = [0]
    parse = sql._parse

    def counted(text: str) -> str:
        parses[0] += 1
        return parse(text)

    with Cluster(settings={"max_connections": 50}) as pg:
        pg.execute("CREATE TABLE reset_ab (id serial PRIMARY KEY, x int)")
        target = Target([(pg.host, pg.port)], pg.user, pg.password, pg.dbname, "bench-reset")
        simple = Psycopg2Simple(target, 1, autocommit=True)
        auto, always = _Greenpool(pg, "auto"), _Greenpool(pg, "always")
        try:
            for adapter in (simple, auto, always):  # warm-up: connect
                _loans(adapter, ["SELECT 1"], 20)
            sql._parse = counted  # from here every parse is counted
            loans = 0
            rows = []
            for _ in range(rounds):
                row: dict[str, float] = {}
                for name, adapter, texts in (
                        ("simple_clean", simple, TEXTS), ("auto_clean", auto, TEXTS),
                        ("always_clean", always, TEXTS), ("auto_insert", auto, [INSERT]),
                        ("always_insert", always, [INSERT])):
                    row[f"{name}_us"], row[f"{name}_cpu_us"] = _loans(adapter, texts, chunk)
                    loans += chunk if name != "simple_clean" else 0
                rows.append(row)
        finally:
            sql._parse = parse
            for adapter in (simple, auto, always):
                adapter.close()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    medians = {key: round(med(key), 1) for key in rows[0]}
    return {
        "rounds": rounds, "chunk": chunk, "distinct_texts": DISTINCT + 1,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "greenpool_loans": loans, "parser_calls": parses[0],
        "ops_ratio_auto_vs_simple": round(med("simple_clean_us") / med("auto_clean_us"), 3),
        "cpu_ratio_auto_vs_simple": round(
            med("auto_clean_cpu_us") / med("simple_clean_cpu_us"), 3),
        "medians": medians, "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reset_ab", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunk", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = measure(args.rounds, args.chunk)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
