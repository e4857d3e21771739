"""libpq's PG* environment variables fill what the config leaves out, on a real server."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from leaks import texts

from greenpool import Pool, PoolError

pytestmark = pytest.mark.usefixtures("no_pg_variables")

SECRET = "Env-Pw-8841-walrus"


@pytest.fixture(scope="module")
def env_user(pg: Any) -> str:
    pg.create_user("env_user", SECRET)
    pg.execute("CREATE DATABASE env_db OWNER env_user")
    yield "env_user"
    pg.execute("DROP DATABASE IF EXISTS env_db WITH (FORCE)")


def pool_of(mode: str, **top: Any) -> Pool:
    return Pool({"type": mode, "groups": {"g": {"connection_count": 2, "timeout": 5}}, **top})


def test_a_config_without_db_connects_from_the_environment_alone(
        pg: Any, mode: str, env_user: str, monkeypatch: pytest.MonkeyPatch,
        server_conns: Any) -> None:
    for name, value in {"PGHOST": pg.host, "PGPORT": str(pg.port), "PGUSER": env_user,
                        "PGPASSWORD": SECRET, "PGDATABASE": "env_db",
                        "PGAPPNAME": "env-app", "PGSSLMODE": "disable"}.items():
        monkeypatch.setenv(name, value)
    pool = pool_of(mode)
    try:
        (endpoint,) = pool.config.endpoints
        assert (endpoint.host, endpoint.port, endpoint.user, endpoint.dbname,
                endpoint.sslmode) == (pg.host, pg.port, env_user, "env_db", "disable")
        with pool.handler("g") as db:
            assert db.query_one("SELECT current_user, current_database()") == \
                (env_user, "env_db")
        assert server_conns(application_name="env-app", dbname="env_db") == 1
        assert all(SECRET not in t for t in (*texts(pool.config), *texts(endpoint),
                                             repr(pool), str(pool.stats())))
    finally:
        pool.close()


def test_the_config_wins_over_the_environment(pg: Any, mode: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPORT", "1")  # nobody listens there
    monkeypatch.setenv("PGDATABASE", "no_such_db")
    monkeypatch.setenv("PGAPPNAME", "from-env")
    pool = pool_of(mode, db=pg.endpoint(), application_name="from-config")
    try:
        with pool.handler("g") as db:
            assert db.query_one("SELECT current_setting('application_name'), "
                                "current_database()") == ("from-config", pg.dbname)
    finally:
        pool.close()


def test_pgport_fills_pgdbpool_configs_which_have_no_port(
        pg: Any, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPORT", str(pg.port))
    db = {"host": pg.host, "name": pg.dbname, "user": pg.user, "pass": pg.password}
    pool = pool_of(mode, db=[db, f"host={pg.host} dbname=template1 user={pg.user} "
                                 f"password={pg.password}"])
    try:
        assert [ep.port for ep in pool.config.endpoints] == [pg.port, pg.port]
        with pool.handler("g") as db_:
            assert db_.query_one("SELECT inet_server_port()")[0] == pg.port
    finally:
        pool.close()


def test_pgoptions_is_merged_with_greenpool_s_own_session_settings(
        pg: Any, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq drops PGOPTIONS whenever ``options`` is passed, and greenpool passes it for
    statement_timeout: so PGOPTIONS is read here and both reach the server."""
    monkeypatch.setenv("PGOPTIONS", "-c work_mem=7MB")
    pool = pool_of(mode, db={**pg.endpoint(), "query_timeout": 4000})
    try:
        with pool.handler("g") as db:
            assert db.query_one("SELECT current_setting('work_mem'), "
                                "current_setting('statement_timeout')") == ("7MB", "4s")
    finally:
        pool.close()


def test_a_wrong_pgpassword_never_shows(pg: Any, mode: str, env_user: str,
                                        monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PGPASSWORD", SECRET + "-wrong")
    db = {"host": pg.host, "port": pg.port, "name": "env_db", "user": env_user}
    pool = pool_of(mode, db=db)
    try:
        with caplog.at_level(logging.DEBUG, logger="greenpool"), \
                pytest.raises(PoolError) as info, pool.handler("g"):
            pass
        assert "password authentication failed" in str(info.value)
        seen = [*texts(info.value), *texts(pool.config), repr(pool),
                *(r.getMessage() for r in caplog.records)]
        assert all(SECRET not in text for text in seen)
    finally:
        pool.close()
