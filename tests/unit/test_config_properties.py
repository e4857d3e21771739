"""Property-based tests over the whole configuration space, valid and invalid pieces mixed.

Whatever the dictionary holds, ``parse_config`` and ``Pool()`` either work or raise
:class:`ConfigError` (never ``TypeError``, ``KeyError``, ``OverflowError`` or a hang), the
error never shows the password, and what parses is fit for use: every number finite and in
range, and the driver arguments buildable for every endpoint and group.
"""

from __future__ import annotations

import math
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenpool import ConfigError, Pool, parse_config
from greenpool.config import PoolConfig
from greenpool.connection import connect_kwargs

MODE = os.environ.get("GREENPOOL_TEST_MODE", "gevent")
SECRET = "S3cr3t-pw"  # the password in every generated config; must never show
SSL_SECRET = "Ssl-S3cr3t"

junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)
edge_numbers = st.sampled_from([
    0, 0.0, -0.0, 1, -1, 0.0005, 0.001, 0.0011, 0.01, 0.1, 2.5, 65535, 65536, 99999, 2**31,
    2**63, 1e-300, 1e300, math.inf, -math.inf, math.nan, True, False,
])
plausible = st.one_of(st.integers(1, 20), st.floats(0.01, 100))
beyond_float = st.builds(pow, st.just(10), st.just(400))
numbers = st.one_of(plausible, plausible, plausible, plausible, plausible, edge_numbers,
                    beyond_float, st.integers(-5, 10**7), st.floats(-1e6, 1e7),
                    st.floats(allow_nan=True, allow_infinity=True))


def mixed(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes anything at all (each key is wrong now and then,
    so that about a third of the configs are valid and the rest fail in varied places)."""
    # (hypothesis favours the edges of an integer range, so the junk branch is a middle one)
    return st.integers(0, 15).flatmap(lambda i: junk if i == 7 else valid)


hosts = st.sampled_from(["127.0.0.1", "/tmp/greenpool-nowhere", "::1"] * 4
                        + ["a,b", "", "h\x00st"])
good_dsn_tokens = st.sampled_from([
    "port=5432", f"password={SECRET}", f"password='{SECRET} x'", f"sslpassword={SSL_SECRET}",
    "dbname=app", "user=u", "application_name=x", "sslmode=require", "connect_timeout=3",
])
bad_dsn_tokens = st.sampled_from([
    "host=a,b", "port=99999", "port=5432,5433", "port=x", "sslmode=nope", "bogus=1", "hunt%zz",
    f"{SECRET}", "=", "'", "\\", f"postgresql://u:{SECRET}@h:notaport/db",
    f"postgresql://u:{SECRET}%zz@h/db", "postgresql://h1:5432,h2:5433/db",
])
dsns = st.one_of(
    st.lists(good_dsn_tokens, max_size=3).map(lambda t: " ".join(["host=127.0.0.1", *t])),
    st.lists(good_dsn_tokens, max_size=3).map(lambda t: " ".join(["host=127.0.0.1", *t])),
    st.lists(st.one_of(good_dsn_tokens, bad_dsn_tokens), min_size=1, max_size=4).map(" ".join),
    st.just(f"postgresql://u:{SECRET}@127.0.0.1:5432/app?sslpassword={SSL_SECRET}"),
)
# a secret only where it is one (a secret put in application_name is the user's to show)
options = st.tuples(
    st.dictionaries(st.sampled_from(["sslpassword", "password"]),
                    mixed(st.sampled_from([SSL_SECRET, 5, "a\x00b"])), max_size=2),
    st.dictionaries(
        st.sampled_from(["application_name", "sslrootcert", "target_session_attrs", "host",
                         "bogus", "Options", "hostaddr", "tcp_user_timeout"]),
        mixed(st.sampled_from(["x", "1.2.3.4,5.6.7.8", "0", 5, "a\x00b"])),
        max_size=3,
    ),
).map(lambda pair: {**pair[0], **pair[1]})
keepalives = st.one_of(st.booleans(), st.dictionaries(
    st.sampled_from(["keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                     "keepalive"]), mixed(numbers), max_size=3))
endpoint_dicts = st.fixed_dictionaries(
    {"host": mixed(hosts)},
    optional={
        "port": mixed(numbers), "name": mixed(st.sampled_from(["app", ""])),
        "dbname": mixed(st.just("app")), "user": mixed(st.sampled_from(["u", None])),
        "pass": mixed(st.sampled_from([SECRET, None, f"{SECRET}\x00"])),
        "password": st.just(SECRET), "ssl": mixed(st.sampled_from([True, False, "require", "x"])),
        "connect_timeout": mixed(numbers), "connection_retry_sleep": mixed(numbers),
        "query_timeout": mixed(numbers), "statement_timeout": mixed(numbers),
        "session_tmp_buffer": mixed(numbers), "weight": mixed(numbers),
        "keepalives": mixed(keepalives), "options": mixed(options), "dsn": mixed(dsns),
        "prot": st.just(1),
    },
)
endpoints = st.one_of(endpoint_dicts, endpoint_dicts, endpoint_dicts, dsns, junk)
group_specs = st.fixed_dictionaries({}, optional={
    key: mixed(numbers) for key in (
        "connection_count", "min_size", "timeout", "max_waiting", "max_lifetime", "max_idle",
        "check_idle_after", "statement_timeout", "max_lag", "leak_threshold",
    )
} | {
    "autocommit": mixed(st.booleans()), "readonly": mixed(st.booleans()),
    "row_factory": mixed(st.sampled_from(["tuple", "dict", "namedtuple", "list"])),
    "role": mixed(st.sampled_from(["any", "primary", "standby", "prefer-standby", "master"])),
    "on_lag": mixed(st.sampled_from(["use-primary", "fail", "wait"])),
    "endpoints": mixed(st.lists(st.one_of(st.integers(-1, 3), st.just("127.0.0.1:5432/app")),
                                max_size=3)),
})
configs = st.fixed_dictionaries(
    {"db": mixed(st.one_of(endpoints, st.lists(endpoints, min_size=1, max_size=3)))},
    optional={
        "type": mixed(st.just(MODE)),
        "groups": mixed(st.dictionaries(st.sampled_from(["g", "h", "", 1, None]),
                                        mixed(group_specs), max_size=2)),
        "defaults": mixed(group_specs),
        "application_name": mixed(st.sampled_from(["app", "", "a\x00"])),
        "maintenance_interval": mixed(numbers), "quarantine_initial": mixed(numbers),
        "quarantine_max": mixed(numbers), "role_check_interval": mixed(numbers),
        "startup_timeout": st.just(0),
    },
)


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _secret_free(text: str) -> bool:
    return SECRET not in text and SSL_SECRET not in text


def _check_usable(config: PoolConfig) -> None:
    """What parsed must be safe to use: finite numbers in range, buildable driver args."""
    for value in (config.maintenance_interval, config.quarantine_initial,
                  config.quarantine_max, config.role_check_interval, config.startup_timeout):
        assert math.isfinite(value) and value >= 0
    assert config.quarantine_initial <= config.quarantine_max
    for ep in config.endpoints:
        assert 1 <= ep.port <= 65535 and "," not in ep.host
        assert ep.password is None or isinstance(ep.password, str)
        assert math.isfinite(ep.connect_timeout) and ep.connect_timeout > 0
        assert ep.retry_sleep is None or ep.retry_sleep >= 0.01
        for group in config.groups.values():
            kwargs = connect_kwargs(ep, group, config.application_name)
            assert all(isinstance(k, str) for k in kwargs)
    for group in config.groups.values():
        assert 0 <= group.min_size <= group.connection_count
        for value in (group.timeout, group.max_lifetime, group.max_idle, group.check_idle_after):
            assert math.isfinite(value) and value >= 0
        st_ = group.statement_timeout
        assert st_ is None or st_ == 0 or int(st_ * 1000) >= 1
    assert _secret_free(repr(config)) and _secret_free(str(config))


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_parse_config_works_or_raises_config_error(raw: dict[str, Any]) -> None:
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        assert str(exc).split(":", 1)[0]  # names a key first
        for link in _chain(exc):
            assert _secret_free(str(link)) and _secret_free(repr(link))
        assert exc.__context__ is None or isinstance(exc.__context__, ConfigError)
        return
    _check_usable(config)


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_pool_works_or_raises_config_error(raw: dict[str, Any]) -> None:
    """``Pool()`` with startup_timeout 0 connects to nothing: no server is needed."""
    raw = {**raw, "type": MODE, "startup_timeout": 0}
    try:
        pool = Pool(raw)
    except ConfigError as exc:
        assert _secret_free(str(exc))
        return
    try:
        assert _secret_free(repr(pool.config)) and _secret_free(str(pool.stats()))
    finally:
        pool.close()


def _outcome(raw: dict[str, Any]) -> str:
    try:
        return repr(parse_config(raw))
    except ConfigError as exc:
        return f"ConfigError: {exc}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs, st.randoms(use_true_random=False))
def test_the_order_of_top_level_keys_changes_nothing(raw: dict[str, Any], rnd: Any) -> None:
    """Top-level keys are checked in the order of their declarations, so a config with
    several mistakes is told the same first one however its dict is ordered."""
    items = list(raw.items())
    rnd.shuffle(items)
    assert _outcome(dict(items)) == _outcome(raw)
