"""Explicit outbound mode: a local port bound to a service whose endpoints come from a
watched YAML file; balancing, live edits, refused edits, failover."""

from __future__ import annotations

import contextlib
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
)


def endpoints_yaml(*eps: str | tuple[str, int]) -> str:
    lines = []
    for e in eps:
        addr, weight = (e, None) if isinstance(e, str) else e
        lines.append(f"  - addr: {addr}\n" + (f"    weight: {weight}\n" if weight is not None
                                              else ""))
    if not lines:
        return "services:\n- name: web\n  port: 80\n  endpoints: []\n"
    return "services:\n- name: web\n  port: 80\n  endpoints:\n" + "".join(lines)


@pytest.fixture
def b1(stack: contextlib.ExitStack) -> HttpBackend:
    return stack.enter_context(HttpBackend())


@pytest.fixture
def b2(stack: contextlib.ExitStack) -> HttpBackend:
    return stack.enter_context(HttpBackend())


def send(p: ProxyProcess, n: int, keep_alive: bool = False) -> None:
    port = p.outbound["web:80"]
    if keep_alive:
        with connect(port) as s:
            rd = ResponseReader(s)
            for i in range(n):
                s.sendall(b"GET /ka%d HTTP/1.1\r\nHost: web\r\n\r\n" % i)
                assert rd.read().status == 200
        return
    for i in range(n):
        r = http_request(port, path=f"/r{i}")
        assert r.status == 200, r


def counts(*backends: HttpBackend) -> list[int]:
    return [len(b.requests) for b in backends]


@pytest.mark.parametrize("keep_alive", [False, True], ids=["new-conns", "keep-alive"])
def test_requests_spread_over_endpoints(b1: HttpBackend, b2: HttpBackend, start_proxy: Any,
                                        keep_alive: bool) -> None:
    p = start_proxy(outbound={"web:80": ""}, endpoints=endpoints_yaml(b1.addr, b2.addr))
    send(p, 40, keep_alive)
    c1, c2 = counts(b1, b2)
    assert c1 + c2 == 40
    # Both are used (a new endpoint is tried first); the split after that follows
    # latency (peak-EWMA), so it need not be even (tests/unit/test_balance.py).
    assert c1 >= 1 and c2 >= 1, (c1, c2)
    m = p.metrics()
    assert metric(m, "request_total", direction="outbound", authority="web:80") == 40


def test_endpoint_edits_move_traffic(b1: HttpBackend, b2: HttpBackend,
                                     start_proxy: Any) -> None:
    p: ProxyProcess = start_proxy(outbound={"web:80": ""},
                                  endpoints=endpoints_yaml(b1.addr, b2.addr))
    send(p, 4)
    assert min(counts(b1, b2)) >= 1

    # Remove b1: then everything goes to b2.
    p.write_endpoints(endpoints_yaml(b2.addr))

    def addrs() -> list[str]:
        cfg = p.admin_get("/config").json()
        return [e["addr"] for e in cfg["endpoints"]["web:80"]["endpoints"]]

    eventually(lambda: addrs() == [b2.addr], timeout=5, interval=0.1)
    before = counts(b1, b2)
    send(p, 8)
    assert counts(b1, b2) == [before[0], before[1] + 8]

    # A bad edit is refused: the last good endpoints stay.
    p.write_endpoints(endpoints_yaml(b1.addr) + "  - addr: not-an-address\n")
    eventually(lambda: metric(p.metrics(), "endpoints_file_errors_total") == 1, timeout=5)
    before = counts(b1, b2)
    send(p, 6)
    assert counts(b1, b2) == [before[0], before[1] + 6]
    cfg = p.admin_get("/config").json()
    assert [e["addr"] for e in cfg["endpoints"]["web:80"]["endpoints"]] == [b2.addr]

    # Broken YAML too.
    p.write_endpoints("services: [ {name: web, port: 80\n")
    eventually(lambda: metric(p.metrics(), "endpoints_file_errors_total") == 2, timeout=5)
    before = counts(b1, b2)
    send(p, 3)
    assert counts(b1, b2) == [before[0], before[1] + 3]

    # And the watch still works after refused edits: back to b1 only.
    p.write_endpoints(endpoints_yaml(b1.addr))

    def only_b1() -> bool:
        before = counts(b1, b2)
        send(p, 4)
        after = counts(b1, b2)
        return after == [before[0] + 4, before[1]]

    eventually(only_b1, timeout=5, interval=0.1)
    assert p.stderr().count("endpoints file refused") == 2, p.stderr()


def test_endpoints_added_to_empty_service(b1: HttpBackend, start_proxy: Any) -> None:
    p: ProxyProcess = start_proxy(outbound={"web:80": ""}, endpoints=endpoints_yaml())
    assert http_request(p.outbound["web:80"]).status == 503
    p.write_endpoints(endpoints_yaml(b1.addr))
    eventually(lambda: http_request(p.outbound["web:80"]).status == 200, timeout=5,
               interval=0.1)


def test_weight_zero_drains(b1: HttpBackend, b2: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(outbound={"web:80": ""},
                    endpoints=endpoints_yaml((b1.addr, 0), (b2.addr, 1)))
    send(p, 6)
    assert counts(b1, b2) == [0, 6]


def test_dead_endpoint_is_skipped(b1: HttpBackend, start_proxy: Any) -> None:
    dead = f"127.0.0.1:{free_port()}"
    p = start_proxy(outbound={"web:80": ""}, endpoints=endpoints_yaml(dead, b1.addr))
    send(p, 6)  # each request that picks the dead endpoint is retried on the live one
    assert counts(b1) == [6]
