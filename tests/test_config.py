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
        (lambda c: c.update(type="asyncio"), r"type: expected one of gevent, eventlet"),
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
