"""greenpool.django transactions on a real server: what an atomic block, a hand-made
transaction or a view leaves behind when it is killed, timed out or raises."""

from __future__ import annotations

from typing import Any

import pytest
from django_site import group_stats, wsgi_request
from modes import MODE, wait_until

django = pytest.importorskip("django")

pytestmark = [
    pytest.mark.skipif(MODE == "eventlet", reason="greenpool.django supports gevent and threads"),
    pytest.mark.timeout(60),
]


def test_killed_mid_atomic_commits_nothing_and_loses_no_slot(pools: Any) -> None:
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


def test_timeout_caught_mid_atomic_then_the_task_goes_on(pools: Any) -> None:
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


def test_timeout_caught_mid_query_outside_atomic(pools: Any) -> None:
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


def test_autocommit_off_by_hand_is_rolled_back_and_restored(pools: Any) -> None:
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


def test_on_commit_select_for_update_and_savepoints(pools: Any) -> None:
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


def test_a_view_that_raises_mid_atomic_commits_nothing(pools: Any) -> None:
    from notes.models import Note

    status, _ = wsgi_request("/boom/")
    assert status.startswith("500"), status
    assert group_stats(pools)["in_use"] == 0
    assert Note.objects.using("default").count() == 0
    from django.db import connection
    connection.close()

