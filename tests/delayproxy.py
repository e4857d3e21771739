"""A TCP proxy in a process of its own that holds chosen client messages for a while.

Run as a script (``python delayproxy.py TARGET_PORT DELAY MARK HELD_FILE``), it listens on a
free loopback port, prints ``ready PORT``, and forwards every connection to ``TARGET_PORT``
both ways; a client message containing ``MARK`` is held ``DELAY`` seconds before it goes on,
and a line is appended to ``HELD_FILE`` when the holding begins. :class:`DelayProxy` runs it
for a test. A process of its own, so that a test that forks copies none of it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class DelayProxy:
    """The proxy to ``target_port`` (see the module), for ``with``; ``port`` is where it
    listens, :meth:`held` how many messages it has begun holding."""

    def __init__(self, target_port: int, delay: float, mark: bytes) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="greenpool-delayproxy-")
        self._held = Path(self._dir.name) / "held"
        self._held.touch()
        self._proc = subprocess.Popen(
            [sys.executable, __file__, str(target_port), str(delay), mark.decode(),
             str(self._held)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = self._proc.stdout.readline() if self._proc.stdout else ""
        if not line.startswith("ready "):
            self.close()
            raise RuntimeError(f"the delay proxy did not start: {line!r}")
        self.port = int(line.split()[1])

    def held(self) -> int:
        return len(self._held.read_text().splitlines())

    def endpoint(self, cluster: Any, **overrides: Any) -> dict[str, Any]:
        """``cluster``'s endpoint, reached through the proxy."""
        return cluster.endpoint(**{"port": self.port, **overrides})

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        if self._proc.stdout:
            self._proc.stdout.close()
        self._dir.cleanup()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _pump(src: socket.socket, dst: socket.socket, mark: bytes | None, delay: float,
          held: Path) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if mark is not None and mark in data:
                with held.open("a") as out:
                    out.write("held\n")
                time.sleep(delay)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _main(target_port: int, delay: float, mark: bytes, held: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    print("ready", server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for args in ((client, upstream, mark), (upstream, client, None)):
            threading.Thread(target=_pump, args=(*args, delay, held), daemon=True).start()


if __name__ == "__main__":
    _main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3].encode(), Path(sys.argv[4]))
