"""Every Python example in README.md and docs/ runs (the configuration reference:
tests/unit/test_config_declarations.py).

Each ```python block runs as a script in a process of its own, with ``DATABASE_URL`` set to a
fresh database on the session's throwaway server (the examples read it, falling back to a
placeholder address). A block that cannot run alone is preceded by the line
``<!-- fragment: why -->``; it must still compile. Examples run once, in the gevent test
process only: they pick their own mode, so running them per mode would only cost CI time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

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
