"""A strict, sans-I/O HTTP/1.x message-head parser and body framers for proxying.

This module owns the proxy's first security duty: deciding where a message ends. Two
parties that disagree on that can be made to smuggle requests, so the rules are strict
and an error is final for the connection.

Rules:
1. A head is parsed only once it is complete (`find_head_end`); the whole block is
   validated by one regular expression, so a bare CR or LF, obs-fold, whitespace before
   a colon, a control character in a value or a bad token in a name all fail it.
2. Framing (RFC 9112 section 6): a request with Transfer-Encoding must end in exactly one
   `chunked` and must not carry Content-Length; duplicate Content-Length values must be
   equal digits; anything else is an error. Responses follow the same rules (the proxy
   answers 502 for them); a response with neither length nor chunked is read until close.
3. Errors are `LocalProtocolError` (the peer sent something we refuse) carrying the status
   the proxy should answer with and a short reason for the `meshlet-proxy-error` header.
4. Bodies are never buffered: framers report how many of the given bytes belong to the
   body, so the caller forwards those original bytes untouched.
5. The head is forwarded as received unless something hop-by-hop or mesh-private must be
   removed (`needs_rewrite`); `rewrite_head` then rebuilds it line by line.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "BODY_CHUNKED",
    "BODY_LENGTH",
    "BODY_NONE",
    "BODY_UNTIL_CLOSE",
    "ChunkedFramer",
    "LocalProtocolError",
    "RequestHead",
    "ResponseHead",
    "find_head_end",
    "match_simple_response",
    "parse_request",
    "parse_response",
    "rewrite_head",
]

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
BODY_UNTIL_CLOSE: Final = 3


class LocalProtocolError(Exception):
    """The peer broke the protocol; answer `status` with `reason` and close."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.status = status
        self.reason = reason


_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# field-value: VCHAR / obs-text / SP / HTAB; no CR, no LF, no other CTL.
# Written so each line has exactly one parse (the value cannot start with whitespace) and
# the repetition is possessive: no backtracking, linear time on any input.
_FIELD_LINE = _TCHAR + rb"++:[ \t]*+(?:[^\x00-\x20\x7f][^\x00-\x08\x0a-\x1f\x7f]*+)?+\r\n"
# One match validates a whole head and finds its end.
_REQUEST_RE = re.compile(
    rb"(" + _TCHAR + rb"+) ([^\x00-\x20\x7f]+) HTTP/1\.([01])\r\n(?:" + _FIELD_LINE + rb")*+\r\n"
)
_RESPONSE_RE = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9][0-9]) [^\x00-\x08\x0a-\x1f\x7f]*\r\n(?:"
    + _FIELD_LINE + rb")*+\r\n"
)
# The fields the proxy must look at, matched in the lower-cased head; everything else is
# forwarded without any Python work. Values keep trailing whitespace (stripped on use).
_INTERESTING_RE = re.compile(
    rb"\n(c(?:ontent-length|onnection)|t(?:ransfer-encoding|e)|host|upgrade|expect|"
    rb"keep-alive|proxy-connection|meshlet-[-a-z0-9_.!#$%&'*+^`|~]*):[ \t]*([^\r]*)\r"
)
_DIGITS_RE = re.compile(rb"[0-9]{1,18}")
# Fast paths: one match validates the common head *and* extracts its framing. A field
# line that is not hop-by-hop or framing-related is "plain"; "Connection: keep-alive"
# changes nothing for HTTP/1.1 and counts as plain. Anything else falls back to the
# general path, which gives the same answer (tested) or the precise error.
_PLAIN_LINE = (
    rb"(?:(?!(?i:content-length|transfer-encoding|connection|host|upgrade|expect|keep-alive"
    rb"|proxy-connection|te|meshlet-" + _TCHAR + rb"*+):)" + _TCHAR
    + rb"++:[ \t]*+(?:[^\x00-\x20\x7f][^\x00-\x08\x0a-\x1f\x7f]*+)?+\r\n"
    rb"|(?i:connection):[ \t]*+(?i:keep-alive)[ \t]*+\r\n)"
)
# A bodiless HTTP/1.1 request with exactly one Host.
_REQUEST_FAST_RE = re.compile(
    rb"(" + _TCHAR + rb"++) ([^\x00-\x20\x7f]++) HTTP/1\.1\r\n" + _PLAIN_LINE
    + rb"*+(?i:host):[ \t]*+([^\x00-\x20\x7f,][^\x00-\x08\x0a-\x1f\x7f,]*+)\r\n"
    + _PLAIN_LINE + rb"*+\r\n"
)
# An HTTP/1.1 final response with exactly one Content-Length.
_RESPONSE_FAST_RE = re.compile(
    rb"HTTP/1\.1 ([2-9][0-9][0-9]) [^\x00-\x08\x0a-\x1f\x7f]*+\r\n" + _PLAIN_LINE
    + rb"*+(?i:content-length):[ \t]*+([0-9]{1,18})[ \t]*+\r\n" + _PLAIN_LINE + rb"*+\r\n"
)

_BARE_LF_RE = re.compile(rb"(?<!\r)\n")
_REQUEST_LINE_RE = re.compile(rb"(" + _TCHAR + rb"+) ([^\x00-\x20\x7f]+) HTTP/1\.([01])\r\n")

# Hop-by-hop per RFC 9110 section 7.6.1 (plus the legacy Proxy-Connection).
_HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"}
)
_EMPTY: Final[frozenset[bytes]] = frozenset()


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line that ends a head, or -1 if not yet complete."""
    i = buf.find(b"\r\n\r\n", start)
    return -1 if i < 0 else i + 4


def _incomplete(buf: bytes | bytearray, max_bytes: int, what: str, status: int) -> None:
    """The head did not match: raise if it never will, else return (wait for more)."""
    if buf.find(b"\r\n\r\n") >= 0 or _BARE_LF_RE.search(buf) or b"\r\n\n" in buf:
        raise LocalProtocolError(status, "malformed_" + what)
    if len(buf) > max_bytes:
        raise LocalProtocolError(431 if status == 400 else 502, what + "_too_large")


def _comma_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


class _Head:
    __slots__ = (
        "body",
        "close",
        "content_length",
        "drop",
        "end",
        "needs_rewrite",
        "raw",
        "version",
    )

    raw: bytes
    version: int  # 10 or 11
    body: int
    content_length: int
    close: bool  # the connection must close after this message
    needs_rewrite: bool
    drop: frozenset[bytes]  # lower-case names to remove when rewriting
    end: int


def _simple(h: _Head, body: int, content_length: int) -> None:
    """Framing of a head with nothing hop-by-hop in it: forwarded as received."""
    h.body = body
    h.content_length = content_length
    h.close = False
    h.drop = _EMPTY
    h.needs_rewrite = False


class RequestHead(_Head):
    __slots__ = ("expect_continue", "host", "method", "target", "upgrade")

    method: bytes
    target: bytes
    host: bytes
    upgrade: bytes | None
    expect_continue: bool


class ResponseHead(_Head):
    __slots__ = ("status",)

    status: int


def _framing(
    head: _Head, fields: list[tuple[bytes, bytes]], is_request: bool
) -> dict[bytes, bytes]:
    """Apply the framing rules shared by requests and responses; return the other
    interesting fields by lower-case name (joined with ', ' when repeated)."""
    cl: bytes | None = None
    te: list[bytes] = []
    other: dict[bytes, bytes] = {}
    bad = 400 if is_request else 502
    for lname, value in fields:
        value = value.rstrip(b" \t")
        if lname == b"content-length":
            # A list like "5, 5" is allowed by RFC 9110 if all equal; we accept only
            # repeated identical digits, never a differing or malformed value.
            for part in value.split(b","):
                part = part.strip(b" \t")
                if not _DIGITS_RE.fullmatch(part):
                    raise LocalProtocolError(bad, "invalid_content_length")
                if cl is not None and part != cl:
                    raise LocalProtocolError(bad, "conflicting_content_length")
                cl = part
        elif lname == b"transfer-encoding":
            te.extend(_comma_tokens(value))
            if not value.strip():
                raise LocalProtocolError(bad, "invalid_transfer_encoding")
        elif lname in other:
            other[lname] = other[lname] + b", " + value
        else:
            other[lname] = value
    if te:
        if cl is not None:
            raise LocalProtocolError(bad, "content_length_with_transfer_encoding")
        if te[-1] != b"chunked" or te.count(b"chunked") != 1:
            if is_request or te.count(b"chunked") > 1:
                raise LocalProtocolError(bad, "invalid_transfer_encoding")
            # A response may be delimited by close when chunked is not final; we refuse
            # that too: a mesh has no use for it and it is a smuggling vector.
            raise LocalProtocolError(bad, "invalid_transfer_encoding")
        if head.version == 10:
            # HTTP/1.0 has no chunked encoding; a 1.0 message claiming it is suspect.
            raise LocalProtocolError(bad, "chunked_in_http10")
        head.body = BODY_CHUNKED
        head.content_length = -1
    elif cl is not None:
        head.body = BODY_LENGTH
        head.content_length = int(cl)
    else:
        head.body = BODY_NONE if is_request else BODY_UNTIL_CLOSE
        head.content_length = 0 if is_request else -1
    return other


def _connection_options(
    head: _Head, other: dict[bytes, bytes], keep: frozenset[bytes]
) -> tuple[list[bytes], bool]:
    """Read the Connection field: whether to close after this message, and which
    extra field names it makes hop-by-hop (set on `head.drop`)."""
    conn = _comma_tokens(other.get(b"connection", b""))
    close = b"close" in conn if head.version == 11 else b"keep-alive" not in conn
    # Framing and Host are never dropped: naming them in Connection must not let a
    # client make the proxy forward a head whose framing differs from what it parsed.
    head.drop = frozenset(
        t for t in conn if t not in _NEVER_DROP and t not in keep
    )
    return conn, close


_NEVER_DROP: Final = frozenset(
    {b"close", b"keep-alive", b"content-length", b"transfer-encoding", b"host"}
)
# Present at all, these make the head need rewriting (RFC 9110 section 7.6.1).
_REWRITE_TRIGGERS: Final = frozenset({b"keep-alive", b"proxy-connection", b"te"})


def parse_request(
    buf: bytes | bytearray,
    max_head: int = 65536,
    max_line: int = 16384,
    strip_mesh: bool = False,
    allow_connect: bool = False,
) -> RequestHead | None:
    """Parse a request head at the start of `buf`; `None` if it is not complete yet.

    `h.end` is where the head ends in `buf`. `strip_mesh` marks `meshlet-*` fields for
    removal (inbound: never trust them from outside). CONNECT is refused (405) unless
    `allow_connect` (the outbound HTTP proxy listener, which tunnels it).
    """
    got: tuple[bytes, bytes, bytes] | None = None
    key = b""
    end = buf.find(b"\r\n\r\n", 0, max_head)
    if end >= 0:
        end += 4
        key = bytes(buf) if end == len(buf) else bytes(buf[:end])
        if key in _req_cache:
            got = _req_cache[key]
        else:
            fm = _REQUEST_FAST_RE.match(key)
            if fm is not None and fm.end() == end:
                got = (fm[1], fm[2], fm[3])
            if end <= _CACHE_HEAD_MAX:
                if len(_req_cache) >= _CACHE_MAX:
                    _req_cache.clear()
                _req_cache[key] = got
    if got is not None:
        method, target, fast_host = got
        if len(method) + len(target) + 10 <= max_line and method != b"CONNECT":
            h = RequestHead()
            h.raw = key
            h.end = end
            h.method = method
            h.target = target
            h.version = 11
            h.host = fast_host.rstrip(b" \t").lower()
            h.upgrade = None
            h.expect_continue = False
            _simple(h, BODY_NONE, 0)
            return h
    m = _REQUEST_RE.match(buf)
    if m is None:
        line = _REQUEST_LINE_RE.match(buf)
        if line is None:
            nl = buf.find(b"\r\n")
            if nl > max_line or (nl < 0 and len(buf) > max_line):
                raise LocalProtocolError(414, "request_line_too_long")
            if nl >= 0 or _BARE_LF_RE.search(buf):
                raise LocalProtocolError(400, "malformed_request_line")
        elif line.end() - 2 > max_line:
            raise LocalProtocolError(414, "request_line_too_long")
        _incomplete(buf, max_head, "request", 400)
        return None
    end = m.end()
    if end > max_head:
        raise LocalProtocolError(431, "request_too_large")
    if m.end(3) > max_line:  # the request line, without its CRLF
        raise LocalProtocolError(414, "request_line_too_long")
    raw = bytes(buf[:end]) if end != len(buf) or type(buf) is not bytes else buf
    h = RequestHead()
    h.raw = raw
    h.end = end
    h.method, h.target, minor = m.group(1, 2, 3)
    h.version = 11 if minor == b"1" else 10
    fields = _INTERESTING_RE.findall(raw.lower(), m.end(3))
    if h.version == 11 and h.method != b"CONNECT":
        # The common case (Host, maybe Content-Length, maybe "Connection: keep-alive"),
        # kept free of the general machinery below.
        host = cl = None
        for name, value in fields:
            if name == b"host" and host is None:
                host = value.rstrip(b" \t")
            elif name == b"content-length" and cl is None:
                cl = value.rstrip(b" \t")
            elif not (name == b"connection" and value.rstrip(b" \t") == b"keep-alive"):
                break
        else:
            if host and b"," not in host and (cl is None or _DIGITS_RE.fullmatch(cl)):
                h.host = host
                h.upgrade = None
                h.expect_continue = False
                if cl is None:
                    _simple(h, BODY_NONE, 0)
                else:
                    _simple(h, BODY_LENGTH, int(cl))
                return h
    other = _framing(h, fields, True)
    upgrade = other.get(b"upgrade")
    conn, close = _connection_options(
        h, other, _KEEP_UPGRADE if upgrade is not None else _EMPTY
    )
    if upgrade is not None and b"upgrade" not in conn:
        upgrade = None  # Upgrade not named in Connection is no request to upgrade
    h.upgrade = upgrade
    h.close = close
    h.needs_rewrite = bool(
        close
        or h.drop
        or not other.keys().isdisjoint(_REWRITE_TRIGGERS)
        or (h.version == 10 and b"connection" in other)
        or (b"upgrade" in other and upgrade is None)
        or (strip_mesh and any(n.startswith(b"meshlet-") for n in other))
    )
    host = other.get(b"host")
    if host is None:
        if h.version == 11:
            raise LocalProtocolError(400, "missing_host")
        host = b""
    elif not host or b"," in host:
        raise LocalProtocolError(400, "invalid_host")
    h.host = host
    h.expect_continue = other.get(b"expect", b"") == b"100-continue"
    if h.method == b"CONNECT" and not allow_connect:
        raise LocalProtocolError(405, "connect_not_supported")
    return h


_KEEP_UPGRADE: Final = frozenset((b"upgrade",))


# Fast-path verdicts by exact head bytes. Validation is a pure function of the head, and
# a backend's (or a client's) heads repeat byte for byte (a Date field changes once a
# second), so a repeated head costs a dict lookup instead of a regex match. Bounded:
# cleared when full, so odd heads only cost the ordinary match.
_CACHE_MAX = 512  # heads per cache (at most ~1-2 MiB each; ~200 KB typical)
_CACHE_HEAD_MAX = 2048  # longer heads are matched every time
_resp_cache: dict[bytes, tuple[int, int]] = {}  # head -> (status or 0: not simple, length)
_req_cache: dict[bytes, tuple[bytes, bytes, bytes] | None] = {}  # head -> method, target, host


def match_simple_response(data: bytes) -> int | None:
    """The status of `data` if it is exactly one whole HTTP/1.1 response with a
    Content-Length, a body, and nothing to rewrite (the proxy's fast path); else None.
    Never raises: anything else goes through `parse_response`."""
    end = data.find(b"\r\n\r\n", 0, 65536)
    if end < 0:
        return None
    end += 4
    head = bytes(data[:end])
    hit = _resp_cache.get(head)
    if hit is None:
        m = _RESPONSE_FAST_RE.match(head)
        if m is None or m.end() != end:
            hit = (0, 0)
        else:
            code, cl = m.group(1, 2)
            hit = (0 if code == b"204" or code == b"304" else int(code), int(cl))
        if end <= _CACHE_HEAD_MAX:
            if len(_resp_cache) >= _CACHE_MAX:
                _resp_cache.clear()
            _resp_cache[head] = hit
    status, length = hit
    if not status or end + length != len(data):
        return None
    return status


def parse_response(
    buf: bytes | bytearray, request_method: bytes, upgrading: bool = False,
    max_head: int = 65536,
) -> ResponseHead | None:
    """Parse a response head at the start of `buf`; `None` if not complete yet.
    Errors carry status 502."""
    if request_method != b"HEAD":
        m = _RESPONSE_FAST_RE.match(buf)
        if m is not None and m.end() <= max_head:
            end = m.end()
            code, cl = m.group(1, 2)
            h = ResponseHead()
            h.raw = buf if end == len(buf) and type(buf) is bytes else bytes(buf[:end])
            h.end = end
            h.version = 11
            status = h.status = int(code)
            if status == 204 or status == 304:
                _simple(h, BODY_NONE, 0)
            else:
                _simple(h, BODY_LENGTH, int(cl))
            return h
    m = _RESPONSE_RE.match(buf)
    if m is None:
        if len(buf) >= 13 and not _STATUS_PREFIX_RE.match(buf):
            raise LocalProtocolError(502, "malformed_response")
        _incomplete(buf, max_head, "response", 502)
        return None
    end = m.end()
    if end > max_head:
        raise LocalProtocolError(502, "response_too_large")
    raw = bytes(buf[:end]) if end != len(buf) or type(buf) is not bytes else buf
    h = ResponseHead()
    h.raw = raw
    h.end = end
    minor, code = m.group(1, 2)
    h.version = 11 if minor == b"1" else 10
    status = h.status = int(code)
    fields = _INTERESTING_RE.findall(raw.lower(), 12)
    other = _framing(h, fields, False)
    keep = _KEEP_UPGRADE if (upgrading and status == 101) else _EMPTY
    _conn, close = _connection_options(h, other, keep)
    if status < 200 or status in (204, 304) or request_method == b"HEAD":
        if status < 200 and h.body != BODY_UNTIL_CLOSE:
            raise LocalProtocolError(502, "body_on_informational_response")
        h.body = BODY_NONE
        h.content_length = 0
    elif h.body == BODY_UNTIL_CLOSE:
        close = True
    h.close = close
    h.needs_rewrite = bool(
        close
        or h.drop
        or not other.keys().isdisjoint(_REWRITE_TRIGGERS)
        or (b"upgrade" in other and not keep)
        or h.version == 10  # a proxy sends its own version: the status line says 1.1
    )
    return h


_STATUS_PREFIX_RE = re.compile(rb"HTTP/1\.[01] [1-9][0-9][0-9][ \r]")


def rewrite_head(
    head: _Head,
    strip_mesh: bool,
    keep_upgrade: bool = False,
    add: bytes = b"",
    line: bytes = b"",
) -> bytes:
    """Rebuild `head.raw` without hop-by-hop fields (and `meshlet-*` when `strip_mesh`),
    appending the already-formatted field lines `add` (each ending in CRLF); `line`
    replaces the start line."""
    raw = head.raw
    first = raw.find(b"\r\n") + 2
    line = line or raw[:first]
    if head.version == 10 and isinstance(head, ResponseHead):
        line = b"HTTP/1.1" + line[8:]
    out = [line]
    drop = head.drop
    pos = first
    end = len(raw) - 2
    while pos < end:
        nl = raw.index(b"\r\n", pos) + 2
        colon = raw.index(b":", pos)
        lname = raw[pos:colon].lower()
        if lname in _HOP_BY_HOP or lname in drop:
            if keep_upgrade and lname in (b"connection", b"upgrade"):
                out.append(b"Connection: upgrade\r\n" if lname == b"connection"
                           else raw[pos:nl])
        elif not (lname.startswith(b"meshlet-") and strip_mesh):
            out.append(raw[pos:nl])
        pos = nl
    if add:
        out.append(add)
    out.append(b"\r\n")
    return b"".join(out)


class ChunkedFramer:
    """Finds the end of a chunked body in a stream of bytes, validating every chunk-size
    line and the trailer section, without copying the data.

    `feed(data, start)` returns the index in `data` just past what belongs to the body,
    and sets `done` when the final CRLF after the trailers has been seen.
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailer_bytes", "done", "max_line")

    _SIZE: Final = 0  # reading a chunk-size line
    _DATA: Final = 1  # inside chunk data
    _DATA_CRLF: Final = 2  # expecting CRLF after data
    _TRAILER: Final = 3  # reading trailer lines

    def __init__(self, max_line: int = 4096, max_trailer: int = 16384) -> None:
        self._state = 0
        self._remaining = 0
        self._line = b""
        self._trailer_bytes = max_trailer
        self.done = False
        self.max_line = max_line

    def feed(self, data: bytes | bytearray, start: int = 0) -> int:
        pos = start
        n = len(data)
        while pos < n and not self.done:
            st = self._state
            if st == 1:
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = 2
                    self._line = b""
            elif st == 2:
                need = 2 - len(self._line)
                self._line += bytes(data[pos:pos + need])
                pos += min(need, n - pos)
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise LocalProtocolError(400, "invalid_chunk")
                    self._state = 0
                    self._line = b""
            else:
                nl = _find_lf(data, pos, n)
                if nl < 0:
                    self._line += bytes(data[pos:n])
                    pos = n
                    if len(self._line) > self.max_line:
                        raise LocalProtocolError(400, "chunk_line_too_long")
                    break
                line = self._line + bytes(data[pos:nl + 1])
                pos = nl + 1
                self._line = b""
                if len(line) > self.max_line:
                    raise LocalProtocolError(400, "chunk_line_too_long")
                if st == 0:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
        return pos

    def _size_line(self, line: bytes) -> None:
        m = _CHUNK_SIZE_RE.fullmatch(line)
        if m is None:
            raise LocalProtocolError(400, "invalid_chunk_size")
        size = int(m.group(1), 16)
        if size == 0:
            self._state = 3
        else:
            self._remaining = size
            self._state = 1

    def _trailer_line(self, line: bytes) -> None:
        if line == b"\r\n":
            self.done = True
            return
        self._trailer_bytes -= len(line)
        if self._trailer_bytes < 0:
            raise LocalProtocolError(431, "trailers_too_large")
        if not _TRAILER_LINE_RE.fullmatch(line):
            raise LocalProtocolError(400, "invalid_trailer")


_CHUNK_EXT = rb"(?:[ \t]*;[ \t]*" + _TCHAR + rb"+(?:[ \t]*=[ \t]*(?:" + _TCHAR + \
    rb"+|\"(?:[^\"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t \x21-\x7e\x80-\xff])*\"))?)*"
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})" + _CHUNK_EXT + rb"\r\n")
_TRAILER_LINE_RE = re.compile(_FIELD_LINE)


def _find_lf(data: bytes | bytearray, start: int, end: int) -> int:
    return data.find(b"\n", start, end)
