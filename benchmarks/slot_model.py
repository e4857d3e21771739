"""A soak of the slot accounting model: the test's state machine, many more examples.

``python -m benchmarks.slot_model --mode gevent --examples 500 [--steps 40] [--seed N]``

Runs tests/slot_model.py's machine (the one tests/test_slot_accounting_model.py runs for a
few examples in CI) against one throwaway server for as long as asked: random borrows,
returns, interrupted borrowers, terminated, stalled and crashed backends, restarts and
housekeeping probes, the pool's books checked after every step and every slot checked at
rest. ``--non-threaded`` runs a ``non-threaded`` pool in the chosen process mode instead;
``--role-check-interval 0.2`` adds housekeeping's background role probes to the mix (their
timing then varies between runs, so a failure may not replay exactly). ``--shrink`` reduces
a failure to its shortest steps (many replays: minutes). Prints the seed first; exit
status 1 and hypothesis's report (steps, seed, ``@reproduce_failure`` blob) on a failure.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slot_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("gevent", "threaded", "eventlet"), default="gevent",
                        help="the process's concurrency mode (and the pool's)")
    parser.add_argument("--non-threaded", action="store_true",
                        help="a non-threaded pool in that process instead")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40, help="steps per example, at most")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument("--role-check-interval", type=float, default=3600.0,
                        help="seconds between background role probes (default: only the "
                             "model's own probes, so a failure replays exactly)")
    parser.add_argument("--shrink", action="store_true",
                        help="shrink a failure to its shortest steps (slow)")
    return parser.parse_args()


def main() -> int:
    args = _arguments()
    # the mode first: tests/modes.py reads it at import, and patching precedes other imports
    os.environ["GREENPOOL_TEST_MODE"] = args.mode
    if args.mode == "gevent":
        from gevent import monkey

        monkey.patch_all()
    elif args.mode == "eventlet":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import eventlet
        eventlet.monkey_patch()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from greenpool.testing.postgres import Cluster

    from slot_model import ModelSetup, run_model

    # the quarantines and recoveries the crashes cause are expected: only errors are news
    logging.basicConfig(level=logging.ERROR)
    started = time.monotonic()
    with Cluster() as cluster:
        setup = ModelSetup(cluster, "non-threaded" if args.non_threaded else args.mode,
                           role_check_interval=args.role_check_interval)
        try:
            run_model(setup, args.examples, args.steps, seed=args.seed, shrink=args.shrink)
        except Exception as exc:
            print(f"FAILED after {time.monotonic() - started:.0f} s:\n", file=sys.stderr)
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
            return 1
    print(f"passed: {args.examples} examples in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
