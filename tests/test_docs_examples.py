"""Every Python example in README.md and docs/ runs, and the configuration reference is whole.

Each ```python block runs as a script in a process of its own, with ``DATABASE_URL`` set to a
fresh database on the session's throwaway server (the examples read it, falling back to a
placeholder address). A block that cannot run alone is preceded by the line
``<!-- fragment: why -->``; it must still compile. Examples run once, in the gevent test
process only: they pick their own mode, so running them per mode would only cost CI time.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from greenpool import config
from greenpool.testing.postgres import Cluster

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(\s*)(`{3,})\s*(\w*)\s*$")
FRAGMENT = re.compile(r"^<!--\s*fragment:\s*(\S.*?)\s*-->$")
EXAMPLE_TIMEOUT = 60


@dataclass(frozen=True)
class Example:
    where: str
    code: str
    fragment: str | None  # the reason it does not run alone, or None: it runs


def _pages() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md")
                  if "_build" not in p.parts and "_generated" not in p.parts)
    return [ROOT / "README.md", *docs]


def _examples(page: Path) -> list[Example]:
    found: list[Example] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, language, start = len(m.group(1)), m.group(2), m.group(3), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][indent:])  # a block inside a list item is indented
            i += 1
        i += 1
        if language not in ("python", "py"):
            continue
        before = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        marker = FRAGMENT.match(before)
        found.append(Example(f"{page.relative_to(ROOT)}:{start + 1}", "\n".join(body) + "\n",
                             marker.group(1) if marker else None))
    return found


EXAMPLES = [example for page in _pages() for example in _examples(page)]
RUNNABLE = [e for e in EXAMPLES if e.fragment is None]
FRAGMENTS = [e for e in EXAMPLES if e.fragment is not None]


def test_readme_opens_with_an_example_that_runs() -> None:
    readme = _examples(ROOT / "README.md")
    assert readme and readme[0].fragment is None


@pytest.mark.parametrize("example", FRAGMENTS, ids=[e.where for e in FRAGMENTS])
def test_fragment_compiles(example: Example) -> None:
    compile(example.code, example.where, "exec")


@pytest.mark.parametrize("example", RUNNABLE, ids=[e.where for e in RUNNABLE])
def test_example_runs(example: Example, pg: Cluster, mode: str, tmp_path: Path) -> None:
    if mode != "gevent":
        pytest.skip("examples pick their own mode; they run in the gevent test process")
    database = f"example_{uuid.uuid4().hex[:12]}"
    pg.create_database(database)
    script = tmp_path / "example.py"
    script.write_text(example.code)
    env = {**os.environ, "DATABASE_URL": pg.dsn(dbname=database),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT)
    finally:
        pg.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    assert done.returncode == 0, f"{example.where} failed:\n{done.stdout}\n{done.stderr}"


def _configref():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("configref", ROOT / "docs/_ext/configref.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("cls", "accepted"), [
    (config.PoolConfig, set(config._TOP_KEYS) - set(config.TOP_ONLY_KEYS)),
    (config.EndpointConfig, set(config._ENDPOINT_KEYS)),
    (config.GroupConfig, set(config._GROUP_KEYS)),
], ids=["top", "endpoint", "group"])
def test_every_configuration_key_is_documented(cls: type, accepted: set[str]) -> None:
    documented = _configref().documented_keys(cls)
    assert accepted == documented, (
        f"{cls.__name__}: undocumented {sorted(accepted - documented)}, "
        f"documented but not accepted {sorted(documented - accepted)}")


def test_configuration_reference_renders_every_key() -> None:
    text = _configref().render()
    every = set(config._TOP_KEYS) | set(config._ENDPOINT_KEYS) | set(config._GROUP_KEYS)
    assert all(f"`{key}`" in text for key in every)


RANGE = re.compile(r"^(\d+(?:\.\d+)?) (?:\(\w+\) )?to (\d+(?:\.\d+)?)(?: \(.*\))?(?:, or `None`)?$")


def _ranged_keys() -> list[tuple[str, str, float, float]]:
    """(section, key, min, max) of every key whose documented `allowed` is a plain range."""
    found = []
    for section, cls in (("top", config.PoolConfig), ("endpoint", config.EndpointConfig),
                         ("group", config.GroupConfig)):
        for keys, _, allowed, _ in _configref().rows(cls):
            m = RANGE.match(allowed)
            if m:
                found += [(section, key, float(m.group(1)), float(m.group(2))) for key in keys]
    return found


def _config_with(section: str, key: str, value: float) -> dict:
    if section == "top":
        return {"db": "host=db.invalid", key: value}
    if section == "endpoint":
        return {"db": {"host": "db.invalid", key: value}}
    return {"db": "host=db.invalid", "groups": {"g": {key: value}}}


@pytest.mark.parametrize(("section", "key", "low", "high"), _ranged_keys(),
                         ids=[f"{s}.{k}" for s, k, *_ in _ranged_keys()])
def test_documented_range_is_the_checked_range(section: str, key: str, low: float,
                                               high: float) -> None:
    """The reference's `allowed` text is written by hand beside each field: the checks it
    describes are asked whether they accept its bounds and refuse what lies beyond."""
    whole = low.is_integer() and high.is_integer()
    as_given = (lambda x: int(x)) if whole else (lambda x: x)
    for inside in (low, high):
        config.parse_config(_config_with(section, key, as_given(inside)))
    below = low - 1 if whole else low / 2 if low > 0 else -1.0
    beyond = high + 1 if whole else high * 2
    for outside in (below, beyond):
        with pytest.raises(config.ConfigError):
            config.parse_config(_config_with(section, key, as_given(outside)))
