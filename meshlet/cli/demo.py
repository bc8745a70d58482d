"""`meshlet demo`: the example app behind a meshlet proxy, some traffic, its metrics.

It starts `examples/hello/app.py` and `meshlet proxy` in front of it on free loopback
ports, sends requests through the proxy, prints the golden metrics the proxy counted,
and stops both (or keeps them running with --serve).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["run_demo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.05)


def _app_path() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "examples" / "hello" / "app.py"
        if cand.exists():
            return cand
    raise FileNotFoundError("examples/hello/app.py not found: run from a meshlet checkout")


def _summary(metrics: str) -> list[str]:
    """A few lines from the Prometheus text: the golden signals per direction."""
    req = ok = fail = 0
    buckets: list[tuple[float, float]] = []
    for line in metrics.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_labels, _, value = line.rpartition(" ")
        v = float(value)
        if name_labels.startswith("request_total{"):
            req += int(v)
        elif name_labels.startswith("response_total{"):
            if 'classification="success"' in name_labels:
                ok += int(v)
            else:
                fail += int(v)
        elif name_labels.startswith("response_latency_ms_bucket{"):
            le = name_labels.rsplit('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), v))

    def quantile(q: float) -> str:
        total = max((c for _le, c in buckets), default=0)
        for le, c in buckets:
            if total and c >= q * total:
                return f"<= {le:g} ms"
        return "-"

    rate = f"{100.0 * ok / (ok + fail):.1f}%" if ok + fail else "-"
    return [
        f"  requests: {req}   success rate: {rate}   failures: {fail}",
        f"  latency p50 {quantile(0.5)}   p99 {quantile(0.99)}",
    ]


def run_demo(requests: int = 50, serve: bool = False) -> int:
    app_port, proxy_port, admin_port = _free_port(), _free_port(), _free_port()
    env = dict(os.environ)
    env.update({
        "MESHLET_INBOUND_LISTEN_ADDR": f"127.0.0.1:{proxy_port}",
        "MESHLET_APP_ADDR": f"127.0.0.1:{app_port}",
        "MESHLET_ADMIN_LISTEN_ADDR": f"127.0.0.1:{admin_port}",
    })
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([sys.executable, str(_app_path()), str(app_port)]))
        procs.append(subprocess.Popen([sys.executable, "-m", "meshlet", "proxy"], env=env))
        _wait_http(f"http://127.0.0.1:{admin_port}/ready")
        base = f"http://127.0.0.1:{proxy_port}"
        print(f"\nexample app on :{app_port}, meshlet proxy on :{proxy_port}, "
              f"admin on :{admin_port}\n")
        statuses: dict[int, int] = {}
        for i in range(requests):
            path = "/fail" if i % 10 == 9 else ("/slow" if i % 5 == 4 else "/")
            try:
                with urllib.request.urlopen(base + path, timeout=5) as r:
                    body = r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
            except urllib.error.HTTPError as e:
                statuses[e.code] = statuses.get(e.code, 0) + 1
            if i == 0:
                print(f"GET {base}/ -> {body.decode().strip()}")
        print(f"sent {requests} requests: " + ", ".join(
            f"{n} x {s}" for s, n in sorted(statuses.items())))
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics") as r:
            metrics = r.read().decode()
        print("\ngolden metrics from the proxy (/metrics):")
        for line in _summary(metrics):
            print(line)
        for line in metrics.splitlines():
            if line.startswith(("request_total", "response_total", "tcp_open_total")):
                print("  " + line)
        if serve:
            print(f"\nserving: try `curl {base}/` and "
                  f"`curl 127.0.0.1:{admin_port}/metrics`; Ctrl-C stops")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=35)
            except subprocess.TimeoutExpired:
                p.kill()
