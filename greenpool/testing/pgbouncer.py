"""A real PgBouncer in front of a throwaway cluster, for the errors only a pooler produces.

PgBouncer refuses to run as root, so when this process is root it runs as the ``postgres``
OS user (like the throwaway servers). It listens on a free loopback port, with a generated
ini and userlist in a temporary directory that :meth:`PgBouncer.stop` removes (with the
process, stopped by its PID), or the exit hook if a test run forgets (or fails) to: only in
the process that made it, never in a child made with ``os.fork()``. The binary is
``$PGBOUNCER`` if set, else ``pgbouncer`` on ``PATH``, else Debian's ``/usr/sbin/pgbouncer``;
:func:`available` says whether there is one, for a test to skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from greenpool.testing.postgres import Cluster, free_port
from greenpool.testing.processes import (
    as_owner,
    give_to,
    inherited,
    kill_naming,
    pids_naming,
    register,
    server_owner,
    stop_pid,
    stop_started,
    unregister,
)

__all__ = ["BINARY", "PgBouncer", "available", "stop_all"]

BINARY = (os.environ.get("PGBOUNCER") or shutil.which("pgbouncer")
          or shutil.which("pgbouncer", path="/usr/sbin") or "/usr/sbin/pgbouncer")
STOP_WAIT = 10.0  # seconds PgBouncer gets to exit after SIGTERM before SIGKILL


def available() -> bool:
    """Whether :data:`BINARY` is an executable PgBouncer here."""
    return os.access(BINARY, os.X_OK)


class PgBouncer:
    """``PgBouncer(cluster, **settings)``: trust auth on the client side; PgBouncer logs into
    ``cluster`` as its superuser with the password from the userlist."""

    def __init__(self, cluster: Cluster, databases: dict[str, str] | None = None,
                 **settings: Any) -> None:
        self.cluster = cluster
        #: more ``[databases]`` entries: alias -> extra connection string (``user=x ...``)
        self.databases = dict(databases or {})
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.dbname = cluster.dbname
        self._owner = server_owner()  # before the directory: no directory left by its error
        self.root = Path(tempfile.mkdtemp(prefix="greenpool-pgbouncer-"))
        self.settings = {
            "listen_addr": self.host, "listen_port": self.port, "unix_socket_dir": "",
            "auth_type": "trust", "auth_file": str(self.root / "userlist.txt"),
            "pool_mode": "transaction", "logfile": str(self.root / "pgbouncer.log"),
            "pidfile": str(self.root / "pgbouncer.pid"), **settings,
        }
        self._proc: subprocess.Popen[bytes] | None = None
        register(self, self.stop)  # stopped at exit if forgotten (processes.py)

    def start(self) -> PgBouncer:
        """Start PgBouncer; return once it accepts connections. On any way out but a
        return (it did not start, a timeout, a signal turned into an exception) it is
        stopped and its directory removed before the exception goes on."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> PgBouncer:
        c = self.cluster
        ini = "[databases]\n"
        ini += f"{c.dbname} = host={c.host} port={c.port} dbname={c.dbname}\n"
        ini += "".join(f"{alias} = host={c.host} port={c.port} dbname={c.dbname} {extra}\n"
                       for alias, extra in self.databases.items())
        ini += "\n[pgbouncer]\n"
        ini += "".join(f"{k} = {v}\n" for k, v in self.settings.items())
        (self.root / "pgbouncer.ini").write_text(ini)
        (self.root / "userlist.txt").write_text(f'"{c.user}" "{c.password}"\n')
        give_to(self._owner, self.root, *self.root.iterdir())
        kw = as_owner(self._owner)
        self._proc = subprocess.Popen([BINARY, str(self.root / "pgbouncer.ini")],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd=self.root,
                                      start_new_session=True, **kw)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {self.log()[-2000:]}"
                                       ) from None
                time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        """PgBouncer's PID while it runs (None before start() and once it has exited)."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def log(self) -> str:
        try:
            return (self.root / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return ""

    def endpoint(self, **overrides: Any) -> dict[str, Any]:
        """The pooler as a pgdbpool endpoint (the superuser, through PgBouncer)."""
        c = self.cluster
        return {"host": self.host, "port": self.port, "name": c.dbname, "user": c.user,
                "pass": c.password, **overrides}

    def stop(self) -> None:
        """Stop PgBouncer by its PID (SIGTERM, then SIGKILL after :data:`STOP_WAIT`) and
        remove its directory. Idempotent; a no-op in any process but the one that made it
        (a forked child's copy is its parent's)."""
        if inherited(self):
            return
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:  # not reaped: the PID is still its
                stop_pid(proc.pid, signal.SIGTERM, STOP_WAIT)
                with contextlib.suppress(Exception):
                    proc.wait(STOP_WAIT)  # reaped
            # one started by an interrupted Popen() (no handle): found by its ini's path
            for other in pids_naming(self.root):
                stop_pid(other, signal.SIGKILL, STOP_WAIT)
        except BaseException:  # interrupted while waiting for one: the rest go at once
            kill_naming(self.root)
            raise
        finally:
            unregister(self)
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def stop_all() -> None:
    """Stop every PgBouncer this process made and has not stopped yet (never its parent's,
    in a forked child); the exit hook does it too."""
    stop_started(PgBouncer)
