"""Background tasks one owner starts and ends together (a group's connect tasks).

Ending them differs by mode: a green task is killed wherever it waits; a thread cannot be,
so it ends at its next look at :attr:`BackgroundTasks.stopped`, and its pauses
(:meth:`BackgroundTasks.pause`) wake at once when :meth:`BackgroundTasks.stop` is called.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .backend import Backend, Task


class BackgroundTasks:
    """The tasks :meth:`spawn` started and that have not ended yet."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._tasks: set[Task] = set()
        self._stopping = threading.Event()
        self.stopped = False
        #: why the latest task could not start (a process limit on threads), if so
        self.cannot_start: str | None = None

    def spawn(self, work: Callable[[], None], not_started: Callable[[], None]) -> bool:
        """Run ``work`` in a task of its own that :meth:`stop` ends; False if no task could
        start (:attr:`cannot_start` says why). Exactly one of ``work`` and ``not_started``
        runs (unless the task is killed before it begins: then neither, and what ``work``
        held is collected).

        Starting a thread can be interrupted after the thread began (a signal handler's
        exception in ``Thread.start()``'s wait for it): the work is then the task's, and the
        exception goes on. Who owns the work is settled in one atomic step, ``list.pop()``
        on a one-item list: the task pops it as it begins; the spawner, interrupted or
        refused, pops it back if it still can and then runs ``not_started``.
        """
        holder: list[Task] = []
        claim = [work]

        def run() -> None:
            try:
                mine = claim.pop()
            except IndexError:
                return  # the spawner took it back: it counts this task as never started
            try:
                mine()
            finally:
                for task in holder:
                    self._tasks.discard(task)

        try:
            task = self._backend.spawn(run)
        except BaseException as exc:  # RuntimeError: can't start new thread; or interrupted
            try:
                claim.pop()
            except IndexError:
                reclaimed = False  # the task has the work and runs it
            else:
                reclaimed = True
            if not reclaimed:
                raise
            not_started()
            if not isinstance(exc, Exception):
                raise
            self.cannot_start = f"{type(exc).__name__}: {exc}"
            return False
        self.cannot_start = None
        if task is not None:
            holder.append(task)
            self._tasks.add(task)
        return True

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, cut short by :meth:`stop`."""
        if self._backend.can_call_later:
            self._backend.sleep(seconds)  # green: stop() kills the task
        else:
            self._stopping.wait(seconds)

    def stop(self) -> None:
        """Green tasks are killed; a thread ends at its next look (a pause is cut short)."""
        self.stopped = True
        self._stopping.set()
        for task in list(self._tasks):
            task.kill()

    def forget_after_fork(self) -> None:
        """In the child: the parent's tasks are not the child's."""
        self._tasks = set()
        self._stopping = threading.Event()
