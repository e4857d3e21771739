"""Does the mode fit the process? Which mode does ``auto`` mean here? Asked of the green
libraries' own monkey-patching registries."""

from __future__ import annotations

import sys

from ..errors import ConfigError

#: the modes whose waits are cooperative, and the library that makes them so
GREEN_MODES = ("gevent", "eventlet")
_HOW_TO_PATCH = {
    "gevent": "call `from gevent import monkey; monkey.patch_all()` first thing at startup, "
              "before other imports (gunicorn -k gevent and Celery -P gevent do it for you: "
              "create the pool in the worker, not in the master before fork)",
    "eventlet": "call `import eventlet; eventlet.monkey_patch()` first thing at startup, "
                "before other imports",
}


def patched_modules(library: str) -> dict[str, bool]:
    """Whether ``library`` (gevent or eventlet) has patched ``threading`` and ``socket``.

    Asked of the library's own registry, and only if the library's patcher was imported at
    all: a process nobody patched does not pay for importing gevent to find out.
    """
    if library == "gevent":
        if "gevent.monkey" not in sys.modules:
            return {"threading": False, "socket": False}
        from gevent import monkey

        return {m: bool(monkey.is_module_patched(m)) for m in ("threading", "socket")}
    if "eventlet.patcher" not in sys.modules:
        return {"threading": False, "socket": False}
    from eventlet import patcher

    return {"threading": bool(patcher.is_monkey_patched("thread")),
            "socket": bool(patcher.is_monkey_patched("socket"))}


def process_mode() -> str:
    """The mode that fits this process: the green library whose patching made ``threading``
    cooperative, else ``threaded``."""
    for library in GREEN_MODES:
        if patched_modules(library)["threading"]:
            return library
    return "threaded"


def resolve_mode(mode: str) -> str:
    """The mode a pool of ``mode`` runs in: ``auto`` becomes the one that fits this process
    (asked at ``Pool()``, so a configuration read before monkey-patching still follows it).

    A process a green library patched only in part (``socket`` but not ``threading``, or
    the reverse) was meant to be green but is not: ``auto`` refuses to guess there rather
    than pick a mode whose waits would block every greenlet or die with ``LoopExit``.
    """
    if mode != "auto":
        return mode
    for library in GREEN_MODES:
        patched = patched_modules(library)
        if all(patched.values()):
            return library
        if any(patched.values()):
            done, missing = (("socket", "threading") if patched["socket"]
                             else ("threading", "socket"))
            raise ConfigError(
                f"type: 'auto' cannot tell this process's mode: {library} has monkey-patched "
                f"{done} but not {missing}; patch {missing} too ({_HOW_TO_PATCH[library]}), "
                f"or name the mode in type"
            )
    return "threaded"


def check_mode_fits(mode: str) -> None:
    """Raise :class:`ConfigError` at ``Pool()`` when ``mode`` does not fit the process.

    A green mode in a process whose threading its library has not patched fails much later
    and obscurely: real threads sharing gevent's waits die with gevent's ``LoopExit``. A
    ``threaded`` pool in a patched process would block every greenlet in each query. The
    ``non-threaded`` mode fits anywhere: it is single-caller and blocking by design.
    """
    if mode == "non-threaded":
        return
    actual = process_mode()
    if mode in GREEN_MODES:
        patched = patched_modules(mode)
        if all(patched.values()):
            return
        if actual not in ("threaded", mode):
            raise ConfigError(
                f"type: {mode!r}, but this process was monkey-patched by {actual}, not "
                f"{mode}; set type to {actual!r}"
            )
        missing = " and ".join(m for m, done in patched.items() if not done)
        raise ConfigError(
            f"type: {mode!r} needs a process {mode} has monkey-patched, but its {missing} "
            f"{'is' if ' and ' not in missing else 'are'} not (real threads sharing {mode}'s "
            f"waits fail later, e.g. with gevent's LoopExit); {_HOW_TO_PATCH[mode]}, or set "
            f"type to 'threaded' for a server that runs on OS threads"
        )
    if mode == "threaded" and actual != "threaded":
        raise ConfigError(
            f"type: 'threaded', but this process was monkey-patched by {actual}: its threads "
            f"are greenlets, and the threaded mode's blocking driver waits would stop all of "
            f"them during each query; set type to {actual!r} (or 'non-threaded' for a "
            f"one-shot script that may block)"
        )
