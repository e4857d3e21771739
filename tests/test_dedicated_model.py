"""Dedicated connections under random sequences of blocks, listeners, interruptions and
real faults: the books stay exact, and the groups always get their connections.

hypothesis drives a real pool against a real server (``max_connections`` 20) with exclusive
blocks and listeners opened with short and long timeouts, interrupted while they wait or
connect (green modes), closed in any order, their backends terminated, and the server filled
by other clients; after every step the slots held equal the blocks alive plus one for the
listeners (they share a connection), connect tasks stay within their bound, and, whenever
no outsider fills the server, every group still lends all of its connections at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from modes import GREEN, MODE, Timeout, join_all, spawn, wait_until

from greenpool import Pool, PoolError
from greenpool.testing.postgres import Cluster

APP = "greenpool-dedicated-model"
LIMIT = 16  # more than the server can spare: the room rule, not the limit, holds them back
#: shrinking a failure replays it many times against real servers: on request only
PHASES = (list(Phase) if os.environ.get("GREENPOOL_MODEL_SHRINK") == "1"
          else [Phase.explicit, Phase.reuse, Phase.generate])
GROUPS = {"g": {"connection_count": 3, "exclusive_limit": LIMIT},
          "h": {"connection_count": 2, "exclusive_limit": LIMIT}}


@pytest.fixture(scope="module")
def small_server() -> Iterator[Cluster]:
    with Cluster(settings={"max_connections": 20}) as server:
        # an ordinary role: outsiders can never take the reserved slots the test's own
        # (superuser) queries need
        server.execute("CREATE ROLE outsider LOGIN PASSWORD 'outsider'")
        yield server


def _connect(server: Cluster) -> Any:
    e = server.endpoint()
    return psycopg2.connect(host=e["host"], port=e["port"], dbname=e["name"], user="outsider",
                            password="outsider", application_name="outsider")


class DedicatedModel(RuleBasedStateMachine):
    server: Cluster

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool({"type": MODE, "db": self.server.endpoint(), "application_name": APP,
                          "groups": GROUPS})
        self.blocks: list[Any] = []
        self.listeners: list[Any] = []
        self.outsiders: list[Any] = []
        self.terminated = False  # a connect the termination reached may quarantine

    def stats(self, group: str = "g") -> dict[str, Any]:
        return self.pool.stats()["groups"][group]  # type: ignore[no-any-return]

    @rule(timeout=st.sampled_from([0.0, 0.004, 0.05, 2.0]))
    def open_block(self, timeout: float) -> None:
        block = self.pool.exclusive("g", timeout=timeout)
        try:
            block.__enter__()
        except PoolError:
            return
        self.blocks.append(block)

    @rule(timeout=st.sampled_from([0.004, 0.05, 2.0]))
    def open_listener(self, timeout: float) -> None:
        try:
            self.listeners.append(self.pool.listen("g", "model", timeout=timeout))
        except PoolError:
            pass

    @rule(count=st.integers(1, LIMIT))
    def open_many_listeners(self, count: int) -> None:
        """Enough to reach the server's spare slots: those beyond are refused."""
        for _ in range(count):
            self.open_listener(2.0)

    @precondition(lambda self: GREEN)
    @rule(after=st.sampled_from([0.001, 0.005, 0.02, 0.06]), listener=st.booleans())
    def interrupt_an_opening(self, after: float, listener: bool) -> None:
        def opening() -> None:
            with Timeout(after):
                if listener:
                    self.pool.listen("g", "model", timeout=2).close()
                else:
                    with self.pool.exclusive("g", timeout=2) as conn:
                        conn.cursor().execute("SELECT pg_sleep(0.1)")

        task = spawn(opening)
        join_all([task], 10)

    @rule(pick=st.integers(0, 1000), listener=st.booleans())
    def close_one(self, pick: int, listener: bool) -> None:
        """(Draws never depend on what the server did: whether an open succeeded is
        timing, and hypothesis must be able to replay the same choices.)"""
        if listener and self.listeners:
            self.listeners.pop(pick % len(self.listeners)).close()
        elif self.blocks:
            self.blocks.pop(pick % len(self.blocks)).__exit__(None, None, None)

    @rule()
    def terminate_every_session(self) -> None:
        self.server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = %s", (APP,))
        self.terminated = True

    @rule(count=st.integers(1, 12))
    def outsiders_connect(self, count: int) -> None:
        for _ in range(count):
            try:
                self.outsiders.append(_connect(self.server))
            except psycopg2.OperationalError:
                return

    @rule()
    def outsiders_leave(self) -> None:
        for conn in self.outsiders:
            conn.close()
        self.outsiders.clear()

    @rule()
    def every_group_lends_all_its_connections(self) -> None:
        """Checked whenever no outsider fills the server (they may take what the groups
        need: only dedicated connections are held back)."""
        if self.outsiders:
            return
        for name, config in GROUPS.items():
            held: list[int] = []
            release: list[bool] = []

            def hold(name: str = name, held: list[int] = held,
                     release: list[bool] = release) -> None:
                with self.pool.handler(name, timeout=5):
                    held.append(1)
                    wait_until(lambda: bool(release), 20, "the release")

            tasks = [spawn(hold) for _ in range(config["connection_count"])]
            wait_until(lambda held=held, tasks=tasks: len(held) == len(tasks) or any(
                t.error is not None for t in tasks), 20, "every connection lent")
            release.append(True)
            join_all(tasks, 20)
            assert [t.error for t in tasks] == [None] * len(tasks), self.pool.stats()

    @invariant()
    def books_match(self) -> None:
        stats = self.stats()
        # the listeners of a group share one connection: one slot for all of them
        assert stats["exclusive_open"] == len(self.blocks) + bool(self.listeners), stats
        assert stats["listeners"] == len(self.listeners), stats
        assert stats["exclusive_connecting"] <= 2 * LIMIT, stats
        endpoint = next(iter(self.pool.stats()["endpoints"].values()))
        assert self.terminated or endpoint["quarantines"] == 0, endpoint  # full is not down

    def teardown(self) -> None:
        try:
            for block in self.blocks:
                block.__exit__(None, None, None)
            for listener in self.listeners:
                listener.close()
            for conn in self.outsiders:
                conn.close()
            wait_until(lambda: self.stats()["exclusive_connecting"] == 0, 15,
                       "the connect tasks to end")
            stats = self.stats()
            assert (stats["exclusive_open"], stats["exclusive_waiting"]) == (0, 0), stats
        finally:
            self.pool.close()
        wait_until(lambda: self.server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (APP,))[0][0] == 0, 10, "no session left")


@pytest.mark.timeout(600)
def test_dedicated_connections_keep_exact_books_and_leave_the_groups_their_slots(small_server):
    DedicatedModel.server = small_server
    run_state_machine_as_test(DedicatedModel, settings=settings(
        max_examples=20, stateful_step_count=20, deadline=None, phases=PHASES,
        suppress_health_check=list(HealthCheck)))
