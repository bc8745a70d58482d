"""Graceful shutdown by SIGTERM and by POST /shutdown: in-flight requests finish, new
connections are refused, idle keep-alive connections close, the process exits 0."""

from __future__ import annotations

import contextlib
import signal
import time

import pytest
from helpers import (
    HttpBackend,
    ProxyProcess,
    ResponseReader,
    TcpServer,
    connect,
    eventually,
    wait_port_closed,
)

GRACE = 5.0


@pytest.mark.parametrize("how", ["sigterm", "admin"])
def test_graceful_shutdown(backend: HttpBackend, stack: contextlib.ExitStack,
                           how: str) -> None:
    p = stack.enter_context(ProxyProcess(app=backend.port,
                                         env={"MESHLET_SHUTDOWN_GRACE": f"{GRACE:g}s"}))
    idle = stack.enter_context(connect(p.inbound_port))
    idle.sendall(b"GET /idle HTTP/1.1\r\nHost: t\r\n\r\n")
    idle_rd = ResponseReader(idle)
    assert idle_rd.read().status == 200  # now an idle keep-alive connection

    slow = stack.enter_context(connect(p.inbound_port))
    slow.sendall(b"GET /delay/1500 HTTP/1.1\r\nHost: t\r\n\r\n")
    eventually(lambda: "/delay/1500" in backend.paths())

    t0 = time.monotonic()
    if how == "sigterm":
        assert p.proc is not None
        p.proc.send_signal(signal.SIGTERM)
    else:
        r = p.admin_get("/shutdown", "POST")
        assert r.status == 202, r

    wait_port_closed(p.inbound_port, timeout=1.0)  # no new connections
    assert idle_rd.closed(1.0), "an idle keep-alive connection must be closed at once"

    rd = ResponseReader(slow)
    r = rd.read()
    assert r.status == 200, r
    assert r.json()["path"] == "/delay/1500"
    assert (r.header("connection") or "").lower() == "close", r
    assert rd.closed(2)
    assert p.wait_exit(GRACE + 2) == 0, p.stderr()
    elapsed = time.monotonic() - t0
    assert elapsed < GRACE, f"exit took {elapsed:.1f}s: it should not wait out the grace period"


def test_shutdown_grace_expires(backend: HttpBackend, stack: contextlib.ExitStack) -> None:
    p = stack.enter_context(ProxyProcess(app=backend.port,
                                         env={"MESHLET_SHUTDOWN_GRACE": "500ms"}))
    slow = stack.enter_context(connect(p.inbound_port))
    slow.sendall(b"GET /delay/20000 HTTP/1.1\r\nHost: t\r\n\r\n")
    eventually(lambda: "/delay/20000" in backend.paths())
    t0 = time.monotonic()
    assert p.proc is not None
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait_exit(5) == 0, p.stderr()
    assert time.monotonic() - t0 < 2.5
    assert ResponseReader(slow).closed(2), "the cut request's connection must be closed"


def test_shutdown_with_open_opaque_stream(stack: contextlib.ExitStack) -> None:
    srv = stack.enter_context(TcpServer("banner"))
    p = stack.enter_context(ProxyProcess(app=srv.port, env={
        "MESHLET_OPAQUE_PORTS": str(srv.port), "MESHLET_SHUTDOWN_GRACE": "1s"}))
    s = stack.enter_context(connect(p.inbound_port))
    assert s.recv(100).startswith(b"220")
    t0 = time.monotonic()
    assert p.proc is not None
    p.proc.send_signal(signal.SIGTERM)
    wait_port_closed(p.inbound_port, timeout=1.0)
    s.sendall(b"still here\n")  # the stream keeps working during the grace period
    assert s.recv(100) == b"still here\n"
    assert p.wait_exit(5) == 0, p.stderr()
    assert 0.8 < time.monotonic() - t0 < 3
    assert ResponseReader(s).closed(2)

