"""One pooled psycopg2 connection: how it is opened (its arguments, the deadline around the
connect, the pooler and password cases), bounded round trips, ping and close. What it goes
through when it is lent and given back is in borrow_return.py.

The rules come from measured driver behaviour, each kept by a test:

* Under a green wait callback libpq ignores ``connect_timeout``, so every connect runs under
  a deadline of our own.
* Anything whose state is unknown (interrupted mid-query, mid-rollback) is discarded.
* Every round trip the pool makes is bounded (:func:`round_trip`).
* libpq's own ``connect_timeout`` (blocking modes) counts whole seconds, at least 2
  (:func:`libpq_connect_timeout`); a connect under way longer than :data:`STUCK_AFTER` may
  be stuck on a server that never answers.

Why one module of this length: the ways to open a connection (direct, behind a pooler,
with a password asked for at connect) share the connect deadline, the secret scrubbing and
the error wording (:class:`ConnectError`), and the round trips on an open connection share
their deadline with the connect's first query (:func:`behind_pooler`, :func:`bounded`).
"""

from __future__ import annotations

import logging
import os
import re
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2
import psycopg2.extras
from psycopg2 import extensions

from . import credentials, pooler
from .concurrency.backend import Backend
from .concurrency.fork import InheritedAcrossFork, forks, still_connecting
from .config import EndpointConfig, GroupConfig
from .cursors import TrackingConnection, own_cursor
from .endpoint import HOOK_FAILED_FOR_NOW, HOOK_NO_ANSWER, Endpoint
from .failures import Verdict, classify, no_answer, unresolvable
from .slots import Slot
from .statement_failures import failure_kind, passing

logger = logging.getLogger("greenpool")

T = TypeVar("T")

#: seconds after which a connect under way may be stuck on a server that never answers (a
#: black hole holds it for ``connect_timeout``): it no longer counts as serving a waiter, so
#: the group (and the dedicated connect tasks) may start another, trying that server last
STUCK_AFTER = 0.25

_STATUS_IDLE = extensions.TRANSACTION_STATUS_IDLE
_PSYCOPG_READY = extensions.STATUS_READY
_STATUS_OPEN = (extensions.TRANSACTION_STATUS_INTRANS, extensions.TRANSACTION_STATUS_INERROR)

_ROW_FACTORIES: dict[str, Any] = {
    "tuple": None,
    "dict": psycopg2.extras.RealDictCursor,
    "namedtuple": psycopg2.extras.NamedTupleCursor,
}

class ConnectError(Exception):
    """A connect attempt to one endpoint failed. ``fatal``: retrying cannot help.

    ``reason`` is the server's (or our) words, with the endpoint's secrets scrubbed out;
    ``kind`` and ``hint`` come from :mod:`greenpool.failures`: what happened, what to do.
    """

    def __init__(
        self,
        endpoint: EndpointConfig,
        message: str,
        *,
        fatal: bool = False,
        kind: str = "unknown",
        hint: str = "",
    ) -> None:
        super().__init__(f"{endpoint.label}: {message}" + (f" ({hint})" if hint else ""))
        self.label = endpoint.label
        self.reason = message
        self.fatal = fatal
        self.kind = kind
        self.hint = hint

    @classmethod
    def judged(cls, endpoint: EndpointConfig, message: str, verdict: Verdict) -> ConnectError:
        return cls(endpoint, message, fatal=verdict.fatal, kind=verdict.kind, hint=verdict.hint)


def _scrubbed(message: str, endpoint: EndpointConfig, supplied: str | None = None) -> str:
    """A driver message on one line, without any secret of the endpoint in it (nor the
    password its function ``supplied`` for this attempt)."""
    text = " ".join(message.split())
    for secret in (*endpoint.secrets(), *([supplied] if supplied else [])):
        text = text.replace(secret, "***")
    return text


class _Deadline(Exception):
    """Raised into a task whose driver call outlived its deadline. Private: never escapes."""


class RoundTripTimeout(psycopg2.OperationalError):
    """A round trip the pool made got no answer within its bound. psycopg2 has closed the
    connection by then (unless nothing was sent: no time was left): discard it."""


class PooledConnection:
    """A raw psycopg2 connection plus the bookkeeping the pool needs about it."""

    __slots__ = (
        "__weakref__", "created", "dirty", "endpoint", "expires", "generation", "last_used",
        "lent_at", "lent_from", "lent_ref", "open_ref", "raw", "readable", "resets", "role",
        "slot",
    )

    def __init__(
        self, raw: Any, endpoint: Endpoint, expires: float, generation: int, backend: Backend
    ) -> None:
        now = time.monotonic()
        self.raw = raw
        #: zero-timeout poll of the socket: truthy when the server sent something or hung up
        self.readable = backend.poller(raw.fileno())
        self.endpoint = endpoint
        self.created = now
        self.last_used = now
        self.expires = expires
        self.generation = generation
        self.role = "unknown"  # as this connection's server last reported it
        self.lent_at = 0.0  # set only when leak detection or timings are on
        self.lent_from: str | None = None  # "file:line in function" of the code that took it
        #: the loan may have changed the session: reset it on return. True unless a handler
        #: (which sees every statement) clears it when it takes the connection: a hand-made
        #: loan (``group.acquire()``) can do anything with ``raw``.
        self.dirty = True
        #: how many times ``DISCARD ALL`` wiped this session: what was set up on it before
        #: (SQLAlchemy's ``connect`` listeners) must run again
        self.resets = 0
        #: the group slot this connection holds (None: a dedicated connection, outside the
        #: group's room); given back when the group discards it, or when it is collected
        self.slot: Slot | None = None
        #: this connection, weakly, as its group's lent set holds it (made at its first loan)
        self.lent_ref: weakref.ref[PooledConnection] | None = None
        #: this connection, weakly, as its endpoint's open set holds it until it is closed
        #: (see Endpoint.connections); entered last: made and counted in one step
        self.open_ref = ref = weakref.ref(self, endpoint.connections.discard)
        endpoint.connections.add(ref)
        if isinstance(raw, TrackingConnection):
            raw.greenpool_pc = ref  # its cursors mark this record dirty

    def __repr__(self) -> str:
        state = "closed" if self.raw.closed else "open"
        return f"<PooledConnection {self.endpoint.label} {state}>"


def _escape_option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def statement_timeout_ms(endpoint: EndpointConfig, group: GroupConfig) -> int | None:
    """The ``statement_timeout`` a connection of ``group`` to ``endpoint`` runs with, in ms
    (the group's, else the endpoint's; None: the server's own)."""
    seconds = group.statement_timeout
    if seconds is None:
        seconds = endpoint.statement_timeout
    # round, not truncate: 1.001 s is 1000.9999999999999 ms in floating point
    return None if seconds is None else round(seconds * 1000)


def connect_kwargs(
    endpoint: EndpointConfig, group: GroupConfig, application_name: str
) -> dict[str, Any]:
    """The psycopg2.connect arguments for a connection of ``group`` to ``endpoint``.

    Session settings travel in the startup packet (``options``): no extra round trip.
    :func:`open_connection` takes them out again for an endpoint behind a pooler (see
    :mod:`greenpool.pooler`), where they travel with each transaction instead.
    """
    settings: list[str] = []
    timeout_ms = statement_timeout_ms(endpoint, group)
    if timeout_ms is not None:
        settings.append(f"statement_timeout={timeout_ms}")
    if endpoint.temp_buffers_mb is not None:
        settings.append(f"temp_buffers={endpoint.temp_buffers_mb}MB")
    if group.readonly:
        settings.append("default_transaction_read_only=on")

    kwargs: dict[str, Any] = {
        "host": endpoint.host,
        "port": endpoint.port,
        "dbname": endpoint.dbname,
        "application_name": application_name,
        **endpoint.keepalives,
        **endpoint.options,
    }
    if endpoint.user is not None:
        kwargs["user"] = endpoint.user
    if isinstance(endpoint.password, str):  # a function is asked at each connect
        kwargs["password"] = endpoint.password
    if endpoint.sslmode is not None:
        kwargs["sslmode"] = endpoint.sslmode
    if settings:
        ours = " ".join(f"-c {_escape_option(s)}" for s in settings)
        kwargs["options"] = f"{kwargs['options']} {ours}" if "options" in kwargs else ours
    factory = _ROW_FACTORIES[group.row_factory]
    if factory is not None:
        kwargs["cursor_factory"] = factory
    return kwargs


_SECRET_IN_DSN = re.compile(r"\b(sslpassword|password)=('(?:[^'\\]|\\.)*'|\S+)")


class _Connection(TrackingConnection, extensions.connection):
    """psycopg2's connection, with the ``sslpassword`` hidden from ``dsn`` and ``repr``
    too (psycopg2 itself hides only ``password``), whose cursors tell the loan what they
    did (:mod:`greenpool.cursors`)."""

    #: tells the green wait callback that this connect is greenpool's (see
    #: ``concurrency.fork.InheritedAcrossFork``): a user's own connections are left alone
    greenpool_owned = True

    @property
    def dsn(self) -> str:
        return _SECRET_IN_DSN.sub(r"\1=xxx", super().dsn)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<greenpool connection object at {id(self):#x}; dsn: '{self.dsn}', {state}>"

    __str__ = __repr__


class _PoolerConnection(pooler.ThroughPooler, _Connection):
    """A connection to an endpoint behind a pooler: the group's settings go with each
    transaction, and the pooler's cached ``in_hot_standby`` is not trusted."""


def is_pooled(raw: Any) -> bool:
    """Whether ``raw`` talks to a pooler (its role must be asked by query)."""
    return isinstance(raw, _PoolerConnection)


def _without_our_options(endpoint: EndpointConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    kwargs.pop("options", None)
    if "options" in endpoint.options:
        kwargs["options"] = endpoint.options["options"]  # the user's own: let the pooler judge
    return kwargs


def open_connection(
    endpoint: EndpointConfig,
    group: GroupConfig,
    kwargs: dict[str, Any],
    backend: Backend,
    seconds: float,
) -> Any:
    """Open one raw connection within ``seconds``, or raise :class:`ConnectError`.

    Behind a pooler (the endpoint's ``pooler`` key, or detected: see
    :mod:`greenpool.pooler`) the group's settings leave the startup packet and travel with
    each transaction.
    """
    started = time.monotonic()
    asked = 0.0  # seconds the password function took of the attempt's time
    if credentials.is_supplied(endpoint.password):
        kwargs = _with_supplied_password(endpoint, kwargs, backend, seconds)
        asked = time.monotonic() - started
        seconds, started = max(seconds - asked, 0.001), time.monotonic()
    through_pooler = pooler.mode_of(endpoint) != pooler.NONE
    refused: ConnectError | None = None
    try:
        raw = _open(endpoint, kwargs, backend, seconds, through_pooler)
    except ConnectError as exc:
        if asked > seconds and exc.kind == no_answer().kind:
            # the server had less time than the function: its silence says nothing of it
            raise ConnectError(endpoint, f"{exc.reason}, after the password function took "
                               f"{asked:.2f} s of the attempt's time", kind=credentials.KIND,
                               hint="make the password function faster (cache its result) "
                               "or raise connect_timeout") from None
        if through_pooler or exc.kind != "pooler_startup_parameter" or not (
            pooler.may_detect(endpoint)
        ):
            raise
        refused = exc
    else:
        if not through_pooler and group.readonly and pooler.may_detect(endpoint) and (
            pooler.dropped_options(raw)
        ):
            close_raw(raw)
            pooler.detected(endpoint, "dropped")
            refused = ConnectError(endpoint, "a pooler dropped the `options` startup parameter")
    if refused is not None:  # a pooler: once more, without ``options`` (outside the except)
        pooler.detected(endpoint)
        through_pooler = True
        left = seconds - (time.monotonic() - started)
        if not left > 0:
            raise refused
        raw = _open(endpoint, kwargs, backend, left, through_pooler)
    if through_pooler and pooler.nonstandard_strings(raw):
        close_raw(raw)
        raise ConnectError(endpoint, pooler.NONSTANDARD_STRINGS, fatal=True,
                           kind="nonstandard_strings")
    if through_pooler:
        timeout_ms = statement_timeout_ms(endpoint, group)
        server = None
        if (timeout_ms is not None or group.readonly) and pooler.trusts_server_defaults(
                endpoint, group.reset):  # what the server already enforces
            left = max(seconds - (time.monotonic() - started), 0.001)
            server = behind_pooler(endpoint, raw, bounded, backend, left,
                                   "the server defaults query", pooler.read_server_defaults, raw)
        raw.greenpool_prefix = pooler.settings_prefix(timeout_ms, group.readonly, server)
        raw.greenpool_offload = backend.offload
    raw.autocommit = group.autocommit
    if group.configure is not None:
        left = max(seconds - (time.monotonic() - started), 0.001)
        began = forks[0]
        try:
            with still_connecting(raw):  # a fork meanwhile: the child's copy reads nothing
                configure(raw, group, backend, left)
        except Exception as exc:
            if forks[0] != began:  # the parent's connect, copied into a forked child
                raise InheritedAcrossFork("a connect of the parent process, in the child"
                                          ) from None
            # past its bound the wait callback has cancelled and closed: not "lost"
            timed_out = isinstance(exc, RoundTripTimeout)
            lost = not timed_out and failure_kind(exc, raw) == "lost"
            close_raw(raw)
            if lost:  # the connection or its server went away under the hook (a crash,
                # a terminated session): a connect failure like any other,
                # retried and judged by the server's health, not a refusal of the group
                raise ConnectError(endpoint, f"the connection was lost while the group's "
                                             f"configure hook ran ({type(exc).__name__})",
                                   kind="network") from None
            if timed_out or passing(exc):
                # the server answered the connect: a hook that waited on a lock, met a
                # deadlock or ran out of time fails this group's attempt, not the server
                # (other groups use it as before); the group tries again after a backoff.
                # Past its bound, the caller's time may be what cut it (the connector tells).
                if timed_out:
                    what, kind = f"got no answer within {left:.2f} s", HOOK_NO_ANSWER
                else:
                    code = getattr(exc, "pgcode", None)
                    what = f"failed ({type(exc).__name__}, SQLSTATE {code})"
                    kind = HOOK_FAILED_FOR_NOW
                raise ConnectError(endpoint, f"group {group.name!r}'s configure hook {what}",
                                   kind=kind, hint="tried again after a backoff") from None
            logger.warning("group %r: the configure hook failed on a new connection to %s",
                           group.name, endpoint.label, exc_info=True)
            # the server answered: its health is not in question (fatal: not quarantined)
            raise ConnectError(endpoint, f"group {group.name!r}'s configure hook failed "
                                         f"({type(exc).__name__})", fatal=True, kind="configure",
                               hint="see the warning logged with its traceback") from None
        except BaseException:  # a kill, the pool's close: else the traceback holds the
            # session open until a garbage collection (a forked child's copy of the task
            # leaves the parent's socket alone)
            if forks[0] == began:
                close_raw(raw)
            raise
    return raw


def _with_supplied_password(endpoint: EndpointConfig, kwargs: dict[str, Any], backend: Backend,
                            seconds: float) -> dict[str, Any]:
    """``kwargs`` with the password the endpoint's function gives now (ConnectError if it
    gives none in time: no verdict on the server, see :mod:`greenpool.credentials`)."""
    problem = None
    try:
        password = credentials.password_now(endpoint.password,  # type: ignore[arg-type]
                                            endpoint.label, backend, seconds)
    except credentials.PasswordUnavailable as exc:
        problem = str(exc)
    if problem is not None:
        raise ConnectError(endpoint, problem, kind=credentials.KIND,
                           hint="the connect is tried again, asking the function again")
    kwargs = dict(kwargs)
    kwargs.pop("password", None)
    if password is not None:
        kwargs["password"] = password
    return kwargs


def configure(raw: Any, group: GroupConfig, backend: Backend, seconds: float) -> None:
    """The group's ``configure`` hook on ``raw`` (opened, or reset), within ``seconds``. A
    transaction it leaves open is committed (a ``SET`` it made would be lost otherwise)."""
    hook = group.configure
    if hook is None:
        return
    started = time.monotonic()
    try:
        bounded(backend, seconds, "the configure hook", hook, raw)
    except RoundTripTimeout:
        raise
    except Exception:
        _raise_if_cut(raw, started, seconds)
        raise
    _raise_if_cut(raw, started, seconds)
    status = raw.get_transaction_status()
    if status == extensions.TRANSACTION_STATUS_INTRANS:  # within what the hook left
        left = max(seconds - (time.monotonic() - started), 0.001)
        bounded(backend, left, "the configure hook's COMMIT", raw.commit)
    elif status != _STATUS_IDLE:
        raise psycopg2.InterfaceError("the configure hook left the connection in a failed "
                                      "transaction")


def _raise_if_cut(raw: Any, started: float, seconds: float) -> None:
    """The hook (begun at ``started``) ended past its bound on a closed connection: the
    bound cut one of its statements (the wait callback closed the connection) and the hook
    went on, having caught the interruption (a best-effort hook that logs its errors). That
    is no answer in time, as if it had let the interruption through: not a lost connection,
    which would count against the server."""
    if raw.closed and time.monotonic() - started >= seconds:
        raise RoundTripTimeout(f"no answer to the configure hook within {seconds:.2f} s")


def _open(
    endpoint: EndpointConfig,
    kwargs: dict[str, Any],
    backend: Backend,
    seconds: float,
    through_pooler: bool,
) -> Any:
    kwargs = _without_our_options(endpoint, kwargs) if through_pooler else dict(kwargs)
    factory = _PoolerConnection if through_pooler else _Connection
    # Blocking modes: libpq's own timeout works there
    kwargs["connect_timeout"] = libpq_connect_timeout(seconds)
    deadline = _Deadline()
    # Each failure is raised after its ``except`` block, so the driver's exception is not even
    # the ``__context__`` of ours: its message may echo a conninfo value.
    failure: ConnectError | None = None
    try:
        with backend.deadline(seconds, deadline):
            hostaddr = backend.resolve(endpoint.host, endpoint.port)
            if hostaddr is not None:
                kwargs["hostaddr"] = hostaddr
            raw = psycopg2.connect(connection_factory=factory, **kwargs)
    except _Deadline as exc:
        if exc is not deadline:
            raise
        failure = ConnectError.judged(endpoint, f"no answer within {seconds:.2f} s", no_answer())
    except psycopg2.Error as exc:
        supplied = kwargs.get("password") if credentials.is_supplied(endpoint.password) else None
        message = _scrubbed(str(exc), endpoint, supplied)
        verdict = classify(message)
        if supplied is not None and verdict.kind == "authentication":
            # a rotation in progress: the function may give the new password next time
            verdict = Verdict(False, credentials.KIND, "the password the function gave was "
                              "refused; it is asked again at the next attempt")
        failure = ConnectError.judged(endpoint, message, verdict)
    except OSError as exc:  # name resolution failed
        message = _scrubbed(f"cannot resolve host: {exc}", endpoint)
        failure = ConnectError.judged(endpoint, message, unresolvable())
    if failure is not None:
        raise failure
    return raw


def round_trip(
    raw: Any, sql: str, backend: Backend, seconds: float, params: Any = None
) -> list[Any] | None:
    """Run ``sql`` on ``raw`` within ``seconds``: its rows, or None when it returns none.

    For every query the pool makes itself. Past the bound it raises
    :class:`RoundTripTimeout` (the statement is cancelled on the server by the wait
    callback, and psycopg2 has closed the connection); with no time left it sends nothing.
    """
    if not seconds > 0:  # also NaN
        raise RoundTripTimeout(f"no time left for {sql!r}")
    deadline = _Deadline()
    try:
        with backend.deadline(seconds, deadline), own_cursor(raw) as cursor:
            cursor.execute(sql, params)
            return None if cursor.description is None else cursor.fetchall()
    except _Deadline as exc:
        if exc is not deadline:
            raise
        raise RoundTripTimeout(f"no answer to {sql!r} within {seconds:.2f} s") from None


def bounded(backend: Backend, seconds: float, what: str, func: Callable[..., Any],
             *args: Any) -> Any:
    """``func(*args)`` (driver calls inside) within ``seconds``, else RoundTripTimeout."""
    deadline = _Deadline()
    try:
        with backend.deadline(seconds, deadline):
            return func(*args)
    except _Deadline as exc:
        if exc is not deadline:
            raise
        raise RoundTripTimeout(f"no answer to {what} within {seconds:.2f} s") from None


def outside_transaction(raw: Any, sql: str, backend: Backend, seconds: float) -> None:
    """Run ``sql`` in autocommit: a ping must not open a transaction, and ``DISCARD ALL``
    refuses to run in one (which psycopg2 would open without autocommit)."""
    if raw.autocommit:
        round_trip(raw, sql, backend, seconds)
        return
    raw.autocommit = True
    try:
        round_trip(raw, sql, backend, seconds)
    finally:
        if not raw.closed:
            raw.autocommit = False


def close_quietly(pc: PooledConnection) -> None:
    """Close without raising: the connection is being thrown away anyway. The one way a
    PooledConnection is closed: it leaves its endpoint's open set here (closed first: an
    interruption between leaves it counted until it is collected, never an open one
    uncounted)."""
    close_raw(pc.raw)
    pc.endpoint.connections.discard(pc.open_ref)


def close_raw(raw: Any) -> None:
    """Close a raw connection without raising."""
    try:
        raw.close()
    except Exception:
        pass


def libpq_connect_timeout(seconds: float) -> int:
    """libpq's own ``connect_timeout`` for a connect bounded by ``seconds``: whole seconds,
    at least 2 (libpq waits 2 s when told 1), so also the longest a blocking connect told
    ``seconds`` may take."""
    return max(2, int(seconds + 0.999))


def behind_pooler(endpoint: EndpointConfig, raw: Any, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)``: a first query through a pooler on the fresh ``raw``. Its failure is
    judged like a failed connect (:func:`failed_behind_pooler`); on any way out but a
    return, ``raw`` is closed. It runs as a connect in flight: a fork meanwhile leaves it to
    the parent (the child's copy of the task reads nothing, and ends as
    :class:`InheritedAcrossFork`)."""
    began = forks[0]
    try:
        with still_connecting(raw):
            return call(*args)
    except Exception as exc:
        if forks[0] != began:
            raise InheritedAcrossFork("a connect of the parent process, in the child"
                                      ) from None
        close_raw(raw)
        raise failed_behind_pooler(endpoint, exc) from None
    except BaseException:
        if forks[0] == began:
            close_raw(raw)
        raise


def failed_behind_pooler(endpoint: EndpointConfig, exc: BaseException) -> ConnectError:
    """The pooler let us in but its first query failed: judged like a failed connect to
    the server behind it (``server login has been failing``, ``query_wait_timeout``, ...)."""
    message = _scrubbed(str(exc), endpoint) or "the pooler closed the connection"
    return ConnectError.judged(endpoint, f"through the pooler: {message}", classify(message))


def silence_inherited(pc: PooledConnection) -> None:
    """Point a connection inherited from the parent process at /dev/null.

    Runs in the child right after ``fork()``. The socket is shared with the parent: any
    byte the child sends (a query, or the Terminate message a close sends) would land in
    the parent's session. After ``dup2`` the descriptor is /dev/null: the child can neither
    read from nor write into the parent's session, and a later close is harmless. Only
    syscalls here, no locks: the child may be about to ``exec``.
    """
    raw = pc.raw
    if raw.closed:
        return
    try:
        fd = raw.fileno()
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.dup2(devnull, fd, inheritable=False)
        finally:
            os.close(devnull)
    except (OSError, psycopg2.Error):
        pass


def ping(pc: PooledConnection, backend: Backend, seconds: float) -> str:
    """One bounded ``SELECT 1`` on an idle connection (housekeeping keeps ``min_size``
    connections usable with it); '' if it answered, else the reason to discard it."""
    raw = pc.raw
    if raw.closed:
        return "closed"
    try:
        outside_transaction(raw, "SELECT 1", backend, seconds)
    except psycopg2.Error:
        return "failed_check"
    del raw.notifies[:]
    pc.last_used = time.monotonic()
    return ""
