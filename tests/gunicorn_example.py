"""examples/gunicorn/app.py in this test process: loaded on a database of its own, and
called as a WSGI server would call it.

The ``example_app`` fixture (conftest.py) yields the loaded module; ``request`` calls it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modes import MODE

import greenpool
from greenpool.testing.postgres import Cluster

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gunicorn"
APP = "greenpool-listen-test"  # the example's application_name


@contextmanager
def loaded(pg: Cluster, name: str = "listen_example_inprocess", application_name: str = APP,
           groups: dict[str, Any] | None = None, mode: str | None = MODE) -> Iterator[Any]:
    """examples/gunicorn/app.py imported in this process, its pool on a database of its own
    (``name``), configured through ``GREENPOOL_CONFIG`` as the app expects; ``mode`` None
    leaves the type to the app's default."""
    import importlib.util

    pg.execute(f"DROP DATABASE IF EXISTS {name}")
    pg.create_database(name)
    config: dict[str, Any] = {
        "db": pg.endpoint(name=name), "application_name": application_name,
        "groups": groups or {"write": {"connection_count": 2, "exclusive_limit": 2, "timeout": 1},
                             "read": {"connection_count": 2}}}
    if mode is not None:
        config["type"] = mode
    previous = os.environ.get("GREENPOOL_CONFIG")
    os.environ["GREENPOOL_CONFIG"] = json.dumps(config)
    try:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE / "app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["GREENPOOL_CONFIG"]
        else:
            os.environ["GREENPOOL_CONFIG"] = previous
    greenpool.close()
    module.open_pool()
    try:
        with greenpool.handler("write") as db:
            db.execute(module.SCHEMA)
        yield module
    finally:
        greenpool.close()


def request(module: Any, method: str, path: str, body: bytes = b"") -> tuple[str, Any]:
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
               "wsgi.errors": io.StringIO()}
    started: list[str] = []
    result = module.application(environ, lambda status, headers: started.append(status))
    return started[0], result
