"""A model of slot accounting: random borrow, return and fault sequences on a real pool.

:class:`SlotAccountingMachine` is a hypothesis ``RuleBasedStateMachine`` that drives a real
:class:`greenpool.Pool` against a real throwaway PostgreSQL server (one cluster shared by all
examples, stopped, crashed, restarted and stalled by the rules) and checks the pool's
accounting after every step. It lives here, not in a test module, so that both the test
(tests/test_slot_accounting_model.py) and the soak run (benchmarks/slot_model.py) use it
without one test module importing another.

The pool is created per example with two groups on the one server: ``rw`` (``role:
'primary'``) and ``any`` (``role: 'any'``), each of 2 to 4 connections, short timeouts and
a short ``maintenance_interval``, under a unique ``application_name`` so the server can tell
its sessions from those of earlier examples. The test process's mode (``GREENPOOL_TEST_MODE``,
see modes.py) decides what a borrower can be: a greenlet that is killed, a thread that waits
for a hand-off; a ``non-threaded`` pool never waits.

Invariants, after every step:

* per group, ``size == idle + in_use + connecting <= connection_count``, and the group's open
  connections (``connects - discards``) are exactly its idle and lent ones; housekeeping may
  hold a connection for a bounded check, so this is polled for a few seconds, and a slot
  nobody holds never comes back;
* ``in_use`` is exactly what the model holds, ``acquires`` exactly the connections it was
  handed, and no connection is lent twice;
* on the server, the sessions named by the pool's ``application_name`` (besides stalled
  backends, which cannot exit until resumed) never exceed the total ``connection_count``
  (polled: a closed session's backend exits asynchronously).

At rest (the ``settle`` rule and teardown: the server up, every backend resumed, nothing
held), each group lends ``connection_count`` connections at the same time within a bounded
time and each runs ``SELECT 1``: a lost slot shows as a group that lends fewer. After
``close()`` no session of the pool is left on the server.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import psycopg2
from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from modes import GREEN, MODE, sleep, spawn

from greenpool import Pool
from greenpool.connection import PooledConnection, round_trip
from greenpool.errors import PoolError
from greenpool.testing.postgres import Cluster

GROUPS = ("rw", "any")
ROLES = {"rw": "primary", "any": "any"}
CONNECT_TIMEOUT = 0.4  # seconds: bounds every round trip the pool makes, and our own
ACQUIRE_TIMEOUT = 0.5  # the groups' default acquire timeout
#: how long housekeeping may hold a connection it took for a check (one bounded round trip
#: each, one at a time, a few stalled), and backends take to exit: the invariants' polling
SETTLE_SECONDS = 4.0
AT_REST_SECONDS = 10.0  # what a group gets to lend all of its connections at rest
_example_numbers = itertools.count(1)


@dataclass(frozen=True)
class ModelSetup:
    """What one run of the machine works on: the shared cluster and the pool's mode."""

    cluster: Cluster
    pool_type: str  # gevent, eventlet, threaded (the process's mode) or non-threaded
    maintenance_interval: float = 0.05
    #: the background role probe; long by default, so that a role probe happens where the
    #: ``probe_role_now`` rule puts it and a failure replays exactly
    role_check_interval: float = 3600.0
    quarantine_max: float = 0.3

    def __post_init__(self) -> None:
        if self.pool_type != "non-threaded" and self.pool_type != MODE:
            raise ValueError(f"a {self.pool_type!r} pool cannot run in a {MODE} process")


def machine_for(setup: ModelSetup) -> type[SlotAccountingMachine]:
    """A machine class bound to ``setup`` (hypothesis instantiates it once per example)."""
    name = f"SlotAccounting_{setup.pool_type.replace('-', '_')}"
    return type(name, (SlotAccountingMachine,), {"setup": setup})


class AccountingError(AssertionError):
    """An invariant of slot accounting does not hold."""


def _wait_for(check: Callable[[], str], seconds: float) -> None:
    """Poll ``check`` (returning '' when satisfied, else what is wrong) until it is satisfied
    or ``seconds`` passed; then fail with its last complaint."""
    deadline = time.monotonic() + seconds
    while True:
        complaint = check()
        if not complaint:
            return
        if time.monotonic() > deadline:
            raise AccountingError(f"{complaint} (still so after {seconds:.1f} s)")
        sleep(0.01)


class SlotAccountingMachine(RuleBasedStateMachine):
    """Borrow, return, interrupt, terminate, crash, restart, stall and probe; check the books.

    The rules that need a capability the mode lacks (a greenlet to kill, a second borrower
    to wait) are disabled by preconditions, so one machine serves every mode. Preconditions
    depend only on the mode and on earlier rules (whether the server was stopped), never on
    what the pool did (a borrow may or may not succeed in time): hypothesis needs the same
    steps to be drawn when it replays an example. A rule with nothing to act on does nothing.
    """

    setup: ClassVar[ModelSetup]

    def __init__(self) -> None:
        super().__init__()
        cluster = self.setup.cluster
        self.cluster = cluster
        self.pool: Pool | None = None
        self.app = f"gp-model-{os.getpid()}-{next(_example_numbers)}"
        self.counts: dict[str, int] = {}
        self.groups: dict[str, dict[str, Any]] = {}  # the groups as last configured
        #: the most a group may hold: its connection_count, or more for a while after
        #: resize() lowered it (the loans and connects under way then), never growing
        self.limits: dict[str, int] = {}
        self.held: list[tuple[str, PooledConnection]] = []
        self.acquires = dict.fromkeys(GROUPS, 0)
        self.stalled: set[int] = set()
        self.server_up = True
        self._admin: Any = None
        if not cluster.is_running():  # a previous example failed with the server down
            cluster.start()

    # --- capabilities -------------------------------------------------------------------

    @property
    def can_wait(self) -> bool:
        """Whether a borrower can wait for another to return one (not non-threaded)."""
        return self.setup.pool_type != "non-threaded"

    @property
    def can_kill(self) -> bool:
        """Whether a borrower can be interrupted mid-acquire (a greenlet killed, a Timeout)."""
        return GREEN and self.setup.pool_type == MODE

    @property
    def can_stall(self) -> bool:
        """Whether the pool bounds round trips to a stalled backend: not a non-threaded pool
        in a green process, whose driver waits are the green library's, which knows nothing
        of the blocking modes' deadlines."""
        return self.setup.pool_type != "non-threaded" or MODE == "threaded"

    # --- setup ----------------------------------------------------------------------------

    @initialize(rw=st.integers(2, 4), any_=st.integers(2, 4))
    def open_pool(self, rw: int, any_: int) -> None:
        self.counts = {"rw": rw, "any": any_}
        self.limits = dict(self.counts)
        groups = {
            name: {"connection_count": self.counts[name], "role": ROLES[name],
                   "timeout": ACQUIRE_TIMEOUT, "autocommit": True}
            for name in GROUPS
        }
        self.groups = groups
        self.pool = Pool(self._config())

    def _config(self) -> dict[str, Any]:
        return {
            "type": self.setup.pool_type,
            "db": self.cluster.endpoint(connect_timeout=CONNECT_TIMEOUT),
            "groups": self.groups,
            "application_name": self.app,
            "maintenance_interval": self.setup.maintenance_interval,
            "role_check_interval": self.setup.role_check_interval,
            "quarantine_initial": 0.05,
            "quarantine_max": self.setup.quarantine_max,
        }

    def group(self, name: str) -> Any:
        assert self.pool is not None
        return self.pool.group(name)

    def held_in(self, name: str) -> list[PooledConnection]:
        return [pc for g, pc in self.held if g == name]

    # --- borrowing and returning --------------------------------------------------------

    def _took(self, name: str, pc: PooledConnection) -> None:
        """A loan to the model: never one it already holds."""
        for _, other in self.held:
            if other is pc or other.raw is pc.raw:
                raise AccountingError(f"group {name!r} lent {pc!r} twice")
        pid = _backend_pid(pc)
        if pid is not None and pid in {_backend_pid(other) for _, other in self.held}:
            raise AccountingError(f"group {name!r} lent backend {pid} twice")
        self.held.append((name, pc))

    def _acquire(self, name: str, timeout: float | None) -> PooledConnection | None:
        try:
            pc = self.group(name).acquire(timeout)
        except PoolError:  # timed out, no endpoint answered, closed: a refusal, not a loss
            return None
        self.acquires[name] += 1  # counted as handed out
        return pc  # type: ignore[no-any-return]

    @rule(name=st.sampled_from(GROUPS),
          timeout=st.sampled_from([None, 0.0, 0.001, 0.2]))
    def borrow(self, name: str, timeout: float | None) -> None:
        """Borrow with the group's timeout, none at all, 1 ms, or a short one."""
        pc = self._acquire(name, timeout)
        if pc is not None:
            self._took(name, pc)

    @rule(index=st.integers(0, 15), discard=st.booleans(), use=st.booleans())
    def give_back(self, index: int, discard: bool, use: bool) -> None:
        """Return a held connection (after a ``SELECT 1`` on it, or not), or discard it."""
        if not self.held:
            return
        name, pc = self.held.pop(index % len(self.held))
        if use:
            self._select_1(pc)
        self.group(name).release(pc, "model_discard" if discard else "")

    def _select_1(self, pc: PooledConnection) -> bool:
        """``SELECT 1`` bounded like the pool's own round trips; whether it answered (a
        fault may have cut its session: the pool discards it on return)."""
        assert self.pool is not None
        try:
            rows = round_trip(pc.raw, "SELECT 1", self.pool._backend, CONNECT_TIMEOUT)
        except psycopg2.Error:
            return False
        return rows == [(1,)]

    @precondition(lambda self: self.can_kill)
    @rule(name=st.sampled_from(GROUPS), delay=st.sampled_from([0.0, 0.001, 0.005, 0.03]))
    def borrower_killed(self, name: str, delay: float) -> None:
        """A borrowing greenlet is killed ``delay`` seconds into its acquire (waiting in
        line, checking an idle connection, or just served): its loan or slot must not leak."""
        got: list[PooledConnection] = []

        def borrow() -> None:
            pc = self._acquire(name, 2.0)
            if pc is not None:
                got.append(pc)  # no switch between the loan and this

        task = _green_spawn(borrow)
        sleep(delay)
        _green_kill(task)
        for pc in got:
            self._took(name, pc)

    @precondition(lambda self: self.can_kill)
    @rule(name=st.sampled_from(GROUPS), seconds=st.sampled_from([0.0005, 0.002, 0.02]))
    def borrow_under_a_timeout(self, name: str, seconds: float) -> None:
        """``acquire`` inside the green library's own ``Timeout``, shorter than its own."""
        from modes import Timeout

        try:
            with Timeout(seconds):
                pc = self._acquire(name, 2.0)
        except Timeout:
            return
        if pc is not None:
            self._took(name, pc)

    @precondition(lambda self: self.can_wait)
    @rule(index=st.integers(0, 15))
    def hand_off_to_a_waiter(self, index: int) -> None:
        """Another borrower waits in the group's line while a held connection is returned:
        the return serves the waiter (or, if something else came first, it is idle)."""
        if not self.held:
            return
        name, pc = self.held.pop(index % len(self.held))
        group = self.group(name)
        task = spawn(self._acquire, name, 2.0)
        deadline = time.monotonic() + 0.5
        while group.stats()["waiting"] == 0 and not task.join(0):
            if time.monotonic() > deadline:
                break  # it found something idle, or a connect is slow: return anyway
            sleep(0.002)
        group.release(pc)
        if not task.join(5):
            raise AccountingError(f"group {name!r}: a waiter was not served within 5 s")
        if task.error is not None:
            raise task.error
        if task.result is not None:
            self._took(name, task.result)

    # --- faults on the server -----------------------------------------------------------

    def admin(self, sql: str, params: Any = None) -> list[Any]:
        """A statement on the model's own session (not the pool's application_name)."""
        for attempt in (1, 2):
            try:
                if self._admin is None or self._admin.closed:
                    self._admin = self.cluster.connect(application_name="gp-model-admin")
                with self._admin.cursor() as cursor:
                    cursor.execute(sql, params)
                    return list(cursor.fetchall()) if cursor.description else []
            except psycopg2.OperationalError:  # the server restarted since: a new session
                self._close_admin()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _close_admin(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
        self._admin = None

    def server_pids(self) -> list[int]:
        """The backends of the pool's sessions, oldest first."""
        rows = self.admin("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                          "ORDER BY backend_start, pid", (self.app,))
        return [int(pid) for (pid,) in rows]

    def _pick(self, lent: bool, index: int) -> int | None:
        """A running backend of a lent connection (``lent``) or of one the pool keeps."""
        held = {_backend_pid(pc) for _, pc in self.held}
        pids = [p for p in self.server_pids()
                if p not in self.stalled and (p in held) == lent]
        return pids[index % len(pids)] if pids else None

    @precondition(lambda self: self.server_up)
    @rule(lent=st.booleans(), index=st.integers(0, 15))
    def terminate_backend(self, lent: bool, index: int) -> None:
        """``pg_terminate_backend`` of a lent or idle connection's session (waiting until
        the backend has exited, so the pool's side of it is readable)."""
        pid = self._pick(lent, index)
        if pid is not None:
            self.admin("SELECT pg_terminate_backend(%s, 3000)", (pid,))

    @precondition(lambda self: self.server_up and self.can_stall)
    @rule(lent=st.booleans(), index=st.integers(0, 15))
    def stall_backend(self, lent: bool, index: int) -> None:
        """SIGSTOP a lent or idle connection's backend: its socket stays open, nothing answers
        (resumed by ``resume_backends``, before any server stop, and in teardown)."""
        pid = self._pick(lent, index)
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)
            self.stalled.add(pid)

    @rule()
    def resume_backends(self) -> None:
        """SIGCONT every stalled backend."""
        self._resume()

    def _resume(self) -> None:
        for pid in self.stalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stalled.clear()

    @precondition(lambda self: self.server_up)
    @rule(fast=st.booleans())
    def restart_server(self, fast: bool) -> None:
        """``pg_ctl restart -m fast``, or a crash (``stop -m immediate``) and a start: every
        session the pool keeps or lends is gone."""
        self._resume()  # a stopped backend would hold up the shutdown
        self._close_admin()
        if fast:
            self.cluster.restart("fast")
        else:
            self.cluster.stop("immediate")
            self.cluster.start()

    @precondition(lambda self: self.server_up)
    @rule()
    def stop_server(self) -> None:
        """The server crashes (``stop -m immediate``) and stays down for a few steps."""
        self._resume()
        self._close_admin()
        self.cluster.stop("immediate")
        self.server_up = False

    @precondition(lambda self: not self.server_up)
    @rule()
    def start_server(self) -> None:
        self.cluster.start()
        self.server_up = True

    # --- housekeeping, run now ----------------------------------------------------------

    @rule()
    def probe_role_now(self) -> None:
        """Housekeeping's role probe of the endpoint (what it runs every
        ``role_check_interval``): on an idle connection if there is one, else on a probe
        connection within a group's room."""
        assert self.pool is not None
        for endpoint in self.pool._endpoints:
            self.pool._housekeeping._probe_role(endpoint)

    @rule()
    def probe_endpoint_now(self) -> None:
        """Housekeeping's quarantine probe: one connect within a group's room, or one
        short-lived connection of its own when every group is full."""
        assert self.pool is not None
        for endpoint in self.pool._endpoints:
            self.pool._housekeeping._probe(endpoint)

    @precondition(lambda self: not self.can_wait)
    @rule(name=st.sampled_from(GROUPS))
    def upkeep_now(self, name: str) -> None:
        """non-threaded: nothing runs housekeeping's upkeep but the caller; run it here."""
        assert self.pool is not None
        self.pool._housekeeping._upkeep(self.group(name))

    # --- live changes ---------------------------------------------------------------------

    @rule(name=st.sampled_from(GROUPS))
    def drain(self, name: str) -> None:
        """Retire every connection: idle ones now, the model's loans when it returns them."""
        assert self.pool is not None
        self.pool.drain(name)

    @rule(name=st.sampled_from(GROUPS), count=st.integers(1, 4))
    def resize(self, name: str, count: int) -> None:
        """A new connection_count, lower or higher, while the model may hold loans."""
        assert self.pool is not None
        self.pool.resize(name, count)
        self.counts[name] = count
        self.groups[name] = {**self.groups[name], "connection_count": count}
        self.limits[name] = max(count, self.group(name).stats()["size"])

    @rule(name=st.sampled_from(GROUPS), count=st.integers(1, 4),
          statement_timeout=st.sampled_from([None, 30]))
    def reconfigure(self, name: str, count: int, statement_timeout: float | None) -> None:
        """A whole new configuration: the group's size and a setting that travels with each
        connection (a change drains the group)."""
        assert self.pool is not None
        self.groups[name] = {**self.groups[name], "connection_count": count,
                             "statement_timeout": statement_timeout}
        self.pool.reconfigure(self._config())
        self.counts[name] = count
        self.limits[name] = max(count, self.group(name).stats()["size"])

    # --- at rest ----------------------------------------------------------------------------

    @rule()
    def settle(self) -> None:
        """Bring everything to rest and check that no slot was lost."""
        self.check_at_rest()

    def check_at_rest(self) -> None:
        """Every backend resumed, the server up, nothing held: each group lends all of its
        connections at once within ``AT_REST_SECONDS``, each of them answers ``SELECT 1``."""
        self._resume()
        if not self.server_up:
            self.cluster.start()
            self.server_up = True
        while self.held:
            name, pc = self.held.pop()
            self.group(name).release(pc)
        self.books_balance()
        for name in GROUPS:
            lent = self._lend_all(name)
            for pc in lent:
                self.group(name).release(pc)
        self.books_balance()

    def _lend_all(self, name: str) -> list[PooledConnection]:
        group, want = self.group(name), self.counts[name]
        lent: list[PooledConnection] = []
        deadline = time.monotonic() + AT_REST_SECONDS
        try:
            while len(lent) < want and time.monotonic() < deadline:
                pc = self._acquire(name, max(0.01, deadline - time.monotonic()))
                if pc is None:
                    continue  # e.g. NoHealthyEndpoint while the quarantine after a stop ends
                if self._select_1(pc):
                    lent.append(pc)
                else:  # ended by a fault just before (its server gone): discarded on return
                    group.release(pc)
        except BaseException:
            for pc in lent:
                group.release(pc)
            raise
        if len(lent) < want:
            for pc in lent:
                group.release(pc)
            raise AccountingError(
                f"at rest, group {name!r} lends {len(lent)} of {want} connections at once "
                f"within {AT_REST_SECONDS} s: {group.stats()}")
        return lent

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def loans_and_acquires_are_exact(self) -> None:
        if self.pool is None:
            return
        for name in GROUPS:
            stats = self.group(name).stats()
            held = len(self.held_in(name))
            if stats["in_use"] != held:
                raise AccountingError(f"group {name!r}: in_use {stats['in_use']}, but the "
                                      f"model holds {held}: {stats}")
            if stats["acquires"] != self.acquires[name]:
                raise AccountingError(f"group {name!r}: acquires {stats['acquires']}, but the "
                                      f"model made {self.acquires[name]}: {stats}")

    @invariant()
    def books_balance(self) -> None:
        """size == idle + in_use + connecting <= connection_count, and connects - discards ==
        idle + in_use, once housekeeping gave back what it took for a check (polled)."""
        if self.pool is None:
            return
        for name in GROUPS:
            group = self.group(name)
            size = group.stats()["size"]
            if size > self.limits[name]:
                raise AccountingError(f"group {name!r} above its connection_count (or the "
                                      f"size it had when resize() lowered it, "
                                      f"{self.limits[name]}): {group.stats()}")
            self.limits[name] = max(self.counts[name], size)  # a lowered size never grows

            _wait_for(_books_of(name, group), SETTLE_SECONDS)

    @invariant()
    def server_sessions_within_the_budget(self) -> None:
        """The pool's sessions on the server (stalled ones aside: a stopped backend cannot
        exit) never exceed the groups' connection_count together (polled: backends exit
        asynchronously)."""
        if self.pool is None or not self.server_up:
            return
        budget = sum(self.limits.values())

        def check() -> str:
            live = [p for p in self.server_pids() if p not in self.stalled]
            if len(live) > budget:
                return f"{len(live)} sessions of the pool on the server, budget {budget}"
            return ""

        _wait_for(check, SETTLE_SECONDS)

    # --- the end ------------------------------------------------------------------------------

    def teardown(self) -> None:
        """At rest, every slot still works; after close, no session of the pool is left."""
        try:
            if self.pool is not None:
                try:
                    self.check_at_rest()
                finally:
                    self.held.clear()
                    self.pool.close()
                self.server_up = True

                def gone() -> str:
                    left = self.server_pids()
                    return f"sessions left after close: {left}" if left else ""

                _wait_for(gone, SETTLE_SECONDS)
        finally:
            self._resume()
            if not self.cluster.is_running():
                self.cluster.start()
            self._close_admin()


def _books_of(name: str, group: Any) -> Callable[[], str]:
    """The balance of one group's books: '' if they balance, else the stats that do not."""

    def check() -> str:
        s = group.stats()
        if s["size"] != s["idle"] + s["in_use"] + s["connecting"]:
            return (f"group {name!r}: size {s['size']} != idle {s['idle']} + in_use "
                    f"{s['in_use']} + connecting {s['connecting']} (a slot nobody holds): {s}")
        if s["connects"] - s["discards"] != s["idle"] + s["in_use"]:
            return (f"group {name!r}: connects {s['connects']} - discards {s['discards']} != "
                    f"idle {s['idle']} + in_use {s['in_use']}: {s}")
        return ""

    return check


def _backend_pid(pc: PooledConnection) -> int | None:
    try:
        return int(pc.raw.get_backend_pid())
    except psycopg2.Error:
        return None


def _green_spawn(func: Callable[[], None]) -> Any:
    if MODE == "gevent":
        import gevent

        return gevent.spawn(func)
    import eventlet

    return eventlet.spawn(func)


def _green_kill(task: Any) -> None:
    if MODE == "gevent":
        task.kill(block=True, timeout=5)
        if not task.dead:
            raise AccountingError("a killed borrower did not end within 5 s")
        return
    task.kill()


def run_model(setup: ModelSetup, examples: int, steps: int, seed: int | None = None,
              shrink: bool | None = None) -> None:
    """Run the machine for ``examples`` examples of up to ``steps`` steps.

    ``seed`` defaults to ``GREENPOOL_MODEL_SEED``, else a random one; it is printed before
    the run and added to the failure. Shrinking a failure replays it many times (minutes,
    at seconds per example), so ``shrink`` defaults to ``GREENPOOL_MODEL_SHRINK=1``; without
    it the failure shows the steps of the example as found.
    """
    if seed is None:
        chosen = os.environ.get("GREENPOOL_MODEL_SEED")
        seed = int(chosen) if chosen else secrets.randbits(32)
    if shrink is None:
        shrink = os.environ.get("GREENPOOL_MODEL_SHRINK") == "1"
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    chosen_settings = settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        print_blob=True, phases=phases, suppress_health_check=list(HealthCheck))
    machine = hypothesis_seed(seed)(machine_for(setup))
    line = (f"slot accounting model: GREENPOOL_MODEL_SEED={seed} ({setup.pool_type} pool in "
            f"a {MODE} process, {examples} examples of up to {steps} steps)")
    print(line, flush=True)
    try:
        run_state_machine_as_test(machine, settings=chosen_settings)
    except BaseException as exc:
        exc.add_note(f"replay: {line}")
        raise
