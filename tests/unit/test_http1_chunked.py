"""meshlet.proto.http1.ChunkedFramer: finds the end of a chunked body in a byte stream."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.proto.http1 import ChunkedFramer, LocalProtocolError

BODY = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


def feed_all(pieces: list[bytes], framer: ChunkedFramer | None = None) -> tuple[int, int]:
    """Feed pieces until done; returns (index of the piece that finished, offset in it)."""
    f = framer or ChunkedFramer()
    for i, p in enumerate(pieces):
        end = f.feed(p, 0)
        assert 0 <= end <= len(p)
        if f.done:
            return i, end
        assert end == len(p)  # not done: the framer took everything it was given
    return -1, -1


def test_one_shot_with_start_offset_and_following_request() -> None:
    prefix = b"HEADBYTES"
    data = prefix + BODY + NEXT
    f = ChunkedFramer()
    end = f.feed(data, len(prefix))
    assert f.done
    assert end == len(prefix) + len(BODY)
    assert data[end:] == NEXT


def test_done_framer_consumes_nothing_more() -> None:
    f = ChunkedFramer()
    assert f.feed(BODY) == len(BODY)
    assert f.feed(NEXT, 3) == 3


def test_byte_by_byte_equals_one_shot() -> None:
    stream = BODY + NEXT
    f = ChunkedFramer()
    for i in range(len(stream)):
        end = f.feed(stream[i:i + 1])
        if f.done:
            assert end == 1
            assert i == len(BODY) - 1
            break
        assert end == 1
    assert f.done


def test_bytearray_input() -> None:
    f = ChunkedFramer()
    assert f.feed(bytearray(BODY + NEXT)) == len(BODY)
    assert f.done


def test_feed_from_offset_inside_a_larger_buffer() -> None:
    # The proxy feeds the bytes after a head: offsets are into the whole buffer.
    whole = b"HEAD\n" + BODY + NEXT
    f = ChunkedFramer()
    assert f.feed(whole, 5) == 5 + len(BODY)
    assert f.done


def test_zero_chunk_without_trailers() -> None:
    f = ChunkedFramer()
    assert f.feed(b"0\r\n\r\nrest") == 5
    assert f.done


@pytest.mark.parametrize("size_line", [
    b"A\r\n", b"a\r\n", b"00000a\r\n", b"a;x\r\n", b"a ; x = y\r\n", b"a;x=\"q\\\"s;\"\r\n",
    b"a;a=1;b;c=\"\"\r\n", b"a\t;x\r\n",
])
def test_valid_size_lines(size_line: bytes) -> None:
    f = ChunkedFramer()
    body = size_line + b"0123456789\r\n0\r\n\r\n"
    assert f.feed(body + b"X") == len(body)
    assert f.done


@pytest.mark.parametrize("bad", [
    b"\r\n", b"g\r\n", b"-1\r\n", b"+1\r\n", b"0x5\r\n", b" 5\r\n", b"5\n", b"5\r\r\n",
    b"1" * 16 + b"\r\n", b"5;\r\n", b"5;=x\r\n", b"5;x=\"unterminated\r\n", b"5;x=a b\r\n",
    b"5\x00\r\n",
])
def test_invalid_size_lines(bad: bytes) -> None:
    with pytest.raises(LocalProtocolError) as ei:
        ChunkedFramer().feed(bad + b"hello\r\n0\r\n\r\n")
    assert ei.value.status == 400


@pytest.mark.parametrize("bad", [
    b"5\r\nhelloX\r\n0\r\n\r\n", b"5\r\nhello\n0\r\n\r\n", b"5\r\nhello\r0\r\n\r\n",
    b"5\r\nhello!\r\n0\r\n\r\n", b"5\r\nhell\r\n0\r\n\r\n",
])
def test_missing_crlf_after_data(bad: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        ChunkedFramer().feed(bad)
    # the same error when fed byte by byte
    f = ChunkedFramer()
    with pytest.raises(LocalProtocolError):
        for b in bad:
            f.feed(bytes([b]))


@pytest.mark.parametrize("trailer", [
    b"X-T : v\r\n\r\n", b" X-T: v\r\n\r\n", b"X-T: v\n\r\n", b"\n", b"X-T: a\x00\r\n\r\n",
    b"no colon\r\n\r\n", b"X(T): v\r\n\r\n", b"\r\r\n",
])
def test_bad_trailers(trailer: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        ChunkedFramer().feed(b"0\r\n" + trailer)


def test_line_too_long() -> None:
    f = ChunkedFramer(max_line=64)
    with pytest.raises(LocalProtocolError):
        f.feed(b"5;" + b"x" * 100 + b"\r\n")
    f = ChunkedFramer(max_line=64)
    with pytest.raises(LocalProtocolError):
        for _ in range(100):
            f.feed(b"0000")  # no LF ever: must not buffer forever


def test_trailers_too_large() -> None:
    f = ChunkedFramer(max_trailer=100)
    with pytest.raises(LocalProtocolError) as ei:
        f.feed(b"0\r\n" + b"".join(b"X-%d: vvvvvvvvvv\r\n" % i for i in range(20)) + b"\r\n")
    assert ei.value.status == 431


# --- properties --------------------------------------------------------------------------

_TOKEN = st.text("abcxyzABC019!#$%&'*+-.^_`|~", min_size=1, max_size=6)
_EXT = st.lists(
    st.tuples(_TOKEN, st.one_of(st.none(), _TOKEN,
                                st.text("ab ;=\t", max_size=5).map(lambda s: f'"{s}"'))),
    max_size=3,
).map(lambda xs: "".join(f";{n}" + (f"={v}" if v is not None else "") for n, v in xs).encode())
_TRAILER = st.tuples(st.text("ABCxyz-", min_size=1, max_size=8),
                     st.text("abc 123\t", max_size=8).map(lambda v: v.lstrip(" \t"))).map(
    lambda nv: f"{nv[0]}: {nv[1]}\r\n".encode())


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(encoded body, decoded payload)."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    out = []
    for c in chunks:
        size = format(len(c), draw(st.sampled_from(["x", "X", "04x"])))
        out.append(size.encode() + draw(_EXT) + b"\r\n" + c + b"\r\n")
    out.append(b"0" + draw(_EXT) + b"\r\n")
    out.extend(draw(st.lists(_TRAILER, max_size=3)))
    out.append(b"\r\n")
    return b"".join(out), b"".join(chunks)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


@settings(max_examples=200, deadline=None)
@given(chunked_bodies(), st.lists(st.integers(0, 10_000), max_size=12))
def test_split_feeding_finds_exact_end(body: tuple[bytes, bytes], cuts: list[int]) -> None:
    enc, _payload = body
    stream = enc + NEXT
    # one shot
    f = ChunkedFramer()
    assert f.feed(stream) == len(enc)
    assert f.done
    # arbitrary split points
    pieces = _split(stream, cuts)
    i, off = feed_all(pieces)
    assert i >= 0
    assert sum(len(p) for p in pieces[:i]) + off == len(enc)
    # byte by byte
    i, off = feed_all([bytes([b]) for b in stream])
    assert (i, off) == (len(enc) - 1, 1)


@settings(max_examples=200, deadline=None)
@given(chunked_bodies(), st.integers(0, 10_000), st.binary(min_size=1, max_size=1))
def test_corrupting_a_crlf_is_detected(body: tuple[bytes, bytes], which: int, junk: bytes) -> None:
    enc, _ = body
    # replace the CR of one of the body's CRLFs that is not part of chunk data
    crlfs = []
    f = ChunkedFramer()
    for i in range(len(enc)):
        before_state = f._state  # white-box: only CRLFs the framer reads as syntax
        f.feed(enc[i:i + 1])
        if enc[i:i + 2] == b"\r\n" and before_state != 1:
            crlfs.append(i)
    if junk in (b"\r", b"\n") or not crlfs:
        return
    pos = crlfs[which % len(crlfs)]
    bad = enc[:pos] + junk + enc[pos + 1:]
    f = ChunkedFramer()
    try:
        end = f.feed(bad + NEXT)
    except LocalProtocolError:
        return
    # not refused: then it must not claim to have found the same end
    assert not (f.done and end == len(enc))
