"""The README's first command: ``greenpool demo`` on nothing but the server binaries."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from modes import MODE

from greenpool.testing.processes import pids_naming


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


# --- every way out removes both servers -----------------------------------------------------

ROOT = re.compile(r"(/\S*greenpool-pg-[^\s/)]+)")
PID = re.compile(r"\(pid (\d+)\)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _tool_running(tool: bytes, needle: bytes) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        if tool in text.split(b"\0", 1)[0] and needle in text:
            return True
    return False


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.005)


def _assert_gone(out: str) -> None:
    """Every data directory and postmaster the demo announced is gone (by path and PID)."""
    roots, pids = ROOT.findall(out), [int(p) for p in PID.findall(out)]
    assert roots, out
    for root in roots:
        assert not Path(root).exists(), f"{root} left behind"
        assert pids_naming(Path(root)) == [], f"processes still use {root}"
    for pid in pids:
        assert not _alive(pid), f"postmaster {pid} still running"


def _pg_ctl_status(root: str) -> int:
    from greenpool.testing.postgres import find_pg_bin

    return subprocess.run([str(find_pg_bin() / "pg_ctl"), "status", "-D", f"{root}/data"],
                          capture_output=True, timeout=30, check=False).returncode


@pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent test process")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize(("step", "marker", "servers"), [
    ("initdb", "(initdb)", 0),
    ("pg_basebackup", "(pg_basebackup)", 1),
    ("load", "load running", 2),
    ("load, then a second signal at once", "load running", 2),
])
def test_a_signal_at_any_step_stops_and_removes_both_servers(sig: signal.Signals, step: str,
                                                             marker: str, servers: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GREENPOOL_DSN"}
    proc = subprocess.Popen([sys.executable, "-m", "greenpool", "demo", "--seconds", "30",
                             "--clients", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    assert proc.stdout is not None
    out = ""
    try:
        deadline = time.monotonic() + 60
        while marker not in out:  # each step prints its line (flushed) as it begins
            line = proc.stdout.readline().decode()
            assert line, f"the demo ended before {step}: {out}"
            out += line
            assert time.monotonic() < deadline
        pids = [int(p) for p in PID.findall(out)]
        assert len(pids) == servers and all(_alive(p) for p in pids), out
        if step == "initdb":  # initdb itself is running
            wait_for(lambda: pids_naming(Path(ROOT.findall(out)[0])))
        elif step == "pg_basebackup":  # pg_basebackup itself is running
            port = re.findall(r"127\.0\.0\.1:(\d+)", out)[0]
            wait_for(lambda: _tool_running(b"pg_basebackup", f"-p\0{port}\0".encode()))
        proc.send_signal(sig)
        if "second signal" in step:  # an impatient user: it must not cut the cleanup short
            proc.send_signal(signal.SIGINT if sig == signal.SIGTERM else signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    out += rest.decode()
    # two signals pending at once are handled lowest number first: either may be "the first"
    first = signal.Signals(proc.returncode - 128) if "second signal" in step else sig
    assert proc.returncode == 128 + first, out + err.decode()
    assert err.decode().splitlines() == [
        f"greenpool demo: interrupted by {first.name}; what it started is stopped and removed"]
    _assert_gone(out)
    for root in ROOT.findall(out):
        assert _pg_ctl_status(root) != 0  # pg_ctl finds no server (nor directory) there


@pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent test process")
def test_a_failure_in_init_removes_both_servers(tmp_path: Path) -> None:
    """greenpool.init() cannot be made to fail from outside with the demo's fixed, valid
    configuration, so a wrapper replaces it with one that raises (a simulated bug)."""
    script = tmp_path / "broken_init.py"
    script.write_text(
        "import sys, greenpool\n"
        "def broken(config): raise RuntimeError('init broke')\n"
        "greenpool.init = broken\n"
        "from greenpool.cli.main import main\n"
        "sys.exit(main(['demo', '--seconds', '1']))\n")
    env = {k: v for k, v in os.environ.items() if k != "GREENPOOL_DSN"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=90, env=env, check=False)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "RuntimeError: init broke" in result.stderr
    assert len(PID.findall(result.stdout)) == 2  # both servers had started
    _assert_gone(result.stdout)


# --- with --dsn: the user's server ---------------------------------------------------------

TABLES = ("SELECT relname FROM pg_class WHERE relkind = 'r' AND "
          "relnamespace = 'public'::regnamespace ORDER BY 1")


@pytest.fixture
def user_db(pg: Any) -> Any:
    """A database of its own on the shared server, holding a user's ``greenpool_demo``
    table (the name the demo once dropped and filled) with rows in it."""
    name = f"demo_user_{os.getpid()}_{time.monotonic_ns()}"
    pg.execute(f"CREATE DATABASE {name}")
    conn = pg.connect(dbname=name)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE greenpool_demo (id bigint PRIMARY KEY, note text);"
                        "INSERT INTO greenpool_demo SELECT g, 'mine' FROM generate_series(1, 3) g")
        yield pg, name, conn
    finally:
        conn.close()
        pg.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _tables_and_rows(conn: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    with conn.cursor() as cur:
        cur.execute(TABLES)
        tables = [row[0] for row in cur.fetchall()]
        cur.execute("SELECT * FROM greenpool_demo ORDER BY id")
        return tables, cur.fetchall()


@pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent test process")
def test_demo_with_dsn_touches_only_the_table_it_created(user_db: Any) -> None:
    pg, name, conn = user_db
    before = _tables_and_rows(conn)
    result = subprocess.run(
        [sys.executable, "-m", "greenpool", "demo", "--dsn", pg.dsn(dbname=name),
         "--seconds", "1", "--clients", "5"],
        capture_output=True, text=True, timeout=60, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    created = re.findall(r"creating table (greenpool_demo_[0-9a-f]+) for this run; it is "
                         r"dropped at the end", out)
    assert len(created) == 1, out
    assert f"dropped table {created[0]}, which this run created" in out
    assert _tables_and_rows(conn) == before  # the user's table and rows as they were


@pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent test process")
def test_demo_with_dsn_drops_its_table_when_interrupted(user_db: Any) -> None:
    pg, name, conn = user_db
    before = _tables_and_rows(conn)
    env = {k: v for k, v in os.environ.items() if k != "GREENPOOL_DSN"}
    proc = subprocess.Popen([sys.executable, "-m", "greenpool", "demo", "--dsn",
                             pg.dsn(dbname=name), "--seconds", "30", "--clients", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    out = ""
    try:
        while "load running" not in out:
            line = proc.stdout.readline().decode()
            assert line, out
            out += line
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    out += rest.decode()
    assert proc.returncode == 128 + signal.SIGINT, out + err.decode()
    assert "dropped table greenpool_demo_" in out
    assert _tables_and_rows(conn) == before


@pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent test process")
def test_demo_with_dsn_says_when_its_user_may_not_create_a_table(user_db: Any) -> None:
    """PostgreSQL 15+ gives PUBLIC no CREATE on schema public: a plain user cannot make the
    demo's table, and is told so in one sentence (not "a bug in greenpool")."""
    pg, name, conn = user_db
    role = f"demo_nocreate_{os.getpid()}"
    pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'x'")
    try:
        with conn.cursor() as cur:  # PostgreSQL 15+'s default, made sure of
            cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        result = subprocess.run(
            [sys.executable, "-m", "greenpool", "demo", "--dsn",
             pg.dsn(dbname=name, user=role, password="x"), "--seconds", "1", "--clients", "2"],
            capture_output=True, text=True, timeout=60, check=False)
    finally:
        pg.execute(f"DROP ROLE {role}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("greenpool demo: cannot create the demo's table "
                                    "greenpool_demo_"), result.stderr
    assert "permission denied" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent test process")
def test_demo_with_dsn_drops_its_table_when_interrupted_after_the_server_committed_it(
        pg_factory: Any) -> None:
    """The server commits the CREATE while the demo is stopped (SIGSTOP) waiting for the
    answer, which a SIGINT then cuts short: the table the demo never heard of is dropped."""
    server = pg_factory(settings={"synchronous_standby_names": "nobody",  # holds the commit
                                  "synchronous_commit": "on"})
    env = {k: v for k, v in os.environ.items() if k != "GREENPOOL_DSN"}
    proc = subprocess.Popen([sys.executable, "-m", "greenpool", "demo", "--dsn", server.dsn(),
                             "--seconds", "30", "--clients", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        waiting = "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        deadline = time.monotonic() + 30
        while not (committing := server.execute(waiting)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        server.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
        server.execute("SELECT pg_reload_conf()")  # the commit completes, its answer is sent
        while committing[0] in server.execute(waiting):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.execute("SELECT 1 FROM pg_class WHERE relname LIKE 'greenpool_demo%'")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, out.decode() + err.decode()
    assert server.execute("SELECT relname FROM pg_class WHERE relname LIKE 'greenpool_demo%'"
                          ) == [], out.decode() + err.decode()
