"""meshlet.proto.http1.rewrite_head: hop-by-hop removal, everything else byte-for-byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.proto.http1 import (
    LocalProtocolError,
    parse_request,
    parse_response,
    rewrite_head,
)

HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade"}


def test_removes_hop_by_hop_and_listed_fields_keeps_rest_in_order() -> None:
    raw = (
        b"POST /up HTTP/1.1\r\n"
        b"hOsT: Example\r\n"
        b"Connection: close, X-Private\r\n"
        b"X-Keep:  spaced \t value \t\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"x-private: secret\r\n"
        b"TE: trailers\r\n"
        b"Content-Length: 3\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: h2c\r\n"
        b"Meshlet-Thing: a\r\n"
        b"X-Z:\r\n"
        b"\r\n"
    )
    h = parse_request(raw)
    assert h is not None and h.needs_rewrite
    assert rewrite_head(h, strip_mesh=False) == (
        b"POST /up HTTP/1.1\r\n"
        b"hOsT: Example\r\n"
        b"X-Keep:  spaced \t value \t\r\n"
        b"Content-Length: 3\r\n"
        b"Meshlet-Thing: a\r\n"
        b"X-Z:\r\n"
        b"\r\n"
    )
    assert b"Meshlet-Thing" not in rewrite_head(h, strip_mesh=True)


def test_strip_mesh_any_case() -> None:
    raw = (b"GET / HTTP/1.1\r\nMESHLET-Proxy-Error: x\r\nHost: a\r\nmeshlet-id: y\r\n"
           b"X-Meshlet: z\r\n\r\n")
    h = parse_request(raw, strip_mesh=True)
    assert h is not None and h.needs_rewrite
    assert rewrite_head(h, True) == b"GET / HTTP/1.1\r\nHost: a\r\nX-Meshlet: z\r\n\r\n"


def test_add_lines_go_before_the_blank_line() -> None:
    h = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert h is not None
    out = rewrite_head(h, False, add=b"Meshlet-Id: 1\r\nX-B: 2\r\n")
    assert out == b"GET / HTTP/1.1\r\nHost: a\r\nMeshlet-Id: 1\r\nX-B: 2\r\n\r\n"


def test_keep_upgrade() -> None:
    raw = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
           b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\nKeep-Alive: 1\r\n\r\n")
    h = parse_request(raw)
    assert h is not None and h.upgrade == b"websocket"
    out = rewrite_head(h, False, keep_upgrade=True)
    assert out == (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
                   b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n")
    assert parse_request(out) is not None


def test_response_10_becomes_11_status_line() -> None:
    h = parse_response(b"HTTP/1.0 200 Fine\r\nContent-Length: 1\r\nX: y\r\n\r\n", b"GET")
    assert h is not None and h.needs_rewrite
    assert rewrite_head(h, False, add=b"connection: close\r\n") == (
        b"HTTP/1.1 200 Fine\r\nContent-Length: 1\r\nX: y\r\nconnection: close\r\n\r\n")


def test_response_hop_by_hop_removed() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=4\r\nConnection: x-a\r\nX-A: 1\r\n"
           b"X-B: 2\r\nContent-Length: 0\r\n\r\n")
    h = parse_response(raw, b"GET")
    assert h is not None and h.needs_rewrite
    assert rewrite_head(h, False) == b"HTTP/1.1 200 OK\r\nX-B: 2\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: transfer-encoding\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close, Content-Length\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n",
])
def test_connection_cannot_strip_framing_or_host(raw: bytes) -> None:
    # A client naming Content-Length / Transfer-Encoding / Host in Connection must not make
    # the proxy forward a head with different framing (request smuggling): either refuse
    # the request or keep those fields.
    try:
        h = parse_request(raw)
    except LocalProtocolError:
        return
    assert h is not None
    out = rewrite_head(h, False) if h.needs_rewrite else h.raw
    h2 = parse_request(out)
    assert h2 is not None
    assert (h2.body, h2.content_length, h2.host) == (h.body, h.content_length, h.host)


_TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NAME = st.text(_TCHARS, min_size=1, max_size=12).filter(
    lambda n: n.lower() not in HOP | {"host", "content-length", "transfer-encoding",
                                      "expect"} and not n.lower().startswith("meshlet-"))
_VALUE = st.text("abc XYZ\t019;=,\"/", max_size=12).map(lambda v: v.lstrip(" \t"))


@settings(max_examples=150, deadline=None)
@given(
    fields=st.lists(
        st.one_of(
            st.tuples(_NAME, _VALUE, st.just("keep")),
            st.tuples(st.sampled_from(["Keep-Alive", "TE", "Proxy-Connection", "UPGRADE",
                                       "te"]), _VALUE, st.just("hop")),
            st.tuples(st.sampled_from(["Meshlet-A", "meshlet-b"]), _VALUE, st.just("mesh")),
            st.tuples(st.sampled_from(["X-Drop", "x-drop"]), _VALUE, st.just("listed")),
        ),
        max_size=12,
    ),
    strip=st.booleans(),
    conn_pos=st.integers(0, 12),
)
def test_rewrite_property(fields: list[tuple[str, str, str]], strip: bool, conn_pos: int) -> None:
    fields = list(fields)
    fields.insert(min(conn_pos, len(fields)), ("Connection", "close, X-Drop", "hop"))
    fields.insert(0, ("Host", "h", "keep"))
    lines = [f"{n}:{' ' if i % 2 else ''}{v}\r\n".encode() for i, (n, v, _k) in enumerate(fields)]
    raw = b"GET / HTTP/1.1\r\n" + b"".join(lines) + b"\r\n"
    h = parse_request(raw, strip_mesh=strip)
    assert h is not None
    assert h.needs_rewrite  # Connection: close at least
    want = b"GET / HTTP/1.1\r\n" + b"".join(
        line for line, (_n, _v, kind) in zip(lines, fields, strict=True)
        if kind == "keep" or (kind == "mesh" and not strip)
    ) + b"\r\n"
    assert rewrite_head(h, strip) == want
