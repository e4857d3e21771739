"""SQLAlchemy 2.x ORM on greenpool (``greenpool.sqlalchemy``).

Real ORM models on real servers in every mode (gevent: ``monkey.patch_all()``, see
conftest.py): CRUD, an exception rolling a transaction back, one reset per return, no pool on
top of greenpool's, invalidation reaching greenpool's eviction, a greenlet killed mid-flush,
and a primary lost (``pg_ctl stop -m immediate``) while its standby is promoted.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import pytest
from modes import GREEN, MODE, Timeout, join_all, sleep, spawn, wait_until

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import ForeignKey, String, func, select, text  # noqa: E402
from sqlalchemy.exc import DBAPIError, OperationalError  # noqa: E402
from sqlalchemy.orm import (  # noqa: E402
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from greenpool import ConfigError, PoolError, PoolTimeout  # noqa: E402
from greenpool.sqlalchemy import (  # noqa: E402
    GreenpoolPool,
    RoutingSession,
    create_engine,
    engine_options,
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "sqla_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    orders: Mapped[list[Order]] = relationship(back_populates="user",
                                               cascade="all, delete-orphan")


class Order(Base):
    __tablename__ = "sqla_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("sqla_users.id"))
    item: Mapped[str] = mapped_column(String(50))
    user: Mapped[User] = relationship(back_populates="orders")


APP = "sqla-test"


def kill(task: Any) -> None:
    """Raise GreenletExit in a green task and wait for it to end."""
    if MODE == "gevent":
        task._handle.kill(block=True, timeout=10)
    else:
        task._handle.kill()
    assert task.join(10)


@pytest.fixture
def tables(pg: Any) -> Iterator[None]:
    pg.execute("DROP TABLE IF EXISTS sqla_orders, sqla_users")
    pg.execute("CREATE TABLE sqla_users (id serial PRIMARY KEY, name varchar(50) UNIQUE)")
    pg.execute("CREATE TABLE sqla_orders (id serial PRIMARY KEY, "
               "user_id int REFERENCES sqla_users(id), item varchar(50))")
    yield
    pg.execute("DROP TABLE IF EXISTS sqla_orders, sqla_users")


def group_stats(pool: Any, name: str = "write") -> dict[str, Any]:
    return pool.stats()["groups"][name]  # type: ignore[no-any-return]


# --- the engine ---------------------------------------------------------------------------


def test_orm_crud_on_a_greenpool_engine(make_pool, tables, pg):
    """Create, read, update, delete through ORM sessions; every loan comes back."""
    pool = make_pool({"write": {"connection_count": 2}}, application_name=APP)
    engine = create_engine(pool, "write")
    assert isinstance(engine.pool, GreenpoolPool)
    with Session(engine) as session, session.begin():
        session.add(User(name="ada", orders=[Order(item="book"), Order(item="pen")]))
    with Session(engine) as session:
        ada = session.scalars(select(User).where(User.name == "ada")).one()
        assert sorted(o.item for o in ada.orders) == ["book", "pen"]  # a lazy load
        ada.name = "ada l."
        session.commit()
    assert pg.execute("SELECT name FROM sqla_users") == [("ada l.",)]
    with Session(engine) as session, session.begin():
        session.delete(session.scalars(select(User)).one())
    assert pg.execute("SELECT count(*) FROM sqla_orders") == [(0,)]
    stats = group_stats(pool)
    assert stats["in_use"] == 0
    assert stats["size"] == stats["idle"] == 1  # one connection served every session
    assert stats["discards"] == 0


def test_an_exception_rolls_the_transaction_back_with_one_rollback(pg_factory, make_pool):
    """The ORM's transaction ends with one ROLLBACK on the server (SQLAlchemy's own, as the
    Connection ends its transaction); neither pool adds a second rollback, and a clean loan
    is not reset with DISCARD ALL."""
    server = pg_factory(settings={"log_statement": "all", "log_line_prefix": "%a|"})
    server.execute("CREATE TABLE sqla_users (id serial PRIMARY KEY, name varchar(50) UNIQUE)")
    server.execute("CREATE TABLE sqla_orders (id serial PRIMARY KEY, "
                   "user_id int REFERENCES sqla_users(id), item varchar(50))")
    pool = make_pool({"write": {"connection_count": 1}}, db=server.endpoint(),
                     application_name="sqla-once")
    engine = create_engine(pool, "write")
    with Session(engine) as session, session.begin():  # opens the connection first
        session.add(User(name="first"))

    def logged(word: str) -> int:
        lines = server.logfile.read_text(errors="replace").splitlines()
        return sum(1 for ln in lines if ln.startswith("sqla-once|") and f"statement: {word}"
                   in ln)

    before_rollbacks, before_discards = logged("ROLLBACK"), logged("DISCARD ALL")
    with pytest.raises(ValueError), Session(engine) as session, session.begin():
        session.add(User(name="doomed"))
        session.flush()  # the INSERT reached the server
        raise ValueError("boom")
    assert server.execute("SELECT name FROM sqla_users ORDER BY id") == [("first",)]
    wait_until(lambda: logged("ROLLBACK") > before_rollbacks, 5, "the ROLLBACK in the log")
    with Session(engine) as session, session.begin():  # the log is written in order
        session.execute(text("SELECT 'marker'"))  # committed: no ROLLBACK of its own
    wait_until(lambda: logged("SELECT 'marker'") == 1, 5, "the marker in the log")
    assert logged("ROLLBACK") == before_rollbacks + 1
    # the INSERT's loan is reset (its serial default set currval/lastval for the session);
    # the marker's loan is clean: no reset
    assert logged("DISCARD ALL") == before_discards + 1
    stats = group_stats(pool)
    assert (stats["in_use"], stats["idle"], stats["discards"]) == (0, 1, 0)


def test_a_loan_that_changed_the_session_is_reset_before_the_next(make_pool, tables):
    pool = make_pool({"write": {"connection_count": 1}})
    engine = create_engine(pool, "write")
    with engine.connect() as conn:
        conn.execute(text("SET work_mem = '7MB'"))
        assert conn.execute(text("SHOW work_mem")).scalar() == "7MB"
    with engine.connect() as conn:
        assert conn.execute(text("SHOW work_mem")).scalar() != "7MB"
    assert group_stats(pool)["connects"] == 1  # the same connection, reset, not replaced


def test_a_connect_listener_setup_survives_every_reset_and_stays_the_engines(make_pool, pg):
    """SQLAlchemy's documented recipe: ``SET search_path`` in a ``connect`` listener. A dirty
    loan's ``DISCARD ALL`` wipes it; the engine runs its listeners again before the next
    checkout. Another borrower of the same group never inherits the engine's setup."""
    pg.execute("CREATE SCHEMA IF NOT EXISTS sqla_tenant")
    pool = make_pool({"write": {"connection_count": 1}})
    engine = create_engine(pool, "write")
    ran = []

    @sqlalchemy.event.listens_for(engine, "connect")
    def set_search_path(dbapi_connection: Any, record: Any) -> None:
        ran.append(1)
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        with dbapi_connection.cursor() as cur:
            cur.execute("SET search_path = sqla_tenant, public")
        dbapi_connection.autocommit = autocommit

    for _ in range(3):
        with engine.connect() as conn:
            assert conn.execute(text("SHOW search_path")).scalar() == "sqla_tenant, public"
            conn.execute(text("SET work_mem = '7MB'"))  # a dirty loan: DISCARD ALL on return
    with pool.handler("write") as db:  # the group's session, not the engine's
        assert db.query_one("SHOW search_path")[0] == '"$user", public'
        db.query("SET work_mem = '5MB'")  # a dirty loan: reset again
    with Session(engine) as session:
        assert session.execute(text("SHOW search_path")).scalar() == "sqla_tenant, public"
    assert len(ran) == 4
    assert group_stats(pool)["connects"] == 1  # the same connection throughout


def test_a_connect_listener_that_fails_when_run_again_costs_its_connection_not_a_slot(
        make_pool, pg):
    """Run again after a reset, a listener that raises fails that checkout, as a failed
    ``connect`` listener does under SQLAlchemy's own pools: the connection is discarded,
    its slot is free, and the next checkout sets up a new connection."""
    pool = make_pool({"write": {"connection_count": 1}})
    engine = create_engine(pool, "write")
    calls = []

    @sqlalchemy.event.listens_for(engine, "connect")
    def flaky(dbapi_connection: Any, record: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("listener failed")
        with dbapi_connection.cursor() as cur:
            cur.execute("SET application_name = 'set-up'")
        dbapi_connection.commit()

    with engine.connect() as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == "set-up"
    with pytest.raises(RuntimeError, match="listener failed"), engine.connect():
        pass
    assert group_stats(pool)["in_use"] == 0
    with engine.connect() as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == "set-up"
    stats = group_stats(pool)
    assert stats["connects"] == 2 and stats["in_use"] == 0 and len(calls) == 3


def test_raw_connections_and_isolation_levels_start_from_the_configured_session(
    make_pool, tables
):
    """A ``SET`` through a cursor of ``engine.raw_connection()`` is seen (DISCARD ALL on
    return); a per-connection isolation level (which psycopg2 keeps as session state)
    makes greenpool replace the connection."""
    pool = make_pool({"write": {"connection_count": 1}})
    engine = create_engine(pool, "write")
    raw = engine.raw_connection()
    with raw.cursor() as cur:
        cur.execute("SET work_mem = '9MB'")
    raw.commit()
    raw.close()
    serializable = engine.execution_options(isolation_level="SERIALIZABLE")
    with serializable.connect() as conn:
        assert conn.execute(text("SHOW work_mem")).scalar() != "9MB"
        assert conn.execute(text("SHOW transaction_isolation")).scalar() == "serializable"
    with engine.connect() as conn:
        assert conn.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
    stats = group_stats(pool)
    assert stats["discards_by_reason"] == {"session_changed": 1}
    assert stats["in_use"] == 0


def the_next_borrowers_session(pool: Any) -> tuple[str, str, int]:
    """work_mem, search_path and backend pid as a plain handler of the group finds them."""
    with pool.handler("write") as db:
        row = db.query_one("SELECT current_setting('work_mem'), "
                           "current_setting('search_path'), pg_backend_pid()")
    return row[0], row[1], row[2]


@pytest.mark.parametrize("factory", [None, "RealDictCursor", "DictCursor", "NamedTupleCursor",
                                     "a function"])
def test_a_set_through_a_raw_cursor_of_a_connection_does_not_reach_the_next_borrower(
        make_pool, factory):
    """``conn.connection.cursor()`` (the pandas/COPY idiom), with any cursor class: the
    statement is seen, so the loan is reset before the next borrower of the group gets the
    same server connection. A factory that is a function cannot be watched: it makes the
    loan dirty at once."""
    import psycopg2.extras

    pool = make_pool({"write": {"connection_count": 1}})
    configured = the_next_borrowers_session(pool)
    engine = create_engine(pool, "write")
    kwargs = {} if factory is None else {"cursor_factory": (
        (lambda conn, name: psycopg2.extensions.cursor(conn, name)) if factory == "a function"
        else getattr(psycopg2.extras, factory))}
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        with conn.connection.cursor(**kwargs) as cur:
            cur.execute("SET work_mem = '1111kB'")
        conn.commit()
    assert the_next_borrowers_session(pool) == configured


def test_a_raw_server_side_cursor_kept_past_its_loan_cannot_reach_the_next_borrower(
        make_pool):
    """A named ``WITH HOLD`` cursor of any class, left open: the loan is reset (no cursor
    stays on the server) and a fetch after the loan raises instead of reaching the next
    borrower's connection."""
    import psycopg2
    import psycopg2.extras

    pool = make_pool({"write": {"connection_count": 1}})
    engine = create_engine(pool, "write")
    with engine.connect() as conn:
        kept = conn.connection.cursor("kept", cursor_factory=psycopg2.extras.NamedTupleCursor,
                                      withhold=True)
        kept.itersize = 1
        kept.execute("SELECT generate_series(1, 5) AS n")
        assert kept.fetchone().n == 1
        conn.commit()
    with pool.handler("write") as db:
        assert db.query_one("SELECT count(*) FROM pg_cursors")[0] == 0
        with pytest.raises(psycopg2.InterfaceError, match="already given back"):
            kept.fetchone()
        kept.close()  # sends nothing: this block's transaction is untouched
        assert db.query_one("SELECT 1")[0] == 1


def test_a_checkout_listener_setup_does_not_reach_the_next_borrower(make_pool, pg):
    """A ``checkout`` listener's per-loan setup (a tenant's search_path, committed) holds
    for the engine's loan and is reset before another borrower of the group gets the same
    server connection."""
    pg.execute("CREATE SCHEMA IF NOT EXISTS sqla_tenant_a")
    pool = make_pool({"write": {"connection_count": 1}})
    configured = the_next_borrowers_session(pool)
    engine = create_engine(pool, "write")

    @sqlalchemy.event.listens_for(engine, "checkout")
    def tenant(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute("SET search_path TO sqla_tenant_a")
        dbapi_connection.commit()  # (else the Connection's rollback would undo the SET)

    with engine.connect() as conn:
        assert conn.execute(text("SHOW search_path")).scalar() == "sqla_tenant_a"
    assert the_next_borrowers_session(pool) == configured


def test_a_checkout_listener_that_reads_leaves_the_loan_clean(make_pool):
    """A loan starts clean before the listeners run: one that only reads costs no reset."""
    pool = make_pool({"write": {"connection_count": 1}})
    engine = create_engine(pool, "write")

    @sqlalchemy.event.listens_for(engine, "checkout")
    def look(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute("SELECT 1")

    def resets() -> int:  # how many times DISCARD ALL ran on the group's one connection
        with engine.connect() as conn:
            pc = engine.pool.loan_of(conn.connection.dbapi_connection)
            return int(pc.resets)

    before = resets()  # (the first connect: the dialect's set-up ran too)
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert resets() == before
    with engine.connect() as conn:
        conn.execute(text("CREATE TEMP TABLE sqla_marker (x int)"))
        conn.commit()
    assert resets() == before + 1


def test_no_pool_on_top_of_greenpool(make_pool, tables, server_conns):
    """20 tasks share a group of 3 through the engine: never more than 3 server connections,
    waits in greenpool's line; SQLAlchemy's pool-sizing arguments are refused."""
    pool = make_pool({"write": {"connection_count": 3, "timeout": 20}},
                     application_name="sqla-bound")
    engine = create_engine(pool, "write")
    peak = [0]

    def work(i: int) -> None:
        for j in range(5):
            with Session(engine) as session, session.begin():
                session.add(User(name=f"u{i}-{j}"))
                session.flush()
                session.execute(text("SELECT pg_sleep(0.01)"))
                peak[0] = max(peak[0], group_stats(pool)["size"])

    join_all([spawn(work, i) for i in range(20)], 60)
    assert peak[0] <= 3
    assert server_conns(application_name="sqla-bound") <= 3
    stats = group_stats(pool)
    assert stats["in_use"] == 0 and stats["size"] <= 3
    if GREEN:
        assert stats["waits"] > 0  # they queued in greenpool's line, not in SQLAlchemy's
    for key, value in (("pool_size", 5), ("max_overflow", 10), ("poolclass", None),
                       ("pool_recycle", 60), ("isolation_level", "AUTOCOMMIT")):
        with pytest.raises(ConfigError, match=key):
            create_engine(pool, "write", **{key: value})


def test_flask_style_engine_options_and_the_process_wide_pool(pg, tables, mode):
    """``sqlalchemy.create_engine(url, **engine_options(group=...))`` (what
    Flask-SQLAlchemy's SQLALCHEMY_ENGINE_OPTIONS passes) on ``greenpool.init``'s pool,
    created after the engine; and the URL form ``?plugin=greenpool&greenpool_group=``."""
    import greenpool

    engine = sqlalchemy.create_engine("postgresql+psycopg2://", **engine_options(group="w"))
    by_url = sqlalchemy.create_engine("postgresql+psycopg2:///?plugin=greenpool&greenpool_group=w")
    greenpool.init({"type": mode, "db": pg.endpoint(), "groups": {"w": {"connection_count": 1}}})
    try:
        for eng in (engine, by_url):
            with Session(eng) as session, session.begin():
                session.add(User(name=f"via-{id(eng)}"))
        assert pg.execute("SELECT count(*) FROM sqla_users") == [(2,)]
        assert greenpool.stats()["groups"]["w"]["connects"] == 1
        greenpool.close()  # a new process-wide pool: the engine follows it
        greenpool.init({"type": mode, "db": pg.endpoint(),
                        "groups": {"w": {"connection_count": 1}}})
        with Session(engine) as session:
            assert session.scalars(select(func.count(User.id))).one() == 2
        assert greenpool.stats()["groups"]["w"]["acquires"] >= 1
    finally:
        greenpool.close()


def test_bad_engine_options_are_refused_at_once(make_pool):
    """Bad input to the plugin is a ConfigError at create_engine, never at first use."""
    pool = make_pool({"write": {"connection_count": 1}})
    url = "postgresql+psycopg2://"
    with pytest.raises(ConfigError, match="greenpool_group"):
        sqlalchemy.create_engine(url, plugins=["greenpool"], greenpool_pool=pool)
    with pytest.raises(ConfigError, match="'reed' is not configured"):
        create_engine(pool, "reed")
    with pytest.raises(ConfigError, match="greenpool_timeout"):
        create_engine(pool, "write", timeout="soon")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="greenpool_timeout"):
        sqlalchemy.create_engine(url + "?plugin=greenpool&greenpool_group=write"
                                 "&greenpool_timeout=-1", greenpool_pool=pool)
    with pytest.raises(ConfigError, match="pool: the greenpool plugin"):
        sqlalchemy.create_engine(url, **engine_options(pool, "write"), pool=object())
    engine = sqlalchemy.create_engine(url + "?plugin=greenpool&greenpool_group=write"
                                      "&greenpool_timeout=0.25", greenpool_pool=pool)
    assert engine.pool._timeout == 0.25
    assert "greenpool" not in str(engine.url)  # the plugin's keys are not connect arguments


# --- invalidation, interruption -----------------------------------------------------------


def test_a_connection_sqlalchemy_invalidates_is_discarded_by_greenpool(make_pool, tables, pg):
    """A server-side kill: SQLAlchemy sees a disconnect and invalidates the connection;
    greenpool discards it (its slot freed), evicts its idle peers on that server, and the
    engine's next session works on a fresh connection. ``invalidate()`` by hand too."""
    pool = make_pool({"write": {"connection_count": 3}})
    engine = create_engine(pool, "write")
    group = pool.group("write")
    for pc in [group.acquire() for _ in range(3)]:  # three open connections, idle
        group.release(pc)
    with pytest.raises(DBAPIError) as caught, engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
        conn.execute(text("SELECT 1"))
    assert caught.value.connection_invalidated
    stats = group_stats(pool)
    assert stats["discards_by_reason"].get("invalidated") == 1
    assert stats["discards_by_reason"].get("evicted") == 2  # its idle peers, at once
    assert stats["in_use"] == 0
    with Session(engine) as session, session.begin():
        session.add(User(name="after"))
    with engine.connect() as conn:
        conn.invalidate()
    stats = group_stats(pool)
    assert stats["discards_by_reason"]["invalidated"] == 2
    assert stats["in_use"] == 0 and stats["size"] <= 3


@pytest.mark.skipif(not GREEN, reason="a thread cannot be killed")
def test_a_greenlet_killed_mid_flush_loses_no_slot_and_commits_nothing(
    make_pool, tables, pg, server_conns
):
    """The flush's second INSERT blocks on a lock; the greenlet is killed there. Nothing of
    the transaction is on the server, the slot is back (the connection discarded, its
    backend gone), and the engine serves the next session at once."""
    pool = make_pool({"write": {"connection_count": 1, "timeout": 5}},
                     application_name="sqla-kill")
    engine = create_engine(pool, "write")
    with Session(engine) as session, session.begin():
        session.add(User(name="before"))
    admin = pg.connect()
    admin.autocommit = False
    with admin.cursor() as cur:
        cur.execute("LOCK TABLE sqla_orders IN EXCLUSIVE MODE")

    def flush() -> None:
        with Session(engine) as session, session.begin():
            session.add(User(name="half", orders=[Order(item="blocked")]))

    task = spawn(flush)
    try:
        wait_until(
            lambda: pg.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sqla-kill' "
                "AND wait_event_type = 'Lock'")[0][0] == 1,
            10, "the flush to block on the lock")
        kill(task)
    finally:
        admin.rollback()
        admin.close()
    assert task.error is not None and type(task.error).__name__ == "GreenletExit"
    assert pg.execute("SELECT name FROM sqla_users") == [("before",)]  # no 'half'
    assert pg.execute("SELECT count(*) FROM sqla_orders") == [(0,)]
    stats = group_stats(pool)
    assert stats["in_use"] == 0
    assert stats["discards_by_reason"] == {"invalidated": 1}, stats  # unknown state: discarded
    assert server_conns(application_name="sqla-kill", expect=0) == 0
    with Session(engine) as session, session.begin():
        session.add(User(name="next"))
    assert sorted(r[0] for r in pg.execute("SELECT name FROM sqla_users")) == ["before", "next"]
    assert group_stats(pool)["size"] == 1


@pytest.mark.skipif(not GREEN, reason="a thread cannot be interrupted from outside")
def test_100_orm_transactions_cut_by_timeouts_at_random_points(make_pool, tables, pg):
    """Timeouts hit while waiting for a connection, mid-flush, mid-query, inside the block
    and during the commit. Afterwards the group hands out exactly its size, nobody is left
    idle in a transaction, every acknowledged user is stored, and no user is stored without
    its orders (the flush's INSERTs are one transaction)."""
    pool = make_pool({"write": {"connection_count": 4, "timeout": 10}},
                     application_name="sqla-cut")
    engine = create_engine(pool, "write")
    rng = random.Random(12)
    acked: list[str] = []
    cut: list[int] = []

    def victim(i: int) -> None:
        try:
            with Timeout(rng.uniform(0.0, 0.12)), Session(engine) as session, \
                    session.begin():
                session.add(User(name=f"v{i}", orders=[Order(item="a"), Order(item="b")]))
                session.flush()
                session.execute(text("SELECT pg_sleep(:s)"), {"s": rng.uniform(0, 0.04)})
                sleep(rng.uniform(0, 0.03))
        except Timeout:
            cut.append(i)
        else:
            acked.append(f"v{i}")

    tasks = [spawn(victim, i) for i in range(100)]
    join_all(tasks, 60)
    assert [t.error for t in tasks if t.error] == []
    assert len(cut) > 30  # the timeouts really hit
    stats = group_stats(pool)
    assert stats["in_use"] == 0 and stats["size"] <= 4
    group = pool.group("write")
    held = [group.acquire(5) for _ in range(4)]  # all four slots can be lent at once
    for pc in held:
        group.release(pc)
    assert pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                      "'sqla-cut' AND state LIKE 'idle in transaction%'") == [(0,)]
    stored = dict(pg.execute(
        "SELECT u.name, count(o.id) FROM sqla_users u LEFT JOIN sqla_orders o "
        "ON o.user_id = u.id GROUP BY u.name"))
    assert set(acked) <= set(stored)
    assert set(stored.values()) <= {2}, "a user stored without both of its orders"
    with Session(engine) as session, session.begin():
        session.add(User(name="after"))


def test_an_acquire_timeout_is_greenpools(make_pool, tables):
    """An exhausted group: the engine's checkout waits the group's bounded time and raises
    greenpool's PoolTimeout (no QueuePool overflow, no SQLAlchemy TimeoutError). PoolTimeout
    is a psycopg2 OperationalError, so SQLAlchemy wraps it as its own OperationalError, the
    error SQLAlchemy code already catches for an unreachable database."""
    pool = make_pool({"write": {"connection_count": 1, "timeout": 0.2}})
    engine = create_engine(pool, "write")
    with engine.connect() as held:
        held.execute(text("SELECT 1"))
        with pytest.raises(OperationalError, match="no connection free") as caught, \
                engine.connect():
            pass
    assert isinstance(caught.value.orig, PoolTimeout)
    assert group_stats(pool)["in_use"] == 0


# --- failover -----------------------------------------------------------------------------


def test_the_engine_keeps_serving_after_the_primary_is_lost_and_a_standby_promoted(
    make_pool, pg_factory
):
    """ORM writers through a `write` engine (role primary) over a primary and its
    synchronous standby. The primary is stopped with ``-m immediate`` and the standby
    promoted: the writers see errors for a moment, then the same engine writes to the new
    primary; every acknowledged row is there and no slot is lost."""
    primary = pg_factory()
    primary.execute("CREATE TABLE sqla_users (id serial PRIMARY KEY, name varchar(50) UNIQUE)")
    primary.execute("CREATE TABLE sqla_orders (id serial PRIMARY KEY, "
                    "user_id int REFERENCES sqla_users(id), item varchar(50))")
    standby = pg_factory(standby_of=primary)
    primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
    primary.execute("ALTER SYSTEM SET synchronous_commit = 'on'")  # throwaway has it off
    primary.execute("SELECT pg_reload_conf()")
    wait_until(lambda: primary.execute(
        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")[0][0] == 1,
        10, "the standby to become synchronous")
    pool = make_pool({"write": {"role": "primary", "connection_count": 4, "timeout": 10}},
                     db=[primary.endpoint(), standby.endpoint()],
                     role_check_interval=0.5, quarantine_max=2)
    engine = create_engine(pool, "write")
    names = itertools.count()
    acked: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    running = [True]

    def writer() -> None:
        while running[0]:
            name = f"n{next(names)}"
            try:
                with Session(engine) as session, session.begin():
                    session.add(User(name=name, orders=[Order(item="x")]))
                    port = session.execute(text("SELECT inet_server_port()")).scalar()
            except Exception as exc:
                errors.append(exc)
                sleep(0.02)
            else:
                acked.append((name, port))

    tasks = [spawn(writer) for _ in range(8)]
    try:
        wait_until(lambda: len(acked) >= 40, 20, "writes on the primary")
        standby.promote()
        primary.stop("immediate")
        wait_until(lambda: sum(p == standby.port for _, p in acked) >= 40, 30,
                   "writes on the promoted standby")
    finally:
        running[0] = False
        join_all(tasks, 20)
    stored = {row[0] for row in standby.execute("SELECT name FROM sqla_users")}
    lost = [n for n, _ in acked if n not in stored]
    assert lost == [], f"acknowledged rows missing on the new primary: {lost[:10]}"
    for exc in errors:
        assert isinstance(exc, (DBAPIError, PoolError)), repr(exc)
    stats = group_stats(pool)
    assert stats["in_use"] == 0 and stats["size"] <= 4
    with Session(engine) as session:
        assert session.execute(text("SELECT inet_server_port()")).scalar() == standby.port


# --- reads to 'read', writes to 'write' -----------------------------------------------------


def test_routing_session_sends_reads_to_the_standby_and_writes_to_the_primary(
    make_pool, pg_factory
):
    primary = pg_factory()
    primary.execute("CREATE TABLE sqla_users (id serial PRIMARY KEY, name varchar(50) UNIQUE)")
    primary.execute("CREATE TABLE sqla_orders (id serial PRIMARY KEY, "
                    "user_id int REFERENCES sqla_users(id), item varchar(50))")
    primary.execute("INSERT INTO sqla_users (name) VALUES ('seed')")
    standby = pg_factory(standby_of=primary)
    wait_until(lambda: standby.execute("SELECT count(*) FROM sqla_users") == [(1,)], 10,
               "the seed row on the standby")
    pool = make_pool({"write": {"role": "primary", "connection_count": 2},
                      "read": {"role": "standby", "connection_count": 2, "autocommit": True}},
                     db=[primary.endpoint(), standby.endpoint()])
    make_session = sessionmaker(class_=RoutingSession, write=create_engine(pool, "write"),
                                read=create_engine(pool, "read"))
    port = select(func.inet_server_port())
    with make_session() as session:
        assert session.execute(port).scalar() == standby.port
        assert session.scalars(select(User.name)).all() == ["seed"]
        assert session.execute(select(func.inet_server_port()).with_for_update()).scalar() \
            == primary.port
        session.rollback()
        session.add(User(name="new"))
        session.flush()  # to the primary; the transaction now reads its own writes there
        assert session.execute(port).scalar() == primary.port
        assert sorted(session.scalars(select(User.name))) == ["new", "seed"]
        session.commit()
        assert session.execute(port).scalar() == standby.port  # a new transaction
    assert primary.execute("SELECT count(*) FROM sqla_users") == [(2,)]
    for name in ("write", "read"):
        assert group_stats(pool, name)["in_use"] == 0

