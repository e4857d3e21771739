"""Housekeeping's role and lag probe keeps the group's accounting exact when it fails.

The probe borrows an idle connection of a group (or opens one within the group's room); when
the server does not answer it, that connection is discarded and its slot must go back to
the group. Real faults only: ``pg_ctl restart -m fast`` under a warm pool, and a backend
stopped with SIGSTOP while the probe waits on it.
"""

from __future__ import annotations

import os
import signal

import pytest
from lending import discards, group_stats, lend_all
from modes import MODE, wait_until

SIZE = 3
PROBING = {"role_check_interval": 0.05, "maintenance_interval": 0.1}


def primary_group(**extra):
    return {"g": {"role": "primary", "connection_count": SIZE, "timeout": 5, **extra}}


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
@pytest.mark.timeout(120)
def test_role_probe_on_connections_a_restart_killed_gives_every_slot_back(make_pool, pg_factory):
    """Four ``pg_ctl restart -m fast`` of a warm primary: each time housekeeping's next role
    probe meets a dead idle connection and discards it (with its dead peers). After each
    restart the group still lends all ``connection_count`` connections at the same time."""
    server = pg_factory()
    pool = make_pool(primary_group(), db=server.endpoint(), **PROBING)
    old_pids = set(lend_all(pool, "g", SIZE, within=5))  # warm: SIZE idle connections
    for restart in range(4):
        assert group_stats(pool, "g")["idle"] == SIZE
        before = discards(pool, "g")
        server.restart("fast")
        wait_until(lambda b=before: discards(pool, "g") >= b + SIZE, 10,
                   "housekeeping to discard the connections the restart killed")
        wait_until(lambda: group_stats(pool, "g")["connecting"] == 0, 10, "connects to end")
        pids = lend_all(pool, "g", SIZE, within=5)
        assert len(set(pids)) == SIZE and not set(pids) & old_pids, f"restart {restart + 1}"
        old_pids |= set(pids)
    stats = group_stats(pool, "g")
    assert stats["size"] <= SIZE and stats["in_use"] == 0


@pytest.mark.skipif(MODE == "non-threaded", reason="needs housekeeping")
@pytest.mark.timeout(120)
def test_role_probe_timed_out_on_a_stalled_backend_gives_its_slot_back(make_pool, pg_factory):
    """The idle connection the role probe takes (the most recently returned one) has its
    backend stopped with SIGSTOP: the probe gets no answer within ``connect_timeout`` and
    discards it. Twice; after each time the group still lends all its connections at once."""
    server = pg_factory()
    pool = make_pool(primary_group(), db=server.endpoint(connect_timeout=0.5), **PROBING)
    for stall in range(2):
        pids = lend_all(pool, "g", SIZE, within=5)  # released in order: the last is latest
        assert group_stats(pool, "g")["idle"] == SIZE
        before = discards(pool, "g", "failed_check")
        os.kill(pids[-1], signal.SIGSTOP)
        try:
            wait_until(lambda b=before: discards(pool, "g", "failed_check") > b, 10,
                       "the role probe to give up on the stalled backend")
        finally:
            os.kill(pids[-1], signal.SIGCONT)
        wait_until(lambda: group_stats(pool, "g")["connecting"] == 0, 10, "connects to end")
        assert len(set(lend_all(pool, "g", SIZE, within=5))) == SIZE, f"stall {stall + 1}"
