"""HTTP/1.1 and opaque TCP between proxies over one shared connection (ALPN `meshlet/mux`).

Each HTTP/1.1 or opaque TCP connection the outbound proxy would open to a peer proxy is
instead a stream of a shared HTTP/2 connection over mesh TLS: the stream carries the
connection's bytes unchanged, both ways, as DATA. Nothing is translated, so HTTP/1.1
keeps its exact semantics (framing, 100-continue, trailers, Upgrade); what changes is the
transport: many client connections share one TLS session, one read and one write (one
TLS record) carry the requests or responses of many of them, a new client connection
costs a stream (no handshake), and a half-close crosses the mesh (END_STREAM).

- Outbound (`open_stream`, called by `open_upstream` for `meshlet/h1` and `meshlet/tcp`
  connections to meshed endpoints): the endpoint's mux connection (made on first use, checked
  like any mesh connection: TLS 1.3 and the expected peer identity) opens a stream; the
  stream is a `StreamTransport`, handed to an ordinary `H1Upstream` (which the HTTP/1
  pool keeps and reuses as if it were a TCP connection) or to the TCP relay.
- Inbound (`MuxServer`): each stream is a client connection, served by an ordinary
  `H1Downstream` (strict parsing, policy, `meshlet-client-id`, metrics, app pool) or by
  the TCP relay to the app.

Rules:
1. A `StreamTransport` behaves like an asyncio transport: `write` (queued beyond the
   stream's flow-control window, `pause_writing` on its protocol past `HIGH_WATER`),
   `write_eof` (END_STREAM: half-close crosses the mesh), `close` (END_STREAM after what
   is queued, and RST_STREAM NO_ERROR if the peer still sends), `abort` (RST_STREAM
   CANCEL), `pause_reading` (no WINDOW_UPDATE for what arrives meanwhile: the peer's
   window bounds it). `connection_lost` is called once, from the loop.
2. Writes of every stream are coalesced into one write per loop iteration on the shared
   connection (`call_soon`): the batching is where the saving is.
3. While the shared connection's transport is paused, streams queue their own output
   (bounded by `HIGH_WATER` each, then paused), so the codec's buffer never grows without
   bound.
4. A stream is opened with a minimal request head whose `:path` says what it carries
   (`/h1` or `/tcp`), and answered `:status 200` at once; it ends with END_STREAM or
   RST_STREAM, never with HTTP/2 trailers. Denied by policy: an HTTP/1 stream gets a
   403 and END_STREAM, a TCP stream is reset.
5. Counting: each stream counts as one connection (tcp_* metrics, `max_connections`),
   the shared connection itself only in `max_connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshlet.proto.http2 import Connection as H2Connection
from meshlet.proto.http2 import (
    ConnectionTerminated,
    DataReceived,
    H2Error,
    H2Settings,
    RequestReceived,
    StreamReset,
    TrailersReceived,
    UsageError,
    WindowUpdated,
)
from meshlet.proxy.errors import error_response
from meshlet.proxy.idle import IdleClose
from meshlet.proxy.mtls import ALPN_H1, ALPN_MUX, open_upstream

if TYPE_CHECKING:
    from meshlet.api.endpoints import Endpoint
    from meshlet.proxy.context import ListenerCtx

__all__ = ["H1", "TCP", "MuxServer", "StreamTransport", "open_stream"]

log = logging.getLogger("meshlet.mux")

HIGH_WATER = 256 * 1024  # queued output per stream before its protocol is paused
LOW_WATER = 64 * 1024
STREAM_WINDOW = 1 << 20  # per stream: a bulk transfer is not held back on loopback
CONN_WINDOW = 16 << 20
MAX_STREAMS = 1000  # per shared connection (SETTINGS_MAX_CONCURRENT_STREAMS)
CANCEL = 0x8
REFUSED_STREAM = 0x7

_OPEN_HEAD_START = ((b":method", b"POST"), (b":scheme", b"https"))
H1 = b"/h1"  # what a stream carries (its `:path`): HTTP/1.1 ...
TCP = b"/tcp"  # ... or opaque TCP bytes


# Streams are connections that the HTTP/1 side opens and closes: a client closing many
# quickly is not a rapid-reset attack, but it stays bounded.
_SETTINGS = H2Settings(initial_window_size=STREAM_WINDOW, connection_window_size=CONN_WINDOW,
                       max_concurrent_streams=MAX_STREAMS, max_resets=100000)


class StreamTransport(asyncio.Transport):
    """One stream of a shared connection, seen by its protocol as a connection."""

    copies_writes = True  # `write` keeps no reference to what it is given (tcp.py rule 4)

    __slots__ = ("_eof_done", "_eof_in", "_eof_out", "_lost", "_out", "_out_size",
                 "_paused_in", "_pending_in", "_proto", "_rst_after_eof", "_write_paused",
                 "closing", "leg", "sid")

    def __init__(self, leg: _MuxLeg, sid: int, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.leg = leg
        self.sid = sid
        self._proto = protocol
        self.closing = False
        self._lost = False
        self._eof_out = False  # END_STREAM queued (sent once `_out` drains)
        self._eof_in = False
        self._eof_done = False  # eof_received called
        self._rst_after_eof = False  # the peer ended, then reset NO_ERROR: drain, then lost
        self._out: deque[bytes] = deque()
        self._out_size = 0
        self._write_paused = False
        self._paused_in = False
        self._pending_in: deque[bytes] = deque()  # arrived while reading was paused

    # --- asyncio.Transport ------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        t = self.leg.transport
        return t.get_extra_info(name, default) if t is not None else default

    def is_closing(self) -> bool:
        return self.closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._proto = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._proto

    def is_reading(self) -> bool:
        return not self._paused_in

    def pause_reading(self) -> None:
        self._paused_in = True

    def resume_reading(self) -> None:
        if not self._paused_in:
            return
        self._paused_in = False
        if (self._pending_in or self._eof_in) and not self._lost:
            # Never from inside resume_reading (an asyncio transport does not call
            # data_received there): the protocol may not be ready for it yet.
            self.leg.ctx.loop.call_soon(self._flush_in)

    def _flush_in(self) -> None:
        """Deliver what arrived while reading was paused, in order, until paused again."""
        pending = self._pending_in
        while pending and not self._paused_in and not self._lost:
            self._deliver(pending.popleft())
        if not pending and self._eof_in and not self._paused_in and not self._lost \
                and not self._eof_done:
            self._deliver_eof()

    def _drop_pending(self) -> None:
        """Input that will never be delivered still gives its window back: the shared
        connection's window must not shrink with every stream that ends early."""
        n = sum(len(d) for d in self._pending_in)
        self._pending_in.clear()
        if n:
            self.leg.conn.acknowledge_received_data(self.sid, n)
            self.leg.flush()

    def get_write_buffer_size(self) -> int:
        return self._out_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return LOW_WATER, HIGH_WATER

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None
                                ) -> None:
        pass  # fixed limits

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self._eof_out or not data:
            return
        leg = self.leg
        if self._out or leg.paused:
            self._queue(bytes(data))
            return
        try:
            n = leg.conn.send_data(self.sid, data)
        except UsageError:
            return  # reset meanwhile: dropped, as a closed socket would
        if n < len(data):
            self._queue(bytes(data[n:]))
        leg.flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_out or self.closing:
            return
        self._eof_out = True
        if not self._out:
            self._send_eof()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if not self._eof_out:
            self._eof_out = True
            if not self._out:
                self._send_eof()
        if not self._out:
            self._finish_close()

    def abort(self) -> None:
        if self._lost:
            return
        self.closing = True
        self._out.clear()
        self._out_size = 0
        leg = self.leg
        if leg.conn.stream_is_open(self.sid):
            with contextlib.suppress(H2Error):
                leg.conn.send_rst(self.sid, CANCEL)
            leg.flush()
        self._lost_now(None)

    # --- output -----------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)
        if not self._write_paused and self._out_size > HIGH_WATER:
            self._write_paused = True
            self._proto.pause_writing()

    def drain(self) -> None:
        """Send what waits, as far as the windows allow (a window opened, or the shared
        transport resumed)."""
        leg = self.leg
        out = self._out
        sent = False
        while out and not leg.paused:
            data = out[0]
            try:
                n = leg.conn.send_data(self.sid, data)
            except UsageError:
                out.clear()
                self._out_size = 0
                break
            if n == 0:
                break
            sent = True
            self._out_size -= n
            if n < len(data):
                out[0] = data[n:]
                break
            out.popleft()
        if not out:
            if self._eof_out and not leg.paused:
                self._send_eof()
                sent = True
            if self.closing:
                self._finish_close()
        if sent:
            leg.flush()
        if self._write_paused and self._out_size <= LOW_WATER and not leg.paused:
            self._write_paused = False
            self._proto.resume_writing()

    def _send_eof(self) -> None:
        leg = self.leg
        with contextlib.suppress(UsageError):
            leg.conn.send_data(self.sid, b"", True)
        leg.flush()

    def _finish_close(self) -> None:
        """Everything (and END_STREAM) is sent: if the peer still sends, tell it to stop;
        the protocol hears connection_lost."""
        leg = self.leg
        if leg.conn.stream_is_open(self.sid):
            with contextlib.suppress(H2Error):
                leg.conn.send_rst(self.sid, 0)
            leg.flush()
        self._lost_now(None)

    # --- input (from the leg) ---------------------------------------------------------

    def received(self, data: Any, end: bool) -> None:
        n = len(data)
        if self._lost or self.closing:
            self.leg.conn.acknowledge_received_data(self.sid, n)
            self.leg.flush()
            return
        if n:
            chunk = bytes(data)
            if self._paused_in or self._pending_in:
                self._pending_in.append(chunk)  # in order behind what waits
            else:
                self._deliver(chunk)
        if end:
            self._eof_in = True
            if not self._paused_in and not self._pending_in and not self._lost:
                self._deliver_eof()

    def _deliver(self, chunk: bytes) -> None:
        leg = self.leg
        # Consumed once handed over: the protocol forwards it or pauses us.
        leg.conn.acknowledge_received_data(self.sid, len(chunk))
        leg.flush()
        self._proto.data_received(chunk)

    def _deliver_eof(self) -> None:
        if self._eof_done:
            return
        self._eof_done = True
        keep = self._proto.eof_received()
        if self._lost:
            return
        if self._rst_after_eof:
            self._out.clear()
            self._out_size = 0
            self._lost_now(None)  # the peer is gone for good: nothing more to do
        elif not keep:
            self.close()

    def reset(self, exc: Exception | None, graceful: bool = False) -> None:
        """The peer reset the stream (`graceful`: NO_ERROR after its END_STREAM: what it
        sent is still delivered), or the shared connection is gone."""
        if self._lost:
            return
        self.closing = True
        self._out.clear()
        self._out_size = 0
        if graceful and self._eof_in and not self._eof_done:
            self._rst_after_eof = True  # delivered as reading allows, then lost
            return
        self._drop_pending()
        self._lost_now(exc)

    def _lost_now(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self.closing = True
        self._drop_pending()
        self.leg.forget(self)
        self.leg.ctx.loop.call_soon(self._proto.connection_lost, exc)


class _MuxLeg(asyncio.Protocol):
    """The shared connection: its codec, its streams, one write per loop iteration."""

    def __init__(self, ctx: ListenerCtx, client_side: bool) -> None:
        self.ctx = ctx
        self.conn = H2Connection(client_side, _SETTINGS)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamTransport] = {}
        self.paused = False
        self.scheduled = False
        self.idle_timer: asyncio.TimerHandle | None = None

    def flush(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.ctx.loop.call_soon(self._write)

    def _write(self) -> None:
        self.scheduled = False
        t = self.transport
        if t is None or self.paused:
            return
        out = self.conn.data_to_send()
        if out:
            t.write(out)

    def pause_writing(self) -> None:
        self.paused = True
        # The peer is not reading: read nothing more from it either, so nothing it
        # sends (new streams, PINGs) can grow what we owe it while paused.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        self._write()
        for st in list(self.streams.values()):
            st.drain()

    def forget(self, st: StreamTransport) -> None:
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]
            if not self.streams:
                self.on_empty()

    def on_empty(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        streams = self.streams
        for ev in self.conn.receive(data):  # protocol errors come as events, never raised
            if isinstance(ev, DataReceived):
                st = streams.get(ev.stream_id)
                if st is None:
                    self.conn.acknowledge_received_data(ev.stream_id, len(ev.data))
                    continue
                st.received(ev.data, ev.end_stream)
            elif isinstance(ev, WindowUpdated):
                if ev.stream_id:
                    st = streams.get(ev.stream_id)
                    if st is not None and st._out:
                        st.drain()
                else:
                    for st in list(streams.values()):
                        if st._out or st._eof_out:
                            st.drain()
            elif isinstance(ev, RequestReceived):
                self.on_stream(ev)
            elif isinstance(ev, StreamReset):
                st = streams.get(ev.stream_id)
                if st is not None:
                    code = ev.error_code
                    if code == REFUSED_STREAM:  # not processed: safe to try again
                        st.reset(ConnectionRefusedError("stream refused by the peer"))
                    elif code:
                        st.reset(ConnectionResetError("stream reset by the peer"))
                    else:
                        st.reset(None, graceful=True)
            elif isinstance(ev, TrailersReceived):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.received(b"", True)
            elif isinstance(ev, ConnectionTerminated):
                self.on_goaway(ev)
        self.flush()

    def on_stream(self, ev: RequestReceived) -> None:
        self.conn.send_rst(ev.stream_id, REFUSED_STREAM)

    def on_goaway(self, ev: ConnectionTerminated) -> None:
        if not ev.remote:  # our codec gave up on the peer: the connection is over
            self._write()
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        err = exc or ConnectionResetError("mesh connection closed")
        for st in list(self.streams.values()):
            st.reset(err)
        self.streams.clear()


# --- outbound ----------------------------------------------------------------------------


class MuxClient(_MuxLeg):
    """The outbound side: one per endpoint while it has room for streams."""

    def __init__(self, ctx: ListenerCtx, ep: Endpoint) -> None:
        super().__init__(ctx, True)
        self.ep = ep
        self.closed = False
        self.authority = ep.addr.encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self._write()

    def has_room(self) -> bool:
        if self.closed or self.conn.closed or self.transport is None:
            return False
        limit = self.conn.peer_settings.get(0x3, 100)
        return len(self.streams) < limit

    def open(self, factory: Callable[[], asyncio.Protocol], kind: bytes = H1
             ) -> tuple[StreamTransport, Any]:
        conn = self.conn
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, (*_OPEN_HEAD_START, (b":path", kind),
                                (b":authority", self.authority)))
        proto = factory()
        st = StreamTransport(self, sid, proto)
        self.streams[sid] = st
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.flush()
        proto.connection_made(st)
        return st, proto

    def on_empty(self) -> None:
        if self.idle_timer is None and self.transport is not None and not self.closed:
            self.idle_timer = self.ctx.loop.call_later(self.ctx.cfg.pool_idle_timeout,
                                                       self._on_idle)

    def _on_idle(self) -> None:
        self.idle_timer = None
        if self.streams:
            return
        self._retire()
        if self.transport is not None:
            self.transport.close()

    def _retire(self) -> None:
        self.closed = True
        lst = self.ctx.proxy.muxpool.get(self.ep.key)
        if lst is not None and self in lst:
            lst.remove(self)
            if not lst:
                del self.ctx.proxy.muxpool[self.ep.key]

    def on_goaway(self, ev: ConnectionTerminated) -> None:
        self._retire()  # no new streams here; those under way go on
        if not ev.remote:
            super().on_goaway(ev)
            return
        for sid in [s for s in self.streams if s > ev.last_stream_id]:
            self.streams[sid].reset(ConnectionRefusedError("peer is going away"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._retire()
        super().connection_lost(exc)


class _Connecting:
    """A mux connection being made: later callers wait for it instead of making more.
    Its result is None when the peer turned out not to speak `meshlet/mux`."""

    def __init__(self) -> None:
        self.fut: asyncio.Future[MuxClient | None] = \
            asyncio.get_running_loop().create_future()


def _open_on(mc: MuxClient, factory: Callable[[], asyncio.Protocol], kind: bytes
             ) -> tuple[StreamTransport, Any]:
    try:
        return mc.open(factory, kind)
    except UsageError as e:  # the connection went away between the check and now
        raise ConnectionRefusedError(f"mesh connection unusable: {e}") from None


async def open_stream(ctx: ListenerCtx, ep: Endpoint, factory: Callable[[], asyncio.Protocol],
                      alpn: str) -> tuple[Any, Any]:
    """A new stream to `ep` on its shared mesh connection, as (transport, protocol), for
    what `alpn` (`meshlet/h1` or `meshlet/tcp`) would have carried; `open_upstream`
    calls it. Raises what `open_upstream` raises when the connection cannot be made. A
    peer without `meshlet/mux` gets a connection of its own, now and from then on."""
    proxy = ctx.proxy
    key = ep.key
    kind = H1 if alpn == ALPN_H1 else TCP
    for _ in range(64):  # each turn finds room, or waits for (or makes) a connection
        if key in proxy.no_mux:
            return await open_upstream(ctx, ep, factory, alpn)
        for mc in proxy.muxpool.get(key, ()):
            if mc.has_room():
                return _open_on(mc, factory, kind)
        waiting: _Connecting | None = proxy.muxconnecting.get(key)
        if waiting is not None:
            await asyncio.shield(waiting.fut)  # then look again
            continue
        pending = _Connecting()
        proxy.muxconnecting[key] = pending
        try:
            t, made = await open_upstream(ctx, ep, lambda: MuxClient(ctx, ep), ALPN_MUX)
            ssl_obj = t.get_extra_info("ssl_object")
            if ssl_obj is None or ssl_obj.selected_alpn_protocol() != ALPN_MUX:
                t.abort()
                log.info("%s does not speak %s: one connection per client connection",
                         ep.addr, ALPN_MUX)
                proxy.no_mux.add(key)  # an older peer
                pending.fut.set_result(None)
                continue
        except BaseException as e:
            if not pending.fut.done():
                pending.fut.set_exception(e)
                pending.fut.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            if proxy.muxconnecting.get(key) is pending:
                del proxy.muxconnecting[key]
        mc = made
        proxy.muxpool.setdefault(key, []).append(mc)
        pending.fut.set_result(mc)
        if mc.has_room():
            return _open_on(mc, factory, kind)
    raise ConnectionRefusedError(f"no room for a stream to {ep.addr}")


# --- inbound -----------------------------------------------------------------------------


class _Denied(asyncio.Protocol):
    """A stream refused by policy: it gets its 403, reads nothing, counts its close."""

    def __init__(self, ctx: ListenerCtx) -> None:
        self.ctx = ctx

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.tcp_src.closed += 1
        self.ctx.proxy.conn_closed()


class MuxServer(IdleClose, _MuxLeg):
    """The inbound side of a shared connection: each stream is an HTTP/1 client
    connection (`H1Downstream`) under the connection's identity and policy."""

    def __init__(self, ctx: ListenerCtx, client_line: bytes, deny: str | None) -> None:
        super().__init__(ctx, False)
        self.client_line = client_line
        self.deny = deny  # refused by policy: every stream is answered 403
        self.draining = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.proxy.conns.add(self)
        self.conn.initiate_connection()
        self._write()
        self._arm_idle()

    def on_empty(self) -> None:
        if self.draining and self.transport is not None:
            self._write()
            self.transport.close()

    def shutdown(self) -> None:
        """Graceful: GOAWAY, the streams under way finish (their H1Downstreams are told
        to close after their current response by the proxy's own shutdown)."""
        self.draining = True
        with contextlib.suppress(H2Error):
            self.conn.send_goaway(0)
        self._write()
        if not self.streams and self.transport is not None:
            self.transport.close()

    def on_stream(self, ev: RequestReceived) -> None:
        from meshlet.proxy.http1 import H1Downstream

        ctx = self.ctx
        conn = self.conn
        sid = ev.stream_id
        kind = next((v for k, v in ev.headers if k == b":path"), b"")
        if kind not in (H1, TCP):
            conn.send_rst(sid, REFUSED_STREAM)
            return
        if conn.closed or self.transport is None:
            return  # the codec gave up on this connection earlier in this read
        if self.draining or not ctx.proxy.conn_opened():
            conn.send_rst(sid, REFUSED_STREAM)
            return
        conn.send_headers(sid, ((b":status", b"200"),))
        ctx.tcp_src.opened += 1
        if self.deny is not None:
            if kind == H1:
                # A 403 for the client, then the stream ends (queued like any output).
                st = StreamTransport(self, sid, _Denied(ctx))
                self.streams[sid] = st
                data = error_response(403, self.deny)
                st.write(data)
                ctx.tcp_src.write_bytes += len(data)
                st.close()
            else:
                conn.send_rst(sid, REFUSED_STREAM)  # denied TCP is closed
                ctx.tcp_src.closed += 1
                ctx.proxy.conn_closed()
            return
        if kind == TCP:
            from meshlet.proxy.tcp import start_relay

            st = StreamTransport(self, sid, asyncio.Protocol())
            self.streams[sid] = st
            start_relay(ctx, st, b"")
        else:
            h = H1Downstream(ctx)
            h.client_line = self.client_line
            st = StreamTransport(self, sid, h)
            self.streams[sid] = st
            h.connection_made(st)
        if ev.end_stream:
            st.received(b"", True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.ctx.proxy.conns.discard(self)
            self.ctx.proxy.conn_closed()
        super().connection_lost(exc)
