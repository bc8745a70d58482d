"""meshlet.proto.http1.parse_response: response heads, framing errors answer 502."""

from __future__ import annotations

import pytest

from meshlet.proto.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    LocalProtocolError,
    ResponseHead,
    match_simple_response,
    parse_response,
)


def resp(*fields: bytes, line: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def ok(buf: bytes, method: bytes = b"GET", upgrading: bool = False) -> ResponseHead:
    h = parse_response(buf, method, upgrading)
    assert h is not None
    return h


def err(buf: bytes, method: bytes = b"GET") -> LocalProtocolError:
    with pytest.raises(LocalProtocolError) as ei:
        parse_response(buf, method)
    assert ei.value.status == 502, ei.value.reason
    return ei.value


def test_content_length() -> None:
    buf = resp(b"Content-Length: 5", b"Server: x")
    h = ok(buf + b"hello")
    assert (h.status, h.version, h.body, h.content_length) == (200, 11, BODY_LENGTH, 5)
    assert (h.close, h.needs_rewrite, h.end) == (False, False, len(buf))
    assert h.raw == buf


def test_chunked() -> None:
    h = ok(resp(b"Transfer-Encoding: gzip, chunked"))
    assert h.body == BODY_CHUNKED


def test_no_length_reads_until_close() -> None:
    h = ok(resp(b"Server: x"))
    assert h.body == BODY_UNTIL_CLOSE
    assert h.close is True
    assert h.needs_rewrite is True  # the proxy must tell its client it closes


def test_empty_reason_phrase() -> None:
    assert ok(resp(b"Content-Length: 0", line=b"HTTP/1.1 404 ")).status == 404


@pytest.mark.parametrize("status", [204, 304])
@pytest.mark.parametrize("fields", [(), (b"Content-Length: 10",), (b"Transfer-Encoding: chunked",),
                                    (b"Content-Length: 10", b"X-A: b")])
def test_no_body_statuses(status: int, fields: tuple[bytes, ...]) -> None:
    h = ok(resp(*fields, line=b"HTTP/1.1 %d X" % status))
    assert h.body == BODY_NONE
    assert h.close is False


@pytest.mark.parametrize("fields", [(), (b"Content-Length: 10",), (b"Transfer-Encoding: chunked",)])
def test_head_response_has_no_body(fields: tuple[bytes, ...]) -> None:
    h = ok(resp(*fields), method=b"HEAD")
    assert h.body == BODY_NONE
    assert h.content_length == 0
    assert h.close is False


@pytest.mark.parametrize("status", [100, 102, 103])
def test_informational_has_no_body(status: int) -> None:
    h = ok(resp(line=b"HTTP/1.1 %d Continue" % status))
    assert h.body == BODY_NONE
    assert h.close is False


def test_informational_with_length_is_refused() -> None:
    err(resp(b"Content-Length: 5", line=b"HTTP/1.1 100 Continue"))


def test_101_upgrade_keeps_upgrade() -> None:
    buf = resp(b"Connection: Upgrade", b"Upgrade: websocket", line=b"HTTP/1.1 101 Switching")
    h = ok(buf, upgrading=True)
    assert h.body == BODY_NONE
    assert b"upgrade" not in h.drop


def test_http10_response() -> None:
    h = ok(resp(b"Content-Length: 2", line=b"HTTP/1.0 200 OK"))
    assert (h.version, h.close, h.needs_rewrite) == (10, True, True)
    h = ok(resp(b"Content-Length: 2", b"Connection: keep-alive", line=b"HTTP/1.0 200 OK"))
    assert h.close is False


def test_connection_close_response() -> None:
    h = ok(resp(b"Content-Length: 2", b"Connection: close"))
    assert (h.close, h.needs_rewrite) == (True, True)


def test_identical_duplicate_lengths() -> None:
    h = ok(resp(b"Content-Length: 3", b"Content-Length: 3"))
    assert (h.body, h.content_length) == (BODY_LENGTH, 3)


@pytest.mark.parametrize("fields", [
    (b"Content-Length: 3", b"Transfer-Encoding: chunked"),
    (b"Content-Length: 3", b"Content-Length: 4"),
    (b"Content-Length: -3",), (b"Content-Length: 3x",), (b"Content-Length: " + b"1" * 19,),
    (b"Transfer-Encoding: chunked, gzip",), (b"Transfer-Encoding: gzip",),
    (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
    (b"Transfer-Encoding:",),
    (b"X-A: a", b" folded"), (b"X-A : a",), (b"X-A: a\x00",), (b"X[: a",),
])
def test_framing_and_syntax_errors_are_502(fields: tuple[bytes, ...]) -> None:
    err(resp(*fields))


@pytest.mark.parametrize("buf", [
    b"HTTP/1.1 200 OK\r\nX: a\rY: b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n",
    b"HTTP/1.1 200 OK\nX: a\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"HTTP/1.1 099 Low\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"<html><body>hello</body></html>",
    b"HTTP/1.1 200 OK\x00\r\n\r\n",
])
def test_malformed_responses(buf: bytes) -> None:
    err(buf)


def test_chunked_in_http10_response() -> None:
    err(resp(b"Transfer-Encoding: chunked", line=b"HTTP/1.0 200 OK"))


def test_incomplete_prefixes_return_none() -> None:
    buf = resp(b"Content-Length: 5", b"Server: meshlet-test", b"X-Long: " + b"z" * 40)
    for i in range(len(buf)):
        assert parse_response(buf[:i], b"GET") is None, buf[:i]
    assert ok(buf).end == len(buf)


def test_response_too_large() -> None:
    buf = resp(*[b"X-%d: %s" % (i, b"v" * 100) for i in range(20)])
    with pytest.raises(LocalProtocolError) as ei:
        parse_response(buf, b"GET", max_head=500)
    assert ei.value.status == 502
    with pytest.raises(LocalProtocolError) as ei:
        parse_response(buf[:800], b"GET", max_head=500)
    assert ei.value.status == 502


# --- the proxy's fast path: match_simple_response ------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200),
        (b"HTTP/1.1 404 Not Found\r\nServer: x\r\ncontent-length: 2\r\n"
         b"Connection: keep-alive\r\n\r\nno", 404),
        # Not whole, or more than one response: not the fast path.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1", None),
        # Something to rewrite or a framing the fast path does not handle.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\nhello", None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", None),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", None),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", None),
        (b"HTTP/1.1 100 Continue\r\n\r\n", None),
        # Malformed: never the fast path (the general parser then refuses it).
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
         None),
        (b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 5\r\n\r\nhello", None),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 5\r\n\r\nhello", None),
    ],
)
def test_match_simple_response(data: bytes, expected: int | None) -> None:
    assert match_simple_response(data) == expected
    if expected is not None:
        head = parse_response(data, b"GET")
        assert head is not None
        assert (head.status, head.body, head.end + head.content_length) == (
            expected, BODY_LENGTH, len(data))
        assert not head.needs_rewrite and not head.close
