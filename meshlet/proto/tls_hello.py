"""A sans-I/O reader of the TLS ClientHello: just enough to route a connection.

The inbound proxy must tell mesh TLS (ALPN `meshlet/...`, terminated with mTLS) from an
application's own TLS (passed through untouched) before it answers anything, so it reads
the SNI and ALPN of the first handshake message.

Rules:
1. `parse_client_hello(buf)` returns None while the record or message is incomplete, a
   `ClientHello` when complete, and raises `ValueError` when the bytes cannot be one.
2. Only the first handshake message is read, which may span several records; every
   length is checked against its container before use, and the total is bounded
   (`MAX_HELLO`).
"""

from __future__ import annotations

import dataclasses

__all__ = ["MAX_HELLO", "ClientHello", "parse_client_hello"]

MAX_HELLO = 16384 + 5  # TLS 1.3 allows one record; extensions make it rarely > 2 KB

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SNI = 0x0000
_EXT_ALPN = 0x0010
_EXT_VERSIONS = 0x002B


@dataclasses.dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None
    alpn: tuple[str, ...]
    tls13: bool  # offers TLS 1.3 (supported_versions)


def _handshake_bytes(buf: bytes) -> bytes:
    """The payloads of the leading handshake records (the last one maybe partial), up
    to the end of the first handshake message."""
    out = b""
    pos = 0
    while pos + 5 <= len(buf):
        if buf[pos] != _HANDSHAKE or buf[pos + 1] != 0x03:
            raise ValueError("not a TLS handshake record")
        n = int.from_bytes(buf[pos + 3:pos + 5], "big")
        if n == 0 or n > 16384:
            raise ValueError("bad TLS record length")
        out += buf[pos + 5:pos + 5 + n]
        pos += 5 + n
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break
    return out


def parse_client_hello(buf: bytes) -> ClientHello | None:
    if len(buf) > MAX_HELLO * 2:
        raise ValueError("ClientHello too large")
    hs = _handshake_bytes(buf)
    if len(hs) < 4:
        return None
    if hs[0] != _CLIENT_HELLO:
        raise ValueError("first handshake message is not a ClientHello")
    n = int.from_bytes(hs[1:4], "big")
    if n > MAX_HELLO:
        raise ValueError("ClientHello too large")
    if len(hs) < 4 + n:
        return None
    return _parse_body(hs[4:4 + n])


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated ClientHello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vec(self, len_bytes: int) -> bytes:
        return self.take(self.uint(len_bytes))


def _parse_body(body: bytes) -> ClientHello:
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vec(1)  # legacy_session_id
    r.vec(2)  # cipher_suites
    r.vec(1)  # legacy_compression_methods
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    tls13 = False
    if r.pos == len(body):
        return ClientHello(None, (), False)
    exts = _Reader(r.vec(2))
    seen: set[int] = set()
    while exts.pos < len(exts.data):
        kind = exts.uint(2)
        data = _Reader(exts.vec(2))
        if kind in seen:
            raise ValueError("duplicate extension in ClientHello")
        seen.add(kind)
        if kind == _EXT_SNI:
            names = _Reader(data.vec(2))
            while names.pos < len(names.data):
                name_type = names.uint(1)
                name = names.vec(2)
                if name_type == 0 and sni is None:
                    sni = name.decode("ascii", "strict")
        elif kind == _EXT_ALPN:
            protos = _Reader(data.vec(2))
            out = []
            while protos.pos < len(protos.data):
                p = protos.vec(1)
                if not p:
                    raise ValueError("empty ALPN protocol name")
                out.append(p.decode("ascii", "replace"))
            alpn = tuple(out)
        elif kind == _EXT_VERSIONS:
            versions = data.vec(1)
            tls13 = any(versions[i:i + 2] == b"\x03\x04" for i in range(0, len(versions), 2))
    return ClientHello(sni, alpn, tls13)
