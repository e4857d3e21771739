"""The group's ``configure`` hook: setup made per connection, run when it opens and again
after each reset, so ``DISCARD ALL`` does not wipe it."""

from __future__ import annotations

from typing import Any

import pytest
from modes import MODE

from greenpool import ConnectFailed


def set_path(raw: Any) -> None:
    with raw.cursor() as cur:
        cur.execute("SET search_path TO greenpool_cf, public")


@pytest.mark.parametrize("autocommit", [True, False])
def test_setup_survives_the_reset(make_pool: Any, autocommit: bool) -> None:
    calls: list[int] = []

    def hook(raw: Any) -> None:
        calls.append(raw.get_backend_pid())
        set_path(raw)

    pool = make_pool({"g": {"connection_count": 1, "autocommit": autocommit,
                            "configure": hook}})
    with pool.handler("g") as db:
        assert db.query_one("SHOW search_path")[0] == "greenpool_cf, public"
        db.execute("SET search_path TO elsewhere")  # a dirty loan: DISCARD ALL on return
    with pool.handler("g") as db:
        assert db.query_one("SHOW search_path")[0] == "greenpool_cf, public"
        pid = db.query_one("SELECT pg_backend_pid()")[0]
    assert calls == [pid, pid]  # at open, and after the one reset
    with pool.handler("g") as db:  # a clean loan: no reset, no second run
        db.query("SELECT 1")
    assert len(calls) == 2


def test_a_failing_hook_fails_the_connect_and_says_so(make_pool: Any) -> None:
    def hook(raw: Any) -> None:
        raise RuntimeError("no")

    pool = make_pool({"g": {"configure": hook, "timeout": 1}})
    with pytest.raises(ConnectFailed, match="configure hook failed"), pool.handler("g"):
        pass


def test_a_connection_lost_under_the_hook_is_retried_not_taken_for_a_refusal(
        make_pool: Any) -> None:
    """The server ends the session while the hook runs (a crash, a shutdown, a terminated
    backend): that is a lost connection, retried like any failed connect, not a hook that
    refuses the group (which would fail every caller at once and leave the server alone
    for the group's pause)."""
    terminated: list[int] = []

    def hook(raw: Any) -> None:
        if not terminated:
            terminated.append(raw.get_backend_pid())
            with raw.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        set_path(raw)

    pool = make_pool({"g": {"connection_count": 1, "configure": hook, "timeout": 10}})
    with pool.handler("g") as db:
        assert db.query_one("SHOW search_path")[0] == "greenpool_cf, public"
        assert db.query_one("SELECT pg_backend_pid()")[0] != terminated[0]
    endpoint = next(iter(pool.stats()["endpoints"].values()))
    assert endpoint["connect_errors"] == 1 and not endpoint["last_error"].startswith(
        "the group's configure hook failed"), endpoint


def test_a_hook_whose_own_remote_connect_fails_is_a_refusal_not_a_lost_connection(
        make_pool: Any, pg_factory: Any) -> None:
    """A hook whose statement fails with a connection-class SQLSTATE of its own (dblink to a
    server that is not there: 08001) on a session that is fine: the hook failed, a refusal
    of the group said at once, not a lost connection retried until the caller's time ends."""
    from greenpool.testing.postgres import free_port

    cluster = pg_factory()
    cluster.execute("CREATE EXTENSION dblink")
    nowhere = f"host=127.0.0.1 port={free_port()} dbname=postgres connect_timeout=2"

    def hook(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("SELECT dblink_connect(%s)", (nowhere,))

    pool = make_pool({"g": {"configure": hook, "timeout": 3}}, db=cluster.endpoint())
    with pytest.raises(ConnectFailed, match="configure hook failed"), pool.handler("g"):
        pass


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
def test_a_hook_cut_short_by_the_callers_time_leaves_a_healthy_server_alone(pg: Any) -> None:
    """``non-threaded`` connects inline, within the caller's time. A hook slower than what
    is left of it is cut by the caller, not by the server: no verdict on the server (it is
    not quarantined, nor the group refused): the caller's time ran out, nothing more."""
    from greenpool import Pool, PoolTimeout

    def hook(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.5)")

    pool = Pool({"type": "non-threaded", "db": pg.endpoint(),
                 "groups": {"g": {"configure": hook}}})
    try:
        with pytest.raises(PoolTimeout), pool.handler("g", timeout=0.1):
            pass
        endpoint = next(iter(pool.stats()["endpoints"].values()))
        assert endpoint["state"] == "up" and endpoint["quarantines"] == 0, endpoint
        assert endpoint["connect_errors"] == 0, endpoint
    finally:
        pool.close()


def test_the_key_takes_a_function_only() -> None:
    from greenpool import ConfigError, parse_config

    with pytest.raises(ConfigError, match="configure"):
        parse_config({"db": {"host": "h"}, "groups": {"g": {"configure": "SET x = 1"}}})


@pytest.mark.skipif(MODE not in ("gevent", "eventlet"),
                    reason="pool.close() ends a connect task only in the green modes")
@pytest.mark.timeout(30)
def test_a_connect_ended_inside_the_configure_hook_ends_its_session_without_a_collection(
        make_pool, server_conns):
    """The pool is closed while a new connection's ``configure`` hook waits on something
    other than the server (a call to another service): the connect task is killed, and its
    session ends at once, not at the next garbage collection (the exception's traceback
    holds the connection). Collections are off in this test."""
    import gc

    from modes import sleep, wait_until

    from greenpool import PoolTimeout

    hooked: list[Any] = []

    def configure(raw: Any) -> None:
        hooked.append(raw)
        sleep(10)

    pool = make_pool({"g": {"connection_count": 1, "configure": configure}},
                     application_name="configure-killed")
    collecting = gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(PoolTimeout):
            pool.group("g").acquire(timeout=0.3)
        wait_until(lambda: bool(hooked), 5, "the hook to run")
        hooked.clear()  # the test holds no reference to the connection
        assert server_conns(application_name="configure-killed") == 1
        pool.close()
        assert server_conns(application_name="configure-killed", expect=0, timeout=2) == 0
    finally:
        if collecting:
            gc.enable()
