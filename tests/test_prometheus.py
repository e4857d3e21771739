"""Prometheus export: real scrapes over HTTP, parsed with prometheus_client's own parser."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from forking import run_in_forked_child
from modes import MODE, join_all, spawn

from greenpool.testing.postgres import free_port

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from greenpool.prometheus import PoolCollector, register, unregister  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels); the parser checks it."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def series(samples: Samples, prefix: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {key for key in samples if key[0].startswith(prefix)}


def wait_for(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.02)


@pytest.fixture
def http_registry() -> Iterator[tuple[Any, str]]:
    registry = prometheus_client.CollectorRegistry()
    port = free_port()
    server, _thread = prometheus_client.start_http_server(port, addr="127.0.0.1",
                                                         registry=registry)
    try:
        yield registry, f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()


def scrape(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def test_scrape_during_load_shows_acquires_and_endpoint_labels(make_pool, pg, http_registry):
    registry, url = http_registry
    pool = make_pool({"write": {"connection_count": 2}, "read": {"connection_count": 3,
                                                                 "autocommit": True}})
    register(pool, name="app", registry=registry)

    def load(i):
        for _ in range(20):
            with pool.handler("read" if i % 2 else "write") as db:
                db.query("SELECT 1")

    tasks = [spawn(load, i) for i in range(10)]
    during = parse(scrape(url))
    join_all(tasks, 30)
    text = scrape(url)
    after = parse(text)
    assert ("greenpool_connections_acquired_total", (("group", "read"), ("pool", "app"))) in during
    assert value(after, "greenpool_connections_acquired_total", pool="app", group="read") == 100
    assert value(after, "greenpool_connections_acquired_total", pool="app", group="write") == 100
    assert value(after, "greenpool_connections_max", pool="app", group="read") == 3
    endpoint = f"127.0.0.1:{pg.port}/postgres"
    assert value(after, "greenpool_endpoint_up", pool="app", endpoint=endpoint) == 1
    assert value(after, "greenpool_endpoint_role", pool="app", endpoint=endpoint,
                 role="primary") == 1
    assert value(after, "greenpool_endpoint_role", pool="app", endpoint=endpoint,
                 role="standby") == 0
    assert value(after, "greenpool_endpoint_state", pool="app", endpoint=endpoint,
                 state="up") == 1
    assert value(after, "greenpool_endpoint_connects_total", pool="app", endpoint=endpoint) >= 1
    assert value(after, "greenpool_endpoint_connect_errors_total", pool="app",
                 endpoint=endpoint) == 0
    assert value(after, "greenpool_endpoint_split_brain_total", pool="app",
                 endpoint=endpoint) == 0
    # no metric but the role gauge carries a role, and none carries a credential
    assert all("role" not in dict(labels) for name, labels in after
               if name != "greenpool_endpoint_role")
    assert "pass" not in text.lower().replace("passed", "")


def test_several_pools_share_the_default_registry(make_pool):
    a = make_pool({"g": {"connection_count": 2}})
    b = make_pool({"g": {"connection_count": 5}})
    c = make_pool({"g": {}})
    registry = prometheus_client.REGISTRY
    try:
        first = register(a, name="app")
        assert register(b, name="jobs") is first  # one collector for every pool
        assert register(a, name="app") is first  # the same pool again: a no-op
        with pytest.raises(ValueError, match="already exported"):
            register(c, name="jobs")
        samples = parse(prometheus_client.generate_latest(registry).decode())
        assert value(samples, "greenpool_connections_max", pool="app", group="g") == 2
        assert value(samples, "greenpool_connections_max", pool="jobs", group="g") == 5
    finally:
        assert unregister("app") and unregister("jobs")
    assert not unregister("jobs")
    samples = parse(prometheus_client.generate_latest(registry).decode())
    assert not series(samples, "greenpool_")  # the collector left with its last pool
    register(c, name="again")  # and a new one can be registered after
    assert unregister("again")


def test_a_collector_held_by_hand_and_a_closed_pool(make_pool):
    registry = prometheus_client.CollectorRegistry()
    collector = PoolCollector(make_pool({"g": {}}), name="kept")
    registry.register(collector)
    transient = make_pool({"g": {}})
    collector.add(transient, "transient")
    assert collector.names == ["kept", "transient"]
    transient.close()
    samples = parse(prometheus_client.generate_latest(registry).decode())
    pools = {dict(labels).get("pool") for _, labels in samples}
    assert "kept" in pools and "transient" not in pools
    collector.add(make_pool({"g": {}}), "transient")  # a closed pool's name is free again
    with pytest.raises(ValueError, match="non-empty"):
        collector.add(make_pool({"g": {}}), "")


def test_series_stay_the_same_through_a_failover(make_pool, pg_factory, http_registry):
    registry, url = http_registry
    primary = pg_factory()
    standby = pg_factory(standby_of=primary)
    pool = make_pool({"write": {"role": "primary", "connection_count": 2, "timeout": 5},
                      "read": {"role": "standby", "connection_count": 2, "autocommit": True,
                               "timeout": 5}},
                     db=[primary.endpoint(), standby.endpoint()], role_check_interval=0.2,
                     maintenance_interval=0.1, quarantine_initial=0.1, quarantine_max=0.5)
    register(pool, name="app", registry=registry)
    old, new = (f"127.0.0.1:{c.port}/postgres" for c in (primary, standby))
    for group in ("write", "read"):
        with pool.handler(group) as db:
            db.query("SELECT 1")
    before = parse(scrape(url))
    assert value(before, "greenpool_endpoint_role", pool="app", endpoint=old,
                 role="primary") == 1
    assert value(before, "greenpool_endpoint_role", pool="app", endpoint=new,
                 role="standby") == 1

    primary.stop("immediate")
    scrapes = [parse(scrape(url))]  # scraped while the pool finds out
    standby.promote()

    def writes_on_the_new_primary():
        try:
            with pool.handler("write", timeout=1) as db:
                db.query("SELECT 1")
        except Exception:
            scrapes.append(parse(scrape(url)))
            return False
        return True

    wait_for(writes_on_the_new_primary, 30)
    after = parse(scrape(url))
    scrapes.append(after)
    assert value(after, "greenpool_endpoint_role", pool="app", endpoint=new, role="primary") == 1
    assert value(after, "greenpool_endpoint_role", pool="app", endpoint=new, role="standby") == 0
    assert value(after, "greenpool_endpoint_up", pool="app", endpoint=old) == 0
    assert value(after, "greenpool_endpoint_up", pool="app", endpoint=new) == 1
    assert value(after, "greenpool_endpoint_lag_seconds", pool="app", endpoint=new) == 0
    assert value(after, "greenpool_endpoint_quarantines_total", pool="app", endpoint=old) >= 1
    # the endpoint series (the lag's too: every endpoint has one, whatever its role) are
    # the same before, during and after: no series ended, none began
    def stable(samples: Samples) -> set[Any]:
        return set(series(samples, "greenpool_endpoint_"))

    for during in scrapes:
        assert stable(during) == stable(before)
    # and counters never went down
    for name, labels in series(before, "greenpool_"):
        if name.endswith("_total"):
            assert after[(name, labels)] >= before[(name, labels)], name


def test_endpoint_up_reads_0_while_a_down_endpoint_is_probed(make_pool, blackhole):
    """probing: the backoff ended and one connect is testing a failed endpoint."""
    registry = prometheus_client.CollectorRegistry()
    pool = make_pool({"g": {"timeout": 0.3}}, db=[dict(blackhole.endpoint(), connect_timeout=2)],
                     quarantine_initial=0.05, quarantine_max=0.05)
    register(pool, name="app", registry=registry)
    label = f"127.0.0.1:{blackhole.port}/blackhole"

    def probing():
        try:
            with pool.handler("g", timeout=0.2):
                pass
        except Exception:
            pass
        return pool.stats()["endpoints"][label]["state"] == "probing"

    wait_for(probing, 20)
    samples = parse(prometheus_client.generate_latest(registry).decode())
    assert value(samples, "greenpool_endpoint_up", pool="app", endpoint=label) == 0
    assert value(samples, "greenpool_endpoint_state", pool="app", endpoint=label,
                 state="probing") == 1
    assert value(samples, "greenpool_endpoint_state", pool="app", endpoint=label,
                 state="up") == 0
    assert value(samples, "greenpool_endpoint_connect_errors_total", pool="app",
                 endpoint=label) >= 1


# --- histograms and names ------------------------------------------------------------------

def test_histograms_of_wait_use_and_create_time(make_pool, http_registry):
    """Loans held 30 ms, and one caller made to wait for the only connection: each shows
    in its buckets; counts match the loans, the connects and the waits."""
    registry, url = http_registry
    pool = make_pool({"g": {"connection_count": 1, "min_size": 1, "timeout": 10}})
    register(pool, name="app", registry=registry)
    # the connection opened first: no loan's wait includes a connect (slow on a busy machine)
    wait_for(lambda: pool.stats()["groups"]["g"]["idle"] == 1)
    for _ in range(5):
        with pool.handler("g") as db:
            db.query("SELECT 1")
            time.sleep(0.03)
    holding = spawn(lambda: _hold(pool, 0.2))
    wait_for(lambda: pool.stats()["groups"]["g"]["in_use"] == 1)
    with pool.handler("g") as db:  # waits about 0.2 s for the holder
        db.query("SELECT 1")
    join_all([holding], 10)
    after = parse(scrape(url))
    key = {"pool": "app", "group": "g"}

    def bucket(metric: str, le: str) -> float:
        return value(after, f"greenpool_connections_{metric}_seconds_bucket", le=le, **key)

    assert value(after, "greenpool_connections_use_seconds_count", **key) == 7
    assert bucket("use", "0.025") <= 1 and bucket("use", "+Inf") == 7  # 5 held 30 ms, 1 0.2 s
    assert value(after, "greenpool_connections_use_seconds_sum", **key) >= 5 * 0.03 + 0.2
    assert value(after, "greenpool_connections_wait_seconds_count", **key) == 7
    assert bucket("wait", "0.1") == 6 and bucket("wait", "+Inf") == 7  # the one that waited
    created = value(after, "greenpool_connections_created_total", **key)
    assert value(after, "greenpool_connections_create_seconds_count", **key) == created >= 1
    assert 0 < value(after, "greenpool_connections_create_seconds_sum", **key) < 10


def _hold(pool: Any, seconds: float) -> None:
    with pool.handler("g") as db:
        db.query("SELECT 1")
        time.sleep(seconds)


def test_counters_follow_prometheus_names_and_min_size_is_exported(make_pool, http_registry):
    registry, url = http_registry
    pool = make_pool({"g": {"connection_count": 3, "min_size": 2}})
    register(pool, name="app", registry=registry)
    after = parse(scrape(url))
    key = {"pool": "app", "group": "g"}
    assert value(after, "greenpool_connections_min", **key) == 2
    for name in ("greenpool_connections_timeouts_total", "greenpool_connections_refused_total",
                 "greenpool_connections_connect_errors_total",
                 "greenpool_exclusive_connections_timeouts_total"):
        assert value(after, name, **key) == 0
    old = {"greenpool_connections_timeout_total", "greenpool_connection_errors_total",
           "greenpool_exclusive_connections_timeout_total"}
    assert not old & {name for name, _ in after}


def _exported_families() -> dict[str, str]:
    """Every family the collector exports, as the names a scrape shows: counters with
    ``_total``, histograms by their base name."""
    families = {}
    for family in PoolCollector().describe():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        families[name] = family.type
    return families


def test_every_series_is_documented_and_nothing_else():
    section = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
    documented = set()
    for name in re.findall(r"greenpool_[a-z_]+(?:\|[a-z_|]+)?", section):
        head, *alternatives = name.split("|")
        if alternatives:  # greenpool_connections_active|idle: one family per alternative
            stem = head.rsplit("_", 1)[0]
            documented |= {head, *(f"{stem}_{alt}" for alt in alternatives)}
        else:
            documented.add(head)
    exported = set(_exported_families())
    assert exported - documented == set(), "exported but not documented"
    assert documented - exported == set(), "documented but not exported"


@pytest.mark.skipif(MODE == "eventlet", reason="eventlet's fork support is not exercised")
def test_a_forked_child_exports_its_own_loans_only(make_pool):
    """Loans the parent made before the fork, scraped (folded) or not yet, are the parent's
    to report; the child's histograms count the child's loans, each once."""
    pool = make_pool({"g": {"connection_count": 1}})
    registry = prometheus_client.CollectorRegistry()
    register(pool, name="app", registry=registry)

    def loans(n: int) -> None:
        for _ in range(n):
            with pool.handler("g") as db:
                db.query("SELECT 1")

    def used() -> float:
        samples = parse(prometheus_client.generate_latest(registry).decode())
        return value(samples, "greenpool_connections_use_seconds_count", pool="app", group="g")

    loans(5)
    assert used() == 5  # folded at this scrape
    loans(7)  # recorded, not folded yet at fork

    def in_child() -> str:  # what the child exports
        loans(2)
        return f"{used()} {pool.group('g').counters.timings.wait.count}"

    assert run_in_forked_child(in_child) == "2.0 2"
    assert used() == 12  # the parent's own, the unfolded ones included
