"""A server the pool connects to, shared by every group that uses it.

Holds what the pool has learnt about the server (connect successes and failures, the last
error) so that errors and stats can say which endpoint failed and why.
"""

from __future__ import annotations

import time

from .config import EndpointConfig


class Endpoint:
    __slots__ = ("config", "connect_errors", "connects", "label", "last_error", "last_error_at")

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.label = config.label
        self.connects = 0
        self.connect_errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def record_connect(self) -> None:
        self.connects += 1

    def record_connect_error(self, message: str) -> None:
        self.connect_errors += 1
        self.last_error = message
        self.last_error_at = time.time()

    def describe(self) -> str:
        """``host:port/db`` plus the last error, for error messages (never a password)."""
        if self.last_error is None:
            return self.label
        return f"{self.label} (last error: {self.last_error})"

    def export(self) -> dict[str, object]:
        return {
            "connects": self.connects,
            "connect_errors": self.connect_errors,
            "last_error": self.last_error,
        }

    def __repr__(self) -> str:
        return f"<Endpoint {self.label}>"
