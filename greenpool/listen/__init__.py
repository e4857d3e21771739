"""``pool.listen('write', ['jobs'])``: notifications fanned out from one connection per group.

Every :class:`Listener` (subscriber) of a group in this process shares one **hub**: one
dedicated connection of the group (one ``exclusive_limit`` slot, see the exclusive package), in
autocommit, on which the hub sends ``LISTEN`` for a channel when its first subscriber comes
and ``UNLISTEN`` when its last one goes. The connection is closed when the last subscriber
of the group leaves (no linger: the slot is free for ``exclusive()`` at once, and a new
subscriber reconnects in one round trip). A subscriber gets every notification committed
after ``listen()`` returned; one that joins a channel already listened on may also get one
committed just before (it was on its way to the hub), never fewer.

The modules, by job:

- ``subscriber.py``: channel names, the items a subscriber reads (``Notify``, :class:`Gap`),
  its bounded queue and what happens when it falls behind;
- ``fanout.py``: a hub's subscribers and their queues, and delivery to them;
- ``reader.py``: the hub's connection: the reader task, LISTEN/UNLISTEN, heartbeat, loss,
  reconnect, fork;
- ``listener.py``: the public :class:`Listener` handle and :class:`Listeners`, the hubs of
  a pool.
"""

from .listener import Listener, Listeners
from .subscriber import DEFAULT_MAX_BACKLOG, Gap, Item, channel_names

__all__ = ["DEFAULT_MAX_BACKLOG", "Gap", "Item", "Listener", "Listeners", "channel_names"]
