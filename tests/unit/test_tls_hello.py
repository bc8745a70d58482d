"""ClientHello reading, on real ClientHellos made by Python's ssl module (no sockets)."""

from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.proto.tls_hello import parse_client_hello


def client_hello(alpn: list[str] | None = None, sni: str | None = "web.example",
                 max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_alpn_sni_and_version() -> None:
    hello = client_hello(["meshlet/h1", "http/1.1"])
    ch = parse_client_hello(hello)
    assert ch is not None
    assert ch.alpn == ("meshlet/h1", "http/1.1")
    assert ch.server_name == "web.example"
    assert ch.tls13


def test_without_alpn_or_sni() -> None:
    ch = parse_client_hello(client_hello(None, None))
    assert ch is not None and ch.alpn == () and ch.server_name is None


def test_tls12_only_client() -> None:
    ch = parse_client_hello(client_hello(["h2"], max_version=ssl.TLSVersion.TLSv1_2))
    assert ch is not None and not ch.tls13 and ch.alpn == ("h2",)


def test_every_prefix_is_incomplete() -> None:
    hello = client_hello(["meshlet/h1"])
    for i in range(len(hello)):
        assert parse_client_hello(hello[:i]) is None, i
    assert parse_client_hello(hello) is not None


def test_split_across_records() -> None:
    hello = client_hello(["meshlet/tcp"])
    body = hello[5:]
    recs = b"".join(
        b"\x16\x03\x01" + len(body[i:i + 100]).to_bytes(2, "big") + body[i:i + 100]
        for i in range(0, len(body), 100)
    )
    ch = parse_client_hello(recs)
    assert ch is not None and ch.alpn == ("meshlet/tcp",)


@pytest.mark.parametrize("data", [
    b"\x17\x03\x03\x00\x10" + b"\x00" * 16,  # application data, not a handshake
    b"\x16\x03\x01\x00\x00",  # empty record
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
])
def test_not_a_client_hello(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_client_hello(data)


def test_inner_lengths_past_the_message_are_refused() -> None:
    hello = bytearray(client_hello(["meshlet/h1"]))
    pos = 5 + 4 + 2 + 32  # record header, handshake header, version, random
    pos += 1 + hello[pos]  # session id
    pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher suites
    pos += 1 + hello[pos]  # compression methods
    ext_len = int.from_bytes(hello[pos:pos + 2], "big")
    assert pos + 2 + ext_len == len(hello)  # the extensions end the message
    hello[pos:pos + 2] = (ext_len + 10).to_bytes(2, "big")
    with pytest.raises(ValueError, match="truncated"):
        parse_client_hello(bytes(hello))


@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    # Anything but a ClientHello, a None (incomplete) or a ValueError fails the test.
    with contextlib.suppress(ValueError):
        parse_client_hello(b"\x16\x03\x01" + data)
