"""OpenTelemetry export, read back through the SDK's in-memory reader, on a real server."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import pytest
from forking import run_in_forked_child
from modes import MODE, join_all, spawn

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from greenpool import group as group_module
from greenpool import otel
from greenpool.stats import TIME_BUCKETS

POOL_NAME = "db.client.connection.pool.name"


def read(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Every data point collected now, by instrument name."""
    found: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def point(points: dict[str, list[Any]], name: str, **attributes: Any) -> Any:
    matching = [p for p in points[name]
                if all(p.attributes.get(k) == v for k, v in attributes.items())]
    assert len(matching) == 1, (name, attributes, points.get(name))
    return matching[0]


@pytest.fixture
def reader() -> Any:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def _hold(pool: Any, seconds: float) -> None:
    with pool.handler("g") as db:
        db.query("SELECT 1")
        time.sleep(seconds)


def test_semantic_convention_metrics_read_back_through_the_sdk(make_pool, pg, reader):
    reader, provider = reader
    pool = make_pool({"g": {"connection_count": 1, "min_size": 1, "timeout": 10},
                      "other": {"connection_count": 2}})
    otel.instrument(pool, meter_provider=provider)
    for _ in range(4):
        with pool.handler("g") as db:
            db.query("SELECT 1")
            time.sleep(0.03)
    holder = spawn(lambda: _hold(pool, 0.3))
    deadline = time.monotonic() + 10
    while pool.stats()["groups"]["g"]["in_use"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    waiter = spawn(lambda: _hold(pool, 0))
    while pool.stats()["groups"]["g"]["waiting"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    during = read(reader)  # one lent, one waiting
    join_all([holder, waiter], 10)
    after = read(reader)

    group = {POOL_NAME: "g", "server.address": pg.host, "server.port": pg.port}
    assert point(during, "db.client.connection.count", **group,
                 **{"db.client.connection.state": "used"}).value == 1
    assert point(during, "db.client.connection.pending_requests", **group).value == 1
    assert point(after, "db.client.connection.pending_requests", **group).value == 0
    assert point(after, "db.client.connection.count", **group,
                 **{"db.client.connection.state": "idle"}).value == 1
    assert point(after, "db.client.connection.max", **group).value == 1
    assert point(after, "db.client.connection.idle.min", **group).value == 1
    assert point(after, "db.client.connection.max", **{POOL_NAME: "other"}).value == 2
    assert point(after, "db.client.connection.timeouts", **group).value == 0

    use = point(after, "db.client.connection.use_time", **group)
    assert use.count == 6 and use.sum >= 4 * 0.03 + 0.3
    assert list(use.explicit_bounds) == list(TIME_BUCKETS)
    wait = point(after, "db.client.connection.wait_time", **group)
    assert wait.count == 6 and wait.max >= 0.2  # the one that waited for the holder
    create = point(after, "db.client.connection.create_time", **group)
    connects = pool.stats()["groups"]["g"]["connects"]
    assert create.count == connects >= 1 and 0 < create.sum < 10


def test_timeouts_are_counted(make_pool, reader):
    reader, provider = reader
    pool = make_pool({"g": {"connection_count": 1, "timeout": 0.05}})
    otel.instrument(pool, name="app", meter_provider=provider)
    from greenpool import PoolTimeout

    holder = spawn(lambda: _hold(pool, 0.5))
    deadline = time.monotonic() + 10
    while pool.stats()["groups"]["g"]["in_use"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(PoolTimeout), pool.handler("g"):
        pass
    join_all([holder], 10)
    found = read(reader)
    assert point(found, "db.client.connection.timeouts", **{POOL_NAME: "app.g"}).value == 1


def test_a_buffer_never_outgrows_its_limit(make_pool, reader, monkeypatch):
    """With nothing collecting, the loans fold their durations on the spot once enough wait,
    and a full buffer is recorded on the spot: memory stays bounded and no value is lost."""
    reader, provider = reader
    monkeypatch.setattr(otel, "BUFFER_LIMIT", 3)
    monkeypatch.setattr(group_module, "FOLD_AT", 2)
    pool = make_pool({"g": {"connection_count": 1}})
    instrumentation = otel.instrument(pool, meter_provider=provider)
    for _ in range(10):
        with pool.handler("g") as db:
            db.query("SELECT 1")
    assert all(len(buffer.values) <= 3 for _, _, buffer in instrumentation._buffers)
    timings = pool.group("g").counters.timings
    assert len(timings.wait.values) < 2 and len(timings.use.values) <= 2  # folded as they came
    use = point(read(reader), "db.client.connection.use_time", **{POOL_NAME: "g"})
    assert use.count == 10
    instrumentation.stop()
    with pool.handler("g") as db:
        db.query("SELECT 1")
    assert point(read(reader), "db.client.connection.use_time", **{POOL_NAME: "g"}).count == 10


def test_a_group_moved_to_another_server_is_reported_under_its_new_address(
        make_pool, pg, pg_factory, reader):
    """``reconfigure()`` moves the group: gauges and durations name the server it is on
    now; durations recorded before the move keep the old one."""
    reader, provider = reader
    other = pg_factory()
    pool = make_pool({"g": {"connection_count": 1}})
    otel.instrument(pool, meter_provider=provider)
    with pool.handler("g") as db:
        db.query("SELECT 1")
    read(reader)  # a collection before the move
    pool.reconfigure({"type": MODE, "db": other.endpoint(), "groups": {"g": {
        "connection_count": 1}}})
    with pool.handler("g") as db:
        assert db.query("SELECT inet_server_port()") == [(other.port,)]
    found = read(reader)
    old = {POOL_NAME: "g", "server.port": pg.port}
    new = {POOL_NAME: "g", "server.port": other.port}
    assert point(found, "db.client.connection.max", **new).value == 1
    assert not [p for p in found["db.client.connection.max"]
                if p.attributes.get("server.port") == pg.port]
    assert point(found, "db.client.connection.use_time", **old).count == 1
    assert point(found, "db.client.connection.use_time", **new).count == 1


def test_instrumenting_a_pool_twice_under_one_name_is_refused(make_pool, reader):
    reader, provider = reader
    pool = make_pool({"g": {}})
    first = otel.instrument(pool, meter_provider=provider)
    with pytest.raises(ValueError, match="already instrumented as 'default'"):
        otel.instrument(pool, meter_provider=provider)
    first.stop()
    otel.instrument(pool, meter_provider=provider)  # allowed once the first is stopped


def test_two_pools_on_one_provider_are_both_reported_under_names_of_their_own(
        make_pool, reader):
    """The SDK keeps one instrument per name: each pool's gauges still come through; the
    same name twice is refused (one pool's series would hide the other's)."""
    reader, provider = reader
    first = make_pool({"g": {"connection_count": 3}})
    second = make_pool({"g": {"connection_count": 7}})
    otel.instrument(first, meter_provider=provider)
    with pytest.raises(ValueError, match="another pool is instrumented as 'default'"):
        otel.instrument(second, meter_provider=provider)
    otel.instrument(second, name="jobs", meter_provider=provider)
    points = read(reader)
    assert point(points, "db.client.connection.max", **{otel.POOL_NAME: "g"}).value == 3
    assert point(points, "db.client.connection.max", **{otel.POOL_NAME: "jobs.g"}).value == 7


class _BrokenHistogram:
    """An SDK whose record() fails: a fault no real server can produce, hence a stand-in."""

    def record(self, value: float, attributes: Any = None) -> None:
        raise RuntimeError("exporter broke")


def test_a_failing_sdk_never_fails_a_loan(make_pool, reader, monkeypatch, caplog):
    reader, provider = reader
    monkeypatch.setattr(otel, "BUFFER_LIMIT", 2)
    monkeypatch.setattr(group_module, "FOLD_AT", 2)
    pool = make_pool({"g": {"connection_count": 1}})
    instrumentation = otel.instrument(pool, meter_provider=provider)
    for _, _, buffer in instrumentation._buffers:
        buffer.histogram = _BrokenHistogram()
    for _ in range(6):  # the buffers fill and are flushed on the loan path
        with pool.handler("g") as db:
            assert db.query("SELECT 1") == [(1,)]
    assert re.search(r"recording \d+ durations failed", caplog.text)
    assert pool.stats()["groups"]["g"]["in_use"] == 0


def test_durations_flushed_from_several_threads_at_once_are_each_recorded_once(
    reader, monkeypatch
):
    """Loans fill the buffer and flush it while the collector flushes it too (threads in
    threaded mode): every duration appended is recorded exactly once (value for value, not
    only in number)."""
    reader, provider = reader
    monkeypatch.setattr(otel, "BUFFER_LIMIT", 50)
    histogram = provider.get_meter("test").create_histogram("durations", unit="s")
    buffer = otel._Buffer(histogram, {})
    sink = buffer.sink()
    stop: list[bool] = []

    def loans() -> None:
        for k in range(5000):  # distinct values: a value taken twice and one dropped show
            sink([float(k)])

    def collector() -> None:
        while not stop:
            buffer.flush()
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: a race shows at once
    try:
        flusher = spawn(collector)
        join_all([spawn(loans) for _ in range(4)], 60)
        stop.append(True)
        join_all([flusher], 10)
    finally:
        sys.setswitchinterval(interval)
    buffer.flush()
    recorded = point(read(reader), "durations")
    assert (recorded.count, recorded.sum) == (20000, 4 * sum(range(5000)))


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_a_forked_child_records_its_own_loans_only(make_pool, reader, monkeypatch):
    """Durations the parent folded into its buffer and had not recorded by the fork are the
    parent's to record: the child's histograms get the child's loans, each once."""
    reader, provider = reader
    monkeypatch.setattr(group_module, "FOLD_AT", 4)  # the parent's loans fold on the spot
    pool = make_pool({"g": {"connection_count": 1}})
    instrumentation = otel.instrument(pool, meter_provider=provider)

    def loans(n: int) -> None:
        for _ in range(n):
            with pool.handler("g") as db:
                db.query("SELECT 1")

    loans(10)  # nothing collected: the parent's buffers hold its folded durations
    assert any(buffer.values for _, _, buffer in instrumentation._buffers)

    def in_child() -> int:  # what the child records
        loans(2)
        return point(read(reader), "db.client.connection.wait_time", **{POOL_NAME: "g"}).count

    assert run_in_forked_child(in_child) == "2"
    assert point(read(reader), "db.client.connection.wait_time", **{POOL_NAME: "g"}).count == 10
    instrumentation.stop()


def test_a_collection_interrupted_while_recording_loses_no_duration(make_pool, reader):
    """A KeyboardInterrupt from a signal handler stops a collection while it records the
    buffered durations (a stand-in: a trace function raises it where a handler would run,
    before the third value): the next collection records the rest, every loan once."""
    reader, provider = reader
    pool = make_pool({"g": {"connection_count": 1}})
    instrumentation = otel.instrument(pool, meter_provider=provider)
    for _ in range(10):
        with pool.handler("g") as db:
            db.query("SELECT 1")
    flush_code = otel._Buffer.flush.__code__
    record_line = next(line for _, _, line in flush_code.co_lines()
                       if line and "record(seconds" in _source_line(flush_code, line))
    hits: list[int] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == record_line:
            hits.append(1)
            if len(hits) == 3:
                raise KeyboardInterrupt
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is flush_code else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            read(reader)
    finally:
        sys.settrace(previous)
    assert len(hits) == 3
    points = read(reader)
    for name in ("db.client.connection.wait_time", "db.client.connection.use_time"):
        assert point(points, name, **{POOL_NAME: "g"}).count == 10, name
    instrumentation.stop()


def _source_line(code: Any, line: int) -> str:
    import linecache

    return linecache.getline(code.co_filename, line)
