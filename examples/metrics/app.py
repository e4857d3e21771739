"""A minimal WSGI app whose workers share one Prometheus endpoint (see gunicorn.conf.py).

``GET /`` runs one statement through the process-wide pool; the pool is made per worker in
gunicorn.conf.py's ``post_worker_init``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import greenpool


def application(environ: dict[str, Any],
                start_response: Callable[..., Any]) -> Iterable[bytes]:
    with greenpool.handler() as db:
        rows = db.query("SELECT 1")
    body = f"{rows[0][0]} from worker {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
