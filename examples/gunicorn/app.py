"""A small WSGI app reading and writing through greenpool (run with gunicorn.conf.py).

The pool is created lazily on the first request of each worker, i.e. after the gevent
worker has monkey-patched, and never in the gunicorn master.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import greenpool

CONFIG = {
    "db": os.environ.get("GREENPOOL_DSN", "host=127.0.0.1 dbname=postgres"),
    "groups": {
        "write": {"connection_count": 5, "timeout": 5},
        "read": {"connection_count": 10, "autocommit": True, "timeout": 5},
    },
}


def pool() -> greenpool.Pool:
    try:
        return greenpool.get_pool()
    except greenpool.PoolError:
        return greenpool.init(CONFIG)


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    try:
        if path == "/write":
            with pool().handler("write") as db:
                db.execute("CREATE TABLE IF NOT EXISTS hits (id serial PRIMARY KEY, at timestamptz "
                           "DEFAULT now())")
                (new_id,) = db.query_one("INSERT INTO hits DEFAULT VALUES RETURNING id")
            body: Any = {"id": new_id}
        elif path == "/read":
            with pool().handler("read") as db:
                body = {"server_time": str(db.query_one("SELECT now()")[0])}
        elif path == "/stats":
            body = pool().stats()
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"try /read, /write or /stats\n"]
        status = "200 OK"
    except greenpool.PoolError as exc:
        status, body = "503 Service Unavailable", {"error": str(exc)}
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))])
    return [data]
