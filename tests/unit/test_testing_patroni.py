"""The Patroni harness's own checks that need no cluster (the drills in test_patroni.py use
the rest): why it cannot run, said in one sentence a skip can show."""

from __future__ import annotations

import pytest

from greenpool.testing import patroni
from greenpool.testing.postgres import PostgresNotFound


def test_missing_programs_are_named_with_the_packages_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(patroni, "_which",
                        lambda *names: None if names[0] in ("etcd", "haproxy") else "/bin/x")
    reason = patroni.missing(haproxy=True)
    assert reason is not None
    assert reason.startswith("etcd, haproxy not installed")
    assert "apt-get install patroni etcd-server haproxy" in reason
    assert patroni.missing(haproxy=False) == reason.replace("etcd, haproxy", "etcd")


def test_missing_postgres_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_postgres() -> None:
        raise PostgresNotFound("none")

    monkeypatch.setattr(patroni, "_which", lambda *names: "/bin/x")
    monkeypatch.setattr(patroni, "find_pg_bin", no_postgres)
    reason = patroni.missing()
    assert reason is not None and reason.startswith("the PostgreSQL server binaries")


def test_a_cluster_is_refused_with_that_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patroni, "_which", lambda *names: None)
    with pytest.raises(patroni.PatroniError, match="patroni, patronictl, etcd"):
        patroni.PatroniCluster()


def test_config_yaml_nests_maps_and_lists() -> None:
    text = patroni._yaml({"a": {"b": 1, "c": ["x y", {"k": "v"}]}, "d": {}, "e": True})
    assert text.splitlines() == ['a:', '  b: 1', '  c:', '    - "x y"', '    - {"k": "v"}',
                                 'd: {}', 'e: true']
