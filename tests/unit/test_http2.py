"""HTTP/2 codec: a client and a server Connection talking in memory, malformed input,
and each abuse limit holding its bound."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.proto.hpack import Encoder
from meshlet.proto.http2 import (
    PREFACE,
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    H2Settings,
    PingAcknowledged,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    UsageError,
    WindowUpdated,
)

REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"h")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/up"), (b":authority", b"h")]
E = ErrorCode


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return Encoder().encode(headers)


def pump(a: Connection, b: Connection) -> list[Event]:
    """Move a's output to b; return b's events."""
    return b.receive(bytes(a.data_to_send()))


def pair(client: H2Settings | None = None, server: H2Settings | None = None
         ) -> tuple[Connection, Connection]:
    c, s = Connection(True, client), Connection(False, server)
    c.initiate_connection()
    s.initiate_connection()
    pump(c, s)
    pump(s, c)
    pump(c, s)
    return c, s


def raw_server(s: H2Settings | None = None) -> Connection:
    """A server that has seen the preface and an empty SETTINGS (output drained)."""
    srv = Connection(False, s)
    srv.initiate_connection()
    assert srv.receive(PREFACE + frame(4, 0, 0)) != []
    srv.data_to_send()
    return srv


def goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY frame in `data`."""
    pos = 0
    while pos + 9 <= len(data):
        hi, lo, ftype, _, _ = struct.unpack_from(">BHBBL", data, pos)
        n = hi << 16 | lo
        if ftype == 7:
            return int(struct.unpack_from(">L", data, pos + 13)[0])
        pos += 9 + n
    return None


def rst_codes(data: bytes) -> dict[int, int]:
    out: dict[int, int] = {}
    pos = 0
    while pos + 9 <= len(data):
        hi, lo, ftype, _, sid = struct.unpack_from(">BHBBL", data, pos)
        n = hi << 16 | lo
        if ftype == 3:
            out[sid] = struct.unpack_from(">L", data, pos + 9)[0]
        pos += 9 + n
    return out


# -- exchanges -------------------------------------------------------------------------


def test_request_response_data_trailers() -> None:
    c, s = pair()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, POST)
    assert c.send_data(sid, b"ping", end_stream=True) == 4
    ev = pump(c, s)
    assert isinstance(ev[0], RequestReceived) and ev[0].headers == tuple(POST)
    assert not ev[0].end_stream
    assert isinstance(ev[1], DataReceived) and bytes(ev[1].data) == b"ping" and ev[1].end_stream
    s.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    s.send_data(sid, b"pong")
    s.send_trailers(sid, [(b"grpc-status", b"0")])
    ev = pump(s, c)
    assert [type(e) for e in ev] == [ResponseReceived, DataReceived, TrailersReceived]
    assert ev[0].status == 200  # type: ignore[attr-defined]
    assert bytes(ev[1].data) == b"pong"  # type: ignore[attr-defined]
    assert ev[2].headers == ((b"grpc-status", b"0"),)  # type: ignore[attr-defined]
    assert c.open_streams == 0 and s.open_streams == 0
    with pytest.raises(UsageError):
        s.send_data(sid, b"late")


def test_informational_then_final() -> None:
    c, s = pair()
    c.send_headers(1, REQ, end_stream=True)
    pump(c, s)
    s.send_headers(1, [(b":status", b"103"), (b"link", b"</a>")])
    s.send_headers(1, [(b":status", b"204")], end_stream=True)
    ev = pump(s, c)
    assert [e.status for e in ev] == [103, 204]  # type: ignore[attr-defined]
    assert c.open_streams == 0


def test_large_headers_use_continuation() -> None:
    c, s = pair()
    big = [*REQ, (b"x-big", b"v" * 40000)]
    c.send_headers(1, big, end_stream=True)
    ev = pump(c, s)
    assert isinstance(ev[0], RequestReceived) and ev[0].headers == tuple(big)


def test_flow_control_stalls_and_resumes_with_acknowledge() -> None:
    c, s = pair()
    c.send_headers(1, REQ, end_stream=True)
    pump(c, s)
    s.send_headers(1, [(b":status", b"200")])
    body = bytes(range(256)) * 400  # 102400 bytes, stream window 65535
    sent = s.send_data(1, body, end_stream=True)
    assert sent == 65535
    assert s.send_data(1, body[sent:], end_stream=True) == 0  # stalled
    ev = pump(s, c)
    got = b"".join(bytes(e.data) for e in ev if isinstance(e, DataReceived))
    assert got == body[:sent]
    # Nothing acknowledged: no WINDOW_UPDATE, still stalled.
    assert c.data_to_send() == b""
    # The other leg drained 10,000 bytes: below half a window, still no update.
    c.acknowledge_received_data(1, 10000)
    assert pump(c, s) == []
    c.acknowledge_received_data(1, sent - 10000)
    ev = pump(c, s)
    assert any(isinstance(e, WindowUpdated) and e.stream_id == 1 for e in ev)
    rest = s.send_data(1, body[sent:], end_stream=True)
    assert rest == len(body) - sent
    ev = pump(s, c)
    assert ev[-1].end_stream  # type: ignore[attr-defined]
    assert c.open_streams == 0 and s.open_streams == 0


def test_peer_exceeding_the_stream_window_is_reset() -> None:
    srv = raw_server()
    srv.receive(frame(1, 0x4, 1, block(POST)))
    data = frame(0, 0, 1, b"x" * 16384) * 4 + frame(0, 0, 1, b"x" * 10)  # 65546 > 65535
    ev = srv.receive(data)
    assert isinstance(ev[-1], StreamReset) and ev[-1].error_code == E.FLOW_CONTROL_ERROR
    assert rst_codes(bytes(srv.data_to_send())) == {1: E.FLOW_CONTROL_ERROR}


def test_padding_is_stripped_and_acknowledged() -> None:
    srv = raw_server()
    srv.receive(frame(1, 0x4, 1, block(POST)))
    ev = srv.receive(frame(0, 0x8 | 0x1, 1, bytes([5]) + b"abc" + b"\0" * 5))
    assert isinstance(ev[0], DataReceived) and bytes(ev[0].data) == b"abc"
    assert ev[0].flow_controlled_length == 9
    bad = raw_server()
    bad.receive(frame(1, 0x4, 1, block(POST)))
    ev = bad.receive(frame(0, 0x8, 1, bytes([4]) + b"abc"))  # padding >= payload
    assert isinstance(ev[-1], ConnectionTerminated)
    assert ev[-1].error_code == E.PROTOCOL_ERROR


def test_initial_window_change_applies_to_open_streams() -> None:
    c, s = pair()
    c.send_headers(1, REQ, end_stream=True)
    pump(c, s)
    assert s.send_window(1) == 65535
    ev = s.receive(frame(4, 0, 0, struct.pack(">HL", 4, 100000)))
    assert s.send_window(1) == 100000  # the client's connection window is 1 MiB
    assert any(isinstance(e, WindowUpdated) and e.stream_id == 0 for e in ev)
    s.receive(frame(4, 0, 0, struct.pack(">HL", 4, 1000)))
    assert s.send_window(1) == 1000


def test_rst_from_peer_and_goaway() -> None:
    c, s = pair()
    c.send_headers(1, REQ)
    c.send_headers(3, REQ)
    pump(c, s)
    c.send_rst(1)
    ev = pump(c, s)
    assert isinstance(ev[0], StreamReset) and ev[0].remote and ev[0].error_code == E.CANCEL
    c.send_headers(5, REQ)
    c.data_to_send()  # lost in flight: the server never saw stream 5
    s.send_goaway(E.NO_ERROR)
    ev = pump(s, c)
    assert isinstance(ev[0], StreamReset) and ev[0].stream_id == 5
    assert ev[0].error_code == E.REFUSED_STREAM
    assert isinstance(ev[1], ConnectionTerminated) and ev[1].last_stream_id == 3
    with pytest.raises(UsageError):
        c.send_headers(7, REQ)
    # Stream 3 goes on.
    s.send_headers(3, [(b":status", b"200")], end_stream=True)
    assert isinstance(pump(s, c)[0], ResponseReceived)


def test_ping_is_acknowledged() -> None:
    c, s = pair()
    c.ping(b"12345678")
    pump(c, s)
    ev = pump(s, c)
    assert isinstance(ev[0], PingAcknowledged) and ev[0].data == b"12345678"


# -- connection errors -----------------------------------------------------------------


def test_bad_preface() -> None:
    srv = Connection(False)
    ev = srv.receive(b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(ev[0], ConnectionTerminated) and ev[0].error_code == E.PROTOCOL_ERROR
    assert srv.closed


def test_preface_in_pieces_then_settings_first() -> None:
    srv = Connection(False)
    for i in range(0, 24, 5):
        assert srv.receive(PREFACE[i : i + 5]) == []
    ev = srv.receive(frame(6, 0, 0, b"x" * 8))
    assert isinstance(ev[0], ConnectionTerminated) and ev[0].error_code == E.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(8, 0, 0, struct.pack(">L", 2**31 - 1)), E.FLOW_CONTROL_ERROR),
        (frame(8, 0, 0, struct.pack(">L", 0)), E.PROTOCOL_ERROR),
        (frame(6, 0, 0, b"x" * 7), E.FRAME_SIZE_ERROR),
        (frame(4, 0, 1), E.PROTOCOL_ERROR),
        (frame(4, 0, 0, b"x" * 5), E.FRAME_SIZE_ERROR),
        (frame(4, 0, 0, struct.pack(">HL", 4, 2**31)), E.FLOW_CONTROL_ERROR),
        (frame(4, 0, 0, struct.pack(">HL", 5, 100)), E.PROTOCOL_ERROR),
        (frame(5, 0x4, 1, b"\0\0\0\2"), E.PROTOCOL_ERROR),
        (frame(0, 0, 1, b"x"), E.PROTOCOL_ERROR),  # DATA on an idle stream
        (frame(0, 0, 0, b"x"), E.PROTOCOL_ERROR),
        (frame(3, 0, 9, b"\0\0\0\0"), E.PROTOCOL_ERROR),  # RST on an idle stream
        (frame(1, 0x4, 1, b"\xbf"), E.COMPRESSION_ERROR),
        (frame(1, 0, 1, block(REQ)) + frame(6, 0, 0, b"x" * 8), E.PROTOCOL_ERROR),
        (frame(1, 0, 1, block(REQ)) + frame(9, 0x4, 3), E.PROTOCOL_ERROR),
        (frame(9, 0x4, 1), E.PROTOCOL_ERROR),
        (frame(0, 0, 1, b"x" * 16385), E.FRAME_SIZE_ERROR),
    ],
)
def test_connection_errors(data: bytes, code: int) -> None:
    srv = raw_server()
    ev = srv.receive(data)
    assert isinstance(ev[-1], ConnectionTerminated) and ev[-1].error_code == code
    assert goaway_code(bytes(srv.data_to_send())) == code
    assert srv.receive(frame(6, 0, 0, b"x" * 8)) == []  # nothing after the end


def test_stream_window_overflow_is_a_stream_error() -> None:
    srv = raw_server()
    srv.receive(frame(1, 0x4, 1, block(REQ)))
    ev = srv.receive(frame(8, 0, 1, struct.pack(">L", 2**31 - 1)))
    assert isinstance(ev[0], StreamReset) and ev[0].error_code == E.FLOW_CONTROL_ERROR


# -- header validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [*REQ, (b"X-Upper", b"1")],
        [*REQ, (b"connection", b"close")],
        [*REQ, (b"transfer-encoding", b"chunked")],
        [*REQ, (b"te", b"gzip")],
        [*REQ, (b"x", b"a\nb")],
        [*REQ, (b"x", b" lead")],
        [*REQ, (b"x", b"nul\0")],
        [(b"x", b"1"), *REQ],
        [*REQ, (b":method", b"GET")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"h")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"nope")],
        [*REQ, (b":protocol", b"websocket")],
        [*REQ, (b":status", b"200")],
        [(b":method", b"CONNECT"), (b":authority", b"h:1"), (b":path", b"/")],
        [*REQ, (b"content-length", b"1"), (b"content-length", b"2")],
        [*REQ, (b"content-length", b"-1")],
    ],
)
def test_malformed_requests_are_reset(headers: list[tuple[bytes, bytes]]) -> None:
    srv = raw_server()
    ev = srv.receive(frame(1, 0x5, 1, block(headers)))
    assert ev == []  # never surfaced
    assert rst_codes(bytes(srv.data_to_send())) == {1: E.PROTOCOL_ERROR}
    ev = srv.receive(frame(1, 0x5, 3, block(REQ)))  # the connection goes on
    assert isinstance(ev[0], RequestReceived)


def test_good_requests() -> None:
    for headers in (
        [(b":method", b"CONNECT"), (b":authority", b"h:443")],
        [(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*"),
         (b":authority", b"h")],
        [*REQ, (b"te", b"trailers"), (b"content-length", b"0"), (b"x", b"")],
    ):
        srv = raw_server()
        assert isinstance(srv.receive(frame(1, 0x5, 1, block(headers)))[0], RequestReceived)


def test_content_length_must_match_data() -> None:
    srv = raw_server()
    srv.receive(frame(1, 0x4, 1, block([*POST, (b"content-length", b"3")])))
    ev = srv.receive(frame(0, 0, 1, b"ab") + frame(0, 0, 1, b"cd"))
    assert isinstance(ev[0], DataReceived)
    assert isinstance(ev[1], StreamReset) and ev[1].error_code == E.PROTOCOL_ERROR
    srv.receive(frame(1, 0x4, 3, block([*POST, (b"content-length", b"3")])))
    ev = srv.receive(frame(0, 0x1, 3, b"ab"))
    assert isinstance(ev[0], StreamReset)


def test_bad_response_is_reset_on_the_client() -> None:
    c, s = pair()
    c.send_headers(1, REQ, end_stream=True)
    pump(c, s)
    ev = c.receive(frame(1, 0x4, 1, block([(b":status", b"2000")])))
    assert isinstance(ev[0], StreamReset) and not ev[0].remote
    assert rst_codes(bytes(c.data_to_send())) == {1: E.PROTOCOL_ERROR}


# -- abuse limits ----------------------------------------------------------------------


def test_max_concurrent_streams_refused() -> None:
    srv = raw_server(H2Settings(max_concurrent_streams=2))
    ev = srv.receive(b"".join(frame(1, 0x4, sid, block(REQ)) for sid in (1, 3, 5)))
    assert [e.stream_id for e in ev] == [1, 3]  # type: ignore[attr-defined]
    assert rst_codes(bytes(srv.data_to_send())) == {5: E.REFUSED_STREAM}
    srv.receive(frame(3, 0, 1, b"\0\0\0\x08"))  # one closes: room again
    ev = srv.receive(frame(1, 0x4, 7, block(REQ)))
    assert isinstance(ev[0], RequestReceived)


def test_client_respects_the_peer_stream_limit() -> None:
    c, _ = pair(server=H2Settings(max_concurrent_streams=1))
    c.send_headers(1, REQ)
    with pytest.raises(UsageError):
        c.send_headers(3, REQ)


def test_rapid_reset_is_bounded() -> None:
    limits = H2Settings(max_resets=1000, reset_window=30.0)
    srv = raw_server(limits)
    hb = block(REQ)
    data = b"".join(
        frame(1, 0x4, sid, hb) + frame(3, 0, sid, b"\0\0\0\x08")
        for sid in range(1, 200_001, 2)  # 100k HEADERS+RST_STREAM pairs
    )
    requests = resets = 0
    terminated: list[ConnectionTerminated] = []
    for i in range(0, len(data), 65536):
        for e in srv.receive(data[i : i + 65536]):
            requests += isinstance(e, RequestReceived)
            resets += isinstance(e, StreamReset)
            if isinstance(e, ConnectionTerminated):
                terminated.append(e)
        assert srv.open_streams <= 1  # the stream table never grows
        srv.data_to_send()
    assert len(terminated) == 1 and terminated[0].error_code == E.ENHANCE_YOUR_CALM
    assert resets == 1001 and requests == 1001
    assert srv.closed


def test_resets_spread_over_time_are_fine() -> None:
    now = [0.0]
    srv = raw_server(H2Settings(max_resets=10, reset_window=1.0, clock=lambda: now[0]))
    for sid in range(1, 101, 2):
        now[0] += 0.2
        srv.receive(frame(1, 0x4, sid, block(REQ)) + frame(3, 0, sid, b"\0\0\0\x08"))
    assert not srv.closed


def test_refused_streams_count_as_resets() -> None:
    srv = raw_server(H2Settings(max_concurrent_streams=1, max_resets=5))
    data = b"".join(frame(1, 0x4, sid, block(REQ)) for sid in range(1, 30, 2))
    ev = srv.receive(data)
    assert isinstance(ev[-1], ConnectionTerminated)
    assert ev[-1].error_code == E.ENHANCE_YOUR_CALM


def test_continuation_flood_is_cut_off() -> None:
    srv = raw_server()
    hb = block(REQ)
    srv.receive(frame(1, 0, 1, hb))
    chunk = frame(9, 0, 1, b"\x82" * 16384)
    terminated = []
    fed = 0
    for _ in range(1000):  # 16 MB offered
        ev = srv.receive(chunk)
        fed += 1
        terminated += [e for e in ev if isinstance(e, ConnectionTerminated)]
        assert srv._cont_size <= 65536 + 16384  # never buffered past the limit
        if srv.closed:
            break
    assert fed == 4 and terminated[0].error_code == E.ENHANCE_YOUR_CALM
    assert goaway_code(bytes(srv.data_to_send())) == E.ENHANCE_YOUR_CALM
    assert srv.receive(chunk) == []


def test_empty_continuation_flood_is_cut_off() -> None:
    srv = raw_server()
    data = frame(1, 0, 1, block(REQ)) + frame(9, 0, 1) * 100_000
    ev = srv.receive(data)
    assert isinstance(ev[-1], ConnectionTerminated)
    assert ev[-1].error_code == E.ENHANCE_YOUR_CALM


def test_hpack_bomb_refused_and_connection_survives() -> None:
    srv = raw_server(H2Settings(max_header_list_size=16384))
    big = b"v" * 4000
    # Insert x: big into the peer's table (literal with incremental indexing).
    first = Encoder().encode(REQ) + b"\x40\x01x\x7f\xa1\x1e" + big
    ev = srv.receive(frame(1, 0x5, 1, first))
    assert isinstance(ev[0], RequestReceived)
    bomb = Encoder().encode(REQ) + b"\xbe" * 8000  # 8000 x 4033 bytes = 32 MB decoded
    ev = srv.receive(frame(1, 0x5, 3, bomb))
    assert ev == []
    assert rst_codes(bytes(srv.data_to_send())) == {3: E.ENHANCE_YOUR_CALM}
    ev = srv.receive(frame(1, 0x5, 5, Encoder().encode(REQ) + b"\xbe"))
    assert isinstance(ev[0], RequestReceived) and ev[0].headers[-1] == (b"x", big)


def test_ping_flood_without_draining() -> None:
    srv = raw_server(H2Settings(max_pending_control_frames=100))
    ev = srv.receive(frame(6, 0, 0, b"p" * 8) * 100)
    assert not srv.closed and ev == []
    srv.data_to_send()  # the transport took the acks
    ev = srv.receive(frame(6, 0, 0, b"p" * 8) * 50)
    assert not srv.closed
    ev = srv.receive(frame(6, 0, 0, b"p" * 8) * 51)  # 101 queued, never drained
    assert isinstance(ev[-1], ConnectionTerminated)
    assert ev[-1].error_code == E.ENHANCE_YOUR_CALM


def test_settings_flood_without_draining() -> None:
    srv = raw_server(H2Settings(max_pending_control_frames=10))
    ev = srv.receive(frame(4, 0, 0) * 11)
    assert isinstance(ev[-1], ConnectionTerminated)


def test_empty_data_flood() -> None:
    srv = raw_server(H2Settings(max_empty_frames=50))
    srv.receive(frame(1, 0x4, 1, block(POST)))
    ev = srv.receive(frame(0, 0, 1) * 50)
    assert not srv.closed and len(ev) == 50
    ev = srv.receive(frame(0, 0, 1))
    assert isinstance(ev[-1], ConnectionTerminated)
    assert ev[-1].error_code == E.ENHANCE_YOUR_CALM


def test_frames_on_closed_streams_are_ignored() -> None:
    srv = raw_server()
    srv.receive(frame(1, 0x4, 1, block(POST)))
    srv.send_rst(1)
    ev = srv.receive(frame(0, 0, 1, b"late") + frame(8, 0, 1, b"\0\0\0\1"))
    assert ev == [] and not srv.closed


# -- robustness and interop ------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 255), st.integers(0, 9),
                          st.binary(max_size=40)), max_size=12))
def test_random_frames_never_raise(frames: list[tuple[int, int, int, bytes]]) -> None:
    srv = raw_server()
    data = b"".join(frame(t, f, sid, p) for t, f, sid, p in frames)
    for i in range(0, len(data), 7):
        srv.receive(data[i : i + 7])
    assert srv.open_streams <= 100


def test_interop_with_the_h2_library() -> None:
    h2conn = pytest.importorskip("h2.connection")
    h2config = pytest.importorskip("h2.config")
    h2events = pytest.importorskip("h2.events")
    # h2 as client, our server.
    cli = h2conn.H2Connection(h2config.H2Configuration(client_side=True))
    cli.initiate_connection()
    srv = Connection(False)
    srv.initiate_connection()
    srv.receive(cli.data_to_send())
    cli.receive_data(bytes(srv.data_to_send()))
    cli.send_headers(1, REQ, end_stream=False)
    cli.send_data(1, b"hello", end_stream=True)
    ev = srv.receive(cli.data_to_send())
    assert isinstance(ev[-1], DataReceived) and bytes(ev[-1].data) == b"hello"
    srv.acknowledge_received_data(1, 5)
    srv.send_headers(1, [(b":status", b"200"), (b"server", b"meshlet")])
    srv.send_data(1, b"world" * 1000)
    srv.send_trailers(1, [(b"grpc-status", b"0")])
    got = cli.receive_data(bytes(srv.data_to_send()))
    kinds = [type(e).__name__ for e in got]
    assert "ResponseReceived" in kinds and "TrailersReceived" in kinds
    assert b"".join(e.data for e in got if isinstance(e, h2events.DataReceived)) == (
        b"world" * 1000
    )
    # Our client, h2 as server.
    h2srv = h2conn.H2Connection(h2config.H2Configuration(client_side=False))
    h2srv.initiate_connection()
    c = Connection(True)
    c.initiate_connection()
    c.send_headers(1, REQ, end_stream=True)
    h2srv.receive_data(bytes(c.data_to_send()))
    c.receive(h2srv.data_to_send())
    h2srv.send_headers(1, [(b":status", b"200")])
    h2srv.send_data(1, b"ok", end_stream=True)
    ev = c.receive(h2srv.data_to_send())
    assert isinstance(ev[0], ResponseReceived) and bytes(ev[1].data) == b"ok"  # type: ignore[attr-defined]
