"""What every ``greenpool`` command shares as a process: its exit statuses, the one-sentence
failure (:class:`CheckFailed`), signals turned into :class:`Interrupted` so that cleanup
runs, cleanups a signal cannot cut short (:func:`shielded`), and the live progress line."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The exit statuses of every ``greenpool`` command (docs/cli.md's command table lists them).
OK = 0  # done; check: every group has an eligible endpoint
FAILED = 1  # it ran and found a failure: check: a group without endpoint; bench: nothing served
BAD_INPUT = 2  # bad command line or configuration
UNREACHABLE = 3  # the database (or the throwaway servers) could not be reached or started
BUG = 4  # an unexpected error inside greenpool
# interrupted by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)

class CheckFailed(Exception):
    """A problem the user must fix, said in one sentence (no traceback); ``status`` is the
    exit status the command ends with."""

    def __init__(self, message: str, status: int = BAD_INPUT) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status


class Interrupted(SystemExit):
    """SIGINT/SIGTERM/SIGHUP, raised where the process happens to be so cleanup runs.

    A ``SystemExit`` because gevent's hub passes those to the main greenlet without printing
    a traceback, wherever the signal handler ran (hub, main or another greenlet).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # signals since signals_as_exceptions() began
_held: list[int] = []  # the first signal, if it came inside shielded() and is not raised yet
_shields = 0  # > 0 inside shielded()
_delivery: list[Any] = []  # the hub's callback that will throw the first signal, under gevent


def _gevent_hub() -> Any | None:
    """gevent's hub, once the command has monkey-patched the process (every command does,
    after parsing its arguments); None before that."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("time"):
        return None
    import gevent

    return gevent.get_hub()


def _interrupt(signum: int) -> None:
    """Raise the first signal as :class:`Interrupted`, or hold it inside :func:`shielded`."""
    if _shields:
        _held.append(signum)
    else:
        raise Interrupted(signum)


def _throw_into(main: Any, signum: int) -> None:
    """Run by the hub: deliver the signal to the main greenlet at the cooperative wait it is
    parked in, as gevent delivers a ``Timeout``."""
    if not main.dead:
        try:
            _interrupt(signum)
        except Interrupted as exc:
            main.throw(exc)


@contextmanager
def signals_as_exceptions() -> Iterator[list[int]]:
    """The first SIGINT/SIGTERM/SIGHUP raises :class:`Interrupted`; later ones are only
    recorded (in the yielded list), so the cleanup the first one started runs to its end.

    Under gevent the handler does not raise where it happens to run: a Python signal handler
    runs between any two bytecodes, also inside C code that clears errors (the buffered file
    gevent's ``Popen`` opens on its exec pipe swallowed it, and the demo then ran on with its
    servers), in a ``__del__`` or in the hub. Thrown into the main greenlet by the hub, it
    arrives where the main greenlet waits, as a ``gevent.Timeout`` would.
    """

    def on_signal(signum: int, frame: Any) -> None:
        _received.append(signum)
        if len(_received) == 1:
            hub = _gevent_hub()
            if hub is None:
                _interrupt(signum)
            else:
                _delivery.append(hub.loop.run_callback(_throw_into, hub.parent, signum))

    del _received[:], _held[:], _delivery[:]
    previous = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
    try:
        yield _received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for callback in _delivery:  # the command ended before waiting again: its work is done
            callback.stop()


@contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that a signal must not cut short (stopping servers, closing a pool): the
    first signal arriving inside is held, then raised as :class:`Interrupted` once the
    outermost shielded block is done."""
    global _shields
    _shields += 1
    try:
        yield
    finally:
        _shields -= 1
        if not _shields and _held:
            raise Interrupted(_held.pop())


_progress_line = [False]  # stdout ends in a progress line (no newline after it yet)


def write_progress(text: str) -> None:
    """Rewrite the live progress line (a carriage return, no newline)."""
    sys.stdout.write(f"\r{text}")
    sys.stdout.flush()
    _progress_line[0] = True


def end_progress() -> None:
    """End the progress line, if one is open: what follows (a report, or a sentence on
    stderr such as "interrupted") starts on a line of its own."""
    if _progress_line[0]:
        _progress_line[0] = False
        sys.stdout.write("\n")
        sys.stdout.flush()


def first_line(exc: BaseException) -> str:
    try:
        text = str(exc).strip()
    except Exception:  # a user exception whose __str__ fails
        text = ""
    return text.splitlines()[0][:300] if text else "(no message)"


