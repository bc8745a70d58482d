"""HTTP/1.1 through the inbound listener with real clients: curl, raw sockets,
websockets; plus the errors the proxy makes up itself (502, 503, 504)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import time
from typing import Any

import pytest
from helpers import (
    BLOCK,
    HttpBackend,
    ProxyProcess,
    ResponseReader,
    WsEchoServer,
    connect,
    eventually,
    free_port,
    http_request,
    metric,
)


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", str(int(timeout)), *args],
        capture_output=True, text=True, timeout=timeout + 5, env=env,
    )


def json_objects(text: str) -> list[Any]:
    dec = json.JSONDecoder()
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        obj, pos = dec.raw_decode(text, pos)
        out.append(obj)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def test_curl_keep_alive_reuses_one_connection(backend: HttpBackend, start_proxy: Any) -> None:
    p: ProxyProcess = start_proxy(app=backend.port)
    r = curl("-v", f"{p.url}/one", f"{p.url}/two")
    assert r.returncode == 0, r.stderr
    assert "Re-using existing connection" in r.stderr, r.stderr
    one, two = json_objects(r.stdout)
    assert (one["path"], two["path"]) == ("/one", "/two")
    # The proxy kept its upstream connection too.
    assert one["conn"] == two["conn"]
    assert backend.n_connections == 1
    m = p.metrics()
    assert metric(m, "tcp_open_total", direction="inbound", peer="src") == 1
    assert metric(m, "request_total", direction="inbound") == 2
    assert metric(m, "response_total", direction="inbound", status_code="200") == 2
    # curl has gone: its connection is closed; the upstream one stays pooled.
    eventually(lambda: metric(p.metrics(), "tcp_open_connections", direction="inbound",
                              peer="src") == 0)
    assert metric(p.metrics(), "tcp_open_connections", direction="inbound", peer="dst") == 1


def test_curl_chunked_upload_arrives_intact(backend: HttpBackend, start_proxy: Any,
                                            tmp_path: Any) -> None:
    p = start_proxy(app=backend.port)
    data = os.urandom(3 * 1024 * 1024 + 17)
    f = tmp_path / "upload.bin"
    f.write_bytes(data)
    r = curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}",
             f"{p.url}/upload")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    headers = {k.lower(): v for k, v in info["headers"]}
    assert headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in headers
    assert info["body_len"] == len(data)
    assert info["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_curl_expect_100_continue(backend: HttpBackend, start_proxy: Any,
                                  tmp_path: Any) -> None:
    p = start_proxy(app=backend.port)
    data = os.urandom(200_000)
    f = tmp_path / "body.bin"
    f.write_bytes(data)
    t0 = time.monotonic()
    # A long expect timeout: curl must get the 100 through the proxy, not give up waiting.
    r = curl("-v", "-H", "Expect: 100-continue", "--expect100-timeout", "10",
             "--data-binary", f"@{f}", f"{p.url}/continue")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "HTTP/1.1 100 Continue" in r.stderr, r.stderr
    info = json.loads(r.stdout)
    headers = {k.lower(): v for k, v in info["headers"]}
    assert headers.get("expect", "").lower() == "100-continue"
    assert info["sent_100"] is True
    assert info["body_len"] == len(data)
    assert info["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert elapsed < 5, f"took {elapsed:.1f}s: the 100 Continue was held back"


def test_websocket_echo_through_proxy(stack: contextlib.ExitStack, start_proxy: Any) -> None:
    from websockets.sync.client import connect as ws_connect

    srv = stack.enter_context(WsEchoServer())
    p = start_proxy(app=srv.port)
    with ws_connect(f"ws://127.0.0.1:{p.inbound_port}/chat", open_timeout=5,
                    close_timeout=2) as ws:
        assert ws.recv(timeout=5) == "hello from server"
        for i in range(5):
            ws.send(f"message {i}")
            assert ws.recv(timeout=5) == f"message {i}"
        blob = os.urandom(512 * 1024)
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
        assert ws.ping().wait(5)
    m = p.metrics()
    assert metric(m, "response_total", direction="inbound", status_code="101") == 1
    # Both ends closed the WebSocket: the proxy must close both of its connections too.
    eventually(lambda: metric(p.metrics(), "tcp_open_connections", direction="inbound") == 0,
               timeout=3)


def test_pipelined_requests_answered_in_order(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port)
    reqs = (
        b"GET /delay/200 HTTP/1.1\r\nHost: t\r\n\r\n"  # slow first: order must hold
        b"POST /p2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /p3 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    with connect(p.inbound_port) as s:
        s.sendall(reqs)  # one write
        rd = ResponseReader(s)
        got = [rd.read() for _ in range(3)]
        assert [r.status for r in got] == [200, 200, 200]
        assert [r.json()["path"] for r in got] == ["/delay/200", "/p2", "/p3"]
        assert got[1].json()["body_len"] == 5
        assert len({r.json()["conn"] for r in got}) == 1  # one upstream connection, reused
        assert not rd.buf, "no bytes beyond the three responses"


def test_meshlet_headers_stripped_inbound(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port)
    # Through curl (its usual head) ...
    r = curl("-H", "meshlet-client-id: evil", "-H", "Meshlet-Other: x", "-H", "X-Keep: yes",
             f"{p.url}/strip1")
    assert r.returncode == 0, r.stderr
    # ... and a minimal keep-alive head (no Connection field).
    with connect(p.inbound_port) as s:
        s.sendall(b"GET /strip2 HTTP/1.1\r\nHost: t\r\nmeshlet-client-id: evil\r\n\r\n")
        r2 = ResponseReader(s).read()
    assert r2.status == 200
    for info in (json.loads(r.stdout), r2.json()):
        names = [k.lower() for k, _v in info["headers"]]
        assert not [n for n in names if n.startswith("meshlet-")], info["headers"]
    assert "x-keep" in [k.lower() for k, _v in json.loads(r.stdout)["headers"]]
    assert b"meshlet-" not in backend.received().lower()


# --- proxy-made errors -----------------------------------------------------------------


def test_upstream_refused_gives_502(start_proxy: Any) -> None:
    p = start_proxy(app=free_port())  # nothing listens there
    with connect(p.inbound_port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        rd = ResponseReader(s)
        r = rd.read()
        assert r.status == 502, r
        assert "refused" in (r.header("meshlet-proxy-error") or ""), r
        assert rd.closed()


def test_upstream_reset_gives_502(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port)
    r = http_request(p.inbound_port, path="/reset")
    assert r.status == 502, r
    assert r.header("meshlet-proxy-error"), r


def test_no_endpoints_gives_503(start_proxy: Any) -> None:
    p = start_proxy(outbound={"web:80": "", "api:8080": ""}, endpoints=(
        "services:\n- name: web\n  port: 80\n  endpoints: []\n"))
    for svc in ("web:80", "api:8080"):  # empty, and absent from the file
        r = http_request(p.outbound[svc])
        assert r.status == 503, (svc, r)
        assert r.header("meshlet-proxy-error") == "no_endpoints", r


def test_response_timeout_gives_504(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port, env={"MESHLET_RESPONSE_TIMEOUT": "500ms"})
    t0 = time.monotonic()
    with connect(p.inbound_port) as s:
        s.sendall(b"GET /noanswer HTTP/1.1\r\nHost: t\r\n\r\n")
        rd = ResponseReader(s)
        r = rd.read()
        elapsed = time.monotonic() - t0
        assert r.status == 504, r
        assert "timeout" in (r.header("meshlet-proxy-error") or ""), r
        assert rd.closed()
    assert 0.4 <= elapsed < 3, elapsed


@pytest.mark.parametrize("kind", ["cl_te", "bad_chunk", "bare_lf", "dup_cl", "garbage"])
def test_malformed_response_gives_502(backend: HttpBackend, start_proxy: Any,
                                      kind: str) -> None:
    p = start_proxy(app=backend.port)
    with connect(p.inbound_port) as s:
        s.sendall(f"GET /malformed/{kind} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        rd = ResponseReader(s)
        r = rd.read()
        assert r.status == 502, r
        assert r.header("meshlet-proxy-error"), r
        assert rd.closed()
    m = p.metrics()
    assert metric(m, "http_response_errors_total", direction="inbound") == 1


@pytest.mark.parametrize("kind", ["cl_te", "bad_chunk"])
def test_malformed_response_counted_once_as_502(backend: HttpBackend, start_proxy: Any,
                                                kind: str) -> None:
    """One request, one response in the metrics: the 502 the client got, not also the
    200 the upstream started to send."""
    p = start_proxy(app=backend.port)
    r = http_request(p.inbound_port, path=f"/malformed/{kind}")
    assert r.status == 502, r
    m = p.metrics()
    assert metric(m, "request_total", direction="inbound") == 1
    assert metric(m, "response_total", direction="inbound", status_code="502") == 1
    assert metric(m, "response_total", direction="inbound") == 1, {
        k: v for k, v in m.items() if k[0] == "response_total"}


@pytest.mark.parametrize("request_head", [
    b"GET /close HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"GET /close10 HTTP/1.0\r\nHost: t\r\n\r\n",
], ids=["http11-connection-close", "http10"])
def test_client_asking_to_close_gets_close(backend: HttpBackend, start_proxy: Any,
                                           request_head: bytes) -> None:
    p = start_proxy(app=backend.port)
    with connect(p.inbound_port) as s:
        s.sendall(request_head)
        rd = ResponseReader(s)
        r = rd.read()
        assert r.status == 200, r
        assert (r.header("connection") or "").lower() == "close", r
        assert rd.closed(2), "the proxy must close after answering a request that asked it to"


# --- framing of responses and connection lifetimes --------------------------------------


def test_head_response_has_no_body(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port)
    with connect(p.inbound_port) as s:
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        rd = ResponseReader(s)
        r1 = rd.read("HEAD")
        assert r1.status == 200 and int(r1.header("content-length") or 0) > 0
        r2 = rd.read()
        assert r2.json()["path"] == "/after", "the HEAD response must not eat the next one"


@pytest.mark.parametrize("code", [204, 304])
def test_bodyless_statuses_keep_alive(backend: HttpBackend, start_proxy: Any,
                                      code: int) -> None:
    p = start_proxy(app=backend.port)
    with connect(p.inbound_port) as s:
        rd = ResponseReader(s, timeout=5)
        s.sendall(b"GET /status/%d HTTP/1.1\r\nHost: t\r\n\r\n" % code)
        assert rd.read().status == code
        s.sendall(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        assert rd.read().json()["path"] == "/after"


def test_chunked_response_streamed(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port)
    n = 3 * 1024 * 1024 + 5
    with connect(p.inbound_port) as s:
        rd = ResponseReader(s)
        s.sendall(b"GET /chunked/%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
        r = rd.read()
        assert r.status == 200
        assert r.body == BLOCK[:n]
        s.sendall(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")  # still usable
        assert rd.read().json()["path"] == "/after"


def test_response_delimited_by_close(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port)
    with connect(p.inbound_port) as s:
        s.sendall(b"GET /untilclose/300000 HTTP/1.1\r\nHost: t\r\n\r\n")
        rd = ResponseReader(s)
        r = rd.read()
        assert r.status == 200
        assert r.body == BLOCK[:300000]
        assert rd.eof


def test_stale_pooled_connection_is_retried(backend: HttpBackend, start_proxy: Any) -> None:
    """The backend closes its keep-alive connection right after answering, without
    saying so; the next GET must not fail because the proxy's pooled copy is dead."""
    p = start_proxy(app=backend.port)
    for i in range(5):
        r = http_request(p.inbound_port, path="/closeafter")
        assert r.status == 200, (i, r)


def test_client_half_close_after_request(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port)
    with connect(p.inbound_port) as s:
        s.sendall(b"GET /delay/100 HTTP/1.1\r\nHost: t\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        rd = ResponseReader(s)
        r = rd.read()
        assert r.status == 200 and r.json()["path"] == "/delay/100"
        assert rd.closed(2)


def test_idle_keep_alive_timeout(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port, env={"MESHLET_IDLE_TIMEOUT": "500ms"})
    with connect(p.inbound_port) as s:
        rd = ResponseReader(s)
        s.sendall(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        assert rd.read().status == 200
        t0 = time.monotonic()
        assert rd.closed(3)
        assert 0.4 <= time.monotonic() - t0 < 2.5


def test_header_read_timeout_408(backend: HttpBackend, start_proxy: Any) -> None:
    p = start_proxy(app=backend.port, env={"MESHLET_HEADER_READ_TIMEOUT": "500ms"})
    mark = backend.mark()
    with connect(p.inbound_port) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /slowloris HTTP/1.1\r\nHost: t\r\n")  # never finished
        rd = ResponseReader(s)
        r = rd.read()
        assert r.status == 408, r
        assert r.header("meshlet-proxy-error"), r
        assert 0.4 <= time.monotonic() - t0 < 3
        assert rd.closed(2)
    assert backend.received(mark) == b""


def test_max_connections(backend: HttpBackend, start_proxy: Any,
                         stack: contextlib.ExitStack) -> None:
    p = start_proxy(app=backend.port, env={"MESHLET_MAX_CONNECTIONS": "2"})
    held = []
    for i in range(2):
        s = stack.enter_context(connect(p.inbound_port))
        s.sendall(b"GET /held%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        assert ResponseReader(s).read().status == 200
        held.append(s)
    extra = stack.enter_context(connect(p.inbound_port))
    assert ResponseReader(extra).closed(3), "a connection past the limit is closed at once"
    eventually(lambda: metric(p.metrics(), "tcp_refused_total", direction="inbound") == 1)
    held[0].close()  # room again
    eventually(lambda: http_request(p.inbound_port, path="/again").status == 200)


def test_upgrade_onto_a_paused_client_keeps_the_relay_bounded(stack: contextlib.ExitStack,
                                                              start_proxy: Any) -> None:
    """Clients that read nothing ask for a response with an Upgrade pipelined behind it.
    Where the response's last read left the client's transport past its write mark, the
    101 turns a transport that is already paused into a byte pipe, and uvloop does not
    call pause_writing again for it. The pipe must still stop reading the app once 1 MiB
    is queued. Which response size hits that depends on the kernel's buffers, so 129
    connections try sizes from 1.5 to 5.5 MiB (before the fix one of them let the app push
    0.3-1.1 GiB into the proxy within 1.5 s in 10 runs of 10 here; now each app stalls at
    its socket buffers)."""
    import threading

    stop = threading.Event()
    stack.callback(stop.set)
    after_101: dict[str, int] = {}
    lsock = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=128))

    def serve(c: socket.socket) -> None:
        buf = b""
        with c, contextlib.suppress(OSError):
            while not stop.is_set():
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, buf = buf.split(b"\r\n\r\n", 1)
                path = head.split(b"\r\n")[0].split()[1].decode()
                if b"upgrade: websocket" not in head.lower():
                    n = int(path.rsplit("/", 1)[1])
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                    time.sleep(0.3)  # the body in one burst, after the head
                    c.sendall(b"y" * n)
                    continue
                c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                          b"Upgrade: websocket\r\n\r\n")
                c.settimeout(0.2)
                chunk = b"x" * 65536
                after_101[path] = 0
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        after_101[path] += c.send(chunk)
                return

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = lsock.accept()
                threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    p = start_proxy(app=lsock.getsockname()[1])
    before = p.rss_kb()
    for kib in range(1536, 5633, 32):
        s = socket.socket()
        stack.callback(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", p.inbound_port))
        n = kib << 10
        s.sendall(b"GET /big/%d HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /ws/%d HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\n\r\n" % (n, n))
    eventually(lambda: len(after_101) > 0, timeout=10)  # the small ones are piped
    time.sleep(1.5)  # the apps keep sending; the clients read nothing
    worst = max(after_101.items(), key=lambda kv: kv[1])
    grown = p.rss_kb() - before
    assert worst[1] < 64 << 20, f"{worst[0]}: the app pushed {worst[1] >> 20} MiB into a " \
                                f"client reading nothing (proxy RSS +{grown >> 10} MiB)"
    assert grown < 200 * 1024, f"proxy RSS grew {grown >> 10} MiB"
