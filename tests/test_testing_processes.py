"""Who the testing helpers stop: only processes they started, found by PID and checked
against their directory, and only in the process that started them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from modes import MODE
from scripts import run_script

from greenpool.testing import patroni, processes
from greenpool.testing.postgres import Cluster
from greenpool.testing.processes import alive, names, pids_naming

pytestmark = pytest.mark.timeout(120)


def test_a_stale_postmaster_pid_that_went_to_another_process_is_never_signalled(
    pg_factory,
) -> None:
    """A postmaster killed outright leaves postmaster.pid behind; once its PID belongs to
    another process, the cluster is not running and destroy() leaves that process alone.
    (PID reuse cannot be forced: the file is made to name a process of ours, as it would
    after reuse.)"""
    cluster = pg_factory()
    os.kill(cluster.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pids_naming(cluster.root) and time.monotonic() < deadline:
        time.sleep(0.05)  # its backends notice the postmaster's death and exit
    assert pids_naming(cluster.root) == []
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = cluster.datadir / "postmaster.pid"
        lines = pidfile.read_text().split("\n")
        pidfile.write_text("\n".join([str(bystander.pid), *lines[1:]]))
        assert not names(bystander.pid, cluster.root)
        assert cluster.pid is None and not cluster.is_running()
        cluster.stop()  # a no-op: nothing of this cluster runs
        cluster.destroy()
        assert bystander.poll() is None, "destroy() signalled a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
    assert not cluster.root.exists()


def test_a_running_postmaster_names_its_cluster(pg: Cluster) -> None:
    assert pg.pid is not None and names(pg.pid, pg.root)
    assert not names(pg.pid, Path("/tmp/greenpool-pg-elsewhere"))
    assert not names(os.getpid(), pg.root)


@pytest.mark.skipif(os.geteuid() != 0, reason="the servers' OS user matters to root only")
def test_as_root_without_the_servers_os_user_a_cluster_is_refused_by_name_leaving_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "SERVER_OS_USER", "greenpool-no-such-user")
    with pytest.raises(RuntimeError, match=r"'greenpool-no-such-user' OS user .*useradd --system"):
        Cluster(base_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no directory made for it


INTERRUPTED_AT_EXIT = """
import json, os, signal
from greenpool.testing.postgres import Cluster
first = Cluster()
first.init()
first.start()
last = Cluster()
last.init()
last.start()
os.kill(last.pid, signal.SIGSTOP)  # the exit hook stops it first, and waits for it

def interrupt(signum, frame):
    raise KeyboardInterrupt  # a second Ctrl-C, while the exit hook waits

signal.signal(signal.SIGALRM, interrupt)
print(json.dumps({"pids": [first.pid, last.pid], "roots": [str(first.root), str(last.root)]}))
signal.setitimer(signal.ITIMER_REAL, 0.5)
"""


def test_an_exit_hook_interrupted_while_it_waits_for_a_server_still_stops_every_one() -> None:
    """The server being stopped is killed at once, and the others are stopped too."""
    result = run_script(INTERRUPTED_AT_EXIT, timeout=60)
    assert "KeyboardInterrupt" in result["stderr"]  # it did come while the hook waited
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in result["pids"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in result["pids"] if alive(pid)] == []
    assert [root for root in result["roots"] if Path(root).exists()] == []


PATRONI_FORKED_CHILD_EXITS = """
import json, os, sys
from greenpool.testing.patroni import PatroniCluster
cluster = PatroniCluster(nodes=1)
cluster._start_etcd()  # a real process of the cluster's (enough: no node needed)
child = os.fork()
if child == 0:
    sys.exit(0)  # a normal exit: atexit hooks run in the child
_, status = os.waitpid(child, 0)
running = cluster.etcd.poll() is None and cluster.root.exists()
pid = cluster.etcd.pid
print(json.dumps({"status": status, "running": running, "pid": pid}), flush=True)
# the parent's own exit destroys it
"""


@pytest.mark.skipif(patroni.missing() is not None, reason=str(patroni.missing()))
def test_a_forked_child_that_exits_leaves_the_parents_patroni_cluster_running() -> None:
    result = run_script(PATRONI_FORKED_CHILD_EXITS)
    assert result["status"] == 0 and result["running"] is True, result["stderr"]
    assert not alive(result["pid"])  # stopped by the exit hook of the process that made it


PATRONI_FORKED_CHILD_DESTROYS = PATRONI_FORKED_CHILD_EXITS.replace(
    "sys.exit(0)  # a normal exit: atexit hooks run in the child",
    "cluster.destroy(); sys.exit(0)  # as a with block or a fixture unwinding in the child")


@pytest.mark.skipif(patroni.missing() is not None, reason=str(patroni.missing()))
def test_a_forked_child_destroying_the_parents_patroni_cluster_leaves_it_running() -> None:
    result = run_script(PATRONI_FORKED_CHILD_DESTROYS)
    assert result["status"] == 0 and result["running"] is True, result["stderr"]
    assert not alive(result["pid"])


PATRONI_INTERRUPTED_AT_EXIT = """
import json, os, signal
from greenpool.testing.patroni import PatroniCluster
cluster = PatroniCluster(nodes=1)
cluster.start()
os.kill(cluster.nodes[0].postmaster_pid, signal.SIGSTOP)  # Patroni waits for it at stop

def interrupt(signum, frame):
    raise KeyboardInterrupt  # a second Ctrl-C, while the exit hook waits for Patroni

signal.signal(signal.SIGALRM, interrupt)
print(json.dumps({"root": str(cluster.root), "etcd": cluster.etcd.pid}))
signal.setitimer(signal.ITIMER_REAL, 0.5)
"""


@pytest.mark.skipif(patroni.missing() is not None, reason=str(patroni.missing()))
@pytest.mark.skipif(MODE != "gevent", reason="the harness alone: runs once, in the gevent process")
def test_a_patroni_cluster_whose_destroy_is_interrupted_leaves_no_process() -> None:
    """The node being stopped, its PostgreSQL and etcd are all killed before it goes on."""
    result = run_script(PATRONI_INTERRUPTED_AT_EXIT, timeout=150)
    assert "KeyboardInterrupt" in result["stderr"]  # it did come while the hook waited
    root = Path(result["root"])
    deadline = time.monotonic() + 10
    while pids_naming(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_naming(root) == [] and not alive(result["etcd"])
    assert not root.exists()


@pytest.mark.skipif(patroni.missing() is not None, reason=str(patroni.missing()))
@pytest.mark.skipif(MODE != "gevent", reason="the harness alone: runs once, in the gevent process")
def test_a_first_node_whose_bootstrap_fails_is_started_over_once() -> None:
    # Patroni's post-bootstrap step fails the first time only (a marker file says it ran):
    # the stand-in for a bootstrap that timed out on a loaded machine, where Patroni's
    # process exits with "Failed to bootstrap cluster".
    markers = Path(tempfile.mkdtemp(prefix="gp-bootstrap-"))
    try:
        markers.chmod(0o777)  # the servers' OS user runs the step
        marker = markers / "ran"
        fail_once = f"sh -c 'test -e {marker} || {{ touch {marker}; exit 1; }}' sh"
        with patroni.PatroniCluster(nodes=1, post_bootstrap=fail_once) as cluster:
            assert cluster.bootstrap_retries == 1
            assert cluster.leader() is cluster.nodes[0]
            assert cluster.nodes[0].execute("SELECT 1") == [(1,)]
        assert marker.exists()
    finally:
        shutil.rmtree(markers, ignore_errors=True)
