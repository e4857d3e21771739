"""Secrets never show in what a configuration prints or refuses: reprs, and the errors of a
bad DSN or a bad value next to a secret (the failures against servers: test_secrets.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from leaks import PASSWORD, SSL_PASSWORD, assert_no_secret
from leaks import secret_endpoint as endpoint

from greenpool import ConfigError, parse_config


@pytest.mark.parametrize("dsn", [
    "postgresql://u:hunt%zz@127.0.0.1/db",  # invalid percent-encoded token: "hunt%zz"
    f"host=127.0.0.1 password='{PASSWORD}",  # unterminated quoted string
    f"host=127.0.0.1 password {PASSWORD}",  # missing "=" after "password"
    f"host=127.0.0.1 {PASSWORD}=x",  # invalid connection option
    f"postgresql://u:{PASSWORD}@127.0.0.1:notaport/db",
    f"host=127.0.0.1 password={PASSWORD} sslpassword={SSL_PASSWORD} port=99999",
])
def test_bad_dsn_errors_never_show_a_secret(dsn: str) -> None:
    for raw in (dsn, {"dsn": dsn}):
        with pytest.raises(ConfigError) as info:
            parse_config({"db": raw})
        assert info.value.__cause__ is None and info.value.__context__ is None
        assert_no_secret(info.value)


@pytest.mark.parametrize("bad", [
    {"options": {"password": PASSWORD}},  # a password inside options: has its own key
    {"options": {"sslpassword": 5.5}},
    {"pass": 12345},
    {"pass": f"{PASSWORD}\x00"},
    {"dsn": PASSWORD.encode()},
])
def test_bad_values_next_to_secrets_never_show_them(bad: dict[str, Any]) -> None:
    raw = {**endpoint("127.0.0.1", 5432), **bad}
    with pytest.raises(ConfigError) as info:
        parse_config({"db": raw})
    assert_no_secret(info.value)
    assert "not shown" in str(info.value) or "options" in str(info.value)


def test_reprs_hide_the_password_and_secret_options() -> None:
    config = parse_config({"db": [
        endpoint("127.0.0.1", 5432),
        f"host=127.0.0.2 password={PASSWORD} sslpassword={SSL_PASSWORD}",
        f"postgresql://u:{PASSWORD}@127.0.0.3/db?sslpassword={SSL_PASSWORD}",
    ]})
    assert_no_secret(config, *config.endpoints, *config.groups.values())
    assert "sslpassword" in repr(config.endpoints[0])  # the key shows, its value does not
    assert all(ep.password == PASSWORD for ep in config.endpoints)



@pytest.mark.parametrize("uri", [
    # an unencoded `/` ends libpq's search for the credentials: user:pass… reads as host:port
    f"postgresql://u:{PASSWORD[:4]}/{PASSWORD[4:]}@127.0.0.1/db",
    # an unencoded `@` ends the password early: the rest reads as the host
    f"postgresql://u:{PASSWORD[:4]}@{PASSWORD[4:]}@127.0.0.1/db",
    f"postgresql://u:1234/{PASSWORD}@127.0.0.1/db",  # …or as the database, the port valid
    f"postgres://u@{PASSWORD}:5432@127.0.0.1/db",
])
def test_uri_credentials_libpq_would_split_are_refused_unshown(uri: str) -> None:
    for raw in (uri, {"dsn": uri}):
        with pytest.raises(ConfigError, match="percent-encoded") as info:
            parse_config({"db": raw})
        assert info.value.__cause__ is None and info.value.__context__ is None
        assert_no_secret(info.value)
        for part in (PASSWORD[:4], PASSWORD[4:]):
            assert part not in str(info.value)


@pytest.mark.parametrize("dsn", [
    f"postgresql://u:{PASSWORD}",  # no `@`: libpq reads u as the host, the password as port
    f"host=127.0.0.1 connect_timeout={PASSWORD}",
    f"host=127.0.0.1 sslmode={PASSWORD}",
    f"host=127.0.0.1 port={PASSWORD},5",
    "host=127.0.0.1 port=99999",
])
def test_a_refused_dsn_value_is_named_but_not_shown(dsn: str) -> None:
    """Whatever libpq made of a DSN may be a piece of its password: an error names the key
    and what it allows, never the value."""
    for raw in (dsn, {"dsn": dsn}):
        with pytest.raises(ConfigError, match=r"db\[0\]\S*\.(port|connect_timeout|sslmode): "
                                              r".*not shown") as info:
            parse_config({"db": raw})
        assert info.value.__cause__ is None and info.value.__context__ is None
        assert_no_secret(info.value)
        assert "99999" not in str(info.value)


@pytest.mark.parametrize("dsn", [
    f'host=127.0.0.1 {PASSWORD[:4]}"{PASSWORD[4:]}',  # missing "=" after "…"…"
    f'host=127.0.0.1 {PASSWORD[:4]}"{PASSWORD[4:]}=x',  # invalid connection option "…"…"
    f'postgresql://127.0.0.1/db?{PASSWORD[:4]}"{PASSWORD[4:]}',  # …separator: "…"…"
])
def test_a_dsn_token_holding_a_quote_is_hidden_from_libpqs_error(dsn: str) -> None:
    """libpq quotes the token it could not read; one holding a `"` must not split the
    hiding of it in two."""
    with pytest.raises(ConfigError, match=r"not a valid libpq DSN .*\(libpq: \w") as info:
        parse_config({"db": dsn})
    for part in (PASSWORD[:4], PASSWORD[4:]):
        assert part not in str(info.value)


_reserved = st.text(alphabet="ab12@/:?#&=%[] ", max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_reserved, _reserved, st.sampled_from([
    "postgresql://app:{}@db.example:5432/prod", "postgres://app:{}@db.example/prod?sslmode=require",
    "postgresql://app:{}@db.example", "host=db.example password={} dbname=prod"]))
def test_a_password_with_unencoded_reserved_characters_never_shows(before: str, after: str,
                                                                   form: str) -> None:
    """Whatever libpq makes of a password holding `@`, `/`, `:`, `?`… written unencoded,
    no piece of it shows: the DSN is refused without it, or the password is read whole,
    or nothing of it reaches the endpoint's label or repr."""
    password = f"{before}{PASSWORD}{after}"
    try:
        (endpoint,) = parse_config({"db": form.format(password)}).endpoints
    except ConfigError as exc:
        assert_no_secret(exc)
        return
    if endpoint.password != password:
        assert_no_secret(endpoint, endpoint.label)
