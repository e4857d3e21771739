"""The only package that knows which concurrency mode is in use.

Everything else asks a :class:`Backend` for what differs between modes: the lock that guards
a group's bookkeeping, the one-shot signal a waiter sleeps on, a deadline for blocking driver
calls, sleeping, background tasks, the identity of the running task, and how psycopg2 is
made to yield.

- ``backend``: the :class:`Backend` interface and the protocols it hands out;
- ``gevent_backend``, ``eventlet_backend``, ``thread_backends``: one module per mode;
- ``waits``: psycopg2's wait callbacks (cancel on interruption, blocking-mode deadlines);
- ``fork``: connects in flight across ``fork()``;
- ``tasks``: background tasks one owner starts and ends together;
- ``originals``: the real ``select``/``_thread`` whichever library patched them;
- ``modes``: a mode's name to its backend; ``detection``: which mode fits the process.
"""

from .backend import Backend, Signal, Task, Waiter
from .detection import GREEN_MODES, check_mode_fits, patched_modules, process_mode, resolve_mode
from .fork import InheritedAcrossFork, still_connecting
from .modes import backend_for

__all__ = [
    "GREEN_MODES",
    "Backend",
    "InheritedAcrossFork",
    "Signal",
    "Task",
    "Waiter",
    "backend_for",
    "check_mode_fits",
    "patched_modules",
    "process_mode",
    "resolve_mode",
    "still_connecting",
]
