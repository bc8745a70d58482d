"""Route matching and the retry budget (pure)."""

from __future__ import annotations

from meshlet.api.routes import RetryBudgetSpec, routes_from_json
from meshlet.proto.http1 import parse_request
from meshlet.proxy.routing import RetryBudget, RouteTable

TABLE = {"routes": [
    {"name": "exact", "match": [{"path": {"exact": "/x"}}]},
    {"name": "api-get", "match": [{"path": {"prefix": "/api"}, "method": "GET"}]},
    {"name": "canary", "match": [{"headers": {"x-canary": "1"}},
                                 {"path": {"regex": "/items/[0-9]+"}}]},
    {"name": "rest", "match": []},
]}


def route_of(raw: bytes) -> str:
    req = parse_request(raw, 65536, 16384)
    assert req is not None
    r = RouteTable(TABLE).match(req)
    return r.route.name if r is not None else "-"


def test_first_match_wins() -> None:
    assert route_of(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n") == "exact"
    assert route_of(b"GET /x?q=1 HTTP/1.1\r\nHost: a\r\n\r\n") == "exact"
    assert route_of(b"GET /x/y HTTP/1.1\r\nHost: a\r\n\r\n") == "rest"
    assert route_of(b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n") == "api-get"
    assert route_of(b"GET /api/v1 HTTP/1.1\r\nHost: a\r\n\r\n") == "api-get"
    assert route_of(b"GET /apiv1 HTTP/1.1\r\nHost: a\r\n\r\n") == "rest"  # segment prefix
    assert route_of(b"POST /api/v1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n") == "rest"
    assert route_of(b"POST /z HTTP/1.1\r\nHost: a\r\nX-Canary: 1\r\n"
                    b"Content-Length: 0\r\n\r\n") == "canary"
    assert route_of(b"GET /z HTTP/1.1\r\nHost: a\r\nX-Canary: 2\r\n\r\n") == "rest"
    assert route_of(b"GET /items/42 HTTP/1.1\r\nHost: a\r\n\r\n") == "canary"
    assert route_of(b"GET /items/4x HTTP/1.1\r\nHost: a\r\n\r\n") == "rest"


def test_json_round_trip() -> None:
    routes, budget = routes_from_json(TABLE)
    assert [r.name for r in routes] == ["exact", "api-get", "canary", "rest"]
    assert budget is None


def test_budget_ratio_and_minimum() -> None:
    b = RetryBudget(RetryBudgetSpec(ratio=0.2, min_per_second=0, window=10))
    now = 100.0
    for _ in range(100):
        b.deposit(now)
    got = sum(b.try_withdraw(now) for _ in range(50))
    assert got == 20  # 20 % of 100 requests
    # Outside the window, the old requests no longer count.
    assert not b.try_withdraw(now + 5)
    assert b.try_withdraw(now + 11) is False
    for _ in range(10):
        b.deposit(now + 11)
    assert sum(b.try_withdraw(now + 11) for _ in range(10)) == 2
    m = RetryBudget(RetryBudgetSpec(ratio=0.0, min_per_second=1, window=10))
    assert sum(m.try_withdraw(5.0) for _ in range(20)) == 10  # the minimum: 1/s x 10 s
