"""control-scale: meshlet's control plane with a large mesh file and many real proxies.

One trial (meshlet only, run once per run: its repetitions are internal), four parts, all
against one fresh control-plane state (a CA made here, one join token from the CLI):

1. load: `meshlet control` started on a mesh file of N services x 3 workloads, a fresh
   process `load_reps` times: spawn -> `GET /v1/status` answers with N services (and the
   control's own "mesh file ...: N service(s)" log line); VmRSS / VmHWM 1 s later. Once
   also with a 10-service file (the baseline), and the parse in the harness's process.
2. reload: atomic edits of the N-service file (one service added, then removed again):
   write -> the control's "mesh file reloaded" log line, and -> `/v1/status` shows it.
3. propagation: P real `meshlet proxy` processes, each with one outbound listener for one
   of svc-0..svc-9 (so every proxy holds one watch on the control plane). Each round
   rewrites the file atomically with a new, unique 4th workload for those ten services;
   latency of a proxy = the timestamp of its log line "destination svc-K:80: 4
   endpoint(s)" - the time taken just before the os.replace. Then every proxy's /config
   must show the new endpoint. Done on the N-service file, then on a 10-service file
   (the same fan-out without the big parse).
4. proxy RSS: one fresh proxy using 3 services (svc-0..2); VmRSS with the 10-service mesh
   (ready, resolved, 2 s idle, and again 2 s later), then the file grows to N services
   with those 3 unchanged; VmRSS 2 s after the control applied it. `rss_reps` proxies.

Pinning: the control plane runs on core 0 (the "system under test" core); the proxies
and the harness share core 1, so a proxy's update latency includes waiting for its turn
on that core behind the others.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import math
import os
import random
import re
import signal
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import LOAD_CORE, LOOPBACK, PROXY_CORE, REPO_ROOT, BenchError, free_port
from bench.common import http_get as _http_get
from bench.mesh import TRUST_DOMAIN, spiffe_uri
from bench.procs import Proc, cpu_ticks, rss_kib, run_to_completion, spawn, ticks_to_us

if TYPE_CHECKING:
    from bench.scenarios import TrialContext

CTRL = "control-scale"
ENDPOINTS = 3  # workloads per service
SMALL = 10  # services of the small mesh (baseline, proxy RSS "before")
WATCHED = 10  # the proxies are spread over svc-0..svc-9
USED = 3  # outbound listeners of the RSS proxy (svc-0..svc-2)
ACCOUNT = "client"
STATUS_POLL_S = 0.02
LOG_POLL_S = 0.05
SETTLE_S = 1.0  # after a control load, before its RSS
IDLE_S = 2.0  # proxy idle before each RSS reading
START_TIMEOUT = 120.0  # control start with a big file; a batch of proxies
UPDATE_TIMEOUT = 30.0
PROXY_ENV = {"MESHLET_LOG_LEVEL": "info", "MESHLET_SHUTDOWN_GRACE": "1s"}

TARGET_PROP_P99_MS = 1000.0
TARGET_PROXY_GROWTH_KIB = 1024.0


@dataclass(frozen=True)
class ScaleSettings:
    services: int  # N
    proxies: int  # P
    rounds: int  # propagation rounds per mesh size
    load_reps: int  # fresh control starts on the N-service file
    reload_edits: int
    rss_reps: int  # fresh proxies for the RSS growth
    batch: int = 10  # proxies started at once


FULL = ScaleSettings(services=10_000, proxies=100, rounds=5, load_reps=3, reload_edits=4,
                     rss_reps=3)
QUICK = ScaleSettings(services=1_000, proxies=20, rounds=3, load_reps=1, reload_edits=2,
                      rss_reps=1)


# ---- the mesh file -------------------------------------------------------------


def workload_addr(i: int, j: int) -> str:
    """Workload j of svc-i: the same address whatever the size of the mesh."""
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{8080 + j}"


def mesh_text(services: int, extra: str | None = None, tail: bool = False) -> str:
    """svc-0..svc-(n-1), `ports: [80]`, 3 workloads each; `extra` is a 4th workload of
    svc-0..svc-9; `tail` adds one more service (svc-extra)."""
    parts = ["services:\n"]
    for i in range(services):
        wl = "".join(f"      - address: {workload_addr(i, j)}\n" for j in range(ENDPOINTS))
        if extra is not None and i < WATCHED:
            wl += f"      - address: {extra}\n"
        parts.append(f"  - name: svc-{i}\n    ports: [80]\n    workloads:\n{wl}")
    if tail:
        parts.append("  - name: svc-extra\n    ports: [80]\n    workloads:\n"
                     "      - address: 10.255.255.1:8080\n")
    return "".join(parts)


def write_atomic(path: Path, text: str) -> float:
    """Write a temp file, then os.replace it; returns time.time() just before the replace."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    t0 = time.time()
    os.replace(tmp, path)
    return t0


# ---- logs (asctime, local time, ms resolution: the same clock as time.time()) ---------

_TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
CONTROL_LOADED = re.compile(_TS + r" INFO meshlet\.control: mesh file \S+: (\d+) service\(s\)")
CONTROL_RELOADED = re.compile(
    _TS + r" INFO meshlet\.control: mesh file reloaded: (\d+) service\(s\); (\d+) update\(s\) "
    r"pushed in ([\d.]+) ms"
)
PROXY_DEST = re.compile(
    _TS + r" INFO meshlet\.discovery: destination (\S+): (\d+) endpoint\(s\) \(version (\S+)\)"
)


def log_time(stamp: str) -> float:
    """`2026-11-28 20:02:32,123` (local time) -> seconds since the epoch."""
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:]) / 1000


class LogTail:
    """Complete lines appended to a log file since the last mark."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        with contextlib.suppress(OSError):
            self.offset = self.path.stat().st_size

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


# ---- /proc -------------------------------------------------------------------------


def status_kib(pid: int, key: str) -> int:
    """A `/proc/PID/status` figure in KiB (VmRSS, VmHWM); 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# ---- the control plane ---------------------------------------------------------------


@dataclass
class Control:
    proc: Proc
    port: int
    started: float  # time.time() just before the spawn
    ctx: ssl.SSLContext
    tail: LogTail = field(init=False)

    def __post_init__(self) -> None:
        self.tail = LogTail(self.proc.log_path)

    def status(self, timeout: float = 30.0) -> dict[str, Any] | None:
        conn = http.client.HTTPSConnection(LOOPBACK, self.port, context=self.ctx,
                                           timeout=timeout)
        try:
            conn.request("GET", "/v1/status")
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        if resp.status != 200:
            return None
        try:
            out: dict[str, Any] = json.loads(body)
        except ValueError:
            return None
        return out

    def wait_services(self, n: int, timeout: float) -> tuple[float, dict[str, Any]]:
        """Poll /v1/status until it shows n services; (time.time() of that answer, it)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            st = self.status()
            now = time.time()
            if st is not None:
                last = st
                if st.get("services") == n:
                    return now, st
            if not self.proc.alive():
                raise BenchError(f"meshlet control exited ({self.proc.popen.returncode}); "
                                 f"log tail:\n{self.proc.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"meshlet control did not show {n} services within "
                                 f"{timeout:.0f}s; last status {last}; log tail:\n"
                                 f"{self.proc.log_tail()}")
            time.sleep(STATUS_POLL_S)

    def wait_reload(self, n: int, timeout: float = UPDATE_TIMEOUT) -> tuple[float, int, float]:
        """The next 'mesh file reloaded: n service(s)' line after tail.mark():
        (its time, updates pushed, push ms)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.tail.new_lines():
                m = CONTROL_RELOADED.match(line)
                if m and int(m.group(2)) == n:
                    return log_time(m.group(1)), int(m.group(3)), float(m.group(4))
                if "mesh file edit refused" in line:
                    raise BenchError(f"the control refused the edit: {self.proc.log_tail()}")
            if not self.proc.alive() or time.monotonic() > deadline:
                raise BenchError(f"no 'mesh file reloaded: {n} service(s)' line within "
                                 f"{timeout:.0f}s; log tail:\n{self.proc.log_tail()}")
            time.sleep(LOG_POLL_S)

    def loaded_line(self) -> float | None:
        """Time of the start-up line 'mesh file PATH: N service(s)', if logged."""
        with contextlib.suppress(OSError):
            for line in self.proc.log_path.read_text(errors="replace").splitlines():
                if m := CONTROL_LOADED.match(line):
                    return log_time(m.group(1))
        return None

    def rss_kib(self) -> int:
        return rss_kib([self.proc.pid])

    def cpu_s(self) -> float:
        return ticks_to_us(cpu_ticks([self.proc.pid])) / 1e6


@dataclass
class Setup:
    trial_dir: Path
    state: Path
    mesh_file: Path
    root: Path
    token_file: Path
    ctx: ssl.SSLContext

    def control_env(self, port: int) -> dict[str, str]:
        return {
            **os.environ,
            "MESHLET_CONTROL_STATE_DIR": str(self.state),
            "MESHLET_CONTROL_LISTEN_ADDR": f"{LOOPBACK}:{port}",
            "MESHLET_TRUST_DOMAIN": TRUST_DOMAIN,
            "MESHLET_MESH_FILE": str(self.mesh_file),
            "MESHLET_LOG_LEVEL": "info",
        }


def prepare(trial_dir: Path) -> Setup:
    """The CA (meshlet's own code) and one join token (`meshlet control token create`)."""
    from meshlet.identity.ca import CertificateAuthority

    state = trial_dir / "control"
    CertificateAuthority.create(TRUST_DOMAIN, state / "ca")
    mesh_file = trial_dir / "mesh.yaml"
    root = state / "ca" / "root.crt"
    setup = Setup(trial_dir, state, mesh_file, root, trial_dir / "client.token",
                  ssl.create_default_context(cafile=str(root)))
    argv = [sys.executable, "-m", "meshlet", "control", "token", "create", "--namespace",
            "default", "--account", ACCOUNT, "--ttl", "24h"]
    out = run_to_completion("token", argv, trial_dir, 30, env=setup.control_env(0),
                            cwd=REPO_ROOT)
    token = out.strip().splitlines()[-1].strip() if out.strip() else ""
    if not token:
        raise BenchError(f"`meshlet control token create` printed nothing: {out!r}")
    setup.token_file.write_text(token + "\n")
    setup.token_file.chmod(0o600)
    return setup


def start_control(setup: Setup, name: str) -> Control:
    port = free_port()
    argv = [sys.executable, "-m", "meshlet", "control"]
    started = time.time()
    proc = spawn(name, argv, setup.trial_dir, core=PROXY_CORE, env=setup.control_env(port),
                 cwd=REPO_ROOT)
    return Control(proc, port, started, setup.ctx)


def timed_start(setup: Setup, name: str, services: int) -> tuple[Control, dict[str, float]]:
    """Start a control on the current file; spawn -> status shows `services`; RSS after."""
    ctl = start_control(setup, name)
    try:
        seen, _ = ctl.wait_services(services, START_TIMEOUT)
        cpu = ctl.cpu_s()
        logged = ctl.loaded_line()
        time.sleep(SETTLE_S)
        out = {
            "load_s": seen - ctl.started,
            "load_cpu_s": cpu,
            "rss_mb": ctl.rss_kib() / 1024,
            "hwm_mb": status_kib(ctl.proc.pid, "VmHWM") / 1024,
        }
        if logged is not None:
            out["load_log_s"] = logged - ctl.started
        return ctl, out
    except BaseException:
        ctl.proc.stop()
        raise


# ---- proxies ---------------------------------------------------------------------------


@dataclass
class ProxyRun:
    proc: Proc
    admin: int
    services: list[str]  # "svc-K:80"
    tail: LogTail


def proxy_env(setup: Setup, ctl: Control, admin: int, services: list[str]) -> dict[str, str]:
    listeners = ",".join(f"{LOOPBACK}:{free_port()}={s}" for s in services)
    return {
        **os.environ,
        **PROXY_ENV,
        "MESHLET_CONTROL_ADDR": f"{LOOPBACK}:{ctl.port}",
        "MESHLET_TRUST_ANCHORS": str(setup.root),
        "MESHLET_IDENTITY": spiffe_uri(ACCOUNT),
        "MESHLET_JOIN_TOKEN_FILE": str(setup.token_file),
        "MESHLET_ADMIN_LISTEN_ADDR": f"{LOOPBACK}:{admin}",
        "MESHLET_INBOUND_LISTEN_ADDR": "",
        "MESHLET_OUTBOUND_LISTENERS": listeners,
    }


def spawn_proxy(setup: Setup, ctl: Control, name: str, services: list[str]) -> ProxyRun:
    admin = free_port()
    argv = [sys.executable, "-m", "meshlet", "proxy"]
    env = proxy_env(setup, ctl, admin, services)
    proc = spawn(name, argv, setup.trial_dir, core=LOAD_CORE, env=env, cwd=REPO_ROOT)
    return ProxyRun(proc, admin, services, LogTail(proc.log_path))


def admin_json(p: ProxyRun, path: str = "/config") -> dict[str, Any] | None:
    try:
        status, body = _http_get(p.admin, path, timeout=5)
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    try:
        out: dict[str, Any] = json.loads(body)
    except ValueError:
        return None
    return out


def destinations(p: ProxyRun) -> dict[str, Any]:
    cfg = admin_json(p) or {}
    dests: dict[str, Any] = (cfg.get("discovery") or {}).get("destinations") or {}
    return dests


def resolved(p: ProxyRun, want: int) -> bool:
    """Every destination of p is meshed with `want` endpoints."""
    dests = destinations(p)
    return all(
        (d := dests.get(s)) is not None and d.get("state") == "mesh"
        and len(d.get("endpoints") or []) == want
        for s in p.services
    )


def wait_ready(batch: list[ProxyRun], want: int, timeout: float) -> None:
    """Each proxy's /ready is 200 and its destinations are resolved."""
    deadline = time.monotonic() + timeout
    pending = list(batch)
    while pending:
        for p in list(pending):
            if not p.proc.alive():
                rc = p.proc.popen.returncode
                how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
                raise BenchError(f"{p.proc.name} died during start-up ({how}); "
                                 f"log tail:\n{p.proc.log_tail()}")
            try:
                ready = _http_get(p.admin, "/ready", timeout=2)[0] == 200
            except (OSError, http.client.HTTPException):
                ready = False
            if ready and resolved(p, want):
                pending.remove(p)
        if pending and time.monotonic() > deadline:
            p = pending[0]
            raise BenchError(f"{len(pending)} proxies not ready+resolved within "
                             f"{timeout:.0f}s, e.g. {p.proc.name}: {destinations(p)}; log "
                             f"tail:\n{p.proc.log_tail()}")
        if pending:
            time.sleep(0.1)


def stop_proxies(proxies: list[ProxyRun]) -> None:
    """SIGTERM all at once, then reap each (Proc.stop SIGKILLs stragglers)."""
    for p in proxies:
        if p.proc.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in proxies:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        p.proc.stop()


# ---- the parts ---------------------------------------------------------------------------


def part_load(setup: Setup, s: ScaleSettings, f: dict[str, float], raw: dict[str, Any]
              ) -> Control:
    """Baseline (10 services) and N-service starts; returns the last control, running."""
    write_atomic(setup.mesh_file, mesh_text(SMALL))
    ctl, small = timed_start(setup, "control-small", SMALL)
    ctl.proc.stop()
    raw["load_small"] = small
    f["control_load_small_s"] = small["load_s"]
    f["control_rss_small_mb"] = small["rss_mb"]

    text = mesh_text(s.services)
    write_atomic(setup.mesh_file, text)
    raw["mesh_file_bytes"] = len(text)
    runs: list[dict[str, float]] = []
    for rep in range(s.load_reps):
        ctl, fig = timed_start(setup, f"control-{rep + 1}", s.services)
        runs.append(fig)
        print(f"  control-scale: control {rep + 1}/{s.load_reps} loaded {s.services:,} "
              f"services in {fig['load_s']:.2f} s, RSS {fig['rss_mb']:.1f} MiB",
              file=sys.stderr)
        if rep + 1 < s.load_reps:
            ctl.proc.stop()
    raw["load"] = runs
    for key in ("load_s", "load_log_s", "load_cpu_s", "rss_mb", "hwm_mb"):
        vals = [r[key] for r in runs if key in r]
        if vals:
            f[f"control_{key}"] = statistics.median(vals)

    # The same parse in this process (core 1), with the cyclic GC on, then off: how much
    # of a load is the YAML + checks, and how much of that is GC passes over the nodes.
    from meshlet.api.mesh import load_mesh_file

    for key in ("parse_inproc_s", "parse_inproc_nogc_s"):
        gc.collect()
        if key.endswith("nogc_s"):
            gc.disable()
        try:
            t = time.perf_counter()
            load_mesh_file(str(setup.mesh_file))
            f[key] = time.perf_counter() - t
        finally:
            gc.enable()
    return ctl


def part_reload(setup: Setup, s: ScaleSettings, ctl: Control, f: dict[str, float],
                raw: dict[str, Any]) -> None:
    """Edits of the N-service file: one service added, then removed, ... (ends at N)."""
    edits: list[dict[str, Any]] = []
    for e in range(s.reload_edits):
        n = s.services + 1 if e % 2 == 0 else s.services
        text = mesh_text(s.services, tail=n > s.services)
        time.sleep(random.uniform(0.3, 0.6))
        ctl.tail.mark()
        cpu0 = ctl.cpu_s()
        t0 = write_atomic(setup.mesh_file, text)
        seen, _ = ctl.wait_services(n, UPDATE_TIMEOUT)
        logged, _sent, _ms = ctl.wait_reload(n)
        cpu = ctl.cpu_s() - cpu0
        time.sleep(SETTLE_S)
        edits.append({"services": n, "reload_s": seen - t0, "reload_log_s": logged - t0,
                      "cpu_s": cpu, "rss_mb": ctl.rss_kib() / 1024})
    if s.reload_edits % 2:  # back to the plain N-service file
        ctl.tail.mark()
        write_atomic(setup.mesh_file, mesh_text(s.services))
        ctl.wait_reload(s.services)
    raw["reload"] = edits
    f["reload_s"] = statistics.median(e["reload_s"] for e in edits)
    f["reload_log_s"] = statistics.median(e["reload_log_s"] for e in edits)
    f["reload_cpu_s"] = statistics.median(e["cpu_s"] for e in edits)
    f["control_rss_reloaded_mb"] = edits[-1]["rss_mb"]
    f["control_hwm_mb"] = status_kib(ctl.proc.pid, "VmHWM") / 1024
    print(f"  control-scale: reload after an edit {f['reload_s']:.2f} s (median of "
          f"{len(edits)})", file=sys.stderr)


def start_fleet(setup: Setup, s: ScaleSettings, ctl: Control, f: dict[str, float],
                raw: dict[str, Any], proxies: list[ProxyRun]) -> None:
    """Start the proxies in batches (into `proxies`, so the caller can stop them)."""
    t0 = time.monotonic()
    for start in range(0, s.proxies, s.batch):
        for i in range(start, min(start + s.batch, s.proxies)):
            proxies.append(spawn_proxy(setup, ctl, f"proxy-{i:03d}", [f"svc-{i % WATCHED}:80"]))
        batch = proxies[start:]
        wait_ready(batch, ENDPOINTS, START_TIMEOUT)
    f["fleet_start_s"] = time.monotonic() - t0
    f["proxy_rss_mb"] = statistics.median(rss_kib([p.proc.pid]) for p in proxies) / 1024
    st = ctl.status() or {}
    raw["status_with_fleet"] = st
    f["control_subscriptions"] = float(st.get("subscriptions", 0))
    f["control_rss_fleet_mb"] = ctl.rss_kib() / 1024
    print(f"  control-scale: {len(proxies)} proxies ready and resolved in "
          f"{f['fleet_start_s']:.0f} s ({st.get('subscriptions')} watches)", file=sys.stderr)


def propagation_rounds(setup: Setup, s: ScaleSettings, ctl: Control, proxies: list[ProxyRun],
                       services: int, first_round: int) -> dict[str, Any]:
    """`s.rounds` edits giving svc-0..9 a new 4th workload; per-proxy latency from logs."""
    latencies: list[float] = []
    rounds: list[dict[str, Any]] = []
    for r in range(first_round, first_round + s.rounds):
        extra = f"10.254.{r >> 8}.{r & 255}:9000"
        text = mesh_text(services, extra=extra)
        time.sleep(random.uniform(0.5, 1.0))  # a random phase against the 0.2 s file poll
        for p in proxies:
            p.tail.mark()
        ctl.tail.mark()
        t0 = write_atomic(setup.mesh_file, text)
        seen: dict[str, float] = {}
        deadline = time.monotonic() + UPDATE_TIMEOUT
        while len(seen) < len(proxies):
            for p in proxies:
                if p.proc.name in seen:
                    continue
                for line in p.tail.new_lines():
                    m = PROXY_DEST.match(line)
                    if m and m.group(2) in p.services and int(m.group(3)) == ENDPOINTS + 1:
                        seen[p.proc.name] = log_time(m.group(1))
                        break
            if len(seen) < len(proxies):
                if time.monotonic() > deadline:
                    late = [p.proc.name for p in proxies if p.proc.name not in seen]
                    raise BenchError(f"round {r}: {len(late)} proxies logged no update within "
                                     f"{UPDATE_TIMEOUT:.0f}s: {late[:5]}")
                time.sleep(LOG_POLL_S)
        logged, sent, push_ms = ctl.wait_reload(services)
        stale = [p.proc.name for p in proxies
                 if not all(any(e.get("addr") == extra for e in d.get("endpoints") or [])
                            for d in destinations(p).values())]
        if stale:
            raise BenchError(f"round {r}: /config of {stale[:5]} lacks endpoint {extra}")
        lat = [(seen[p.proc.name] - t0) * 1000 for p in proxies]
        latencies += lat
        rounds.append({
            "round": r, "extra": extra, "control_applied_ms": (logged - t0) * 1000,
            "updates_pushed": sent, "push_ms": push_ms,
            "fanout_ms": [(seen[p.proc.name] - logged) * 1000 for p in proxies],
            "latency_ms": lat,
        })
        print(f"  control-scale: round {r} ({services:,} services): control applied "
              f"{(logged - t0) * 1000:.0f} ms, {len(proxies)} proxies p50 "
              f"{statistics.median(lat):.0f} / max {max(lat):.0f} ms", file=sys.stderr)
    fanout = [x for rd in rounds for x in rd["fanout_ms"]]
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "n": len(latencies),
        "control_ms": statistics.median(rd["control_applied_ms"] for rd in rounds),
        "fanout_p99_ms": percentile(fanout, 99),
        "rounds": rounds,
    }


def part_propagation(setup: Setup, s: ScaleSettings, ctl: Control, f: dict[str, float],
                     raw: dict[str, Any]) -> None:
    proxies: list[ProxyRun] = []
    try:
        start_fleet(setup, s, ctl, f, raw, proxies)
        big = propagation_rounds(setup, s, ctl, proxies, s.services, 1)
        ctl.tail.mark()
        write_atomic(setup.mesh_file, mesh_text(SMALL))
        ctl.wait_reload(SMALL)
        time.sleep(SETTLE_S)
        small = propagation_rounds(setup, s, ctl, proxies, SMALL, 1 + s.rounds)
    finally:
        raw["fleet_log_tail"] = proxies[0].proc.log_tail(20) if proxies else ""
        stop_proxies(proxies)
    raw["propagation"], raw["propagation_small"] = big, small
    for prefix, res in (("prop", big), ("prop_small", small)):
        for key in ("p50_ms", "p99_ms", "max_ms", "control_ms", "fanout_p99_ms"):
            f[f"{prefix}_{key}"] = res[key]
        f[f"{prefix}_n"] = res["n"]


def part_proxy_rss(setup: Setup, s: ScaleSettings, ctl: Control, f: dict[str, float],
                   raw: dict[str, Any]) -> None:
    """A fresh proxy using svc-0..2: RSS with 10 services, then with N."""
    ctl.tail.mark()
    write_atomic(setup.mesh_file, mesh_text(SMALL))  # plain: no extra workload left
    ctl.wait_reload(SMALL)
    reps: list[dict[str, Any]] = []
    for rep in range(s.rss_reps):
        p = spawn_proxy(setup, ctl, f"rss-proxy-{rep + 1}", [f"svc-{i}:80" for i in range(USED)])
        try:
            wait_ready([p], ENDPOINTS, START_TIMEOUT)
            time.sleep(IDLE_S)
            rss_a = rss_kib([p.proc.pid])
            time.sleep(IDLE_S)
            rss_b = rss_kib([p.proc.pid])
            p.tail.mark()
            ctl.tail.mark()
            write_atomic(setup.mesh_file, mesh_text(s.services))
            ctl.wait_reload(s.services)
            time.sleep(IDLE_S)
            rss_c = rss_kib([p.proc.pid])
            updates = [ln for ln in p.tail.new_lines() if PROXY_DEST.match(ln)]
            if not resolved(p, ENDPOINTS):
                raise BenchError(f"{p.proc.name} lost its destinations: {destinations(p)}")
        finally:
            p.proc.stop()
        ctl.tail.mark()
        write_atomic(setup.mesh_file, mesh_text(SMALL))
        ctl.wait_reload(SMALL)
        reps.append({"rss_idle_kib": rss_a, "rss_before_kib": rss_b, "rss_after_kib": rss_c,
                     "growth_kib": rss_c - rss_b, "idle_drift_kib": rss_b - rss_a,
                     "updates_logged": updates})
        print(f"  control-scale: proxy RSS {rss_b / 1024:.1f} MiB with {SMALL} services, "
              f"{rss_c / 1024:.1f} MiB with {s.services:,} ({rss_c - rss_b:+d} KiB)",
              file=sys.stderr)
    raw["proxy_rss"] = reps
    f["proxy_rss_before_mb"] = statistics.median(r["rss_before_kib"] for r in reps) / 1024
    f["proxy_rss_after_mb"] = statistics.median(r["rss_after_kib"] for r in reps) / 1024
    f["proxy_rss_growth_kib"] = statistics.median(r["growth_kib"] for r in reps)
    f["proxy_rss_drift_kib"] = statistics.median(r["idle_drift_kib"] for r in reps)


def run_control_scale(ctx: TrialContext) -> None:
    s = ctx.settings.control_scale
    f, raw = ctx.trial.figures, ctx.trial.raw
    raw["scale_settings"] = {"services": s.services, "endpoints": ENDPOINTS,
                             "proxies": s.proxies, "watched_services": WATCHED,
                             "rounds": s.rounds, "small_services": SMALL}
    setup = prepare(ctx.trial_dir)
    ctl = part_load(setup, s, f, raw)
    try:
        part_reload(setup, s, ctl, f, raw)
        part_propagation(setup, s, ctl, f, raw)
        part_proxy_rss(setup, s, ctl, f, raw)
    finally:
        raw["control_alive_at_end"] = ctl.proc.alive()
        raw["control_log_tail"] = ctl.proc.log_tail(30)
        raw["control_exit_code"] = ctl.proc.stop()


def target_lines(figures: dict[str, float]) -> list[str]:
    """The issue's targets against this run's figures."""
    out = []
    if "prop_p99_ms" in figures:
        p99 = figures["prop_p99_ms"]
        out.append(f"update propagation p99 {p99:,.0f} ms (target < {TARGET_PROP_P99_MS:,.0f} "
                   f"ms): {'met' if p99 < TARGET_PROP_P99_MS else 'MISSED'}")
    if "proxy_rss_growth_kib" in figures:
        g = figures["proxy_rss_growth_kib"]
        out.append(f"proxy RSS growth {g:+,.0f} KiB (target < {TARGET_PROXY_GROWTH_KIB:,.0f} "
                   f"KiB): {'met' if g < TARGET_PROXY_GROWTH_KIB else 'MISSED'}")
    return out
