"""The test scaffolding itself: throwaway clusters, the black hole and the ticker are real."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from faults import BlackHole, Ticker
from scripts import run_script

from greenpool.testing.postgres import Cluster, ClusterError, PostgresNotFound, find_pg_bin
from greenpool.testing.processes import alive, pids_naming


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(step)


def test_cluster_answers_with_password(pg: Cluster) -> None:
    conn = psycopg2.connect(host=pg.host, port=pg.port, dbname=pg.dbname, user=pg.user,
                            password=pg.password, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    assert pg.execute("SELECT current_setting('fsync')") == [("off",)]


def test_wrong_password_is_rejected(pg: Cluster) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pg.connect(password="not-the-password")


def test_repr_and_errors_hide_password(pg: Cluster) -> None:
    assert pg.password not in repr(pg).replace("greenpool-pg-", "")
    assert f"port={pg.port}" in pg.dsn()
    assert pg.endpoint(name="other")["name"] == "other"


def test_users_databases_and_dsn_quoting(pg: Cluster, server_conns: Callable[..., int]) -> None:
    name = f"u_{uuid.uuid4().hex[:8]}"
    password = "sp ace'quote\\back"
    pg.create_user(name, password)
    pg.create_database(name, owner=name)
    conn = pg.connect(user=name, password=password, dbname=name, application_name=name)
    try:
        assert server_conns(application_name=name) == 1
        assert server_conns(dbname=name, user=name) == 1
    finally:
        conn.close()
    assert server_conns(application_name=name, expect=0) == 0


def test_standby_replicates_and_promotes(pg_factory: Callable[..., Cluster]) -> None:
    primary = pg_factory()
    primary.execute("CREATE TABLE t (x int)")
    standby = pg_factory(standby_of=primary)
    assert standby.port != primary.port
    assert standby.execute("SELECT pg_is_in_recovery()") == [(True,)]

    primary.execute("INSERT INTO t VALUES (42)")
    wait_for(lambda: standby.execute("SELECT x FROM t") == [(42,)])
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        standby.execute("INSERT INTO t VALUES (1)")

    standby.promote()
    assert standby.execute("SELECT pg_is_in_recovery()") == [(False,)]
    standby.execute("INSERT INTO t VALUES (43)")
    assert standby.execute("SELECT x FROM t ORDER BY x") == [(42,), (43,)]


def test_stop_immediate_then_start(pg_factory: Callable[..., Cluster]) -> None:
    cluster = pg_factory()
    pid = cluster.pid
    assert pid is not None and cluster.is_running()
    cluster.stop("immediate")
    assert not cluster.is_running() and cluster.pid is None
    with pytest.raises(psycopg2.OperationalError):
        cluster.connect(connect_timeout=2)
    cluster.start()
    assert cluster.execute("SELECT 1") == [(1,)]
    assert cluster.pid not in (None, pid)


def test_start_failure_raises_cluster_error_with_log(pg: Cluster) -> None:
    clash = Cluster(port=pg.port)  # the port is taken: the server must fail to start
    try:
        clash.init()
        with pytest.raises(ClusterError, match="server log tail") as info:
            clash.start()
        assert pg.password not in str(info.value).replace("greenpool-pg-", "")
    finally:
        clash.destroy()
    assert not clash.root.exists()


def test_pg_bin_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    real = find_pg_bin()
    monkeypatch.setenv("PG_BIN", str(real))
    assert find_pg_bin() == real
    monkeypatch.setenv("PG_BIN", str(tmp_path))
    with pytest.raises(PostgresNotFound, match="PG_BIN"):
        find_pg_bin()


def test_blackhole_connects_but_never_answers(blackhole: BlackHole) -> None:
    sock = socket.create_connection((blackhole.host, blackhole.port), timeout=2)
    try:
        sock.sendall(b"hello?")
        sock.settimeout(0.2)
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            sock.recv(1)
        assert time.monotonic() - started >= 0.15
    finally:
        sock.close()
    assert blackhole.endpoint(port=1)["port"] == 1


def test_blackhole_times_out_libpq(blackhole: BlackHole) -> None:
    if psycopg2.extensions.get_wait_callback() is not None:
        pytest.skip("libpq ignores connect_timeout on green (async) connects: "
                    "the pool must enforce its own connect deadline")
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host=blackhole.host, port=blackhole.port, dbname="x", user="x",
                         connect_timeout=2)
    assert time.monotonic() - started >= 1.5


def test_ticker_sees_a_blocked_hub(mode: str) -> None:
    if mode == "gevent":
        from gevent import monkey

        blocking_sleep = monkey.get_original("time", "sleep")
    elif mode == "eventlet":
        from eventlet import patcher

        blocking_sleep = patcher.original("time").sleep
    else:
        pytest.skip("no event loop to block in threaded mode")
    ticker = Ticker()
    time.sleep(0.1)  # cooperative: the ticker keeps ticking
    assert len(ticker.stamps) >= 3
    blocking_sleep(0.3)  # blocks the hub: no tick can happen
    assert ticker.stop() >= 0.29


def test_an_interrupted_initdb_is_killed_with_its_children(mode: str) -> None:
    """A BaseException while initdb runs (thrown into the caller, as a signal handler's
    exception would be): the tool's whole process group is gone before the exception goes
    on, and destroy() leaves nothing behind."""
    if mode != "gevent":
        pytest.skip("throws into the greenlet that waits for initdb")
    import gevent

    cluster = Cluster()
    main = gevent.getcurrent()

    def interrupt_once_initdb_runs() -> None:
        while not pids_naming(cluster.root):
            gevent.sleep(0.005)
        main.throw(KeyboardInterrupt)

    interrupter = gevent.spawn(interrupt_once_initdb_runs)
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.init()
        assert pids_naming(cluster.root) == []  # initdb and its postgres children are gone
    finally:
        interrupter.kill()
        cluster.destroy()
    assert not cluster.root.exists()
    assert pids_naming(cluster.root) == []


def test_a_cluster_in_a_relative_base_dir_serves_and_is_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import shutil
    import tempfile

    parent = Path(tempfile.mkdtemp(prefix="greenpool-base-"))
    try:
        os.chmod(parent, 0o755)  # the servers' OS user (as root: postgres) must reach it
        (parent / "servers").mkdir(mode=0o755)
        monkeypatch.chdir(parent)
        with Cluster(base_dir="servers") as cluster:
            assert cluster.root.is_absolute() and cluster.root.parent == parent / "servers"
            assert cluster.execute("SELECT 1") == [(1,)]
        assert list((parent / "servers").iterdir()) == []
    finally:
        shutil.rmtree(parent, ignore_errors=True)


FORKED_CHILD_EXITS = """
import os, sys
from greenpool.testing.postgres import Cluster
cluster = Cluster()
cluster.init()
cluster.start()
child = os.fork()
if child == 0:
    sys.exit(0)  # a normal exit: atexit hooks run in the child
_, status = os.waitpid(child, 0)
print(status, cluster.is_running(), cluster.datadir.exists(), flush=True)
cluster.destroy()
"""


def test_a_forked_child_that_exits_normally_leaves_the_parents_cluster_running(
    tmp_path: Path,
) -> None:
    """Only the process that made a cluster destroys it at exit: a child made with
    ``os.fork()`` inherits the list of live clusters, and its exit hook must skip them."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FORKED_CHILD_EXITS], capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True", "True"], done.stdout + done.stderr


FORKED_CHILD_UNWINDS = """
import os, sys
from greenpool.testing.postgres import Cluster
how = sys.argv[1]
with Cluster() as cluster:
    child = os.fork()
    if child == 0:  # the child leaves through the with block, as a test's teardown would
        if how == "exit":
            sys.exit(0)
        raise RuntimeError("the child fails")
    _, status = os.waitpid(child, 0)
    print(status != 0, cluster.is_running(), cluster.datadir.exists(), flush=True)
"""


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_forked_child_leaving_a_with_block_leaves_the_parents_cluster_running(
    how: str,
) -> None:
    """A child made with ``os.fork()`` inside ``with Cluster()`` (or a fixture) that exits
    by ``sys.exit`` or an exception unwinds through destroy(): a no-op there."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FORKED_CHILD_UNWINDS, how],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(how == "raise"), "True", "True"], done.stdout + done.stderr


LEFT_AT_EXIT = """
import json, os, signal
from greenpool.testing.pgbouncer import PgBouncer
from greenpool.testing.postgres import Cluster
from greenpool.testing.processes import alive, pids_naming
primary = Cluster()
primary.init()
primary.start()
standby = primary.make_standby()
bouncer = PgBouncer(primary).start()
never_started = Cluster()
stopped = Cluster()
stopped.init()
stopped.start()
stopped.stop()
interrupted = Cluster()

def interrupt(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGALRM, interrupt)
signal.setitimer(signal.ITIMER_REAL, 0.2)  # within initdb
try:
    interrupted.init()
except KeyboardInterrupt:
    pass
signal.setitimer(signal.ITIMER_REAL, 0)
made = [primary, standby, bouncer, never_started, stopped, interrupted]
pids = [bouncer.pid] + [pid for c in (primary, standby) for pid in pids_naming(c.root)]
print(json.dumps({"roots": [str(c.root) for c in made], "pids": pids}))
"""


def test_what_a_process_leaves_running_is_stopped_and_removed_at_its_exit() -> None:
    """Servers running, stopped, never started, an initdb cut short by a signal: the
    process's exit hook stops each by PID and removes every directory."""
    result = run_script(LEFT_AT_EXIT, timeout=120)
    still = [pid for pid in result["pids"] if alive(pid)]
    assert len(result["pids"]) >= 3 and still == [], still
    assert [root for root in result["roots"] if Path(root).exists()] == []


USERS_CONFTEST = 'pytest_plugins = ["greenpool.testing.fixtures"]\n'
USERS_TEST = '''
import psycopg2


def test_a_users_test_gets_a_server(pg, pg_factory):
    standby = pg_factory(standby_of=pg)
    with psycopg2.connect(pg.dsn()) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    assert standby.execute("SELECT pg_is_in_recovery()") == [(True,)]
    with open("roots.txt", "w") as roots:
        roots.write(f"{pg.root}\\n{standby.root}\\n")
'''


def test_the_fixtures_plugin_serves_a_users_suite_that_opts_in(tmp_path: Path) -> None:
    """A suite of its own (no greenpool conftest) that lists the plugin gets ``pg`` and
    ``pg_factory``, and every server they started is gone when it ends."""
    import os
    import subprocess
    import sys

    (tmp_path / "conftest.py").write_text(USERS_CONFTEST)
    (tmp_path / "test_users.py").write_text(USERS_TEST)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, timeout=120,
                          check=False, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    roots = (tmp_path / "roots.txt").read_text().split()
    assert len(roots) == 2 and not any(Path(root).exists() for root in roots)  # both removed


def test_without_opting_in_a_suite_has_no_pg_fixture(tmp_path: Path) -> None:
    """Installing greenpool registers no pytest plugin: a suite that did not ask for the
    fixtures does not get them (nor the imports they make before its own conftest runs)."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_users.py").write_text("def test_x(pg):\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, timeout=120,
                          check=False, cwd=tmp_path, env=env)
    assert done.returncode != 0
    assert "fixture 'pg' not found" in done.stdout
