"""What one delivered SSE event costs a gevent worker, measured where load cannot blur it.

``python -m benchmarks.sse_cost [--streams 500] [--rounds 200]`` runs, in one gevent
process, what a gunicorn worker of examples/gunicorn runs for ``GET /events``: the example's
``application`` gives each stream its body, and one greenlet per stream writes it as gunicorn
does (``gunicorn.util.write_chunk``: chunked encoding, gevent ``sendall``) to a loopback TCP
socket whose peer never reads during the rounds (200 events of a stream fit in its buffers).
A notifier sends one ``pg_notify`` and waits until every stream has written it before it
sends the next: one event per write, as on a machine that keeps up. The process's CPU time
over the rounds divided by the events delivered is the worker's CPU per event (user and
kernel: the kernel's part is mostly the loopback send, the receiving side's TCP work
included). benchmarks/sse_fanout.py measures the same on real gunicorn with real clients,
but there the machine's load changes how many events go in one write.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after patching, as a gunicorn worker imports them)
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gunicorn.util import write_chunk  # noqa: E402

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "gunicorn"
DB = "sse_cost"
TRIALS = 5  # the cheapest is reported: outside load only ever adds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=100, help="notifications per trial")
    args = parser.parse_args(argv)

    from greenpool.testing.postgres import Cluster

    with Cluster() as cluster:
        cluster.create_database(DB)
        os.environ["GREENPOOL_CONFIG"] = json.dumps({
            "db": cluster.endpoint(name=DB), "type": "gevent",
            "groups": {"write": {"connection_count": 1, "exclusive_limit": 1},
                       "read": {"connection_count": 1, "autocommit": True}}})
        sys.path.insert(0, str(EXAMPLE))
        app = importlib.import_module("app")
        app.open_pool()
        try:
            result = measure(app, cluster, args.streams, args.rounds)
        finally:
            app.close_pool()
    print(json.dumps(result))
    return 0


def measure(app: Any, cluster: Any, streams: int, rounds: int) -> dict[str, Any]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(streams)
    peers, written = [], [0]
    all_written = gevent.event.Event()
    target = [streams]  # writes that end the current round

    def serve(sock: socket.socket) -> None:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/events", "gunicorn.socket": sock}
        body = app.application(environ, lambda status, headers: None)
        try:
            for chunk in body:
                write_chunk(sock, chunk)
                written[0] += 1
                if written[0] >= target[0]:
                    all_written.set()
        finally:
            body.close()

    tasks = []
    for _ in range(streams):
        peer = socket.create_connection(listener.getsockname())
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gunicorn does
        peers.append(peer)
        tasks.append(gevent.spawn(serve, sock))
    all_written.wait(30)  # every stream sent its "retry:" line: it is listening
    sender = cluster.connect(dbname=DB)
    cur = sender.cursor()
    trials = []
    for _trial in range(TRIALS):
        started, started_wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        for n in range(rounds):
            all_written.clear()
            target[0] = written[0] + streams
            cur.execute("SELECT pg_notify('notes', %s)", (f"{n} {time.time()!r}",))
            if not all_written.wait(30):
                raise RuntimeError(f"round {n}: {target[0] - written[0]} streams did not write")
        ended, ended_wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        trials.append((ended.ru_utime - started.ru_utime, ended.ru_stime - started.ru_stime,
                       ended_wall - started_wall))
        for peer in peers:  # empty the peers' buffers (not measured)
            while peer.recv(1 << 20, socket.MSG_DONTWAIT) if poll_readable(peer) else b"":
                pass
    sender.close()
    app.end_streams()
    gevent.joinall(tasks, timeout=10)
    for peer in peers:
        peer.close()
    events = rounds * streams
    user, system, wall = min(trials, key=lambda t: t[0] + t[1])
    return {"streams": streams, "rounds": rounds, "trials": len(trials),
            "cpu_us_per_event_each_trial": [round((u + s) / events * 1e6, 2)
                                            for u, s, _ in trials],
            "cpu_us_per_event": round((user + system) / events * 1e6, 2),
            "user_us_per_event": round(user / events * 1e6, 2),
            "system_us_per_event": round(system / events * 1e6, 2),
            "wall_ms_per_round": round(wall / rounds * 1000, 2),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def poll_readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])

if __name__ == "__main__":
    sys.exit(main())
