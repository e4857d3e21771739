"""pgdbpool's API on greenpool without a server: both import forms are one module, and any
pgdbpool-shaped config inits (connecting to nothing) or is a ConfigError, never modified
(the API against a real server: test_compat_pgdbpool.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import greenpool
import greenpool.compat.pgdbpool as dbpool  # README §5.3: `import pgdbpool as dbpool`
from greenpool.compat.pgdbpool import pool as pool_module  # examples.rst / tests' form


@pytest.fixture(autouse=True)
def closed_after() -> Iterator[None]:
    yield
    dbpool.Connection.close()


def test_both_import_forms_are_one_module() -> None:
    assert pool_module.Connection is dbpool.Connection and pool_module.Handler is dbpool.Handler
    for name in ("DBConnectionError", "DBQueryError", "DBOfflineError",
                 "UnconfiguredGroupError"):
        assert getattr(dbpool, name) is getattr(pool_module, name)


_pgdbpool_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000),
                            st.floats(allow_nan=True), st.text(max_size=8),
                            st.sampled_from(["disable", "require", "127.0.0.1"]))
_db_entry = st.dictionaries(
    st.sampled_from(["host", "name", "user", "pass", "ssl", "connect_timeout",
                     "connection_retry_sleep", "query_timeout", "session_tmp_buffer", "port",
                     "bogus"]), _pgdbpool_value, max_size=6)
_group_spec = st.dictionaries(
    st.sampled_from(["connection_count", "autocommit", "sqlprepare", "connections",
                     "timeout", "bogus"]), _pgdbpool_value, max_size=4)
_pgdbpool_configs = st.fixed_dictionaries(
    {"db": st.one_of(_db_entry, st.lists(_db_entry, max_size=3))},
    optional={"type": st.sampled_from(["threaded", "non-threaded", "gevent", "fibers", 3]),
              "groups": st.dictionaries(st.text(max_size=4), _group_spec, max_size=3)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_pgdbpool_configs)
def test_any_pgdbpool_config_inits_or_is_a_config_error_and_is_left_unchanged(
        config: dict[str, Any]) -> None:
    """``init`` connects to nothing, so this needs no server: whatever pgdbpool-shaped dict
    comes in, it is accepted or refused with a ConfigError, and never modified (pgdbpool
    wrote its connections into it)."""
    before = copy.deepcopy(config)
    try:
        dbpool.Connection.init(config)
    except greenpool.ConfigError as exc:
        assert str(exc).split(":", 1)[0]
    else:
        assert dbpool.Connection.get_threading_model() == config.get("type", "threaded")
    finally:
        dbpool.Connection.close()
    assert config == before  # (a NaN compares equal here: deepcopy keeps the same float)



@pytest.mark.parametrize("config", [
    {"type": 10**5000, "db": {"host": "h"}},  # beyond what str()/repr() will write out
    {"db": {"host": "h"}, "groups": {10**5000: {"sqlprepare": True}}},
])
def test_a_whole_number_too_long_to_print_is_a_config_error(config: dict[str, Any]) -> None:
    with pytest.raises(greenpool.ConfigError, match="a whole number of"):
        dbpool.Connection.init(config)
