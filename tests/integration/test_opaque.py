"""Opaque TCP: half-close both ways, server-speaks-first protocols, detection timeout."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from typing import Any

import pytest
from helpers import (
    HttpBackend,
    TcpServer,
    connect,
    eventually,
    free_port,
    metric,
    run_parallel,
)


def half_close_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send data, shut down our write side, read until the peer closes."""
    with connect(port, timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            d = s.recv(1 << 20)
            if not d:
                return bytes(out)
            out += d


@pytest.fixture
def echo(stack: contextlib.ExitStack) -> TcpServer:
    return stack.enter_context(TcpServer("half_close"))


@pytest.fixture
def banner(stack: contextlib.ExitStack) -> TcpServer:
    return stack.enter_context(TcpServer("banner", banner=b"220 server speaks first\r\n"))


@pytest.mark.parametrize("form", ["single", "range"])
def test_opaque_port_half_close(echo: TcpServer, start_proxy: Any, form: str) -> None:
    ports = str(echo.port) if form == "single" else f"1-2,{echo.port - 1}-{echo.port + 1}"
    p = start_proxy(app=echo.port, env={"MESHLET_OPAQUE_PORTS": ports})
    # Looks like HTTP, but the port is opaque: it must go through untouched, unparsed.
    data = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" + os.urandom(1 << 20)
    got = half_close_exchange(p.inbound_port, data)
    assert len(got) == 4 + len(data)
    assert got == b"got:" + data
    assert echo.eof_seen == [data], "the server must see the client's FIN after the data"
    m = p.metrics()
    assert metric(m, "request_total") == 0  # no HTTP parsing happened


def test_detected_opaque_half_close(echo: TcpServer, start_proxy: Any) -> None:
    p = start_proxy(app=echo.port)
    data = b"\x00\x01\x02 not http at all\n" * 1000
    got = half_close_exchange(p.inbound_port, data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(b"got:" + data).digest()
    assert echo.eof_seen == [data]
    m = p.metrics()
    assert metric(m, "protocol_detect_total", direction="inbound", protocol="opaque") == 1
    assert metric(m, "protocol_detect_timeout_total") == 0
    eventually(lambda: metric(p.metrics(), "tcp_open_connections", direction="inbound") == 0,
               timeout=3)


def test_few_bytes_then_fin_before_detection(echo: TcpServer, start_proxy: Any) -> None:
    """'GE' could still become HTTP; the FIN decides: opaque, and the FIN is passed on."""
    p = start_proxy(app=echo.port, env={"MESHLET_DETECT_TIMEOUT": "5s"})
    t0 = time.monotonic()
    assert half_close_exchange(p.inbound_port, b"GE") == b"got:GE"
    assert time.monotonic() - t0 < 2, "the FIN must end detection, not the timeout"
    assert echo.eof_seen == [b"GE"]


def test_server_speaks_first_on_opaque_port(banner: TcpServer, start_proxy: Any) -> None:
    p = start_proxy(app=banner.port, env={"MESHLET_OPAQUE_PORTS": str(banner.port),
                                          "MESHLET_DETECT_TIMEOUT": "5s"})
    with connect(p.inbound_port, 5) as s:
        t0 = time.monotonic()
        first = s.recv(100)  # we send nothing
        elapsed = time.monotonic() - t0
        assert first == b"220 server speaks first\r\n"
        assert elapsed < 2, f"banner took {elapsed:.2f}s: the proxy waited for detection"
        s.sendall(b"ping\n")
        assert s.recv(100) == b"ping\n"
    m = p.metrics()
    assert metric(m, "protocol_detect_timeout_total") == 0


def test_server_speaks_first_after_detect_timeout(banner: TcpServer, start_proxy: Any) -> None:
    p = start_proxy(app=banner.port, env={"MESHLET_DETECT_TIMEOUT": "300ms"})
    with connect(p.inbound_port, 5) as s:
        t0 = time.monotonic()
        first = s.recv(100)
        elapsed = time.monotonic() - t0
        assert first == b"220 server speaks first\r\n"
        assert 0.25 <= elapsed < 2.5, elapsed
        s.sendall(b"ping\n")
        assert s.recv(100) == b"ping\n"
    m = p.metrics()
    assert metric(m, "protocol_detect_timeout_total", direction="inbound") == 1


def test_outbound_opaque_listener(banner: TcpServer, start_proxy: Any) -> None:
    p = start_proxy(outbound={"db:5432": "/opaque"}, endpoints=(
        f"services:\n- name: db\n  port: 5432\n  endpoints:\n  - addr: {banner.addr}\n"),
        env={"MESHLET_DETECT_TIMEOUT": "5s"})
    with connect(p.outbound["db:5432"], 5) as s:
        t0 = time.monotonic()
        assert s.recv(100) == b"220 server speaks first\r\n"
        assert time.monotonic() - t0 < 2
        s.sendall(b"SELECT 1\n")
        assert s.recv(100) == b"SELECT 1\n"
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"", "the server closes after our FIN; so must the proxy"


def test_opaque_upstream_refused_closes_client(start_proxy: Any) -> None:
    dead = free_port()
    p = start_proxy(app=dead, env={"MESHLET_OPAQUE_PORTS": str(dead)})
    with connect(p.inbound_port, 5) as s:
        t0 = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # a reset is the documented signal
            assert s.recv(100) == b""
        assert time.monotonic() - t0 < 2
    eventually(lambda: metric(p.metrics(), "tcp_connect_errors_total", direction="inbound")
               == 1)
    eventually(lambda: metric(p.metrics(), "tcp_open_connections", direction="inbound") == 0)


def test_server_first_bytes_not_lost_while_proxy_is_busy(stack: contextlib.ExitStack,
                                                         banner: TcpServer,
                                                         start_proxy: Any) -> None:
    """A banner that arrives while the proxy is still finishing its upstream connect
    must be forwarded, not dropped; a busy proxy (bulk HTTP running) widens that window."""
    bulk = stack.enter_context(HttpBackend(record=False))
    p = start_proxy(outbound={"db:5432": "/opaque", "web:80": ""}, endpoints=(
        f"services:\n- name: db\n  port: 5432\n  endpoints:\n  - addr: {banner.addr}\n"
        f"- name: web\n  port: 80\n  endpoints:\n  - addr: {bulk.addr}\n"))
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), connect(p.outbound["web:80"]) as s:
                s.sendall(b"GET /bytes/30000000 HTTP/1.1\r\nHost: web\r\n"
                          b"Connection: close\r\n\r\n")
                while s.recv(1 << 16) and not stop.is_set():
                    pass

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: bulk.sent_bytes > 0)
        missing = []
        for i in range(20):
            with connect(p.outbound["db:5432"], 1.5) as s:
                try:
                    first = s.recv(100)
                except TimeoutError:
                    first = b""
                if first != b"220 server speaks first\r\n":
                    missing.append(i)
                    if len(missing) >= 3:
                        break
        assert not missing, f"banner lost on connections {missing}"
    finally:
        stop.set()
        for t in threads:
            t.join(10)


@pytest.mark.parametrize("how", ["protocol_hint", "opaque_ports"])
def test_outbound_opaque_by_discovery_hint_or_port(banner: TcpServer, start_proxy: Any,
                                                   how: str) -> None:
    hint = "  protocol: opaque\n" if how == "protocol_hint" else ""
    env = {"MESHLET_DETECT_TIMEOUT": "5s"}
    if how == "opaque_ports":
        env["MESHLET_OPAQUE_PORTS"] = "5432"
    p = start_proxy(outbound={"db:5432": ""}, env=env, endpoints=(
        f"services:\n- name: db\n  port: 5432\n{hint}  endpoints:\n  - addr: {banner.addr}\n"))
    with connect(p.outbound["db:5432"], 5) as s:
        t0 = time.monotonic()
        assert s.recv(100) == b"220 server speaks first\r\n"
        assert time.monotonic() - t0 < 2, "an opaque service must not wait for detection"



def test_relay_bytes_intact_under_backpressure(banner: TcpServer, start_proxy: Any) -> None:
    """The relay reads into one shared buffer and lends it to a transport that could not
    send it all: with slow readers at both ends (partial writes both ways) and three
    connections at once, every byte must arrive unchanged and in order."""
    p = start_proxy(app=banner.port, env={"MESHLET_OPAQUE_PORTS": str(banner.port)})
    size = 12 << 20
    errors: list[str] = []

    def one(i: int) -> None:
        data = os.urandom(size)  # no period a misplaced buffer could hide in
        want = hashlib.sha256(banner.banner + data).hexdigest()
        with connect(p.inbound_port, 30) as s:
            def send() -> None:
                with contextlib.suppress(OSError):
                    view = memoryview(data)
                    for off in range(0, size, 1 << 20):
                        s.sendall(view[off:off + (1 << 20)])
                    s.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=send, daemon=True)
            t.start()
            h = hashlib.sha256()
            n = reads = 0
            while True:
                d = s.recv(32 << 10)  # small reads, with pauses: the proxy backs up
                if not d:
                    break
                h.update(d)
                n += len(d)
                reads += 1
                if reads % 64 == 0:
                    time.sleep(0.002)
            t.join(30)
        if n != len(banner.banner) + size or h.hexdigest() != want:
            ok = "ok" if h.hexdigest() == want else "WRONG"
            errors.append(f"conn {i}: {n} bytes, sha256 {ok}")

    run_parallel(one, 3, 120)
    assert not errors, errors
    m = p.metrics()
    assert metric(m, "tcp_read_bytes_total", direction="inbound", peer="src") >= 3 * size


def test_relay_memory_returns_after_backpressure(stack: contextlib.ExitStack,
                                                 start_proxy: Any) -> None:
    """40 connections each push 4 MiB at an app that reads nothing for a while, then
    everything; afterwards they sit idle, open. The relay's read buffer must not stay held
    per connection: the proxy's RSS ends within a few MiB of where it started (a 1 MiB
    buffer kept per backed-up connection would add ~40 MiB)."""
    n_conns, size = 40, 4 << 20
    lsock = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=n_conns))
    app_port = lsock.getsockname()[1]
    counts: dict[int, int] = {}
    held: list[socket.socket] = []
    stack.callback(lambda: [c.close() for c in held])

    def drain(c: socket.socket, i: int) -> None:
        time.sleep(0.5)  # reads nothing yet: the proxy's writes back up
        n = 0
        with contextlib.suppress(OSError):
            while n < size and (d := c.recv(1 << 16)):
                n += len(d)
        counts[i] = n

    def accept() -> None:
        with contextlib.suppress(OSError):
            for i in range(n_conns):
                c, _ = lsock.accept()
                held.append(c)
                threading.Thread(target=drain, args=(c, i), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    p = start_proxy(app=app_port, env={"MESHLET_OPAQUE_PORTS": str(app_port)})
    before = p.rss_kb()
    blob = os.urandom(size)
    clients = [stack.enter_context(connect(p.inbound_port, 30)) for _ in range(n_conns)]
    for s in clients:
        threading.Thread(target=s.sendall, args=(blob,), daemon=True).start()
    eventually(lambda: len(counts) == n_conns and sum(counts.values()) == n_conns * size,
               timeout=60)
    time.sleep(0.5)
    grown = p.rss_kb() - before
    assert grown < 12 * 1024, f"RSS grew {grown // 1024} MiB and stays with idle connections"
