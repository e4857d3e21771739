"""SSE fan-out: N concurrent ``GET /events`` clients on the example app (``gunicorn -k gevent``,
2 workers), notifications at a steady rate: server connections used, delivery latency, memory
per subscriber, then the same with one client that stops reading.

``python -m benchmarks.sse_fanout [--clients 1000] [--rate 100] [--seconds 10]
[--client-processes 1] [--out benchmarks/results]``. Everything runs on this machine: a
throwaway PostgreSQL, the gunicorn master and workers, the clients (benchmarks/sse_client.py:
plain sockets and epoll, so that the measuring costs the shared cores as little as it can),
and a notifier sending ``pg_notify('notes', '<seq> <time>')`` (the example streams the
payload as the event's data, so each event carries its send time, taken before the NOTIFY
commits). Latency is measured on every client's every event, from that send time to the
``recv()`` that returned it; the notifier and the clients share the clock.

Where the time goes is reported too: the CPU of the clients, the workers, PostgreSQL, the
notifier and the rest of the machine during each phase (the machine is shared), CPU per
event, the load average before the phase, and per notification the latency of its first and
of its last client (the way to one client, and the spread of the fan-out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "gunicorn"
APP_NAME = "greenpool-sse-bench"
DB = "sse_bench"
PHASES = {"steady": "steady", "one_slow_client": "one slow client"}


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


def cpu_seconds(pid: int, system_only: bool = False) -> float:
    """User + system (or only system: the kernel's share, sockets) CPU seconds ``pid`` has
    used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[12]) if system_only else int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core summed."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


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


def run_phase(cluster: Any, port: int, master: int, clients: int, rate: float,
              seconds: float, slow: bool, processes: int, tick_ms: float) -> dict[str, Any]:
    workers = children(master)
    rss_before = {pid: rss_kb(pid) for pid in workers}
    shares = [clients // processes + (1 if i < clients % processes else 0)
              for i in range(processes)]
    files = [Path(tempfile.mkstemp(prefix="sse-latency-")[1]) for _ in shares]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.sse_client", str(port),
                               str(share), "1" if slow and i == 0 else "0", str(files[i]),
                               str(tick_ms)],
                              cwd=HERE.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
             for i, share in enumerate(shares)]
    try:
        return measure(cluster, port, workers, rss_before, procs, files, rate, seconds, slow,
                       clients, tick_ms)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for file in files:
            file.unlink(missing_ok=True)


def tell(procs: list[subprocess.Popen[str]], command: str) -> None:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()


def answers(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    found = []
    for proc in procs:
        assert proc.stdout is not None
        found.append(json.loads(proc.stdout.readline()))
    return found


def measure(cluster: Any, port: int, workers: list[int], rss_before: dict[int, int],
            procs: list[subprocess.Popen[str]], files: list[Path], rate: float,
            seconds: float, slow: bool, clients: int, tick_ms: float) -> dict[str, Any]:
    connected = sum(a["connected"] for a in answers(procs))
    time.sleep(1.0)
    rss_after = {pid: rss_kb(pid) for pid in workers}
    listening = listening_connections(cluster)
    total = int(cluster.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                "application_name = %s", (APP_NAME,))[0][0])
    load = os.getloadavg()[0]
    tell(procs, "go")
    time.sleep(0.2)
    cpu_before = cpu_use([p.pid for p in procs], workers, cluster)
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
    time.sleep(0.5)  # the last events are handled (the CPU counted is the phase's)
    cpu_after = cpu_use([p.pid for p in procs], workers, cluster)
    time.sleep(1.5)  # stragglers arrive
    tell(procs, "end")
    results = answers(procs)
    for proc in procs:
        proc.wait(60)
    result = {"events": sum(r["events"] for r in results),
              "reads": sum(r["reads"] for r in results),
              "ended": sum(r["ended"] for r in results)}
    times = array("d")
    for file in files:
        times.frombytes(file.read_bytes())
    pairs = list(zip(times[::2], times[1::2], strict=True))
    lat = sorted(received - sent for sent, received in pairs)
    first, last = per_notification(pairs)
    grown = sum(rss_after.values()) - sum(rss_before.values())
    expected = sent * (connected - (1 if slow else 0))
    return {
        "clients": clients, "connected": connected, "rate": rate, "seconds": seconds,
        "client_tick_ms": tick_ms,
        "client_processes": len(procs), "load_average_1min": round(load, 2),
        "slow_client": slow, "sent": sent, "events_received": result["events"],
        "events_expected": expected,
        "server_connections_total": total, "listening_connections": listening,
        "workers": len(workers),
        "latency_p50_ms": None if not lat else round(percentile(lat, 0.5) * 1000, 2),
        "latency_p99_ms": None if not lat else round(percentile(lat, 0.99) * 1000, 2),
        "latency_max_ms": None if not lat else round(max(lat) * 1000, 2),
        "first_receiver_p50_p99_ms": [ms(percentile(first, 0.5)), ms(percentile(first, 0.99))],
        "last_receiver_p50_p99_ms": [ms(percentile(last, 0.5)), ms(percentile(last, 0.99))],
        "rss_per_subscriber_kb": round(grown / max(1, connected), 1),
        "worker_rss_kb": rss_after, "listen_backlog_max": backlog_max,
        "listen_dropped": dropped,
        "cpu_percent": cpu_percent(cpu_before, cpu_after),
        "cpu_us_per_event": {
            part: round((cpu_after[part] - cpu_before[part]) / max(1, result["events"]) * 1e6,
                        2) for part in ("client", "workers", "client_system", "workers_system")},
        "events_per_read": round(result["events"] / max(1, result["reads"]), 2),
    }


def per_notification(pairs: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """For each notification (its send time names it), the latency of the first client that
    read it and of the last: the first is the way from the commit to a client, the
    difference is the time a notification takes to reach every client."""
    first: dict[float, float] = {}
    last: dict[float, float] = {}
    for sent, received in pairs:
        if received < first.get(sent, math.inf):
            first[sent] = received
        if received > last.get(sent, -math.inf):
            last[sent] = received
    return ([first[s] - s for s in first], [last[s] - s for s in last])


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def cpu_use(clients: list[int], workers: list[int], cluster: Any) -> dict[str, float]:
    """CPU seconds used so far by each part of the run, and by the whole machine."""
    postmaster = cluster.pid
    busy, total = machine_busy()
    return {
        "client": sum(cpu_seconds(pid) for pid in clients),
        "workers": sum(cpu_seconds(pid) for pid in workers),
        "client_system": sum(cpu_seconds(pid, system_only=True) for pid in clients),
        "workers_system": sum(cpu_seconds(pid, system_only=True) for pid in workers),
        "postgres": sum(cpu_seconds(pid) for pid in [postmaster, *children(postmaster)]),
        "notifier": cpu_seconds(os.getpid()),
        "machine": busy, "wall": total / (os.cpu_count() or 1),
    }


def cpu_percent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU used during the phase as a percentage of one core (the machine has
    ``os.cpu_count()`` of them); ``others`` is what the rest of the machine used."""
    wall = after["wall"] - before["wall"]
    used = {k: (after[k] - before[k]) / wall * 100 for k in before
            if k != "wall" and not k.endswith("_system")}
    used["others"] = used["machine"] - sum(v for k, v in used.items() if k != "machine")
    used["cores"] = os.cpu_count() or 1
    return {k: round(v, 1) for k, v in used.items()}


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
        ("latency max ms", "latency_max_ms", None),
        ("per notification, first client's latency p50 / p99 ms", "first_receiver_p50_p99_ms",
         None),
        ("per notification, last client's latency p50 / p99 ms", "last_receiver_p50_p99_ms",
         None),
        ("load average (1 min) before the phase", "load_average_1min", None),
        ("events per client read (several when a write or read was late)", "events_per_read",
         None),
    ]
    cpu_rows = [
        ("CPU % of one core: client / workers", ("cpu_percent", "client"),
         ("cpu_percent", "workers")),
        ("CPU % of one core: PostgreSQL / notifier", ("cpu_percent", "postgres"),
         ("cpu_percent", "notifier")),
        ("CPU % of one core: rest of the machine / whole machine (of 200)",
         ("cpu_percent", "others"), ("cpu_percent", "machine")),
        ("CPU µs per event: client / workers", ("cpu_us_per_event", "client"),
         ("cpu_us_per_event", "workers")),
        ("... of which in the kernel: client / workers", ("cpu_us_per_event", "client_system"),
         ("cpu_us_per_event", "workers_system")),
    ]
    command = f"python -m benchmarks.sse_fanout {results.get('arguments', '')}".strip()
    phases = [p for p in PHASES if p in results]
    lines = [f"# SSE fan-out ({results['started']})", "",
             f"examples/gunicorn under `gunicorn -k gevent -w 2`, `{command}`; see the "
             "script's docstring.", "",
             "| | " + " | ".join(PHASES[p] for p in phases) + " |",
             "|---|" + "---|" * len(phases)]
    for title, a, b in rows:
        cells = []
        for phase in phases:
            r = results[phase]
            value = " / ".join(map(str, r[a])) if isinstance(r[a], list) else str(r[a])
            cells.append(value if b is None else f"{value} / {r[b]}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for title, (a1, a2), (b1, b2) in cpu_rows:
        cells = [f"{results[phase][a1][a2]} / {results[phase][b1][b2]}" for phase in phases]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shown_arguments(argv: list[str] | None) -> str:
    """The command line's arguments as the report shows them: where the files went is not
    part of what was measured."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--out" in args:
        at = args.index("--out")
        del args[at:at + 2]
    return " ".join(a for a in args if not a.startswith("--out="))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--client-tick-ms", type=float, default=1.0,
                        help="the clients read at most once per tick (0: at every wake-up)")
    parser.add_argument("--no-slow-phase", action="store_true",
                        help="only the steady phase (quicker comparisons)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="sse_fanout",
                        help="the results' file names (NAME.json, NAME.md, NAME.log)")
    args = parser.parse_args(argv)
    stem = args.name

    from greenpool.testing.postgres import Cluster, free_port

    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "arguments": shown_arguments(argv)}
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
        log = open(Path(args.out) / f"{stem}.log", "w")  # noqa: SIM115
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
                      slow=False, processes=1, tick_ms=args.client_tick_ms)
            time.sleep(1.0)
            for phase in PHASES:
                if phase != "steady" and args.no_slow_phase:
                    break
                time.sleep(2.0)
                results[phase] = run_phase(cluster, port, master.pid, args.clients, args.rate,
                                           args.seconds, slow=phase != "steady",
                                           processes=args.client_processes,
                                           tick_ms=args.client_tick_ms)
        finally:
            os.killpg(master.pid, signal.SIGTERM)
            try:
                master.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)
            log.close()
    out = Path(args.out) / f"{stem}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    (Path(args.out) / f"{stem}.md").write_text(report(results))
    for phase in (p for p in PHASES if p in results):
        r = {k: v for k, v in results[phase].items() if k != "worker_rss_kb"}
        print(phase, json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
