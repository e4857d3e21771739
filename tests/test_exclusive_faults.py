"""Exclusive connections (exclusive blocks and listeners) interrupted at any point, and
behind a transaction pooler: no slot is lost, no session or lock is left on the server.
"""

from __future__ import annotations

import pytest
from listening import group_stats, sessions
from modes import GREEN, Timeout, join_all, sleep, spawn, wait_until

from greenpool.testing.pgbouncer import available as pgbouncer_available

pytestmark = pytest.mark.timeout(120)

APP = "greenpool-exclusive-faults"


@pytest.mark.skipif(not GREEN, reason="interrupting a task mid-query needs greenlets")
def test_a_block_interrupted_mid_query_ends_its_session_and_frees_its_lock(make_pool, pg):
    """A gevent.Timeout lands while the block's own query runs: the block ends, its session
    (with the session advisory lock it took) is gone from the server soon, not when the
    query would have finished, and the slot is free."""
    pool = make_pool({"g": {"exclusive_limit": 1}}, application_name=APP)
    with pytest.raises(Timeout), Timeout(0.5), pool.exclusive("g") as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT pg_advisory_lock(4242)")
        cursor.execute("SELECT pg_sleep(60)")
    assert group_stats(pool)["exclusive_open"] == 0
    wait_until(lambda: sessions(pg, APP) - group_stats(pool)["size"] == 0, 10,
               "the interrupted session to end")
    assert pg.execute("SELECT pg_try_advisory_lock(4242)")[0][0] is True
    with pool.exclusive("g", timeout=1):
        pass


@pytest.mark.skipif(not GREEN, reason="interrupting a task at any point needs greenlets")
def test_a_storm_of_timeouts_on_exclusive_blocks_and_listeners_loses_no_slot(make_pool, pg):
    """30 tasks open exclusive blocks and listeners under a limit of 3, most cut off by a
    Timeout of 1 to 60 ms at whatever point it is (waiting, connecting, LISTEN, inside,
    closing): afterwards every slot is free and no session is left."""
    import random

    pool = make_pool({"g": {"exclusive_limit": 3}}, application_name=APP)
    rng = random.Random(13)
    outcomes = {"done": 0, "cut": 0, "refused": 0}

    def worker(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(8):
            try:
                cut_at = None if local.random() < 0.25 else local.uniform(0.001, 0.06)
                with Timeout(cut_at):  # some run to the end, under the same contention
                    if local.random() < 0.5:
                        with pool.exclusive("g", timeout=1) as conn:
                            conn.cursor().execute("SELECT pg_sleep(0.01)")
                    else:
                        with pool.listen("g", "storm", timeout=1) as listener:
                            listener.get(0.02)
                outcomes["done"] += 1
            except Timeout:
                outcomes["cut"] += 1
            except greenpool_errors() as exc:
                assert "exclusive_limit" in str(exc) or "endpoint" in str(exc), exc
                outcomes["refused"] += 1

    tasks = [spawn(worker, rng.random()) for _ in range(30)]
    join_all(tasks, 60)
    assert all(t.error is None for t in tasks), [t.error for t in tasks if t.error]
    assert outcomes["cut"] > 0 and outcomes["done"] > 0, outcomes
    stats = group_stats(pool)
    assert (stats["exclusive_waiting"], stats["listeners"]) == (0, 0), stats
    # a listener cut by a Timeout does not wait for its hub's reader, which gives the slot
    # back by itself (its connect cut, its round trip bounded)
    wait_until(lambda: group_stats(pool)["exclusive_open"] == 0, 5, "every slot back")
    wait_until(lambda: sessions(pg, APP) - group_stats(pool)["size"] == 0, 10, "no session left")
    with pool.exclusive("g", timeout=1), pool.exclusive("g", timeout=1), \
            pool.exclusive("g", timeout=1):
        pass


def greenpool_errors() -> type[Exception]:
    from greenpool import PoolTimeout

    return PoolTimeout


@pytest.mark.skipif(not pgbouncer_available(), reason="needs /usr/sbin/pgbouncer")
def test_a_transaction_pooler_cannot_give_a_session_and_says_so(make_pool, pg):
    """Behind PgBouncer in transaction mode a 'dedicated' connection is no session (each
    transaction may run on another server connection): a LISTEN there would silently hear
    nothing, a session advisory lock would be held by a stranger. exclusive() and listen()
    refuse at once, naming the endpoint and the ``pooler`` key; session mode works."""
    from greenpool import PoolError
    from greenpool.testing.pgbouncer import PgBouncer

    with PgBouncer(pg, pool_mode="transaction", max_client_conn=50) as tx, \
            PgBouncer(pg, pool_mode="session", max_client_conn=50) as session:
        pool = make_pool({"g": {"exclusive_limit": 2}},
                         db=tx.endpoint(pooler="transaction"), application_name=APP)
        with pytest.raises(PoolError, match="transaction"), pool.exclusive("g", timeout=2):
            pass
        with pytest.raises(PoolError, match="transaction"):
            pool.listen("g", "jobs", timeout=2)
        assert group_stats(pool)["exclusive_open"] == 0
        pool = make_pool({"g": {}}, db=session.endpoint(pooler="session"), application_name=APP)
        with pool.listen("g", "jobs", timeout=5) as listener:
            pg.execute("NOTIFY jobs, 'through a session pooler'")
            assert listener.get(5).payload == "through a session pooler"



@pytest.mark.skipif(not GREEN, reason="an exception lands in a background task: greenlets")
def test_a_dedicated_connect_task_interrupted_as_it_begins_is_not_left_running(make_pool, pg):
    """A signal handler's exception lands on the first instruction of a dedicated connect
    task (it goes on to the main task, as gevent does with a KeyboardInterrupt): the task
    is over, so the group counts no dedicated connect under way, and the next block
    connects as usual."""
    import gc

    from faults import raising_once_at_the_call_of

    from greenpool.exclusive.connects import DedicatedConnects

    pool = make_pool({"g": {"exclusive_limit": 2}}, application_name=APP)
    with raising_once_at_the_call_of(DedicatedConnects._task.__code__,
                                     KeyboardInterrupt()) as fired, \
            pytest.raises(KeyboardInterrupt), pool.exclusive("g", timeout=5):
        pass
    assert fired
    sleep(0.01)  # the loop goes on: it lets go of the exception it passed on (and its task)
    gc.collect()
    assert group_stats(pool)["exclusive_connecting"] == 0
    with pool.exclusive("g", timeout=5) as conn:
        conn.cursor().execute("SELECT 1")
    assert group_stats(pool)["exclusive_connecting"] == 0
