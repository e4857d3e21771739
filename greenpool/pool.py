"""The pool: endpoint groups built from one configuration, their housekeeping, fork safety."""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

from . import live
from .concurrency.backend import Backend
from .concurrency.detection import check_mode_fits, resolve_mode
from .concurrency.modes import backend_for
from .config import CONNECTIONS_MAX, GroupConfig, PoolConfig, parse_config
from .config.checks import integer
from .endpoint import ROLE_STALE_AFTER, Endpoint
from .errors import ConfigError, PoolClosed
from .events import Events
from .exclusive import Exclusive, ExclusiveSlots, Room, room_needed
from .group import Group
from .handler import Handler
from .housekeeping import Housekeeping
from .listen import DEFAULT_MAX_BACKLOG, Listener, Listeners, channel_names
from .primary_wal import PrimaryWal

logger = logging.getLogger("greenpool")

_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def fit_to_process(config: PoolConfig) -> PoolConfig:
    """``config`` with its mode as this process runs it (``auto`` resolved), checked to fit:
    a misfit fails here, at ``Pool()``, not as a ``LoopExit`` later."""
    mode = resolve_mode(config.mode)
    check_mode_fits(mode)
    return config if mode == config.mode else replace(config, mode=mode)


class Pool:
    """Connections to one or more PostgreSQL endpoints, organised in named groups.

    Its mode is the process's (``type: 'auto'``, the default) or the one named; under gevent
    create it after ``monkey.patch_all()`` (in gunicorn: lazily on first use or in
    ``post_worker_init``, never in the master before fork) and ``close()`` it at exit.
    """

    def __init__(self, config: Mapping[str, Any] | PoolConfig) -> None:
        self.config = fit_to_process(parse_config(config))
        self._backend: Backend = backend_for(self.config.mode)
        self._events = Events(self.config.on_event, self._backend)
        self._changing = self._backend.lock()  # one live change at a time (_apply)
        #: the primaries' WAL positions as seen, shared by the endpoints: what vouches for a
        #: standby that replayed all it received (``primary_wal``)
        self._primary_wal = PrimaryWal()
        self._endpoints = [self._new_endpoint(c) for c in self.config.endpoints]
        #: endpoints taken out by reconfigure() while something (their connections) still
        #: holds them, by label: one added back is that object, where they are counted
        self._departed: weakref.WeakValueDictionary[str, Endpoint] = (
            weakref.WeakValueDictionary())
        self._groups = {
            name: Group(
                group,
                self._endpoints_of(group, self._endpoints),
                self._backend,
                self.config.application_name,
            )
            for name, group in self.config.groups.items()
        }
        for group in self._groups.values():
            group.on_endpoint_failure = self._endpoint_failed
            group.connector.on_event = partial(self._group_event, group.name)
        self._set_lag_alerts()
        self._only_group = next(iter(self._groups)) if len(self._groups) == 1 else None
        self._exclusive = {name: ExclusiveSlots(group, self._backend, _room_needed)
                           for name, group in self._groups.items()}
        self._listeners = Listeners(self._backend)
        self._closed = False
        self._forked = False
        self._housekeeping = Housekeeping(self.config, list(self._groups.values()),
                                          self._endpoints, self._backend, self._endpoint_failed)
        self._housekeeping.start()
        _live_pools.add(self)
        if self.config.startup_timeout > 0:
            try:
                self.wait(self.config.startup_timeout)
            except BaseException:
                self.close()
                raise

    # --- the API --------------------------------------------------------------------------

    def handler(
        self, group: str | None = None, *, timeout: float | None = None, idempotent: bool = False
    ) -> Handler:
        """A context manager lending one connection of ``group`` for a block.

        ``group`` may be omitted when only one group is configured. ``timeout`` overrides the
        group's acquire timeout for this block. ``idempotent=True`` declares that re-running
        a statement of this block is harmless, so one whose connection died is re-run
        elsewhere (read-only groups get that without asking).
        """
        if self._forked:
            self._resume_after_fork()
        try:
            found = self._groups[group]  # type: ignore[index]
        except (KeyError, TypeError):  # None, or a name to be explained by group()
            found = self.group(group)
        return Handler(found, timeout, idempotent)

    def exclusive(self, group: str | None = None, *, timeout: float | None = None) -> Exclusive:
        """A context manager giving a raw psycopg2 connection of the caller's own for a
        block (``LISTEN``, session advisory locks, long sessions): opened like the group's
        connections (role, weights, quarantine, connect deadline, settings) but outside its
        ``connection_count``, bounded by the group's ``exclusive_limit``, and closed, never
        pooled, at the end (an open transaction is rolled back by that). ``timeout`` bounds
        the wait for a slot and the connect together (the group's acquire timeout if None).
        """
        return Exclusive(self._exclusive_slots(group), timeout)

    def listen(
        self,
        group: str | None,
        channels: str | Iterable[str],
        *,
        timeout: float | None = None,
        heartbeat: float = 5.0,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> Listener:
        """A :class:`~greenpool.listen.Listener` of ``channels`` (exact names, as
        ``pg_notify()`` takes them), already listening when this returns. Every listener of
        a group in this process shares one dedicated connection (one ``exclusive_limit``
        slot), each with a queue of at most ``max_backlog`` items of its own.

        Iterate it (or call ``get(timeout)``) for notifications; after the server is lost,
        the group's primary moves or this listener fell behind, it yields a
        :class:`~greenpool.listen.Gap` first. ``timeout`` bounds the wait until listening;
        ``heartbeat`` is how often the shared connection is checked. Close it (or use
        ``with``) when done.
        """
        names = channel_names(channels)
        if not (isinstance(heartbeat, (int, float)) and 0 < heartbeat < 86400):
            raise ValueError(f"listen(): heartbeat must be seconds above 0, not {heartbeat!r}")
        if not (isinstance(max_backlog, int) and not isinstance(max_backlog, bool)
                and 2 <= max_backlog <= 10_000_000):
            raise ValueError(f"listen(): max_backlog must be an int from 2 to 10000000, not "
                             f"{max_backlog!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):
            raise ValueError(f"listen(): timeout must be seconds (>= 0) or None, not "
                             f"{timeout!r}")
        slots = self._exclusive_slots(group)
        return self._listeners.listen(slots, names, timeout=timeout, heartbeat=float(heartbeat),
                                      max_backlog=max_backlog)

    def _exclusive_slots(self, group: str | None) -> ExclusiveSlots:
        if self._forked:
            self._resume_after_fork()
        if self._closed:
            raise PoolClosed("the pool is closed")
        return self._exclusive[self.group(group).name]

    def group(self, name: str | None = None) -> Group:
        """The :class:`Group` called ``name`` (lower-level: ``acquire``/``release``)."""
        if name is None:
            if self._only_group is None:
                raise ConfigError(f"handler(): name a group; configured: {sorted(self._groups)}")
            name = self._only_group
        try:
            return self._groups[name]
        except KeyError:
            if self._closed:
                raise PoolClosed("the pool is closed") from None
            raise ConfigError(
                f"group {name!r} is not configured; configured groups: {sorted(self._groups)}"
            ) from None

    def wait(self, timeout: float = 30.0) -> None:
        """Block until every group can hand out a connection (one each is opened and kept
        idle), or raise the first group's error once ``timeout`` has passed.

        Lazy by default, a pool never blocks at creation; call this (or set
        ``startup_timeout``) to fail fast at startup instead of on the first request. A
        group is ready as soon as *one* eligible endpoint answers: a dead standby does not
        hold up startup.
        """
        deadline = time.monotonic() + timeout
        for group in self._groups.values():
            pc = group.acquire(max(0.0, deadline - time.monotonic()))
            group.release(pc)

    def stats(self) -> dict[str, Any]:
        """Gauges and counters per group, and what is known per endpoint."""
        return {
            "groups": {name: {**group.stats(), **self._listeners.stats(name),
                              **self._exclusive[name].stats()}
                       for name, group in self._groups.items()},
            "endpoints": {ep.label: ep.export() for ep in self._endpoints},
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close idle connections now and lent ones as they come back; waiters get
        :class:`PoolClosed`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._housekeeping.stop()
        self._listeners.close_all()
        for slots in self._exclusive.values():
            slots.close()
        for group in self._groups.values():
            group.close()
        self._listeners.wait_ended()  # after the groups: their close ends a connect sooner
        _live_pools.discard(self)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        groups = ", ".join(repr(g) for g in self._groups.values())
        return f"<greenpool.Pool {self._backend.name} {state}: {groups}>"

    # --- live changes ---------------------------------------------------------------------

    def drain(self, group: str | None = None) -> None:
        """Replace every connection (of ``group``, or of every group if None) without
        failing anyone: idle ones are closed now, lent ones when they come back, connects
        under way after they served once; new ones serve meanwhile (callers waiting get the
        first new ones). For a rotated password, a server's changed settings, a rolling
        restart of a pooler."""
        for found in self._chosen(group):
            found.drain()

    def resize(self, group: str, connection_count: int, min_size: int | None = None) -> None:
        """Change a group's ``connection_count`` (and ``min_size``; kept if None, and lowered
        with ``connection_count`` if above it) live. Growing opens what waiters need and
        ``min_size`` at once; shrinking closes idle connections beyond the new count now and
        lent ones as they come back (until then the group holds more than the new count)."""
        found = self.group(group)
        count = integer(f"resize({group!r}).connection_count", connection_count, minimum=1,
                        maximum=CONNECTIONS_MAX)
        low = min(found.config.min_size, count) if min_size is None else integer(
            f"resize({group!r}).min_size", min_size, maximum=count)
        with self._changing:  # this group's settings as they are now, two keys changed
            new = replace(self.config.groups[found.name], connection_count=count, min_size=low)
            self._apply_now(replace(self.config, groups={**self.config.groups, found.name: new}))

    def reconfigure(self, config: Mapping[str, Any] | PoolConfig) -> None:
        """Apply a new configuration to the running pool, without failing a loan in flight.

        Endpoints (by ``host:port/dbname``) may be added, removed, re-weighted or changed
        (password, user, options ...: their connections are retired as by :meth:`drain`);
        a removed endpoint's connections close as they come back. Group settings apply at
        once, those that travel with each connection (autocommit, readonly,
        statement_timeout, row_factory, configure) by draining the group. A change that
        cannot be applied live (the mode, groups added or removed, a group's role, the
        housekeeping intervals) raises :class:`ConfigError` naming it, and nothing changes.
        """
        new = parse_config(config)  # 'auto' is this process's mode: a change of it is refused
        self._apply(replace(new, mode=resolve_mode(new.mode)))

    def _apply(self, new: PoolConfig) -> None:
        with self._changing:
            self._apply_now(new)

    def _apply_now(self, new: PoolConfig) -> None:
        if self._closed:
            raise PoolClosed("the pool is closed")
        change = live.plan(self.config, new)  # refuses before anything is touched
        by_label = {ep.label: ep for ep in self._endpoints}
        for label, endpoint_config in change.changed.items():
            by_label[label].reconfigure(endpoint_config)
        added = [self._returning(c) for c in change.added]
        by_label.update((ep.label, ep) for ep in added)
        endpoints = [by_label[c.label] for c in new.endpoints]
        removed = [by_label[label] for label in change.removed]
        now = time.monotonic()
        for label in change.retire:
            by_label[label].retire_before = now
        for endpoint in removed:
            endpoint.retire_before = math.inf
            self._departed[endpoint.label] = endpoint
        self.config = new
        self._events.callback = new.on_event
        self._endpoints = endpoints
        self._housekeeping.reconfigured(new, endpoints)
        for name, group in self._groups.items():
            group.apply(new.groups[name], self._endpoints_of(new.groups[name], endpoints))
            for label in change.retire:
                group.drain(by_label[label])
            for endpoint in removed:
                group.drain(endpoint)
        self._set_lag_alerts()
        self._listeners.recheck()  # a listener on an endpoint the group left moves now
        if added or removed or change.changed:
            logger.info("reconfigured: endpoints added %s, removed %s, changed %s",
                        [ep.label for ep in added], sorted(change.removed),
                        sorted(change.changed))

    def _chosen(self, group: str | None) -> list[Group]:
        if self._closed:
            raise PoolClosed("the pool is closed")
        return list(self._groups.values()) if group is None else [self.group(group)]

    def _new_endpoint(self, config: Any) -> Endpoint:
        endpoint = Endpoint(config, self.config.quarantine_initial, self.config.quarantine_max,
                            self._backend.rlock())
        # a role unseen for 3 probe rounds is stale
        endpoint.role_stale_after = max(ROLE_STALE_AFTER, 3 * self.config.role_check_interval)
        endpoint.on_event = partial(self._endpoint_event, endpoint.label)
        endpoint.primary_wal = self._primary_wal
        self._primary_wal.join(endpoint)
        return endpoint

    def _returning(self, config: Any) -> Endpoint:
        """An endpoint added: the one taken out under its label if something still holds it
        (its connections: they are counted there, as open and by the groups, not on a
        second object for the same server), else a new one."""
        endpoint = self._departed.pop(config.label, None)
        if endpoint is None:
            return self._new_endpoint(config)
        endpoint.reconfigure(config)
        endpoint.retire_before = time.monotonic()  # what it had was drained as it left
        return endpoint

    @staticmethod
    def _endpoints_of(group: GroupConfig, endpoints: list[Endpoint]) -> list[Endpoint]:
        return [endpoints[i] for i in group.endpoints] if group.endpoints else list(endpoints)

    def _set_lag_alerts(self) -> None:
        for endpoint in self._endpoints:
            lags = [g.config.max_lag for g in self._groups.values()
                    if g.config.max_lag is not None and endpoint in g.endpoints]
            endpoint.lag_alert = min(lags) if lags else None

    def _endpoint_event(self, label: str, kind: str, detail: str) -> None:
        self._events.emit(kind, endpoint=label, detail=detail)

    def _group_event(self, name: str, kind: str, detail: str) -> None:
        self._events.emit(kind, group=name, detail=detail)

    # --- housekeeping and fork -----------------------------------------------------------

    def _endpoint_failed(self, endpoint: Endpoint) -> None:
        """One connection to ``endpoint`` proved dead: evict its idle peers in every group."""
        for group in self._groups.values():
            group._evict_idle(endpoint)

    def _after_fork_in_child(self) -> None:
        """Runs inside ``os.fork()`` in the child: only drop state, start nothing."""
        for group in self._groups.values():
            group.after_fork_in_child()
        for slots in self._exclusive.values():
            slots.after_fork_in_child()
        self._listeners.after_fork_in_child()
        for endpoint in self._endpoints:
            endpoint.after_fork_in_child(self._backend.rlock())
        self._departed = weakref.WeakValueDictionary()  # they hold the parent's connections
        self._forked = True

    def _resume_after_fork(self) -> None:
        try:  # made in a parent before fork: the child may have been patched since
            check_mode_fits(self.config.mode)
        except ConfigError as exc:
            raise ConfigError(
                f"this pool was made in {self.config.mode} mode before the process forked, "
                f"and no longer fits it: make the pool in each worker after fork (lazily on "
                f"first use, or in gunicorn's post_worker_init). {exc}") from None
        self._forked = False
        if not self._closed:
            self._housekeeping.start()


def _room_needed(endpoint: Endpoint) -> Room:
    """What the groups of every live pool of the process may still need under the limits a
    session on ``endpoint`` meets: a dedicated connection may take only what is left over
    (see exclusive/capacity.py). Every pool's: the server counts the sessions of all."""
    groups = [group for pool in list(_live_pools) if not pool._closed
              for group in list(pool._groups.values())]
    return room_needed(endpoint, groups)


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
