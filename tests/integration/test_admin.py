"""Configuration errors, the admin server, and the metrics exposition (promtool)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    HttpBackend,
    ProxyProcess,
    ResponseReader,
    connect,
    eventually,
    free_port,
    http_request,
    metric,
    parse_metrics,
)


def run_proxy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
    full["MESHLET_ADMIN_LISTEN_ADDR"] = f"127.0.0.1:{free_port()}"
    full["MESHLET_INBOUND_LISTEN_ADDR"] = f"127.0.0.1:{free_port()}"
    full.update(env)
    return subprocess.run([sys.executable, "-m", "meshlet", "proxy", *args], env=full,
                          capture_output=True, text=True, timeout=15)


BAD_CONFIGS: dict[str, tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]] = {
    # name: (env, args, names that must all appear in stderr)
    "two_bad_variables": ({"MESHLET_APP_ADDR": "127.0.0.1:1", "MESHLET_CONNECT_TIMEOUT": "abc",
                           "MESHLET_POOL_MAX_IDLE": "-3"}, (),
                          ("MESHLET_CONNECT_TIMEOUT", "MESHLET_POOL_MAX_IDLE")),
    "flag_and_variable": ({"MESHLET_APP_ADDR": "127.0.0.1:1", "MESHLET_LOG_LEVEL": "loud"},
                          ("--max-connections", "0"),
                          ("--max-connections", "MESHLET_LOG_LEVEL")),
    "unknown_and_bad_ports": ({"MESHLET_APP_ADDR": "127.0.0.1:1", "MESHLET_BOGUS": "1",
                               "MESHLET_OPAQUE_PORTS": "70000"}, (),
                              ("MESHLET_BOGUS", "MESHLET_OPAQUE_PORTS")),
    "bad_addresses": ({"MESHLET_APP_ADDR": "no-port", "MESHLET_ADMIN_LISTEN_ADDR":
                       "127.0.0.1:99999", "MESHLET_DETECT_TIMEOUT": "5 parsecs"}, (),
                      ("MESHLET_APP_ADDR", "MESHLET_ADMIN_LISTEN_ADDR",
                       "MESHLET_DETECT_TIMEOUT")),
    "outbound_without_endpoints_file": ({"MESHLET_OUTBOUND_LISTENERS":
                                         f"127.0.0.1:{free_port()}=web:80"}, (),
                                        ("MESHLET_ENDPOINTS_FILE",)),
    "nothing_to_proxy": ({}, (), ("MESHLET_APP_ADDR",)),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_config_errors_reported_at_once(name: str) -> None:
    env, args, names = BAD_CONFIGS[name]
    r = run_proxy(env, *args)
    assert r.returncode == 64, (r.returncode, r.stderr)
    for n in names:
        assert n in r.stderr, (n, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr


def test_bad_endpoints_file_at_start(tmp_path: Any) -> None:
    f = tmp_path / "eps.yaml"
    f.write_text("services:\n- name: web\n  port: 80\n  endpoints:\n  - addr: nowhere\n")
    r = run_proxy({"MESHLET_OUTBOUND_LISTENERS": f"127.0.0.1:{free_port()}=web:80",
                   "MESHLET_ENDPOINTS_FILE": str(f)})
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert f"{f}:5" in r.stderr, r.stderr  # file:line of the bad address
    assert "Traceback" not in r.stderr, r.stderr


# --- admin ------------------------------------------------------------------------------


@pytest.fixture
def two_backends(stack: contextlib.ExitStack) -> tuple[HttpBackend, HttpBackend]:
    return stack.enter_context(HttpBackend()), stack.enter_context(HttpBackend())


def endpoints_yaml(*addrs: str, name: str = "web", port: int = 80) -> str:
    eps = "".join(f"  - addr: {a}\n" for a in addrs)
    return f"services:\n- name: {name}\n  port: {port}\n  endpoints:\n{eps}"


def test_admin_endpoints(two_backends: Any, start_proxy: Any) -> None:
    b1, b2 = two_backends
    p: ProxyProcess = start_proxy(app=b1.port, outbound={"web:80": ""},
                                  endpoints=endpoints_yaml(b1.addr, b2.addr),
                                  env={"MESHLET_DETECT_TIMEOUT": "750ms"})
    assert p.admin_get("/live").status == 200
    assert p.admin_get("/ready").status == 200
    r = p.admin_get("/config")
    assert r.status == 200
    assert (r.header("content-type") or "").startswith("application/json")
    cfg = r.json()
    addrs = [e["addr"] for e in cfg["endpoints"]["web:80"]["endpoints"]]
    assert addrs == [b1.addr, b2.addr]
    assert cfg["config"]["detect_timeout"] == 0.75
    listens = {entry["listen"] for entry in cfg["listeners"]}
    assert f"127.0.0.1:{p.inbound_port}" in listens
    assert f"127.0.0.1:{p.outbound['web:80']}" in listens
    r = p.admin_get("/shutdown")  # GET: not allowed, and no shutdown
    assert r.status == 405, r
    assert p.admin_get("/nope").status == 404
    r = p.admin_get("/metrics")
    assert (r.header("content-type") or "").startswith("text/plain")
    assert p.proc is not None and p.proc.poll() is None
    assert p.admin_get("/ready").status == 200


# --- metrics ----------------------------------------------------------------------------

ACCEPTED_LINT = "response_latency_ms metric names should not contain abbreviated units"


def test_metrics_pass_promtool(stack: contextlib.ExitStack, backend: HttpBackend,
                               start_proxy: Any) -> None:
    p: ProxyProcess = start_proxy(
        app=backend.port, outbound={"web:80": "", "gone:81": ""},
        endpoints=endpoints_yaml(backend.addr) + "- name: gone\n  port: 81\n  endpoints: []\n",
        env={"MESHLET_DETECT_TIMEOUT": "300ms"})
    # Traffic of every kind: successes, proxy errors, a rejected request, opaque TCP,
    # a detection timeout, an authority with characters that need escaping.
    for i in range(3):
        assert http_request(p.inbound_port, path=f"/ok{i}").status == 200
    assert http_request(p.outbound["web:80"], path="/out").status == 200
    assert http_request(p.outbound["gone:81"]).status == 503
    assert http_request(p.inbound_port, path="/malformed/cl_te").status == 502
    with connect(p.inbound_port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: \"odd\\host\"\r\n\r\n")
        assert ResponseReader(s).read().status in (200, 400)
    with connect(p.inbound_port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n")
        assert ResponseReader(s).read().status == 400
    with connect(p.inbound_port) as s:
        s.sendall(b"\x00\x01 binary")
        s.shutdown(socket.SHUT_WR)
        s.recv(100)
    with connect(p.inbound_port) as s:  # says nothing: detection times out
        eventually(lambda: metric(p.metrics(), "protocol_detect_timeout_total") == 1)

    text = p.metrics_text()
    assert text.endswith("\n")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 1, f"promtool could not parse /metrics:\n{r.stdout}{r.stderr}"
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if ln.strip() and ln.strip() != ACCEPTED_LINT]
    assert not problems, "\n".join(problems) + "\n--- metrics ---\n" + text
    assert r.returncode in (0, 3)

    m = parse_metrics(text)
    assert metric(m, "request_total", direction="inbound") >= 4
    assert metric(m, "response_total", direction="inbound", status_code="502",
                  classification="failure") == 1
    assert metric(m, "response_total", direction="outbound", status_code="503",
                  classification="failure") == 1
    assert metric(m, "response_total", direction="outbound", status_code="200",
                  classification="success") == 1
    # The histogram counts every response.
    for labels in {ls for (n, ls) in m if n == "response_latency_ms_count"}:
        count = m[("response_latency_ms_count", labels)]
        inf = m[("response_latency_ms_bucket", labels | {("le", "+Inf")})]
        responses = metric(m, "response_total", **dict(labels))
        assert count == inf == responses, labels
    assert metric(m, "tcp_open_total", direction="inbound", peer="src") >= 7
    assert metric(m, "tcp_read_bytes_total", direction="inbound", peer="src") > 0
    assert metric(m, "tcp_write_bytes_total", direction="inbound", peer="src") > 0


def test_proxy_runs_lean_without_site(backend: HttpBackend) -> None:
    """`meshlet proxy` re-executes itself with `python -S` (no `.pth` hooks of the
    installation), keeping its pid; MESHLET_LEAN=0 keeps the ordinary interpreter."""
    for lean, want in (("1", True), ("0", False)):
        with ProxyProcess(app=backend.port, env={"MESHLET_LEAN": lean}) as p:
            assert p.proc is not None
            argv = Path(f"/proc/{p.proc.pid}/cmdline").read_bytes().split(b"\0")
            assert (b"-S" in argv) is want, argv
            assert argv[-4:] == [b"-m", b"meshlet", b"proxy", b""], argv
            assert http_request(p.inbound_port or 0, path="/anything").status == 200
