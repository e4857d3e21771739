"""The duration histograms' arithmetic: buckets, totals, and exact counts under threads."""

from __future__ import annotations

import random
import sys
import threading
import time
from array import array
from bisect import bisect_left
from typing import Any

from greenpool.stats import TIME_BUCKETS, Timing


def test_a_fold_puts_each_value_in_the_bucket_a_bisect_would_and_adds_it_to_the_total():
    """A value equal to a bound is in that bound's bucket (Prometheus' ``le``), one above
    the last bound in the overflow bucket."""
    values = [*TIME_BUCKETS, 0.0, 60.0, *(random.expovariate(100) for _ in range(500))]
    timing = Timing()
    for value in values[:300]:
        timing.values.append(value)
    timing.fold()
    for value in values[300:]:
        timing.record(value)  # waits unfolded (fewer than FOLD_AT) until read
    assert timing.count == len(values)
    expected = [0] * (len(TIME_BUCKETS) + 1)
    for value in values:
        expected[bisect_left(TIME_BUCKETS, value)] += 1
    assert timing.counts == expected
    assert abs(timing.total - sum(values)) < 1e-9
    assert timing.cumulative()[-1] == ("+Inf", len(values))


def test_a_sink_gets_every_folded_value_once():
    timing, seen = Timing(), []
    timing.sinks = (seen.extend,)
    for k in range(100):
        timing.values.append(k / 1000)
        if k % 7 == 0:
            timing.fold()
    timing.fold()
    assert sorted(seen) == [k / 1000 for k in range(100)]


def test_values_appended_while_threads_fold_are_each_counted_once():
    """Appends race with folds (a loan's and a scrape's; real threads in threaded mode):
    every value lands in the histogram exactly once, value for value (the total of
    distinct values shows a value taken twice or dropped)."""
    timing, stop = Timing(), threading.Event()

    def loans() -> None:
        for k in range(5000):
            timing.values.append(float(k))

    def collector() -> None:
        while not stop.is_set():
            timing.fold()
            time.sleep(0)  # (under gevent's patching these threads are greenlets)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        folders = [threading.Thread(target=collector) for _ in range(2)]
        writers = [threading.Thread(target=loans) for _ in range(4)]
        for thread in (*folders, *writers):
            thread.start()
        for thread in writers:
            thread.join(60)
        stop.set()
        for thread in folders:
            thread.join(10)
    finally:
        sys.setswitchinterval(interval)
    assert (timing.count, timing.total) == (20000, 4 * sum(range(5000)))


def _fold_interrupted_at(timing: Timing, line: int) -> bool:
    """``timing.fold()`` with a ``KeyboardInterrupt`` raised as the fold reaches ``line``,
    where a signal handler would run it (a call returned, a loop turned); whether it was."""
    fold_code, raised = Timing.fold.__code__, []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == line and not raised:
            raised.append(line)
            raise KeyboardInterrupt
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is fold_code else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        timing.fold()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(previous)
    return bool(raised)


def test_a_fold_interrupted_at_any_line_counts_each_value_once():
    """A KeyboardInterrupt from a signal handler can stop a fold (a scrape's, a loan's)
    between any two of its lines: wherever it lands, every value is counted exactly once,
    by that fold or by the next, and the total is theirs."""
    code = Timing.fold.__code__
    lines = sorted({line for _, _, line in code.co_lines() if line and line > code.co_firstlineno})
    values = [*TIME_BUCKETS, *(random.expovariate(100) for _ in range(200))]
    expected = [0] * (len(TIME_BUCKETS) + 1)
    for value in values:
        expected[bisect_left(TIME_BUCKETS, value)] += 1
    interrupted = 0
    for line in lines:
        timing = Timing()
        timing.values.extend(array("d", values))
        interrupted += _fold_interrupted_at(timing, line)
        assert timing.count == len(values), f"interrupted at line {line}"
        assert timing.counts == expected, f"interrupted at line {line}"
        assert abs(timing.total - sum(values)) < 1e-9, f"interrupted at line {line}"
    assert interrupted >= len(lines) - 2  # (lines past the commit are not reached on a fold)
