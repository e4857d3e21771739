"""SSE fan-out: N concurrent ``GET /events`` clients on the example app (``gunicorn -k gevent``,
2 workers), notifications at a steady rate: server connections used, delivery latency, memory
per subscriber, then the same with one client that stops reading.

``python -m benchmarks.sse_fanout [--clients 1000] [--rate 100] [--seconds 10]
[--out benchmarks/results]``. Everything runs on this machine: a throwaway PostgreSQL, the
gunicorn master and workers, one gevent client process holding every stream, and a notifier
sending ``pg_notify('notes', '<seq> <time>')`` (the example streams the payload as the event's
data, so each event carries its send time). Latency is measured on every client's events
(send time to the client reading it); the notifier and the clients share the clock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "gunicorn"
APP_NAME = "greenpool-sse-bench"
DB = "sse_bench"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def listening_connections(cluster: Any) -> int:
    """Sessions of the app listening on a channel: their last statement was the LISTEN or a
    heartbeat (the pooled group connections run the app's queries)."""
    return int(cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND (query LIKE 'LISTEN %%' OR query = 'SELECT 1')", (APP_NAME,))[0][0])


# --- the client process: every stream in one gevent process ----------------------------------

CLIENT = r'''
import gevent.monkey; gevent.monkey.patch_all()
import json, socket, sys, time
import gevent
port, n, seconds, slow = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
latencies, served, ended, events = [], [0], [0], [0]
def stream(i):
    s = socket.socket()
    if slow and i == 0:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b"retry: 2000" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return
            buf += chunk
        served[0] += 1
        if slow and i == 0:
            gevent.sleep(seconds + 30)  # never reads again
            return
        buf = buf[buf.index(b"retry: 2000"):]
        while True:
            chunk = s.recv(65536)
            if not chunk:
                ended[0] += 1
                return
            now = time.time()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    parts = line[6:].split()
                    if len(parts) == 2:
                        events[0] += 1
                        latencies.append(now - float(parts[1]))
    except OSError:
        return
    finally:
        s.close()
tasks = [gevent.spawn(stream, i) for i in range(n)]
deadline = time.time() + 60
while served[0] < n and time.time() < deadline:
    gevent.sleep(0.1)
print(json.dumps({"connected": served[0]}), flush=True)
from gevent.socket import wait_read
def line():  # without blocking the hub: the streams read meanwhile
    wait_read(sys.stdin.fileno())
    return sys.stdin.readline()
line()  # the notifier's go
latencies.clear(); events[0] = 0
line()  # the end of the phase
print(json.dumps({"served": served[0], "events": events[0], "ended": ended[0],
                  "latencies": latencies}), flush=True)
'''


def run_phase(cluster: Any, port: int, master: int, clients: int, rate: float,
              seconds: float, slow: bool) -> dict[str, Any]:
    workers = children(master)
    rss_before = {pid: rss_kb(pid) for pid in workers}
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(clients),
                             str(seconds), "1" if slow else "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    connected = json.loads(proc.stdout.readline())["connected"]
    time.sleep(1.0)
    rss_after = {pid: rss_kb(pid) for pid in workers}
    listening = listening_connections(cluster)
    total = int(cluster.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                "application_name = %s", (APP_NAME,))[0][0])
    proc.stdin.write("go\n")
    proc.stdin.flush()
    time.sleep(0.2)
    sender = cluster.connect(dbname=DB)
    sent = 0
    started = time.monotonic()
    backlog_max, dropped = 0, 0
    with sender.cursor() as cur:
        while time.monotonic() - started < seconds:
            due = started + sent / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            cur.execute("SELECT pg_notify('notes', %s)", (f"{sent} {time.time()!r}",))
            sent += 1
            if sent % int(rate) == 0:
                for stats in worker_stats(port):
                    write = stats["groups"]["write"]
                    backlog_max = max(backlog_max, write["listen_backlog_max"])
                    dropped = max(dropped, write["listen_dropped"])
    sender.close()
    time.sleep(2.0)  # the last events arrive
    proc.stdin.write("end\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    proc.stdin.close()
    proc.wait(60)
    lat = result.pop("latencies")
    grown = sum(rss_after.values()) - sum(rss_before.values())
    expected = sent * (connected - (1 if slow else 0))
    return {
        "clients": clients, "connected": connected, "rate": rate, "seconds": seconds,
        "slow_client": slow, "sent": sent, "events_received": result["events"],
        "events_expected": expected,
        "server_connections_total": total, "listening_connections": listening,
        "workers": len(workers),
        "latency_p50_ms": None if not lat else round(percentile(lat, 0.5) * 1000, 2),
        "latency_p99_ms": None if not lat else round(percentile(lat, 0.99) * 1000, 2),
        "latency_max_ms": None if not lat else round(max(lat) * 1000, 2),
        "rss_per_subscriber_kb": round(grown / max(1, connected), 1),
        "worker_rss_kb": rss_after, "listen_backlog_max": backlog_max,
        "listen_dropped": dropped,
    }


def worker_stats(port: int) -> list[dict[str, Any]]:
    """/stats of each worker (asked a few times: each request lands on either)."""
    import http.client

    seen: dict[int, dict[str, Any]] = {}
    for _ in range(6):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/stats")
            body = json.loads(conn.getresponse().read())
            conn.close()
            seen[body["pid"]] = body
        except (OSError, ValueError):
            pass
    return list(seen.values())


def report(results: dict[str, Any]) -> str:
    rows = [
        ("clients connected / asked", "connected", "clients"),
        ("NOTIFY sent (rate/s)", "sent", "rate"),
        ("events received / expected", "events_received", "events_expected"),
        ("server connections of the app / listening", "server_connections_total",
         "listening_connections"),
        ("delivery latency p50 / p99 ms", "latency_p50_ms", "latency_p99_ms"),
        ("worker RSS per subscriber KB", "rss_per_subscriber_kb", None),
        ("largest listener backlog / dropped", "listen_backlog_max", "listen_dropped"),
    ]
    lines = [f"# SSE fan-out ({results['started']})", "",
             "examples/gunicorn under `gunicorn -k gevent -w 2`, `python -m "
             "benchmarks.sse_fanout`; see the script's docstring.", "",
             "| | steady | one slow client |", "|---|---|---|"]
    for title, a, b in rows:
        cells = []
        for phase in ("steady", "one_slow_client"):
            r = results[phase]
            cells.append(str(r[a]) if b is None else f"{r[a]} / {r[b]}")
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)

    from greenpool.testing.postgres import Cluster, free_port

    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with Cluster(settings={"max_connections": 100}) as cluster:
        cluster.create_database(DB)
        config = {"db": cluster.endpoint(name=DB), "application_name": APP_NAME,
                  "groups": {"write": {"connection_count": 5, "exclusive_limit": 1,
                                       "timeout": 5},
                             "read": {"connection_count": 5, "autocommit": True}}}
        env = {**os.environ, "GREENPOOL_CONFIG": json.dumps(config)}
        subprocess.run([sys.executable, str(EXAMPLE / "app.py"), "schema"], env=env,
                       check=True, capture_output=True, timeout=60)
        port = free_port()
        log = open(Path(args.out) / "sse_fanout.log", "w")  # noqa: SIM115
        master = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", "2", "-c", str(EXAMPLE / "gunicorn.conf.py"),
             "-b", f"127.0.0.1:{port}", "--worker-connections", str(args.clients + 100)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or master.poll() is not None:
                        raise RuntimeError("gunicorn did not start") from None
                    time.sleep(0.2)
            time.sleep(2.0)  # both workers booted
            # a short unrecorded round, so that the first phase's memory is per subscriber,
            # not the workers' one-time growth
            run_phase(cluster, port, master.pid, min(50, args.clients), args.rate, 1.0,
                      slow=False)
            time.sleep(1.0)
            results["steady"] = run_phase(cluster, port, master.pid, args.clients, args.rate,
                                          args.seconds, slow=False)
            time.sleep(2.0)
            results["one_slow_client"] = run_phase(cluster, port, master.pid, args.clients,
                                                   args.rate, args.seconds, slow=True)
        finally:
            os.killpg(master.pid, signal.SIGTERM)
            try:
                master.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)
            log.close()
    out = Path(args.out) / "sse_fanout.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    (Path(args.out) / "sse_fanout.md").write_text(report(results))
    for phase in ("steady", "one_slow_client"):
        r = {k: v for k, v in results[phase].items() if k != "worker_rss_kb"}
        print(phase, json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
