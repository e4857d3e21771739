"""``greenpool check``: one row per endpoint with its detected role; exit status per group."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from modes import MODE

pytestmark = pytest.mark.skipif(MODE != "gevent", reason="runs once, in the gevent process")


def check(tmp_path, config):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "greenpool", "check", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_check_shows_roles_and_fails_only_without_an_eligible_endpoint(pg_factory, tmp_path,
                                                                       blackhole):
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    dead = dict(blackhole.endpoint(), connect_timeout=0.5, name="postgres")
    db = [primary.endpoint(), standby.endpoint(), dead]
    result = check(tmp_path, {"db": db, "groups": {
        "write": {"role": "primary"}, "read": {"role": "standby"}}})
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("127.0.0.1")}
    assert " primary " in rows[f"127.0.0.1:{primary.port}/postgres"]
    version = primary.execute("SHOW server_version")[0][0].split()[0]  # "15.18", not "15.18 (D"
    row = rows[f"127.0.0.1:{primary.port}/postgres"]
    assert re.search(rf" {re.escape(version)} +primary ", row), row
    assert " standby " in rows[f"127.0.0.1:{standby.port}/postgres"]
    assert " NO " in rows[f"127.0.0.1:{blackhole.port}/postgres"]
    assert "no answer" in rows[f"127.0.0.1:{blackhole.port}/postgres"]
    assert "Traceback" not in out + result.stderr

    # a group whose only endpoint is dead makes the check fail
    result = check(tmp_path, {"db": db, "groups": {
        "write": {"role": "primary"}, "lonely": {"endpoints": [2]}}})
    assert result.returncode == 1
    assert "group 'lonely' (role any): NO eligible endpoint" in result.stdout


def test_check_says_what_is_wrong_without_a_traceback(tmp_path):
    result = check(tmp_path, {"db": {"host": "127.0.0.1"}, "groups": {"g": {"conection_count": 1}}})
    assert result.returncode == 2
    assert "did you mean 'connection_count'" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stdout + result.stderr
