"""The testing helpers' one registry of servers left to stop: what this process made is
stopped at exit, newest first; what a forked child inherited is never stopped there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from forking import run_in_forked_child
from modes import MODE

from greenpool.testing import processes
from greenpool.testing.processes import inherited, register, stop_started, unregister


class Server:
    def __init__(self, name: str, stopped: list[str], fails: bool = False) -> None:
        self.name, self.stopped, self.fails = name, stopped, fails

    def stop(self) -> None:
        self.stopped.append(self.name)
        unregister(self)
        if self.fails:
            raise RuntimeError(f"{self.name} would not stop")


class Bouncer(Server):
    pass


@pytest.fixture
def stopped() -> Iterator[list[str]]:
    """The names of the stand-ins stopped, in order; none left registered after the test."""
    before = dict(processes._started)
    stopped: list[str] = []
    yield stopped
    processes._started.clear()
    processes._started.update(before)


def test_what_this_process_made_is_stopped_newest_first_even_if_one_fails(
    stopped: list[str],
) -> None:
    servers = [Server("cluster", stopped), Bouncer("bouncer", stopped, fails=True),
               Server("standby", stopped)]
    for server in servers:
        register(server, server.stop)
    unregister(servers[2])  # stopped by its test: nothing left for the hook
    stop_started()
    assert stopped == ["bouncer", "cluster"]
    assert not any(id(server) in processes._started for server in servers)


class Interrupted(Server):
    def stop(self) -> None:
        super().stop()
        raise KeyboardInterrupt  # a second Ctrl-C while the exit hook waits for it


def test_an_interrupted_stop_keeps_none_of_the_others_running_and_is_raised_after(
    stopped: list[str],
) -> None:
    servers = [Server("cluster", stopped), Interrupted("bouncer", stopped),
               Server("standby", stopped)]
    for server in servers:
        register(server, server.stop)
    with pytest.raises(KeyboardInterrupt):
        stop_started()
    assert stopped == ["standby", "bouncer", "cluster"]


def test_only_the_kind_asked_for_is_stopped(stopped: list[str]) -> None:
    cluster, bouncer = Server("cluster", stopped), Bouncer("bouncer", stopped)
    register(cluster, cluster.stop)
    register(bouncer, bouncer.stop)
    stop_started(Bouncer)
    assert stopped == ["bouncer"]
    assert id(cluster) in processes._started


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_a_forked_child_stops_none_of_its_parents_servers(stopped: list[str]) -> None:
    cluster = Server("cluster", stopped)
    register(cluster, cluster.stop)

    def in_child() -> str:
        stop_started()  # what the child's exit hook does
        mine = Server("child's own", stopped)
        register(mine, mine.stop)
        stop_started()
        return f"{inherited(cluster)} {stopped}"

    assert run_in_forked_child(in_child, timeout=10) == "True [\"child's own\"]"
    assert not inherited(cluster) and id(cluster) in processes._started
    assert stopped == []
