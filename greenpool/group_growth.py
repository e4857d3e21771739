"""A group's room and the connects that fill it: slots taken and given back (each exactly
once, :mod:`greenpool.slots`), when one more connect is wanted, the connector's deliveries,
refills, and the non-threaded mode's connects in the caller's own time."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from .connection import STUCK_AFTER as _STUCK_AFTER
from .connection import PooledConnection, silence_inherited
from .endpoint import UP, Endpoint
from .errors import PoolTimeout
from .group_base import DRAINED, GroupBase, _inherited_in_use, _monotonic
from .placement import connect_order, unserved
from .slots import ATTACHED, CONNECTING, RETURNED, Slot

_SPREAD_EVERY = 1.0  # seconds between a non-threaded group's looks for where to spread


class GroupGrowth(GroupBase):
    # --- slots (greenpool.slots) ------------------------------------------------------------

    def _take_slot(self) -> Slot:
        """Room for one more connection (the caller holds the lock and checked the room)."""
        slot = Slot(self, self._generation)
        # collected while still held: the weakref's callback, a C method, records it in
        # one step that no signal handler's exception can cut (a __del__ could be cut).
        # Given back, the slot drops the weakref (_count_back): a freed weakref never calls.
        ref = weakref.ref(slot, self._dead_slots.append)
        slot.ref = ref
        # from the registration to the counts no call, so no signal handler, can intervene:
        # a slot is counted exactly when it is registered (the orphan count relies on it)
        self._slot_cells[ref] = slot.cell
        self._size += 1
        self._connecting += 1
        self._connects.add(slot)
        return slot

    def _count_back(self, slot: Slot, was: int) -> None:
        """The room of ``slot`` (in state ``was``), now marked returned, given back (called
        with the lock held)."""
        # counted, then marked, with no call between (a signal handler's exception lands
        # only at a call): a prefix of this never leaves a slot returned but uncounted
        self._size -= 1
        if was == CONNECTING:
            self._connecting -= 1
        slot.cell[0] = RETURNED
        ref, slot.ref = slot.ref, None
        self._slot_cells.pop(ref, None)  # its weakref freed: it never calls back

    def _attach(self, slot: Slot, pc: PooledConnection) -> bool:
        """A connect in ``slot`` opened ``pc`` for a caller who takes it at once; False if
        ``pc``'s endpoint left the group meanwhile (a ``reconfigure()`` from a signal
        handler during the caller's own connect): it is closed, never lent."""
        with self._lock:
            abandoned = slot.abandoned  # set only by _abandon_connects, under this lock
            if not abandoned:
                # counted and attached with no call between (see _count_back)
                self._connecting -= 1
                slot.cell[1], slot.cell[0], pc.slot = pc.endpoint, ATTACHED, slot
            stray = pc.endpoint not in self.endpoints
        if abandoned:
            self.connector.close(pc, "endpoint_removed")
        elif stray:
            self.discard(pc, "endpoint_removed", reconnect=False)
        return not (abandoned or stray)

    def _returned(self, slot: Slot, reconnect: bool | None) -> None:
        """``slot`` is given back (``Slot.give_back``, or its connection discarded): the room
        goes to a connect if waiters need one, else it is freed. The slot is marked returned
        in the same locked step that counts it: interrupted before that step, it is still
        held, and counted back when it is collected (a second give_back counts nothing)."""
        if slot.generation != self._generation:
            slot.state = RETURNED
            return  # taken before a fork: this process never counted it
        with self._lock:
            was = slot.state
            if was == RETURNED:
                return  # given back already, or its room given back by the group
            self._count_back(slot, was)
            if self._closed or not self._can_wait:
                return
            wanted = self._wants_connect(len(self._line)) if reconnect is None else reconnect
            wanted = wanted and self._size < self.config.connection_count  # (resize lowered it)
            new = self._take_slot() if wanted else None
        if new is not None:
            self.connector.start(new)

    def _count_orphans(self) -> None:
        """Give back the room of slots collected while still held (their holder vanished
        between two lines, where no ``finally`` reaches); called with the lock held."""
        dead, cells = self._dead_slots, self._slot_cells
        while dead:
            ref = dead[0]  # taken off only at the end: an interruption repeats nothing
            if ref not in cells:
                dead.popleft()
                continue
            was, endpoint = cells[ref]
            del cells[ref]  # and counted below, with no call between
            if was == RETURNED:
                dead.popleft()
                continue
            self._size -= 1
            if was == CONNECTING:
                self._connecting -= 1
            dead.popleft()
            if was != CONNECTING and endpoint is not None:  # lost in transit, unclosed
                self.counters.discards["orphaned"] += 1

    @property
    def counts(self) -> dict[Endpoint, int]:
        """The group's connections per endpoint (0 for each endpoint it has; an endpoint
        taken out while it still has some, too): its attached slots', counted when asked.
        No number is kept beside the slots, so none can drift from them when a discard or
        a connect is cut short."""
        with self._lock:
            return self._attached_counts()

    def _attached_counts(self) -> dict[Endpoint, int]:
        """:attr:`counts`, for a caller that holds the lock."""
        counts = dict.fromkeys(self.endpoints, 0)
        for ref, (state, endpoint) in self._slot_cells.items():
            # (None: being closed; a collected slot's connection was collected with it, and
            # closed by the driver: gone now, not at the next look that counts it back)
            if state == ATTACHED and endpoint is not None and ref() is not None:
                counts[endpoint] = counts.get(endpoint, 0) + 1
        return counts

    # --- connects ---------------------------------------------------------------------------

    def _wants_connect(self, waiters: int) -> bool:
        """Whether ``waiters`` callers need one more connect than is under way. Cold (none
        lent, so none will come back) every waiter gets one; warm, the group grows one
        connect at a time, because a returned connection usually comes sooner than a new
        one (a burst does not grow the group to its maximum for nothing). A connect under
        way longer than ``_STUCK_AFTER`` (a black hole holds it for ``connect_timeout``) no
        longer stops a warm group from growing on its other endpoints."""
        connecting = self._connecting
        if self.connector.fatal_error() is not None:
            return False
        if not self._lent:
            return waiters > connecting
        if connecting:
            now = _monotonic()
            connecting = sum(1 for slot in self._connects
                             if slot.state == CONNECTING and now - slot.since < _STUCK_AFTER)
        return waiters > connecting and connecting == 0

    def _spread(self, now: float, deadline: float) -> PooledConnection | None:
        """``non-threaded``: one connect attempt, within the caller's
        time, to the first endpoint where a connect should go and the group has none (an
        endpoint no light load reached, a standby whose lag must be measured again). None
        when there is none, no room, or the attempt failed: the borrow goes on as usual, and
        the next look is a second away."""
        config = self.config
        counts = self.counts
        targets = [ep for ep in connect_order(self.endpoints, config.role, config.max_lag,
                                              config.on_lag, counts, now, 0,
                                              refused=self.connector.refusals.refused(now))
                   if not counts.get(ep) and ep.state == UP and not ep.cut(now)]
        if not targets:
            self._next_spread = now + _SPREAD_EVERY  # nothing to do: look again later
            return None
        with self._lock:
            if self._closed or self._size >= config.connection_count:
                return None
            slot = self._take_slot()
        with slot:
            pc = self.connector.try_once(targets[0], slot.generation, deadline)
            if pc is None or not self._attach(slot, pc):
                self._next_spread = now + _SPREAD_EVERY  # it failed: not at every borrow
                slot.give_back(reconnect=False)
                return None
            return pc

    def _connect_inline(self, deadline: float) -> PooledConnection:
        """``non-threaded``: nobody else can return a connection, so connect now if the
        group has room, else refuse at once."""
        while True:  # again only if the endpoint connected to left the group meanwhile
            with self._lock:
                self._count_orphans()
                slot = self._take_slot() if self._size < self.config.connection_count else None
            if slot is None:
                self.connector.count_timeout()
                raise PoolTimeout(
                    f"group {self.name!r}: all {self.config.connection_count} connections are "
                    f"in use, and in non-threaded mode nobody can return one while you wait; "
                    f"return connections before taking another, or raise connection_count"
                )
            with slot:
                pc = self.connector.open_now(deadline, slot.generation)
                if pc is None:
                    raise self.connector.timed_out(self._cut_short_message)
                if self._attach(slot, pc):
                    return pc

    def _cut_short_message(self) -> str:
        return (f"group {self.name!r}: no connection within the timeout: the connect was cut "
                f"short by it (an attempt may take up to connect_timeout). Endpoints: "
                f"{self.connector.describe()}")

    def _grow(self, count: int, target: Endpoint | None = None, *, if_idle: bool = True) -> int:
        """Start up to ``count`` connects within the group's room (refill, probes, moves);
        the number started. With ``if_idle``, only while nobody waits."""
        with self._lock:
            self._count_orphans()
            if self._closed or (if_idle and self._line):
                return 0
            count = max(0, min(count, self.config.connection_count - self._size))
            slots = [self._take_slot() for _ in range(count)]
        for slot in slots:
            self.connector.start(slot, target)
        return count

    def _reserve_slot(self) -> Slot | None:
        """One slot of the group's room for a connect housekeeping makes itself (a role
        probe); None when the group is full. Hold it in ``with``: attach it with
        :meth:`_deliver`, or give it back."""
        with self._lock:
            if self._closed or self._size >= self.config.connection_count:
                return None
            return self._take_slot()

    def _refill(self) -> None:
        """Open what the group lacks now: a connect per waiter beyond those under way, and
        up to ``min_size`` (housekeeping would at its next round)."""
        with self._lock:
            if self._closed:
                return
            room = self.config.connection_count - self._size
            wanted = max(len(self._line) - self._connecting, self.config.min_size - self._size)
            count = max(0, min(room, wanted))
            slots = [self._take_slot() for _ in range(count)] if self._can_wait else []
        for slot in slots:
            self.connector.start(slot)

    # --- what the connector calls (connector.Slots) ---------------------------------------

    def _deliver(self, slot: Slot, pc: PooledConnection) -> None:
        if slot.generation != self._generation:  # opened by a task inherited across fork
            silence_inherited(pc)
            _inherited_in_use.append(pc)
            slot.state = RETURNED
            return
        starts: list[Slot] = []
        targets: list[Endpoint | None] = []
        if slot.since < self._retire_before or slot.since < pc.endpoint.retire_before:
            pc.expires = DRAINED  # begun before a drain: it serves once, then is retired
        with self._lock:
            # the one door into the group: a connect the group abandoned (its room is
            # already given back) or one to an endpoint the group no longer has brings a
            # stray, closed here (checked under the lock apply() changes endpoints under)
            abandoned = slot.abandoned  # set only by _abandon_connects, under this lock
            if not abandoned:
                # counted and attached with no call between (see _count_back)
                self._connecting -= 1
                slot.cell[1], slot.cell[0], pc.slot = pc.endpoint, ATTACHED, slot
            stray = abandoned or pc.endpoint not in self.endpoints
            if self._aims_missed and pc.endpoint in self._aims_missed:
                del self._aims_missed[pc.endpoint]  # it took one: a place to move to again
                self._forget_placement()
            closed = self._closed
            surplus = self._size > self.config.connection_count  # resize() lowered it
            if not closed and not surplus and not stray:
                if self._line:
                    self._line.serve(pc)
                else:
                    self._idle.append(pc)
                if self._size < self.config.connection_count:
                    if self._wants_connect(len(self._line)):
                        targets.append(None)  # waiters remain: grow by one more
                    elif self._turns is not None:
                        targets.extend(self._unserved_endpoints())
                    starts = [self._take_slot() for _ in targets]
        if abandoned:
            self.connector.close(pc, "endpoint_removed")
            return
        if closed or surplus or stray:
            self.discard(pc, "pool_closed" if closed else "endpoint_removed" if stray
                         else "resized", reconnect=False if closed else None)
            return
        for new, target in zip(starts, targets, strict=True):
            self.connector.start(new, target)

    def _unserved_endpoints(self) -> list[Endpoint]:
        """A group with room and several endpoints opens one connection on each endpoint it
        may use now (placement.open_to) that has none, so that even a light load is spread
        by weight."""
        room = self.config.connection_count - self._size
        if room <= 0 or self._connecting:
            return []
        return unserved(self.usable_endpoints(), self._attached_counts())[:room]

    def _still_needed(self, slot: Slot) -> bool:
        """After a failed round of connects: keep trying (True), or the slot is given back
        (nobody waits and the group is at ``min_size``)."""
        if slot.generation != self._generation:
            slot.state = RETURNED
            return False
        with self._lock:
            if slot.abandoned:
                return False  # the group gave its room back (_abandon_connects)
            if not self._closed and self._size <= self.config.connection_count and (
                    self._line or self._size <= self.config.min_size):
                return True
            self._count_back(slot, CONNECTING)
            return False

    def _abandon_connects(self, endpoints: Sequence[Endpoint]) -> int:
        """Give back at once the room of connects under way to ``endpoints`` (taken out of
        the group): a connect to a server that never answers would hold it for its whole
        ``connect_timeout`` while callers wait. Their tasks end at their next look; a
        connection one of them still opens is closed on arrival (``_deliver``). How many
        were abandoned; waiters get connects in the freed room."""
        if not endpoints:
            return 0
        with self._lock:
            abandoned = [slot for slot in list(self._connects)
                         if slot.state == CONNECTING and slot.trying in endpoints
                         and slot.generation == self._generation]
            for slot in abandoned:
                slot.abandoned = True
                self._count_back(slot, CONNECTING)
        if abandoned:
            self._refill()
        return len(abandoned)

    def _endpoint_failed(self, endpoint: Endpoint) -> None:
        self.on_endpoint_failure(endpoint)

    def _landed_elsewhere(self, target: Endpoint) -> None:
        """A connect aimed at ``target`` (a move, or one spreading the group to an endpoint
        it has no connection on) opened its connection elsewhere: returns stop moving
        connections, and ``target``, if still up (a server that failed is quarantined,
        which says more), is no place to move to for its first backoff, doubled at each
        miss in a row up to its longest, until a connection of the group lands there. Else
        every return would close a working connection to aim at ``target`` once more (one
        that said it is full a moment ago), and land where it came from."""
        self.imbalanced = False
        if target.state != UP:
            return
        now = _monotonic()
        _, misses = self._aims_missed.get(target, (0.0, 0))
        pause = min(target.backoff_initial * 2 ** min(misses, 30), target.backoff_max)
        self._aims_missed[target] = (now + pause, misses + 1)
        self._forget_placement()
