"""Request smuggling and malformed requests, each on a raw socket.

Every rejected request must get its error status with `meshlet-proxy-error`, the
connection must close, and the recording upstream must never see the request hidden in
the body (`GET /smuggled`). Where the head itself is bad, nothing at all may reach the
upstream. A sentinel request sent afterwards proves the upstream had time to receive
anything the proxy might have forwarded.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import HttpBackend, ProxyProcess, ResponseReader, connect

SMUG = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
N = len(SMUG)
MAX_LINE = 1024
MAX_HEAD = 4096
_seq = itertools.count()


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[ProxyProcess, HttpBackend]]:
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(HttpBackend())
        p = stack.enter_context(ProxyProcess(app=b.port, env={
            "MESHLET_MAX_REQUEST_LINE_BYTES": str(MAX_LINE),
            "MESHLET_MAX_HEADER_BYTES": str(MAX_HEAD),
        }))
        yield p, b


def sentinel(p: ProxyProcess) -> bytes:
    """A valid request on a fresh connection; returns the exact bytes it forwards."""
    req = b"GET /sentinel-%d HTTP/1.1\r\nHost: t\r\n\r\n" % next(_seq)
    with connect(p.inbound_port) as s:
        s.sendall(req)
        r = ResponseReader(s).read()
        assert r.status == 200, r
    return req


def rejected(env: tuple[ProxyProcess, HttpBackend], payload: bytes, status: int = 400,
             head_level: bool = True) -> str:
    p, b = env
    mark = b.mark()
    with connect(p.inbound_port) as s:
        s.sendall(payload)
        rd = ResponseReader(s, timeout=5)
        try:
            r = rd.read()
        except EOFError as e:
            raise AssertionError(f"no response to {payload[:200]!r}\n{p.stderr()}") from e
        assert r.status == status, (payload[:200], r)
        reason = r.header("meshlet-proxy-error")
        assert reason, r
        assert rd.closed(3), "the connection must close after a framing error"
    sent = sentinel(p)
    got = b.received(mark)
    assert b"/smuggled" not in got, got
    if head_level:
        # Nothing of a request with a bad head is forwarded.
        assert got.replace(sent, b"") == b"", got
    return reason


def post(*fields: bytes, version: bytes = b"1.1") -> bytes:
    return b"POST / HTTP/" + version + b"\r\nHost: t\r\n" + b"".join(
        f + b"\r\n" for f in fields) + b"\r\n"


# --- framing: Content-Length and Transfer-Encoding --------------------------------------

FRAMING = {
    "cl_then_te": post(b"Content-Length: %d" % (5 + N), b"Transfer-Encoding: chunked")
    + b"0\r\n\r\n" + SMUG,
    "te_then_cl": post(b"Transfer-Encoding: chunked", b"Content-Length: %d" % (5 + N))
    + b"0\r\n\r\n" + SMUG,
    "cl_differing_duplicates": post(b"Content-Length: 0", b"Content-Length: %d" % N) + SMUG,
    "cl_differing_list": post(b"Content-Length: 0, %d" % N) + SMUG,
    "cl_plus_sign": post(b"Content-Length: +%d" % N) + SMUG,
    "cl_hex": post(b"Content-Length: 0x%x" % N) + SMUG,
    "cl_negative": post(b"Content-Length: -1") + SMUG,
    "cl_space_inside": post(b"Content-Length: 0 %d" % N) + SMUG,
    "te_chunked_identity": post(b"Transfer-Encoding: chunked, identity")
    + b"0\r\n\r\n" + SMUG,
    "te_xchunked": post(b"Transfer-Encoding: xchunked") + b"0\r\n\r\n" + SMUG,
    "te_identity": post(b"Transfer-Encoding: identity") + b"0\r\n\r\n" + SMUG,
    "te_gzip_only": post(b"Transfer-Encoding: gzip") + b"0\r\n\r\n" + SMUG,
    "te_chunked_twice": post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
    + b"0\r\n\r\n" + SMUG,
    "te_chunked_param": post(b"Transfer-Encoding: chunked;q=1") + b"0\r\n\r\n" + SMUG,
    "te_empty": post(b"Transfer-Encoding: ", b"Content-Length: %d" % N) + SMUG,
    "te_vertical_tab": post(b"Transfer-Encoding: \x0bchunked") + b"0\r\n\r\n" + SMUG,
    "te_in_http10": post(b"Transfer-Encoding: chunked", version=b"1.0") + b"0\r\n\r\n" + SMUG,
}


@pytest.mark.parametrize("name", list(FRAMING))
def test_bad_framing_rejected(env: Any, name: str) -> None:
    rejected(env, FRAMING[name])


# --- head syntax ------------------------------------------------------------------------

HEADS = {
    "obs_fold": post(b"Content-Length: %d" % N, b"X-Folded: a", b" b") + SMUG,
    "obs_fold_tab_te": post(b"X-A: b", b"\tTransfer-Encoding: chunked",
                            b"Content-Length: %d" % N) + SMUG,
    "bare_lf_in_fields": b"POST / HTTP/1.1\r\nHost: t\nContent-Length: %d\r\n\r\n" % N + SMUG,
    "bare_lf_request_line": b"POST / HTTP/1.1\nHost: t\r\nContent-Length: %d\r\n\r\n" % N
    + SMUG,
    "bare_lf_end_of_head": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\n" % N
    + SMUG,
    "bare_cr_in_fields": b"POST / HTTP/1.1\r\nHost: t\rContent-Length: %d\r\n\r\n" % N + SMUG,
    "space_before_colon": post(b"Content-Length : %d" % N) + SMUG,
    "tab_before_colon": post(b"Transfer-Encoding\t: chunked") + b"0\r\n\r\n" + SMUG,
    "space_in_name": post(b"Content Length: %d" % N) + SMUG,
    "non_token_name": post(b"X@Y: z", b"Content-Length: %d" % N) + SMUG,
    "empty_name": post(b": z", b"Content-Length: %d" % N) + SMUG,
    "nul_in_value": post(b"X-A: a\x00b", b"Content-Length: %d" % N) + SMUG,
    "line_without_colon": post(b"Content-Length %d" % N) + SMUG,
    "leading_space_first_field": b"POST / HTTP/1.1\r\n Host: t\r\nContent-Length: %d\r\n\r\n"
    % N + SMUG,
    "double_space_request_line": b"POST  / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
    % N + SMUG,
    "space_in_target": b"POST /a b HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % N
    + SMUG,
    "bad_version": b"POST / HTTP/1.2\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % N + SMUG,
    "missing_host": b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % N + SMUG,
    "two_hosts": post(b"Host: u", b"Content-Length: %d" % N) + SMUG,
}


@pytest.mark.parametrize("name", list(HEADS))
def test_malformed_head_rejected(env: Any, name: str) -> None:
    rejected(env, HEADS[name])


# --- chunked bodies ---------------------------------------------------------------------

CHUNKS = {
    "size_0x5": b"0x5\r\nhello\r\n0\r\n\r\n",
    "size_minus_1": b"-1\r\nhello\r\n0\r\n\r\n",
    "size_5_space_5": b"5 5\r\nhello\r\n0\r\n\r\n",
    "size_plus_5": b"+5\r\nhello\r\n0\r\n\r\n",
    "size_leading_space": b" 5\r\nhello\r\n0\r\n\r\n",
    "size_empty": b"\r\nhello\r\n0\r\n\r\n",
    "size_overflow": b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n",
    "size_bare_lf": b"5\nhello\r\n0\r\n\r\n",
    "data_not_followed_by_crlf": b"5\r\nhelloXX0\r\n\r\n",
    "bad_extension": b"5;a b\r\nhello\r\n0\r\n\r\n",
    "bad_trailer": b"5\r\nhello\r\n0\r\nX : y\r\n\r\n",
}


@pytest.mark.parametrize("name", list(CHUNKS))
def test_bad_chunked_body_rejected(env: Any, name: str) -> None:
    payload = post(b"Transfer-Encoding: chunked") + CHUNKS[name] + SMUG
    rejected(env, payload, head_level=False)


# --- limits -----------------------------------------------------------------------------


def test_long_request_line_414(env: Any) -> None:
    reason = rejected(env, b"GET /" + b"a" * (2 * MAX_LINE) + b" HTTP/1.1\r\nHost: t\r\n\r\n",
                      status=414)
    assert "line" in reason


def test_long_request_line_414_before_it_ends(env: Any) -> None:
    # No CRLF yet: the proxy must not wait for the rest of a line that is already too long.
    rejected(env, b"GET /" + b"a" * (2 * MAX_LINE), status=414)


def test_big_header_block_431(env: Any) -> None:
    fields = b"".join(b"X-Field-%d: %s\r\n" % (i, b"v" * 60) for i in range(100))
    rejected(env, b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n", status=431)


def test_big_header_block_431_before_it_ends(env: Any) -> None:
    rejected(env, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * (2 * MAX_HEAD), status=431)


# --- controls: strict, not paranoid -----------------------------------------------------

ACCEPTED = {
    "te_chunked_any_case": (post(b"Transfer-Encoding: Chunked") + b"5\r\nhello\r\n0\r\n\r\n",
                            5),
    "cl_identical_duplicates": (post(b"Content-Length: 5", b"Content-Length: 5") + b"hello",
                                5),
    "cl_identical_list": (post(b"Content-Length: 5, 5") + b"hello", 5),
    "chunk_extension_and_trailer": (
        post(b"Transfer-Encoding: chunked")
        + b"5;name=value\r\nhello\r\n3;q=\"a b\"\r\nabc\r\n0\r\nX-Trailer: yes\r\n\r\n", 8),
    "gzip_then_chunked": (post(b"Transfer-Encoding: gzip, chunked")
                          + b"5\r\nhello\r\n0\r\n\r\n", 5),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_valid_framing_accepted(env: Any, name: str) -> None:
    p, _b = env
    payload, n = ACCEPTED[name]
    with connect(p.inbound_port) as s:
        s.sendall(payload)
        r = ResponseReader(s).read()
    assert r.status == 200, r
    assert r.json()["body_len"] == n


# --- limits at their boundary, whichever way the bytes arrive ---------------------------


def request_line(length: int) -> bytes:
    """A request line of exactly `length` bytes, CRLF not counted."""
    fixed = len(b"GET / HTTP/1.1")
    return b"GET /" + b"a" * (length - fixed) + b" HTTP/1.1"


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "line-then-fields"])
def test_request_line_limit_boundary(env: Any, split: bool) -> None:
    p, _b = env

    def send(line: bytes) -> int:
        with connect(p.inbound_port) as s:
            if split:
                s.sendall(line + b"\r\n")
                # Let the line arrive on its own before the rest of the head.
                s.sendall(b"Host: t\r\n")
                s.sendall(b"\r\n")
            else:
                s.sendall(line + b"\r\nHost: t\r\n\r\n")
            return ResponseReader(s).read().status

    assert send(request_line(MAX_LINE - 2)) == 200  # fits, even counting its CRLF
    # Over the limit by a few bytes (fewer than " HTTP/1.1"): 414 however it arrives.
    assert send(request_line(MAX_LINE + 5)) == 414


def test_header_block_limit_boundary(env: Any) -> None:
    p, _b = env
    base = b"GET / HTTP/1.1\r\nHost: t\r\nX-Pad: "

    def head(total: int) -> bytes:
        return base + b"p" * (total - len(base) - 4) + b"\r\n\r\n"

    for total, want in ((MAX_HEAD, 200), (MAX_HEAD + 1, 431)):
        h = head(total)
        assert len(h) == total
        with connect(p.inbound_port) as s:
            s.sendall(h)
            assert ResponseReader(s).read().status == want, total
