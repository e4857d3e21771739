"""What a failed connect means: can retrying fix it, and what should the operator do.

psycopg2 gives no SQLSTATE for errors raised while connecting, so the server's (or the
pooler's) words are all there is. This module is pure: a message in, a :class:`Verdict` out,
so every rule is testable with the exact strings PostgreSQL, PgBouncer and libpq send.

A *fatal* failure is one the same configuration will meet again on every attempt (bad
password, no ``pg_hba.conf`` entry, missing database or role, a parameter the pooler refuses):
the pool should say so at once instead of retrying for the whole acquire timeout, and it must
not quarantine the server for it (the server is fine; the configuration is not). Everything
else is *transient* and retried: refused, reset, timed out, starting up, shutting down, out of
connection slots. An unrecognised message is treated as transient: a wrong "fatal" would fail
requests a retry would have served, a wrong "transient" costs one acquire timeout.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FULL_KINDS", "Verdict", "advice", "classify", "no_answer", "unresolvable"]


@dataclass(frozen=True)
class Verdict:
    """``fatal``: retrying cannot help. ``kind``: a short stable name for logs and tests."""

    fatal: bool
    kind: str
    hint: str


def _rule(pattern: str, fatal: bool, kind: str, hint: str) -> tuple[re.Pattern[str], Verdict]:
    return re.compile(pattern, re.IGNORECASE), Verdict(fatal, kind, hint)


_POOLER_OPTIONS_HINT = (
    "the endpoint is a connection pooler (PgBouncer) that refuses the `options` startup "
    "parameter: give the endpoint `pooler: 'transaction'` (or 'session', its pool_mode) and "
    "greenpool sends statement_timeout and readonly with each transaction instead; an "
    "`options` of your own in the endpoint's options cannot travel through it: set those "
    "with ALTER ROLE ... SET on the server (so must session_tmp_buffer), or connect to "
    "PostgreSQL directly"
)

# Fatal rules come first: when libpq tried several addresses and one server answered
# "bad password" while another refused, the answer that reached a server is the one to act on.
_RULES = (
    _rule(r"unsupported startup parameter:\s*options\b", True, "pooler_startup_parameter",
          _POOLER_OPTIONS_HINT),
    _rule(r"unsupported startup parameter", True, "pooler_startup_parameter",
          "the endpoint is behind a connection pooler that refuses this startup parameter: "
          "remove it from the endpoint's options, or add it to the pooler's "
          "ignore_startup_parameters"),
    _rule(r"authentication failed|invalid password",
          True, "authentication", "check the endpoint's `user` and `pass`"),
    _rule(r"no password supplied|password is required", True, "no_password",
          "the server asks for a password: give the endpoint a `pass`"),
    _rule(r"no pg_hba\.conf entry", True, "pg_hba",
          "the server's pg_hba.conf has no line for this client address, user and database "
          "(or not with this sslmode): add one, or connect as a user it allows"),
    _rule(r"pg_hba\.conf rejects connection", True, "pg_hba",
          "the server's pg_hba.conf rejects this client, user and database: change the line "
          "or connect as another user"),
    _rule(r'database "[^"]*" does not exist|no such database|'
          r"database \S+ does not exist", True, "no_database",
          "the database does not exist on this server (or in the pooler's [databases]): check "
          "the endpoint's `name`, or create it"),
    _rule(r'role "[^"]*" does not exist|no such user', True, "no_role",
          "the role does not exist on this server (or in the pooler's auth_file): check the "
          "endpoint's `user`, or create it"),
    _rule(r"is not permitted to log in", True, "no_login",
          "the role may not log in: ALTER ROLE ... LOGIN, or use another user"),
    _rule(r"permission denied for database|does not have CONNECT privilege", True,
          "no_connect_privilege", "GRANT CONNECT ON DATABASE ... to this user"),
    _rule(r"server does not support SSL|SSL is not enabled on the server|"
          r"certificate verify failed|SSL error: certificate|root certificate file", True,
          "ssl", "the server's TLS setup does not match the endpoint's `ssl`/sslmode and "
          "certificate options: fix one of them"),
    _rule(r"invalid connection option|invalid \w+ value|invalid integer value|"
          r"invalid value for parameter|unrecognized configuration parameter|"
          r"unsupported frontend protocol", True, "bad_parameter",
          "the server or libpq refused a connection parameter: fix the endpoint's options "
          "(or the statement_timeout/session_tmp_buffer keys)"),
    # transient: the server (or the path to it) may be back in a moment
    _rule(r"the database system is (starting up|not yet accepting connections|"
          r"in recovery mode)", False, "starting_up",
          "the server is starting or recovering; it is retried until the acquire timeout"),
    _rule(r"the database system is (shutting down|not accepting connections)", False,
          "shutting_down", "the server is shutting down or not accepting connections; "
          "it is retried and other endpoints are tried"),
    # the server is up and full (for this role, in this database, or for everyone)
    _rule(r'too many connections for role', False, "role_connection_limit",
          "the role's CONNECTION LIMIT is reached (every session of the role counts, from "
          "every process and client): raise it (ALTER ROLE ... CONNECTION LIMIT) or lower "
          "connection_count, exclusive_limit and listeners across the processes that log in "
          "as this role"),
    _rule(r'too many connections for database', False, "database_connection_limit",
          "the database's CONNECTION LIMIT is reached (every session in it counts, from "
          "every process and client): raise it (ALTER DATABASE ... CONNECTION LIMIT) or "
          "lower connection_count, exclusive_limit and listeners across the processes that "
          "use this database"),
    _rule(r"too many clients|too many connections|connection slots are reserved|"
          r"max_connections", False, "too_many_connections",
          "the server has no free connection slot: lower connection_count across your "
          "processes or raise the server's max_connections"),
    _rule(r"no more connections allowed", False, "pooler_full",
          "the pooler's max_client_conn is reached: raise it or lower connection_count"),
    _rule(r"query_wait_timeout|server conn crashed|pgbouncer cannot connect to server|"
          r"server login has been failing|client_login_timeout", False, "pooler_backend",
          "the pooler could not get a server connection in time; check the server behind it"),
    _rule(r"connection refused", False, "refused",
          "nothing listens there: check that the server is up and the host/port are right"),
    _rule(r"could not translate host name|name or service not known|"
          r"temporary failure in name resolution|cannot resolve host", False, "dns",
          "the host name does not resolve (yet): check `host` and DNS"),
    _rule(r"timeout expired|timed out|no answer within|no answer to", False, "timeout",
          "the server did not answer in time: check the network path and the server's load"),
    _rule(r"connection reset|server closed the connection unexpectedly|broken pipe|"
          r"could not receive data|could not send|terminating connection|"
          r"network is unreachable|no route to host|SSL SYSCALL error|EOF detected",
          False, "network",
          "the connection broke while logging in; it is retried"),
)

_UNKNOWN = Verdict(False, "unknown", "retried until the acquire timeout; see the server's message")

#: kinds that say the server (or pooler) is up and full: for everyone, for the role, in the
#: database. Retried, never a quarantine: the server is healthy and so are its connections
FULL_KINDS = frozenset({"too_many_connections", "role_connection_limit",
                        "database_connection_limit", "pooler_full"})


def classify(message: str) -> Verdict:
    """The verdict on a connect failure from the driver's (or our own) message."""
    for pattern, verdict in _RULES:
        if pattern.search(message):
            return verdict
    return _UNKNOWN


def advice(last_errors: Iterable[str | None]) -> str:
    """What to do when no endpoint took a connection, given each endpoint's last error: a
    server that said it is full is up, so it is not for the servers to be checked; what
    its full limit asks is said instead (one sentence per limit met)."""
    verdicts = [classify(error) if error else None for error in last_errors]
    full = dict.fromkeys(v.hint for v in verdicts if v is not None and v.kind in FULL_KINDS)
    said = "".join(f" {hint[0].upper()}{hint[1:]}." for hint in full)
    if full and all(v is not None and v.kind in FULL_KINDS for v in verdicts):
        return said.lstrip()
    return "Check that the servers are up and reachable." + said


def no_answer() -> Verdict:
    """Our own connect deadline expired: nothing answered in time."""
    return classify("no answer within")


def unresolvable() -> Verdict:
    """Name resolution failed before libpq was even called."""
    return classify("cannot resolve host")
