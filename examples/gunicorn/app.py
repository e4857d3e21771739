"""A small notes service on greenpool, for gunicorn's gevent worker (see README.md here).

Configuration comes from one environment variable, ``GREENPOOL_CONFIG``: a JSON object in
greenpool's (pgdbpool's) format. It is parsed and validated when this module is imported,
so a bad configuration stops gunicorn at boot, but nothing is opened then: the pool is
created per worker, after gevent has monkey-patched (``open_pool()``, called by
gunicorn.conf.py's ``post_worker_init``, or lazily by the first request).

Endpoints (JSON in, JSON out):

    POST /notes          {"body": "..."}  -> 201 {"id", "body", "created"}      (write group)
    GET  /notes/<id>                      -> 200 the note, or 404                (read group)
    GET  /notes?limit=N                   -> 200 {"count", "latest": [...]}      (read group)
    GET  /health                          -> 200 {"read": "ok", "write": "ok"}   (both)
    GET  /stats                           -> 200 {"pid", "groups", "endpoints"}  (no query;
                                             endpoints without last_error: see README.md)
    GET  /events                          -> 200 text/event-stream: the ids of new notes
                                             as server-sent events, fed by NOTIFY (write)

When the database cannot serve, the answer is ``503`` with ``Retry-After`` and a JSON body
``{"error": <what>, "detail": <message>}``: ``error`` is the greenpool exception's name
(``PoolTimeout``, ``NoHealthyEndpoint``, ``TooManyWaiters``, ``PoolClosed``,
``ConnectFailed``, ``CommitOutcomeUnknown``) or ``DatabaseUnavailable`` for a server lost
mid-query. A malformed request (not JSON, nested too deeply, a note with NUL or a lone
surrogate, a bad Content-Length) is a ``400`` (``413`` if too large) with the same body.
Anything else is a bug: ``500`` with a JSON body, traceback in gunicorn's log.

``python app.py schema`` creates the table through the ``write`` group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs

import psycopg2

import greenpool

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id      bigserial PRIMARY KEY,
    body    text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
)"""

# Used when GREENPOOL_CONFIG has no "groups". Each gunicorn worker has its own pool, so the
# server sees up to workers * (5 + 10 + 1) connections from this app: the groups' own, and
# one dedicated connection per worker that every /events stream of the worker shares.
DEFAULT_GROUPS = {
    "write": {"connection_count": 5, "exclusive_limit": 1, "timeout": 5},
    "read": {"connection_count": 10, "autocommit": True, "timeout": 5},
}
DEFAULT_APPLICATION_NAME = "greenpool-gunicorn-example"
HEALTH_TIMEOUT = 2.0  # seconds per group for /health, whatever the groups' own timeouts
MAX_BODY = 64 * 1024  # bytes of request body
MAX_NOTE = 1000  # characters of a note


def load_config(environ: Mapping[str, str] = os.environ) -> greenpool.PoolConfig:
    """Parse and check ``GREENPOOL_CONFIG``; pure (opens nothing), so safe in the master."""
    raw = environ.get("GREENPOOL_CONFIG")
    if not raw:
        raise RuntimeError(
            "GREENPOOL_CONFIG is not set: give a JSON pool configuration, e.g. "
            """'{"db": "postgresql://app@127.0.0.1/app"}'"""
        )
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise RuntimeError(f"GREENPOOL_CONFIG is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise RuntimeError("GREENPOOL_CONFIG must be a JSON object")
    config.setdefault("groups", DEFAULT_GROUPS)
    config.setdefault("application_name", DEFAULT_APPLICATION_NAME)
    parsed = greenpool.parse_config(config)  # ConfigError names the bad key
    missing = sorted({"read", "write"} - set(parsed.groups))
    if missing:
        raise RuntimeError(f"GREENPOOL_CONFIG: groups {missing} are missing (need read, write)")
    for name in ("read", "write"):
        if parsed.groups[name].row_factory != "tuple":
            raise RuntimeError(f"GREENPOOL_CONFIG: groups.{name}.row_factory must be 'tuple'")
    return parsed


CONFIG = load_config()

# --- the pool's life cycle: one pool per worker process -----------------------------------

_closed_in_pid: int | None = None  # the process whose pool close_pool() closed


def open_pool() -> greenpool.Pool:
    """This process's pool, created on first call.

    Call it only where gevent has already monkey-patched: in a gunicorn gevent worker that
    is ``post_worker_init`` or any request, never ``post_fork`` and never the master.
    """
    try:
        return greenpool.get_pool()
    except greenpool.PoolError:
        pass
    if _closed_in_pid == os.getpid():  # a request that outlived worker_exit: do not reopen
        raise greenpool.PoolClosed("this worker is shutting down")
    if CONFIG.mode == "gevent":
        from gevent import monkey

        if not monkey.is_module_patched("socket"):
            raise RuntimeError("open_pool() before gevent monkey-patching: in gunicorn use "
                               "-k gevent and open in post_worker_init, never in the master "
                               "or post_fork")
    return greenpool.init(CONFIG, exist_ok=True)  # racing first requests share one pool


def close_pool() -> None:
    """Close this process's pool (idempotent); later requests answer 503 PoolClosed."""
    global _closed_in_pid
    _closed_in_pid = os.getpid()
    greenpool.close()


# --- HTTP plumbing --------------------------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status: str, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def read_json(environ: dict[str, Any]) -> Any:
    """The request body as JSON; every malformed body is a 4xx, never an exception."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HTTPError("400 Bad Request", "BadRequest", "bad Content-Length") from None
    if length < 0:  # read(-1) would read to the end, whatever its size
        raise HTTPError("400 Bad Request", "BadRequest", "bad Content-Length")
    if length > MAX_BODY:
        raise HTTPError("413 Content Too Large", "BadRequest", f"body over {MAX_BODY} bytes")
    try:
        return json.loads(environ["wsgi.input"].read(length) or b"null")
    except RecursionError:  # "[[[[..." within MAX_BODY: Python's parser recurses
        raise HTTPError("400 Bad Request", "BadRequest", "the body is nested too deeply"
                        ) from None
    except ValueError:  # not JSON, not UTF-8, or an integer with too many digits
        raise HTTPError("400 Bad Request", "BadRequest", "the body is not JSON") from None


def storable_text(value: str) -> str | None:
    """Why PostgreSQL cannot store ``value`` as text, or None: NUL is not allowed in a text
    value, and a lone surrogate (JSON's ``"\\ud800"``) is not encodable as UTF-8."""
    if "\x00" in value:
        return "must not contain NUL (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogate such as \\ud800)"
    return None


def note(row: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": row[0], "body": row[1], "created": row[2].isoformat()}


# --- endpoints ------------------------------------------------------------------------------


def create_note(environ: dict[str, Any]) -> tuple[str, Any]:
    payload = read_json(environ)
    body = payload.get("body") if isinstance(payload, dict) else None
    if not isinstance(body, str) or not 0 < len(body) <= MAX_NOTE:
        raise HTTPError("400 Bad Request", "BadRequest",
                        f'expected {{"body": "<1 to {MAX_NOTE} characters>"}}')
    problem = storable_text(body)
    if problem is not None:
        raise HTTPError("400 Bad Request", "BadRequest", f"body {problem}")
    with greenpool.handler("write") as db:  # commits on a clean exit, rolls back otherwise
        row = db.query_one("INSERT INTO notes (body) VALUES (%s) RETURNING id, body, created",
                           (body,))
        # sent at commit, and only if the note is committed: /events streams it
        db.query_one("SELECT pg_notify(%s, %s)", (NOTES_CHANNEL, str(row[0])))
    return "201 Created", note(row)


def get_note(environ: dict[str, Any], note_id: str) -> tuple[str, Any]:
    with greenpool.handler("read") as db:
        row = db.query_one("SELECT id, body, created FROM notes WHERE id = %s", (int(note_id),))
    if row is None:
        raise HTTPError("404 Not Found", "NotFound", f"no note {note_id}")
    return "200 OK", note(row)


def list_notes(environ: dict[str, Any]) -> tuple[str, Any]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    try:
        limit = min(100, max(0, int(query.get("limit", ["10"])[0])))
    except ValueError:
        raise HTTPError("400 Bad Request", "BadRequest", "limit must be a number") from None
    with greenpool.handler("read") as db:
        (count,) = db.query_one("SELECT count(*) FROM notes")
        rows = db.query("SELECT id, body, created FROM notes ORDER BY id DESC LIMIT %s",
                        (limit,))
    return "200 OK", {"count": count, "latest": [note(r) for r in rows]}


def health(environ: dict[str, Any]) -> tuple[str, Any]:
    for group in ("read", "write"):
        with greenpool.handler(group, timeout=HEALTH_TIMEOUT) as db:
            db.query_one("SELECT 1")
    return "200 OK", {"read": "ok", "write": "ok"}


# Endpoint fields /stats leaves out: last_error quotes the server and the driver (host
# names, user names, authentication failures), which is for operators, not for any client.
PRIVATE_ENDPOINT_FIELDS = frozenset({"last_error"})


def public_stats() -> dict[str, Any]:
    """greenpool.stats() without what a public route must not show (see README.md here)."""
    stats = greenpool.stats()
    stats["endpoints"] = {
        label: {k: v for k, v in values.items() if k not in PRIVATE_ENDPOINT_FIELDS}
        for label, values in stats["endpoints"].items()
    }
    return stats


def stats(environ: dict[str, Any]) -> tuple[str, Any]:
    return "200 OK", {"pid": os.getpid(), **public_stats()}


def index(environ: dict[str, Any]) -> tuple[str, Any]:
    return "200 OK", {"endpoints": [f"{m} {p}" for m, p, _ in ROUTES] + ["GET /events"]}


# --- GET /events: server-sent events fed by NOTIFY -----------------------------------------
#
# Every client of a worker is one greenpool listener, and all of them share ONE server
# connection of the write group (notifications exist on the primary only; standbys never
# see them): greenpool fans each notification out to the listeners' own bounded queues. So
# a worker serves as many streams as gunicorn's worker_connections allows, and costs the
# server one connection per worker for all of them (one exclusive_limit slot of the write
# group). The stream:
#
#     retry: 2000                the browser reconnects 2 s after a drop
#     event: note / data: 42     a note was committed; data is its id
#     event: gap / data: {...}   notes committed since lost_at may not have been announced
#                                (a failover, or this client fell behind): re-read GET /notes
#     : keep-alive               every EVENTS_KEEPALIVE s of silence, so that a client that
#                                went away is noticed (the write fails) and its listener closed
#
# A client that stops reading: its listener queues at most EVENTS_BACKLOG notes (then it is
# skipped and owed a gap), and once the socket's buffers are full a write that makes no
# progress for EVENTS_WRITE_TIMEOUT s ends the stream. The listener is closed when the
# client goes (gunicorn closes the response), when the worker shuts down or reloads
# (end_streams(), called from the SIGTERM handler that gunicorn.conf.py installs: every
# stream ends cleanly at once, so the worker does not wait out its graceful timeout), or
# on any error.

NOTES_CHANNEL = "notes"
EVENTS_KEEPALIVE = 15.0
EVENTS_BACKLOG = 100  # notes queued for one slow client before it is owed a gap
EVENTS_PER_WRITE = 50  # events already queued for a client go out in one write
# seconds a write to a client may make no progress (the environment may say otherwise)
EVENTS_WRITE_TIMEOUT = float(os.environ.get("EVENTS_WRITE_TIMEOUT", "10"))
EVENT_HEADERS = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"),
                 ("X-Accel-Buffering", "no")]  # nginx: pass each event on at once
RETRY_FRAME = b"retry: 2000\n\n"
KEEPALIVE_FRAME = b": keep-alive\n\n"
FRAMES_KEPT = 64  # notifications whose encoded frame is kept for the streams yet to send it

_streams: weakref.WeakSet[EventStream] = weakref.WeakSet()  # the open ones, for end_streams()
_ending = False  # end_streams() was called: this worker takes no new stream
#: id(item) -> (item, its frame): every listener of a worker receives the same Notify
#: object, so its frame is encoded once for all the streams (the item is kept with it, so
#: the id cannot be reused while the entry exists)
_frames: dict[int, tuple[Any, bytes]] = {}
_SSE_LINE_BREAK = re.compile("\r\n|\r|\n")  # the SSE spec's, not str.splitlines()'s


def note_events(listener: greenpool.Listener,
                keepalive: float = EVENTS_KEEPALIVE) -> Iterator[bytes]:
    """The body of GET /events; closes ``listener`` however it ends. Each wake-up sends
    everything queued for this client in one write (one chunk, one send)."""
    try:
        yield RETRY_FRAME
        while True:
            item = listener.get(keepalive)
            if item is None:
                if listener.closed:
                    return  # the worker is shutting down: end the response cleanly
                yield KEEPALIVE_FRAME
                continue
            if not listener.backlog:
                yield event_frame(item)
                continue
            frames = [event_frame(item)]
            while len(frames) < EVENTS_PER_WRITE:
                item = listener.get(0)
                if item is None:
                    break
                frames.append(event_frame(item))
            yield b"".join(frames)
    finally:
        listener.close()


def event_frame(item: greenpool.Gap | Any) -> bytes:
    """The SSE frame of a listener's item, encoded once per worker for every stream."""
    kept = _frames.get(id(item))
    if kept is not None and kept[0] is item:
        return kept[1]
    frame = event_text(item).encode()
    if len(_frames) >= FRAMES_KEPT:
        _frames.clear()  # sent by every stream by now (at worst one is encoded again);
    _frames[id(item)] = (item, frame)  # one call, safe under threads too
    return frame


def event_text(item: greenpool.Gap | Any) -> str:
    if isinstance(item, greenpool.Gap):
        gap = {"reason": item.reason, "lost_at": item.lost_at, "resumed_at": item.resumed_at}
        return f"event: gap\ndata: {json.dumps(gap)}\n\n"
    # a payload (anyone may NOTIFY the channel) ends an SSE line at any CR or LF: one
    # data line per line of it, so the client reads it back whole and nothing is injected
    data = "".join(f"data: {line}\n" for line in _SSE_LINE_BREAK.split(item.payload))
    return f"event: note\n{data}\n"


class EventStream:
    """The response of GET /events. Its close() (PEP 3333: the server calls it however the
    response ends) closes the listener even if the body was never iterated, which a bare
    generator's close() would not: its ``finally`` runs only once it has started."""

    def __init__(self, listener: greenpool.Listener) -> None:
        self.listener = listener
        self._events = note_events(listener)
        _streams.add(self)

    def __iter__(self) -> Iterator[bytes]:
        return self._events  # the server iterates the body itself: no call of ours per event

    def __next__(self) -> bytes:
        return next(self._events)

    def close(self) -> None:
        _streams.discard(self)
        try:
            self._events.close()
        finally:
            self.listener.close()


def end_streams() -> None:
    """End every open stream now and refuse new ones (a worker stopping or reloading): each
    stream's listener is closed, so its body ends cleanly and the browser reconnects, to
    another worker. Safe to call from any greenlet, more than once."""
    global _ending
    _ending = True
    for stream in list(_streams):
        stream.listener.close()


def open_stream(environ: dict[str, Any]) -> EventStream:
    if _ending:
        raise greenpool.PoolClosed("this worker is shutting down")
    sock = environ.get("gunicorn.socket")
    if sock is not None:  # a client that stops reading cannot hold this greenlet for ever
        sock.settimeout(EVENTS_WRITE_TIMEOUT)
    # listening before the response starts: no note committed after this is missed
    return EventStream(greenpool.listen("write", NOTES_CHANNEL, max_backlog=EVENTS_BACKLOG))


Route = Callable[..., tuple[str, Any]]
ROUTES: list[tuple[str, str, Route]] = [
    ("GET", "/", index),
    ("POST", "/notes", create_note),
    ("GET", "/notes", list_notes),
    ("GET", r"/notes/(\d{1,18})", get_note),
    ("GET", "/health", health),
    ("GET", "/stats", stats),
]


def dispatch(environ: dict[str, Any]) -> tuple[str, Any]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
    allowed = []
    for route_method, pattern, func in ROUTES:
        match = re.fullmatch(pattern, path)
        if match:
            if method == route_method:
                open_pool()
                return func(environ, *match.groups())
            allowed.append(route_method)
    if allowed:
        raise HTTPError("405 Method Not Allowed", "MethodNotAllowed", f"use {allowed}")
    raise HTTPError("404 Not Found", "NotFound", f"no route {path}")


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    try:
        if environ.get("PATH_INFO") == "/events" and environ["REQUEST_METHOD"] == "GET":
            open_pool()
            stream = open_stream(environ)  # errors: a JSON 503
            start_response("200 OK", EVENT_HEADERS)
            return stream
        status, body = dispatch(environ)
    except HTTPError as exc:
        status, body = exc.status, {"error": exc.error, "detail": exc.detail}
    except greenpool.TransactionAborted as exc:  # a statement failed and was swallowed: a bug
        status, body = "500 Internal Server Error", {"error": "TransactionAborted",
                                                     "detail": str(exc)}
    except psycopg2.OperationalError as exc:
        # greenpool's errors (PoolTimeout, NoHealthyEndpoint, TooManyWaiters, PoolClosed,
        # ConnectFailed, CommitOutcomeUnknown) subclass OperationalError; the rest is the
        # driver's: server lost mid-query, shutting down, query cancelled.
        name = type(exc).__name__  # pool errors, or psycopg2.errors' AdminShutdown, ...
        if type(exc) is psycopg2.OperationalError:  # libpq's own: server gone, refused, ...
            name = "DatabaseUnavailable"
        status = "503 Service Unavailable"
        body = {"error": name,
                "detail": " ".join(str(exc).split()) or repr(exc)}
        headers.append(("Retry-After", "1"))
    except Exception as exc:
        environ["wsgi.errors"].write(traceback.format_exc())  # gunicorn's error log
        status, body = "500 Internal Server Error", {"error": "InternalError",
                                                     "detail": type(exc).__name__}
    data = json.dumps(body).encode()
    start_response(status, [*headers, ("Content-Length", str(len(data)))])
    return [data]


def main(argv: list[str]) -> int:
    if argv != ["schema"]:
        print("usage: GREENPOOL_CONFIG='{...}' python app.py schema", file=sys.stderr)
        return 2
    # a one-shot command: no event loop needed, so no monkey-patching either
    pool = greenpool.Pool(dataclasses.replace(CONFIG, mode="non-threaded"))
    try:
        with pool.handler("write") as db:
            db.execute(SCHEMA)
    finally:
        pool.close()
    print("schema created")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
