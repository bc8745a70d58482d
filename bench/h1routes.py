"""h1-routes: what balancing over 3 endpoints + 10 routes + metrics cost per request.

meshlet only; the "systems" of this scenario are three variants of the meshlet proxy,
rotated each rep like the systems of the other scenarios, each a fresh proxy pinned on the
proxy core, measured like h1-one-proxy (warm-up, 1 s, idle RSS, `wrk -t1 -c50`, CPU
from /proc over the wrk run, then hey at 2,000 req/s for the latency):

- `meshlet-1ep`: an outbound proxy in mesh mode (`MESHLET_CONTROL_ADDR`, identity, join
  token: it is certified and resolves `web:80` through the control plane's discovery
  stream) with one explicit listener `127.0.0.1:P=web:80`. The mesh file's `web` has
  `meshed: false` (plaintext), `ports: [80]`, ONE workload (nginx #1), no routes.
- `meshlet-3ep-10routes`: the same, but `web` has THREE workloads (three nginx processes)
  and 10 routes: r0..r8 match path prefixes /r0../r8 (with a header on even ones, the
  method POST on odd ones) that never fit wrk's `GET /`; the 10th, `default`, matches
  every request, with `timeout: 5s` and `retry: {statuses: [503], attempts: 2}`. So every
  request is compared with the 9 routes before it takes the catch-all, whose deadline
  timer is armed and cancelled and whose retry budget is paid into per request.
- `meshlet-standalone`: h1-one-proxy's meshlet (inbound, no control plane) in front of
  nginx #1, for reference.

A fresh control plane per meshed trial (CA and join token as in control-scale; the
control runs on the load core and only serves the one watch and the certificate).

Checks, or the trial fails: `meshlet routes web --control … --anchors … --json` lists the
expected endpoints and routes (10 or 0); the proxy's `/config` shows `web:80` resolved
from the mesh with them; one `GET /bench-503` through the proxy (nginx answers 503 there)
is retried twice by the catch-all route (`request_retries_total` = 2 in `/metrics`; no
such counter for meshlet-1ep), which shows that routes are compiled in the proxy and that
the catch-all is the route of unmatched requests. During wrk each nginx's share of the
responses is taken from its `/proc/PID/io` `wchar` (nginx writes only responses: access
log off; every response has the same size): each of the three must have served >= 1 %
(P2C over peak-EWMA latency need not split evenly; the shares are reported). After the
load every endpoint's `rtt_ms` in `/config` is non-null (a response head came back from
it) and its state is `ready`, and no retry happened.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.backend import NGINX_BODY, START_TIMEOUT, nginx_config
from bench.common import (
    LOAD_CORE,
    LOOPBACK,
    REPO_ROOT,
    BenchError,
    free_port,
    http_get,
    port_open,
    sleep_until,
)
from bench.controlscale import ACCOUNT, Control, Setup, prepare
from bench.mesh import spiffe_uri
from bench.procs import Proc, TreeMeter, process_tree, run_to_completion, spawn
from bench.systems import LaunchSpec, meshlet_spec, start_proxy

if TYPE_CHECKING:
    from bench.scenarios import Trial, TrialContext

H1R = "h1-routes"
ONE_EP = "meshlet-1ep"
ROUTED = "meshlet-3ep-10routes"
STANDALONE = "meshlet-standalone"
VARIANTS = (ONE_EP, ROUTED, STANDALONE)
SERVICE = "web"
SERVICE_PORT = 80
DEST = f"{SERVICE}:{SERVICE_PORT}"
ENDPOINTS = 3
ROUTES = 10
PROBE_503 = "/bench-503"
PROBE_RETRIES = 2  # the catch-all route's `attempts`
MIN_SHARE_PCT = 1.0  # each endpoint: at least this share of the wrk responses
CONTROL_TIMEOUT = 30.0
TARGET_DELTA_US = 5.0
IDLE_SETTLE_S = 1.0
PROXY_ENV = {"MESHLET_SHUTDOWN_GRACE": "1s"}  # quick stop; the rest as h1-one-proxy


# ---- backends: three nginx, each one worker ---------------------------------------------


@dataclass(frozen=True)
class WebBackends:
    """nginx #1..#3 (one master + one worker each, on the load core)."""

    ports: tuple[int, ...]
    procs: tuple[Proc, ...]
    response_bytes: int = 0  # one whole response to `GET /` (head + body), as nginx sends

    def written(self) -> list[int]:
        """Bytes each nginx has written (`wchar` over its process tree): its responses."""
        return [_wchar(p.pid) for p in self.procs]


def _wchar(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            text = Path(f"/proc/{pid}/io").read_text()
        except OSError:
            continue
        if m := re.search(r"^wchar:\s+(\d+)", text, re.MULTILINE):
            total += int(m.group(1))
    return total


def response_size(port: int) -> int:
    """Bytes of nginx's answer to a wrk-like `GET /` (keep-alive), read off the socket."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _whole(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 200 ") or len(data) != _whole(data):
        raise BenchError(f"nginx's response to GET / is not what was expected: {data!r}")
    return len(data)


def _whole(data: bytes) -> int:
    """Head + Content-Length of a response (a large number until the head is complete)."""
    head, sep, _ = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return len(head) + len(sep) + int(m.group(1)) if sep and m else 1 << 30


def web_nginx_config(workdir: Path, ports: tuple[int, ...]) -> str:
    """bench.backend's nginx (listening on every port of `ports`), plus
    `location = /bench-503` answering 503 (the probe)."""
    base = nginx_config(workdir, ports[0])
    anchor = "        location / {"
    listen = f"        listen {LOOPBACK}:{ports[0]} backlog=4096;\n"
    if anchor not in base or listen not in base:
        raise BenchError("bench.backend.nginx_config changed: cannot derive web's nginx")
    probe = f"        location = {PROBE_503} {{ return 503; }}\n"
    more = "".join(f"        listen {LOOPBACK}:{p} backlog=4096;\n" for p in ports[1:])
    return base.replace(anchor, probe + anchor, 1).replace(listen, listen + more, 1)


def start_web_nginx(name: str, d: Path, ports: tuple[int, ...]) -> Proc:
    """One nginx (one worker) on the load core; each port must answer `/` and the probe."""
    d.mkdir(parents=True)
    conf = d / "nginx.conf"
    conf.write_text(web_nginx_config(d, ports))
    argv = ["nginx", "-p", f"{d}/", "-c", str(conf), "-e", str(d / "error.log")]
    proc = spawn(name, argv, d, core=LOAD_CORE)
    deadline = time.monotonic() + START_TIMEOUT
    for port in ports:
        while not port_open(port):
            if not proc.alive() or not sleep_until(deadline, 0.05):
                proc.stop()
                raise BenchError(f"{name} did not start: {proc.log_tail()}")
        if http_get(port) != (200, NGINX_BODY.encode()) or http_get(port, PROBE_503)[0] != 503:
            raise BenchError(f"{name} answers wrongly on / or {PROBE_503}")
    return proc


def start_web_backends(workdir: Path, one_process: bool = False) -> WebBackends:
    """Three nginx processes (`one_process`: one nginx listening on three ports)."""
    ports = tuple(free_port() for _ in range(ENDPOINTS))
    if one_process:
        proc = start_web_nginx("web-nginx-3ports", workdir / "web-nginx-3ports", ports)
        return WebBackends(ports, (proc,), response_size(ports[0]))
    procs = tuple(start_web_nginx(f"web-nginx-{i + 1}", workdir / f"web-nginx-{i + 1}", (p,))
                  for i, p in enumerate(ports))
    return WebBackends(ports, procs, response_size(ports[0]))


# ---- the mesh ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the mesh file gives `web`: endpoints and which parts of the 10 routes."""

    endpoints: int
    matchers: bool = False  # r0..r8 (never matching wrk's GET /)
    catch_all: bool = False  # `default`, matching every request
    timeout: bool = False  # ... with `timeout: 5s`
    retry: bool = False  # ... with `retry: {statuses: [503], attempts: 2}`
    one_nginx: bool = False  # `python -m bench.h1routes` only: the endpoints are 3 ports
    # of one nginx process instead of 3 nginx processes


SHAPES = {ONE_EP: Shape(1), ROUTED: Shape(ENDPOINTS, True, True, True, True)}


def mesh_text(ports: tuple[int, ...], shape: Shape) -> str:
    """Service `web`: plaintext, port 80, one workload per nginx port, and its routes."""
    out = [f"services:\n  - name: {SERVICE}\n    meshed: false\n    ports: [{SERVICE_PORT}]\n"
           "    workloads:\n"]
    out += [f"      - address: {LOOPBACK}:{p}\n" for p in ports[:shape.endpoints]]
    if shape.matchers or shape.catch_all:
        out.append("    routes:\n")
    if shape.matchers:
        for k in range(ROUTES - 1):
            extra = f"headers: {{x-bench-route: r{k}}}" if k % 2 == 0 else "method: POST"
            out.append(f"      - name: r{k}\n"
                       f"        match: [{{path: {{prefix: /r{k}}}, {extra}}}]\n")
    if shape.catch_all:
        out.append("      - name: default\n")
        if shape.timeout:
            out.append("        timeout: 5s\n")
        if shape.retry:
            out.append(f"        retry: {{statuses: [503], attempts: {PROBE_RETRIES}}}\n")
    return "".join(out)


def start_control(setup: Setup, text: str) -> Control:
    """A fresh `meshlet control` on the load core, on a mesh file with `web`."""
    setup.mesh_file.write_text(text)
    port = free_port()
    argv = [sys.executable, "-m", "meshlet", "control"]
    started = time.time()
    proc = spawn("meshlet-control", argv, setup.trial_dir, core=LOAD_CORE,
                 env=setup.control_env(port), cwd=REPO_ROOT)
    ctl = Control(proc, port, started, setup.ctx)
    try:
        ctl.wait_services(1, CONTROL_TIMEOUT)
    except BaseException:
        proc.stop()
        raise
    return ctl


def meshed_spec(setup: Setup, ctl: Control) -> LaunchSpec:
    listen, admin = free_port(), free_port()
    env = {
        **PROXY_ENV,
        "MESHLET_CONTROL_ADDR": f"{LOOPBACK}:{ctl.port}",
        "MESHLET_TRUST_ANCHORS": str(setup.root),
        "MESHLET_IDENTITY": spiffe_uri(ACCOUNT),
        "MESHLET_JOIN_TOKEN_FILE": str(setup.token_file),
        "MESHLET_ADMIN_LISTEN_ADDR": f"{LOOPBACK}:{admin}",
        "MESHLET_INBOUND_LISTEN_ADDR": "",
        "MESHLET_OUTBOUND_LISTENERS": f"{LOOPBACK}:{listen}={DEST}",
    }
    argv = [sys.executable, "-m", "meshlet", "proxy"]
    return LaunchSpec(argv, listen, admin, "/ready", env=env, cwd=REPO_ROOT)


# ---- checks -----------------------------------------------------------------------------


def _admin(port: int, path: str) -> str:
    try:
        status, body = http_get(port, path, timeout=5)
    except OSError as exc:
        raise BenchError(f"admin {path}: {exc}") from exc
    if status != 200:
        raise BenchError(f"admin {path}: status {status}")
    return body.decode(errors="replace")


def destination(admin: int) -> dict[str, Any]:
    cfg = json.loads(_admin(admin, "/config"))
    dests = (cfg.get("discovery") or {}).get("destinations") or {}
    if DEST not in dests:
        raise BenchError(f"/config has no destination {DEST}: {sorted(dests)}")
    d: dict[str, Any] = dests[DEST]
    return d


def retries(admin: int) -> dict[str, float]:
    """`request_retries_total` and `retry_budget_exhausted_total` series from /metrics."""
    out = {}
    for line in _admin(admin, "/metrics").splitlines():
        if line.startswith(("request_retries_total", "retry_budget_exhausted_total")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def check_control_routes(ctx: TrialContext, setup: Setup, ctl: Control, n: int,
                         routes: int) -> None:
    """`meshlet routes web` against the control plane: n endpoints, `routes` routes."""
    base = [sys.executable, "-m", "meshlet", "routes", SERVICE, "--control",
            f"{LOOPBACK}:{ctl.port}", "--anchors", str(setup.root)]
    out = run_to_completion("meshlet-routes", [*base, "--json"], ctx.trial_dir, 30,
                            cwd=REPO_ROOT)
    ctx.trial.raw["meshlet_routes_table"] = run_to_completion(
        "meshlet-routes-table", base, ctx.trial_dir, 30, cwd=REPO_ROOT)
    try:
        ports = json.loads(out)["ports"]
    except (ValueError, KeyError) as exc:
        raise BenchError(f"`meshlet routes --json` printed {out[-300:]!r}") from exc
    port = next((v for k, v in ports.items() if k.endswith(f":{SERVICE_PORT}")), None)
    if port is None or len(port["endpoints"]) != n or len(port.get("routes") or []) != routes:
        raise BenchError(f"`meshlet routes {SERVICE}`: want {n} endpoint(s) and {routes} "
                         f"route(s), got {out[-600:]}")


def check_proxy_before(ctx: TrialContext, admin: int, n: int, routes: int) -> None:
    deadline = time.monotonic() + CONTROL_TIMEOUT
    d = destination(admin)
    while (d.get("state") != "mesh" or len(d.get("endpoints") or []) != n) \
            and sleep_until(deadline, 0.05):
        d = destination(admin)
    eps, rts = d.get("endpoints") or [], d.get("routes") or []
    if d.get("state") != "mesh" or len(eps) != n or len(rts) != routes \
            or any(e.get("identity") for e in eps):
        raise BenchError(f"/config {DEST}: want state mesh, {n} plaintext endpoint(s), "
                         f"{routes} route(s); got {json.dumps(d)[:600]}")
    status = http_get_via(ctx, PROBE_503)
    got = retries(admin)
    ctx.trial.raw["probe_503"] = {"status": status, "retries": got}
    want = PROBE_RETRIES if routes else 0
    total = sum(v for k, v in got.items() if k.startswith("request_retries_total"))
    if status != 503 or total != want or (want and not any(
            'route="default"' in k and "status_503" in k for k in got)):
        raise BenchError(f"probe GET {PROBE_503}: want 503 after {want} retries by route "
                         f"'default', got status {status}, counters {got}")


def http_get_via(ctx: TrialContext, path: str) -> int:
    port = int(ctx.trial.raw["listen_port"])
    try:
        return http_get(port, path, timeout=10)[0]
    except OSError as exc:
        raise BenchError(f"GET {path} through the proxy: {exc}") from exc


def check_proxy_after(ctx: TrialContext, admin: int, n: int) -> None:
    d = destination(admin)
    eps = d.get("endpoints") or []
    ctx.trial.raw["endpoints_after"] = eps
    bad = [e for e in eps if e.get("rtt_ms") is None or e.get("state") != "ready"]
    if len(eps) != n or bad:
        raise BenchError(f"after the load: want {n} used, ready endpoint(s); got {eps}")
    before = ctx.trial.raw["probe_503"]["retries"]
    after = retries(admin)
    ctx.trial.raw["retries_after"] = after
    if after != before:
        raise BenchError(f"retries during the load: before {before}, after {after}")


def endpoint_shares(ctx: TrialContext, web: WebBackends, w0: list[int], w1: list[int],
                    n: int) -> None:
    """Each nginx's share of the bytes written during wrk = its share of the responses."""
    f = ctx.trial.figures
    deltas = [b - a for a, b in zip(w0, w1, strict=True)]
    total = sum(deltas)
    ctx.trial.raw["nginx_wchar_delta"] = deltas
    if total <= 0:
        raise BenchError("no nginx wrote anything during wrk (/proc/PID/io unreadable?)")
    shares = [100 * x / total for x in deltas]
    f["nginx_bytes_per_req"] = per_req = total / f["requests"]
    ctx.trial.raw["nginx_response_bytes"] = web.response_bytes
    if abs(per_req / web.response_bytes - 1) > 0.01:
        raise BenchError(f"the nginx wrote {per_req:.1f} bytes per wrk request, one response "
                         f"is {web.response_bytes}: the shares would not be response counts")
    if any(deltas[n:]):
        raise BenchError(f"nginx beyond the first {n} served requests: {deltas}")
    used = shares[:n]
    f["ep_share_min_pct"], f["ep_share_max_pct"] = min(used), max(used)
    for i, s in enumerate(used):
        f[f"ep{i + 1}_share_pct"] = s
    if min(used) < MIN_SHARE_PCT:
        raise BenchError(f"endpoint shares of the wrk responses "
                         f"{', '.join(f'{x:.1f}' for x in used)} %: one below "
                         f"{MIN_SHARE_PCT:.0f} %")


# ---- the trial --------------------------------------------------------------------------


def run_h1_routes(ctx: TrialContext) -> None:
    web = ctx.backends.web
    if web is None:
        raise BenchError("the h1-routes backends are not running")
    variant = ctx.trial.system
    if variant == STANDALONE:
        spec = meshlet_spec("http", web.ports[0], ctx.trial_dir)
        spec.env.update(PROXY_ENV)
        measure(ctx, web, spec, None)
        return
    shape = SHAPES[variant]
    n, routes = shape.endpoints, ROUTES if shape.matchers else 0
    setup = prepare(ctx.trial_dir)
    ctl = start_control(setup, mesh_text(web.ports, shape))
    try:
        check_control_routes(ctx, setup, ctl, n, routes)
        ctx.trial.raw["mesh_file"] = setup.mesh_file.read_text()
        measure(ctx, web, meshed_spec(setup, ctl), (n, routes))
    finally:
        ctx.trial.raw["control_log_tail"] = ctl.proc.log_tail(20)
        ctl.proc.stop()


def measure(ctx: TrialContext, web: WebBackends, spec: LaunchSpec,
            meshed: tuple[int, int] | None) -> None:
    """h1-one-proxy's steps on one proxy, with the checks of a meshed variant
    (`meshed`: its endpoints and routes)."""
    from bench import scenarios as sc  # at run time: bench.scenarios imports this module

    raw = ctx.trial.raw
    raw["proxy_argv"], raw["proxy_env"] = spec.argv, spec.env
    raw["listen_port"] = spec.listen_port
    proxy = start_proxy("meshlet", spec, ctx.trial_dir, ctx.settings.ready_timeout)
    try:
        if meshed is not None:
            check_proxy_before(ctx, spec.ready_port, *meshed)
        meter = TreeMeter(proxy.pid)
        sc._warm_up_http(spec.listen_port)
        time.sleep(IDLE_SETTLE_S)
        ctx.trial.figures["rss_idle_mb"] = meter.rss() / 1024
        w0 = web.written()
        sc._saturation(ctx, spec.listen_port, meter)
        w1 = web.written()
        sc._ensure_alive(proxy, "the wrk run")
        endpoint_shares(ctx, web, w0, w1, meshed[0] if meshed else 1)
        sc._fixed_rate(ctx, spec.listen_port, meter)
        sc._ensure_alive(proxy, "the hey run")
        if meshed is not None:
            check_proxy_after(ctx, spec.ready_port, meshed[0])
    finally:
        sc._finish(ctx, proxy)


# ---- the target -----------------------------------------------------------------


def deltas(trials: list[Trial]) -> dict[str, Any]:
    """CPU µs/request of 3ep-10routes minus 1ep (and 1ep minus standalone), per rep
    (paired: the same rep) and of the medians; the target on the paired median."""
    per: dict[str, dict[int, float]] = {v: {} for v in VARIANTS}
    for t in trials:
        if t.scenario == H1R and not t.error and "cpu_us_per_req" in t.figures:
            per[t.system][t.rep] = t.figures["cpu_us_per_req"]
    out: dict[str, Any] = {"target_us": TARGET_DELTA_US}
    for key, hi, lo in (("routed_minus_1ep", ROUTED, ONE_EP),
                        ("1ep_minus_standalone", ONE_EP, STANDALONE)):
        reps = sorted(set(per[hi]) & set(per[lo]))
        if not reps:
            continue
        paired = [per[hi][r] - per[lo][r] for r in reps]
        out[key] = {
            "paired_us": paired,
            "paired_median_us": statistics.median(paired),
            "median_minus_median_us": statistics.median(per[hi].values())
            - statistics.median(per[lo].values()),
        }
    return out


def target_lines(d: dict[str, Any]) -> list[str]:
    out = []
    labels = (("routed_minus_1ep", f"{ROUTED} - {ONE_EP}"),
              ("1ep_minus_standalone", f"{ONE_EP} - {STANDALONE}"))
    for key, label in labels:
        x = d.get(key)
        if x is None:
            continue
        reps = ", ".join(f"{v:+.1f}" for v in x["paired_us"])
        line = (f"CPU µs/request {label}: {x['paired_median_us']:+.1f} µs (median of the "
                f"per-rep differences {reps}; difference of medians "
                f"{x['median_minus_median_us']:+.1f})")
        if key == "routed_minus_1ep":
            ok = x["paired_median_us"] <= d["target_us"]
            line += f"; target ≤ {d['target_us']:.0f} µs: {'met' if ok else 'MISSED'}"
        out.append(line)
    return out


# ---- `python -m bench.h1routes`: where the extra CPU goes (not part of `python -m bench`)


def _split_shapes() -> dict[str, Shape]:
    parts = {"": {}, "+catch-all": {"catch_all": True},
             "+catch-all+timeout": {"catch_all": True, "timeout": True},
             "+catch-all+retry": {"catch_all": True, "retry": True},
             "+9matchers+catch-all": {"matchers": True, "catch_all": True},
             "+10routes": {"matchers": True, "catch_all": True, "timeout": True, "retry": True}}
    out = {f"{n}ep{k}": Shape(n, **v) for n in (1, ENDPOINTS) for k, v in parts.items()}
    for k in ("", "+10routes"):
        out[f"3ep@1nginx{k}"] = Shape(ENDPOINTS, one_nginx=True, **parts[k])
    return out


SPLIT = _split_shapes()


def split_trial(work: Path, web: WebBackends, name: str, seconds: int
                ) -> tuple[float, float, float]:
    """One fresh control + proxy with SPLIT[name]; warm-up, 1 s, wrk:
    (µs/request, req/s, proxy CPU %)."""
    from bench import scenarios as sc
    from bench.loadgen import parse_wrk, wrk_argv
    from bench.procs import ticks_to_us, wait_sampling

    setup = prepare(work)
    ctl = start_control(setup, mesh_text(web.ports, SPLIT[name]))
    try:
        spec = meshed_spec(setup, ctl)
        proxy = start_proxy("meshlet", spec, work, 20.0)
        try:
            sc._warm_up_http(spec.listen_port)
            time.sleep(IDLE_SETTLE_S)
            meter = TreeMeter(proxy.pid)
            t0 = meter.ticks()
            wrk = spawn("wrk", wrk_argv(spec.listen_port, seconds), work, core=LOAD_CORE)
            if wait_sampling(wrk, seconds + 30, lambda: None) != 0:
                raise BenchError(f"wrk failed: {wrk.log_tail()}")
            ticks = meter.ticks() - t0
            res = parse_wrk(wrk.log_path.read_text())
            if res.non_2xx or res.socket_errors or not res.requests:
                raise BenchError(f"wrk: {res}")
            util = 100 * ticks_to_us(ticks) / 1e6 / res.seconds
            return ticks_to_us(ticks) / res.requests, res.rps, util
        finally:
            proxy.stop()
    finally:
        ctl.proc.stop()


def split_main(argv: list[str] | None = None) -> int:
    """Each SPLIT shape `--reps` times (rotated), wrk only; medians and the difference to
    1ep. Same pinning and wrk as the scenario."""
    import argparse
    import shutil
    import tempfile

    from bench.cli import cleanup_on_signals, rotated

    p = argparse.ArgumentParser(prog="python -m bench.h1routes", description=split_main.__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--shapes", default=",".join(SPLIT), help="default: " + ",".join(SPLIT))
    a = p.parse_args(argv)
    names = [n for n in a.shapes.split(",") if n]
    if unknown := [n for n in names if n not in SPLIT]:
        p.error(f"unknown shapes {unknown}")
    os.sched_setaffinity(0, {LOAD_CORE})
    work = Path(tempfile.mkdtemp(prefix="meshlet-bench-split-"))
    got: dict[str, list[float]] = {n: [] for n in names}
    try:
        with cleanup_on_signals():
            web = start_web_backends(work)
            multi = start_web_backends(work, one_process=True)
            for rep in range(a.reps):
                for name in rotated(names, rep):
                    d = work / f"rep{rep + 1}-{name}"
                    d.mkdir()
                    backends = multi if SPLIT[name].one_nginx else web
                    us, rps, util = split_trial(d, backends, name, a.seconds)
                    got[name].append(us)
                    print(f"[rep {rep + 1}/{a.reps}] {name:24} {us:5.1f} µs/req {rps:9,.0f} req/s"
                          f"  proxy CPU {util:.0f} %", file=sys.stderr)
    except BenchError as exc:
        print(f"bench.h1routes: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(got[names[0]])
    print(f"{'shape':24} {'µs/req (median)':>16} {'vs ' + names[0]:>10}  per rep")
    for name in names:
        med = statistics.median(got[name])
        reps = " ".join(f"{x:.1f}" for x in got[name])
        print(f"{name:24} {med:16.1f} {med - base:+10.1f}  {reps}")
    return 0


if __name__ == "__main__":
    sys.exit(split_main())
