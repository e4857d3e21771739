"""Eventlet mode resolves host names off the hub and connects by ``hostaddr``.

A DNS server that is slow on purpose cannot be had from the machine's real resolver, so one
runs here on loopback (a real UDP server in an OS thread, answering after a delay) and
eventlet's green resolver is pointed at it: that replacement of the resolver's
configuration is the only injected part.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from faults import Ticker
from modes import MODE

SLOW_NAME = "db.greenpool.test"
DELAY = 0.25  # per DNS answer; greendns asks for AAAA, then A


@pytest.fixture
def slow_dns() -> Iterator[int]:
    """A loopback DNS server that answers every query after DELAY: ``SLOW_NAME`` A is
    127.0.0.1, everything else has no record. Yields its port; eventlet's green resolver
    asks it (and nothing else) until the test ends."""
    import dns.message
    import dns.rdatatype
    import dns.resolver
    import dns.rrset
    from eventlet import patcher
    from eventlet.support import greendns

    real_socket = patcher.original("socket")
    real_threading = patcher.original("threading")
    real_time = patcher.original("time")
    server = real_socket.socket(real_socket.AF_INET, real_socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.1)
    port = server.getsockname()[1]
    stop = real_threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(4096)
            except OSError:
                continue
            query = dns.message.from_wire(data)
            answer = dns.message.make_response(query)
            question = query.question[0]
            if question.rdtype == dns.rdatatype.A and str(question.name) == SLOW_NAME + ".":
                answer.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A",
                                                         "127.0.0.1"))
            real_time.sleep(DELAY)  # blocks this OS thread only, as a distant server would
            server.sendto(answer.to_wire(), peer)

    thread = real_threading.Thread(target=serve, daemon=True)
    thread.start()
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.lifetime = resolver.timeout = 5.0
    saved = greendns.resolver._cached_resolver
    greendns.resolver._resolver = resolver
    try:
        yield port
    finally:
        greendns.resolver._cached_resolver = saved
        stop.set()
        thread.join(2)
        server.close()


eventlet_only = pytest.mark.skipif(MODE != "eventlet", reason="eventlet mode's resolver")


@eventlet_only
def test_eventlet_resolves_localhost_and_connects_by_hostaddr(make_pool, pg):
    from greenpool.concurrency import backend_for

    assert backend_for("eventlet").resolve("localhost", pg.port) == "127.0.0.1"
    assert backend_for("eventlet").resolve("127.0.0.1", pg.port) is None  # nothing to do
    pool = make_pool({"g": {}}, db=pg.endpoint(host="localhost"))
    pc = pool.group("g").acquire()
    try:
        assert pc.raw.info.dsn_parameters.get("hostaddr") == "127.0.0.1"
        with pc.raw.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
    finally:
        pool.group("g").release(pc)


@eventlet_only
@pytest.mark.filterwarnings("ignore:please use dns.resolver.Resolver.resolve")  # eventlet's own
def test_eventlet_slow_dns_does_not_stall_other_green_threads(make_pool, pg, slow_dns):
    """The name is unknown to libpq (no hosts entry, no real DNS): the connect works only
    through the address our green resolver found. While each lookup waits twice DELAY,
    another green thread keeps running."""
    from greenpool.concurrency import backend_for

    backend = backend_for("eventlet")
    ticker = Ticker()
    started = time.monotonic()
    assert backend.resolve(SLOW_NAME, pg.port) == "127.0.0.1"
    assert time.monotonic() - started >= 2 * DELAY * 0.9  # the slow server was really asked
    pool = make_pool({"g": {"timeout": 5}}, db=pg.endpoint(host=SLOW_NAME))
    with pool.handler("g") as db:
        assert db.query_one("SELECT host(inet_server_addr())") == ("127.0.0.1",)
    gap = ticker.stop()
    assert gap < DELAY, f"another green thread stood still for {gap:.2f} s: the hub was blocked"


_NO_GREENDNS = textwrap.dedent(
    """
    import os, socket, sys, warnings
    warnings.simplefilter("ignore")
    import eventlet
    eventlet.monkey_patch()
    from eventlet import patcher
    real = patcher.original("socket")
    real_sleep = patcher.original("time").sleep
    system_getaddrinfo = real.getaddrinfo

    def slow_getaddrinfo(*args):  # injected: the system resolver cannot be made slow here
        real_sleep(0.3)
        return system_getaddrinfo(*args)

    real.getaddrinfo = slow_getaddrinfo
    from greenpool.concurrency import backend_for
    backend = backend_for("eventlet")
    ticks = [0]
    def tick():
        while True:
            eventlet.sleep(0.01)
            ticks[0] += 1
    eventlet.spawn(tick)
    eventlet.sleep(0)
    print("parent", backend.resolve("localhost", 5432), ticks[0] >= 10, flush=True)
    pid = os.fork()
    if pid == 0:
        with eventlet.Timeout(5, False):
            print("child", backend.resolve("localhost", 5432), flush=True)
            os._exit(0)
        print("child hung", flush=True)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status), flush=True)
    """
)


def test_without_greendns_eventlet_resolves_in_its_thread_pool_and_after_fork():
    """With ``EVENTLET_NO_GREENDNS=yes`` eventlet's getaddrinfo blocks: the system resolver
    (made slow by an injected wrapper) runs in eventlet's thread pool while green threads
    run on; a forked child, where that pool has no threads, still gets an answer."""
    pytest.importorskip("eventlet")  # the child process runs eventlet: its test env has it
    env = {**os.environ, "EVENTLET_NO_GREENDNS": "yes",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(),
                                                       os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _NO_GREENDNS], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    lines = out.stdout.splitlines()
    assert lines == ["parent 127.0.0.1 True", "child 127.0.0.1", "child exit 0"], out.stderr
