"""OpenTelemetry metrics (``pip install 'greenpool[otel]'``), by the semantic conventions for
database client connection pools::

    from greenpool.otel import instrument
    instrument(pool)                      # the global MeterProvider (set up by your SDK)
    instrument(jobs_pool, name="jobs", meter_provider=provider)

Every instrument carries ``db.client.connection.pool.name``: the group's name (``name.group``
for a pool instrumented under a name other than ``default``), and ``server.address`` /
``server.port`` when the group has one endpoint (a group spread over several has no single
server). Gauges and the timeouts counter are observed at collection from ``Pool.stats()``.

The three histograms (``create_time``, ``wait_time``, ``use_time``) need every value, and
an SDK histogram's ``record()`` costs microseconds: too much for the borrow path. So a loan
only appends its durations to the group's :class:`~greenpool.stats.Timing` (as for
Prometheus), each fold of which passes them to a per-group buffer here, and the buffers are
recorded into the histograms at the start of each collection (the SDK runs observable
callbacks before it reads the histograms, so they land in that collection). A buffer holds
at most :data:`BUFFER_LIMIT` values; a full one is recorded on the spot, so nothing is lost
and memory stays bounded even with a provider that never collects.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation, get_meter

from .pool import Pool
from .stats import TIME_BUCKETS, Timing, timings_of

__all__ = ["BUFFER_LIMIT", "Instrumentation", "instrument"]

logger = logging.getLogger("greenpool")

#: durations a group buffers between collections before recording them on the spot
BUFFER_LIMIT = 50_000
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

#: (semantic-convention name, GroupTimings attribute, description)
_HISTOGRAMS = (
    ("db.client.connection.create_time", "create", "The time it took to create a new connection"),
    ("db.client.connection.wait_time", "wait",
     "The time it took to obtain an open connection from the pool"),
    ("db.client.connection.use_time", "use",
     "The time between borrowing a connection and returning it to the pool"),
)


class _Buffer:
    """The durations one :class:`Timing` recorded since the last collection.

    Nothing is lost to an interruption (a ``KeyboardInterrupt`` from a signal handler, in
    a collection or on the loan path): a fold's batch enters the buffer in the sink's first
    step, one C call; a flush takes the buffer's values and empties it in one statement
    without a call (no signal handler nor other thread runs in between), and puts back what
    it had not recorded when interrupted. The one duration being recorded at that moment
    may be recorded twice (whether the SDK's ``record()`` finished is not known)."""

    def __init__(self, histogram: Any, attributes: dict[str, Any]) -> None:
        self.values: list[float] = []
        self.histogram = histogram
        self.attributes = attributes

    def sink(self) -> Callable[[list[float]], None]:
        values, flush = self.values, self.flush

        def buffered(batch: list[float]) -> None:
            values.extend(batch)  # first, one C call: see the class's docstring
            if len(values) > BUFFER_LIMIT:
                flush()

        return buffered

    def flush(self) -> None:
        """Record the buffered values. Never raises an ``Exception``: it runs on the loan
        path when the buffer is full, and a metrics failure must not fail a loan (the values
        are then lost, and that is logged)."""
        values = self.values
        taken, values[:] = values[:], []  # one statement, no call in it: two flushes at once
        if not taken:                     # (threads) never take one value twice nor drop one
            return
        record, attributes = self.histogram.record, self.attributes
        recorded = 0
        try:
            for seconds in taken:
                record(seconds, attributes)
                recorded += 1
        except Exception:
            logger.exception("greenpool.otel: recording %d durations failed; they are lost",
                             len(taken) - recorded)
        except BaseException:  # interrupted: the rest wait for the next flush
            values[0:0] = taken[recorded:]
            raise


class Instrumentation:
    """One pool's instruments; :meth:`stop` detaches them (the pool is held weakly, and a
    closed one reports nothing)."""

    def __init__(self, pool: Pool, name: str, meter: Meter,
                 meter_provider: MeterProvider | None = None) -> None:
        self.meter_provider = meter_provider  # None: the global one
        self._pool = weakref.ref(pool)
        self._lock = threading.Lock()
        self._stopped = False
        self._name = name
        self._attributes = {group: _group_attributes(pool, name, group)
                            for group in pool.config.groups}
        self._buffers: list[tuple[Timing, Callable[[list[float]], None], _Buffer]] = []
        for metric, kind, doc in _HISTOGRAMS:
            histogram = meter.create_histogram(
                metric, unit="s", description=doc,
                explicit_bucket_boundaries_advisory=list(TIME_BUCKETS))
            for group, attributes in self._attributes.items():
                timing: Timing = getattr(timings_of(pool.group(group)), kind)
                buffer = _Buffer(histogram, attributes)
                sink = buffer.sink()
                timing.fold()  # values recorded before this instrumentation are not its own
                timing.sinks = (*timing.sinks, sink)
                self._buffers.append((timing, sink, buffer))
        _observers_of(meter).members.append(self)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Record what is buffered, stop buffering, and report nothing more."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        for timing, sink, buffer in self._buffers:
            timing.fold()  # what the loans recorded so far goes to the buffer first
            timing.sinks = tuple(s for s in timing.sinks if s is not sink)
            buffer.flush()

    def after_fork_in_child(self) -> None:
        """Durations the parent buffered are the parent's to record (the loans' own, not
        folded yet, are dropped by :meth:`Timing.after_fork`)."""
        self._lock = threading.Lock()
        for _, _, buffer in self._buffers:
            buffer.values.clear()

    def flush(self) -> None:
        pool = self._pool()
        if pool is not None and not pool.closed:
            self._current_attributes(pool)
        for timing, _, buffer in self._buffers:
            timing.fold()
            buffer.flush()

    def groups(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(attributes, stats) of each group, none once stopped or the pool is closed."""
        pool = self._pool()
        if pool is None or pool.closed or self._stopped:
            return
        attributes = self._current_attributes(pool)
        for group, values in pool.stats()["groups"].items():
            yield attributes[group], values

    def _current_attributes(self, pool: Pool) -> dict[str, dict[str, Any]]:
        """Each group's attributes as its endpoints are now (``reconfigure()`` may move a
        group to another server), read at each collection: a duration is recorded under
        those of the collection that records it."""
        for group, old in list(self._attributes.items()):
            new = _group_attributes(pool, self._name, group)
            if new == old:
                continue
            for _, _, buffer in self._buffers:
                if buffer.attributes is old:
                    buffer.attributes = new
            self._attributes[group] = new
        return self._attributes


class _Observers:
    """The observable instruments of one meter, reporting every pool instrumented on it:
    the SDK keeps the first instrument of a name and ignores a second one's callbacks, so
    each pool cannot have its own."""

    def __init__(self, meter: Meter) -> None:
        self.members: list[Instrumentation] = []
        meter.create_observable_up_down_counter(
            "db.client.connection.count", [self._count], unit="{connection}",
            description="The number of connections that are currently in state described "
                        "by the state attribute")
        for metric, key, unit, doc in (
            ("db.client.connection.max", "max_size", "{connection}",
             "The maximum number of open connections allowed"),
            ("db.client.connection.idle.min", "min_size", "{connection}",
             "The minimum number of idle open connections allowed"),
            ("db.client.connection.pending_requests", "waiting", "{request}",
             "The number of current pending requests for an open connection"),
        ):
            meter.create_observable_up_down_counter(metric, [self._observer(key)], unit=unit,
                                                    description=doc)
        meter.create_observable_counter(
            "db.client.connection.timeouts", [self._observer("timeouts")], unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
                        "obtain a connection from the pool")

    def _live(self) -> list[Instrumentation]:
        self.members[:] = [member for member in self.members if not member.stopped]
        return list(self.members)

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        members = self._live()
        for member in members:  # first: the collection reads histograms next
            member.flush()
        found = []
        for member in members:
            for attributes, values in member.groups():
                found.append(Observation(values["idle"], {**attributes, STATE: "idle"}))
                found.append(Observation(values["in_use"], {**attributes, STATE: "used"}))
        return found

    def _observer(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(values[key], attributes)
                    for member in self._live() for attributes, values in member.groups()]

        return observe


def _observers_of(meter: Meter) -> _Observers:
    observers = _observers.get(meter)
    if observers is None:
        _observers[meter] = observers = _Observers(meter)
    return observers


def _group_attributes(pool: Pool, name: str, group: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {POOL_NAME: group if name == "default" else f"{name}.{group}"}
    endpoints = pool.group(group).endpoints
    if len(endpoints) == 1:
        config = endpoints[0].config
        attributes["server.address"] = config.host
        if not config.host.startswith("/"):
            attributes["server.port"] = config.port
    return attributes


def instrument(pool: Pool, name: str = "default",
               meter_provider: MeterProvider | None = None) -> Instrumentation:
    """Report ``pool`` through OpenTelemetry (the global MeterProvider if None). Its
    duration histograms are recorded from now on."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"instrument(): name must be a non-empty string, not {name!r}")
    with _instrumenting:
        live = _instrumented.setdefault(pool, {})
        held = live.get(name)
        if held is not None and not held.stopped:
            raise ValueError(f"instrument(): this pool is already instrumented as {name!r} "
                             f"(each loan would be recorded twice); stop() that one first")
        for other, names in _instrumented.items():
            clash = names.get(name)
            if (other is not pool and not other.closed and clash is not None
                    and not clash.stopped and clash.meter_provider is meter_provider):
                raise ValueError(f"instrument(): another pool is instrumented as {name!r} on "
                                 f"this meter provider (their series would merge and one "
                                 f"hide the other); give each pool its own name")
        meter = get_meter("greenpool", meter_provider=meter_provider)
        live[name] = instrumentation = Instrumentation(pool, name, meter, meter_provider)
    return instrumentation


_instrumented: weakref.WeakKeyDictionary[Pool, dict[str, Instrumentation]] = (
    weakref.WeakKeyDictionary())
_instrumenting = threading.Lock()
_observers: weakref.WeakKeyDictionary[Meter, _Observers] = weakref.WeakKeyDictionary()


def _after_fork_in_child() -> None:
    global _instrumenting
    _instrumenting = threading.Lock()  # a parent's thread may have held it
    for instrumentations in list(_instrumented.values()):
        for instrumentation in instrumentations.values():
            instrumentation.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
