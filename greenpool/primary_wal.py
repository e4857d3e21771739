"""What the pool saw of its primaries' WAL positions, and what that proves about a standby's
lag.

A standby that has replayed everything it received is not thereby fresh: a stalled or
partitioned replication link looks exactly like an idle primary (nothing arrives, and the
WAL receiver says "streaming" until ``wal_receiver_timeout``). What proves freshness is the
primary's side: if a primary was at WAL position *P* at time *t* (the pool's own monotonic
clock, taken before its probe was sent) and the standby has received and replayed *P*, then
everything the standby lacks was written after *t*, so its data is at most ``now - t`` old.
That holds whatever happens to the link afterwards, so one sighting of the primary vouches
for every standby that had reached it, also for one probed before the primary was.

One instance per pool, shared by its endpoints (a primary reports here, standbys read and
are told of each new sighting). Only a few recent sightings are kept: a standby a little
behind the newest one is measured against an older one it had reached.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

#: sightings kept: with probes every ``role_check_interval``, a standby behind all of them
#: is that many intervals behind, far beyond any useful ``max_lag``
KEPT = 8


class PrimaryWal:
    """Recent (WAL position, monotonic time) sightings of the pool's primaries."""

    def __init__(self) -> None:
        #: oldest first; replaced whole, never mutated (read without a lock in threaded mode)
        self.sightings: tuple[tuple[int, float], ...] = ()
        self._standbys: weakref.WeakSet[Any] = weakref.WeakSet()

    def join(self, endpoint: Any) -> None:
        """``endpoint`` is told (``primary_seen``) of each new sighting."""
        self._standbys.add(endpoint)

    def saw(self, lsn: int, at: float) -> None:
        """A primary was at ``lsn`` at ``at`` (or later): remember it, and let every standby
        that had reached it know it is at most ``now - at`` behind. Never blocks."""
        self.sightings = (*self.sightings[-(KEPT - 1):], (lsn, at))
        for endpoint in list(self._standbys):
            endpoint.primary_seen(lsn, at)

    def reached_at(self, received: int) -> float:
        """The latest time a primary was seen at a position the standby has ``received``
        (``-inf``: none: its lag is not known from the primary's side)."""
        return max((at for lsn, at in self.sightings if lsn <= received), default=-math.inf)
