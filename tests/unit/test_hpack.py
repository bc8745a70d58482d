"""HPACK: RFC 7541 Appendix C byte for byte, round trips, caches and the bomb limits."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.proto import hpack as hp
from meshlet.proto.hpack import (
    CompressionError,
    Decoder,
    Encoder,
    HeaderListTooLarge,
    huffman_decode,
    huffman_encode,
)

REQ1 = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
        (b":authority", b"www.example.com")]
REQ2 = [*REQ1, (b"cache-control", b"no-cache")]
REQ3 = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
        (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]
RESP1 = [(b":status", b"302"), (b"cache-control", b"private"),
         (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"location", b"https://www.example.com")]
RESP2 = [(b":status", b"307"), *RESP1[1:]]
RESP3 = [(b":status", b"200"), (b"cache-control", b"private"),
         (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"), (b"location", b"https://www.example.com"),
         (b"content-encoding", b"gzip"),
         (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")]

C3 = [  # C.3 (plain) and C.4 (Huffman): (block, headers, table newest first, size)
    ("828684410f7777772e6578616d706c652e636f6d", REQ1,
     [(b":authority", b"www.example.com")], 57),
    ("828684be58086e6f2d6361636865", REQ2,
     [(b"cache-control", b"no-cache"), (b":authority", b"www.example.com")], 110),
    ("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565", REQ3,
     [(b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"),
      (b":authority", b"www.example.com")], 164),
]
C4 = ["828684418cf1e3c2e5f23a6ba0ab90f4ff", "828684be5886a8eb10649cbf",
      "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]
C5 = [  # C.5 (plain) and C.6 (Huffman), table size 256: evictions
    ("4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a3231"
     "20474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d", RESP1,
     [RESP1[3], RESP1[2], RESP1[1], RESP1[0]], 222),
    ("4803333037c1c0bf", RESP2, [RESP2[0], RESP1[3], RESP1[2], RESP1[1]], 222),
    ("88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a6970"
     "7738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d61"
     "67653d333630303b2076657273696f6e3d31", RESP3, [RESP3[5], RESP3[4], RESP3[2]], 215),
]
C6 = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad1718"
    "63c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7"
    "b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    hp._BLOCK_CACHE.clear()
    hp._HUFFMAN_CACHE.clear()
    hp._FIELD_CACHE.clear()


def test_static_table_is_rfc_appendix_a() -> None:
    assert len(hp.STATIC_TABLE) == 62
    assert hp.STATIC_TABLE[1] == (b":authority", b"")
    assert hp.STATIC_TABLE[2] == (b":method", b"GET")
    assert hp.STATIC_TABLE[8] == (b":status", b"200")
    assert hp.STATIC_TABLE[61] == (b"www-authenticate", b"")
    hpack = pytest.importorskip("hpack")
    assert tuple(hp.STATIC_TABLE[1:]) == tuple(hpack.table.HeaderTable.STATIC_TABLE)


@pytest.mark.parametrize(
    ("block", "headers", "size"),
    [
        ("400a637573746f6d2d6b65790d637573746f6d2d686561646572",
         [(b"custom-key", b"custom-header")], 55),
        ("040c2f73616d706c652f70617468", [(b":path", b"/sample/path")], 0),
        ("100870617373776f726406736563726574", [(b"password", b"secret")], 0),
        ("82", [(b":method", b"GET")], 0),
    ],
)
def test_c2_literals(block: str, headers: list[tuple[bytes, bytes]], size: int) -> None:
    d = Decoder()
    assert list(d.decode(bytes.fromhex(block))) == headers
    assert d.table_size == size
    assert d.table == (headers if size else [])


@pytest.mark.parametrize("huffman", [False, True])
def test_c3_c4_requests(huffman: bool) -> None:
    d = Decoder()
    for i, (plain, headers, table, size) in enumerate(C3):
        block = C4[i] if huffman else plain
        assert list(d.decode(bytes.fromhex(block))) == headers
        assert d.table == table
        assert d.table_size == size


@pytest.mark.parametrize("huffman", [False, True])
def test_c5_c6_responses_with_eviction(huffman: bool) -> None:
    d = Decoder(max_table_size=256)
    for i, (plain, headers, table, size) in enumerate(C5):
        block = C6[i] if huffman else plain
        assert list(d.decode(bytes.fromhex(block))) == headers
        assert d.table == table
        assert d.table_size == size


def test_huffman_rfc_strings() -> None:
    for text, coded in [
        (b"www.example.com", "f1e3c2e5f23a6ba0ab90f4ff"),
        (b"no-cache", "a8eb10649cbf"),
        (b"custom-key", "25a849e95ba97d7f"),
        (b"custom-value", "25a849e95bb8e8b4bf"),
        (b"302", "6402"),
        (b"private", "aec3771a4b"),
    ]:
        assert huffman_encode(text) == bytes.fromhex(coded)
        assert huffman_decode(bytes.fromhex(coded)) == text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_huffman_round_trip(data: bytes) -> None:
    coded = huffman_encode(data)
    assert huffman_decode(coded) == data
    hpack = pytest.importorskip("hpack")
    ref = hpack.huffman.HuffmanEncoder(
        hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH
    )
    assert coded == ref.encode(data)


def test_huffman_errors() -> None:
    with pytest.raises(CompressionError):  # EOS inside the string (h2spec)
        Decoder().decode(bytes.fromhex("0085f2b24a84ff874951fffffffa7f"))
    with pytest.raises(CompressionError):  # padding of 8 bits
        huffman_decode(huffman_encode(b"a") + b"\xff")
    with pytest.raises(CompressionError):  # padding not all ones: 'a' is 00011, pad 000
        huffman_decode(b"\x18")


def test_integer_bounds() -> None:
    with pytest.raises(CompressionError, match="too large"):
        Decoder().decode(b"\xff" + b"\xff" * 6 + b"\x01")
    with pytest.raises(CompressionError, match="truncated"):
        Decoder().decode(b"\xff\xff")
    with pytest.raises(CompressionError):
        Decoder().decode(b"\x80")  # index 0
    with pytest.raises(CompressionError, match="beyond"):
        Decoder().decode(b"\xbe")  # index 62, empty dynamic table
    with pytest.raises(CompressionError, match="truncated"):
        Decoder().decode(b"\x04\x0c/sample")


def test_size_update_rules() -> None:
    d = Decoder(max_table_size=4096)
    d.decode(bytes.fromhex(C3[0][0]))
    assert d.table_size == 57
    # An update to 0 then back to 4096 at the start evicts everything.
    assert list(d.decode(b"\x20\x3f\xe1\x1f\x82")) == [(b":method", b"GET")]
    assert d.table_size == 0 and d.table_max_size == 4096
    with pytest.raises(CompressionError, match="after a field"):
        Decoder().decode(b"\x82\x20")
    with pytest.raises(CompressionError, match="above the advertised"):
        Decoder(max_table_size=256).decode(b"\x3f\xe2\x01")  # 257 + ...
    d = Decoder(max_table_size=100)
    assert d.table_max_size == 100
    d.set_max_allowed_table_size(0)
    assert d.table_max_size == 0


def test_entry_larger_than_table_empties_it() -> None:
    d = Decoder(max_table_size=64)
    d.decode(b"\x40\x01a\x01b")
    assert d.table_size == 34
    d.decode(b"\x40\x01a" + b"\x30" + b"x" * 48)
    assert d.table == [] and d.table_size == 0


def test_hpack_bomb_refused_at_the_list_limit() -> None:
    # One 4000-byte entry, then a block that references it 10,000 times: 40 MB decoded.
    d = Decoder(max_header_list_size=16384)
    big = b"v" * 4000
    d.decode(b"\x40\x01x" + hp._encode_int(4000, 7, 0) + big)
    assert d.table_size == 4033
    with pytest.raises(HeaderListTooLarge) as info:
        d.decode(b"\xbe" * 10_000)
    # Stopped just past the limit: 4 entries fit, the fifth tripped it.
    assert 16384 < info.value.size <= 16384 + 4033
    # The context is intact: the next block still decodes.
    assert list(d.decode(b"\xbe")) == [(b"x", big)]


def test_list_too_large_keeps_the_table_in_sync() -> None:
    d = Decoder(max_header_list_size=100)
    block = (b"\x00\x01a" + hp._encode_int(200, 7, 0) + b"z" * 200  # too large, skipped
             + b"\x40\x01k\x01v")  # inserted after the limit: still processed
    with pytest.raises(HeaderListTooLarge):
        d.decode(block)
    assert d.table == [(b"k", b"v")]


def test_max_string_length() -> None:
    d = Decoder(max_string_length=10, max_header_list_size=10**6)
    with pytest.raises(HeaderListTooLarge):
        d.decode(b"\x00\x01a\x0b" + b"x" * 11)
    assert d.decode(b"\x00\x01a\x0a" + b"x" * 10) == ((b"a", b"x" * 10),)


def test_block_caches_are_sound() -> None:
    static_only = b"\x82\x86\x84\x04\x0c/sample/path"
    a, b = Decoder(), Decoder()
    first = a.decode(static_only)
    assert b.decode(static_only) is first  # shared: no dynamic table involved
    # A block that references the dynamic table is cached per decoder and version.
    d = Decoder()
    d.decode(bytes.fromhex(C3[0][0]))
    ref = b"\x82\x86\x84\xbe"
    r1 = d.decode(ref)
    assert d.decode(ref) is r1
    d.decode(b"\x40\x01a\x01b")  # the table changes: index 62 is now a: b
    assert list(d.decode(ref))[-1] == (b"a", b"b")
    # A cached block still obeys a lower limit.
    d.max_header_list_size = 50
    with pytest.raises(HeaderListTooLarge):
        d.decode(static_only)


def test_encoder_static_and_literals() -> None:
    e = Encoder()
    assert e.encode([(b":method", b"GET"), (b":status", b"200")]) == b"\x82\x88"
    assert e.encode([(b":path", b"/x")]) == b"\x04\x02/x"
    assert e.encode([(b"x-a", b"1")]) == b"\x00\x03x-a\x011"
    # Never indexed, static name 23 (a 4-bit prefix: 15 + 8).
    assert e.encode([(b"authorization", b"t")]) == b"\x1f\x08\x01t"
    e.set_max_table_size(0)
    assert e.encode([(b":method", b"GET")]) == b"\x20\x82"
    assert e.encode([(b":method", b"GET")]) == b"\x82"


_NAME = st.binary(min_size=1, max_size=20)
_FIELDS = st.lists(st.tuples(st.one_of(_NAME, st.sampled_from(
    [n for n, _ in hp.STATIC_TABLE[1:]])), st.binary(max_size=300)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(_FIELDS, st.booleans())
def test_round_trip_and_cross_check(fields: list[tuple[bytes, bytes]], huffman: bool) -> None:
    block = Encoder(huffman=huffman).encode(fields)
    assert list(Decoder().decode(block)) == fields
    hpack = pytest.importorskip("hpack")
    assert hpack.Decoder().decode(block, raw=True) == fields
    # The reference encoder indexes everything: two blocks through one context.
    ref = hpack.Encoder()
    d = Decoder()
    for _ in range(2):
        assert list(d.decode(ref.encode(fields, huffman=huffman))) == fields


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_hpack_errors(data: bytes) -> None:
    with contextlib.suppress(CompressionError, HeaderListTooLarge):
        Decoder(max_header_list_size=2000).decode(data)
