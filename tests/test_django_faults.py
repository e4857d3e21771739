"""greenpool.django under real faults: a terminated backend, a server stopped at once, a
backend stopped with SIGSTOP, a full pool, a wrong password or bad settings. Every wait is
bounded, no slot is lost, no password shows."""

from __future__ import annotations

from typing import Any

import pytest
from django_site import APP_NAME, backend_pid, group_stats
from modes import MODE, join_all, spawn, wait_until

from greenpool.testing.postgres import Cluster

django = pytest.importorskip("django")

pytestmark = [
    pytest.mark.skipif(MODE == "eventlet", reason="greenpool.django supports gevent and threads"),
    pytest.mark.timeout(60),
]


def _handler_for(cluster: Cluster, **options: Any) -> Any:
    """A ConnectionHandler of its own, on ``cluster`` (a pool of its own, too)."""
    from django.db.utils import ConnectionHandler
    from django_site import SIZE, TIMEOUT

    settings = {"default": {
        "ENGINE": "greenpool.django", "NAME": "postgres", "USER": cluster.user,
        "PASSWORD": cluster.password, "HOST": cluster.host, "PORT": cluster.port,
        "OPTIONS": {"connection_count": SIZE, "timeout": TIMEOUT, "connect_timeout": 2,
                    "greenpool": {"type": MODE, "application_name": APP_NAME,
                                  "quarantine_initial": 0.1, "quarantine_max": 0.5},
                    **options}}}
    return ConnectionHandler(settings)


def test_terminated_backend_mid_request(pools: Any, pg: Cluster) -> None:
    from django.db import OperationalError, connection

    pid = backend_pid()
    with pytest.raises(OperationalError), connection.cursor() as cursor:
        pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        cursor.execute("SELECT 1")
    connection.close()
    assert group_stats(pools)["in_use"] == 0
    assert backend_pid() != pid
    connection.close()


def test_server_stopped_immediately_mid_atomic(pools: Any, pg_factory: Any) -> None:
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


def test_timeout_while_waiting_for_a_full_pool_loses_no_slot(pools: Any) -> None:
    if MODE != "gevent":
        pytest.skip("gevent.Timeout")
    import gevent
    import gevent.event
    from django.db import connection
    from django_site import SIZE

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


def test_a_stopped_backend_cannot_hold_a_request_past_its_statement_timeout(
    pools: Any, pg_factory: Any
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
    pools: Any, pg_factory: Any
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


def test_a_commit_to_a_stopped_backend_is_bounded_too(pools: Any, pg_factory: Any) -> None:
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


def test_wrong_password_not_in_error(pools: Any, pg: Cluster) -> None:
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


@pytest.mark.parametrize("bad", [{"PORT": "not-a-port"}, {"OPTIONS": {"connect_timeout": -1}},
                                 {"OPTIONS": {"sslmode": "sometimes"}}])
def test_bad_settings_never_show_the_password(pools: Any, bad: dict[str, Any]) -> None:
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

