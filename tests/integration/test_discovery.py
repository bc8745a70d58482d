"""The control plane's discovery and policy watches with real processes: a mesh file,
`meshlet control`, meshed proxies. Edits are pushed; bad edits are refused with their
line; proxies fail static when the control plane dies and resume when it returns."""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    TD,
    Control,
    HttpBackend,
    ProxyProcess,
    control_status,
    eventually,
    free_port,
    http_request,
    metric,
    parse_status,
    proxy_env,
    raw_exchange,
    start_control,
    write_mesh,
)

CLIENT = f"spiffe://{TD}/ns/default/sa/client"


def mesh(web_addrs: list[str], policy: str = "", ready: bool = True) -> str:
    wl = "".join(f"      - address: {a}\n" + ("" if ready else "        ready: false\n")
                 for a in web_addrs)
    return ("services:\n"
            "  - name: web\n    ports: [80]\n"
            + (f"    workloads:\n{wl}" if web_addrs else "")
            + policy
            + "  - name: client\n")


@contextlib.contextmanager
def mesh_pair(tmp: Path, backend: HttpBackend, policy: str = ""
              ) -> Iterator[tuple[Control, Path, ProxyProcess, ProxyProcess, int]]:
    """control + web's sidecar (B) + a client sidecar (A) with an outbound listener for
    web:80 and an HTTP proxy listener. Yields (control, mesh file, A, B, proxy port)."""
    mesh_file = tmp / "mesh.yaml"
    write_mesh(mesh_file, mesh([], policy))
    gen = start_control(tmp / "control", mesh_file=mesh_file)
    control = next(gen)
    try:
        with ProxyProcess(app=backend.port, ready_timeout=15,
                          env=proxy_env(control, tmp / "b", "web")) as b:
            write_mesh(mesh_file, mesh([f"127.0.0.1:{b.inbound_port}"], policy))
            pport = free_port()
            with ProxyProcess(outbound={"web:80": ""}, ready_timeout=15, env=proxy_env(
                    control, tmp / "a", "client",
                    MESHLET_OUTBOUND_PROXY_LISTEN_ADDR=f"127.0.0.1:{pport}")) as a:
                yield control, mesh_file, a, b, pport
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)


def test_discovery_mtls_and_pushed_edits(backend: HttpBackend, tmp_path: Path) -> None:
    with mesh_pair(tmp_path, backend) as (control, mesh_file, a, b, _pport):
        port = a.outbound["web:80"]
        r = http_request(port, path="/x")
        assert r.status == 200, r
        ids = [v for k, v in json.loads(r.body)["headers"] if k.lower() == "meshlet-client-id"]
        assert ids == [CLIENT]  # over mTLS, with A's identity from its certificate
        assert metric(a.metrics(), "response_total", direction="outbound", tls="true",
                      status_code="200") >= 1
        view = a.admin_get("/config").json()["discovery"]
        assert view["in_sync"] is True
        dest = view["destinations"]["web:80"]
        assert dest["state"] == "mesh" and dest["watch_connected"] is True
        # An edit takes the endpoint out: pushed, within a second.
        t0 = time.monotonic()
        write_mesh(mesh_file, mesh([f"127.0.0.1:{b.inbound_port}"], ready=False))

        def endpoints() -> list[Any]:
            d = a.admin_get("/config").json()["discovery"]["destinations"]["web:80"]
            return d["endpoints"]  # type: ignore[no-any-return]

        eventually(lambda: endpoints() == [], timeout=3, interval=0.05)
        assert time.monotonic() - t0 < 1.0
        # With no endpoint, a request waits (fail-fast timeout, 3 s), then gets 503.
        t0 = time.monotonic()
        r = http_request(port, path="/y")
        assert (r.status, r.header("meshlet-proxy-error")) == (503, "no_endpoints")
        assert 2.5 < time.monotonic() - t0 < 4.5
        # ...and one that is waiting when the endpoint comes back goes through.
        done: list[int] = []
        t = threading.Thread(target=lambda: done.append(http_request(port, path="/w").status))
        t.start()
        time.sleep(0.3)
        write_mesh(mesh_file, mesh([f"127.0.0.1:{b.inbound_port}"]))
        t.join(5)
        assert done == [200]
        # A corrupt edit is refused with its line; the last good state stays.
        write_mesh(mesh_file, mesh([f"127.0.0.1:{b.inbound_port}"]))
        eventually(lambda: http_request(port, path="/z").status == 200, timeout=3)
        write_mesh(mesh_file, "services:\n  - name: web\n    ports: [80]\n"
                              "    workloads:\n      - address: 127.0.0.1:99999\n")
        st = eventually(lambda: control_status(control)["mesh_error"], timeout=3)
        assert any(e.startswith(f"{mesh_file}:5: services[0].workloads[0].address")
                   for e in st), st
        time.sleep(0.5)
        assert http_request(port, path="/still").status == 200


def test_http_proxy_by_service_name(backend: HttpBackend, tmp_path: Path) -> None:
    with mesh_pair(tmp_path, backend) as (_control, _mf, a, _b, pport):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler(
            {"http": f"http://127.0.0.1:{pport}"}))
        with opener.open("http://web/hello?q=1", timeout=10) as r:
            seen = json.loads(r.read())
        assert seen["path"] == "/hello?q=1"  # origin form
        hdrs = {k.lower(): v for k, v in seen["headers"]}
        assert hdrs["host"] == "web"
        assert hdrs["meshlet-client-id"] == CLIENT  # meshed: mTLS to web's sidecar
        # A name the mesh does not know: resolved by DNS, proxied unmeshed.
        with opener.open(f"http://localhost:{backend.port}/direct", timeout=10) as r:
            seen = json.loads(r.read())
        assert seen["path"] == "/direct"
        assert "meshlet-client-id" not in {k.lower() for k, _ in seen["headers"]}
        dests = a.admin_get("/config").json()["discovery"]["destinations"]
        assert dests[f"localhost:{backend.port}"]["state"] == "dns"
        assert dests["web:80"]["state"] == "mesh"
        # The proxy does not proxy to itself.
        r = parse_status(raw_exchange(pport, (
            f"GET http://127.0.0.1:{pport}/loop HTTP/1.1\r\nHost: x\r\n\r\n").encode()))
        assert (r.status, r.header("meshlet-proxy-error")) == (400, "proxy_loop")


def test_policy_from_the_mesh_file(backend: HttpBackend, tmp_path: Path) -> None:
    policy = ("    policy:\n      default: deny\n      rules:\n"
              f"        - name: client\n          identities: [\"{CLIENT}\"]\n")
    with mesh_pair(tmp_path, backend, policy) as (_c, mesh_file, a, b, _p):
        port = a.outbound["web:80"]
        eventually(lambda: http_request(port, path="/p").status == 200, timeout=3)
        # Plaintext straight to web's sidecar: denied by the mesh file's default.
        assert b.inbound_port is not None
        r = http_request(b.inbound_port, path="/direct")
        assert (r.status, r.header("meshlet-proxy-error")) == (403, "forbidden") or \
            r.status == 403
        # An edit that drops the rule denies A too (new connections).
        write_mesh(mesh_file, mesh([f"127.0.0.1:{b.inbound_port}"],
                                   "    policy:\n      default: deny\n"))
        eventually(lambda: b.admin_get("/config").json()["policy"]["rules"] == [],
                   timeout=3)


@pytest.mark.timeout(90)
def test_control_plane_killed_under_traffic(backend: HttpBackend, tmp_path: Path) -> None:
    with mesh_pair(tmp_path, backend) as (control, mesh_file, a, _b, _p):
        port = a.outbound["web:80"]
        failures: list[Any] = []
        ok = [0]
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    r = http_request(port, path="/t", timeout=5)
                    if r.status == 200:
                        ok[0] += 1
                    else:
                        failures.append(r.status)
                except OSError as e:
                    failures.append(e)

        t = threading.Thread(target=traffic)
        t.start()
        try:
            time.sleep(0.5)
            control.proc.send_signal(signal.SIGKILL)
            control.proc.wait(5)
            n = ok[0]
            eventually(lambda: ok[0] > n + 50, timeout=10)
            eventually(lambda: a.admin_get("/config").json()["discovery"]["in_sync"] is False,
                       timeout=5)
            # Restarted on the same address and state: the watch resumes at its version.
            gen = start_control(control.state, port=control.port, mesh_file=mesh_file)
            c2 = next(gen)
            try:
                eventually(lambda: a.admin_get("/config").json()["discovery"]["in_sync"],
                           timeout=20)
                st = control_status(c2)
                assert st["resumed_unchanged"] >= 1, st
                n = ok[0]
                eventually(lambda: ok[0] > n + 50, timeout=10)
            finally:
                with contextlib.suppress(StopIteration):
                    next(gen)
        finally:
            stop.set()
            t.join(10)
        assert failures == []
        assert ok[0] > 100


def test_unreachable_app_makes_proxy_not_ready(tmp_path: Path) -> None:
    dead = free_port()
    with ProxyProcess(app=dead, ready_timeout=10) as p:
        assert p.inbound_port is not None
        r = http_request(p.inbound_port, path="/")
        assert r.status == 502
        r = p.admin_get("/ready")
        assert r.status == 503
        assert f"app 127.0.0.1:{dead} unreachable" in r.body.decode(), r.body
        with HttpBackend() as be:  # noqa: F841 - a new app on another port: still down
            assert p.admin_get("/ready").status == 503


def test_opaque_connection_waits_for_an_endpoint(tmp_path: Path) -> None:
    """A TCP client that connects (and sends) before its destination has an endpoint is
    held, then relayed once one appears."""
    from helpers import TcpServer, connect

    with TcpServer(mode="banner", banner=b"") as echo:
        mesh_file = tmp_path / "mesh.yaml"
        text = ("services:\n  - name: echo\n    ports: [{port: 7000, protocol: opaque}]\n"
                "    workloads: [{address: \"127.0.0.1:%d\", ready: %s}]\n"
                "    meshed: false\n")
        write_mesh(mesh_file, text % (echo.port, "false"))
        gen = start_control(tmp_path / "control", mesh_file=mesh_file)
        control = next(gen)
        try:
            with ProxyProcess(outbound={"echo:7000": "/opaque"}, ready_timeout=15,
                              env=proxy_env(control, tmp_path / "a", "client")) as a:
                s = connect(a.outbound["echo:7000"])
                s.sendall(b"early bytes")
                time.sleep(0.5)
                write_mesh(mesh_file, text % (echo.port, "true"))
                s.settimeout(5)
                assert s.recv(100) == b"early bytes"
                s.close()
        finally:
            with contextlib.suppress(StopIteration):
                next(gen)


def test_watches_need_a_mesh_certificate(control: Control) -> None:
    ctx = ssl.create_default_context(cadata=control.anchors.decode())
    for path in ("/v1/watch/endpoints?name=web:80", "/v1/watch/policy"):
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"https://127.0.0.1:{control.port}{path}", context=ctx,
                                   timeout=5)
        assert ei.value.code == 401
        assert b"mesh client certificate" in ei.value.read()
