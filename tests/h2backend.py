"""An h2c (HTTP/2 without TLS) test backend built on the `h2` library (an independent
implementation: meshlet's own codec is not used on this side).

Per request: `GET /...` answers 200 with `hello from h2 <path> client=<meshlet-client-id>`;
`POST /echo` streams the request body back; `POST /sum` answers the body's length and a
SHA-256 after reading it whole, with trailers `x-bytes` (like gRPC's status trailers);
`GET /big?n=N` sends N bytes. It runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class _Proto(asyncio.Protocol):
    def __init__(self, server: H2Backend) -> None:
        self.server = server
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        self.t: asyncio.Transport | None = None
        self.bodies: dict[int, Any] = {}
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.pending: dict[int, bytearray] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.server.connections += 1
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.t is not None:
            self.t.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except Exception:  # a broken peer: drop it
            assert self.t is not None
            self.t.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                head = {k: v for k, v in ev.headers}  # type: ignore[misc]
                self.heads[ev.stream_id] = head
                self.server.requests += 1
                self.bodies[ev.stream_id] = hashlib.sha256()
                self.pending[ev.stream_id] = bytearray()
                if head.get(b":path") == b"/echo":
                    self.conn.send_headers(ev.stream_id, [(b":status", b"200")])
                if ev.stream_ended is not None:
                    self.respond(ev.stream_id)
            elif isinstance(ev, h2.events.DataReceived):
                sid = ev.stream_id
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                head = self.heads.get(sid, {})
                self.bodies[sid].update(ev.data)
                self.pending[sid] += ev.data
                if head.get(b":path") == b"/echo":
                    self.send(sid, bytes(self.pending[sid]), False)
                    self.pending[sid].clear()
                if ev.stream_ended is not None:
                    self.respond(sid)
            elif isinstance(ev, h2.events.StreamEnded):
                pass
            elif isinstance(ev, h2.events.StreamReset):
                self.server.resets += 1
                self.out = [i for i in self.out if i[0] != ev.stream_id]
                self.trailers = [t for t in self.trailers if t[0] != ev.stream_id]
            elif isinstance(ev, h2.events.WindowUpdated):
                self.drain()
        self.flush()

    def respond(self, sid: int) -> None:
        head = self.heads[sid]
        path = head.get(b":path", b"/")
        if path == b"/echo":
            self.send(sid, b"", True)
            return
        if path == b"/sum":
            body = b"%d %s" % (len(self.pending[sid]), self.bodies[sid].hexdigest().encode())
            self.conn.send_headers(sid, [(b":status", b"200"),
                                         (b"content-type", b"text/plain")])
            self.send(sid, body, False)
            self.trailers.append((sid, [(b"x-bytes", str(len(self.pending[sid])).encode())]))
            self.drain()
            return
        if path == b"/headreset":  # a response head, then the stream is reset
            self.conn.send_headers(sid, [(b":status", b"200")])
            self.conn.reset_stream(sid)
            self.flush()
            return
        if path.startswith(b"/big?n="):
            n = int(path.split(b"=", 1)[1])
            self.conn.send_headers(sid, [(b":status", b"200")])
            self.send(sid, b"x" * n, True)
            return
        client = head.get(b"meshlet-client-id", b"-").decode()
        body = f"hello from h2 {path.decode()} client={client}\n".encode()
        self.conn.send_headers(sid, [(b":status", b"200"),
                                     (b"content-length", str(len(body)).encode())])
        self.send(sid, body, True)

    trailers: list[tuple[int, list[tuple[bytes, bytes]]]]

    def send(self, sid: int, data: bytes, end: bool) -> None:
        self.out.append([sid, data, end])
        self.drain()

    out: list[list[Any]]

    def drain(self) -> None:
        keep = []
        blocked: set[int] = set()  # streams with an earlier item still waiting: keep order
        for item in self.out:
            sid, data, end = item
            if sid in blocked:
                keep.append(item)
                continue
            try:
                n = min(len(data), self.conn.local_flow_control_window(sid),
                        self.conn.max_outbound_frame_size)
            except Exception:  # stream gone
                continue
            try:
                while data and n > 0:
                    self.conn.send_data(sid, data[:n])
                    data = data[n:]
                    n = min(len(data), self.conn.local_flow_control_window(sid),
                            self.conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                continue
            if data:
                item[1] = data
                keep.append(item)
                blocked.add(sid)
            elif end:
                self.conn.end_stream(sid)
        self.out = keep
        waiting_trailers = []
        for sid, tr in self.trailers:
            if any(i[0] == sid for i in self.out):
                waiting_trailers.append((sid, tr))
            else:
                self.conn.send_headers(sid, tr, end_stream=True)
        self.trailers = waiting_trailers
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.t = None


class H2Backend:
    def __init__(self) -> None:
        self.requests = 0
        self.resets = 0
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        def factory() -> _Proto:
            p = _Proto(self)
            p.out = []
            p.trailers = []
            return p

        self.server = self.loop.run_until_complete(
            self.loop.create_server(factory, sock=self.sock))
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> H2Backend:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
