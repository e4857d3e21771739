"""One Prometheus endpoint for a multi-worker server (gunicorn): workers write snapshots to a
shared directory, one process merges them.

prometheus_client's own multiprocess mode does not run custom collectors (greenpool's is
one), and a port per worker drifts with every worker restart. Here each worker writes its
registry's exposition to ``DIR/<pid>-<token>.prom`` every ``interval`` seconds and at exit
(:func:`start_worker`); the master (or any one process) serves ``/metrics`` from
:class:`DirectoryCollector` (:func:`serve`), which merges at scrape time:

* counters and histograms are **summed** over the workers, without a worker label. A
  worker that is gone (its pid no longer exists) still counts: its last snapshot's counters
  are folded into ``retired.json`` and its file removed, so a total never goes backwards
  when gunicorn replaces a worker (``rate()`` sees no false reset);
* gauges (and anything untyped) are per live worker, with a ``worker`` label (its pid):
  sum, max or min them in PromQL as the gauge means (``sum`` for connections in use,
  ``max`` for a lag, ``min`` for ``endpoint_up``). A gone worker's gauges go with it.

A snapshot is at most ``interval`` seconds old at scrape time. One process serves a
directory (a lock file makes a second one wait, not corrupt it); :func:`reset` empties it
when the server starts (gunicorn's ``on_starting``). See the recipe in docs/observability.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

__all__ = ["DirectoryCollector", "WorkerExport", "reset", "serve", "start_worker"]

SUFFIX = ".prom"
RETIRED = "retired.json"
_SUMMED = ("counter", "histogram")

Key = tuple[str, str, tuple[tuple[str, str], ...]]  # family, sample name, sorted labels


class WorkerExport:
    """A worker's writer: a snapshot every ``interval`` seconds (a background thread: a
    greenlet in a gevent-patched worker), and a last one at :meth:`stop`."""

    def __init__(self, directory: str | os.PathLike[str], registry: CollectorRegistry,
                 interval: float) -> None:
        self.path = Path(directory) / f"{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        self._registry = registry
        self._interval = interval
        self._stopped = threading.Event()
        self._writing = threading.Lock()  # the thread's round and stop()'s last one share .tmp
        self._final = False  # the last snapshot is written: no other follows
        self._thread = threading.Thread(target=self._run, name="greenpool-metrics-writer",
                                        daemon=True)

    def start(self) -> WorkerExport:
        self.write()
        self._thread.start()
        return self

    def write(self) -> None:
        """Write the registry's exposition, atomically (a reader never sees half a file, and
        an older snapshot never replaces a newer one); nothing once :meth:`stop` wrote the
        last one."""
        self._write(last=False)

    def stop(self) -> None:
        """Stop writing, after a last snapshot (gunicorn's ``worker_exit``). The last one is
        final: a round of the thread that was already under way when ``stop`` was called
        writes nothing after it (it would run after the pool's close, whose counters have
        left the registry, and the merged totals would go backwards)."""
        self._stopped.set()
        self._write(last=True)

    def _write(self, last: bool) -> None:
        with self._writing:
            if self._final:
                return
            self._final = last
            text = generate_latest(self._registry)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_bytes(text)
            os.replace(temporary, self.path)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self.write()
            except OSError:  # a full disk, a removed directory: the next round tries again
                continue


def start_worker(directory: str | os.PathLike[str], registry: CollectorRegistry | None = None,
                 interval: float = 1.0) -> WorkerExport:
    """In each worker (gunicorn's ``post_worker_init``): write ``registry`` (the default one
    if None) into ``directory`` every ``interval`` seconds; call ``stop()`` at exit."""
    if not (isinstance(interval, (int, float)) and 0 < interval <= 3600):
        raise ValueError(f"start_worker(): interval must be seconds above 0, not {interval!r}")
    os.makedirs(directory, exist_ok=True)
    return WorkerExport(directory, registry if registry is not None else REGISTRY,
                        interval).start()


def reset(directory: str | os.PathLike[str]) -> None:
    """Empty ``directory`` of snapshots (gunicorn's ``on_starting``): counters start again
    with the server, as a single process's would."""
    os.makedirs(directory, exist_ok=True)
    for path in Path(directory).iterdir():
        if path.suffix in (SUFFIX, ".tmp") or path.name == RETIRED:
            path.unlink(missing_ok=True)


class DirectoryCollector(Collector):
    """The merged view of every worker's snapshot in ``directory`` (see the module)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock, self._locked():
            retired = self._read_retired()
            live: list[tuple[int, dict[str, Any]]] = []
            gone = []
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                pid = _pid_of(path)
                alive = pid is not None and _alive(pid)  # asked first: a dead one's file is final
                if not alive and path.name in retired["folded"]:
                    gone.append(path)  # folded by a collect that died before removing it
                    continue
                try:
                    snapshot = _parse(path.read_text())
                except (OSError, ValueError):
                    continue  # removed meanwhile, or not ours
                if alive and pid is not None:
                    live.append((pid, snapshot))
                else:
                    _add(retired, snapshot, summed_only=True)
                    retired["folded"].add(path.name)
                    gone.append(path)
            for path in self.directory.glob("*.tmp"):  # a writer killed mid-write
                pid = _pid_of(path)
                if pid is not None and not _alive(pid):
                    path.unlink(missing_ok=True)
            if gone:  # folded and named in retired.json first, removed after: each file once
                self._write_retired(retired)
                for path in gone:
                    path.unlink(missing_ok=True)
        merged: dict[str, Any] = {"families": dict(retired["families"]),
                                  "samples": dict(retired["samples"])}
        for pid, snapshot in live:
            _add(merged, snapshot, summed_only=False, worker=str(pid))
        yield from _metrics(merged)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read_retired(self) -> dict[str, Any]:
        try:
            raw = json.loads((self.directory / RETIRED).read_text())
        except (OSError, ValueError):
            return {"families": {}, "samples": {}, "folded": set()}
        return {"families": {name: tuple(info) for name, info in raw["families"].items()},
                "samples": {_key_from_json(key): value for key, value in raw["samples"]},
                "folded": {name for name in raw.get("folded", ())  # those not yet removed
                           if (self.directory / name).exists()}}

    def _write_retired(self, retired: dict[str, Any]) -> None:
        data = {"families": retired["families"],
                "samples": [[[family, name, [list(pair) for pair in labels]], value]
                            for (family, name, labels), value in retired["samples"].items()],
                "folded": sorted(retired["folded"])}
        temporary = self.directory / (RETIRED + ".tmp")
        temporary.write_text(json.dumps(data))
        os.replace(temporary, self.directory / RETIRED)


def serve(directory: str | os.PathLike[str], port: int, addr: str = "127.0.0.1") -> Any:
    """Serve the merged ``/metrics`` of ``directory`` on ``addr:port`` from a thread of this
    process (gunicorn's ``when_ready``, in the master); returns the HTTP server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DirectoryCollector(directory))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server


def _parse(text: str) -> dict[str, Any]:
    families: dict[str, tuple[str, str]] = {}
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = (family.type, family.documentation)
        for sample in family.samples:
            samples[(family.name, sample.name, tuple(sorted(sample.labels.items())))] = \
                sample.value
    return {"families": families, "samples": samples}


def _add(into: dict[str, Any], snapshot: dict[str, Any], summed_only: bool,
         worker: str | None = None) -> None:
    """Add ``snapshot`` to ``into``: summed series added up; the others, when wanted,
    kept apart under a ``worker`` label."""
    families, samples = into["families"], into["samples"]
    for (family, name, labels), value in snapshot["samples"].items():
        kind, doc = snapshot["families"][family]
        if kind in _SUMMED:
            key = (family, name, labels)
            samples[key] = samples.get(key, 0.0) + value
        elif summed_only or worker is None:
            continue
        else:
            samples[(family, name, tuple(sorted((*labels, ("worker", worker)))))] = value
        families.setdefault(family, (kind, doc))


def _metrics(merged: dict[str, Any]) -> Iterator[Metric]:
    by_family: dict[str, Metric] = {}
    for family, (kind, doc) in merged["families"].items():
        by_family[family] = Metric(family, doc, kind)
    for (family, name, labels), value in sorted(merged["samples"].items(), key=_order):
        by_family[family].add_sample(name, dict(labels), value)
    yield from (metric for metric in by_family.values() if metric.samples)


def _order(item: tuple[Key, float]) -> tuple[Any, ...]:
    """Series in a stable order, a histogram's buckets by their bound (not as text)."""
    family, name, labels = item[0]
    le = dict(labels).get("le")
    return (family, name, tuple(pair for pair in labels if pair[0] != "le"),
            float(le) if le is not None else 0.0)


def _key_from_json(key: list[Any]) -> Key:
    family, name, labels = key
    return (family, name, tuple((str(k), str(v)) for k, v in labels))


def _pid_of(path: Path) -> int | None:
    head = path.name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
