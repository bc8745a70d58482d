"""A sans-I/O HTTP/2 (RFC 9113) connection for proxying: frames, stream states, flow
control, header validation and abuse limits. Bytes in, events out; no asyncio.

One `Connection` is one side (client or server) of one connection. The caller feeds what
it reads to `receive()`, acts on the returned events, calls `send_*` methods, and writes
what `data_to_send()` returns.

Rules:
1. Events are small slotted objects returned as one list per `receive()` call (cheaper
   in CPython than frozen dataclasses or callbacks through a handler object); a proxy
   handles them in order. `DataReceived.data` is a memoryview slice of the bytes given to
   `receive()` (no copy): forward or copy it before keeping it.
2. Errors are types carrying an RFC 9113 code. A `ConnectionProtocolError` raised inside
   the codec ends the connection: GOAWAY with that code is queued, a
   `ConnectionTerminated(remote=False)` event is returned and later input is ignored. A
   `StreamProtocolError` resets only its stream (RST_STREAM queued, `StreamReset(remote=
   False)` returned if the caller knew the stream). `UsageError` is raised to the caller
   for a call that breaks the protocol (sending on a closed stream, past the peer's
   stream limit, after GOAWAY).
3. Flow control, receiving: DATA counts against our windows as it arrives; windows are
   reopened only when the caller calls `acknowledge_received_data()` (a proxy does so as
   the other leg drains), batched into one WINDOW_UPDATE when half a window is
   consumed. So a slow reader slows its writer end to end. Padding is acknowledged at
   once. Sending: `send_data()` sends what the windows allow and returns how much it
   took; the caller queues the rest and retries on `WindowUpdated` (stream 0 means every
   stream may retry: a connection WINDOW_UPDATE or a larger SETTINGS_INITIAL_WINDOW_SIZE).
4. Header blocks are always decoded, even for a stream that is refused, ignored or reset,
   so the HPACK context stays in sync. Fields are validated here, not in `hpack.py`
   (RFC 9113 section 8.2 and 8.3): names lowercase tokens (stricter than RFC 9113, since
   requests may be forwarded as HTTP/1.1), values without NUL, CR, LF or surrounding
   whitespace, pseudo-headers first, once, only the known ones, required ones present,
   no connection-specific fields, `te` only `trailers`, content-length digits that agree
   with the DATA received. A malformed message is a stream error PROTOCOL_ERROR.
   Outgoing headers are not validated: a proxy sends what it validated plus its own.
5. Streams: closed streams are forgotten (the table holds only open and half-closed
   ones); a frame for a stream at or below the highest id seen is for a closed stream
   and is ignored (RST_STREAM we sent may cross frames in flight), a frame for an idle
   stream other than HEADERS/PRIORITY is a connection error. Server push is never
   enabled and PUSH_PROMISE is a connection error. PRIORITY is validated and ignored.
6. Abuse limits (`H2Settings`), each a bound the codec holds by itself:
   - concurrent streams: the peer's streams beyond `max_concurrent_streams` are refused
     with RST_STREAM REFUSED_STREAM;
   - rapid reset (CVE-2023-44487): the peer's streams reset by the peer or refused or
     reset by the codec count; more than `max_resets` within `reset_window` seconds is
     GOAWAY ENHANCE_YOUR_CALM (resets the caller asks for do not count);
   - CONTINUATION flood (CVE-2024-27316 class): a header block larger than
     `max_header_block_size` encoded bytes or made of more than
     `max_continuation_frames` CONTINUATION frames is GOAWAY ENHANCE_YOUR_CALM, checked
     before the frame is buffered;
   - HPACK bombs: the decoder's list size limit (`max_header_list_size`); a block past
     it resets its stream with ENHANCE_YOUR_CALM (counted as a reset) and the
     connection goes on;
   - control-frame floods: more than `max_pending_control_frames` frames the codec
     queued by itself (PING and SETTINGS acknowledgements, RST_STREAM) since the caller
     last drained `data_to_send()` is GOAWAY ENHANCE_YOUR_CALM. The caller must not
     drain while its transport is paused, so a peer that does not read is cut off;
   - empty frames: more than `max_empty_frames` consecutive frames with no payload and
     no effect (DATA without END_STREAM, CONTINUATION without END_HEADERS) is GOAWAY
     ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import time
from collections.abc import Callable, Iterable
from typing import Final

from meshlet.proto.hpack import CompressionError, Decoder, Encoder, HeaderListTooLarge

__all__ = [
    "PREFACE",
    "Connection",
    "ConnectionProtocolError",
    "ConnectionTerminated",
    "DataReceived",
    "ErrorCode",
    "Event",
    "H2Error",
    "H2Settings",
    "PingAcknowledged",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "SettingsAcknowledged",
    "StreamProtocolError",
    "StreamReset",
    "TrailersReceived",
    "UsageError",
    "WindowUpdated",
]

Header = tuple[bytes, bytes]
Headers = tuple[Header, ...]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9
FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8
FLAG_PRIORITY: Final = 0x20

# SETTINGS identifiers.
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6
SETTINGS_ENABLE_CONNECT_PROTOCOL: Final = 0x8

MAX_WINDOW: Final = 2**31 - 1
DEFAULT_WINDOW: Final = 65535
DEFAULT_FRAME_SIZE: Final = 16384
MAX_FRAME_SIZE: Final = 2**24 - 1


class ErrorCode:
    """RFC 9113 section 7 error codes."""

    NO_ERROR: Final = 0x0
    PROTOCOL_ERROR: Final = 0x1
    INTERNAL_ERROR: Final = 0x2
    FLOW_CONTROL_ERROR: Final = 0x3
    SETTINGS_TIMEOUT: Final = 0x4
    STREAM_CLOSED: Final = 0x5
    FRAME_SIZE_ERROR: Final = 0x6
    REFUSED_STREAM: Final = 0x7
    CANCEL: Final = 0x8
    COMPRESSION_ERROR: Final = 0x9
    CONNECT_ERROR: Final = 0xA
    ENHANCE_YOUR_CALM: Final = 0xB
    INADEQUATE_SECURITY: Final = 0xC
    HTTP_1_1_REQUIRED: Final = 0xD


_E = ErrorCode


class H2Error(Exception):
    """Base of this module's errors; `code` is an RFC 9113 error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectionProtocolError(H2Error):
    """The peer broke the protocol for the whole connection: GOAWAY `code`."""


class StreamProtocolError(H2Error):
    """The peer broke the protocol on one stream: RST_STREAM `code`."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(code, message)
        self.stream_id = stream_id


class UsageError(H2Error):
    """The caller asked for something the protocol does not allow now."""

    def __init__(self, message: str) -> None:
        super().__init__(_E.INTERNAL_ERROR, message)


@dataclasses.dataclass(frozen=True, slots=True)
class H2Settings:
    """Our side's settings (advertised in SETTINGS) and abuse limits (rule 6)."""

    header_table_size: int = 4096
    max_concurrent_streams: int = 100
    initial_window_size: int = DEFAULT_WINDOW
    max_frame_size: int = DEFAULT_FRAME_SIZE
    max_header_list_size: int = 65536
    # Connection receive window, raised from 65535 by a WINDOW_UPDATE at the start.
    connection_window_size: int = 1 << 20
    max_header_block_size: int = 65536
    max_continuation_frames: int = 64
    max_resets: int = 1000
    reset_window: float = 10.0
    max_pending_control_frames: int = 1000
    max_empty_frames: int = 100
    clock: Callable[[], float] = time.monotonic


# -- events ----------------------------------------------------------------------------


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in names)
        return f"{type(self).__name__}({fields})"


class RequestReceived(Event):
    __slots__ = ("end_stream", "headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream


class ResponseReceived(Event):
    """A response head; `status` < 200 is informational and a final one follows."""

    __slots__ = ("end_stream", "headers", "status", "stream_id")

    def __init__(self, stream_id: int, headers: Headers, end_stream: bool, status: int) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream
        self.status = status


class TrailersReceived(Event):
    """Trailers; they always end the stream."""

    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class DataReceived(Event):
    """`data` is a memoryview into the received bytes; acknowledge `flow_controlled_length`
    minus padding (that is, `len(data)`) once it has been forwarded."""

    __slots__ = ("data", "end_stream", "flow_controlled_length", "stream_id")

    def __init__(
        self, stream_id: int, data: memoryview, flow_controlled_length: int, end_stream: bool
    ) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length
        self.end_stream = end_stream


class StreamReset(Event):
    __slots__ = ("error_code", "remote", "stream_id")

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


class WindowUpdated(Event):
    """More may be sent on `stream_id`; 0 means on every stream."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class RemoteSettingsChanged(Event):
    __slots__ = ("changed",)

    def __init__(self, changed: dict[int, int]) -> None:
        self.changed = changed


class SettingsAcknowledged(Event):
    __slots__ = ()


class PingAcknowledged(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class ConnectionTerminated(Event):
    """GOAWAY received (`remote`) or sent because of an error (not `remote`)."""

    __slots__ = ("debug", "error_code", "last_stream_id", "remote")

    def __init__(self, error_code: int, last_stream_id: int, remote: bool, debug: bytes) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.remote = remote
        self.debug = debug


# -- header validation -----------------------------------------------------------------

_NAME_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE_RE: Final = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]\Z")
_DIGITS_RE: Final = re.compile(rb"[0-9]{1,18}")
_STATUS_RE: Final = re.compile(rb"[1-9][0-9][0-9]")
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":path", b":authority"})
_GOOD_NAMES: set[bytes] = set()
_VALID_CACHE_MAX: Final = 1024
# Validated lists by kind: headers -> content-length (and status for responses).
_VALID_REQUESTS: dict[Headers, int] = {}
_VALID_RESPONSES: dict[Headers, tuple[int, int]] = {}


class _Malformed(Exception):
    pass


def _check_regular(name: bytes, value: bytes, content_length: int) -> int:
    """Check one regular field; return the content-length seen so far (-1 if none)."""
    if name not in _GOOD_NAMES:
        if not _NAME_RE.fullmatch(name):
            raise _Malformed(f"invalid field name {name[:40]!r}")
        if len(_GOOD_NAMES) < 4096:
            _GOOD_NAMES.add(name)
    if name in _CONNECTION_SPECIFIC:
        raise _Malformed(f"connection-specific field {name.decode()}")
    if value and _BAD_VALUE_RE.search(value):
        raise _Malformed(f"invalid value for {name.decode()}")
    if name == b"te":
        if value != b"trailers":
            raise _Malformed("te other than trailers")
    elif name == b"content-length":
        if not _DIGITS_RE.fullmatch(value):
            raise _Malformed("invalid content-length")
        length = int(value)
        if content_length >= 0 and length != content_length:
            raise _Malformed("conflicting content-length")
        return length
    return content_length


def validate_request(headers: Headers) -> int:
    """Validate a request head (RFC 9113 8.3.1); return its content-length or -1."""
    cached = _VALID_REQUESTS.get(headers)
    if cached is not None:
        return cached
    pseudo: dict[bytes, bytes] = {}
    content_length = -1
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                raise _Malformed("pseudo-header after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise _Malformed(f"pseudo-header {name.decode(errors='replace')[:40]}")
            if name in pseudo:
                raise _Malformed(f"duplicate {name.decode()}")
            if _BAD_VALUE_RE.search(value):
                raise _Malformed(f"invalid value for {name.decode()}")
            pseudo[name] = value
        else:
            regular = True
            content_length = _check_regular(name, value, content_length)
    method = pseudo.get(b":method")
    if not method or not _NAME_RE.fullmatch(method.lower()):
        raise _Malformed("missing or invalid :method")
    if method == b"CONNECT":
        if b":scheme" in pseudo or b":path" in pseudo or not pseudo.get(b":authority"):
            raise _Malformed("CONNECT needs :authority only")
    else:
        path = pseudo.get(b":path")
        if not path or not pseudo.get(b":scheme"):
            raise _Malformed("missing :scheme or :path")
        if path == b"*":
            if method != b"OPTIONS":
                raise _Malformed(":path * without OPTIONS")
        elif path[:1] != b"/" and pseudo[b":scheme"] in (b"http", b"https"):
            raise _Malformed(":path not starting with /")
    if len(_VALID_REQUESTS) >= _VALID_CACHE_MAX:
        _VALID_REQUESTS.clear()
    _VALID_REQUESTS[headers] = content_length
    return content_length


def validate_response(headers: Headers) -> tuple[int, int]:
    """Validate a response head (RFC 9113 8.3.2); return (status, content-length)."""
    cached = _VALID_RESPONSES.get(headers)
    if cached is not None:
        return cached
    status = -1
    content_length = -1
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular or name != b":status" or status >= 0:
                raise _Malformed(f"unexpected pseudo-header {name.decode(errors='replace')[:40]}")
            if not _STATUS_RE.fullmatch(value) or value == b"101":
                raise _Malformed("invalid :status")
            status = int(value)
        else:
            regular = True
            content_length = _check_regular(name, value, content_length)
    if status < 0:
        raise _Malformed("missing :status")
    result = (status, content_length)
    if len(_VALID_RESPONSES) >= _VALID_CACHE_MAX:
        _VALID_RESPONSES.clear()
    _VALID_RESPONSES[headers] = result
    return result


def validate_trailers(headers: Headers) -> None:
    for name, value in headers:
        if name[:1] == b":":
            raise _Malformed("pseudo-header in trailers")
        _check_regular(name, value, -1)


# -- frames ----------------------------------------------------------------------------

_HEAD: Final = struct.Struct(">BHBBL")
_pack_head = _HEAD.pack
_unpack_head = _HEAD.unpack_from
_FRAME_U32: Final = struct.Struct(">BHBBLL")  # a frame with a 4-byte payload
_pack_u32 = _FRAME_U32.pack
_GOAWAY: Final = struct.Struct(">BHBBLLL")
_SETTING: Final = struct.Struct(">HL")
_U32: Final = struct.Struct(">L")


def _frame_head(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _pack_head(length >> 16, length & 0xFFFF, ftype, flags, stream_id)


class _Stream:
    __slots__ = (
        "content_length",
        "head",
        "known",
        "local_closed",
        "phase",
        "received",
        "recv_unacked",
        "recv_window",
        "remote_closed",
        "send_window",
        "stream_id",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0
        self.local_closed = False
        self.remote_closed = False
        self.phase = 0  # 0: waiting for the final head; 1: head received
        self.content_length = -1
        self.received = 0
        self.head = False  # the request was HEAD: the response has no content
        self.known = True  # the caller has seen this stream (events on reset)


class Connection:
    """One side of an HTTP/2 connection (see the module rules)."""

    __slots__ = (
        "_client",
        "_closed",
        "_conn_unacked",
        "_cont_flags",
        "_cont_frames",
        "_cont_parts",
        "_cont_size",
        "_cont_stream",
        "_decoder",
        "_empty_frames",
        "_encoder",
        "_events",
        "_goaway_received",
        "_goaway_sent",
        "_got_settings",
        "_last_local_id",
        "_last_peer_id",
        "_local_open",
        "_need",
        "_out",
        "_peer_initial_window",
        "_peer_max_frame",
        "_peer_max_streams",
        "_peer_open",
        "_pending",
        "_pending_control",
        "_preface_left",
        "_recv_window",
        "_reset_count",
        "_reset_start",
        "_send_window",
        "_settings_acked",
        "_streams",
        "local",
        "peer_settings",
    )

    def __init__(self, client_side: bool, settings: H2Settings | None = None) -> None:
        s = settings or H2Settings()
        self.local = s
        self._client = client_side
        self._decoder = Decoder(
            max_table_size=s.header_table_size,
            max_header_list_size=s.max_header_list_size,
            max_string_length=s.max_header_list_size,
        )
        self._encoder = Encoder()
        self._streams: dict[int, _Stream] = {}
        self._out = bytearray()
        self._pending = b""
        self._need = 0
        self._events: list[Event] = []
        self._preface_left = b"" if client_side else PREFACE
        self._got_settings = False
        self._settings_acked = False
        self._closed = False
        self._goaway_sent = -1  # last stream id we promised to process, or -1
        self._goaway_received = False
        self.peer_settings: dict[int, int] = {}
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_FRAME_SIZE
        self._peer_max_streams = 2**31
        self._send_window = DEFAULT_WINDOW
        self._recv_window = DEFAULT_WINDOW
        self._conn_unacked = 0
        self._last_local_id = 0
        self._last_peer_id = 0
        self._local_open = 0
        self._peer_open = 0
        self._cont_stream = 0
        self._cont_flags = 0
        self._cont_parts: list[bytes] = []
        self._cont_size = 0
        self._cont_frames = 0
        self._reset_count = 0
        self._reset_start = 0.0
        self._pending_control = 0
        self._empty_frames = 0

    # -- state queries -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once a GOAWAY with an error was sent: nothing more will be processed."""
        return self._closed

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """How many DATA bytes `send_data` would take now on `stream_id`."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return min(self._send_window, stream.send_window)

    def get_next_available_stream_id(self) -> int:
        if self._last_local_id == 0:
            return 1 if self._client else 2
        return self._last_local_id + 2

    # -- output ------------------------------------------------------------------------

    def data_to_send(self) -> bytearray:
        """The bytes queued so far (ownership passes to the caller). Call it only when
        the transport accepts writes: control frames queued meanwhile are bounded."""
        out = self._out
        self._out = bytearray()
        self._pending_control = 0
        return out

    def initiate_connection(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection window."""
        s = self.local
        if self._client:
            self._out += PREFACE
        payload = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (SETTINGS_HEADER_TABLE_SIZE, s.header_table_size),
                (SETTINGS_ENABLE_PUSH, 0),
                (SETTINGS_MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
                (SETTINGS_INITIAL_WINDOW_SIZE, s.initial_window_size),
                (SETTINGS_MAX_FRAME_SIZE, s.max_frame_size),
                (SETTINGS_MAX_HEADER_LIST_SIZE, s.max_header_list_size),
            )
        )
        self._out += _frame_head(len(payload), SETTINGS, 0, 0) + payload
        if s.connection_window_size > DEFAULT_WINDOW:
            increment = s.connection_window_size - DEFAULT_WINDOW
            self._out += _pack_u32(0, 4, WINDOW_UPDATE, 0, 0, increment)
            self._recv_window += increment

    def send_headers(
        self, stream_id: int, headers: Iterable[Header], end_stream: bool = False
    ) -> None:
        """Send a request or response head, or trailers (`end_stream=True`)."""
        if self._closed:
            raise UsageError("connection closed")
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._open_local(stream_id)
            if self._client:
                headers = list(headers)
                for name, value in headers:
                    if name == b":method":
                        stream.head = value == b"HEAD"
                        break
        elif stream.local_closed:
            raise UsageError(f"stream {stream_id} is closed for sending")
        block = self._encoder.encode(headers)
        flags = FLAG_END_STREAM if end_stream else 0
        size = self._peer_max_frame
        out = self._out
        if len(block) <= size:
            out += _frame_head(len(block), HEADERS, flags | FLAG_END_HEADERS, stream_id)
            out += block
        else:
            out += _frame_head(size, HEADERS, flags, stream_id)
            out += block[:size]
            for i in range(size, len(block), size):
                chunk = block[i : i + size]
                last = FLAG_END_HEADERS if i + size >= len(block) else 0
                out += _frame_head(len(chunk), CONTINUATION, last, stream_id)
                out += chunk
        if end_stream:
            self._local_close(stream)

    def send_trailers(self, stream_id: int, headers: Iterable[Header]) -> None:
        self.send_headers(stream_id, headers, end_stream=True)

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> int:
        """Send as much of `data` as the flow-control windows allow, in frames no larger
        than the peer's maximum; return how many bytes were taken. END_STREAM is sent
        only with the last byte (or on an empty `data`)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self._closed:
            raise UsageError(f"stream {stream_id} is not open for sending")
        total = len(data)
        n = min(total, self._send_window, stream.send_window)
        if n <= 0:
            if total == 0 and end_stream:
                self._out += _frame_head(0, DATA, FLAG_END_STREAM, stream_id)
                self._local_close(stream)
            return 0
        self._send_window -= n
        stream.send_window -= n
        done = end_stream and n == total
        out = self._out
        size = self._peer_max_frame
        if n <= size:
            out += _frame_head(n, DATA, FLAG_END_STREAM if done else 0, stream_id)
            out += data if n == total else data[:n]
        else:
            view = memoryview(data)
            for i in range(0, n, size):
                chunk = view[i : min(i + size, n)]
                last = done and i + size >= n
                out += _frame_head(len(chunk), DATA, FLAG_END_STREAM if last else 0, stream_id)
                out += chunk
        if done:
            self._local_close(stream)
        return n

    def send_rst(self, stream_id: int, error_code: int = _E.CANCEL) -> None:
        """Reset a stream (not counted against the peer: rule 6)."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._drop(stream)
        self._out += _pack_u32(0, 4, RST_STREAM, 0, stream_id, error_code)

    def send_goaway(
        self, error_code: int = _E.NO_ERROR, last_stream_id: int | None = None, debug: bytes = b""
    ) -> None:
        """Send GOAWAY. With NO_ERROR the streams up to `last_stream_id` (default: every
        stream the peer opened so far) go on; with an error, the connection is over."""
        last = self._last_peer_id if last_stream_id is None else last_stream_id
        self._goaway_sent = last if self._goaway_sent < 0 else min(last, self._goaway_sent)
        self._out += _GOAWAY.pack(0, 8 + len(debug), GOAWAY, 0, 0, last, error_code) + debug
        if error_code != _E.NO_ERROR:
            self._closed = True

    def ping(self, data: bytes = b"\0" * 8) -> None:
        if len(data) != 8:
            raise UsageError("PING payload must be 8 bytes")
        self._out += _frame_head(8, PING, 0, 0) + data

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """`n` bytes of DATA from `stream_id` were consumed: reopen the windows (batched)."""
        if n <= 0:
            return
        unacked = self._conn_unacked + n
        if unacked >= self.local.connection_window_size >> 1:
            self._out += _pack_u32(0, 4, WINDOW_UPDATE, 0, 0, unacked)
            self._recv_window += unacked
            unacked = 0
        self._conn_unacked = unacked
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.remote_closed:
            unacked = stream.recv_unacked + n
            if unacked >= self.local.initial_window_size >> 1:
                self._out += _pack_u32(0, 4, WINDOW_UPDATE, 0, stream_id, unacked)
                stream.recv_window += unacked
                unacked = 0
            stream.recv_unacked = unacked

    # -- stream bookkeeping ------------------------------------------------------------

    def _open_local(self, stream_id: int) -> _Stream:
        if self._goaway_received:
            raise UsageError("peer sent GOAWAY: no new streams")
        if not self._client:
            raise UsageError("a server does not open streams (push is not supported)")
        if stream_id & 1 != 1 or stream_id <= self._last_local_id:
            raise UsageError(f"stream id {stream_id} is not a new client stream id")
        if self._local_open >= self._peer_max_streams:
            raise UsageError("peer's SETTINGS_MAX_CONCURRENT_STREAMS reached")
        stream = _Stream(stream_id, self._peer_initial_window, self.local.initial_window_size)
        stream.phase = 0
        self._streams[stream_id] = stream
        self._last_local_id = stream_id
        self._local_open += 1
        return stream

    def _local_close(self, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._drop(stream)

    def _remote_close(self, stream: _Stream) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            self._drop(stream)

    def _drop(self, stream: _Stream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None:
            if (stream.stream_id & 1 == 1) == self._client:
                self._local_open -= 1
            else:
                self._peer_open -= 1

    def _is_peer_id(self, stream_id: int) -> bool:
        return (stream_id & 1 == 1) != self._client

    def _is_idle(self, stream_id: int) -> bool:
        if self._is_peer_id(stream_id):
            return stream_id > self._last_peer_id
        return stream_id > self._last_local_id

    def _count_reset(self) -> None:
        now = self.local.clock()
        if now - self._reset_start > self.local.reset_window:
            self._reset_start = now
            self._reset_count = 0
        self._reset_count += 1
        if self._reset_count > self.local.max_resets:
            raise ConnectionProtocolError(_E.ENHANCE_YOUR_CALM, "too many stream resets")

    def _queue_control(self, frame: bytes) -> None:
        self._out += frame
        self._pending_control += 1
        if self._pending_control > self.local.max_pending_control_frames:
            raise ConnectionProtocolError(_E.ENHANCE_YOUR_CALM, "control frame flood")

    def _empty_frame(self) -> None:
        self._empty_frames += 1
        if self._empty_frames > self.local.max_empty_frames:
            raise ConnectionProtocolError(_E.ENHANCE_YOUR_CALM, "empty frame flood")

    def _stream_error(self, err: StreamProtocolError) -> None:
        sid = err.stream_id
        stream = self._streams.get(sid)
        known = stream is not None and stream.known
        if stream is not None:
            self._drop(stream)
        if self._is_peer_id(sid):
            self._count_reset()
        self._queue_control(_pack_u32(0, 4, RST_STREAM, 0, sid, err.code))
        if known:
            self._events.append(StreamReset(sid, err.code, False))

    def _fail(self, err: ConnectionProtocolError) -> None:
        debug = str(err).encode("utf-8", "replace")[:200]
        last = self._last_peer_id
        self._out += _GOAWAY.pack(0, 8 + len(debug), GOAWAY, 0, 0, last, err.code) + debug
        self._closed = True
        self._pending = b""
        self._cont_parts = []
        self._events.append(ConnectionTerminated(err.code, last, False, debug))

    # -- input -------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Process received bytes; return the events they complete (rule 1)."""
        events: list[Event] = []
        if self._closed or not data:
            return events
        self._events = events
        if type(data) is not bytes:
            data = bytes(data)
        if self._pending:
            if len(self._pending) + len(data) < self._need:
                self._pending += data
                return events
            data = self._pending + data
            self._pending = b""
        try:
            if self._preface_left:
                data = self._read_preface(data)
                if self._preface_left:
                    return events
            self._frames(data)
        except ConnectionProtocolError as err:
            self._fail(err)
        return events

    def _read_preface(self, data: bytes) -> bytes:
        left = self._preface_left
        got = data[: len(left)]
        if not left.startswith(got):
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "invalid connection preface")
        self._preface_left = left[len(got) :]
        return data[len(got) :]

    def _frames(self, data: bytes) -> None:
        view = memoryview(data)
        n = len(data)
        pos = 0
        max_frame = self.local.max_frame_size
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = _unpack_head(data, pos)
            length = hi << 16 | lo
            if length > max_frame:
                raise ConnectionProtocolError(_E.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            start = pos + 9
            end = start + length
            if end > n:
                break
            pos = end
            sid &= 0x7FFFFFFF
            if self._cont_stream and ftype != CONTINUATION:
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "expected CONTINUATION")
            if not self._got_settings:
                if ftype != SETTINGS or flags & FLAG_ACK:
                    raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "first frame not SETTINGS")
                self._got_settings = True
            try:
                if ftype == DATA:
                    self._on_data(view, start, end, flags, sid)
                elif ftype == HEADERS:
                    self._on_headers(view, start, end, flags, sid)
                elif ftype == WINDOW_UPDATE:
                    self._on_window_update(data, start, length, sid)
                elif ftype == RST_STREAM:
                    self._on_rst(data, start, length, sid)
                elif ftype == SETTINGS:
                    self._on_settings(data, start, end, flags, sid)
                elif ftype == PING:
                    self._on_ping(data, start, length, flags, sid)
                elif ftype == CONTINUATION:
                    self._on_continuation(view, start, end, flags, sid)
                elif ftype == PRIORITY:
                    self._on_priority(data, start, length, sid)
                elif ftype == GOAWAY:
                    self._on_goaway(data, start, end, sid)
                elif ftype == PUSH_PROMISE:
                    raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "PUSH_PROMISE (push disabled)")
                # Unknown types are ignored (RFC 9113 section 4.1).
            except StreamProtocolError as err:
                self._stream_error(err)
            if self._closed:
                return
        if pos < n:
            self._pending = data[pos:]
            self._need = 9
            if n - pos >= 9:
                hi, lo = _unpack_head(data, pos)[:2]
                self._need = 9 + (hi << 16 | lo)

    # -- frame handlers ----------------------------------------------------------------

    def _credit_connection(self, n: int) -> None:
        """DATA the caller will never see: reopen the connection window for it."""
        unacked = self._conn_unacked + n
        if unacked >= self.local.connection_window_size >> 1:
            self._out += _pack_u32(0, 4, WINDOW_UPDATE, 0, 0, unacked)
            self._recv_window += unacked
            unacked = 0
        self._conn_unacked = unacked

    def _on_data(self, view: memoryview, start: int, end: int, flags: int, sid: int) -> None:
        if sid == 0:
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "DATA on stream 0")
        length = end - start
        self._recv_window -= length
        if self._recv_window < 0:
            raise ConnectionProtocolError(_E.FLOW_CONTROL_ERROR, "connection window exceeded")
        if flags & FLAG_PADDED:
            if length == 0 or view[start] >= length:
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "invalid padding")
            end -= view[start]
            start += 1
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed:
            self._credit_connection(length)
            if stream is None and self._is_idle(sid):
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if stream is not None:
                raise StreamProtocolError(sid, _E.STREAM_CLOSED, "DATA after END_STREAM")
            return  # a closed stream: frames in flight after a reset
        if stream.phase == 0:
            self._credit_connection(length)
            raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, "DATA before HEADERS")
        stream.recv_window -= length
        if stream.recv_window < 0:
            self._credit_connection(length)
            raise StreamProtocolError(sid, _E.FLOW_CONTROL_ERROR, "stream window exceeded")
        size = end - start
        end_stream = flags & FLAG_END_STREAM == FLAG_END_STREAM
        if size:
            self._empty_frames = 0
            if length != size:  # padding is consumed here, never by the caller
                self.acknowledge_received_data(sid, length - size)
        elif not end_stream:
            self._empty_frame()
        received = stream.received + size
        stream.received = received
        limit = stream.content_length
        if limit >= 0 and not stream.head and (
            received > limit or (end_stream and received != limit)
        ):
            self._credit_connection(length)
            raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, "content-length mismatch")
        if end_stream:
            self._remote_close(stream)
        self._events.append(DataReceived(sid, view[start:end], length, end_stream))

    def _on_headers(self, view: memoryview, start: int, end: int, flags: int, sid: int) -> None:
        if sid == 0:
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & FLAG_PADDED:
            if start == end or view[start] >= end - start:
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "invalid padding")
            end -= view[start]
            start += 1
        self_dependent = False
        if flags & FLAG_PRIORITY:
            if end - start < 5:
                raise ConnectionProtocolError(_E.FRAME_SIZE_ERROR, "short HEADERS priority")
            self_dependent = _U32.unpack_from(view, start)[0] & 0x7FFFFFFF == sid
            start += 5
        size = end - start
        if size > self.local.max_header_block_size:
            raise ConnectionProtocolError(_E.ENHANCE_YOUR_CALM, "header block too large")
        if not flags & FLAG_END_HEADERS:
            if not size:
                self._empty_frame()
            self._cont_stream = sid
            self._cont_flags = flags | (0x100 if self_dependent else 0)
            self._cont_parts = [bytes(view[start:end])]
            self._cont_size = size
            self._cont_frames = 0
            return
        self._empty_frames = 0
        self._headers_complete(sid, flags, bytes(view[start:end]), self_dependent)

    def _on_continuation(
        self, view: memoryview, start: int, end: int, flags: int, sid: int
    ) -> None:
        if not self._cont_stream or sid != self._cont_stream:
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "unexpected CONTINUATION")
        size = end - start
        self._cont_size += size
        self._cont_frames += 1
        if (
            self._cont_size > self.local.max_header_block_size
            or self._cont_frames > self.local.max_continuation_frames
        ):
            raise ConnectionProtocolError(_E.ENHANCE_YOUR_CALM, "header block too large")
        if size:
            self._cont_parts.append(bytes(view[start:end]))
        if not flags & FLAG_END_HEADERS:
            if not size:
                self._empty_frame()
            return
        self._empty_frames = 0
        block = b"".join(self._cont_parts)
        first = self._cont_flags
        self._cont_stream = 0
        self._cont_parts = []
        self._headers_complete(sid, first & 0xFF, block, bool(first & 0x100))

    def _headers_complete(self, sid: int, flags: int, block: bytes, self_dependent: bool) -> None:
        too_large = False
        try:
            headers = self._decoder.decode(block)
        except HeaderListTooLarge:
            headers = ()
            too_large = True
        except CompressionError as err:
            raise ConnectionProtocolError(_E.COMPRESSION_ERROR, str(err)) from None
        end_stream = flags & FLAG_END_STREAM == FLAG_END_STREAM
        stream = self._streams.get(sid)
        if stream is None:
            if not self._is_peer_id(sid):
                if sid > self._last_local_id:
                    raise ConnectionProtocolError(_E.PROTOCOL_ERROR, f"HEADERS on idle {sid}")
                return  # a stream we reset or finished
            if sid <= self._last_peer_id:
                return  # closed (rule 5)
            if self._client:
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "server-initiated stream")
            self._last_peer_id = sid
            if 0 <= self._goaway_sent < sid:
                return  # after our GOAWAY: ignored, the peer may retry elsewhere
            if self_dependent:
                raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, "stream depends on itself")
            if too_large:
                raise StreamProtocolError(sid, _E.ENHANCE_YOUR_CALM, "header list too large")
            if self._peer_open >= self.local.max_concurrent_streams:
                raise StreamProtocolError(sid, _E.REFUSED_STREAM, "too many concurrent streams")
            try:
                content_length = validate_request(headers)
            except _Malformed as err:
                raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, str(err)) from None
            stream = _Stream(sid, self._peer_initial_window, self.local.initial_window_size)
            stream.phase = 1
            stream.content_length = content_length
            self._streams[sid] = stream
            self._peer_open += 1
            if end_stream:
                if content_length > 0:
                    stream.known = False
                    raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, "content-length mismatch")
                stream.remote_closed = True
            self._events.append(RequestReceived(sid, headers, end_stream))
            return
        if stream.remote_closed:
            raise StreamProtocolError(sid, _E.STREAM_CLOSED, "HEADERS after END_STREAM")
        if self_dependent:
            raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, "stream depends on itself")
        if too_large:
            raise StreamProtocolError(sid, _E.ENHANCE_YOUR_CALM, "header list too large")
        try:
            if stream.phase == 0:  # a response head (client side)
                status, content_length = validate_response(headers)
                if status < 200:
                    if end_stream:
                        raise _Malformed("informational response with END_STREAM")
                else:
                    stream.phase = 1
                    stream.content_length = content_length
                    if status == 304 or status == 204:
                        stream.head = True  # no content whatever content-length says
                    if end_stream and content_length > 0 and not stream.head:
                        raise _Malformed("content-length mismatch")
                event: Event = ResponseReceived(sid, headers, end_stream, status)
            else:
                if not end_stream:
                    raise _Malformed("trailers without END_STREAM")
                validate_trailers(headers)
                if (
                    stream.content_length >= 0
                    and not stream.head
                    and stream.received != stream.content_length
                ):
                    raise _Malformed("content-length mismatch")
                event = TrailersReceived(sid, headers)
        except _Malformed as err:
            raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, str(err)) from None
        if end_stream:
            self._remote_close(stream)
        self._events.append(event)

    def _on_window_update(self, data: bytes, start: int, length: int, sid: int) -> None:
        if length != 4:
            raise ConnectionProtocolError(_E.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = _U32.unpack_from(data, start)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ConnectionProtocolError(_E.FLOW_CONTROL_ERROR, "window above 2^31-1")
            self._events.append(WindowUpdated(0))
            return
        stream = self._streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle {sid}")
            return
        if increment == 0:
            raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise StreamProtocolError(sid, _E.FLOW_CONTROL_ERROR, "window above 2^31-1")
        if not stream.local_closed:
            self._events.append(WindowUpdated(sid))

    def _on_rst(self, data: bytes, start: int, length: int, sid: int) -> None:
        if length != 4:
            raise ConnectionProtocolError(_E.FRAME_SIZE_ERROR, "RST_STREAM length")
        if sid == 0:
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        stream = self._streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, f"RST_STREAM on idle {sid}")
            return
        self._drop(stream)
        self._events.append(StreamReset(sid, _U32.unpack_from(data, start)[0], True))
        if self._is_peer_id(sid):
            self._count_reset()

    def _on_settings(self, data: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if sid != 0:
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if end != start:
                raise ConnectionProtocolError(_E.FRAME_SIZE_ERROR, "SETTINGS ack with payload")
            if not self._settings_acked:
                self._settings_acked = True
                self._decoder.set_max_allowed_table_size(self.local.header_table_size)
            self._events.append(SettingsAcknowledged())
            return
        if (end - start) % 6:
            raise ConnectionProtocolError(_E.FRAME_SIZE_ERROR, "SETTINGS length")
        changed: dict[int, int] = {}
        for i in range(start, end, 6):
            ident, value = _SETTING.unpack_from(data, i)
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.set_max_table_size(value)
            elif ident == SETTINGS_ENABLE_PUSH:
                if value > 1 or (value == 1 and self._client):
                    raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "invalid ENABLE_PUSH")
            elif ident == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionProtocolError(_E.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise ConnectionProtocolError(_E.FLOW_CONTROL_ERROR, "window overflow")
                if delta > 0:
                    self._events.append(WindowUpdated(0))
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= MAX_FRAME_SIZE:
                    raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "invalid MAX_FRAME_SIZE")
                self._peer_max_frame = value
            elif ident == SETTINGS_ENABLE_CONNECT_PROTOCOL and value > 1:
                raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "invalid ENABLE_CONNECT")
            changed[ident] = value
        self.peer_settings.update(changed)
        self._queue_control(_frame_head(0, SETTINGS, FLAG_ACK, 0))
        self._events.append(RemoteSettingsChanged(changed))

    def _on_ping(self, data: bytes, start: int, length: int, flags: int, sid: int) -> None:
        if length != 8:
            raise ConnectionProtocolError(_E.FRAME_SIZE_ERROR, "PING length")
        if sid != 0:
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "PING on a stream")
        payload = data[start : start + 8]
        if flags & FLAG_ACK:
            self._events.append(PingAcknowledged(payload))
        else:
            self._queue_control(_frame_head(8, PING, FLAG_ACK, 0) + payload)

    def _on_priority(self, data: bytes, start: int, length: int, sid: int) -> None:
        if sid == 0:
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if length != 5:
            raise StreamProtocolError(sid, _E.FRAME_SIZE_ERROR, "PRIORITY length")
        if _U32.unpack_from(data, start)[0] & 0x7FFFFFFF == sid:
            raise StreamProtocolError(sid, _E.PROTOCOL_ERROR, "stream depends on itself")

    def _on_goaway(self, data: bytes, start: int, end: int, sid: int) -> None:
        if sid != 0:
            raise ConnectionProtocolError(_E.PROTOCOL_ERROR, "GOAWAY on a stream")
        if end - start < 8:
            raise ConnectionProtocolError(_E.FRAME_SIZE_ERROR, "GOAWAY length")
        last, code = struct.unpack_from(">LL", data, start)
        last &= 0x7FFFFFFF
        self._goaway_received = True
        # Our streams above `last` were not processed: reset them (safe to retry).
        for stream in [s for s in self._streams.values() if s.stream_id > last]:
            if not self._is_peer_id(stream.stream_id):
                self._drop(stream)
                self._events.append(StreamReset(stream.stream_id, _E.REFUSED_STREAM, True))
        self._events.append(ConnectionTerminated(code, last, True, data[start + 8 : end]))
