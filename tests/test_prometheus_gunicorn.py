"""The multi-worker Prometheus recipe (examples/metrics) under real gunicorn gevent workers:
one merged ``/metrics`` whose totals add up over the workers and survive a worker's
replacement."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modes import MODE

from greenpool.testing.postgres import free_port

pytestmark = [
    pytest.mark.skipif(MODE != "gevent", reason="drives gunicorn once, from the gevent run"),
    pytest.mark.timeout(120),
]
pytest.importorskip("gunicorn")
prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "metrics"
ROOT = EXAMPLE.parent.parent


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"duplicate series {key}"
            found[key] = sample.value
    return found


def wait_for(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            result = predicate()
            if result:
                return result
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.1)


@pytest.fixture
def server(pg: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    port, metrics_port = free_port(), free_port()
    metrics_dir = tmp_path / "metrics"
    env = {**os.environ, "GREENPOOL_CONFIG": json.dumps({"db": pg.endpoint()}),
           "GREENPOOL_METRICS_DIR": str(metrics_dir),
           "GREENPOOL_METRICS_PORT": str(metrics_port), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"),
             "-w", "2", "-b", f"127.0.0.1:{port}"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    info = {"proc": proc, "app": f"http://127.0.0.1:{port}/",
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "dir": metrics_dir,
            "log": log}
    try:
        wait_for(lambda: proc.poll() is None and len(list(metrics_dir.glob("*.prom"))) == 2)
        yield info
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def workers_of(text: str) -> set[str]:
    return {dict(labels)["worker"] for (name, labels) in samples(text)
            if name == "greenpool_connections_max"}


def acquired(text: str) -> float:
    return samples(text)[("greenpool_connections_acquired_total",
                          (("group", "default"), ("pool", "app")))]


def test_two_workers_one_endpoint_totals_survive_a_worker_replacement(server):
    pids: list[str] = []
    while len(set(pids)) < 2 or len(pids) < 40:  # until both workers served some
        pids.append(get(server["app"]).split()[-1])
        assert len(pids) < 1000
    served = len(pids)

    text = wait_for(lambda: (t := get(server["metrics"])) and acquired(t) == served and t)
    found = samples(text)
    assert workers_of(text) == set(pids)  # gauges: one series per live worker
    key = (("group", "default"), ("pool", "app"))
    assert found[("greenpool_connections_use_seconds_count", key)] == served  # summed
    assert found[("greenpool_connections_wait_seconds_bucket",
                  (("group", "default"), ("le", "+Inf"), ("pool", "app")))] == served

    # gunicorn replaces a worker stopped with SIGTERM: its counts stay in the total
    victim = pids[0]
    os.kill(int(victim), signal.SIGTERM)
    text = wait_for(lambda: (t := get(server["metrics"])) and len(workers_of(t)) == 2
                    and victim not in workers_of(t) and t)
    assert acquired(text) == served
    assert (server["dir"] / "retired.json").exists()
    for _ in range(10):
        get(server["app"])
    text = wait_for(lambda: (t := get(server["metrics"])) and acquired(t) == served + 10
                    and t)
    assert acquired(text) == served + 10
