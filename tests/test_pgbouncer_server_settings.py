"""Settings the server enforces itself, behind a real PgBouncer in transaction mode.

The sound set-up through a transaction pooler needs no text at all: a PgBouncer database
entry per group, logging in to the server as a role whose settings are its own (``ALTER
ROLE ... SET default_transaction_read_only = on``, ``... SET statement_timeout``). Then the
per-transaction prefix is not sent (the server log shows it), the server refuses writes and
cancels slow statements on its own, and ``greenpool check`` says so per group. What the
server enforces is read from ``pg_settings.reset_val``, which another client's session
``SET`` on the shared server connection does not change.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from modes import MODE

from greenpool import Pool
from greenpool.testing.pgbouncer import PgBouncer, available
from greenpool.testing.postgres import Cluster

pytestmark = pytest.mark.skipif(not available(), reason="/usr/sbin/pgbouncer not installed")

ROLE, PASSWORD = "greenpool_ro", "ro-secret"


@pytest.fixture
def server(pg_factory: Callable[..., Cluster]) -> Cluster:
    """A server that logs every statement, with a role whose settings are its own."""
    cluster = pg_factory(settings={"log_statement": "all"})
    cluster.create_user(ROLE, PASSWORD)
    cluster.execute(f"ALTER ROLE {ROLE} SET default_transaction_read_only = on")
    cluster.execute(f"ALTER ROLE {ROLE} SET statement_timeout = 300")
    cluster.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ROLE}")
    cluster.execute("CREATE TABLE enforced (x int)")
    cluster.execute(f"GRANT INSERT ON enforced TO {ROLE}")  # only read-only refuses a write
    return cluster


@pytest.fixture
def bouncer(server: Cluster) -> Iterator[PgBouncer]:
    """Transaction mode, one server connection per PgBouncer pool (every client shares it);
    ``reports`` logs in to the server as the role with enforced settings."""
    role = f"user={ROLE} password={PASSWORD}"
    with PgBouncer(server, databases={"reports": role, "reports_too": role},
                   pool_mode="transaction", default_pool_size=1) as b:
        yield b


def prefixes_logged(server: Cluster) -> int:
    log = server.logfile.read_text(errors="replace")
    return log.count("SET LOCAL statement_timeout") + log.count("SET TRANSACTION READ ONLY")


@pytest.mark.parametrize("autocommit", [True, False])
def test_settings_the_server_enforces_are_not_sent_and_still_hold(
        server: Cluster, pool_at: Any, autocommit: bool) -> None:
    """Session mode: the server session is the connection's own for its lifetime."""
    with PgBouncer(server, databases={"reports": f"user={ROLE} password={PASSWORD}"},
                   pool_mode="session", default_pool_size=1) as b:
        pool = pool_at(b.endpoint(name="reports", pooler="session"), {
            "ro": {"readonly": True, "statement_timeout": 0.3, "autocommit": autocommit,
                   "connection_count": 1}})
        before = prefixes_logged(server)
        for _ in range(2):
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("ro") as db:
                db.query("INSERT INTO enforced VALUES (1)")
            with pytest.raises(psycopg2.errors.QueryCanceled), pool.handler("ro") as db:
                db.query("SELECT pg_sleep(3)")
            with pool.handler("ro") as db:
                assert db.query_one("SHOW transaction_read_only")[0] == "on"
                assert db.query_one("SELECT current_user")[0] == ROLE
                # no text is read: what a pooler with a prefix must refuse is the server's
                assert db.query_one("SELECT 1; COMMIT; SELECT 2")[0] == 2
        assert prefixes_logged(server) == before
        assert server.execute("SELECT count(*) FROM enforced")[0][0] == 0


def refused_write_and_cancelled_sleep(pool: Pool) -> None:
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction), pool.handler("ro") as db:
        db.query("INSERT INTO enforced VALUES (1)")
    with pytest.raises(psycopg2.errors.QueryCanceled), pool.handler("ro") as db:
        db.query("SELECT pg_sleep(3)")


def test_in_transaction_mode_a_session_set_by_another_client_cannot_make_ro_write(
        server: Cluster, bouncer: PgBouncer, pool_at: Any) -> None:
    """The role enforces both settings, but another client of the same PgBouncer pool
    leaves them off on the one shared server connection: the prefix still travels."""
    other = psycopg2.connect(host=bouncer.host, port=bouncer.port, dbname="reports",
                             user=server.user, password=server.password, connect_timeout=5)
    try:
        other.autocommit = True
        with other.cursor() as cur:
            cur.execute("SET default_transaction_read_only = off; SET statement_timeout = 0")
        pool = pool_at(bouncer.endpoint(name="reports", pooler="transaction"), {
            "ro": {"readonly": True, "statement_timeout": 0.3}})
        refused_write_and_cancelled_sleep(pool)
    finally:
        other.close()
    assert server.execute("SELECT count(*) FROM enforced")[0][0] == 0


def test_in_transaction_mode_a_loans_session_set_cannot_make_the_next_loan_write(
        server: Cluster, bouncer: PgBouncer, pool_at: Any) -> None:
    """No DISCARD ALL reaches the server connection in transaction mode: what a loan of the
    group itself left there must not reach the next loan's transactions."""
    pool = pool_at(bouncer.endpoint(name="reports", pooler="transaction"), {
        "ro": {"readonly": True, "statement_timeout": 0.3, "connection_count": 1}})
    with pool.handler("ro") as db:
        db.query("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        db.query("SET statement_timeout = 0")
    refused_write_and_cancelled_sleep(pool)
    assert server.execute("SELECT count(*) FROM enforced")[0][0] == 0


def test_in_transaction_mode_a_role_setting_gone_from_a_new_server_connection_still_holds(
        server: Cluster, bouncer: PgBouncer, pool_at: Any) -> None:
    """The role's settings are removed and PgBouncer replaces its server connection (the
    greenpool connection stays): the new server session enforces nothing."""
    pool = pool_at(bouncer.endpoint(name="reports", pooler="transaction"), {
        "ro": {"readonly": True, "statement_timeout": 0.3, "connection_count": 1}})
    with pool.handler("ro") as db:
        db.query("SELECT 1")
    server.execute(f"ALTER ROLE {ROLE} RESET ALL")
    server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   f"WHERE usename = '{ROLE}'")
    deadline = time.monotonic() + 10  # PgBouncer notices its idle server connection gone
    while "closing because" not in bouncer.log():
        assert time.monotonic() < deadline, bouncer.log()
        time.sleep(0.02)
    refused_write_and_cancelled_sleep(pool)
    assert server.execute("SELECT count(*) FROM enforced")[0][0] == 0
    assert pool.stats()["groups"]["ro"]["connects"] == 1


def test_in_session_mode_what_a_previous_client_left_on_the_server_session_is_not_trusted(
        server: Cluster, pool_at: Any) -> None:
    """PgBouncer without ``server_reset_query`` hands the next client the server session as
    the previous one left it: its current values, not only ``reset_val``, must be the
    group's."""
    with PgBouncer(server, databases={"reports": f"user={ROLE} password={PASSWORD}"},
                   pool_mode="session", default_pool_size=1, server_reset_query="") as b:
        before = psycopg2.connect(host=b.host, port=b.port, dbname="reports",
                                  user=server.user, password=server.password,
                                  connect_timeout=5)
        try:
            before.autocommit = True
            with before.cursor() as cur:
                cur.execute("SET default_transaction_read_only = off; "
                            "SET statement_timeout = 0")
        finally:
            before.close()
        pool = pool_at(b.endpoint(name="reports", pooler="session"), {
            "ro": {"readonly": True, "statement_timeout": 0.3, "connection_count": 1}})
        refused_write_and_cancelled_sleep(pool)
    assert server.execute("SELECT count(*) FROM enforced")[0][0] == 0


def test_in_session_mode_without_the_reset_the_prefix_travels(server: Cluster,
                                                              pool_at: Any) -> None:
    """``reset: 'never'``: a loan's session SET would stay for the next loan."""
    with PgBouncer(server, databases={"reports": f"user={ROLE} password={PASSWORD}"},
                   pool_mode="session", default_pool_size=1) as b:
        pool = pool_at(b.endpoint(name="reports", pooler="session"), {
            "ro": {"readonly": True, "statement_timeout": 0.3, "connection_count": 1,
                   "reset": "never"}})
        with pool.handler("ro") as db:
            db.query("SET default_transaction_read_only = off; SET statement_timeout = 0")
        refused_write_and_cancelled_sleep(pool)
    assert server.execute("SELECT count(*) FROM enforced")[0][0] == 0


def test_in_session_mode_the_reset_keeps_what_the_server_enforces(server: Cluster,
                                                                  pool_at: Any) -> None:
    """Session mode resets a dirty loan with DISCARD ALL, which goes back to the role's
    settings: still enforced, still no prefix."""
    with PgBouncer(server, databases={"reports": f"user={ROLE} password={PASSWORD}"},
                   pool_mode="session", default_pool_size=2) as b:
        pool = pool_at(b.endpoint(name="reports", pooler="session"), {
            "ro": {"readonly": True, "statement_timeout": 0.3, "connection_count": 1}})
        before = prefixes_logged(server)
        with pool.handler("ro") as db:
            db.query("SET statement_timeout = 0")  # a dirty loan: DISCARD ALL on return
            db.query("SET default_transaction_read_only = off")
        with pool.handler("ro") as db:
            assert db.query_one("SHOW statement_timeout")[0] == "300ms"
            assert db.query_one("SHOW transaction_read_only")[0] == "on"
        assert prefixes_logged(server) == before
        assert pool.stats()["groups"]["ro"]["connects"] == 1


def test_only_what_the_server_does_not_enforce_travels(server: Cluster, pool_at: Any) -> None:
    with PgBouncer(server, databases={"reports": f"user={ROLE} password={PASSWORD}"},
                   pool_mode="session", default_pool_size=1) as b:
        pool = pool_at(b.endpoint(name="reports", pooler="session"), {
            "slower": {"readonly": True, "statement_timeout": 0.6, "connection_count": 1}})
        with pool.handler("slower") as db:
            assert db.query_one("SHOW statement_timeout")[0] == "600ms"
            assert db.query_one("SHOW transaction_read_only")[0] == "on"
    log = server.logfile.read_text(errors="replace")
    assert "SET LOCAL statement_timeout = 600" in log
    assert "SET TRANSACTION READ ONLY" not in log


def test_a_session_set_left_by_another_client_does_not_fool_the_check(
        server: Cluster, bouncer: PgBouncer, pool_at: Any) -> None:
    """Another client of the same PgBouncer pool SETs statement_timeout for the session on
    the one shared server connection: a SHOW would say the server enforces something else,
    ``reset_val`` does not change; what the other client left is reported."""
    from greenpool.pooler import read_server_defaults

    other = psycopg2.connect(host=bouncer.host, port=bouncer.port, dbname="reports",
                             user=server.user, password=server.password, connect_timeout=5)
    try:
        other.autocommit = True
        with other.cursor() as cur:
            cur.execute("SET statement_timeout = 600")
            cur.execute("SET default_transaction_read_only = off")
        pool = pool_at(bouncer.endpoint(name="reports", pooler="transaction"), {
            "ro": {"readonly": True, "statement_timeout": 0.3}})
        with pool.handler("ro") as db:
            found = read_server_defaults(db.connection)
        assert (found.statement_timeout_ms, found.read_only) == (300, True)
        assert found.left_set == ("default_transaction_read_only", "statement_timeout")
        with other.cursor() as cur:
            cur.execute("RESET ALL")
    finally:
        other.close()


@pytest.mark.skipif(MODE != "gevent", reason="a subprocess: runs once, in the gevent process")
def test_check_says_per_group_whether_the_prefix_is_needed(server: Cluster, bouncer: PgBouncer,
                                                           tmp_path: Any) -> None:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({
        # (check reads the pooler key, it does not probe the mode: the session-mode endpoint
        # may be this transaction-mode PgBouncer)
        "db": [bouncer.endpoint(name="reports", pooler="session"),
               bouncer.endpoint(pooler="transaction"),
               bouncer.endpoint(name="reports_too", pooler="transaction")],
        "groups": {"ro": {"readonly": True, "statement_timeout": 0.3, "endpoints": [0]},
                   "shared": {"readonly": True, "statement_timeout": 0.3, "endpoints": [2]},
                   "mixed": {"readonly": True, "statement_timeout": 0.3, "endpoints": [1]},
                   "writer": {"endpoints": [0]}}}))
    result = subprocess.run([sys.executable, "-m", "greenpool", "check", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lines = out.splitlines()
    ro = lines[lines.index(next(line for line in lines if line.startswith("group 'ro'"))) + 1]
    assert "the server enforces" in ro and "no per-transaction prefix" in ro, out
    assert "default_transaction_read_only from user" in ro, out
    mixed = lines[lines.index(next(line for line in lines
                                   if line.startswith("group 'mixed'"))) + 1]
    assert "each transaction carries" in mixed and "SET TRANSACTION READ ONLY" in mixed, out
    writer = lines[lines.index(next(line for line in lines
                                    if line.startswith("group 'writer'"))) + 1]
    assert "WARNING" in writer and "its writes will fail" in writer, out
    shared = lines[lines.index(next(line for line in lines
                                    if line.startswith("group 'shared'"))) + 1]
    assert "the server enforces it" in shared and "each transaction carries" in shared, out
    assert "WARNING" not in ro + mixed + shared
