"""What test runs on one machine must take turns for.

The README's test command runs the three modes' test processes at once. Most tests own
everything they touch (throwaway servers on free ports), but a few drills measure how fast
something happens against wall-clock timers of their own (Patroni's ``ttl``, a failover
bound of one second): two such drills at once on 2 cores would each see a slower machine.
They take a machine-wide turn with :func:`turn`, an ``flock`` on a file in the temp dir,
which the kernel releases if the holder dies (no stale lock after a SIGKILL).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator

from modes import sleep


@contextlib.contextmanager
def turn(name: str, timeout: float) -> Iterator[float]:
    """Hold the machine-wide turn ``name`` for the block; yields the seconds waited for it.
    Polls without blocking (a blocking ``flock`` would stall the gevent hub) and fails the
    test, naming the lock, if no turn came within ``timeout`` seconds."""
    path = os.path.join(tempfile.gettempdir(), f"greenpool-tests-{name}.lock")
    started = time.monotonic()
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - started > timeout:
                    raise AssertionError(
                        f"another test run held {path} for over {timeout} s") from None
                sleep(0.2)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
