"""SQL as PostgreSQL reads it: greenpool's one reader of statement texts.

Two decisions rest on a statement's text: whether a loan may have left session state for the
next borrower (:mod:`greenpool.sessionstate`), and, through a pooler, where each transaction
begins and ends (:mod:`greenpool.pooler`). Hand-written scanners got both wrong where
PostgreSQL's scanner differs (nested ``/* */``, ``--`` ended by ``\\r``, dollar-quote tags,
``BEGIN ATOMIC`` bodies, ...), so the text is read by PostgreSQL's own scanner and grammar:
``pglast`` (libpg_query). Statements are classified by parse-tree node, never by spelling.

The tree is read as libpg_query's JSON: the C parse is linear and releases the GIL, and a node
name can occur in that JSON only as a key (a ``"`` inside a string value is escaped), so a
substring search answers "is there any such node" without building the tree; the tree is
built (``json.loads``, linear) only when the answer needs a node's fields.

Anything the parser refuses is :class:`Unreadable`: the session check counts it as changing
the session, the pooler refuses to send it. So is a tree too deep to build (``json.loads``
recurses: a sum of ~500 terms is ~1,000 levels): it is built only where a node's fields are
needed, and where they are and it cannot be, the text is unknown, never clean.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pglast import parser as _pglast

#: texts longer than this are not parsed for the session check: they count as changing it
#: (a bulk statement's loan pays one ``DISCARD ALL``; parsing 16 KB costs about 1 ms)
SESSION_CHECK_MAX = 16_384
#: texts longer than this are parsed off the hub where the mode allows (gevent's thread pool)
OFFLOAD_MIN = 16_384
#: texts up to this length have their reading cached (bounded by count, cleared when full)
_CACHED_TEXT_MAX = 4_096
_CACHE_MAX = 4_096


class Unreadable(ValueError):
    """PostgreSQL's parser refuses the text (its message names only a character position:
    the text may hold a password)."""


@dataclass(frozen=True)
class Statement:
    """One top-level statement, as far as transactions are concerned."""

    #: the parse-tree node: ``SelectStmt``, ``TransactionStmt``, ``VacuumStmt``, ...
    kind: str
    #: ``BEGIN`` / ``START TRANSACTION``
    begins: bool = False
    #: ``COMMIT`` / ``END`` / ``ROLLBACK`` / ``ABORT`` / ``PREPARE TRANSACTION`` (with or
    #: without ``AND CHAIN``; ``ROLLBACK TO SAVEPOINT`` does not end the transaction)
    ends: bool = False
    #: of those, ``AND CHAIN``: a new transaction begins at once (with the old one's
    #: characteristics, none of its ``SET LOCAL`` settings)
    chains: bool = False
    #: PostgreSQL refuses to run it inside a transaction block (or may, by server state)
    refuses_block: bool = False
    #: of those, a read-only transaction refuses it too
    refused_read_only: bool = False
    #: its name in messages (``VACUUM``); '' for ordinary statements
    label: str = ""


def server_text(data: bytes, codec: str) -> str | None:
    """The text PostgreSQL reads in ``data``, sent in ``codec`` (Python's name of the
    connection's encoding): the server reads every byte below 0x80 that is not part of a
    multibyte character as ASCII. None where Python's codec reads such a byte as another
    character and one is in the text (``shift_jis_2004`` reads 0x5C as ``¥``, the server
    ``\\``): what the server reads is then not known here."""
    text = data.decode(codec)
    if not text.isascii():
        impostors = _ascii_impostors(codec)
        if impostors and any(char in impostors for char in text):
            return None
    return text


@functools.cache
def _ascii_impostors(codec: str) -> frozenset[str]:
    """The characters ``codec`` reads a single ASCII byte as, other than that byte's own."""
    found = set()
    for byte in range(0x80):
        try:
            char = bytes((byte,)).decode(codec)
        except UnicodeError:
            continue
        if char != chr(byte):
            found.add(char)
    return frozenset(found)


def _parse(text: str) -> str:
    """libpg_query's JSON tree of ``text``."""
    try:
        return str(_pglast.parse_sql_json(text))
    except _pglast.ParseError as exc:
        index = exc.args[1] if len(exc.args) > 1 else None
        where = f" at character {index + 1}" if isinstance(index, int) else ""
        raise Unreadable(f"PostgreSQL's parser cannot read this text{where}") from None


def _parse_or_refusal(text: str) -> Any:
    try:
        return _parse(text)
    except Unreadable as exc:
        return exc


def _stmts(tree: str) -> list[dict[str, Any]]:
    """The top-level statement nodes (each ``{"KindStmt": {fields}}``); :class:`Unreadable`
    when the tree is too deep to build here (PostgreSQL reads it: this is greenpool's limit)."""
    try:
        return [raw["stmt"] for raw in json.loads(tree).get("stmts", ())]
    except RecursionError:
        raise Unreadable("this text nests too deeply for greenpool to read its parse tree "
                         "(an expression of many hundreds of terms)") from None


# --- session state ----------------------------------------------------------------------------

# psycopg2's placeholders (``%s``, ``%(name)s``) and its ``%%``: a template is read with each
# placeholder as a numbered parameter, which must then be found where a value goes (not inside
# a literal, a comment or a name, where psycopg2's quoted value would change the text's shape)
_PLACEHOLDER = re.compile(r"%(?:\(([^)]*)\))?s|%%")
_MARKER_BASE = 30001
# Found by substring in the JSON tree, before any tree is built: nodes that change the session
# whatever their fields (an INSERT or MERGE may fire a serial default: currval()/lastval())
# (an added column's default runs for every row: a serial's nextval() sets lastval())
_ALWAYS = re.compile(
    r'"(?:PrepareStmt|ListenStmt|LoadStmt|DoStmt|CallStmt|InsertStmt|MergeStmt|SetToDefault)"'
    r'|"relpersistence":"t"|"subtype":"AT_AddColumn"')
# ... and nodes whose fields decide (a function is suspect only if its name occurs)
_SUSPECT = re.compile(
    r'"(?:VariableSetStmt|DeclareCursorStmt|UpdateStmt|CopyStmt)"'
    r'|"(?:sval|schemaname)":"(?:pg_temp|set_config"|pg_advisory_lock|pg_try_advisory_lock'
    r'|dblink_connect|nextval"|setval"|pg_replication_origin_session_setup"|query_to_xml)')
_PARAMETER = re.compile(r'"ParamRef":\{"number":(\d+)')
# VAR_SET_MULTI names that end with the transaction
_TRANSACTION_SCOPED = frozenset(("TRANSACTION", "TRANSACTION SNAPSHOT"))
# functions that leave state in the session (by their unqualified name), or run SQL given as
# a string (``query_to_xml``: its text is not read here)
_SESSION_FUNCTIONS = frozenset((
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared", "dblink_connect", "dblink_connect_u", "nextval", "setval",
    "pg_replication_origin_session_setup", "query_to_xml", "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
))
_CURSOR_OPT_HOLD = 0x0020


def _placeholders_as_parameters(text: str) -> tuple[str, list[int]]:
    numbers: dict[str, int] = {}
    used: list[int] = []

    def replace(match: re.Match[str]) -> str:
        if match.group() == "%%":
            return "%"
        name = match.group(1)
        key = f"({name})" if name is not None else str(len(used))
        number = numbers.setdefault(key, _MARKER_BASE + len(numbers))
        used.append(number)
        return f"(${number})"

    return _PLACEHOLDER.sub(replace, text), used


def _literally_true(node: Any) -> bool:
    const = node.get("A_Const") if isinstance(node, dict) else None
    return isinstance(const, dict) and const.get("boolval", {}).get("boolval") is True


def _function_changes_session(call: dict[str, Any]) -> bool:
    names = call.get("funcname", ())
    name = names[-1].get("String", {}).get("sval", "") if names else ""
    if name == "set_config":  # a third argument that is literally true: SET LOCAL
        args = call.get("args", ())
        return len(args) != 3 or not _literally_true(args[2])
    return name in _SESSION_FUNCTIONS


def _node_changes_session(kind: str, fields: Any) -> bool:
    if not isinstance(fields, dict):
        return False
    if kind == "VariableSetStmt":
        return not fields.get("is_local") and not (
            fields.get("kind") == "VAR_SET_MULTI" and fields.get("name") in _TRANSACTION_SCOPED)
    if kind == "FuncCall":
        return _function_changes_session(fields)
    if kind == "DeclareCursorStmt":
        return bool(fields.get("options", 0) & _CURSOR_OPT_HOLD)
    if kind == "UpdateStmt":  # UPDATE pg_settings is SET; SET col = DEFAULT is SetToDefault
        return fields.get("relation", {}).get("relname") == "pg_settings"
    if kind == "CopyStmt":  # COPY FROM fires column defaults: nextval()
        return bool(fields.get("is_from"))
    if kind == "String":
        return str(fields.get("sval", "")).startswith("pg_temp")
    # an INSERT or MERGE may fire a serial default: currval()/lastval() for the session
    return kind in ("PrepareStmt", "ListenStmt", "LoadStmt", "DoStmt", "CallStmt",
                    "InsertStmt", "MergeStmt", "SetToDefault")


def _tree_changes_session(tree: str) -> bool:
    pending: list[Any] = _stmts(tree)
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        if item.get("relpersistence") == "t" or str(item.get("schemaname", "")).startswith(
                "pg_temp"):
            return True  # a temporary relation (RangeVar, inlined without its node name)
        for key, value in item.items():
            if _node_changes_session(key, value):
                return True
            if isinstance(value, (dict, list)):
                pending.append(value)
    return False


def changes_session(template: str) -> bool:
    """Whether running ``template`` (SQL with psycopg2's placeholders, if any) may leave
    state in the session beyond its transaction. Unreadable or too long: True."""
    if len(template) > SESSION_CHECK_MAX:
        return True
    text, markers = _placeholders_as_parameters(template) if "%" in template else (template, [])
    try:
        tree = _parse(text)
    except Unreadable:
        return True
    if markers and sorted(
            n for n in map(int, _PARAMETER.findall(tree)) if n >= _MARKER_BASE) != sorted(markers):
        return True  # a placeholder inside a literal, a comment or a name
    if _ALWAYS.search(tree) is not None:
        return True
    try:
        return _SUSPECT.search(tree) is not None and _tree_changes_session(tree)
    except Unreadable:  # too deep to build: unknown
        return True


# --- transactions -----------------------------------------------------------------------------

# top-level statements whose kind alone answers (a long text is read without its tree)
_TOP_KIND = re.compile(r'\{"stmt":\{"(\w+)":')
_STATEMENTS: dict[str, tuple[Statement, ...]] = {}


def _option(options: Any, name: str) -> bool | None:
    """A boolean ``WITH (...)`` / ``(...)`` option the way PostgreSQL's ``defGetBoolean``
    reads it; None when absent or not a constant."""
    for item in options or ():
        elem = item.get("DefElem", {})
        if elem.get("defname") != name:
            continue
        arg = elem.get("arg")
        if arg is None:
            return True
        if "Boolean" in arg:
            return bool(arg["Boolean"].get("boolval", False))
        if "Integer" in arg:
            value = arg["Integer"].get("ival", 0)
            return None if value not in (0, 1) else bool(value)
        names = arg.get("TypeName", {}).get("names", ())  # a bare word: ``= off``
        word = str(arg.get("String", names[0].get("String", {}) if len(names) == 1 else {}).get(
            "sval", "")).lower()
        if word in ("true", "on"):
            return True
        if word in ("false", "off"):
            return False
        return None
    return None


_BLOCKERS: dict[str, str] = {  # refuse a transaction block whatever their options
    "CreatedbStmt": "CREATE DATABASE", "DropdbStmt": "DROP DATABASE",
    "CreateTableSpaceStmt": "CREATE TABLESPACE", "DropTableSpaceStmt": "DROP TABLESPACE",
    "AlterSystemStmt": "ALTER SYSTEM",
    # refuses when the subscription has a replication slot: server state, so assume it does
    "DropSubscriptionStmt": "DROP SUBSCRIPTION",
}
# the statements whose fields decide what they are here (the others are ``Statement(kind)``,
# and a text of only those is classified without building its tree)
_READ_BY_FIELDS = frozenset((
    "TransactionStmt", "VacuumStmt", "IndexStmt", "DropStmt", "ReindexStmt", "ClusterStmt",
    "AlterTableStmt", "AlterDatabaseStmt", "DiscardStmt", "CreateSubscriptionStmt",
    "AlterSubscriptionStmt", *_BLOCKERS))
# of the statements that refuse a block, those a read-only transaction allows (PostgreSQL's
# ClassifyUtilityCommandAsReadOnly)
_READ_ONLY_ALLOWS = frozenset(("VacuumStmt", "ReindexStmt", "ClusterStmt", "DiscardStmt",
                               "AlterSystemStmt", "TransactionStmt"))


def _refusal(kind: str, f: dict[str, Any]) -> str:
    """The statement's label if PostgreSQL refuses to run it in a transaction block, by node
    and option as PostgreSQL decides it; ''."""
    if kind in _BLOCKERS:
        return _BLOCKERS[kind]
    if kind == "VacuumStmt":
        return "VACUUM" if f.get("is_vacuumcmd") else ""  # ANALYZE alone runs in a block
    if kind == "IndexStmt" and f.get("concurrent"):
        return "CREATE INDEX CONCURRENTLY"
    if kind == "DropStmt" and f.get("concurrent"):
        return "DROP INDEX CONCURRENTLY"
    if kind == "ReindexStmt":
        if f.get("kind") in ("REINDEX_OBJECT_SCHEMA", "REINDEX_OBJECT_SYSTEM",
                             "REINDEX_OBJECT_DATABASE") or _option(f.get("params"),
                                                                   "concurrently"):
            return "REINDEX"
        return ""
    if kind == "ClusterStmt":
        return "CLUSTER" if not f.get("relation") else ""
    if kind == "AlterTableStmt":
        for cmd in f.get("cmds", ()):
            c = cmd.get("AlterTableCmd", {})
            if c.get("subtype") == "AT_DetachPartition" and c.get("def", {}).get(
                    "PartitionCmd", {}).get("concurrent"):
                return "ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY"
        return ""
    if kind == "AlterDatabaseStmt":
        tablespace = any(o.get("DefElem", {}).get("defname") == "tablespace"
                         for o in f.get("options", ()))
        return "ALTER DATABASE ... SET TABLESPACE" if tablespace else ""
    if kind == "DiscardStmt":
        return "DISCARD ALL" if f.get("target") == "DISCARD_ALL" else ""
    if kind == "TransactionStmt":
        if f.get("kind") in ("TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"):
            return "COMMIT PREPARED / ROLLBACK PREPARED"
        return ""
    if kind == "CreateSubscriptionStmt":
        options = f.get("options")
        slot = _option(options, "create_slot")
        if slot is None:
            slot = _option(options, "connect") is not False
        return "CREATE SUBSCRIPTION" if slot else ""
    if kind == "AlterSubscriptionStmt":
        what = f.get("kind", "")
        if what == "ALTER_SUBSCRIPTION_REFRESH":
            return "ALTER SUBSCRIPTION ... REFRESH"
        if what.endswith("_PUBLICATION") and _option(f.get("options"), "refresh") is not False:
            return "ALTER SUBSCRIPTION ... PUBLICATION"
    return ""


def _statement(node: dict[str, Any]) -> Statement:
    ((kind, fields),) = node.items()
    if kind == "TransactionStmt":
        what = fields.get("kind", "")
        if what in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
            return Statement(kind, begins=True)
        if what in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK", "TRANS_STMT_PREPARE"):
            return Statement(kind, ends=True, chains=bool(fields.get("chain")))
    label = _refusal(kind, fields)
    if not label:
        return Statement(kind)
    return Statement(kind, refuses_block=True, refused_read_only=kind not in _READ_ONLY_ALLOWS,
                     label=label)


def statements(text: str, offload: Callable[[Callable[[str], Any], str], Any] | None = None,
               ) -> tuple[Statement, ...]:
    """The top-level statements of ``text`` (exact SQL, no placeholders), split and
    classified as PostgreSQL does; raises :class:`Unreadable`. Cached for short texts.
    ``offload(parse, text)`` runs the parse of a long text off the hub (the C parse releases
    the GIL; the rest is a regular expression over its output, or, for utility statements,
    a tree built linearly)."""
    known = _STATEMENTS.get(text)
    if known is not None:
        return known
    if offload is not None and len(text) > OFFLOAD_MIN:
        tree = offload(_parse_or_refusal, text)  # (an exception there would be printed)
        if isinstance(tree, Unreadable):
            raise tree
    else:
        tree = _parse(text)
    kinds = _TOP_KIND.findall(tree)
    if not any(kind in _READ_BY_FIELDS for kind in kinds):  # a bulk INSERT: no tree built
        found = tuple(Statement(kind) for kind in kinds)
    else:
        found = tuple(_statement(node) for node in _stmts(tree))
    if len(text) <= _CACHED_TEXT_MAX:
        if len(_STATEMENTS) >= _CACHE_MAX:
            _STATEMENTS.clear()
        _STATEMENTS[text] = found
    return found
