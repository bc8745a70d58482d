"""meshlet.proto.detect: protocol detection from the first bytes of a stream."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlet.proto.detect import H2_PREFACE, MAX_DETECT_BYTES, Proto, detect

TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KNOWN = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE",
         b"CONNECT"]

CLIENT_HELLO = (
    b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(32)) + b"\x00\x02\x13\x01"
    + b"\x01\x00" + b"\x00" * 40
)
SAMPLES: list[tuple[bytes, Proto]] = [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Proto.HTTP1),
    (b"POST /x?y=1 HTTP/1.0\r\nContent-Length: 0\r\n\r\n", Proto.HTTP1),
    (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", Proto.HTTP1),
    (b"PUT /a HTTP/1.1\r\n\r\n", Proto.HTTP1),
    (b"PATCH /a HTTP/1.1\r\n\r\n", Proto.HTTP1),
    (b"PROPFIND /dav HTTP/1.1\r\nHost: a\r\n\r\n", Proto.HTTP1),
    (b"M-SEARCH * HTTP/1.1\r\nHost: a\r\n\r\n", Proto.HTTP1),
    (b"BREW /pot HTTP/1.0\n\n", Proto.HTTP1),  # bare LF first line is still HTTP/1-shaped
    (H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", Proto.HTTP2),
    (CLIENT_HELLO, Proto.TLS),
    (b"\x16\x03\x00\x00\x10\x01" + b"\x00" * 16, Proto.TLS),  # SSLv3 record version
    (b"SSH-2.0-OpenSSH_9.6\r\n", Proto.OPAQUE),
    (b"*1\r\n$4\r\nPING\r\n", Proto.OPAQUE),  # redis
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Proto.OPAQUE),  # postgres SSLRequest
    (b"EHLO example.com\r\n", Proto.OPAQUE),
    (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", Proto.OPAQUE),  # broken h2 preface
    (b"FOO /x HTTP/2.0\r\n", Proto.OPAQUE),
    (b"FOO /x HTTP/1.2\r\n", Proto.OPAQUE),
    (b"FOO  /x HTTP/1.1\r\n", Proto.OPAQUE),
    (b"\x16\x03\x01\x00\x10\x02" + b"\x00" * 16, Proto.OPAQUE),  # ServerHello, not Client
    (b"\x16\x02\x01\x00\x10\x01", Proto.OPAQUE),
    (b"\x16\x03\x05\x00\x10\x01", Proto.OPAQUE),
    (b"get\t/ HTTP/1.1\r\n", Proto.OPAQUE),
]


@pytest.mark.parametrize(("sample", "want"), SAMPLES)
def test_sample_decides(sample: bytes, want: Proto) -> None:
    assert detect(sample) is want
    assert detect(bytearray(sample)) is want


@pytest.mark.parametrize(("sample", "want"), SAMPLES)
def test_every_prefix_is_undecided_or_final(sample: bytes, want: Proto) -> None:
    decided_at = None
    for i in range(len(sample) + 1):
        got = detect(sample[:i])
        assert got is None or got is want, (i, sample[:i], got)
        if got is not None and decided_at is None:
            decided_at = i
        if decided_at is not None:
            assert got is want  # once decided, more bytes never undecide
    assert decided_at is not None


def test_empty_needs_more() -> None:
    assert detect(b"") is None


@pytest.mark.parametrize("m", KNOWN)
def test_known_method_decides_at_the_space(m: bytes) -> None:
    for i in range(1, len(m) + 1):
        assert detect(m[:i]) is None
    # decided before the request line is complete: the HTTP/1 parser judges the rest
    assert detect(m + b" ") is Proto.HTTP1
    assert detect(m + b" \x00garbage") is Proto.HTTP1


def test_unknown_method_waits_for_first_line() -> None:
    line = b"PURGE /cache HTTP/1.1\r\n"
    for i in range(1, len(line)):
        assert detect(line[:i]) is None, line[:i]
    assert detect(line) is Proto.HTTP1
    assert detect(line[:-1] + b"X") is None  # no newline yet
    assert detect(b"PURGE /cache HTTP/1.1 extra\r\n") is Proto.OPAQUE


def test_h2_preface_prefixes() -> None:
    for i in range(1, len(H2_PREFACE)):
        assert detect(H2_PREFACE[:i]) is None
    assert detect(H2_PREFACE) is Proto.HTTP2


def test_tls_decides_at_sixth_byte() -> None:
    for i in range(1, 6):
        assert detect(CLIENT_HELLO[:i]) is None
    assert detect(CLIENT_HELLO[:6]) is Proto.TLS
    assert detect(b"\x16\x04") is Proto.OPAQUE
    assert detect(b"\x16\x03\x09") is Proto.OPAQUE


@pytest.mark.parametrize("first", [b"\x00", b"\x01", b"\xff", b"\r", b"\n", b" ", b"(", b"{"])
def test_non_token_first_byte_is_opaque_at_once(first: bytes) -> None:
    assert detect(first) is Proto.OPAQUE


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=33, max_size=200))
def test_garbage_without_space_is_opaque_within_33_bytes(buf: bytes) -> None:
    head = buf[:33]
    if b" " in head or head[0] == 0x16:
        return
    assert detect(head) is Proto.OPAQUE
    assert detect(buf) is Proto.OPAQUE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_prefix_consistency(buf: bytes) -> None:
    final = detect(buf)
    for i in range(len(buf)):
        got = detect(buf[:i])
        assert got is None or got is final, (buf[:i], got, final)


def _token(max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(list(TCHARS)), min_size=1, max_size=max_size).map(bytes)


_TARGET = st.lists(st.integers(0x21, 0xFF).filter(lambda c: c != 0x7F), min_size=1,
                   max_size=40).map(bytes)


@st.composite
def _first_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["known", "token", "h2", "tls", "junk"]))
    tail = draw(st.binary(max_size=30))
    if kind == "known":
        return draw(st.sampled_from(KNOWN)) + b" " + draw(_TARGET) + b" HTTP/1.1\r\n" + tail
    if kind == "token":
        ver = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0", b"HTTP/1.1x"]))
        return draw(_token(20)) + b" " + draw(_TARGET) + b" " + ver + b"\r\n" + tail
    if kind == "h2":
        return H2_PREFACE + tail
    if kind == "tls":
        return b"\x16\x03" + draw(st.binary(min_size=3, max_size=3)) + b"\x01" + tail
    return draw(st.binary(min_size=1, max_size=60))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_first_bytes())
def test_generated_streams_prefix_consistency(buf: bytes) -> None:
    final = detect(buf)
    for i in range(len(buf)):
        got = detect(buf[:i])
        assert got is None or got is final, (buf[:i], got, final)


@given(_token(20), _TARGET, st.sampled_from([b"0", b"1"]), st.sampled_from([b"\r\n", b"\n"]))
def test_any_token_method_with_http1_line_is_http1(
    method: bytes, target: bytes, minor: bytes, eol: bytes
) -> None:
    assert detect(method + b" " + target + b" HTTP/1." + minor + eol) is Proto.HTTP1


def test_long_unknown_method_decision_does_not_depend_on_segmentation() -> None:
    # A 40-character method token: the answer must not depend on how TCP split the stream
    # (today 32 bytes alone give OPAQUE and the whole line HTTP1).
    line = b"A" * 40 + b" / HTTP/1.1\r\n"
    final = detect(line)
    for i in range(1, len(line)):
        got = detect(line[:i])
        assert got is None or got is final, (i, got, final)


def test_decision_never_depends_on_bytes_past_max_detect() -> None:
    # Rule 2: at MAX_DETECT_BYTES anything undecided is opaque, so a longer buffer whose
    # first newline lies past that limit must get the same answer.
    line = b"FOO /" + b"a" * (MAX_DETECT_BYTES + 1000) + b" HTTP/1.1\r\n"
    assert detect(line[:MAX_DETECT_BYTES]) is Proto.OPAQUE
    assert detect(line) is Proto.OPAQUE


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40), st.sampled_from([b"a", b" ", b"/", b"\r", b"\x00", b"ab "]))
def test_always_decided_at_max_detect_bytes(start: bytes, fill: bytes) -> None:
    buf = (start + fill * MAX_DETECT_BYTES)[:MAX_DETECT_BYTES]
    assert detect(buf) is not None
