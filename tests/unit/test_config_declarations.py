"""Each configuration key is declared once (greenpool/config/declare.py): the parser, the
reference table (docs/_ext/configref.py) and the docs all follow the declarations, and a
default or bound written again somewhere else is caught here."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from greenpool import config
from greenpool.compat.pgdbpool import dialect
from greenpool.config import checks
from greenpool.config.declare import OneOf, declared

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"top": config.PoolConfig, "endpoint": config.EndpointConfig,
            "group": config.GroupConfig}
TABLES: dict[type, dict[str, config.Key]] = {
    config.PoolConfig: config.TOP_KEYS, config.EndpointConfig: config.ENDPOINT_KEYS,
    config.GroupConfig: config.GROUP_KEYS}


def _configref() -> Any:
    spec = importlib.util.spec_from_file_location("configref", ROOT / "docs/_ext/configref.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the reference table ------------------------------------------------------------------

@pytest.mark.parametrize("cls", SECTIONS.values(), ids=SECTIONS.keys())
def test_every_configuration_key_is_documented(cls: type) -> None:
    accepted, documented = set(TABLES[cls]), _configref().documented_keys(cls)
    assert accepted == documented, (
        f"{cls.__name__}: undocumented {sorted(accepted - documented)}, "
        f"documented but not accepted {sorted(documented - accepted)}")


def test_configuration_reference_renders_every_key() -> None:
    text = _configref().render()
    every = {*config.TOP_KEYS, *config.TOP_ONLY_KEYS, *config.ENDPOINT_KEYS, *config.GROUP_KEYS}
    assert [key for key in every if f"`{key}`" not in text] == []


def test_every_field_is_a_declared_setting() -> None:
    """A field without a declaration would be neither read nor documented."""
    for cls in SECTIONS.values():
        undeclared = {f.name for f in dataclasses.fields(cls)} - set(declared(cls))
        assert undeclared <= {"name"}, f"{cls.__name__}: {sorted(undeclared)}"


def test_every_pgdbpool_key_names_a_declared_setting() -> None:
    for words, cls in ((dialect.TOP_KEYS, config.PoolConfig),
                       (dialect.ENDPOINT_KEYS, config.EndpointConfig)):
        assert set(words.values()) <= set(declared(cls))
        assert set(words) <= set(TABLES[cls])
    assert set(dialect.ENDPOINT_TRANSLATIONS) <= set(dialect.ENDPOINT_KEYS)


RANGE = re.compile(r"^(\d+(?:\.\d+)?) to (\d+(?:\.\d+)?)(?: \(.*\))?(?:, or `None`)?$")


def _ranged_keys() -> list[tuple[str, str, float, float]]:
    """(section, key, min, max) of every key whose documented `allowed` is a plain range."""
    found = []
    for section, cls in SECTIONS.items():
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
    """The reference's `allowed` text comes from the checker's bounds: the parser is asked
    whether it accepts them and refuses what lies beyond."""
    whole = low.is_integer() and high.is_integer()
    as_given = (lambda x: int(x)) if whole else (lambda x: x)
    for inside in (low, high):
        config.parse_config(_config_with(section, key, as_given(inside)))
    below = low - 1 if whole else low / 2 if low > 0 else -1.0
    beyond = high + 1 if whole else high * 2
    for outside in (below, beyond):
        with pytest.raises(config.ConfigError):
            config.parse_config(_config_with(section, key, as_given(outside)))


def test_ranges_are_found_for_most_keys() -> None:
    """The range test above would pass vacuously if the `allowed` wording drifted."""
    assert len(_ranged_keys()) >= 15


def _documented_allowed() -> list[tuple[str, str, str]]:
    """(section, key, the reference's `allowed` for that key) of every key."""
    found = []
    for section, cls in SECTIONS.items():
        for key, entry in TABLES[cls].items():
            translated = dialect.ENDPOINT_TRANSLATIONS.get(key) if section == "endpoint" else None
            allowed = translated.allowed if translated else declared(cls)[entry.field].allowed
            found.append((section, key, allowed))
    return found


def _accepts(section: str, key: str, value: Any) -> bool:
    try:
        config.parse_config(_config_with(section, key, value))
    except config.ConfigError:
        return False
    return True


@pytest.mark.parametrize(("section", "key", "allowed"), _documented_allowed(),
                         ids=[f"{s}.{k}" for s, k, _ in _documented_allowed()])
def test_documented_none_and_empty_text_are_what_the_parser_takes(section: str, key: str,
                                                                  allowed: str) -> None:
    """`None` is accepted exactly where the reference lists it, and where it says a
    non-empty string the empty one is refused."""
    assert _accepts(section, key, None) == ("`None`" in allowed), allowed
    if allowed.startswith(("string", "non-empty string")) and not _accepts(section, key, ""):
        assert "non-empty string" in allowed, allowed


# --- defaults: declared once --------------------------------------------------------------

def test_a_key_left_out_takes_its_declared_default() -> None:
    parsed = config.parse_config({"db": "host=db.invalid"})
    for cls, made in ((config.PoolConfig, parsed), (config.EndpointConfig, parsed.endpoints[0]),
                      (config.GroupConfig, parsed.groups[config.DEFAULT_GROUP])):
        for f in dataclasses.fields(cls):
            if f.name in declared(cls) and not declared(cls)[f.name].default_text:
                assert getattr(made, f.name) == config.default_of(cls, f.name), f.name


def _distinctive_defaults() -> dict[tuple[type, Any], str]:
    """(type, value) -> the setting whose default it is: the defaults that could be told
    apart from everyday constants (not 0, 1, booleans, empty values or a choice word)."""
    found = {}
    for cls in SECTIONS.values():
        for name, setting in declared(cls).items():
            value = config.default_of(cls, name)
            words = setting.check.choices if isinstance(setting.check, OneOf) else ()
            if isinstance(value, bool) or value in (None, 0, 1, "") or value in words:
                continue
            if isinstance(value, (int, float, str)):
                found[(type(value), value)] = f"{cls.__name__}.{name}"
    return found


def _defaults_by_key() -> dict[str, Any]:
    """Config key -> the declared default of the setting it sets."""
    return {key: config.default_of(cls, found.field)
            for cls, table in TABLES.items() for key, found in table.items()}


def test_no_key_is_read_with_its_default_as_a_fallback() -> None:
    """``raw.get('quarantine_initial', 0.5)`` or ``server.get('port', 5432)`` anywhere in
    the package would be a second copy of a declared default."""
    defaults, found = _defaults_by_key(), []
    for path in sorted((ROOT / "greenpool").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get" and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in defaults
                    and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value is not None
                    and node.args[1].value == defaults[node.args[0].value]):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_no_declared_default_is_repeated_in_parse_code() -> None:
    """The parser's functions take defaults from the declarations (a key left out is not
    passed, so the dataclass applies its own), never from a literal of their own."""
    defaults, found = _distinctive_defaults(), []
    assert len(defaults) >= 8  # 5432, 'postgres', 30.0, 3600.0, 'greenpool', …
    for path in sorted((ROOT / "greenpool/config").glob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
                    owner = defaults.get((type(node.value), node.value))
                    if owner:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
                                     f" is {owner}'s default")
    assert found == []


def test_the_docs_do_not_restate_a_default() -> None:
    """The generated reference states each default; a page saying "`timeout` (default 30)"
    would go stale when the declaration changes."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = []
    for page in pages:
        text = page.read_text()
        for key in _defaults_by_key():
            pattern = rf"`{re.escape(key)}`[^.;`]{{0,40}}\bdefault\b[^.;`]{{0,10}}\d"
            found += [f"{page.name}: {m.group(0)!r}" for m in re.finditer(pattern, text)]
    assert found == []


# --- secrets ------------------------------------------------------------------------------

def test_every_key_of_a_secret_setting_is_never_shown() -> None:
    for cls in SECTIONS.values():
        for key, found in TABLES[cls].items():
            if declared(cls)[found.field].secret:
                assert checks.is_secret(f"db[0].{key}"), key
    assert {name for name in checks.SECRET_NAMES if not checks.is_secret(name)} == set()


def test_a_secret_setting_is_hidden_in_the_repr() -> None:
    endpoint = config.parse_config({"db": {"host": "h", "pass": "Sekr1t-walrus"}}).endpoints[0]
    assert "Sekr1t-walrus" not in repr(endpoint)
