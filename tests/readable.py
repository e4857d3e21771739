"""Everything a human might read of an object, for the tests that a secret never shows."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any


def texts(thing: Any) -> Iterator[str]:
    """Everything a human might read of ``thing``: str, repr, and for an exception its whole
    chain (``__cause__`` and ``__context__``) and formatted traceback."""
    if isinstance(thing, BaseException):
        seen: list[BaseException] = []
        todo: list[BaseException | None] = [thing]
        while todo:
            exc = todo.pop()
            if exc is None or exc in seen:
                continue
            seen.append(exc)
            yield str(exc)
            yield repr(exc)
            yield from (str(arg) for arg in exc.args)
            todo += [exc.__cause__, exc.__context__]
        yield "".join(traceback.format_exception(thing))
    else:
        yield str(thing)
        yield repr(thing)
