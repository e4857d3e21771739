"""gunicorn settings of the test project: the pools are made lazily in each worker (after
the gevent worker patched it) and closed when the worker exits."""

import os

worker_class = "gevent"
graceful_timeout = 10


def worker_exit(server, worker):
    if worker.pid != os.getpid():  # gunicorn calls this in the master too
        return
    from greenpool.django.pools import close_all

    close_all()
