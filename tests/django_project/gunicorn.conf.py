"""gunicorn settings of the test project: the pools are made lazily in each worker (after
the gevent worker patched it) and closed when the worker exits."""

worker_class = "gevent"
graceful_timeout = 10


def worker_exit(server, worker):
    from greenpool.django.pools import close_all

    close_all()
