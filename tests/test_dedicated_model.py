"""Dedicated connections under random sequences of blocks, listeners, interruptions and
real faults: the books stay exact, and the groups always get their connections.

hypothesis drives a real pool against a real server (``max_connections`` 20) with exclusive
blocks and listeners opened with short and long timeouts, interrupted while they wait or
connect (green modes), closed in any order, their backends terminated, and the server filled
by other clients; after every step the slots held equal the blocks alive plus one for the
listeners (they share a connection), connect tasks stay within their bound, and, whenever
no outsider fills the server, every group still lends all of its connections at once.

A second machine drives the ``exclusive_limit`` line itself (a limit of two, green modes):
callers killed while waiting, at the hand-off or after it, and timing out; the holders are
always the first in arrival order, and no unit is lost or counted twice.
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

from greenpool import Pool, PoolError, PoolTimeout
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
        if listener:  # an interrupted listener leaves its hub without waiting for the
            # reader, which gives the slot back by itself (its connect cut, its round trip
            # bounded by connect_timeout)
            wait_until(lambda: self.stats()["exclusive_open"] == len(self.blocks) + bool(
                self.listeners), 10, "an interrupted listener's hub to give its slot back")

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


LINE_LIMIT = 2
LINE_APP = "greenpool-exclusive-line-model"


class ExclusiveLineModel(RuleBasedStateMachine):
    """The ``exclusive_limit`` line (green modes, where a waiter can be killed): callers
    arrive, give back, are killed while they wait, at the hand-off (just before it, or just
    after, while their connection is being opened), or time out; after every step the
    holders are exactly the first ones in arrival order that model says, and the books
    match."""

    server: Cluster

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool({"type": MODE, "db": self.server.endpoint(),
                          "application_name": LINE_APP,
                          "groups": {"g": {"connection_count": 1,
                                           "exclusive_limit": LINE_LIMIT}}})
        self.arrivals = 0
        self.holders: list[int] = []  # what the model says, oldest first
        self.waiting: list[int] = []
        self.entered: dict[int, Any] = {}  # caller -> its Exclusive, once inside the block
        self.tasks: dict[int, Any] = {}
        self.ended: list[Any] = []  # killed or timed-out callers' tasks

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()["groups"]["g"]  # type: ignore[no-any-return]

    def settle(self) -> None:
        """Wait until every holder the model names is inside its block, the line is as long
        as the model's, and every interrupted caller has ended."""
        wait_until(lambda: (all(h in self.entered for h in self.holders)
                            and self.stats()["exclusive_waiting"] == len(self.waiting)
                            and all(t.join(0) for t in self.ended)), 20,
                   f"holders {self.holders}, {len(self.waiting)} waiting: {self.stats()}")

    def kill(self, caller: int) -> None:
        task = self.tasks.pop(caller)
        if MODE == "gevent":
            task._handle.kill(block=False)
        else:
            task._handle.kill()
        self.ended.append(task)

    @rule()
    def arrive(self) -> None:
        caller = self.arrivals
        self.arrivals += 1

        def enter() -> None:
            block = self.pool.exclusive("g", timeout=60)
            block.__enter__()
            self.entered[caller] = block

        if len(self.holders) < LINE_LIMIT and not self.waiting:
            self.holders.append(caller)
        else:
            self.waiting.append(caller)
        self.tasks[caller] = spawn(enter)
        # arrival order is the line's order: each caller is in line before the next comes
        wait_until(lambda: caller in self.entered
                   or self.stats()["exclusive_waiting"] == len(self.waiting), 20, "in line")
        self.settle()

    def _give_back(self, pick: int) -> None:
        caller = self.holders.pop(pick % len(self.holders))
        self.tasks.pop(caller, None)
        self.entered.pop(caller).__exit__(None, None, None)

    def _promote(self) -> None:
        if self.waiting:
            self.holders.append(self.waiting.pop(0))

    @precondition(lambda self: self.holders)
    @rule(pick=st.integers(0, 10))
    def give_back(self, pick: int) -> None:
        self._give_back(pick)
        self._promote()
        self.settle()

    @precondition(lambda self: self.waiting)
    @rule(pick=st.integers(0, 10))
    def kill_a_waiter(self, pick: int) -> None:
        self.kill(self.waiting.pop(pick % len(self.waiting)))
        self.settle()

    @precondition(lambda self: self.waiting and self.holders)
    @rule(kill_first=st.booleans(), pick=st.integers(0, 10))
    def kill_the_next_one_at_the_hand_off(self, kill_first: bool, pick: int) -> None:
        """The oldest waiter is killed in the same turn as a unit is given back to it:
        before its hand-off, or after it (then it is woken, and killed while its
        connection is being opened). Either way the unit goes on to the next one."""
        victim = self.waiting.pop(0)
        if kill_first:
            self.kill(victim)
            self._give_back(pick)
        else:
            self._give_back(pick)
            self.kill(victim)
        self._promote()
        self.settle()

    @precondition(lambda self: len(self.holders) == LINE_LIMIT)
    @rule(own_timeout=st.booleans())
    def a_caller_times_out_in_line(self, own_timeout: bool) -> None:
        def enter() -> None:
            if own_timeout:
                self.pool.exclusive("g", timeout=0.02).__enter__()
            else:
                with Timeout(0.02):
                    self.pool.exclusive("g", timeout=60).__enter__()

        task = spawn(enter)
        join_all([task], 10)
        assert isinstance(task.error, PoolTimeout if own_timeout else Timeout), task.error
        self.settle()

    @invariant()
    def holders_are_the_models(self) -> None:
        stats = self.stats()
        assert sorted(self.entered) == sorted(self.holders), (self.entered, self.holders)
        assert stats["exclusive_open"] == len(self.holders), stats
        assert stats["exclusive_waiting"] == len(self.waiting), stats

    def teardown(self) -> None:
        try:
            for caller in list(self.waiting):
                self.kill(caller)
            for block in self.entered.values():
                block.__exit__(None, None, None)
            join_all(self.ended, 10)
            wait_until(lambda: self.stats()["exclusive_connecting"] == 0, 15,
                       "the connect tasks to end")
            stats = self.stats()
            assert (stats["exclusive_open"], stats["exclusive_waiting"]) == (0, 0), stats
        finally:
            self.pool.close()
        wait_until(lambda: self.server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (LINE_APP,))[0][0] == 0, 10, "no session left")


@pytest.mark.skipif(not GREEN, reason="kills a waiting task")
@pytest.mark.timeout(600)
def test_the_exclusive_line_is_first_come_first_served_and_loses_no_unit_to_a_kill(pg):
    ExclusiveLineModel.server = pg
    run_state_machine_as_test(ExclusiveLineModel, settings=settings(
        max_examples=15, stateful_step_count=25, deadline=None, phases=PHASES,
        suppress_health_check=list(HealthCheck)))
