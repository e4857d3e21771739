"""The gunicorn example end to end: real gunicorn gevent workers, a real server, real outages.

gunicorn runs as a subprocess (its own process group, always terminated by PID); the test
process talks HTTP to it from many greenlets, so it only runs in gevent mode.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faults import Ticker
from gunicorn_example import loaded
from modes import MODE

import greenpool.config
from greenpool.testing.postgres import Cluster, free_port

pytestmark = [
    pytest.mark.skipif(MODE != "gevent", reason="drives gunicorn from greenlets: gevent mode"),
    pytest.mark.timeout(90),
]
gunicorn = pytest.importorskip("gunicorn")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gunicorn"
APP_NAME = "greenpool-test-gunicorn"
ACQUIRE_TIMEOUT = 2.0  # the groups' acquire timeout: the longest a 503 may take
SLACK = 1.5  # HTTP round trip, scheduling, a connect attempt cut off at the deadline
WORKERS = 2
WRITE_SIZE, READ_SIZE = 4, 6  # per worker: 100 concurrent clients are far more than that
CLEAN_503 = {"DatabaseUnavailable", "AdminShutdown", "PoolTimeout", "NoHealthyEndpoint",
             "CommitOutcomeUnknown"}


@dataclass
class Reply:
    method: str
    path: str
    status: int
    body: Any
    raw: bytes
    started: float
    elapsed: float

    def __repr__(self) -> str:
        return (f"<{self.method} {self.path} -> {self.status} in {self.elapsed:.2f}s: "
                f"{self.raw[:300]!r}>")


class App:
    """A running gunicorn serving examples/gunicorn, and an HTTP client for it."""

    def __init__(self, config: dict[str, Any], log: Path) -> None:
        self.env = {**os.environ, "GREENPOOL_CONFIG": json.dumps(config)}
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def create_schema(self) -> None:
        done = subprocess.run([sys.executable, str(EXAMPLE / "app.py"), "schema"], env=self.env,
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr

    def start(self, *options: str, deadline: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(WORKERS),
               "-c", str(EXAMPLE / "gunicorn.conf.py"), "-b", f"127.0.0.1:{self.port}",
               *options]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.proc.returncode}:\n{self.log_text()}")
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if time.monotonic() > end:
                pytest.fail(f"gunicorn not listening after {deadline} s:\n{self.log_text()}")
            time.sleep(0.05)
        # listening is the master; a worker answering means the app loaded too
        reply = self.call("GET", "/stats", timeout=deadline)
        assert reply.status == 200, reply

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful), then SIGKILL for the whole group if it does not exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def call(self, method: str, path: str, body: Any = None, timeout: float = 15.0,
             raw: bytes | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        started = time.monotonic()
        try:
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            status, ctype = resp.status, resp.getheader("Content-Type")
        finally:
            conn.close()
        elapsed = time.monotonic() - started
        parsed = json.loads(raw) if ctype == "application/json" else None
        return Reply(method, path, status, parsed, raw, started, elapsed)

    def write(self, text: str) -> Reply:
        return self.call("POST", "/notes", {"body": text})

    def read_count(self) -> Reply:
        return self.call("GET", "/notes?limit=3")


def run_all(calls: list[Callable[[], Any]], concurrency: int, timeout: float) -> list[Any]:
    """Run ``calls`` on ``concurrency`` greenlets; every one must finish within ``timeout``."""
    import gevent
    import gevent.pool

    group = gevent.pool.Pool(concurrency)
    with gevent.Timeout(timeout, AssertionError(f"requests still running after {timeout} s")):
        return list(group.imap_unordered(lambda call: call(), calls))


class Load:
    """Greenlets sending requests in a loop until stopped, keeping every reply."""

    def __init__(self, app: App, greenlets: int, kinds: tuple[str, ...]) -> None:
        import gevent

        self.app, self.replies, self._stopping = app, [], False
        self.in_flight: dict[int, tuple[str, float]] = {}  # greenlet index -> (kind, started)
        self.tasks = [gevent.spawn(self._loop, i, kinds) for i in range(greenlets)]

    def _loop(self, index: int, kinds: tuple[str, ...]) -> None:
        n = 0
        import gevent

        while not self._stopping:
            kind = kinds[(index + n) % len(kinds)]
            self.in_flight[index] = (kind, time.monotonic())
            reply = self.app.write(f"load {index}/{n}") if kind == "write" else \
                self.app.read_count()
            del self.in_flight[index]
            self.replies.append(reply)
            n += 1
            # a fast 503 must not turn into a busy loop (a plain sleep and flag: a task was
            # once seen to stay 8.5 s in Event.wait(0.01) after the event was set)
            gevent.sleep(0.01)

    def stop(self, timeout: float) -> list[Reply]:
        import gevent

        ticker = Ticker()  # a long gap: this process's event loop was blocked
        self._stopping = True
        began = time.monotonic()
        gevent.joinall(self.tasks, timeout=timeout)
        if not all(task.dead for task in self.tasks):
            now = time.monotonic()
            gap = ticker.stop()
            pending = sorted((round(now - started, 2), kind)
                             for kind, started in self.in_flight.values())
            stacks = ["".join(traceback.format_stack(task.gr_frame))
                      for task in self.tasks if not task.dead and task.gr_frame is not None]
            pytest.fail(f"load still running {now - began:.2f} s after it was told to stop "
                        f"(allowed {timeout} s; longest event-loop gap {gap:.2f} s); requests "
                        f"in flight for (seconds, kind): {pending}; where the rest are:\n"
                        f"{stacks[:2]}\ngunicorn's log:\n{self.app.log_text()}")
        ticker.stop()
        errors = [task.exception for task in self.tasks if task.exception is not None]
        assert not errors, f"the HTTP client failed: {errors[:3]}"
        return self.replies


def assert_clean(reply: Reply) -> None:
    """A 2xx with the expected body, or a clean 503 naming the problem, fast enough."""
    assert reply.elapsed <= ACQUIRE_TIMEOUT + SLACK, f"too slow: {reply}"
    assert reply.body is not None, f"not JSON: {reply}"
    if reply.status == 503:
        assert reply.body.get("error") in CLEAN_503 and reply.body.get("detail"), reply
    elif reply.method == "POST":
        assert reply.status == 201 and isinstance(reply.body.get("id"), int), reply
    else:
        assert reply.status == 200 and isinstance(reply.body.get("count"), int), reply


def recovered(app: App, requests: int = 40) -> bool:
    replies = run_all(mixed(app, requests, "recovered"), requests, ACQUIRE_TIMEOUT + 10)
    return all(r.status in (200, 201) for r in replies)


def mixed(app: App, requests: int, label: str) -> list[Callable[[], Reply]]:
    """Alternating writes and reads."""
    return [(lambda i=i: app.write(f"{label} {i}")) if i % 2 else app.read_count
            for i in range(requests)]


def wait_recovered(app: App, within: float) -> float:
    """Seconds until a burst of concurrent reads and writes all succeed."""
    start = time.monotonic()
    while not recovered(app):
        if time.monotonic() - start > within:
            pytest.fail(f"still failing {within} s after the server came back")
        time.sleep(0.2)
    return time.monotonic() - start


def assert_log_clean(app: App) -> None:
    log = app.log_text()
    for bad in ("Traceback", "WORKER TIMEOUT", "Exception in worker", "Worker failed"):
        assert bad not in log, f"{bad!r} in gunicorn's log:\n{log}"
    assert log.count("Booting worker") == WORKERS, f"a worker was restarted:\n{log}"
    assert log.count("greenpool: pool closed in worker") == WORKERS, log


# At debug1 the server logs "unexpected EOF on client connection" for a client that vanished
# without saying goodbye (a process exit, not a close()): proof that the workers closed.
VERBOSE = {"log_min_messages": "debug1"}


def stop_and_check_goodbyes(app: App, cluster: Cluster, server_conns: Callable[..., int]) -> None:
    """SIGTERM gunicorn: every worker must close its pool, leaving no server connection."""
    assert server_conns(cluster=cluster, application_name=APP_NAME) > 0
    offset = cluster.logfile.stat().st_size
    assert app.stop() == 0
    assert server_conns(cluster=cluster, application_name=APP_NAME, expect=0) == 0
    with open(cluster.logfile, "rb") as log:
        log.seek(offset)
        since = log.read().decode(errors="replace")
    assert "unexpected EOF" not in since, f"connections dropped, not closed:\n{since}"
    assert_log_clean(app)


def groups(**extra: dict[str, Any]) -> dict[str, Any]:
    write = {"connection_count": WRITE_SIZE, "timeout": ACQUIRE_TIMEOUT, **extra.get("write", {})}
    read = {"connection_count": READ_SIZE, "autocommit": True, "timeout": ACQUIRE_TIMEOUT,
            **extra.get("read", {})}
    return {"write": write, "read": read}


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], App]]:
    """``make(config) -> App`` (not started); every started gunicorn is stopped afterwards."""
    apps: list[App] = []

    def make(config: dict[str, Any]) -> App:
        app = App(config, tmp_path / f"gunicorn-{len(apps)}.log")
        apps.append(app)
        return app

    yield make
    for app in apps:
        if app.proc is not None and app.proc.poll() is None:
            app.stop()


def test_load_outage_recovery_and_clean_shutdown(
    pg_factory: Callable[..., Cluster], server_conns: Callable[..., int],
    app_factory: Callable[[dict[str, Any]], App],
) -> None:
    db = pg_factory(settings=VERBOSE)
    app = app_factory({"db": db.endpoint(), "application_name": APP_NAME, "groups": groups()})
    app.create_schema()
    app.start()

    # 1. 300 requests from 100 concurrent clients, ~7 times the connections of a worker: each
    #    client writes a note and reads it back by id.
    def write_then_read(i: int) -> tuple[Reply, Reply]:
        created = app.write(f"note {i}")
        assert created.status == 201 and created.body["body"] == f"note {i}", created
        fetched = app.call("GET", f"/notes/{created.body['id']}")
        assert fetched.status == 200 and fetched.body == created.body, fetched
        return created, fetched

    pairs = run_all([lambda i=i: write_then_read(i) for i in range(150)], 100, timeout=30)
    ids = {created.body["id"] for created, _ in pairs}
    assert len(ids) == 150
    assert db.execute("SELECT count(*) FROM notes")[0][0] == 150
    listing = app.read_count()
    assert listing.status == 200 and listing.body["count"] == 150, listing
    assert server_conns(cluster=db, application_name=APP_NAME) > 0

    # 2. the server crashes under load: clean 503s within the acquire timeout, no hang
    load = Load(app, greenlets=50, kinds=("write", "read"))
    time.sleep(0.5)
    db.stop("immediate")
    down = time.monotonic()
    time.sleep(ACQUIRE_TIMEOUT + 1.0)
    replies = load.stop(timeout=ACQUIRE_TIMEOUT + SLACK + 5)
    for reply in replies:
        assert_clean(reply)
    before = [r for r in replies if r.started + r.elapsed < down]
    after = [r for r in replies if r.started > down]
    assert any(r.status in (200, 201) for r in before), "no successful request before the crash"
    assert len(after) >= 40 and all(r.status == 503 for r in after), after[:5]

    # 3. the server comes back: the same workers answer again by themselves
    db.start()
    took = wait_recovered(app, within=20)
    print(f"recovered {took:.1f} s after the restart")
    replies = run_all(mixed(app, 100, "after"), 50, timeout=20)
    assert all(r.status in (200, 201) for r in replies), [r for r in replies if r.status >= 300]
    for reply in replies:
        assert_clean(reply)

    # 4. graceful shutdown: each worker closes its pool, no connection is left on the server
    stop_and_check_goodbyes(app, db, server_conns)


@pytest.mark.skipif(not hasattr(greenpool.config, "ROLES"), reason="needs failover")
def test_reads_survive_losing_the_standby(
    pg_factory: Callable[..., Cluster], server_conns: Callable[..., int],
    app_factory: Callable[[dict[str, Any]], App],
) -> None:
    primary = pg_factory(settings=VERBOSE)
    standby = pg_factory(standby_of=primary)
    app = app_factory({
        "db": [primary.endpoint(), standby.endpoint()],
        "application_name": APP_NAME,
        "groups": groups(read={"role": "prefer-standby"}, write={"role": "primary"}),
    })
    app.create_schema()
    deadline = time.monotonic() + 10
    while not standby.execute("SELECT to_regclass('notes') IS NOT NULL")[0][0]:
        assert time.monotonic() < deadline, "the schema never reached the standby"
        time.sleep(0.05)
    app.start()

    load = Load(app, greenlets=40, kinds=("write", "read", "read"))
    deadline = time.monotonic() + 10
    while server_conns(cluster=standby, application_name=APP_NAME) == 0:
        assert time.monotonic() < deadline, "reads never reached the standby"
        time.sleep(0.05)
    standby.stop("immediate")
    down = time.monotonic()
    time.sleep(ACQUIRE_TIMEOUT + 1.0)
    replies = load.stop(timeout=ACQUIRE_TIMEOUT + SLACK + 5)
    for reply in replies:
        assert_clean(reply)
    writes = [r for r in replies if r.method == "POST"]
    assert writes and all(r.status == 201 for r in writes), [r for r in writes if r.status != 201]
    # a read running on the standby when it died may fail; every later one goes to the primary
    late_reads = [r for r in replies if r.method == "GET" and r.started > down]
    assert len(late_reads) >= 50, len(late_reads)
    assert all(r.status == 200 for r in late_reads), [r for r in late_reads if r.status != 200]

    stop_and_check_goodbyes(app, primary, server_conns)


def test_preload_pools_are_opened_per_worker(
    pg_factory: Callable[..., Cluster], server_conns: Callable[..., int],
    app_factory: Callable[[dict[str, Any]], App],
) -> None:
    """With --preload the app is imported in the master: it must open nothing there."""
    db = pg_factory(settings=VERBOSE)
    warm = {"min_size": 1}
    app = app_factory({"db": db.endpoint(), "application_name": APP_NAME,
                       "groups": groups(read=warm, write=warm)})
    app.create_schema()
    app.start("--preload")
    # housekeeping warms up min_size per group in each worker; the master adds nothing
    assert server_conns(cluster=db, application_name=APP_NAME, expect=2 * WORKERS) == 2 * WORKERS
    replies = run_all(mixed(app, 100, "preload"), 50, timeout=20)
    for reply in replies:
        assert reply.status in (200, 201), reply
        assert_clean(reply)
    pids = {app.call("GET", "/stats").body["pid"] for _ in range(20)}
    assert app.proc is not None and app.proc.pid not in pids
    stop_and_check_goodbyes(app, db, server_conns)


# --- malformed requests and what /stats shows ------------------------------------------------

NASTY_BODIES = [
    json.dumps({"body": "a\u0000b"}).encode(),  # NUL: PostgreSQL text cannot hold it
    json.dumps({"body": "\ud800"}).encode(),  # a lone surrogate: not encodable as UTF-8
    b"[" * 60000,  # under MAX_BODY, but Python's JSON parser recurses too deep
    b'{"body": "caf\xe9"}',  # not UTF-8
    b"1" * 5000,  # an integer with more digits than Python converts
]


def test_malformed_requests_are_400_and_stats_hide_endpoint_errors(
    pg_factory: Callable[..., Cluster], app_factory: Callable[[dict[str, Any]], App],
    blackhole: Any,
) -> None:
    db = pg_factory()
    refused = dict(db.endpoint(), port=free_port())  # nobody listens there: refused at once
    app = app_factory({"db": [db.endpoint(), refused], "application_name": APP_NAME,
                       "groups": groups()})
    app.create_schema()
    app.start()
    for raw in NASTY_BODIES:
        reply = app.call("POST", "/notes", raw=raw)
        assert reply.status == 400, reply
        assert reply.body["error"] == "BadRequest" and reply.body["detail"], reply
    assert app.call("POST", "/notes", raw=b"x" * (70 * 1024)).status == 413
    assert app.call("GET", "/notes?limit=ten").status == 400

    # the refused endpoint has a last_error by now (balancing tried it): not in /stats
    deadline = time.monotonic() + 20
    while True:
        assert app.call("GET", "/notes").status in (200, 503)
        stats = app.call("GET", "/stats")
        label = f"127.0.0.1:{refused['port']}/postgres"
        if stats.body["endpoints"][label]["connect_errors"] > 0:
            break
        assert time.monotonic() < deadline, stats
    assert stats.status == 200
    for values in stats.body["endpoints"].values():
        assert "last_error" not in values and "state" in values
    assert "refused" not in stats.raw.decode().lower()
    assert app.stop() == 0
    log = app.log_text()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def app_module(pg: Cluster) -> Iterator[Any]:
    """examples/gunicorn/app.py imported in this process, its pool on a database of its own."""
    with loaded(pg, name="gunicorn_example_inprocess", application_name=APP_NAME,
                groups=groups(), mode=None) as module:
        yield module


def wsgi(module: Any, method: str, path: str, body: bytes = b"",
         length: str | None = None) -> tuple[int, Any, str]:
    import io

    path, _, query = path.partition("?")
    errors = io.StringIO()
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "CONTENT_LENGTH": str(len(body)) if length is None else length,
               "wsgi.input": io.BytesIO(body), "wsgi.errors": errors}
    started: list[str] = []
    data = b"".join(module.application(environ, lambda status, headers: started.append(status)))
    return int(started[0].split()[0]), json.loads(data), errors.getvalue()


from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["body", "id", ""]) | ANY_TEXT, inner, max_size=3),
    max_leaves=8,
)
BODIES = (st.binary(max_size=200)
          | JSON_VALUES.map(lambda v: json.dumps(v).encode())
          | ANY_TEXT.map(lambda t: json.dumps({"body": t}).encode()))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=BODIES)
@example(raw=NASTY_BODIES[0])
@example(raw=NASTY_BODIES[1])
@example(raw=NASTY_BODIES[2])
def test_any_post_body_is_a_note_or_a_4xx(app_module: Any, raw: bytes) -> None:
    status, body, errors = wsgi(app_module, "POST", "/notes", raw)
    assert errors == ""  # nothing went to the error log (no traceback)
    if status == 201:
        sent = json.loads(raw)["body"]
        assert body["body"] == sent
        status, fetched, _ = wsgi(app_module, "GET", f"/notes/{body['id']}")
        assert status == 200 and fetched == body
    else:
        assert status in (400, 413), (status, body)
        assert body["error"] == "BadRequest" and body["detail"]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.text(max_size=30), query=st.text(max_size=30), length=st.text(max_size=8),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "get"]))
def test_any_request_line_is_an_answer_or_a_4xx(app_module: Any, path: str, query: str,
                                                length: str, method: str) -> None:
    status, body, errors = wsgi(app_module, method, "/" + path + "?" + query, b"{}", length)
    assert errors == ""
    assert status in (200, 201, 400, 404, 405, 413), (status, body)
    if status >= 400:
        assert body["error"] and body["detail"]
