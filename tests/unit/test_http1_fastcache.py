"""The HTTP/1 fast paths memoize their verdicts by exact head bytes: same answers, bounded."""

from __future__ import annotations

import pytest


def test_fast_path_verdicts_are_memoized_and_bounded() -> None:
    from meshlet.proto import http1 as h1

    h1._resp_cache.clear()
    h1._req_cache.clear()
    resp = (b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n\r\nok")
    assert h1.match_simple_response(resp) == 200
    assert h1.match_simple_response(resp) == 200  # from the cache
    assert h1.match_simple_response(resp + b"!") is None  # length checked per message
    assert h1.match_simple_response(resp[:-1]) is None
    bad = b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok"
    assert h1.match_simple_response(bad) is None
    assert h1.match_simple_response(bad) is None  # the negative verdict is kept too
    with pytest.raises(h1.LocalProtocolError):
        h1.parse_response(bad, b"GET")
    req = b"GET /a HTTP/1.1\r\nHost: Web\r\n\r\n"
    for _ in range(2):
        r = h1.parse_request(req + b"GET /b HTTP/1.1\r\n")  # pipelined bytes after it
        assert r is not None and (r.method, r.target, r.host, r.end) == (
            b"GET", b"/a", b"web", len(req))
    assert h1.parse_request(req, max_line=len(b"GET /a HTTP/1.1")) is not None
    with pytest.raises(h1.LocalProtocolError):
        h1.parse_request(req, max_line=len(b"GET /a HTTP/1.1") - 1)
    for i in range(3 * h1._CACHE_MAX):
        h1.parse_request(b"GET /%d HTTP/1.1\r\nHost: w\r\n\r\n" % i)
        h1.match_simple_response(b"HTTP/1.1 200 OK\r\nX: %d\r\nContent-Length: 0\r\n\r\n" % i)
    assert len(h1._req_cache) <= h1._CACHE_MAX and len(h1._resp_cache) <= h1._CACHE_MAX
    big = b"GET / HTTP/1.1\r\nHost: w\r\nX: " + b"a" * 4000 + b"\r\n\r\n"
    h1._req_cache.clear()
    assert h1.parse_request(big) is not None
    assert not h1._req_cache  # long heads are not kept
