"""Prometheus export: a real scrape over HTTP during load."""

from __future__ import annotations

import urllib.request

import pytest
from modes import join_all, spawn

from greenpool.throwaway import free_port

prometheus_client = pytest.importorskip("prometheus_client")


def test_scrape_during_load_shows_acquires_and_endpoint_labels(make_pool, pg):
    from greenpool.prometheus import register

    pool = make_pool({"write": {"connection_count": 2}, "read": {"connection_count": 3,
                                                                 "autocommit": True}})
    registry = prometheus_client.CollectorRegistry()
    register(pool, name="app", registry=registry)
    port = free_port()
    server, _thread = prometheus_client.start_http_server(port, addr="127.0.0.1",
                                                         registry=registry)
    try:
        def load(i):
            for _ in range(20):
                with pool.handler("read" if i % 2 else "write") as db:
                    db.query("SELECT 1")

        tasks = [spawn(load, i) for i in range(10)]
        scrape_during = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                               timeout=10).read().decode()
        join_all(tasks, 30)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                        timeout=10).read().decode()
    finally:
        server.shutdown()
    assert "greenpool_connections_acquired_total" in scrape_during
    label = f'endpoint="127.0.0.1:{pg.port}/postgres"'
    lines = scrape.splitlines()
    acquired = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                for line in lines if line.startswith("greenpool_connections_acquired_total{")}
    assert acquired['group="read",pool="app"'] == 100
    assert acquired['group="write",pool="app"'] == 100
    up = [line for line in lines if line.startswith("greenpool_endpoint_up{")]
    assert len(up) == 1 and label in up[0] and up[0].endswith(" 1.0")
    assert any(line.startswith("greenpool_connections_max{") and line.endswith(" 3.0")
               for line in lines)
    assert "greenpool" in scrape and "pass" not in scrape.lower().replace("passed", "")
