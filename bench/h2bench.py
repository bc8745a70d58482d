"""HTTP/2 scenarios: `h2-one-proxy` (h2load → proxy → nghttpd, h2c both legs) and
`grpc-mesh-mtls` (grpcio client → proxy A → HTTP/2 over mutual TLS 1.3 → proxy B →
grpcio server, unary calls with a small raw-bytes payload).

Both are measured like the HTTP/1.1 scenarios: a fresh proxy process (pair) per trial on
the proxy core, load generator and backend on the load core, CPU from /proc utime+stime
of the proxy tree(s) over a fixed-duration load run divided by the requests (calls) it
completed, RSS idle after warm-up + 1 s and max under load.

- h2-one-proxy: warm-up (one `nghttp` GET whose body must be the served file, then
  `h2load -n 200 -c 2 -m 5`, all 2xx), 1 s, idle RSS; saturation `h2load -c 10 -m 10
  -D 15`; latency at a fixed rate below saturation `h2load -c 10 -m 1 --rps 200 -D 15`
  (10 clients x 200 req/s = 2,000 req/s) with `--log-file` (per-request latency, from
  which p50/p99/max are computed). Every h2load run must have all requests succeeded
  (status 2xx), 0 failed, 0 errored, 0 timeout.
- grpc-mesh-mtls: the server is `python -m bench.h2bench server` (grpcio, generic
  handler `/bench.Echo/Unary` returning the request bytes); the client
  `python -m bench.h2bench client` (one channel = one HTTP/2 connection, N threads each
  making blocking unary calls for a fixed time; each answer must equal the request).
  Warm-up 200 calls, then mTLS evidence as h1-mesh-mtls (`bench.mesh.verify_mtls`).

`python -m bench.h2bench server|client ...` are the gRPC helpers (run by the harness).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import LOAD_CORE, LOOPBACK, REPO_ROOT, BenchError, free_port, port_open
from bench.mesh import (
    Mesh,
    Pair,
    _envoy_argv,
    envoy_pair_config,
    final_state,
    meshlet_pair,
    verify_mtls,
)
from bench.procs import PairMeter, Proc, TreeMeter, run_to_completion, spawn, ticks_to_us
from bench.systems import (
    LaunchSpec,
    envoy_config,
    haproxy_config,
    meshlet_spec,
    start_proxy,
)

if TYPE_CHECKING:
    from bench.scenarios import TrialContext

H2 = "h2-one-proxy"
GRPC = "grpc-mesh-mtls"
NGHTTPD_BODY = "hello from nghttpd\n"
GRPC_METHOD = "/bench.Echo/Unary"
GRPC_PAYLOAD = 64  # bytes per request (echoed back)
GRPC_THREADS = 16
START_TIMEOUT = 15.0
IDLE_SETTLE_S = 1.0
H2LOAD_SAT = ("-c", "10", "-m", "10")
H2LOAD_RATE = ("-c", "10", "-m", "1", "--rps", "200")  # 10 x 200 = 2,000 req/s
H2_TARGET_RATIO = 2.0  # the issue: meshlet's h2-one-proxy CPU µs/request <= 2x Envoy's
H2_SYSTEMS = ("meshlet", "envoy", "haproxy")
GRPC_SYSTEMS = ("meshlet", "envoy")  # no HAProxy pair for gRPC


# ---- backends on the load core ----------------------------------------------------------


@dataclass(frozen=True)
class H2Backends:
    nghttpd_port: int | None = None
    grpc_port: int | None = None


def _wait_port(proc: Proc, port: int, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not port_open(port):
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise BenchError(f"{what} did not start: {proc.log_tail()}")
        time.sleep(0.05)


def start_nghttpd(workdir: Path, log_dir: Path) -> int:
    """nghttpd (nghttp2-server), h2c only, one worker, serving index.html (the body)."""
    docs = workdir / "nghttpd-docs"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "index.html").write_text(NGHTTPD_BODY)
    port = free_port()
    argv = ["nghttpd", "--no-tls", "-n", "1", "-d", str(docs), "--address", LOOPBACK, str(port)]
    proc = spawn("nghttpd", argv, log_dir, core=LOAD_CORE)
    _wait_port(proc, port, "nghttpd")
    return port


def start_grpc_server(log_dir: Path) -> int:
    port = free_port()
    argv = [sys.executable, "-m", "bench.h2bench", "server", "--port", str(port)]
    proc = spawn("grpc-server", argv, log_dir, core=LOAD_CORE, cwd=REPO_ROOT)
    _wait_port(proc, port, "grpc server")
    return port


def start_h2_backends(scenarios: list[str], workdir: Path, log_dir: Path) -> H2Backends:
    return H2Backends(
        nghttpd_port=start_nghttpd(workdir, log_dir) if H2 in scenarios else None,
        grpc_port=start_grpc_server(log_dir) if GRPC in scenarios else None,
    )


# ---- h2c proxies: Envoy and HAProxy configs (meshlet: its standalone inbound) -----------


def _envoy_h2_hcm(chain: dict[str, Any]) -> None:
    hcm = chain["filters"][0]["typed_config"]
    hcm["codec_type"] = "HTTP2"
    hcm["http2_protocol_options"] = {}


def _envoy_h2_cluster(cluster: dict[str, Any]) -> None:
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def envoy_h2_spec(upstream: int, workdir: Path) -> LaunchSpec:
    """h1-one-proxy's Envoy with HTTP/2 downstream (codec HTTP2) and h2c upstream."""
    listen, admin = free_port(), free_port()
    cfg = envoy_config("http", listen, admin, upstream)
    res = cfg["static_resources"]
    assert isinstance(res, dict)
    _envoy_h2_hcm(res["listeners"][0]["filter_chains"][0])
    _envoy_h2_cluster(res["clusters"][0])
    path = workdir / "envoy.yaml"  # JSON is valid YAML
    path.write_text(json.dumps(cfg, indent=1))
    return LaunchSpec(_envoy_argv(path, admin), listen, admin, "/ready")


def haproxy_h2_spec(upstream: int, workdir: Path) -> LaunchSpec:
    """h1-one-proxy's HAProxy with `proto h2` on the bind (h2c) and on the server."""
    listen, admin = free_port(), free_port()
    text = haproxy_config("http", listen, admin, upstream)
    bind, server = f"bind {LOOPBACK}:{listen}\n", f"server upstream {LOOPBACK}:{upstream}\n"
    if bind not in text or server not in text:
        raise BenchError("bench.systems.haproxy_config changed: cannot derive the h2 config")
    text = text.replace(bind, bind.rstrip("\n") + " proto h2\n")
    text = text.replace(server, server.rstrip("\n") + " proto h2\n")
    path = workdir / "haproxy.cfg"
    path.write_text(text)
    return LaunchSpec(["haproxy", "-db", "-f", str(path)], listen, admin, "/ready")


def h2_spec(system: str, upstream: int, workdir: Path) -> LaunchSpec:
    if system == "meshlet":
        return meshlet_spec("http", upstream, workdir)  # detects h2c, speaks h2c to the app
    if system == "envoy":
        return envoy_h2_spec(upstream, workdir)
    if system == "haproxy":
        return haproxy_h2_spec(upstream, workdir)
    raise BenchError(f"no h2-one-proxy config for {system}")


# ---- gRPC pairs ---------------------------------------------------------------------------


def envoy_grpc_pair(upstream: int, mesh: Mesh, workdir: Path) -> Pair:
    """h1-mesh-mtls' Envoy pair with HTTP/2 everywhere: A h2c in, HTTP/2 over mTLS (ALPN
    h2) out; B mTLS (client cert required, ALPN h2) in, h2c out to the grpc server."""
    pa, pb, aa, ab = free_port(), free_port(), free_port(), free_port()
    specs = {}
    for side, listen, admin, up in (("a", pa, aa, pb), ("b", pb, ab, upstream)):
        cfg = envoy_pair_config(side, listen, admin, up, mesh)
        res = cfg["static_resources"]
        chain, cluster = res["listeners"][0]["filter_chains"][0], res["clusters"][0]
        _envoy_h2_hcm(chain)
        _envoy_h2_cluster(cluster)
        tls = (cluster if side == "a" else chain)["transport_socket"]["typed_config"]
        tls["common_tls_context"]["alpn_protocols"] = ["h2"]
        path = workdir / f"envoy-{side}.yaml"
        path.write_text(json.dumps(cfg, indent=1))
        specs[side] = LaunchSpec(_envoy_argv(path, admin), listen, admin, "/ready")
    return Pair(a=specs["a"], b=specs["b"], handshake_alpn=None)


def grpc_pair(system: str, upstream: int, mesh: Mesh, workdir: Path) -> Pair:
    if system == "meshlet":
        return meshlet_pair(upstream, mesh, workdir)  # HTTP/2 follows the client's h2c
    if system == "envoy":
        return envoy_grpc_pair(upstream, mesh, workdir)
    raise BenchError(f"no grpc-mesh-mtls pair for {system} (meshlet and envoy only)")


# ---- h2load -------------------------------------------------------------------------------


@dataclass
class H2loadResult:
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int  # counted when a response head arrives: with -D, a few more than done
    status_other: int  # 3xx + 4xx + 5xx
    seconds: float
    rps: float


def parse_h2load(text: str) -> H2loadResult:
    import re

    fin = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", text)
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not (fin and req and codes):
        raise BenchError(f"cannot parse h2load output: {text.strip()[-400:]!r}")
    secs = float(fin.group(1)) * (1e-3 if fin.group(2) == "ms" else 1.0)
    g = [int(x) for x in req.groups()]
    other = sum(int(x) for x in codes.groups()[1:])
    return H2loadResult(g[2], g[3], g[4], g[5], g[6], int(codes.group(1)), other, secs,
                        float(fin.group(3)))


def check_h2load(res: H2loadResult, what: str, text: str) -> None:
    if (not res.done or res.failed or res.errored or res.timeout
            or res.succeeded != res.done or res.status_other or res.status_2xx < res.done):
        raise BenchError(f"{what}: not every request succeeded with a 2xx: {res}; h2load "
                         f"output tail:\n{text.strip()[-700:]}")


def h2load_argv(port: int, *opts: str) -> list[str]:
    return ["h2load", *opts, f"http://{LOOPBACK}:{port}/"]


def latency_ms(log_file: Path) -> dict[str, float]:
    """p50/p99/max from h2load's --log-file (start µs, status, elapsed µs per request)."""
    vals = []
    for line in log_file.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            vals.append(int(parts[2]) / 1000)
    if not vals:
        raise BenchError("h2load --log-file is empty")
    vals.sort()
    q = statistics.quantiles(vals, n=100, method="inclusive")
    return {"p50_ms": q[49], "p99_ms": q[98], "max_ms": vals[-1], "latency_n": len(vals)}


def _warm_up_h2(ctx: TrialContext, port: int) -> None:
    out = run_to_completion("nghttp-get", ["nghttp", f"http://{LOOPBACK}:{port}/"],
                            ctx.trial_dir, 20, core=LOAD_CORE)
    if out != NGHTTPD_BODY:
        raise BenchError(f"GET / through the proxy (nghttp): body {out[:200]!r}")
    text = run_to_completion("h2load-warmup", h2load_argv(port, "-n", "200", "-c", "2",
                                                          "-m", "5"),
                             ctx.trial_dir, 30, core=LOAD_CORE)
    check_h2load(parse_h2load(text), "warm-up h2load -n 200", text)


def run_h2_one_proxy(ctx: TrialContext) -> None:
    from bench import scenarios as sc  # at run time: bench.scenarios imports this module

    port = ctx.backends.h2.nghttpd_port if ctx.backends.h2 else None
    if port is None:
        raise BenchError("nghttpd is not running")
    system = ctx.trial.system
    spec = h2_spec(system, port, ctx.trial_dir)
    ctx.trial.raw["proxy_argv"], ctx.trial.raw["proxy_env"] = spec.argv, spec.env
    proxy = start_proxy(system, spec, ctx.trial_dir, ctx.settings.ready_timeout)
    f = ctx.trial.figures
    try:
        meter = TreeMeter(proxy.pid)
        _warm_up_h2(ctx, spec.listen_port)
        time.sleep(IDLE_SETTLE_S)
        f["rss_idle_mb"] = meter.rss() / 1024
        secs = ctx.settings.wrk_seconds
        argv = h2load_argv(spec.listen_port, *H2LOAD_SAT, "-D", str(secs))
        text, ticks, wall = sc._run_loadgen(ctx, "h2load", argv, secs + 30, meter)
        res = parse_h2load(text)
        f.update(requests=res.done, rps=res.rps, h2load_seconds=res.seconds,
                 cpu_us_per_req=ticks_to_us(ticks) / max(res.done, 1),
                 cpu_util_pct=sc._util_pct(ticks, wall), rss_load_mb=meter.rss_max_kib / 1024,
                 h2load_bad=res.failed + res.errored + res.timeout + res.status_other)
        check_h2load(res, "h2load saturation run", text)
        sc._ensure_alive(proxy, "the h2load saturation run")
        secs = ctx.settings.hey_seconds
        log = ctx.trial_dir / "h2load-rate.tsv"
        argv = h2load_argv(spec.listen_port, *H2LOAD_RATE, "-D", str(secs), "--log-file",
                           str(log))
        text, _, _ = sc._run_loadgen(ctx, "h2load_rate", argv, secs + 30, meter)
        res = parse_h2load(text)
        f.update(rate_rps=res.rps, rate_requests=res.done,
                 rate_bad=res.failed + res.errored + res.timeout + res.status_other)
        check_h2load(res, "h2load fixed-rate run", text)
        f.update(latency_ms(log))
        sc._ensure_alive(proxy, "the h2load fixed-rate run")
    finally:
        sc._finish(ctx, proxy)


# ---- grpc-mesh-mtls -------------------------------------------------------------------------


def grpc_client_argv(port: int, *, seconds: float = 0, calls: int = 0,
                     threads: int = GRPC_THREADS) -> list[str]:
    argv = [sys.executable, "-m", "bench.h2bench", "client", "--port", str(port),
            "--threads", str(threads), "--payload", str(GRPC_PAYLOAD)]
    return argv + (["--calls", str(calls)] if calls else ["--seconds", str(seconds)])


def _client_result(text: str, what: str) -> dict[str, Any]:
    from bench.loadgen import parse_bulk

    result = parse_bulk(text)
    if not result.get("calls") or result.get("errors") or result.get("mismatches"):
        raise BenchError(f"{what}: {result}")
    return result


def run_grpc_mesh(ctx: TrialContext) -> None:
    from bench import scenarios as sc

    mesh = ctx.backends.mesh
    upstream = ctx.backends.h2.grpc_port if ctx.backends.h2 else None
    if mesh is None or upstream is None:
        raise BenchError("the grpc server or the mesh PKI is not running")
    system = ctx.trial.system
    pair = grpc_pair(system, upstream, mesh, ctx.trial_dir)
    for side, spec in (("a", pair.a), ("b", pair.b)):
        ctx.trial.raw[f"proxy_{side}_argv"], ctx.trial.raw[f"proxy_{side}_env"] = (
            spec.argv, spec.env)
    timeout = ctx.settings.ready_timeout
    proxy_b = start_proxy(f"{system}-b", pair.b, ctx.trial_dir, timeout)
    try:
        proxy_a = start_proxy(f"{system}-a", pair.a, ctx.trial_dir, timeout)
    except BaseException:
        sc._finish_side(ctx, "b", proxy_b)
        raise
    f = ctx.trial.figures
    try:
        meter = PairMeter(TreeMeter(proxy_a.pid), TreeMeter(proxy_b.pid))
        warm = run_to_completion("grpc-warmup", grpc_client_argv(pair.a.listen_port, calls=200,
                                                                 threads=4),
                                 ctx.trial_dir, 60, core=LOAD_CORE, cwd=REPO_ROOT)
        _client_result(warm, "gRPC warm-up (200 calls)")
        ctx.trial.raw["mtls_evidence"] = verify_mtls(system, pair)
        time.sleep(IDLE_SETTLE_S)
        f["rss_idle_a_mb"], f["rss_idle_b_mb"] = meter.a.rss() / 1024, meter.b.rss() / 1024
        f["rss_idle_mb"] = f["rss_idle_a_mb"] + f["rss_idle_b_mb"]
        ta, tb = meter.a.ticks(), meter.b.ticks()
        secs = ctx.settings.mesh_wrk_seconds
        argv = grpc_client_argv(pair.a.listen_port, seconds=secs)
        text, ticks, wall = sc._run_loadgen(ctx, "grpc_client", argv, secs + 60, meter)
        res = parse_grpc(text)
        ctx.trial.raw["grpc_result"] = res
        calls = int(res.get("calls", 0))
        f.update(calls=calls, calls_per_s=res.get("per_s", 0.0),
                 grpc_errors=res.get("errors", 0) + res.get("mismatches", 0),
                 cpu_us_per_call=ticks_to_us(ticks) / max(calls, 1),
                 cpu_util_pct=sc._util_pct(ticks, res.get("seconds") or wall),
                 rss_load_mb=meter.rss_max_kib / 1024,
                 p50_ms=res.get("p50_ms", 0.0), p99_ms=res.get("p99_ms", 0.0))
        for side, m, t0 in (("a", meter.a, ta), ("b", meter.b, tb)):
            f[f"cpu_us_per_call_{side}"] = ticks_to_us(m.ticks() - t0) / max(calls, 1)
            f[f"rss_load_{side}_mb"] = m.rss_max_kib / 1024
        _client_result(text, "gRPC load run")
        for proxy in (proxy_a, proxy_b):
            sc._ensure_alive(proxy, "the gRPC load run")
    finally:
        ctx.trial.raw["final_counters"] = final_state(system, pair)
        sc._finish_side(ctx, "a", proxy_a)
        sc._finish_side(ctx, "b", proxy_b)


def parse_grpc(text: str) -> dict[str, Any]:
    from bench.loadgen import parse_bulk

    return parse_bulk(text)


# ---- report helpers (registered in bench.cli: bench.report cannot import this module) -----

# (key, label, fmt, parts, agg, ratio, table)
METRIC_ROWS: dict[str, tuple[tuple[Any, ...], ...]] = {
    H2: (
        ("rps", "req/s at saturation (h2load)", "{:,.0f}", (), "median", True, True),
        ("cpu_us_per_req", "proxy CPU µs / request", "{:.1f}", (), "median", True, True),
        ("cpu_util_pct", "proxy CPU % during h2load", "{:.0f}", (), "median", False, True),
        ("rss_idle_mb", "RSS idle, MiB", "{:.1f}", (), "median", True, True),
        ("rss_load_mb", "RSS under load (max), MiB", "{:.1f}", (), "median", True, True),
        ("p50_ms", "p50 ms @2,000 req/s (h2load)", "{:.2f}", (), "median", True, True),
        ("p99_ms", "p99 ms @2,000 req/s", "{:.2f}", (), "median", True, True),
        ("max_ms", "max ms @2,000 req/s", "{:.2f}", (), "median", True, True),
        ("rate_rps", "rate achieved, req/s", "{:,.0f}", (), "median", False, True),
        ("bad", "failed/errored/non-2xx (sum)", "{:.0f}", ("h2load_bad", "rate_bad"), "sum",
         False, True),
    ),
    GRPC: (
        ("calls_per_s", "unary calls/s (grpcio client)", "{:,.0f}", (), "median", True, True),
        ("cpu_us_per_call", "CPU µs / call, A + B", "{:.1f}", (), "median", True, True),
        ("cpu_us_per_call_a", "  … A", "{:.1f}", (), "median", True, True),
        ("cpu_us_per_call_b", "  … B", "{:.1f}", (), "median", True, True),
        ("cpu_util_pct", "CPU % (A + B, core 0)", "{:.0f}", (), "median", False, True),
        ("rss_idle_mb", "RSS idle, A + B, MiB", "{:.1f}", (), "median", True, True),
        ("rss_load_mb", "RSS under load (max), A + B, MiB", "{:.1f}", (), "median", True,
         True),
        ("p50_ms", "client p50 ms (saturated)", "{:.2f}", (), "median", True, True),
        ("p99_ms", "client p99 ms (saturated)", "{:.2f}", (), "median", True, True),
        ("grpc_errors", "call errors + mismatches (sum)", "{:.0f}", (), "sum", False, True),
    ),
}


def target_lines(summary: dict[str, Any]) -> list[str]:
    cells = summary.get(H2, {})
    m = cells.get("meshlet", {}).get("cpu_us_per_req")
    e = cells.get("envoy", {}).get("cpu_us_per_req")
    if not m or not e:
        return []
    ratio = m["value"] / e["value"]
    ok = ratio <= H2_TARGET_RATIO
    return [f"target: h2-one-proxy CPU µs/request meshlet {m['value']:.1f} vs Envoy "
            f"{e['value']:.1f} = {ratio:.2f}x; ≤ {H2_TARGET_RATIO:.0f}x: "
            f"{'met' if ok else 'MISSED'}"]


# ---- `python -m bench.h2bench server|client`: the gRPC helpers ------------------------------


def serve(port: int) -> None:
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_THREADS))
    handler = grpc.unary_unary_rpc_method_handler(lambda req, _ctx: req)
    service, method = GRPC_METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),))
    server.add_insecure_port(f"{LOOPBACK}:{port}")
    server.start()
    print(f"grpc server on {port}", flush=True)
    server.wait_for_termination()


def client(port: int, threads: int, seconds: float, calls: int, payload: int) -> dict[str, Any]:
    """`threads` threads share one channel (one HTTP/2 connection) making blocking unary
    calls until `seconds` passed (or `calls` were made); each answer must be the request."""
    import grpc

    channel = grpc.insecure_channel(f"{LOOPBACK}:{port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    unary = channel.unary_unary(GRPC_METHOD)
    lock = threading.Lock()
    state = {"calls": 0, "errors": 0, "mismatches": 0}
    kinds: dict[str, int] = {}
    lat: list[list[float]] = [[] for _ in range(threads)]
    budget = [calls]
    t0 = time.monotonic()
    end = t0 + seconds if seconds else float("inf")

    def work(i: int) -> None:
        body = bytes([65 + i % 26]) * payload
        mine = lat[i]
        while time.monotonic() < end:
            if calls:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
            s = time.perf_counter()
            try:
                got = unary(body, timeout=10)
            except grpc.RpcError as exc:
                with lock:
                    state["errors"] += 1
                    kinds[str(exc.code())] = kinds.get(str(exc.code()), 0) + 1
                continue
            mine.append(time.perf_counter() - s)
            if got != body:
                with lock:
                    state["mismatches"] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    took = time.monotonic() - t0
    channel.close()
    all_lat = sorted(x * 1e3 for xs in lat for x in xs)
    n = len(all_lat)
    out: dict[str, Any] = {**state, "calls": n, "seconds": took, "per_s": n / took,
                           "error_kinds": kinds, "threads": threads, "payload": payload}
    if n >= 2:
        q = statistics.quantiles(all_lat, n=100, method="inclusive")
        out.update(p50_ms=q[49], p99_ms=q[98], max_ms=all_lat[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.h2bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--threads", type=int, default=GRPC_THREADS)
    c.add_argument("--seconds", type=float, default=0)
    c.add_argument("--calls", type=int, default=0)
    c.add_argument("--payload", type=int, default=GRPC_PAYLOAD)
    a = p.parse_args(argv)
    if a.cmd == "server":
        serve(a.port)
        return 0
    if not a.seconds and not a.calls:
        p.error("--seconds or --calls")
    print(json.dumps(client(a.port, a.threads, a.seconds, a.calls, a.payload)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
