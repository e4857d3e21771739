"""The PgBouncer helper's own life cycle: whatever ends a run, the PgBouncer it started is
stopped (by its PID) and its directory removed, and never its parent's from a forked child."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from scripts import run_script

from greenpool.testing import pgbouncer
from greenpool.testing.pgbouncer import PgBouncer, available
from greenpool.testing.postgres import Cluster
from greenpool.testing.processes import alive, pids_naming

pytestmark = [pytest.mark.skipif(not available(), reason="pgbouncer not installed"),
              pytest.mark.timeout(120)]

LEFT_RUNNING = """
import json
from greenpool.testing.postgres import Cluster
from greenpool.testing.pgbouncer import PgBouncer
cluster = Cluster()
cluster.init()
cluster.start()
bouncer = PgBouncer(cluster).start()
print(json.dumps({"pid": bouncer.pid, "root": str(bouncer.root)}), flush=True)
# a test run that ends without stop(): a failure, a forgotten fixture
"""


def test_a_pgbouncer_left_running_is_stopped_and_removed_when_its_process_exits() -> None:
    result = run_script(LEFT_RUNNING)
    assert not alive(result["pid"])
    assert not Path(result["root"]).exists()
    assert pids_naming(Path(result["root"])) == []


FORKED_CHILD_EXITS = """
import json, os, sys
from greenpool.testing.postgres import Cluster
from greenpool.testing.pgbouncer import PgBouncer
cluster = Cluster()
cluster.init()
cluster.start()
bouncer = PgBouncer(cluster).start()
child = os.fork()
if child == 0:
    bouncer.stop()  # the parent's: a no-op here
    sys.exit(0)  # a normal exit: atexit hooks run in the child
_, status = os.waitpid(child, 0)
pid = bouncer.pid
running = pid is not None and bouncer.root.exists()
bouncer.stop()
cluster.destroy()
print(json.dumps({"status": status, "running": running, "pid": pid}), flush=True)
"""


def test_a_forked_child_that_exits_leaves_the_parents_pgbouncer_running() -> None:
    result = run_script(FORKED_CHILD_EXITS)
    assert result["status"] == 0 and result["running"] is True, result["stderr"]
    assert not alive(result["pid"])


def test_an_interrupted_start_stops_the_pgbouncer_it_started(
    pg: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt (a signal handler's exception) while start() waits for the port:
    the PgBouncer already running is stopped and its directory removed before it goes on.
    The interruption is raised by the port check itself, so that it lands after the
    process started, in every mode."""
    bouncer = PgBouncer(pg)
    started: list[int] = []

    def interrupted(*args: Any, **kwargs: Any) -> socket.socket:
        started.extend(pids_naming(bouncer.root))
        raise KeyboardInterrupt

    monkeypatch.setattr(pgbouncer.socket, "create_connection", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bouncer.start()
    monkeypatch.undo()
    assert started, "the interruption came before PgBouncer was started"
    assert not any(alive(pid) for pid in started)
    assert not bouncer.root.exists()
