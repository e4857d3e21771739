"""The state one endpoint group keeps, and the rules every part of it keeps.

A group is one class, :class:`greenpool.group.Group`, written in parts that build on each
other, one module per job, each reading only what is below it:

* ``group_base.py`` (here): the state and its invariants;
* ``group_growth.py``: the room (slots) and the connects that fill it;
* ``group_line.py``: the fair line, its timer and what a caller whose time ran out hears;
* ``group_retiring.py``: retiring and evicting connections, live changes;
* ``group.py``: the loan itself (borrow, return, discard), placement on borrow, lifecycle
  and reporting: the hot path, read first.

They are parts of one object rather than objects of their own because they change the
same bookkeeping under one lock, in sections that rely on each other's invariants. What
a part needs from a part above it is declared at the end of :class:`GroupBase`.

Invariants (all changed only under ``self._lock``, in sections that never block):

* ``_size`` counts *slots* (:mod:`greenpool.slots`): idle connections + lent connections
  + connects in progress (``_connecting``). Room is taken only by making a :class:`Slot`
  (``_take_slot``), before a connect starts, so the group never exceeds
  ``connection_count`` however tasks interleave.
* A slot is given back only through its object, which lets that happen once: a connect
  task's slot when the connect ends without a connection, a connection's slot
  (``pc.slot``) when the group discards it (``discard``). A slot whose holder vanished
  without giving it back (a signal handler's exception between two lines) is collected
  and counted back at the group's next look (``orphaned``).
* Live changes (``drain``, ``apply``) never take a loan back: they mark connections
  (``expires = DRAINED``) that are then retired through ``discard`` when they come back,
  and a lowered ``connection_count`` is reached as loans return (no slot is taken while
  ``_size`` is at or above it).
* Someone waits only if nothing is idle; a returned or new connection goes to the oldest
  waiter directly (first come, first served). A waiter never connects itself: it asks the
  connector, and whatever connection comes first serves the oldest waiter.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from .concurrency.backend import NO_LOCK, Backend
from .config import GroupConfig
from .connection import PooledConnection
from .connector import Connector
from .endpoint import Endpoint
from .slots import Slot
from .stats import GroupCounters
from .waiting import WaitLine

if TYPE_CHECKING:
    from .handler import Handler

_monotonic = time.monotonic

# Connections that were lent out, or being opened, when this process was forked from its
# parent; kept referenced so that they are never deallocated (see after_fork_in_child).
_inherited_in_use: list[PooledConnection] = []
#: ``PooledConnection.expires`` of a connection to retire when it comes back (drain, an
#: endpoint removed, a setting that travels with the connection changed)
DRAINED = -1.0


class GroupBase:
    """The state of one group (see the module's invariants)."""

    def __init__(
        self,
        config: GroupConfig,
        endpoints: Sequence[Endpoint],
        backend: Backend,
        application_name: str,
    ) -> None:
        self.config = config
        self.name = config.name
        self.counters = GroupCounters()
        self._backend = backend
        self._lock = backend.lock()
        #: False in the modes with one thread (gevent, eventlet, non-threaded), where the
        #: lock is NO_LOCK: a section that never blocks runs as one step there, so the
        #: loan's two sections skip even its ``with`` (see Group.acquire, Group.reuse)
        self._locking = self._lock is not NO_LOCK
        self.endpoints = list(endpoints)
        self.connector = Connector(config, self.endpoints, backend, application_name,
                                   self.counters)
        #: connects that began before this (monotonic) deliver a connection to retire
        self._retire_before = 0.0
        self._idle: deque[PooledConnection] = deque()  # right end = most recently returned
        # smooth weighted round robin over endpoints on borrow (None: a single endpoint)
        self._turns: dict[Endpoint, float] | None = (
            dict.fromkeys(self.endpoints, 0.0) if len(self.endpoints) > 1 else None
        )
        #: the lent connections, weakly: one that no caller holds any more (its borrower was
        #: interrupted between two lines, where no ``finally`` reaches) is collected, and its
        #: slot counted back as orphaned; a strong set would keep it lent for ever
        self._lent: set[weakref.ref[PooledConnection]] = set()
        self._line = WaitLine()
        self._new_waiter = backend.waiter
        self._can_wait = backend.can_wait
        #: non-threaded with several endpoints: no background opens a connection on each
        #: endpoint or measures a standby's lag again, so a borrow does it now and then
        #: (see _spread)
        self._spread_inline = not backend.can_wait and len(self.endpoints) > 1
        self._next_spread = 0.0
        self._max_waiting = config.max_waiting or math.inf
        # whether waiters with the default timeout share one timer (see _sweep)
        self._line_keeps_time = backend.can_call_later and math.isfinite(config.timeout)
        self._sweep_armed = False
        self._sweep_at = 0.0  # when the armed sweep fires (monotonic)
        self._cancel_sweep: Callable[[], None] | None = None
        self._size = 0
        self._connecting = 0  # slots held by connect tasks
        #: every slot taken, weakly, with its [state, endpoint] cell; a collected slot's
        #: reference lands in ``_dead_slots``, and the next look counts it back if it was
        #: still held (see _count_orphans)
        self._slot_cells: dict[weakref.ref[Slot], list[Any]] = {}
        self._dead_slots: deque[weakref.ref[Slot]] = deque()
        #: the slots this group made, weakly (a collected one is orphaned): those still
        #: CONNECTING are the connects under way
        self._connects: weakref.WeakSet[Slot] = weakref.WeakSet()
        self._closed = False
        self._generation = 0
        self._roles_matter = config.role != "any"
        self._preferred: frozenset[Endpoint] = frozenset(self.endpoints)
        self._usable: frozenset[Endpoint] = self._preferred
        self._preferred_until = 0.0
        for endpoint in self.endpoints:  # a new role or lag is news at once, not in 50 ms
            endpoint.watch(self._forget_placement)
        self.connector.refusals.on_change = self._forget_placement  # a refusal too
        #: endpoint -> (no move aims there before, misses in a row): a move's connect
        #: landed elsewhere (see GroupGrowth._landed_elsewhere)
        self._aims_missed: dict[Endpoint, tuple[float, int]] = {}
        #: set by housekeeping (and when an endpoint comes back) while connections should
        #: move to another endpoint: only then does a return look at placement
        self.imbalanced = False
        self._leak_threshold = config.leak_threshold
        #: task identity -> the outermost handler block that task holds in this group (a
        #: nested block of the same task reuses its connection: see handler.py)
        self.holders: dict[Hashable, Handler] = {}
        #: the identity of the running task (a greenlet, a thread id): the key of holders
        self.current_task: Callable[[], Hashable] = backend.current
        #: Called with an endpoint whose connections proved dead: the pool evicts that
        #: endpoint's idle connections in every group at once.
        self.on_endpoint_failure: Callable[[Endpoint], None] = self._evict_idle

    # --- what the parts below need from group.py ----------------------------------------

    def discard(self, pc: PooledConnection, reason: str, reconnect: bool | None = None) -> None:
        raise NotImplementedError

    def reuse(self, pc: PooledConnection) -> None:
        raise NotImplementedError

    def preferred_endpoints(self) -> frozenset[Endpoint]:
        raise NotImplementedError

    def usable_endpoints(self) -> frozenset[Endpoint]:
        raise NotImplementedError

    def _forget_placement(self) -> None:
        raise NotImplementedError

    def _evict_idle(self, endpoint: Endpoint) -> None:
        raise NotImplementedError
