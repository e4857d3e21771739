"""A slot of a group's room as an object: taken once, given back exactly once.

A group may hold at most ``connection_count`` connections, counting the connects under way.
Counting that by hand on every path (borrow, connect, refill, probe, rebalance, retire) lost
slots whenever one path forgot, or was interrupted between taking and giving back. Here the
only way to take room is to make a :class:`Slot`, and the only way to give it back is through
that object, which lets it happen once:

* while a connect is under way the slot is *connecting*; the connect either attaches it to
  the connection it opened (the group does, as it counts the change), or gives it back;
* attached, the slot lives on the connection (``PooledConnection.slot``): discarding the
  connection gives the slot back, through the group (``Group.discard``);
* ``with slot:`` gives it back on any exception (``gevent.Timeout``, a kill, a failed thread
  start, ``KeyboardInterrupt``) unless it was attached by then;
* a connect's slot may be *abandoned*: its group gives the room back itself when the
  endpoint the connect is trying (``trying``) leaves the group; the task's own give_back
  then does nothing, and a connection it still opens is closed on arrival;
* a slot that is garbage-collected while still held (its holder was interrupted between two
  lines, where no ``finally`` can reach: a signal handler's exception) is given back at the
  group's next look: the group holds every slot by a weak reference whose callback (a C
  method, which no signal handler can cut short, unlike a ``__del__``) records its death;
* the group marks a slot returned in the same locked step that counts it, so an
  interruption before that step leaves it held (and counted back once collected), never
  returned but uncounted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .endpoint import Endpoint

CONNECTING, ATTACHED, RETURNED = 0, 1, 2


class SlotOwner(Protocol):
    """The group a slot belongs to. ``_returned`` marks the slot returned and counts it, in
    one locked step; a slot already returned counts nothing."""

    def _returned(self, slot: Slot, reconnect: bool | None) -> None: ...


class Slot:
    """One unit of a group's room, from the moment it is reserved until it is given back.

    Its state and endpoint live in :attr:`cell`, a two-item list the group also holds (by
    a weak reference to the slot): when a slot still held is collected, the group reads
    there what it held and counts it back (see ``GroupGrowth._count_orphans``)."""

    __slots__ = ("__weakref__", "_owner", "abandoned", "cell", "generation", "ref", "since",
                 "trying")

    def __init__(self, owner: SlotOwner, generation: int) -> None:
        self._owner = owner
        #: the group generation it was taken in: a slot taken before a fork means nothing after
        self.generation = generation
        #: [state, endpoint]: the state, and where its connection is once attached (a lost
        #: connection's count is mended too)
        self.cell: list[Any] = [CONNECTING, None]
        self.since = time.monotonic()  # when it was taken (a connect under way this long)
        #: the endpoint its connect is trying now, set by the connector: the group abandons
        #: the connect (gives the room back at once) when that endpoint leaves it
        self.trying: Endpoint | None = None
        #: set (under the group's lock) when the group gave the room back itself: a
        #: give_back racing it from the task (threads) then counts nothing twice
        self.abandoned = False
        #: the group's weak reference to it, while the group counts it as held
        self.ref: Any = None

    @property
    def state(self) -> int:
        return int(self.cell[0])

    @state.setter
    def state(self, value: int) -> None:
        self.cell[0] = value

    @property
    def endpoint(self) -> Endpoint | None:
        endpoint: Endpoint | None = self.cell[1]
        return endpoint

    def give_back(self, reconnect: bool | None = None) -> None:
        """Give the slot back to the group; a second call does nothing. The group starts a
        connect in the freed room if ``reconnect`` (None: if its waiters need one)."""
        if self.cell[0] != RETURNED:
            self._owner._returned(self, reconnect)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self.state == CONNECTING:
            self.give_back()

    def __repr__(self) -> str:
        state = ("connecting", "attached", "returned")[self.state]
        return f"<Slot {state} gen={self.generation}>"
