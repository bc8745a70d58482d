"""200 MB streamed each way through the proxy, with its memory watched.

Each test also stops the receiving end for a while mid-transfer: without backpressure
the proxy would buffer the rest of the stream (RSS would jump by up to 200 MB); with it,
the sender stalls. Bytes are checked by count and sha256.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import (
    BIG_BUF,
    BLOCK,
    HttpBackend,
    ProxyProcess,
    ResponseReader,
    TcpServer,
    eventually,
    http_request,
    pattern_sha256,
)

SIZE = 200 * 1024 * 1024
PAUSE_AT = 20 * 1024 * 1024
RSS_BUDGET_KB = 100 * 1024

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@functools.cache
def expected_sha(n: int) -> str:
    return pattern_sha256(n)


class RssMonitor:
    """Samples the proxy's VmRSS every 20 ms in a thread; keeps the maximum."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.max_kb = proxy.rss_kb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, AssertionError):
                self.max_kb = max(self.max_kb, self.proxy.rss_kb())

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        with contextlib.suppress(OSError, AssertionError):
            self.max_kb = max(self.max_kb, self.proxy.rss_kb())
        return self.max_kb


def stalled(progress: Callable[[], int], period: float = 0.3) -> Callable[[], bool]:
    """A condition for `eventually`: no progress over `period`."""
    def check() -> bool:
        a = progress()
        time.sleep(period)
        return progress() == a
    return check


def big_socket(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG_BUF)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BIG_BUF)
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    return s


@pytest.fixture
def big_backend(stack: contextlib.ExitStack) -> HttpBackend:
    return stack.enter_context(HttpBackend(record=False, bufsize=BIG_BUF))


def idle_rss(p: ProxyProcess) -> int:
    for i in range(3):  # warm up the code paths the transfer will use
        assert http_request(p.inbound_port, "POST", f"/warm{i}", b"x" * 100_000).status == 200
    return p.rss_kb()


def test_200mb_upload(big_backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=big_backend.port)
    idle = idle_rss(p)
    big_backend.pause_after = PAUSE_AT
    mon = RssMonitor(p)
    sent = [0]
    errors: list[BaseException] = []
    s = big_socket(p.inbound_port)
    try:
        def send() -> None:
            try:
                s.sendall(b"POST /slowsink HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                          % SIZE)
                for _ in range(SIZE // len(BLOCK)):
                    s.sendall(BLOCK)
                    sent[0] += len(BLOCK)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        # The backend stops reading at 20 MB: the client must stall, not the proxy swell.
        assert big_backend.paused.wait(30), "backend never got 20 MB"
        eventually(stalled(lambda: sent[0]), timeout=20)
        assert sent[0] < SIZE, "the whole body went out while the upstream read nothing"
        paused_rss = p.rss_kb()
        big_backend.resume.set()
        t.join(60)
        assert not t.is_alive() and not errors, errors
        r = ResponseReader(s, timeout=60).read("POST")
    finally:
        s.close()
        peak = mon.stop()
    assert r.status == 200, r
    info = r.json()
    assert info["body_len"] == SIZE
    assert info["body_sha256"] == expected_sha(SIZE)
    assert paused_rss - idle < RSS_BUDGET_KB, (idle, paused_rss)
    assert peak - idle < RSS_BUDGET_KB, f"RSS grew {(peak - idle) // 1024} MB (idle {idle} kB)"


def test_200mb_download(big_backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=big_backend.port)
    idle = idle_rss(p)
    mon = RssMonitor(p)
    s = big_socket(p.inbound_port)
    try:
        s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: t\r\n\r\n" % SIZE)
        head = b""
        while b"\r\n\r\n" not in head:
            d = s.recv(65536)
            assert d, "closed before the head"
            head += d
        head, _, body = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"content-length: %d" % SIZE in head.lower(), head
        h = hashlib.sha256(body)
        n = len(body)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        paused_rss = None
        while n < SIZE:
            if paused_rss is None and n >= PAUSE_AT:
                # Stop reading: the backend must stall, not the proxy swell.
                eventually(stalled(lambda: big_backend.sent_bytes), timeout=20)
                assert big_backend.sent_bytes < SIZE, "sent it all while the client read nothing"
                paused_rss = p.rss_kb()
            k = s.recv_into(view, min(len(buf), SIZE - n))
            assert k, f"closed after {n} bytes"
            h.update(view[:k])
            n += k
    finally:
        s.close()
        peak = mon.stop()
    assert n == SIZE
    assert h.hexdigest() == expected_sha(SIZE)
    assert paused_rss is not None and paused_rss - idle < RSS_BUDGET_KB, (idle, paused_rss)
    assert peak - idle < RSS_BUDGET_KB, f"RSS grew {(peak - idle) // 1024} MB (idle {idle} kB)"


def test_200mb_opaque_upload_with_half_close(stack: contextlib.ExitStack,
                                             start_proxy: Any) -> None:
    srv = stack.enter_context(TcpServer("hash", bufsize=BIG_BUF))
    srv.pause_after = PAUSE_AT
    p = start_proxy(app=srv.port, env={"MESHLET_OPAQUE_PORTS": str(srv.port)})
    with big_socket(p.inbound_port) as s:
        s.sendall(b"x")  # the relay is up
        eventually(lambda: srv.received_bytes == 1)
        idle = p.rss_kb()
        mon = RssMonitor(p)
        sent = [1]
        errors: list[BaseException] = []

        def send() -> None:
            try:
                for _ in range(SIZE // len(BLOCK)):
                    s.sendall(BLOCK)
                    sent[0] += len(BLOCK)
                s.shutdown(socket.SHUT_WR)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        t = threading.Thread(target=send, daemon=True)
        try:
            t.start()
            assert srv.paused.wait(30), "server never got 20 MB"
            eventually(stalled(lambda: sent[0]), timeout=20)
            assert sent[0] < SIZE, "the whole stream went out while the server read nothing"
            paused_rss = p.rss_kb()
            srv.resume.set()
            t.join(60)
            assert not t.is_alive() and not errors, errors
            reply = b""
            while True:
                d = s.recv(4096)
                if not d:
                    break
                reply += d
        finally:
            srv.resume.set()
            peak = mon.stop()
    h = hashlib.sha256(b"x")
    for _ in range(SIZE // len(BLOCK)):
        h.update(BLOCK)
    assert reply == b"%d %s" % (SIZE + 1, h.hexdigest().encode())
    assert paused_rss - idle < RSS_BUDGET_KB, (idle, paused_rss)
    assert peak - idle < RSS_BUDGET_KB, f"RSS grew {(peak - idle) // 1024} MB (idle {idle} kB)"
