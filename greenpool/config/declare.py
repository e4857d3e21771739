"""How a configuration key is declared: once, on the field of the settings it fills.

A field of :class:`~greenpool.config.EndpointConfig`, ``GroupConfig`` or ``PoolConfig`` is
made by :func:`setting`, which holds everything about the key: its default (the dataclass
field's default, nowhere else), its checker with the bounds and unit (which also write the
"allowed" column of the reference), the other names it is known by, whether its value is a
secret, and the sentence that documents it. The parser reads its key table from the fields
(:func:`key_table`), the reference (docs/_ext/configref.py) renders the same fields, and a
key given nowhere falls back to the dataclass default, so no default is written twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import checks
from .checks import DAY


class Check(Protocol):
    """A checker: the value as the configuration keeps it, or a ConfigError naming ``path``;
    ``allowed`` says in the reference what it accepts."""

    @property
    def allowed(self) -> str: ...

    def __call__(self, path: str, value: Any, /) -> Any: ...


def _shown(bound: float) -> str:
    """A bound as the reference writes it: ``3600``, ``0.001``, ``2147483.647``."""
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


@dataclass(frozen=True)
class Seconds:
    """A finite number in [minimum, maximum] (of ``unit``); ``optional``: or None."""

    minimum: float = 0.0
    maximum: float = DAY
    optional: bool = False
    unit: str = "seconds"
    note: str = ""  #: said after the range in the reference (a rule between keys, a reading)

    @property
    def allowed(self) -> str:
        text = f"{_shown(self.minimum)} to {_shown(self.maximum)}{self.note}"
        return f"{text}, or `None`" if self.optional else text

    def __call__(self, path: str, value: Any) -> Any:
        return checks.number(path, value, minimum=self.minimum, maximum=self.maximum,
                             allow_none=self.optional, unit=self.unit)


@dataclass(frozen=True)
class Whole:
    """A whole number in [minimum, maximum]."""

    minimum: int = 0
    maximum: int = 2**31 - 1
    note: str = ""

    @property
    def allowed(self) -> str:
        return f"{self.minimum} to {self.maximum}{self.note}"

    def __call__(self, path: str, value: Any) -> Any:
        return checks.integer(path, value, minimum=self.minimum, maximum=self.maximum)


@dataclass(frozen=True)
class OneOf:
    """One of a few words."""

    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return ", ".join(f"`{c}`" for c in self.choices)

    def __call__(self, path: str, value: Any) -> Any:
        return checks.choice(path, value, self.choices)


@dataclass(frozen=True)
class Flag:
    allowed: str = "bool"

    def __call__(self, path: str, value: Any) -> Any:
        return checks.boolean(path, value)


@dataclass(frozen=True)
class Text:
    """A non-empty string without NUL; ``optional``: or None."""

    optional: bool = False

    @property
    def allowed(self) -> str:
        return "non-empty string, or `None`" if self.optional else "non-empty string"

    def __call__(self, path: str, value: Any) -> Any:
        return checks.text(path, value, allow_none=self.optional)


@dataclass(frozen=True)
class Hook:
    """A function the pool calls (or None): Python configurations only."""

    taking: str = "the psycopg2 connection"
    allowed: str = "a callable, or `None`"

    def __call__(self, path: str, value: Any) -> Any:
        return checks.hook(path, value, taking=self.taking)


@dataclass(frozen=True)
class Custom:
    """A checker of its own, with the reference's words for what it accepts."""

    check: Callable[[str, Any], Any]
    allowed: str

    def __call__(self, path: str, value: Any) -> Any:
        return self.check(path, value)


@dataclass(frozen=True)
class Setting:
    """Everything about one key except its default, which is its field's."""

    check: Check
    doc: str
    #: the key greenpool reads is the field's name (else only ``aliases`` and dialects set it)
    own_key: bool = True
    aliases: tuple[str, ...] = ()
    #: how the reference states a default the field's value cannot show (libpq's, derived)
    default_text: str = ""
    secret: bool = False
    #: the reference's "allowed" when the checker's own words are not the whole story
    allowed_text: str = ""

    @property
    def allowed(self) -> str:
        return self.allowed_text or self.check.allowed


REQUIRED: Any = dataclasses.MISSING


def setting(default: Any = REQUIRED, *, check: Check, doc: str,
            factory: Callable[[], Any] | None = None, **more: Any) -> Any:
    """A dataclass field declaring one configuration key (see :class:`Setting`)."""
    meta = {"setting": Setting(check=check, doc=doc, **more)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls: type) -> dict[str, Setting]:
    """Field name -> its declaration, in the order of the fields."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(cls)
            if "setting" in f.metadata}


def default_of(cls: type, name: str) -> Any:
    """The default of ``cls``'s field ``name`` (a fresh one where it is made by a factory)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@dataclass(frozen=True)
class Key:
    """One key the parser accepts: the field it sets and the checker it is read with."""

    field: str
    check: Callable[[str, Any], Any]


def key_table(cls: type, dialect: Mapping[str, str] | None = None,
              translations: Mapping[str, Check] | None = None) -> dict[str, Key]:
    """Every key that sets a field of ``cls``: greenpool's (the field's name and its
    aliases), then ``dialect``'s (key -> field) read through its ``translations``."""
    table: dict[str, Key] = {}
    settings = declared(cls)
    for name, found in settings.items():
        for key in ((name,) if found.own_key else ()) + found.aliases:
            table[key] = Key(name, found.check)
    for key, name in (dialect or {}).items():
        table[key] = Key(name, (translations or {}).get(key, settings[name].check))
    return table


def read(path: str, given: Mapping[str, Any], table: Mapping[str, Key],
         where: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Field name -> checked value, for the keys ``given`` (all known to ``table``); two
    keys for one field are refused. ``where(key)`` names a key in errors (default:
    ``path.key``)."""
    first: dict[str, str] = {}
    for key in given:
        name = table[key].field
        if name in first:
            raise checks.fail(f"{path}.{key}", f"`{first[name]}` and `{key}` are the same "
                                               "setting: give one")
        first[name] = key
    name_of = where or (lambda key: f"{path}.{key}" if path else key)
    return {table[key].field: table[key].check(name_of(key), value)
            for key, value in given.items()}
