"""greenpool.django: a request's connection goes back whole and clean. Cursors, server-side
iterators, streamed responses, session state and threads never reach the next borrower."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django_site import backend_pid, group_stats
from modes import MODE, wait_until

django = pytest.importorskip("django")

pytestmark = [
    pytest.mark.skipif(MODE == "eventlet", reason="greenpool.django supports gevent and threads"),
    pytest.mark.timeout(60),
]


def test_server_side_iterator_leaves_no_cursor(pools: Any) -> None:
    from django.db import connection
    from notes.models import Note

    Note.objects.using("default").bulk_create([Note(body=str(i)) for i in range(50)])
    pid = backend_pid()
    rows = Note.objects.using("default").iterator(chunk_size=5)
    assert next(rows).body == "0"
    connection.close()
    assert backend_pid() == pid
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_cursors")
        assert cursor.fetchone()[0] == 0
    connection.close()


def test_an_unfinished_server_side_iterator_cannot_abort_the_next_borrower(pools: Any) -> None:
    import gc

    from django.db import Error, connection, transaction
    from notes.models import Note

    Note.objects.using("default").bulk_create([Note(body=str(i)) for i in range(50)])
    pid = backend_pid()
    rows = Note.objects.using("default").iterator(chunk_size=5)
    assert [next(rows).body for _ in range(5)] == ["0", "1", "2", "3", "4"]  # one chunk
    connection.close()  # the request ends with the iterator unfinished
    with transaction.atomic(using="default"):
        assert backend_pid() == pid
        with pytest.raises(Error):
            next(rows)  # the old loan's cursor: fails without touching this transaction
        del rows
        gc.collect()  # closing the old cursor sends nothing either
        Note.objects.using("default").create(body="after")
    assert Note.objects.using("default").filter(body="after").count() == 1
    connection.close()


def test_a_cursor_kept_past_its_loan_cannot_reach_the_next_borrower(pools: Any) -> None:
    """Django's own backend closes the connection, so a cursor kept past ``close()`` fails;
    a pooled connection stays open and is lent again: the old cursor must fail too, not run
    its statement inside the next borrower's transaction."""
    from django.db import InterfaceError, connection, transaction
    from notes.models import Note

    pid = backend_pid()
    kept = connection.cursor()
    connection.close()
    with transaction.atomic(using="default"):
        assert backend_pid() == pid  # the same server connection, lent again
        Note.objects.using("default").create(body="kept")
        with pytest.raises(InterfaceError):
            kept.execute("SELECT 1")
        Note.objects.using("default").create(body="still fine")
    assert Note.objects.using("default").count() == 2
    connection.close()


CURSOR_CLASSES = ["RealDictCursor", "DictCursor", "NamedTupleCursor", "OwnCursor"]


def raw_cursor(factory: str) -> Any:
    """A cursor of the loan's psycopg2 connection, of a class of psycopg2.extras or one's own."""
    import psycopg2.extras
    from django.db import connection

    class OwnCursor(psycopg2.extensions.cursor):
        pass

    connection.ensure_connection()
    cls = OwnCursor if factory == "OwnCursor" else getattr(psycopg2.extras, factory)
    return connection.connection.cursor(cursor_factory=cls)


@pytest.mark.parametrize("factory", CURSOR_CLASSES)
def test_a_set_through_a_raw_cursor_of_any_class_never_reaches_the_next_request(
        pools: Any, factory: str) -> None:
    """``connection.connection.cursor(cursor_factory=RealDictCursor)`` (dict rows) and the
    like: the statement is seen, so the loan is reset before the next request."""
    from django.db import connection

    pid = backend_pid()
    with connection.cursor() as cursor:
        cursor.execute("SHOW work_mem")
        configured = cursor.fetchone()[0]
    connection.close()
    with raw_cursor(factory) as cursor:
        cursor.execute("SET work_mem = '2222kB'")
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('work_mem')")
        assert cursor.fetchone() == (pid, configured)
    connection.close()


@pytest.mark.parametrize("factory", CURSOR_CLASSES)
def test_a_raw_cursor_of_any_class_kept_past_its_loan_cannot_reach_the_next_borrower(
        pools: Any, factory: str) -> None:
    import psycopg2
    from django.db import connection, transaction
    from notes.models import Note

    pid = backend_pid()
    kept = raw_cursor(factory)
    connection.close()
    with transaction.atomic(using="default"):
        assert backend_pid() == pid  # the same server connection, lent again
        Note.objects.using("default").create(body="kept")
        with pytest.raises(psycopg2.InterfaceError):
            kept.execute("SELECT 1")
        Note.objects.using("default").create(body="still fine")
    assert Note.objects.using("default").count() == 2
    connection.close()


def test_a_named_raw_cursor_kept_past_its_loan_cannot_reach_the_next_borrower(
        pools: Any) -> None:
    """A server-side cursor of any class, WITH HOLD, left unfinished: its fetches fail once
    its loan ended, and the cursor does not reach the next request's session."""
    import psycopg2.extras
    from django.db import connection

    pid = backend_pid()
    connection.ensure_connection()
    kept = connection.connection.cursor("kept", cursor_factory=psycopg2.extras.RealDictCursor,
                                        withhold=True)
    kept.itersize = 1
    kept.execute("SELECT generate_series(1, 10) AS n")
    assert kept.fetchone() == {"n": 1}
    connection.commit()
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), (SELECT count(*) FROM pg_cursors)")
        assert cursor.fetchone() == (pid, 0)
        with pytest.raises(psycopg2.InterfaceError):
            kept.fetchone()
        kept.close()  # sends nothing: this loan's transaction is untouched
        cursor.execute("SELECT 1")
    connection.close()


@pytest.mark.parametrize("statement", [
    "SELECT pg_advisory_lock(42)",
    "SELECT set_config('search_path', 'pg_catalog', false)",
    "CREATE TEMP TABLE t_left_behind (x int)",
    "PREPARE left_stmt AS SELECT 1",
    "LISTEN left_channel",
])
def test_session_state_never_reaches_the_next_request(pools: Any, statement: str) -> None:
    from django.db import connection

    pid = backend_pid()
    with connection.cursor() as cursor:
        cursor.execute(statement)
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('search_path'),"
                       " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                       "  AND pid = pg_backend_pid()),"
                       " (SELECT count(*) FROM pg_prepared_statements),"
                       " (SELECT count(*) FROM pg_listening_channels()),"
                       " to_regclass('pg_temp.t_left_behind') IS NULL")
        row = cursor.fetchone()
    connection.close()
    if row[0] == pid:
        assert row[1:] == ('"$user", public', 0, 0, 0, True), row


def test_streaming_response_keeps_its_connection_until_closed(pools: Any) -> None:
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


def test_a_stream_closed_early_gives_its_connection_back(pools: Any) -> None:
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


def test_threaded_thread_without_close_gives_back(pools: Any) -> None:
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

