"""Kill the leader of a Patroni cluster under load: greenpool beside its peers, in one run.

``python -m benchmarks.patroni_failover [--seconds 22] [--runs 3] [--out DIR]`` starts a throwaway
Patroni cluster (:mod:`greenpool.testing.patroni`: etcd, three nodes, ``synchronous_mode``),
then one worker process per pool, all at once, so that every pool sees the very same failover.
Each worker runs 10 writers (``INSERT`` of its own unique ids, one transaction each) and 10
readers (``SELECT inet_server_port(), pg_is_in_recovery()``), each pausing 10 ms between
operations, for ``--seconds``. At 4 s the leader's PostgreSQL and Patroni are SIGKILLed;
once Patroni has elected a new leader the old one is started again (Patroni rewinds it and
it comes back as a replica). Each pool is set up the way its users set it up for a cluster:

* greenpool: the three nodes as endpoints; a ``write`` group (role ``primary``) and a
  ``read`` group (role ``prefer-standby``, ``max_lag`` 1 s), 5 connections each;
  ``role_check_interval`` 0.5 s (the README's Patroni set-up).
* psycopg_pool ``ConnectionPool`` and psycopg2 ``SimpleConnectionPool``: two pools of 5
  each, over libpq's multi-host form listing the three nodes, ``target_session_attrs``
  ``read-write`` for writes and ``prefer-standby`` for reads. SimpleConnectionPool's
  ``getconn`` raises at once when exhausted, so it is wrapped in the usual bounded retry
  (10 ms, up to 3 s); a connection found closed goes back with ``close=True``.
* SQLAlchemy ``QueuePool`` (an engine per role over psycopg2 and the same DSN,
  ``pool_size`` 5, ``max_overflow`` 0, ``pool_pre_ping=True``) and DBUtils ``PooledDB``
  (over psycopg2, the same DSN, 5 connections, ``blocking=True``, ``ping=1``, its default).

Reported per pool: errors the application saw (writes, reads), time from the kill to the
first write acknowledged by the new leader, and from the new leader's promotion (the moment
it first answered ``pg_is_in_recovery()`` false to the orchestrator, which asks the
survivors every 5 ms), the longest time without an acknowledged write, acknowledged writes
missing from the new leader's table (lost), reads served, reads served by the killed leader
once back (as a replica: allowed), reads answered by a primary (the read group prefers a
standby; one was up throughout), and operations answered by a node in a role the group did
not ask for (each operation returns the server's port, ``pg_is_in_recovery()`` and clock: a
write acknowledged in recovery, or by the killed leader once back, by its clock after all
its processes had been killed; a read from the killed leader once back while not in
recovery; must be 0). ``--log DIR`` keeps each worker's stderr, greenpool's DEBUG log
stamped with ``time.monotonic()`` (the JSON's ``clock`` has the kill and the promotion on
that clock). The results go to
``DIR/patroni_failover.json`` and ``.md`` (default ``benchmarks/results``). psycopg_pool,
psycopg 3 and DBUtils need not be in the environment: put them on ``PYTHONPATH`` (``pip
install --target DIR 'psycopg[binary]' psycopg_pool DBUtils``); a pool whose package is
missing is reported as skipped.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    from gevent import monkey

    monkey.patch_all()

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PEERS = ("greenpool", "psycopg_pool", "sqlalchemy_queuepool", "dbutils_pooleddb", "psycopg2_simple")
WRITERS = READERS = 10
SIZE = 5  # connections per pool (writes) and per pool (reads)
PACE = 0.01  # seconds between two operations of one task
KILL_AT = 4.0  # seconds after the start
TABLE = "bench_failover"
GETCONN_RETRY_SLEEP, GETCONN_RETRY_ATTEMPTS = 0.01, 300
#: what every operation returns: who answered, in which role, at what time by its clock
ANSWERED_BY = "inet_server_port(), pg_is_in_recovery(), extract(epoch FROM clock_timestamp())"
PROMOTION_POLL = 0.005  # seconds between the orchestrator's looks at the survivors' role


# --- the worker (one pool, one process) -----------------------------------------------------


def _dsn(spec: dict[str, Any], attrs: str) -> str:
    hosts = spec["nodes"]
    return (f"host={','.join(h for h, _ in hosts)} port={','.join(str(p) for _, p in hosts)}"
            f" dbname=postgres user=postgres password={spec['password']} connect_timeout=2"
            f" target_session_attrs={attrs} application_name=bench-{spec['peer']}")


class _Psycopg2Simple:
    """A SimpleConnectionPool per role with the helper its users write around it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from psycogreen.gevent import patch_psycopg
        from psycopg2 import pool

        patch_psycopg()
        self._error = pool.PoolError
        self._pools = {"write": pool.SimpleConnectionPool(SIZE, SIZE, _dsn(spec, "read-write")),
                       "read": pool.SimpleConnectionPool(SIZE, SIZE,
                                                         _dsn(spec, "prefer-standby"))}

    def _getconn(self, which: str) -> Any:
        for _ in range(GETCONN_RETRY_ATTEMPTS):
            try:
                conn = self._pools[which].getconn()
                conn.autocommit = which == "read"
                return conn
            except self._error as exc:
                if "exhausted" not in str(exc):
                    raise
                time.sleep(GETCONN_RETRY_SLEEP)
        raise self._error("connection pool exhausted (gave up retrying)")

    @contextlib.contextmanager
    def session(self, which: str) -> Iterator[Any]:
        conn = self._getconn(which)
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except Exception:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
        finally:
            self._pools[which].putconn(conn, close=bool(conn.closed))

    def close(self) -> None:
        for p in self._pools.values():
            p.closeall()


class _SQLAlchemyQueuePool:
    """An engine per role (QueuePool, ``pool_pre_ping``) over psycopg2 and the libpq DSN."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import psycopg2
        from psycogreen.gevent import patch_psycopg
        from sqlalchemy import create_engine

        patch_psycopg()

        def engine(attrs: str, **options: Any) -> Any:
            dsn = _dsn(spec, attrs)
            return create_engine("postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn),
                                 pool_size=SIZE, max_overflow=0, pool_timeout=10,
                                 pool_pre_ping=True, **options)

        self._engines = {"write": engine("read-write"),
                         "read": engine("prefer-standby", isolation_level="AUTOCOMMIT")}

    @contextlib.contextmanager
    def session(self, which: str) -> Iterator[Any]:
        with self._engines[which].begin() as conn:
            yield _DriverCursor(conn)

    def close(self) -> None:
        for e in self._engines.values():
            e.dispose()


class _DriverCursor:
    """The cursor face of an SQLAlchemy connection (``exec_driver_sql``)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._row: Any = None

    def execute(self, sql: str, params: Any = None) -> None:
        self._row = self._conn.exec_driver_sql(sql, params).fetchone()

    def fetchone(self) -> Any:
        return self._row


class _DBUtilsPooledDB:
    """A DBUtils ``PooledDB`` per role over psycopg2: blocking, ``ping=1`` (its default)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import psycopg2
        from dbutils.pooled_db import PooledDB
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
        self._pools = {which: PooledDB(psycopg2, mincached=SIZE, maxcached=SIZE,
                                       maxconnections=SIZE, blocking=True, ping=1,
                                       dsn=_dsn(spec, attrs))
                       for which, attrs in (("write", "read-write"), ("read", "prefer-standby"))}

    @contextlib.contextmanager
    def session(self, which: str) -> Iterator[Any]:
        conn = self._pools[which].connection()
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except Exception:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise
        finally:
            conn.close()  # back to the pool

    def close(self) -> None:
        for p in self._pools.values():
            p.close()


class _PsycopgPool:
    def __init__(self, spec: dict[str, Any]) -> None:
        from psycopg_pool import ConnectionPool

        self._pools = {
            "write": ConnectionPool(_dsn(spec, "read-write"), min_size=SIZE, max_size=SIZE,
                                    timeout=10, open=True),
            "read": ConnectionPool(_dsn(spec, "prefer-standby"), min_size=SIZE, max_size=SIZE,
                                   kwargs={"autocommit": True}, timeout=10, open=True)}
        for p in self._pools.values():
            p.wait(30)

    @contextlib.contextmanager
    def session(self, which: str) -> Iterator[Any]:
        with self._pools[which].connection() as conn, conn.cursor() as cur:
            yield cur

    def close(self) -> None:
        for p in self._pools.values():
            p.close()


class _Greenpool:
    def __init__(self, spec: dict[str, Any]) -> None:
        from greenpool import Pool

        db = [{"host": h, "port": p, "name": "postgres", "user": "postgres",
               "pass": spec["password"], "connect_timeout": 2} for h, p in spec["nodes"]]
        self._pool = Pool({"type": "gevent", "db": db, "role_check_interval": 0.5, "groups": {
            "write": {"role": "primary", "connection_count": SIZE, "timeout": 10},
            "read": {"role": "prefer-standby", "max_lag": 1.0, "connection_count": SIZE,
                     "timeout": 10, "autocommit": True}}})

    @contextlib.contextmanager
    def session(self, which: str) -> Iterator[Any]:
        with self._pool.handler(which) as db:
            yield _GreenCursor(db)

    def close(self) -> None:
        self._pool.close()


class _GreenCursor:
    def __init__(self, db: Any) -> None:
        self._db = db
        self._row: Any = None

    def execute(self, sql: str, params: Any = None) -> None:
        self._row = self._db.query_one(sql, params)

    def fetchone(self) -> Any:
        return self._row


def _log_to_stderr() -> None:
    """greenpool's log at DEBUG on stderr, each line stamped with ``time.monotonic()`` (the
    clock of the orchestrator's kill and promotion times, in the JSON)."""
    import logging

    class Stamp(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.mono = time.monotonic()
            return True

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Stamp())
    handler.setFormatter(logging.Formatter("%(mono).3f %(levelname)s %(message)s"))
    logger = logging.getLogger("greenpool")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import gevent

    if spec.get("log"):
        _log_to_stderr()

    pool = {"greenpool": _Greenpool, "psycopg_pool": _PsycopgPool,
            "sqlalchemy_queuepool": _SQLAlchemyQueuePool, "dbutils_pooleddb": _DBUtilsPooledDB,
            "psycopg2_simple": _Psycopg2Simple}[spec["peer"]](spec)
    ids = itertools.count(1)
    # (id, port, time, in recovery, the server's clock): what answered, as it said then
    acked: list[tuple[int, int, float, bool, float]] = []
    reads: list[tuple[float, int, bool, float]] = []  # (time, port, in recovery, its clock)
    write_errors: list[tuple[float, str]] = []
    read_errors: list[tuple[float, str]] = []
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    start = float(sys.stdin.readline())
    end = start + spec["seconds"]
    gevent.sleep(max(0.0, start - time.monotonic()))

    def writer() -> None:
        while time.monotonic() < end:
            i = next(ids)
            try:
                with pool.session("write") as cur:
                    cur.execute(f"INSERT INTO {TABLE} VALUES (%s, %s) "
                                f"RETURNING {ANSWERED_BY}",
                                (spec["peer"], i))
                    port, recovery, server_at = cur.fetchone()
            except Exception as exc:
                write_errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:200]))
            else:
                acked.append((i, port, time.monotonic(), recovery, float(server_at)))
            gevent.sleep(PACE)

    def reader() -> None:
        while time.monotonic() < end:
            try:
                with pool.session("read") as cur:
                    cur.execute(f"SELECT {ANSWERED_BY}")
                    port, recovery, server_at = cur.fetchone()
            except Exception as exc:
                read_errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:200]))
            else:
                reads.append((time.monotonic(), port, recovery, float(server_at)))
            gevent.sleep(PACE)

    tasks = [gevent.spawn(writer) for _ in range(WRITERS)]
    tasks += [gevent.spawn(reader) for _ in range(READERS)]
    gevent.joinall(tasks, timeout=spec["seconds"] + 30)
    gevent.killall(tasks, timeout=5)
    with contextlib.suppress(Exception):
        pool.close()
    return {"acked": acked, "reads": reads, "write_errors": write_errors,
            "read_errors": read_errors}


# --- the orchestrator ---------------------------------------------------------------------


class _PromotionWatch:
    """When the first of ``nodes`` (the survivors) left recovery: each is asked
    ``pg_is_in_recovery()`` every ``PROMOTION_POLL`` seconds on a connection of its own, in a
    thread, so that every pool's resumption is measured from the promotion itself (Patroni's
    REST API reports the new leader a moment before or after it)."""

    def __init__(self, nodes: list[Any]) -> None:
        self._conns = [n.connect(connect_timeout=1) for n in nodes]
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _PromotionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.close()

    def _watch(self) -> None:
        while self.at is None and not self._stop.wait(PROMOTION_POLL):
            for conn in self._conns:
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_is_in_recovery()")
                        promoted = not cur.fetchone()[0]
                except Exception:
                    continue  # restarted by Patroni: another node, or the next poll, tells
                if promoted:
                    self.at = time.monotonic()
                    return


def _summary(peer: str, out: dict[str, Any], killed: float, dead_wall: float,
             promoted: float, old_port: int, new_port: int, rows: set[int]) -> dict[str, Any]:
    acked, reads = out["acked"], out["reads"]
    first = min((t for _i, port, t, *_x in acked if port == new_port and t > killed),
                default=None)
    stamps = sorted([killed, *(t for _i, _p, t, *_x in acked if t > killed)])
    lost = [i for i, *_x in acked if i not in rows]
    errors = out["write_errors"] + out["read_errors"]
    kinds = sorted({e.split(":", 1)[0] for _t, e in errors})
    # a node answering in a role the group did not ask for: a write acknowledged by a node in
    # recovery, or by the killed leader once back (by its own clock, after every process of
    # it had been SIGKILLed: until then its backends still commit, legitimately, and a busy
    # worker may note the time of such an answer late); a read answered by the killed leader
    # once back while not a replica
    wrong_writes = [(round(t - killed, 3), port, rec) for _i, port, t, rec, at in acked
                    if rec or (port == old_port and at > dead_wall)]
    wrong_reads = [(round(t - killed, 3), port, rec) for t, port, rec, at in reads
                   if port == old_port and at > dead_wall and not rec]
    wrong = len(wrong_writes) + len(wrong_reads)
    return {
        "pool": peer, "writes_acknowledged": len(acked), "write_errors": len(out["write_errors"]),
        "read_errors": len(out["read_errors"]), "error_kinds": kinds,
        "writes_resumed_s": None if first is None else round(first - killed, 2),
        "writes_resumed_after_promotion_ms": None if first is None
        else round((first - promoted) * 1000),
        "longest_write_gap_s": round(max(b - a for a, b in itertools.pairwise(stamps)), 2)
        if len(stamps) > 1 else None,
        "acknowledged_writes_lost": len(lost),
        "reads_served": len(reads),
        "reads_after_kill": sum(1 for t, *_x in reads if t > killed),
        "reads_by_demoted_node": sum(1 for _t, port, _r, at in reads
                                     if port == old_port and at > dead_wall),
        "reads_on_a_primary": sum(1 for _t, _p, rec, _at in reads if not rec),
        "answered_in_wrong_role": wrong,
        # (seconds after the kill, port, in recovery) of the first few, to look into them
        "wrong_role_writes": wrong_writes[:10], "wrong_role_reads": wrong_reads[:10],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=22.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--log", metavar="DIR", help="write each worker's stderr, greenpool's"
                        " DEBUG log stamped with time.monotonic(), to DIR/<pool>.log")
    parser.add_argument("--runs", type=int, default=1, help="kill a leader this many times,"
                        " each on a fresh cluster with every pool at once (noise hits all)")
    args = parser.parse_args(argv)
    from greenpool.testing.patroni import missing

    reason = missing()
    if reason:
        print(f"skipped: {reason}")
        return 1
    runs = []
    for n in range(args.runs):
        log = None if not args.log else str(Path(args.log) / f"run{n + 1}")
        runs.append(_run(args.seconds, [p for p in args.peers.split(",") if p], log))
    report = runs[0] if len(runs) == 1 else {"runs": runs}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "patroni_failover.json").write_text(json.dumps(report, indent=1) + "\n")
    text = "\n".join(_markdown(run) for run in runs)
    if len(runs) > 1:
        text = _across_runs(runs) + "\n" + text
    (out_dir / "patroni_failover.md").write_text(text)
    print(text)
    return 0


def _across_runs(runs: list[dict[str, Any]]) -> str:
    """Each pool's write gap and resumption in every run, side by side."""
    pools = [s["pool"] for s in runs[0]["summaries"]]
    lines = [f"# Kill the Patroni leader under load: {len(runs)} runs, every pool at once in"
             " each", "", "Longest write gap (s) / writes resumed after the new leader's"
             " promotion (ms), per run:", "",
             "| pool | " + " | ".join(f"run {n + 1}" for n in range(len(runs))) + " |",
             "|---|" + "---|" * len(runs)]
    for pool in pools:
        cells = []
        for run in runs:
            s = next((x for x in run["summaries"] if x["pool"] == pool), {})
            cells.append(f"{s.get('longest_write_gap_s')} / "
                         f"{s.get('writes_resumed_after_promotion_ms')}")
        lines.append(f"| {pool} | " + " | ".join(cells) + " |")
    lines.append("| (promotion, s after the kill) | "
                 + " | ".join(str(run["leader_promoted_s"]) for run in runs) + " |")
    return "\n".join(lines) + "\n"


def _run(seconds: float, peers: list[str], log: str | None) -> dict[str, Any]:
    """One kill of the leader, every pool in ``peers`` at once, on a fresh cluster."""
    from greenpool.testing.patroni import PatroniCluster

    with PatroniCluster(synchronous_mode=True, password="bench-pw") as pc:
        leader = pc.leader()
        assert leader is not None
        leader.execute(f"CREATE TABLE {TABLE} (peer text NOT NULL, id bigint NOT NULL)")
        pc.wait_healthy(60)
        nodes = [(n.host, n.port) for n in pc.nodes]
        procs: dict[str, subprocess.Popen[str]] = {}
        skipped: dict[str, str] = {}
        for peer in peers:
            spec = {"peer": peer, "nodes": nodes, "password": pc.password,
                    "seconds": seconds, "log": bool(log)}
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.patroni_failover",
                                     "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "READY":
                proc.kill()
                skipped[peer] = (line + proc.communicate(timeout=30)[1])[-300:]
                continue
            procs[peer] = proc
        start = time.monotonic() + 0.5
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write(f"{start}\n")
            proc.stdin.flush()
        time.sleep(max(0.0, start + KILL_AT - time.monotonic()))
        killed = time.monotonic()
        with _PromotionWatch([n for n in pc.nodes if n is not leader]) as promotion:
            leader.kill()
            dead, dead_wall = time.monotonic(), time.time()
            pc.wait_for(lambda: pc.leader() not in (None, leader), 60, "a new leader")
            elected = time.monotonic()
            new = pc.leader()
            assert new is not None
            pc.wait_for(lambda: promotion.at is not None, 30, "the new leader's promotion")
        promoted = promotion.at
        assert promoted is not None
        leader.start()
        results: dict[str, Any] = {}
        for peer, proc in procs.items():
            out, err = proc.communicate(timeout=seconds + 90)
            found = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            results[peer] = json.loads(found[-1][7:]) if found else {"error": err[-500:]}
            if log:
                Path(log).mkdir(parents=True, exist_ok=True)
                (Path(log) / f"{peer}.log").write_text(err)
        rows_by_peer: dict[str, set[int]] = {}
        for peer, i in new.execute(f"SELECT peer, id FROM {TABLE}"):
            rows_by_peer.setdefault(peer, set()).add(i)
    summaries = [_summary(peer, out, killed, dead_wall, promoted, leader.port, new.port,
                          rows_by_peer.get(peer, set()))
                 if "error" not in out else {"pool": peer, "failed": out["error"]}
                 for peer, out in results.items()]
    return {"seconds": seconds, "leader_elected_s": round(elected - killed, 2),
            "leader_promoted_s": round(promoted - killed, 2),
            "kill_took_s": round(dead - killed, 3),
            "clock": {"killed": killed, "promoted": promoted, "elected": elected},
            "summaries": summaries, "skipped": skipped}


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Kill the Patroni leader under load ({report['seconds']:.0f} s, kill at"
             f" {KILL_AT:.0f} s; the new leader left recovery {report.get('leader_promoted_s')} s"
             f" after the kill, Patroni's REST API reported it at {report['leader_elected_s']} s;"
             f" the SIGKILLs took {report.get('kill_took_s')} s)", "",
             "| pool | write errors | read errors | writes resumed (s after kill) |"
             " writes resumed (ms after promotion) |"
             " longest write gap (s) | acked writes lost | writes acked | reads served"
             " (after kill) | reads by the demoted node (as a replica) | reads on a primary |"
             " answered in the wrong role |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["summaries"]:
        if "failed" in s:
            lines.append(f"| {s['pool']} | failed: {s['failed'][-120:]} |||||||||||")
            continue
        lines.append(f"| {s['pool']} | {s['write_errors']} | {s['read_errors']} |"
                     f" {s['writes_resumed_s']} | {s.get('writes_resumed_after_promotion_ms')} |"
                     f" {s['longest_write_gap_s']} |"
                     f" {s['acknowledged_writes_lost']} | {s['writes_acknowledged']} |"
                     f" {s['reads_served']} ({s['reads_after_kill']}) |"
                     f" {s['reads_by_demoted_node']} | {s['reads_on_a_primary']} |"
                     f" {s['answered_in_wrong_role']} |")
    for s in report["summaries"]:
        if s.get("error_kinds"):
            lines.append(f"\n{s['pool']} errors: {', '.join(s['error_kinds'])}")
    for peer, why in report["skipped"].items():
        lines.append(f"\n{peer}: skipped ({why.strip()})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        result = worker(json.loads(sys.argv[2]))
        sys.stdout.write("RESULT " + json.dumps(result) + "\n")
        sys.stdout.flush()
        os._exit(0)
    sys.exit(main())
