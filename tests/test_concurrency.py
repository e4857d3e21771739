"""The threaded backend under real process-level faults: no thread to be had, and a signal
handler that raises at any moment. Each scenario runs in a subprocess of its own (see
scripts.py) and reports what it saw as JSON; the test asserts on that.
"""

from __future__ import annotations

import json

import pytest
from modes import MODE
from scripts import run_script

pytestmark = pytest.mark.skipif(
    MODE != "threaded", reason="threads and signal handlers of the threaded mode; runs once")

# Runs as root until the pool's code paths are loaded (this interpreter lives where the
# unprivileged user cannot read), then as ``nobody``, whose RLIMIT_NPROC root would ignore.
THREAD_SHORTAGE = r'''
import json, os, pwd, resource, sys, threading, time

import gevent.monkey  # noqa: F401  (the threaded wait callback finds the real poll() there)
import psycopg2

from greenpool import Pool, PoolError

endpoint = json.loads(sys.argv[1])
SIZE = 3
config = {"type": "threaded", "db": endpoint, "maintenance_interval": 0.05,
          "application_name": "gp-thread-shortage",
          "groups": {"g": {"connection_count": SIZE, "timeout": 1},
                     "kept": {"connection_count": 2, "min_size": 2}}}
with Pool(config) as warm:  # every module the scenario needs, loaded while still root
    with warm.handler("g") as db:
        db.query("SELECT 1")

nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tasks_of(uid):
    """Threads of every process of ``uid``: what RLIMIT_NPROC counts."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as status:
                real = next(line for line in status if line.startswith("Uid:")).split()[1]
            if int(real) == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except (OSError, ValueError, StopIteration):
            continue
    return count


admin = psycopg2.connect(host=endpoint["host"], port=endpoint["port"], dbname=endpoint["name"],
                         user=endpoint["user"], password=endpoint["pass"])
admin.autocommit = True
pool = Pool(config)
g, kept = pool.group("g"), pool.group("kept")
result = {"min_size_warm": wait_until(lambda: kept.stats()["idle"] == 2, 10)}
taken = [kept.acquire(timeout=5) for _ in range(2)]
kept_pids = [pc.raw.get_backend_pid() for pc in taken]
for pc in taken:
    kept.release(pc)
kept_connects = kept.stats()["connects"]

limit = tasks_of(nobody.pw_uid) + 8
resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
release = threading.Event()
parked = []
try:
    while len(parked) < 10000:
        thread = threading.Thread(target=release.wait, daemon=True)
        thread.start()
        parked.append(thread)
except RuntimeError as exc:
    result["shortage"] = str(exc)
result["parked"] = len(parked)
try:
    # the kept group's sessions end: housekeeping must drop them and refill min_size
    with admin.cursor() as cursor:
        cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM unnest(%s) AS pid",
                       (kept_pids,))
    acquires = []
    for _ in range(2):
        try:  # a thread of the pool's that ended since freed room under the limit: take it
            while True:
                thread = threading.Thread(target=release.wait, daemon=True)
                thread.start()
                parked.append(thread)
        except RuntimeError:
            pass
        started = time.monotonic()
        try:
            pc = g.acquire(timeout=1)
        except BaseException as exc:
            acquires.append({"error": type(exc).__name__, "pool_error": isinstance(exc, PoolError),
                             "elapsed": time.monotonic() - started, "message": str(exc)[:300]})
        else:
            acquires.append({"error": None, "elapsed": time.monotonic() - started})
            g.release(pc)
    result["acquires"] = acquires
    time.sleep(0.5)  # the shortage lasts ten maintenance intervals
finally:
    release.set()
    for thread in parked:
        thread.join(5)
result["threads_back"] = wait_until(lambda: threading.active_count() < 10, 5)
result["refilled"] = wait_until(
    lambda: kept.stats()["idle"] == 2 and kept.stats()["connects"] >= kept_connects + 2, 10)
held = []
try:
    for _ in range(SIZE):
        held.append(g.acquire(timeout=5))
    result["lend_all"] = "ok"
except BaseException as exc:
    result["lend_all"] = f"lent {len(held)} of {SIZE}: {type(exc).__name__}: {exc}"
finally:
    for pc in held:
        g.release(pc)
result["g"] = g.stats()
result["kept"] = kept.stats()
pool.close()
admin.close()
print(json.dumps(result, default=str))
'''


@pytest.mark.timeout(120)
def test_thread_shortage_fails_acquires_cleanly_and_leaves_no_lasting_damage(pg_factory):
    """Under a real RLIMIT_NPROC (an unprivileged user, its thread budget used up by parked
    threads) ``Thread.start()`` raises ``RuntimeError: can't start new thread``. Acquires
    that need a connect then fail with a greenpool error (a ``PoolError``), within their
    timeout. Once the parked threads end, the group lends all its connections at once, and
    housekeeping is still alive: it refills the ``min_size`` group whose sessions the
    server ended during the shortage."""
    server = pg_factory()
    result = run_script(THREAD_SHORTAGE, json.dumps(server.endpoint()), timeout=90)
    assert result["min_size_warm"], result
    assert "can't start new thread" in result.get("shortage", ""), result
    assert result["acquires"], result
    for acquire in result["acquires"]:
        assert acquire["error"] and acquire["pool_error"], (acquire, result["stderr"])
        assert acquire["elapsed"] < 1.5, acquire
    assert result["lend_all"] == "ok", (result["lend_all"], result["g"])
    assert result["refilled"], ("housekeeping did not refill min_size", result["kept"],
                                result["stderr"])


# A SIGALRM handler raises KeyboardInterrupt wherever the main thread happens to be: in the
# pool's bookkeeping, in a driver wait, between a lock and its try block.
SIGNAL_INTERRUPTS = r'''
import gc, json, random, signal, sys, threading, time

from greenpool import Pool

endpoint = json.loads(sys.argv[1])
wanted = int(sys.argv[2])
SIZE = 3
pool = Pool({"type": "threaded", "db": endpoint, "maintenance_interval": 0.1,
             "application_name": "gp-signal-interrupts",
             "groups": {"g": {"connection_count": SIZE, "timeout": 5}}})
rng = random.Random(7)
interrupts = loans = 0
errors = {}
running = True


def on_alarm(signum, frame):
    if running:
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0002, 0.004))
        raise KeyboardInterrupt


signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.002)
deadline = time.monotonic() + 40
while running:
    try:  # an interrupt may land anywhere in here, even in an except clause: go on
        while interrupts < wanted and time.monotonic() < deadline:
            try:
                with pool.handler("g") as db:
                    db.query("SELECT 1")
                loans += 1
            except KeyboardInterrupt:
                interrupts += 1
            except Exception as exc:  # e.g. a timeout once slots are lost: counted
                seen = errors.setdefault(type(exc).__name__, [0, str(exc)[:200]])
                seen[0] += 1
        running = False  # from here on the handler raises nothing
        signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        interrupts += 1
signal.signal(signal.SIGALRM, signal.SIG_IGN)
result = {"interrupts": interrupts, "loans": loans, "errors": errors}
time.sleep(0.25)  # two maintenance intervals at rest
group = pool.group("g")
# first a block of the task: it gives up a block whose exit an interrupt cut short (that one
# holds its connection until the task's next block)
try:
    with pool.handler("g", timeout=5) as db:
        result["query"] = db.query("SELECT 1") == [(1,)]
except BaseException as exc:
    result["query"] = f"{type(exc).__name__}: {exc}"
gc.collect()  # a connection lost in a reference cycle is counted back when collected
held = []
try:
    for _ in range(SIZE):
        pc = group.acquire(timeout=5)
        held.append(pc)
        with pc.raw.cursor() as cursor:
            cursor.execute("SELECT 1")
    result["lend_all"] = "ok"
except BaseException as exc:
    result["lend_all"] = f"lent {len(held)} of {SIZE}: {type(exc).__name__}: {exc}"
finally:
    for pc in held:
        group.release(pc)
result["stats"] = group.stats()
pool.close()
print(json.dumps(result, default=str))
'''


@pytest.mark.timeout(120)
def test_keyboard_interrupts_from_a_signal_handler_lose_no_slot(pg):
    """The main thread borrows, queries and returns in a loop while a real SIGALRM handler
    (``setitimer`` at random 0.2-4 ms intervals) raises KeyboardInterrupt at random moments,
    800 times; the loop catches each and goes on. At rest afterwards the group lends all
    its connections at once, and a query on the main thread works (no deadline of an
    interrupted block is left behind)."""
    result = run_script(SIGNAL_INTERRUPTS, json.dumps(pg.endpoint()), "800", timeout=90)
    assert result["interrupts"] >= 800 and result["loans"] > 0, result
    assert result["lend_all"] == "ok", (result["lend_all"], result["stats"], result["errors"])
    assert result["query"] is True, result["query"]


INTERRUPTED_THREAD_START = r'''
import gc, json, sys, threading

from greenpool import Pool

endpoint = json.loads(sys.argv[1])
pool = Pool({"type": "threaded", "db": endpoint,
             "groups": {"g": {"connection_count": 2, "timeout": 5}}})
group = pool.group("g")
fired = []


def tracer(frame, event, arg):
    # the exception a signal handler raises while Thread.start() waits for its new thread:
    # by then the thread runs (a signal cannot be aimed there: a trace function raises it)
    if (event == "call" and frame.f_code is threading.Event.wait.__code__ and not fired
            and frame.f_back is not None
            and frame.f_back.f_code is threading.Thread.start.__code__):
        fired.append(True)
        raise KeyboardInterrupt
    return None


sys.settrace(tracer)
try:
    group.acquire()
    result = {"interrupted": False}
except KeyboardInterrupt:
    result = {"interrupted": True}
sys.settrace(None)
gc.collect()
held = [group.acquire(timeout=5) for _ in range(2)]  # the group's whole room, once
stats = group.stats()
result.update(fired=bool(fired), size=stats["size"], connecting=stats["connecting"],
              idle=stats["idle"], in_use=stats["in_use"],
              opened=stats["connects"] - stats["discards"])
for pc in held:
    group.release(pc)
pool.close()
print(json.dumps(result))
'''


@pytest.mark.timeout(120)
def test_a_connect_thread_whose_start_was_interrupted_still_owns_its_slot(pg):
    """``Thread.start()`` interrupted while it waits for the new thread: the thread runs the
    connect anyway, so its slot is its own and is counted once (giving it back as if no task
    had started counted it twice: a group of 2 then opened more than 2 connections)."""
    result = run_script(INTERRUPTED_THREAD_START, json.dumps(pg.endpoint()), timeout=90)
    assert result["fired"] and result["interrupted"], result
    assert (result["size"], result["in_use"], result["idle"], result["connecting"]) == \
        (2, 2, 0, 0), result
    assert result["opened"] == 2, result  # connections open: the room, not one more
