"""Opaque TCP: bytes both ways, with backpressure and half-close.

Rules:
1. Each side is a Protocol that writes what it reads to the other side's transport.
2. When a side's transport says `pause_writing` (past `HIGH_WATER` queued), the other
   side stops reading, and resumes on `resume_writing`: memory stays bounded by the
   transports' high-water marks.
3. EOF from one side becomes `write_eof()` (a FIN) on the other; the connection closes
   when both directions have ended, or at once on an error (reset).
4. Socket reads go straight into one 1 MiB process-wide buffer (`BufferedProtocol`): no
   copy into a `bytes` object, and a quarter of the reads (and of the ACKs back to the
   sender) of uvloop's own 256 KB buffer. The buffer is free again as soon as
   `buffer_updated` returns, so nothing may keep a view of it: to a plain TCP peer the
   relay writes it to the socket itself and hands the transport a copy of only what the
   socket did not take (or all of it, behind output already queued); transports that
   copy what they are given (mux streams) get the view; any other (TLS) gets a copy.
   Transports that hand over `bytes` (mux streams) call `data_received` instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

try:
    from uvloop.loop import TCPTransport  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - uvloop is a dependency; without it, copies
    TCPTransport = None

from meshlet.api.endpoints import Endpoint
from meshlet.proxy.balance import RESOLVE_TIMEOUT
from meshlet.proxy.mtls import ALPN_TCP, open_upstream

if TYPE_CHECKING:
    from meshlet.metrics.registry import TcpStats
    from meshlet.proxy.balance import EpState
    from meshlet.proxy.context import ListenerCtx

__all__ = ["splice", "start_relay"]

log = logging.getLogger("meshlet.tcp")

# Bytes queued for one side before the other stops being read: at most 2 x (1 MiB + one
# 1 MiB read) per relayed connection, like Envoy's default per-connection buffer limit
# of 1 MiB; with `max_connections` that bounds the whole process. A mux stream pauses at
# its own 256 KiB (plus one read); a TLS transport also holds what it has encrypted and
# not yet sent, under uvloop's flow control.
HIGH_WATER = 1 << 20

# Rule 4. A private anonymous mapping, made at the first relayed read: its pages count in
# RSS only once a read has touched them.
READ_SIZE = 1 << 20
_read_view: memoryview | None = None

# How a side writes to its peer's transport (rule 4): `_pair` sets `out_fd` to the socket
# for a plain TCP transport, or to one of these.
_COPY = -1  # the transport may keep what it is given (TLS, unknown): give it a copy
_VIEW = -2  # the transport copies (mux streams: `copies_writes`): give it the view


def _read_buffer() -> memoryview:
    global _read_view
    if _read_view is None:
        import mmap  # a shared library: loaded only by proxies that relay

        _read_view = memoryview(mmap.mmap(-1, READ_SIZE, flags=mmap.MAP_PRIVATE))
    return _read_view


def _out_fd(transport: asyncio.Transport) -> int:
    if TCPTransport is not None and type(transport) is TCPTransport:
        sock = transport.get_extra_info("socket")
        return int(sock.fileno()) if sock is not None else _COPY  # closed: -1 or None
    return _VIEW if getattr(transport, "copies_writes", False) else _COPY


class _Side(asyncio.BufferedProtocol):
    __slots__ = ("eof", "out_fd", "peer", "pending", "reads", "transport", "writes")

    def __init__(self, reads: TcpStats, writes: TcpStats) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer: _Side | None = None
        self.out_fd = _COPY  # how to write to the peer (rule 4), set by `_pair`
        self.eof = False
        self.pending: list[bytes] = []  # read before the peer exists; flushed by `_pair`
        self.reads = reads  # stats counting bytes read on this side
        self.writes = writes  # stats counting bytes written out on the peer's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        data = _read_buffer()[:nbytes]
        self.reads.read_bytes += nbytes
        peer = self.peer
        if peer is None:
            self.pending.append(bytes(data))
            self.transport.pause_reading()  # bounded: nothing more until paired
            return
        self.writes.write_bytes += nbytes
        out = peer.transport
        fd = self.out_fd
        if fd == _VIEW:
            out.write(data)
        else:
            if fd >= 0 and not out.get_write_buffer_size() and not out.is_closing():
                try:
                    sent = os.write(fd, data)
                except OSError:  # EAGAIN; or an error the transport meets on its write
                    sent = 0
                if sent == nbytes:
                    return
                data = data[sent:]
            out.write(bytes(data))
        self._bound(out)

    def _bound(self, out: asyncio.WriteTransport) -> None:
        # Rule 2 without relying on pause_writing alone: a transport calls it only when it
        # crosses its mark, and one that was already paused when the relay took it over
        # (an HTTP Upgrade after a large response) never calls it again. It does call
        # resume_writing once drained, which resumes this side.
        if out.get_write_buffer_size() > HIGH_WATER:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.reads.read_bytes += len(data)
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)
            self.writes.write_bytes += len(data)
            self._bound(peer.transport)
        else:
            self.pending.append(data)
            self.transport.pause_reading()  # bounded: nothing more until paired

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:
            return True  # not paired yet: `_pair` forwards the FIN
        if peer.eof:
            self.transport.close()
            peer.transport.close()
            return True
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        self.peer = None
        if peer is not None:
            peer.peer = None
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.eof:
            peer.transport.resume_reading()

    def shutdown(self) -> None:
        """Graceful shutdown: byte streams are left to finish within the grace period."""


def _pair(a: _Side, b: _Side) -> None:
    """Join two sides: flush what each read before, forward early FINs, read on."""
    a.peer = b
    b.peer = a
    a.out_fd = _out_fd(b.transport)
    b.out_fd = _out_fd(a.transport)
    for side in (a, b):
        # Reading pauses only past HIGH_WATER queued for the peer (rule 2): fewer
        # pause/resume cycles on bulk transfers than uvloop's 64 KiB default.
        side.transport.set_write_buffer_limits(high=HIGH_WATER)
    for src, dst in ((a, b), (b, a)):
        for chunk in src.pending:
            dst.transport.write(chunk)
            src.writes.write_bytes += len(chunk)
        src.pending = []
    for src, dst in ((a, b), (b, a)):
        if src.eof:
            if dst.eof:
                a.transport.close()
                b.transport.close()
                return
            if dst.transport.can_write_eof():
                dst.transport.write_eof()
    for side in (a, b):
        if not side.eof:
            side.transport.resume_reading()


class _Client(_Side):
    """The accepted side: counts the client connection, open until both ends close."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: ListenerCtx) -> None:
        super().__init__(ctx.tcp_src, ctx.tcp_dst)
        self.ctx = ctx

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.tcp_src.closed += 1
        self.ctx.proxy.conns.discard(self)
        self.ctx.proxy.conn_closed()
        super().connection_lost(exc)


class _Upstream(_Side):
    __slots__ = ("ctx", "es")

    def __init__(self, ctx: ListenerCtx) -> None:
        super().__init__(ctx.tcp_dst, ctx.tcp_src)
        self.ctx = ctx
        self.es: EpState | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.ctx.tcp_dst.opened += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.tcp_dst.closed += 1
        if self.es is not None:
            self.es.pending -= 1
            self.es = None
        super().connection_lost(exc)


def splice(
    ctx: ListenerCtx,
    client: asyncio.Transport,
    upstream: asyncio.Transport,
    to_upstream: bytes,
    to_client: bytes,
) -> None:
    """Turn an HTTP connection pair into a byte pipe (after a 101 Switching Protocols).
    The caller has already accounted for both connections as open."""
    c = _Client(ctx)
    u = _Upstream(ctx)
    client.set_protocol(c)
    upstream.set_protocol(u)
    c.transport = client
    u.transport = upstream
    ctx.proxy.conns.add(c)
    if to_upstream:
        c.pending.append(to_upstream)
    if to_client:
        u.pending.append(to_client)
    _pair(c, u)


def start_relay(ctx: ListenerCtx, transport: asyncio.Transport, first: bytes) -> None:
    """Take over an accepted connection as an opaque TCP relay."""
    client = _Client(ctx)
    transport.set_protocol(client)
    client.connection_made(transport)
    ctx.proxy.conns.add(client)
    if first:
        ctx.tcp_src.read_bytes += len(first)
        client.pending.append(first)
    transport.pause_reading()  # until the upstream is connected
    ep = ctx.target.pick()
    if ep is None and not ctx.target.pending:
        _no_endpoints(ctx, transport)
        return
    ctx.loop.create_task(_connect(ctx, client, ep))


def _no_endpoints(ctx: ListenerCtx, transport: asyncio.Transport) -> None:
    ctx.metrics.counter("tcp_connect_errors_total", "Opaque TCP connections that found "
                        "no upstream, by reason.",
                        (("direction", ctx.direction), ("reason", "no_endpoints")))
    transport.close()


def _upstream_factory(ctx: ListenerCtx) -> Callable[[], asyncio.Protocol]:
    # A _Side is a BufferedProtocol for sockets and TLS, and has the `data_received` that
    # mux streams call, so it serves wherever an asyncio.Protocol is expected.
    return cast("Callable[[], asyncio.Protocol]", lambda: _Upstream(ctx))


async def _connect(ctx: ListenerCtx, client: _Client, ep: Endpoint | None) -> None:
    if ep is None:  # none yet: wait for one (fail-fast timeout)
        await ctx.target.wait_ready(RESOLVE_TIMEOUT)
        ep = ctx.target.pick()
        if client.transport.is_closing():
            return
        if ep is None:
            _no_endpoints(ctx, client.transport)
            return
    target = ctx.target
    attempts = min(3, max(1, len(target.endpoints())))
    for attempt in range(attempts):
        try:
            _t, up = await open_upstream(ctx, ep, _upstream_factory(ctx), ALPN_TCP)
        except (OSError, TimeoutError) as e:
            if ctx.fixed is None:
                target.connect_failed(ep)
            reason = "connect_timeout" if isinstance(e, TimeoutError) else "connect_failed"
            log.debug("tcp connect to %s failed: %s", ep.addr, e)
            if ctx.fixed is not None:
                ctx.proxy.app_unreachable(reason)
            ctx.metrics.counter("tcp_connect_errors_total", "Opaque TCP connections that "
                                "found no upstream, by reason.",
                                (("direction", ctx.direction), ("reason", reason)))
            nxt = ctx.target.pick(exclude=ep) if attempt + 1 < attempts else None
            if nxt is None:
                break
            ep = nxt
            continue
        if ctx.fixed is not None and ctx.proxy.app_down is not None:
            ctx.proxy.app_reachable()
        if client.transport.is_closing():
            up.transport.close()
            return
        if ctx.fixed is None:
            up.es = target.opened(ep)  # open connections: the balancer's in-flight load
        _pair(client, up)
        return
    client.transport.abort()  # a reset tells the client the upstream was unreachable
