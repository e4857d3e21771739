"""``greenpool bench``: a load through one group, then throughput, latency and the pool's stats."""

from __future__ import annotations

import json
import re
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
    assert result.stderr == ("greenpool bench: the configuration has 2 groups ('a', 'b'); "
                             "name the one to load with --group, e.g. --group a\n")


def test_bench_names_the_groups_when_group_is_unknown(pg, tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"db": pg.endpoint(), "groups": {"a": {}, "b": {}}}))
    result = subprocess.run([sys.executable, "-m", "greenpool", "bench", str(path),
                             "--group", "c"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2
    assert result.stderr == ("greenpool bench: --group c: no such group in the configuration; "
                             "its groups: 'a', 'b'\n")


def test_bench_says_which_timeouts_were_the_end_of_the_run(pg, tmp_path):
    """50 clients on one connection: most are waiting when the run ends. Those waits are
    not errors, and the report says why the pool's timeouts counter has them."""
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"db": pg.endpoint(), "groups": {
        "g": {"connection_count": 1, "timeout": 5}}}))
    result = subprocess.run(
        [sys.executable, "-m", "greenpool", "bench", str(path), "--clients", "50",
         "--seconds", "1", "--sql", "SELECT pg_sleep(0.05)"],
        capture_output=True, text=True, timeout=60, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "errors: 0" in out
    cut = int(out.split("waits cut short by the end of the run: ")[1].split()[0])
    timeouts = int(out.split(", timeouts ")[1].split(",")[0])
    assert cut == timeouts > 0, out


def test_bench_against_a_black_hole_says_the_connect_has_not_answered(blackhole, tmp_path):
    """A run shorter than connect_timeout: no endpoint has failed yet, and the last line
    says so rather than calling it up."""
    path = tmp_path / "hole.json"
    path.write_text(json.dumps({"db": dict(blackhole.endpoint(), connect_timeout=30)}))
    result = subprocess.run(
        [sys.executable, "-m", "greenpool", "bench", str(path), "--clients", "3",
         "--seconds", "1"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("greenpool bench: nothing was served in "), last
    assert re.search(rf"endpoint 127\.0\.0\.1:{blackhole.port}/blackhole: no answer yet to "
                     rf"\d+ connect\(s\) under way \(connect_timeout 30 s\)", last), last
    assert "state up" not in last and " up" not in last.split("endpoint")[1]
