"""HTTP/2 through the proxy: h2c in, each stream proxied on its own, h2c to the app.

The backend is built on the `h2` library (tests/h2backend.py), the clients are curl and
h2load (nghttp2): three independent HTTP/2 implementations around meshlet's codec.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from h2backend import H2Backend
from helpers import (
    TD,
    Control,
    ProxyProcess,
    eventually,
    free_port,
    metric,
    proxy_env,
    start_control,
    write_mesh,
)


@pytest.fixture
def h2app() -> Iterator[H2Backend]:
    with H2Backend() as b:
        yield b


def curl(port: int, path: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    """Status, header and trailer fields, body."""
    with tempfile.NamedTemporaryFile() as out:
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-m", "10", "-D", "-",
                            "-o", out.name, f"http://127.0.0.1:{port}{path}", *extra],
                           capture_output=True, timeout=30)
        body = out.read()
    lines = r.stdout.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/2") else 0
    fields = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        fields[k.strip().lower()] = v.strip()
    return status, fields, body


def test_curl_h2c_through_the_standalone_proxy(h2app: H2Backend) -> None:
    with ProxyProcess(app=h2app.port) as p:
        assert p.inbound_port is not None
        status, fields, body = curl(p.inbound_port, "/hello", "-H", "meshlet-client-id: forged")
        assert status == 200, (fields, body)
        # The app saw HTTP/2 from the proxy, and no forged mesh header.
        assert body == b"hello from h2 /hello client=-\n"
        text = p.metrics_text()
        assert 'request_total{direction="inbound"' in text
        assert 'status_code="200"' in text
        assert metric(p.metrics(), "protocol_detect_total", direction="inbound",
                      protocol="h2") == 1


def test_request_and_response_bodies_stream_both_ways(h2app: H2Backend, tmp_path: os.PathLike[str]
                                                      ) -> None:
    data = os.urandom(3 * 1024 * 1024)  # far beyond every initial window: flow control
    f = os.path.join(str(tmp_path), "body")
    with open(f, "wb") as fh:
        fh.write(data)
    with ProxyProcess(app=h2app.port) as p:
        assert p.inbound_port is not None
        status, fields, body = curl(p.inbound_port, "/sum", "--data-binary", f"@{f}")
        assert status == 200
        assert fields.get("x-bytes") == str(len(data))  # the trailers came through
        assert body == b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())
        status, _f, body = curl(p.inbound_port, "/echo", "--data-binary", f"@{f}")
        assert status == 200 and body == data
        status, _f, body = curl(p.inbound_port, "/big?n=5000000")
        assert status == 200 and len(body) == 5_000_000


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) missing")
def test_h2load_many_streams_on_few_connections(h2app: H2Backend) -> None:
    with ProxyProcess(app=h2app.port) as p:
        r = subprocess.run(["h2load", "-n", "2000", "-c", "4", "-m", "20",
                            f"http://127.0.0.1:{p.inbound_port}/x"],
                           capture_output=True, text=True, timeout=60)
        assert "2000 succeeded, 0 failed, 0 errored" in r.stdout, r.stdout
        assert h2app.requests >= 2000
        # Multiplexed upstream: far fewer connections to the app than requests.
        assert h2app.connections <= 8


def test_dead_upstream_gives_502_or_grpc_unavailable() -> None:
    dead = free_port()
    with ProxyProcess(app=dead) as p:
        assert p.inbound_port is not None
        status, fields, _b = curl(p.inbound_port, "/x")
        assert status == 502 and fields.get("meshlet-proxy-error") == "connect_refused"
        status, fields, _b = curl(p.inbound_port, "/pkg.Svc/Call", "-X", "POST",
                                  "-H", "content-type: application/grpc", "--data-binary", "")
        assert status == 200
        assert fields.get("grpc-status") == "14", fields
        assert fields.get("meshlet-proxy-error") == "connect_refused"


def test_client_reset_reaches_the_upstream(h2app: H2Backend) -> None:
    # h2load with a 1 s timeout per request on a slow-to-finish body: not needed;
    # curl aborting a large download mid-way resets the stream on the proxy, which
    # resets the upstream stream.
    with ProxyProcess(app=h2app.port) as p:
        subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-m", "10",
                        "--max-filesize", "1000", "-o", "/dev/null",
                        f"http://127.0.0.1:{p.inbound_port}/big?n=50000000"],
                       capture_output=True, timeout=30)
        eventually(lambda: h2app.resets >= 1, timeout=5)


def test_h2_between_two_meshed_proxies_over_mtls(control: Control, h2app: H2Backend,
                                                 tmp_path: Path) -> None:
    web = f"spiffe://{TD}/ns/default/sa/web"
    client = f"spiffe://{TD}/ns/default/sa/client"
    with ProxyProcess(app=h2app.port, ready_timeout=15,
                      env=proxy_env(control, tmp_path / "b", "web",
                                    MESHLET_INBOUND_POLICY="all-authenticated")) as b:
        assert b.inbound_port is not None
        eps = (f"services:\n  - name: web\n    port: 80\n    endpoints:\n"
               f"      - addr: 127.0.0.1:{b.inbound_port}\n        identity: {web}\n")
        with ProxyProcess(outbound={"web:80": ""}, endpoints=eps, ready_timeout=15,
                          env=proxy_env(control, tmp_path / "a", "client")) as a:
            port = a.outbound["web:80"]
            status, _f, body = curl(port, "/via-mesh", "-H", "meshlet-client-id: forged")
            assert status == 200
            # B verified A's certificate and told the app; the forged header is gone.
            assert body == f"hello from h2 /via-mesh client={client}\n".encode()
            r = subprocess.run(["h2load", "-n", "500", "-c", "2", "-m", "10",
                                f"http://127.0.0.1:{port}/x"],
                               capture_output=True, text=True, timeout=60)
            assert "500 succeeded, 0 failed, 0 errored" in r.stdout, r.stdout
            assert metric(b.metrics(), "tcp_open_total", direction="inbound", peer="src",
                          tls="true", client_id=client) >= 1


def _h2_client_socket(port: int) -> tuple[Any, Any]:
    import socket

    import h2.config
    import h2.connection

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                             header_encoding=None))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c


def test_rapid_reset_is_cut_off_and_bounded(h2app: H2Backend) -> None:
    """CVE-2023-44487: streams opened and reset at once, thousands of them. The proxy
    answers with GOAWAY ENHANCE_YOUR_CALM past its limit, forwards a bounded number of
    streams, stays small, and keeps serving other clients."""
    import h2.events

    with ProxyProcess(app=h2app.port) as p:
        assert p.inbound_port is not None
        s, c = _h2_client_socket(p.inbound_port)
        head = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"),
                (b":authority", b"t")]
        goaway = None
        sent = 0
        try:
            for batch in range(50):
                for _ in range(100):
                    sid = c.get_next_available_stream_id()
                    c.send_headers(sid, head, end_stream=True)
                    c.reset_stream(sid)
                    sent += 1
                s.sendall(c.data_to_send())
                s.settimeout(0.01 if batch < 49 else 5)
                try:
                    data = s.recv(1 << 20)
                except TimeoutError:
                    continue
                if not data:
                    break
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.ConnectionTerminated):
                        goaway = ev
                if goaway is not None:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            s.close()
        assert goaway is not None and goaway.error_code == 0xB, goaway  # ENHANCE_YOUR_CALM
        assert sent <= 5000
        assert h2app.requests <= 1100  # the rest never reached the app
        assert p.proc is not None
        status_text = Path(f"/proc/{p.proc.pid}/status").read_text()
        rss = int(status_text.split("VmRSS:")[1].split()[0])
        assert rss < 60_000, rss  # KiB
        status, _f, body = curl(p.inbound_port, "/after")  # others still served
        assert status == 200 and body.startswith(b"hello from h2 /after")


def test_continuation_flood_is_cut_off(h2app: H2Backend) -> None:
    """CVE-2024-27316 class: one header block in endless CONTINUATION frames."""
    import socket
    import struct

    def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
            struct.pack(">I", sid) + payload

    with ProxyProcess(app=h2app.port) as p:
        assert p.inbound_port is not None
        s = socket.create_connection(("127.0.0.1", p.inbound_port), timeout=10)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
        # :method GET, :scheme http, :path / (static table), no END_HEADERS.
        s.sendall(frame(1, 0x1, 1, b"\x82\x86\x84"))
        junk = frame(9, 0, 1, b"\x40\x01a\x01b" * 3000)  # literal fields, ~15 KB each
        got = b""
        sent = 0
        try:
            for _ in range(1000):  # 15 MB offered
                s.sendall(junk)
                sent += len(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    break
                got += d
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
        assert sent < 15_000_000  # cut off long before the end
        # A GOAWAY frame (type 7) with ENHANCE_YOUR_CALM (0xb) came back.
        i = 0
        codes = []
        while i + 9 <= len(got):
            n = int.from_bytes(got[i:i + 3], "big")
            if got[i + 3] == 7:
                codes.append(int.from_bytes(got[i + 13:i + 17], "big"))
            i += 9 + n
        assert 0xB in codes, (codes, got[:100])
        assert h2app.requests == 0


def test_slow_reader_slows_the_writer(h2app: H2Backend) -> None:
    """A client that does not read: flow control holds the app back through the proxy,
    whose memory stays small (nothing piles up in it)."""
    import time

    with ProxyProcess(app=h2app.port) as p:
        assert p.inbound_port is not None and p.proc is not None
        s, c = _h2_client_socket(p.inbound_port)
        c.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                           (b":path", b"/big?n=500000000"), (b":authority", b"t")],
                       end_stream=True)
        s.sendall(c.data_to_send())
        s.settimeout(0.2)
        got = 0
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:  # read what the windows allow, acknowledge nothing
            try:
                d = s.recv(1 << 16)
            except TimeoutError:
                continue
            for ev in c.receive_data(d):
                if hasattr(ev, "data") and ev.data:
                    got += len(ev.data)
        read = metric(p.metrics(), "tcp_read_bytes_total", direction="inbound", peer="dst")
        rss = int(Path(f"/proc/{p.proc.pid}/status").read_text()
                  .split("VmRSS:")[1].split()[0])
        s.close()
        assert got <= 65535  # our initial stream window, nothing more
        # The proxy read from the app only what its own windows let the app send.
        assert read < 8 * 1024 * 1024, read
        assert rss < 50_000, rss  # KiB


def test_connect_tunnel_on_the_http_proxy_listener(h2app: H2Backend, tmp_path: Path) -> None:
    """How gRPC clients use `http_proxy` (as in `meshlet up`): CONNECT web:80, then
    HTTP/2 inside the tunnel, balanced and over mTLS like any outbound traffic."""
    mesh_file = tmp_path / "mesh.yaml"
    write_mesh(mesh_file, f"trust_domain: {TD}\nservices: []\n")
    gen = start_control(tmp_path / "control", mesh_file=mesh_file)
    control = next(gen)
    try:
        with ProxyProcess(app=h2app.port, ready_timeout=15,
                          env=proxy_env(control, tmp_path / "b", "web")) as b:
            write_mesh(mesh_file, f"trust_domain: {TD}\nservices:\n  - name: web\n"
                       f"    ports: [80]\n    workloads: [{{address: "
                       f"\"127.0.0.1:{b.inbound_port}\"}}]\n")
            pport = free_port()
            with ProxyProcess(ready_timeout=15, env=proxy_env(
                    control, tmp_path / "a", "client",
                    MESHLET_INBOUND_LISTEN_ADDR="",
                    MESHLET_OUTBOUND_PROXY_LISTEN_ADDR=f"127.0.0.1:{pport}")):
                r = subprocess.run(
                    ["curl", "-sS", "-m", "10", "-p", "-x", f"http://127.0.0.1:{pport}",
                     "--http2-prior-knowledge", "http://web:80/tunneled"],
                    capture_output=True, timeout=30)
                client = f"spiffe://{TD}/ns/default/sa/client"
                assert r.stdout == f"hello from h2 /tunneled client={client}\n".encode(), r
                grpc = pytest.importorskip("grpc")
                os.environ["http_proxy"] = f"http://127.0.0.1:{pport}"
                try:
                    ch = grpc.insecure_channel("web:80")
                    with pytest.raises(grpc.RpcError) as e:
                        # The h2 backend is not a gRPC server: it answers 200 with a
                        # text body and no grpc-status. What matters: the call reached
                        # it through the tunnel (a request counted).
                        ch.unary_unary("/x.Y/Z")(b"", timeout=5)
                    assert e.value.code() != grpc.StatusCode.UNAVAILABLE, e.value
                    ch.close()
                finally:
                    del os.environ["http_proxy"]
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)


def test_silent_upstream_is_found_by_keepalive_ping() -> None:
    """An app that accepts and then says nothing (not even SETTINGS, no PING answer):
    after the keep-alive PING goes unanswered the proxy gives up: 502, not a hang."""
    import socket
    import threading
    import time

    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = srv.accept()
                held.append(c)  # read nothing, write nothing

    threading.Thread(target=accept, daemon=True).start()
    try:
        with ProxyProcess(app=srv.getsockname()[1],
                          env={"MESHLET_H2_KEEPALIVE": "200ms"}) as p:
            assert p.inbound_port is not None
            t0 = time.monotonic()
            status, fields, _b = curl(p.inbound_port, "/x")
            took = time.monotonic() - t0
            assert status == 502, fields
            assert 0.3 < took < 3, took
    finally:
        srv.close()
        for c in held:
            c.close()


def test_abandoned_request_bodies_do_not_shrink_the_connection_window() -> None:
    """Streams that end early (here: a dead upstream answers 502 while the body is still
    coming) must give their unforwarded bytes back to the connection window, or a busy
    client connection stalls after a few dozen such streams."""
    import time

    import h2.events
    import h2.exceptions

    dead = free_port()
    with ProxyProcess(app=dead) as p:
        assert p.inbound_port is not None
        s, c = _h2_client_socket(p.inbound_port)
        s.settimeout(5)
        body = b"z" * 60000
        answered = 0

        def pump() -> None:
            nonlocal answered
            data = s.recv(1 << 20)
            assert data, "proxy closed the connection"
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    answered += 1
            out = c.data_to_send()
            if out:
                s.sendall(out)

        for i in range(40):  # 40 x 60 KB = 2.4 MB, more than twice the 1 MiB window
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                 (b":path", b"/up"), (b":authority", b"t")])
            s.sendall(c.data_to_send())
            sent = 0
            deadline = time.monotonic() + 5
            while sent < len(body):
                try:
                    n = min(len(body) - sent, c.local_flow_control_window(sid),
                            c.max_outbound_frame_size)
                except (h2.exceptions.StreamClosedError, KeyError):
                    break  # the proxy reset it after answering: fine
                if n > 0:
                    try:
                        c.send_data(sid, body[sent:sent + n])
                    except h2.exceptions.StreamClosedError:
                        break
                    sent += n
                    s.sendall(c.data_to_send())
                    continue
                assert time.monotonic() < deadline, f"stalled on stream {i}: no window"
                pump()
            with contextlib.suppress(h2.exceptions.StreamClosedError, KeyError):
                c.end_stream(sid)
                s.sendall(c.data_to_send())
        deadline = time.monotonic() + 5
        while answered < 40 and time.monotonic() < deadline:
            pump()
        s.close()
        assert answered == 40


def test_h2_request_waits_for_an_endpoint(h2app: H2Backend, tmp_path: Path) -> None:
    """An HTTP/2 request to a destination without a ready endpoint is held (as HTTP/1
    ones are), then sent when one appears; with none for the fail-fast timeout, 503."""
    import threading
    import time

    mesh_file = tmp_path / "mesh.yaml"
    text = ("services:\n  - name: h2app\n    ports: [80]\n    meshed: false\n"
            "    workloads: [{address: \"127.0.0.1:%d\", ready: %s}]\n")
    write_mesh(mesh_file, text % (h2app.port, "false"))
    gen = start_control(tmp_path / "control", mesh_file=mesh_file)
    control = next(gen)
    try:
        with ProxyProcess(outbound={"h2app:80": ""}, ready_timeout=15,
                          env=proxy_env(control, tmp_path / "a", "client")) as a:
            port = a.outbound["h2app:80"]
            t0 = time.monotonic()
            status, fields, _body = curl(port, "/none")
            assert (status, fields.get("meshlet-proxy-error")) == (503, "no_endpoints")
            assert 2.5 < time.monotonic() - t0 < 6
            got: list[tuple[int, bytes]] = []
            t = threading.Thread(target=lambda: got.append(curl(port, "/later")[::2]))
            t.start()
            time.sleep(0.5)
            write_mesh(mesh_file, text % (h2app.port, "true"))
            t.join(10)
            assert got == [(200, b"hello from h2 /later client=-\n")]
            m = a.metrics()
            assert metric(m, "request_total", direction="outbound") == 2
            assert metric(m, "response_total", direction="outbound", status_code="503") == 1
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)


def test_upstream_reset_after_the_head_settles_the_balancer(h2app: H2Backend) -> None:
    """A stream the app resets after its response head: the client's stream is reset,
    and the endpoint's count of requests in flight (the balancer's load) goes back to 0."""
    eps = (f"services:\n  - name: web\n    port: 80\n    endpoints:\n"
           f"      - addr: 127.0.0.1:{h2app.port}\n")
    with ProxyProcess(outbound={"web:80": ""}, endpoints=eps) as a:
        import h2.events

        port = a.outbound["web:80"]
        s, c = _h2_client_socket(port)
        with s:
            seen: list[tuple[str, int]] = []
            for _ in range(3):
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                     (b":path", b"/headreset"), (b":authority", b"web")],
                               end_stream=True)
                s.sendall(c.data_to_send())
                while not any(k == "reset" and i == sid for k, i in seen):
                    data = s.recv(65536)
                    assert data, "connection closed"
                    for ev in c.receive_data(data):
                        if isinstance(ev, h2.events.ResponseReceived):
                            seen.append(("head", ev.stream_id))
                        elif isinstance(ev, h2.events.StreamReset):
                            seen.append(("reset", ev.stream_id))
                    s.sendall(c.data_to_send())
            # Each stream: the head, then the reset the app made.
            assert seen == [(k, i) for i in (1, 3, 5) for k in ("head", "reset")]
        assert curl(port, "/ok")[0] == 200

        def in_flight() -> list[Any]:
            eps_view = a.admin_get("/config").json()["endpoints"]["web:80"]["endpoints"]
            return [e["in_flight"] for e in eps_view]

        assert in_flight() == [0]
