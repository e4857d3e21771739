"""Whether a ``with`` block is still open, read from the frames and the exception table."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from greenpool.open_blocks import block_open

needs_exception_table = pytest.mark.skipif(
    sys.version_info < (3, 11) or sys.version_info >= (3, 14),
    reason="BEFORE_WITH and the exception table: CPython 3.11 to 3.13")


class Recorder:
    """A context manager that records the frame and offset of the with statement that
    entered it, as Handler.__enter__ does."""

    def __init__(self) -> None:
        self.frame: Any = None
        self.at = -1

    def __enter__(self) -> Recorder:
        self.frame = sys._getframe(1)
        self.at = self.frame.f_lasti
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def asked_here(rec: Recorder) -> bool | None:
    return block_open(rec.frame, rec.at, sys._getframe(1))


@needs_exception_table
def test_inside_the_body_and_inside_a_try_within_it_the_block_is_open() -> None:
    rec = Recorder()
    with rec:
        assert asked_here(rec) is True
        try:
            assert asked_here(rec) is True
            raise KeyError
        except KeyError:
            assert asked_here(rec) is True
        finally:
            assert asked_here(rec) is True
        for _ in range(2):
            with contextlib.suppress(ValueError):
                assert asked_here(rec) is True


@needs_exception_table
def test_from_a_function_called_inside_the_body_the_block_is_open() -> None:
    rec = Recorder()

    def deeper() -> bool | None:
        return block_open(rec.frame, rec.at, sys._getframe(0))

    with rec:
        assert deeper() is True
    assert deeper() is False


@needs_exception_table
def test_after_the_statement_and_at_it_again_in_a_loop_the_block_is_over() -> None:
    recs = [Recorder(), Recorder()]
    seen = []
    for rec in recs:
        if rec is recs[1]:  # the same with statement again: the first block is over
            seen.append(asked_here(recs[0]))
        with rec:
            pass
    seen.append(asked_here(recs[1]))  # a later statement of the same frame
    assert seen == [False, False]


@needs_exception_table
def test_a_returned_function_s_block_is_over() -> None:
    def enters() -> Recorder:
        with Recorder() as rec:
            return rec

    rec = enters()
    assert asked_here(rec) is False


@needs_exception_table
def test_a_generator_suspended_inside_its_block_keeps_it_open_until_it_leaves() -> None:
    @contextlib.contextmanager
    def wrapped() -> Iterator[Recorder]:
        with Recorder() as rec:
            yield rec

    with wrapped() as rec:
        assert asked_here(rec) is True
    assert asked_here(rec) is False


def test_a_block_entered_without_its_own_with_statement_is_unknown() -> None:
    rec = Recorder()
    rec.__enter__()  # by hand: no BEFORE_WITH at the caller's offset
    assert asked_here(rec) is None
    with contextlib.ExitStack() as stack:
        entered = stack.enter_context(Recorder())
        assert asked_here(entered) is None
