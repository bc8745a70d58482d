"""Routes from the mesh file, with real backends that inject latency and failures:
traffic split, retries within a budget, timeouts, header changes, matching."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Control,
    HttpBackend,
    ProxyProcess,
    ResponseReader,
    connect,
    eventually,
    http_request,
    proxy_env,
    start_control,
    write_mesh,
)


def svc(name: str, *addrs: str, extra: str = "") -> str:
    wl = "".join(f"      - address: {a}\n" for a in addrs)
    return (f"  - name: {name}\n    meshed: false\n    ports: [80]\n"
            + (f"    workloads:\n{wl}" if addrs else "") + extra)


@contextlib.contextmanager
def client(tmp: Path, mesh: str) -> Iterator[tuple[Control, Path, ProxyProcess]]:
    """A control plane serving `mesh` and a client sidecar with an outbound listener for
    web:80."""
    mesh_file = tmp / "mesh.yaml"
    write_mesh(mesh_file, mesh)
    gen = start_control(tmp / "control", mesh_file=mesh_file)
    control = next(gen)
    try:
        with ProxyProcess(outbound={"web:80": ""}, ready_timeout=15,
                          env=proxy_env(control, tmp / "a", "client")) as a:
            eventually(lambda: a.admin_get("/config").json()["discovery"]["destinations"]
                       ["web:80"]["state"] == "mesh", timeout=5)
            yield control, mesh_file, a
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)


def keepalive_load(port: int, n: int, workers: int, path: str = "/x") -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        got = []
        with connect(port) as s:
            rd = ResponseReader(s)
            for _ in range(k):
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
                got.append(rd.read().status)
        with lock:
            statuses.extend(got)

    ts = [threading.Thread(target=work, args=(n // workers,)) for _ in range(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return statuses


@pytest.fixture
def backends(stack: contextlib.ExitStack) -> list[HttpBackend]:
    return [stack.enter_context(HttpBackend(record=False)) for _ in range(3)]


@pytest.mark.timeout(120)
def test_weighted_split(tmp_path: Path, backends: list[HttpBackend]) -> None:
    v1, v2, _ = backends
    mesh = ("services:\n"
            + svc("web", extra="    routes:\n      - name: canary\n        backends:\n"
                  "          - {service: web-v1, weight: 90}\n"
                  "          - {service: web-v2, weight: 10}\n")
            + svc("web-v1", v1.addr) + svc("web-v2", v2.addr))
    with client(tmp_path, mesh) as (_c, _m, a):
        statuses = keepalive_load(a.outbound["web:80"], 10_000, 4)
        assert statuses.count(200) == 10_000, a.stderr()[-3000:]
        share = len(v2.requests) / 10_000
        assert len(v1.requests) + len(v2.requests) == 10_000
        assert 0.08 <= share <= 0.12, share  # 90/10 within 2 points


@pytest.mark.timeout(120)
def test_retries_hide_a_flaky_replica(tmp_path: Path, backends: list[HttpBackend]) -> None:
    good, flaky, _ = backends
    flaky.fail_rate = 0.2
    route = ("    routes:\n      - name: all\n"
             "        retry: {statuses: [503], attempts: 2, backoff: 1ms}\n")
    mesh = "services:\n" + svc("web", good.addr, flaky.addr, extra=route)
    with client(tmp_path, mesh) as (_c, _m, a):
        statuses = keepalive_load(a.outbound["web:80"], 2000, 4)
        ok = statuses.count(200) / len(statuses)
        assert ok >= 0.999, ok
        assert flaky.failures > 0
        m = a.metrics_text()
        retries = sum(float(line.rsplit(" ", 1)[1]) for line in m.splitlines()
                      if line.startswith("request_retries_total{"))
        assert retries == flaky.failures - (len(statuses) - statuses.count(200)) or \
            retries >= flaky.failures - 5, (retries, flaky.failures)
        assert retries <= 0.2 * 2000 + 100  # within the budget (ratio + minimum)


@pytest.mark.timeout(120)
def test_all_failing_no_retry_storm(tmp_path: Path, backends: list[HttpBackend]) -> None:
    b1, b2, _ = backends
    b1.fail_rate = b2.fail_rate = 1.0
    route = ("    routes:\n      - name: all\n"
             "        retry: {statuses: [503], attempts: 3, backoff: 1ms}\n"
             "    retry_budget: {ratio: 0.2, min_per_second: 0, window: 10s}\n")
    mesh = "services:\n" + svc("web", b1.addr, b2.addr, extra=route)
    with client(tmp_path, mesh) as (_c, _m, a):
        t0 = time.monotonic()
        statuses = keepalive_load(a.outbound["web:80"], 500, 2)
        elapsed = time.monotonic() - t0
        assert statuses.count(503) == 500  # the backends' answer, promptly
        assert elapsed < 10, elapsed
        sent = b1.failures + b2.failures
        assert sent <= 500 * 1.2 + 1, sent  # retries <= 20 % of requests: no storm
        assert sent > 500  # but some were retried


def test_timeouts(tmp_path: Path, backends: list[HttpBackend]) -> None:
    b1, b2, _ = backends
    b1.extra_delay = b2.extra_delay = 2.0  # both slow
    routes = ("    routes:\n"
              "      - name: total\n        match: {path: {prefix: /total}}\n"
              "        timeout: 300ms\n"
              "      - name: try\n        match: {path: {prefix: /try}}\n"
              "        retry: {attempts: 1, per_try_timeout: 200ms, backoff: 1ms}\n")
    mesh = "services:\n" + svc("web", b1.addr, b2.addr, extra=routes)
    with client(tmp_path, mesh) as (_c, _m, a):
        port = a.outbound["web:80"]
        # A route timeout: 504 at 300 ms. A per-try timeout of 200 ms with one retry:
        # two tries, 504 at ~400 ms (+ the 1 ms backoff).
        for path, reason, want in (("/total", "request_timeout", 0.300),
                                   ("/try", "per_try_timeout", 0.400)):
            t0 = time.monotonic()
            r = http_request(port, path=path, timeout=5)
            took = time.monotonic() - t0
            assert (r.status, r.header("meshlet-proxy-error")) == (504, reason)
            assert abs(took - want) < 0.05, (path, took)


def test_matches_and_header_changes(tmp_path: Path, backends: list[HttpBackend]) -> None:
    b1, _, _ = backends
    routes = ("    routes:\n"
              "      - name: api\n        match:\n"
              "          - path: {prefix: /api}\n            method: GET\n"
              "            headers: {x-canary: \"1\"}\n"
              "        request_headers:\n"
              "          set: {x-env: prod}\n          add: {x-via: mesh}\n"
              "          remove: [x-debug]\n")
    mesh = "services:\n" + svc("web", b1.addr, extra=routes)
    with client(tmp_path, mesh) as (_c, _m, a):
        port = a.outbound["web:80"]

        def seen(path: str, headers: list[tuple[str, str]], method: str = "GET"
                 ) -> dict[str, Any]:
            r = http_request(port, method=method, path=path, headers=headers)
            assert r.status == 200
            body = json.loads(r.body)
            return {k.lower(): v for k, v in body["headers"]}

        h = seen("/api/x", [("x-canary", "1"), ("x-env", "dev"), ("x-debug", "1")])
        assert (h["x-env"], h["x-via"]) == ("prod", "mesh") and "x-debug" not in h
        for path, hdrs, method in (("/api/x", [("x-canary", "2")], "GET"),
                                   ("/apix", [("x-canary", "1")], "GET"),
                                   ("/api/x", [("x-canary", "1")], "HEAD")):
            if method == "HEAD":
                r = http_request(port, method="HEAD", path=path, headers=hdrs)
                assert r.status == 200
                continue
            h = seen(path, [*hdrs, ("x-debug", "1")], method)
            assert "x-via" not in h and h["x-debug"] == "1", (path, hdrs)


def test_meshlet_routes_shows_the_effective_routes(tmp_path: Path,
                                                    backends: list[HttpBackend]) -> None:
    import subprocess
    import sys

    routes = ("    routes:\n"
              "      - name: api\n        match: {path: {prefix: /api}, method: GET}\n"
              "        timeout: 2s\n"
              "        retry: {statuses: [503], attempts: 2, per_try_timeout: 500ms}\n"
              "      - name: rest\n        backends: [{service: web-v2, weight: 1}]\n"
              "    retry_budget: {ratio: 0.1, min_per_second: 5, window: 10s}\n")
    mesh = "services:\n" + svc("web", backends[0].addr, extra=routes) + \
        svc("web-v2", backends[1].addr)
    with client(tmp_path, mesh) as (control, _m, _a):
        anchors = tmp_path / "anchors.pem"
        anchors.write_bytes(control.anchors)
        r = subprocess.run([sys.executable, "-m", "meshlet", "routes", "web",
                            "--control", f"127.0.0.1:{control.port}", "--anchors",
                            str(anchors)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "web.default:80: 1 endpoint(s)"
        assert lines[1].split() == ["ROUTE", "MATCH", "TIMEOUT", "RETRY", "HEADERS",
                                    "BACKENDS"]
        assert lines[2].split() == ["api", "GET", "/api*", "2000ms", "2x", "on", "503,",
                                    "500ms/try", "-", "(this", "service)"]
        assert lines[3].split() == ["rest", "*", "-", "-", "-", "web-v2:1"]
        assert lines[4] == "retry budget: 0.1 of requests + 5/s over 10s"
        r = subprocess.run([sys.executable, "-m", "meshlet", "routes", "nope",
                            "--control", f"127.0.0.1:{control.port}", "--anchors",
                            str(anchors)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "no service 'nope'" in r.stderr
