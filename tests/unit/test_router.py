"""The outbound HTTP proxy listener's routing decisions (pure: a fake discovery)."""

from __future__ import annotations

from typing import Any

import pytest

from meshlet.proto.http1 import LocalProtocolError, parse_request, rewrite_head
from meshlet.proxy.balance import Balancer
from meshlet.proxy.router import Router


class FakeDiscovery:
    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def destination(self, host: str, port: int) -> Balancer:
        self.asked.append((host, port))
        return Balancer(f"{host}:{port}", False)


def route(raw: bytes, own: set[int] | None = None) -> tuple[Any, bytes, FakeDiscovery]:
    d = FakeDiscovery()
    r = Router(d)  # type: ignore[arg-type]
    r.own_ports = own or set()
    req = parse_request(raw, 65536, 16384)
    assert req is not None
    target, line, add = r.route(req)
    # The head the proxy forwards: as received, or rebuilt with the router's line.
    head = rewrite_head(req, False, add=add, line=line) if line else b""
    return target, head, d


def test_origin_form_goes_by_host() -> None:
    t, head, d = route(b"GET /x HTTP/1.1\r\nHost: Web:8080\r\n\r\n")
    assert d.asked == [("web", 8080)] and head == b"" and t.name == "web:8080"
    _, _, d = route(b"GET /x HTTP/1.1\r\nHost: web\r\n\r\n")
    assert d.asked == [("web", 80)]


def test_absolute_form_is_rewritten_to_origin_form() -> None:
    raw = (b"POST http://reviews.default:8080/a/b?q=1 HTTP/1.1\r\nHost: other\r\n"
           b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
           b"Content-Length: 2\r\nX-Keep: 1\r\n\r\n")
    _, head, d = route(raw)
    assert d.asked == [("reviews.default", 8080)]
    assert head.startswith(b"POST /a/b?q=1 HTTP/1.1\r\n")
    lower = head.lower()
    assert b"proxy-" not in lower and b"host: other" not in lower
    assert b"Host: reviews.default:8080\r\n" in head
    assert b"Content-Length: 2\r\n" in head and b"X-Keep: 1\r\n" in head
    assert head.endswith(b"\r\n\r\n")
    _, head, _ = route(b"GET http://web HTTP/1.1\r\nHost: web\r\n\r\n")
    assert head.startswith(b"GET / HTTP/1.1\r\n")
    _, head, _ = route(b"GET http://web?x=1 HTTP/1.1\r\nHost: web\r\n\r\n")
    assert head.startswith(b"GET /?x=1 HTTP/1.1\r\n")
    _, _, d = route(b"GET http://[::1]:9000/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert d.asked == [("::1", 9000)]


@pytest.mark.parametrize(("raw", "status", "reason"), [
    (b"GET https://web/ HTTP/1.1\r\nHost: web\r\n\r\n", 400, "unsupported_target"),
    (b"GET http://u:p@web/ HTTP/1.1\r\nHost: web\r\n\r\n", 400, "userinfo_in_target"),
    (b"GET http://we_b/ HTTP/1.1\r\nHost: web\r\n\r\n", 400, "invalid_authority"),
    (b"GET http://web:99999/ HTTP/1.1\r\nHost: web\r\n\r\n", 400, "invalid_authority"),
    (b"GET http://127.0.0.1:4140/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "proxy_loop"),
    (b"GET / HTTP/1.1\r\nHost: localhost:4140\r\n\r\n", 400, "proxy_loop"),
])
def test_refused(raw: bytes, status: int, reason: str) -> None:
    try:
        route(raw, own={4140})
    except LocalProtocolError as e:
        assert (e.status, e.reason) == (status, reason)
    else:
        pytest.fail("not refused")


def tunnel(raw: bytes, own: set[int] | None = None) -> tuple[str, int]:
    r = Router(FakeDiscovery())  # type: ignore[arg-type]
    r.own_ports = own or set()
    req = parse_request(raw, 65536, 16384, allow_connect=True)
    assert req is not None
    return r.tunnel(req)


def test_connect_tunnels() -> None:
    assert tunnel(b"CONNECT Web:80 HTTP/1.1\r\nHost: web:80\r\n\r\n") == ("web", 80)
    assert tunnel(b"CONNECT [::1]:9000 HTTP/1.1\r\nHost: x\r\n\r\n") == ("::1", 9000)
    for bad in (b"CONNECT web HTTP/1.1\r\nHost: web\r\n\r\n",  # no port
                b"CONNECT web:0 HTTP/1.1\r\nHost: web\r\n\r\n",
                b"CONNECT /x HTTP/1.1\r\nHost: web\r\n\r\n"):
        with pytest.raises(LocalProtocolError) as e:
            tunnel(bad)
        assert (e.value.status, e.value.reason) == (400, "invalid_connect_target")
    with pytest.raises(LocalProtocolError) as e:
        tunnel(b"CONNECT 127.0.0.1:4140 HTTP/1.1\r\nHost: x\r\n\r\n", own={4140})
    assert e.value.reason == "proxy_loop"
    # Elsewhere (inbound, explicit listeners) the parser still refuses CONNECT.
    with pytest.raises(LocalProtocolError) as e:
        parse_request(b"CONNECT web:80 HTTP/1.1\r\nHost: web\r\n\r\n", 65536, 16384)
    assert e.value.status == 405
