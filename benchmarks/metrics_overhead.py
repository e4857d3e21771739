"""What the duration histograms cost a clean loan: metrics off, Prometheus, OpenTelemetry.

``python -m benchmarks.metrics_overhead [--rounds N] [--out FILE]``

Three pools in one process, on one throwaway server, taking turns in chunks of ``CHUNK``
loans (a swing in the machine's load hits all three alike): one not exported (nothing
timed), one registered with Prometheus, one instrumented with OpenTelemetry's SDK. A timed
loan appends its wait and use time to the group's buffers (``Timing.values``); a
collection folds them into the histograms' buckets (and, for OpenTelemetry, records them
into the SDK's histograms), as a scrape or an export interval does in production: here
after each round, outside the timed loop, and that cost per value is reported apart. A
loan here is ``handler()`` entered and left with no statement: the pool's own work, which
the histograms add to, without a round trip's noise. Printed: the medians of ns per loan
and of each exporter's extra ns per loan against "off" (target: a few hundred at most),
and ns per value of each collection. Then the floor without the loan's noise, timed
alone: one append to a ``Timing``'s buffer and one ``time.monotonic()``; a timed loan adds
two appends and one clock read. ``--out`` keeps the rows as JSON.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import timeit  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import greenpool  # noqa: E402
from greenpool import otel, prometheus  # noqa: E402
from greenpool.stats import Timing  # noqa: E402
from greenpool.testing.postgres import Cluster  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

CHUNK = 5000


def _loans(pool: Any) -> float:
    """ns per loan over one chunk."""
    handler = pool.handler
    started = time.perf_counter()
    for _ in range(CHUNK):
        with handler():
            pass
    return (time.perf_counter() - started) / CHUNK * 1e9


def measure(rounds: int) -> dict[str, Any]:
    with Cluster() as pg:
        config = {"type": "gevent", "db": pg.endpoint(), "application_name": "bench-metrics",
                  "groups": {"default": {"connection_count": 2}}}
        off, prom, tel = (greenpool.Pool(config) for _ in range(3))
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        registry = CollectorRegistry()
        try:
            prometheus.register(prom, name="bench", registry=registry)
            otel.instrument(tel, meter_provider=provider)
            for pool in (off, prom, tel):  # warm-up: connect, caches
                _loans(pool)
            reader.get_metrics_data()
            list(registry.collect())
            rows = []
            for _ in range(rounds):
                row = {"off": _loans(off), "prometheus": _loans(prom), "otel": _loans(tel)}
                started = time.perf_counter()
                list(registry.collect())  # a scrape: folds the round's 2 x CHUNK values
                row["prometheus_collect_ns_per_value"] = ((time.perf_counter() - started)
                                                          / (2 * CHUNK) * 1e9)
                started = time.perf_counter()
                reader.get_metrics_data()  # folds them and records them into the SDK
                row["otel_collect_ns_per_value"] = ((time.perf_counter() - started)
                                                    / (2 * CHUNK) * 1e9)
                rows.append(row)
        finally:
            for pool in (off, prom, tel):
                pool.close()
            provider.shutdown()

    def med(f: Any) -> float:
        return round(statistics.median(f(r) for r in rows), 1)

    # the floor, without the loan's noise: what a timed loan adds (one monotonic() call, two
    # appends, the attribute reads)
    append = Timing().values.append
    append_ns = min(timeit.repeat(lambda: append(0.001), number=100_000, repeat=5)) * 1e4
    call_ns = min(timeit.repeat(lambda: None, number=100_000, repeat=5)) * 1e4
    clock_ns = min(timeit.repeat(time.monotonic, number=100_000, repeat=5)) * 1e4

    return {
        "rounds": rounds, "chunk": CHUNK,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "off_ns": med(lambda r: r["off"]),
        "prometheus_ns": med(lambda r: r["prometheus"]),
        "otel_ns": med(lambda r: r["otel"]),
        "prometheus_extra_ns": med(lambda r: r["prometheus"] - r["off"]),
        "otel_extra_ns": med(lambda r: r["otel"] - r["off"]),
        "prometheus_collect_ns_per_value": med(
            lambda r: r["prometheus_collect_ns_per_value"]),
        "otel_collect_ns_per_value": med(lambda r: r["otel_collect_ns_per_value"]),
        "append_ns": round(append_ns - call_ns, 1),
        "monotonic_ns": round(clock_ns, 1),
        "rows": rows,
    }


def main() -> None:
    global CHUNK
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_overhead",
                                     description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunk", type=int, default=CHUNK, help="loans per turn")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    CHUNK = args.chunk
    result = measure(args.rounds)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
