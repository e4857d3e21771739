"""Configuration: pgdbpool's format in, clear errors for anything wrong (no server needed)."""

from __future__ import annotations

import pytest

from greenpool import ConfigError, Pool, parse_config


def base(**groups):
    return {"db": {"host": "127.0.0.1", "name": "app", "user": "u", "pass": "secret-pw"},
            "groups": groups or {"g": {}}}


def test_pgdbpool_config_is_accepted_as_is():
    config = parse_config({
        "type": "threaded",
        "db": {"host": "db1", "name": "app", "user": "u", "pass": "p", "ssl": "disable",
               "connect_timeout": 30, "connection_retry_sleep": 1, "query_timeout": 120,
               "session_tmp_buffer": 128},
        "groups": {"group1": {"connection_count": 20, "autocommit": True}},
    })
    (endpoint,) = config.endpoints
    assert endpoint.dbname == "app" and endpoint.sslmode == "disable"
    assert endpoint.statement_timeout == pytest.approx(0.12)  # query_timeout is in ms
    assert endpoint.temp_buffers_mb == 128 and endpoint.retry_sleep == 1
    group = config.groups["group1"]
    assert group.connection_count == 20 and group.autocommit is True
    assert config.mode == "threaded"


def test_dsn_and_uri_endpoints():
    config = parse_config({"db": [
        "host=10.1.1.1 port=6432 dbname=a user=u password=pw application_name=x",
        "postgresql://u:pw@127.0.0.2:5433/b?sslmode=require",
        {"dsn": "host=127.0.0.3 dbname=c", "weight": 2},
    ]})
    a, b, c = config.endpoints
    assert (a.host, a.port, a.dbname, a.password, a.options) == (
        "10.1.1.1", 6432, "a", "pw", {"application_name": "x"})
    assert (b.host, b.port, b.dbname, b.sslmode) == ("127.0.0.2", 5433, "b", "require")
    assert (c.host, c.weight) == ("127.0.0.3", 2)
    assert list(config.groups) == ["default"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["groups"]["g"].update(conection_count=3), r"groups\.g\.conection_count: "
         r"unknown key \(did you mean 'connection_count'\?\)"),
        (lambda c: c["groups"]["g"].update(connection_count=0),
         r"connection_count: expected a whole number from 1 to"),
        (lambda c: c["groups"]["g"].update(timeout="soon"), r"g\.timeout: expected a number"),
        (lambda c: c["groups"]["g"].update(autocommit="yes"), r"autocommit: expected true"),
        (lambda c: c["groups"]["g"].update(min_size=5, connection_count=2), r"min_size"),
        (lambda c: c["groups"]["g"].update(row_factory="list"), r"row_factory: expected one of"),
        (lambda c: c["db"].update(prot=5), r"db\[0\]\.prot: unknown key \(did you mean 'port'\?\)"),
        (lambda c: c["db"].pop("host"), r"db\[0\]\.host: missing"),
        (lambda c: c.update(type="asyncio"), r"type: expected one of auto, gevent, eventlet"),
        (lambda c: c.pop("db"), r"db: missing"),
        (lambda c: c.update(groups={}), r"groups: no group configured"),
        (lambda c: c["groups"]["g"].update(endpoints=[3]), r"groups\.g\.endpoints: 3 is not"),
    ],
)
def test_bad_config_names_the_key(mutate, message):
    config = base()
    mutate(config)
    with pytest.raises(ConfigError, match=message):
        parse_config(config)


def test_password_never_in_repr_or_errors():
    config = parse_config(base())
    assert "secret-pw" not in repr(config)
    bad = base()
    bad["db"]["port"] = "5432x"
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    assert "secret-pw" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({"db": "postgresql://u:secret-pw@h:notaport/db"})
    assert "secret-pw" not in str(info.value)


def test_pool_creation_does_not_connect():
    """Creating the pool is lazy: it must work before the database is reachable."""
    pool = Pool(dict(base(), type="non-threaded", db={"host": "127.0.0.1", "port": 1}))
    assert pool.stats()["groups"]["g"]["size"] == 0
    pool.close()


# --- values that must be refused at once, not break later ------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ("group", "timeout", NAN, r"groups\.g\.timeout: expected a number of seconds >= 0 and "
                                  r"<= 86400; got nan \(not a finite number\)"),
        ("group", "timeout", INF, r"not a finite number"),
        ("db", "connect_timeout", NAN, r"db\[0\]\.connect_timeout: .*not a finite number"),
        ("db", "statement_timeout", INF, r"statement_timeout: .*not a finite number"),
        ("db", "statement_timeout", NAN, r"statement_timeout: .*not a finite number"),
        ("group", "statement_timeout", 0.0005, r"below 1 ms and would round to 0"),
        ("db", "query_timeout", 0.5, r"query_timeout: 0\.5 ms would round to 0"),
        ("db", "query_timeout", 2**31, r"query_timeout: expected a number of milliseconds"),
        ("top", "quarantine_initial", INF, r"quarantine_initial: .*not a finite number"),
        ("top", "quarantine_max", 10**400, r"quarantine_max: .*not a finite number"),
        ("db", "port", 99999, r"db\[0\]\.port: expected a whole number from 1 to 65535; "
                              r"got 99999"),
        ("db", "port", 0, r"port: expected a whole number from 1 to 65535"),
        ("db", "port", True, r"port: .*got true/false"),
        ("db", "port", 5432.0, r"port: expected a whole number"),
        ("db", "connection_retry_sleep", 0, r"connection_retry_sleep: expected a number of "
                                            r"seconds >= 0\.01"),
        ("db", "connection_retry_sleep", NAN, r"not a finite number"),
        ("db", "host", "a,b", r"db\[0\]\.host: 'a,b': a libpq multi-host list .* list each "
                              r"server as its own entry"),
        ("db", "host", "h\x00", r"host: must not contain a NUL"),
        ("db", "weight", 0, r"weight: expected a whole number from 1 to 1000"),
        ("db", "keepalives", {"keepalives_idle": 10**6}, r"keepalives_idle: .* 0 to 32767"),
        ("db", "options", {"bogus": "1"}, r"options\.bogus: not a libpq connection parameter"),
        ("db", "options", {"host": "x"}, r"options\.host: give it as the endpoint key `host`"),
        ("db", "options", {"sslpassword": None}, r"expected a string or a whole number; got a "
                                                 r"NoneType \(not shown"),
        ("group", "connection_count", True, r"connection_count: .*got true/false"),
        ("group", "max_lifetime", 0.5, r"max_lifetime: expected a number of seconds >= 1"),
        ("group", "endpoints", [0, 0], r"names db\[0\] a second time"),
        ("group", "max_waiting", -1, r"max_waiting: expected a whole number from 0"),
        ("top", "application_name", "", r"application_name: expected a non-empty string"),
    ],
)
def test_out_of_range_values_are_refused_at_once(where, key, value, message):
    config = base()
    target = {"group": config["groups"]["g"], "db": config["db"], "top": config}[where]
    target[key] = value
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(config)
    assert "secret-pw" not in str(info.value)
    assert info.value.__context__ is None


def test_cross_key_rules():
    with pytest.raises(ConfigError, match=r"quarantine_initial: 5 exceeds quarantine_max \(1\)"):
        parse_config(dict(base(), quarantine_initial=5, quarantine_max=1))
    with pytest.raises(ConfigError, match=r"min_size: 3 exceeds connection_count \(2\)"):
        parse_config(base(g={"min_size": 3, "connection_count": 2}))
    with pytest.raises(ConfigError, match=r"min_size: 3 exceeds"):  # through defaults too
        parse_config(dict(base(g={"connection_count": 2}), defaults={"min_size": 3}))
    with pytest.raises(ConfigError, match=r"`pass` and `password` are the same setting"):
        parse_config({"db": {"host": "h", "pass": "a", "password": "b"}})
    with pytest.raises(ConfigError, match=r"db\[1\]: h:5432/app is already db\[0\]"):
        parse_config({"db": [{"host": "h", "name": "app"}, "host=h dbname=app"]})


def test_pass_none_means_no_password():
    (endpoint,) = parse_config({"db": {"host": "h", "pass": None}}).endpoints
    assert endpoint.password is None
    from greenpool.connection import connect_kwargs

    config = parse_config({"db": {"host": "h", "pass": None}})
    assert "password" not in connect_kwargs(endpoint, config.groups["default"], "x")


def test_statement_timeout_zero_means_none_and_1ms_is_kept():
    config = parse_config(base(off={"statement_timeout": 0}, one={"statement_timeout": 0.001}))
    assert config.groups["off"].statement_timeout == 0
    assert config.groups["one"].statement_timeout == 0.001
    from greenpool.connection import connect_kwargs

    (endpoint,) = config.endpoints
    assert "statement_timeout=1 " in connect_kwargs(endpoint, config.groups["one"], "x")[
        "options"] + " "
    assert parse_config({"db": {"host": "h", "query_timeout": 1}}).endpoints[0] \
        .statement_timeout == 0.001


@pytest.mark.parametrize("dsn", [
    "host=a,b dbname=app",
    "host=h port=5432,5433",
    "postgresql://h1:5432,h2:5433/app",
    "host=h hostaddr=10.0.0.1,10.0.0.2",
])
def test_multi_host_dsn_says_to_list_endpoints_separately(dsn):
    with pytest.raises(ConfigError, match=r"list each server as its own entry of `db`"):
        parse_config({"db": dsn})


def test_dsn_override_wins_over_the_dsn():
    (endpoint,) = parse_config({"db": {"dsn": "host=h dbname=a password=x sslmode=require",
                                       "name": "b", "password": "y", "ssl": False,
                                       "options": {"application_name": "z"}}}).endpoints
    assert (endpoint.dbname, endpoint.password, endpoint.sslmode) == ("b", "y", "disable")
    assert endpoint.options == {"application_name": "z"}


def test_endpoint_repr_hides_secret_options():
    (endpoint,) = parse_config({"db": "host=h password=pw1 sslpassword=pw2 sslmode=require"}) \
        .endpoints
    assert endpoint.options == {"sslpassword": "pw2"}
    text = repr(endpoint) + str(endpoint)
    assert "pw1" not in text and "pw2" not in text and "'sslpassword': '***'" in text
    assert endpoint.secrets() == ("pw1", "pw2")


def test_uri_with_an_encoded_at_or_an_at_in_its_query_is_accepted():
    (a, b) = parse_config({"db": ["postgresql://app:p%40ss%2Fw@h1/d?sslmode=require",
                                  "postgresql://h2/d?user=app@tenant"]}).endpoints
    assert (a.host, a.user, a.password, a.dbname) == ("h1", "app", "p@ss/w", "d")
    assert (b.host, b.user) == ("h2", "app@tenant")


TOO_LONG_TO_PRINT = 10**5000  # beyond sys.get_int_max_str_digits(): str() raises ValueError


@pytest.mark.parametrize(("raw", "names"), [
    ({"db": "host=h", "groups": {"g": {"connection_count": TOO_LONG_TO_PRINT}}},
     r"groups\.g\.connection_count"),
    ({"db": {"host": "h", "options": {"application_name": TOO_LONG_TO_PRINT}}},
     r"db\[0\]\.options\.application_name"),
    ({"db": "host=h", "quarantine_initial": TOO_LONG_TO_PRINT}, "quarantine_initial"),
    ({"db": "host=h", "groups": {"g": {"endpoints": [TOO_LONG_TO_PRINT]}}},
     r"groups\.g\.endpoints"),
    ({"db": "host=h", "groups": {TOO_LONG_TO_PRINT: {}}}, r"groups\.<a whole number"),
    ({"db": {"host": "h", TOO_LONG_TO_PRINT: 1}}, r"db\[0\]\.<a whole number .*unknown key"),
])
def test_a_whole_number_too_long_to_print_is_a_config_error(raw, names):
    with pytest.raises(ConfigError, match=names):
        parse_config(raw)


def test_a_bad_default_is_named_where_it_is_written():
    with pytest.raises(ConfigError, match=r"^defaults\.timeout: expected a number"):
        parse_config({"db": "host=h", "defaults": {"timeout": -1}, "groups": {"web": {}}})
    with pytest.raises(ConfigError, match=r"^groups\.web\.min_size: .*\(min_size from "
                                          r"`defaults`\)"):
        parse_config({"db": "host=h", "defaults": {"min_size": 20}, "groups": {"web": {}}})


def test_a_default_every_group_overrides_is_not_checked():
    """As before defaults were named where written: an unused default does not fail."""
    config = parse_config({"db": "host=h", "defaults": {"timeout": -1},
                           "groups": {"web": {"timeout": 5}}})
    assert config.groups["web"].timeout == 5
