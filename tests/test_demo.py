"""The README's first command: ``greenpool demo`` on nothing but the server binaries."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from modes import MODE


@pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent test process")
def test_demo_runs_a_failover_and_reports_it():
    env = {k: v for k, v in os.environ.items() if k != "GREENPOOL_DSN"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "greenpool", "demo", "--seconds", "4", "--clients", "40"],
        capture_output=True, text=True, timeout=90, env=env, check=False,
    )
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert elapsed < 60
    assert "Timeline" in out and "promoting the standby" in out
    assert "was promoted: it is now a primary" in out  # the pool detected the new role
    assert "acknowledged writes lost: 0" in out
    assert "connections still lent out: 0" in out
    assert "Traceback" not in out + result.stderr
