"""Run a scenario in a Python subprocess of its own and read the JSON it prints last.

Some faults cannot be made inside the test process: a process-wide limit on threads (which
root ignores, so the child drops to an unprivileged user), or a ``SIGALRM`` handler
(pytest-timeout owns that signal here). The scenario's source is written to a fresh
temporary directory readable by every user, and run with this interpreter, greenpool from
the worktree under test on its path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the checkout under test


def run_script(source: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``source`` with ``args``; the JSON object on its last line of output. Fails the
    test (with the child's output) if it exits non-zero, prints no JSON, or outlives
    ``timeout`` (it is then killed)."""
    workdir = Path(tempfile.mkdtemp(prefix="greenpool-script-"))
    try:
        os.chmod(workdir, 0o755)
        script = workdir / "scenario.py"
        script.write_text(source)
        os.chmod(script, 0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "GREENPOOL"))}
        env["PYTHONPATH"] = str(ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            done = subprocess.run([sys.executable, str(script), *args], cwd=workdir, env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"the scenario did not finish within {timeout} s; output:\n"
                                 f"{exc.stdout}\n{exc.stderr}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise AssertionError(f"the scenario failed (exit {done.returncode}):\n{done.stdout}\n"
                             f"{done.stderr}")
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except ValueError:
        raise AssertionError(f"the scenario printed no JSON:\n{done.stdout}\n{done.stderr}"
                             ) from None
    result["stderr"] = done.stderr[-3000:]
    return result
