"""Which SQL may leave state in the session for the next borrower of a connection.

The pool resets a returned connection (``DISCARD ALL``, one round trip) only when its loan
may have changed the session, so a clean loan costs nothing. The handler asks
:func:`changes_session` about every statement it runs. The test is deliberately
conservative: a false "yes" costs one round trip on return, a false "no" passes state on.
What it cannot see (a function or procedure that changes the session inside its body, other
than through ``DO`` and ``CALL``, which count as changing it) is what ``reset: 'always'`` is
for.

Session state, and what gives it away:

* settings: ``SET`` / ``RESET`` at the start of a statement (not ``SET LOCAL``, ``SET
  TRANSACTION``, ``SET CONSTRAINTS``, which end with the transaction), ``set_config(...)``
  unless its last argument is a literal ``true``, ``UPDATE pg_settings``;
  ``SET SESSION AUTHORIZATION`` and ``SET ROLE`` are ``SET`` too;
* temporary objects: ``CREATE [GLOBAL|LOCAL] TEMP[ORARY]``, ``INTO TEMP``, ``pg_temp``;
* ``PREPARE``, ``LISTEN``, ``LOAD``, ``DECLARE ... WITH HOLD``;
* session advisory locks (``pg_advisory_lock``, ``pg_try_advisory_lock``, their
  ``_shared`` forms; not the ``_xact_`` ones), ``dblink_connect``;
* ``DO`` and ``CALL``: their bodies are invisible here.

The answer for a plain string is cached (a set lookup, about 30 ns), so the regular
expression runs once per distinct statement text.
"""

from __future__ import annotations

import re
from typing import Any

from psycopg2 import sql as pgsql

# The first words of a statement, after blanks and comments (matched at the start of the text
# and after each ';'). Python's ``re`` is slow with IGNORECASE, so the text is lowered first,
# and a few substring tests keep the rare patterns' expression from running at all.
_FIRST_WORDS = re.compile(r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*([a-z_]*)\s*([a-z_]*)", re.S)
_SESSION_VERBS = frozenset(("set", "reset", "prepare", "listen", "load", "do", "call"))
_TRANSACTION_SCOPED_SET = frozenset(("local", "transaction", "constraints"))
_HINTS = ("set_config", "advisory_lock", "hold", "temp", "dblink", "pg_settings")
_ANYWHERE = re.compile(
    r"set_config\s*\((?![^()]*,\s*true\s*\))"
    r"|pg_(?:try_)?advisory_lock"
    r"|\bwith\s+hold\b"
    r"|\b(?:create|into)\s+(?:or\s+replace\s+)?(?:(?:global|local)\s+)?temp(?:orary)?\b"
    r"|\bpg_temp\b"
    r"|dblink_connect"
    r"|\bupdate\s+(?:pg_catalog\s*\.\s*)?pg_settings\b",
    re.S,
)


def _text_changes_session(text: str) -> bool:
    lower = text.lower()
    position = 0
    while True:
        words = _FIRST_WORDS.match(lower, position)
        if words is not None:
            verb = words.group(1)
            if verb in _SESSION_VERBS and (
                verb != "set" or words.group(2) not in _TRANSACTION_SCOPED_SET
            ):
                return True
        position = lower.find(";", position) + 1
        if not position:
            break
    for hint in _HINTS:
        if hint in lower:
            return _ANYWHERE.search(lower) is not None
    return False


#: statement texts known not to change the session (bounded: cleared when full)
CLEAN: set[str] = set()
_CLEAN_MAX = 4096


def changes_session(sql: Any, conn: Any = None) -> bool:
    """True if ``sql`` (a string, bytes, or a ``psycopg2.sql`` object, rendered with
    ``conn``) may change session state that outlives its transaction."""
    if isinstance(sql, str):
        text = sql
    elif isinstance(sql, (bytes, bytearray, memoryview)):
        text = bytes(sql).decode("utf-8", "replace")
    elif isinstance(sql, pgsql.Composable) and conn is not None:
        try:
            text = sql.as_string(conn)
        except Exception:
            return True
    else:
        return True  # something we cannot read: assume the worst
    if _text_changes_session(text):
        return True
    if sql.__class__ is str:
        if len(CLEAN) >= _CLEAN_MAX:
            CLEAN.clear()
        CLEAN.add(sql)
    return False
