"""Connect failures judged from their messages alone: which ones retrying cannot fix.

The messages a test cannot produce on demand (a server starting up or in recovery,
PgBouncer's query_wait_timeout and crashed server connections, a reset during login) are
recorded from PostgreSQL 15, PgBouncer 1.18 and libpq; the verdicts real servers produce are
in tests/test_failures.py.
"""

from __future__ import annotations

import pytest

from greenpool import parse_config
from greenpool.connection import ConnectError
from greenpool.failures import Verdict, advice, classify

# --- recorded messages (not producible on demand here) ---------------------------------------

RECORDED_TRANSIENT = {
    # PostgreSQL 15, during startup / crash recovery / shutdown (recorded)
    'connection to server at "10.0.0.1", port 5432 failed: FATAL:  the database system is '
    "starting up": "starting_up",
    'connection to server at "10.0.0.1", port 5432 failed: FATAL:  the database system is not '
    "yet accepting connections DETAIL:  Consistent recovery state has not been yet reached.":
        "starting_up",
    "FATAL:  the database system is in recovery mode": "starting_up",
    "FATAL:  the database system is not accepting connections DETAIL:  Hot standby mode is "
    "disabled.": "shutting_down",
    # PgBouncer 1.18 (recorded)
    "FATAL:  query_wait_timeout": "pooler_backend",
    "ERROR:  server conn crashed?": "pooler_backend",
    "FATAL:  pgbouncer cannot connect to server": "pooler_backend",
    # libpq, a link broken during login (recorded)
    'connection to server at "10.0.0.1", port 5432 failed: server closed the connection '
    "unexpectedly This probably means the server terminated abnormally before or while "
    "processing the request.": "network",
    "could not receive data from server: Connection reset by peer": "network",
    "FATAL:  terminating connection due to administrator command": "network",
    'could not translate host name "db.invalid" to address: Name or service not known': "dns",
    "timeout expired": "timeout",
    "something no rule knows": "unknown",
}


RECORDED_FATAL = {
    # PostgreSQL 15 (recorded), the ones the real-server tests below do not produce
    'FATAL:  role "app" is not permitted to log in': "no_login",
    'FATAL:  permission denied for database "app" DETAIL:  User does not have CONNECT '
    "privilege.": "no_connect_privilege",
    "server does not support SSL, but SSL was required": "ssl",
    'FATAL:  unrecognized configuration parameter "statment_timeout"': "bad_parameter",
    'invalid connection option "sslmodee"': "bad_parameter",
    # PgBouncer 1.18 (recorded): the other spelling of a missing database, other parameters
    'FATAL:  database "app" does not exist': "no_database",
    "FATAL:  unsupported startup parameter: search_path": "pooler_startup_parameter",
    'FATAL:  "trust" authentication failed': "authentication",
}


@pytest.mark.parametrize(("message", "kind"), sorted(RECORDED_TRANSIENT.items()))
def test_recorded_transient_messages_are_retried(message: str, kind: str) -> None:
    verdict = classify(message)
    assert (verdict.fatal, verdict.kind) == (False, kind)
    assert verdict.hint


@pytest.mark.parametrize(("message", "kind"), sorted(RECORDED_FATAL.items()))
def test_recorded_fatal_messages_fail_fast(message: str, kind: str) -> None:
    verdict = classify(message)
    assert (verdict.fatal, verdict.kind) == (True, kind)
    assert verdict.hint


def test_a_server_that_answered_wins_over_one_that_refused() -> None:
    """libpq tried two addresses: one refused, the other's server rejected the password."""
    verdict = classify(
        'connection to server at "localhost" (::1), port 5432 failed: Connection refused '
        'connection to server at "localhost" (127.0.0.1), port 5432 failed: FATAL:  password '
        'authentication failed for user "app"')
    assert verdict.fatal and verdict.kind == "authentication"


def test_connect_error_keeps_its_old_constructor() -> None:
    endpoint = parse_config({"db": {"host": "h"}}).endpoints[0]
    exc = ConnectError(endpoint, "boom", fatal=True)
    assert (exc.reason, exc.fatal, exc.kind, exc.hint) == ("boom", True, "unknown", "")
    assert str(exc) == "h:5432/postgres: boom"
    judged = ConnectError.judged(endpoint, "x", Verdict(False, "refused", "look"))
    assert (judged.fatal, judged.kind) == (False, "refused")
    assert str(judged) == "h:5432/postgres: x (look)"



def test_advice_for_full_servers_does_not_send_the_operator_to_check_they_are_up() -> None:
    """Every endpoint answered that a limit is reached: the advice names each limit met,
    once, and how to raise it; one endpoint that failed otherwise (or never answered) brings
    back the check of the servers."""
    role = 'FATAL:  too many connections for role "app"'
    database = 'FATAL:  too many connections for database "appdb"'
    both = advice([role, database, role])
    assert "up and reachable" not in both
    assert both.count("ALTER ROLE") == 1 and both.count("ALTER DATABASE") == 1
    assert "max_connections" not in advice([role])
    mixed = advice(["connection refused", role])
    assert mixed.startswith("Check that the servers are up") and "ALTER ROLE" in mixed
    assert advice([None]) == advice([]) == "Check that the servers are up and reachable."
