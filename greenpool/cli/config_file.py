"""The configuration a command runs with: a ``.json``, ``.toml`` or ``.py`` file (the Python
file defines ``CONFIG``), or, with no argument, the environment: ``GREENPOOL_CONFIG`` (the
configuration as JSON) or ``GREENPOOL_DSN`` (one endpoint, one group called ``default``).
Every problem is a :class:`~.process.CheckFailed`, said in one sentence."""

from __future__ import annotations

import json
import os
import runpy
from collections.abc import Mapping
from typing import Any

from ..config import PoolConfig, parse_config
from ..errors import ConfigError
from .process import CheckFailed, Interrupted, first_line


def load_config(path: str | None) -> Mapping[str, Any] | PoolConfig:
    """The configuration from a file, or from the environment when ``path`` is None.

    Every way a file can be wrong (missing, a directory, unreadable, not UTF-8, not
    JSON/TOML, a ``.py`` that raises or exits, ``CONFIG`` missing or not a mapping) is a
    :class:`CheckFailed` naming the file and the problem.
    """
    if path is None:
        if os.environ.get("GREENPOOL_CONFIG"):
            return _json(os.environ["GREENPOOL_CONFIG"], "GREENPOOL_CONFIG")
        if os.environ.get("GREENPOOL_DSN"):
            return {"db": os.environ["GREENPOOL_DSN"]}
        raise CheckFailed("no configuration: give a file, or set GREENPOOL_CONFIG or "
                          "GREENPOOL_DSN")
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".json", ".toml", ".py"):
        raise CheckFailed(f"{path}: expected a .json, .toml or .py file")
    if kind == ".py":
        _readable(path)
        return _python(path)
    text = _text(path, _readable(path))
    if kind == ".json":
        return _json(text, path)
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CheckFailed(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise CheckFailed(f"{path}: not valid TOML (nested too deeply)") from None


def read_config(path: str | None) -> PoolConfig:
    """:func:`load_config`, parsed and validated; any problem is a :class:`CheckFailed`."""
    raw = load_config(path)
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise CheckFailed(f"bad configuration: {exc}") from None
    except (RecursionError, TypeError, ValueError, AttributeError, KeyError) as exc:
        # parse_config should say ConfigError for every bad value; until it does, one sentence
        raise CheckFailed(f"bad configuration: {type(exc).__name__}: {exc}") from None


def _readable(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise CheckFailed(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckFailed(f"{path}: is a directory, not a configuration file") from None
    except PermissionError:
        raise CheckFailed(f"{path}: cannot read it (permission denied)") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise CheckFailed(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})"
                          ) from None


def _text(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CheckFailed(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start})") from None


def _python(path: str) -> Mapping[str, Any] | PoolConfig:
    try:
        namespace = runpy.run_path(path, run_name="greenpool_config")
    except (Interrupted, KeyboardInterrupt):
        raise
    except SystemExit as exc:
        raise CheckFailed(f"{path}: called sys.exit({exc.code!r}) instead of defining "
                          "CONFIG") from None
    except SyntaxError as exc:
        raise CheckFailed(f"{path}: not valid Python (line {exc.lineno}: {exc.msg})") from None
    except BaseException as exc:  # the user's code: anything can come out
        raise CheckFailed(f"{path}: raised {type(exc).__name__} while loading: "
                          f"{first_line(exc)}") from None
    if "CONFIG" not in namespace:
        raise CheckFailed(f"{path}: define the configuration as a variable named CONFIG")
    config = namespace["CONFIG"]
    if isinstance(config, PoolConfig):
        return config
    if not isinstance(config, Mapping):
        raise CheckFailed(f"{path}: CONFIG must be a dict, not {type(config).__name__}")
    return config


def _json(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except RecursionError:
        raise CheckFailed(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise CheckFailed(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckFailed(f"{where}: expected a JSON object")
    return value


