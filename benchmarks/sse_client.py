"""The clients of benchmarks/sse_fanout.py: N ``GET /events`` streams in one process, read
with plain non-blocking sockets and ``epoll`` (no event-loop library: the client shares the
machine's cores with the server it measures, so it spends as little CPU per event as it can).

``python -m benchmarks.sse_client PORT N SLOW LATENCY_FILE``; SLOW ``1`` makes the first
stream one that stops reading once it is served. It prints one JSON line when the streams are
connected (``{"connected": k}``), then follows its standard input: ``go`` starts a measured
phase, ``end`` ends it: each event's (send time, receive time) pair goes to LATENCY_FILE
(float64s, ``time.time()`` seconds) and a JSON line says how many events, reads
(``recv()`` calls that returned data), streams served and streams ended.

**Honest latency.** Each event's data is ``<seq> <send time>``, the send time taken by the
notifier *before* its ``pg_notify`` commits. The receive time is read right after the
``recv()`` that returned the event's last byte (the bytes were in the kernel before that),
and every event is counted: a client that falls behind shows it as latency, never hides it.

**Cheap while measuring.** During the phase a read only appends the bytes to the stream's
buffer and notes (end offset, receive time); the events are parsed after ``end``, when the
CPU no longer competes with what is measured. Memory: about 70 bytes per event received.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterable

REQUEST = b"GET /events HTTP/1.1\r\nHost: bench\r\n\r\n"
READY = b"retry: 2000"  # the stream's first event: the listener is listening
EVENT = re.compile(rb"data: (\d+) ([0-9.e+-]+)\n")  # the notifier's "<seq> <send time>"
CONNECT_WITHIN = 60.0  # seconds for every stream to be served
READ_SIZE = 16384


class Stream:
    __slots__ = ("buf", "marks", "recv", "served", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recv = sock.recv
        self.buf = bytearray()  # everything read since the phase began
        self.marks = array("d")  # per read: buf's length after it, its receive time
        self.served = False


def main(argv: list[str]) -> int:
    port, n, slow, latency_file = int(argv[0]), int(argv[1]), argv[2] == "1", argv[3]
    tick = float(argv[4]) / 1000 if len(argv) > 4 else 0.0
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
    stdin_fd = stdin.fileno()
    poller.register(stdin_fd, select.EPOLLIN)

    now = time.time
    reads = served = ended = 0
    announced = False
    connect_deadline = time.monotonic() + CONNECT_WITHIN
    commands = b""
    while True:
        if not announced and (served == n or time.monotonic() > connect_deadline):
            announced = True
            print(json.dumps({"connected": served}), flush=True)
        if tick:
            time.sleep(tick)
        for fd, _ in poller.poll(1.0 if not announced else -1):
            stream = streams.get(fd)
            if stream is None:  # stdin
                chunk = os.read(fd, 4096)
                commands += chunk if chunk else b"end\n"  # the benchmark went away
                while b"\n" in commands:
                    command, commands = commands.split(b"\n", 1)
                    if command == b"go":
                        reads = 0
                        for stream in streams.values():
                            del stream.buf[:]
                            del stream.marks[:]
                    elif command == b"end" or not command:
                        for stream in streams.values():
                            stream.sock.close()
                        events = write_latencies(streams.values(), latency_file)
                        print(json.dumps({"served": served, "events": events,
                                          "reads": reads, "ended": ended}), flush=True)
                        return 0
                continue
            try:
                data = stream.recv(READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            received = now()
            if not data:
                poller.unregister(fd)
                ended += 1
                continue
            reads += 1
            buf = stream.buf
            buf += data
            stream.marks.append(len(buf))
            stream.marks.append(received)
            if not stream.served:
                start = buf.find(READY)
                if start < 0:
                    continue
                stream.served = True
                served += 1
                del buf[:start + len(READY)]
                del stream.marks[:]
                stream.marks.append(len(buf))
                stream.marks.append(received)
                if fd == slow_fd:
                    poller.unregister(fd)  # never reads again


def write_latencies(streams: Iterable[Stream], latency_file: str) -> int:
    """Parse what each stream read: every event's (send time, receive time) to the file;
    how many events. An event was received by the read that brought its last byte."""
    times = array("d")
    for stream in streams:
        ends, at = stream.marks[::2], stream.marks[1::2]
        for match in EVENT.finditer(stream.buf):
            read = bisect_left(ends, match.end())
            if read < len(at):
                times.append(float(match.group(2)))
                times.append(at[read])
    with open(latency_file, "wb") as out:
        times.tofile(out)
    return len(times) // 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
