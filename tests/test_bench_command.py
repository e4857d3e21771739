"""``greenpool bench``: a load through one group, then throughput, latency and the pool's stats."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from modes import MODE

pytestmark = pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent process")


def test_bench_reports_throughput_latency_and_pool_stats(pg, tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"db": pg.endpoint(), "groups": {
        "read": {"connection_count": 4, "autocommit": True}, "write": {}}}))
    result = subprocess.run(
        [sys.executable, "-m", "greenpool", "bench", str(path), "--group", "read",
         "--clients", "20", "--seconds", "1.5"],
        capture_output=True, text=True, timeout=60, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "ops/s" in out and "in use" in out  # the live progress line
    throughput = float(out.split("throughput: ")[1].split(" ops/s")[0])
    assert throughput > 100
    assert "p50" in out and "p99" in out and "errors: 0" in out
    assert "max_size 4" in out  # the pool's stats for the loaded group


def test_bench_needs_a_group_when_there_are_several(pg, tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"db": pg.endpoint(), "groups": {"a": {}, "b": {}}}))
    result = subprocess.run([sys.executable, "-m", "greenpool", "bench", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "name a group" in result.stderr and "Traceback" not in result.stderr
