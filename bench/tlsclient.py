"""Fresh mutual-TLS 1.3 connections, for the h1-mesh-mtls handshake figure.

python -m bench.tlsclient --port P --cert CHAIN --key KEY --ca ROOT [--alpn meshlet/h1]
                          [--expect-uri spiffe://...] [--seconds S] [--threads T]

Each thread, until S seconds have passed: connect, full TLS 1.3 handshake with the client
certificate (no session resumption: every handshake is a full one), check the server's
certificate chain (and SPIFFE ID when --expect-uri is given), send one
`GET / HTTP/1.1` with `Connection: close`, read the response (must be a 200 with nginx's
body), close. Prints one JSON line: handshakes (completed with a good response),
errors (by kind), seconds, and what was negotiated.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"
BODY = b"hello from nginx\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
MAX_ERRORS = 1000


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    handshake_ms: list[float] = field(default_factory=list)
    negotiated: dict[str, Any] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def n_errors(self) -> int:
        return sum(self.errors.values())


def make_context(cert: str, key: str, ca: str, alpn: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the peer is identified by its SPIFFE ID, checked below
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _peer_uri(tls: ssl.SSLSocket) -> str | None:
    sans: Any = (tls.getpeercert() or {}).get("subjectAltName", ())
    uris = [str(value) for kind, value in sans if kind == "URI"]
    return uris[0] if len(uris) == 1 else None


def _read_response(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while len(data) < 65536:
        chunk = tls.recv(4096)
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    return data
    return data


def one_connection(
    ctx: ssl.SSLContext, port: int, expect_uri: str | None, tally: Tally, first: bool
) -> None:
    start = time.perf_counter()
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        # Without this, Nagle holds the request behind the client's Finished flight until
        # it is ACKed: a 40 ms delayed-ACK stall with servers that send no ticket then.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=None) as tls:
            resp = _exchange(tls, start, expect_uri, tally, first)
    if not resp.startswith(b"HTTP/1.1 200 ") or not resp.endswith(BODY):
        status = resp.split(b"\r\n", 1)[0][:40].decode(errors="replace")
        raise ValueError(f"bad response: {status or 'empty'}")
    with tally.lock:
        tally.ok += 1


def _exchange(
    tls: ssl.SSLSocket, start: float, expect_uri: str | None, tally: Tally, first: bool
) -> bytes:
    """After the handshake: check the server's identity, one request, its response."""
    shaken = time.perf_counter()
    uri = _peer_uri(tls)
    if expect_uri and uri != expect_uri:
        raise ssl.SSLError(f"server is {uri}, expected {expect_uri}")
    if first:
        tally.negotiated = {
            "version": tls.version(),
            "cipher": (tls.cipher() or ("",))[0],
            "alpn": tls.selected_alpn_protocol(),
            "server_uri": uri,
            "session_reused": tls.session_reused,
        }
    tls.sendall(REQUEST)
    resp = _read_response(tls)
    with tally.lock:
        tally.handshake_ms.append((shaken - start) * 1e3)
    return resp


def worker(
    ctx: ssl.SSLContext, port: int, expect_uri: str | None, deadline: float, tally: Tally
) -> None:
    first = True
    while time.monotonic() < deadline and tally.n_errors() < MAX_ERRORS:
        try:
            one_connection(ctx, port, expect_uri, tally, first)
            first = False
        except (OSError, ValueError) as exc:
            tally.error(f"{type(exc).__name__}: {str(exc)[:100]}")
            time.sleep(0.01)


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = make_context(args.cert, args.key, args.ca, args.alpn)
    tally = Tally()
    start = time.monotonic()
    deadline = start + args.seconds
    threads = [
        threading.Thread(target=worker, args=(ctx, args.port, args.expect_uri, deadline, tally))
        for _ in range(args.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    hs = tally.handshake_ms
    return {
        "handshakes": tally.ok,
        "errors": tally.n_errors(),
        "error_kinds": tally.errors,
        "seconds": elapsed,
        "per_s": tally.ok / elapsed if elapsed else 0.0,
        "threads": args.threads,
        "handshake_ms_p50": statistics.median(hs) if hs else None,
        "negotiated": tally.negotiated,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tlsclient")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True, help="client certificate chain (PEM)")
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True, help="trust anchors (PEM)")
    p.add_argument("--alpn", action="append", help="ALPN protocol to offer (repeatable)")
    p.add_argument("--expect-uri", help="the server's SPIFFE ID must be this")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=4)
    result = run(p.parse_args(argv))
    print(json.dumps(result))
    return 0 if result["handshakes"] else 2


if __name__ == "__main__":
    sys.exit(main())
