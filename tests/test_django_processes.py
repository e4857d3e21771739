"""greenpool.django in processes of their own: a gunicorn worker forked from a master that
already queried, and Django's own test runner (``--parallel`` clones test databases)."""

from __future__ import annotations

import pytest
from modes import MODE

from greenpool.testing.postgres import Cluster

django = pytest.importorskip("django")

pytestmark = [
    pytest.mark.skipif(MODE == "eventlet", reason="greenpool.django supports gevent and threads"),
    pytest.mark.timeout(60),
]


_FORKED_WORKER = r'''
import faulthandler, json, os, sys, time
import django
django.setup()
from django.db import connection
with connection.cursor() as cursor:  # the master's query: a threaded pool
    cursor.execute("SELECT 1")
connection.close()
pid = os.fork()
if pid:
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
faulthandler.dump_traceback_later(20, exit=True)  # a hung hub ends the child, loudly
from gevent import monkey
monkey.patch_all()  # as gunicorn's gevent worker does, after the fork
import gevent
from django.db.utils import ConnectionHandler
handler = ConnectionHandler()  # Django's per-greenlet connections, made after patching
results = []
def work():
    try:
        with handler["default"].cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.1)")
        results.append("ok")
    except BaseException as exc:
        results.append(repr(exc))
    finally:
        handler["default"].close()
tasks = [gevent.spawn(work) for _ in range(6)]
gevent.joinall(tasks, timeout=15)
from greenpool.django.pools import _pools
print(json.dumps({"results": results, "modes": [p.config.mode for p in _pools.values()]}),
      flush=True)  # os._exit() below flushes nothing
os._exit(0)
'''


def test_a_pool_made_before_fork_does_not_hang_a_gevent_worker(pg: Cluster) -> None:
    """gunicorn ``--preload`` with an app that queries while loading: the master makes a
    threaded pool, the gevent worker patches after the fork. The inherited pool's real locks
    must not block the worker's hub."""
    if MODE != "gevent":
        pytest.skip("runs in a subprocess of its own: once is enough")
    import json
    import os
    import subprocess
    import sys

    from django_site import PROJECT

    name = "django_fork"
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
        pg.create_database(name)
    dbs = {"default": {"ENGINE": "greenpool.django", "NAME": name, "USER": pg.user,
                       "PASSWORD": pg.password, "HOST": pg.host, "PORT": pg.port,
                       "OPTIONS": {"connection_count": 2, "timeout": 5}}}
    env = {**os.environ, "GREENPOOL_DJANGO_DATABASES": json.dumps(dbs),
           "DJANGO_SETTINGS_MODULE": "djproject.settings",
           "PYTHONPATH": os.pathsep.join([str(PROJECT.parent.parent), str(PROJECT)])}
    done = subprocess.run([sys.executable, "-c", _FORKED_WORKER], env=env, cwd=PROJECT,
                          capture_output=True, text=True, timeout=50, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"results": ["ok"] * 6, "modes": ["gevent"]}, found


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_django_test_classes_and_the_parallel_runner(pg: Cluster, parallel: str) -> None:
    """TestCase, TransactionTestCase, on_commit capture and ``--parallel`` (cloned test
    databases: no pooled session may block the CREATE DATABASE ... TEMPLATE)."""
    if MODE != "gevent":
        pytest.skip("runs in a subprocess of its own: once is enough")
    import json
    import os
    import subprocess
    import sys

    from django_site import PROJECT, databases

    name = "django_parallel"
    if not pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)):
        pg.create_database(name)
    dbs = databases(pg, name)
    for alias in dbs.values():
        alias["OPTIONS"] = {k: v for k, v in alias["OPTIONS"].items() if k != "greenpool"}
    env = {**os.environ, "GREENPOOL_DJANGO_DATABASES": json.dumps(dbs),
           "PYTHONPATH": os.pathsep.join([str(PROJECT.parent.parent), str(PROJECT)])}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([sys.executable, "manage.py", "test", "notes.runner_suite",
                           "--noinput", "--parallel", parallel], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=50, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ran 4 tests" in done.stderr and "OK" in done.stderr, done.stderr[-2000:]
    assert not pg.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                          (f"test_{name}%",))

