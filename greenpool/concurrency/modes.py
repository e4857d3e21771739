"""A mode's name to its backend, with psycopg2 patched for it."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from .backend import Backend
from .eventlet_backend import EventletBackend
from .gevent_backend import GeventBackend
from .thread_backends import SingleBackend, ThreadedBackend

_BACKENDS: dict[str, Callable[[], Backend]] = {
    "gevent": GeventBackend,
    "eventlet": EventletBackend,
    "threaded": ThreadedBackend,
    "non-threaded": SingleBackend,
}


def backend_for(mode: str) -> Backend:
    """The backend of ``mode``, with psycopg2 patched for it."""
    try:
        factory = _BACKENDS[mode]
    except KeyError:
        raise ConfigError(f"type: expected one of {', '.join(_BACKENDS)}; got {mode!r}") from None
    try:
        backend = factory()
    except ImportError as exc:
        raise ConfigError(
            f"type: mode {mode!r} needs a package that is not installed ({exc.name}); "
            f"install it (pip install 'greenpool[{mode}]') or pick another mode"
        ) from exc
    backend.patch_driver()
    return backend
