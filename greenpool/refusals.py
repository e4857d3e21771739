"""What one group remembers of connect failures that are its own: who refused, why, until when.

A refusal (bad password, missing database or role, a parameter a pooler refuses: see
failures.py; the group's ``configure`` hook failing) says nothing against the server's
health, so it never quarantines the server, which other groups may use as before. The group
leaves that endpoint alone instead (its rounds skip it, the promotion watch too: a connect
every few milliseconds would fail the same way). One that retrying cannot fix lasts the
endpoints' longest ``quarantine_max``, and once every endpoint refused the group so, callers
get :meth:`Refusals.error` at once rather than waiting out their acquire timeout. A setback
(the hook met a lock, a deadlock, a timeout: :meth:`Refusals.set_back`) lasts the endpoint's
first backoff, doubled at each one in a row up to its longest; then one connect of the group
tries it again (:meth:`claim`) while the others keep away, as one prober does for a
quarantined server: the group's waiting callers do not all log in at once to fail the same
way. A failure of a connect that began before the group's latest verdict on the endpoint is
no news (a burst of callers meeting one held lock is one setback, not one per caller), as a
connect that began before a quarantine does not lengthen it. A connect that succeeds forgets
either.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

from .endpoint import Endpoint
from .errors import ConnectFailed


def _nothing() -> None:
    pass


class _Refusal(NamedTuple):
    until: float  # no connect of the group there before this (monotonic)
    message: str
    final: bool  # retrying cannot fix it
    since: float  # when it was decided: a connect that began earlier brings no news


class Refusals:
    """The endpoints that refused one group for a reason retrying cannot fix, and why."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._by_endpoint: dict[Endpoint, _Refusal] = {}
        self._pause = max(ep.backoff_max for ep in endpoints)
        #: set-back endpoints one connect tries again now -> when it was let through
        #: (see :meth:`claim`)
        self._retrying: dict[Endpoint, float] = {}
        #: endpoint -> setbacks in a row (since the group's last connect to it succeeded)
        self._setbacks: dict[Endpoint, int] = {}
        #: called (non-blocking) when an endpoint starts or stops being refused before its
        #: pause would end by itself: the group caches where it should be (placement)
        self.on_change: Callable[[], None] = _nothing

    def remember(self, endpoint: Endpoint, message: str, now: float) -> None:
        """``endpoint`` refused the group for a reason retrying cannot fix."""
        self._retrying.pop(endpoint, None)
        self._by_endpoint[endpoint] = _Refusal(now + self._pause, message, True, now)
        self.on_change()

    def set_back(self, endpoint: Endpoint, message: str, now: float,
                 began: float | None = None) -> None:
        """A connect of the group to ``endpoint`` (begun at ``began``, default ``now``)
        failed for a passing reason of its own: leave the endpoint alone for its first
        backoff, doubled at each setback in a row up to its longest (a hook that always
        fails is tried less and less often), then try again. A connect that began before
        the group's latest verdict there (the others of a burst that met the same held
        lock) is no news: it neither lengthens nor doubles the pause."""
        latest = self._by_endpoint.get(endpoint)
        if latest is not None and (now if began is None else began) < latest.since:
            return
        self._retrying.pop(endpoint, None)
        times = self._setbacks[endpoint] = self._setbacks.get(endpoint, 0) + 1
        pause = min(endpoint.backoff_initial * 2 ** min(times - 1, 30), endpoint.backoff_max)
        self._by_endpoint[endpoint] = _Refusal(now + pause, message, False, now)
        self.on_change()

    def forget(self, endpoint: Endpoint) -> None:
        """A connect of the group to ``endpoint`` succeeded."""
        self._retrying.pop(endpoint, None)
        self._setbacks.pop(endpoint, None)
        if self._by_endpoint.pop(endpoint, None) is not None:
            self.on_change()

    def claim(self, endpoint: Endpoint, now: float, hold: float) -> bool:
        """Whether a connect of the group may go to ``endpoint`` now (the caller holds the
        group's lock). Once a setback's pause is over, True for one connect only: it tries
        again while the others keep away for up to ``hold`` seconds (its bound), until its
        verdict (:meth:`set_back`, :meth:`remember`, :meth:`forget`) or :meth:`settle`
        (given ``now``, which tells it from the connects it let through before)."""
        refusal = self._by_endpoint.get(endpoint)
        if refusal is None:
            return True
        if refusal.until > now:
            return False
        if not refusal.final:
            self._by_endpoint[endpoint] = refusal._replace(until=now + hold, since=now)
            self._retrying[endpoint] = now
        return True

    def retrying(self, endpoint: Endpoint) -> bool:
        """Whether a connect :meth:`claim` let through is trying ``endpoint`` again now."""
        return endpoint in self._retrying

    def settle(self, endpoint: Endpoint, claimed: float | None = None) -> None:
        """The connect :meth:`claim` let through at ``claimed`` ended (the caller holds the
        group's lock); if it was the one trying again and left no verdict of the group's
        own (a server failure, cut by its caller's time, interrupted), the others try
        again. Another connect's end (of a burst before the setback) lifts nothing."""
        if endpoint in self._retrying and claimed in (None, self._retrying[endpoint]):
            del self._retrying[endpoint]
            self._by_endpoint.pop(endpoint, None)
            self.on_change()

    def blocks(self, endpoint: Endpoint, now: float) -> bool:
        """Whether ``endpoint`` refused the group and its pause has not ended yet."""
        refusal = self._by_endpoint.get(endpoint)
        return refusal is not None and refusal.until > now

    def refused(self, now: float) -> set[Endpoint]:
        """The endpoints :meth:`blocks` now."""
        return {ep for ep, refusal in list(self._by_endpoint.items()) if refusal.until > now}

    def until(self, endpoint: Endpoint) -> float:
        """When ``endpoint``'s refusal of the group ends (0 if it has none)."""
        refusal = self._by_endpoint.get(endpoint)
        return 0.0 if refusal is None else refusal.until

    def describe(self, endpoints: Sequence[Endpoint]) -> str:
        """The group's own latest failure on each of ``endpoints`` that has one (a refusal
        or a setback, over or not), for a caller whose time ran out; '' if none."""
        found = [(ep, self._by_endpoint.get(ep)) for ep in endpoints]  # (one look each:
        # another thread may forget one meanwhile)
        return "; ".join(f"{ep.label}: {refusal.message}" for ep, refusal in found if refusal)

    def error(self, group: str, endpoints: Sequence[Endpoint], now: float) -> ConnectFailed | None:
        """The error to raise at once when every one of ``endpoints`` refused the group for
        a reason retrying cannot fix, within its pause, else None."""
        if not self._by_endpoint:
            return None
        messages = []
        for ep in endpoints:
            refusal = self._by_endpoint.get(ep)
            if refusal is None or refusal.until <= now or not refusal.final:
                return None
            messages.append(f"{ep.label}: {refusal.message}")
        return ConnectFailed(
            f"group {group!r}: {'; '.join(messages)}; retrying cannot help: fix the "
            f"configuration (credentials, database name, settings a pooler refuses)"
        )

    def apply(self, endpoints: Sequence[Endpoint], kept: Collection[Endpoint]) -> None:
        """A new configuration: the pause follows ``endpoints``; refusals of endpoints not
        ``kept`` are forgotten (a new dict: others read the old one without a lock)."""
        self._by_endpoint = {ep: v for ep, v in self._by_endpoint.items() if ep in kept}
        self._setbacks = {ep: n for ep, n in self._setbacks.items() if ep in kept}
        self._retrying = {ep: claimed for ep, claimed in self._retrying.items()
                          if ep in self._by_endpoint}
        self._pause = max(ep.backoff_max for ep in endpoints)
        self.on_change()
