"""Accepting connections: limits, protocol detection, hand-off.

Rules:
1. Every accepted connection counts against `max_connections`; past it the connection
   is closed at once and counted (`tcp_refused_total`).
2. On opaque targets detection is skipped: the relay starts before any byte is read, so
   server-speaks-first protocols never wait.
3. Otherwise the first bytes decide (`meshlet.proto.detect`) under `detect_timeout`; a
   timeout falls back to opaque TCP and is counted (`protocol_detect_timeout_total`).
4. The chosen handler takes the transport over with `set_protocol`, so detection costs
   nothing after the first bytes.
"""

from __future__ import annotations

import asyncio

from meshlet.proto.detect import Proto, detect
from meshlet.proxy.balance import RESOLVE_TIMEOUT
from meshlet.proxy.context import ListenerCtx
from meshlet.proxy.http1 import H1Downstream
from meshlet.proxy.tcp import start_relay

__all__ = ["Accepted"]


class Accepted(asyncio.Protocol):
    __slots__ = ("buf", "ctx", "timer", "transport", "waiting")

    def __init__(self, ctx: ListenerCtx) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.waiting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = t
        ctx = self.ctx
        proxy = ctx.proxy
        if ctx.orig is not None:
            c = ctx.orig.ctx_for(t.get_extra_info("socket"))
            if c is None:
                ctx.count_no_destination()
                t.abort()
                return
            self.ctx = ctx = c
        if not proxy.conn_opened():
            ctx.count_refused()
            t.abort()
            return
        ctx.tcp_src.opened += 1
        if ctx.target.unresolved:
            # Discovery has not answered for this listener's service yet: whether it is
            # opaque is not known. Read nothing until it is (bounded).
            t.pause_reading()
            self.waiting = True
            ctx.loop.create_task(self._after_resolve())
            return
        self._begin()

    def _begin(self) -> None:
        ctx = self.ctx
        if ctx.target.opaque:
            buf, self.buf = self.buf, b""
            start_relay(ctx, self.transport, buf)
            return
        self.timer = ctx.loop.call_later(ctx.cfg.detect_timeout, self._timeout)
        if self.buf:  # read while waiting for discovery
            proto = detect(self.buf)
            if proto is not None:
                self._hand_off(proto, self.buf)

    async def _after_resolve(self) -> None:
        await self.ctx.target.wait_resolved(RESOLVE_TIMEOUT)
        if self.transport.is_closing():
            return
        self.waiting = False
        self.transport.resume_reading()
        self._begin()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.waiting:
            # uvloop may deliver data although reading was paused in connection_made;
            # pausing from here holds, so the buffer stays bounded.
            self.buf = buf
            if len(buf) > 65536:
                self.transport.pause_reading()
            return
        proto = detect(buf)
        if proto is None:
            self.buf = buf
            return
        self._hand_off(proto, buf)

    def _hand_off(self, proto: Proto, buf: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ctx = self.ctx
        t = self.transport
        if proto is Proto.HTTP1:
            h = H1Downstream(ctx)
            t.set_protocol(h)
            h.connection_made(t)
            if buf:
                h.data_received(buf)
            return
        ctx.metrics.counter("protocol_detect_total", "Connections by detected protocol.",
                            (("direction", ctx.direction), ("protocol", proto.value)))
        if proto is Proto.HTTP2:
            from meshlet.proxy.http2 import H2Downstream

            h2 = H2Downstream(ctx)
            t.set_protocol(h2)
            h2.connection_made(t)
            h2.data_received(buf)
            return
        # TLS that is not ours and anything else: opaque.
        start_relay(ctx, t, buf)

    def _timeout(self) -> None:
        self.timer = None
        self.ctx.count_detect_timeout()
        self._hand_off(Proto.OPAQUE, self.buf)

    def eof_received(self) -> bool | None:
        if self.buf:
            # A client that sent a few bytes and a FIN: decide now, as opaque.
            self._hand_off(Proto.OPAQUE, self.buf)
            handler = self.transport.get_protocol()
            return handler.eof_received()  # type: ignore[attr-defined, no-any-return]
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None or self.waiting:
            self.waiting = False
            if self.timer is not None:
                self.timer.cancel()
            self.timer = None
            self.ctx.tcp_src.closed += 1
            self.ctx.proxy.conn_closed()
