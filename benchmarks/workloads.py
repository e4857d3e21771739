"""The workloads. Each takes an adapter (see :mod:`benchmarks.adapters`) and returns a dict of
plain numbers. Every loop is bounded by a deadline; warm-up phases open the pool's
connections before anything is measured.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import gevent
import psycopg2

from .adapters import Adapter

_now = time.perf_counter


def jain(values: list[int]) -> float:
    """Jain's fairness index: 1.0 when every greenlet did the same number of operations."""
    total, squares = sum(values), sum(v * v for v in values)
    return (total * total) / (len(values) * squares) if squares else 0.0


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


# A session-level setting left as it was: it returns a row (every pool's query shim fetches
# one), it changes nothing, and a pool that resets must still assume it did.
DIRTYING = "SELECT set_config('search_path', current_setting('search_path'), false)"


def overhead(adapter: Adapter, seconds: float, checkout_seconds: float,
             reset_seconds: float = 0.0) -> dict[str, Any]:
    """One greenlet: checkout + SELECT 1 + checkin in a loop; then checkout + checkin alone;
    then (``reset_seconds``) what a dirty loan costs, see :func:`_reset_cost`."""
    for _ in range(200):  # warm-up: connect, caches
        with adapter.session() as db:
            db.query("SELECT 1")
    ops, start, cpu = 0, _now(), time.process_time()
    deadline = start + seconds
    while _now() < deadline:
        for _ in range(50):
            with adapter.session() as db:
                db.query("SELECT 1")
        ops += 50
    elapsed = _now() - start
    # client CPU per operation: the pool's own cost plus the driver's, whatever else runs
    result: dict[str, Any] = {"ops_s": ops / elapsed,
                              "cpu_us": (time.process_time() - cpu) / ops * 1e6}
    if not adapter.pooled:
        result["checkout_us"] = None
        return result
    n, start = 0, _now()
    deadline = start + checkout_seconds
    while _now() < deadline:
        for _ in range(100):
            with adapter.checkout():
                pass
        n += 100
    result["checkout_us"] = (_now() - start) / n * 1e6
    if reset_seconds:
        result.update(_reset_cost(adapter, reset_seconds))
    return result


def _reset_cost(adapter: Adapter, seconds: float) -> dict[str, float]:
    """µs per loan: clean (``SELECT 1``) and dirty (``set_config(..., false)``, which a pool
    that resets must reset on return: greenpool's ``DISCARD ALL``), and µs per round trip
    (``SELECT 1`` on a connection held throughout). Chunks of the three alternate, so drift
    in the machine's speed hits them alike. (dirty - clean) / round trip is the reset's cost in
    round trips (the two statements cost the server about the same)."""
    spent = {"clean": 0.0, "dirty": 0.0, "trip": 0.0}
    count = dict.fromkeys(spent, 0)
    deadline = _now() + seconds
    while _now() < deadline:
        for kind, sql in (("clean", "SELECT 1"), ("dirty", DIRTYING)):
            started = _now()
            for _ in range(50):
                with adapter.session() as db:
                    db.query(sql)
            spent[kind] += _now() - started
            count[kind] += 50
        with adapter.session() as db:
            started = _now()
            for _ in range(50):
                db.query("SELECT 1")
            spent["trip"] += _now() - started
        count["trip"] += 50
    us = {kind: spent[kind] / count[kind] * 1e6 for kind in spent}
    return {"clean_loan_us": us["clean"], "dirty_loan_us": us["dirty"],
            "round_trip_us": us["trip"],
            "reset_round_trips": (us["dirty"] - us["clean"]) / us["trip"]}


def _closed_loop(adapter: Adapter, greenlets: int, sql: str, warmup: float,
                 seconds: float) -> dict[str, Any]:
    """``greenlets`` run ``sql`` back to back; only operations that finish inside the
    measuring window [warmup, warmup + seconds] count, and the pool's connections are
    opened before the clock starts (a lazy pool would otherwise carry its connect time into
    the first window's latencies)."""
    ops = [0] * greenlets
    latencies: list[float] = []
    errors: dict[str, int] = {}

    def run(i: int) -> None:
        while True:
            t0 = _now()
            if t0 >= window_end:
                return
            try:
                with adapter.session() as db:
                    db.query(sql)
            except Exception as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                gevent.sleep(0.01)  # an error path must not spin
                continue
            t1 = _now()
            if window_start <= t1 <= window_end:
                ops[i] += 1
                latencies.append(t1 - t0)

    if adapter.pooled:
        warm = [gevent.spawn(_warm_one, adapter) for _ in range(min(adapter.size, greenlets))]
        gevent.joinall(warm, timeout=30)
    started = _now()
    window_start, window_end = started + warmup, started + warmup + seconds
    retries_before = adapter.retries
    jobs = [gevent.spawn(run, i) for i in range(greenlets)]
    gevent.joinall(jobs, timeout=warmup + seconds + 30)
    gevent.killall(jobs, timeout=5)
    total = sum(ops)
    return {
        "ops_s": total / seconds,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "max_ms": max(latencies, default=float("nan")) * 1e3,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "exhaustion_retries": adapter.retries - retries_before,
        "fairness": jain(ops),
        "starved": sum(1 for n in ops if n == 0),
    }


def contention(adapter: Adapter, greenlets: int, warmup: float, seconds: float) -> dict[str, Any]:
    return _closed_loop(adapter, greenlets, "SELECT 1", warmup, seconds)


def iobound(adapter: Adapter, greenlets: int, size: int, sleep: float, warmup: float,
            seconds: float) -> dict[str, Any]:
    """``greenlets`` share ``size`` connections. Without a pool (raw psycopg2) it is the
    ceiling instead: ``size`` greenlets, each on a connection of its own, nobody waiting."""
    if not adapter.pooled:
        greenlets = size
    result = _closed_loop(adapter, greenlets, f"SELECT pg_sleep({sleep})", warmup, seconds)
    limit = size / sleep
    ideal_ms = greenlets / size * sleep * 1e3  # FIFO: wait for greenlets/size turns
    result.update(limit_ops_s=limit, pct_of_limit=100 * result["ops_s"] / limit)
    if adapter.pooled:  # the ceiling has no queue, so no queueing time to compare with
        result.update(ideal_ms=ideal_ms, p99_vs_ideal=result["p99_ms"] / ideal_ms)
    return result


def chaos(adapter: Adapter, greenlets: int, seconds: float, admin_dsn: str,
          app_name: str) -> dict[str, Any]:
    """10 % of operations fail: 5 % raise inside the block, 2.5 % are cut mid-query by a
    gevent.Timeout inside the block, 2.5 % by a gevent.Timeout around the whole operation
    (often while waiting for a connection). Then: can the pool still serve 50 plain
    operations, how many server connections does it hold, are any idle in transaction?"""
    outcomes = {"ok": 0, "raised": 0, "timeout_inside": 0, "timeout_around": 0, "errors": 0}
    error_kinds: dict[str, int] = {}
    deadline = _now() + seconds

    def run(seed: int) -> None:
        rng = random.Random(seed)
        while _now() < deadline:
            roll = rng.random()
            try:
                if roll < 0.05:
                    with adapter.session() as db:
                        db.query("SELECT 1")
                        raise RuntimeError("boom")
                elif roll < 0.075:
                    with adapter.session() as db, gevent.Timeout(0.002):
                        db.query("SELECT pg_sleep(0.01)")
                elif roll < 0.10:
                    with gevent.Timeout(0.005), adapter.session() as db:
                        db.query("SELECT pg_sleep(0.01)")
                else:
                    with adapter.session() as db:
                        db.query("SELECT 1")
                    outcomes["ok"] += 1
            except RuntimeError as exc:
                if str(exc) != "boom":
                    _count(error_kinds, exc)
                    outcomes["errors"] += 1
                else:
                    outcomes["raised"] += 1
            except gevent.Timeout:
                outcomes["timeout_inside" if roll < 0.075 else "timeout_around"] += 1
            except Exception as exc:
                _count(error_kinds, exc)
                outcomes["errors"] += 1
                gevent.sleep(0.005)

    jobs = [gevent.spawn(run, i) for i in range(greenlets)]
    gevent.joinall(jobs, timeout=seconds + 2)
    stuck = sum(1 for job in jobs if not job.ready())  # still inside one operation
    gevent.killall(jobs, timeout=5)
    gevent.sleep(0.2)
    before = _server_sessions(admin_dsn, app_name)

    served = [0]

    def plain() -> None:
        try:
            with gevent.Timeout(3), adapter.session() as db:
                db.query("SELECT 1")
            served[0] += 1
        except BaseException as exc:  # a Timeout here means the pool no longer serves
            _count(error_kinds, exc, prefix="after: ")

    after_jobs = [gevent.spawn(plain) for _ in range(50)]
    gevent.joinall(after_jobs, timeout=10)
    gevent.killall(after_jobs, timeout=5)
    gevent.sleep(0.2)
    after = _server_sessions(admin_dsn, app_name)
    return {**outcomes, "stuck": stuck, "error_kinds": error_kinds, "served_after": served[0],
            "server_conns_before": before[0], "idle_in_tx_before": before[1],
            "server_conns": after[0], "idle_in_tx": after[1]}


def _warm_one(adapter: Adapter) -> None:
    with adapter.session() as db:
        db.query("SELECT 1")
        gevent.sleep(0.05)  # hold it, so that every connection of the pool gets opened


def _count(kinds: dict[str, int], exc: BaseException, prefix: str = "") -> None:
    key = prefix + type(exc).__name__
    kinds[key] = kinds.get(key, 0) + 1


def _server_sessions(admin_dsn: str, app_name: str) -> tuple[int, int]:
    conn = psycopg2.connect(admin_dsn, application_name="greenpool-bench-admin")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*), count(*) FILTER (WHERE state = 'idle in transaction')"
                " FROM pg_stat_activity WHERE application_name = %s", (app_name,))
            row = cur.fetchone()
        assert row is not None  # an aggregate always returns one row
        return int(row[0]), int(row[1])
    finally:
        conn.close()


def failover(adapter: Adapter, greenlets: int, seconds: float, pace: float,
             start_signal: Callable[[], float], sql: str = "SELECT inet_server_port()",
             error_pause: float | None = None) -> dict[str, Any]:
    """Paced reads of ``SELECT inet_server_port()`` for ``seconds`` from the wall-clock time
    ``start_signal()`` returns (the orchestrator starts every pool at once, then stops and
    restarts an endpoint). Returns raw samples: ``ok`` as [time, port] and ``err`` as
    [time, kind], times relative to that start. ``sql`` must return the serving port first;
    after an error a greenlet pauses ``error_pause`` (default: ``pace``)."""
    pause_after_error = pace if error_pause is None else error_pause
    warm = [gevent.spawn(_warm_one, adapter) for _ in range(adapter.size)]
    gevent.joinall(warm, timeout=30)  # connect before the clock starts
    ok: list[tuple[float, int]] = []
    err: list[tuple[float, str]] = []
    t0 = start_signal()
    gevent.sleep(max(0.0, t0 - time.time()))
    end = t0 + seconds

    def run(i: int) -> None:
        gevent.sleep(pace * i / greenlets)  # spread the greenlets over one pace
        while time.time() < end:
            try:
                with adapter.session() as db:
                    port = db.query(sql)[0][0]
                ok.append((round(time.time() - t0, 4), int(port)))
            except Exception as exc:
                err.append((round(time.time() - t0, 4), type(exc).__name__))
                gevent.sleep(pause_after_error)  # an error path must not spin
                continue
            gevent.sleep(pace)

    jobs = [gevent.spawn(run, i) for i in range(greenlets)]
    gevent.joinall(jobs, timeout=max(0.0, end - time.time()) + 5)
    hung = sum(1 for job in jobs if not job.ready())
    gevent.killall(jobs, timeout=5)
    return {"ok": ok, "err": err, "hung": hung}


def saturated_failover(adapter: Adapter, greenlets: int, seconds: float, hold: float,
                       start_signal: Callable[[], float]) -> dict[str, Any]:
    """:func:`failover` with every connection busy all the time: ``greenlets`` (5 times the
    pool) read back to back, each read holding its connection ``hold`` seconds on the server
    (``pg_sleep``), so a line of waiters is always there. The read returns the serving
    port, which tells the endpoints apart at no extra round trip."""
    return failover(adapter, greenlets, seconds, 0.0, start_signal,
                    sql=f"SELECT inet_server_port() FROM pg_sleep({hold})", error_pause=0.01)


CONNECTION_RECEIVED = b"connection received:"  # log_connections: one line per backend forked
CONNECTION_AUTHORIZED = b"connection authorized:"  # ... and one per session that got in


def storm_baseline(dsn: str, log_path: str, times: int = 20) -> dict[str, Any]:
    """Before the pool exists: the median time of one plain psycopg2 connect here (``times``
    in a row, each closed at once), then where the server log ends, so that the storm counts
    only the backends its pool starts."""
    samples = []
    for _ in range(times):
        started = _now()
        psycopg2.connect(dsn).close()
        samples.append(_now() - started)
    with open(log_path, "rb") as log:
        offset = log.seek(0, 2)
    return {"connect_ms": statistics.median(samples) * 1e3, "log_offset": offset}


def _backends_since(log_path: str, offset: int) -> tuple[int, int]:
    """(backends started, sessions authorized) in the server log after ``offset``."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        text = log.read()
    return text.count(CONNECTION_RECEIVED), text.count(CONNECTION_AUTHORIZED)


def deadline_storm(adapter: Adapter, greenlets: int, seconds: float, low: float, high: float,
                   seed: int, log_path: str, log_offset: int, connect_ms: float
                   ) -> dict[str, Any]:
    """``greenlets`` loop for ``seconds``: acquire with a timeout drawn from [low, high]
    seconds (seeded per greenlet), ``SELECT 1``, give back; a timed-out caller tries again at
    once with a fresh draw. The pool starts empty (see the adapters), so its connects happen
    under these deadlines. Counted: operations served, acquire timeouts, other errors, and
    the backends the server started meanwhile (its log, ``log_connections``): a pool that
    throws half-made connections away shows more of them than its size."""
    end = _now() + seconds
    served: list[float] = []  # the timeout each served operation was drawn with
    timed_out: list[float] = []
    failed: list[float] = []
    errors: dict[str, int] = {}
    timeout_errors = adapter.acquire_timeout_errors

    def run(i: int) -> None:
        rng = random.Random(f"{seed}:{i}")
        while _now() < end:
            timeout = rng.uniform(low, high)
            try:
                with adapter.session_within(timeout) as db:
                    db.query("SELECT 1")
            except timeout_errors:
                timed_out.append(timeout)
                continue
            except Exception as exc:
                failed.append(timeout)
                _count(errors, exc)
                gevent.sleep(0.01)  # an error path must not spin
                continue
            served.append(timeout)

    jobs = [gevent.spawn(run, i) for i in range(greenlets)]
    gevent.joinall(jobs, timeout=seconds + 10)
    hung = sum(1 for job in jobs if not job.ready())
    gevent.killall(jobs, timeout=5)
    started, authorized = _backends_since(log_path, log_offset)
    bar = 2 * connect_ms / 1e3  # "long enough": twice the median connect

    def above(values: list[float]) -> int:
        return sum(1 for t in values if t >= bar)

    eligible = above(served) + above(timed_out) + above(failed)
    buckets = {}  # served share per 5 ms of timeout: how the outcome follows the budget
    for lo in range(0, math.ceil(high * 1e3 / 5) * 5, 5):
        def inside(values: list[float], lo: int = lo) -> int:
            return sum(1 for t in values if lo <= t * 1e3 < lo + 5)

        total = inside(served) + inside(timed_out) + inside(failed)
        buckets[f"{lo}-{lo + 5} ms"] = inside(served) / total if total else None
    return {
        "served": len(served), "timeouts": len(timed_out), "errors": len(failed),
        "error_kinds": errors, "hung": hung, "ops_s": len(served) / seconds,
        "backends_started": started, "sessions_authorized": authorized,
        "connect_ms": connect_ms, "eligible": eligible, "timeout_range_ms": [low * 1e3, high * 1e3],
        "served_share_eligible": above(served) / eligible if eligible else None,
        "served_share_by_timeout": buckets,
    }
