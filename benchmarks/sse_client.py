"""The clients of benchmarks/sse_fanout.py: N ``GET /events`` streams in one process, read
with plain non-blocking sockets and ``epoll`` (no event-loop library: the client shares the
machine's cores with the server it measures, so it spends as little CPU per event as it can).

``python -m benchmarks.sse_client PORT N SLOW LATENCY_FILE``; SLOW ``1`` makes the first
stream one that stops reading once it is served. It prints one JSON line when the streams are
connected (``{"connected": k}``), then follows its standard input: ``go`` starts a measured
phase (what came before is forgotten), ``end`` ends it: each event's (send time, receive
time) pair goes to LATENCY_FILE (float64s, ``time.time()`` seconds) and a JSON line says how
many events, streams served and streams ended.

**Honest latency.** Each event's data is ``<seq> <send time>``, the send time taken by the
notifier *before* its ``pg_notify`` commits. The receive time is read right after the
``recv()`` that returned the event's bytes (the bytes were in the kernel before that), and
every event is counted: a client that falls behind shows it as latency, never hides it.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from array import array

REQUEST = b"GET /events HTTP/1.1\r\nHost: bench\r\n\r\n"
READY = b"retry: 2000"  # the stream's first event: the listener is listening
DATA = b"data: "
CONNECT_WITHIN = 60.0  # seconds for every stream to be served


class Stream:
    __slots__ = ("buf", "served", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.served = False


def main(argv: list[str]) -> int:
    port, n, slow, latency_file = int(argv[0]), int(argv[1]), argv[2] == "1", argv[3]
    poller = select.epoll()
    streams: dict[int, Stream] = {}
    for i in range(n):
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            if slow and i == 0:  # its buffers fill soon once it stops reading
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(REQUEST)
        except OSError:  # refused or reset: a client not served, as the report says
            continue
        sock.setblocking(False)
        streams[sock.fileno()] = Stream(sock)
        poller.register(sock.fileno(), select.EPOLLIN)
    slow_fd = next(iter(streams), -1) if slow else -1
    stdin = sys.stdin.buffer.raw  # type: ignore[attr-defined]
    poller.register(stdin.fileno(), select.EPOLLIN)

    times = array("d")  # send, receive, send, receive, ...
    append = times.append
    now = time.time
    events = served = ended = 0
    measuring = announced = False
    connect_deadline = time.monotonic() + CONNECT_WITHIN
    commands = b""
    while True:
        if not announced and (served == n or time.monotonic() > connect_deadline):
            announced = True
            print(json.dumps({"connected": served}), flush=True)
        for fd, _ in poller.poll(1.0 if not announced else -1):
            if fd == stdin.fileno():
                commands += os.read(fd, 4096)
                while b"\n" in commands:
                    command, commands = commands.split(b"\n", 1)
                    if command == b"go":
                        del times[:]
                        events, measuring = 0, True
                    elif command == b"end" or not command:
                        with open(latency_file, "wb") as out:
                            times.tofile(out)
                        print(json.dumps({"served": served, "events": events,
                                          "ended": ended}), flush=True)
                        for stream in streams.values():
                            stream.sock.close()
                        return 0
                continue
            stream = streams[fd]
            try:
                data = stream.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            received = now()
            if not data:
                poller.unregister(fd)
                ended += 1
                continue
            buf = stream.buf + data if stream.buf else data
            if not stream.served:
                start = buf.find(READY)
                if start < 0:
                    stream.buf = buf
                    continue
                stream.served = True
                served += 1
                if fd == slow_fd:
                    poller.unregister(fd)  # never reads again
                    continue
                buf = buf[start + len(READY):]
            pos = 0
            while True:
                start = buf.find(DATA, pos)
                if start < 0:
                    stream.buf = buf[-len(DATA):]  # a "data: " cut in two comes later
                    break
                end = buf.find(b"\n", start)
                if end < 0:
                    stream.buf = buf[start:]
                    break
                parts = buf[start + len(DATA):end].split()
                if len(parts) == 2 and measuring:
                    events += 1
                    append(float(parts[1]))
                    append(received)
                pos = end


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
