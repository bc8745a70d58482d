"""caller: calls greeter:50051 over ONE gRPC channel at RATE calls per second and prints,
every 5 seconds, which replicas answered (the sidecar balances each call)."""

from __future__ import annotations

import collections
import os
import re
import time

import grpc

TARGET = os.environ.get("TARGET", "greeter:50051")
RATE = float(os.environ.get("RATE", "10"))


def main() -> None:
    channel = grpc.insecure_channel(TARGET)  # through the sidecar: grpcio reads http_proxy
    hello = channel.unary_unary("/greet.Greeter/Hello")
    counts: collections.Counter[str] = collections.Counter()
    last = time.monotonic()
    n = 0
    while True:
        t0 = time.monotonic()
        n += 1
        try:
            answer = hello(f"call {n}".encode(), timeout=5).decode()
            m = re.search(r"from (\S+)", answer)
            counts[m.group(1) if m else "?"] += 1
            if n == 1:
                print(f"caller: {answer}", flush=True)
        except grpc.RpcError as e:
            key = f"error {e.code().name}: {e.details()}"
            if not counts[key]:
                print(f"caller: call {n} failed: {e.code().name}: {e.details()}", flush=True)
            counts[key] += 1
        if time.monotonic() - last >= 5:
            print("caller: last 5 s, answered by:", dict(sorted(counts.items())), flush=True)
            counts.clear()
            last = time.monotonic()
        time.sleep(max(0.0, 1 / RATE - (time.monotonic() - t0)))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
