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
behind the newest one is measured against an older one it had reached. Positions compare
within one cluster only (its system identifier: a pool may span several), and only its
highest timeline's sightings count: after a promotion, an old primary still answering (a
split brain) must not vouch for a standby the new primary has moved past.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

#: sightings kept, all clusters together: with probes every ``role_check_interval``, a
#: standby behind all of its cluster's is several intervals behind, beyond a useful max_lag
KEPT = 16


class PrimaryWal:
    """Recent (timeline, WAL position, monotonic time) sightings of the pool's primaries."""

    def __init__(self) -> None:
        #: (system identifier, timeline, position, time), oldest first; replaced whole,
        #: never mutated (read without a lock in threaded mode: a sighting lost to a race
        #: vouches for nothing)
        self.sightings: tuple[tuple[int, int, int, float], ...] = ()
        self._members: tuple[weakref.ref[Any], ...] = ()  # replaced whole, like sightings

    def join(self, endpoint: Any) -> None:
        """``endpoint`` is told (``primary_seen``) of each new sighting."""
        self._members = (*self._members, weakref.ref(endpoint))

    def saw(self, system: int, timeline: int | None, lsn: int, at: float) -> None:
        """A primary of cluster ``system`` on ``timeline`` was at ``lsn`` at ``at`` (or
        later): remember it, and let every standby of that cluster that had reached it know
        it is at most ``now - at`` behind. A lower timeline than one seen already vouches
        for nothing. Never blocks."""
        timeline = -1 if timeline is None else timeline
        if timeline < self._newest(system):
            return
        kept = [seen for seen in self.sightings if seen[:2] == (system, timeline)
                or seen[0] != system]
        self.sightings = (*kept[-(KEPT - 1):], (system, timeline, lsn, at))
        for ref in self._members:
            endpoint = ref()
            if endpoint is not None:
                endpoint.primary_seen(system, lsn, at)

    def reached_at(self, system: int, received: int) -> float:
        """The latest time a primary of cluster ``system`` was seen at a position its
        standby has ``received`` (``-inf``: none: its lag is not known from the primary's
        side)."""
        newest = self._newest(system)
        return max((at for sid, timeline, lsn, at in self.sightings
                    if sid == system and timeline == newest and lsn <= received),
                   default=-math.inf)

    def _newest(self, system: int) -> int:
        return max((timeline for sid, timeline, _, _ in self.sightings if sid == system),
                   default=-1)
