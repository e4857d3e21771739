"""gunicorn settings for the greenpool example: ``gunicorn -c examples/gunicorn/gunicorn.conf.py``.

Pool life cycle per worker (see README.md here for why):

- master (and ``--preload``): app.py is imported and GREENPOOL_CONFIG validated; nothing
  is opened, so nothing can be shared with the workers through fork.
- ``post_fork``: runs in the new worker *before* the gevent worker monkey-patches, so it is
  too early for the pool. Not used.
- ``post_worker_init``: after patching and after the app is loaded: the pool is created,
  and SIGTERM (stop, and the old workers of a SIGHUP reload) also ends the open
  ``/events`` streams at once (``end_streams()``), so the worker exits within about a
  second instead of waiting out ``graceful_timeout`` for streams that never end; and
  ``gc.freeze()``, so full collections skip what the worker loaded (shorter pauses).
- ``worker_exit``: after the worker stopped serving (graceful shutdown): the pool is closed,
  so no server connection outlives the worker.

Command-line options override these, e.g. ``-b 127.0.0.1:9000 -w 4``.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any

_here = os.path.dirname(os.path.abspath(__file__))

wsgi_app = "app:application"
pythonpath = _here  # so "app" imports from any working directory
bind = "127.0.0.1:8000"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = 1000  # concurrent requests per worker; the pool bounds the DB side
graceful_timeout = 10  # seconds for in-flight requests at shutdown, then they are killed
# gunicorn >= 27 opens a control socket at ~/.gunicorn/gunicorn.ctl by default, one path for
# every instance of the user; the example does not need it (older gunicorns ignore this).
control_socket_disable = True


def _app_module(worker: Any) -> Any:
    """The module gunicorn loaded the WSGI callable from (None if loading failed)."""
    wsgi = getattr(worker, "wsgi", None)
    return sys.modules.get(getattr(wsgi, "__module__", ""), None)


def post_worker_init(worker: Any) -> None:
    app = _app_module(worker)
    if app is not None and hasattr(app, "open_pool"):
        app.open_pool()
        worker.log.info("greenpool: pool opened in worker %s", worker.pid)
    if app is not None and hasattr(app, "end_streams"):
        _end_streams_on_sigterm(worker, app)
    # Everything loaded so far lives as long as the worker: the garbage collector need not
    # scan it again. A full collection then pauses the worker (all its /events streams) for
    # a few ms instead of 20-30 ms (measured with 500 streams, benchmarks/sse_fanout.py).
    gc.freeze()


def _end_streams_on_sigterm(worker: Any, app: Any) -> None:
    """Chain onto the worker's SIGTERM handler: it stops accepting (gunicorn's own), and the
    streams end (ours, in a greenlet of its own: a signal handler must not block)."""
    import gevent

    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        gevent.spawn(app.end_streams)

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_exit(server: Any, worker: Any) -> None:
    # gunicorn also calls this hook in the *master*, for a worker that was already gone when
    # the master tried to kill it. There is no pool there, and the worker's is in its grave.
    if worker.pid != os.getpid():
        return
    app = _app_module(worker)
    if app is not None and hasattr(app, "close_pool"):
        app.close_pool()
        server.log.info("greenpool: pool closed in worker %s", worker.pid)
