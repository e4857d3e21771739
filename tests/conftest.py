"""Test-wide setup: one concurrency mode per process, real PostgreSQL servers, real faults.

``GREENPOOL_TEST_MODE`` picks the mode (``gevent`` by default, ``threaded`` or ``eventlet``).
Monkey-patching must happen before anything imports socket/threading users, so it is the
very first thing this file does.
"""

from __future__ import annotations

import os

MODE = os.environ.get("GREENPOOL_TEST_MODE", "gevent")
if MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()
elif MODE == "eventlet":
    import warnings

    with warnings.catch_warnings():  # "eventlet is deprecated" is not news to us
        warnings.simplefilter("ignore")
        import eventlet
    eventlet.monkey_patch()
elif MODE != "threaded":
    raise RuntimeError(f"GREENPOOL_TEST_MODE must be gevent, threaded or eventlet, not {MODE!r}")

import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from faults import BlackHole  # noqa: E402

from greenpool.testing.postgres import Cluster  # noqa: E402

# pg and pg_factory: the public fixtures, imported after the monkey-patching above
pytest_plugins = ["greenpool.testing.fixtures"]


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """Make pytest-timeout's signal method work under eventlet (gevent needs no help).

    Under eventlet, pytest-timeout thinks it is not in the main thread and falls back to its
    thread method, whose timer is a green thread (it never fires while the hub is blocked)
    and which ends with ``os._exit``, leaking the throwaway servers. Instead the SIGALRM
    handler raises the failure in the test's greenlet: directly, through the hub greenlet
    (whose parent it is: eventlet replaces a dead hub), or by scheduling a throw.
    """
    if MODE != "eventlet" or settings.method != "signal":
        return None
    import signal

    import greenlet
    from eventlet import hubs

    target = greenlet.getcurrent()

    def on_alarm(signum: int, frame: Any) -> None:
        exc = pytest.fail.Exception(f"Timeout (>{settings.timeout}s) from pytest-timeout.")
        current, hub = greenlet.getcurrent(), hubs.get_hub()
        if current is target or (current is hub.greenlet and current.parent is target):
            raise exc
        hub.schedule_call_global(0, target.throw, exc)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


@pytest.fixture(scope="session")
def mode() -> str:
    """The concurrency mode of this test process: gevent, threaded or eventlet."""
    return MODE


@pytest.fixture
def blackhole() -> Iterator[BlackHole]:
    """A loopback endpoint that accepts TCP connections and never answers."""
    with BlackHole() as hole:
        yield hole


@pytest.fixture
def make_pool(pg: Cluster, mode: str) -> Iterator[Callable[..., Any]]:
    """``make(groups, db=None, **top_level_keys) -> Pool`` in this process's mode, closed
    after the test. ``db`` defaults to the shared cluster ``pg``."""
    from greenpool import Pool

    made: list[Any] = []

    def make(groups: dict[str, Any], db: Any = None, **top: Any) -> Any:
        pool = Pool({"type": mode, "db": db or pg.endpoint(), "groups": groups, **top})
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


@pytest.fixture
def pool_at(mode: str) -> Iterator[Callable[..., Any]]:
    """``make(db, groups) -> Pool`` in this test's mode at any endpoint (a PgBouncer's, a
    cluster's), closed after the test."""
    from greenpool import Pool

    made: list[Any] = []

    def make(db: Any, groups: dict[str, Any]) -> Any:
        pool = Pool({"type": mode, "db": db, "groups": groups})
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


@pytest.fixture
def server_conns(pg: Cluster) -> Callable[..., int]:
    """``count(application_name=None, dbname=None, user=None, cluster=None, expect=None)``.

    Counts client backends in pg_stat_activity (of ``cluster``, default ``pg``) matching the
    given filters, not counting the connection that asks. Backends leave asynchronously
    after a client disconnects, so with ``expect=N`` it polls for up to ``timeout`` seconds
    until the count equals N and returns the last count seen.
    """

    def count(
        application_name: str | None = None,
        dbname: str | None = None,
        user: str | None = None,
        cluster: Cluster | None = None,
        expect: int | None = None,
        timeout: float = 5.0,
    ) -> int:
        where = ["backend_type = 'client backend'", "pid <> pg_backend_pid()"]
        params: list[str] = []
        for column, value in (("application_name", application_name), ("datname", dbname),
                              ("usename", user)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        query = "SELECT count(*) FROM pg_stat_activity WHERE " + " AND ".join(where)
        deadline = time.monotonic() + timeout
        while True:
            found = int((cluster or pg).execute(query, params)[0][0])
            if expect is None or found == expect or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    return count


# --- the Django test project (tests/django_project; helpers in django_site.py) -------------


@pytest.fixture(scope="module")
def project(pg: Cluster) -> Iterator[Any]:
    """Django set up on the test project, migrated; yields ``greenpool.django.pools``."""
    import io
    import json
    import sys

    import django_site

    django = pytest.importorskip("django")
    name = "django_app"
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
        pg.create_database(name)
    os.environ["GREENPOOL_DJANGO_DATABASES"] = json.dumps(django_site.databases(pg, name))
    os.environ["DJANGO_SETTINGS_MODULE"] = "djproject.settings"
    if str(django_site.PROJECT) not in sys.path:
        sys.path.insert(0, str(django_site.PROJECT))
    django.setup()
    from django.core.management import call_command

    from greenpool.django import pools

    call_command("migrate", verbosity=0, stdout=io.StringIO())
    django_site.close_connections()
    pools.close_all()
    yield pools
    django_site.close_connections()
    pools.close_all()


@pytest.fixture
def pools(project: Any) -> Iterator[Any]:
    """A fresh Django pool for the test, and nothing left lent after it."""
    from django_site import close_connections
    from notes.models import Note

    Note.objects.all().delete()
    close_connections()
    project.close_all()
    yield project
    close_connections()
    for name, group in project.stats()["groups"].items():
        assert group["in_use"] == 0, f"{name} still lends {group['in_use']} after the test"
    project.close_all()


@pytest.fixture
def example_app(pg: Cluster) -> Iterator[Any]:
    """examples/gunicorn/app.py imported in this process, on a database of its own
    (gunicorn_example.py; call it with ``gunicorn_example.request``)."""
    from gunicorn_example import loaded

    with loaded(pg) as module:
        yield module


@pytest.fixture
def no_pg_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """No libpq PG* environment variable for the test: what the config says is all there is."""
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)
