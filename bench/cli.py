"""Command line, run orchestration (rotation over reps) and output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.backend import start_nginx, start_sink
from bench.common import LOAD_CORE, MIB, PROXY_CORE, BenchError
from bench.controlscale import CTRL, FULL, QUICK, target_lines
from bench.h1routes import H1R, start_web_backends
from bench.h1routes import deltas as h1r_deltas
from bench.h1routes import target_lines as h1r_target_lines
from bench.h2bench import GRPC, H2, METRIC_ROWS, start_h2_backends
from bench.h2bench import target_lines as h2_target_lines
from bench.loadgen import hey_argv, wrk_argv
from bench.machine import idle_check, idle_problems, machine_info
from bench.mesh import make_pki, start_control
from bench.procs import stop_all
from bench.scenarios import (
    DEFAULT_SCENARIOS,
    H1,
    HANDSHAKE_THREADS,
    MTLS,
    SCENARIO_NAMES,
    SCENARIO_SYSTEMS,
    SCENARIO_VARIANTS,
    SINGLE_SYSTEM,
    TCP,
    Backends,
    Settings,
    Trial,
    run_trial,
)
from bench.systems import SYSTEM_NAMES, VERSIONS, tool_versions

# h2-one-proxy's and grpc-mesh-mtls' table rows (bench.report cannot import bench.h2bench)
report.METRICS.update(
    {s: tuple(report.Metric(*row) for row in rows) for s, rows in METRIC_ROWS.items()}
)


@dataclass(frozen=True)
class Options:
    quick: bool
    json_path: Path | None
    scenarios: list[str]
    systems: list[str]
    reps: int
    keep_workdir: bool


def _csv(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return list(dict.fromkeys(names))

    return parse


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short runs, whole run < 90 s")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every raw figure here")
    p.add_argument("--scenarios", type=_csv(SCENARIO_NAMES), default=list(DEFAULT_SCENARIOS))
    p.add_argument("--systems", type=_csv(SYSTEM_NAMES), default=list(SYSTEM_NAMES))
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick: 1)")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    a = p.parse_args(argv)
    reps = a.reps if a.reps is not None else (1 if a.quick else 3)
    if reps < 1:
        p.error("--reps must be >= 1")
    return Options(a.quick, a.json, a.scenarios, a.systems, reps, a.keep_workdir)


def settings_for(quick: bool) -> Settings:
    if quick:
        return Settings(
            wrk_seconds=5,
            hey_seconds=5,
            bulk_bytes=256 * MIB,
            ready_timeout=10.0,
            bulk_timeout=60.0,
            mesh_wrk_seconds=3,
            mesh_hey_seconds=3,
            handshake_seconds=2,
            control_scale=QUICK,
        )
    return Settings(
        wrk_seconds=15,
        hey_seconds=15,
        bulk_bytes=1024 * MIB,
        ready_timeout=15.0,
        bulk_timeout=240.0,
        mesh_wrk_seconds=15,
        mesh_hey_seconds=15,
        handshake_seconds=10,
        control_scale=FULL,
    )


def rotated(systems: list[str], rep: int) -> list[str]:
    k = rep % len(systems)
    return systems[k:] + systems[:k]


# ---- environment ----------------------------------------------------------------


def check_machine(scenarios: list[str]) -> None:
    if (os.cpu_count() or 0) < 2:
        raise BenchError("needs at least 2 CPUs (proxy on core 0, load on core 1)")
    tools = ("taskset", "wrk", "hey", "nginx") if set(scenarios) - {CTRL} else ("taskset",)
    if H2 in scenarios:
        tools += ("h2load", "nghttp", "nghttpd")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}")
    os.sched_setaffinity(0, {LOAD_CORE})  # keep the harness itself off the proxy core


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so finally-blocks stop every child."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        print(f"bench: got signal {signum}; stopping all children", file=sys.stderr)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        stop_all()
        for sig, h in old.items():
            signal.signal(sig, h)


# ---- run -------------------------------------------------------------------------


def start_backends(opts: Options, workdir: Path) -> Backends:
    log_dir = workdir / "backends"
    log_dir.mkdir()
    http = H1 in opts.scenarios or MTLS in opts.scenarios
    web = None
    if H1R in opts.scenarios and "meshlet" in opts.systems:
        web = start_web_backends(workdir)
    nginx_port = start_nginx(workdir, log_dir)[1] if http else None
    sink_port = start_sink(log_dir)[1] if TCP in opts.scenarios else None
    mesh = None
    if MTLS in opts.scenarios or GRPC in opts.scenarios:
        mesh = make_pki(workdir / "mesh")
        if "meshlet" in opts.systems:
            start_control(mesh, log_dir)
    h2 = start_h2_backends(opts.scenarios, workdir, log_dir)
    return Backends(nginx_port, sink_port, mesh, web, h2)


def progress(trial: Trial, reps: int) -> None:
    f = trial.figures
    head = f"[rep {trial.rep + 1}/{reps}] {trial.scenario:13} {trial.system:8}"
    if trial.scenario in SCENARIO_VARIANTS:
        head = f"[rep {trial.rep + 1}/{reps}] {trial.scenario} {trial.system:20}"
    if trial.error:
        detail = "FAILED: " + trial.error.splitlines()[0][:160]
    elif trial.scenario in (H1, H1R):
        detail = (
            f"{f['rps']:,.0f} req/s, {f['cpu_us_per_req']:.1f} µs/req, p99 {f['p99_ms']:.2f} ms"
        )
        shares = [f[k] for k in ("ep1_share_pct", "ep2_share_pct", "ep3_share_pct") if k in f]
        if len(shares) > 1:
            detail += ", endpoint shares " + "/".join(f"{x:.0f}" for x in shares) + " %"
    elif trial.scenario == MTLS:
        detail = (
            f"{f['rps']:,.0f} req/s, {f['cpu_us_per_req']:.1f} µs/req "
            f"(A {f['cpu_us_per_req_a']:.1f} + B {f['cpu_us_per_req_b']:.1f}), "
            f"p99 {f['p99_ms']:.2f} ms, {f['hs_per_s']:,.0f} handshakes/s, "
            f"B {f['hs_cpu_us']:.0f} µs/handshake"
        )
    elif trial.scenario == H2:
        detail = (
            f"{f['rps']:,.0f} req/s, {f['cpu_us_per_req']:.1f} µs/req, "
            f"p99 {f['p99_ms']:.2f} ms @2,000 req/s"
        )
    elif trial.scenario == GRPC:
        detail = (
            f"{f['calls_per_s']:,.0f} calls/s, {f['cpu_us_per_call']:.1f} µs/call "
            f"(A {f['cpu_us_per_call_a']:.1f} + B {f['cpu_us_per_call_b']:.1f}), "
            f"CPU {f['cpu_util_pct']:.0f} %"
        )
    elif trial.scenario == CTRL:
        detail = (
            f"control load {f['control_load_s']:.2f} s, RSS {f['control_rss_mb']:.0f} MiB; "
            f"update p50/p99 {f['prop_p50_ms']:.0f}/{f['prop_p99_ms']:.0f} ms; "
            f"proxy RSS growth {f['proxy_rss_growth_kib']:+.0f} KiB"
        )
    else:
        detail = f"{f['mb_per_s']:,.0f} MiB/s, {f['cpu_us_per_mb']:.0f} µs/MiB"
    print(f"{head} {detail}  ({trial.raw.get('trial_seconds', 0):.0f}s)", file=sys.stderr)


def run_trials(opts: Options, settings: Settings, workdir: Path) -> list[Trial]:
    backends = start_backends(opts, workdir)
    trials = []
    for rep in range(opts.reps):
        order = rotated(opts.systems, rep)
        for scenario in opts.scenarios:
            variants = SCENARIO_VARIANTS.get(scenario)
            names = order
            if variants is not None:  # meshlet variants instead of systems, rotated too
                names = rotated(list(variants), rep) if "meshlet" in opts.systems else []
            for position, system in enumerate(names):
                only = SINGLE_SYSTEM.get(scenario)
                if only is not None and (system != only or rep > 0):
                    continue  # e.g. control-scale: meshlet only, its repetitions inside
                if system not in SCENARIO_SYSTEMS.get(scenario, (system,)):
                    continue  # e.g. grpc-mesh-mtls: no HAProxy pair
                trial = Trial(rep=rep, scenario=scenario, system=system, position=position)
                trials.append(run_trial(trial, settings, backends, workdir))
                progress(trial, opts.reps)
    return trials


def build_document(
    opts: Options, settings: Settings, trials: list[Trial], started: float, meta: dict[str, Any]
) -> dict[str, Any]:
    summary = report.summarise(trials, opts.scenarios, opts.systems)
    extra = {"h1_routes": h1r_deltas(trials)} if H1R in opts.scenarios else {}
    return {
        "command": sys.argv,
        "command_line": shlex.join([sys.executable, "-m", "bench", *sys.argv[1:]]),
        **meta,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "options": {**asdict(opts), "json_path": str(opts.json_path or "")},
        "settings": asdict(settings),
        "method": {
            "proxy_core": PROXY_CORE,
            "load_core": LOAD_CORE,
            "wrk": wrk_argv(0, settings.wrk_seconds),
            "hey": hey_argv(0, settings.hey_seconds),
            "bulk_mib": settings.bulk_bytes // MIB,
            "mtls_wrk": wrk_argv(0, settings.mesh_wrk_seconds),
            "mtls_hey": hey_argv(0, settings.mesh_hey_seconds),
            "mtls_handshakes": f"python -m bench.tlsclient --threads {HANDSHAKE_THREADS} "
            f"--seconds {settings.handshake_seconds} (fresh mTLS 1.3 connections to B)",
            "mtls_cpu_rss": "sum of proxy A and proxy B (each also in figures *_a / *_b)",
            "aggregate": "median over reps (error counts: sum); systems rotated each rep",
            "control_scale": "meshlet only, once per run (repetitions inside); control "
            "on core 0, proxies and harness on core 1; see bench/controlscale.py",
            "h2_one_proxy": "h2load -c 10 -m 10 -D <wrk_seconds> (CPU, req/s); h2load -c 10 "
            "-m 1 --rps 200 -D <hey_seconds> --log-file (latency at 2,000 req/s); nghttpd "
            "--no-tls backend; see bench/h2bench.py",
            "grpc_mesh_mtls": "python -m bench.h2bench client (grpcio, 16 threads, one "
            "channel, unary 64 B) for <mesh_wrk_seconds>; CPU and RSS = A + B",
            "h1_routes": "meshlet variants (1 endpoint; 3 endpoints + 10 routes; standalone "
            "inbound) measured as h1-one-proxy, rotated each rep; see bench/h1routes.py",
        },
        **extra,
        "summary": summary,
        "ratios": report.ratios(summary),
        "problems": idle_problems(meta["idle_check"]) + report.problems(trials),
        "trials": [asdict(t) for t in trials],
    }


def render(doc: dict[str, Any], opts: Options, settings: Settings) -> str:
    n = f"median of {opts.reps} rep(s)"
    titles = {
        H1: f"== h1-one-proxy: wrk -t1 -c50 -d{settings.wrk_seconds}s; "
        f"hey -z {settings.hey_seconds}s -c 20 -q 100 (2,000 req/s); {n}",
        TCP: f"== tcp-bulk: {settings.bulk_bytes // MIB} MiB per transfer"
        f"{' (--quick; full run: 1024 MiB)' if opts.quick else ''}; {n}",
        MTLS: f"== h1-mesh-mtls: wrk → A → mTLS 1.3 → B → nginx; CPU and RSS = A + B; "
        f"wrk -d{settings.mesh_wrk_seconds}s, hey -z {settings.mesh_hey_seconds}s, "
        f"{settings.handshake_seconds} s of new mTLS connections to B"
        f"{' (--quick; full run: 15 s, 15 s, 10 s)' if opts.quick else ''}; {n}",
        CTRL: _ctrl_title(settings, opts.quick),
        H2: f"== h2-one-proxy: h2load -c 10 -m 10 -D {settings.wrk_seconds} → proxy (h2c) → "
        f"nghttpd (h2c); latency: h2load -c 10 -m 1 --rps 200 (2,000 req/s) "
        f"-D {settings.hey_seconds}; {n}",
        GRPC: f"== grpc-mesh-mtls: grpcio client (16 threads, unary 64 B) → A → HTTP/2 over "
        f"mTLS 1.3 → B → grpcio server, {settings.mesh_wrk_seconds} s; CPU and RSS = A + B; {n}",
        H1R: f"== h1-routes: wrk -t1 -c50 -d{settings.wrk_seconds}s; hey -z "
        f"{settings.hey_seconds}s -c 20 -q 100; outbound meshlet → web:80 with 1 endpoint, "
        f"or 3 endpoints + 10 routes; standalone inbound for reference; {n}",
    }
    parts = []
    for s in opts.scenarios:
        systems = [SINGLE_SYSTEM[s]] if s in SINGLE_SYSTEM else opts.systems
        systems = list(SCENARIO_VARIANTS.get(s, systems))
        systems = [x for x in systems if x in SCENARIO_SYSTEMS.get(s, (x,))]
        parts.append(report.table(s, doc["summary"], systems, doc["ratios"], titles[s]))
        if s == H1R:
            parts[-1] += "".join(f"\n{line}" for line in h1r_target_lines(doc["h1_routes"]))
        if s == H2:
            parts[-1] += "".join(f"\n{line}" for line in h2_target_lines(doc["summary"]))
        if s == CTRL:
            figures = {k: c["value"] for k, c in doc["summary"][s].get("meshlet", {}).items()}
            parts[-1] += "".join(f"\ntarget: {line}" for line in target_lines(figures))
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    m = doc["machine"]
    parts.append(
        f"machine: {m['nproc']} CPUs, kernel {m['kernel']}, python {m['python']}; "
        f"proxy on core {PROXY_CORE}, load+backend on core {LOAD_CORE}\n"
        f"versions: {versions}"
    )
    parts.append(
        "\n".join(["ratios:", *report.ratio_lines(doc["ratios"])])
        if doc["ratios"]
        else "ratios: none (need meshlet and a peer with figures)"
    )
    problems = doc["problems"]
    parts.append(
        "\n".join(["problems:", *(f"- {p}" for p in problems)]) if problems else "problems: none"
    )
    return "\n\n".join(parts)


def _ctrl_title(settings: Settings, quick: bool) -> str:
    c = settings.control_scale
    return (
        f"== control-scale (meshlet only, once): N = {c.services:,} services x 3 workloads, "
        f"P = {c.proxies} proxies on svc-0..9, {c.rounds} rounds per mesh size, "
        f"{c.load_reps} fresh control start(s), {c.reload_edits} edits, "
        f"{c.rss_reps} RSS proxy(ies){' (--quick)' if quick else ''}; control on core "
        f"{PROXY_CORE}, proxies and harness on core {LOAD_CORE}"
    )


def compile_meshlet() -> None:
    """Compile meshlet's bytecode, as installing a wheel does: a checkout run with
    PYTHONDONTWRITEBYTECODE=1 (this machine sets it) would otherwise compile every module
    from source at each proxy start, which leaves the proxy measurably heavier (and
    slower to start) than an installed one."""
    import compileall

    import meshlet

    compileall.compile_dir(str(Path(meshlet.__file__).parent), quiet=1)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    settings = settings_for(opts.quick)
    started = time.monotonic()
    meta = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {**{s: VERSIONS[s]() for s in opts.systems}, **tool_versions()},
    }
    compile_meshlet()
    workdir = Path(tempfile.mkdtemp(prefix="meshlet-bench-"))
    try:
        with cleanup_on_signals():
            check_machine(opts.scenarios)
            meta["idle_check"] = idle_check()
            trials = run_trials(opts, settings, workdir)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; all children stopped", file=sys.stderr)
        return 130
    finally:
        if opts.keep_workdir:
            print(f"bench: configs and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = build_document(opts, settings, trials, started, meta)
    print(render(doc, opts, settings))
    if opts.json_path:
        opts.json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\nJSON written to {opts.json_path}")
    return 0
