"""A server the pool connects to, shared by every group that uses it: its health and role.

Health is a small state machine::

    up --connect refused/timed out--> quarantined --backoff expired, one prober--> probing
    probing --connect ok--> up (slow start)        probing --fails--> quarantined (longer)

Only a failed connect quarantines: that is the one signal that says "this server cannot
take connections now". A connection lost mid-use evicts the endpoint's idle connections
(see ``Pool._endpoint_failed``), and the connect that follows decides. Exhaustion,
statement timeouts and SQL errors never touch the state.

While quarantined nobody connects; when the backoff expires, exactly one caller (or the
housekeeping task) is let through as the prober. The backoff doubles with each failed probe
but never exceeds a quarter of how long the endpoint has been down: a server that comes back
is found within about a quarter of its outage, so a short outage is not followed by a long
exile, while a long one is probed rarely. Back up, the endpoint is in *slow start*:
at most 2 connects in flight, doubling with each success, so a recovering server is not hit
by every waiting greenlet at once.

The role (primary or standby) is *detected*, never configured: from the ``in_hot_standby``
parameter status at connect and on every borrow (no round trip), and by housekeeping probes,
which also give a primary's timeline and WAL position (the split-brain rule in roles.py).

Why one module of this length: an endpoint's health, role and replication facts change
together under its lock (a probe's answer updates them at once); separating the facts from
the health state is a larger change, not made here.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from .config import EndpointConfig
from .events import no_event
from .failures import FULL_KINDS  # kinds that say the server is full, not down
from .primary_wal import PrimaryWal

logger = logging.getLogger("greenpool")

UP, QUARANTINED, PROBING = "up", "quarantined", "probing"
PRIMARY, STANDBY, UNKNOWN = "primary", "standby", "unknown"

_SLOW_START = 2  # connects in flight allowed right after recovery
#: kinds of connect failure that are one group's own and passing: its configure hook met a
#: lock, a deadlock, a resource limit, or got no answer in time. The server answered the
#: connect, so its health is not in question (other groups use it as before)
HOOK_FAILED_FOR_NOW, HOOK_NO_ANSWER = "configure_failed_for_now", "configure_no_answer"
GROUP_SETBACKS = frozenset({HOOK_FAILED_FOR_NOW, HOOK_NO_ANSWER})
_FULL_PAUSE = (0.05, 0.25)  # seconds (jittered) a full server is left alone by connects
_UNSUPPLIED_PAUSE = (0.2, 0.5)  # seconds (jittered) between asks of a failing password function
_SLOW_START_DONE = 32  # past this many, the endpoint is treated as fully recovered
_BACKOFF_SHARE_OF_OUTAGE = 0.25  # the backoff ceiling, as a share of the time down so far
#: a role not seen for this long is stale (3 of the default role_check_interval; the pool
#: may set each endpoint's ``role_stale_after`` from its own interval)
ROLE_STALE_AFTER = 6.0
#: a WAL receiver counts as streaming only once its process has lived this long: one that
#: keeps restarting against a dead primary says "streaming" for milliseconds each time
RECEIVER_SETTLE = 1.0
_ranks = itertools.count()  # endpoints are made in configuration order: the last tie-break


def _nothing() -> None:
    pass


class Endpoint:
    """What the pool knows about one server. Mutated only in non-blocking sections."""

    def __init__(
        self,
        config: EndpointConfig,
        quarantine_initial: float,
        quarantine_max: float,
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        #: Guards the counters and the state in threaded mode; a no-op where switching is
        #: cooperative (these methods never block).
        self._lock = lock if lock is not None else nullcontext()
        self.config = config
        self.label = config.label
        self.state = UP
        self.role = UNKNOWN
        #: a standby's replay lag in seconds as last measured (None: never measured, or a
        #: primary); believe it only while :meth:`lag_known` says so
        self.lag: float | None = None
        self.lag_seen_at = 0.0  # when it was measured (monotonic)
        #: called when the role, the timeline or the lag changes, or it says it is full
        #: (groups cache where they should be)
        self._watchers: list[Callable[[], None]] = []
        #: the pool's sightings of its primaries' WAL positions (one per pool, shared; the
        #: pool joins its endpoints to it): what vouches for a standby that replayed all it
        #: received
        self.primary_wal = PrimaryWal()
        #: (cluster's system identifier, WAL position) when a standby's last probe found
        #: everything received replayed (its receiver streaming and settled); else None
        self._caught_up: tuple[int, int] | None = None
        self._receiver: int | None = None  # the WAL receiver's pid, last probe (a standby)
        self._receiver_since = 0.0  # when that pid was first seen (monotonic); 0: no probe yet
        self.role_seen_at = 0.0  # when the role was last observed (monotonic)
        self.role_stale_after = ROLE_STALE_AFTER
        #: since when we see it as primary (first sight or promotion). Never a tie-break: it
        #: tells whether another primary's last answer predates this one's claim.
        self.primary_since: float | None = None
        self.timeline: int | None = None  # a primary's timeline and WAL position, last probe
        self.wal_lsn: int | None = None
        self.rank = next(_ranks)
        #: claimant sets this endpoint was already reported in (split brain, once per change)
        self.split_reported: set[frozenset[Endpoint]] = set()
        #: its open connections (all groups', dedicated ones too), weakly: each
        #: PooledConnection enters itself when made and leaves when closed, or by its
        #: weakref's callback (a C method) when collected unclosed. ``open`` counts what is
        #: there: no number kept beside it that an interrupted close could skew
        self.connections: set[weakref.ref[Any]] = set()
        self.connecting = 0  # connects in flight
        #: slow-start limit on connects in flight; None: no limit. A new endpoint starts
        #: slowly too: a cold pool does not send every waiter's connect to a server that
        #: may never answer
        self.ramp: int | None = _SLOW_START
        self.quarantined_until = 0.0
        self.full_until = 0.0  # no connect before this: the server said it is full
        #: an attempt cut by its caller's deadline got no answer: tried last until then
        self.cut_until = 0.0
        self.first_attempt_at = 0.0  # when the first connect attempt to it began
        #: when the pool made it (at start, or a ``Pool.reconfigure`` added it): a primary
        #: known before it keeps the writes while it is explored (roles._exploring)
        self.added_at = time.monotonic()
        self.full = 0  # times it said so
        self.down_since = 0.0  # when the current outage began (monotonic); while not up
        self._failures = 0  # consecutive failed connects, drives the backoff
        self._quarantine_bounds = (quarantine_initial, quarantine_max)
        self._initial = self._max = 0.0
        self.reconfigure(config)
        self.connects = 0
        self.connect_attempts = 0
        self.connect_errors = 0
        #: attempts that ended with no verdict (cut by the caller's time, interrupted, or
        #: the first query after the login lost): attempts = connects + errors + these +
        #: those in flight
        self.connects_abandoned = 0
        self.quarantines = 0
        self.split_brain = 0  # times it was seen claiming primary together with another
        #: connects to it that began before this (monotonic) used settings since changed,
        #: or it was taken out of the configuration (``inf``; ``Pool.reconfigure``): what
        #: they open is retired after one loan
        self.retire_before = 0.0
        #: told ``(kind, detail)`` of each state change (``greenpool.events``; never blocks)
        self.on_event: Callable[[str, str], None] = no_event
        #: the smallest ``max_lag`` of the groups that use it: beyond it, a "lagging" event
        self.lag_alert: float | None = None
        self.last_error: str | None = None
        #: Called when a quarantine begins (the pool wakes its housekeeping to probe on time).
        self.on_quarantine: Callable[[], None] = _nothing

    def reconfigure(self, config: EndpointConfig) -> None:
        """Its settings (at creation, or ``Pool.reconfigure``); ``retry_sleep`` applies from
        the next quarantine on."""
        initial, longest = self._quarantine_bounds
        self.config = config
        self._initial = config.retry_sleep if config.retry_sleep is not None else initial
        self._max = max(longest, self._initial)

    # --- health ---------------------------------------------------------------------------

    @property
    def backoff_initial(self) -> float:
        """The first quarantine (``quarantine_initial``, or the endpoint's ``retry_sleep``)."""
        return self._initial

    @property
    def backoff_max(self) -> float:
        """The longest quarantine (``quarantine_max``, at least the first one)."""
        return self._max

    def may_connect(self, now: float) -> bool:
        """Whether a connect attempt may start now (for a quarantined endpoint: as prober)."""
        if self.state == UP:
            return (self.ramp is None or self.connecting < self.ramp) and now >= self.full_until
        return self.state == QUARANTINED and now >= self.quarantined_until

    def begin_connect(self, now: float) -> bool:
        """Claim a connect attempt if one may start now (one step, so that two threads
        cannot both become the prober). If True, end it with one of the three below."""
        with self._lock:
            if not self.may_connect(now):
                return False
            if self.state == QUARANTINED:
                self.state = PROBING  # the one prober: others see PROBING and keep away
            if not self.first_attempt_at:
                self.first_attempt_at = now
            self.connecting += 1
            self.connect_attempts += 1
            return True

    def connect_succeeded(self, role: str) -> None:
        with self._lock:
            self.connecting -= 1
            self.connects += 1
            if self.state != UP:
                logger.warning("endpoint %s is back up (role %s)", self.label, role)
                self.state = UP
                self.ramp = _SLOW_START
                self.on_event("back", f"a connect succeeded (role {role})")
            elif self.ramp is not None:
                self.ramp *= 2
                if self.ramp >= _SLOW_START_DONE:
                    self.ramp = None
            self._failures = 0
            self.observe_role(role)

    def connect_failed(self, message: str) -> None:
        with self._lock:
            self.connecting -= 1
            self.connect_errors += 1
            self.last_error = message
            if self.state != QUARANTINED:
                self._quarantine()
            # else: an attempt that started before the quarantine. It is no news, so it must
            # neither extend the quarantine nor raise the backoff: only the first failure and
            # failed probes do.

    def connect_refused(self, message: str) -> None:
        """The server answered and refused (bad password, missing database, a setting a
        pooler rejects): retrying cannot fix it, and it says nothing bad about the server's
        health. A probe that gets this answer found the server up."""
        with self._lock:
            self.connecting -= 1
            self.connect_errors += 1
            self.last_error = message
            if self.state == PROBING:
                logger.warning("endpoint %s answers again (it refused: %s)", self.label, message)
                self.on_event("back", f"it answers again (and refused: {message})")
                self.state = UP
                self.ramp = _SLOW_START
                self._failures = 0

    def connect_full(self, message: str) -> None:
        """The server answered that it has no free connection slot: it is alive and its
        connections are healthy, so nothing is quarantined or evicted; connects leave it
        alone for a moment (and go to another endpoint meanwhile)."""
        with self._lock:
            self.connecting -= 1
            self.connect_errors += 1
            self.full += 1
            self.last_error = message
            self.full_until = time.monotonic() + random.uniform(*_FULL_PAUSE)
            if self.state == PROBING:
                self.on_event("back", f"it answers again (it is full: {message})")
                self.state = UP
                self.ramp = _SLOW_START
                self._failures = 0
            self._changed()  # no place to move connections to until full_until

    def connect_error(self, fatal: bool, kind: str, message: str) -> bool:
        """End a connect attempt that failed (see ``connection.ConnectError``); True when
        the failure says the server is unhealthy (its idle connections are suspect)."""
        if fatal or kind in GROUP_SETBACKS:  # the server answered: its health is fine
            self.connect_refused(message)
        elif kind == "credentials":  # the password function failed: the server is not at fault
            self.connect_unsupplied(message)
        elif kind in FULL_KINDS:
            self.connect_full(message)
        else:
            self.connect_failed(message)
            return True
        return False

    def connect_unsupplied(self, message: str) -> None:
        """No password to connect with (the endpoint's password function failed, or the
        server refused the one it gave): nothing is known about the server's health, so
        nothing is quarantined or evicted; connects leave it alone for a moment and then ask
        the function again."""
        with self._lock:
            self.connecting -= 1
            self.connect_errors += 1
            self.last_error = message
            self.full_until = time.monotonic() + random.uniform(*_UNSUPPLIED_PAUSE)
            if self.state == PROBING:  # the next probe after the same pause, not at once
                self.state = QUARANTINED
                self.quarantined_until = max(self.quarantined_until, self.full_until)

    def cut(self, now: float) -> bool:
        """Whether a recent attempt got no answer within its caller's time (see
        :meth:`connect_cut`)."""
        return now < self.cut_until

    def connect_cut(self, seconds: float) -> None:
        """The attempt got no answer within its caller's time (``seconds``, shorter than
        ``connect_timeout``): no verdict on the server, so no quarantine, but connects try
        it last for a while, so that short deadlines are not spent on it one after another
        while another endpoint answers."""
        self.connect_abandoned()
        self.cut_until = time.monotonic() + max(seconds, self.config.connect_timeout)

    def connect_abandoned(self) -> None:
        """The attempt was interrupted (timeout or kill of the caller): no verdict."""
        with self._lock:
            self.connecting -= 1
            self.connects_abandoned += 1
            if self.state == PROBING:
                self.state = QUARANTINED  # let the next prober in at once

    def _quarantine(self) -> None:
        now = time.monotonic()
        if self.state == UP:
            self.down_since = now
        self._failures += 1
        ceiling = min(
            self._max,
            self._initial * 2 ** (self._failures - 1),
            _BACKOFF_SHARE_OF_OUTAGE * (now - self.down_since),
        )
        delay = random.uniform(self._initial, max(self._initial, ceiling))  # jittered backoff
        self.quarantined_until = now + delay
        self.ramp = None
        if self.state == UP:
            self.quarantines += 1
            logger.warning(
                "endpoint %s quarantined for %.2f s: %s", self.label, delay, self.last_error
            )
            self.on_event("quarantined", f"{self.last_error}; probed again in {delay:.2f} s")
        self.state = QUARANTINED
        self.on_quarantine()

    def after_fork_in_child(self, lock: AbstractContextManager[Any]) -> None:
        """The child has no connection and no connect of the parent's; a lock a parent
        thread held at fork would never be released, so it gets a new one."""
        self._lock = lock
        self.connections = set()
        self.connecting = 0
        if self.state == PROBING:
            self.state = QUARANTINED  # the parent's prober is not the child's

    @property
    def open(self) -> int:
        """Connections open to it, all groups' and dedicated ones together."""
        return len(self.connections)

    # --- role -----------------------------------------------------------------------------

    def observe_role(
        self, role: str, timeline: int | None = None, lsn: int | None = None
    ) -> None:
        """Record a role the server reported; a probe of a primary also gives its timeline
        and WAL position. A role change without them forgets the old ones."""
        with self._lock:
            if role == UNKNOWN:
                return
            now = time.monotonic()
            self.role_seen_at = now
            if role == PRIMARY and (timeline is not None or self.role != PRIMARY):
                if timeline != self.timeline:
                    self._changed()  # the split-brain choice follows the timeline
                self.timeline, self.wal_lsn = timeline, lsn
            if role == self.role:
                return
            if role == PRIMARY:
                self.primary_since = now
                self.lag = None
                if self.role == STANDBY:
                    logger.warning("endpoint %s was promoted: it is now a primary", self.label)
                    self.on_event("promoted", "it was a standby and is now a primary")
            else:
                self.primary_since = self.timeline = self.wal_lsn = None
                if self.role == PRIMARY:
                    logger.warning("endpoint %s is now a standby", self.label)
                    self.on_event("demoted", "it was a primary and is now a standby")
            self.role = role
            self._changed()

    def watch(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` (non-blocking) called whenever the role, the timeline or the lag
        changes, or the server says it is full."""
        self._watchers.append(callback)

    def _changed(self) -> None:
        for callback in self._watchers:
            callback()

    def observe(self, report: Any) -> None:
        """Record what a probe (``roles.RoleReport``) learned: role, timeline, lag; a
        primary's WAL position is a sighting for the pool's standbys (``primary_wal``)."""
        self.observe_role(report.role, report.timeline, report.lsn)
        asked_at = report.asked_at or time.monotonic()
        system = report.system
        if report.role == PRIMARY and report.lsn is not None and system is not None:
            # outside this endpoint's lock: it takes the standbys'
            self.primary_wal.saw(system, report.timeline, report.lsn, asked_at)
        self.observe_lag(report.lag, report.receiver, report.receiver_age,
                         None if system is None else report.caught_up, asked_at, system)

    def lag_known(self, now: float) -> bool:
        """Whether the lag was measured recently enough to decide on: an old measurement
        is no measurement (no housekeeping in ``non-threaded`` mode, a stalled probe)."""
        return self.lag is not None and now - self.lag_seen_at <= self.role_stale_after

    def must_measure_lag(self, now: float, max_lag: float) -> bool:
        """Whether a group with ``max_lag`` should measure the lag before deciding: it is
        not known; it was within ``max_lag`` but may not be any more (its worst case, see
        :meth:`lag_at_worst`); or it was unknown (a receiver not streaming, or too young)
        a while ago. The last is measured again at most once per ``RECEIVER_SETTLE``: a
        receiver that settles is used within a second, a dead link costs a round trip a
        second."""
        lag = self.lag
        if lag is None or not self.lag_known(now):
            return True
        if lag == math.inf:
            return now - self.lag_seen_at >= RECEIVER_SETTLE
        return lag <= max_lag < self.lag_at_worst(now)

    def lag_at_worst(self, now: float) -> float:
        """The most the lag can be now: as measured, plus the time since (replay may have
        stopped right after the measurement); ``inf`` when not known."""
        if self.lag is None or not self.lag_known(now):
            return math.inf
        return self.lag + (now - self.lag_seen_at)

    def fresh_until(self, max_lag: float) -> float:
        """When this standby stops counting as within ``max_lag`` unless measured again
        (``inf`` when nothing about it will change by itself)."""
        if self.lag is None:
            return math.inf
        within = max_lag - self.lag if self.lag <= max_lag else math.inf
        return self.lag_seen_at + min(self.role_stale_after, within)

    def observe_lag(
        self,
        lag: float | None,
        receiver: int | None,
        age: float | None,
        caught_up: int | None = None,
        asked_at: float | None = None,
        system: int | None = None,
    ) -> None:
        """Record a probe's lag (None for a primary): the most the standby's data can be
        behind as the standby itself tells (``roles.RoleReport.lag``), as of ``asked_at``
        (when the probe was sent; default now). ``caught_up`` is the WAL position it had
        received and replayed everything up to, if so (with ``system``, its cluster's
        identifier): a sighting of a primary of that cluster at or before
        that position, at time *t*, bounds the lag by ``now - t`` (``primary_wal``), however
        idle the primary. Where nothing vouches, the lag is unknown, never 0 (a stalled
        link looks just like an idle primary). ``receiver`` is the streaming WAL
        receiver's pid and ``age`` how long it has lived. A receiver younger than
        ``RECEIVER_SETTLE`` may be one attempt of a receiver that keeps restarting against a
        dead primary: its lag is unknown until it has lived that long. Where the server
        hides the age, the pool's own sightings of the pid measure it; the very first
        probe of an endpoint has none, and its lag is believed."""
        with self._lock:
            now = time.monotonic()
            first = self._receiver_since == 0.0
            self._caught_up = None
            if lag is None or receiver is None:
                self._receiver, self._receiver_since = None, now
            else:
                if receiver != self._receiver:
                    # the very first sighting is believed: as if that receiver had settled
                    since = now - RECEIVER_SETTLE if first and age is None else now
                    self._receiver, self._receiver_since = receiver, since
                if age is None:
                    age = now - self._receiver_since
                if age < RECEIVER_SETTLE:
                    lag = math.inf
                else:
                    lag += now - (now if asked_at is None else min(asked_at, now))
                    if caught_up is not None and system is not None:
                        self._caught_up = (system, caught_up)
                        reached = self.primary_wal.reached_at(system, caught_up)
                        lag = min(lag, max(0.0, now - reached))
            self._set_lag(lag, now)

    def primary_seen(self, system: int, lsn: int, at: float) -> None:
        """A primary of cluster ``system`` was at ``lsn`` at ``at``: if this standby's last
        probe found it of that cluster and caught up at or beyond that position, it is at
        most ``now - at`` behind (``primary_wal``), also when it was probed before the
        primary was. Never blocks."""
        with self._lock:
            caught_up = self._caught_up
            if self.role != STANDBY or caught_up is None or caught_up[0] != system or (
                    lsn > caught_up[1]):
                return
            now = time.monotonic()
            bound = max(0.0, now - at)
            if bound < self.lag_at_worst(now):
                self._set_lag(bound, now)

    def _set_lag(self, lag: float | None, now: float) -> None:
        """The lag as of ``now`` (under the lock): news and watchers when it changed."""
        self.lag_seen_at = now
        if lag != self.lag:
            self._lag_news(self.lag, lag)
            self.lag = lag
            self._changed()

    def _lag_news(self, before: float | None, lag: float | None) -> None:
        """A "lagging" event when the lag crosses above the smallest ``max_lag`` of the
        groups that use this standby (or stops being known), "caught_up" back below."""
        alert = self.lag_alert
        if alert is None:
            return
        was = before is not None and before > alert
        now = lag is not None and lag > alert
        if now and not was:
            shown = "unknown (the WAL receiver is not streaming)" if lag == math.inf else (
                f"{lag:.1f} s")
            self.on_event("lagging", f"replay lag {shown}, beyond max_lag {alert:g} s")
        elif was and lag is not None and not now:
            self.on_event("caught_up", f"replay lag {lag:.1f} s, within max_lag {alert:g} s")

    # --- reporting ------------------------------------------------------------------------

    def describe(self) -> str:
        """Label, state, role and last error, for error messages (never a password)."""
        if self.role == STANDBY:
            lag = self.lag
            fact = ", lag unknown" if lag is None or lag == math.inf else f", lag {lag:.1f} s"
        elif self.role == PRIMARY:
            fact = f", timeline {self.timeline if self.timeline is not None else 'unknown'}"
        else:
            fact = ""
        text = f"{self.label} [{self.state}, {self.role}{fact}]"
        return f"{text} last error: {self.last_error}" if self.last_error else text

    def export(self) -> dict[str, object]:
        return {
            "state": self.state,
            "role": self.role,
            "lag": self.lag,
            "open": self.open,
            "connects": self.connects,
            "connect_attempts": self.connect_attempts,
            "connect_errors": self.connect_errors,
            "connects_abandoned": self.connects_abandoned,
            "quarantines": self.quarantines,
            "full": self.full,
            "timeline": self.timeline,
            "split_brain": self.split_brain,
            "last_error": self.last_error,
        }

    def __repr__(self) -> str:
        return f"<Endpoint {self.label} {self.state} {self.role}>"
