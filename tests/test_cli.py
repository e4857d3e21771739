"""The ``greenpool`` command's ways out: bad input, dead servers, signals, time limits.

Every case runs the real command as a subprocess and checks the documented exit status and
the one sentence on stderr (never a traceback). Signals are sent by PID once the command is
seen doing the thing the signal should interrupt (its output, or its socket to a server).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modes import MODE

from greenpool.cli.config_file import read_config
from greenpool.cli.process import BAD_INPUT, FAILED, UNREACHABLE, CheckFailed

pytestmark = pytest.mark.skipif(MODE != "gevent", reason="runs the command once, from gevent")

ENV = {k: v for k, v in os.environ.items() if k not in ("GREENPOOL_CONFIG", "GREENPOOL_DSN")}


def greenpool(*args: str, timeout: float = 60, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "greenpool", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or ENV, check=False)


def assert_one_sentence(result: subprocess.CompletedProcess[str], status: int, *words: str
                        ) -> str:
    err = result.stderr
    assert result.returncode == status, (result.returncode, result.stdout, err)
    assert "Traceback" not in result.stdout + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- bad configuration files ------------------------------------------------------------------

BAD_FILES: list[tuple[str, bytes | None, str]] = [
    ("raises.py", b"raise RuntimeError('boom')\n", "raised RuntimeError while loading: boom"),
    ("five.py", b"CONFIG = 5\n", "CONFIG must be a dict, not int"),
    ("none.py", b"X = 1\n", "variable named CONFIG"),
    ("exits.py", b"import sys\nsys.exit(3)\n", "called sys.exit(3)"),
    ("syntax.py", b"CONFIG = {\n", "not valid Python"),
    ("latin1.json", b'{"db": "caf\xe9"}', "not UTF-8 text"),
    ("broken.json", b'{"db": ', "not valid JSON"),
    ("list.json", b"[1, 2]", "expected a JSON object"),
    ("deep.json", b"[" * 60000, "nested too deeply"),
    ("broken.toml", b"db = [", "not valid TOML"),
    ("pool.yaml", b"db: x", "expected a .json, .toml or .py file"),
    ("x.json", None, "is a directory"),
    ("typo.json", b'{"db": "host=127.0.0.1", "groups": {"g": {"conection_count": 1}}}',
     "did you mean 'connection_count'"),
]


@pytest.mark.parametrize("command", ["check", "bench"])
@pytest.mark.parametrize(("name", "content", "words"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_configuration_file_is_one_sentence_and_status_2(tmp_path: Path, command: str,
                                                               name: str, content: bytes | None,
                                                               words: str) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    line = assert_one_sentence(greenpool(command, str(path)), BAD_INPUT, words)
    assert line.startswith(f"greenpool {command}: {path}") or "bad configuration" in line


def test_missing_file_bad_options_and_no_configuration(tmp_path: Path) -> None:
    assert_one_sentence(greenpool("check", str(tmp_path / "nope.json")), BAD_INPUT,
                        "no such file")
    assert_one_sentence(greenpool("check"), BAD_INPUT, "no configuration")
    for option in (["--seconds", "nan"], ["--seconds", "-1"], ["--clients", "0"],
                   ["--clients", "many"], ["--nonsense"]):
        assert_one_sentence(greenpool("bench", *option), BAD_INPUT, "--help")
    assert_one_sentence(greenpool("demo", "--dsn", "port=abc"), BAD_INPUT, "bad --dsn", "port")
    bad_env = {**ENV, "GREENPOOL_CONFIG": "{not json"}
    assert_one_sentence(greenpool("check", env=bad_env), BAD_INPUT, "GREENPOOL_CONFIG")


# Hypothesis: whatever a configuration file holds, reading it is a PoolConfig or one sentence
# with status 2 (in-process: a subprocess per example would take minutes).

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["db", "groups", "host", "port", "timeout", "connection_count",
                         "type", "role", "x", ""]) | st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _read(path: Path) -> None:
    try:
        read_config(str(path))
    except CheckFailed as exc:
        assert exc.status == BAD_INPUT
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | JSONISH.map(lambda v: json.dumps(v).encode()),
       suffix=st.sampled_from([".json", ".toml"]))
def test_any_file_content_reads_as_a_config_or_one_sentence(tmp_path: Path, content: bytes,
                                                            suffix: str) -> None:
    path = tmp_path / f"pool{suffix}"
    path.write_bytes(content)
    _read(path)


PY_LINES = st.sampled_from([
    "CONFIG = {!r}", "raise {}('x')", "import sys; sys.exit({!r})", "CONFIG = [{!r}]",
    "def f(): return f()\nf()", "CONFIG = {{'db': {!r}}}", "raise SystemExit",
    "raise KeyError({!r})", "import os; CONFIG = dict(os.environ)",
])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(template=PY_LINES, value=JSONISH, exc=st.sampled_from(
    ["ValueError", "RuntimeError", "ImportError", "MemoryError", "GeneratorExit"]))
def test_any_python_config_reads_as_a_config_or_one_sentence(tmp_path: Path, template: str,
                                                             value: Any, exc: str) -> None:
    path = tmp_path / "pool.py"
    path.write_text(template.format(exc if template.startswith("raise {}") else value))
    _read(path)


# --- dead servers and time limits -------------------------------------------------------------

def _dead_config(tmp_path: Path, **top: Any) -> str:
    path = tmp_path / "dead.json"
    path.write_text(json.dumps({"db": "host=127.0.0.1 port=1 dbname=x user=x",
                                "groups": {"g": {"timeout": 3}}, **top}))
    return str(path)


def test_bench_against_a_dead_server_ends_on_time_and_says_why(tmp_path: Path) -> None:
    started = time.monotonic()
    result = greenpool("bench", _dead_config(tmp_path), "--seconds", "1.5", "--clients", "5")
    elapsed = time.monotonic() - started
    line = assert_one_sentence(result, FAILED, "nothing was served", "NoHealthyEndpoint",
                               "Connection refused")
    assert "127.0.0.1:1/x" in line
    assert elapsed < 1.5 + 3 + 3  # --seconds, one acquire timeout, interpreter start-up


def test_bench_against_a_black_hole_ends_on_time(tmp_path: Path, blackhole: Any) -> None:
    """Connects that hang: still --seconds plus one acquire timeout at most."""
    path = tmp_path / "hole.json"
    path.write_text(json.dumps({"db": dict(blackhole.endpoint(), connect_timeout=30),
                                "groups": {"g": {"timeout": 2}}}))
    started = time.monotonic()
    result = greenpool("bench", str(path), "--seconds", "1", "--clients", "3")
    elapsed = time.monotonic() - started
    assert_one_sentence(result, FAILED, "nothing was served")
    assert elapsed < 1 + 2 + 3


def test_bench_with_startup_timeout_against_a_dead_server_is_status_3(tmp_path: Path) -> None:
    result = greenpool("bench", _dead_config(tmp_path, startup_timeout=1), "--seconds", "5")
    assert_one_sentence(result, UNREACHABLE, "cannot reach the database", "NoHealthyEndpoint")


def test_bench_cuts_off_a_statement_that_outlives_the_run(pg: Any, tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"db": pg.endpoint(), "groups": {"g": {"timeout": 1}}}))
    started = time.monotonic()
    result = greenpool("bench", str(path), "--seconds", "0.5", "--clients", "2",
                       "--sql", "SELECT pg_sleep(8)")
    elapsed = time.monotonic() - started
    assert_one_sentence(result, FAILED, "nothing was served", "still running at the end")
    assert "statements cut off at the end: 2" in result.stdout
    assert elapsed < 0.5 + 1 + 4


def test_bench_with_a_bad_statement_says_so(pg: Any, tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"db": pg.endpoint()}))
    result = greenpool("bench", str(path), "--seconds", "0.5", "--clients", "2",
                       "--sql", "SELEKT 1")
    assert_one_sentence(result, FAILED, "nothing was served", "SyntaxError")


def test_check_and_demo_against_a_dead_server(tmp_path: Path) -> None:
    result = greenpool("check", _dead_config(tmp_path))
    assert result.returncode == FAILED and "NO eligible endpoint" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    result = greenpool("demo", "--dsn", "host=127.0.0.1 port=1 dbname=x user=x",
                       "--seconds", "1")
    assert_one_sentence(result, UNREACHABLE, "cannot reach the database")


# --- signals ----------------------------------------------------------------------------------

def _connected_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket to 127.0.0.1:``port`` (from /proc, no tools)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2].endswith(f":{port:04X}") and fields[9] in inodes:
            return True
    return False


class Output:
    """What a subprocess has written to its stdout so far, read without blocking."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.seen = b""

    def text(self) -> str:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # nothing more for now, or closed (after communicate())
                break
            if not chunk:
                break
            self.seen += chunk
        return self.seen.decode(errors="replace")


def _wait(predicate: Any, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never got there"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_check_is_one_sentence(tmp_path: Path, blackhole: Any,
                                               sig: signal.Signals) -> None:
    path = tmp_path / "hole.json"
    path.write_text(json.dumps({"db": dict(blackhole.endpoint(), connect_timeout=30)}))
    proc = subprocess.Popen([sys.executable, "-m", "greenpool", "check", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait(lambda: _connected_to(proc.pid, blackhole.port), proc)  # probing the hole
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_sentence(result, 128 + sig, f"interrupted by {sig.name}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_bench_closes_the_pool(pg: Any, tmp_path: Path, server_conns: Any,
                                               sig: signal.Signals) -> None:
    name = f"bench-signal-{sig.name.lower()}"
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"db": pg.endpoint(), "application_name": name,
                                "groups": {"g": {"connection_count": 3}}}))
    proc = subprocess.Popen([sys.executable, "-m", "greenpool", "bench", str(path),
                             "--seconds", "60", "--clients", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        seen = Output(proc)
        _wait(lambda: "ops/s" in seen.text(), proc)
        assert server_conns(application_name=name) == 3
        started = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, seen.text() + out, err)
    assert_one_sentence(result, 128 + sig, f"interrupted by {sig.name}")
    assert result.stdout.endswith("\n")  # on a terminal, the sentence starts on its own line
    assert server_conns(application_name=name, expect=0) == 0  # the pool was closed


def test_debug_shows_a_traceback_only_for_an_unexpected_error(tmp_path: Path) -> None:
    """The only way to reach the ``bug`` exit status from outside is a broken install, so
    this one is simulated: a wrapper breaks ``check.run`` before calling main()."""
    script = tmp_path / "broken.py"
    script.write_text(
        "import sys, greenpool.cli.check as c\n"
        "def broken(path): raise ZeroDivisionError('a bug')\n"
        "c.run = broken\n"
        "from greenpool.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    plain = subprocess.run([sys.executable, str(script), "check"], capture_output=True,
                           text=True, timeout=60, env=ENV, check=False)
    assert_one_sentence(plain, 4, "unexpected error", "ZeroDivisionError: a bug", "--debug")
    debug = subprocess.run([sys.executable, str(script), "--debug", "check"],
                           capture_output=True, text=True, timeout=60, env=ENV, check=False)
    assert debug.returncode == 4 and "Traceback" in debug.stderr


def test_every_exit_status_is_in_the_docs() -> None:
    section = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    for status in ("`0`", "`1`", "`2`", "`3`", "`4`", "`130`", "`143`"):
        assert status in section, status


def test_a_signal_inside_a_shielded_cleanup_waits_for_its_end() -> None:
    """A real SIGTERM to this process: held while shielded, raised after; later ones ignored."""
    from greenpool.cli.process import Interrupted, shielded, signals_as_exceptions

    steps = []
    with signals_as_exceptions() as received, pytest.raises(Interrupted) as info, shielded():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run by now (and must not have raised)
        steps.append("cleanup finished")
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: recorded only
        time.sleep(0.05)
        steps.append("still not interrupted")
    assert steps == ["cleanup finished", "still not interrupted"]
    assert info.value.signum == signal.SIGTERM and info.value.code == 143
    assert received == [signal.SIGTERM, signal.SIGINT]


def test_a_signal_that_lands_in_c_code_which_clears_errors_still_interrupts(tmp_path: Path
                                                                           ) -> None:
    """A real SIGTERM whose handler runs inside ``tell()`` called by ``io.BufferedReader``'s
    C constructor, which clears any error ``tell()`` raises (gevent's ``Popen`` opens its
    exec pipe so: a signal there was lost and the demo ran on). Under gevent the command is
    still interrupted, at its next wait."""
    script = tmp_path / "lands_in_c.py"
    script.write_text(
        "import io, os, signal, sys\n"
        "from greenpool.cli.process import Interrupted, signals_as_exceptions\n"
        "class Raw(io.RawIOBase):\n"
        "    def readable(self): return True\n"
        "    def tell(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        for _ in range(1000): pass  # the handler runs here, inside tell()\n"
        "        return 0\n"
        "with signals_as_exceptions():\n"
        "    from gevent import monkey\n"
        "    monkey.patch_all()\n"
        "    import gevent\n"
        "    try:\n"
        "        io.BufferedReader(Raw())\n"
        "        print('constructed', flush=True)\n"
        "        gevent.sleep(5)\n"
        "        print('never interrupted', flush=True)\n"
        "    except Interrupted as exc:\n"
        "        print('interrupted', exc.signum, flush=True)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, env=ENV, check=False)
    assert result.stdout.split("\n")[:2] == ["constructed", f"interrupted {signal.SIGTERM}"], (
        result.stdout + result.stderr)


def test_bench_runs_on_gevent_whatever_the_type(pg: Any, tmp_path: Path) -> None:
    for mode in ("threaded", "eventlet", "non-threaded"):
        path = tmp_path / f"{mode}.json"
        path.write_text(json.dumps({"db": pg.endpoint(), "type": mode}))
        result = greenpool("bench", str(path), "--seconds", "0.3", "--clients", "3")
        assert result.returncode == 0, (mode, result.stdout, result.stderr)
        assert "errors: 0" in result.stdout
