"""``greenpool`` / ``python -m greenpool``: the command line.

* ``greenpool demo``: the pool through a failover, with no configuration (see demo.py).
* ``greenpool check [CONFIG]``: each endpoint's reachability, role, lag; exit 1 when a group
  has no eligible endpoint (see check.py).
* ``greenpool bench [CONFIG]``: N greenlets for T seconds through one group (see bench.py).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="greenpool", description="greenpool's command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="a load through a failover, on throwaway servers")
    demo.add_argument("--dsn", help="use this server instead of throwaway ones")
    demo.add_argument("--clients", type=int, default=100, help="greenlets (default 100)")
    demo.add_argument("--seconds", type=float, default=9.0, help="duration (default 9)")
    check = commands.add_parser("check", help="probe every endpoint; exit 1 if a group has none")
    check.add_argument("config", nargs="?", help=".json/.toml/.py file (default: environment)")
    bench = commands.add_parser("bench", help="load one group; throughput, latency, waits")
    bench.add_argument("config", nargs="?", help=".json/.toml/.py file (default: environment)")
    bench.add_argument("--group", help="the group to load (needed if there are several)")
    bench.add_argument("--clients", type=int, default=50, help="greenlets (default 50)")
    bench.add_argument("--seconds", type=float, default=10.0, help="duration (default 10)")
    bench.add_argument("--sql", default="SELECT 1", help="the statement (default SELECT 1)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import run as bench_run

        return bench_run(args.config, args.group, args.clients, args.seconds, args.sql)
    if args.command == "check":
        from .check import run as check_run

        return check_run(args.config)
    if args.command == "demo":
        from .demo import run

        return run(args.dsn or os.environ.get("GREENPOOL_DSN"), args.clients, args.seconds)
    return 2


if __name__ == "__main__":
    sys.exit(main())
