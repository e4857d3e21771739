"""Which SQL may leave state in the session for the next borrower of a connection.

The pool resets a returned connection (``DISCARD ALL``, one round trip) only when its loan
may have changed the session, so a clean loan costs nothing. The handler asks
:func:`changes_session` about every statement it runs; :mod:`greenpool.sql` reads the text
with PostgreSQL's own parser and judges it by parse-tree node. A false "changes" costs one
round trip on return, a false "does not" passes state on, so anything unreadable, too long to
be worth parsing, or rendered from something other than text counts as changing it.

Counted as changing the session: settings (``SET``/``RESET`` unless ``LOCAL`` or
transaction-scoped, ``set_config`` unless its third argument is literally ``true``, ``UPDATE
pg_settings``; ``SET ROLE``/``SESSION AUTHORIZATION`` are settings), temporary relations,
``PREPARE``, ``LISTEN``, ``LOAD``, ``DECLARE ... WITH HOLD``, ``DO``, ``CALL``, session
advisory locks, ``dblink_connect``, and sequence state: ``INSERT``, ``MERGE``, ``COPY ...
FROM``, ``DEFAULT`` in an ``UPDATE``, ``nextval``/``setval`` (a serial default sets
``currval``/``lastval`` for the session). What a function body does is invisible here:
``reset: 'always'`` is for that.

The answer for a plain string is cached, so the parser runs once per distinct statement
text, and a clean loan's statement costs one set lookup (:data:`CLEAN`): the first line of
:func:`changes_session`, which every caller (the tracking cursors every pooled
connection makes, :mod:`greenpool.cursors`, which Django and SQLAlchemy use; the pgdbpool
layer; the handler's other statements) asks; ``Handler.query`` reads the set
itself, a call less on the loan's path.
"""

from __future__ import annotations

from typing import Any

from psycopg2 import extensions
from psycopg2 import sql as pgsql

from . import sql

#: statement texts known not to change the session (bounded: cleared when full)
CLEAN: set[str] = set()
#: texts with a backslash, clean only where ``standard_conforming_strings`` is on (the
#: parser reads ``'\\'`` as PostgreSQL does then; with it off, a literal may end elsewhere)
_CLEAN_IF_STANDARD: set[str] = set()
_CLEAN_MAX = 4096
#: statement texts known to change the session (an ``INSERT``, a ``SET``: dirty whatever
#: ``standard_conforming_strings`` says), so the parser runs once per distinct text, dirty
#: ones too; bounded like CLEAN
_DIRTY: set[str] = set()
#: texts with non-ASCII characters, as the server reads them, and whether they change the
#: session (bounded like CLEAN; see _non_ascii_changes_session)
_NON_ASCII: dict[str, bool] = {}


def _standard_strings(conn: Any) -> bool:
    try:
        return conn is not None and (
            conn.info.parameter_status("standard_conforming_strings") != "off")
    except Exception:
        return False


def _text_of(query: Any, conn: Any) -> str | None:
    """The text psycopg2 would send (placeholders unfilled), or None if unknowable."""
    if isinstance(query, str):
        return query
    try:
        if isinstance(query, (bytes, bytearray, memoryview)):
            codec = extensions.encodings.get(getattr(conn, "encoding", ""), "utf-8")
            return bytes(query).decode(codec)
        if isinstance(query, pgsql.Composable) and conn is not None:
            return query.as_string(conn)
    except Exception:
        pass
    return None


def _as_the_server_reads(text: str, conn: Any) -> str | None:
    """``text`` as the server will read it on ``conn``: encoded by psycopg2 with the
    connection's codec, some of which map a non-ASCII character to an ASCII byte (EUC_JP,
    SHIFT_JIS: ``¥`` is the byte of ``\\``); None when unknowable (no connection, a
    character the codec cannot send)."""
    codec = extensions.encodings.get(getattr(conn, "encoding", None) or "", None)
    if codec is None:
        return None
    try:
        return sql.server_text(text.encode(codec), codec)
    except UnicodeError:
        return None


def changes_session(query: Any, conn: Any = None) -> bool:
    """True if ``query`` (a string, bytes, or a ``psycopg2.sql`` object, rendered with
    ``conn``) may change session state that outlives its transaction."""
    if query.__class__ is str and query in CLEAN:  # the fast path of every clean statement
        return False
    text = _text_of(query, conn)
    if text is None:
        return True  # something we cannot read: assume the worst
    if not text.isascii():
        return _non_ascii_changes_session(text, conn)
    backslash = "\\" in text
    if backslash and not _standard_strings(conn):
        return True
    if text in CLEAN or text in _CLEAN_IF_STANDARD:
        return False
    if text in _DIRTY:
        return True
    if sql.changes_session(text):
        if query.__class__ is str:
            if len(_DIRTY) >= _CLEAN_MAX:
                _DIRTY.clear()
            _DIRTY.add(query)
        return True
    if query.__class__ is str:
        cache = _CLEAN_IF_STANDARD if backslash else CLEAN
        if len(cache) >= _CLEAN_MAX:
            cache.clear()
        cache.add(query)
    return False


def _non_ascii_changes_session(text: str, conn: Any) -> bool:
    """The same question for a text with non-ASCII characters: what it says depends on the
    connection's encoding, so its verdict is kept apart from :data:`CLEAN` (whose fast path
    knows no connection), by the text as the server reads it."""
    sent = _as_the_server_reads(text, conn)
    if sent is None:
        return True
    if "\\" in sent and not _standard_strings(conn):
        return True
    verdict = _NON_ASCII.get(sent)
    if verdict is None:
        verdict = sql.changes_session(sent)
        if len(_NON_ASCII) >= _CLEAN_MAX:
            _NON_ASCII.clear()
        _NON_ASCII[sent] = verdict
    return verdict
