"""Hypothesis properties of the HTTP/1 request parser, and a linear-time guard."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshlet.proto.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedFramer,
    LocalProtocolError,
    parse_request,
    parse_response,
)

_TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SPECIAL = {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade",
            "keep-alive", "proxy-connection", "expect"}
_METHOD = st.text(_TCHARS, min_size=1, max_size=10).filter(lambda m: m != "CONNECT")
_TARGET = st.lists(st.integers(0x21, 0xFF).filter(lambda c: c != 0x7F), min_size=1,
                   max_size=30).map(bytes)
_NAME = st.text(_TCHARS, min_size=1, max_size=15).filter(lambda n: n.lower() not in _SPECIAL)
_VCHAR = [c for c in range(0x21, 0x100) if c != 0x7F]
_VALUE = st.tuples(
    st.sampled_from([b"", b" ", b"\t", b"  "]),
    st.lists(st.sampled_from([*_VCHAR, 0x20, 0x09]), max_size=20).map(bytes),
    st.sampled_from([b"", b" ", b"\t "]),
).map(lambda t: t[0] + t[1].lstrip(b" \t") + (t[2] if t[1].strip(b" \t") else b""))

SECOND = b"GET /second HTTP/1.1\r\nHost: second\r\n\r\n"


@st.composite
def requests(draw: st.DrawFn) -> dict[str, object]:
    method = draw(_METHOD).encode()
    target = draw(_TARGET)
    version = draw(st.sampled_from([10, 11]))
    fields = [draw(_NAME).encode() + b":" + draw(_VALUE)
              for _ in range(draw(st.integers(0, 8)))]
    host = draw(st.text("abcdefghij.-:0123456789", min_size=1, max_size=20)).encode()
    fields.insert(draw(st.integers(0, len(fields))), b"Host: " + host)
    kind = draw(st.sampled_from(["none", "length", "chunked"] if version == 11
                                else ["none", "length"]))
    payload = draw(st.binary(max_size=60))
    if kind == "length":
        fields.insert(draw(st.integers(0, len(fields))),
                      draw(st.sampled_from([b"Content-Length: ", b"content-length:"]))
                      + str(len(payload)).encode())
        body = payload
    elif kind == "chunked":
        fields.insert(draw(st.integers(0, len(fields))), b"Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)],
                                             strict=True) if b > a]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    else:
        body = b""
    head = (method + b" " + target + b" HTTP/1." + (b"1" if version == 11 else b"0") + b"\r\n"
            + b"".join(f + b"\r\n" for f in fields) + b"\r\n")
    return {"method": method, "target": target, "version": version, "host": host.lower(),
            "kind": kind, "payload": payload, "head": head, "body": body}


_KIND = {"none": BODY_NONE, "length": BODY_LENGTH, "chunked": BODY_CHUNKED}


class Stream:
    """What the proxy does with a byte stream: parse a head, frame its body, repeat."""

    def __init__(self) -> None:
        self.buf = b""
        self.heads: list[tuple[object, bytes]] = []  # (head, body bytes)
        self.head = None
        self.body = b""
        self.left = 0
        self.framer: ChunkedFramer | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            if self.head is None:
                h = parse_request(self.buf)
                if h is None:
                    return
                self.head, self.buf, self.body = h, self.buf[h.end:], b""
                if h.body == BODY_CHUNKED:
                    self.framer = ChunkedFramer()
                else:
                    self.framer, self.left = None, h.content_length
                if h.body == BODY_NONE or (h.body == BODY_LENGTH and self.left == 0):
                    self._finish()
                continue
            if self.framer is not None:
                end = self.framer.feed(self.buf, 0)
                self.body += self.buf[:end]
                self.buf = self.buf[end:]
                if self.framer.done:
                    self._finish()
            else:
                take = min(self.left, len(self.buf))
                self.body += self.buf[:take]
                self.buf = self.buf[take:]
                self.left -= take
                if self.left == 0:
                    self._finish()

    def _finish(self) -> None:
        self.heads.append((self.head, self.body))
        self.head = None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.lists(st.integers(0, 100_000), max_size=10))
def test_valid_requests_parse_and_frame_exactly(r: dict[str, object], cuts: list[int]) -> None:
    head, body = r["head"], r["body"]
    assert isinstance(head, bytes) and isinstance(body, bytes)
    stream = head + body + SECOND
    h = parse_request(stream)
    assert h is not None
    assert h.end == len(head)
    assert h.raw == head
    assert (h.method, h.target, h.version, h.host) == (
        r["method"], r["target"], r["version"], r["host"])
    assert h.body == _KIND[r["kind"]]  # type: ignore[index]
    if r["kind"] == "length":
        assert h.content_length == len(r["payload"])  # type: ignore[arg-type]
    # split the stream at arbitrary points: both messages come out whole
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    s = Stream()
    for a, b in pairwise(points):
        s.feed(stream[a:b])
    assert len(s.heads) == 2
    (_h1, b1), (h2, b2) = s.heads
    assert b1 == body
    assert h2.target == b"/second" and b2 == b""  # type: ignore[attr-defined]
    assert s.buf == b""


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_local_protocol_error(buf: bytes) -> None:
    for fn in (lambda b: parse_request(b, 200, 100, True),
               lambda b: parse_response(b, b"GET"),
               lambda b: parse_response(b, b"HEAD", True)):
        try:
            h = fn(buf)
        except LocalProtocolError as e:
            assert e.status in (400, 405, 414, 431, 502)
            continue
        if h is not None:
            assert 0 < h.end <= len(buf)
            assert h.raw == buf[:h.end]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    r = draw(requests())
    data = bytearray(r["head"] + r["body"])  # type: ignore[operator]
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["ins", "del", "set"]))
        byte = draw(st.sampled_from([0x00, 0x09, 0x0A, 0x0D, 0x20, 0x2C, 0x3A, 0x7F, 0xFF,
                                     ord("a"), ord("0")]))
        if op == "ins":
            data.insert(pos, byte)
        elif pos < len(data):
            if op == "del":
                del data[pos]
            else:
                data[pos] = byte
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_heads())
def test_mutated_requests_only_raise_local_protocol_error(buf: bytes) -> None:
    try:
        h = parse_request(buf, strip_mesh=True)
    except LocalProtocolError as e:
        assert e.status in (400, 405, 414, 431)
        return
    if h is not None:
        assert 0 < h.end <= len(buf)
        assert h.raw == buf[:h.end]
        assert h.raw.endswith(b"\r\n\r\n")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.integers(0, 10_000), st.sampled_from([b"\n", b"\r"]))
def test_bare_cr_or_lf_in_field_section_never_parses_differently(
    r: dict[str, object], where: int, junk: bytes
) -> None:
    head, body = r["head"], r["body"]
    assert isinstance(head, bytes) and isinstance(body, bytes)
    first = head.index(b"\r\n") + 2
    pos = first + where % (len(head) - first)  # any point inside the field section
    bad = head[:pos] + junk + head[pos:] + body + SECOND
    try:
        h = parse_request(bad)
    except LocalProtocolError as e:
        assert e.status == 400
        return
    if h is None:
        return
    # Only harmless: LF inserted between the final CR and LF leaves the same head.
    assert h.raw == head, (bad, h.raw)


def _best(fn: Callable[[], object], runs: int = 7) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _ratio(make: Callable[[int], bytes], parse: Callable[[bytes], object], n: int) -> float:
    small, big = make(n), make(8 * n)
    return _best(lambda: parse(big)) / max(_best(lambda: parse(small)), 1e-6)


def _try(fn: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def run(b: bytes) -> object:
        try:
            return fn(b)
        except LocalProtocolError as e:
            return e
    return run


_big = _try(lambda b: parse_request(b, max_head=1 << 24, max_line=1 << 24))


def test_linear_time_many_headers() -> None:
    def make(n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Header-Name: some value\r\n" * n + b"\r\n"
    h = parse_request(make(5000), max_head=1 << 24)
    assert h is not None and h.end == len(make(5000))
    assert _ratio(make, _big, 625) < 20


def test_linear_time_many_interesting_headers() -> None:
    def make(n: int) -> bytes:
        return (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"Connection: x-a, x-b\r\n" * n
                + b"Content-Length: 1\r\n" * n + b"\r\n")
    assert _ratio(make, _big, 300) < 20


def test_linear_time_spaces_in_value() -> None:
    def make(n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\nX: a" + b" " * n + b"b\r\n\r\n"
    assert _big(make(60_000)) is not None
    assert _ratio(make, _big, 7_500) < 20


def test_linear_time_failing_inputs() -> None:
    def spaces_then_ctl(n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" \t" * n + b"a" + b" " * n + b"\x01\r\n\r\n"

    def tokens_no_space(n: int) -> bytes:
        return b"A" * n + b"\r\n\r\n"

    def many_targets(n: int) -> bytes:
        return b"GET " + b"/a" * n + b" HTTP/1.2\r\n\r\n"

    def incomplete(n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: " + b"v " * n

    for make in (spaces_then_ctl, tokens_no_space, many_targets, incomplete):
        assert _ratio(make, _big, 8_000) < 20, make.__name__


def test_linear_time_response() -> None:
    def make(n: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\n" + b"X-A: " + b" v" * n + b"\r\n" * 2
    assert _ratio(make, lambda b: parse_response(b, b"GET", max_head=1 << 24), 8_000) < 20


def test_linear_time_chunked_extensions() -> None:
    def make(n: int) -> bytes:
        return b"1" + b";a=b" * n + b"\r\nx\r\n0\r\n\r\n"
    assert _ratio(make, _try(lambda b: ChunkedFramer(max_line=1 << 24).feed(b)), 4_000) < 20


# --- fast paths agree with the general path ----------------------------------------------

_ATTRS = ("raw", "end", "version", "body", "content_length", "close", "needs_rewrite", "drop")
_REQ_ATTRS = (*_ATTRS, "method", "target", "host", "upgrade", "expect_continue")
_RESP_ATTRS = (*_ATTRS, "status")
_EXTRA = st.sampled_from([
    b"Connection: keep-alive", b"connection:KEEP-ALIVE ", b"Connection: close",
    b"Content-Length: 3", b"content-length:0", b"Content-Length: 3, 3", b"Expect: 100-continue",
    b"Meshlet-Id: 1", b"TE: trailers", b"Upgrade: websocket", b"Connection: upgrade",
    b"Keep-Alive: 5", b"Proxy-Connection: x", b"Transfer-Encoding: chunked", b"Host: other",
    b"Host:", b"X-Plain: 1", b"Content-Lengthy: 9", b"Hosts: x", b"tE: x", b"te-x: y",
    b"Meshlet: not-mesh",
])


def _outcome(fn: Callable[[], object], attrs: tuple[str, ...]) -> object:
    try:
        h = fn()
    except LocalProtocolError as e:
        return ("error", e.status)
    if h is None:
        return None
    return tuple(getattr(h, a) for a in attrs)


def _no_fast_paths(monkeypatch: object) -> None:
    import re

    from meshlet.proto import http1
    never = re.compile(rb"(?!)")
    for name in ("_REQUEST_FAST_RE", "_RESPONSE_FAST_RE"):
        if hasattr(http1, name):
            monkeypatch.setattr(http1, name, never)  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.lists(st.tuples(st.integers(0, 20), _EXTRA), max_size=3), st.booleans())
def test_request_fast_path_equals_general_path(
    r: dict[str, object], extra: list[tuple[int, bytes]], strip: bool
) -> None:
    import pytest

    head = r["head"]
    assert isinstance(head, bytes)
    lines = head[:-2].split(b"\r\n")[:-1]
    for pos, f in extra:
        lines.insert(1 + pos % len(lines), f)
    buf = b"\r\n".join(lines) + b"\r\n\r\n" + b"abc"
    fast = _outcome(lambda: parse_request(buf, strip_mesh=strip), _REQ_ATTRS)
    with pytest.MonkeyPatch.context() as mp:
        _no_fast_paths(mp)
        slow = _outcome(lambda: parse_request(buf, strip_mesh=strip), _REQ_ATTRS)
    assert fast == slow


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(b"204", b"1.1", [b"Content-Length: 3"], b"GET", False)  # found by hypothesis
@given(
    st.sampled_from([b"100", b"101", b"200", b"204", b"206", b"304", b"404", b"503", b"999"]),
    st.sampled_from([b"1.1", b"1.0"]),
    st.lists(st.one_of(_EXTRA, _NAME.map(lambda n: n.encode() + b": v")), max_size=5),
    st.sampled_from([b"GET", b"HEAD", b"POST"]),
    st.booleans(),
)
def test_response_fast_path_equals_general_path(
    code: bytes, ver: bytes, fields: list[bytes], method: bytes, upgrading: bool
) -> None:
    import pytest

    buf = (b"HTTP/" + ver + b" " + code + b" Reason\r\n" + b"".join(f + b"\r\n" for f in fields)
           + b"\r\nbody")
    fast = _outcome(lambda: parse_response(buf, method, upgrading), _RESP_ATTRS)
    with pytest.MonkeyPatch.context() as mp:
        _no_fast_paths(mp)
        slow = _outcome(lambda: parse_response(buf, method, upgrading), _RESP_ATTRS)
    assert fast == slow
