"""Sampling profile (pyinstrument) of greenpool's hot path: checkout + SELECT 1 + checkin.

Runs in a fresh process under gevent, like the workloads: ``python -m benchmarks.profile_hotpath``
profiles against a throwaway cluster of its own; the suite calls :func:`profile`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from greenpool.testing.postgres import Cluster

LOOPS = 20000

_CHILD = """
from gevent import monkey; monkey.patch_all()
import sys
import greenpool
from pyinstrument import Profiler
pool = greenpool.Pool({{'db': {endpoint!r}, 'application_name': 'bench-profile',
                       'groups': {{'g': {{'connection_count': 10, 'autocommit': True}}}}}})
for _ in range(500):
    with pool.handler('g') as db:
        db.query('SELECT 1')
profiler = Profiler(interval=0.0002)
profiler.start()
for _ in range({loops}):
    with pool.handler('g') as db:
        db.query('SELECT 1')
profiler.stop()
pool.close()
print(profiler.output_text(unicode=True, color=False, show_all=False))
"""


def profile(cluster: Cluster, out: Path) -> str:
    """Profile in a subprocess; write the full tree to ``out``; return a short summary."""
    code = _CHILD.format(endpoint=cluster.endpoint(), loops=LOOPS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    text = proc.stdout if proc.returncode == 0 else proc.stderr
    out.write_text(text)
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:45])


if __name__ == "__main__":
    with Cluster() as pg:
        here = Path(__file__).resolve().parent / "results"
        here.mkdir(exist_ok=True)
        print(profile(pg, here / "profile.txt"))
