"""Summaries (medians, ratios), the stdout table and the JSON document."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Literal

from bench.controlscale import CTRL
from bench.h1routes import H1R
from bench.scenarios import H1, MTLS, SCENARIO_VARIANTS, TCP, Trial

Agg = Literal["median", "sum"]
PEERS = ("envoy", "haproxy")
SUBJECT = "meshlet"
LOW_UTIL_PCT = 80.0


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str
    parts: tuple[str, ...] = ()  # figures summed into this one (default: key itself)
    agg: Agg = "median"
    ratio: bool = True
    table: bool = True  # False: in the JSON summary only

    def value(self, figures: dict[str, float]) -> float | None:
        keys = self.parts or (self.key,)
        if any(k not in figures for k in keys):
            return None
        return sum(figures[k] for k in keys)


METRICS: dict[str, tuple[Metric, ...]] = {
    H1: (
        Metric("rps", "req/s at saturation (wrk)", "{:,.0f}"),
        Metric("cpu_us_per_req", "proxy CPU µs / request", "{:.1f}"),
        Metric("cpu_util_pct", "proxy CPU % during wrk", "{:.0f}", ratio=False),
        Metric("rss_idle_mb", "RSS idle, MiB", "{:.1f}"),
        Metric("rss_load_mb", "RSS under load (max), MiB", "{:.1f}"),
        Metric("p50_ms", "p50 ms @2,000 req/s (hey)", "{:.2f}"),
        Metric("p99_ms", "p99 ms @2,000 req/s", "{:.2f}"),
        Metric("max_ms", "max ms @2,000 req/s", "{:.2f}"),
        Metric("hey_rps", "rate achieved by hey, req/s", "{:,.0f}", ratio=False),
        Metric(
            "wrk_bad",
            "wrk non-2xx + socket errs (sum)",
            "{:.0f}",
            ("wrk_non_2xx", "wrk_socket_errors"),
            "sum",
            ratio=False,
        ),
        Metric(
            "hey_bad",
            "hey non-2xx + errors (sum)",
            "{:.0f}",
            ("hey_non_2xx", "hey_errors"),
            "sum",
            ratio=False,
        ),
    ),
    MTLS: (
        Metric("rps", "req/s at saturation (wrk → A)", "{:,.0f}"),
        Metric("cpu_us_per_req", "CPU µs / request, A + B", "{:.1f}"),
        Metric("cpu_util_pct", "CPU % (A + B, core 0) during wrk", "{:.0f}", ratio=False),
        Metric("rss_idle_mb", "RSS idle, A + B, MiB", "{:.1f}"),
        Metric("rss_load_mb", "RSS under load (max), A + B, MiB", "{:.1f}"),
        Metric("p50_ms", "p50 ms @2,000 req/s (hey)", "{:.2f}"),
        Metric("p99_ms", "p99 ms @2,000 req/s", "{:.2f}"),
        Metric("max_ms", "max ms @2,000 req/s", "{:.2f}"),
        Metric("hey_rps", "rate achieved by hey, req/s", "{:,.0f}", ratio=False),
        Metric(
            "wrk_bad",
            "wrk non-2xx + socket errs (sum)",
            "{:.0f}",
            ("wrk_non_2xx", "wrk_socket_errors"),
            "sum",
            ratio=False,
        ),
        Metric(
            "hey_bad",
            "hey non-2xx + errors (sum)",
            "{:.0f}",
            ("hey_non_2xx", "hey_errors"),
            "sum",
            ratio=False,
        ),
        Metric("hs_per_s", "new mTLS conns/s, client → B", "{:,.0f}"),
        Metric("hs_cpu_us", "B CPU µs / new mTLS connection", "{:.0f}"),
        Metric("hs_cpu_util_pct", "B CPU % during new connections", "{:.0f}", ratio=False),
        Metric("hs_errors", "new-connection errors (sum)", "{:.0f}", agg="sum", ratio=False),
        *(
            Metric(key, key, "{:.1f}", ratio=False, table=False)
            for key in (
                "cpu_us_per_req_a",
                "cpu_us_per_req_b",
                "cpu_util_pct_a",
                "cpu_util_pct_b",
                "rss_idle_a_mb",
                "rss_idle_b_mb",
                "rss_load_a_mb",
                "rss_load_b_mb",
            )
        ),
    ),
    H1R: (
        Metric("cpu_us_per_req", "proxy CPU µs / request", "{:.1f}"),
        Metric("rps", "req/s at saturation (wrk)", "{:,.0f}"),
        Metric("cpu_util_pct", "proxy CPU % during wrk", "{:.0f}", ratio=False),
        Metric("p50_ms", "p50 ms @2,000 req/s (hey)", "{:.2f}"),
        Metric("p99_ms", "p99 ms @2,000 req/s", "{:.2f}"),
        Metric("max_ms", "max ms @2,000 req/s", "{:.2f}"),
        Metric("rss_idle_mb", "RSS idle, MiB", "{:.1f}"),
        Metric("rss_load_mb", "RSS under load (max), MiB", "{:.1f}"),
        Metric("ep_share_min_pct", "endpoint share of wrk resp. min %", "{:.1f}"),
        Metric("ep_share_max_pct", "  … max %", "{:.1f}"),
        Metric("nginx_bytes_per_req", "nginx bytes written / wrk request", "{:.1f}"),
        Metric(
            "wrk_bad",
            "wrk non-2xx + socket errs (sum)",
            "{:.0f}",
            ("wrk_non_2xx", "wrk_socket_errors"),
            "sum",
        ),
        Metric("hey_bad", "hey non-2xx + errors (sum)", "{:.0f}", ("hey_non_2xx", "hey_errors"),
               "sum"),
        *(Metric(f"ep{i}_share_pct", f"ep{i}_share_pct", "{:.1f}", table=False)
          for i in (1, 2, 3)),
    ),
    TCP: (
        Metric("mb_per_s", "throughput, MiB/s", "{:,.0f}"),
        Metric("cpu_us_per_mb", "proxy CPU µs / MiB", "{:.0f}"),
        Metric("cpu_util_pct", "proxy CPU % during transfer", "{:.0f}", ratio=False),
        Metric("rss_idle_mb", "RSS idle, MiB", "{:.1f}"),
        Metric("rss_max_mb", "RSS during transfer (max), MiB", "{:.1f}"),
    ),
    CTRL: tuple(
        Metric(key, label, fmt, ratio=False)
        for key, label, fmt in (
            ("control_load_s", "control spawn → status: N svc, s", "{:.2f}"),
            ("control_load_log_s", "  … → its 'mesh file' log line, s", "{:.2f}"),
            ("control_load_cpu_s", "  control CPU for start+load, s", "{:.2f}"),
            ("control_rss_mb", "control RSS, N svc loaded, MiB", "{:.1f}"),
            ("control_load_small_s", "control spawn → status: 10 svc, s", "{:.2f}"),
            ("control_rss_small_mb", "control RSS, 10 svc, MiB", "{:.1f}"),
            ("parse_inproc_s", "parse N svc file in-process, s", "{:.2f}"),
            ("parse_inproc_nogc_s", "  the same with gc disabled, s", "{:.2f}"),
            ("reload_s", "reload: edit → status shows it, s", "{:.2f}"),
            ("reload_log_s", "  edit → 'reloaded' log line, s", "{:.2f}"),
            ("reload_cpu_s", "  control CPU per reload, s", "{:.2f}"),
            ("control_rss_reloaded_mb", "control RSS after reloads, MiB", "{:.1f}"),
            ("control_hwm_mb", "control peak RSS (VmHWM), MiB", "{:.1f}"),
            ("fleet_start_s", "P proxies ready + resolved, s", "{:.0f}"),
            ("proxy_rss_mb", "fleet proxy RSS (median), MiB", "{:.1f}"),
            ("control_subscriptions", "control watches with the fleet", "{:.0f}"),
            ("control_rss_fleet_mb", "control RSS with the fleet, MiB", "{:.1f}"),
            ("prop_p50_ms", "edit → P proxies, N svc: p50 ms", "{:,.0f}"),
            ("prop_p99_ms", "  p99 ms", "{:,.0f}"),
            ("prop_max_ms", "  max ms", "{:,.0f}"),
            ("prop_control_ms", "  edit → control applied (med) ms", "{:,.0f}"),
            ("prop_fanout_p99_ms", "  control applied → proxy p99 ms", "{:,.0f}"),
            ("prop_n", "  samples (proxies x rounds)", "{:.0f}"),
            ("prop_small_p50_ms", "edit → P proxies, 10 svc: p50 ms", "{:,.0f}"),
            ("prop_small_p99_ms", "  p99 ms", "{:,.0f}"),
            ("prop_small_max_ms", "  max ms", "{:,.0f}"),
            ("prop_small_control_ms", "  edit → control applied (med) ms", "{:,.0f}"),
            ("prop_small_fanout_p99_ms", "  control applied → proxy p99 ms", "{:,.0f}"),
            ("proxy_rss_before_mb", "proxy RSS, uses 3 of 10 svc, MiB", "{:.2f}"),
            ("proxy_rss_after_mb", "proxy RSS, uses 3 of N svc, MiB", "{:.2f}"),
            ("proxy_rss_growth_kib", "proxy RSS growth 10 → N svc, KiB", "{:+,.0f}"),
            ("proxy_rss_drift_kib", "  idle drift over 2 s before, KiB", "{:+,.0f}"),
        )
    ),
}


def summarise(trials: list[Trial], scenarios: list[str], systems: list[str]) -> dict[str, Any]:
    """{scenario: {system: {metric: {value, agg, values, n}}}} over successful figures."""
    out: dict[str, Any] = {}
    for scenario in scenarios:
        out[scenario] = {}
        for system in SCENARIO_VARIANTS.get(scenario, systems):
            mine = [t for t in trials if t.scenario == scenario and t.system == system]
            out[scenario][system] = {
                m.key: agg for m in METRICS[scenario] if (agg := _aggregate(m, mine))
            }
    return out


def _aggregate(metric: Metric, trials: list[Trial]) -> dict[str, Any] | None:
    values = [v for t in trials if (v := metric.value(t.figures)) is not None]
    if not values:
        return None
    value = statistics.median(values) if metric.agg == "median" else sum(values)
    return {"value": value, "agg": metric.agg, "values": values, "n": len(values)}


def ratios(summary: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """meshlet / peer for each ratio metric where both medians exist."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, per_system in summary.items():
        subject = per_system.get(SUBJECT, {})
        for metric in METRICS[scenario]:
            for peer in PEERS:
                mine = subject.get(metric.key)
                theirs = per_system.get(peer, {}).get(metric.key)
                if metric.ratio and mine and theirs and theirs["value"]:
                    cell = out.setdefault(scenario, {}).setdefault(metric.key, {})
                    cell[f"{SUBJECT}/{peer}"] = mine["value"] / theirs["value"]
    return out


# ---- text output ------------------------------------------------------------------


def _fmt(metric: Metric, cell: dict[str, Any] | None) -> str:
    return "-" if cell is None else metric.fmt.format(cell["value"])


def table(
    scenario: str, summary: dict[str, Any], systems: list[str], rat: dict[str, Any], title: str
) -> str:
    """One scenario's table: a row per metric, a column per system, then ratios."""
    peers = [p for p in PEERS if SUBJECT in systems and p in systems]
    heads = [*systems, *(f"{SUBJECT}/{p}" for p in peers)]
    w = max([16, *(len(h) + 2 for h in heads)])  # h1-routes' variant names are longer
    lines = [title, f"{'':34}" + "".join(f"{h:>{w}}" for h in heads)]
    for metric in (m for m in METRICS[scenario] if m.table):
        cells = [_fmt(metric, summary[scenario][s].get(metric.key)) for s in systems]
        for peer in peers:
            r = rat.get(scenario, {}).get(metric.key, {}).get(f"{SUBJECT}/{peer}")
            cells.append("-" if r is None else f"{r:.2f}")
        lines.append(f"{metric.label:34}" + "".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


def ratio_lines(rat: dict[str, Any]) -> list[str]:
    """`scenario: metric meshlet/peer = r, ...` lines, one per metric."""
    return [
        f"{scenario}: {metric} " + ", ".join(f"{pair} = {r:.2f}" for pair, r in pairs.items())
        for scenario, metrics in rat.items()
        for metric, pairs in metrics.items()
    ]


def problems(trials: list[Trial]) -> list[str]:
    """Failures and suspicious figures, one entry per trial."""
    out = []
    for t in trials:
        where = f"rep {t.rep + 1} {t.scenario} {t.system}"
        if t.error:
            out.append(f"{where}: FAILED: {t.error}")
        bad = {k: v for k, v in t.figures.items() if k.endswith(("non_2xx", "errors")) and v}
        if bad:
            out.append(f"{where}: {', '.join(f'{k}={v:.0f}' for k, v in bad.items())}")
        util = t.figures.get("cpu_util_pct")
        if util is not None and util < LOW_UTIL_PCT:
            out.append(
                f"{where}: proxy CPU only {util:.0f}% during the load run "
                "(not saturated: load core or client may be the limit)"
            )
    return out
