"""Whether a ``with`` block is still open, asked of the running frames and of the code's
exception table, because the block's own ``__exit__`` cannot be relied on to say so.

A ``with`` statement calls ``__exit__`` however its block ends, but an exception from a
signal handler (``KeyboardInterrupt``, Celery's ``SoftTimeLimitExceeded``) can land on the
first instruction of ``__exit__``, before it ran a line: the block is over while the
handler's bookkeeping says it is open. A later block of the same task must then not be
nested inside it (its work would join a transaction nobody will commit); handler.py asks
:func:`block_open` before nesting.

How it knows (CPython 3.11 and later): a ``with`` statement calls ``__enter__`` from a
``BEFORE_WITH`` instruction, and every instruction of its body is covered, in the code's
exception table, by the statement's cleanup handler, directly or through the handlers of
the ``try`` blocks inside it. An instruction is inside the block when following its
handlers leads to that cleanup. The frame holding the statement is inside the block only
while it is running (on the current stack) or suspended (a generator) at such an
instruction.

Where that cannot be read, the answer is ``None`` (unknown) and the caller keeps the block
open, as it would without this module: Python 3.10 has no exception table, and a block not
entered by a ``with`` statement of its own (``contextlib.ExitStack``, ``__enter__`` called by
hand) has no ``BEFORE_WITH`` to start from.
"""

from __future__ import annotations

import dis
import functools
import inspect
from types import CodeType, FrameType

_BEFORE_WITH = dis.opmap.get("BEFORE_WITH")  # absent before 3.11 (and from 3.14)
_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
_Entries = tuple[tuple[int, int, int], ...]  # (start, end, handler) offsets


@functools.lru_cache(maxsize=512)
def _exception_table(code: CodeType) -> _Entries | None:
    entries = getattr(dis.Bytecode(code), "exception_entries", None)
    return None if entries is None else tuple((e.start, e.end, e.target) for e in entries)


def _handler_of(entries: _Entries, offset: int) -> int | None:
    """The handler covering the instruction at ``offset`` (entries do not overlap)."""
    for start, end, target in entries:
        if start <= offset < end:
            return target
    return None


def _cleanup_of_with(code: CodeType, entered_at: int) -> tuple[_Entries, int] | None:
    """The exception table and the cleanup handler of the ``with`` statement whose
    ``BEFORE_WITH`` is at ``entered_at``; None if that is not a ``with`` statement's."""
    if _BEFORE_WITH is None or code.co_code[entered_at] != _BEFORE_WITH:
        return None
    entries = _exception_table(code)
    if entries is None:
        return None
    cleanup = _handler_of(entries, entered_at + 2)  # the body begins with the next instruction
    return None if cleanup is None else (entries, cleanup)


def _inside(entries: _Entries, cleanup: int, offset: int) -> bool:
    seen: set[int] = set()
    while offset not in seen:
        seen.add(offset)
        handler = _handler_of(entries, offset)
        if handler is None:
            return False
        if handler == cleanup:
            return True
        offset = handler
    return False


def block_open(frame: FrameType, entered_at: int, running: FrameType | None) -> bool | None:
    """Whether the ``with`` statement at offset ``entered_at`` of ``frame`` is still inside its
    block, seen from ``running`` (the innermost frame of the task asking, which is the
    block's task); None when that cannot be known."""
    with_statement = _cleanup_of_with(frame.f_code, entered_at)
    if with_statement is None:
        return None
    entries, cleanup = with_statement
    while running is not None:
        if running is frame:
            return _inside(entries, cleanup, frame.f_lasti)
        running = running.f_back
    if frame.f_code.co_flags & _SUSPENDABLE:  # suspended at a yield, or finished
        return _inside(entries, cleanup, frame.f_lasti)
    return False  # the function returned, or an exception left it
