"""``greenpool demo``: the pool through a failover, with no configuration at all.

Starts a throwaway primary and a streaming standby (synchronous, so that an acknowledged
write survives the primary's death) on free loopback ports. It then runs greenlets reading
through ``read`` (prefer-standby) and writing through ``write`` (primary), cuts some of them
off with timeouts, kills the primary and promotes the standby mid-run, and prints what the
pool did: a timeline of endpoint events, the errors the application saw, throughput before
and after, and whether every acknowledged write survived.

With ``GREENPOOL_DSN`` (or ``--dsn``) set, it runs the same load against that server, with
no failover. There it touches only a table it creates in this run under a name of its own
(``CREATE TABLE`` without ``IF NOT EXISTS``: a name already taken fails instead of being
reused) and drops at the end, whatever ends the run.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from ..errors import ConfigError
from .process import BAD_INPUT, FAILED, OK, UNREACHABLE, CheckFailed, shielded


class _Timeline(logging.Handler):
    """Collects the pool's WARNING+ log lines (endpoint state changes) with timestamps."""

    def __init__(self, started: float) -> None:
        super().__init__(logging.WARNING)
        self.started = started
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((time.monotonic() - self.started, record.getMessage()))

    def note(self, message: str) -> None:
        self.events.append((time.monotonic() - self.started, message))


def run(dsn: str | None, clients: int, seconds: float) -> int:
    """Run the demo; returns the process exit status (0: the pool behaved).

    Whatever ends it (the normal end, an error at any step, SIGINT/SIGTERM turned into
    :class:`~greenpool.cli.process.Interrupted` by the command line), the ``finally`` below stops
    and removes every throwaway server this process started, by PID
    (see :mod:`greenpool.testing.postgres`).
    """
    from gevent import monkey

    monkey.patch_all()
    import gevent

    import greenpool
    from greenpool.testing.postgres import ClusterError, PostgresNotFound, destroy_all

    log = logging.getLogger("greenpool")
    timeline = _Timeline(time.monotonic())
    tasks: list[Any] = []
    clusters: list[Any] = []
    table = f"greenpool_demo_{secrets.token_hex(6)}"  # this run's own: never one it met
    created: list[str] = []  # the table, from the moment this run may have created it
    try:
        try:
            endpoints = _servers(dsn, clusters)
        except PostgresNotFound as exc:
            raise CheckFailed(str(exc), UNREACHABLE) from None
        except ClusterError as exc:
            raise CheckFailed(f"could not start PostgreSQL: {exc}", UNREACHABLE) from None
        log.addHandler(timeline)
        log.propagate = False  # the timeline prints them, in order, at the end
        try:
            greenpool.init(_config(endpoints))
        except ConfigError as exc:
            raise CheckFailed(f"bad --dsn: {exc}") from None
        return _demo(greenpool, gevent, timeline, tasks, clusters, clients, seconds, table,
                     created)
    finally:
        with shielded():  # a signal now waits until the servers are gone
            gevent.killall(tasks)
            if created and dsn:
                _drop(greenpool, table)
            greenpool.close()
            destroy_all()  # every cluster of this process is the demo's
            # only now: a probe still under way may log the servers' going, which is no news
            log.removeHandler(timeline)
            log.propagate = True


def _servers(dsn: str | None, clusters: list[Any]) -> list[Any]:
    """The endpoints to load: ``dsn``, or a throwaway primary and its synchronous standby
    (appended to ``clusters`` as soon as each exists)."""
    from greenpool.testing.postgres import Cluster

    if dsn:
        _say("using the server in --dsn/GREENPOOL_DSN (no failover without a standby)")
        return [dsn]
    primary = Cluster(settings={"synchronous_commit": "on"})
    clusters.append(primary)
    _say(f"setting up a throwaway primary in {primary.root} (initdb)")
    primary.init()
    primary.start()
    _say(f"primary running on 127.0.0.1:{primary.port} (pid {primary.pid}); "
         "copying it into a standby (pg_basebackup)")
    standby = primary.make_standby()
    clusters.append(standby)
    _say(f"standby running on 127.0.0.1:{standby.port} (pid {standby.pid}) in {standby.root}")
    primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
    primary.execute("SELECT pg_reload_conf()")
    return [primary.endpoint(), standby.endpoint()]


def _drop(greenpool: Any, table: str) -> None:
    """Drop the table this run created on the user's server, or say that it is left."""
    try:
        with greenpool.handler("write", timeout=5) as db:
            db.execute(f"DROP TABLE IF EXISTS {table}")
        _say(f"dropped table {table}, which this run created")
    except Exception as exc:  # reported: the user must know what is left on their server
        _say(f"could not drop table {table}, which this run created ({type(exc).__name__}: "
             f"{' '.join(str(exc).split())}); drop it yourself")


def _config(endpoints: list[Any]) -> dict[str, Any]:
    return {
        "db": endpoints,
        "groups": {
            "write": {"connection_count": 4, "role": "primary", "timeout": 5},
            "read": {"connection_count": 8, "role": "prefer-standby", "autocommit": True,
                     "timeout": 5},
        },
        "maintenance_interval": 0.2,
        "role_check_interval": 0.5,
    }


def _say(line: str) -> None:
    print(line, flush=True)  # flushed: a pipe reader (or a test) sees each step as it starts


def _demo(greenpool: Any, gevent: Any, timeline: _Timeline, tasks: list[Any],
          clusters: list[Any], clients: int, seconds: float, table: str,
          created: list[str]) -> int:
    started = timeline.started
    done: list[tuple[float, str]] = []  # (time, 'read'|'write') of each success
    errors: list[tuple[float, str]] = []
    acked: list[int] = []
    cut_short = 0
    import psycopg2

    if not clusters:
        _say(f"creating table {table} for this run; it is dropped at the end")
    # named before the CREATE: an interruption may come after the server committed it,
    # before this process heard so (the drop is IF EXISTS; the name is this run's own)
    created.append(table)
    try:
        with greenpool.handler("write") as db:
            db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY)")
    except greenpool.PoolError as exc:
        created.clear()
        raise CheckFailed(f"cannot reach the database: {type(exc).__name__}: {exc}",
                          UNREACHABLE) from None
    except (psycopg2.ProgrammingError, psycopg2.InternalError) as exc:  # no privilege, read-only
        created.clear()  # refused, maybe as a name taken: not this run's to drop
        raise CheckFailed(f"cannot create the demo's table {table} with --dsn's user: "
                          f"{' '.join(str(exc).split())}; the demo needs a user that may "
                          f"create a table in its search_path", BAD_INPUT) from None

    def client(i: int) -> None:
        nonlocal cut_short
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            kind = "write" if n % 3 == 0 else "read"
            try:
                # every 7th request is cut short by a timeout, as a slow client's would be
                with gevent.Timeout(0.005 if n % 7 == 0 else None), \
                        greenpool.handler(kind) as db:
                    if kind == "write":
                        key = i * 1_000_000 + n
                        db.query(f"INSERT INTO {table} VALUES (%s)", (key,))
                    else:
                        db.query(f"SELECT count(*) FROM {table}")
                if kind == "write":
                    acked.append(key)
                done.append((time.monotonic() - started, kind))
            except gevent.Timeout:
                cut_short += 1
            except Exception as exc:  # what the application saw, reported
                errors.append((time.monotonic() - started,
                               f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0]}"))
            gevent.sleep(0.002)

    tasks.extend(gevent.spawn(client, i) for i in range(clients))
    timeline.note(f"{clients} greenlets reading and writing for {seconds:g} s")
    _say(f"load running: {clients} greenlets for {seconds:g} s")
    failed_at = down_at = None
    if len(clusters) == 2:
        gevent.sleep(seconds / 3)
        failed_at = time.monotonic() - started
        timeline.note("killing the primary (pg_ctl stop -m immediate), promoting the standby")
        clusters[0].stop(mode="immediate")
        down_at = time.monotonic() - started
        clusters[1].promote()
        timeline.note("standby promoted")
    gevent.joinall(tasks)
    timeline.note("load finished")

    with greenpool.handler("write") as db:
        rows = db.query(f"SELECT id FROM {table}")
        assert isinstance(rows, list)  # a SELECT returns rows
        stored = {row[0] for row in rows}
    lost = len(set(acked) - stored)
    stats = greenpool.stats()
    _report(timeline, done, errors, cut_short, len(acked), lost, failed_at, down_at,
            seconds, stats)
    leaked = sum(g["in_use"] for g in stats["groups"].values())
    return OK if leaked == 0 and lost == 0 else FAILED


def _report(timeline: _Timeline, done: list[tuple[float, str]], errors: list[tuple[float, str]],
            cut_short: int, acked: int, lost: int, failed_at: float | None,
            down_at: float | None, seconds: float, stats: dict[str, Any]) -> None:
    print("\nTimeline (endpoint events as the pool logged them):")
    for at, message in sorted(timeline.events + errors[:5]):
        print(f"  {at:6.2f}s  {message}")
    if len(errors) > 5:
        print(f"  ... and {len(errors) - 5} more application errors")
    print("\nWhat the application saw:")
    print(f"  successful requests: {len(done)}  (writes acknowledged: {acked})")
    print(f"  requests cut short by their own timeout: {cut_short}")
    print(f"  errors: {len(errors)}")
    if failed_at is not None:
        before = [t for t, _ in done if t < failed_at]
        after = [t for t, _ in done if t >= failed_at]
        span_after = max(seconds - failed_at, 0.001)
        print(f"  throughput before the failover: {len(before) / failed_at:8.0f} req/s")
        print(f"  throughput after the failover:  {len(after) / span_after:8.0f} req/s")
        writes_after = sorted(t for t, kind in done
                              if kind == "write" and down_at is not None and t >= down_at)
        if writes_after:
            print(f"  writes resumed on the new primary {writes_after[0] - failed_at:.2f} s "
                  f"after the kill began (the old primary was down after "
                  f"{(down_at or failed_at) - failed_at:.2f} s)")
    print(f"  acknowledged writes lost: {lost} (must be 0)")
    print("\nPool:")
    for name, group in stats["groups"].items():
        print(f"  group {name!r}: size {group['size']}/{group['max_size']}, "
              f"acquires {group['acquires']}, failovers {group['failovers']}, "
              f"replays {group['replays']}, discards {group['discards_by_reason']}")
    for label, endpoint in stats["endpoints"].items():
        print(f"  endpoint {label}: {endpoint['state']}, {endpoint['role']}, "
              f"quarantines {endpoint['quarantines']}, connects {endpoint['connects']}")
    leaked = sum(g["in_use"] for g in stats["groups"].values())
    print(f"  connections still lent out: {leaked} (must be 0)")
