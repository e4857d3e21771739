"""One pool, one workload, one fresh process: ``python -m benchmarks.worker '<json spec>'``.

gevent patches everything before anything else is imported; psycopg2-based pools also get
psycogreen's wait callback. The result is printed as one JSON line on stdout.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402


def main(spec: dict[str, Any]) -> dict[str, Any]:
    from .adapters import ADAPTERS, Target

    cls = ADAPTERS[spec["peer"]]
    if cls.psycopg2_based:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
    from . import workloads

    target = Target(**spec["target"])
    workload = spec["workload"].replace("-", "_")  # the names on the command line use "-"
    params = dict(spec["params"])
    if workload == "deadline_storm":  # before the pool exists: none of its connects count
        params.update(workloads.storm_baseline(target.dsn(), params["log_path"]))
        # on a slow machine the timeouts reach further, relative to its connect time
        reach = params.pop("reach", 0.0)
        params["high"] = max(params["high"], round(reach * params["connect_ms"] / 1e3, 4))
    adapter = cls(target, spec["size"], autocommit=spec.get("autocommit", True),
                  readonly=spec.get("readonly", False), lazy=spec.get("lazy", False))
    if workload in ("failover", "saturated_failover"):
        params["start_signal"] = _start_signal
    try:
        return getattr(workloads, workload)(adapter, **params)
    finally:
        adapter.close()


def _start_signal() -> float:
    """Tell the orchestrator we are ready; it answers with the common start time."""
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    return float(sys.stdin.readline())


if __name__ == "__main__":
    out = main(json.loads(sys.argv[1]))
    sys.stdout.write("\nRESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
