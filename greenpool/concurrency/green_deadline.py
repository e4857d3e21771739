""":meth:`Backend.deadline` of the green modes: an event-loop timer that throws its error
into the task whose ``with`` block it bounds, and only while that block is open.

gevent's and eventlet's own ``Timeout`` throw into their greenlet wherever it is when they
fire, trusting ``__exit__`` to have cancelled them. Their ``__exit__`` is Python, and an
exception from a signal handler can land on its first instruction: the block is over, the
timer still armed, and its error (a private one, for a round trip long gone) would later be
thrown into code that never asked for a deadline. Here the timer asks the task's frames
first (:mod:`greenpool.open_blocks`): an expired deadline whose block is over throws
nothing. Where that cannot be known (not a ``with`` statement of its own, Python 3.10), it
throws, as a plain ``Timeout`` would. A ``with`` statement run again in the same frame (a
loop) is the same block to the frames: the latest deadline entered there is the one in
force, so a cut one's timer throws nothing into the next pass.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..open_blocks import block_open

_getframe = sys._getframe

#: (id of the frame, offset of its ``with``) -> the deadline last entered there: the one in
#: force while that block is open (the frame is held by the deadline, so its id is its own)
_in_force: dict[tuple[int, int], GreenDeadline] = {}


class GreenDeadline:
    """Raise ``error`` in the task if the block is still running after ``seconds``."""

    __slots__ = ("_cancel", "_entered_at", "_entered_in", "_schedule", "_seconds", "_task",
                 "error")

    def __init__(self, schedule: Callable[[float, Callable[[], None]], Callable[[], None]],
                 current: Callable[[], Any], seconds: float, error: BaseException) -> None:
        self._schedule = schedule  # the backend's call_later: (seconds, callback) -> cancel
        self._task = current()
        self._seconds = seconds
        self.error = error
        self._entered_in: Any = None
        self._entered_at = 0
        self._cancel: Callable[[], None] | None = None

    def __enter__(self) -> GreenDeadline:
        caller = self._entered_in = _getframe(1)
        at = self._entered_at = caller.f_lasti
        _in_force[id(caller), at] = self
        self._cancel = self._schedule(self._seconds, self._expired)
        return self

    def __exit__(self, *exc_info: object) -> None:
        frame, self._entered_in = self._entered_in, None  # first: a cut after this leaves a
        cancel, self._cancel = self._cancel, None  # timer that throws nothing
        if cancel is not None:
            cancel()
        if frame is not None:
            self._forget(frame)

    def _forget(self, frame: Any) -> None:
        key = (id(frame), self._entered_at)
        if _in_force.get(key) is self:
            del _in_force[key]

    def _expired(self) -> None:
        """In the event loop, when the time is up."""
        frame = self._entered_in
        if frame is None:
            return
        task = self._task
        if _in_force.get((id(frame), self._entered_at)) is not self or block_open(
                frame, self._entered_at, task.gr_frame) is False:
            self._entered_in = None  # its exit was cut short: nothing to bound any more
            self._forget(frame)
            return
        task.throw(self.error)
