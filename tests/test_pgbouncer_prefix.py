"""The per-transaction settings text sent through a pooler (pure; see greenpool/pooler.py).

The behaviour against a real PgBouncer is in test_pgbouncer.py; these pin the rules that
decide which statements carry the settings."""

from __future__ import annotations

import pytest
from psycopg2 import sql as pgsql

from greenpool import ConfigError, parse_config
from greenpool.pooler import (
    _with_prefix,
    mode_of,
    runs_outside_transaction,
    settings_prefix,
)

PREFIX = settings_prefix(500, True)


def test_the_prefix() -> None:
    assert PREFIX == "SET LOCAL statement_timeout = 500; SET TRANSACTION READ ONLY; "
    assert settings_prefix(None, False) == ""
    assert settings_prefix(0, False) == "SET LOCAL statement_timeout = 0; "


@pytest.mark.parametrize("text", [
    "VACUUM t", "  vacuum analyze t", "/* c */ VACUUM t", "-- c\nVACUUM t",
    "CREATE DATABASE x", "drop database x", "CREATE TABLESPACE s LOCATION '/x'",
    "ALTER SYSTEM SET work_mem = '8MB'", "DISCARD ALL", "CREATE INDEX CONCURRENTLY i ON t (x)",
    "create unique index concurrently i on t (x)", "DROP INDEX CONCURRENTLY i",
    "REINDEX INDEX CONCURRENTLY i", "REINDEX DATABASE d", "COMMIT PREPARED 'x'",
    "CREATE SUBSCRIPTION s CONNECTION '' PUBLICATION p",
])
def test_statements_that_refuse_a_transaction_block_go_alone(text: str) -> None:
    assert runs_outside_transaction(text)
    assert _with_prefix(PREFIX, text, None) == text


@pytest.mark.parametrize("text", [
    "SELECT 1", "INSERT INTO vacuum_log VALUES (1)", "BEGIN", "DISCARD PLANS",
    "CREATE INDEX i ON t (x)", "SELECT 'concurrently'", "WITH x AS (SELECT 1) SELECT * FROM x",
])
def test_other_statements_carry_the_settings(text: str) -> None:
    assert not runs_outside_transaction(text)
    assert _with_prefix(PREFIX, text, None) == PREFIX + text


def test_bytes_and_composed_sql_carry_them_too() -> None:
    assert _with_prefix(PREFIX, b"SELECT 1", None) == PREFIX.encode() + b"SELECT 1"
    assert _with_prefix(PREFIX, b"VACUUM", None) == b"VACUUM"
    composed = _with_prefix(PREFIX, pgsql.SQL("SELECT 1"), None)
    assert isinstance(composed, pgsql.Composed)
    assert composed.seq[0] == pgsql.SQL(PREFIX)


def test_the_pooler_key() -> None:
    db = {"host": "127.0.0.1", "port": 6432}
    assert parse_config({"db": {**db, "pooler": "session"}}).endpoints[0].pooler == "session"
    assert mode_of(parse_config({"db": db}).endpoints[0]) == "none"
    with pytest.raises(ConfigError, match=r"pooler.*none, session, transaction"):
        parse_config({"db": {**db, "pooler": "statement"}})
    with pytest.raises(ConfigError, match=r"session_tmp_buffer"):
        parse_config({"db": {**db, "pooler": "session", "session_tmp_buffer": 8}})
    parse_config({"db": {**db, "pooler": "none", "session_tmp_buffer": 8}})  # direct: fine
