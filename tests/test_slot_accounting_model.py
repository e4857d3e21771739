"""Slot accounting under random sequences of borrows, returns and real faults.

A model-based test (tests/slot_model.py): hypothesis drives a real pool against a real
server with random sequences of borrows (with and without a timeout, interrupted), returns,
discards, ``pg_terminate_backend``, crashes, restarts, stalled backends and housekeeping's
probes, and checks the pool's books after every step and, at rest, that every slot still
lends a working connection. One throwaway cluster serves the whole module; a pool is made per
example.

Replay a run with ``GREENPOOL_MODEL_SEED=<seed>`` (printed at the start of each test and on
failure). Shrinking a failure to its shortest steps replays it many times, so it is off
unless ``GREENPOOL_MODEL_SHRINK=1``; a longer soak is ``python -m benchmarks.slot_model``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from modes import MODE, wait_until
from slot_model import ModelSetup, run_model

from greenpool import Pool
from greenpool.testing.postgres import Cluster

#: shrinking a failure replays it many times: then the tests get more time
SHRINKING = os.environ.get("GREENPOOL_MODEL_SHRINK") == "1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The module's own server: the rules stop, crash and restart it."""
    with Cluster() as server:
        yield server


@pytest.mark.timeout(1800 if SHRINKING else 240)
def test_no_slot_is_lost_under_random_loans_and_faults(cluster: Cluster) -> None:
    """In this process's mode (gevent, eventlet or threaded): borrowers killed mid-acquire,
    waiters served by returns, backends terminated, stalled and crashed, role probes on dead
    idle connections; every step keeps size == idle + in_use + connecting and every slot
    lends a working connection once things are at rest."""
    run_model(ModelSetup(cluster, MODE), examples=20, steps=25)


@pytest.mark.timeout(1800 if SHRINKING else 180)
def test_no_slot_is_lost_in_non_threaded_mode(cluster: Cluster) -> None:
    """non-threaded: no background connects or housekeeping (the model runs upkeep and probes
    itself), connects inline, full groups refuse at once; the same books and the same at-rest
    check."""
    run_model(ModelSetup(cluster, "non-threaded"), examples=10, steps=20)


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
@pytest.mark.timeout(60)
def test_a_forked_child_gets_every_slot_and_the_parent_keeps_its_own(cluster: Cluster) -> None:
    """After ``os.fork()`` the child's groups start empty: each lends all of its
    connection_count at once, on sessions of its own. The parent, which held one connection
    and kept the others idle across the fork, still lends all of its slots, on the same
    sessions as before."""
    if not cluster.is_running():
        cluster.start()
    pool = Pool({"type": MODE, "db": cluster.endpoint(connect_timeout=2),
                 "application_name": "gp-model-fork",
                 "groups": {"rw": {"connection_count": 3, "role": "primary", "timeout": 5},
                            "any": {"connection_count": 2, "timeout": 5}}})
    try:
        parent_pids = {name: _lend_all_pids(pool, name) for name in ("rw", "any")}
        kept = pool.group("rw").acquire()  # lent across the fork
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                os.close(read_end)
                got = {name: _lend_all_pids(pool, name) for name in ("rw", "any")}
                mine = set().union(*got.values())
                theirs = set().union(*parent_pids.values())
                ok = all(len(got[n]) == pool.group(n).config.connection_count for n in got)
                os.write(write_end, b"ok" if ok and not mine & theirs else
                         repr((got, parent_pids)).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        _, status = os.waitpid(child, 0)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        assert os.waitstatus_to_exitcode(status) == 0
        assert report == b"ok", report
        with kept.raw.cursor() as cursor:
            cursor.execute("SELECT 1")
        pool.group("rw").release(kept)
        for name in ("rw", "any"):
            assert _lend_all_pids(pool, name) == parent_pids[name]
            stats = pool.group(name).stats()
            assert stats["size"] == stats["idle"] == stats["max_size"], stats
    finally:
        pool.close()
    wait_until(lambda: not cluster.execute(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'gp-model-fork'"),
        10, "the pool's sessions to end")


def _lend_all_pids(pool: Pool, name: str) -> set[int]:
    """Borrow all of a group's connections at once, ``SELECT pg_backend_pid()`` on each."""
    group = pool.group(name)
    held = [group.acquire() for _ in range(group.config.connection_count)]
    try:
        pids = set()
        for pc in held:
            with pc.raw.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.add(int(cursor.fetchone()[0]))
        return pids
    finally:
        for pc in held:
            group.release(pc)
