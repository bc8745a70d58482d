"""Raw-TCP bulk sink and client for the tcp-bulk scenario.

python -m bench.tcpbulk sink --port P
    Accepts connections, reads and discards everything, and when the client
    half-closes replies with the byte count ("<n>\\n") and closes.
python -m bench.tcpbulk client --port P --bytes N
    Sends N zero bytes (sendall from a large zero-filled memoryview), shuts down
    its write side, waits for the sink's count, prints one JSON line:
    {"sent": N, "acked": n, "seconds": t}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from typing import Any

LOOPBACK = "127.0.0.1"
SEND_BUFFER = 16 << 20
RECV_BUFFER = 1 << 20


def _drain(conn: socket.socket) -> None:
    buf = memoryview(bytearray(RECV_BUFFER))
    total = 0
    with conn:
        try:
            conn.settimeout(300)
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(f"{total}\n".encode())
        except OSError:
            pass


def run_sink(port: int) -> None:
    with socket.create_server((LOOPBACK, port), backlog=128) as srv:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_drain, args=(conn,), daemon=True).start()


def _read_reply(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(64):
        reply += chunk
        if len(reply) > 64:
            break
    return reply


def transfer(port: int, nbytes: int, timeout: float) -> dict[str, Any]:
    """Send nbytes through port; return sent/acked counts and elapsed seconds."""
    payload = memoryview(bytes(min(nbytes, SEND_BUFFER)))
    start = time.perf_counter()
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        remaining = nbytes
        while remaining:
            step = min(remaining, len(payload))
            sock.sendall(payload[:step])
            remaining -= step
        sent_at = time.perf_counter()
        sock.shutdown(socket.SHUT_WR)
        reply = _read_reply(sock)
    elapsed = time.perf_counter() - start
    text = reply.decode(errors="replace").strip()
    acked = int(text) if text.isdigit() else -1
    return {
        "sent": nbytes,
        "acked": acked,
        "seconds": elapsed,
        "send_seconds": sent_at - start,  # until the last sendall returned
        "reply": text[:64],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tcpbulk")
    parser.add_argument("role", choices=["sink", "client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bytes", type=int, default=1 << 30)
    parser.add_argument("--timeout", type=float, default=30.0, help="per socket operation")
    args = parser.parse_args(argv)
    if args.role == "sink":
        run_sink(args.port)
        return 0
    try:
        result = transfer(args.port, args.bytes, args.timeout)
    except OSError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
