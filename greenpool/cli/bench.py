"""``greenpool bench CONFIG``: load one group of your configuration and say how it held up.

N greenlets run a statement through ``handler(group)`` in a loop for T seconds, with a live
progress line. Then: throughput, latency percentiles, time spent waiting for a
connection, errors by kind, and the pool's own stats. It is for sizing a group against
your server. Comparing pools is the job of ``benchmarks/``.

The run ends on time whatever the server does: no acquire may wait past the end, and a
statement still running one acquire timeout after it is cut off. When nothing at all was
served, one line says why (the errors seen, what the endpoints last reported) and the exit
status is 1.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import Counter
from typing import Any

from .config_file import read_config
from .process import (
    BAD_INPUT,
    FAILED,
    OK,
    UNREACHABLE,
    CheckFailed,
    end_progress,
    shielded,
    write_progress,
)

MIN_WAIT = 0.001  # the shortest acquire timeout bench asks for near the end of the run


def _percentile(sorted_values: list[float], share: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(share * len(sorted_values)))
    return sorted_values[index]


def run(path: str | None, group: str | None, clients: int, seconds: float, sql: str) -> int:
    from gevent import monkey

    monkey.patch_all()
    import gevent

    import greenpool
    from greenpool.errors import PoolError

    # the load is greenlets, so the pool is a gevent one whatever the configuration's type
    config = dataclasses.replace(read_config(path), mode="gevent")
    group = _group_to_load(config.groups, group)
    events = _Events()  # the pool's log lines, in the report rather than over the progress line
    log = logging.getLogger("greenpool")
    log.addHandler(events)
    log.propagate = False
    try:
        try:
            pool = greenpool.Pool(config)  # with startup_timeout: waits for the server
        except PoolError as exc:
            raise CheckFailed(f"cannot reach the database: {type(exc).__name__}: {exc}",
                              UNREACHABLE) from None
        try:
            return _load(pool, group, clients, seconds, sql, gevent, events)
        finally:
            with shielded():
                pool.close()
    finally:
        log.removeHandler(events)
        log.propagate = True


def _group_to_load(groups: Any, asked: str | None) -> str:
    """The group ``--group`` names, or the only one; else a sentence saying what to pass."""
    names = ", ".join(repr(name) for name in groups)
    if asked is None:
        if len(groups) == 1:
            return str(next(iter(groups)))
        raise CheckFailed(f"the configuration has {len(groups)} groups ({names}); name the one "
                          f"to load with --group, e.g. --group {next(iter(groups))}", BAD_INPUT)
    if asked not in groups:
        raise CheckFailed(f"--group {asked}: no such group in the configuration; its groups: "
                          f"{names}", BAD_INPUT)
    return asked


class _Events(logging.Handler):
    """Counts the pool's WARNING+ lines and keeps the last few."""

    KEEP = 5

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.last: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.last = [*self.last[-(self.KEEP - 1):], " ".join(record.getMessage().split())]


def _load(pool: Any, name: str, clients: int, seconds: float, sql: str, gevent: Any,
          events: _Events) -> int:
    from greenpool.errors import PoolTimeout

    acquire_timeout = pool.config.groups[name].timeout
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    cut_short = [0]  # acquires the end of the run cut short: the pool counts them as timeouts
    samples: dict[str, str] = {}  # one message per kind of error, for the diagnosis
    started = time.monotonic()
    deadline = started + seconds

    def client() -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            began = time.perf_counter()
            wait = max(MIN_WAIT, min(acquire_timeout, left))
            try:
                with pool.handler(name, timeout=wait) as db:
                    db.query(sql)
                latencies.append(time.perf_counter() - began)
            except Exception as exc:  # counted by kind and reported
                if type(exc) is PoolTimeout and wait < acquire_timeout:
                    cut_short[0] += 1  # a wait cut short by the end of the run: not an error
                    return
                kind = type(exc).__name__
                errors[kind] += 1
                samples.setdefault(kind, " ".join(str(exc).split())[:200])
                gevent.sleep(0.01)  # do not spin on a failing server

    def progress() -> None:
        target = pool.group(name)
        while time.monotonic() < deadline:
            gevent.sleep(0.5)
            elapsed = time.monotonic() - started
            stats = target.stats()
            write_progress(
                f"{elapsed:5.1f}s  {len(latencies) / elapsed:9.0f} ops/s  "
                f"in use {stats['in_use']}/{stats['max_size']}  waiting {stats['waiting']:4d}  "
                f"errors {sum(errors.values())}   "
            )

    tasks = [gevent.spawn(client) for _ in range(clients)]
    ticker = gevent.spawn(progress)
    try:
        # a statement still running one acquire timeout past the end is cut off
        gevent.joinall(tasks, timeout=deadline + acquire_timeout - time.monotonic())
        cut_off = sum(1 for task in tasks if not task.dead)
    finally:
        with shielded():
            gevent.killall([*tasks, ticker])
    elapsed = time.monotonic() - started
    stats = pool.stats()
    done = sorted(latencies)
    group_stats = stats["groups"][name]
    end_progress()
    print(f"\ngroup {name!r}: {clients} greenlets for {seconds:g} s running {sql!r}")
    print(f"  throughput: {len(done) / elapsed:.0f} ops/s ({len(done)} ok)")
    print("  latency ms: " + "  ".join(
        f"p{q * 100:g} {_percentile(done, q) * 1000:.2f}" for q in (0.5, 0.9, 0.99, 0.999)))
    waited = group_stats["wait_time"] / max(group_stats["waits"], 1)
    print(f"  waits for a connection: {group_stats['waits']} (mean {waited * 1000:.2f} ms)")
    print(f"  errors: {dict(errors) if errors else 0}")
    if cut_short[0]:
        print(f"  waits cut short by the end of the run: {cut_short[0]} (not errors; the "
              f"pool's timeouts count them)")
    if cut_off:
        print(f"  statements cut off at the end: {cut_off}")
    print(f"  pool: {_compact(group_stats)}")
    for label, endpoint in stats["endpoints"].items():
        print(f"  endpoint {label}: {_compact(endpoint)}")
    if events.count:
        print(f"  pool warnings: {events.count}, the last {len(events.last)}:")
        for line in events.last:
            print(f"    {line}")
    sys.stdout.flush()
    if done:
        return OK
    connect_timeouts = {ep.label: ep.connect_timeout for ep in pool.config.endpoints}
    why = _diagnosis(errors, samples, cut_off, stats["endpoints"], connect_timeouts)
    raise CheckFailed(f"nothing was served in {elapsed:.1f} s: {why}", FAILED)


def _diagnosis(errors: Counter[str], samples: dict[str, str], cut_off: int,
               endpoints: dict[str, dict[str, Any]], connect_timeouts: dict[str, float]) -> str:
    """Why nothing was served, in one line: the commonest errors, then what each endpoint
    last reported (a connect not yet answered is said so, not "up")."""
    parts = [f"{count} x {kind} ({samples[kind]})" for kind, count in errors.most_common(2)]
    if cut_off:
        parts.append(f"{cut_off} statements still running at the end")
    for label, values in endpoints.items():
        parts.append(f"endpoint {label}: {_last_report(values, connect_timeouts.get(label))}")
    return "; ".join(parts)


def _last_report(values: dict[str, Any], connect_timeout: float | None) -> str:
    """What an endpoint last told the pool, in words."""
    pending = values["connect_attempts"] - values["connects"] - values["connect_errors"]
    if values["last_error"]:
        return f"{values['state']}, last error: {values['last_error']}"
    if not values["connect_attempts"]:
        return "no connect was attempted"
    if pending > 0 and not values["connects"]:
        within = f" (connect_timeout {connect_timeout:g} s)" if connect_timeout else ""
        return f"no answer yet to {pending} connect(s) under way{within}"
    return f"{values['state']}, {values['connects']} connect(s) succeeded"


def _compact(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} {' '.join(str(value).split())}" for key, value in values.items()
                     if value not in (None, {}))
