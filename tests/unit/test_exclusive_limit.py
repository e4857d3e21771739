"""The fair limit under ``exclusive_limit``: first come, first served, and no unit lost to
a waiter that gives up, in this process's mode (no server)."""

from __future__ import annotations

import pytest
from modes import MODE, Timeout, join_all, spawn, wait_until

from greenpool.concurrency import backend_for
from greenpool.exclusive.limit import FairLimit


class Closed(Exception):
    pass


class TimedOut(Exception):
    pass


def take(limit: FairLimit, wait_for: float) -> None:
    limit.take(wait_for, Closed, TimedOut)


def test_a_unit_given_back_goes_to_the_oldest_waiter_before_anyone_who_asks_later():
    limit = FairLimit(backend_for(MODE), 1)
    take(limit, 0)
    served: list[str] = []

    def waiter(name: str) -> None:
        take(limit, 10)
        served.append(name)

    first = spawn(waiter, "first")
    wait_until(lambda: limit.waiting == 1, 5, "the first waiter to queue")
    second = spawn(waiter, "second")
    wait_until(lambda: limit.waiting == 2, 5, "the second waiter to queue")
    limit.give()
    with pytest.raises(TimedOut):  # the giver asks again at once: it does not overtake
        take(limit, 0)
    wait_until(lambda: served == ["first"], 5, "the first waiter to be served")
    limit.give()
    join_all([first, second], 5)
    assert served == ["first", "second"] and limit.taken == 1 and limit.waiting == 0


def test_a_wait_that_times_out_leaves_the_line_and_takes_nothing():
    limit = FairLimit(backend_for(MODE), 1)
    take(limit, 0)
    with pytest.raises(TimedOut):
        take(limit, 0.05)
    assert limit.waiting == 0 and limit.taken == 1
    limit.give()
    assert limit.taken == 0


@pytest.mark.skipif(MODE != "gevent", reason="killing a waiting greenlet in the same turn")
def test_a_waiter_killed_after_the_hand_off_passes_the_unit_on():
    """The waiter's Timeout has fired (its exception is on the way) when the unit is handed
    to it: the unit goes to the next waiter, not lost with the interrupted one."""
    import gevent

    limit = FairLimit(backend_for(MODE), 1)
    take(limit, 0)
    served: list[str] = []

    def waiter(name: str) -> None:
        take(limit, 10)
        served.append(name)

    killed = gevent.spawn(waiter, "killed")
    wait_until(lambda: limit.waiting == 1, 5, "the first waiter to queue")
    patient = spawn(waiter, "patient")
    wait_until(lambda: limit.waiting == 2, 5, "the second waiter to queue")
    killed.kill(Timeout, block=False)  # the interruption is scheduled first
    limit.give()  # then the hand-off lands, before the first waiter runs again
    join_all([patient], 5)
    assert killed.dead and isinstance(killed.exception, Timeout)
    assert served == ["patient"] and limit.taken == 1 and limit.waiting == 0


def test_closing_wakes_every_waiter_with_the_closed_error():
    limit = FairLimit(backend_for(MODE), 1)
    take(limit, 0)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            take(limit, 10)
        except Closed as exc:
            errors.append(exc)

    tasks = [spawn(waiter) for _ in range(3)]
    wait_until(lambda: limit.waiting == 3, 5, "three waiters to queue")
    limit.close(Closed)
    join_all(tasks, 5)
    assert len(errors) == 3
    with pytest.raises(Closed):
        take(limit, 0)
