"""gunicorn settings for the greenpool example: ``gunicorn -c gunicorn.conf.py app:application``.

The gevent worker monkey-patches *after* ``post_fork`` runs, so nothing here creates the
pool: app.py creates it lazily on the first request, after patching. ``worker_exit`` closes
it so no server connection outlives the worker.
"""

bind = "127.0.0.1:8000"
worker_class = "gevent"
workers = 2
worker_connections = 1000


def worker_exit(server, worker):  # gunicorn calls it with both
    import greenpool

    greenpool.close()
