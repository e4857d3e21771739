"""``greenpool`` / ``python -m greenpool``: the command line.

* ``greenpool demo``: the pool through a failover, with no configuration (see cli/demo.py).
* ``greenpool check [CONFIG]``: each endpoint's reachability, role, lag; exit 1 when a group
  has no eligible endpoint (see cli/check.py).
* ``greenpool bench [CONFIG]``: N greenlets for T seconds through one group (see cli/bench.py).

Every way a command can fail ends in one sentence on stderr and a documented exit status
(the constants in cli/process.py; docs/cli.md's command table), never in a traceback unless
``--debug`` asks for it. SIGINT, SIGTERM and SIGHUP become :class:`Interrupted`, raised
wherever the process is, so every ``finally`` runs (the demo removes its servers); further
signals during that cleanup are ignored, so it cannot be cut short.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from .process import (
    BAD_INPUT,
    BUG,
    UNREACHABLE,
    CheckFailed,
    Interrupted,
    end_progress,
    signals_as_exceptions,
)

MAX_CLIENTS = 100_000


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line (not argparse's usage block), exit status 2."""
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(BAD_INPUT)


def _clients(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if not 1 <= value <= MAX_CLIENTS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_CLIENTS}, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 86400):
        raise argparse.ArgumentTypeError(f"expected more than 0 and at most 86400 seconds, "
                                         f"not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="greenpool", description="greenpool's command line")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser("demo", help="a load through a failover, on throwaway servers")
    demo.add_argument("--dsn", help="use this server instead of throwaway ones")
    demo.add_argument("--clients", type=_clients, default=100, help="greenlets (default 100)")
    demo.add_argument("--seconds", type=_seconds, default=9.0, help="duration (default 9)")
    check = commands.add_parser("check", help="probe every endpoint; exit 1 if a group has none")
    check.add_argument("config", nargs="?", help=".json/.toml/.py file (default: environment)")
    bench = commands.add_parser("bench", help="load one group; throughput, latency, waits")
    bench.add_argument("config", nargs="?", help=".json/.toml/.py file (default: environment)")
    bench.add_argument("--group", help="the group to load (needed if there are several)")
    bench.add_argument("--clients", type=_clients, default=50, help="greenlets (default 50)")
    bench.add_argument("--seconds", type=_seconds, default=10.0, help="duration (default 10)")
    bench.add_argument("--sql", default="SELECT 1", help="the statement (default SELECT 1)")
    for sub in (demo, check, bench):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an unexpected error")
    return parser


def _command(args: argparse.Namespace) -> Callable[[], int]:
    if args.command == "bench":
        from .bench import run as bench_run

        return lambda: bench_run(args.config, args.group, args.clients, args.seconds, args.sql)
    if args.command == "check":
        from .check import run as check_run

        return lambda: check_run(args.config)
    from .demo import run as demo_run

    return lambda: demo_run(args.dsn or os.environ.get("GREENPOOL_DSN"), args.clients,
                            args.seconds)


def main(argv: list[str] | None = None) -> int:
    with signals_as_exceptions() as received:
        args = _parser().parse_args(argv)
        name = f"greenpool {args.command}"
        try:
            return _command(args)()
        except (Interrupted, KeyboardInterrupt) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            _say(name, f"interrupted by {signal.Signals(signum).name}; what it started is "
                       "stopped and removed")
            return 128 + signum
        except CheckFailed as exc:
            _say(name, str(exc))
            return exc.status
        except BrokenPipeError:  # stdout closed early (piped into head): say nothing more
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        except Exception as exc:  # the one place that turns a bug into a sentence
            if received:  # the cleanup after a signal failed too: report both, exit as signalled
                _say(name, f"interrupted by {signal.Signals(received[0]).name}, then "
                           f"{type(exc).__name__} while stopping: {' '.join(str(exc).split())}")
                return 128 + received[0]
            return _unexpected(name, exc, args.debug)


def _unexpected(name: str, exc: Exception, debug: bool) -> int:
    import psycopg2

    from ..errors import ConfigError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ConfigError):
        _say(name, f"bad configuration: {text}")
        return BAD_INPUT
    if isinstance(exc, psycopg2.OperationalError):  # the pool's errors and libpq's
        _say(name, f"cannot reach the database: {type(exc).__name__}: {text}")
        return UNREACHABLE
    if debug:
        traceback.print_exception(exc)
    _say(name, f"unexpected error (a bug in greenpool; --debug shows where): "
               f"{type(exc).__name__}: {text}")
    return BUG


def _say(name: str, message: str) -> None:
    end_progress()  # on a line of its own, never after a progress line
    sys.stdout.flush()
    sys.stderr.write(f"{name}: {message}\n")
    sys.stderr.flush()

