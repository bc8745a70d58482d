"""Backends on the load core: nginx (HTTP) and the Python bulk sink (raw TCP)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

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
from bench.procs import Proc, spawn

NGINX_BODY = "hello from nginx\n"
START_TIMEOUT = 10.0


def nginx_config(workdir: Path, port: int) -> str:
    """A one-worker nginx answering every request with a small fixed body."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{NGINX_BODY.rstrip()}\\n";
        }}
    }}
}}
"""


def start_nginx(workdir: Path, log_dir: Path) -> tuple[Proc, int]:
    """Start nginx pinned to the load core; returns (process, port) once it answers."""
    nginx_dir = workdir / "nginx"
    nginx_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = nginx_dir / "nginx.conf"
    conf.write_text(nginx_config(nginx_dir, port))
    argv = ["nginx", "-p", f"{nginx_dir}/", "-c", str(conf), "-e", str(nginx_dir / "error.log")]
    proc = spawn("nginx", argv, log_dir, core=LOAD_CORE)
    deadline = time.monotonic() + START_TIMEOUT
    while proc.alive():
        if port_open(port):
            status, body = http_get(port)
            if status == 200 and body == NGINX_BODY.encode():
                return proc, port
            raise BenchError(f"nginx answered {status} {body[:80]!r}")
        if not sleep_until(deadline, 0.05):
            break
    proc.stop()
    raise BenchError(f"nginx did not start: {proc.log_tail()}")


def start_sink(log_dir: Path) -> tuple[Proc, int]:
    """Start the bulk sink (bench.tcpbulk) pinned to the load core."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.tcpbulk", "sink", "--port", str(port)]
    proc = spawn("sink", argv, log_dir, core=LOAD_CORE, cwd=REPO_ROOT)
    deadline = time.monotonic() + START_TIMEOUT
    while proc.alive():
        if port_open(port):
            return proc, port
        if not sleep_until(deadline, 0.05):
            break
    proc.stop()
    raise BenchError(f"sink did not start: {proc.log_tail()}")
