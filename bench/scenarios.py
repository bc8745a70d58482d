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
from bench.loadgen import hey_argv, parse_bulk, parse_hey, parse_wrk, wrk_argv
from bench.procs import Proc, TreeMeter, spawn, ticks_to_us, wait_sampling
from bench.systems import BUILDERS, LaunchSpec, Mode, start_proxy
from bench.tcpbulk import transfer

H1 = "h1-one-proxy"
TCP = "tcp-bulk"
SCENARIO_NAMES = (H1, TCP)
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


@dataclass(frozen=True)
class Backends:
    nginx_port: int | None
    sink_port: int | None


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
    ctx: TrialContext, name: str, argv: list[str], timeout: float, meter: TreeMeter
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


def _saturation(ctx: TrialContext, port: int, meter: TreeMeter) -> None:
    secs = ctx.settings.wrk_seconds
    text, ticks, wall = _run_loadgen(ctx, "wrk", wrk_argv(port, secs), secs + 30, meter)
    res = parse_wrk(text)
    if res.requests == 0:
        raise BenchError(f"wrk completed no requests: {text.strip()[-300:]}")
    ctx.trial.figures.update(
        rps=res.rps,
        requests=res.requests,
        cpu_us_per_req=ticks_to_us(ticks) / res.requests,
        cpu_util_pct=_util_pct(ticks, res.seconds or wall),
        rss_load_mb=meter.rss_max_kib / 1024,
        wrk_non_2xx=res.non_2xx,
        wrk_socket_errors=res.socket_errors,
    )


def _fixed_rate(ctx: TrialContext, port: int, meter: TreeMeter) -> None:
    secs = ctx.settings.hey_seconds
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


RUNNERS: dict[str, Callable[[TrialContext], None]] = {H1: run_h1, TCP: run_tcp}


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
