"""The group's borrow path at the edges of its timeout: ``timeout=0`` and a quiet group."""

from __future__ import annotations

import time

import pytest
from modes import MODE, wait_until

from greenpool import Pool

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
