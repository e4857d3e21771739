"""libpq's PG* environment variables as the config parser reads them: what they fill, what
a bad one is told, and that the password never shows (the connects: test_environ.py)."""

from __future__ import annotations

import logging
import os
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from leaks import texts

from greenpool import ConfigError, parse_config
from greenpool.config import ENDPOINT_KEYS
from greenpool.config.environ import ENDPOINT_VARIABLES, fill_endpoint

pytestmark = pytest.mark.usefixtures("no_pg_variables")

SECRET = "Env-Pw-8841-walrus"


@pytest.mark.parametrize("name, value, says", [
    ("PGPORT", "54x2", r"^\$PGPORT as db\[0\]\.port: expected a whole number"),
    ("PGPORT", "70000", r"^\$PGPORT as db\[0\]\.port"),
    ("PGSSLMODE", "sometimes", r"^\$PGSSLMODE as db\[0\]\.sslmode: expected one of disable"),
    ("PGHOST", "a,b", r"^\$PGHOST as db\[0\]\.host: .*multi-host"),
    ("PGCONNECT_TIMEOUT", "soon", r"^\$PGCONNECT_TIMEOUT as db\[0\]\.connect_timeout"),
])
def test_a_bad_variable_is_a_config_error_naming_it(
        name: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=says):
        parse_config({"groups": {"g": {}}})


def test_connect_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    assert parse_config({"db": {"host": "h"}}).endpoints[0].connect_timeout == 7
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "0")  # libpq: wait for ever; greenpool: never
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        assert parse_config({"db": {"host": "h"}}).endpoints[0].connect_timeout == 5.0
    assert "PGCONNECT_TIMEOUT=0" in caplog.text


def test_without_db_or_pghost_the_error_says_both() -> None:
    with pytest.raises(ConfigError, match=r"^db: missing.*set PGHOST"):
        parse_config({"groups": {"g": {}}})


# --- properties ------------------------------------------------------------------------

_NAMES = [n for n in (*ENDPOINT_VARIABLES, "PGOPTIONS", "PGAPPNAME") if n != "PGPASSWORD"]
_env_value = st.one_of(
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
            max_size=12),
    st.integers(-5, 70000).map(str),
    st.sampled_from(["disable", "require", "127.0.0.1", "/tmp", "a,b"]),
)
#: PGPASSWORD, when set, is SECRET and nothing else is (a host may show, a password never)
_environments = st.tuples(
    st.dictionaries(st.sampled_from(_NAMES), _env_value, max_size=len(_NAMES)),
    st.sampled_from([{}, {"PGPASSWORD": SECRET}]),
).map(lambda pair: {**pair[0], **pair[1]})
_given = st.fixed_dictionaries({}, optional={
    "host": st.just("db.example"), "port": st.just(6000), "name": st.just("given_db"),
    "user": st.just("given_user"), "pass": st.just("given-pw"), "ssl": st.just("require"),
    "connect_timeout": st.just(3)})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_environments, _given)
@example(env={"PGPORT": "0\x1f"}, given_keys={})  # int() refused what str.strip() kept
def test_the_environment_only_fills_gaps(env: dict[str, str], given_keys: dict) -> None:
    filled, sources = fill_endpoint(given_keys, env)
    for key, value in given_keys.items():
        assert filled[key] == value and key not in sources  # a given key is never replaced
    given_settings = {ENDPOINT_KEYS[key].field for key in given_keys}
    for key, name in sources.items():  # nor is a setting given under another name (`pass`)
        assert env[name] and ENDPOINT_KEYS[key].field not in given_settings


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_environments, _given)
def test_any_environment_parses_or_is_a_config_error_without_the_password(
        env: dict[str, str], given_keys: dict) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        try:
            config = parse_config({"db": given_keys, "groups": {"g": {}}})
        except ConfigError as exc:
            assert all(SECRET not in text for text in texts(exc))
            return
    (endpoint,) = config.endpoints
    assert SECRET not in repr(endpoint) and SECRET not in repr(config)
    if "pass" not in given_keys and env.get("PGPASSWORD"):
        assert endpoint.password == env["PGPASSWORD"]
    if "port" not in given_keys and env.get("PGPORT"):
        assert endpoint.port == int(env["PGPORT"])
    if "host" in given_keys:
        assert endpoint.host == "db.example"



def test_a_setting_given_by_its_pgdbpool_name_is_not_filled_again() -> None:
    env = {"PGPASSWORD": SECRET, "PGDATABASE": "env_db", "PGSSLMODE": "require"}
    filled, sources = fill_endpoint({"pass": "given-pw", "name": "given_db", "ssl": False}, env)
    assert filled == {"pass": "given-pw", "name": "given_db", "ssl": False} and sources == {}
