"""One endpoint group: the group keys, declared once each, and how a group is read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import checks
from .checks import DAY, fail, short
from .declare import Custom, Flag, Hook, OneOf, Seconds, Whole, key_table, read, setting
from .endpoint import STATEMENT_TIMEOUT_ALLOWED, EndpointConfig, statement_timeout

ROW_FACTORIES = ("tuple", "dict", "namedtuple")
#: libpq's target_session_attrs words for what a group may connect to.
ROLES = ("any", "primary", "standby", "prefer-standby")
LAG_POLICIES = ("use-primary", "fail")
#: when a returned connection's session is reset (see borrow_return.reset_on_return)
RESET_POLICIES = ("auto", "always", "never")
#: PostgreSQL's ceiling for max_connections: no group can usefully hold more.
CONNECTIONS_MAX = 262143
#: roles whose group starts its sessions read-only unless it says otherwise
_READ_ROLES = ("standby", "prefer-standby")


@dataclass(frozen=True)
class GroupConfig:
    """Settings of one endpoint group."""

    name: str
    connection_count: int = setting(10, check=Whole(1, CONNECTIONS_MAX), doc=(
        "most connections the group holds (open + opening), never exceeded"))
    min_size: int = setting(0, check=Whole(0, CONNECTIONS_MAX),
                            allowed_text="0 to `connection_count`",
                            doc="connections kept open and warmed up by housekeeping")
    autocommit: bool = setting(False, check=Flag(), doc="each statement commits by itself")
    readonly: bool = setting(False, check=Flag(), default_text=(
        f"`False` (`True` for roles {' and '.join(f'`{r}`' for r in _READ_ROLES)})"), doc=(
        "sessions start read-only (through a pooler: `SET TRANSACTION READ ONLY` per "
        "transaction); a default against mistakes, not a security boundary"))
    timeout: float = setting(30.0, check=Seconds(0.0, DAY), doc=(
        "acquire timeout in seconds, waiting plus connecting; `handler(group, timeout=…)` "
        "overrides it"))
    max_waiting: int = setting(0, check=Whole(0, 10**6, note=" (0: unbounded)"), doc=(
        "longest waiting line; beyond it `TooManyWaiters` is raised at once"))
    max_lifetime: float = setting(3600.0, check=Seconds(1.0, 30 * DAY, note=" (30 days)"), doc=(
        "seconds before a connection is replaced; each gets up to 10 % less, so connections "
        "opened together do not expire together"))
    max_idle: float = setting(600.0, check=Seconds(0.1, 30 * DAY), doc=(
        "idle seconds before housekeeping closes a connection (never below `min_size`)"))
    check_idle_after: float = setting(5.0, check=Seconds(0.0, DAY), doc=(
        "a connection idle longer gets a `SELECT 1` on borrow; a fresher one only when its "
        "socket is readable"))
    statement_timeout: float | None = setting(
        None, check=Custom(statement_timeout, STATEMENT_TIMEOUT_ALLOWED),
        default_text="the endpoint's",
        doc="seconds, set in the startup packet (through a pooler: with each transaction)")
    row_factory: str = setting("tuple", check=OneOf(ROW_FACTORIES),
                               doc="shape of the rows `query` returns")
    endpoints: tuple[int, ...] = setting(
        (), check=Custom(lambda path, value: value,  # resolved against ``db`` in parse_group
                         "non-empty list of indexes into `db` or `host:port/dbname` labels, "
                         "each once"),
        doc="the subset of `db` the group uses", default_text="all")
    role: str = setting("any", check=OneOf(ROLES), doc=(
        "libpq's `target_session_attrs` words; roles are detected, never configured"))
    max_lag: float | None = setting(None, check=Seconds(0.0, DAY, optional=True), doc=(
        "seconds of replay lag beyond which a standby is skipped while another qualifies"),
        default_text="none")
    on_lag: str = setting("use-primary", check=OneOf(LAG_POLICIES),
                          doc="what to do when every standby lags")
    leak_threshold: float | None = setting(
        None, check=Seconds(0.001, DAY, optional=True), default_text="none",
        doc="seconds a connection may be held before one warning names the code that took it")
    reset: str = setting("auto", check=OneOf(RESET_POLICIES), doc=(
        "when a returned session is reset with `DISCARD ALL`: `auto` only after a loan that "
        "may have changed it"))
    on_return: Callable[[Any], None] | None = setting(
        None, check=Hook(), default_text="none", doc=(
            "function taking the psycopg2 connection, run after each reset (Python "
            "configurations only)"))
    #: run with the psycopg2 connection when it opens and again after each ``DISCARD ALL``,
    #: so setup made per connection survives the reset
    configure: Callable[[Any], None] | None = setting(
        None, check=Hook(), default_text="none", doc=(
            "function taking the psycopg2 connection, run when it opens and after each "
            "`DISCARD ALL`; a transaction it leaves open is committed; if it raises, the "
            "connect fails: tried again after a backoff for an error of the moment (a lock, "
            "a deadlock, a timeout), else a refusal of the group (Python configurations "
            "only; not for a transaction-mode pooler)"))
    #: dedicated connections (``pool.exclusive()``, ``pool.listen()``) open at once, outside
    #: ``connection_count``; 0 turns them off for the group
    exclusive_limit: int = setting(10, check=Whole(0, CONNECTIONS_MAX), doc=(
        "most dedicated connections (`exclusive()` blocks and listeners) open at once, "
        "outside `connection_count`; 0 turns them off"))


#: every key of a group (and of ``defaults``)
KEYS = key_table(GroupConfig)


def _group_endpoints(path: str, value: Any, endpoints: tuple[EndpointConfig, ...]) -> tuple:
    """A group may name a subset of ``db`` by index or by ``host:port/dbname`` label."""
    if not isinstance(value, (list, tuple)) or not value:
        raise fail(path, "expected a non-empty list of endpoint indexes or labels")
    labels = {ep.label: i for i, ep in enumerate(endpoints)}
    chosen: list[int] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(endpoints):
            index = item
        elif isinstance(item, str) and item in labels:
            index = labels[item]
        else:
            raise fail(path, f"{short.repr(item)} is not an index into db (0 to "
                             f"{len(endpoints) - 1}) nor one of {sorted(labels)}")
        if index in chosen:
            raise fail(path, f"{short.repr(item)} names db[{index}] a second time")
        chosen.append(index)
    return tuple(chosen)


def parse_group(
    name: str, raw: Any, defaults: Mapping[str, Any], endpoints: tuple[EndpointConfig, ...]
) -> GroupConfig:
    path = f"groups.{name}"
    own = checks.mapping(path, raw)
    checks.reject_unknown(path, own, KEYS)
    # a default the group takes is named where it is written (one it overrides is unused)
    values = read("defaults", {k: v for k, v in defaults.items() if k not in own}, KEYS)
    values.update(read(path, own, KEYS))
    if "endpoints" in values:
        values["endpoints"] = _group_endpoints(f"{path}.endpoints", values["endpoints"], endpoints)
    if "readonly" not in values and values.get("role") in _READ_ROLES:
        values["readonly"] = True  # a read group: replaying a read after a failover is safe
    group = GroupConfig(name=name, **values)
    if group.min_size > group.connection_count:
        inherited = [key for key in ("min_size", "connection_count")
                     if key in defaults and key not in own]
        origin = f" ({' and '.join(inherited)} from `defaults`)" if inherited else ""
        raise fail(f"{path}.min_size", f"{group.min_size} exceeds connection_count "
                                       f"({group.connection_count}){origin}; allowed: 0 to "
                                       f"connection_count")
    return group
