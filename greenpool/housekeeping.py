"""Housekeeping: the pool's background upkeep, on top of groups, connector and placement.

One loop per pool (a greenlet, or a thread in ``threaded`` mode; ``non-threaded`` mode has
none). Every ``maintenance_interval`` it runs each group's upkeep, and in between it wakes
when a quarantine ends, so that a recovered server is probed then.

Nothing that can block runs in the loop itself: each group's upkeep, each probe and each
connect runs in a task of its own, at most one of each kind at a time, every round trip
under a deadline. One stalled server (a backend stopped with SIGSTOP) stalls only the task
that talks to it, never the leak warnings, probes and refills of everything else.

Probes stay within the groups' budgets: a role and lag probe runs on an idle connection to
the endpoint, or on a connection opened within a group's room (it then stays as an idle
connection of that group); a group that is full and busy skips it. A quarantine probe never
holds a group's room (a probe stuck on a black hole would stop the group from growing on its
healthy endpoints): it is one short-lived connection of its own, at most one per endpoint
(the endpoint lets a single prober through), closed at once.

Every connection taken from a group here holds that group's slot (``pc.slot``) and is given
back (``reuse``) or discarded through the group (``discard``), which returns the slot; a
connection opened in a slot housekeeping reserved (``_reserve_slot``) is held ``with`` that
slot until the group takes it (``_deliver``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from .borrow_return import check_on_borrow
from .concurrency.backend import Backend, Signal
from .concurrency.fork import InheritedAcrossFork, still_connecting
from .config import PoolConfig
from .connection import PooledConnection, connect_kwargs, open_connection, ping
from .endpoint import QUARANTINED, UP, Endpoint
from .group import Group
from .handler import Handler
from .placement import misplaced, move_target
from .roles import read_role

logger = logging.getLogger("greenpool")

_MIN_NAP = 0.01  # seconds: housekeeping never spins, even on an overdue quarantine


class Housekeeping:
    """The upkeep of one pool's groups and endpoints."""

    def __init__(
        self,
        config: PoolConfig,
        groups: Sequence[Group],
        endpoints: Sequence[Endpoint],
        backend: Backend,
        on_endpoint_failure: Callable[[Endpoint], None],
    ) -> None:
        self._config = config
        self._groups = list(groups)
        self._endpoints = list(endpoints)
        self._backend = backend
        self._on_endpoint_failure = on_endpoint_failure
        self._roles_matter = any(g.role != "any" for g in self._groups)
        self._next_role_check = 0.0
        self._stopped = False
        self._wake: Signal | None = None  # cuts the loop's current nap short
        self._busy: set[Any] = set()  # keys of tasks under way (one of each kind at a time)
        for endpoint in self._endpoints:
            endpoint.on_quarantine = self.wake

    def reconfigured(self, config: PoolConfig, endpoints: Sequence[Endpoint]) -> None:
        """The pool's configuration changed live (``Pool.reconfigure``): probe these
        endpoints from now on."""
        for endpoint in endpoints:
            endpoint.on_quarantine = self.wake
        self._config = config
        self._endpoints = list(endpoints)

    # --- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        pid = os.getpid()
        self._busy = set()
        self._backend.spawn(lambda: self._loop(pid))

    def stop(self) -> None:
        self._stopped = True
        self.wake()

    def wake(self) -> None:
        """Look again now: the pool closed, or an endpoint was quarantined (its probe is due
        when the quarantine ends, maybe before the next upkeep)."""
        wake = self._wake
        if wake is not None:
            wake.set()

    def _loop(self, pid: int) -> None:
        interval = self._config.maintenance_interval
        upkeep_at = time.monotonic() + interval
        while True:
            wake = self._wake = self._backend.waiter()  # before the check: stop() sets it
            if self._stopped or os.getpid() != pid:
                return  # closed, or inherited across fork (the child starts its own loop)
            if wake.wait(self._until_next_duty(upkeep_at)):
                continue  # woken: look at the quarantines again (or stop)
            try:
                self._probe_endpoints()
            except Exception as exc:
                logger.warning("endpoint probes failed: %s", exc)
            now = time.monotonic()
            if now < upkeep_at:
                continue
            upkeep_at = now + interval
            for group in self._groups:
                self._warn_about_leaks(group, now)
                if group.holders:
                    Handler.give_up_blocks_of_ended_tasks(group, self._backend.task_ended)
                self._in_task(("upkeep", group.name), partial(self._upkeep, group))

    def _until_next_duty(self, upkeep_at: float) -> float:
        due = [ep.quarantined_until for ep in self._endpoints if ep.state == QUARANTINED]
        if self._roles_matter:  # a role_check_interval shorter than maintenance_interval
            due.append(self._next_role_check)
        return max(_MIN_NAP, min([upkeep_at, *due]) - time.monotonic())

    def _in_task(self, key: Any, work: Callable[[], None]) -> None:
        """Run ``work`` in a task of its own unless one with ``key`` is still under way."""
        if key in self._busy:
            return
        self._busy.add(key)
        busy = self._busy

        def run() -> None:
            try:
                work()
            except Exception as exc:
                logger.warning("housekeeping (%s) failed: %s", key[0], exc)
            finally:
                busy.discard(key)

        try:
            started = self._backend.spawn(run) is not None
        except Exception as exc:  # RuntimeError: can't start new thread (a process limit)
            logger.warning("housekeeping (%s) skipped: cannot start a task: %s", key[0], exc)
            started = False
        if not started:
            busy.discard(key)

    # --- per group ------------------------------------------------------------------------

    def _warn_about_leaks(self, group: Group, now: float) -> None:
        """One warning per lent connection held past ``leak_threshold``, naming the code
        that took it (a connection never returned starves the group)."""
        threshold = group.config.leak_threshold
        if threshold is None:
            return
        for pc in group.lent():
            if pc.lent_from is not None and now - pc.lent_at > threshold:
                logger.warning(
                    "group %r: a connection to %s has been held for %.1f s (leak_threshold "
                    "%.1f s); it was taken at %s",
                    group.name, pc.endpoint.label, now - pc.lent_at, threshold, pc.lent_from,
                )
                pc.lent_from = None  # once per loan

    def _upkeep(self, group: Group) -> None:
        """Retire idle connections past ``max_idle``/``max_lifetime``, check suspect ones,
        keep ``min_size`` connections usable, refill to ``min_size``, move connections to
        where they belong."""
        now = time.monotonic()
        config = group.config
        refresh_after = config.max_idle / 2  # pinged well before the borrow check drops it
        interval = self._config.maintenance_interval

        def expired(pc: PooledConnection) -> bool:
            return pc.raw.closed or now >= pc.expires - 2 * interval

        def retire(idle: list[PooledConnection]) -> list[PooledConnection]:
            spare = group.size - config.min_size
            chosen = []
            for pc in idle:  # oldest-returned first
                if expired(pc) or (spare > 0 and now - pc.last_used >= config.max_idle):
                    chosen.append(pc)
                    spare -= 1
            return chosen

        for pc in group._take_idle(retire):  # no round trip: all at once
            group.discard(pc, "closed" if pc.raw.closed else
                       "expired" if expired(pc) else "max_idle")

        checked: set[int] = set()

        def next_to_check(idle: list[PooledConnection]) -> list[PooledConnection]:
            kept = group.size - config.min_size <= 0
            for pc in idle:
                if id(pc) not in checked and (
                    pc.readable() or (kept and now - pc.last_used >= refresh_after)
                ):
                    return [pc]
            return []

        # one at a time: a ping stuck on a stalled backend keeps only its own connection
        # out of reach, never the healthy ones
        while taken := group._take_idle(next_to_check):
            (pc,) = taken
            checked.add(id(pc))
            if pc.readable():  # while idle: a NOTIFY, or the server went away
                self._check(group, pc, partial(check_on_borrow, pc, config, self._backend, now))
            else:  # kept for min_size and getting old: one ping keeps it usable
                self._check(group, pc, partial(ping, pc, self._backend,
                                               pc.endpoint.config.connect_timeout))
        if group.size < config.min_size:
            group._grow(config.min_size - group.size)
        if len(group.endpoints) > 1:
            self._rebalance(group)

    def _check(self, group: Group, pc: PooledConnection, check: Callable[[], str]) -> None:
        try:
            reason = check()
        except BaseException:
            group.discard(pc, "interrupted")
            raise
        if reason:
            group.discard(pc, reason)
            if reason == "failed_check":
                self._on_endpoint_failure(pc.endpoint)
            return
        pc.last_used = time.monotonic()
        group.reuse(pc)

    def _rebalance(self, group: Group) -> None:
        """Idle connections on the wrong endpoint are closed and reopened through the normal
        choice; while a busy group holds more than its share somewhere, returns move
        connections (``Group.imbalanced``, see ``Group.reuse``)."""
        preferred, usable = group.preferred_endpoints(), group.usable_endpoints()
        counts = group.counts
        moving = group._take_idle(
            lambda idle: misplaced(idle, preferred, usable, group.role, counts)
        )
        for pc in moving:
            group.discard(pc, "rebalance")
        if moving:
            group._grow(len(moving))
        now = time.monotonic()
        group.imbalanced = any(
            move_target(ep, preferred, usable, counts, now) is not None
            for ep, count in counts.items() if count
        )

    # --- endpoints ------------------------------------------------------------------------

    def _probe_endpoints(self) -> None:
        """Bring quarantined endpoints back without waiting for traffic, and keep roles and
        replay lag current where a group cares about them."""
        now = time.monotonic()
        for endpoint in self._endpoints:
            if endpoint.state == QUARANTINED and endpoint.may_connect(now):
                self._probe_quarantined(endpoint)
        if not self._roles_matter or now < self._next_role_check:
            return
        self._next_role_check = now + self._config.role_check_interval
        for endpoint in self._endpoints:
            if endpoint.state == UP:
                self._in_task(("role", endpoint.label), partial(self._probe_role, endpoint))

    def _probe_quarantined(self, endpoint: Endpoint) -> None:
        """A quarantined endpoint is probed by one short-lived connection outside every
        group: a probe stuck on a black hole for ``connect_timeout`` never holds a group's
        room, so a group keeps growing on its healthy endpoints meanwhile."""
        users = self._users(endpoint)
        if users:
            self._in_task(("probe", endpoint.label),
                          partial(self._probe_outside_groups, users[0], endpoint))

    def _probe_role(self, endpoint: Endpoint) -> None:
        """Refresh ``endpoint``'s role and lag with one bounded query on an idle connection
        to it, else on a connection opened for it (:meth:`_probe`)."""
        for group in self._users(endpoint):
            taken = group._take_idle(partial(_latest_to, endpoint))
            if not taken:
                continue
            (pc,) = taken
            try:
                answered = self._read_role(pc)
            except BaseException:
                group.discard(pc, "interrupted")
                raise
            if answered:
                group.reuse(pc)
            else:
                group.discard(pc, "failed_check")
                self._on_endpoint_failure(endpoint)
            return
        self._probe(endpoint)

    def _probe(self, endpoint: Endpoint) -> None:
        """One connect to ``endpoint``, and its role and lag: within the room of a group
        that should be there (the connection then serves it; a full one skips the probe,
        its borrows read the role from each connection's parameter status), else, when no
        group should be there or nothing has a connection there or one under way (the
        full groups have nothing to read it from), on a short-lived connection of its own.
        So a probe of an endpoint a group does not use never holds that group's room (a
        stalled standby would starve a primary group), a full group still learns that a
        standby was promoted, and an endpoint a full group has no connection on is still
        found dead (an old primary after a failover)."""
        now = time.monotonic()
        # a group refused or set back there would run its failing hook again (and log it)
        users = [g for g in self._users(endpoint)
                 if not g.connector.refusals.blocks(endpoint, now)]
        wanted_by = [group for group in users if endpoint in group.preferred_endpoints()]
        for group in wanted_by:
            slot = group._reserve_slot()
            if slot is None:
                continue
            connector = group.connector
            slot.trying = endpoint  # abandoned (its room freed) if the group drops endpoint
            with slot:
                pc = connector.probe(endpoint, slot.generation)
                if pc is None:
                    slot.give_back()
                    return
                try:
                    answered = self._read_role(pc)
                except BaseException:
                    connector.close(pc, "interrupted")
                    raise
                if answered and connector.belongs(endpoint, pc.role):
                    group._deliver(slot, pc)
                else:
                    connector.close(pc, "probe" if answered else "failed_check")
                    slot.give_back()
                    if not answered:
                        self._on_endpoint_failure(endpoint)
                        return
            self._after_probe(endpoint)
            return
        if users and (not wanted_by or not (endpoint.open or endpoint.connecting)):
            self._probe_outside_groups(users[0], endpoint)

    def _after_probe(self, endpoint: Endpoint) -> None:
        """An endpoint answered again: idle connections move back onto it now, busy groups
        move theirs as they come back (``Group.imbalanced``)."""
        if endpoint.state != UP:
            return
        for group in self._users(endpoint):
            if len(group.endpoints) > 1:
                group.imbalanced = True
                self._in_task(("rebalance", group.name), partial(self._rebalance, group))

    def _read_role(self, pc: PooledConnection) -> bool:
        """Role and lag of ``pc``'s server by one bounded query, recorded on its endpoint;
        False if it did not answer (the caller discards ``pc``)."""
        endpoint = pc.endpoint
        try:
            report = read_role(pc.raw, self._backend, endpoint.config.connect_timeout)
        except Exception:
            return False
        pc.role = report.role
        endpoint.observe(report)
        return True

    def _users(self, endpoint: Endpoint) -> list[Group]:
        return [g for g in self._groups if g.uses(endpoint)]

    def _probe_outside_groups(self, group: Group, endpoint: Endpoint) -> None:
        """Every group using ``endpoint`` is full: one short-lived connection decides."""
        if not endpoint.begin_connect(time.monotonic()):
            return
        kwargs = connect_kwargs(endpoint.config, group.config, self._config.application_name)
        try:
            raw = open_connection(endpoint.config, group.config, kwargs, self._backend,
                                  endpoint.config.connect_timeout)
        except Exception as exc:
            reason = str(getattr(exc, "reason", exc))
            endpoint.connect_error(getattr(exc, "fatal", False),
                                   getattr(exc, "kind", "unknown"), reason)
            return
        except InheritedAcrossFork:
            raise  # the parent's probe: the child's endpoint never counted it
        except BaseException:
            endpoint.connect_abandoned()
            raise
        pid = os.getpid()
        try:
            with still_connecting(raw):  # a fork meanwhile leaves it to the parent
                report = read_role(raw, self._backend, endpoint.config.connect_timeout)
        except BaseException as exc:
            if os.getpid() != pid:  # the child's copy: the socket is the parent's
                raise InheritedAcrossFork("a probe of the parent process, in the child"
                                          ) from None
            raw.close()  # failed, timed out or killed: no verdict, and the endpoint
            endpoint.connect_abandoned()  # must not stay PROBING (nobody else may probe)
            if not isinstance(exc, Exception):
                raise
            return
        raw.close()
        endpoint.connect_succeeded(report.role)
        endpoint.observe(report)
        self._after_probe(endpoint)


def _latest_to(endpoint: Endpoint, idle: list[PooledConnection]) -> list[PooledConnection]:
    """The most recently returned idle connection to ``endpoint``, if any."""
    for pc in reversed(idle):
        if pc.endpoint is endpoint:
            return [pc]
    return []
