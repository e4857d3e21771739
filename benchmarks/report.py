"""Turn ``raw.json`` into ``results.md`` (tables, targets met or not) and ``results.png``.

``python -m benchmarks.report`` re-renders both from an existing ``results/raw.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

from .adapters import ADAPTERS

GP = "greenpool"


# --- failover samples -> metrics ------------------------------------------------------------


def failover_metrics(raw: dict[str, Any], restarted_port: int, stopped: float,
                     restarted: float, window_end: float, seconds: float,
                     window_start: float | None = None) -> dict[str, Any]:
    """Errors, the longest time without a successful read, and the share of the reads in
    [``window_start`` (default: ``restarted``), ``window_end``] that the restarted endpoint
    served."""
    start = restarted if window_start is None else window_start
    ok = sorted(raw["ok"])
    times = [0.0] + [t for t, _ in ok] + [seconds]
    gap, gap_at = 0.0, 0.0
    for prev, cur in itertools.pairwise(times):
        if cur - prev > gap:
            gap, gap_at = cur - prev, prev
    in_window = [port for t, port in ok if start <= t <= window_end]
    back = sum(1 for port in in_window if port == restarted_port)
    kinds: dict[str, int] = {}
    for _, kind in raw["err"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    before = [port for t, port in ok if t < stopped]
    return {
        "reads": len(ok), "errors": len(raw["err"]), "error_kinds": kinds,
        "longest_gap_s": gap, "gap_at_s": gap_at, "hung": raw.get("hung", 0),
        "share_back": back / len(in_window) if in_window else 0.0,
        "reads_in_window": len(in_window),
        "share_before": (sum(1 for p in before if p == restarted_port) / len(before)
                         if before else 0.0),
    }


# --- aggregation ----------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))
              and not (isinstance(r[key], float) and math.isnan(r[key]))]
    return statistics.median(values) if values else None


def status(runs: list[dict[str, Any]]) -> str:
    """'' when at least one repetition produced numbers, else why not."""
    if not runs or all(r.get("n/a") for r in runs):
        why = runs[0].get("why") if runs else None
        return f"n/a: {why}" if why else "n/a"
    if all("skipped" in r for r in runs):
        return "skipped: " + runs[0]["skipped"]
    if all("failed" in r for r in runs):
        return "failed: " + runs[0]["failed"]
    return ""


def fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


# --- the tables -----------------------------------------------------------------------------


def _cells(runs: dict[str, dict[str, list[dict[str, Any]]]], peer: str,
           workload: str, columns: list[tuple[str, str, str]]) -> list[str]:
    rs = runs.get(workload, {}).get(peer, [])
    why = status(rs)
    if why:
        return [why if i == 0 else "" for i in range(len(columns))]
    return [fmt(median_of(rs, key), spec, suffix) for key, spec, suffix in columns]


PERF = {
    "overhead": [("ops_s", ",.0f", ""), ("cpu_us", ".1f", ""), ("checkout_us", ".1f", "")],
    "contention": [("ops_s", ",.0f", ""), ("p50_ms", ".2f", ""), ("p99_ms", ".1f", ""),
                   ("errors", ".0f", ""), ("exhaustion_retries", ",.0f", ""),
                   ("fairness", ".3f", ""), ("starved", ".0f", "")],
}
IO = {
    "iobound": [("ops_s", ",.0f", ""), ("pct_of_limit", ".1f", "%"), ("p50_ms", ".0f", ""),
                ("p99_ms", ".0f", ""), ("p99_vs_ideal", ".2f", "×"), ("errors", ".0f", ""),
                ("exhaustion_retries", ",.0f", ""), ("fairness", ".3f", ""),
                ("starved", ".0f", "")],
}
ROBUST = {
    "failover": [("errors", ".0f", ""), ("longest_gap_s", ".2f", ""),
                 ("share_back", ".0%", "")],
    "chaos": [("served_after", ".0f", "/50"), ("server_conns", ".0f", ""),
              ("idle_in_tx", ".0f", ""), ("errors", ".0f", "")],
}
SATURATED = {
    "saturated-failover": [("errors", ".0f", ""), ("longest_gap_s", ".2f", ""),
                           ("share_before", ".0%", ""), ("share_back", ".0%", ""),
                           ("reads", ",.0f", "")],
}
STORM = {
    "deadline-storm": [("served", ",.0f", ""), ("timeouts", ",.0f", ""), ("errors", ".0f", ""),
                       ("backends_started", ".0f", ""), ("sessions_authorized", ".0f", ""),
                       ("connect_ms", ".1f", ""), ("served_share_eligible", ".0%", "")],
}
DIRTY = {
    "overhead": [("clean_loan_us", ".0f", ""), ("dirty_loan_us", ".0f", ""),
                 ("round_trip_us", ".0f", ""), ("reset_round_trips", ".2f", "")],
}
WEB = {
    "gunicorn": [("rps", ",.0f", ""), ("p50_ms", ".1f", ""), ("p99_ms", ".1f", ""),
                 ("non2xx", ".0f", ""), ("socket_errors", ".0f", "")],
}
PERF_HEAD = ("| pool | overhead ops/s | client CPU µs/op | checkout+checkin µs "
             "| contention ops/s | p50 ms | p99 ms | errors | getconn retries | fairness "
             "| starved |")
IO_HEAD = ("| pool | io-bound ops/s | % of 1000/s | p50 ms | p99 ms | p99 ÷ ideal (500 ms) "
           "| errors | getconn retries | fairness | starved |")
ROBUST_HEAD = ("| pool | failover app errors | longest gap s | reads on restarted endpoint "
               "| chaos: served after | server conns (≤10) | idle in tx | chaos errors |")
SATURATED_HEAD = ("| pool | app errors | longest gap s | reads on A before the stop "
                  "| reads on A, restart+1 s to +5 s | reads |")
STORM_HEAD = ("| pool | served | acquire timeouts | other errors | backends started (≤ 2) "
              "| sessions authorized | median connect ms | served, timeout ≥ 2× connect |")
DIRTY_HEAD = ("| pool | clean loan µs | dirty loan µs | one round trip µs "
              "| (dirty − clean) ÷ round trip |")
WEB_HEAD = "| pool | requests/s | p50 ms | p99 ms | non-2xx | socket errors |"


def table(raw: dict[str, Any], head: str, groups: dict[str, list[tuple[str, str, str]]],
          only_taking_part: bool = False) -> str:
    """One row per pool; ``only_taking_part`` leaves out pools that are n/a throughout."""
    ncols = head.count("|") - 1
    lines = [head, "|" + "---|" * ncols]
    for peer in raw["runs"][next(iter(raw["runs"]))]:
        if only_taking_part and all(
                status(raw["runs"].get(w, {}).get(peer, [])) == "n/a" for w in groups):
            continue
        cells = [ADAPTERS[peer].name]
        for workload, columns in groups.items():
            cells += _cells(raw["runs"], peer, workload, columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- targets --------------------------------------------------------------------------------


def targets(raw: dict[str, Any]) -> list[str]:
    runs = raw["runs"]

    def med(workload: str, peer: str, key: str) -> float | None:
        return median_of(runs.get(workload, {}).get(peer, []), key)

    out: list[str] = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        verdict = "not measured" if ok is None else ("met" if ok else "**NOT met**")
        out.append(f"- {label}: {verdict} ({detail})")

    def ratio(workload: str, key: str, peer: str, need: float, label: str) -> None:
        gp, other = med(workload, GP, key), med(workload, peer, key)
        if gp is None or not other:
            check(label, None, f"{peer}: no number")
            return
        check(label, gp / other >= need,
              f"{gp:,.0f} vs {other:,.0f} ops/s = {gp / other:.2f}×, need ≥ {need}×; "
              f"per repetition {paired(workload, key, peer)}")

    def paired(workload: str, key: str, peer: str) -> str:
        """greenpool ÷ peer within each repetition: how much of the verdict is noise."""
        pairs = zip(runs[workload][GP], runs[workload][peer], strict=True)
        shown = [f"{a[key] / b[key]:.2f}" for a, b in pairs if a.get(key) and b.get(key)]
        return ", ".join(shown) or "n/a"

    if "overhead" in runs:
        ratio("overhead", "ops_s", "simple", 0.95, "overhead ≥ 0.95× SimpleConnectionPool")
        ratio("overhead", "ops_s", "raw", 0.9, "overhead ≥ 0.9× raw psycopg2")
        cpu = {p: med("overhead", p, "cpu_us") for p in (GP, "simple", "raw")}
        if all(cpu.values()):
            out.append(f"  - client CPU per operation (less sensitive to other load): greenpool "
                       f"{cpu[GP]:.1f} µs, SimpleConnectionPool {cpu['simple']:.1f} µs, raw "
                       f"{cpu['raw']:.1f} µs")
    if "overhead" in runs:
        reset_target(runs, check)
    if "contention" in runs:
        fair = med("contention", GP, "fairness")
        check("contention fairness ≥ 0.95", None if fair is None else fair >= 0.95,
              f"Jain index {fmt(fair, '.3f')}")
        ratio("contention", "ops_s", "psycopg_pool", 1.5, "contention ≥ 1.5× psycopg_pool")
        peers = best_of(runs, "contention", "ops_s", med)
        if peers:
            fastest = max(peers, key=lambda p: peers[p])
            ratio("contention", "ops_s", fastest, 0.9,
                  f"contention ≥ 0.9× fastest peer ({ADAPTERS[fastest].name})")
    if "iobound" in runs:
        pct, errs = med("iobound", GP, "pct_of_limit"), med("iobound", GP, "errors")
        p99 = med("iobound", GP, "p99_vs_ideal")
        ceiling = med("iobound", "raw", "pct_of_limit")
        sleep_ms = raw["machine"].get("pg_sleep_ms")
        alone = "" if sleep_ms is None else (
            f"; one pg_sleep(0.02) alone on one idle connection takes {sleep_ms:.2f} ms here, so "
            f"no pool can exceed {2000 / sleep_ms:.1f} %")
        io_peers = best_of(runs, "iobound", "pct_of_limit", med)
        best = max(io_peers, key=lambda p: io_peers[p]) if io_peers else None
        best_pct = io_peers[best] if best else None
        check("io-bound ≥ the best peer's share of the ideal (1000 ops/s), same run",
              None if pct is None or best_pct is None else pct >= best_pct,
              f"{fmt(pct, '.1f')} % vs {fmt(best_pct, '.1f')} % for "
              f"{ADAPTERS[best].name if best else 'no peer'}; the ceiling here, 20 greenlets each "
              f"on a connection of its own with nobody waiting, reached {fmt(ceiling, '.1f')} %"
              f"{alone}")
        check("io-bound zero errors", None if errs is None else errs == 0, f"{fmt(errs)} errors")
        check("io-bound p99 ≤ 1.1× the fair queueing time", None if p99 is None else p99 <= 1.1,
              f"p99 = {fmt(p99, '.2f')}× ({fmt(med('iobound', GP, 'p99_ms'), '.0f')} ms vs "
              f"{fmt(med('iobound', GP, 'ideal_ms'), '.0f')} ms: 500 greenlets ÷ 20 connections "
              f"× 20 ms)")
    if "failover" in runs:
        fo = runs.get("failover", {}).get(GP, [])
        worst = lambda key: max((r[key] for r in fo if key in r), default=None)  # noqa: E731
        errs, gap, back = worst("errors"), med("failover", GP, "longest_gap_s"), None
        backs = [r["share_back"] for r in fo if "share_back" in r]
        back = min(backs) if backs else None
        check("failover zero app errors (every repetition)", None if errs is None else errs == 0,
              f"{fmt(errs)} errors in the worst repetition")
        check("failover longest gap < 0.2 s", None if gap is None else gap < 0.2,
              f"median {fmt(gap, '.3f')} s, worst {fmt(worst('longest_gap_s'), '.3f')} s")
        check("failover ≥ 1/3 of reads back on the restarted endpoint within 5 s",
              None if back is None else back >= 1 / 3,
              f"worst repetition {fmt(back, '.0%')}")
    saturated_targets(runs, check)
    storm_targets(runs, check)
    ch = runs.get("chaos", {}).get(GP, [])
    if "chaos" not in runs:
        pass
    elif ch and not status(ch):
        served = min(r.get("served_after", 0) for r in ch)
        conns = max(r.get("server_conns", 99) for r in ch)
        idle = max(r.get("idle_in_tx", 99) for r in ch)
        check("chaos: still serves afterwards", served == 50, f"{served}/50 in the worst rep")
        check("chaos: ≤ size (10) server connections", conns <= 10, f"{conns} at most")
        check("chaos: none idle in transaction", idle == 0, f"{idle} at most")
    else:
        check("chaos", None, status(ch) or "no runs")
    return out


def best_of(runs: dict[str, Any], workload: str, key: str,
            med: Any) -> dict[str, float]:
    """Median ``key`` of every pool but greenpool (and the pool-less floor) that has one."""
    values = {p: med(workload, p, key) for p in runs.get(workload, {})
              if p != GP and ADAPTERS[p].pooled}
    return {p: v for p, v in values.items() if v}


def saturated_targets(runs: dict[str, Any], check: Any) -> None:
    rs = [r for r in runs.get("saturated-failover", {}).get(GP, []) if "share_back" in r]
    if not rs:
        if "saturated-failover" in runs:
            check("saturated failover", None, status(runs["saturated-failover"][GP]) or "none")
        return
    errs = max(r["errors"] for r in rs)
    back = min(r["share_back"] for r in rs)
    gaps = [r["longest_gap_s"] for r in rs]
    check("saturated failover: zero app errors (every repetition)", errs == 0,
          f"{errs} errors in the worst repetition")
    check("saturated failover: ≥ 1/3 of reads on the restarted endpoint, restart+1 s to +5 s",
          back >= 1 / 3, f"worst repetition {back:.0%}; longest gap median "
          f"{statistics.median(gaps):.3f} s, worst {max(gaps):.3f} s (no target)")


def reset_target(runs: dict[str, Any], check: Any) -> None:
    """Issue 14: a dirty loan's reset costs at most one round trip. The cost is measured as
    (dirty loan - clean loan) in round trips of ``SELECT 1``; half a round trip of slack
    tells one round trip (``DISCARD ALL``, which does a little more server work than
    ``SELECT 1``) from two, whatever the timings' noise."""
    rs = [r for r in runs["overhead"].get(GP, []) if "reset_round_trips" in r]
    if not rs:
        return
    cost = statistics.median(r["reset_round_trips"] for r in rs)
    check("a dirty loan's reset costs at most one round trip (measured < 1.5)", cost < 1.5,
          f"{cost:.2f} round trips: clean loan "
          f"{statistics.median(r['clean_loan_us'] for r in rs):.0f} µs, dirty loan "
          f"{statistics.median(r['dirty_loan_us'] for r in rs):.0f} µs, one SELECT 1 round trip "
          f"{statistics.median(r['round_trip_us'] for r in rs):.0f} µs; per repetition "
          + ", ".join(f"{r['reset_round_trips']:.2f}" for r in rs))


def storm_targets(runs: dict[str, Any], check: Any) -> None:
    rs = [r for r in runs.get("deadline-storm", {}).get(GP, []) if "served" in r]
    if not rs:
        if "deadline-storm" in runs:
            check("deadline storm", None, status(runs["deadline-storm"][GP]) or "none")
        return
    started = max(r["backends_started"] for r in rs)
    shares = [r["served_share_eligible"] for r in rs]
    check("deadline storm: backends started ≤ connection_count (2)", started <= 2,
          f"{started} in the worst repetition; served "
          f"{min(r['served'] for r in rs):,} operations at least, timeouts "
          f"{max(r['timeouts'] for r in rs):,} at most")
    share = None if None in shares else min(shares)
    check("deadline storm: ≥ 90 % served of operations with timeout ≥ 2× the median connect",
          None if share is None else share >= 0.9,
          f"worst repetition {fmt(share, '.1%')} of "
          f"{min(r['eligible'] for r in rs):,} such operations; median connect "
          f"{statistics.median(r['connect_ms'] for r in rs):.1f} ms; timeouts drawn from "
          f"{storm_range(rs)} ms; served share by timeout "
          f"(first repetition): {buckets(rs[0])}")


def storm_range(rs: list[dict[str, Any]]) -> str:
    """The storm's timeout range(s) in ms, as text (the range follows the connect time)."""
    ranges = sorted({(round(r["timeout_range_ms"][0]), round(r["timeout_range_ms"][1]))
                     for r in rs if r.get("timeout_range_ms")})
    return ", ".join(f"{lo}–{hi}" for lo, hi in ranges) or "1–20"


def buckets(run: dict[str, Any]) -> str:
    shares = run.get("served_share_by_timeout", {})
    return ", ".join(f"{k} {fmt(v, '.0%')}" for k, v in shares.items()) or "–"


# --- before/after: greenpool ÷ SimpleConnectionPool ------------------------------------------

RATIOS = (("overhead", "ops_s", "overhead ops/s"),
          ("overhead", "cpu_us", "overhead client CPU µs/op (lower is better)"),
          ("overhead", "checkout_us", "checkout+checkin µs (lower is better)"),
          ("contention", "ops_s", "contention ops/s"))


def simple_ratios(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """greenpool ÷ SimpleConnectionPool for each of RATIOS that the run measured: the ratio
    of the medians and the ratio within each repetition."""
    runs, out = raw["runs"], {}
    for workload, key, label in RATIOS:
        gp, simple = runs.get(workload, {}).get(GP), runs.get(workload, {}).get("simple")
        a, b = median_of(gp or [], key), median_of(simple or [], key)
        if not a or not b:
            continue
        reps = [x[key] / y[key] for x, y in zip(gp or [], simple or [], strict=False)
                if x.get(key) and y.get(key)]
        out[label] = {"median": a / b, "reps": reps}
    return out


def baseline_of(old: dict[str, Any], source: str) -> dict[str, Any]:
    """What the report keeps of an earlier run to compare with: its ratios and when."""
    return {"source": source, "ratios": simple_ratios(old), "note": old["config"].get("note"),
            "total_s": old.get("total_s"), "reps": old["config"].get("reps")}


def ratio_section(raw: dict[str, Any]) -> list[str]:
    now, before = simple_ratios(raw), raw.get("baseline", {}).get("ratios", {})
    if not now and not before:
        return []
    source = raw.get("baseline", {}).get("source")
    where = (f"the baseline is `{source}`, an earlier run on this machine" if source else
             "no baseline (the output directory held no earlier raw.json)")
    lines = ["## greenpool ÷ SimpleConnectionPool, this run and the baseline", "",
             f"Ratios of the medians (per repetition in brackets); {where}.", "",
             "| ratio | this run | baseline |", "|---|---|---|"]

    def cell(r: dict[str, Any] | None) -> str:
        if not r:
            return "–"
        return f"{r['median']:.2f} ({', '.join(f'{x:.2f}' for x in r['reps'])})"

    for _, _, label in RATIOS:
        if label in now or label in before:
            lines.append(f"| {label} | {cell(now.get(label))} | {cell(before.get(label))} |")
    return [*lines, ""]


# --- the files ------------------------------------------------------------------------------


def header(raw: dict[str, Any]) -> str:
    m, c = raw["machine"], raw["config"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [
        "# greenpool benchmarks",
        "",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gb']} GB RAM, Linux "
        f"{m['kernel']}, Python {m['python']}, PostgreSQL {m['postgres']} (throwaway, "
        f"loopback, fsync off)",
        f"- packages: {pk}",
        f"- {c['reps']} repetitions, medians shown; each pool × workload × repetition in a "
        f"fresh process under gevent.monkey.patch_all(); total {raw.get('total_s', '?')} s; "
        f"load average at start {' '.join(m['loadavg_start'])}, at end "
        f"{' '.join(m.get('loadavg_end', ['?']))}",
    ]
    if c.get("quick"):
        lines.append("- **quick run** (short durations): indicative only")
    if c.get("note"):
        lines.append(f"- note: {c['note']}")
    return "\n".join(lines)


NOTES = """\
Workloads (details and peer configuration: benchmarks/README.md): **overhead** 1 greenlet,
checkout + `SELECT 1` + checkin, ops/s and the client process's CPU time per operation;
**contention** 200 greenlets, 10 connections, `SELECT 1`;
**io-bound** 500 greenlets, 20 connections, `SELECT pg_sleep(0.02)`, limit 1000 ops/s, ideal
latency 500 ms; **failover** 50 greenlets × 10 reads/s over endpoints A and B, A stopped
(immediate) at 3 s and started at 7 s, every pool in its own process at the same time;
"reads on restarted endpoint" is the share of reads served by A in the 5 s after it accepted
connections again; **chaos** 100 greenlets, transactional, 5 % raise inside the block, 5 % cut
by gevent.Timeout, then 50 plain operations and a look at pg_stat_activity. "getconn
retries": psycopg2.pool raised "exhausted" and the bounded retry (10 ms, up to 3 s) absorbed
it. Failed or hung pools are reported as such. Contention errors are operations that failed
(for psycopg2.pool: retries exhausted). "starved": greenlets that completed no operation in
the measuring window; latencies only cover completed operations, so a pool that starves
most greenlets shows low latencies."""


NEW_NOTES = """\
**saturated failover**: endpoints A and B, a pool of 10, 50 greenlets reading back to back
(`SELECT inet_server_port() FROM pg_sleep(0.05)`, read-only sessions), so every connection is
always busy and 40 greenlets wait; A stopped (immediate) at 3 s, started at 7 s; the share is
of the reads that finished from 1 s to 5 s after A accepted connections again. Every pool in
its own process at the same time, libpq multi-host for the peers, as in failover.
**deadline storm**: 20 greenlets, 2 connections, 5 s; each operation acquires with a timeout
drawn from 1–20 ms (seeded), runs `SELECT 1` and gives back. The pools start empty (greenpool
`min_size` 0, psycopg_pool `min_size=0`), so every connect happens under those deadlines.
"backends started" counts the server log's `connection received` lines (`log_connections`,
a server of its own) during the pool's life, half-made connections included; "sessions
authorized" those that finished the handshake. The median connect (20 plain psycopg2
connects, measured by the same process just before) sets which operations count as having
had time: timeout ≥ 2× it. Pools without a per-call acquire timeout are n/a, with the
reason."""


WEB_NOTES = """\
The example app (`examples/gunicorn`) under `gunicorn -k gevent -w 1`, on greenpool as it
is, and on each peer through `benchmarks/webapp.py` (the same app, its pool calls backed by
the peer's adapter); `read` group of 10 connections, `write` of 5. `wrk -t1 -c100` sends
`GET /notes/<random seeded id>` after a warm-up; latencies are wrk's. No target is set for
this workload: numbers only."""


def new_sections(raw: dict[str, Any]) -> list[str]:
    """The saturated-failover and deadline-storm tables, for the runs that have them."""
    out: list[str] = []
    if "saturated-failover" in raw["runs"]:
        out += ["## Saturated failover (50 greenlets back to back, 10 connections, A and B)", "",
                table(raw, SATURATED_HEAD, SATURATED, only_taking_part=True), ""]
        spans = "; ".join(f"stopped {t['stopped']:.2f} s, accepting again {t['restarted']:.2f}"
                          f" s, window {t['window'][0]:.2f}–{t['window'][1]:.2f} s"
                          for t in raw.get("saturated-failover_timeline", []))
        if spans:
            out += [f"Timelines per repetition: {spans}.", ""]
    if "deadline-storm" in raw["runs"]:
        rs = [r for runs in raw["runs"]["deadline-storm"].values() for r in runs]
        out += [f"## Deadline storm (20 greenlets, timeouts {storm_range(rs)} ms, "
                "2 connections)", "", table(raw, STORM_HEAD, STORM), ""]
    return out


DIRTY_NOTES = """\
One greenlet, alternating chunks of 50: a clean loan (`SELECT 1`), a dirty loan
(`SELECT set_config('search_path', current_setting('search_path'), false)`: a session setting,
left as it was, that a pool which resets must still reset; greenpool sends `DISCARD ALL` on
return), and 50 `SELECT 1` on one connection held throughout (one round trip each). The last
column is what the dirty loan costs beyond the clean one, in round trips. The peers reset
nothing of the session (what the dirty loan changed goes to the next borrower), so theirs is
about 0; it shows the noise."""


def dirty_section(raw: dict[str, Any]) -> list[str]:
    """The dirty-loan table, when the overhead runs measured it (older raw.json did not)."""
    if not any("reset_round_trips" in r for rs in raw["runs"].get("overhead", {}).values()
               for r in rs):
        return []
    return ["## Dirty loans (1 greenlet): what the reset costs", "", DIRTY_NOTES, "",
            table(raw, DIRTY_HEAD, DIRTY, only_taking_part=True), ""]


def web_section(raw: dict[str, Any]) -> list[str]:
    """The gunicorn table, when the run had that workload (older raw.json files do not)."""
    if "gunicorn" not in raw["runs"]:
        return []
    return ["## gunicorn (gevent worker, wrk, 100 connections)", "", WEB_NOTES, "",
            table(raw, WEB_HEAD, WEB, only_taking_part=True), ""]


def write(raw: dict[str, Any], out_dir: Path) -> None:
    def section(title: str, head: str, groups: dict[str, Any]) -> list[str]:
        """A table only for a run that had one of its workloads (``--workloads``)."""
        if not any(w in raw["runs"] for w in groups):
            return []
        return [title, "", table(raw, head, groups), ""]

    parts = [
        header(raw), "",
        *section("## Overhead (1 greenlet) and contention (200 greenlets, 10 connections)",
                 PERF_HEAD, PERF),
        *dirty_section(raw),
        *section("## io-bound (500 greenlets, 20 connections, pg_sleep(0.02))", IO_HEAD, IO),
        *section("## Failover and chaos", ROBUST_HEAD, ROBUST),
        *new_sections(raw),
        *web_section(raw),
        *ratio_section(raw),
        "## greenpool targets", "", *targets(raw), "",
        "## Notes", "", NOTES, "",
        *([NEW_NOTES, ""] if {"saturated-failover", "deadline-storm"} & set(raw["runs"]) else []),
    ]
    timeline = raw.get("failover_timeline")
    if timeline:
        spans = "; ".join(f"stopped {t['stopped']:.2f} s, accepting again {t['restarted']:.2f}"
                          f" s, run {t['seconds']:.1f} s" for t in timeline)
        parts += [f"Failover timelines per repetition: {spans}.", ""]
    if raw.get("profile"):
        parts += ["## greenpool hot path (sampling profile)", "", "```",
                  raw["profile"].strip(), "```", ""]
    (out_dir / "results.md").write_text("\n".join(parts))
    chart(raw, out_dir / "results.png")


def chart(raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("overhead", "ops_s", "overhead: ops/s (1 greenlet)"),
              ("contention", "ops_s", "contention: ops/s (200 greenlets)"),
              ("contention", "fairness", "contention: Jain fairness"),
              ("iobound", "pct_of_limit", "io-bound: % of 1000 ops/s"),
              ("failover", "longest_gap_s", "failover: longest gap (s)"),
              ("chaos", "server_conns", "chaos: server conns left (limit 10)"),
              ("gunicorn", "rps", "gunicorn + wrk: requests/s"),
              ("gunicorn", "p99_ms", "gunicorn + wrk: p99 latency (ms)"),
              ("saturated-failover", "share_back",
               "saturated failover: share back on A (target ≥ 1/3)"),
              ("deadline-storm", "backends_started",
               "deadline storm: backends started (limit 2)")]
    fig, axes = plt.subplots(2, 5, figsize=(25, 8.5))
    for ax, (workload, key, title) in zip(axes.flat, panels, strict=True):
        runs = raw["runs"].get(workload, {})
        names, values, colors = [], [], []
        for peer, rs in runs.items():
            value = median_of(rs, key)
            if value is None:
                continue
            names.append(ADAPTERS[peer].name.replace(" ", "\n", 1))
            values.append(value)
            colors.append("tab:green" if peer == GP else "tab:gray")
        if not values:  # a workload this run did not have
            ax.set_visible(False)
            continue
        ax.barh(names, values, color=colors)
        if key == "share_back":
            ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.suptitle("greenpool vs peers under gevent (medians; greenpool in green)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent / "results"
    write(json.loads((here / "raw.json").read_text()), here)
