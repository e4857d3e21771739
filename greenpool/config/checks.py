"""The value checkers: type, range, finiteness, and an error that names the key.

Each returns the value as the configuration keeps it, or raises :class:`ConfigError` with
the key's path, what was given (never a secret) and what is allowed. They know nothing of
particular keys: the declarations (:mod:`greenpool.config.declare`) give them their bounds.
"""

from __future__ import annotations

import difflib
import math
import reprlib
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

DAY = 86400.0
#: libpq connection parameters whose value is a secret: redacted in reprs, never echoed.
SECRET_OPTIONS = frozenset({"password", "sslpassword"})
#: the last part of a path whose value is never shown: the password's keys (greenpool's and
#: pgdbpool's word; tests/unit/test_config_declarations.py keeps this in step with the
#: declarations' secret flag), a DSN (it may carry the password) and libpq's secret options
SECRET_NAMES = frozenset({"password", "pass", "dsn", *SECRET_OPTIONS})


class _Short(reprlib.Repr):
    """reprlib's short repr, and one for a whole number too long for Python to write out
    (beyond ``sys.get_int_max_str_digits()``), which would raise ValueError instead."""

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            return f"<a whole number of {x.bit_length()} bits>"


short = _Short()
short.maxstring = 60
short.maxother = 60


def fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def is_secret(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in SECRET_NAMES


def shown(path: str, value: Any) -> str:
    """How a bad value appears in an error: shortened, and a secret only by its type."""
    if is_secret(path):
        return f"a {type(value).__name__} (not shown: it is a secret)"
    return short.repr(value)


def _range_text(minimum: float, maximum: float, open_min: bool) -> str:
    low = f"> {minimum:g}" if open_min else f">= {minimum:g}"
    return f"{low} and <= {maximum:g}"


def number(
    path: str,
    value: Any,
    *,
    minimum: float = 0.0,
    maximum: float = DAY,
    open_min: bool = False,
    allow_none: bool = False,
    unit: str = "seconds",
) -> Any:
    """A finite int or float within [minimum, maximum] (``open_min``: above minimum)."""
    if value is None and allow_none:
        return None
    allowed = f"a number of {unit} {_range_text(minimum, maximum, open_min)}"
    if allow_none:
        allowed += ", or null"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(path, f"expected {allowed}; got {shown(path, value)}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float's range
        as_float = math.inf
    if math.isnan(as_float) or math.isinf(as_float):
        raise fail(path, f"expected {allowed}; got {short.repr(value)} (not a finite number)")
    if as_float < minimum or (open_min and as_float == minimum) or as_float > maximum:
        raise fail(path, f"expected {allowed}; got {short.repr(value)}")
    return as_float


def integer(path: str, value: Any, *, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        what = "true/false" if isinstance(value, bool) else shown(path, value)
        raise fail(path, f"expected a whole number from {minimum} to {maximum}; got {what}")
    if not minimum <= value <= maximum:
        raise fail(path, f"expected a whole number from {minimum} to {maximum}; got "
                         f"{short.repr(value)}")
    return int(value)


def boolean(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(path, f"expected true or false; got {shown(path, value)}")
    return value


def text(path: str, value: Any, *, allow_none: bool = False) -> Any:
    """A non-empty string without NUL (libpq cannot carry one; psycopg2 would fail later)."""
    if value is None and allow_none:
        return None
    allowed = "a non-empty string" + (", or null" if allow_none else "")
    if not isinstance(value, str) or not value:
        raise fail(path, f"expected {allowed}; got {shown(path, value)}")
    if "\x00" in value:
        raise fail(path, "must not contain a NUL character")
    return value


def password(path: str, value: Any) -> Any:
    """``None`` means "no password" (libpq's .pgpass/environment may still supply one); a
    function taking no argument is asked at each connect (:mod:`greenpool.credentials`)."""
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise fail(path, f"expected a string, a function returning one, or null; got a "
                         f"{type(value).__name__} (not shown: it is a secret)")
    if "\x00" in value:
        raise fail(path, "must not contain a NUL character (value not shown: it is a secret)")
    return value


def hook(path: str, value: Any, *, taking: str = "the psycopg2 connection") -> Any:
    """A function (or None) the pool calls with ``taking``."""
    if value is not None and not callable(value):
        raise fail(path, f"expected a function taking {taking}, got {short.repr(value)}")
    return value


def choice(path: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise fail(path, f"expected one of {', '.join(choices)}; got {shown(path, value)}")
    return value


def reject_unknown(path: str, given: Mapping[Any, Any], known: Mapping[str, Any]) -> None:
    for key in given:
        if key not in known:
            name = short.repr(key) if not isinstance(key, str) else key
            hint = difflib.get_close_matches(name, list(known), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise fail(f"{path}.{name}" if path else name, f"unknown key{suggestion}")


def mapping(path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise fail(path, f"expected a dictionary, got {type(value).__name__}")
    return value
