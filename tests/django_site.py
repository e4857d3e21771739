"""The Django test project (tests/django_project) as the Django tests use it: its settings,
the bound of each alias, and a request through Django's real WSGI handler.

Django is configured once per test process (its settings are process-wide); the ``project``
and ``pools`` fixtures in conftest.py set it up against a database of the shared cluster.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from modes import MODE

from greenpool.testing.postgres import Cluster

PROJECT = Path(__file__).resolve().parent / "django_project"
APP_NAME = "greenpool-django-tests"
SIZE = 4  # connection_count of each alias
TIMEOUT = 1.0  # the aliases' acquire timeout


def databases(cluster: Cluster, name: str) -> dict[str, Any]:
    common = {"ENGINE": "greenpool.django", "NAME": name, "USER": cluster.user,
              "PASSWORD": cluster.password, "HOST": cluster.host, "PORT": cluster.port}
    options = {"connection_count": SIZE, "timeout": TIMEOUT,
               "greenpool": {"type": MODE, "application_name": APP_NAME}}
    return {
        # CONN_MAX_AGE=None asks Django to keep connections forever: a loan still ends
        # with its request
        "default": {**common, "CONN_MAX_AGE": None, "OPTIONS": options},
        "replica": {**common, "OPTIONS": options, "TEST": {"MIRROR": "default"}},
    }


def close_connections() -> None:
    from django.db import connections

    for conn in connections.all():
        conn.close()


def group_stats(pools: Any, alias: str = "default") -> dict[str, Any]:
    return dict(pools.stats()["groups"].get(alias) or {"in_use": 0, "size": 0, "idle": 0})


def wsgi_request(path: str, method: str = "GET", body: bytes = b"") -> tuple[str, bytes]:
    """One request through Django's WSGI handler, response closed as a server closes it."""
    from wsgiref.util import setup_testing_defaults

    from django.core.handlers.wsgi import WSGIHandler

    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": method,
                               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
                               "CONTENT_TYPE": "application/json"}
    setup_testing_defaults(environ)
    status: list[str] = []
    response = WSGIHandler()(environ, lambda s, h, exc_info=None: status.append(s))
    try:
        data = b"".join(response)
    finally:
        response.close()  # request_finished: close_old_connections
    return status[0], data


def backend_pid() -> int:
    """The server process behind Django's default connection (borrowing it if need be)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])
