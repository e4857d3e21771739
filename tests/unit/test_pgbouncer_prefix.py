"""The per-transaction settings sent through a pooler (pure; see greenpool/pooler.py).

The behaviour against a real PgBouncer is in test_pgbouncer.py; these pin the rules that
decide which statements carry the settings."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest

from greenpool import ConfigError, parse_config
from greenpool.pooler import _plan, mode_of, settings_prefix

PREFIX = settings_prefix(500, True)


def test_the_prefix() -> None:
    assert PREFIX == "SET LOCAL statement_timeout = 500; SET TRANSACTION READ ONLY; "
    assert settings_prefix(None, False) == ""
    assert settings_prefix(0, False) == "SET LOCAL statement_timeout = 0; "


class FakeRaw:
    """What :func:`greenpool.pooler._plan` asks of a connection."""

    greenpool_offload = None

    def __init__(self, autocommit: bool, standard: str = "on") -> None:
        self.autocommit = autocommit
        self.info = self
        self.standard = standard

    def parameter_status(self, name: str) -> str | None:
        return self.standard if name == "standard_conforming_strings" else None


@pytest.mark.parametrize("text", [
    "VACUUM t", "  vacuum t", "/* c */ VACUUM t", "-- c\nVACUUM t", "CREATE DATABASE x",
    "ALTER SYSTEM SET work_mem = '8MB'", "DISCARD ALL", "CREATE INDEX CONCURRENTLY i ON t (x)",
    "REINDEX INDEX CONCURRENTLY i", "CLUSTER", "COMMIT PREPARED 'x'",
])
def test_statements_that_refuse_a_transaction_block_go_alone_in_autocommit(text: str) -> None:
    timeout_only = settings_prefix(500, False)
    assert _plan(FakeRaw(autocommit=True), timeout_only, text) == (False, False)
    assert _plan(FakeRaw(autocommit=False), PREFIX, text)[0]  # in a block: as directly


@pytest.mark.parametrize("text", [
    "SELECT 1", "INSERT INTO vacuum_log VALUES (1)", "BEGIN", "DISCARD PLANS", "ANALYZE t",
    "CREATE INDEX i ON t (x)", "SELECT 'concurrently'", "WITH x AS (SELECT 1) SELECT * FROM x",
    "VACUUM t; SELECT 1",  # (the server refuses VACUUM in a multi-statement text anyway)
])
def test_other_statements_carry_the_settings(text: str) -> None:
    assert _plan(FakeRaw(autocommit=True), PREFIX, text) == (True, False)


def test_a_readonly_group_refuses_what_a_read_only_transaction_refuses() -> None:
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction, match="CREATE DATABASE"):
        _plan(FakeRaw(autocommit=True), PREFIX, "CREATE DATABASE x")
    assert not _plan(FakeRaw(autocommit=True), settings_prefix(500, False),
                     "CREATE DATABASE x")[0]


@pytest.mark.parametrize("text", ["COMMIT AND CHAIN", "SELECT 1; ROLLBACK AND CHAIN",
                                  "commit and chain -- note"])
def test_a_chained_end_takes_the_settings_after_it_too(text: str) -> None:
    """The transaction it begins keeps the old one's READ ONLY, none of its SET LOCAL."""
    assert _plan(FakeRaw(autocommit=False), PREFIX, text) == (True, True)


def test_unreadable_texts_and_old_style_literals_are_refused() -> None:
    with pytest.raises(psycopg2.ProgrammingError, match="cannot read"):
        _plan(FakeRaw(autocommit=True), PREFIX, "SELEC 1")
    with pytest.raises(psycopg2.ProgrammingError, match="standard_conforming_strings"):
        _plan(FakeRaw(autocommit=True, standard="off"), PREFIX, "SELECT 1")


def test_the_pooler_key() -> None:
    db = {"host": "127.0.0.1", "port": 6432}
    assert parse_config({"db": {**db, "pooler": "session"}}).endpoints[0].pooler == "session"
    assert mode_of(parse_config({"db": db}).endpoints[0]) == "none"
    with pytest.raises(ConfigError, match=r"pooler.*none, session, transaction"):
        parse_config({"db": {**db, "pooler": "statement"}})
    with pytest.raises(ConfigError, match=r"session_tmp_buffer"):
        parse_config({"db": {**db, "pooler": "session", "session_tmp_buffer": 8}})
    parse_config({"db": {**db, "pooler": "none", "session_tmp_buffer": 8}})  # direct: fine
