"""Throwaway servers for tests: greenpool's own, the demo's, the benchmarks' and yours.

- :mod:`greenpool.testing.postgres`: :class:`~greenpool.testing.postgres.Cluster`, a
  PostgreSQL server in a temporary directory on a free loopback port (fsync off), with
  streaming standbys, removed on :meth:`~greenpool.testing.postgres.Cluster.destroy` or at exit;
- :mod:`greenpool.testing.pgbouncer`: a PgBouncer in front of one;
- :mod:`greenpool.testing.patroni`: a Patroni cluster (etcd, three nodes, HAProxy);
- :mod:`greenpool.testing.fixtures`: the pytest fixtures ``pg`` and ``pg_factory`` over them,
  an opt-in pytest plugin (``pytest_plugins = ["greenpool.testing.fixtures"]``);
- :mod:`greenpool.testing.processes`: who runs those servers and how they are stopped.

None of it imports the pool, so a test suite can build servers before (and apart from) it.
"""
