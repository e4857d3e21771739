"""The promotion watch: writes resume the moment a standby is promoted, without a connect.

When a ``primary`` group has callers waiting and no primary is up (it died, and the
orchestrator has not promoted a standby yet), a connect task of the group that found no
endpoint to take a connection does not merely sleep between rounds: it keeps one connection
open on a standby no other task of the group watches and asks it ``pg_is_in_recovery()``
(with a primary's timeline and WAL position, for the split-brain rule) every
``PROMOTION_POLL``. The moment that server answers as primary, the connection, already open
and authenticated, goes to the first caller in line: writes resume within a poll of the
promotion instead of after the next role check, a connect and a login.

It is apart from the connector because it is a policy of its own (when to watch, which
standby, when to make way for a round) over the connector's verbs (a placed-or-not connect,
closing with a reason, a pause :meth:`Connector.stop` cuts short), and only a connect task
that failed a round reaches it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from .concurrency.backend import Backend
from .concurrency.fork import InheritedAcrossFork
from .connection import PooledConnection
from .endpoint import PRIMARY, STANDBY, Endpoint
from .placement import ROLE_RECHECK, left_unwatched, standby_to_watch, without_primary
from .roles import primary_report
from .slots import Slot

if TYPE_CHECKING:
    from .connector import Connector

logger = logging.getLogger("greenpool")

_monotonic = time.monotonic

#: seconds between two ``pg_is_in_recovery()`` on a standby a write group watches while
#: callers wait and no primary is up (one light query on an open connection: no connect)
PROMOTION_POLL = 0.01


class PromotionWatch:
    """The standbys one group's connect tasks watch for their promotion, one task each."""

    def __init__(self, connector: Connector, backend: Backend) -> None:
        self._connector = connector
        self._backend = backend
        self._lock = backend.lock()
        self._watched: set[Endpoint] = set()

    def forget_after_fork(self) -> None:
        """In the child: the parent's watches are not the child's."""
        self._watched = set()
        self._lock = self._backend.lock()

    def await_promotion(self, generation: int, slot: Slot) -> PooledConnection | None:
        """A connection to a standby just promoted, for the first caller in line, if this
        task (holding ``slot``) may watch one; None when there is nothing to watch (not a
        ``primary`` group, nobody waits, a primary is up, every standby is watched), or the
        watch ended without a promotion (nobody waits, another endpoint became the primary,
        the standby failed)."""
        connector = self._connector
        slots = connector.slots
        if connector.config.role != "primary" or slots is None or not slots.waiting:
            return None
        with self._lock:  # two connect threads never watch the same standby
            endpoint = standby_to_watch(connector.endpoints, self._not_to_watch(), _monotonic())
            if endpoint is None:
                return None
            self._watched.add(endpoint)
        try:
            pc = connector.probe(endpoint, generation, slot)
            if pc is None:
                return None
            logger.debug("group %r: no primary is up and callers wait: watching %s for its"
                         " promotion", connector.config.name, endpoint.label)
            return self._watch(pc)
        finally:
            self._watched.discard(endpoint)

    def _not_to_watch(self) -> set[Endpoint]:
        """Endpoints a watch leaves alone: watched by another task of this group, or
        refused to it for a reason retrying cannot fix (until that pause ends, as rounds
        do: a connect to it every few milliseconds would fail the same way)."""
        return self._watched | self._connector.refusals.refused(_monotonic())

    def _watch(self, pc: PooledConnection) -> PooledConnection | None:
        """``pc`` (to a standby) if its server is promoted and is the primary the split-brain
        rule chooses, while callers wait; else None, ``pc`` closed. Each question is
        bounded by ``connect_timeout``. The watch of a parent process, copied into a forked
        child with its green task, ends there without a byte or a count
        (:class:`InheritedAcrossFork`): the connection is the parent's, silenced at fork."""
        connector = self._connector
        endpoint, slots = pc.endpoint, connector.slots
        seconds = endpoint.config.connect_timeout
        assert slots is not None
        pid = os.getpid()
        # a group with fewer connect tasks than standbys cannot watch them all: after a
        # ROLE_RECHECK the watch makes way for a round, which connects to the others (and
        # to an endpoint a reconfiguration added, which nothing else asks while the group
        # is full)
        make_way_at = _monotonic() + ROLE_RECHECK
        try:
            while not connector.stopped and slots.waiting and os.getpid() == pid and (
                    endpoint in connector.endpoints) and (
                    endpoint.role == PRIMARY or without_primary(connector.endpoints)):
                if _monotonic() >= make_way_at and left_unwatched(
                        connector.endpoints, self._not_to_watch(), _monotonic()):
                    break
                report = primary_report(pc.raw, self._backend, seconds)
                if report is not None:
                    pc.role = report.role
                    endpoint.observe(report)
                    if connector.belongs(endpoint, report.role):
                        logger.info("group %r: %s was promoted; its watched connection goes"
                                    " to the first caller in line", connector.config.name,
                                    endpoint.label)
                        return pc
                    break  # another primary is chosen (split brain): the rounds go there
                # still a standby, seen just now: the rounds need no connect to learn it
                endpoint.observe_role(STANDBY)
                connector.pause(PROMOTION_POLL)
        except BaseException as exc:
            if os.getpid() != pid:
                raise InheritedAcrossFork("a watch of the parent process, in the child"
                                          ) from None
            if not isinstance(exc, Exception):
                connector.close(pc, "interrupted")
                raise
            logger.info("group %r: a standby watched for its promotion, %s, did not answer:"
                        " %s", connector.config.name, endpoint.label, exc)
            connector.close(pc, "failed_check")
            slots._endpoint_failed(endpoint)
            return None
        if os.getpid() != pid:
            raise InheritedAcrossFork("a watch of the parent process, in the child")
        connector.close(pc, "probe")
        return None
