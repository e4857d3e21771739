"""The group's ``configure`` hook: setup made per connection, run when it opens and again
after each reset, so ``DISCARD ALL`` does not wipe it."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from modes import MODE, join_all, sleep, spawn

from greenpool import ConnectFailed, NoHealthyEndpoint


def _borrow(pool: Any, group: str) -> BaseException | None:
    try:
        with pool.handler(group):
            return None
    except Exception as exc:
        return exc


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
        "group 'g''s configure hook failed"), endpoint


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


def test_a_hook_that_meets_a_lock_is_tried_again_not_taken_for_a_refusal(
        make_pool: Any, pg: Any) -> None:
    """The hook waits on a lock another session holds and gives up (``lock_timeout``:
    SQLSTATE 55P03). That is a failure of the moment: the group tries again after a backoff
    and the caller gets its connection, instead of a refusal that fails every caller at
    once with "retrying cannot help" for the group's whole pause. The server is not
    quarantined (it answered)."""
    holder = pg.connect()
    holder.autocommit = False
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(7301)")
    calls: list[str] = []

    def hook(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("SET lock_timeout = '50ms'")
            try:
                cur.execute("SELECT pg_advisory_xact_lock(7301)")
            except Exception as exc:
                calls.append(type(exc).__name__)
                holder.rollback()  # the lock is free for the next attempt
                raise
            calls.append("locked")

    try:
        pool = make_pool({"g": {"connection_count": 1, "configure": hook, "timeout": 10}})
        with pool.handler("g") as db:
            assert db.query_one("SELECT 1") == (1,)
    finally:
        holder.close()
    assert calls == ["LockNotAvailable", "locked"]
    endpoint = next(iter(pool.stats()["endpoints"].values()))
    assert endpoint["quarantines"] == 0 and endpoint["state"] == "up", endpoint
    assert "configure hook failed (LockNotAvailable, SQLSTATE 55P03)" in endpoint["last_error"]


def test_a_hook_that_gets_no_answer_sets_back_its_own_group_not_the_server(
        make_pool: Any, pg: Any) -> None:
    """One group's hook outlasts ``connect_timeout`` (it sleeps on the server). Its callers
    are told why when their time runs out; the server, which answered the connect, is not
    quarantined: another group without the hook borrows from it at once."""
    from greenpool import NoHealthyEndpoint

    def hook(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("SELECT pg_sleep(5)")

    pool = make_pool({"slow": {"connection_count": 1, "configure": hook, "timeout": 1.5},
                      "plain": {"connection_count": 1, "timeout": 5}},
                     db=pg.endpoint(connect_timeout=0.4))
    with pytest.raises(NoHealthyEndpoint, match="configure hook got no answer"), \
            pool.handler("slow"):
        pass
    endpoint = next(iter(pool.stats()["endpoints"].values()))
    assert endpoint["quarantines"] == 0 and endpoint["state"] == "up", endpoint
    with pool.handler("plain", timeout=0.5) as db:
        assert db.query_one("SELECT 1") == (1,)


def _locked_out(holder: Any, runs: list[tuple[float, float]]) -> Any:
    """A hook that waits 20 ms for an advisory lock ``holder`` keeps, and gives up
    (``lock_timeout``: SQLSTATE 55P03, a failure of the moment); ``runs`` gets each run's
    (start, end)."""
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(7302)")

    def hook(raw: Any) -> None:
        started = time.monotonic()
        try:
            with raw.cursor() as cur:
                cur.execute("SET lock_timeout = '20ms'")
                cur.execute("SELECT pg_advisory_xact_lock(7302)")
        finally:
            runs.append((started, time.monotonic()))

    return hook


def test_after_a_setback_one_connect_of_the_group_tries_again_not_every_waiter(
        make_pool: Any, pg: Any) -> None:
    """Six callers wait on a group whose hook keeps meeting a lock. Once the setback's pause
    is over, one connect tries again while the group's other connect tasks keep away (as
    one prober does for a quarantined server): the tries never overlap and each comes a
    setback's pause after the one before, instead of every waiter logging in at once to
    fail the same way."""
    holder = pg.connect()
    holder.autocommit = False
    runs: list[tuple[float, float]] = []
    try:
        pool = make_pool({"g": {"connection_count": 6, "configure": _locked_out(holder, runs),
                                "timeout": 1.5}}, quarantine_initial=0.2)
        tasks = [spawn(_borrow, pool, "g") for _ in range(6)]
        join_all(tasks, 15)
    finally:
        holder.close()
    assert all(isinstance(task.result, NoHealthyEndpoint) for task in tasks), [
        repr(task.result) for task in tasks]
    first_verdict = min(end for _, end in runs)
    retries = sorted(run for run in runs if run[0] > first_verdict)
    assert len(retries) >= 2, runs
    for (_, end), (start, _) in itertools.pairwise(retries):
        assert start - end >= 0.15, f"a retry {start - end:.3f} s after the one before: {runs}"
    endpoint = next(iter(pool.stats()["endpoints"].values()))
    assert endpoint["quarantines"] == 0 and endpoint["state"] == "up", endpoint


def test_once_the_lock_is_free_every_waiting_caller_connects_without_waiting_out_the_retry(
        make_pool: Any, pg: Any) -> None:
    """Six callers wait (each keeps its loan) while the hook meets a lock; the lock is
    freed. The connect that tries again succeeds, and the group's other connects follow at
    once: they do not wait out the bound of that retry (``connect_timeout``, 5 s)."""
    holder = pg.connect()
    holder.autocommit = False
    got: list[float] = []

    def borrow(pool: Any) -> None:
        with pool.handler("g"):
            got.append(time.monotonic())
            sleep(3)

    try:
        pool = make_pool({"g": {"connection_count": 6, "configure": _locked_out(holder, []),
                                "timeout": 10}}, quarantine_initial=0.2)
        tasks = [spawn(borrow, pool) for _ in range(6)]
        sleep(0.5)
        holder.rollback()
        freed = time.monotonic()
        join_all(tasks, 20)
    finally:
        holder.close()
    assert len(got) == 6 and max(got) - freed < 2.5, [round(t - freed, 2) for t in got]


def test_a_burst_of_callers_meeting_one_held_lock_is_one_setback_not_one_per_caller(
        make_pool: Any, pg: Any) -> None:
    """Eight callers of a group come at once to a warm server (its slow start is over: all
    eight connect together) while the hook's lock is held; the lock is freed soon after.
    Those eight failures of one moment are one setback: the group connects again after
    about a first backoff, not after a pause doubled once per caller (here 20 s, the
    longest)."""
    holder = pg.connect()
    holder.autocommit = False
    runs: list[tuple[float, float]] = []
    try:
        pool = make_pool({"g": {"connection_count": 8, "configure": _locked_out(holder, runs),
                                "timeout": 0.5},
                          "warm": {"connection_count": 8}},
                         quarantine_initial=0.2, quarantine_max=20)
        warm = pool.group("warm")
        held = [warm.acquire() for _ in range(8)]  # successes end the endpoint's slow start
        for pc in held:
            warm.release(pc)
        tasks = [spawn(_borrow, pool, "g") for _ in range(8)]
        join_all(tasks, 15)
    finally:
        holder.close()  # the lock is free
    first_verdict = min(end for _, end in runs)
    assert sum(1 for start, _ in runs if start < first_verdict) >= 4, runs  # a burst
    started = time.monotonic()
    with pool.handler("g", timeout=5) as db:
        assert db.query_one("SELECT 1") == (1,)
    assert time.monotonic() - started < 2.5


def test_callers_are_told_their_own_groups_hook_failure_not_another_groups(
        make_pool: Any, pg: Any) -> None:
    """Two groups share an endpoint. Group ``locked``'s hook keeps meeting a lock; group
    ``broken``'s raises, last. A caller of ``locked`` whose time runs out is told of its
    own group's failure (the endpoint's last error is the other group's, and the caller's
    group was set back: no connect of its own came since)."""
    holder = pg.connect()
    holder.autocommit = False

    def broken(raw: Any) -> None:
        raise RuntimeError("no")

    try:
        pool = make_pool({"locked": {"connection_count": 1, "timeout": 1,
                                     "configure": _locked_out(holder, [])},
                          "broken": {"connection_count": 1, "configure": broken}},
                         quarantine_initial=10)  # the setback lasts the whole test
        with pytest.raises(NoHealthyEndpoint), pool.handler("locked"):
            pass
        with pytest.raises(ConnectFailed), pool.handler("broken"):
            pass
        with pytest.raises(NoHealthyEndpoint) as caught, pool.handler("locked", timeout=0.1):
            pass
    finally:
        holder.close()
    endpoint = next(iter(pool.stats()["endpoints"].values()))
    assert "group 'broken'" in endpoint["last_error"], endpoint
    assert "group 'locked''s configure hook failed (LockNotAvailable, SQLSTATE 55P03)" in str(
        caught.value)


def test_a_refused_hook_replaced_by_reconfigure_is_tried_at_once(make_pool: Any, pg: Any,
                                                                  mode: str) -> None:
    """The hook raises: a refusal of the group, retrying cannot help, "fix the
    configuration". ``reconfigure()`` with a working hook is that fix: the next caller
    connects at once, instead of meeting the old refusal for the rest of its pause."""
    def broken(raw: Any) -> None:
        raise RuntimeError("no")

    config: dict[str, Any] = {"type": mode, "db": pg.endpoint(),
                              "groups": {"g": {"connection_count": 1, "configure": broken}}}
    pool = make_pool(config["groups"])
    with pytest.raises(ConnectFailed), pool.handler("g"):
        pass
    pool.reconfigure({**config, "groups": {"g": {"connection_count": 1, "configure": set_path}}})
    with pool.handler("g", timeout=5) as db:
        assert db.query_one("SHOW search_path")[0] == "greenpool_cf, public"


def test_a_best_effort_hook_that_swallows_its_deadline_sets_back_its_group_not_the_server(
        make_pool: Any, pg: Any) -> None:
    """A hook that logs and ignores its own errors runs a query that outlasts
    ``connect_timeout``: the deadline cuts it (closing the connection) and the hook goes on.
    That is its group's hook getting no answer in time, as when it lets the interruption
    through, not a lost connection: the server is not quarantined, and another group keeps
    its idle connection there."""
    swallowed: list[str] = []

    def hook(raw: Any) -> None:
        try:
            with raw.cursor() as cur:
                cur.execute("SELECT pg_sleep(5)")
        except Exception as exc:
            swallowed.append(type(exc).__name__)

    pool = make_pool({"best_effort": {"connection_count": 1, "configure": hook, "timeout": 1},
                      "plain": {"connection_count": 1}},
                     db=pg.endpoint(connect_timeout=0.3))
    with pool.handler("plain") as db:
        db.query("SELECT 1")
    with pytest.raises(NoHealthyEndpoint, match="configure hook got no answer"), \
            pool.handler("best_effort"):
        pass
    assert swallowed
    stats = pool.stats()
    endpoint = next(iter(stats["endpoints"].values()))
    assert endpoint["quarantines"] == 0 and endpoint["state"] == "up", endpoint
    assert stats["groups"]["plain"]["idle"] == 1 and not stats["groups"]["plain"]["discards"]


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


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
def test_a_non_threaded_group_spreading_its_connects_leaves_a_refusing_endpoint_alone(
        pg: Any, pg_factory: Any) -> None:
    """``non-threaded`` spreads a group's connects to an endpoint it has no connection on,
    a look a second. The hook refuses the second endpoint for good (it raises there): the
    group leaves it alone for its pause, borrowing from the first, instead of connecting
    to it again at each look to fail the same way."""
    from greenpool import Pool

    other = pg_factory()

    def hook(raw: Any) -> None:
        if raw.info.port == other.port:
            raise RuntimeError("not there")

    pool = Pool({"type": "non-threaded", "db": [pg.endpoint(), other.endpoint()],
                 "groups": {"g": {"connection_count": 4, "configure": hook}}})
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # two looks or more after the refusal
            with pool.handler("g") as db:
                assert db.query_one("SELECT inet_server_port()") == (pg.port,)
            time.sleep(0.01)
        refusing = next(stats for label, stats in pool.stats()["endpoints"].items()
                        if f":{other.port}/" in label)
        assert refusing["connect_attempts"] == 1, refusing
    finally:
        pool.close()


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
def test_the_hooks_commit_is_bounded_by_what_the_hook_left_of_the_callers_time(pg: Any) -> None:
    """The hook's transaction is committed for it, and its COMMIT runs a deferred trigger
    that takes 2 s. ``non-threaded`` connects within the caller's time (1 s): the hook took
    half of it, the COMMIT gets the other half, not a whole bound of its own again (the
    caller waited 1.5 s)."""
    from greenpool import Pool, PoolTimeout

    pg.execute("CREATE TABLE IF NOT EXISTS greenpool_cf_slow_commit (id int)")
    pg.execute("CREATE OR REPLACE FUNCTION greenpool_cf_sleep() RETURNS trigger LANGUAGE plpgsql"
               " AS $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$")
    pg.execute("DROP TRIGGER IF EXISTS greenpool_cf_slow ON greenpool_cf_slow_commit")
    pg.execute("CREATE CONSTRAINT TRIGGER greenpool_cf_slow AFTER INSERT ON"
               " greenpool_cf_slow_commit DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
               " EXECUTE FUNCTION greenpool_cf_sleep()")

    def hook(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.5)")
            cur.execute("INSERT INTO greenpool_cf_slow_commit VALUES (1)")

    pool = Pool({"type": "non-threaded", "db": pg.endpoint(),
                 "groups": {"g": {"configure": hook}}})
    try:
        started = time.monotonic()
        with pytest.raises(PoolTimeout), pool.handler("g", timeout=1):
            pass
        assert time.monotonic() - started < 1.3
    finally:
        pool.close()
        pg.execute("DROP TABLE greenpool_cf_slow_commit")
        pg.execute("DROP FUNCTION greenpool_cf_sleep()")


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
