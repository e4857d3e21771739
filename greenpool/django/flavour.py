"""Load Django's postgresql backend on psycopg2, even where psycopg 3 is installed too.

Django decides once, when ``django.db.backends.postgresql.base`` is first imported, which
driver its whole postgresql backend (operations, introspection, cursors) is written for:
psycopg 3 if it can be imported, else psycopg2. greenpool hands out psycopg2 connections, so
that backend must be the psycopg2 one. If it has not been imported yet, it is imported here
with ``psycopg`` hidden for the duration of the import (``sys.modules['psycopg'] = None``
makes ``import psycopg`` raise ImportError); psycopg itself, if it was imported, is put back
untouched. If Django already loaded it on psycopg 3 (another alias used Django's own
postgresql ENGINE first, or an app imported it), both cannot live in one process: the error
says so.
"""

from __future__ import annotations

import sys
from types import ModuleType

from django.core.exceptions import ImproperlyConfigured

_BASE = "django.db.backends.postgresql.base"
_ANY = "django.db.backends.postgresql.psycopg_any"


def postgresql_base() -> ModuleType:
    """``django.db.backends.postgresql.base``, loaded on psycopg2."""
    if _BASE not in sys.modules and _ANY not in sys.modules:
        hidden = sys.modules.get("psycopg", _MISSING)
        sys.modules["psycopg"] = None  # type: ignore[assignment]
        try:
            import django.db.backends.postgresql.base  # noqa: F401
        finally:
            if hidden is _MISSING:
                del sys.modules["psycopg"]
            else:
                sys.modules["psycopg"] = hidden  # type: ignore[assignment]
    import django.db.backends.postgresql.base as base

    if getattr(base, "is_psycopg3", False):
        raise ImproperlyConfigured(
            "greenpool.django needs Django's postgresql backend on psycopg2, but this process "
            "already loaded it on psycopg 3 (an alias with ENGINE "
            "'django.db.backends.postgresql', or django.contrib.postgres, was loaded first). "
            "Use greenpool.django for every PostgreSQL alias of the process, or uninstall "
            "psycopg 3"
        )
    return base


_MISSING = object()
