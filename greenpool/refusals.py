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
way. A connect that succeeds forgets either.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .endpoint import Endpoint
from .errors import ConnectFailed


class Refusals:
    """The endpoints that refused one group for a reason retrying cannot fix, and why."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        #: endpoint -> (until when, message, whether retrying cannot fix it)
        self._by_endpoint: dict[Endpoint, tuple[float, str, bool]] = {}
        self._pause = max(ep.backoff_max for ep in endpoints)
        #: set-back endpoints one connect tries again now (see :meth:`claim`)
        self._retrying: set[Endpoint] = set()
        #: endpoint -> setbacks in a row (since the group's last connect to it succeeded)
        self._setbacks: dict[Endpoint, int] = {}

    def remember(self, endpoint: Endpoint, message: str, now: float) -> None:
        """``endpoint`` refused the group for a reason retrying cannot fix."""
        self._retrying.discard(endpoint)
        self._by_endpoint[endpoint] = (now + self._pause, message, True)

    def set_back(self, endpoint: Endpoint, message: str, now: float) -> None:
        """A connect of the group to ``endpoint`` failed for a passing reason of its own:
        leave the endpoint alone for its first backoff, doubled at each setback in a row up
        to its longest (a hook that always fails is tried less and less often), then try
        again."""
        self._retrying.discard(endpoint)
        times = self._setbacks[endpoint] = self._setbacks.get(endpoint, 0) + 1
        pause = min(endpoint.backoff_initial * 2 ** min(times - 1, 30), endpoint.backoff_max)
        self._by_endpoint[endpoint] = (now + pause, message, False)

    def forget(self, endpoint: Endpoint) -> None:
        """A connect of the group to ``endpoint`` succeeded."""
        self._retrying.discard(endpoint)
        self._setbacks.pop(endpoint, None)
        self._by_endpoint.pop(endpoint, None)

    def claim(self, endpoint: Endpoint, now: float, hold: float) -> bool:
        """Whether a connect of the group may go to ``endpoint`` now (the caller holds the
        group's lock). Once a setback's pause is over, True for one connect only: it tries
        again while the others keep away for up to ``hold`` seconds (its bound), until its
        verdict (:meth:`set_back`, :meth:`remember`, :meth:`forget`) or :meth:`settle`."""
        refusal = self._by_endpoint.get(endpoint)
        if refusal is None:
            return True
        until, message, final = refusal
        if until > now:
            return False
        if not final:
            self._by_endpoint[endpoint] = (now + hold, message, False)
            self._retrying.add(endpoint)
        return True

    def retrying(self, endpoint: Endpoint) -> bool:
        """Whether a connect :meth:`claim` let through is trying ``endpoint`` again now."""
        return endpoint in self._retrying

    def settle(self, endpoint: Endpoint) -> None:
        """The connect :meth:`claim` let through ended (the caller holds the group's lock);
        one that left no verdict of the group's own (a server failure, cut by its caller's
        time, interrupted) lets the others try again."""
        if endpoint in self._retrying:
            self._retrying.discard(endpoint)
            self._by_endpoint.pop(endpoint, None)

    def blocks(self, endpoint: Endpoint, now: float) -> bool:
        """Whether ``endpoint`` refused the group and its pause has not ended yet."""
        refusal = self._by_endpoint.get(endpoint)
        return refusal is not None and refusal[0] > now

    def refused(self, now: float) -> set[Endpoint]:
        """The endpoints :meth:`blocks` now."""
        return {ep for ep, (until, _, _) in list(self._by_endpoint.items()) if until > now}

    def until(self, endpoint: Endpoint) -> float:
        """When ``endpoint``'s refusal of the group ends (0 if it has none)."""
        refusal = self._by_endpoint.get(endpoint)
        return 0.0 if refusal is None else refusal[0]

    def describe(self, endpoints: Sequence[Endpoint]) -> str:
        """The group's own latest failure on each of ``endpoints`` that has one (a refusal
        or a setback, over or not), for a caller whose time ran out; '' if none."""
        found = [(ep, self._by_endpoint.get(ep)) for ep in endpoints]  # (one look each:
        # another thread may forget one meanwhile)
        return "; ".join(f"{ep.label}: {refusal[1]}" for ep, refusal in found if refusal)

    def error(self, group: str, endpoints: Sequence[Endpoint], now: float) -> ConnectFailed | None:
        """The error to raise at once when every one of ``endpoints`` refused the group for
        a reason retrying cannot fix, within its pause, else None."""
        if not self._by_endpoint:
            return None
        messages = []
        for ep in endpoints:
            until, message, final = self._by_endpoint.get(ep, (0.0, "", False))
            if until <= now or not final:
                return None
            messages.append(f"{ep.label}: {message}")
        return ConnectFailed(
            f"group {group!r}: {'; '.join(messages)}; retrying cannot help: fix the "
            f"configuration (credentials, database name, settings a pooler refuses)"
        )

    def apply(self, endpoints: Sequence[Endpoint], kept: Collection[Endpoint]) -> None:
        """A new configuration: the pause follows ``endpoints``; refusals of endpoints not
        ``kept`` are forgotten (a new dict: others read the old one without a lock)."""
        self._by_endpoint = {ep: v for ep, v in self._by_endpoint.items() if ep in kept}
        self._setbacks = {ep: n for ep, n in self._setbacks.items() if ep in kept}
        self._retrying &= set(self._by_endpoint)
        self._pause = max(ep.backoff_max for ep in endpoints)
