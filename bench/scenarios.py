"""The scenarios: one trial = one fresh proxy process measured in one scenario."""

from __future__ import annotations

import http.client
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.backend import NGINX_BODY
from bench.common import LOAD_CORE, LOOPBACK, MIB, REPO_ROOT, BenchError
from bench.controlscale import CTRL, FULL, ScaleSettings, run_control_scale
from bench.h1routes import H1R, VARIANTS, WebBackends, run_h1_routes
from bench.h2bench import (
    GRPC,
    GRPC_SYSTEMS,
    H2,
    H2_SYSTEMS,
    H2Backends,
    run_grpc_mesh,
    run_h2_one_proxy,
)
from bench.loadgen import hey_argv, parse_bulk, parse_hey, parse_wrk, wrk_argv
from bench.mesh import CLIENT, PAIR_BUILDERS, SERVER, Mesh, Pair, final_state, spiffe_uri
from bench.mesh import verify_mtls as _verify_mtls
from bench.procs import Meter, PairMeter, Proc, TreeMeter, spawn, ticks_to_us, wait_sampling
from bench.systems import BUILDERS, LaunchSpec, Mode, start_proxy
from bench.tcpbulk import transfer

H1 = "h1-one-proxy"
TCP = "tcp-bulk"
MTLS = "h1-mesh-mtls"
DEFAULT_SCENARIOS = (H1, TCP, MTLS)  # control-scale only when asked for (meshlet only)
SCENARIO_NAMES = (*DEFAULT_SCENARIOS, CTRL, H1R, H2, GRPC)  # these, too, only when named
# Scenarios run for some systems only (the others are skipped, not failed).
SCENARIO_SYSTEMS = {H2: H2_SYSTEMS, GRPC: GRPC_SYSTEMS}
SINGLE_SYSTEM = {CTRL: "meshlet"}  # scenarios run for one system only, in rep 1 only
# Scenarios whose columns are variants of meshlet (run when meshlet is among the systems).
SCENARIO_VARIANTS = {H1R: VARIANTS}
HANDSHAKE_THREADS = 4
IDLE_SETTLE_S = 1.0
WARMUP_CONNS = 4
WARMUP_REQS = 25


@dataclass(frozen=True)
class Settings:
    wrk_seconds: int
    hey_seconds: int
    bulk_bytes: int
    ready_timeout: float
    bulk_timeout: float
    mesh_wrk_seconds: int  # h1-mesh-mtls (shorter with --quick to keep it < 90 s)
    mesh_hey_seconds: int
    handshake_seconds: int
    control_scale: ScaleSettings = FULL


@dataclass(frozen=True)
class Backends:
    nginx_port: int | None
    sink_port: int | None
    mesh: Mesh | None = None  # PKI and meshlet control plane for h1-mesh-mtls
    web: WebBackends | None = None  # h1-routes: three nginx
    h2: H2Backends | None = None  # h2-one-proxy's nghttpd, grpc-mesh-mtls' grpc server


@dataclass
class Trial:
    rep: int
    scenario: str
    system: str
    position: int  # place of the system in this rep's rotated order
    figures: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class TrialContext:
    trial: Trial
    settings: Settings
    backends: Backends
    trial_dir: Path


# ---- helpers shared by scenarios --------------------------------------------


def _launch(ctx: TrialContext, mode: Mode, upstream: int | None) -> tuple[LaunchSpec, Proc]:
    if upstream is None:
        raise BenchError("backend for this scenario is not running")
    system = ctx.trial.system
    spec = BUILDERS[system](mode, upstream, ctx.trial_dir)
    ctx.trial.raw["proxy_argv"] = spec.argv
    ctx.trial.raw["proxy_env"] = spec.env
    return spec, start_proxy(system, spec, ctx.trial_dir, ctx.settings.ready_timeout)


def _ensure_alive(proxy: Proc, during: str) -> None:
    if not proxy.alive():
        raise BenchError(
            f"{proxy.name} died during {during} (exit code {proxy.popen.returncode}); "
            f"log tail:\n{proxy.log_tail()}"
        )


def _finish(ctx: TrialContext, proxy: Proc) -> None:
    ctx.trial.raw["proxy_alive_at_end"] = proxy.alive()
    ctx.trial.raw["proxy_exit_code"] = proxy.stop()
    ctx.trial.raw["proxy_log_tail"] = proxy.log_tail(40)


def _run_loadgen(
    ctx: TrialContext, name: str, argv: list[str], timeout: float, meter: Meter
) -> tuple[str, int, float]:
    """Run a pinned load generator while sampling the proxy; (output, cpu ticks, wall s)."""
    ticks0, wall0 = meter.ticks(), time.monotonic()
    proc = spawn(name, argv, ctx.trial_dir, core=LOAD_CORE, cwd=REPO_ROOT)
    rc = wait_sampling(proc, timeout, meter.sample, every=0.05)
    ticks, wall = meter.ticks() - ticks0, time.monotonic() - wall0
    meter.sample()  # a run shorter than one sampling period still gets a figure
    text = proc.log_path.read_text(errors="replace")
    ctx.trial.raw[f"{name}_argv"] = proc.argv
    ctx.trial.raw[f"{name}_output"] = text
    if rc != 0:
        raise BenchError(f"{name} exited with {rc}: {text.strip()[-300:]}")
    return text, ticks, wall


def _util_pct(ticks: int, busy_seconds: float) -> float:
    """Proxy CPU use over the load generator's own measured duration, in percent."""
    return 100 * ticks_to_us(ticks) / 1e6 / busy_seconds


# ---- h1-one-proxy -------------------------------------------------------------


def _warm_up_http(port: int) -> None:
    """A few keep-alive requests; each must be a 200 with nginx's body."""
    expected = NGINX_BODY.encode()
    for conn_no in range(WARMUP_CONNS):
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
        try:
            for req_no in range(WARMUP_REQS):
                try:
                    conn.request("GET", "/")
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    raise BenchError(
                        f"warm-up request {req_no} on connection {conn_no} failed: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                if resp.status != 200 or body != expected:
                    raise BenchError(
                        f"warm-up request {req_no} on connection {conn_no}: "
                        f"status {resp.status}, body {body[:120]!r}"
                    )
        finally:
            conn.close()


def _saturation(
    ctx: TrialContext, port: int, meter: TreeMeter | PairMeter, secs: int | None = None
) -> None:
    secs = secs or ctx.settings.wrk_seconds
    text, ticks, wall = _run_loadgen(ctx, "wrk", wrk_argv(port, secs), secs + 30, meter)
    res = parse_wrk(text)
    if res.requests == 0:
        raise BenchError(f"wrk completed no requests: {text.strip()[-300:]}")
    ctx.trial.figures.update(
        rps=res.rps,
        requests=res.requests,
        wrk_seconds=res.seconds or wall,
        cpu_us_per_req=ticks_to_us(ticks) / res.requests,
        cpu_util_pct=_util_pct(ticks, res.seconds or wall),
        rss_load_mb=meter.rss_max_kib / 1024,
        wrk_non_2xx=res.non_2xx,
        wrk_socket_errors=res.socket_errors,
    )


def _fixed_rate(ctx: TrialContext, port: int, meter: Meter, secs: int | None = None) -> None:
    secs = secs or ctx.settings.hey_seconds
    text, _, _ = _run_loadgen(ctx, "hey", hey_argv(port, secs), secs + 40, meter)
    res = parse_hey(text)
    ctx.trial.raw["hey_status_counts"] = res.status_counts
    ctx.trial.figures.update(
        p50_ms=res.p50_ms,
        p99_ms=res.p99_ms,
        max_ms=res.max_ms,
        hey_rps=res.rps,
        hey_responses=res.responses,
        hey_non_2xx=res.non_2xx,
        hey_errors=res.errors,
    )


def run_h1(ctx: TrialContext) -> None:
    spec, proxy = _launch(ctx, "http", ctx.backends.nginx_port)
    try:
        meter = TreeMeter(proxy.pid)
        _warm_up_http(spec.listen_port)
        time.sleep(IDLE_SETTLE_S)
        ctx.trial.figures["rss_idle_mb"] = meter.rss() / 1024
        _saturation(ctx, spec.listen_port, meter)
        _ensure_alive(proxy, "the wrk run")
        _fixed_rate(ctx, spec.listen_port, meter)
        _ensure_alive(proxy, "the hey run")
    finally:
        _finish(ctx, proxy)


# ---- tcp-bulk -----------------------------------------------------------------


def _check_transfer(result: dict[str, Any], expected: int, what: str) -> None:
    if "error" in result:
        raise BenchError(f"{what}: client error {result['error']}")
    if result.get("sent") != expected or result.get("acked") != expected:
        raise BenchError(
            f"{what}: byte count mismatch: sent {result.get('sent')}, sink counted "
            f"{result.get('acked')} (reply {result.get('reply')!r}), expected {expected}"
        )


def _warm_up_tcp(port: int) -> None:
    try:
        result = transfer(port, MIB, timeout=10)
    except OSError as exc:
        raise BenchError(f"warm-up transfer failed: {type(exc).__name__}: {exc}") from exc
    _check_transfer(result, MIB, "warm-up transfer of 1 MiB")


def _bulk(ctx: TrialContext, port: int, meter: TreeMeter) -> None:
    nbytes = ctx.settings.bulk_bytes
    argv = [
        sys.executable,
        "-m",
        "bench.tcpbulk",
        "client",
        "--port",
        str(port),
        "--bytes",
        str(nbytes),
    ]
    text, ticks, wall = _run_loadgen(ctx, "bulk", argv, ctx.settings.bulk_timeout, meter)
    result = parse_bulk(text)
    _check_transfer(result, nbytes, "bulk transfer")
    mib = nbytes / MIB
    ctx.trial.figures.update(
        bytes=nbytes,
        seconds=result["seconds"],
        send_seconds=result.get("send_seconds", 0.0),
        mb_per_s=mib / result["seconds"],
        cpu_us_per_mb=ticks_to_us(ticks) / mib,
        cpu_util_pct=_util_pct(ticks, result["seconds"] or wall),
        rss_max_mb=meter.rss_max_kib / 1024,
    )


def run_tcp(ctx: TrialContext) -> None:
    spec, proxy = _launch(ctx, "tcp", ctx.backends.sink_port)
    try:
        meter = TreeMeter(proxy.pid)
        _warm_up_tcp(spec.listen_port)
        time.sleep(IDLE_SETTLE_S)
        ctx.trial.figures["rss_idle_mb"] = meter.rss() / 1024
        _bulk(ctx, spec.listen_port, meter)
        _ensure_alive(proxy, "the bulk transfer")
    finally:
        _finish(ctx, proxy)


# ---- h1-mesh-mtls ------------------------------------------------------------------


def _launch_pair(ctx: TrialContext) -> tuple[Pair, Proc, Proc]:
    """Start B then A (both on the proxy core); both must report ready."""
    mesh, nginx = ctx.backends.mesh, ctx.backends.nginx_port
    if mesh is None or nginx is None:
        raise BenchError("backend for this scenario is not running")
    system = ctx.trial.system
    pair = PAIR_BUILDERS[system](nginx, mesh, ctx.trial_dir)
    for side, spec in (("a", pair.a), ("b", pair.b)):
        ctx.trial.raw[f"proxy_{side}_argv"] = spec.argv
        ctx.trial.raw[f"proxy_{side}_env"] = spec.env
    timeout = ctx.settings.ready_timeout
    proxy_b = start_proxy(f"{system}-b", pair.b, ctx.trial_dir, timeout)
    try:
        proxy_a = start_proxy(f"{system}-a", pair.a, ctx.trial_dir, timeout)
    except BaseException:
        _finish_side(ctx, "b", proxy_b)
        raise
    return pair, proxy_a, proxy_b


def _finish_side(ctx: TrialContext, side: str, proxy: Proc) -> None:
    ctx.trial.raw[f"proxy_{side}_alive_at_end"] = proxy.alive()
    ctx.trial.raw[f"proxy_{side}_exit_code"] = proxy.stop()
    ctx.trial.raw[f"proxy_{side}_log_tail"] = proxy.log_tail(40)


def _split(ctx: TrialContext, meter: PairMeter, ticks0: tuple[int, int], key: str) -> None:
    """Per-proxy CPU µs/request and CPU % over the wrk run (the table shows the sums)."""
    f = ctx.trial.figures
    for side, m, t0 in (("a", meter.a, ticks0[0]), ("b", meter.b, ticks0[1])):
        ticks = m.ticks() - t0
        f[f"{key}_{side}"] = ticks_to_us(ticks) / f["requests"]
        f[f"cpu_util_pct_{side}"] = _util_pct(ticks, f["wrk_seconds"])
        f[f"rss_load_{side}_mb"] = m.rss_max_kib / 1024


def _handshakes(ctx: TrialContext, pair: Pair, meter_b: TreeMeter) -> None:
    """Fresh mutual-TLS 1.3 connections straight to B: handshakes/s and B's CPU each."""
    mesh = ctx.backends.mesh
    assert mesh is not None
    client = mesh.workloads[CLIENT]
    argv = [sys.executable, "-m", "bench.tlsclient", "--port", str(pair.b.listen_port)]
    argv += ["--cert", str(client.chain), "--key", str(client.key), "--ca", str(mesh.root)]
    argv += ["--expect-uri", spiffe_uri(SERVER), "--threads", str(HANDSHAKE_THREADS)]
    argv += ["--seconds", str(ctx.settings.handshake_seconds)]
    for proto in pair.handshake_alpn or []:
        argv += ["--alpn", proto]
    secs = ctx.settings.handshake_seconds
    text, ticks, wall = _run_loadgen(ctx, "handshakes", argv, secs + 30, meter_b)
    result = parse_bulk(text)  # the last JSON line
    ctx.trial.raw["handshake_result"] = result
    done = int(result.get("handshakes", 0))
    if not done:
        raise BenchError(f"handshake client completed none: {result.get('error_kinds')}")
    ctx.trial.figures.update(
        hs_per_s=result["per_s"],
        hs_count=done,
        hs_cpu_us=ticks_to_us(ticks) / done,
        hs_cpu_util_pct=_util_pct(ticks, result["seconds"] or wall),
        hs_errors=result.get("errors", 0),
    )


def run_mtls(ctx: TrialContext) -> None:
    pair, proxy_a, proxy_b = _launch_pair(ctx)
    try:
        meter = PairMeter(TreeMeter(proxy_a.pid), TreeMeter(proxy_b.pid))
        _warm_up_http(pair.a.listen_port)
        ctx.trial.raw["mtls_evidence"] = _verify_mtls(ctx.trial.system, pair)
        time.sleep(IDLE_SETTLE_S)
        f = ctx.trial.figures
        f["rss_idle_a_mb"], f["rss_idle_b_mb"] = meter.a.rss() / 1024, meter.b.rss() / 1024
        f["rss_idle_mb"] = f["rss_idle_a_mb"] + f["rss_idle_b_mb"]
        ticks0 = (meter.a.ticks(), meter.b.ticks())
        _saturation(ctx, pair.a.listen_port, meter, ctx.settings.mesh_wrk_seconds)
        _split(ctx, meter, ticks0, "cpu_us_per_req")
        for proxy in (proxy_a, proxy_b):
            _ensure_alive(proxy, "the wrk run")
        _fixed_rate(ctx, pair.a.listen_port, meter, ctx.settings.mesh_hey_seconds)
        for proxy in (proxy_a, proxy_b):
            _ensure_alive(proxy, "the hey run")
        _handshakes(ctx, pair, meter.b)
        _ensure_alive(proxy_b, "the handshake run")
    finally:
        ctx.trial.raw["final_counters"] = final_state(ctx.trial.system, pair)
        _finish_side(ctx, "a", proxy_a)
        _finish_side(ctx, "b", proxy_b)


RUNNERS: dict[str, Callable[[TrialContext], None]] = {
    H1: run_h1,
    TCP: run_tcp,
    MTLS: run_mtls,
    CTRL: run_control_scale,
    H1R: run_h1_routes,
    H2: run_h2_one_proxy,
    GRPC: run_grpc_mesh,
}


def run_trial(trial: Trial, settings: Settings, backends: Backends, workdir: Path) -> Trial:
    """Run one trial; any BenchError is recorded on the trial instead of raised."""
    trial_dir = workdir / f"rep{trial.rep + 1}-{trial.scenario}-{trial.system}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        RUNNERS[trial.scenario](TrialContext(trial, settings, backends, trial_dir))
    except BenchError as exc:
        trial.error = str(exc)
    except Exception as exc:
        trial.error = f"harness error: {type(exc).__name__}: {exc}"
    trial.raw["trial_seconds"] = round(time.monotonic() - started, 2)
    return trial
