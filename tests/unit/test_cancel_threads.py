"""The cancel requests' OS threads (greenpool.cancel.run_cancel): each counted in flight
exactly while it runs, whatever interrupts the start of its thread."""

from __future__ import annotations

import _thread
import itertools
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from greenpool import cancel


def interrupted_start(began: threading.Event | None) -> Callable[..., Any]:
    """A thread start that a signal handler's exception cuts: after the new thread began
    (``began`` set by its job: the exception lands as the start returns), or before any
    thread was started (None)."""

    def start(function: Callable[..., Any], args: tuple[Any, ...]) -> int:
        if began is not None:
            _thread.start_new_thread(function, args)
            assert began.wait(10)
        raise KeyboardInterrupt

    return start


def test_a_cancel_whose_thread_start_was_cut_after_it_began_runs_once_and_uncounts_once():
    ran = threading.Event()
    before = cancel.cancels_in_flight()
    errors: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, errors.append  # a _thread's errors
    try:
        with pytest.raises(KeyboardInterrupt):
            cancel.run_cancel(ran.set, interrupted_start(ran))
        pause = threading.Event()
        for _ in range(1000):  # the thread uncounts as it ends, just after the job
            if cancel.cancels_in_flight() == before:
                break
            pause.wait(0.01)
    finally:
        sys.unraisablehook = hook
    assert cancel.cancels_in_flight() == before
    assert not errors


def test_a_cancel_whose_thread_never_started_is_not_counted():
    before = cancel.cancels_in_flight()
    with pytest.raises(KeyboardInterrupt):
        cancel.run_cancel(lambda: None, interrupted_start(None))
    assert cancel.cancels_in_flight() == before


def test_a_thread_that_begins_after_its_caller_took_the_job_back_does_nothing():
    """The start raised, then the thread began anyway (the caller judged it not started
    and took its count back): the thread runs no job and takes nothing off."""
    started: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def start_later(function: Callable[..., Any], args: tuple[Any, ...]) -> int:
        started.append((function, args))
        raise KeyboardInterrupt

    ran: list[bool] = []
    before = cancel.cancels_in_flight()
    with pytest.raises(KeyboardInterrupt):
        cancel.run_cancel(lambda: ran.append(True), start_later)
    function, args = started[0]
    function(*args)  # the thread begins now
    assert not ran
    assert cancel.cancels_in_flight() == before


def test_a_cancel_interrupted_as_it_is_counted_is_uncounted():
    """A signal handler's exception lands where a call returns: here, just after the count
    of cancels in flight went up (the next line boundary of ``run_cancel``, where a trace
    function raises it). The thread never started; the count goes back down."""
    before = cancel.cancels_in_flight()
    started: list[Any] = []
    fired: list[int] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and not fired and cancel.cancels_in_flight() > before:
            fired.append(frame.f_lineno)
            raise KeyboardInterrupt
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if event == "call" and frame.f_code is cancel.run_cancel.__code__ else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            cancel.run_cancel(lambda: None, lambda *args: started.append(args))
    finally:
        sys.settrace(previous)
    assert fired
    for function, args in started:  # a thread started after all runs now: it must agree
        function(*args)
    assert cancel.cancels_in_flight() == before



def test_threads_that_read_the_count_at_once_never_run_more_cancels_than_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many OS threads ask for a cancel at once, and each reads the count of those in flight
    before any goes on (a barrier makes the worst interleaving certain): still no more
    than ``MAX_IN_FLIGHT`` run (counted, then checked; checking first let them all in)."""
    askers = 4 * cancel.MAX_IN_FLIGHT
    barrier = threading.Barrier(askers)
    reads = itertools.count()

    class CountReadByAllAtOnce(set):  # type: ignore[type-arg]
        def __len__(self) -> int:
            count = super().__len__()
            if next(reads) < askers:
                barrier.wait(10)  # nobody goes on before all have read it
            return count

    monkeypatch.setattr(cancel, "_in_flight", CountReadByAllAtOnce())
    release, ran = threading.Event(), []

    def job() -> None:
        ran.append(1)
        release.wait(10)

    answers: list[bool] = []
    threads = [threading.Thread(target=lambda: answers.append(
        cancel.run_cancel(job, _thread.start_new_thread))) for _ in range(askers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        admitted = answers.count(True)
    finally:
        release.set()
    assert len(answers) == askers
    assert admitted <= cancel.MAX_IN_FLIGHT, f"{admitted} cancels ran at once"
    assert len(ran) <= cancel.MAX_IN_FLIGHT
    pause = threading.Event()  # never set: each look waits 10 ms (the count has no event)
    for _ in range(1000):  # the admitted ones end once released
        if cancel.cancels_in_flight() == 0:
            break
        pause.wait(0.01)
    assert cancel.cancels_in_flight() == 0
