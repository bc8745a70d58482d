"""Protocol detection from the first bytes a client sends.

Rules:
1. Detection is pure: `detect(buf)` looks only at the bytes given and returns a
   `Proto`, or `None` when more bytes are needed to decide.
2. A decision never depends on bytes past `MAX_DETECT_BYTES`; at that point anything
   still undecided is opaque TCP.
3. HTTP/1 is recognised by a method token followed by a space. A known method decides at
   once (the HTTP/1 parser then judges the rest, so malformed requests get a 400 rather
   than being tunnelled); an unknown token waits for the first line and needs it to end
   in ` HTTP/1.0` or ` HTTP/1.1`.
"""

from __future__ import annotations

import enum
import re

__all__ = ["H2_PREFACE", "MAX_DETECT_BYTES", "Proto", "detect"]


class Proto(enum.Enum):
    HTTP1 = "http/1"
    HTTP2 = "h2"
    TLS = "tls"
    OPAQUE = "opaque"


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_DETECT_BYTES = 8192
_MAX_METHOD = 31

_KNOWN_METHODS = (
    b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"TRACE ",
    b"CONNECT ",
)
_TOKEN_PREFIX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_FIRST_LINE_HTTP1 = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/1\.[01]\r?\n")


def detect(buf: bytes | bytearray) -> Proto | None:
    """Classify the start of a client's byte stream; `None` means "need more bytes"."""
    n = len(buf)
    if n == 0:
        return None
    b0 = buf[0]
    if b0 == 0x16:  # TLS handshake record: 0x16 0x03 0x0[0-4], then a ClientHello (1)
        if n < 6:
            if n >= 2 and buf[1] != 0x03:
                return Proto.OPAQUE
            if n >= 3 and buf[2] > 0x04:
                return Proto.OPAQUE
            return None
        if buf[1] == 0x03 and buf[2] <= 0x04 and buf[5] == 0x01:
            return Proto.TLS
        return Proto.OPAQUE
    if b0 == 0x50 and H2_PREFACE.startswith(bytes(buf[:24])):  # 'P'
        if n >= len(H2_PREFACE):
            return Proto.HTTP2
        return None if H2_PREFACE.startswith(bytes(buf)) else _http1_or_opaque(buf)
    return _http1_or_opaque(buf)


def _http1_or_opaque(buf: bytes | bytearray) -> Proto | None:
    head = bytes(buf[:9])
    for m in _KNOWN_METHODS:
        if head.startswith(m):
            return Proto.HTTP1
        if m.startswith(head):  # a prefix of a known method: wait
            return None
    tok = _TOKEN_PREFIX.match(buf)
    assert tok is not None
    end = tok.end()
    if end == 0:
        return Proto.OPAQUE
    if end > _MAX_METHOD:  # no method is this long: decided whatever follows
        return Proto.OPAQUE
    if end == len(buf):  # still inside the first token
        return None
    if buf[end] != 0x20:
        return Proto.OPAQUE
    nl = buf.find(b"\n", 0, MAX_DETECT_BYTES)
    if nl < 0:
        return None if len(buf) < MAX_DETECT_BYTES else Proto.OPAQUE
    return Proto.HTTP1 if _FIRST_LINE_HTTP1.match(buf, 0, nl + 1) else Proto.OPAQUE
