"""The only module that knows which concurrency mode is in use.

Everything else asks a :class:`Backend` for what differs between modes: the lock that guards
a group's bookkeeping, the one-shot signal a waiter sleeps on, a deadline for blocking driver
calls, sleeping, background tasks, the identity of the running task, and how psycopg2 is
made to yield.

Every mode installs a psycopg2 wait callback of ours. In the green modes it waits as
psycogreen's does (gevent's own loop; eventlet's wraps psycogreen's), plus one thing: when
the wait is interrupted (a timeout, a kill) while a statement runs, it
asks the server to cancel that statement, from an OS thread (see cancel.py). In the blocking
modes it is a ``poll()`` loop that honours the running thread's :meth:`Backend.deadline`:
a gevent timeout cannot reach a blocking libpq call, so without it a stalled server would
hold a thread for ever.

Why the cooperative modes use no lock at all: under gevent and eventlet a greenlet only
switches when it blocks, and the pool's critical sections never block (no I/O, no logging,
no waiting inside them), so they are atomic by construction. A lock there would only add
cost. In ``threaded`` mode the same sections run under a real ``threading.Lock``.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any, Protocol

import psycopg2
from psycopg2 import extensions

from .cancel import cancel_job, run_cancel
from .errors import ConfigError


class Signal(Protocol):
    """A one-shot wake-up for one waiter."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None) -> bool: ...


class Waiter(Signal, Protocol):
    """A signal that also carries what its task is woken with: a connection or a slot
    (``item``), or an error. One object per waiting task: it is made on every wait."""

    item: Any
    error: BaseException | None
    #: set when the group's line times this waiter out (see :meth:`Backend.call_later`)
    deadline: float | None


class Task(Protocol):
    def kill(self) -> None: ...


class Backend:
    """What the pool needs from a concurrency model. Subclasses fill in the differences."""

    name = "?"
    #: True when other tasks can run while one waits (a wait can be satisfied by someone).
    can_wait = True
    #: True when :meth:`call_later` works (the green modes, which have an event loop).
    can_call_later = False

    def lock(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def rlock(self) -> AbstractContextManager[Any]:
        """A lock its holder may take again (an endpoint's methods call each other)."""
        return nullcontext()

    def waiter(self) -> Waiter:
        """A fresh one-shot waiter (``item`` and ``error`` None)."""
        raise NotImplementedError

    def deadline(self, seconds: float, error: BaseException) -> AbstractContextManager[Any]:
        """Raise ``error`` if the body is still blocked after ``seconds``.

        Needed because with a green wait callback libpq ignores ``connect_timeout``: only the
        event loop can interrupt a hung connect. The blocking modes' wait callback reads the
        thread's deadline instead: there it bounds the driver's waits only.
        """
        return nullcontext()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def call_later(self, seconds: float, func: Callable[[], None]) -> Callable[[], None] | None:
        """Run ``func`` in the event loop after ``seconds``; return what cancels it. None
        where the mode has no event loop: there each waiter times out on its own."""
        return None

    def spawn(self, func: Callable[[], None]) -> Task | None:
        """Start a background task, or return None where the mode has no background work."""
        return None

    #: Identity of the running task: a greenlet, or a thread id. A plain function, not a
    #: method: the handler asks on every block.
    current: Callable[[], Hashable] = staticmethod(threading.get_ident)

    def resolve(self, host: str, port: int) -> str | None:
        """An IP address for ``host`` without blocking the hub, or None to let libpq resolve."""
        return None

    def offload(self, func: Callable[[Any], Any], arg: Any) -> Any:
        """``func(arg)``, a C call that releases the GIL (a long text's parse), run where it
        does not block the hub. Inline here: threads run meanwhile anyway."""
        return func(arg)

    def patch_driver(self) -> None:
        """Make psycopg2 cooperate with this mode (idempotent)."""

    def poller(self, fd: int) -> Callable[[], object]:
        """A zero-timeout "does ``fd`` have something to say?" check, truthy when it has data
        or was hung up; never a switch. Made once per connection: a registered ``poll``
        object costs one syscall per check where ``select()`` also builds its fd sets."""
        poll_class = _original_select("poll")
        if poll_class is None:  # no poll() on this platform
            real_select = _original_select("select")
            return lambda: real_select([fd], [], [], 0)[0]
        poller = poll_class()
        poller.register(fd, _POLLIN)
        return partial(poller.poll, 0)


_POLLIN = getattr(select, "POLLIN", 1)  # monkey-patching replaces functions, not constants


def _original_select(name: str) -> Any:
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


def _original_start_thread() -> Callable[..., Any]:
    """The real ``_thread.start_new_thread``: an OS thread, whichever library patched it."""
    if "eventlet.patcher" in sys.modules:
        from eventlet import patcher

        return patcher.original("_thread").start_new_thread
    from gevent.monkey import get_original

    return get_original("_thread", "start_new_thread")


def _cancel_interrupted(conn: Any) -> None:
    """A wait on ``conn`` was interrupted: cancel its running statement, off the hub."""
    job = cancel_job(conn)
    if job is not None:
        try:
            run_cancel(job, _original_start_thread())
        except Exception:
            pass  # best effort: the interruption itself is what the caller must see


def _cancelling(wait: Callable[..., None]) -> Callable[[Any], None]:
    """``wait`` (psycogreen's callback) that cancels the statement it was waiting for when
    interrupted. It must happen here: once the callback has raised, psycopg2 closes the
    connection and the chance is gone. A try block costs nothing until something raises."""

    def cancelling_wait(conn: Any) -> None:
        try:
            wait(conn)
        except BaseException:
            _cancel_interrupted(conn)
            raise

    return cancelling_wait


try:
    from greenlet import GreenletExit as _TaskEnd
except ImportError:  # threaded-only installs: no greenlets to copy into a child
    _TaskEnd = BaseException


class InheritedAcrossFork(_TaskEnd):
    """Raised in a forked child into a connect the parent had in flight: the green task
    doing it was copied with the process. Its socket is the parent's (pointed at /dev/null
    in the child), so the copy gives up without reading a byte: the reply is the parent's.
    A ``GreenletExit``, so that the copied task ends quietly; nothing is to be accounted
    for in the child, which starts with no connects in flight."""


#: greenpool's connections that are being opened by a green wait callback right now
_connecting: weakref.WeakSet[Any] = weakref.WeakSet()
_STATUS_SETUP = extensions.STATUS_SETUP


def _silence_connects_in_child() -> None:
    """At fork, in the child: every connect in flight is the parent's (see
    :class:`InheritedAcrossFork`). Only syscalls: the child may be about to ``exec``."""
    for conn in list(_connecting):
        try:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.dup2(devnull, conn.fileno(), inheritable=False)
            finally:
                os.close(devnull)
        except (OSError, psycopg2.Error):
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_silence_connects_in_child)


@contextmanager
def still_connecting(conn: Any) -> Iterator[None]:
    """Treat ``conn`` as a connect in flight while the pool's first queries on it run (the
    role, lag and timeline measured at connect): a fork meanwhile points it at /dev/null in
    the child, so the child's copy of the task cannot touch the parent's session."""
    _connecting.add(conn)
    try:
        yield
    finally:
        _connecting.discard(conn)


def _gevent_wait_callback() -> Callable[[Any], None]:
    """psycopg2's non-blocking protocol, each wait a gevent I/O wait (what psycogreen does),
    in one frame with the cancel on interruption: this runs for every statement. A connect
    of greenpool's is tracked while it runs, so that a fork meeting it in flight cannot let
    the child's copy of the task read the parent's handshake."""
    from gevent.socket import wait_read, wait_write

    getpid = os.getpid

    def gevent_wait(conn: Any) -> None:
        if conn.status == _STATUS_SETUP and getattr(conn, "greenpool_owned", False):
            _connecting_wait(conn)
            return
        try:
            while True:
                state = conn.poll()
                if state == _POLL_OK:
                    return
                if state == _POLL_READ:
                    wait_read(conn.fileno())
                elif state == _POLL_WRITE:
                    wait_write(conn.fileno())
                else:
                    raise psycopg2.OperationalError(f"unexpected poll state {state!r}")
        except BaseException:
            _cancel_interrupted(conn)
            raise

    def _connecting_wait(conn: Any) -> None:
        pid = getpid()
        _connecting.add(conn)
        try:
            while True:
                if getpid() != pid:
                    raise InheritedAcrossFork("a connect of the parent process, in the child")
                state = conn.poll()
                if state == _POLL_OK:
                    return
                if state == _POLL_READ:
                    wait_read(conn.fileno())
                elif state == _POLL_WRITE:
                    wait_write(conn.fileno())
                else:
                    raise psycopg2.OperationalError(f"unexpected poll state {state!r}")
        finally:
            _connecting.discard(conn)

    return gevent_wait


class _Deadlines(threading.local):
    """The running thread's earliest driver deadline: ``(monotonic time, error)`` or None."""

    current: tuple[float, BaseException] | None = None


_deadlines = _Deadlines()
_POLL_OK = extensions.POLL_OK
_POLL_READ = extensions.POLL_READ
_POLL_WRITE = extensions.POLL_WRITE


def _blocking_wait_callback() -> Callable[[Any], None]:
    """The wait callback of the blocking modes: psycopg2 in its non-blocking protocol, waited
    for with ``poll()`` up to the thread's deadline. Past it, the running statement is
    cancelled and the deadline's error raised; psycopg2 then closes the connection, which
    the pool discards. Without a deadline it waits as long as a blocking call would."""
    poll_class = _original_select("poll")
    monotonic = time.monotonic
    pollin, pollout = _POLLIN, getattr(select, "POLLOUT", 4)

    def blocking_wait(conn: Any) -> None:
        try:
            deadline = _deadlines.current
            while True:
                state = conn.poll()
                if state == _POLL_OK:
                    return
                if state == _POLL_READ:
                    mask = pollin
                elif state == _POLL_WRITE:
                    mask = pollout
                else:
                    raise psycopg2.OperationalError(f"unexpected poll state {state!r}")
                if deadline is None:
                    timeout_ms = None
                else:
                    left = deadline[0] - monotonic()
                    if left <= 0:
                        raise deadline[1]
                    timeout_ms = int(left * 1000) + 1
                poller = poll_class()
                poller.register(conn.fileno(), mask)
                poller.poll(timeout_ms)
        except BaseException:
            _cancel_interrupted(conn)
            raise

    return blocking_wait


class _BlockingDeadline:
    """:meth:`Backend.deadline` of the blocking modes: read by :func:`blocking_wait`, so it
    bounds the driver's waits (connects, queries), not arbitrary code in the body."""

    __slots__ = ("_error", "_saved", "_seconds")

    def __init__(self, seconds: float, error: BaseException) -> None:
        self._seconds = seconds
        self._error = error
        self._saved: tuple[float, BaseException] | None = None

    def __enter__(self) -> None:
        saved = self._saved = _deadlines.current
        at = time.monotonic() + self._seconds
        if saved is None or at < saved[0]:  # a nested deadline never extends an outer one
            _deadlines.current = (at, self._error)

    def __exit__(self, *exc_info: object) -> None:
        _deadlines.current = self._saved


#: one callback object per kind, so re-installing is recognised (and idempotent)
_WAIT_CALLBACKS: dict[str, Callable[[Any], None]] = {}


def _install_wait_callback(
    kind: str, make: Callable[[], Callable[[Any], None]], *, only_if_none: bool = False
) -> None:
    callback = _WAIT_CALLBACKS.get(kind)
    if callback is None:
        callback = _WAIT_CALLBACKS.setdefault(kind, make())
    current = extensions.get_wait_callback()
    if current is callback or (only_if_none and current is not None):
        return
    extensions.set_wait_callback(callback)


def _is_address(host: str) -> bool:
    if host.startswith("/"):
        return True  # a Unix socket directory: nothing to resolve
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


class _ThreadTask:
    def __init__(self, func: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=func, name="greenpool-maintenance", daemon=True)
        self._thread.start()

    def kill(self) -> None:  # the loop exits on its own once the pool's stop signal is set
        pass


def _gevent_waiter_class(base: Any) -> type:
    """A waiter that *is* a gevent ``Waiter`` (a subclass of the compiled one), not an
    ``Event``: a waiting line needs only "wake this one greenlet", once, on the hot path of
    every hand-off under contention, and one object per wait is cheaper than three.
    ``item``/``error`` default on the class, so making one costs no dictionary.
    A wake-up that arrives after the waiter gave up (its timer fired, or it was killed) is
    only stored by gevent's ``Waiter``, never switched into.
    """

    class GeventWaiter(base):
        item: Any = None
        error: BaseException | None = None
        deadline: float | None = None

        def set(self) -> None:
            self.hub.loop.run_callback(self.switch, True)

        def wait(self, timeout: float | None) -> bool:
            if timeout is None:
                return bool(self.get())
            timer = self.hub.loop.timer(timeout)
            timer.start(self.switch, False)
            try:
                return bool(self.get())
            finally:
                timer.close()

    return GeventWaiter


class GeventBackend(Backend):
    name = "gevent"
    can_call_later = True

    def __init__(self) -> None:
        import gevent
        import gevent.hub
        import gevent.socket

        self._gevent = gevent
        self.current = gevent.getcurrent
        #: the class itself: with no argument its compiled constructor finds the hub
        self.waiter = _gevent_waiter_class(gevent.hub.Waiter)  # type: ignore[method-assign]
        self._getaddrinfo = gevent.socket.getaddrinfo

    def deadline(self, seconds: float, error: BaseException) -> AbstractContextManager[Any]:
        return self._gevent.Timeout(seconds, error)

    def call_later(self, seconds: float, func: Callable[[], None]) -> Callable[[], None]:
        timer = self._gevent.get_hub().loop.timer(seconds, ref=False)  # never keeps a hub alive
        timer.start(func)
        return timer.close

    def sleep(self, seconds: float) -> None:
        self._gevent.sleep(seconds)

    def spawn(self, func: Callable[[], None]) -> Task:
        return self._gevent.spawn(func)

    def resolve(self, host: str, port: int) -> str | None:
        if _is_address(host):
            return None
        infos = self._getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        return str(infos[0][4][0]) if infos else None

    def offload(self, func: Callable[[Any], Any], arg: Any) -> Any:
        return self._gevent.get_hub().threadpool.apply(func, (arg,))

    def patch_driver(self) -> None:
        _install_wait_callback("gevent", _gevent_wait_callback)


class _EventletWaiter:
    """eventlet's Event cannot time out cleanly; a zero semaphore can."""

    item: Any = None
    error: BaseException | None = None
    deadline: float | None = None

    def __init__(self, semaphore_class: Any) -> None:
        self._sem = semaphore_class(0)

    def set(self) -> None:
        self._sem.release()

    def wait(self, timeout: float | None) -> bool:
        return bool(self._sem.acquire(blocking=True, timeout=timeout))


class _EventletTask:
    def __init__(self, thread: Any) -> None:
        self._thread = thread

    def kill(self) -> None:
        self._thread.kill()


def _eventlet_getaddrinfo() -> Callable[..., Any]:
    """A ``getaddrinfo`` that never blocks eventlet's hub.

    eventlet's own green resolver (greendns: the hosts file, then DNS over green sockets;
    dnspython is one of eventlet's dependencies) when it is on, as it is unless
    ``EVENTLET_NO_GREENDNS=yes``. Then ``eventlet.green.socket.getaddrinfo`` is the blocking
    one, so the system resolver runs in eventlet's thread pool instead. That pool does not
    survive ``fork()`` (its threads are gone in the child, and a call would wait forever), so
    a child whose parent had started it resolves in place, blocking, but answering.
    """
    from eventlet.green import socket as green_socket
    from eventlet.support import greendns

    if green_socket.getaddrinfo is greendns.getaddrinfo:
        return green_socket.getaddrinfo
    from eventlet import patcher, tpool

    blocking = patcher.original("socket").getaddrinfo
    started_in: list[int] = []  # the process that started the thread pool through us

    def in_thread_pool(*args: Any) -> Any:
        pid = os.getpid()
        if not tpool._setup_already:
            started_in[:] = [pid]
        elif started_in and started_in[0] != pid:
            return blocking(*args)  # we started the pool before a fork: no threads here
        return tpool.execute(blocking, *args)

    return in_thread_pool


class EventletBackend(Backend):
    name = "eventlet"
    can_call_later = True

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eventlet warns about its own deprecation on import
            import eventlet
            import eventlet.hubs
            import eventlet.semaphore
        self._eventlet = eventlet
        self.current = eventlet.getcurrent
        self._semaphore = eventlet.semaphore.Semaphore
        self._getaddrinfo = _eventlet_getaddrinfo()

    def waiter(self) -> Waiter:
        return _EventletWaiter(self._semaphore)

    def deadline(self, seconds: float, error: BaseException) -> AbstractContextManager[Any]:
        return self._eventlet.Timeout(seconds, error)

    def call_later(self, seconds: float, func: Callable[[], None]) -> Callable[[], None]:
        return self._eventlet.hubs.get_hub().schedule_call_global(seconds, func).cancel

    def sleep(self, seconds: float) -> None:
        self._eventlet.sleep(seconds)

    def spawn(self, func: Callable[[], None]) -> Task:
        return _EventletTask(self._eventlet.spawn(func))

    def resolve(self, host: str, port: int) -> str | None:
        if _is_address(host):
            return None
        infos = self._getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        return str(infos[0][4][0]) if infos else None

    def patch_driver(self) -> None:
        from psycogreen.eventlet import eventlet_wait_callback

        _install_wait_callback("eventlet", lambda: _cancelling(eventlet_wait_callback))


class _ThreadWaiter(threading.Event):
    item: Any = None
    error: BaseException | None = None
    deadline: float | None = None


class ThreadedBackend(Backend):
    name = "threaded"

    def lock(self) -> AbstractContextManager[Any]:
        return threading.Lock()

    def rlock(self) -> AbstractContextManager[Any]:
        return threading.RLock()

    def waiter(self) -> Waiter:
        return _ThreadWaiter()

    def spawn(self, func: Callable[[], None]) -> Task:
        return _ThreadTask(func)

    def deadline(self, seconds: float, error: BaseException) -> AbstractContextManager[Any]:
        return _BlockingDeadline(seconds, error)

    def patch_driver(self) -> None:
        # Not over a green callback someone installed (a threaded pool in a gevent process):
        # replacing it would block that process's hub.
        _install_wait_callback("blocking", _blocking_wait_callback, only_if_none=True)


class _NeverWaiter:
    """With a single thread and no greenlets nobody else can hand a connection back."""

    item: Any = None
    error: BaseException | None = None
    deadline: float | None = None

    def set(self) -> None:
        pass

    def wait(self, timeout: float | None) -> bool:
        return False


class SingleBackend(Backend):
    """``non-threaded``: one caller at a time, no background work, no locking."""

    name = "non-threaded"
    can_wait = False

    def waiter(self) -> Waiter:
        return _NeverWaiter()

    deadline = ThreadedBackend.deadline
    patch_driver = ThreadedBackend.patch_driver


_BACKENDS: dict[str, Callable[[], Backend]] = {
    "gevent": GeventBackend,
    "eventlet": EventletBackend,
    "threaded": ThreadedBackend,
    "non-threaded": SingleBackend,
}


def backend_for(mode: str) -> Backend:
    """The backend of ``mode``, with psycopg2 patched for it."""
    try:
        factory = _BACKENDS[mode]
    except KeyError:
        raise ConfigError(f"type: expected one of {', '.join(_BACKENDS)}; got {mode!r}") from None
    try:
        backend = factory()
    except ImportError as exc:
        raise ConfigError(
            f"type: mode {mode!r} needs a package that is not installed ({exc.name}); "
            f"install it (pip install 'greenpool[{mode}]') or pick another mode"
        ) from exc
    backend.patch_driver()
    return backend


# --- does the mode fit the process? -------------------------------------------------------

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
