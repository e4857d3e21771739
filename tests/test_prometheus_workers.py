"""The multi-worker directory export (greenpool.prometheus_workers) against real worker
processes: a gone worker's counters are folded into the totals exactly once, and nothing
it left behind stays in the directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from modes import MODE

pytestmark = [
    pytest.mark.skipif(MODE != "gevent", reason="no pool involved: runs once, from the gevent run"),
    pytest.mark.timeout(60),
]
prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.core import CounterMetricFamily  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from greenpool import prometheus_workers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def worker_that_served(directory: Path, jobs: int) -> None:
    """A worker process that counted ``jobs``, wrote its last snapshot and exited."""
    done = run(f"""
        from prometheus_client import CollectorRegistry, Counter
        from greenpool import prometheus_workers
        registry = CollectorRegistry()
        Counter("jobs", "Jobs done", registry=registry).inc({jobs})
        prometheus_workers.start_worker({str(directory)!r}, registry).stop()
    """)
    assert done.returncode == 0, done.stderr


def merged_jobs(directory: Path) -> float:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(prometheus_workers.DirectoryCollector(directory))
    text = generate_latest(registry).decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "jobs_total")


def test_gone_worker_counted_once_when_the_collector_dies_between_folding_and_removing(
        tmp_path: Path) -> None:
    worker_that_served(tmp_path, jobs=3)
    # the serving process is killed right after it folded the gone worker's snapshot into
    # retired.json, before it removed the file (a kill cannot be timed there otherwise)
    killed = run(f"""
        import os, pathlib
        from prometheus_client import CollectorRegistry, generate_latest
        from greenpool import prometheus_workers
        pathlib.Path.unlink = lambda self, missing_ok=False: os._exit(9)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(prometheus_workers.DirectoryCollector({str(tmp_path)!r}))
        generate_latest(registry)
    """)
    assert killed.returncode == 9, killed.stderr
    assert list(tmp_path.glob("*.prom")), "the snapshot was to be left behind"

    assert merged_jobs(tmp_path) == 3
    assert merged_jobs(tmp_path) == 3
    assert not list(tmp_path.glob("*.prom"))


def test_partial_file_of_a_writer_killed_mid_write_is_removed(tmp_path: Path) -> None:
    worker_that_served(tmp_path, jobs=2)
    dead = run("import os; print(os.getpid())")
    partial = tmp_path / f"{int(dead.stdout)}-0badc0de.tmp"
    partial.write_text("# HELP jobs_total Jobs done\n# TYPE jobs_total counter\njobs_to")

    assert merged_jobs(tmp_path) == 2
    assert not partial.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock", "retired.json"]


def test_last_snapshot_at_stop_is_not_replaced_by_an_older_round(tmp_path: Path) -> None:
    """A threaded worker (gunicorn sync/gthread): the writer thread's round, collected
    before stop() and written after it, must not replace stop()'s last snapshot."""
    jobs = {"done": 0}
    in_round, go_on = threading.Event(), threading.Event()

    class SlowCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            done = jobs["done"]  # read first, as a registry's collection does
            if threading.current_thread() is not threading.main_thread():
                in_round.set()
                go_on.wait(10)
            yield CounterMetricFamily("jobs", "Jobs done", value=done)

    registry = CollectorRegistry()
    registry.register(SlowCollector())
    export = prometheus_workers.start_worker(tmp_path, registry, interval=0.01)
    assert in_round.wait(10)
    jobs["done"] = 5
    threading.Timer(0.2, go_on.set).start()  # the round ends while stop() is under way
    export.stop()
    export._thread.join(10)

    assert merged_jobs(tmp_path) == 5


def test_no_round_is_written_after_the_last_snapshot_at_stop(tmp_path: Path) -> None:
    """The writer's round that woke before stop() but takes the lock after it (gunicorn's
    ``worker_exit`` then closes the pool, whose counters leave the registry) writes
    nothing: the worker's last file keeps its final counts, and the merged total does not
    go backwards."""
    jobs = {"done": 7}

    class PoolCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            if jobs["done"]:  # a closed pool drops out of the scrape
                yield CounterMetricFamily("jobs", "Jobs done", value=jobs["done"])

    registry = CollectorRegistry()
    registry.register(PoolCollector())
    export = prometheus_workers.start_worker(tmp_path, registry, interval=3600)
    export.stop()
    jobs["done"] = 0  # the pool closed after the last snapshot
    export.write()  # the round that was already under way

    assert "jobs_total 7.0" in export.path.read_text()
