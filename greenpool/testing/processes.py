"""The servers' processes, for every helper here: who runs them, and how they are stopped.

PostgreSQL and PgBouncer refuse to run as root, so when this process is root each server
runs as the ``postgres`` OS user (:func:`server_owner`, :func:`as_owner`, :func:`give_to`).
Every server is stopped by its own PID, never by name, and its leftovers are found by the
temporary directory on their command line (:func:`pids_naming`), through ``/proc``.

One registry of what is left to clean up, for every helper (:func:`register` when a helper
first holds something, its temporary directory; :func:`unregister` once stopped and removed):
one exit hook stops what *this* process made and left running, newest first. A child made
with ``os.fork()`` inherits the registry but owns none of it, so its exit (a normal one runs
the hooks) never stops its parent's servers: each entry names the PID that made it, and
each helper's cleanup is a no-op there. A stop cut short (a second Ctrl-C, a timeout)
SIGKILLs what it was waiting for and every process naming that directory
(:func:`kill_naming`), and the exit hook still stops the others.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["SERVER_OS_USER", "alive", "as_owner", "give_to", "inherited", "kill_group",
           "kill_naming", "names", "pids_naming", "register", "server_owner", "stop_pid",
           "stop_started", "unregister"]

SERVER_OS_USER = "postgres"  # who runs the servers when we are root

class _Started(NamedTuple):
    thing: object
    pid: int  # the process that made it: the only one that stops it at exit
    stop: Callable[[], None]


#: id(thing) -> what made it and how it is stopped; in the order things were made
_started: dict[int, _Started] = {}


def register(thing: object, stop: Callable[[], None]) -> None:
    """``thing`` holds something to clean up (its directory, soon its processes): ``stop``
    it at exit unless :func:`unregister` is called first (only in this process)."""
    _started[id(thing)] = _Started(thing, os.getpid(), stop)


def unregister(thing: object) -> None:
    """``thing`` is stopped and removed: nothing is left for the exit hook."""
    _started.pop(id(thing), None)


def inherited(thing: object) -> bool:
    """Whether ``thing`` was made by another process (this one is a forked child of it)."""
    entry = _started.get(id(thing))
    return entry is not None and entry.pid != os.getpid()


def stop_started(kind: type = object) -> None:
    """Stop every thing (of ``kind``) this process made and has not stopped yet, newest
    first (a PgBouncer before the cluster behind it); never its parent's, in a forked
    child. A failure to stop one does not keep the others running, nor does an interruption
    (a second Ctrl-C while the exit hook waits for a server): it is raised once every other
    thing was stopped."""
    pid = os.getpid()
    interrupted: BaseException | None = None
    for entry in reversed(list(_started.values())):
        if entry.pid == pid and isinstance(entry.thing, kind):
            try:
                entry.stop()
            except Exception:
                pass
            except BaseException as exc:
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


@atexit.register
def _stop_leftovers() -> None:
    """Never leave a server behind when a run forgets (or fails) to stop one."""
    stop_started()


def server_owner() -> pwd.struct_passwd | None:
    """The OS user the servers run as: ``postgres`` when we are root, else ``None`` (us).
    Raises :class:`RuntimeError` when we are root and that user does not exist."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, the throwaway servers run as the {SERVER_OS_USER!r} OS user "
            f"(PostgreSQL and PgBouncer refuse root), and there is none: create it "
            f"(`useradd --system {SERVER_OS_USER}`) or run as an unprivileged user") from None


def give_to(owner: pwd.struct_passwd | None, *paths: Path) -> None:
    """Hand ``paths`` to the servers' OS user (nothing to do when that is us)."""
    if owner is not None:
        for path in paths:
            os.chown(path, owner.pw_uid, owner.pw_gid)


def as_owner(owner: pwd.struct_passwd | None) -> dict[str, Any]:
    """``subprocess.Popen`` keywords that run a program as ``owner``, without root's groups."""
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def kill_group(proc: subprocess.Popen[str], within: float) -> None:
    """SIGKILL ``proc``'s whole process group (it was started in a session of its own) and
    wait up to ``within`` seconds for it and its children to go."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(within)
    deadline = time.monotonic() + within  # its children die (and are reaped) a bit later
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.005)
    for stream in (proc.stdout, proc.stderr):
        # gevent's communicate() may still be reading it in another greenlet: then it is
        # closed when that reader sees the EOF of the killed tool, not here
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie child of ours counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_pid(pid: int, first: signal.Signals, within: float) -> None:
    """Send ``first``; if ``pid`` is still alive after ``within`` seconds, SIGKILL it. An
    interruption while waiting (a signal's exception, a timeout) SIGKILLs it at once before
    it goes on: a stop cut short never leaves the process running."""
    try:
        for sig, wait in ((first, within), (signal.SIGKILL, within)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if not alive(pid):
                return
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        raise


def _mentions(cmdline: bytes, root: Path) -> bool:
    return os.fsencode(str(root)) + b"/" in cmdline


def names(pid: int, root: Path) -> bool:
    """Whether ``pid`` runs and its command line mentions a path under ``root``: a PID read
    from a file (a postmaster.pid left by a crash) may since belong to another process,
    which must not get our signals."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return alive(pid) and _mentions(handle.read(), root)
    except OSError:
        return False  # gone (or not ours to read): not one of the processes started there


def kill_naming(root: Path) -> None:
    """SIGKILL at once, without waiting, every process naming ``root``: how a stop cut
    short by an interruption goes on, so that it never leaves one running behind the
    directory it then removes."""
    for pid in pids_naming(root):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def pids_naming(root: Path) -> list[int]:
    """Processes (other than us) whose command line mentions ``root``: by /proc, no tools."""
    found = []
    for entry in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(entry, "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        pid = int(entry.split("/")[2])
        if _mentions(cmdline, root) and pid != os.getpid():
            found.append(pid)
    return found
