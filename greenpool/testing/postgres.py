"""Throwaway PostgreSQL clusters on free loopback ports, for the demo, the benchmarks and the tests.

Each :class:`Cluster` lives in its own temporary directory, listens on a loopback address
only, trades durability for speed (fsync off) and is removed by :meth:`Cluster.destroy`, or
at interpreter exit if forgotten. PostgreSQL refuses to run as root, so when this process is
root every server command runs as the ``postgres`` OS user. Nothing here imports the rest of
greenpool, so tests can build servers before (and independently of) the pool.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql as pgsql

from greenpool.testing.processes import (
    as_owner,
    give_to,
    inherited,
    kill_group,
    kill_naming,
    names,
    pids_naming,
    register,
    server_owner,
    stop_pid,
    stop_started,
    unregister,
)

__all__ = ["Cluster", "ClusterError", "PostgresNotFound", "destroy_all", "find_pg_bin",
           "free_port"]

LOOPBACK = ("127.0.0.1", "::1", "localhost")
TIMEOUT = 60  # seconds; every server command gets one so a wedged tool cannot hang a test run
STOP_WAIT = 10.0  # seconds a postmaster gets to exit after SIGQUIT before SIGKILL

_HBA = """\
# greenpool.testing.postgres: password (scram) everywhere, loopback only
local   all          all                 scram-sha-256
local   replication  all                 scram-sha-256
host    all          all  127.0.0.1/32   scram-sha-256
host    replication  all  127.0.0.1/32   scram-sha-256
host    all          all  ::1/128        scram-sha-256
host    replication  all  ::1/128        scram-sha-256
"""


class PostgresNotFound(RuntimeError):
    """The PostgreSQL server binaries are not installed (or not where we looked)."""


class ClusterError(RuntimeError):
    """A server command failed; the message carries the tail of its stderr or the server log."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name))


def find_pg_bin() -> Path:
    """Directory of pg_ctl/initdb/postgres; ``$PG_BIN`` wins so CI can pin a version."""
    env = os.environ.get("PG_BIN")
    candidates: list[Path] = []
    if env:
        candidates.append(Path(env))
    else:
        on_path = shutil.which("pg_ctl")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
        found = (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin"))
        candidates += sorted(found, key=_version_key, reverse=True)
    for cand in candidates:
        if all((cand / tool).is_file() for tool in ("pg_ctl", "initdb", "postgres")):
            return cand
    where = f" (PG_BIN={env} has no pg_ctl/initdb/postgres)" if env else ""
    raise PostgresNotFound(
        f"PostgreSQL server binaries not found{where}: run `apt-get install postgresql` "
        "or set PG_BIN to the directory holding pg_ctl."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it, so parallel runs differ)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _conf_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _dsn_value(value: object) -> str:
    text = str(value)
    if text and not re.search(r"[\s'\\]", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Cluster:
    """One disposable PostgreSQL server: ``with Cluster() as pg:`` initialises, starts, destroys."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 base_dir: str | os.PathLike[str] | None = None,
                 settings: dict[str, Any] | None = None, password: str = "greenpool") -> None:
        if host not in LOOPBACK:
            raise ValueError(f"throwaway clusters listen on loopback only, not {host!r}")
        self.bin = find_pg_bin()
        self.host = host
        self.port = port or free_port(host)
        self.user = "postgres"
        self.dbname = "postgres"
        self.password = password
        self.settings = dict(settings or {})
        self.base_dir = base_dir
        self._owner = server_owner()  # before the directory: no directory left by its error
        # a fresh directory per cluster, so destroy() never removes anything it did not create;
        # absolute: the server commands run in it, and a relative path would not be found
        self.root = Path(tempfile.mkdtemp(prefix="greenpool-pg-", dir=base_dir)).absolute()
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        give_to(self._owner, self.root)
        register(self, self.destroy)  # destroyed at exit if forgotten (processes.py)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<Cluster {self.user}@{self.host}:{self.port} {state} datadir={self.datadir}>"

    def __enter__(self) -> Cluster:
        try:
            self.init()
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    # -- server life cycle -------------------------------------------------------------

    def init(self) -> None:
        """initdb with scram auth, then configure for speed, loopback and streaming replication."""
        if (self.datadir / "PG_VERSION").exists():
            raise ClusterError(f"{self.datadir} is already initialised")
        pwfile = self.root / "pwfile"
        pwfile.touch(mode=0o600)  # the password never appears on a command line
        pwfile.write_text(self.password + "\n")
        give_to(self._owner, pwfile)
        try:
            self._run("initdb", "-D", str(self.datadir), "-U", self.user, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")
        finally:
            pwfile.unlink()
        defaults: dict[str, Any] = {
            "fsync": False, "synchronous_commit": False, "full_page_writes": False,
            "max_connections": 100, "wal_level": "replica", "max_wal_senders": 10,
            "hot_standby": True, "shared_buffers": "32MB", **self._address_settings(),
        }
        self._append_conf({**defaults, **self.settings})
        (self.datadir / "pg_hba.conf").write_text(_HBA)

    def start(self, wait: bool = True) -> None:
        """Start the server; with ``wait`` return only once it accepts connections."""
        self._pg_ctl("start", "-l", str(self.logfile), "-w" if wait else "-W")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (a no-op if it is not running); ``immediate`` simulates a crash."""
        if mode not in ("fast", "immediate", "smart"):
            raise ValueError(f"stop mode must be fast, immediate or smart, not {mode!r}")
        if self.is_running():
            self._pg_ctl("stop", "-m", mode, "-w")

    def restart(self, mode: str = "fast") -> None:
        """Stop then start on the same port: every client connection is cut."""
        self.stop(mode)
        self.start()

    def promote(self) -> None:
        """Turn a standby into a primary, waiting until it accepts writes."""
        self._pg_ctl("promote", "-w")

    def make_standby(self, port: int | None = None) -> Cluster:
        """A started streaming-replication standby of this (running) cluster, for failover tests."""
        if not self.is_running():
            raise ClusterError("make_standby() needs the primary to be running")
        standby = Cluster(port=port, host=self.host, base_dir=self.base_dir,
                          settings=self.settings, password=self.password)
        try:
            standby._run("pg_basebackup", "-h", self.host, "-p", str(self.port), "-U", self.user,
                         "-D", str(standby.datadir), "-R", "-X", "stream", "-c", "fast",
                         "--no-sync", "-w", env={"PGPASSWORD": self.password})
            standby._append_conf(standby._address_settings())
            standby.start()
        except BaseException:
            standby.destroy()
            raise
        return standby

    def is_running(self) -> bool:
        """Whether the postmaster recorded in postmaster.pid is alive."""
        return self.pid is not None

    @property
    def pid(self) -> int | None:
        """The postmaster's PID from postmaster.pid, or None when it is not running. A
        postmaster killed outright leaves that file behind, and its PID may since have gone
        to another process: the PID counts only while its command line names this cluster."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if names(pid, self.root) else None

    def destroy(self) -> None:
        """Stop at once and delete every file; safe to call from cleanup after a signal.

        No subprocess is started here (a second signal could cut it short): the postmaster
        gets SIGQUIT by PID, which is what ``pg_ctl stop -m immediate`` sends, then SIGKILL if
        it has not exited within ``STOP_WAIT``. Any other process still naming this cluster's
        directory on its command line (an ``initdb``, a ``pg_basebackup``, a postmaster that
        had not written its PID file yet) is killed too. Idempotent; a no-op in a child made
        with ``os.fork()`` (its ``with`` block or fixture teardown unwinding there must not
        destroy the parent's server).
        """
        if inherited(self):
            return
        try:
            pid = self.pid
            if pid is not None:
                stop_pid(pid, signal.SIGQUIT, STOP_WAIT)
            for other in pids_naming(self.root):
                stop_pid(other, signal.SIGKILL, STOP_WAIT)
        except BaseException:  # interrupted while waiting for one: the rest go at once
            kill_naming(self.root)
            raise
        finally:
            unregister(self)
            shutil.rmtree(self.root, ignore_errors=True)

    # -- client side -------------------------------------------------------------------

    def dsn(self, **overrides: Any) -> str:
        """A libpq ``key=value`` string for the superuser; an override of None drops the key."""
        params = {"host": self.host, "port": self.port, "dbname": self.dbname,
                  "user": self.user, "password": self.password, **overrides}
        return " ".join(f"{k}={_dsn_value(v)}" for k, v in params.items() if v is not None)

    def endpoint(self, **overrides: Any) -> dict[str, Any]:
        """The superuser endpoint in pgdbpool's dict format, for building pool configs."""
        return {"host": self.host, "port": self.port, "name": self.dbname,
                "user": self.user, "pass": self.password, **overrides}

    def connect(self, **kw: Any) -> psycopg2.extensions.connection:
        """An autocommit admin connection (not pooled); ``kw`` overrides DSN keys."""
        kw.setdefault("connect_timeout", 10)
        kw.setdefault("application_name", "greenpool-throwaway")
        conn = psycopg2.connect(self.dsn(**kw))
        conn.autocommit = True
        return conn

    def execute(self, sql: str | pgsql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement on a short-lived admin connection; rows if it returned any."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def create_user(self, name: str, password: str) -> None:
        """A login role that authenticates with ``password``."""
        query = pgsql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(pgsql.Identifier(name))
        self.execute(query, (password,))

    def create_database(self, name: str, owner: str | None = None) -> None:
        """A new database, optionally owned by ``owner``."""
        query = pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name))
        if owner is not None:
            query += pgsql.SQL(" OWNER {}").format(pgsql.Identifier(owner))
        self.execute(query)

    # -- plumbing ----------------------------------------------------------------------

    def _address_settings(self) -> dict[str, Any]:
        # Unix socket paths are limited to ~107 bytes; TCP is all we need anyway.
        sockdir = str(self.root) if len(str(self.root)) < 80 else ""
        return {"listen_addresses": self.host, "port": self.port,
                "unix_socket_directories": sockdir}

    def _append_conf(self, settings: dict[str, Any]) -> None:
        # Later lines win in postgresql.conf, so appending overrides initdb's (or the primary's).
        lines = "".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items())
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# greenpool.testing.postgres\n" + lines)

    @staticmethod
    def _redact(text: str) -> str:
        # Commands never carry a password; logged statements and conninfo strings might.
        text = re.sub(r"(?i)\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", text)
        return re.sub(r"(?i)\bpassword\s+'(?:[^']|'')*'", "PASSWORD '***'", text)

    def _log_tail(self, lines: int = 25) -> str:
        try:
            tail = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- server log tail ---\n" + "\n".join(tail) if tail else ""

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", action, "-s", "-D", str(self.datadir), "-t", str(TIMEOUT), *args)

    def _run(self, tool: str, *args: str, env: dict[str, str] | None = None) -> str:
        # Drop PG* variables so the caller's PGHOST/PGDATA/... cannot redirect a command.
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        full_env.update(LC_ALL="C", **(env or {}))
        kw = as_owner(self._owner)
        if self._owner is not None:
            full_env["HOME"] = str(self.root)
        what = f"{tool} {args[0]}" if tool == "pg_ctl" else tool
        # Its own session: a terminal's Ctrl-C reaches us, not the tool, and on any way out
        # (a timeout, a signal turned into an exception) the tool's whole process group,
        # children included (initdb runs postgres), is killed before we go on.
        try:
            proc = subprocess.Popen([str(self.bin / tool), *args], cwd=self.root, env=full_env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True,
                                    **kw)
        except BaseException:
            # interrupted inside Popen() (gevent's waits for the exec there): no handle, so
            # find it by the directory on its command line
            for pid in pids_naming(self.root):
                stop_pid(pid, signal.SIGKILL, STOP_WAIT)
            raise
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT + 30)
        except subprocess.TimeoutExpired:
            kill_group(proc, STOP_WAIT)
            raise ClusterError(self._redact(f"{what} timed out" + self._log_tail())) from None
        except BaseException:
            kill_group(proc, STOP_WAIT)
            raise
        if proc.returncode != 0:
            stderr = (stderr or stdout).strip()[-2000:]
            raise ClusterError(self._redact(f"{what} failed (exit {proc.returncode}) for {self!r}:"
                                            f" {stderr}" + self._log_tail()))
        return stdout


def destroy_all() -> None:
    """Destroy every cluster this process made and has not destroyed yet (cleanup after a
    signal; the exit hook does it too). A forked child leaves its parent's alone."""
    stop_started(Cluster)
