"""pgdbpool's documented usage, run unchanged on ``greenpool.compat.pgdbpool``, on a real server.

Why hand-transcribed usages rather than examples read from the pgdbpool distribution at test
time: pgdbpool 1.0.2's distribution (sdist and wheel) ships only its code and README, and the
README's blocks are fragments (placeholder hosts, ``{ ... }``, a ``config`` defined
elsewhere). Its worked examples live only in the repository's Sphinx docs
(``doc/.../examples.rst``, ``config.rst``) and its tests (``test/unit/test_pool.py``), which
are not published. So each documented usage is a test below, written as a pgdbpool user
writes it, with only the import line changed and the host/credentials pointed at the
throwaway server; each names its source. The port comes from ``PGPORT``, as it must for
pgdbpool users (its config has no ``port``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from leaks import texts
from modes import Timeout, join_all, spawn, wait_until

import greenpool
import greenpool.compat.pgdbpool as dbpool  # README §5.3: `import pgdbpool as dbpool`
from greenpool.compat.pgdbpool import pool as pool_module  # examples.rst / tests' form
from greenpool.testing.postgres import free_port


@pytest.fixture
def table(pg: Any) -> Iterator[str]:
    pg.execute("DROP TABLE IF EXISTS table1, table2, testtable1; "
               "CREATE TABLE table1 (v text); CREATE TABLE table2 (v text); "
               "CREATE TABLE testtable1 (col1 int, col2 text); "
               "INSERT INTO testtable1 VALUES (1, 'one'), (2, 'two')")
    yield "table1"
    pg.execute("DROP TABLE IF EXISTS table1, table2, testtable1")


@pytest.fixture
def db_entry(pg: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One of pgdbpool's ``db`` dicts for the shared server; its port travels in PGPORT."""
    monkeypatch.setenv("PGPORT", str(pg.port))
    return {"host": pg.host, "name": pg.dbname, "user": pg.user, "pass": pg.password}


@pytest.fixture(autouse=True)
def closed_after() -> Iterator[None]:
    yield
    dbpool.Connection.close()


def values(pg: Any, table: str) -> list[str]:
    return [v for (v,) in pg.execute(f"SELECT v FROM {table} ORDER BY v")]


def test_readme_manual_transaction_control(pg: Any, db_entry: dict, table: str) -> None:
    """README §5.3, with §5.1's config shape: two inserts, then ``db.commit()``."""
    config = {"db": [db_entry], "groups": {"group1": {"connection_count": 20,
                                                      "autocommit": False}}}
    dbpool.Connection.init(config)
    with dbpool.Handler("group1") as db:
        db.query("INSERT INTO table1 VALUES (%s)", ("value1",))
        db.query("INSERT INTO table2 VALUES (%s)", ("value2",))
        assert values(pg, "table1") == []  # not visible before the commit
        db.commit()
        assert values(pg, "table1") == ["value1"]
    assert values(pg, "table2") == ["value2"]


def test_handler_docstring_iterates_the_query(db_entry: dict, table: str) -> None:
    """pool.py's Handler docstring: ``for rec in db.query(sql): print(str(rec))``."""
    dbpool.Connection.init({"db": db_entry, "groups": {"group1": {"connection_count": 2}}})
    seen = []
    with dbpool.Handler("group1") as db:
        for rec in db.query("select * from testtable1 order by col1"):
            seen.append(str(rec))
    assert seen == ["[1, 'one']", "[2, 'two']"]  # DictRow's str, as pgdbpool printed


def test_examples_rst_wsgi_script(pg: Any, db_entry: dict, table: str) -> None:
    """doc/examples.rst: DBConfig.config1 with every db key, and the WSGI ``application``
    that yields rows from inside the ``with`` block."""
    config1 = {
        "db": {**db_entry, "ssl": "disable", "connect_timeout": 30,
               "connection_retry_sleep": 1, "query_timeout": 30000, "session_tmp_buffer": 128},
        "groups": {"db1": {"connection_count": 3, "autocommit": True}},
    }
    dbpool = pool_module  # examples.rst: `from dbpool import pool as dbpool`
    dbpool.Connection.init(config1)

    def application(environ: dict, start_response: Any) -> Iterator[Any]:
        if environ["REQUEST_METHOD"].upper() == "POST":
            try:
                start_response("200 OK", [("Content-Type", "application/json; charset=UTF-8")])
                sql = """SELECT col1, col2 FROM testtable1"""
                with dbpool.Handler("db1") as db:
                    for rec in db.query(sql):  # noqa: UP028 (the example, as written)
                        yield rec
            except Exception:
                yield "500 Internal Server Error"

    statuses: list[str] = []
    body = list(application({"REQUEST_METHOD": "post"}, lambda s, h: statuses.append(s)))
    assert statuses == ["200 OK"]
    assert sorted((r[0], r["col2"]) for r in body) == [(1, "one"), (2, "two")]
    with dbpool.Handler("db1") as db:  # query_timeout is milliseconds, as in pgdbpool
        assert db.query("SHOW statement_timeout").fetchone()[0] == "30s"


def test_config_rst_multi_group_example(pg: Any, db_entry: dict, table: str) -> None:
    """doc/config.rst §7: an autocommit and a transactional group on one endpoint, with
    §2's ``'ssl': False``."""
    config = {"db": {**db_entry, "ssl": False},
              "groups": {"group1": {"connection_count": 50, "autocommit": True},
                         "group2": {"connection_count": 30, "autocommit": False}}}
    dbpool.Connection.init(config)
    with dbpool.Handler("group1") as db:
        assert db.conn_ref.autocommit is True
        db.query("INSERT INTO table1 VALUES ('auto')")
        assert values(pg, "table1") == ["auto"]  # committed at once
    with dbpool.Handler("group2") as db:
        assert db.conn_ref.autocommit is False
    assert dbpool.Connection.get_max_pool_size("group2") == 30


def test_conn_ref_after_the_block_reads_as_it_was_and_refuses_use(db_entry: dict,
                                                                  table: str) -> None:
    """pgdbpool code reads ``db.conn_ref`` after its block (pgdbpool's connections stay open
    and reachable). Ours is back in the pool and lent again at once here (a group of one):
    ``conn_ref`` reads as it was at the block's end, and any use raises InterfaceError
    instead of reaching the next borrower's session."""
    config = {"db": db_entry,
              "groups": {"group1": {"connection_count": 1, "autocommit": True},
                         "group2": {"connection_count": 1, "autocommit": False}}}
    dbpool.Connection.init(config)
    with dbpool.Handler("group1") as db:
        raw = db.conn_ref
        db.query("INSERT INTO table1 VALUES ('auto')")
    ref = db.conn_ref
    assert ref is not raw
    assert ref.autocommit is True and ref.closed == 0 and "password=xxx" in ref.dsn
    with dbpool.Handler("group1") as other:
        assert other.conn_ref is raw  # the same connection, now another block's
        for method in ("cursor", "commit", "rollback", "close"):
            with pytest.raises(psycopg2.InterfaceError, match="back to the pool"):
                getattr(ref, method)()
        with pytest.raises(psycopg2.InterfaceError, match="back to the pool"):
            ref.autocommit = False
        assert other.query("SELECT v FROM table1").fetchall() == [["auto"]]
        assert raw.autocommit is True and not raw.closed
    with dbpool.Handler("group2") as db:
        db.query("SELECT 1")
    assert db.conn_ref.autocommit is False


def test_readme_multiple_endpoints(pg: Any, pg_factory: Any, db_entry: dict,
                                   table: str) -> None:
    """README §5.1: two servers in ``db``; connections go to both. (Two throwaway servers
    need two ports, so each entry names its ``port``: PGPORT can carry only one.)"""
    other = pg_factory()
    config = {"db": [{**db_entry, "port": pg.port}, {**other.endpoint(), "port": other.port}],
              "groups": {"default": {"connection_count": 20, "autocommit": True}}}
    dbpool.Connection.init(config)
    ports: set[int] = set()

    def hold(release: threading.Event | Any) -> None:
        with dbpool.Handler("default") as db:
            ports.add(db.query("SELECT inet_server_port()").fetchone()[0])
            wait_until(lambda: len(ports) >= 2 or release.is_set(), 10, "both servers")

    done = threading.Event()
    tasks = [spawn(hold, done) for _ in range(8)]
    try:
        wait_until(lambda: len(ports) >= 2, 15, "connections to both endpoints")
    finally:
        done.set()
        join_all(tasks, 15)
    assert ports == {pg.port, other.port}
    assert all(t.error is None for t in tasks), [t.error for t in tasks]


@pytest.mark.parametrize("kind", [None, "threaded", "non-threaded"])
def test_readme_threading_models(db_entry: dict, mode: str, kind: str | None,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """README §5.2: ``type`` threaded (or omitted) / non-threaded. "threaded" means
    concurrent callers, so it runs on what this process runs on, and says which."""
    config: dict[str, Any] = {"db": db_entry, "groups": {"g": {"connection_count": 2}}}
    if kind is not None:
        config["type"] = kind
    dbpool.Connection.init(config)
    assert dbpool.Connection.get_threading_model() == (kind or "threaded")
    with caplog.at_level(logging.INFO, logger="greenpool"), dbpool.Handler("g") as db:
        assert db.query("SELECT 1").fetchone()[0] == 1
    expected = "non-threaded" if kind == "non-threaded" else mode
    assert dbpool.Connection.pool().config.mode == expected
    assert any(f"greenpool's {expected!r} mode" in r.getMessage() for r in caplog.records)


def test_rows_read_by_index_and_by_name_and_cursor_api(db_entry: dict, table: str) -> None:
    dbpool.Connection.init({"db": db_entry, "groups": {"g": {"connection_count": 2,
                                                             "autocommit": True}}})
    with dbpool.Handler("g") as db:
        row = db.query("SELECT col1, col2 FROM testtable1 WHERE col1 = %s", (2,)).fetchone()
        assert (row[0], row[1], row["col1"], row["col2"]) == (2, "two", 2, "two")
        assert dict(row) == {"col1": 2, "col2": "two"}
        assert db.query("UPDATE testtable1 SET col2 = col2 WHERE col1 > 0").rowcount == 2
        assert isinstance(db.query("SELECT 1"), psycopg2.extras.DictCursor)
        rows = db.query("SELECT col1 FROM testtable1 ORDER BY col1").fetchall()
    assert [r["col1"] for r in rows] == [1, 2]  # still readable after the block


def test_an_exception_rolls_back_where_pgdbpool_committed(pg: Any, db_entry: dict,
                                                          table: str) -> None:
    dbpool.Connection.init({"db": db_entry, "groups": {"g": {"connection_count": 1}}})
    with pytest.raises(KeyError), dbpool.Handler("g") as db:
        db.query("INSERT INTO table1 VALUES ('lost')")
        raise KeyError("app bug")
    with dbpool.Handler("g") as db:  # the clean exit commits without db.commit()
        db.query("INSERT INTO table1 VALUES ('kept')")
    assert values(pg, "table1") == ["kept"]


def test_query_error_is_db_query_error_and_the_block_rolls_back(
        pg: Any, db_entry: dict, table: str) -> None:
    dbpool.Connection.init({"db": db_entry, "groups": {"g": {"connection_count": 1}}})
    with pytest.raises(dbpool.DBQueryError) as info, dbpool.Handler("g") as db:
        db.query("INSERT INTO table1 VALUES ('x')")
        db.query("SELEC 1")
    assert info.value.pgcode == "42601" and "SyntaxError" in str(info.value)
    assert isinstance(info.value.__cause__, psycopg2.errors.SyntaxError)
    assert values(pg, "table1") == []
    with dbpool.Handler("g") as db:  # the connection came back clean
        assert db.query("SELECT 2").fetchone()[0] == 2


def test_pgdbpool_session_defaults(db_entry: dict) -> None:
    """pgdbpool applies statement_timeout 5 s and temp_buffers 128 MB to every connection."""
    dbpool.Connection.init({"db": db_entry, "groups": {"g": {"connection_count": 1}}})
    with dbpool.Handler("g") as db:
        assert db.query("SHOW statement_timeout").fetchone()[0] == "5s"
        assert db.query("SHOW temp_buffers").fetchone()[0] == "128MB"


def test_unconfigured_group_and_uninitialised_pool(db_entry: dict) -> None:
    """pgdbpool's test_handler_non_existing_group, and a Handler before init."""
    with pytest.raises(dbpool.UnconfiguredGroupError, match=r"Connection\.init"):
        dbpool.Handler("group1")
    dbpool.Connection.init({"db": db_entry, "groups": {"group1": {"connection_count": 5}}})
    with pytest.raises(dbpool.UnconfiguredGroupError, match="group2"), \
            dbpool.Handler("group2") as db:
        db.query("SELECT * FROM test")
    assert issubclass(dbpool.UnconfiguredGroupError, greenpool.ConfigError)


def test_init_validates_at_once_and_connects_lazily(db_entry: dict) -> None:
    with pytest.raises(greenpool.ConfigError, match=r"groups\.g\.connection_cout"):
        dbpool.Connection.init({"db": db_entry, "groups": {"g": {"connection_cout": 3}}})
    with pytest.raises(greenpool.ConfigError, match="sqlprepare"):
        dbpool.Connection.init({"db": db_entry, "groups": {"g": {"sqlprepare": True}}})
    config = {"db": db_entry, "groups": {"g": {"connection_count": 3, "sqlprepare": False}}}
    dbpool.Connection.init(config)
    assert dbpool.Connection._pool is None  # made by the first Handler, in its process
    assert config == {"db": db_entry, "groups": {"g": {"connection_count": 3,
                                                       "sqlprepare": False}}}


def test_waits_for_a_busy_pool_then_times_out_as_db_connection_error(
        db_entry: dict) -> None:
    """pgdbpool's test_threaded_wait_free_connection: 7 callers, 5 connections, all served;
    then an exhausted group raises after its timeout instead of waiting for ever."""
    dbpool.Connection.init({"db": db_entry, "groups": {"group1": {"connection_count": 5,
                                                                  "timeout": 10}}})

    def use(seconds: float) -> None:
        with dbpool.Handler("group1") as db:
            db.query("SELECT pg_sleep(%s)", (seconds,))

    tasks = [spawn(use, 0.3) for _ in range(5)] + [spawn(use, 0) for _ in range(2)]
    join_all(tasks, 30)
    assert [t.error for t in tasks] == [None] * 7
    assert dbpool.Connection.pool().stats()["groups"]["group1"]["size"] <= 5

    holding: list[int] = []
    release = threading.Event()

    def hold() -> None:
        with dbpool.Handler("group1"):
            holding.append(1)
            wait_until(release.is_set, 20, "release")

    holders = [spawn(hold) for _ in range(5)]
    try:
        wait_until(lambda: len(holding) == 5, 10, "all five connections held")
        with pytest.raises(dbpool.DBConnectionError) as info, \
                dbpool.Handler("group1", timeout=0.2):
            pass
        assert not isinstance(info.value, dbpool.DBOfflineError)
        assert isinstance(info.value.__cause__, greenpool.PoolTimeout)
    finally:
        release.set()
        join_all(holders, 20)


def test_no_server_is_db_offline_error(pg: Any) -> None:
    port = free_port()
    dbpool.Connection.init({"db": {**pg.endpoint(), "port": port},
                            "groups": {"g": {"connection_count": 1, "timeout": 0.5}},
                            "quarantine_initial": 0.05})
    with pytest.raises(dbpool.DBOfflineError) as info, dbpool.Handler("g"):
        pass
    assert isinstance(info.value, dbpool.DBConnectionError)
    assert str(port) in str(info.value)


def test_wrong_password_is_db_connection_error_without_the_password(
        pg: Any, db_entry: dict, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Compat-Wrong-Pw-51"
    dbpool.Connection.init({"db": {**db_entry, "pass": secret},
                            "groups": {"g": {"connection_count": 1, "timeout": 3}}})
    with caplog.at_level(logging.DEBUG, logger="greenpool"), \
            pytest.raises(dbpool.DBConnectionError) as info, dbpool.Handler("g") as db:
        db.query("SELECT 1")
    everything = [*texts(info.value), repr(dbpool.Connection.pool()),
                  repr(dbpool.Connection.pool().config),
                  *(r.getMessage() for r in caplog.records)]
    assert all(secret not in text for text in everything)


@pytest.mark.skipif(Timeout is None, reason="a green timeout interrupts a query only in the "
                                            "green modes")
def test_a_query_interrupted_by_a_timeout_loses_no_slot(pg: Any, db_entry: dict) -> None:
    """A BaseException (gevent's/eventlet's Timeout) passes through the compat handler as it
    is, not as DBQueryError, and the group's only connection slot comes back."""
    dbpool.Connection.init({"db": db_entry, "groups": {"g": {"connection_count": 1,
                                                             "timeout": 5}}})
    with pytest.raises(Timeout), Timeout(0.2), dbpool.Handler("g") as db:
        db.query("SELECT pg_sleep(5)")
    with dbpool.Handler("g", timeout=2) as db:
        assert db.query("SELECT 3").fetchone()[0] == 3
    wait_until(lambda: not pg.execute("SELECT 1 FROM pg_stat_activity "
                                      "WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'"),
               5, "the interrupted statement cancelled on the server")


