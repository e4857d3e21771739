"""A real PgBouncer in front of a throwaway cluster, for the errors only a pooler produces.

PgBouncer refuses to run as root, so when this process is root it runs as the ``postgres``
OS user (like the throwaway servers). It listens on a free loopback port, with a generated
ini and userlist in a temporary directory that :meth:`PgBouncer.stop` removes. The binary is
``$PGBOUNCER`` if set, else ``pgbouncer`` on ``PATH``, else Debian's ``/usr/sbin/pgbouncer``;
:func:`available` says whether there is one, for a test to skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from greenpool.testing.postgres import Cluster, free_port
from greenpool.testing.processes import as_owner, give_to, server_owner

__all__ = ["BINARY", "PgBouncer", "available"]

BINARY = (os.environ.get("PGBOUNCER") or shutil.which("pgbouncer")
          or shutil.which("pgbouncer", path="/usr/sbin") or "/usr/sbin/pgbouncer")


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
        self.root = Path(tempfile.mkdtemp(prefix="greenpool-pgbouncer-"))
        self.settings = {
            "listen_addr": self.host, "listen_port": self.port, "unix_socket_dir": "",
            "auth_type": "trust", "auth_file": str(self.root / "userlist.txt"),
            "pool_mode": "transaction", "logfile": str(self.root / "pgbouncer.log"),
            "pidfile": str(self.root / "pgbouncer.pid"), **settings,
        }
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        c = self.cluster
        ini = "[databases]\n"
        ini += f"{c.dbname} = host={c.host} port={c.port} dbname={c.dbname}\n"
        ini += "".join(f"{alias} = host={c.host} port={c.port} dbname={c.dbname} {extra}\n"
                       for alias, extra in self.databases.items())
        ini += "\n[pgbouncer]\n"
        ini += "".join(f"{k} = {v}\n" for k, v in self.settings.items())
        (self.root / "pgbouncer.ini").write_text(ini)
        (self.root / "userlist.txt").write_text(f'"{c.user}" "{c.password}"\n')
        owner = server_owner()
        give_to(owner, self.root, *self.root.iterdir())
        kw = as_owner(owner)
        self._proc = subprocess.Popen([BINARY, str(self.root / "pgbouncer.ini")],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, cwd=self.root, **kw)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log()
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not start: {log[-2000:]}") from None
                time.sleep(0.05)

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
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
