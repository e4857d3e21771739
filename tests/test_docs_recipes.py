"""The Flask and Celery recipes of docs/, run as their pages say: under gunicorn with gevent
workers, and in a Celery worker with ``-P gevent``.

The code is read from the pages themselves, so a recipe that drifts from what works fails
here. Both check the promise the recipes make about shutdown: no server connection outlives
the worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from greenpool.testing.postgres import Cluster, free_port

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)


def _blocks(page: str) -> list[str]:
    return BLOCK.findall((ROOT / "docs" / page).read_text())


@pytest.fixture
def database(pg: Cluster, mode: str) -> Iterator[str]:
    """A fresh database with the recipes' table (their migrations' job), dropped after the
    test; the recipes run once (gevent only)."""
    if mode != "gevent":
        pytest.skip("the recipes choose their own mode; they run in the gevent test process")
    name = f"recipe_{uuid.uuid4().hex[:12]}"
    pg.create_database(name)
    conn = pg.connect(dbname=name)
    try:
        conn.cursor().execute("CREATE TABLE notes (id serial PRIMARY KEY, text text)")
    finally:
        conn.close()
    yield pg.dsn(dbname=name)
    pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _connections(pg: Cluster, dsn: str) -> int:
    database = re.search(r"dbname=(\S+)", dsn).group(1)  # type: ignore[union-attr]
    [(count,)] = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                            "AND pid <> pg_backend_pid()", (database,))
    return int(count)


def _env(dsn: str, **extra: str) -> dict[str, str]:
    # not the Django tests' settings module (left in this process's environment): Celery
    # would load Django's fix-ups for a project the recipe does not have
    inherited = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    return {**inherited, "DATABASE_URL": dsn, **extra,
            "PYTHONPATH": os.pathsep.join([".", str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _stop(proc: subprocess.Popen[str], within: float = 30) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"did not stop on SIGTERM within {within} s:\n{out}")
    return out


def _wait_http(url: str, proc: subprocess.Popen[str], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gunicorn exited: {proc.communicate()[0]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # an answer, whatever its status
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {within} s")


@pytest.mark.timeout(90)
def test_flask_recipe_serves_under_gunicorn_and_closes_its_pools(
    pg: Cluster, database: str, tmp_path: Path
) -> None:
    app, conf = _blocks("flask.md")[:2]
    (tmp_path / "app.py").write_text(app)
    (tmp_path / "gunicorn.conf.py").write_text(conf + "\ncontrol_socket_disable = True\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "2", "-b", f"127.0.0.1:{port}",
         "-c", "gunicorn.conf.py", "app:app"],
        cwd=tmp_path, env=_env(database), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        request = urllib.request.Request(f"{base}/notes/first", method="POST")
        _wait_http(f"{base}/notes/zero", proc)  # GET on a POST route: 405, but served
        ids = [json.load(urllib.request.urlopen(request, timeout=10))["id"] for _ in range(5)]
        assert ids == sorted(ids) and len(set(ids)) == 5
        notes = json.load(urllib.request.urlopen(f"{base}/notes", timeout=10))
        assert [text for _, text in notes] == ["first"] * 5
        assert _connections(pg, database) >= 1
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert _connections(pg, database) == 0, out


@pytest.mark.timeout(120)
def test_celery_recipe_runs_tasks_in_a_gevent_worker_and_closes_its_pool(
    pg: Cluster, database: str, tmp_path: Path
) -> None:
    pytest.importorskip("celery")
    [tasks] = _blocks("celery.md")[:1]
    (tmp_path / "tasks.py").write_text(tasks)
    queue = tmp_path / "queue"
    queue.mkdir()
    options = {"data_folder_in": str(queue), "data_folder_out": str(queue)}
    (tmp_path / "celeryconfig.py").write_text(
        f"broker_transport_options = {options!r}\nresult_backend = 'file://{tmp_path}/results'\n")
    (tmp_path / "results").mkdir()
    env = _env(database, CELERY_BROKER_URL="filesystem://",
               CELERY_RESULT_BACKEND=f"file://{tmp_path}/results")
    # tasks.py reads its broker from the environment; the filesystem transport's folders
    # come from celeryconfig, loaded by a tiny wrapper so the recipe stays as written
    (tmp_path / "worker_app.py").write_text(
        "from tasks import app\napp.config_from_object('celeryconfig')\n")
    log = tmp_path / "worker.log"  # a file, not a pipe: a full pipe would stall the worker
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker_app:app", "worker", "-P", "gevent",
             "-c", "20", "--without-heartbeat", "--without-gossip", "--without-mingle",
             "-l", "INFO"],
            cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text():
            assert proc.poll() is None, f"the worker exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the worker not ready in 60 s:\n{log.read_text()}"
            time.sleep(0.1)
        client = subprocess.run(
            [sys.executable, "-c",
             "from worker_app import app\nimport tasks, json\n"
             "results = [tasks.add_note.delay(f'n{i}') for i in range(40)]\n"
             "print(json.dumps(sorted(r.get(timeout=60) for r in results)))\n"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
        assert client.returncode == 0, f"{client.stderr}\n--- worker ---\n{log.read_text()}"
        assert json.loads(client.stdout.splitlines()[-1]) == list(range(1, 41))
        assert 1 <= _connections(pg, database) <= 10  # the recipe's connection_count
    finally:
        _stop(proc)
    assert _connections(pg, database) == 0, log.read_text()
