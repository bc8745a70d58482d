"""A 1 GiB gRPC server stream through two meshed proxies to a slow reader (issue 7's
target: each proxy's RSS stays under 50 MB). `python -m bench.grpcstream [--gib 1]`.

A grpcio server streams messages of 1 MiB; proxy A (outbound, endpoints file) and proxy
B (inbound) speak HTTP/2 over mTLS with a real control plane (started with the test
suite's helpers); the grpcio client reads one message every 20 ms (at most 50 MiB/s), so
flow control must hold the server back through both proxies. Both proxies' RSS is sampled
every 0.1 s and the peaks are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

MSG = 1 << 20
OPTS = [("grpc.max_receive_message_length", 4 * MSG), ("grpc.max_send_message_length", 4 * MSG)]


def _rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(text.split("VmRSS:")[1].split()[0]) / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpcstream", description=__doc__)
    p.add_argument("--gib", type=float, default=1.0, help="stream size (default 1 GiB)")
    p.add_argument("--delay", type=float, default=0.02, help="reader's pause per message")
    a = p.parse_args(argv)
    import grpc

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from helpers import TD, ProxyProcess, proxy_env, start_control

    n = int(a.gib * 1024)

    def stream(_req: bytes, _ctx: Any) -> Iterator[bytes]:
        chunk = b"x" * MSG
        for _ in range(n):
            yield chunk

    srv = grpc.server(futures.ThreadPoolExecutor(4), options=OPTS)
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "b.S", {"Get": grpc.unary_stream_rpc_method_handler(stream)}),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    tmp = Path(tempfile.mkdtemp(prefix="meshlet-grpcstream-"))
    web = f"spiffe://{TD}/ns/default/sa/web"
    try:
        with contextlib.contextmanager(start_control)(tmp / "c") as control, \
                ProxyProcess(app=port, ready_timeout=15,
                             env=proxy_env(control, tmp / "b", "web")) as b:
            eps = (f"services:\n  - name: web\n    port: 80\n    endpoints:\n"
                   f"      - addr: 127.0.0.1:{b.inbound_port}\n        identity: {web}\n")
            with ProxyProcess(outbound={"web:80": ""}, endpoints=eps, ready_timeout=15,
                              env=proxy_env(control, tmp / "a", "client")) as pa:
                assert pa.proc is not None and b.proc is not None
                peak = {"a": 0.0, "b": 0.0}
                done = threading.Event()

                def sample() -> None:
                    while not done.is_set():
                        peak["a"] = max(peak["a"], _rss_mib(pa.proc.pid))  # type: ignore[union-attr]
                        peak["b"] = max(peak["b"], _rss_mib(b.proc.pid))  # type: ignore[union-attr]
                        time.sleep(0.1)

                th = threading.Thread(target=sample)
                th.start()
                ch = grpc.insecure_channel(f"127.0.0.1:{pa.outbound['web:80']}", options=OPTS)
                t0 = time.monotonic()
                got = 0
                try:
                    for m in ch.unary_stream("/b.S/Get")(b"", timeout=3600):
                        got += len(m)
                        time.sleep(a.delay)
                finally:
                    done.set()
                    th.join()
                    ch.close()
                secs = time.monotonic() - t0
                print(f"received {got / 2**30:.2f} GiB in {secs:.1f} s "
                      f"({got / 2**20 / secs:.0f} MiB/s); peak RSS A {peak['a']:.1f} MiB, "
                      f"B {peak['b']:.1f} MiB (target < 50 MB each)")
                return 0 if got == n * MSG else 1
    finally:
        srv.stop(0)


if __name__ == "__main__":
    sys.exit(main())
