"""Everything a human might read of an object, and the secrets the tests plant in configs
to check that none of them ever shows there."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from typing import Any


def texts(thing: Any) -> Iterator[str]:
    """Everything a human might read of ``thing``: str, repr, and for an exception its whole
    chain (``__cause__`` and ``__context__``) and formatted traceback."""
    if isinstance(thing, BaseException):
        seen: list[BaseException] = []
        todo: list[BaseException | None] = [thing]
        while todo:
            exc = todo.pop()
            if exc is None or exc in seen:
                continue
            seen.append(exc)
            yield str(exc)
            yield repr(exc)
            yield from (str(arg) for arg in exc.args)
            todo += [exc.__cause__, exc.__context__]
        yield "".join(traceback.format_exception(thing))
    else:
        yield str(thing)
        yield repr(thing)


# the secrets planted in the configs under test
PASSWORD = "Pw-7xq-hunter2"
SSL_PASSWORD = "SslPw-31-kiwi"
WRONG = "Wrong-9zz-pw"
SECRETS = (PASSWORD, SSL_PASSWORD, WRONG, "hunt%zz", "hunt")


def assert_no_secret(*things: Any) -> None:
    for thing in things:
        for text in texts(thing):
            for secret in SECRETS:
                assert secret not in text, f"{secret!r} leaked in {text[:300]!r}"


def secret_endpoint(host: str, port: int, **overrides: Any) -> dict[str, Any]:
    """An endpoint of role secret_user with every secret planted (password, sslpassword)."""
    return {"host": host, "port": port, "name": "postgres", "user": "secret_user",
            "pass": PASSWORD, "options": {"sslpassword": SSL_PASSWORD}, **overrides}

