"""The real ``select`` and ``_thread`` functions, whichever green library monkey-patched them:
the pool's zero-timeout socket checks, blocking-mode waits and cancel threads must never
switch into a hub."""

from __future__ import annotations

import select
import sys
from collections.abc import Callable
from typing import Any

POLLIN = getattr(select, "POLLIN", 1)  # monkey-patching replaces functions, not constants


def original_select(name: str) -> Any:
    """The real ``select.<name>`` whichever library patched the module (None if absent).

    Each library keeps the original its own way: asking gevent's registry in an eventlet
    process returns eventlet's *green* select, which registers with the hub and switches.
    """
    if "eventlet.patcher" in sys.modules:
        from eventlet import patcher

        return getattr(patcher.original("select"), name, None)
    from gevent.monkey import get_original

    try:
        return get_original("select", name)
    except AttributeError:
        return None


def original_start_thread() -> Callable[..., Any]:
    """The real ``_thread.start_new_thread``: an OS thread, whichever library patched it."""
    if "eventlet.patcher" in sys.modules:
        from eventlet import patcher

        return patcher.original("_thread").start_new_thread
    from gevent.monkey import get_original

    return get_original("_thread", "start_new_thread")
