"""``greenpool bench CONFIG``: load one group of your configuration and say how it held up.

N greenlets run a statement through ``handler(group)`` in a loop for T seconds, with a live
progress line. Then: throughput, latency percentiles, time spent waiting for a
connection, errors by kind, and the pool's own stats. It is for sizing a group against
your server. Comparing pools is the job of ``benchmarks/``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

from .check import CheckFailed, load_config
from .errors import ConfigError


def _percentile(sorted_values: list[float], share: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(share * len(sorted_values)))
    return sorted_values[index]


def run(path: str | None, group: str | None, clients: int, seconds: float, sql: str) -> int:
    try:
        config = load_config(path)
    except CheckFailed as exc:
        print(f"greenpool bench: {exc}")
        return 2
    from gevent import monkey

    monkey.patch_all()
    import gevent

    import greenpool

    try:
        pool = greenpool.Pool(config)
        target = pool.group(group)
    except ConfigError as exc:
        print(f"greenpool bench: bad configuration: {exc}")
        return 2
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.monotonic()
    deadline = started + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                with pool.handler(target.name) as db:
                    db.query(sql)
                latencies.append(time.perf_counter() - began)
            except Exception as exc:
                errors[type(exc).__name__] += 1
                gevent.sleep(0.01)  # do not spin on a failing server

    def progress() -> None:
        while time.monotonic() < deadline:
            gevent.sleep(0.5)
            elapsed = time.monotonic() - started
            stats = target.stats()
            sys.stdout.write(
                f"\r{elapsed:5.1f}s  {len(latencies) / elapsed:9.0f} ops/s  "
                f"in use {stats['in_use']}/{stats['max_size']}  waiting {stats['waiting']:4d}  "
                f"errors {sum(errors.values())}   "
            )
            sys.stdout.flush()

    try:
        tasks = [gevent.spawn(client) for _ in range(clients)]
        ticker = gevent.spawn(progress)
        gevent.joinall(tasks)
        ticker.kill()
        elapsed = time.monotonic() - started
        stats = pool.stats()
    finally:
        pool.close()
    done = sorted(latencies)
    group_stats = stats["groups"][target.name]
    print(f"\n\ngroup {target.name!r}: {clients} greenlets for {seconds:.0f} s running {sql!r}")
    print(f"  throughput: {len(done) / elapsed:.0f} ops/s ({len(done)} ok)")
    print("  latency ms: " + "  ".join(
        f"p{int(q * 100)} {_percentile(done, q) * 1000:.2f}" for q in (0.5, 0.9, 0.99, 0.999)))
    waited = group_stats["wait_time"] / max(group_stats["waits"], 1)
    print(f"  waits for a connection: {group_stats['waits']} (mean {waited * 1000:.2f} ms)")
    print(f"  errors: {dict(errors) if errors else 0}")
    print(f"  pool: {_compact(group_stats)}")
    for label, endpoint in stats["endpoints"].items():
        print(f"  endpoint {label}: {_compact(endpoint)}")
    return 1 if errors and not done else 0


def _compact(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items() if value not in (None, {}))
