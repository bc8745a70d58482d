"""HPACK (RFC 7541) for the proxy's HTTP/2 codec: a bounded decoder and a stateless encoder.

This module owns the header compression context of one direction of one connection. It
is a pure codec: it checks the *encoding* (indices, lengths, Huffman padding, table size
updates) and the size limits; whether a decoded field is a valid HTTP field (lowercase
name, no NUL/CR/LF in a value, pseudo-header order) is checked by `http2.py`, which knows
whether the block is a request, a response or trailers (RFC 9113 section 8.2).

Rules:
1. Every error is final for the connection's compression context: `CompressionError`
   (answer with GOAWAY COMPRESSION_ERROR), except `HeaderListTooLarge`, which is raised
   only *after* the whole block was processed, so the dynamic table stays in sync with
   the peer's and the connection may go on (RFC 9113 section 10.5.1 allows refusing the
   one stream). Once the list size limit is passed no more fields are kept; later
   literals that are not inserted in the table are skipped without being decoded.
2. Limits against bombs: the decoded list size (sum of name + value + 32, as for
   SETTINGS_MAX_HEADER_LIST_SIZE) is checked field by field, so a block that references
   one large table entry many times stops at the limit; a raw string's length is checked
   before it is sliced and a Huffman string cannot expand more than 8/5 of its bytes;
   integers have at most 5 continuation bytes; the dynamic table holds at most
   `max_table_size` octets as RFC 7541 counts them (entry bytes + 32 each), the size we
   advertise, and a size update above it is an error. Size updates are accepted only at
   the start of a block.
3. Decoding is cached by the raw block bytes when that is sound: a block that neither
   inserts into nor resizes the dynamic table decodes the same every time if it only
   uses the static table (shared cache, all connections) or if the dynamic table has not
   changed since (per-decoder cache tagged with a table version). Peers that index their
   headers send exactly such blocks from the second request on.
4. Huffman strings are decoded with a byte-wise state table (state = node of the code
   tree, 256 internal nodes; a row of 256 transitions is built the first time a state is
   reached) and the decoded strings are cached by their encoded bytes.
5. The encoder never inserts into the dynamic table: each field is an indexed static
   entry, or a literal without indexing (never indexed for credentials) with a static
   name index when one exists. A field's encoding is then independent of any state and
   is cached per (name, value) for all connections. Huffman coding is optional (off by
   default: it saves about a fifth of the header bytes and costs CPU per field). A
   reduced SETTINGS_HEADER_TABLE_SIZE from the peer is acknowledged with a size update
   at the start of the next block.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = [
    "STATIC_TABLE",
    "CompressionError",
    "Decoder",
    "Encoder",
    "HPACKError",
    "HeaderListTooLarge",
    "huffman_decode",
    "huffman_encode",
]

Header = tuple[bytes, bytes]


class HPACKError(Exception):
    """Base of the errors raised while decoding a header block."""


class CompressionError(HPACKError):
    """The block is not valid HPACK: a connection error of type COMPRESSION_ERROR."""


class HeaderListTooLarge(HPACKError):
    """The decoded list exceeds the limit; the block was still fully processed, so the
    compression context is intact and only the stream need be refused."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"header list of at least {size} octets exceeds {limit}")
        self.size = size
        self.limit = limit


# RFC 7541 Appendix B: (code, bit length) per symbol 0..255, then EOS (256).
_HUFFMAN_CODES: Final[tuple[tuple[int, int], ...]] = (
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28),
    (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24),
    (0x3ffffffc, 30), (0xfffffe9, 28), (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28),
    (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28),
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28), (0xffffff4, 28),
    (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10),
    (0xffa, 12), (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11),
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11), (0xfa, 8),
    (0x16, 6), (0x17, 6), (0x18, 6), (0x0, 5), (0x1, 5),
    (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6), (0x1c, 6),
    (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13),
    (0x21, 6), (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7),
    (0x61, 7), (0x62, 7), (0x63, 7), (0x64, 7), (0x65, 7),
    (0x66, 7), (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7),
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7), (0x6f, 7),
    (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
    (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14),
    (0x22, 6), (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5),
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6), (0x27, 6),
    (0x6, 5), (0x74, 7), (0x75, 7), (0x28, 6), (0x29, 6),
    (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7), (0x2c, 6),
    (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11),
    (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22),
    (0xfffe7, 20), (0xfffe8, 20), (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22),
    (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23),
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23), (0xffffec, 24),
    (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23),
    (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22),
    (0x7fffe5, 23), (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24),
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22),
    (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21), (0x7fffea, 23), (0x3fffdd, 22),
    (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23),
    (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20),
    (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22), (0x7ffff0, 23), (0x3fffe5, 22),
    (0x3fffe6, 22), (0x7ffff1, 23), (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20),
    (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25),
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27), (0x7ffffdf, 27),
    (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19), (0x1fffe3, 21),
    (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27),
    (0xfffff2, 24), (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26),
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20),
    (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21), (0x3fffe9, 22), (0x1fffe7, 21),
    (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25),
    (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27),
    (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28),
    (0x7ffffec, 27), (0x7ffffed, 27), (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27),
    (0x3ffffee, 26), (0x3fffffff, 30),
)
# RFC 7541 Appendix A (name, value), indices 1..61.
_STATIC_TABLE: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)

# RFC 7541 Appendix A, indices 1..61; index 0 is a placeholder so the table is 1-based.
STATIC_TABLE: Final = (b"", b""), *_STATIC_TABLE
_STATIC_LEN: Final = 61
_ENTRY_OVERHEAD: Final = 32
_MAX_INT_BYTES: Final = 5  # continuation bytes: up to 2**35, far above any limit

# -- Huffman ---------------------------------------------------------------------------

# The code tree: node 0 is the root; children[node] = [zero, one], a leaf is ~symbol.
_children: list[list[int]] = [[0, 0]]
for _sym, (_code, _bits) in enumerate(_HUFFMAN_CODES):
    _node = 0
    for _i in range(_bits - 1, -1, -1):
        _bit = (_code >> _i) & 1
        if _i == 0:
            _children[_node][_bit] = ~_sym
        else:
            if _children[_node][_bit] == 0:
                _children.append([0, 0])
                _children[_node][_bit] = len(_children) - 1
            _node = _children[_node][_bit]
_CHILDREN: Final = tuple(tuple(c) for c in _children)
del _children, _sym, _code, _bits, _node, _i, _bit
# A string may end only at the root or within the first 7 bits of EOS (all ones).
_ACCEPTING: list[bool] = [False] * len(_CHILDREN)
_node = 0
for _ in range(8):
    _ACCEPTING[_node] = True
    _node = _CHILDREN[_node][1]
del _node

# Byte-wise transitions: _ROWS[state][byte] = (next_state, decoded bytes), or None for a
# byte that decodes EOS (an error). Rows are built on first use (about 0.3 ms each).
_Row = tuple[tuple[int, bytes] | None, ...]
_ROWS: list[_Row | None] = [None] * len(_CHILDREN)
_INTERN: dict[tuple[int, bytes], tuple[int, bytes]] = {}


def _build_row(state: int) -> _Row:
    row: list[tuple[int, bytes] | None] = []
    for byte in range(256):
        node = state
        out = bytearray()
        ok = True
        for i in range(7, -1, -1):
            node = _CHILDREN[node][(byte >> i) & 1]
            if node < 0:
                sym = ~node
                if sym == 256:
                    ok = False
                    break
                out.append(sym)
                node = 0
        if ok:
            entry = (node, bytes(out))
            row.append(_INTERN.setdefault(entry, entry))
        else:
            row.append(None)
    built = tuple(row)
    _ROWS[state] = built
    return built


_HUFFMAN_CACHE: dict[bytes, bytes] = {}
_HUFFMAN_CACHE_MAX: Final = 2048
_HUFFMAN_CACHE_MAX_LEN: Final = 256


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string (RFC 7541 section 5.2); `CompressionError` on EOS,
    on padding longer than 7 bits or not all ones."""
    cached = _HUFFMAN_CACHE.get(data)
    if cached is not None:
        return cached
    rows = _ROWS
    state = 0
    row = rows[0] or _build_row(0)
    out = bytearray()
    for byte in data:
        entry = row[byte]
        if entry is None:
            raise CompressionError("EOS in a Huffman string")
        state, chunk = entry
        if chunk:
            out += chunk
        row = rows[state] or _build_row(state)
    if not _ACCEPTING[state]:
        raise CompressionError("invalid Huffman padding")
    result = bytes(out)
    if len(data) <= _HUFFMAN_CACHE_MAX_LEN:
        if len(_HUFFMAN_CACHE) >= _HUFFMAN_CACHE_MAX:
            _HUFFMAN_CACHE.clear()
        _HUFFMAN_CACHE[data] = result
    return result


def huffman_encode(data: bytes) -> bytes:
    """Huffman-code `data`, padded with the most significant bits of EOS."""
    acc = 0
    nbits = 0
    codes = _HUFFMAN_CODES
    for byte in data:
        code, bits = codes[byte]
        acc = (acc << bits) | code
        nbits += bits
    pad = -nbits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((nbits + pad) // 8, "big")


# -- integers and strings --------------------------------------------------------------


def _int_tail(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """Continue an integer whose prefix was all ones (`value`), from `pos`."""
    shift = 0
    end = min(len(data), pos + _MAX_INT_BYTES)
    while pos < end:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    if pos >= len(data):
        raise CompressionError("truncated integer")
    raise CompressionError("integer too large")


def _encode_int(value: int, prefix_bits: int, flags: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# -- decoder ---------------------------------------------------------------------------

_BLOCK_CACHE: dict[bytes, tuple[tuple[Header, ...], int]] = {}
_BLOCK_CACHE_MAX: Final = 512
_CACHEABLE_BLOCK: Final = 512  # bytes
_DECODER_CACHE_MAX: Final = 64


class Decoder:
    """The decoding context of one connection (the peer's encoder writes into it).

    `max_table_size` is the SETTINGS_HEADER_TABLE_SIZE we advertise (the most the
    peer may resize the table to), `max_header_list_size` our
    SETTINGS_MAX_HEADER_LIST_SIZE, `max_string_length` a cap on one decoded string.
    """

    __slots__ = (
        "_cache",
        "_max_allowed",
        "_size",
        "_table",
        "_table_max",
        "_version",
        "max_header_list_size",
        "max_string_length",
    )

    def __init__(
        self,
        max_table_size: int = 4096,
        max_header_list_size: int = 65536,
        max_string_length: int = 65536,
    ) -> None:
        # Newest entry last: index 62 is _table[-1].
        self._table: list[Header] = []
        self._size = 0
        self._max_allowed = max_table_size
        # The table starts at the protocol default (RFC 7541 section 4.2 / RFC 9113
        # 6.5.2: 4096) until the peer's encoder sends a size update.
        self._table_max = min(4096, max_table_size)
        self._version = 0
        self._cache: dict[bytes, tuple[int, tuple[Header, ...], int]] = {}
        self.max_header_list_size = max_header_list_size
        self.max_string_length = max_string_length

    @property
    def table_size(self) -> int:
        """The dynamic table's size in RFC 7541 octets (entries + 32 each)."""
        return self._size

    @property
    def table_max_size(self) -> int:
        return self._table_max

    @property
    def table(self) -> list[Header]:
        """The dynamic table, newest entry first (a copy, for tests and debugging)."""
        return self._table[::-1]

    def set_max_allowed_table_size(self, size: int) -> None:
        """Our advertised SETTINGS_HEADER_TABLE_SIZE changed (or was acknowledged)."""
        self._max_allowed = size
        if self._table_max > size:
            self._resize(size)

    def _resize(self, size: int) -> None:
        self._table_max = size
        self._evict(0)
        self._version += 1

    def _evict(self, room: int) -> None:
        table = self._table
        limit = self._table_max - room
        while self._size > limit and table:
            name, value = table.pop(0)
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD

    def _insert(self, name: bytes, value: bytes) -> None:
        self._version += 1
        need = len(name) + len(value) + _ENTRY_OVERHEAD
        if need > self._table_max:
            # Not an error (RFC 7541 section 4.4): the table is just emptied.
            self._table.clear()
            self._size = 0
            return
        self._evict(need)
        self._table.append((name, value))
        self._size += need

    def _lookup(self, index: int) -> Header:
        if index <= _STATIC_LEN:
            if index == 0:
                raise CompressionError("index 0")
            return STATIC_TABLE[index]
        k = index - _STATIC_LEN
        table = self._table
        if k > len(table):
            raise CompressionError(f"index {index} beyond the dynamic table")
        return table[-k]

    def _string(self, data: bytes, pos: int, skip: bool) -> tuple[bytes, int]:
        """Read a string literal at `pos`; with `skip`, return b"" without decoding."""
        try:
            first = data[pos]
        except IndexError:
            raise CompressionError("truncated string") from None
        length = first & 0x7F
        pos += 1
        if length == 0x7F:
            length, pos = _int_tail(data, pos, length)
        end = pos + length
        if end > len(data):
            raise CompressionError("truncated string")
        if skip:
            return b"", end
        if length > self.max_string_length:
            raise HeaderListTooLarge(length, self.max_string_length)
        raw = data[pos:end]
        if first & 0x80:
            raw = huffman_decode(raw)
            if len(raw) > self.max_string_length:
                raise HeaderListTooLarge(len(raw), self.max_string_length)
        return raw, end

    def decode(self, data: bytes) -> tuple[Header, ...]:
        """Decode one complete header block into (name, value) pairs, in order.

        Raises `CompressionError` or `HeaderListTooLarge` (rule 1). The result may be a
        shared cached tuple: do not assume a fresh object.
        """
        limit = self.max_header_list_size
        hit = _BLOCK_CACHE.get(data)
        if hit is not None and hit[1] <= limit:
            return hit[0]
        if self._cache:
            mine = self._cache.get(data)
            if mine is not None and mine[0] == self._version and mine[2] <= limit:
                return mine[1]

        headers: list[Header] = []
        size = 0
        too_large = False
        used_dynamic = False
        version = self._version
        static = STATIC_TABLE
        n = len(data)
        pos = 0
        while pos < n:
            byte = data[pos]
            if byte & 0x80:  # indexed field (6.1)
                index = byte & 0x7F
                pos += 1
                if index == 0x7F:
                    index, pos = _int_tail(data, pos, index)
                if 0 < index <= _STATIC_LEN:
                    field = static[index]
                else:
                    field = self._lookup(index)
                    used_dynamic = True
                if too_large:
                    continue
                size += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
                if size > limit:
                    too_large = True
                else:
                    headers.append(field)
                continue
            if byte & 0x40:  # literal with incremental indexing (6.2.1)
                index = byte & 0x3F
                pos += 1
                if index == 0x3F:
                    index, pos = _int_tail(data, pos, index)
                if index:
                    name = self._lookup(index)[0]
                    used_dynamic = used_dynamic or index > _STATIC_LEN
                else:
                    name, pos = self._string(data, pos, False)
                value, pos = self._string(data, pos, False)
                self._insert(name, value)
            elif byte & 0x20:  # dynamic table size update (6.3)
                if headers or size:
                    raise CompressionError("table size update after a field")
                new, pos = (byte & 0x1F, pos + 1)
                if new == 0x1F:
                    new, pos = _int_tail(data, pos, new)
                if new > self._max_allowed:
                    raise CompressionError(
                        f"table size update {new} above the advertised {self._max_allowed}"
                    )
                self._resize(new)
                continue
            else:  # literal without indexing (6.2.2) or never indexed (6.2.3)
                index = byte & 0x0F
                pos += 1
                if index == 0x0F:
                    index, pos = _int_tail(data, pos, index)
                if index:
                    name = self._lookup(index)[0]
                    used_dynamic = used_dynamic or index > _STATIC_LEN
                else:
                    name, pos = self._string(data, pos, too_large)
                value, pos = self._string(data, pos, too_large)
            if too_large:
                continue
            size += len(name) + len(value) + _ENTRY_OVERHEAD
            if size > limit:
                too_large = True
            else:
                headers.append((name, value))
        if too_large:
            raise HeaderListTooLarge(size, limit)
        result = tuple(headers)
        if self._version == version and n <= _CACHEABLE_BLOCK:
            if not used_dynamic:
                if len(_BLOCK_CACHE) >= _BLOCK_CACHE_MAX:
                    _BLOCK_CACHE.clear()
                _BLOCK_CACHE[data] = (result, size)
            else:
                if len(self._cache) >= _DECODER_CACHE_MAX:
                    self._cache.clear()
                self._cache[data] = (version, result, size)
        return result


# -- encoder ---------------------------------------------------------------------------

_STATIC_FIELDS: Final = {field: i for i, field in reversed(list(enumerate(STATIC_TABLE))) if i}
_STATIC_NAMES: Final = {name: i for i, (name, _) in reversed(list(enumerate(STATIC_TABLE))) if i}
# Credentials are marked never-indexed so that no later hop compresses them (7.1.3).
SENSITIVE: Final = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})

_FIELD_CACHE: dict[tuple[Header, bool], bytes] = {}
_FIELD_CACHE_MAX: Final = 4096
_FIELD_CACHE_MAX_LEN: Final = 256


def _encode_string(data: bytes, huffman: bool) -> bytes:
    if huffman:
        coded = huffman_encode(data)
        if len(coded) < len(data):
            return _encode_int(len(coded), 7, 0x80) + coded
    return _encode_int(len(data), 7, 0) + data


def _encode_field(name: bytes, value: bytes, huffman: bool) -> bytes:
    index = _STATIC_FIELDS.get((name, value))
    if index is not None:
        return _encode_int(index, 7, 0x80)
    flags = 0x10 if name in SENSITIVE else 0x00
    name_index = _STATIC_NAMES.get(name)
    if name_index is not None:
        head = _encode_int(name_index, 4, flags)
    else:
        head = bytes((flags,)) + _encode_string(name, huffman)
    return head + _encode_string(value, huffman)


class Encoder:
    """The encoding side of one connection (rule 5)."""

    __slots__ = ("_pending_update", "huffman")

    def __init__(self, huffman: bool = False) -> None:
        self.huffman = huffman
        self._pending_update: int | None = None

    def set_max_table_size(self, size: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: our table is always empty, but a size
        update at the start of the next block tells the peer we honour a reduction."""
        if size < 4096 or self._pending_update is not None:
            self._pending_update = min(size, 4096)

    def encode(self, headers: Iterable[Header]) -> bytes:
        parts: list[bytes] = []
        if self._pending_update is not None:
            parts.append(_encode_int(self._pending_update, 5, 0x20))
            self._pending_update = None
        cache = _FIELD_CACHE
        huffman = self.huffman
        for field in headers:
            key = (field, huffman)
            coded = cache.get(key)
            if coded is None:
                coded = _encode_field(field[0], field[1], huffman)
                if len(coded) <= _FIELD_CACHE_MAX_LEN:
                    if len(cache) >= _FIELD_CACHE_MAX:
                        cache.clear()
                    cache[key] = coded
            parts.append(coded)
        return b"".join(parts)
