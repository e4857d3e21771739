"""The group's borrow path at the edges of its timeout: ``timeout=0`` and a quiet group."""

from __future__ import annotations

import time

import pytest
from faults import raising_once_at_the_call_of
from modes import MODE, wait_until

from greenpool import Pool, PoolTimeout

CHECK_IDLE_AFTER = 0.05


@pytest.fixture(params=["process mode", "non-threaded"])
def quiet_pool(request, pg, mode):
    """A pool of this process's mode, or a ``non-threaded`` one (run once: in the threaded
    test process), whose group pings an idle connection after 50 ms."""
    if request.param == "non-threaded" and MODE != "threaded":
        pytest.skip("non-threaded runs once, in the threaded test process")
    kind = mode if request.param == "process mode" else "non-threaded"
    pool = Pool({"type": kind, "db": pg.endpoint(),
                 "groups": {"g": {"connection_count": 2, "check_idle_after": CHECK_IDLE_AFTER}}})
    yield pool
    pool.close()


@pytest.mark.timeout(30)
def test_timeout_zero_gets_the_idle_connection_of_a_quiet_group(quiet_pool):
    """An idle connection older than ``check_idle_after`` is pinged before it is lent. With
    ``timeout=0`` the caller has no time to wait, but the ping is not a wait: the idle
    connection is lent (checked, or unchecked) rather than a PoolTimeout raised."""
    group = quiet_pool.group("g")
    pc = group.acquire(timeout=5)
    pid = pc.raw.get_backend_pid()
    group.release(pc)
    released = time.monotonic()
    assert group.stats()["idle"] == 1
    for attempt in range(3):
        wait_until(lambda r=released: time.monotonic() - r > 2 * CHECK_IDLE_AFTER, 5,
                   "the idle connection to be older than check_idle_after")
        pc = group.acquire(timeout=0)
        try:
            assert pc.raw.get_backend_pid() == pid, f"attempt {attempt + 1}"
            with pc.raw.cursor() as cursor:
                cursor.execute("SELECT 1")
                assert cursor.fetchone() == (1,)
        finally:
            group.release(pc)
        released = time.monotonic()
    with quiet_pool.handler("g", timeout=0) as db:
        assert db.query("SELECT 1") == [(1,)]  # the handler's own check is no wait either
    assert group.stats()["timeouts"] == 0


# --- non-threaded spreading never costs a borrow its idle connection -------------------------

NON_THREADED_ONLY = pytest.mark.skipif(
    MODE != "threaded", reason="non-threaded runs once, in the threaded test process")


@NON_THREADED_ONLY
@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ["server first", "black hole first"])
def test_non_threaded_short_borrows_use_the_idle_connection_while_an_endpoint_never_answers(
    pg, blackhole, order
):
    """A non-threaded group over a real server and a black hole (``connect_timeout`` 5):
    once a first borrow has a connection, borrows with 0.3 s to spare all get the idle one,
    each within its timeout, although the group would still spread to the endpoint it has
    no connection to (and that never answers); ``timeout=0`` borrows get it too."""
    db = [pg.endpoint(), blackhole.endpoint(connect_timeout=5)]
    if order == "black hole first":
        db.reverse()
    pool = Pool({"type": "non-threaded", "db": db, "groups": {"g": {"connection_count": 4}}})
    try:
        group = pool.group("g")
        first = group.acquire(timeout=15)  # may first wait out the black hole's connect
        pid = first.raw.get_backend_pid()
        group.release(first)
        outcomes = []
        for _ in range(8):
            started = time.monotonic()
            try:
                pc = group.acquire(timeout=0.3)
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__} after "
                                f"{time.monotonic() - started:.2f} s: {exc}")
                continue
            took = time.monotonic() - started
            outcomes.append("idle" if pc.raw.get_backend_pid() == pid and took < 0.6
                            else f"pid {pc.raw.get_backend_pid()} after {took:.2f} s")
            group.release(pc)
        for _ in range(3):
            try:
                pc = group.acquire(timeout=0)
            except Exception as exc:
                outcomes.append(f"timeout=0: {type(exc).__name__}: {exc}")
                continue
            outcomes.append("idle" if pc.raw.get_backend_pid() == pid else "timeout=0: other")
            group.release(pc)
        assert outcomes == ["idle"] * 11, (outcomes, pool.stats()["endpoints"])
    finally:
        pool.close()


@NON_THREADED_ONLY
@pytest.mark.timeout(30)
def test_non_threaded_timeout_zero_lends_the_idle_connection_after_a_discard(pg):
    """A non-threaded group over two endpoints (one server, two databases) holds one idle
    connection after another of its connections was discarded: ``timeout=0`` borrows are
    lent the idle one, although the group has room and an endpoint without a connection."""
    pool = Pool({"type": "non-threaded", "db": [pg.endpoint(), pg.endpoint(name="template1")],
                 "groups": {"g": {"connection_count": 4}}})
    try:
        group = pool.group("g")
        kept, dropped = group.acquire(timeout=5), group.acquire(timeout=5)
        pid = kept.raw.get_backend_pid()
        group.release(kept)
        group.release(dropped, discard="failed_reset")
        assert (group.stats()["size"], group.stats()["idle"]) == (1, 1)
        for attempt in range(3):
            pc = group.acquire(timeout=0)
            try:
                assert pc.raw.get_backend_pid() == pid, f"attempt {attempt + 1}"
            finally:
                group.release(pc)
        assert group.stats()["timeouts"] == 0
    finally:
        pool.close()


# --- a failure while timing a borrow leaves no loan behind ----------------------------------


@pytest.mark.timeout(30)
def test_a_failing_histogram_sink_on_the_borrow_path_loses_no_slot(pg, mode, monkeypatch):
    """The borrow path folds the duration histograms itself once enough values wait; a sink
    that raises there (a fault of an exporter, not of a server: a stand-in) fails that
    borrow, and the connection, lent to nobody, gives its slot back: the group can still
    lend all of its connections."""
    import gc

    from greenpool import group as group_module
    from greenpool.stats import timings_of

    monkeypatch.setattr(group_module, "FOLD_AT", 1)
    pool = Pool({"type": mode, "db": pg.endpoint(), "groups": {"g": {"connection_count": 1}}})
    try:
        group = pool.group("g")
        timings = timings_of(group)

        def broken(batch: list[float]) -> None:
            raise RuntimeError("exporter broke")

        timings.wait.sinks = (broken,)
        try:  # (not pytest.raises: its traceback would keep the connection referenced)
            group.acquire(timeout=5)
            pytest.fail("the borrow should have raised the sink's error")
        except RuntimeError as exc:
            assert "exporter broke" in str(exc)
        timings.wait.sinks = ()
        assert group.stats()["in_use"] == 0
        # collected once nothing holds it (under gevent, the hub's last hand-off callback
        # may hold it until the loop turns)
        wait_until(lambda: gc.collect() >= 0 and group.stats()["size"] == 0, 10,
                   "the connection lent to nobody to give its slot back")
        with pool.handler("g", timeout=5) as db:  # the one slot came back
            assert db.query("SELECT 1") == [(1,)]
        assert group.stats()["size"] <= 1
    finally:
        pool.close()


def test_an_interruption_as_the_loan_is_recorded_loses_no_slot(make_pool):
    """A signal handler's exception (KeyboardInterrupt) can land right after acquire has
    recorded the loan and before its caller holds the connection: the connection is
    discarded and its slot freed, not left lent to nobody. The interruption is placed by a
    line tracer (a signal cannot be timed to that point), at the line after the record."""
    import sys
    from pathlib import Path

    import greenpool.group as group_module

    pool = make_pool({"g": {"connection_count": 1, "autocommit": True, "timeout": 5}})
    with pool.handler("g") as db:
        db.query("SELECT 1")
    source = group_module.__file__
    lines = Path(source).read_text().splitlines()
    after_record = lines.index("            self._lent.add(ref)") + 2  # 1-based: the next line

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != source or frame.f_code.co_name != "acquire":
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == after_record:
                raise KeyboardInterrupt("as the loan is recorded")
            return local
        return local

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt), pool.handler("g"):
            pass
    finally:
        sys.settrace(previous)
    stats = pool.stats()["groups"]["g"]
    assert stats["in_use"] == 0
    assert stats["size"] == stats["idle"] + stats["in_use"] + stats["connecting"]
    assert not pool.group("g").holders
    with pool.handler("g", timeout=5) as db:
        assert db.query("SELECT 1") == [(1,)]


def test_a_lent_connection_its_borrower_dropped_is_collected_and_its_slot_counted_back(
        make_pool):
    """The group holds lent connections weakly: one that no caller holds any more (a
    borrower interrupted between two lines, where no ``finally`` reaches) is collected, its
    session closed and its slot given back; a strong record would keep it lent for ever."""
    import gc

    pool = make_pool({"g": {"connection_count": 1, "timeout": 5}})
    group = pool.group("g")
    group.acquire()  # dropped at once: nobody holds it
    gc.collect()
    stats = pool.stats()["groups"]["g"]
    assert (stats["in_use"], stats["size"]) == (0, 0)
    assert stats["discards_by_reason"].get("orphaned") == 1
    with pool.handler("g", timeout=5) as db:  # the group's one slot is free again
        assert db.query("SELECT 1") == [(1,)]


@pytest.mark.parametrize("cut", ["before the close", "after the close"])
def test_a_discard_cut_short_is_counted_once_and_its_slot_given_back(make_pool, cut):
    """A discard interrupted on the first instruction of the connector's close (nothing
    counted, nothing closed yet) or of the group's count of the returned slot (the
    connection closed and counted out): the slot stays held, not returned-but-uncounted;
    once collected it is counted back and the group's room is whole again. The connection
    is counted out once, as that discard or as orphaned, never twice: the group's books
    (``connects - discards``), its count on the endpoint (placement balances on it) and the
    endpoint's open connections stay exact."""
    import gc

    from greenpool.connector import Connector
    from greenpool.group_growth import GroupGrowth

    code = (Connector.close if cut == "before the close" else GroupGrowth._returned).__code__
    pool = make_pool({"g": {"connection_count": 1, "timeout": 5}})
    group = pool.group("g")
    endpoint = group.endpoints[0]
    pc = group.acquire()
    assert (group.counts[endpoint], endpoint.open) == (1, 1)
    with raising_once_at_the_call_of(code, KeyboardInterrupt()) as fired, \
            pytest.raises(KeyboardInterrupt):
        group.release(pc, discard="interrupted")
    assert fired
    del pc
    gc.collect()
    stats = pool.stats()["groups"]["g"]
    assert (stats["size"], stats["idle"], stats["in_use"], stats["connecting"]) == (0, 0, 0, 0)
    assert stats["connects"] - stats["discards"] == 0, stats
    assert (group.counts[endpoint], endpoint.open) == (0, 0)
    with pool.handler("g", timeout=5) as db:
        assert db.query("SELECT 1") == [(1,)]
    assert (group.counts[endpoint], endpoint.open) == (1, 1)


def test_a_lost_loan_leaves_the_group_counts_as_soon_as_its_connection_is_collected(
        make_pool, pg):
    """A lent connection no caller holds any more (its borrower vanished between two lines)
    is collected and closed by the driver: from that moment the group no longer counts it
    on its endpoint (placement and the dedicated connections' room read these counts), as
    the endpoint's open connections no longer do; not only at the group's next look."""
    import gc

    pool = make_pool({"g": {"connection_count": 2, "timeout": 5}})
    group = pool.group("g")
    endpoint = group.endpoints[0]
    pc = group.acquire()
    assert (group.counts[endpoint], endpoint.open) == (1, 1)
    del pc
    gc.collect()
    assert (group.counts[endpoint], endpoint.open) == (0, 0)


@pytest.mark.timeout(30)
def test_acquires_count_connections_handed_out_and_a_call_that_timed_out_as_a_timeout(
        make_pool):
    """``acquires`` (``greenpool_connections_acquired_total``) is what was handed out, so
    it equals the wait histogram's count; a failed call is counted by what failed it."""
    from greenpool.stats import timings_of

    pool = make_pool({"g": {"connection_count": 1}})
    group = pool.group("g")
    timings = timings_of(group)  # as an exporter switches them on
    pc = group.acquire(5)
    for _ in range(3):
        with pytest.raises(PoolTimeout):
            group.acquire(0.01)
    group.release(pc)
    stats = group.stats()
    assert (stats["acquires"], stats["timeouts"]) == (1, 3), stats
    assert timings.wait.count == 1
