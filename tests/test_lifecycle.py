"""Lifetime, idle retirement, warm-up, stats, and fork safety."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
from forking import fork_a_bystander, run_in_forked_child
from modes import GREEN, MODE, join_all, sleep, spawn, wait_until

STATS_KEYS = {
    "size", "max_size", "idle", "in_use", "connecting", "waiting", "acquires", "waits",
    "wait_time", "timeouts", "connects", "connect_errors", "discards", "discards_by_reason",
}


def test_stats_report_every_documented_key(make_pool):
    pool = make_pool({"g": {"connection_count": 3}})
    with pool.handler("g") as db:
        db.query("SELECT 1")
        inside = pool.stats()["groups"]["g"]
    after = pool.stats()
    assert set(inside) >= STATS_KEYS
    assert inside["in_use"] == 1 and inside["size"] == 1 and inside["acquires"] == 1
    assert after["groups"]["g"]["idle"] == 1 and after["groups"]["g"]["in_use"] == 0
    (endpoint,) = after["endpoints"].values()
    assert endpoint["connects"] == 1 and endpoint["last_error"] is None


def test_max_lifetime_replaces_old_connections(make_pool):
    pool = make_pool({"g": {"connection_count": 1, "max_lifetime": 1.0}})
    with pool.handler("g") as db:
        first = db.connection.get_backend_pid()
    group = pool.group("g")
    (pc,) = list(group._idle)
    assert 0.85 <= pc.expires - pc.created <= 1.0  # jittered by at most 10 %
    pc.expires = pc.created  # age it instead of sleeping for the lifetime
    with pool.handler("g") as db:
        assert db.connection.get_backend_pid() != first
    assert group.stats()["discards_by_reason"] == {"max_lifetime": 1}


@pytest.mark.skipif(MODE not in ("gevent", "threaded", "eventlet"), reason="needs housekeeping")
def test_housekeeping_retires_idle_connections_down_to_min_size(make_pool):
    pool = make_pool(
        {"g": {"connection_count": 4, "min_size": 1, "max_idle": 0.3}},
        maintenance_interval=0.05,
    )
    group = pool.group("g")
    wait_until(lambda: group.stats()["idle"] == 1, 5, "warm-up to min_size")
    held = [group.acquire() for _ in range(4)]
    for pc in held:
        group.release(pc)
    assert group.stats()["idle"] == 4
    wait_until(lambda: group.stats()["size"] == 1, 5, "idle connections retired")
    assert group.stats()["discards_by_reason"].get("max_idle") == 3


def test_housekeeping_drops_idle_connections_whose_server_ended_them(make_pool, pg):
    app = "gp-housekeeping"
    pool = make_pool({"g": {"connection_count": 2}}, application_name=app,
                     maintenance_interval=0.05)
    group = pool.group("g")
    held = [group.acquire() for _ in range(2)]
    for pc in held:
        group.release(pc)
    pg.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
               "WHERE application_name = %s", (app,))
    wait_until(lambda: group.stats()["size"] == 0, 5, "dead idle connections dropped")
    assert group.stats()["discards"] == 2


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_fork_child_never_uses_the_parents_connections(make_pool):
    pool = make_pool({"g": {"connection_count": 2}})
    group = pool.group("g")
    held = [group.acquire() for _ in range(2)]
    parent_pids = {pc.raw.get_backend_pid() for pc in held}
    for pc in held:
        group.release(pc)

    def in_child() -> int:  # the backend the child gets
        with pool.handler("g") as db:
            return int(db.query("SELECT pg_backend_pid()")[0][0])

    assert int(run_in_forked_child(in_child)) not in parent_pids
    # the parent's sessions survived the child's exit: the same backends still answer
    with pool.handler("g") as db:
        assert db.query("SELECT pg_backend_pid()")[0][0] in parent_pids
    assert group.stats()["discards"] == 0
    assert GREEN or MODE == "threaded"


def test_startup_waits_for_one_live_endpoint_per_group_and_ignores_dead_ones(pg, mode,
                                                                             blackhole):
    """Degraded, not fatal: a dead endpoint does not hold up startup; no live one fails it."""
    import time

    from greenpool import NoHealthyEndpoint, Pool

    dead = dict(blackhole.endpoint(), connect_timeout=0.3)
    pool = Pool({"type": mode, "db": [dead, pg.endpoint()], "startup_timeout": 5,
                 "groups": {"g": {"connection_count": 2}}})
    try:
        stats = pool.stats()
        assert stats["groups"]["g"]["idle"] == 1  # opened and kept by the startup wait
        assert stats["endpoints"][f"127.0.0.1:{pg.port}/postgres"]["open"] == 1
    finally:
        pool.close()
    # each attempt is bounded by connect_timeout alone (libpq's, at least 2 s, in threaded
    # mode), so the startup wait must outlast one attempt to know that it failed
    startup = 3 if mode == "threaded" else 1
    started = time.monotonic()
    with pytest.raises(NoHealthyEndpoint):
        Pool({"type": mode, "db": [dead], "startup_timeout": startup, "groups": {"g": {}}})
    assert time.monotonic() - started < startup + 0.4


def test_a_connection_held_past_the_leak_threshold_is_reported_once(make_pool, caplog):
    import inspect

    pool = make_pool({"g": {"leak_threshold": 0.1}}, maintenance_interval=0.02)
    with caplog.at_level("WARNING", logger="greenpool"):
        with pool.handler("g") as db:
            line = inspect.currentframe().f_lineno - 1  # the `with` line above took it
            db.query("SELECT 1")
            wait_until(lambda: "held for" in caplog.text, 5, "the leak warning")
            sleep(0.1)  # a few more housekeeping rounds: the warning must not repeat
        with pool.handler("g"):  # a short loan afterwards: no warning
            pass
        sleep(0.2)
    leaks = [r for r in caplog.records if "held for" in r.getMessage()]
    assert len(leaks) == 1
    assert f"test_lifecycle.py:{line} in " in leaks[0].getMessage()


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_fork_while_a_connection_is_being_reset_gives_the_child_none_of_it(make_pool):
    """A connection in transit at fork time (its ROLLBACK on return is
    stuck on a backend stopped with SIGSTOP) is never used by the child, and the child's
    counts stay within connection_count; the parent finishes the reset once the backend
    resumes, with its accounting intact."""
    import signal

    pool = make_pool({"g": {"connection_count": 1, "timeout": 5}})
    group = pool.group("g")
    pc = group.acquire()
    with pc.raw.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")  # opens a transaction: return must roll back
        parent_pid = cursor.fetchone()[0]
    os.kill(parent_pid, signal.SIGSTOP)
    try:
        returning = spawn(group.release, pc)
        wait_until(lambda: group.stats()["in_use"] == 0, 5, "the return to start its reset")

        def in_child() -> str:  # the backend the child gets, and its group's size then
            with pool.handler("g") as db:
                pid = db.query("SELECT pg_backend_pid()")[0][0]
            return f"{pid} {group.stats()['size']}"

        reported = run_in_forked_child(in_child).split()
    finally:
        os.kill(parent_pid, signal.SIGCONT)
    join_all([returning], 10)
    child_pid, child_size = int(reported[0]), int(reported[1])
    assert child_pid != parent_pid and child_size == 1
    stats = group.stats()
    assert stats["size"] == stats["idle"] + stats["in_use"] + stats["connecting"] <= 1
    with pool.handler("g") as db:  # the parent's group still works, within its size
        db.query("SELECT 1")
    assert group.stats()["size"] <= 1


def _greenpool_threads(before: set) -> list:
    import threading

    return [t for t in threading.enumerate()
            if t.is_alive() and t not in before and t.name.startswith("greenpool")]


def _sockets_to(port: int) -> int:
    """Established TCP connections to ``port`` on this machine, from the client's side."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except FileNotFoundError:
            continue
    return count


@pytest.mark.timeout(30)
def test_a_connect_cut_short_closes_its_socket_without_a_garbage_collection(make_pool,
                                                                           blackhole):
    """A connect still waiting when the pool is closed (its task killed in the green modes,
    its deadline passing in the blocking ones) closes its socket at once: the exception's
    traceback holds the half-open connection until a garbage collection, which may never
    come soon, and meanwhile the server keeps the session waiting for authentication (a
    minute by default; ``DROP DATABASE`` waits for it). Collections are off in this test."""
    import gc
    import time

    from greenpool import PoolTimeout

    connect_timeout = 2.0
    pool = make_pool({"g": {"connection_count": 1}},
                     db=blackhole.endpoint(connect_timeout=connect_timeout))
    collecting = gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(PoolTimeout):
            pool.group("g").acquire(timeout=0.2)
        assert _sockets_to(blackhole.port) == 1
        pool.close()
        closed_at = time.monotonic()
        within = 0.5 if GREEN else connect_timeout + 1.0
        wait_until(lambda: _sockets_to(blackhole.port) == 0, within,
                   "the cut connect's socket to close")
        assert time.monotonic() - closed_at < within
    finally:
        if collecting:
            gc.enable()


@pytest.mark.skipif(MODE != "threaded", reason="connect threads exist in threaded mode only")
@pytest.mark.timeout(60)
def test_threaded_close_leaves_no_connect_thread_behind_and_connects_nothing_later(
    pg_factory, server_conns
):
    """A threaded pool whose only server is down: its ``min_size`` refill thread failed,
    the endpoint is quarantined for 3 s and the thread sleeps out that backoff. ``close()``
    ends it promptly: within 1 s no thread of the pool is alive, and when the server comes
    back right after the close, no session of the pool ever logs in to it."""
    import threading
    import time

    from greenpool import Pool

    server = pg_factory(settings={"log_connections": True})  # every login is in its log
    server.stop("immediate")
    app = "gp-closed-threads"
    before = set(threading.enumerate())
    pool = Pool({"type": "threaded", "db": server.endpoint(), "application_name": app,
                 "quarantine_initial": 3, "quarantine_max": 3, "maintenance_interval": 0.05,
                 "groups": {"g": {"connection_count": 2, "min_size": 1}}})
    try:
        label = f"{server.host}:{server.port}/{server.dbname}"
        wait_until(lambda: pool.stats()["endpoints"][label]["state"] == "quarantined"
                   and pool.stats()["groups"]["g"]["connecting"] == 1, 10,
                   "the refill to fail and wait out the quarantine")
        until = time.monotonic() + 3.5  # past the quarantine the sleeping thread waits out
    finally:
        pool.close()
    closed_at = time.monotonic()
    server.start()
    left = _greenpool_threads(before)
    while left and time.monotonic() - closed_at < 1.0:
        time.sleep(0.02)
        left = _greenpool_threads(before)
    # nothing to wait on for an absence: outlast the backoff a leftover thread sleeps out
    time.sleep(max(0.0, until + 1.0 - time.monotonic()))
    logged_in = server.logfile.read_text(errors="replace").count(f"application_name={app}")
    logged_in += server_conns(application_name=app, cluster=server)
    assert (len(left), logged_in) == (0, 0), (
        f"{len(left)} thread(s) of the pool alive 1 s after close(); {logged_in} session(s) "
        f"of the closed pool logged in afterwards")


@pytest.mark.skipif(MODE != "threaded", reason="connect threads exist in threaded mode only")
@pytest.mark.timeout(120)
def test_threaded_close_stops_a_connect_between_endpoints(pg_factory, blackhole):
    """A threaded group over a black hole and a real server (``connect_timeout`` 1 each):
    a borrow with 0.2 s to spare fails while its connect thread waits on the black hole,
    then the pool is closed. When that attempt times out, the thread must not go on to the
    real server: once every thread of the pool has ended, no session of the closed pool has
    logged in. Several fresh pools (where a fresh group connects first varies); at least
    three of them must have met the black hole first."""
    import threading
    import time

    from greenpool import Pool, PoolTimeout

    server = pg_factory(settings={"log_connections": True})  # every login is in its log

    def logins(app: str) -> int:
        return server.logfile.read_text(errors="replace").count(f"application_name={app}")

    checked, late = 0, []
    for trial in range(15):
        if checked == 4:
            break
        app = f"gp-close-between-endpoints-{trial}"
        before = set(threading.enumerate())
        pool = Pool({"type": "threaded", "application_name": app,
                     "db": [blackhole.endpoint(connect_timeout=1),
                            server.endpoint(connect_timeout=1)],
                     "groups": {"g": {"connection_count": 2}}})
        try:
            pool.group("g").acquire(timeout=0.2)
        except PoolTimeout:
            pass
        else:
            pool.close()  # the connect went to the server first: nothing to check here
            continue
        pool.close()
        at_close = logins(app)
        deadline = time.monotonic() + 5
        while _greenpool_threads(before) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _greenpool_threads(before), "a connect thread outlived its connect_timeout"
        after = logins(app)
        checked += 1
        if after > at_close:
            late.append(f"pool {trial}: {after - at_close} login(s) after close()")
    assert checked >= 3, f"only {checked} of the fresh pools met the black hole first"
    assert not late, late


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
@pytest.mark.timeout(120)
def test_fork_during_a_connects_role_query_leaves_the_parents_session_alone(
    make_pool, pg_factory
):
    """A ``role: 'primary'`` group over a primary (reached through a proxy that holds the
    role query a connect sends first for 1.5 s) and its standby. The process forks while a
    borrow's connect waits for that answer; the child lives on for 3 s (in the green modes
    with its copy of the connect task). The parent's connect completes, and the connection
    it lends still answers after the child's life. Three fresh pools."""
    from delayproxy import DelayProxy

    from greenpool.roles import PROBE_SQL

    mark = "pg_is_in_recovery"
    assert mark in PROBE_SQL
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    with DelayProxy(primary.port, 1.5, mark.encode()) as proxy:
        for trial in range(3):
            pool = make_pool({"w": {"role": "primary", "connection_count": 2}},
                             db=[proxy.endpoint(primary, connect_timeout=2),
                                 standby.endpoint(connect_timeout=2)],
                             role_check_interval=3600)
            group = pool.group("w")
            held_before = proxy.held()
            taker = spawn(group.acquire, 8)
            wait_until(lambda h=held_before: proxy.held() > h, 10,
                       "a connect to send its role query through the proxy")
            child = fork_a_bystander(3)  # it outlives the held answer
            join_all([taker], 10)
            _, status = os.waitpid(child, 0)
            assert status == 0
            assert taker.error is None, f"pool {trial + 1}: {taker.error!r}"
            pc = taker.result
            try:
                with pc.raw.cursor() as cursor:
                    cursor.execute("SELECT inet_server_port(), pg_is_in_recovery()")
                    assert cursor.fetchone() == (primary.port, False), f"pool {trial + 1}"
            finally:
                group.release(pc)
            # the parent's connect never failed; the only discards are of the standby the
            # group explored meanwhile (a connect there, or a probe or promotion watch of it)
            stats = group.stats()
            assert stats["connect_errors"] == 0, stats
            assert set(stats["discards_by_reason"]) <= {"wrong_role", "probe"}, stats
            pool.close()


# --- a fork while a connection is in flight ------------------------------------------------


def consistent(stats: dict) -> bool:
    return (stats["size"] == stats["idle"] + stats["in_use"] + stats["connecting"]
            and min(stats["size"], stats["idle"], stats["in_use"], stats["connecting"]) >= 0)


@pytest.mark.skipif(MODE != "gevent", reason="greenlets are copied into a forked child")
@pytest.mark.timeout(60)
def test_fork_during_a_housekeeping_ping_never_lends_the_parents_session(make_pool, pg):
    """Housekeeping pings an idle min_size connection it took out of the idle list (neither
idle nor lent) when the process forks. The child's copy of the upkeep task must not finish
that ping on the shared socket and put the PARENT's connection into the child's idle list:
the child lends a session of its own, its stats add up, and the parent's own ping gets its
reply and discards nothing."""
    from gevent import monkey

    real_sleep = monkey.get_original("time", "sleep")
    pool = make_pool({"g": {"connection_count": 1, "min_size": 1, "max_idle": 1.0}},
                     db=pg.endpoint(connect_timeout=3), maintenance_interval=0.1)
    group = pool.group("g")
    pc = group.acquire(timeout=5)
    parent_backend = pc.raw.get_backend_pid()
    group.release(pc)
    os.kill(parent_backend, signal.SIGSTOP)  # the next ping waits for its reply
    try:
        wait_until(lambda: group.stats()["idle"] == 0, 3, "housekeeping to ping it")
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            code = 1
            try:
                os.close(read_end)
                sleep(1.0)
                with pool.handler("g", timeout=3) as db:
                    backend = db.query_one("SELECT pg_backend_pid()")[0]
                report = {"backend": backend, **group.stats()}
                os.write(write_end, json.dumps(report, default=str).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
    finally:
        os.kill(parent_backend, signal.SIGCONT)
    real_sleep(0.5)  # the parent's hub is busy for a moment: the child's copy reads first
    _, status = os.waitpid(child, 0)
    report = json.loads(os.read(read_end, 65536).decode())
    os.close(read_end)
    wait_until(lambda: group.stats()["idle"] == 1, 5, "the parent's ping to end")
    assert status == 0
    assert report["backend"] != parent_backend, report
    assert consistent(report), report
    assert group.stats()["discards"] == 0, group.stats()


def _unpatched_sleep() -> Callable[[float], None]:
    """``time.sleep`` as it was before the green mode patched it: it holds the hub."""
    if MODE == "gevent":
        from gevent import monkey

        return monkey.get_original("time", "sleep")  # type: ignore[no-any-return]
    from eventlet import patcher

    return patcher.original("time").sleep  # type: ignore[no-any-return]


@pytest.mark.skipif(not GREEN, reason="green tasks are copied into a forked child")
@pytest.mark.timeout(60)
def test_fork_during_a_connect_leaves_the_parents_handshake_to_the_parent(make_pool, pg):
    """A background connect is in flight when the process forks (the postmaster is stopped
with SIGSTOP, so the startup reply is pending). The child's copy of the connect task
must not read the parent's handshake off the shared socket: the parent's connect
succeeds, and its healthy server is not quarantined."""
    real_sleep = _unpatched_sleep()
    pool = make_pool({"g": {"connection_count": 1, "timeout": 10}},
                     db=pg.endpoint(connect_timeout=4), maintenance_interval=0.1)
    group = pool.group("g")
    postmaster = pg.pid
    assert postmaster is not None
    os.kill(postmaster, signal.SIGSTOP)  # the TCP handshake completes; the reply waits
    try:
        borrower = spawn(group.acquire)
        wait_until(lambda: group.stats()["connecting"] == 1, 3, "the connect to start")
        sleep(0.2)  # the startup packet is sent: the task waits for the reply
        child = os.fork()
        if child == 0:
            try:
                sleep(1.5)  # the child's hub runs the copied connect task
            finally:
                os._exit(0)
    finally:
        os.kill(postmaster, signal.SIGCONT)
    real_sleep(0.8)  # the parent's hub is held: the child's copy would read first
    _, status = os.waitpid(child, 0)
    join_all([borrower], 8)
    assert borrower.error is None, borrower.error
    pc = borrower.result
    try:
        with pc.raw.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
    finally:
        group.release(pc)
    assert status == 0
    stats = pool.stats()["endpoints"]
    (endpoint,) = stats.values()
    assert endpoint["state"] == "up" and endpoint["quarantines"] == 0, endpoint
    assert consistent(group.stats()), group.stats()


@pytest.mark.skipif(not GREEN, reason="green tasks are copied into a forked child")
@pytest.mark.timeout(60)
def test_fork_during_the_configure_hook_leaves_the_parents_session_to_the_parent(make_pool,
                                                                                 pg):
    """A new connection's ``configure`` hook runs a statement when the process forks, and
the child runs its copied tasks past the statement's end. The child's copy of the hook
must not read the reply off the shared socket: the parent's connect completes (no connect
error, its healthy server not quarantined)."""
    real_sleep = _unpatched_sleep()

    def configure(raw: Any) -> None:
        with raw.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.5)")

    pool = make_pool({"g": {"connection_count": 1, "timeout": 10, "configure": configure}},
                     db=pg.endpoint(connect_timeout=4))
    group = pool.group("g")
    borrower = spawn(group.acquire)
    wait_until(lambda: pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(0.5)'"
        )[0][0] == 1, 5, "the hook's statement to run")
    child = os.fork()
    if child == 0:
        try:
            sleep(1.5)  # the child's hub runs the copied connect task past the reply
        finally:
            os._exit(0)
    real_sleep(0.8)  # the parent's hub is held: the child's copy would read first
    _, status = os.waitpid(child, 0)
    join_all([borrower], 8)
    assert borrower.error is None, borrower.error
    group.release(borrower.result)
    assert status == 0
    assert group.stats()["connect_errors"] == 0, group.stats()
    (endpoint,) = pool.stats()["endpoints"].values()
    assert endpoint["state"] == "up" and endpoint["quarantines"] == 0, endpoint


@pytest.mark.skipif(not GREEN, reason="green tasks are copied into a forked child")
@pytest.mark.timeout(60)
def test_fork_during_a_poolers_first_query_leaves_the_parents_session_alone(make_pool, pg):
    """An endpoint behind a pooler (``pooler: 'session'``), reached through a proxy that
    holds the first query a connect sends there (the role of the server behind it) for
    1.5 s. The process forks while a borrow's connect waits for that answer; the child lives
    on for 3 s with its copy of the connect task. The parent's connect completes, without a
    connect error."""
    from delayproxy import DelayProxy

    from greenpool.roles import PROBE_SQL

    mark = "pg_is_in_recovery"
    assert mark in PROBE_SQL
    with DelayProxy(pg.port, 1.5, mark.encode()) as proxy:
        pool = make_pool({"g": {"connection_count": 1}},
                         db=proxy.endpoint(pg, connect_timeout=2, pooler="session"))
        group = pool.group("g")
        taker = spawn(group.acquire, 8)
        wait_until(lambda: proxy.held() > 0, 10, "the connect's first query to be held")
        child = fork_a_bystander(3)  # it outlives the held answer
        join_all([taker], 10)
        _, status = os.waitpid(child, 0)
        assert status == 0
        assert taker.error is None, repr(taker.error)
        group.release(taker.result)
        assert group.stats()["connect_errors"] == 0, group.stats()


@pytest.mark.skipif(MODE != "gevent", reason="greenlets are copied into a forked child")
@pytest.mark.timeout(60)
def test_a_forked_child_never_cancels_the_statement_its_parent_is_running(make_pool, pg):
    """A statement runs in one of the parent's greenlets when the process forks, and the
child runs its hub before it exits (as a gevent app's subprocess child can before exec):
the child's copy of that greenlet wakes on the silenced socket and fails there. It must
not send the server a cancel request, which carries the parent's backend key: the
parent's statement runs to its end."""
    from gevent import monkey

    real_sleep = monkey.get_original("time", "sleep")
    pool = make_pool({"g": {"connection_count": 1, "timeout": 5}})
    outcome: list[object] = []

    def long_statement() -> None:
        try:
            with pool.handler("g") as db:
                outcome.append(db.query_one("SELECT pg_sleep(1.0), 'finished'")[1])
        except BaseException as exc:  # recorded for the assertion
            outcome.append(exc)

    task = spawn(long_statement)
    wait_until(lambda: pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(1.0)%'"
        )[0][0] == 1, 5, "the statement to run")
    child = os.fork()
    if child == 0:
        try:
            sleep(0.3)  # the copied greenlet wakes on /dev/null and fails in the child
            real_sleep(0.3)  # a cancel request, if one was started, reaches the server
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    join_all([task], 10)
    assert status == 0
    assert outcome == ["finished"], outcome


@pytest.mark.skipif(MODE != "threaded", reason="non-threaded runs once, in the threaded process")
@pytest.mark.timeout(30)
def test_non_threaded_close_from_a_signal_handler_ends_an_inline_connect_with_pool_closed(
        pg_factory):
    """``non-threaded`` connects inline, in the caller's own loop of attempts and pauses. A
    ``close()`` from a signal handler meanwhile (the server is down, the caller has 5 s)
    ends that loop at its next look with :class:`PoolClosed`, not after the caller's whole
    time with a timeout that blames the endpoints."""
    import time

    from greenpool import Pool, PoolClosed

    server = pg_factory()
    server.stop("immediate")
    pool = Pool({"type": "non-threaded", "db": server.endpoint(), "quarantine_initial": 0.2,
                 "quarantine_max": 0.2, "groups": {"g": {"connection_count": 1}}})
    previous = signal.signal(signal.SIGALRM, lambda *_: pool.close())
    try:
        started = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(PoolClosed), pool.handler("g", timeout=5):
            pass
        took = time.monotonic() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        pool.close()
    assert took < 2, took

