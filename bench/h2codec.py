"""Micro-benchmark of the sans-I/O HTTP/2 codec (meshlet.proto.http2 and .hpack).

`python -m bench.h2codec [--n 20000]` prints microseconds per request, best of 3 runs,
for:
- hpack decode: a typical request HEADERS block (":method GET, :scheme http, :path /,
  :authority, user-agent, accept") as a peer sends it the second time (indexed fields:
  the block cache hits), and the same block uncached (caches cleared each time; literal
  fields with incremental indexing, Huffman-coded as nghttp2 and h2 send them);
- hpack encode: a response head (":status 200, content-type, content-length, date");
- server side: what a server Connection costs to answer one request (receive the
  request bytes, send response HEADERS and a 12-byte DATA with END_STREAM, drain);
- exchange: a full request/response between two in-memory Connections (both sides).
The same server side and exchange with the `h2` library (python-hyper), if installed.
In-process only, one core, a few seconds in all.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from meshlet.proto import hpack
from meshlet.proto.http2 import Connection, DataReceived, RequestReceived

REQ = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
       (b":authority", b"backend.default.svc:8080"), (b"user-agent", b"h2load nghttp2/1.59.0"),
       (b"accept", b"*/*")]
RESP = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"12"),
        (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT")]
BODY = b"hello world\n"


def best_us(fn: Callable[[int], None], n: int, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t)
    return best / n * 1e6


def bench_hpack(n: int) -> dict[str, float]:
    out: dict[str, float] = {}
    ref_first = ref_second = None
    try:
        import hpack as ref  # the reference encoder makes peer-like blocks

        enc = ref.Encoder()
        ref_first = enc.encode(REQ)
        ref_second = enc.encode(REQ)
    except ImportError:
        pass
    if ref_first is not None and ref_second is not None:
        first, second = ref_first, ref_second
        dec = hpack.Decoder()
        dec.decode(first)

        def warm(k: int) -> None:
            for _ in range(k):
                dec.decode(second)

        out["hpack decode request (indexed, cached)"] = best_us(warm, n)

        def cold(k: int) -> None:
            for _ in range(k):
                hpack._BLOCK_CACHE.clear()
                hpack._HUFFMAN_CACHE.clear()
                hpack.Decoder().decode(first)

        out["hpack decode request (first, no caches)"] = best_us(cold, max(n // 10, 100))
    encoder = hpack.Encoder()

    def encode(k: int) -> None:
        for _ in range(k):
            encoder.encode(RESP)

    out["hpack encode response head"] = best_us(encode, n)
    return out


def _meshlet_pair() -> tuple[Connection, Connection]:
    c, s = Connection(True), Connection(False)
    c.initiate_connection()
    s.initiate_connection()
    s.receive(bytes(c.data_to_send()))
    c.receive(bytes(s.data_to_send()))
    s.receive(bytes(c.data_to_send()))
    return c, s


def bench_meshlet(n: int) -> dict[str, float]:
    out: dict[str, float] = {}

    def server_side(k: int) -> float:
        c, s = _meshlet_pair()
        reqs = []
        for i in range(k):
            sid = 2 * i + 1
            c.send_headers(sid, REQ, end_stream=True)
            reqs.append(bytes(c.data_to_send()))
            c.send_rst(sid)  # keep the client's table empty
        c.data_to_send()
        t = time.perf_counter()
        for data in reqs:
            for ev in s.receive(data):
                if type(ev) is RequestReceived:
                    s.send_headers(ev.stream_id, RESP)
                    s.send_data(ev.stream_id, BODY, end_stream=True)
            s.data_to_send()
        return time.perf_counter() - t

    out["meshlet server side per request"] = min(server_side(n) for _ in range(3)) / n * 1e6

    def exchange(k: int) -> None:
        c, s = _meshlet_pair()
        sid = 1
        for _ in range(k):
            c.send_headers(sid, REQ, end_stream=True)
            for ev in s.receive(bytes(c.data_to_send())):
                if type(ev) is RequestReceived:
                    s.send_headers(ev.stream_id, RESP)
                    s.send_data(ev.stream_id, BODY, end_stream=True)
            for ev2 in c.receive(bytes(s.data_to_send())):
                if type(ev2) is DataReceived:
                    c.acknowledge_received_data(ev2.stream_id, len(ev2.data))
            s.receive(bytes(c.data_to_send()))
            sid += 2

    out["meshlet exchange (both sides)"] = best_us(exchange, n)
    return out


def bench_h2(n: int) -> dict[str, float]:
    try:
        import h2.config
        import h2.connection
        import h2.events
    except ImportError:
        return {}
    out: dict[str, float] = {}

    def pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        c.initiate_connection()
        s.initiate_connection()
        s.receive_data(c.data_to_send())
        c.receive_data(s.data_to_send())
        s.receive_data(c.data_to_send())
        return c, s

    def server_side(k: int) -> float:
        c, s = pair()
        reqs = []
        for i in range(k):
            sid = 2 * i + 1
            c.send_headers(sid, REQ, end_stream=True)
            reqs.append(c.data_to_send())
            c.reset_stream(sid)
        c.data_to_send()
        t = time.perf_counter()
        for data in reqs:
            for ev in s.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    s.send_headers(ev.stream_id, RESP)
                    s.send_data(ev.stream_id, BODY, end_stream=True)
            s.data_to_send()
        return time.perf_counter() - t

    k = max(n // 5, 200)
    out["h2 server side per request"] = min(server_side(k) for _ in range(3)) / k * 1e6

    def exchange(m: int) -> None:
        c, s = pair()
        sid = 1
        for _ in range(m):
            c.send_headers(sid, REQ, end_stream=True)
            for ev in s.receive_data(c.data_to_send()):
                if isinstance(ev, h2.events.RequestReceived):
                    s.send_headers(ev.stream_id, RESP)
                    s.send_data(ev.stream_id, BODY, end_stream=True)
            for ev2 in c.receive_data(s.data_to_send()):
                if isinstance(ev2, h2.events.DataReceived):
                    c.acknowledge_received_data(ev2.flow_controlled_length, ev2.stream_id)
            s.receive_data(c.data_to_send())
            sid += 2

    out["h2 exchange (both sides)"] = best_us(exchange, k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="requests per run (best of 3)")
    args = ap.parse_args()
    results = {**bench_hpack(args.n), **bench_meshlet(args.n), **bench_h2(args.n)}
    width = max(map(len, results))
    for name, us in results.items():
        print(f"{name:<{width}}  {us:8.2f} us")
    if "h2 exchange (both sides)" in results:
        ratio = results["h2 exchange (both sides)"] / results["meshlet exchange (both sides)"]
        print(f"{'h2 / meshlet, exchange':<{width}}  {ratio:8.1f} x")


if __name__ == "__main__":
    main()
