"""meshlet.proto.http1.parse_request: the request head parser and its framing rules."""

from __future__ import annotations

import pytest

from meshlet.proto.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    LocalProtocolError,
    RequestHead,
    parse_request,
)


def req(*fields: bytes, line: bytes = b"GET /p?q=1 HTTP/1.1", host: bool = True) -> bytes:
    hs = ([b"Host: example.com"] if host else []) + list(fields)
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in hs) + b"\r\n"


def ok(buf: bytes, **kw: object) -> RequestHead:
    h = parse_request(buf, **kw)  # type: ignore[arg-type]
    assert h is not None
    return h


def err(buf: bytes, status: int = 400, **kw: object) -> LocalProtocolError:
    with pytest.raises(LocalProtocolError) as ei:
        parse_request(buf, **kw)  # type: ignore[arg-type]
    assert ei.value.status == status, ei.value.reason
    assert ei.value.reason
    return ei.value


# --- accepted heads ----------------------------------------------------------------------

def test_simple_get() -> None:
    buf = req()
    h = ok(buf + b"NEXT")
    assert h.method == b"GET"
    assert h.target == b"/p?q=1"
    assert h.version == 11
    assert h.host == b"example.com"
    assert h.body == BODY_NONE
    assert h.content_length == 0
    assert h.close is False
    assert h.upgrade is None
    assert h.expect_continue is False
    assert h.needs_rewrite is False
    assert h.end == len(buf)
    assert h.raw == buf


def test_content_length_body() -> None:
    h = ok(req(b"Content-Length: 12", line=b"POST /x HTTP/1.1"))
    assert (h.method, h.body, h.content_length) == (b"POST", BODY_LENGTH, 12)


def test_content_length_zero_and_whitespace() -> None:
    assert ok(req(b"Content-Length:0")).content_length == 0
    h = ok(req(b"content-length: \t 7 \t"))
    assert (h.body, h.content_length) == (BODY_LENGTH, 7)


def test_chunked_body() -> None:
    h = ok(req(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.1"))
    assert h.body == BODY_CHUNKED


@pytest.mark.parametrize("te", [b"gzip, chunked", b"GZIP,Chunked", b"chunked ", b"chunked,"])
def test_chunked_last_coding(te: bytes) -> None:
    assert ok(req(b"Transfer-Encoding: " + te)).body == BODY_CHUNKED


def test_chunked_over_two_lines() -> None:
    h = ok(req(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"))
    assert h.body == BODY_CHUNKED


@pytest.mark.parametrize("dup", [
    (b"Content-Length: 5", b"Content-Length: 5"),
    (b"Content-Length: 5, 5",),
    (b"Content-Length: 5,5", b"content-length: 5"),
])
def test_identical_duplicate_content_length_accepted(dup: tuple[bytes, ...]) -> None:
    h = ok(req(*dup))
    assert (h.body, h.content_length) == (BODY_LENGTH, 5)


def test_http10_without_host() -> None:
    h = ok(req(line=b"GET / HTTP/1.0", host=False))
    assert h.version == 10
    assert h.host == b""
    assert h.close is True  # 1.0 closes unless keep-alive


def test_http10_keep_alive() -> None:
    h = ok(req(b"Connection: Keep-Alive", line=b"GET / HTTP/1.0"))
    assert h.close is False
    assert h.needs_rewrite is True  # Connection is hop-by-hop


def test_connection_close() -> None:
    h = ok(req(b"Connection: close"))
    assert h.close is True
    assert h.needs_rewrite is True


def test_connection_keep_alive_11_fast_path() -> None:
    h = ok(req(b"Connection: keep-alive", b"Content-Length: 3"))
    assert (h.close, h.needs_rewrite, h.content_length) == (False, False, 3)


def test_unknown_token_method_and_odd_target() -> None:
    h = ok(req(line=b"M-SEARCH * HTTP/1.1"))
    assert (h.method, h.target) == (b"M-SEARCH", b"*")
    h = ok(req(line=b"get http://a/%7E\x80\xff HTTP/1.1"))
    assert (h.method, h.target) == (b"get", b"http://a/%7E\x80\xff")


def test_values_with_tabs_spaces_and_obs_text() -> None:
    h = ok(req(b"X-A: a \t b", b"X-B:", b"X-C:   ", b"X-D: caf\xc3\xa9", b"X-E: \x80\xff"))
    assert h.body == BODY_NONE


def test_expect_continue() -> None:
    h = ok(req(b"Expect: 100-Continue", b"Content-Length: 3"))
    assert h.expect_continue is True
    assert ok(req(b"Expect: something")).expect_continue is False


def test_upgrade_requires_connection_upgrade() -> None:
    h = ok(req(b"Connection: Upgrade", b"Upgrade: websocket"))
    assert h.upgrade == b"websocket"
    assert "upgrade" not in {n.decode() for n in h.drop}
    h = ok(req(b"Upgrade: websocket"))
    assert h.upgrade is None
    assert h.needs_rewrite is True  # the stray Upgrade must be removed


@pytest.mark.parametrize("field", [b"TE: trailers", b"Keep-Alive: timeout=5",
                                   b"Proxy-Connection: keep-alive", b"Connection: x-foo"])
def test_hop_by_hop_fields_need_rewrite(field: bytes) -> None:
    assert ok(req(field)).needs_rewrite is True


def test_connection_options_become_drop() -> None:
    h = ok(req(b"Connection: X-Foo, close", b"X-Foo: 1"))
    assert h.drop == frozenset({b"x-foo"})
    assert h.close is True


def test_meshlet_fields_need_rewrite_only_when_stripping() -> None:
    buf = req(b"Meshlet-Proxy-Error: forged")
    assert ok(buf, strip_mesh=True).needs_rewrite is True
    assert ok(buf, strip_mesh=False).needs_rewrite is False


def test_host_is_lowercased_and_trimmed() -> None:
    assert ok(req(b"HOST:  Example.COM:8080 \t", host=False)).host == b"example.com:8080"


def test_bytearray_input() -> None:
    buf = req(b"Content-Length: 2") + b"hi"
    h = ok(bytearray(buf))  # type: ignore[arg-type]
    assert h.raw == buf[:-2]
    assert isinstance(h.raw, bytes)
    assert h.end == len(buf) - 2


def test_incomplete_returns_none_for_every_prefix() -> None:
    buf = req(b"Content-Length: 5", b"X-Long: " + b"v" * 50, b"Connection: keep-alive")
    for i in range(len(buf)):
        assert parse_request(buf[:i]) is None, buf[:i]
    assert ok(buf).end == len(buf)


# --- refused heads -----------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
    (b"Transfer-Encoding: chunked", b"Content-Length: 0"),
])
def test_content_length_with_transfer_encoding(fields: tuple[bytes, ...]) -> None:
    err(req(*fields))


@pytest.mark.parametrize("fields", [
    (b"Content-Length: 5", b"Content-Length: 6"),
    (b"Content-Length: 5, 6",),
    (b"Content-Length: 5", b"Content-Length: 05"),
])
def test_differing_content_length(fields: tuple[bytes, ...]) -> None:
    err(req(*fields))


@pytest.mark.parametrize("value", [
    b"+5", b"-5", b"5a", b"0x10", b"1e3", b"5.0", b"", b"1 2", b",", b"5,,5",
    b"9" * 19, b"99999999999999999999999999",
])
def test_bad_content_length(value: bytes) -> None:
    err(req(b"Content-Length: " + value))


@pytest.mark.parametrize("te", [
    b"gzip", b"chunked, gzip", b"chunked, chunked", b"identity", b"chunked;q=1", b"",
    b"x-chunked",
])
def test_bad_transfer_encoding(te: bytes) -> None:
    err(req(b"Transfer-Encoding: " + te))


def test_chunked_twice_over_two_lines() -> None:
    err(req(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"))


def test_chunked_in_http10() -> None:
    err(req(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.0"))


@pytest.mark.parametrize("bad", [
    req(b"X-A: one", b" folded"),  # obs-fold
    req(b"X-A: one", b"\tfolded"),
    b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",  # leading whitespace on first field line
    b"GET / HTTP/1.1\r\nHost: a\rX-B: b\r\n\r\n",  # bare CR
    b"GET / HTTP/1.1\r\nHost: a\nX-B: b\r\n\r\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost: a\r\n\n",  # bare LF ends the head
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",  # bare LF after the request line
    b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n",
    req(b"Content-Length : 5"),  # whitespace before colon
    req(b"Content-Length\t: 5"),
    req(b"X(a): b"), req(b"X a: b"), req(b"X@: b"), req(b"X\x00: b"), req(b"\xe9t\xe9: b"),
    req(b": no-name"), req(b"no-colon"),
    req(b"X: a\x00b"), req(b"X: a\x01"), req(b"X: \x7f"), req(b"X: a\x1bb"), req(b"X: \x0b"),
])
def test_malformed_field_section(bad: bytes) -> None:
    err(bad)


@pytest.mark.parametrize("line", [
    b"GET  / HTTP/1.1", b"GET / HTTP/1.1 ", b"GET /a b HTTP/1.1", b"GET / HTTP/2.0",
    b"GET / http/1.1", b" GET / HTTP/1.1", b"GET\t/ HTTP/1.1", b"G(T / HTTP/1.1",
    b"GET / HTTP/1.10", b"GET /\x00 HTTP/1.1", b"GET /\x7f HTTP/1.1", b"GET",
])
def test_malformed_request_line(line: bytes) -> None:
    err(req(line=line))


def test_missing_host_on_11() -> None:
    assert err(req(host=False)).reason
    err(req(b"Content-Length: 0", host=False))


@pytest.mark.parametrize("fields", [
    (b"Host:",), (b"Host:   ",), (b"Host: a", b"Host: b"), (b"Host: a, b",),
])
def test_bad_or_repeated_host(fields: tuple[bytes, ...]) -> None:
    err(req(*fields, host=False))


def test_connect_is_405() -> None:
    err(req(line=b"CONNECT example.com:443 HTTP/1.1"), 405)


def test_request_line_too_long_414() -> None:
    target = b"/" + b"a" * 200
    line = b"GET " + target + b" HTTP/1.1"
    err(req(line=line), 414, max_line=100)
    err(line + b"\r\n", 414, max_line=100)  # head still incomplete
    err(line[:150], 414, max_line=100)  # line itself still incomplete
    assert ok(req(line=line), max_line=len(line)).target == target


def test_request_line_limit_does_not_depend_on_segmentation() -> None:
    # A request line of 109 bytes (without CRLF) against max_line=105: today it is refused
    # with 414 when only the line has arrived but accepted once the whole head is there
    # (the complete path measures up to the end of the target, not of the line).
    line = b"GET /" + b"a" * 95 + b" HTTP/1.1"
    assert len(line) == 109
    err(line + b"\r\n", 414, max_line=105)
    err(line + b"\r\nHost: a\r\n\r\n", 414, max_line=105)


def test_head_too_large_431() -> None:
    big = req(*[b"X-F%d: %s" % (i, b"v" * 90) for i in range(20)])
    assert len(big) > 1000
    err(big, 431, max_head=1000)  # complete but too large
    err(big[:1500], 431, max_head=1000)  # incomplete and already too large
    assert parse_request(big[:900], max_head=1000) is None
    assert ok(big, max_head=len(big)).end == len(big)


def test_garbage_is_400_not_waiting() -> None:
    err(b"\x16\x03\x01\x00\x10\x01\r\n\r\n")
    err(b"hello\n")
