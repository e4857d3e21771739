"""The pool: endpoint groups built from one configuration, their housekeeping, fork safety."""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from .concurrency import Backend, backend_for, check_mode_fits
from .config import PoolConfig, parse_config
from .endpoint import ROLE_STALE_AFTER, Endpoint
from .errors import ConfigError, PoolClosed
from .exclusive import Exclusive, ExclusiveSlots
from .group import Group
from .handler import Handler
from .housekeeping import Housekeeping
from .listen import DEFAULT_MAX_BACKLOG, Listener, Listeners, channel_names

logger = logging.getLogger("greenpool")

_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


class Pool:
    """Connections to one or more PostgreSQL endpoints, organised in named groups.

    Create it after ``gevent.monkey.patch_all()`` (in gunicorn: lazily on first use or in
    ``post_worker_init``, never in the master before fork) and ``close()`` it at exit.
    """

    def __init__(self, config: Mapping[str, Any] | PoolConfig) -> None:
        self.config = parse_config(config)
        check_mode_fits(self.config.mode)  # a misfit fails here, not as a LoopExit later
        self._backend: Backend = backend_for(self.config.mode)
        self._current_task = self._backend.current  # on every handler entry: bound once
        self._endpoints = [
            Endpoint(c, self.config.quarantine_initial, self.config.quarantine_max,
                     self._backend.rlock())
            for c in self.config.endpoints
        ]
        for endpoint in self._endpoints:  # a role unseen for 3 probe rounds is stale
            endpoint.role_stale_after = max(ROLE_STALE_AFTER, 3 * self.config.role_check_interval)
        every = range(len(self._endpoints))
        self._groups = {
            name: Group(
                group,
                [self._endpoints[i] for i in (group.endpoints or every)],
                self._backend,
                self.config.application_name,
            )
            for name, group in self.config.groups.items()
        }
        for group in self._groups.values():
            group.on_endpoint_failure = self._endpoint_failed
        self._only_group = next(iter(self._groups)) if len(self._groups) == 1 else None
        self._exclusive = {name: ExclusiveSlots(group, self._backend)
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
        found = self._groups.get(group) if group is not None else None
        return Handler(self, found or self.group(group), timeout, idempotent)

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

    # --- housekeeping and fork -----------------------------------------------------------

    def _endpoint_failed(self, endpoint: Endpoint) -> None:
        """One connection to ``endpoint`` proved dead: evict its idle peers in every group."""
        for group in self._groups.values():
            group.evict_idle(endpoint)

    def _after_fork_in_child(self) -> None:
        """Runs inside ``os.fork()`` in the child: only drop state, start nothing."""
        for group in self._groups.values():
            group.after_fork_in_child()
        for slots in self._exclusive.values():
            slots.after_fork_in_child()
        self._listeners.after_fork_in_child()
        for endpoint in self._endpoints:
            endpoint.after_fork_in_child(self._backend.rlock())
        self._forked = True

    def _resume_after_fork(self) -> None:
        self._forked = False
        if not self._closed:
            self._housekeeping.start()


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
