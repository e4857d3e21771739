"""Secrets never show: not in reprs, errors and their whole chain, log records or stats.

Each scenario plants three secrets — the password, an ``sslpassword`` in ``options`` and a
password given inside ``options`` (rejected: it has its own key) — then greps everything a
user or an operator can see under the failures the suite can produce: a DSN with a syntax
error, a wrong password and a missing database against the real ``pg`` fixture, a port
nobody listens on, a server that never answers.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import pytest
from leaks import PASSWORD, WRONG, assert_no_secret
from leaks import secret_endpoint as endpoint

from greenpool import Pool, PoolError
from greenpool.testing.postgres import Cluster, free_port


def assert_clean_logs(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        assert_no_secret(text)


@pytest.fixture(scope="module")
def secret_user(pg: Cluster) -> str:
    """A role whose password is PASSWORD (the fixture's own password is a common word)."""
    pg.create_user("secret_user", PASSWORD)
    return "secret_user"


def _failing_pool(mode: str, db: Any, **group: Any) -> Pool:
    return Pool({"type": mode, "db": db, "groups": {"g": {"timeout": 1.0, **group}},
                 "quarantine_initial": 0.05})


@pytest.mark.parametrize("case", ["wrong_password", "missing_database", "refused", "silent"])
def test_connect_failures_never_show_a_secret(
    case: str, pg: Cluster, secret_user: str, mode: str, blackhole: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = {
        "wrong_password": endpoint(pg.host, pg.port, **{"pass": WRONG}),
        "missing_database": endpoint(pg.host, pg.port, name="nodb"),
        "refused": endpoint("127.0.0.1", free_port()),
        "silent": endpoint(blackhole.host, blackhole.port, connect_timeout=0.2),
    }[case]
    caplog.set_level(logging.DEBUG)
    pool = _failing_pool(mode, [db, {**db, "pass": WRONG, "name": "other"}])
    try:
        with pytest.raises(PoolError) as info, pool.handler("g"):
            pass
        assert_no_secret(info.value, pool, pool.stats(), pool.config, pool.group("g"))
    finally:
        pool.close()
    assert caplog.records, "the failure was not logged at all"
    assert_clean_logs(caplog)


def test_a_working_pool_never_shows_a_secret(
    pg: Cluster, secret_user: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = _failing_pool(mode, endpoint(pg.host, pg.port), min_size=1)
    try:
        with pool.handler("g") as db:
            assert db.query_one("SELECT current_user")[0] == secret_user
            assert_no_secret(db)
        pool.wait(5)
        assert_no_secret(pool, pool.stats(), pool.config, pool.group("g"))
    finally:
        pool.close()
    assert_clean_logs(caplog)


def test_the_raw_connection_hides_sslpassword(pg: Cluster, secret_user: str, mode: str) -> None:
    pool = _failing_pool(mode, endpoint(pg.host, pg.port))
    try:
        with pool.handler("g") as db:
            assert_no_secret(db.connection, db.connection.dsn)
    finally:
        pool.close()
