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
behind the newest one is measured against an older one it had reached. Only the highest
timeline's sightings count: after a promotion, an old primary still answering (a split
brain) must not vouch for a standby the new primary has moved past.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

#: sightings kept: with probes every ``role_check_interval``, a standby behind all of them
#: is that many intervals behind, far beyond any useful ``max_lag``
KEPT = 8


class PrimaryWal:
    """Recent (timeline, WAL position, monotonic time) sightings of the pool's primaries."""

    def __init__(self) -> None:
        #: (timeline, position, time), oldest first; replaced whole, never mutated (read
        #: without a lock in threaded mode: a sighting lost to a race vouches for nothing)
        self.sightings: tuple[tuple[int, int, float], ...] = ()
        self._members: tuple[weakref.ref[Any], ...] = ()  # replaced whole, like sightings

    def join(self, endpoint: Any) -> None:
        """``endpoint`` is told (``primary_seen``) of each new sighting."""
        self._members = (*self._members, weakref.ref(endpoint))

    def saw(self, lsn: int, at: float, timeline: int | None) -> None:
        """A primary on ``timeline`` was at ``lsn`` at ``at`` (or later): remember it, and let
        every standby that had reached it know it is at most ``now - at`` behind. A lower
        timeline than one seen already vouches for nothing. Never blocks."""
        timeline = -1 if timeline is None else timeline
        if timeline < max((t for t, _, _ in self.sightings), default=-1):
            return
        self.sightings = (*[seen for seen in self.sightings[-(KEPT - 1):]
                            if seen[0] == timeline], (timeline, lsn, at))
        for ref in self._members:
            endpoint = ref()
            if endpoint is not None:
                endpoint.primary_seen(lsn, at)

    def reached_at(self, received: int) -> float:
        """The latest time a primary was seen at a position the standby has ``received``
        (``-inf``: none: its lag is not known from the primary's side)."""
        sightings = self.sightings
        newest = max((timeline for timeline, _, _ in sightings), default=-1)
        return max((at for timeline, lsn, at in sightings
                    if timeline == newest and lsn <= received), default=-math.inf)
