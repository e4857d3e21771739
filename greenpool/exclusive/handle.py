"""The public handle of ``with pool.exclusive('write') as conn:``."""

from __future__ import annotations

from typing import Any

from ..connection import PooledConnection
from .slots import ExclusiveSlots


class Exclusive:
    """``with pool.exclusive('write') as conn:``: a raw psycopg2 connection of the caller's
    own for the block (the group's autocommit and session settings; a transaction left open
    is rolled back when it is closed at the end). Single-use."""

    __slots__ = ("_generation", "_pc", "_slots", "_timeout", "_used")

    def __init__(self, slots: ExclusiveSlots, timeout: float | None) -> None:
        self._slots = slots
        self._timeout = timeout
        self._pc: PooledConnection | None = None
        self._used = False
        self._generation = slots.generation

    def __enter__(self) -> Any:
        if self._used:
            raise RuntimeError("an exclusive() block is single-use: call exclusive() again")
        self._used = True
        slots = self._slots
        deadline = slots.deadline(self._timeout)  # one bound for the unit and the connect
        self._generation = slots.generation
        slots.take(self._timeout)
        try:
            self._pc = slots.open(deadline)
        except BaseException:
            if self._generation == slots.generation:  # else taken before a fork
                slots.give()
            raise
        return self._pc.raw

    def __exit__(self, *exc_info: object) -> None:
        pc, self._pc = self._pc, None
        if pc is None:
            return
        try:
            self._slots.close_connection(pc)
        finally:
            if self._generation == self._slots.generation:  # else taken before a fork
                self._slots.give()

    @property
    def endpoint(self) -> str | None:
        """The label of the endpoint the connection is to (None outside the block)."""
        return self._pc.endpoint.label if self._pc is not None else None

    def __repr__(self) -> str:
        where = self.endpoint or "not in a block"
        return f"<Exclusive group={self._slots.group.name!r} {where}>"
