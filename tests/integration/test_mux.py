"""HTTP/1.1 between two meshed proxies as streams of one shared mTLS connection
(ALPN meshlet/mux): many client connections, one mesh connection; bodies both ways;
WebSocket; a client that vanishes; policy; a dead peer; the per-connection mode kept
behind MESHLET_MUX=false. Real processes, real TLS."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from helpers import (
    TD,
    Control,
    HttpBackend,
    ProxyProcess,
    ResponseReader,
    WsEchoServer,
    connect,
    eventually,
    http_request,
    metric,
    pattern_sha256,
    proxy_env,
    run_parallel,
)

WEB = f"spiffe://{TD}/ns/default/sa/web"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"


def _endpoints(port: int) -> str:
    return (f"services:\n  - name: web\n    port: 80\n    endpoints:\n"
            f"      - addr: 127.0.0.1:{port}\n        identity: {WEB}\n")


def _established_to(port: int) -> int:
    """TCP connections in ESTABLISHED state whose remote port is `port` (the client
    ends of connections to it)."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(name) as f:
            for line in list(f)[1:]:
                parts = line.split()
                if parts[3] == "01" and int(parts[2].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


@contextlib.contextmanager
def _pair(control: Control, tmp: Path, app: int, b_env: dict[str, str] | None = None,
          a_env: dict[str, str] | None = None,
          opaque: bool = False):  # type: ignore[no-untyped-def]
    """B (account web) in front of `app`, A (client) with an outbound listener to it:
    `web:80` for HTTP, or with `opaque`, `db:5432` (an opaque port on B)."""
    b_env = dict(b_env or {})
    if opaque:
        b_env["MESHLET_OPAQUE_PORTS"] = str(app)
    with ProxyProcess(app=app, ready_timeout=15,
                      env=proxy_env(control, tmp / "b", "web", **b_env)) as b:
        assert b.inbound_port is not None
        eps = _endpoints(b.inbound_port)
        outbound = {"web:80": ""}
        if opaque:
            eps = eps.replace("name: web\n    port: 80", "name: db\n    port: 5432")
            outbound = {"db:5432": "/opaque"}
        with ProxyProcess(outbound=outbound, endpoints=eps, ready_timeout=15,
                          env=proxy_env(control, tmp / "a", "client", **(a_env or {}))) as a:
            yield a, b


def _get(sock: socket.socket, path: str) -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
    r = ResponseReader(sock).read()
    return r.status, r.body


def test_many_client_connections_share_one_mesh_connection(
        control: Control, backend: HttpBackend, tmp_path: Path) -> None:
    with _pair(control, tmp_path, backend.port) as (a, b):
        assert b.inbound_port is not None
        port = a.outbound["web:80"]
        n_clients, per = 20, 5
        results: list[int] = []
        ids: set[str] = set()
        lock = threading.Lock()

        def client() -> None:
            with connect(port) as s:
                for _ in range(per):
                    status, body = _get(s, "/anything")
                    seen = json.loads(body)
                    with lock:
                        results.append(status)
                        ids.update(v for k, v in seen["headers"]
                                   if k.lower() == "meshlet-client-id")
                # Then every client connection has a request in flight at once.
                barrier.wait(timeout=20)
                s.sendall(b"GET /delay/1500 HTTP/1.1\r\nHost: web\r\n\r\n")
                time.sleep(0.7)
                with lock:
                    counts.append(_established_to(b.inbound_port or 0))
                r = ResponseReader(s).read()
                with lock:
                    results.append(r.status)

        barrier = threading.Barrier(n_clients)
        counts: list[int] = []
        run_parallel(lambda _i: client(), n_clients, 60)
        assert results == [200] * (n_clients * (per + 1))
        assert ids == {CLIENT}  # each stream carries the verified identity
        # 20 requests in flight at once reached B over one TLS connection.
        assert counts and max(counts) == 1, counts
        mux = a.admin_get("/config").json()["mux"]
        assert [(m["peer"], m["identity"], len(m["streams"])) for m in mux] == [
            (f"127.0.0.1:{b.inbound_port}", WEB, 1)]  # one shared connection to B
        m = b.metrics()
        # Each stream is a client connection of B's (tls, identity), each request counted.
        assert metric(m, "tcp_open_total", direction="inbound", peer="src", tls="true",
                      client_id=CLIENT) == n_clients
        assert metric(m, "response_total", direction="inbound", tls="true",
                      client_id=CLIENT, status_code="200") == n_clients * (per + 1)
        assert metric(a.metrics(), "request_total", direction="outbound",
                      tls="true") == n_clients * (per + 1)


def test_large_bodies_both_ways(control: Control, backend: HttpBackend,
                                tmp_path: Path) -> None:
    with _pair(control, tmp_path, backend.port) as (a, _b):
        port = a.outbound["web:80"]
        n = 24 * 1024 * 1024
        with connect(port, timeout=60) as s:
            status, body = _get(s, f"/bytes/{n}")
            assert status == 200
            assert len(body) == n
            assert hashlib.sha256(body).hexdigest() == pattern_sha256(n)
        blob = os.urandom(16 * 1024 * 1024)
        r = http_request(port, method="POST", path="/anything", body=blob, timeout=60)
        assert r.status == 200
        seen = json.loads(r.body)
        assert seen["body_sha256"] == hashlib.sha256(blob).hexdigest()


def test_websocket_over_the_shared_connection(control: Control, tmp_path: Path) -> None:
    from websockets.sync.client import connect as ws_connect

    with WsEchoServer() as srv, _pair(control, tmp_path, srv.port) as (a, _b):
        url = f"ws://127.0.0.1:{a.outbound['web:80']}/chat"
        with ws_connect(url, open_timeout=10, close_timeout=2) as ws:
            assert ws.recv(timeout=10) == "hello from server"
            for i in range(3):
                ws.send(f"message {i}")
                assert ws.recv(timeout=10) == f"message {i}"
            blob = os.urandom(300 * 1024)
            ws.send(blob)
            assert ws.recv(timeout=10) == blob


def test_a_vanishing_client_does_not_disturb_the_others(
        control: Control, backend: HttpBackend, tmp_path: Path) -> None:
    with _pair(control, tmp_path, backend.port) as (a, b):
        assert b.inbound_port is not None
        port = a.outbound["web:80"]
        with connect(port) as keep:
            assert _get(keep, "/anything")[0] == 200
            for _ in range(5):
                s = connect(port)
                s.sendall(b"GET /delay/3000 HTTP/1.1\r\nHost: web\r\n\r\n")
                time.sleep(0.1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                             b"\x00\x00\x00\x00")
                s.close()  # a reset mid-request
                # The other client connection goes on, on the same mesh connection.
                assert _get(keep, "/anything")[0] == 200
            assert _established_to(b.inbound_port) == 1
        r = http_request(port, path="/anything")
        assert r.status == 200


def test_policy_refusal_over_the_shared_connection(control: Control, backend: HttpBackend,
                                                   tmp_path: Path) -> None:
    with _pair(control, tmp_path, backend.port,
               b_env={"MESHLET_INBOUND_POLICY": "deny"}) as (a, b):
        mark = backend.mark()
        r = http_request(a.outbound["web:80"], path="/anything")
        assert r.status == 403, r
        assert r.header("meshlet-proxy-error") == "unauthorized_deny"
        assert backend.received(mark) == b""
        assert metric(b.metrics(), "inbound_authz_deny_total", client_id=CLIENT) >= 1


def test_a_dead_peer_gets_a_502_not_a_hang(control: Control, backend: HttpBackend,
                                           tmp_path: Path) -> None:
    with _pair(control, tmp_path, backend.port) as (a, b):
        port = a.outbound["web:80"]
        with connect(port, timeout=20) as s:
            s.sendall(b"GET /delay/10000 HTTP/1.1\r\nHost: web\r\n\r\n")
            time.sleep(0.3)
            assert b.proc is not None
            b.proc.kill()  # the peer proxy dies with a request in flight
            b.proc.wait(10)
            b.proc = None  # killed on purpose: no exit status to check
            t0 = time.monotonic()
            r = ResponseReader(s).read()
            assert r.status == 502, r
            assert r.header("meshlet-proxy-error")
            assert time.monotonic() - t0 < 5
        r2 = http_request(port, path="/anything", timeout=20)
        assert r2.status == 502  # nothing listens there now: refused, answered at once
        assert r2.header("meshlet-proxy-error")


def test_per_connection_mode_still_works(control: Control, backend: HttpBackend,
                                         tmp_path: Path) -> None:
    with _pair(control, tmp_path, backend.port,
               a_env={"MESHLET_MUX": "false"}) as (a, b):
        assert b.inbound_port is not None
        port = a.outbound["web:80"]
        socks = [connect(port) for _ in range(3)]
        try:
            for s in socks:  # three requests in flight at once
                s.sendall(b"GET /delay/1500 HTTP/1.1\r\nHost: web\r\n\r\n")
            time.sleep(0.7)
            assert _established_to(b.inbound_port) == 3  # one TLS connection each
            for s in socks:
                assert ResponseReader(s).read().status == 200
        finally:
            for s in socks:
                s.close()


def test_opaque_tcp_streams_with_half_close_across_the_mesh(control: Control,
                                                            tmp_path: Path) -> None:
    from helpers import TcpServer

    with TcpServer(mode="hash") as db, _pair(control, tmp_path, db.port, opaque=True) as (a, b):
        port = a.outbound["db:5432"]
        blobs = [os.urandom(2 * 1024 * 1024 + i) for i in range(5)]
        socks = [socket.create_connection(("127.0.0.1", port), timeout=20)
                 for _ in blobs]
        try:
            for s, blob in zip(socks, blobs, strict=True):
                s.sendall(blob)
            # Five client connections in flight: one mesh connection.
            inbound = b.inbound_port
            eventually(lambda: _established_to(inbound) == 1, timeout=10)
            time.sleep(0.3)
            assert _established_to(inbound) == 1
            for s, blob in zip(socks, blobs, strict=True):
                # The server answers only after our FIN reached it: a half-close
                # crossed both proxies and the mesh TLS connection.
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    d = s.recv(65536)
                    if not d:
                        break
                    got += d
                want = f"{len(blob)} {hashlib.sha256(blob).hexdigest()}".encode()
                assert got == want
        finally:
            for s in socks:
                s.close()
        m = b.metrics()
        assert metric(m, "tcp_open_total", direction="inbound", peer="src",
                      tls="true", client_id=CLIENT) == len(blobs)


def test_concurrent_large_uploads(control: Control, backend: HttpBackend,
                                  tmp_path: Path) -> None:
    """Twelve 2 MiB uploads at once on fresh streams: the inbound side reads each body
    while it is still connecting to the app (reading paused, then resumed)."""
    with _pair(control, tmp_path, backend.port) as (a, _b):
        port = a.outbound["web:80"]
        out: list[object] = []
        lock = threading.Lock()

        def one() -> None:
            blob = os.urandom(2 * 1024 * 1024)
            try:
                r = http_request(port, method="POST", path="/delay/200", body=blob, timeout=30)
                ok = r.status == 200 and \
                    json.loads(r.body)["body_sha256"] == hashlib.sha256(blob).hexdigest()
                res: object = "ok" if ok else r.status
            except OSError as e:
                res = repr(e)
            with lock:
                out.append(res)

        run_parallel(lambda _i: one(), 12, 60)
        assert out == ["ok"] * 12


def test_abandoned_downloads_give_their_window_back(
        control: Control, backend: HttpBackend, tmp_path: Path) -> None:
    """Clients that stop reading a large download and then vanish: what the mesh
    connection had received for them, undelivered, is credited back, so after more
    of them than the connection window holds (16 MiB) the connection still carries
    traffic."""
    with _pair(control, tmp_path, backend.port) as (a, b):
        assert b.inbound_port is not None
        port = a.outbound["web:80"]
        for _ in range(24):
            s = connect(port)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /bytes/8000000 HTTP/1.1\r\nHost: web\r\n\r\n")
            s.recv(1000)
            time.sleep(0.15)  # the download fills the paths and stalls
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                         b"\x00\x00\x00\x00")
            s.close()
        assert _established_to(b.inbound_port) == 1
        r = http_request(port, path="/anything", timeout=10)
        assert r.status == 200
        with connect(port, timeout=30) as s:
            status, body = _get(s, "/bytes/3000000")
            assert status == 200 and len(body) == 3000000


def test_opaque_tcp_over_per_connection_tls_keeps_every_byte(control: Control,
                                                             tmp_path: Path) -> None:
    """MESHLET_MUX=false: each client connection is its own TLS connection, whose
    decrypted reads land in the relay's shared read buffer on B. Echoed both ways with a
    slow reader, five at once, checked by sha256. (TLS has no half-close, so the client
    reads its echo back by length.)"""
    from helpers import TcpServer

    with TcpServer(mode="banner", banner=b"") as db, \
            _pair(control, tmp_path, db.port, a_env={"MESHLET_MUX": "false"},
                  opaque=True) as (a, b):
        port = a.outbound["db:5432"]
        errors: list[str] = []

        def one(i: int) -> None:
            blob = os.urandom(6 * 1024 * 1024 + i)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                t = threading.Thread(target=s.sendall, args=(blob,), daemon=True)
                t.start()
                h, n = hashlib.sha256(), 0
                while n < len(blob):
                    d = s.recv(min(32 << 10, len(blob) - n))
                    if not d:
                        break
                    h.update(d)
                    n += len(d)
                    if n % (1 << 20) < len(d):
                        time.sleep(0.005)
                t.join(30)
            if n != len(blob) or h.digest() != hashlib.sha256(blob).digest():
                errors.append(f"conn {i}: {n} of {len(blob)} bytes, sha256 differs")

        run_parallel(one, 5, 90)
        assert not errors, errors
        m = b.metrics()
        assert metric(m, "tcp_open_total", direction="inbound", peer="src",
                      tls="true", client_id=CLIENT) == 5
