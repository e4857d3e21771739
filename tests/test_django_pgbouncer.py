"""greenpool.django behind a real PgBouncer in transaction mode (Debian's 1.18).

One server connection serves every client (``default_pool_size = 1``), so a plain client
through the same PgBouncer sees whatever a Django loan left on it. The server's own time
zone is not Django's: Django's ``TIME_ZONE`` must reach every transaction without the
``-c TimeZone`` startup option PgBouncer refuses, and leave the server connection as it was;
``assume_role`` is refused; an unfinished ``QuerySet.iterator()`` in autocommit leaves no
``WITH HOLD`` cursor there.

Django's settings are process-wide: when this module runs first in a process it configures
the test project with no ``DATABASES`` of its own (test_django.py, earlier in file order,
configures it with its own).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from modes import MODE

from greenpool.testing.pgbouncer import PgBouncer, available
from greenpool.testing.postgres import Cluster

django = pytest.importorskip("django")

pytestmark = [
    pytest.mark.skipif(MODE == "eventlet", reason="greenpool.django supports gevent and threads"),
    pytest.mark.skipif(not available(), reason="/usr/sbin/pgbouncer not installed"),
    pytest.mark.timeout(60),
]

PROJECT = Path(__file__).resolve().parent / "django_project"
SERVER_ZONE = "Asia/Tokyo"  # not Django's TIME_ZONE ("UTC")


@pytest.fixture(scope="module")
def project() -> None:
    if str(PROJECT) not in sys.path:
        sys.path.insert(0, str(PROJECT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")
    django.setup()


@pytest.fixture
def bouncer(project: None, pg_factory: Callable[..., Cluster]) -> Iterator[PgBouncer]:
    server = pg_factory(settings={"timezone": SERVER_ZONE})
    server.execute("CREATE TABLE notes_note (id bigserial PRIMARY KEY, body text NOT NULL, "
                   "created timestamptz NOT NULL)")
    with PgBouncer(server, pool_mode="transaction", default_pool_size=1) as b:
        yield b


@contextmanager
def alias_through(b: PgBouncer, **options: Any) -> Iterator[Any]:
    """A Django alias ``pgb`` through ``b`` (a pool of its own), gone afterwards."""
    from django.db import connections
    from django.db.utils import ConnectionHandler

    from greenpool.django import pools

    c = b.cluster
    handler = ConnectionHandler({"default": {
        "ENGINE": "greenpool.django", "NAME": c.dbname, "USER": c.user, "PASSWORD": c.password,
        "HOST": b.host, "PORT": b.port,
        "OPTIONS": {"connection_count": 2, "connect_timeout": 3, "statement_timeout": 5,
                    "greenpool": {"type": MODE}, **options}}})
    conn = handler["default"]
    connections["pgb"] = conn
    try:
        yield conn
    finally:
        del connections["pgb"]
        conn.close()
        for group in pools.stats()["groups"].values():
            assert group["in_use"] == 0
        pools.close_all()


def plain(b: PgBouncer, sql: str) -> Any:
    """What another client of the same PgBouncer (so the same server connection) sees."""
    c = b.cluster
    conn = psycopg2.connect(host=b.host, port=b.port, dbname=c.dbname, user=c.user,
                            password=c.password, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_time_zone_reaches_every_transaction_and_stays_with_the_client(
        bouncer: PgBouncer) -> None:
    from django.db import transaction
    from notes.models import Note

    with alias_through(bouncer, pooler="transaction") as conn:
        for autocommit_loan in range(3):
            note = Note.objects.using("pgb").create(body=f"n{autocommit_loan}")
            with conn.cursor() as cursor:
                cursor.execute("SELECT current_setting('TimeZone')")
                assert cursor.fetchone()[0] == "UTC"
            conn.close()  # the loan ends: the next one may meet any server connection
            assert plain(bouncer, "SELECT current_setting('TimeZone')") == SERVER_ZONE
        with transaction.atomic(using="pgb"):
            with conn.cursor() as cursor:
                cursor.execute("SELECT current_setting('TimeZone'), now()")
                zone, now = cursor.fetchone()
            assert zone == "UTC" and now.utcoffset().total_seconds() == 0
        fetched = Note.objects.using("pgb").get(pk=note.pk)
        assert fetched.created == note.created and fetched.created.tzinfo is not None
        conn.close()
    assert plain(bouncer, "SELECT current_setting('TimeZone')") == SERVER_ZONE


def test_assume_role_is_refused_behind_a_transaction_pooler(bouncer: PgBouncer) -> None:
    from django.core.exceptions import ImproperlyConfigured

    with alias_through(bouncer, pooler="transaction", assume_role="pg_read_all_data") as conn:
        with pytest.raises(ImproperlyConfigured, match=r"assume_role.*transaction mode"):
            conn.ensure_connection()
        assert conn.connection is None
    assert plain(bouncer, "SELECT current_user") == bouncer.cluster.user


def test_an_unfinished_iterator_leaves_no_cursor_on_the_shared_server_connection(
        bouncer: PgBouncer) -> None:
    from notes.models import Note

    with alias_through(bouncer, pooler="transaction") as conn:
        Note.objects.using("pgb").bulk_create(Note(body=f"n{i}") for i in range(50))
        rows = Note.objects.using("pgb").iterator(chunk_size=10)
        first = next(rows)
        assert first.body == "n0"
        # another client on the one server connection: no holdable cursor open there
        assert plain(bouncer, "SELECT count(*) FROM pg_cursors") == 0
        assert [note.body for note in rows][-1] == "n49"
        conn.close()
    assert plain(bouncer, "SELECT count(*) FROM pg_cursors") == 0


def test_without_the_pooler_key_the_error_says_to_give_it(bouncer: PgBouncer) -> None:
    """Without the key Django's time zone travels in the startup packet (no round trip
    directly), which PgBouncer refuses: the error names the key that fixes it."""
    from django.db.utils import OperationalError

    with alias_through(bouncer) as conn, pytest.raises(OperationalError, match="pooler: 'tr"):
        conn.ensure_connection()
