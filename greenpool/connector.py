"""The connector: the pool, not the caller who asks, opens a group's connections.

A caller that finds nothing idle waits in the group's line; the group reserves a slot and
asks the connector for a connection. The connector opens it in a background task (a
greenlet, or a thread in ``threaded`` mode) and hands the finished connection to the group,
which gives it to whoever is first in line *then*, or keeps it idle. So:

* a caller's timeout ends its wait, never an attempt in flight: a connection a caller gave up
  on serves the next one (no livelock when deadlines are near the connect time);
* every attempt is bounded by the endpoint's ``connect_timeout`` alone, so its failure is
  the server's doing, and only such a failure (refused, reset, no answer within the whole
  ``connect_timeout``, shutting down) counts against the endpoint: a caller with 2 ms left
  never quarantines a healthy server;
* a task holds its slot until it delivers a connection or the group no longer needs it
  (nobody waits and the group is at ``min_size``), so a failed refill never loses a slot;
* a failure that retrying cannot fix (bad password, missing database, a parameter a pooler
  refuses) does not quarantine the server; it fails the waiting callers at once instead.

``non-threaded`` mode has no background: :meth:`Connector.open_now` connects inline, under
the same rule (each attempt bounded by ``connect_timeout``, never by the caller's time).

The group talks to the connector through :meth:`Connector.start`, and the connector back to
the group through the small :class:`Slots` interface: nothing here knows the waiting line.

While callers wait for a write group and no primary is up, a task that failed its round
watches a standby for its promotion (promotion.py); refusals retrying cannot fix are
remembered per endpoint in refusals.py.

Why one module of this length: opening, retrying across endpoints and closing share the
endpoints' state and the group's refusals; the connect itself is connection.py's, the
failures' wording failures.py's. Where the group's connections are (per endpoint) is the
group's to say: it counts them from its slots (``Group.counts``).
"""

from __future__ import annotations

import logging
import os
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from .concurrency.backend import Backend
from .concurrency.fork import InheritedAcrossFork, still_connecting
from .concurrency.tasks import BackgroundTasks
from .config import GroupConfig
from .connection import (
    ConnectError,
    PooledConnection,
    behind_pooler,
    close_quietly,
    connect_kwargs,
    is_pooled,
    open_connection,
)
from .endpoint import GROUP_SETBACKS, HOOK_NO_ANSWER, QUARANTINED, UP, Endpoint
from .errors import ConnectFailed, NoHealthyEndpoint, PoolClosed, PoolError, PoolTimeout
from .events import no_event
from .failures import advice, no_answer
from .placement import connect_order, where_to_be
from .promotion import PromotionWatch
from .refusals import Refusals
from .roles import EXPLORE_WAIT, candidates, fits, must_measure, read_role, role_of, unexplored
from .slots import Slot
from .stats import GroupCounters

logger = logging.getLogger("greenpool")

_monotonic = time.monotonic
_NO_ANSWER = no_answer().kind
_RECHECK_PAUSE = 0.02  # seconds between looks while no endpoint may take a connect
_LIFETIME_JITTER = 0.1  # up to 10 % shorter, so connections opened together do not expire together


class Slots(Protocol):
    """What the connector needs from its group. A connect task holds a :class:`Slot`, which
    names the group generation it was taken in, so that a task inherited across ``fork()``
    touches nothing; a task that ends without a connection gives the slot back itself."""

    def _deliver(self, slot: Slot, pc: PooledConnection) -> None:
        """A new connection, for the slot the task held (attached to it by the group)."""

    def _still_needed(self, slot: Slot) -> bool:
        """After a failed round: keep the slot and try again (True), or it was given back."""

    def _fail_waiters(self, make_error: Callable[[], BaseException], generation: int) -> None:
        """Every caller waiting now gets an error (a failure retrying cannot fix)."""

    def _endpoint_failed(self, endpoint: Endpoint) -> None:
        """A connect to ``endpoint`` failed for a server reason: its idle peers are suspect."""

    def _landed_elsewhere(self, target: Endpoint) -> None:
        """A connect aimed at ``target`` (a move, an endpoint without a connection of the
        group) opened its connection on another endpoint."""

    @property
    def waiting(self) -> int:
        """How many callers wait for a connection now."""

    def preferred_endpoints(self) -> frozenset[Endpoint]:
        """Where the group should be now (placement.where_to_be, cached by the group)."""

    @property
    def counts(self) -> Mapping[Endpoint, int]:
        """The group's connections per endpoint: its attached slots' (0 for each endpoint
        it has), counted when asked."""


class Connector:
    """Opens and closes the connections of one group, and knows where they are."""

    def __init__(
        self,
        config: GroupConfig,
        endpoints: Sequence[Endpoint],
        backend: Backend,
        application_name: str,
        counters: GroupCounters,
    ) -> None:
        self.config = config
        self.endpoints = list(endpoints)
        self.counters = counters
        self._backend = backend
        self._lock = backend.lock()
        self._application_name = application_name
        self._kwargs = {ep: connect_kwargs(ep.config, config, application_name) for ep in endpoints}
        self._rotation = random.randrange(len(self.endpoints))
        #: the endpoints that refused this group for a reason retrying cannot fix
        self.refusals = Refusals(self.endpoints)
        #: True while the latest finished round of attempts found no endpoint to take one
        self.failing = False
        #: told ``(kind, detail)`` when ``failing`` flips (``greenpool.events``)
        self.on_event: Callable[[str, str], None] = no_event
        #: connect tasks (and dedicated connections' ones): :meth:`stop` ends them
        self._tasks = BackgroundTasks(backend)
        #: every connection this connector opened and has not seen collected: after fork
        #: the child silences them all, idle, lent or in transit (being checked or reset)
        self.opened: weakref.WeakSet[PooledConnection] = weakref.WeakSet()
        self.slots: Slots | None = None
        #: a primary group over several endpoints explores unknown ones before it writes
        self._explores = config.role == "primary" and len(self.endpoints) > 1
        #: while callers wait and no primary is up, a failed connect task watches a standby
        self._promotion = PromotionWatch(self, backend)

    # --- asked by the group -------------------------------------------------------------

    def start(self, slot: Slot, target: Endpoint | None = None) -> bool:
        """Open one connection in the background in ``slot`` (preferably to ``target``) and
        deliver it. Never raises: a task that cannot start (a process limit on threads)
        gives the slot back, and callers waiting learn why when their time runs out. The slot
        is the task's from the moment the task begins, even if starting it was interrupted
        (see :meth:`BackgroundTasks.spawn`): only a task that never began gives it back here.
        """
        def not_started() -> None:
            slot.give_back(reconnect=False)  # another try would fail the same way

        if self.run_in_background(lambda: self._run(slot, target), not_started):
            return True
        logger.warning("group %r: cannot start a connect task: %s", self.config.name,
                       self.cannot_start)
        return False

    def open_now(self, deadline: float, generation: int) -> PooledConnection | None:
        """Connect inline (``non-threaded`` mode, dedicated connections): rounds of
        attempts, each bounded by its endpoint's ``connect_timeout`` and by ``deadline``,
        the caller's. None when the deadline passed first (the caller asks
        :meth:`timed_out` what to say: an attempt its time cut short is no verdict on the
        server); raises the refusal when the configuration is the problem, and
        :class:`PoolClosed` once the pool is closed (from a signal handler, another task)."""
        while True:
            pc = self._round(None, generation, deadline)
            if pc is not None:
                return pc
            if self.stopped:
                raise PoolClosed(f"group {self.config.name!r}: the pool is closed")
            self._raise_if_hopeless()
            remaining = deadline - _monotonic()
            if remaining <= 0:
                return None
            self._backend.sleep(min(remaining, self._next_chance()))

    def run_in_background(self, work: Callable[[], None],
                          not_started: Callable[[], None]) -> bool:
        """Run ``work`` in a task of its own that :meth:`stop` ends (a group's connect, a
        dedicated one); False if no task could start (``cannot_start`` says why). Exactly
        one of ``work`` and ``not_started`` runs (see :meth:`BackgroundTasks.spawn`)."""
        return self._tasks.spawn(work, not_started)

    @property
    def cannot_start(self) -> str | None:
        """Why the latest task could not start (a process limit on threads), if so."""
        return self._tasks.cannot_start

    def open_round(
        self, generation: int, last: Sequence[Endpoint] = ()
    ) -> PooledConnection | None:
        """One round of attempts, best endpoint first (those in ``last`` last), each
        bounded by its endpoint's ``connect_timeout`` alone (a background task's, for a
        dedicated connection): the first connection, or None (``failing`` says whether a
        server failed)."""
        if self.stopped:
            return None
        return self._round(None, generation, last=last)

    def wait_for_next_chance(self) -> None:
        """Sleep until an endpoint may take an attempt again (cut short by :meth:`stop`)."""
        self.pause(self._next_chance())

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, cut short by :meth:`stop`."""
        self._tasks.pause(seconds)

    @property
    def stopped(self) -> bool:
        return self._tasks.stopped

    def try_once(
        self, endpoint: Endpoint, generation: int, deadline: float
    ) -> PooledConnection | None:
        """One placed connect attempt to ``endpoint`` within ``deadline`` (non-threaded
        spreading); None if it may not be tried now, failed, or does not fit the group."""
        claimed = self._claim(endpoint)
        if claimed is None:
            return None
        try:
            return self._attempt(endpoint, generation, deadline=deadline)
        finally:
            self._settle(endpoint, claimed)

    def probe(
        self, endpoint: Endpoint, generation: int, slot: Slot | None = None
    ) -> PooledConnection | None:
        """One connect to ``endpoint`` whatever placement says (housekeeping's probes, the
        promotion watch's connect, in a slot the group reserved); None if it may not be
        tried now (the group's refusal or setback there too: its hook would fail the same
        way) or failed. With ``slot``, the group abandons the connect if it drops
        ``endpoint``."""
        claimed = self._claim(endpoint)
        if claimed is None:
            return None
        if slot is not None:
            slot.trying = endpoint
        try:
            return self._attempt(endpoint, generation, placed=False)
        finally:
            self._settle(endpoint, claimed)

    @property
    def counts(self) -> Mapping[Endpoint, int]:
        """The group's connections per endpoint, as its slots hold them (placement balances
        on these)."""
        slots = self.slots
        return slots.counts if slots is not None else dict.fromkeys(self.endpoints, 0)

    def belongs(self, endpoint: Endpoint, role: str) -> bool:
        """Whether a connection to ``endpoint`` (whose server reports ``role``) may serve
        the group now: never once ``endpoint`` left the group (``reconfigure``), whatever
        the role; every connect, pooled or dedicated, and every listener's heartbeat asks
        this one place."""
        config = self.config
        if endpoint not in self.endpoints or not fits(config.role, role):
            return False
        if config.role == "any":
            return True
        slots = self.slots  # the group caches where it should be: not computed twice
        return endpoint in (slots.preferred_endpoints() if slots is not None else where_to_be(
            self.endpoints, config.role, config.max_lag, config.on_lag))

    def misplaced(self, endpoint: Endpoint, role: str) -> str:
        """Why a connection to ``endpoint`` (role ``role``) may not serve the group now, as
        a discard reason (``endpoint_removed``, ``wrong_role``); '' if it may."""
        if self.belongs(endpoint, role):
            return ""
        return "wrong_role" if endpoint in self.endpoints else "endpoint_removed"

    def fatal_error(self) -> ConnectFailed | None:
        """The error to raise at once when every endpoint refused this group for a reason
        retrying cannot fix (within the last ``quarantine_max``), else None."""
        return self.refusals.error(self.config.name, self.endpoints, _monotonic())

    def none_usable(self) -> bool:
        """Whether no endpoint can serve the group now: each one where a connect of the group
        may go (a role that fits it; a standby whose lag is unknown or aged counts, a connect
        measures it) is quarantined or refused the group, or there is none (a standby is
        listed for a primary group because it may be promoted, but until it is, it cannot
        serve one). Known from the endpoints' state, whether or not a connect has been tried
        since (a caller's time can run out before the first probe of a quarantined primary).
        An endpoint being probed is still quarantined: its last verdict stands until the
        probe answers (another group's or housekeeping's probe of a black hole lasts
        ``connect_timeout``, and a group that never tried it has no failure of its own)."""
        now = _monotonic()
        config = self.config
        tiers = candidates(self.endpoints, config.role, config.max_lag, config.on_lag,
                           connecting=True)
        return not any(ep.state == UP and fits(config.role, ep.role)
                       and not self.refusals.blocks(ep, now) for tier in tiers for ep in tier)

    def timed_out(self, busy: Callable[[], str], *, count: bool = True) -> PoolError:
        """What a caller whose time ran out is told, decided here for every kind of caller
        (a borrow, a dedicated connection, an inline connect): the refusal when the
        configuration is the problem; :class:`NoHealthyEndpoint` when the endpoints are why
        (the latest connects all failed, or none can serve the group now); else a
        :class:`PoolTimeout` saying ``busy()``: the group was busy, or a connect had not
        answered yet, which says nothing of the server. ``count``: the caller asked to
        wait, so its timeout is the group's."""
        error = self.fatal_error()
        if error is not None:
            return error
        if count:
            self.count_timeout()
        if self.failing or self.none_usable():
            # the group's own failures by name: an endpoint's last error may be another
            # group's (their hooks and refusals differ), and says nothing of a setback
            own = self.refusals.describe(self.endpoints)
            return NoHealthyEndpoint(
                f"group {self.config.name!r}: no endpoint took a connection within the "
                f"timeout. Endpoints: {self.describe()}. "
                + (f"This group's own connects failed: {own}. Check what they say. "
                   if own else "")
                + advice(ep.last_error for ep in self.endpoints))
        return PoolTimeout(busy())

    def count_timeout(self) -> None:
        """One caller of the group whose time ran out (the one place the count grows: a
        caller failed by a connect shared with others counts its own, see ``listen``)."""
        self.counters.timeouts += 1

    def describe(self) -> str:
        """The endpoints, and why none fits the group's role when none does (a standby
        of unknown lag or beyond ``max_lag``, primaries of unknown timeline)."""
        text = "; ".join(ep.describe() for ep in self.endpoints)
        config = self.config
        if config.role != "any" and not where_to_be(self.endpoints, config.role,
                                                     config.max_lag, config.on_lag):
            lag = f" within max_lag {config.max_lag} s" if config.max_lag is not None else ""
            text += (f". None of them is known to fit role {config.role!r}{lag} now (a lag "
                     f"or timeline not yet measured counts as unknown, never as fresh)")
        return text

    def apply(self, config: GroupConfig, endpoints: Sequence[Endpoint]) -> None:
        """A new configuration of the group and its endpoints (``Pool.reconfigure``): the
        next connects use them. Refusals are kept for the endpoints the group still has
        connections on, unless what a connect to one sends or runs changed (its settings,
        the group's, its ``configure`` hook): the fix the refusal asked for is tried at once."""
        kwargs = {ep: connect_kwargs(ep.config, config, self._application_name)
                  for ep in endpoints}
        counts = self.counts  # (the group's lock, taken before this one, never inside it)
        with self._lock:
            old_kwargs, same_hook = self._kwargs, config.configure is self.config.configure
            kept = [ep for ep in [*endpoints, *counts]  # (an endpoint taken out: as it was)
                    if same_hook and kwargs.get(ep, old_kwargs.get(ep)) == old_kwargs.get(ep)]
            self.config = config
            self.endpoints = list(endpoints)
            self._kwargs = kwargs
            self.refusals.apply(self.endpoints, kept)
            self._explores = config.role == "primary" and len(self.endpoints) > 1

    def close(self, pc: PooledConnection, reason: str, cell: list[Any] | None = None) -> None:
        """Close ``pc`` and count why. Only its group calls this (``Group.discard``), which
        gives its slot back; a dedicated connection, which has none, is closed here too.
        ``cell``: its slot's, whose endpoint is cleared in the step that counts the discard
        (the connection is being closed: the group counts it no more)."""
        with self._lock:  # counted under the lock: exact in threaded mode too
            self.counters.discards[reason] += 1
            if cell is not None:  # no call between: a discard counted is one counted out
                cell[1] = None
        close_quietly(pc)
        logger.debug("group %r: discarded a connection to %s (%s)", self.config.name,
                     pc.endpoint, reason)

    def stop(self) -> None:
        """End background connects: green ones are killed; a thread ends at its next look
        (its pause between rounds is cut short), never connecting again."""
        self._tasks.stop()

    def forget_after_fork(self) -> list[PooledConnection]:
        """In the child: forget everything; the parent's connections, to be silenced."""
        inherited = list(self.opened)
        self.opened = weakref.WeakSet()
        self._tasks.forget_after_fork()
        self._promotion.forget_after_fork()
        self._lock = self._backend.lock()
        self.failing = False
        return inherited

    # --- the background task ------------------------------------------------------------

    def _run(self, slot: Slot, target: Endpoint | None) -> None:
        slots = self.slots
        assert slots is not None
        generation = slot.generation
        aimed = target
        with slot:  # whatever ends this task, the slot is given back unless delivered
            while not self.stopped:
                pc = self._round(target, generation, slot=slot)
                if pc is not None:
                    if aimed is not None and pc.endpoint is not aimed:
                        slots._landed_elsewhere(aimed)
                    slots._deliver(slot, pc)
                    return
                target = None  # a failed preference falls back to the normal choice
                error = self.fatal_error()
                if error is not None:
                    logger.error("%s", error)
                    slots._fail_waiters(partial(ConnectFailed, str(error)), generation)
                    break
                if not slots._still_needed(slot):
                    return
                pc = self._promotion.await_promotion(generation, slot)
                if pc is not None:
                    slots._deliver(slot, pc)
                    return
                self.pause(self._next_chance())
            slot.give_back()

    def _round(
        self,
        target: Endpoint | None,
        generation: int,
        deadline: float | None = None,
        last: Sequence[Endpoint] = (),
        slot: Slot | None = None,
    ) -> PooledConnection | None:
        """One attempt on each endpoint that may take one now, best first, until one
        succeeds. None if none did (``failing`` then says whether any server failed), or
        the group abandoned the connect (gave ``slot`` back: its endpoint left the group)."""
        now = _monotonic()
        config = self.config
        # a primary group's standbys are tried only to find a promotion, never because its
        # primary refused it (that would make every endpoint look refused while sessions
        # already open on the primary serve on)
        order = connect_order(self.endpoints, config.role, config.max_lag, config.on_lag,
                              self.counts, now, self._rotation,
                              probe=not self._backend.can_wait,
                              refused=() if config.role == "primary"
                              else self.refusals.refused(now))
        self._rotation += 1
        if target is not None and target in order:
            order.remove(target)
            order.insert(0, target)
        if last:
            order.sort(key=last.__contains__)  # stable: the rest keep their order
        moved_on = failed = False
        for endpoint in order:
            if self.stopped or (deadline is not None and _monotonic() >= deadline) or (
                    slot is not None and slot.abandoned):
                break
            if self.refusals.blocks(endpoint, now):
                continue
            bound = deadline
            if self._explores and unexplored(endpoint):
                # a primary is chosen only once this one has answered or EXPLORE_WAIT has
                # passed: an attempt on it that outlasts the wait is cut, so that this task
                # moves on to the primary that answered (no verdict on a slow server)
                explored_by = _monotonic() + EXPLORE_WAIT
                bound = explored_by if bound is None else min(bound, explored_by)
            claimed = self._claim(endpoint)
            if claimed is None:
                continue  # another task probes it, or its slow start is at its limit
            if slot is not None:  # the group abandons this connect if it drops endpoint
                slot.trying = endpoint
            abandoned = endpoint.connects_abandoned
            try:
                pc = self._attempt(endpoint, generation, deadline=bound)
            finally:
                self._settle(endpoint, claimed)
            if pc is not None:
                if moved_on:
                    self.counters.failovers += 1
                if self.failing:
                    self.failing = False
                    self.on_event("connected", f"a connect to {endpoint.label} succeeded")
                return pc
            moved_on = True
            # an attempt cut short by its caller's time (or its endpoint gone) is no verdict
            failed = failed or (endpoint.connects_abandoned == abandoned
                                and endpoint in self.endpoints)
        if failed and not self.failing:
            self.failing = True
            self.on_event("cannot_connect", f"no endpoint took a connection: {self.describe()}")
        return None

    def _attempt(
        self,
        endpoint: Endpoint,
        generation: int,
        placed: bool = True,
        deadline: float | None = None,
    ) -> PooledConnection | None:
        """One connect attempt the caller has claimed (``endpoint.begin_connect``), bounded
        by ``connect_timeout`` and ``deadline``. With ``placed``, a connection the group
        should not use now is closed at once."""
        seconds, cut_by_caller = _bound(endpoint, deadline)
        kwargs = self._kwargs.get(endpoint)
        if kwargs is None:  # taken out of the configuration since the round began
            endpoint.connect_abandoned()
            return None
        started = _monotonic()
        try:
            raw = open_connection(endpoint.config, self.config, kwargs,
                                  self._backend, seconds)
            pooled_role = None
            if is_pooled(raw):  # a no-answer now is the role query's: cut by whose bound?
                seconds, cut_by_caller = _bound(endpoint, deadline)
                pooled_role = self._pooled_role(raw, endpoint, seconds)
        except ConnectError as exc:
            if cut_by_caller and exc.kind in (_NO_ANSWER, HOOK_NO_ANSWER):
                endpoint.connect_cut(seconds)  # the caller's time ran out, not the server's
                return None
            if self.stopped:  # close() cut it (its socket closed under it): no verdict
                endpoint.connect_abandoned()
                return None
            self.counters.connect_errors += 1
            unhealthy = endpoint.connect_error(exc.fatal, exc.kind, exc.reason)
            if exc.fatal:  # the server answered: nothing wrong with its health
                told = f"{exc.reason} ({exc.hint})" if exc.hint else exc.reason
                self.refusals.remember(endpoint, told, _monotonic())
                logger.warning("group %r: %s refused the connection: %s", self.config.name,
                               endpoint.label, exc.reason)
            elif exc.kind in GROUP_SETBACKS:  # the group's own, for now: others go on
                with self._lock:  # (it reads the latest verdict a claim may be changing)
                    self.refusals.set_back(endpoint, exc.reason, _monotonic(), began=started)
                logger.warning("%s", exc)  # the reason names the group
            else:
                logger.info("group %r: cannot connect to %s", self.config.name, exc)
                if unhealthy and self.slots is not None:
                    self.slots._endpoint_failed(endpoint)
            return None
        except InheritedAcrossFork:
            raise  # the parent's attempt: the child's endpoint never counted it
        except BaseException:
            endpoint.connect_abandoned()
            raise
        self.refusals.forget(endpoint)
        pid, config = os.getpid(), self.config
        try:
            role = pooled_role or role_of(raw)
            if pooled_role is None and must_measure(config.role, config.max_lag,
                                                    len(self.endpoints) > 1, role):
                with still_connecting(raw):  # (cut by the caller's deadline: no verdict)
                    report = read_role(raw, self._backend, _bound(endpoint, deadline)[0])
                endpoint.observe(report)
                role = report.role
            timings = self.counters.timings
            if timings is not None:  # every connect counted in connects, a misplaced one too;
                # in this block, so that an interrupted fold closes the connection it timed
                timings.create.record(_monotonic() - started)
        except BaseException as exc:
            if os.getpid() != pid:  # the parent's connect, copied into a forked child
                raise InheritedAcrossFork("a connect of the parent process, in the child"
                                          ) from None
            raw.close()
            endpoint.connect_abandoned()
            if isinstance(exc, Exception):
                return None
            raise
        endpoint.connect_succeeded(role)
        misplaced = self.misplaced(endpoint, role) if placed else ""
        if misplaced:  # e.g. a cold start met the primary first in a prefer-standby group,
            raw.close()  # or a reconfigure() took the endpoint out during the connect
            with self._lock:  # a connect made and discarded: connects - discards stays open
                self.counters.connects += 1
                self.counters.discards[misplaced] += 1
            return None
        with self._lock:
            self.counters.connects += 1
        lifetime = config.max_lifetime * (1 - _LIFETIME_JITTER * random.random())
        pc = PooledConnection(raw, endpoint, _monotonic() + lifetime, generation,
                              self._backend)
        pc.role = role
        self.opened.add(pc)
        return pc

    def _pooled_role(self, raw: Any, endpoint: Endpoint, seconds: float) -> str:
        """The role of the server behind a pooler, by one query bounded by ``seconds``: the
        pooler's login says nothing about that server (it answers from a cached one), so
        this query is what proves it is there. Its failure is judged like a failed connect
        (PgBouncer's ``server login has been failing``, ``query_wait_timeout``, a missing
        server database ...); ``raw`` is then closed."""
        config = endpoint.config
        report = behind_pooler(config, raw, read_role, raw, self._backend, seconds)
        endpoint.observe(report)
        return report.role

    def _claim(self, endpoint: Endpoint) -> float | None:
        """Claim a connect attempt on ``endpoint`` if the group's refusals let one go there
        now (after a setback, one task tries again while the others wait) and the endpoint
        takes it (``begin_connect``): when it was claimed, or None. End it with
        :meth:`_attempt`, then :meth:`_settle` with that time."""
        now = _monotonic()
        with self._lock:
            if not self.refusals.claim(endpoint, now, endpoint.config.connect_timeout):
                return None
        if not endpoint.begin_connect(_monotonic()):
            self._settle(endpoint, now)
            return None
        return now

    def _settle(self, endpoint: Endpoint, claimed: float) -> None:
        with self._lock:
            self.refusals.settle(endpoint, claimed)

    def _raise_if_hopeless(self) -> None:
        error = self.fatal_error()
        if error is not None:
            raise error

    def _next_chance(self) -> float:
        """How long until an endpoint of this group may take a connect attempt again."""
        now = _monotonic()
        refusals = self.refusals
        waits = []
        for ep in self.endpoints:
            quarantine = ep.quarantined_until - now if ep.state == QUARANTINED else None
            if refusals.retrying(ep):  # its answer may come any moment (success: go at once)
                waits.append(_RECHECK_PAUSE)
            elif refusals.blocks(ep, now):  # both must end: a quarantine over does not free it
                waits.append(max(refusals.until(ep) - now, quarantine or 0.0))
            elif quarantine is not None:
                waits.append(quarantine)
            else:  # a server that said it is full is left alone until full_until
                waits.append(max(_RECHECK_PAUSE, ep.full_until - now))
        return max(0.001, min(waits))


def _bound(endpoint: Endpoint, deadline: float | None) -> tuple[float, bool]:
    """A connect's bound (the login, and each round trip after it): ``connect_timeout``, or
    what is left of the caller's ``deadline`` if that comes first (an inline connect answers
    its caller in time), and whether it is the caller's (a no-answer then says nothing of
    the server)."""
    seconds = endpoint.config.connect_timeout
    if deadline is None:
        return seconds, False
    left = deadline - _monotonic()
    if left < seconds:
        return max(0.001, left), True
    return seconds, False
