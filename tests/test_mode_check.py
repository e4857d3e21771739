"""A mode that does not fit the process fails at ``Pool()`` with a ConfigError saying what to
do, never later as gevent's ``LoopExit``.

Monkey-patching is process-wide and cannot be undone, so each case runs in a fresh Python
process that patches (or not) as a real application would, then builds the pool. The test
process's own mode is checked in-process too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from modes import MODE

from greenpool import ConfigError
from greenpool.concurrency import check_mode_fits, process_mode

ROOT = Path(__file__).resolve().parent.parent
HAS_EVENTLET = importlib.util.find_spec("eventlet") is not None
needs_eventlet = pytest.mark.skipif(not HAS_EVENTLET, reason="eventlet is not installed")

PREAMBLE = r"""
import json, sys, warnings
patch, kind, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if patch == "gevent":
    from gevent import monkey; monkey.patch_all()
elif patch == "gevent-without-threading":
    from gevent import monkey; monkey.patch_all(thread=False)
elif patch == "gevent-without-socket":
    from gevent import monkey; monkey.patch_all(socket=False)
elif patch == "eventlet":
    warnings.simplefilter("ignore"); import eventlet; eventlet.monkey_patch()
if kind != "-":
    config["type"] = kind
"""

BUILD = PREAMBLE + r"""
import greenpool
try:
    pool = greenpool.Pool(config)
except greenpool.ConfigError as exc:
    print("ConfigError:", exc)
    sys.exit(3)
print("ok", pool.config.mode)
pool.close()
"""

#: a threaded app: 12 threads (greenlets where patched), 3 connections, contention
CONTEND = PREAMBLE + r"""
import threading
errors, modes = [], []
if sys.argv[4] == "compat":
    import greenpool.compat.pgdbpool as dbpool
    dbpool.Connection.init(config)
    def handler():
        return dbpool.Handler("g")
    def run_one(db):
        return db.query("SELECT pg_sleep(0.01), 1").fetchone()[1]
    mode = lambda: dbpool.Connection.pool().config.mode
else:
    import greenpool
    pool = greenpool.Pool(config)
    handler = lambda: pool.handler("g")
    run_one = lambda db: db.query("SELECT pg_sleep(0.01), 1")[0][1]
    mode = lambda: pool.config.mode
def work():
    try:
        for _ in range(5):
            with handler() as db:
                assert run_one(db) == 1
    except BaseException as exc:
        errors.append(type(exc).__name__)
threads = [threading.Thread(target=work) for _ in range(12)]
for t in threads: t.start()
for t in threads: t.join(60)
print(json.dumps({"errors": errors, "mode": mode(), "alive": sum(t.is_alive() for t in threads)}))
"""


def run(script: str, patch: str, kind: str, config: dict[str, Any], *extra: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", script, patch, kind, json.dumps(config),
                           *extra], capture_output=True, text=True, timeout=90, env=env)


def build(patch: str, kind: str) -> tuple[int, str]:
    """Build (not connect: pools are lazy) a pool of ``kind`` in a process patched by
    ``patch``; its exit status and output."""
    config = {"db": {"host": "127.0.0.1", "port": 1}, "groups": {"g": {}}}
    result = run(BUILD, patch, kind, config)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


@pytest.mark.parametrize("patch, kind, says", [
    ("none", "gevent", ["monkey.patch_all()", "threading and socket are not", "'threaded'"]),
    ("gevent-without-threading", "-", ["type: 'auto' cannot tell", "socket but not threading"]),
    ("gevent-without-threading", "gevent", ["its threading is not", "LoopExit"]),
    ("gevent-without-socket", "-", ["type: 'auto' cannot tell", "threading but not socket"]),
    ("gevent-without-socket", "gevent", ["its socket is not"]),
    ("gevent", "threaded", ["patched by gevent", "set type to 'gevent'"]),
    pytest.param("gevent", "eventlet", ["patched by gevent, not eventlet"],
                 marks=needs_eventlet),
    pytest.param("none", "eventlet", ["eventlet.monkey_patch()"], marks=needs_eventlet),
    pytest.param("eventlet", "gevent", ["patched by eventlet, not gevent",
                                        "set type to 'eventlet'"], marks=needs_eventlet),
    pytest.param("eventlet", "threaded", ["patched by eventlet"], marks=needs_eventlet),
])
def test_a_misfit_is_a_config_error_at_pool(patch: str, kind: str, says: list[str]) -> None:
    status, out = build(patch, kind)
    assert status == 3, out
    assert out.startswith("ConfigError: type:")
    for words in says:
        assert words in out, (words, out)


@pytest.mark.parametrize("patch, kind", [
    ("none", "threaded"), ("none", "non-threaded"), ("gevent", "gevent"),
    ("gevent", "non-threaded"),
    pytest.param("eventlet", "eventlet", marks=needs_eventlet),
])
def test_a_fitting_mode_builds(patch: str, kind: str) -> None:
    status, out = build(patch, kind)
    assert status == 0, out
    assert out.split() == ["ok", kind]


@pytest.mark.parametrize("kind", ["auto", "-"])  # auto is the default
@pytest.mark.parametrize("patch, expected", [
    ("none", "threaded"), ("gevent", "gevent"),
    pytest.param("eventlet", "eventlet", marks=needs_eventlet),
])
def test_auto_builds_the_mode_the_process_runs_on(patch: str, kind: str, expected: str) -> None:
    status, out = build(patch, kind)
    assert status == 0, out
    assert out.split() == ["ok", expected]


def test_this_test_process_fits_its_own_mode_only() -> None:
    assert process_mode() == MODE
    check_mode_fits(MODE)
    check_mode_fits("non-threaded")
    for other in {"gevent", "threaded", "eventlet"} - {MODE}:
        with pytest.raises(ConfigError, match=r"^type: "):
            check_mode_fits(other)


def test_a_threaded_app_that_never_patched_fails_at_pool_not_with_loop_exit(pg: Any) -> None:
    """A threaded app that never patched, with type gevent, fails at once with a
    ConfigError, not with LoopExit in some of its threads under contention."""
    config = {"db": pg.endpoint(), "groups": {"g": {"connection_count": 3}}}
    result = run(CONTEND, "none", "gevent", config, "greenpool")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("greenpool.ConfigError: type: 'gevent' needs a process gevent "
                           "has monkey-patched"), result.stderr
    assert "exceptions.LoopExit" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("patch, expected", [("none", "threaded"), ("gevent", "gevent")])
def test_one_config_without_type_serves_a_patched_and_an_unpatched_process(
        pg: Any, patch: str, expected: str) -> None:
    """The same configuration, no ``type``: a gevent worker and a plain script (a Flask
    shell, a Celery producer) each run 12 callers on 3 connections of a real server."""
    config = {"db": pg.endpoint(), "groups": {"g": {"connection_count": 3, "timeout": 30}}}
    result = run(CONTEND, patch, "-", config, "greenpool")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"errors": [], "mode": expected, "alive": 0}


FORK_THEN_PATCH = r"""
import json, os, sys
import greenpool
pool = greenpool.Pool(json.loads(sys.argv[1]))
with pool.handler() as db:
    db.query("SELECT 1")
pid = os.fork()
if pid == 0:
    from gevent import monkey; monkey.patch_all()
    try:
        with pool.handler() as db:
            db.query("SELECT 1")
        print("used"); sys.stdout.flush(); os._exit(0)
    except greenpool.ConfigError as exc:
        print("ConfigError:", exc); sys.stdout.flush(); os._exit(3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_an_auto_pool_made_before_fork_refuses_a_child_that_patched(pg: Any) -> None:
    """gunicorn --preload: an unpatched master made the pool (threaded), the gevent worker
    patched after fork: its first loan says what to do, not block the hub in each query."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", FORK_THEN_PATCH,
                             json.dumps({"db": pg.endpoint()})],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stdout.startswith("ConfigError: this pool was made in threaded mode before "
                                    "the process forked"), result.stdout
    assert "post_worker_init" in result.stdout


@pytest.mark.parametrize("patch, expected", [("none", "threaded"), ("gevent", "gevent")])
def test_pgdbpool_config_without_type_runs_on_what_the_process_runs_on(
        pg: Any, patch: str, expected: str) -> None:
    """pgdbpool's config without ``type`` (its ``threaded``) through the compat module: OS
    threads in a plain process, greenlets in a patched one; 12 callers on 3 connections."""
    config = {"db": pg.endpoint(), "groups": {"g": {"connection_count": 3, "timeout": 30}}}
    result = run(CONTEND, patch, "-", config, "compat")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"errors": [], "mode": expected, "alive": 0}
