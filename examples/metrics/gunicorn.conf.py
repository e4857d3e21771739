"""gunicorn settings: N gevent workers, one merged ``/metrics`` served by the master.

``GREENPOOL_CONFIG`` (JSON) is the pool's configuration, ``GREENPOOL_METRICS_DIR`` the
directory the workers write their snapshots to (emptied at start), ``GREENPOOL_METRICS_PORT``
the port of the merged endpoint (default 9100)::

    GREENPOOL_CONFIG='{"db": "host=... dbname=..."}' GREENPOOL_METRICS_DIR=/run/app-metrics \\
        gunicorn -c examples/metrics/gunicorn.conf.py -w 4
"""

from __future__ import annotations

import json
import os
from typing import Any

import greenpool
import greenpool.prometheus
from greenpool import prometheus_workers

_here = os.path.dirname(os.path.abspath(__file__))

wsgi_app = "app:application"
pythonpath = _here
worker_class = "gevent"
control_socket_disable = True  # gunicorn >= 27's control socket: not needed here

METRICS_DIR = os.environ.get("GREENPOOL_METRICS_DIR", "/tmp/greenpool-metrics")
METRICS_PORT = int(os.environ.get("GREENPOOL_METRICS_PORT", "9100"))


def on_starting(server: Any) -> None:
    prometheus_workers.reset(METRICS_DIR)  # counters start with the server


def when_ready(server: Any) -> None:
    # in the master: one port for all workers
    prometheus_workers.serve(METRICS_DIR, port=METRICS_PORT)


def post_worker_init(worker: Any) -> None:
    pool = greenpool.init(json.loads(os.environ["GREENPOOL_CONFIG"]))  # after gevent patched
    greenpool.prometheus.register(pool, name="app")
    worker.greenpool_metrics = prometheus_workers.start_worker(METRICS_DIR)


def worker_exit(server: Any, worker: Any) -> None:
    export = getattr(worker, "greenpool_metrics", None)
    if export is not None:
        export.stop()  # a last snapshot, the pool still open: its counters survive the worker
    greenpool.close()
