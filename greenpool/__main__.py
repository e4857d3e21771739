"""``greenpool`` / ``python -m greenpool``: the command line.

``greenpool demo`` shows the pool at work with no configuration at all: it starts a
throwaway PostgreSQL on a free loopback port (or uses ``GREENPOOL_DSN``), runs a mixed
load of greenlets through a ``read`` and a ``write`` group, kills some of them mid-flight,
restarts the server under the live pool, and prints what the pool did.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from gevent import monkey

    monkey.patch_all()
    import gevent

    import greenpool
    from greenpool.throwaway import Cluster, ClusterError, PostgresNotFound

    cluster = None
    dsn = args.dsn or os.environ.get("GREENPOOL_DSN")
    try:
        if dsn:
            endpoint: Any = dsn
            print("using the server in GREENPOOL_DSN")
        else:
            cluster = Cluster()
            cluster.init()
            cluster.start()
            endpoint = cluster.endpoint()
            print(f"started a throwaway PostgreSQL on 127.0.0.1:{cluster.port}")
    except PostgresNotFound as exc:
        print(f"greenpool demo: {exc}", file=sys.stderr)
        return 2
    except ClusterError as exc:
        print(f"greenpool demo: could not start PostgreSQL: {exc}", file=sys.stderr)
        return 2

    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:6.2f}s] {message}", flush=True)

    pool = greenpool.init(
        {
            "db": endpoint,
            "groups": {
                "write": {"connection_count": 4, "timeout": 5},
                "read": {"connection_count": 8, "autocommit": True, "timeout": 5},
            },
        }
    )
    outcome = {"ok": 0, "killed": 0, "errors": 0, "after_restart_errors": 0}
    restarted_at: list[float] = []
    try:
        with greenpool.handler("write") as db:
            db.execute("DROP TABLE IF EXISTS greenpool_demo; "
                       "CREATE TABLE greenpool_demo (id serial PRIMARY KEY, note text)")
        say("pool ready: groups 'write' (4 connections) and 'read' (8, autocommit)")

        def client(i: int) -> None:
            deadline = time.monotonic() + args.seconds
            n = 0
            while time.monotonic() < deadline:
                n += 1
                began = time.monotonic()
                try:
                    # every 7th request is cut short by a timeout, as a slow client would be
                    with gevent.Timeout(0.01 if n % 7 == 0 else None):
                        if n % 3 == 0:
                            with greenpool.handler("write") as db:
                                db.query("INSERT INTO greenpool_demo (note) VALUES (%s)",
                                         (f"client {i}",))
                        else:
                            with greenpool.handler("read") as db:
                                db.query("SELECT count(*), pg_sleep(0.005) FROM greenpool_demo")
                    outcome["ok"] += 1
                except gevent.Timeout:
                    outcome["killed"] += 1
                except greenpool.PoolError as exc:
                    outcome["errors"] += 1
                    if restarted_at and began > restarted_at[0]:
                        outcome["after_restart_errors"] += 1
                        say(f"client {i}: {exc}")
                except Exception as exc:  # a request cut by the restart itself
                    outcome["errors"] += 1
                    if restarted_at and began > restarted_at[0]:
                        outcome["after_restart_errors"] += 1
                        say(f"client {i}: {type(exc).__name__}: {exc}")

        clients = [gevent.spawn(client, i) for i in range(args.clients)]
        say(f"{args.clients} greenlets reading and writing for {args.seconds:.0f} s")
        if cluster is not None:
            gevent.sleep(args.seconds / 3)
            say("restarting PostgreSQL under the live pool (pg_ctl restart -m fast)")
            cluster.restart(mode="fast")
            restarted_at.append(time.monotonic())
            say("server is back; idle connections to the old server will be replaced")
        gevent.joinall(clients)
        say("load finished")
        with greenpool.handler("read") as db:
            rows = db.query_one("SELECT count(*) FROM greenpool_demo")[0]
        stats = pool.stats()["groups"]
        print()
        print(f"requests ok: {outcome['ok']}, cut by timeouts: {outcome['killed']}, "
              f"errors: {outcome['errors']} (of which after the restart: "
              f"{outcome['after_restart_errors']}), rows written: {rows}")
        for name, group in stats.items():
            print(f"group {name!r}: size {group['size']}/{group['max_size']}, "
                  f"acquires {group['acquires']}, waits {group['waits']}, "
                  f"connects {group['connects']}, discards {group['discards_by_reason']}")
        leaked = sum(g["in_use"] for g in stats.values())
        print(f"connections still lent out: {leaked} (must be 0)")
        return 0 if leaked == 0 and outcome["after_restart_errors"] == 0 else 1
    finally:
        greenpool.close()
        if cluster is not None:
            cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="greenpool", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a load with a restart mid-run")
    demo.add_argument("--dsn", help="use this server instead of a throwaway one")
    demo.add_argument("--clients", type=int, default=100, help="greenlets (default 100)")
    demo.add_argument("--seconds", type=float, default=6.0, help="duration (default 6)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
