"""greenpool.django in process: the test project's models on a real server, in this mode.

Django is configured once per test process (its settings are process-wide), against a
database of the shared cluster; each test's pool is made afresh (``close_all``). Requests
go through Django's real WSGI handler, so the end-of-request signal runs as in a server
(Django's test Client would disconnect it).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest
from django_site import (
    APP_NAME,
    PROJECT,
    SIZE,
    TIMEOUT,
    close_connections,
    databases,
    group_stats,
    wsgi_request,
)
from modes import MODE, Task, join_all, spawn, wait_until

import greenpool
from greenpool.testing.postgres import Cluster

django = pytest.importorskip("django")

pytestmark = [
    pytest.mark.skipif(MODE == "eventlet", reason="greenpool.django supports gevent and threads"),
    pytest.mark.timeout(60),
]


# --- migrations, ORM, the request life cycle ------------------------------------------------


def test_migrations_and_orm_round_trip(pools: Any) -> None:
    from django.db import connection, transaction
    from notes.models import Note

    assert "notes_note" in connection.introspection.table_names()
    assert connection.Database.__name__ == "psycopg2"  # even with psycopg 3 installed
    note = Note.objects.create(body="first")
    Note.objects.filter(id=note.id).update(body="changed")
    assert Note.objects.using("default").get(id=note.id).body == "changed"
    with pytest.raises(RuntimeError), transaction.atomic():
        Note.objects.create(body="rolled back")
        raise RuntimeError("undo")
    assert list(Note.objects.using("default").values_list("body", flat=True)) == ["changed"]
    Note.objects.filter(id=note.id).delete()
    assert Note.objects.using("default").count() == 0


def test_a_request_ends_its_loan_whatever_conn_max_age(pools: Any) -> None:
    status, body = wsgi_request("/notes/", "POST", b'{"body": "hello"}')
    assert status.startswith("200"), body
    assert json.loads(body)["db"] == "default"
    status, body = wsgi_request("/notes/")
    assert status.startswith("200") and json.loads(body)["count"] == 1, body
    stats = group_stats(pools)
    assert stats["in_use"] == 0 and stats["idle"] >= 1, stats  # back in the pool, still open
    assert group_stats(pools, "replica")["in_use"] == 0


def test_connections_are_never_shared_between_tasks(pools: Any) -> None:
    from django.db import connection

    seen: list[tuple[int, int]] = []

    def take() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), pg_sleep(0.2)")
            pid = cursor.fetchone()[0]
        seen.append((id(connection.connection), pid))
        connection.close()

    tasks = [spawn(take) for _ in range(SIZE)]
    join_all(tasks, 10)
    assert all(t.error is None for t in tasks), [t.error for t in tasks]
    assert len({raw for raw, _ in seen}) == SIZE and len({pid for _, pid in seen}) == SIZE


def test_a_session_change_does_not_reach_the_next_loan(pools: Any) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SET search_path TO pg_catalog")
        pid = _pid(cursor)
    connection.close()
    with connection.cursor() as cursor:
        assert _pid(cursor) == pid  # the same connection, reused ...
        cursor.execute("SHOW search_path")
        assert cursor.fetchone()[0] == '"$user", public'  # ... and reset
    connection.close()


def _pid(cursor: Any) -> int:
    cursor.execute("SELECT pg_backend_pid()")
    return int(cursor.fetchone()[0])


# --- the bound, the timeout, tasks that never close ----------------------------------------


def test_a_cold_burst_stays_within_the_bound(pools: Any, server_conns: Any) -> None:
    from django.db import connection

    peak = [0]
    done = [False]

    def watch() -> None:
        while not done[0]:
            peak[0] = max(peak[0], server_conns(application_name=APP_NAME))
            time.sleep(0.01)

    def query() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(0.02)")
        finally:
            connection.close()

    watcher = spawn(watch)
    tasks = [spawn(query) for _ in range(40)]
    join_all(tasks, 20)
    done[0] = True
    join_all([watcher], 5)
    assert [t.error for t in tasks if t.error is not None] == []
    assert 1 <= peak[0] <= SIZE, f"{peak[0]} server connections for a bound of {SIZE}"
    assert group_stats(pools)["size"] <= SIZE


def test_exhaustion_times_out_with_a_clear_error(pools: Any) -> None:
    from django.db import OperationalError, connection

    from greenpool import PoolTimeout

    def hold() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(3)")
        finally:
            connection.close()

    holders = [spawn(hold) for _ in range(SIZE)]
    wait_until(lambda: group_stats(pools)["in_use"] == SIZE, 10, "every connection lent")
    started = time.monotonic()
    with pytest.raises(OperationalError) as caught, connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    elapsed = time.monotonic() - started
    connection.close()
    assert isinstance(caught.value.__cause__, PoolTimeout)
    message = str(caught.value)
    assert "'default'" in message and str(SIZE) in message, message
    assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + 1.0, elapsed
    join_all(holders, 10)


def test_a_hand_spawned_task_that_never_closes_gives_its_connection_back(
    pools: Any, server_conns: Any
) -> None:
    from notes.models import Note

    lent_inside: list[int] = []

    def leaky() -> int:
        count = Note.objects.using("default").count()
        lent_inside.append(group_stats(pools)["in_use"])
        return count  # ends without connection.close() or close_old_connections()

    tasks: list[Task] = [spawn(leaky) for _ in range(SIZE * 3)]  # more than the bound
    join_all(tasks, 20)
    assert [t.error for t in tasks if t.error is not None] == []
    assert max(lent_inside) >= 1
    del tasks  # a thread is watched through its object: give it up, as a server would
    gc.collect()
    wait_until(lambda: group_stats(pools)["in_use"] == 0, 10, "the ended tasks' loans back")
    assert server_conns(application_name=APP_NAME) <= SIZE


def test_a_task_killed_mid_query_loses_no_slot(pools: Any, server_conns: Any) -> None:
    if MODE != "gevent":
        pytest.skip("a thread cannot be killed from outside")
    import gevent
    from django.db import connection

    def stuck() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(30)")

    task = gevent.spawn(stuck)
    wait_until(lambda: group_stats(pools)["in_use"] == 1, 10, "the query running")
    task.kill(timeout=5)
    assert task.dead
    wait_until(lambda: group_stats(pools)["in_use"] == 0, 10, "the killed task's loan back")
    stats = group_stats(pools)
    assert stats["size"] == 0 and stats["discards"] == 1, stats  # interrupted: discarded
    # and the pool still serves
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    connection.close()


# --- routing ---------------------------------------------------------------------------------


def test_the_router_sends_reads_to_the_replica_until_the_task_writes(pools: Any) -> None:
    from django.db import connections, transaction
    from notes.models import Note

    assert Note.objects.all().db == "replica"
    Note.objects.create(body="w")
    assert Note.objects.all().db == "default"  # reads its own write
    for conn in connections.all():
        conn.close()  # the request ends
    assert Note.objects.all().db == "replica"
    with transaction.atomic():
        assert Note.objects.all().db == "default"
    from greenpool.django.router import PrimaryReplicaRouter

    router = PrimaryReplicaRouter()
    assert router.allow_migrate("default", "notes") and not router.allow_migrate("replica", "notes")


# --- bad settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "words"), [
    ({"pool": True}, ["'pool'", "Django's own"]),
    ({"MAX_CONNS": 2, "connection_count": 2}, ["MAX_CONNS", "not both"]),
    ({"greenpool": {"typo": 1}}, ["'typo'", "allowed"]),
    ({"servers": "127.0.0.1:5432"}, ["'servers'", "list"]),
    ({"connection_count": 0}, ["connection_count", "0"]),
    ({"no_such_libpq_parameter": "x"}, ["no_such_libpq_parameter"]),
])
def test_bad_options_are_refused_naming_the_key(
    project: Any, pg: Cluster, options: dict[str, Any], words: list[str]
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    settings_dict = {**databases(pg, "django_app")["default"], "PASSWORD": "s3cret-value"}
    settings_dict["OPTIONS"] = {"greenpool": {"type": MODE}, **options}
    with pytest.raises(ImproperlyConfigured) as caught:
        project.group_for("badalias", settings_dict, "UTC")
    message = str(caught.value)
    for word in words:
        assert word in message, message
    assert "s3cret-value" not in message


def test_max_conns_is_django_db_geventpools_name_for_the_bound(project: Any, pg: Cluster) -> None:
    settings_dict = dict(databases(pg, "django_app")["default"])
    settings_dict["OPTIONS"] = {"MAX_CONNS": 3, "REUSE_CONNS": 2, "greenpool": {"type": MODE}}
    try:
        group = project.group_for("geventpool_alias", settings_dict, "UTC")
        assert group.config.connection_count == 3
    finally:
        project.close_all()


# --- Django's own test runner ----------------------------------------------------------------


def test_django_test_runner_creates_and_drops_its_test_database(pg: Cluster) -> None:
    """``manage.py test`` (its own process: not monkey-patched, so the mode detected is
    threaded) creates ``test_<NAME>``, mirrors the replica alias onto it, runs the project's
    TestCase, and drops it: no pooled session is left to block the DROP DATABASE."""
    if MODE != "gevent":
        pytest.skip("runs in a subprocess of its own: once is enough")
    import subprocess

    name = "django_runner"
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
        pg.create_database(name)
    dbs = databases(pg, name)
    for alias in dbs.values():
        alias["OPTIONS"] = {k: v for k, v in alias["OPTIONS"].items() if k != "greenpool"}
    env = {**os.environ, "GREENPOOL_DJANGO_DATABASES": json.dumps(dbs),
           "PYTHONPATH": os.pathsep.join([str(PROJECT.parent.parent), str(PROJECT)])}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([sys.executable, "manage.py", "test", "notes", "--noinput", "-v", "1"],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=50,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ran 1 test" in done.stderr and "OK" in done.stderr, done.stderr[-2000:]
    assert not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"test_{name}",))


def test_a_connection_closed_inside_an_atomic_block_is_not_used_again(pools: Any) -> None:
    """Django keeps ``connection`` set until the atomic block ends; by then the connection is
    back in the pool, maybe lent to another task: any use fails instead of reaching it."""
    from django.db import Error, connection, transaction
    from notes.models import Note

    with pytest.raises(Error), transaction.atomic(using="default"):
        Note.objects.using("default").create(body="lost")
        connection.close()
        assert group_stats(pools)["in_use"] == 0  # given back (and rolled back) at once
        Note.objects.using("default").count()
    assert connection.connection is None
    assert Note.objects.using("default").count() == 0
    connection.close()


@contextmanager
def _alias_on(cluster: Cluster, alias: str, **options: Any) -> Iterator[Any]:
    """A Django connection of this task on ``cluster`` (a pool of its own), reachable as
    ``alias`` by ``transaction.atomic(using=alias)``; gone again afterwards."""
    from django.db import connections
    from django.db.utils import ConnectionHandler

    handler = ConnectionHandler({"default": {
        "ENGINE": "greenpool.django", "NAME": "postgres", "USER": cluster.user,
        "PASSWORD": cluster.password, "HOST": cluster.host, "PORT": cluster.port,
        "OPTIONS": {"connection_count": SIZE, "connect_timeout": 1,
                    "greenpool": {"type": MODE, "application_name": APP_NAME,
                                  "quarantine_initial": 0.1, "quarantine_max": 0.5},
                    **options}}})
    conn = handler["default"]
    connections[alias] = conn
    try:
        yield conn
    finally:
        del connections[alias]
        conn.close()


def test_an_error_inside_atomic_on_a_stopped_server_arrives_at_once(
    pools: Any, pg_factory: Any
) -> None:
    """Atomic.__exit__ closes the lost connection, then switches autocommit back on. That
    switch takes no new loan (which would wait for a healthy server, then replace the
    statement's error with a pool timeout): the statement's own error arrives at once."""
    from django.db import OperationalError, transaction

    from greenpool.django.pools import group_for

    cluster = pg_factory()
    acquire_timeout = 3.0
    with _alias_on(cluster, "stopping", timeout=acquire_timeout) as conn:
        started = 0.0
        with pytest.raises(OperationalError) as caught, transaction.atomic(using="stopping"):
            with conn.cursor() as cursor:
                cursor.execute("CREATE TABLE lost (x int)")
            cluster.stop("immediate")
            started = time.monotonic()
            with conn.cursor() as cursor:
                cursor.execute("INSERT INTO lost VALUES (1)")
        elapsed = time.monotonic() - started
        cause = caught.value.__cause__
        assert isinstance(cause, psycopg2.OperationalError), repr(cause)
        assert not isinstance(cause, greenpool.PoolError), repr(cause)
        assert elapsed < acquire_timeout / 3, elapsed
        assert conn.connection is None and conn.autocommit is True
        group = group_for("default", conn.settings_dict, "UTC")
        assert group.stats()["in_use"] == 0
        cluster.start()
        with conn.cursor() as cursor:  # the next loan, in autocommit; nothing was committed
            cursor.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'lost'")
            assert cursor.fetchone()[0] == 0
        assert conn.connection.autocommit is True


def test_autocommit_switched_without_a_connection_applies_to_the_next_loan(
    pools: Any,
) -> None:
    """No loan is taken only to flip the flag; the next real one gets it."""
    from django.db import connection

    connection.close()
    connection.set_autocommit(False)
    assert connection.connection is None and group_stats(pools)["in_use"] == 0
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert connection.connection.autocommit is False
        in_transaction = psycopg2.extensions.TRANSACTION_STATUS_INTRANS
        assert connection.connection.get_transaction_status() == in_transaction
        connection.rollback()
        connection.set_autocommit(True)
        assert connection.connection.autocommit is True
    finally:
        connection.close()
    assert group_stats(pools)["in_use"] == 0


# --- the public handle for exporters ------------------------------------------------------

def test_pools_is_the_handle_that_exports_the_backends_pools(pools: Any) -> None:
    """Made at startup (before any request), registered, then a query shows in the scrape."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from notes.models import Note

    from greenpool.prometheus import register, unregister

    assert pools.pools() == {}  # none made yet
    made = pools.pools(make=True)
    assert list(made) == ["default+replica"]  # one pool; both aliases are its groups
    registry = prometheus_client.CollectorRegistry()
    for name, pool in made.items():
        register(pool, name=name, registry=registry)
    try:
        assert Note.objects.count() == 0
        close_connections()

        def total(metric: str) -> float:  # the router sends the read to the replica alias
            return sum(registry.get_sample_value(metric, {"pool": "default+replica",
                                                          "group": group}) or 0
                       for group in ("default", "replica"))

        assert total("greenpool_connections_acquired_total") == 1
        assert total("greenpool_connections_use_seconds_count") == 1
    finally:
        unregister("default+replica", registry=registry)
