"""Hostile review of greenpool.django: transactions, faults and session state on a real
server, through the test project's models (fixtures shared with test_django)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from modes import MODE, join_all, spawn, wait_until
from test_django import APP_NAME, group_stats, pools, project, wsgi_request  # noqa: F401

from greenpool.throwaway import Cluster

django = pytest.importorskip("django")

pytestmark = [
    pytest.mark.skipif(MODE == "eventlet", reason="greenpool.django supports gevent and threads"),
    pytest.mark.timeout(60),
]


def _backend_pid() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def test_killed_mid_atomic_commits_nothing_and_loses_no_slot(pools: Any) -> None:  # noqa: F811
    if MODE != "gevent":
        pytest.skip("a thread cannot be killed from outside")
    import gevent
    import gevent.event
    from django.db import connection, transaction
    from notes.models import Note

    def stuck() -> None:
        with transaction.atomic(using="default"):
            Note.objects.using("default").create(body="half")
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(30)")

    task = gevent.spawn(stuck)
    wait_until(lambda: group_stats(pools)["in_use"] == 1, 10, "the atomic block running")
    gevent.sleep(0.2)
    task.kill(timeout=5)
    assert task.dead
    wait_until(lambda: group_stats(pools)["in_use"] == 0, 10, "the killed task's loan back")
    assert Note.objects.using("default").count() == 0
    connection.close()


def test_timeout_caught_mid_atomic_then_the_task_goes_on(pools: Any) -> None:  # noqa: F811
    if MODE != "gevent":
        pytest.skip("gevent.Timeout")
    import gevent
    import gevent.event
    from django.db import Error, connection, transaction
    from notes.models import Note

    with pytest.raises(gevent.Timeout), gevent.Timeout(0.3), transaction.atomic(using="default"):
        Note.objects.using("default").create(body="half")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(30)")
    # the same task carries on with the same Django connection
    try:
        count = Note.objects.using("default").count()
    except Error:
        connection.close()
        count = Note.objects.using("default").count()
    assert count == 0
    connection.close()
    assert group_stats(pools)["in_use"] == 0


def test_timeout_caught_mid_query_outside_atomic(pools: Any) -> None:  # noqa: F811
    if MODE != "gevent":
        pytest.skip("gevent.Timeout")
    import gevent
    import gevent.event
    from django.db import Error, connection
    from notes.models import Note

    with pytest.raises(gevent.Timeout), gevent.Timeout(0.3), connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(30)")
    try:
        count = Note.objects.using("default").count()
    except Error:
        connection.close()
        count = Note.objects.using("default").count()
    assert count == 0
    connection.close()
    assert group_stats(pools)["in_use"] == 0


def test_terminated_backend_mid_request(pools: Any, pg: Cluster) -> None:  # noqa: F811
    from django.db import OperationalError, connection

    pid = _backend_pid()
    with pytest.raises(OperationalError), connection.cursor() as cursor:
        pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        cursor.execute("SELECT 1")
    connection.close()
    assert group_stats(pools)["in_use"] == 0
    assert _backend_pid() != pid
    connection.close()


def test_autocommit_off_by_hand_is_rolled_back_and_restored(pools: Any) -> None:  # noqa: F811
    from django.db import connection, transaction
    from notes.models import Note

    transaction.set_autocommit(False, using="default")
    Note.objects.using("default").create(body="never committed")
    connection.close()
    assert transaction.get_autocommit(using="default")
    assert Note.objects.using("default").count() == 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    assert connection.connection.autocommit
    connection.close()


def test_on_commit_select_for_update_and_savepoints(pools: Any) -> None:  # noqa: F811
    from django.db import connection, transaction
    from notes.models import Note

    ran: list[str] = []
    note = Note.objects.using("default").create(body="x")
    with transaction.atomic(using="default"):
        locked = Note.objects.using("default").select_for_update().get(id=note.id)
        transaction.on_commit(lambda: ran.append("outer"), using="default")
        try:
            with transaction.atomic(using="default"):
                transaction.on_commit(lambda: ran.append("inner"), using="default")
                Note.objects.using("default").create(body="undone")
                raise RuntimeError
        except RuntimeError:
            pass
        locked.body = "y"
        locked.save(using="default")
        assert ran == []
    assert ran == ["outer"]
    assert list(Note.objects.using("default").values_list("body", flat=True)) == ["y"]
    connection.close()


def test_server_side_iterator_leaves_no_cursor(pools: Any) -> None:  # noqa: F811
    from django.db import connection
    from notes.models import Note

    Note.objects.using("default").bulk_create([Note(body=str(i)) for i in range(50)])
    pid = _backend_pid()
    rows = Note.objects.using("default").iterator(chunk_size=5)
    assert next(rows).body == "0"
    connection.close()
    assert _backend_pid() == pid
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_cursors")
        assert cursor.fetchone()[0] == 0
    connection.close()


def test_streaming_response_keeps_its_connection_until_closed(pools: Any) -> None:  # noqa: F811
    from io import BytesIO
    from wsgiref.util import setup_testing_defaults

    from django.core.handlers.wsgi import WSGIHandler
    from notes.models import Note

    Note.objects.using("default").bulk_create([Note(body=str(i)) for i in range(20)])
    from django.db import connections
    for conn in connections.all():
        conn.close()
    environ: dict[str, Any] = {"PATH_INFO": "/stream/", "REQUEST_METHOD": "GET",
                               "wsgi.input": BytesIO(b"")}
    setup_testing_defaults(environ)
    response = WSGIHandler()(environ, lambda s, h, exc_info=None: None)
    chunks = iter(response)
    first = next(chunks)
    assert first
    lent = group_stats(pools, "replica")["in_use"] + group_stats(pools)["in_use"]
    rest = b"".join(chunks)
    response.close()
    assert lent == 1
    assert (first + rest).count(b"\n") == 20
    assert group_stats(pools, "replica")["in_use"] == 0


@pytest.mark.parametrize("statement", [
    "SELECT pg_advisory_lock(42)",
    "SELECT set_config('search_path', 'pg_catalog', false)",
    "CREATE TEMP TABLE t_review (x int)",
    "PREPARE review_stmt AS SELECT 1",
    "LISTEN review_channel",
])
def test_session_state_never_reaches_the_next_request(pools: Any, statement: str) -> None:  # noqa: F811
    from django.db import connection

    pid = _backend_pid()
    with connection.cursor() as cursor:
        cursor.execute(statement)
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('search_path'),"
                       " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                       "  AND pid = pg_backend_pid()),"
                       " (SELECT count(*) FROM pg_prepared_statements),"
                       " (SELECT count(*) FROM pg_listening_channels()),"
                       " to_regclass('pg_temp.t_review') IS NULL")
        row = cursor.fetchone()
    connection.close()
    if row[0] == pid:
        assert row[1:] == ('"$user", public', 0, 0, 0, True), row


def test_threaded_thread_without_close_gives_back(pools: Any) -> None:  # noqa: F811
    from notes.models import Note

    done = threading.Event()

    def leaky() -> None:
        Note.objects.using("default").count()
        done.set()

    if MODE == "gevent":
        pytest.skip("threads under gevent are greenlets: covered by test_django")
    thread = threading.Thread(target=leaky)
    thread.start()
    thread.join(10)
    assert done.is_set()
    wait_until(lambda: group_stats(pools)["in_use"] == 0, 10, "the thread's loan back")


def test_wrong_password_not_in_error(pools: Any, pg: Cluster) -> None:  # noqa: F811
    from django.db import connections
    from django.db.utils import ConnectionHandler

    settings = {k: dict(v) for k, v in connections.settings.items()}
    settings["default"]["PASSWORD"] = "hunter2-wrong-secret"
    settings["default"]["OPTIONS"] = {**settings["default"]["OPTIONS"], "timeout": 1}
    handler = ConnectionHandler(settings)
    conn = handler["default"]
    with pytest.raises(Exception) as caught:
        conn.ensure_connection()
    text = ""
    exc: BaseException | None = caught.value
    while exc is not None:
        text += repr(exc) + str(exc)
        exc = exc.__cause__ or exc.__context__
    assert "hunter2" not in text, text
    conn.close()


def test_a_cursor_kept_past_its_loan_cannot_reach_the_next_borrower(pools: Any) -> None:  # noqa: F811
    """Django's own backend closes the connection, so a cursor kept past ``close()`` fails;
    a pooled connection stays open and is lent again: the old cursor must fail too, not run
    its statement inside the next borrower's transaction."""
    from django.db import InterfaceError, connection, transaction
    from notes.models import Note

    pid = _backend_pid()
    kept = connection.cursor()
    connection.close()
    with transaction.atomic(using="default"):
        assert _backend_pid() == pid  # the same server connection, lent again
        Note.objects.using("default").create(body="kept")
        with pytest.raises(InterfaceError):
            kept.execute("SELECT 1")
        Note.objects.using("default").create(body="still fine")
    assert Note.objects.using("default").count() == 2
    connection.close()


def test_an_unfinished_server_side_iterator_cannot_abort_the_next_borrower(pools: Any) -> None:  # noqa: F811
    import gc

    from django.db import Error, connection, transaction
    from notes.models import Note

    Note.objects.using("default").bulk_create([Note(body=str(i)) for i in range(50)])
    pid = _backend_pid()
    rows = Note.objects.using("default").iterator(chunk_size=5)
    assert [next(rows).body for _ in range(5)] == ["0", "1", "2", "3", "4"]  # one chunk
    connection.close()  # the request ends with the iterator unfinished
    with transaction.atomic(using="default"):
        assert _backend_pid() == pid
        with pytest.raises(Error):
            next(rows)  # the old loan's cursor: fails without touching this transaction
        del rows
        gc.collect()  # closing the old cursor sends nothing either
        Note.objects.using("default").create(body="after")
    assert Note.objects.using("default").filter(body="after").count() == 1
    connection.close()


_FORKED_WORKER = r'''
import faulthandler, json, os, sys, time
import django
django.setup()
from django.db import connection
with connection.cursor() as cursor:  # the master's query: a threaded pool
    cursor.execute("SELECT 1")
connection.close()
pid = os.fork()
if pid:
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
faulthandler.dump_traceback_later(20, exit=True)  # a hung hub ends the child, loudly
from gevent import monkey
monkey.patch_all()  # as gunicorn's gevent worker does, after the fork
import gevent
from django.db.utils import ConnectionHandler
handler = ConnectionHandler()  # Django's per-greenlet connections, made after patching
results = []
def work():
    try:
        with handler["default"].cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.1)")
        results.append("ok")
    except BaseException as exc:
        results.append(repr(exc))
    finally:
        handler["default"].close()
tasks = [gevent.spawn(work) for _ in range(6)]
gevent.joinall(tasks, timeout=15)
from greenpool.django.pools import _pools
print(json.dumps({"results": results, "modes": [p.config.mode for p in _pools.values()]}),
      flush=True)  # os._exit() below flushes nothing
os._exit(0)
'''


def test_a_pool_made_before_fork_does_not_hang_a_gevent_worker(pg: Cluster) -> None:
    """gunicorn ``--preload`` with an app that queries while loading: the master makes a
    threaded pool, the gevent worker patches after the fork. Before the fix the inherited
    pool's real locks blocked the worker's hub for good."""
    if MODE != "gevent":
        pytest.skip("runs in a subprocess of its own: once is enough")
    import json
    import os
    import subprocess
    import sys

    from test_django import PROJECT

    name = "django_fork"
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
        pg.create_database(name)
    dbs = {"default": {"ENGINE": "greenpool.django", "NAME": name, "USER": pg.user,
                       "PASSWORD": pg.password, "HOST": pg.host, "PORT": pg.port,
                       "OPTIONS": {"connection_count": 2, "timeout": 5}}}
    env = {**os.environ, "GREENPOOL_DJANGO_DATABASES": json.dumps(dbs),
           "DJANGO_SETTINGS_MODULE": "djproject.settings",
           "PYTHONPATH": os.pathsep.join([str(PROJECT.parent.parent), str(PROJECT)])}
    done = subprocess.run([sys.executable, "-c", _FORKED_WORKER], env=env, cwd=PROJECT,
                          capture_output=True, text=True, timeout=50, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"results": ["ok"] * 6, "modes": ["gevent"]}, found


def _handler_for(cluster: Cluster, **options: Any) -> Any:
    """A ConnectionHandler of its own, on ``cluster`` (a pool of its own, too)."""
    from django.db.utils import ConnectionHandler
    from test_django import SIZE, TIMEOUT

    settings = {"default": {
        "ENGINE": "greenpool.django", "NAME": "postgres", "USER": cluster.user,
        "PASSWORD": cluster.password, "HOST": cluster.host, "PORT": cluster.port,
        "OPTIONS": {"connection_count": SIZE, "timeout": TIMEOUT, "connect_timeout": 2,
                    "greenpool": {"type": MODE, "application_name": APP_NAME,
                                  "quarantine_initial": 0.1, "quarantine_max": 0.5},
                    **options}}}
    return ConnectionHandler(settings)


def test_server_stopped_immediately_mid_atomic(pools: Any, pg_factory: Any) -> None:  # noqa: F811
    from django.db import Error

    cluster = pg_factory()
    handler = _handler_for(cluster)
    group = None
    outcome: list[BaseException | None] = []

    def request() -> None:
        conn = handler["default"]  # transaction.atomic would take the global connections'
        try:
            conn.set_autocommit(False)
            with conn.cursor() as cursor:
                cursor.execute("CREATE TABLE IF NOT EXISTS t_stop (x int)")
                cursor.execute("INSERT INTO t_stop VALUES (1)")
                cursor.execute("SELECT pg_sleep(30)")
            conn.commit()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            conn.close()

    from greenpool.django.pools import group_for

    task = spawn(request)
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%%'"
    wait_until(lambda: cluster.execute(sleeping)[0][0] == 1, 10, "mid-query")
    cluster.stop("immediate")
    join_all([task], 20)
    assert isinstance(outcome[0], Error), outcome
    settings_dict = handler["default"].settings_dict
    group = group_for("default", settings_dict, "UTC")
    assert group.stats()["in_use"] == 0
    cluster.start()

    def works() -> bool:
        conn = handler["default"]
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't_stop'")
                return cursor.fetchone()[0] == 0  # nothing half committed
        except Error:
            return False
        finally:
            conn.close()

    wait_until(works, 15, "the pool serving again after the restart")
    assert group_for("default", settings_dict, "UTC").stats()["in_use"] == 0


def test_timeout_while_waiting_for_a_full_pool_loses_no_slot(pools: Any) -> None:  # noqa: F811
    if MODE != "gevent":
        pytest.skip("gevent.Timeout")
    import gevent
    import gevent.event
    from django.db import connection
    from test_django import SIZE

    release = gevent.event.Event()

    def hold() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        release.wait(10)
        connection.close()

    holders = [gevent.spawn(hold) for _ in range(SIZE)]
    wait_until(lambda: group_stats(pools)["in_use"] == SIZE, 10, "every connection lent")
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.2), connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    connection.close()
    assert group_stats(pools)["waiting"] == 0
    release.set()
    gevent.joinall(holders, 10)
    assert group_stats(pools)["in_use"] == 0
    for _ in range(SIZE + 1):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        connection.close()


def test_a_view_that_raises_mid_atomic_commits_nothing(pools: Any) -> None:  # noqa: F811
    from notes.models import Note

    status, _ = wsgi_request("/boom/")
    assert status.startswith("500"), status
    assert group_stats(pools)["in_use"] == 0
    assert Note.objects.using("default").count() == 0
    from django.db import connection
    connection.close()


def test_a_stream_closed_early_gives_its_connection_back(pools: Any) -> None:  # noqa: F811
    """The client went away mid-stream: the server closes the response unfinished."""
    from io import BytesIO
    from wsgiref.util import setup_testing_defaults

    from django.core.handlers.wsgi import WSGIHandler
    from django.db import connections
    from notes.models import Note

    Note.objects.using("default").bulk_create([Note(body=str(i)) for i in range(20)])
    for conn in connections.all():
        conn.close()
    environ: dict[str, Any] = {"PATH_INFO": "/stream/", "REQUEST_METHOD": "GET",
                               "wsgi.input": BytesIO(b"")}
    setup_testing_defaults(environ)
    response = WSGIHandler()(environ, lambda s, h, exc_info=None: None)
    assert next(iter(response))
    assert group_stats(pools, "replica")["in_use"] == 1
    response.close()
    assert group_stats(pools, "replica")["in_use"] == 0


@pytest.mark.parametrize("bad", [{"PORT": "not-a-port"}, {"OPTIONS": {"connect_timeout": -1}},
                                 {"OPTIONS": {"sslmode": "sometimes"}}])
def test_bad_settings_never_show_the_password(pools: Any, bad: dict[str, Any]) -> None:  # noqa: F811
    from django.db import connections
    from django.db.utils import ConnectionHandler

    settings = {k: dict(v) for k, v in connections.settings.items() if k == "default"}
    settings["default"]["PASSWORD"] = "hunter2-wrong-secret"
    for key, value in bad.items():
        settings["default"][key] = ({**settings["default"]["OPTIONS"], **value}
                                    if key == "OPTIONS" else value)
    conn = ConnectionHandler(settings)["default"]
    with pytest.raises(Exception) as caught:
        conn.ensure_connection()
    text = ""
    exc: BaseException | None = caught.value
    while exc is not None:
        text += repr(exc) + str(exc)
        exc = exc.__cause__ or exc.__context__
    assert "hunter2" not in text, text
    conn.close()


def test_a_stopped_backend_cannot_hold_a_request_past_its_statement_timeout(
    pools: Any, pg_factory: Any  # noqa: F811
) -> None:
    """SIGSTOP: the server cannot enforce statement_timeout, the kernel still acknowledges,
    so only a client-side bound frees the request and its slot."""
    import os
    import signal
    import time

    from django.db import OperationalError

    from greenpool.django.pools import group_for

    cluster = pg_factory()
    handler = _handler_for(cluster, statement_timeout=0.5, connect_timeout=1)
    conn = handler["default"]
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = int(cursor.fetchone()[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError) as caught, conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    conn.close()
    assert "no answer" in str(caught.value), caught.value
    assert 1.4 <= elapsed <= 4.0, elapsed
    group = group_for("default", conn.settings_dict, "UTC")
    stats = group.stats()
    assert stats["in_use"] == 0 and stats["discards"] >= 1, stats
    with conn.cursor() as cursor:  # served again, by another connection
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid
    conn.close()


def test_a_long_statement_under_its_statement_timeout_is_not_cut(
    pools: Any, pg_factory: Any  # noqa: F811
) -> None:
    from greenpool.django.pools import group_for

    cluster = pg_factory()
    handler = _handler_for(cluster, statement_timeout=2, connect_timeout=1)
    conn = handler["default"]
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(1.5)")
        cursor.execute("SELECT 1")
    conn.close()
    assert group_for("default", conn.settings_dict, "UTC").stats()["discards"] == 0


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_django_test_classes_and_the_parallel_runner(pg: Cluster, parallel: str) -> None:
    """TestCase, TransactionTestCase, on_commit capture and ``--parallel`` (cloned test
    databases: no pooled session may block the CREATE DATABASE ... TEMPLATE)."""
    if MODE != "gevent":
        pytest.skip("runs in a subprocess of its own: once is enough")
    import json
    import os
    import subprocess
    import sys

    from test_django import PROJECT, databases

    name = "django_parallel"
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
        pg.create_database(name)
    dbs = databases(pg, name)
    for alias in dbs.values():
        alias["OPTIONS"] = {k: v for k, v in alias["OPTIONS"].items() if k != "greenpool"}
    env = {**os.environ, "GREENPOOL_DJANGO_DATABASES": json.dumps(dbs),
           "PYTHONPATH": os.pathsep.join([str(PROJECT.parent.parent), str(PROJECT)])}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([sys.executable, "manage.py", "test", "notes.review_suite",
                           "--noinput", "--parallel", parallel], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=50, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ran 4 tests" in done.stderr and "OK" in done.stderr, done.stderr[-2000:]
    assert not pg.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                          (f"test_{name}%",))


def test_a_commit_to_a_stopped_backend_is_bounded_too(pools: Any, pg_factory: Any) -> None:  # noqa: F811
    import os
    import signal

    from django.db import OperationalError

    from greenpool.django.pools import group_for

    cluster = pg_factory()
    handler = _handler_for(cluster, statement_timeout=0.5, connect_timeout=1)
    conn = handler["default"]
    with conn.cursor() as cursor:
        cursor.execute("CREATE TABLE t_commit (x int)")
    pid = None
    try:
        conn.set_autocommit(False)  # transaction.atomic would take the global connections'
        with conn.cursor() as cursor:
            cursor.execute("INSERT INTO t_commit VALUES (1) RETURNING pg_backend_pid()")
            pid = int(cursor.fetchone()[0])
        os.kill(pid, signal.SIGSTOP)  # the COMMIT finds it stopped
        with pytest.raises(OperationalError) as caught:
            conn.commit()
        assert "no answer" in str(caught.value), caught.value
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
    conn.close()
    assert group_for("default", conn.settings_dict, "UTC").stats()["in_use"] == 0
