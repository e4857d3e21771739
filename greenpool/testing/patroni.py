"""A throwaway Patroni cluster on free loopback ports: one etcd, three PostgreSQL nodes, HAProxy.

The testing helper beside :mod:`greenpool.testing.postgres` (kept apart so it stays small)
for failover drills the way production runs them: a high-availability orchestrator elects,
fences, demotes, rewinds and re-admits the servers, and optionally an HAProxy in front asks
Patroni's REST API which node is the leader (``/primary``) or a replica (``/replica``).

Everything lives in one temporary directory and listens on loopback ports the kernel picked,
never a default port. Every process is started here and stopped by its PID (the
postmasters by theirs, with their children), and :meth:`PatroniCluster.destroy` removes the
directory; forgotten clusters are destroyed at interpreter exit. PostgreSQL refuses to run
as root, so when this process is root Patroni (which runs PostgreSQL) runs as the
``postgres`` OS user. Timeouts are short (``ttl`` 5 s, ``loop_wait`` 1 s, ``retry_timeout``
2 s) so that a failover takes seconds. :func:`missing` says which programs are absent, for a
test to skip with that reason.

Why one module of this length: one throwaway cluster (etcd, Patroni nodes, HAProxy) whose
processes start, fail and are cleaned up together.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from greenpool.testing.postgres import PostgresNotFound, find_pg_bin, free_port
from greenpool.testing.processes import (
    as_owner,
    give_to,
    inherited,
    kill_naming,
    names,
    pids_naming,
    register,
    server_owner,
    stop_pid,
    stop_started,
    unregister,
)

__all__ = ["PatroniCluster", "PatroniError", "PatroniNode", "destroy_all", "missing"]

HOST = "127.0.0.1"
START_TIMEOUT = 90.0  # seconds for the whole cluster to come up (initdb + two base backups)
STOP_WAIT = 10.0
#: HAProxy's health checks of Patroni's REST API: a dead or demoted node is out within ~0.6 s
HAPROXY_CHECKS = "inter 300ms fall 2 rise 1"


class PatroniError(RuntimeError):
    """The cluster did not reach the state asked for in time; carries the logs' tails."""


def _which(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or next(
            (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None)
        if found:
            return found
    return None


def missing(haproxy: bool = False) -> str | None:
    """Why a Patroni cluster cannot run here (a sentence for ``pytest.skip``), or None."""
    absent = [name for name in ("patroni", "patronictl", "etcd") if _which(name) is None]
    if haproxy and _which("haproxy") is None:
        absent.append("haproxy")
    try:
        find_pg_bin()
    except PostgresNotFound:
        absent.append("the PostgreSQL server binaries")
    if not absent:
        return None
    return (f"{', '.join(absent)} not installed: `apt-get install patroni etcd-server haproxy "
            "postgresql` (Debian) provides them")


def _yaml(value: Any, indent: int = 0) -> str:
    """Just enough YAML for a Patroni configuration (JSON scalars are valid YAML)."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {json.dumps(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(f"{pad}- {json.dumps(item)}" for item in value)
    return pad + json.dumps(value)


class PatroniNode:
    """One PostgreSQL server and the Patroni that runs it."""

    def __init__(self, cluster: PatroniCluster, index: int) -> None:
        self.cluster = cluster
        self.name = f"node{index}"
        self.host = HOST
        self.port = free_port(HOST)
        self.rest_port = free_port(HOST)
        self.dbname = "postgres"
        self.user = "postgres"
        self.password = cluster.password
        self.root = cluster.root / self.name
        self.datadir = self.root / "data"
        self.config_file = self.root / "patroni.yml"
        self.logfile = self.root / "patroni.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<PatroniNode {self.name} {self.host}:{self.port} rest={self.rest_port}>"

    # -- addresses ----------------------------------------------------------------------

    def endpoint(self, **overrides: Any) -> dict[str, Any]:
        """This node's PostgreSQL as a pool endpoint (pgdbpool's dict format)."""
        return {"host": self.host, "port": self.port, "name": self.dbname, "user": self.user,
                "pass": self.password, **overrides}

    def connect(self, **kw: Any) -> psycopg2.extensions.connection:
        """An autocommit admin connection to this node (not pooled)."""
        params = {"host": self.host, "port": self.port, "dbname": self.dbname, "user": self.user,
                  "password": self.password, "connect_timeout": 3,
                  "application_name": "greenpool-throwaway", **kw}
        conn = psycopg2.connect(**params)
        conn.autocommit = True
        return conn

    def execute(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """One statement on a short-lived admin connection; its rows if it returned any."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def rest(self, path: str, method: str = "GET", body: Any = None,
             timeout: float = 2.0) -> tuple[int, Any]:
        """Ask this node's Patroni REST API; (status, decoded JSON or None). 0 if unreachable."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{HOST}:{self.rest_port}{path}", data=data,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (OSError, ValueError):
            return 0, None
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    # -- processes ----------------------------------------------------------------------

    @property
    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if names(pid, self.root) else None  # not a later owner of a stale PID

    @property
    def patroni_pid(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    def start(self) -> None:
        """Start (or restart) this node's Patroni, which starts PostgreSQL: as a replica of the
        leader, rewound or re-initialised if need be, or by bootstrapping an empty cluster."""
        if self.patroni_pid is not None:
            return
        log = open(self.logfile, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = self.cluster._spawn([self.cluster.patroni, str(self.config_file)], log,
                                            as_server_user=True, cwd=self.root)
        finally:
            log.close()

    def kill(self) -> None:
        """SIGKILL Patroni and PostgreSQL (the postmaster and every child): a node dies."""
        pids = [p for p in (self.patroni_pid, self.postmaster_pid) if p is not None]
        pids += _children(self.postmaster_pid) if self.postmaster_pid else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            stop_pid(pid, signal.SIGKILL, STOP_WAIT)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(STOP_WAIT)

    def pause(self) -> None:
        """SIGSTOP this node's Patroni: its PostgreSQL runs on, unmanaged (a partitioned agent)."""
        if self.patroni_pid is not None:
            os.kill(self.patroni_pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.patroni_pid is not None:
            os.kill(self.patroni_pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop Patroni and PostgreSQL by PID: SIGCONT+SIGTERM, then SIGKILL after a while."""
        pid = self.patroni_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            stop_pid(pid, signal.SIGTERM, STOP_WAIT)
            with contextlib.suppress(Exception):
                assert self.proc is not None
                self.proc.wait(STOP_WAIT)
        postmaster = self.postmaster_pid
        if postmaster is not None:
            stop_pid(postmaster, signal.SIGQUIT, STOP_WAIT)
        for other in pids_naming(self.root):
            stop_pid(other, signal.SIGKILL, STOP_WAIT)

    def config(self, scope: str, etcd_port: int, bin_dir: str, bootstrap: dict[str, Any],
               socket_dir: str) -> dict[str, Any]:
        hba = ["local all all scram-sha-256", "local replication all scram-sha-256",
               f"host all all {HOST}/32 scram-sha-256",
               f"host replication all {HOST}/32 scram-sha-256"]
        return {
            "scope": scope, "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"{HOST}:{self.rest_port}",
                        "connect_address": f"{HOST}:{self.rest_port}"},
            "etcd3": {"hosts": [f"{HOST}:{etcd_port}"]},
            "bootstrap": bootstrap,
            "watchdog": {"mode": "off"},
            "postgresql": {
                "listen": f"{HOST}:{self.port}",
                "connect_address": f"{HOST}:{self.port}",
                "data_dir": str(self.datadir),
                "bin_dir": bin_dir,
                "pgpass": str(self.root / "pgpass"),
                "use_unix_socket": False,
                "pg_hba": hba,
                "authentication": {
                    "superuser": {"username": "postgres", "password": self.password},
                    "replication": {"username": "replicator", "password": self.password},
                    "rewind": {"username": "postgres", "password": self.password},
                },
                "parameters": {"unix_socket_directories": socket_dir},
            },
        }


def _children(pid: int | None) -> list[int]:
    """PIDs whose parent is ``pid`` (a postmaster's backends), read from /proc."""
    if pid is None:
        return []
    found = []
    for entry in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(entry) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields and int(fields[1]) == pid:
            found.append(int(entry.split("/")[2]))
    return found


class PatroniCluster:
    """``with PatroniCluster() as pc:`` one etcd, ``nodes`` Patroni nodes and optional HAProxy.

    ``synchronous_mode`` is Patroni's (one synchronous standby, so an acknowledged commit is
    on two servers). ``haproxy=True`` adds an HAProxy with two TCP listeners, ``primary_port``
    (the node whose ``/primary`` check answers 200) and ``replica_port`` (round robin over
    the nodes whose ``/replica`` check does).
    """

    def __init__(self, nodes: int = 3, synchronous_mode: bool = False, haproxy: bool = False,
                 password: str = "greenpool", ttl: int = 5, loop_wait: int = 1,
                 retry_timeout: int = 2, parameters: dict[str, Any] | None = None,
                 post_bootstrap: str | None = None) -> None:
        reason = missing(haproxy)
        if reason:
            raise PatroniError(reason)
        self.bin = find_pg_bin()
        self.patroni = str(_which("patroni"))
        self.patronictl = str(_which("patronictl"))
        self.password = password
        self.ttl, self.loop_wait, self.retry_timeout = ttl, loop_wait, retry_timeout
        self.synchronous_mode = synchronous_mode
        self.parameters = dict(parameters or {})
        #: Patroni's ``bootstrap.post_bootstrap``: a command it runs (as the servers' OS user)
        #: once the first node has bootstrapped; a failure fails that bootstrap
        self.post_bootstrap = post_bootstrap
        #: how many times the first node's bootstrap failed and was started over
        self.bootstrap_retries = 0
        self._owner = server_owner()  # before the directory: no directory left by its error
        # short: PostgreSQL's Unix socket paths are limited to ~107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="gp-patroni-"))
        self.scope = "greenpool-" + self.root.name.rsplit("-", 1)[-1]
        self._procs: list[subprocess.Popen[bytes]] = []
        self.etcd_port = free_port(HOST)
        self.etcd_peer_port = free_port(HOST)
        self.etcd: subprocess.Popen[bytes] | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.with_haproxy = haproxy
        self.primary_port = free_port(HOST) if haproxy else 0
        self.replica_port = free_port(HOST) if haproxy else 0
        self.nodes = [PatroniNode(self, i) for i in range(nodes)]
        give_to(self._owner, self.root)
        register(self, self.destroy)  # destroyed at exit if forgotten (processes.py)

    def __repr__(self) -> str:
        return f"<PatroniCluster {self.scope} {self.nodes}>"

    def __enter__(self) -> PatroniCluster:
        try:
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    @property
    def failover_time(self) -> float:
        """The longest a failover should take: the leader key's ttl plus one Patroni loop."""
        return float(self.ttl + self.loop_wait)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """etcd, then the first node (it bootstraps), then the others, then HAProxy; returns
        when every node is streaming from the leader (and the synchronous standby is set)."""
        self._start_etcd()
        bootstrap = {
            "dcs": {
                "ttl": self.ttl, "loop_wait": self.loop_wait,
                "retry_timeout": self.retry_timeout,
                "maximum_lag_on_failover": 1048576,
                "synchronous_mode": self.synchronous_mode,
                "postgresql": {
                    "use_pg_rewind": True, "use_slots": True,
                    "remove_data_directory_on_rewind_failure": True,
                    "remove_data_directory_on_diverged_timelines": True,
                    "parameters": {
                        "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                        "max_wal_senders": 10, "max_replication_slots": 10,
                        "max_connections": 100, "shared_buffers": "32MB",
                        "fsync": "off",  # pg_rewind needs full_page_writes
                        "wal_receiver_status_interval": 1, **self.parameters,
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, {"auth": "scram-sha-256"}],
        }
        if self.post_bootstrap is not None:
            bootstrap["post_bootstrap"] = self.post_bootstrap
        for node in self.nodes:
            node.root.mkdir()
            give_to(self._owner, node.root)
            text = _yaml(node.config(self.scope, self.etcd_port, str(self.bin), bootstrap,
                                     str(node.root)))
            node.config_file.touch(mode=0o600)  # it holds the passwords
            node.config_file.write_text(text + "\n")
            give_to(self._owner, node.config_file)
        self._bootstrap()
        for node in self.nodes[1:]:
            node.start()
        self.wait_healthy(START_TIMEOUT)
        if self.with_haproxy:
            self._start_haproxy()

    def _bootstrap(self) -> None:
        """Start the first node on an empty data directory and wait until it leads.

        Patroni gives up on a bootstrap whose server does not come up in time or whose
        post-bootstrap step fails ("Failed to bootstrap cluster": its process exits, seen on
        a loaded 2-core machine); such a node is started over once, on an empty directory,
        before the cluster is declared broken."""
        first = self.nodes[0]
        for attempt in (1, 2):
            first.start()
            self.wait_for(lambda: self.leader() is first or first.patroni_pid is None,
                          START_TIMEOUT, "the first node to bootstrap and lead")
            if first.patroni_pid is not None:
                return
            if attempt == 2:
                raise PatroniError("the first node's Patroni gave up bootstrapping twice"
                                   + self.log_tails(40))
            self.bootstrap_retries += 1
            first.stop()
            shutil.rmtree(first.datadir, ignore_errors=True)

    def destroy(self) -> None:
        """Stop everything by PID (nodes, HAProxy, etcd) and delete the directory. Idempotent;
        a no-op in a child made with ``os.fork()`` (the cluster is its parent's)."""
        if inherited(self):
            return
        try:
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    node.stop()
            for proc in (self.haproxy, self.etcd):
                if proc is not None and proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGCONT)
                    stop_pid(proc.pid, signal.SIGTERM, STOP_WAIT)
            for proc in self._procs:
                with contextlib.suppress(Exception):
                    proc.wait(STOP_WAIT)
            for other in pids_naming(self.root):
                stop_pid(other, signal.SIGKILL, STOP_WAIT)
        except BaseException:  # interrupted while waiting for one: the rest go at once
            kill_naming(self.root)
            raise
        finally:
            unregister(self)
            shutil.rmtree(self.root, ignore_errors=True)

    # -- state --------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """``GET /cluster`` from the first node that answers: name, role, state, lag..."""
        for node in self.nodes:
            if node.patroni_pid is None:
                continue
            status, body = node.rest("/cluster", timeout=1.0)
            if status == 200 and isinstance(body, dict):
                return list(body.get("members", []))
        return []

    def node(self, name: str) -> PatroniNode:
        return next(node for node in self.nodes if node.name == name)

    def leader(self) -> PatroniNode | None:
        """The node that holds the leader key and runs as primary, if any."""
        for member in self.members():
            if member.get("role") == "leader" and member.get("state") == "running":
                return self.node(member["name"])
        return None

    def replicas(self) -> list[PatroniNode]:
        """Nodes streaming from the leader, in node order."""
        streaming = {m["name"] for m in self.members()
                     if m.get("role") in ("replica", "sync_standby")
                     and m.get("state") in ("streaming", "running")}
        return [node for node in self.nodes if node.name in streaming]

    def streaming(self, node: PatroniNode) -> bool:
        """Whether the leader's pg_stat_replication shows ``node`` streaming (Patroni 3.0's
        REST API says ``running`` for a replica whether or not it streams)."""
        leader = self.leader()
        if leader is None or leader is node:
            return False
        try:
            return bool(leader.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = %s"
                " AND state = 'streaming'", (node.name,))[0][0])
        except psycopg2.Error:
            return False

    def healthy(self) -> bool:
        """One leader, every other node streaming, the sync standby set if asked, and each
        replica's Patroni reporting it replicates."""
        members = self.members()
        if len(members) != len(self.nodes):
            return False
        roles = [m.get("role") for m in members]
        if roles.count("leader") != 1:
            return False
        if self.synchronous_mode and "sync_standby" not in roles:
            return False
        leader = self.leader()
        if leader is None:
            return False
        try:
            streaming = leader.execute("SELECT count(*) FROM pg_stat_replication"
                                       " WHERE state = 'streaming'")[0][0]
        except psycopg2.Error:
            return False
        return bool(streaming == len(self.nodes) - 1)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        self.wait_for(self.healthy, timeout, "every node to run, one leader, the others streaming")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise PatroniError(f"timed out after {timeout} s waiting for {what}; members:"
                                   f" {self.members()}{self.log_tails()}")
            time.sleep(0.1)

    def switchover(self, candidate: PatroniNode | None = None) -> None:
        """A planned ``patronictl switchover`` to ``candidate`` (default: any replica)."""
        leader = self.leader()
        if leader is None:
            raise PatroniError("no leader to switch over from")
        args = [self.patronictl, "-c", str(leader.config_file), "switchover", self.scope,
                "--leader", leader.name, "--force"]
        if candidate is not None:
            args += ["--candidate", candidate.name]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PATRONI"))}
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0 or "failed" in done.stdout.lower():
            raise PatroniError(f"patronictl switchover failed ({done.returncode}):"
                               f" {done.stdout[-1000:]} {done.stderr[-1000:]}")

    def maintenance(self, on: bool, timeout: float = 30.0) -> None:
        """Patroni's maintenance mode (``patronictl pause``/``resume``), waiting until every
        running node has taken it: Patroni then leaves PostgreSQL alone, e.g. a replay paused
        by hand (otherwise Patroni resumes it at its next loop)."""
        leader = self.leader()
        if leader is None:
            raise PatroniError("maintenance mode needs a leader to take the change")
        status, body = leader.rest("/config", "PATCH", {"pause": on})
        if status != 200:
            raise PatroniError(f"PATCH /config failed ({status}): {body}")

        def taken() -> bool:
            for node in self.nodes:
                if node.patroni_pid is None:
                    continue
                status, state = node.rest("/patroni", timeout=1.0)
                if status == 0 or not isinstance(state, dict) or bool(state.get("pause")) != on:
                    return False
            return True

        self.wait_for(taken, timeout, f"maintenance mode {'on' if on else 'off'} on every node")

    def pause_etcd(self) -> None:
        """SIGSTOP etcd: every Patroni loses the DCS at once (a leader then demotes itself)."""
        assert self.etcd is not None
        os.kill(self.etcd.pid, signal.SIGSTOP)

    def resume_etcd(self) -> None:
        assert self.etcd is not None
        os.kill(self.etcd.pid, signal.SIGCONT)

    def log_tails(self, lines: int = 15) -> str:
        """The tails of the Patroni logs (they never hold a password), for error messages."""
        out = []
        for node in self.nodes:
            try:
                tail = node.logfile.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"\n--- {node.name} ---\n" + "\n".join(tail))
        return "".join(out)

    # -- plumbing -----------------------------------------------------------------------

    def _spawn(self, args: list[str], log: Any, as_server_user: bool,
               cwd: Path) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PG", "PATRONI", "ETCD", "PYTHON"))}
        env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8", TMPDIR=str(cwd), HOME=str(cwd))
        kw = as_owner(self._owner if as_server_user else None)
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def _start_etcd(self) -> None:
        datadir = self.root / "etcd"
        client, peer = f"http://{HOST}:{self.etcd_port}", f"http://{HOST}:{self.etcd_peer_port}"
        args = [str(_which("etcd")), "--name", "etcd0", "--data-dir", str(datadir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"etcd0={peer}", "--initial-cluster-state", "new",
                "--initial-cluster-token", self.scope, "--log-level", "warn"]
        with open(self.root / "etcd.log", "ab") as log:
            self.etcd = self._spawn(args, log, as_server_user=False, cwd=self.root)

        def etcd_up() -> bool:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as response:
                    return bool(json.loads(response.read()).get("health") == "true")
            except (OSError, ValueError):
                assert self.etcd is not None
                if self.etcd.poll() is not None:
                    raise PatroniError("etcd exited: " + (self.root / "etcd.log").read_text(
                        errors="replace")[-2000:]) from None
                return False

        self.wait_for(etcd_up, 30, "etcd to answer")

    def restart_haproxy(self, checks: str = HAPROXY_CHECKS, replica_check: str = "/replica"
                        ) -> None:
        """Stop HAProxy by PID (its sessions are cut) and start it again on the same ports
        with these health-check timings (``default-server`` words, e.g. Patroni's documented
        ``inter 3s fall 3 rise 2``) and this REST check for the replica listener (``/primary``
        routes it to the leader: a misrouted listener)."""
        if self.haproxy is not None and self.haproxy.poll() is None:
            stop_pid(self.haproxy.pid, signal.SIGTERM, STOP_WAIT)
            with contextlib.suppress(Exception):
                self.haproxy.wait(STOP_WAIT)
        self._start_haproxy(checks, replica_check)

    def _start_haproxy(self, checks: str = HAPROXY_CHECKS, replica_check: str = "/replica"
                       ) -> None:
        lines = [
            "global", "    maxconn 1000",
            "defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 30m",
            "    timeout server 30m", "    timeout check 1s",
        ]
        for name, port, check in (("primary", self.primary_port, "/primary"),
                                  ("replica", self.replica_port, replica_check)):
            lines += [f"listen {name}", f"    bind {HOST}:{port}", "    balance roundrobin",
                      f"    option httpchk GET {check}", "    http-check expect status 200",
                      f"    default-server {checks} on-marked-down shutdown-sessions"]
            lines += [f"    server {n.name} {HOST}:{n.port} check port {n.rest_port}"
                      for n in self.nodes]
        config = self.root / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        with open(self.root / "haproxy.log", "ab") as log:
            self.haproxy = self._spawn([str(_which("haproxy")), "-db", "-f", str(config)], log,
                                       as_server_user=False, cwd=self.root)

        def listening() -> bool:
            assert self.haproxy is not None
            if self.haproxy.poll() is not None:
                raise PatroniError("haproxy exited: " + (self.root / "haproxy.log").read_text(
                    errors="replace")[-2000:])
            try:
                psycopg2.connect(host=HOST, port=self.primary_port, dbname="postgres",
                                 user="postgres", password=self.password,
                                 connect_timeout=2).close()
            except psycopg2.Error:
                return False
            return True

        self.wait_for(listening, 30, "HAProxy to reach the leader")

    def haproxy_endpoint(self, which: str, **overrides: Any) -> dict[str, Any]:
        """HAProxy's ``primary`` or ``replica`` listener as a pool endpoint."""
        port = {"primary": self.primary_port, "replica": self.replica_port}[which]
        return {"host": HOST, "port": port, "name": "postgres", "user": "postgres",
                "pass": self.password, **overrides}


def destroy_all() -> None:
    """Destroy every Patroni cluster this process made and has not destroyed yet. A forked
    child leaves its parent's alone; the exit hook does it too."""
    stop_started(PatroniCluster)
