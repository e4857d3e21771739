"""An endpoint's password given as a function: asked at each new connection, bounded, its
failure a connect failure that says so, its value never shown.

Real servers throughout: the password is changed with ALTER ROLE while the pool runs.
"""

from __future__ import annotations

import logging
import uuid

import psycopg2
import pytest
from lending import discards, group_stats, lend_all
from load import Load
from modes import MODE, sleep, wait_until
from psycopg2 import sql as pgsql

from greenpool import Pool, PoolError

pytestmark = pytest.mark.skipif(MODE == "non-threaded", reason="background connects")


def _role(pg, password):
    name = f"rot_{uuid.uuid4().hex[:8]}"
    pg.create_user(name, password)
    return name


def _set_password(pg, user, password):
    pg.execute(pgsql.SQL("ALTER ROLE {} PASSWORD %s").format(pgsql.Identifier(user)),
               (password,))


def _logs_in(pg, user, password):
    try:
        psycopg2.connect(host=pg.host, port=pg.port, dbname="postgres", user=user,
                         password=password, connect_timeout=5).close()
    except psycopg2.OperationalError:
        return False
    return True


@pytest.mark.timeout(90)
def test_password_function_follows_a_rotation_under_load(pg, mode):
    """The role's password changes (ALTER ROLE) while 8 tasks borrow; the function starts
    returning the new one only 0.3 s later, and the pool is drained in between, so new
    connects meet the old password refused for a while. They are retried (the function is
    asked again), not failed: zero application errors, and afterwards every connection
    was opened with the new password (the old one no longer logs in)."""
    old, new = f"old-{uuid.uuid4().hex}", f"new-{uuid.uuid4().hex}"
    user = _role(pg, old)
    current = {"password": old}
    asked = []

    def password():
        asked.append(current["password"])
        return current["password"]

    pool = Pool({"type": mode, "db": {**pg.endpoint(user=user), "pass": password},
                 "groups": {"g": {"connection_count": 4, "timeout": 10}},
                 "maintenance_interval": 0.1})
    load = Load(pool, "g", tasks=8)
    try:
        load.until(200)
        _set_password(pg, user, new)
        pool.drain()
        sleep(0.3)  # connects meanwhile ask the function and get the old password: refused
        current["password"] = new
        # a refused connect is retried after its backoff, and meanwhile the drained
        # connections serve on (a rolling drain): wait for the retry, not for a loan count
        wait_until(lambda: new in asked, 15, "a connect asking the rotated password")
        load.until(100)
        assert discards(pool, "g", "drained") >= 1
    finally:
        load.stop()
        pool.close()
    assert not _logs_in(pg, user, old) and _logs_in(pg, user, new)
    assert pool.stats()["endpoints"][f"{pg.host}:{pg.port}/postgres"]["quarantines"] == 0


@pytest.mark.timeout(60)
def test_password_function_that_raises_fails_the_connect_and_says_so(pg, mode, caplog):
    """A function that raises: the borrow fails at its timeout with an error naming the
    password function and its exception type, not the exception's text (which may hold
    a secret); the server is not quarantined. When the function recovers, the pool
    connects."""
    secret = f"s3cret-{uuid.uuid4().hex}"
    user = _role(pg, secret)
    broken = {"now": True}

    def password():
        if broken["now"]:
            raise RuntimeError(f"vault is down (token {secret})")
        return secret

    pool = Pool({"type": mode, "db": {**pg.endpoint(user=user), "pass": password},
                 "groups": {"g": {"connection_count": 2, "timeout": 1}}})
    try:
        with caplog.at_level(logging.INFO, logger="greenpool"), pytest.raises(
                PoolError) as info, pool.handler("g") as db:
            db.query("SELECT 1")
        text = str(info.value)
        assert "the password function raised RuntimeError" in text, text
        assert secret not in text and secret not in repr(info.value.__cause__)
        assert "RuntimeError" in caplog.text and secret not in caplog.text
        endpoint = pool.stats()["endpoints"][f"{pg.host}:{pg.port}/postgres"]
        assert endpoint["quarantines"] == 0 and endpoint["state"] == "up", endpoint
        broken["now"] = False
        assert len(lend_all(pool, "g", 2, within=5)) == 2
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_password_function_that_hangs_is_bounded_by_connect_timeout(pg, mode):
    """A function that never answers costs each attempt its connect_timeout (0.5 s), not
    the caller's whole wait: the borrow fails at its timeout saying the function gave no
    answer, and other groups keep working."""
    def password():
        sleep(30)

    pool = Pool({"type": mode, "db": {**pg.endpoint(), "pass": password,
                                      "connect_timeout": 0.5},
                 "groups": {"g": {"connection_count": 2, "timeout": 2}}})
    try:
        with pytest.raises(PoolError, match="gave no answer within"), pool.handler("g") as db:
            db.query("SELECT 1")
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_password_function_that_retries_on_any_error_is_still_bounded(pg, mode):
    """A function that retries on any ``Exception`` (as a vault client or a retry decorator
    does) must not swallow the bound of its call: the attempt still ends at its
    connect_timeout, saying the function gave no answer."""
    def password():
        while True:
            try:
                sleep(30)  # a secret store that does not answer
            except Exception:
                continue

    pool = Pool({"type": mode, "db": {**pg.endpoint(), "pass": password,
                                      "connect_timeout": 0.5},
                 "groups": {"g": {"connection_count": 1, "timeout": 2}}})
    try:
        with pytest.raises(PoolError, match="gave no answer within"), pool.handler("g") as db:
            db.query("SELECT 1")
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_supplied_password_never_appears_in_errors_logs_or_reprs(pg, mode, caplog):
    """The function returns a wrong password: the error, every log line and the reprs of
    the pool and its configuration hold no trace of it."""
    wrong = f"wrong-{uuid.uuid4().hex}"
    pool = Pool({"type": mode, "db": {**pg.endpoint(), "pass": lambda: wrong},
                 "groups": {"g": {"connection_count": 1, "timeout": 1}}})
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(PoolError) as info, pool.handler(
                "g") as db:
            db.query("SELECT 1")
        shown = [str(info.value), repr(pool), repr(pool.config), str(pool.stats()),
                 caplog.text]
        assert "authentication failed" in str(info.value) or "password" in str(info.value)
        assert not [text for text in shown if wrong in text]
        assert group_stats(pool, "g")["size"] <= 1
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_password_function_returning_no_string_fails_the_connect_and_says_what_it_got(pg, mode):
    """A function returning a number: the error names the type it got, not the value."""
    pool = Pool({"type": mode, "db": {**pg.endpoint(), "pass": lambda: 123456789},
                 "groups": {"g": {"connection_count": 1, "timeout": 1}}})
    try:
        with pytest.raises(PoolError, match="returned a int, not a password") as info, \
                pool.handler("g") as db:
            db.query("SELECT 1")
        assert "123456789" not in str(info.value)
    finally:
        pool.close()


@pytest.mark.skipif(MODE != "gevent", reason="a call that blocks the gevent hub")
@pytest.mark.timeout(60)
def test_password_function_that_blocks_the_hub_fails_and_is_named(pg, mode, caplog):
    """A function that blocks without yielding (the unpatched time.sleep) past its bound
    cannot be interrupted: the attempt fails anyway, and a warning says the function must
    cooperate."""
    from gevent.monkey import get_original

    blocking_sleep = get_original("time", "sleep")

    def password():
        blocking_sleep(0.6)
        return pg.password

    pool = Pool({"type": mode, "db": {**pg.endpoint(), "pass": password, "connect_timeout": 0.3},
                 "groups": {"g": {"connection_count": 1, "timeout": 1}}})
    try:
        with caplog.at_level(logging.WARNING, logger="greenpool"), pytest.raises(
                PoolError, match="blocked the event loop"), pool.handler("g") as db:
            db.query("SELECT 1")
        assert "make it cooperative" in caplog.text
    finally:
        pool.close()


@pytest.mark.skipif(MODE != "threaded", reason="a non-threaded pool runs in the threaded process")
@pytest.mark.timeout(60)
def test_password_function_in_a_non_threaded_pool(pg):
    """non-threaded: the connect is made inline by the borrower, and asks the function
    there; its failure is that borrow's error, saying so."""
    calls = []

    def password():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("secrets store unreachable")
        return pg.password

    pool = Pool({"type": "non-threaded", "db": {**pg.endpoint(), "pass": password},
                 "groups": {"g": {"connection_count": 1, "timeout": 0.1}}})
    try:
        with pytest.raises(PoolError, match="the password function raised OSError"), \
                pool.handler("g") as db:
            db.query("SELECT 1")
        sleep(0.6)  # the endpoint is left alone for a moment after such a failure
        with pool.handler("g", timeout=5) as db:
            assert db.query_one("SELECT 1") == (1,)
    finally:
        pool.close()


def test_password_is_a_string_a_function_or_none(pg):
    """Anything else is refused when the configuration is read, without showing it."""
    from greenpool import ConfigError
    from greenpool.config import parse_config

    with pytest.raises(ConfigError, match="a function returning one, or null; got a int") as info:
        parse_config({"db": {**pg.endpoint(), "pass": 987654321}})
    assert "987654321" not in str(info.value)
    supplier = parse_config({"db": {**pg.endpoint(), "pass": lambda: "x"}}).endpoints[0]
    assert callable(supplier.password) and "***" in repr(supplier)


@pytest.mark.timeout(60)
def test_a_failing_password_function_is_not_asked_in_a_tight_loop(pg_factory, mode):
    """The server was down (quarantined, probed by housekeeping) and comes back while the
    password function fails: probes and connects ask it a few times a second, not at every
    turn of the loop, for 2 s of min_size refills."""
    server = pg_factory()
    calls = []
    failing = {"now": False}

    def password():
        calls.append(1)
        if failing["now"]:
            raise RuntimeError("secrets store down")
        return server.password

    pool = Pool({"type": mode, "db": {**server.endpoint(), "pass": password,
                                      "connect_timeout": 1},
                 "groups": {"g": {"connection_count": 2, "min_size": 2, "timeout": 1}},
                 "maintenance_interval": 0.05, "quarantine_initial": 0.05,
                 "quarantine_max": 0.1})
    try:
        lend_all(pool, "g", 2, within=10)
        server.stop("immediate")
        with pytest.raises(PoolError), pool.handler("g") as db:
            db.query("SELECT 1")
        failing["now"] = True
        server.start()
        calls.clear()
        sleep(2.0)
        assert 1 <= len(calls) <= 25, len(calls)
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_password_function_that_hangs_is_not_called_again_while_a_call_runs_on(pg, mode):
    """Threads cannot be interrupted: a call that outlives its bound is left running. The
    next attempts wait on it instead of each leaving one more thread behind (a Vault that
    hangs for an hour would otherwise pile up thousands), and once it returns the function
    is asked afresh."""
    import threading

    if MODE not in ("threaded",):
        pytest.skip("green modes interrupt the call at its bound")
    release, calls = threading.Event(), []

    def password():
        calls.append(1)
        release.wait(30)
        return pg.password

    pool = Pool({"type": mode, "db": {**pg.endpoint(), "pass": password,
                                      "connect_timeout": 0.3},
                 "groups": {"g": {"connection_count": 2, "min_size": 1, "timeout": 3}}})
    try:
        with pytest.raises(PoolError, match="gave no answer within"), pool.handler("g"):
            pass
        assert len(calls) <= 2, f"{len(calls)} calls left running"
        release.set()
        with pool.handler("g") as db:
            assert db.query_one("SELECT 1") == (1,)
    finally:
        release.set()
        pool.close()


@pytest.mark.timeout(60)
def test_password_function_that_takes_most_of_connect_timeout_does_not_quarantine_the_server(
        pg, mode):
    """The function answers (in 0.49 of connect_timeout's 0.5 s), leaving the server less
    time than it took: the connect that then gets no answer in time says nothing about
    the server, which is not quarantined; the error names the function's share."""
    def password():
        sleep(0.49)
        return pg.password

    pool = Pool({"type": mode, "db": {**pg.endpoint(), "pass": password,
                                      "connect_timeout": 0.5},
                 "groups": {"g": {"connection_count": 2, "timeout": 2}}})
    try:
        with pool.handler("g") as db:
            db.query_one("SELECT 1")
    except PoolError as exc:
        assert "password function" in str(exc)  # took most of it, or all (by a hair)
    finally:
        (endpoint,) = pool.group("g").endpoints
        quarantines = endpoint.quarantines
        pool.close()
    assert quarantines == 0
