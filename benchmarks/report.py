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
                     restarted: float, window_end: float, seconds: float) -> dict[str, Any]:
    ok = sorted(raw["ok"])
    times = [0.0] + [t for t, _ in ok] + [seconds]
    gap, gap_at = 0.0, 0.0
    for prev, cur in itertools.pairwise(times):
        if cur - prev > gap:
            gap, gap_at = cur - prev, prev
    in_window = [port for t, port in ok if restarted <= t <= window_end]
    back = sum(1 for port in in_window if port == restarted_port)
    kinds: dict[str, int] = {}
    for _, kind in raw["err"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    before = [port for t, port in ok if t < stopped]
    return {
        "reads": len(ok), "errors": len(raw["err"]), "error_kinds": kinds,
        "longest_gap_s": gap, "gap_at_s": gap_at, "hung": raw.get("hung", 0),
        "share_back": back / len(in_window) if in_window else 0.0,
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
        return "n/a"
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

    ratio("overhead", "ops_s", "simple", 0.95, "overhead ≥ 0.95× SimpleConnectionPool")
    ratio("overhead", "ops_s", "raw", 0.9, "overhead ≥ 0.9× raw psycopg2")
    cpu = {p: med("overhead", p, "cpu_us") for p in (GP, "simple", "raw")}
    if all(cpu.values()):
        out.append(f"  - client CPU per operation (less sensitive to other load): greenpool "
                   f"{cpu[GP]:.1f} µs, SimpleConnectionPool {cpu['simple']:.1f} µs, raw "
                   f"{cpu['raw']:.1f} µs")
    fair = med("contention", GP, "fairness")
    check("contention fairness ≥ 0.95", None if fair is None else fair >= 0.95,
          f"Jain index {fmt(fair, '.3f')}")
    ratio("contention", "ops_s", "psycopg_pool", 1.5, "contention ≥ 1.5× psycopg_pool")
    peers = {p: med("contention", p, "ops_s") for p in runs.get("contention", {})
             if p != GP and ADAPTERS[p].pooled}
    peers = {p: v for p, v in peers.items() if v}
    if peers:
        fastest = max(peers, key=lambda p: peers[p])
        ratio("contention", "ops_s", fastest, 0.9,
              f"contention ≥ 0.9× fastest peer ({ADAPTERS[fastest].name})")
    pct, errs = med("iobound", GP, "pct_of_limit"), med("iobound", GP, "errors")
    p99 = med("iobound", GP, "p99_vs_ideal")
    ceiling = med("iobound", "raw", "pct_of_limit")
    sleep_ms = raw["machine"].get("pg_sleep_ms")
    alone = "" if sleep_ms is None else (
        f"; one pg_sleep(0.02) alone on one idle connection takes {sleep_ms:.2f} ms here, so "
        f"no pool can exceed {2000 / sleep_ms:.1f} %")
    check("io-bound ≥ 97 % of limit", None if pct is None else pct >= 97,
          f"{fmt(pct, '.1f')} %; the ceiling here, 20 greenlets each on a connection of its "
          f"own with nobody waiting, reached {fmt(ceiling, '.1f')} %{alone}")
    check("io-bound zero errors", None if errs is None else errs == 0, f"{fmt(errs)} errors")
    check("io-bound p99 ≤ 1.1× ideal", None if p99 is None else p99 <= 1.1,
          f"p99 = {fmt(p99, '.2f')}× ideal ({fmt(med('iobound', GP, 'p99_ms'), '.0f')} ms vs "
          f"{fmt(med('iobound', GP, 'ideal_ms'), '.0f')} ms)")
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
    ch = runs.get("chaos", {}).get(GP, [])
    if ch and not status(ch):
        served = min(r.get("served_after", 0) for r in ch)
        conns = max(r.get("server_conns", 99) for r in ch)
        idle = max(r.get("idle_in_tx", 99) for r in ch)
        check("chaos: still serves afterwards", served == 50, f"{served}/50 in the worst rep")
        check("chaos: ≤ size (10) server connections", conns <= 10, f"{conns} at most")
        check("chaos: none idle in transaction", idle == 0, f"{idle} at most")
    else:
        check("chaos", None, status(ch) or "no runs")
    return out


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


WEB_NOTES = """\
The example app (`examples/gunicorn`) under `gunicorn -k gevent -w 1`, on greenpool as it
is, and on each peer through `benchmarks/webapp.py` (the same app, its pool calls backed by
the peer's adapter); `read` group of 10 connections, `write` of 5. `wrk -t1 -c100` sends
`GET /notes/<random seeded id>` after a warm-up; latencies are wrk's. No target is set for
this workload: numbers only."""


def web_section(raw: dict[str, Any]) -> list[str]:
    """The gunicorn table, when the run had that workload (older raw.json files do not)."""
    if "gunicorn" not in raw["runs"]:
        return []
    return ["## gunicorn (gevent worker, wrk, 100 connections)", "", WEB_NOTES, "",
            table(raw, WEB_HEAD, WEB, only_taking_part=True), ""]


def write(raw: dict[str, Any], out_dir: Path) -> None:
    parts = [
        header(raw), "",
        "## Overhead (1 greenlet) and contention (200 greenlets, 10 connections)", "",
        table(raw, PERF_HEAD, PERF), "",
        "## io-bound (500 greenlets, 20 connections, pg_sleep(0.02))", "",
        table(raw, IO_HEAD, IO), "",
        "## Failover and chaos", "", table(raw, ROBUST_HEAD, ROBUST), "",
        *web_section(raw),
        "## greenpool targets", "", *targets(raw), "",
        "## Notes", "", NOTES, "",
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
              ("gunicorn", "p99_ms", "gunicorn + wrk: p99 latency (ms)")]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
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
        ax.barh(names, values, color=colors)
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
