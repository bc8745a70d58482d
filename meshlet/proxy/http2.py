"""HTTP/2 on the data path: each stream of a client connection is proxied on its own.

A client's HTTP/2 connection (h2c from the app or a client, or mesh TLS with ALPN
`meshlet/h2`) is served by `H2Downstream`; each request is balanced on its own (the
listener's target picks an endpoint per stream) and sent as a stream on a multiplexed
HTTP/2 connection to that endpoint (`H2Upstream`: h2c to the app or an unmeshed
endpoint, mesh TLS with ALPN `meshlet/h2` to a peer proxy). The codec is
`meshlet.proto.http2` (sans-I/O); this module only moves its frames.

Rules:
1. Flow control end to end: DATA received on one leg is acknowledged to its sender only
   once the other leg's codec took it (its window allowed) and that leg's transport is
   not paused. What a window does not allow waits in the stream's queue, bounded by the
   window we granted, so a slow reader slows its writer instead of filling memory.
2. Headers are forwarded as received minus connection-specific fields; `meshlet-*` fields
   from outside are dropped on inbound, and the verified client identity is added as
   `meshlet-client-id` on mesh TLS.
3. Proxy-made errors: 502/503/504 with `meshlet-proxy-error`, or for gRPC requests
   (`content-type: application/grpc...`) a trailers-only response with `grpc-status`
   UNAVAILABLE (14) or DEADLINE_EXCEEDED (4) and `grpc-message`.
4. A reset travels: RST_STREAM from either side resets the other leg's stream. An
   upstream connection that dies fails its streams (502 before the response head, a
   reset after). GOAWAY from an upstream stops new streams on it.
5. Keep-alive: an upstream connection with streams open that hears nothing for
   `MESHLET_H2_KEEPALIVE` (20 s) gets a PING; silent as long again, it is closed and its
   streams fail (a dead peer is found even when no stream has a deadline).
6. Limits: the codec's (concurrent streams, rapid reset, CONTINUATION and HPACK bombs,
   control-frame floods); upstream connections per endpoint are shared up to the peer's
   stream limit; idle upstream connections close after `pool_idle_timeout`, idle client
   connections after `idle_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from meshlet.proto.http2 import Connection as H2Connection
from meshlet.proto.http2 import (
    ConnectionTerminated,
    DataReceived,
    H2Error,
    H2Settings,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    UsageError,
    WindowUpdated,
)
from meshlet.proxy.balance import MAX_WAITERS, RESOLVE_TIMEOUT
from meshlet.proxy.idle import IdleClose
from meshlet.proxy.mtls import ALPN_H2, PeerIdentityError, open_upstream

if TYPE_CHECKING:
    from meshlet.api.endpoints import Endpoint
    from meshlet.metrics.registry import HttpStats
    from meshlet.proxy.balance import EpState
    from meshlet.proxy.context import ListenerCtx

__all__ = ["ALPN_H2", "H2Downstream"]

log = logging.getLogger("meshlet.http2")

CANCEL = 0x8
REFUSED_STREAM = 0x7
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"host"))
_GRPC_UNAVAILABLE = b"14"
_GRPC_DEADLINE = b"4"
_GRPC_DENIED = b"7"
_SETTINGS = H2Settings()  # frozen: one for every connection


class _Stream:
    """One proxied exchange: a downstream stream and its upstream stream."""

    __slots__ = ("deadline", "down", "down_done", "ep", "es", "grpc", "grpc_status", "sent",
                 "sid", "started", "stats", "status", "to_down", "to_up", "uid", "up",
                 "up_done", "waiter")

    def __init__(self, down: H2Downstream, sid: int, stats: HttpStats, grpc: bool,
                 started: float) -> None:
        self.down = down
        self.sid = sid
        self.up: H2Upstream | None = None
        self.uid = 0
        self.stats = stats
        self.grpc = grpc
        self.started = started
        # When the request went out on an upstream connection: the balancer's latency
        # sample starts here, so a new connection's handshake does not count against
        # the endpoint.
        self.sent = started
        self.status = 0  # the response's, once its head went down
        self.ep: Endpoint | None = None
        self.es: EpState | None = None
        # Waiting for the other leg's window (or transport): (data, end_stream) in order,
        # trailers as a tuple of fields with end_stream True.
        self.to_up: deque[tuple[Any, bool]] = deque()
        self.to_down: deque[tuple[Any, bool]] = deque()
        self.up_done = False  # the request was sent whole
        self.down_done = False  # the response was sent whole (or the stream ended)
        self.grpc_status = -1  # from the trailers (or a trailers-only response)
        self.deadline: asyncio.TimerHandle | None = None  # grpc-timeout
        self.waiter: asyncio.Task[None] | None = None  # waiting for an endpoint

    def stop_timers(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.waiter is not None:
            self.waiter.cancel()
            self.waiter = None


def _grpc(headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    for k, v in headers:
        if k == b"content-type":
            return v.startswith(b"application/grpc")
    return False


def _grpc_status(headers: Any) -> int:
    for k, v in headers:
        if k == b"grpc-status":
            return int(v) if v.isdigit() and len(v) <= 3 else 2  # 2: UNKNOWN
    return -1


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a `grpc-timeout` value ("100m", "5S": at most 8 digits and a unit)."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


def _release(st: _Stream) -> None:
    """Credit back to each sender what waits in the stream's queues and will never be
    forwarded now (the stream ended early), so connection windows do not shrink with
    every abandoned stream."""
    n = sum(len(item) for item, _e in st.to_up if not isinstance(item, tuple))
    st.to_up.clear()
    if n:
        st.down.conn.acknowledge_received_data(st.sid, n)
        st.down.flush()
    up = st.up
    m = sum(len(item) for item, _e in st.to_down if not isinstance(item, tuple))
    st.to_down.clear()
    if m and up is not None:
        up.conn.acknowledge_received_data(st.uid, m)
        up.flush()


# Legs with output waiting while one read is being handled: written once at its end, so
# ten multiplexed requests in one read cost one write per leg, not ten.
_batch: list[_Leg] | None = None


def _kept(item: Any) -> Any:
    """An item about to wait in a queue: DATA arrives as a view into the read buffer
    (forwarded at once without a copy), so a waiting one is copied."""
    return bytes(item) if isinstance(item, memoryview) else item


_TO_UP = attrgetter("to_up")
_TO_DOWN = attrgetter("to_down")


def _drain(streams: dict[int, _Stream], stream_id: int,
           queue: Callable[[_Stream], deque[tuple[Any, bool]]],
           send: Callable[[_Stream, Any, bool], bool]) -> None:
    """Send what waits in one direction's queues (of `stream_id`, or of every stream for
    0: a connection-wide window opened) until a window closes again."""
    if stream_id:
        st = streams.get(stream_id)
        targets = [st] if st is not None else []
    else:
        targets = list(streams.values())
    for st in targets:
        q = queue(st)
        while q:
            item, end = q.popleft()
            if not send(st, item, end):
                break


class _Leg(asyncio.Protocol):
    """What both sides share: the codec, the transport and write backpressure."""

    __slots__ = ("conn", "ctx", "paused", "queued", "transport")

    def __init__(self, ctx: ListenerCtx, client_side: bool) -> None:
        self.ctx = ctx
        self.conn = H2Connection(client_side, _SETTINGS)
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.queued = False

    def data_received(self, data: bytes) -> None:
        global _batch
        if _batch is not None:
            self.received(data)
            return
        batch: list[_Leg] = []
        _batch = batch
        try:
            self.received(data)
        finally:
            _batch = None
            for leg in batch:
                leg.queued = False
                leg.write_now()

    def received(self, data: bytes) -> None:
        """What one read carries, handled by the leg (each subclass has its own)."""

    def flush(self) -> None:
        """Write what the codec has queued: now, or at the end of the read being
        handled."""
        if _batch is not None:
            if not self.queued:
                self.queued = True
                _batch.append(self)
            return
        self.write_now()

    def write_now(self) -> None:
        t = self.transport
        if t is None or self.paused:
            return  # the codec keeps (bounded) what waits; drained on resume
        out = self.conn.data_to_send()
        if out:
            t.write(out)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.flush()
        self.on_resume()

    def on_resume(self) -> None:
        pass


class H2Downstream(IdleClose, _Leg):
    """A client's HTTP/2 connection (server side of the codec)."""

    __slots__ = ("client_line", "closing", "deny", "idle_timer", "streams")

    def __init__(self, ctx: ListenerCtx, deny: str | None = None) -> None:
        super().__init__(ctx, False)
        # Refused by the inbound policy (the reason): every request is answered 403, or
        # PERMISSION_DENIED for gRPC, and nothing is forwarded.
        self.deny = deny
        self.streams: dict[int, _Stream] = {}
        self.client_line: bytes = b""  # the verified client identity, on mesh TLS
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closing = False

    # --- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.proxy.conns.add(self)
        self.conn.initiate_connection()
        self.flush()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self.ctx
        had = self.transport is not None
        self.transport = None  # nothing more is written to it
        for st in list(self.streams.values()):
            self._abandon(st)
        self.streams.clear()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if had:
            ctx.proxy.conns.discard(self)
            ctx.tcp_src.closed += 1
            ctx.proxy.conn_closed()

    def shutdown(self) -> None:
        """Graceful: GOAWAY, finish the streams under way, then close."""
        self.closing = True
        with contextlib.suppress(H2Error):
            self.conn.send_goaway(0)
        self.write_now()
        if not self.streams and self.transport is not None:
            self.transport.close()

    def received(self, data: bytes) -> None:
        self.ctx.tcp_src.read_bytes += len(data)
        events = self.conn.receive(data)
        for ev in events:
            if isinstance(ev, DataReceived):
                self._on_data(ev)
            elif isinstance(ev, RequestReceived):
                self._on_request(ev)
            elif isinstance(ev, TrailersReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    self._to_up(st, ev.headers, True)
            elif isinstance(ev, WindowUpdated):
                self._drain_down(ev.stream_id)
            elif isinstance(ev, StreamReset):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    self._abandon(st)
            elif isinstance(ev, ConnectionTerminated):
                if not ev.remote:  # we sent GOAWAY for an error: the connection is over
                    self.write_now()
                    if self.transport is not None:
                        self.transport.close()
                    return
                self.closing = True
        self.flush()

    def on_resume(self) -> None:
        self._drain_down(0)

    # --- requests ---------------------------------------------------------------------

    def _on_request(self, ev: RequestReceived) -> None:
        ctx = self.ctx
        if self.closing:
            self.conn.send_rst(ev.stream_id, REFUSED_STREAM)
            return
        authority = b""
        timeout: float | None = None
        out: list[tuple[bytes, bytes]] = []
        strip = ctx.strip_mesh
        for k, v in ev.headers:
            if k == b":authority":
                authority = v
            elif k in _HOP or (strip and k.startswith(b"meshlet-")):
                continue
            elif k == b"grpc-timeout":
                timeout = grpc_timeout(v)
            out.append((k, v))
        if self.client_line:
            out.append((b"meshlet-client-id", self.client_line))
        st = _Stream(self, ev.stream_id, ctx.by_host.get(authority) or
                     ctx.http_stats(authority), _grpc(ev.headers), ctx.loop.time())
        self.streams[ev.stream_id] = st
        if timeout is not None:
            # The caller's deadline, honoured here too: the proxy answers
            # DEADLINE_EXCEEDED (and resets the upstream stream) if the app is late.
            st.deadline = ctx.loop.call_later(timeout, self._deadline, st)
        if ev.end_stream:
            st.up_done = True
        if self.deny is not None:
            st.stats.requests += 1
            self._fail(st, 403, self.deny)
            return
        target = ctx.target
        if target.pending and ctx.fixed is None:
            # Discovery has no endpoint yet: wait for one (bounded), the request's body
            # waiting in its queue (bounded by the stream window).
            if target.waiters >= MAX_WAITERS:
                st.stats.requests += 1
                self._fail(st, 503, "queue_full")
                return
            st.waiter = ctx.loop.create_task(
                self._wait_target(st, tuple(out), ev.end_stream, authority))
            return
        self._dispatch(st, tuple(out), ev.end_stream, authority)

    async def _wait_target(self, st: _Stream, headers: tuple[tuple[bytes, bytes], ...],
                           end: bool, authority: bytes) -> None:
        target = self.ctx.target
        target.waiters += 1
        try:
            await target.wait_ready(RESOLVE_TIMEOUT)
        finally:
            target.waiters -= 1
        st.waiter = None
        if st.down_done or self.transport is None:
            return
        self._dispatch(st, headers, end, authority)
        self.flush()

    def _dispatch(self, st: _Stream, headers: tuple[tuple[bytes, bytes], ...], end: bool,
                  authority: bytes) -> None:
        """Balance the request and send it on an upstream connection to the endpoint."""
        ctx = self.ctx
        ep = ctx.fixed
        if ep is None:
            es = ctx.target.choose()
            if es is None:
                st.stats.requests += 1
                self._fail(st, 503, "no_endpoints")
                return
            es.pending += 1
            st.es = es
            ep = es.ep
            meshed = ctx.meshed
            if ep.identity and meshed is not None:
                # To a peer proxy over mTLS: the metrics say tls="true".
                st.stats = meshed.by_host.get(authority) or meshed.http_stats(authority)
        st.stats.requests += 1
        st.ep = ep
        up = _pool_get(ctx, ep)
        if up is None:
            up = H2Upstream(ctx, ep)
            _pool_add(ctx, ep, up)
            ctx.loop.create_task(up.connect())
        up.attach(st, headers, end)

    def _deadline(self, st: _Stream) -> None:
        st.deadline = None
        if st.down_done:
            return
        if st.ep is None:  # still waiting for an endpoint: count the request now
            st.stats.requests += 1
        up = st.up
        self._fail(st, 504, "deadline_exceeded")
        if up is not None:
            up.cancel(st)
        self.flush()

    def _on_data(self, ev: DataReceived) -> None:
        st = self.streams.get(ev.stream_id)
        if st is None:
            self.conn.acknowledge_received_data(ev.stream_id, len(ev.data))
            return
        self._to_up(st, ev.data, ev.end_stream)

    def _to_up(self, st: _Stream, item: Any, end: bool) -> None:
        """Request DATA (bytes) or trailers (fields) for the upstream leg, in order."""
        if end:
            st.up_done = True
        up = st.up
        if up is None or up.transport is None or st.to_up or up.paused:
            st.to_up.append((_kept(item), end))
            return
        up.send_item(st, item, end)
        up.flush()

    # --- responses --------------------------------------------------------------------

    def response_head(self, st: _Stream, ev: ResponseReceived) -> None:
        headers = [(k, v) for k, v in ev.headers if k not in _HOP]
        if ev.status >= 200:
            st.status = ev.status
            if st.grpc and ev.end_stream:
                st.grpc_status = _grpc_status(headers)
        try:
            self.conn.send_headers(st.sid, headers, ev.end_stream)
        except UsageError:
            return
        if ev.end_stream:
            self._finished(st)
        self.flush()

    def to_down(self, st: _Stream, item: Any, end: bool) -> None:
        if st.to_down or self.paused:
            st.to_down.append((_kept(item), end))
            return
        self._send_down(st, item, end)
        self.flush()

    def _send_down(self, st: _Stream, item: Any, end: bool) -> bool:
        """Send one item down; False if it (or part of it) has to wait."""
        conn = self.conn
        try:
            if isinstance(item, tuple):
                if st.grpc:
                    st.grpc_status = _grpc_status(item)
                conn.send_headers(st.sid, item, True)
                self._finished(st)
                return True
            n = conn.send_data(st.sid, item, end)
        except UsageError:
            return True  # the client reset the stream meanwhile: drop
        up = st.up
        if n and up is not None:
            up.conn.acknowledge_received_data(st.uid, n)
            up.flush()
        self.ctx.tcp_src.write_bytes += n
        if n < len(item):
            st.to_down.appendleft((bytes(item[n:]), end))
            return False
        if end:
            self._finished(st)
        return True

    def _drain_down(self, stream_id: int) -> None:
        if not self.paused:
            _drain(self.streams, stream_id, _TO_DOWN, self._send_down)
            self.flush()

    def _finished(self, st: _Stream) -> None:
        """The response went down whole: count it, forget the stream."""
        if st.down_done:
            return
        if st.to_up:
            _release(st)  # answered before the whole request was sent: drop the rest
        latency_ms = (self.ctx.loop.time() - st.started) * 1000.0
        if st.grpc_status >= 0:
            st.stats.grpc_response(st.status or 502, st.grpc_status, latency_ms)
        else:
            st.stats.response(st.status or 502, latency_ms)
        self._end(st, st.status >= 500)

    def _end(self, st: _Stream, failed: bool) -> None:
        """The stream is over for this side (answered, failed or reset): timers off, the
        balancer told, the upstream stream let go, a draining connection closed when its
        last stream ends."""
        st.down_done = True
        st.stop_timers()
        es = st.es
        if es is not None:
            st.es = None
            now = self.ctx.loop.time()
            self.ctx.target.observe(es, now - st.sent, now, failed)
        self.streams.pop(st.sid, None)
        if st.up is not None:
            st.up.detach(st)
        if self.closing and not self.streams and self.transport is not None:
            self.write_now()
            self.transport.close()

    def fail(self, st: _Stream, status: int, reason: str) -> None:
        self._fail(st, status, reason)
        self.flush()

    def _fail(self, st: _Stream, status: int, reason: str) -> None:
        """A proxy-made answer for a stream whose response has not started; once it has,
        all that is left is a reset."""
        if st.down_done:
            return
        _release(st)
        if st.status:  # the head went down already
            self.conn.send_rst(st.sid, CANCEL)
            st.stats.response(st.status, (self.ctx.loop.time() - st.started) * 1000.0)
            self._end(st, True)
            return
        st.status = status
        if st.grpc:
            code = _GRPC_DEADLINE if status == 504 else \
                _GRPC_DENIED if status == 403 else _GRPC_UNAVAILABLE
            headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                       (b"grpc-status", code), (b"grpc-message", reason.encode()),
                       (b"meshlet-proxy-error", reason.encode())]
        else:
            body = f"{status} {reason}\n".encode()
            headers = [(b":status", str(status).encode()),
                       (b"content-type", b"text/plain; charset=utf-8"),
                       (b"content-length", str(len(body)).encode()),
                       (b"meshlet-proxy-error", reason.encode())]
        try:
            if st.grpc:
                self.conn.send_headers(st.sid, headers, True)
            else:
                self.conn.send_headers(st.sid, headers, False)
                self.conn.send_data(st.sid, body, True)
        except UsageError:
            pass
        latency_ms = (self.ctx.loop.time() - st.started) * 1000.0
        if st.grpc:
            st.grpc_status = int(code)
            st.stats.grpc_response(200, st.grpc_status, latency_ms)
        else:
            st.stats.response(status, latency_ms)
        self._end(st, True)

    def reset(self, st: _Stream) -> None:
        """The upstream reset its stream: reset ours (or answer 502 before the head)."""
        self.fail(st, 502, "upstream_reset")

    def _abandon(self, st: _Stream) -> None:
        """The client is gone or reset the stream: reset the upstream one."""
        st.down_done = True
        st.stop_timers()  # a waiter frees its place among the waiters at once
        _release(st)
        es = st.es
        if es is not None:  # the client left: no verdict on the endpoint
            st.es = None
            es.pending -= 1
        up = st.up
        if up is not None:
            up.cancel(st)


class H2Upstream(_Leg):
    """One multiplexed HTTP/2 connection to an endpoint (client side of the codec)."""

    __slots__ = ("closed", "ep", "heard", "idle_timer", "ping_out", "ping_timer", "streams",
                 "waiting")

    def __init__(self, ctx: ListenerCtx, ep: Endpoint) -> None:
        super().__init__(ctx, True)
        self.ep = ep
        self.streams: dict[int, _Stream] = {}
        self.waiting: list[tuple[_Stream, tuple[tuple[bytes, bytes], ...], bool]] = []
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closed = False
        # Keep-alive: while streams are open and the peer is silent for KEEPALIVE
        # seconds, PING; no answer (nothing at all) by the next tick: the peer is gone.
        self.heard = True
        self.ping_out = False
        self.ping_timer: asyncio.TimerHandle | None = None

    def _keepalive(self) -> None:
        self.ping_timer = None
        if self.transport is None or self.closed:
            return
        if self.streams:
            if self.heard:
                self.heard = False
                self.ping_out = False
            elif not self.ping_out:
                self.ping_out = True
                self.conn.ping()
                self.flush()
            else:
                log.warning("HTTP/2 upstream %s silent after a PING: closing it",
                            self.ep.addr)
                self.transport.abort()
                return
        self.ping_timer = self.ctx.loop.call_later(self.ctx.cfg.h2_keepalive, self._keepalive)

    def has_room(self) -> bool:
        if self.closed or self.conn.closed:
            return False
        limit = self.conn.peer_settings.get(0x3, 100)
        return len(self.streams) + len(self.waiting) < limit

    async def connect(self) -> None:
        ctx = self.ctx
        try:
            await open_upstream(ctx, self.ep, lambda: self, ALPN_H2)
        except PeerIdentityError:
            self._fail_all(502, "peer_identity")
        except TimeoutError:
            self._fail_all(504, "connect_timeout")
        except OSError:
            self._fail_all(502, "connect_refused")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ctx = self.ctx
        ctx.tcp_dst.opened += 1
        self.ping_timer = ctx.loop.call_later(ctx.cfg.h2_keepalive, self._keepalive)
        self.conn.initiate_connection()
        waiting, self.waiting = self.waiting, []
        for st, headers, end in waiting:
            if st.down_done:
                continue
            self._start(st, headers, end)
        self.flush()

    def attach(self, st: _Stream, headers: tuple[tuple[bytes, bytes], ...], end: bool) -> None:
        st.up = self
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is None:
            self.waiting.append((st, headers, end))
            return
        self._start(st, headers, end)
        self.flush()

    def _start(self, st: _Stream, headers: tuple[tuple[bytes, bytes], ...], end: bool) -> None:
        conn = self.conn
        uid = conn.get_next_available_stream_id()
        try:
            conn.send_headers(uid, headers, end)
        except UsageError:
            st.down.fail(st, 503, "upstream_unavailable")
            return
        st.uid = uid
        st.sent = self.ctx.loop.time()
        self.streams[uid] = st
        q = st.to_up
        while q:
            item, e = q.popleft()
            if not self.send_item(st, item, e):
                break

    def send_item(self, st: _Stream, item: Any, end: bool) -> bool:
        """Queue request DATA or trailers in the codec (the caller flushes); False if
        it (or its rest) waits for a window."""
        conn = self.conn
        try:
            if isinstance(item, tuple):
                conn.send_headers(st.uid, item, True)
                return True
            n = conn.send_data(st.uid, item, end)
        except UsageError:
            return True  # the upstream reset it meanwhile
        if n:
            st.down.conn.acknowledge_received_data(st.sid, n)
            st.down.flush()
            self.ctx.tcp_dst.write_bytes += n
        if n < len(item):
            st.to_up.appendleft((bytes(item[n:]), end))
            return False
        return True

    def _drain_up(self, uid: int) -> None:
        if not self.paused:
            _drain(self.streams, uid, _TO_UP, self.send_item)
            self.flush()

    def on_resume(self) -> None:
        self._drain_up(0)

    def received(self, data: bytes) -> None:
        ctx = self.ctx
        ctx.tcp_dst.read_bytes += len(data)
        self.heard = True
        for ev in self.conn.receive(data):
            if isinstance(ev, DataReceived):
                st = self.streams.get(ev.stream_id)
                if st is None:
                    self.conn.acknowledge_received_data(ev.stream_id, len(ev.data))
                    continue
                st.down.to_down(st, ev.data, ev.end_stream)
            elif isinstance(ev, ResponseReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.down.response_head(st, ev)
            elif isinstance(ev, TrailersReceived):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.down.to_down(st, ev.headers, True)
            elif isinstance(ev, WindowUpdated):
                self._drain_up(ev.stream_id)
            elif isinstance(ev, StreamReset):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    st.down.reset(st)
            elif isinstance(ev, ConnectionTerminated):
                self.closed = True  # no new streams here
                _pool_remove(ctx, self.ep, self)
                if not ev.remote:
                    self.write_now()
                    if self.transport is not None:
                        self.transport.close()
                    return
                for uid in [u for u in self.streams if u > ev.last_stream_id]:
                    st = self.streams.pop(uid)
                    st.down.fail(st, 503, "upstream_goaway")
        self.flush()

    def detach(self, st: _Stream) -> None:
        """The response went down whole (or failed): nothing more is routed for it. A
        request body still being sent is dropped with a reset (the server answered)."""
        if self.streams.get(st.uid) is st:
            del self.streams[st.uid]
            if self.conn.stream_is_open(st.uid):
                with contextlib.suppress(H2Error):  # NO_ERROR: stop sending us that
                    self.conn.send_rst(st.uid, 0)
                self.flush()
        self._maybe_idle()

    def cancel(self, st: _Stream) -> None:
        if self.streams.pop(st.uid, None) is st:
            with contextlib.suppress(H2Error):
                self.conn.send_rst(st.uid, CANCEL)
            self.flush()
        self.waiting = [w for w in self.waiting if w[0] is not st]
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.streams or self.waiting or self.closed:
            return
        if self.idle_timer is None and self.transport is not None:
            self.idle_timer = self.ctx.loop.call_later(self.ctx.cfg.pool_idle_timeout,
                                                       self._on_idle)

    def _on_idle(self) -> None:
        self.idle_timer = None
        if self.streams or self.waiting:
            return
        self.closed = True
        _pool_remove(self.ctx, self.ep, self)
        if self.transport is not None:
            self.transport.close()

    def _fail_all(self, status: int, reason: str) -> None:
        self.closed = True
        _pool_remove(self.ctx, self.ep, self)
        waiting, self.waiting = self.waiting, []
        for st, _h, _e in waiting:
            st.down.fail(st, status, reason)
        for st in list(self.streams.values()):
            st.down.fail(st, status, reason)
        self.streams.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.ping_timer is not None:
            self.ping_timer.cancel()
            self.ping_timer = None
        if self.transport is not None:
            self.ctx.tcp_dst.closed += 1
        self.transport = None
        self.closed = True
        _pool_remove(self.ctx, self.ep, self)
        for st in list(self.streams.values()):
            st.down.reset(st)
        self.streams.clear()
        waiting, self.waiting = self.waiting, []
        for st, _h, _e in waiting:
            st.down.fail(st, 502, "upstream_closed")


# --- the per-endpoint connections ------------------------------------------------------


def _pool(ctx: ListenerCtx) -> dict[tuple[str, int, str], list[H2Upstream]]:
    return ctx.proxy.h2pool


def _pool_get(ctx: ListenerCtx, ep: Endpoint) -> H2Upstream | None:
    for up in _pool(ctx).get(ep.key, ()):
        if up.has_room():
            return up
    return None


def _pool_add(ctx: ListenerCtx, ep: Endpoint, up: H2Upstream) -> None:
    _pool(ctx).setdefault(ep.key, []).append(up)


def _pool_remove(ctx: ListenerCtx, ep: Endpoint, up: H2Upstream) -> None:
    lst = _pool(ctx).get(ep.key)
    if lst is not None and up in lst:
        lst.remove(up)
        if not lst:
            del _pool(ctx)[ep.key]
