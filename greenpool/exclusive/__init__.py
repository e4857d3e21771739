"""Dedicated connections: a session of its own for ``LISTEN``, long sessions, advisory locks.

A pooled loan is reset on return, so session state (``LISTEN``, a session advisory lock, a
temp table) cannot outlive it, by design. ``with pool.exclusive('write') as conn:`` gives a
raw psycopg2 connection that belongs to the caller alone and is closed, never pooled, at
the end of the block. It is chosen like the group's connections (the group's connector
opens it: role, weights, quarantine, the connect deadline libpq ignores in green mode,
name resolution off the hub, the group's session settings) but it takes none of the
group's ``connection_count`` slots: each group has a separate bound, ``exclusive_limit``,
with a first-come-first-served line of its own for callers who find it reached.

One module per job:

* :mod:`.limit`: the fair limit (``exclusive_limit`` units, the line on the groups'
  :class:`~greenpool.waiting.WaitLine`);
* :mod:`.connects`: the connect tasks that open connections in the background for callers
  holding a unit (inline in ``non-threaded`` mode);
* :mod:`.capacity`: the one query a fresh connection begins with: a session of its own
  (not a pooler's), in room the groups do not need, else a refusal;
* :mod:`.slots`: :class:`ExclusiveSlots`, the three together for one group (what the pool
  and the listen package use), with its statistics;
* :mod:`.handle`: :class:`Exclusive`, the public ``with`` block.

Every path that can be interrupted gives its unit back before re-raising, and a connection
opened for a caller who was interrupted is closed.
"""

from .capacity import Room, room_needed
from .connects import Cancel
from .handle import Exclusive
from .slots import ExclusiveSlots

__all__ = ["Cancel", "Exclusive", "ExclusiveSlots", "Room", "room_needed"]
