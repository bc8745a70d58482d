"""HTTP/1.x proxying: a client connection (`H1Downstream`) and pooled upstream
connections (`H1Upstream`), as thin Protocol classes over `meshlet.proto.http1`.

Rules:
1. One exchange at a time per client connection. Pipelined requests wait in the client
   buffer (reading pauses past `PIPELINE_LIMIT`) and are answered in order.
2. Original bytes are forwarded whenever the head needs no rewriting; bodies always are.
3. Backpressure both ways: a side whose transport says `pause_writing` pauses reading on
   the other side until `resume_writing`. Reading on the client is paused for any of
   several reasons at once (bit flags), and resumes when none is left.
4. Nothing of a request is forwarded before its head has been fully validated, and a
   framing error closes the connection: no byte after it is trusted.
5. An upstream connection returns to the pool only after a complete exchange in which
   both messages were read to their end and neither side asked to close.
6. Timeouts use one lazy timer per connection: the hot path moves a deadline (a float)
   and the timer re-arms itself when it fires early.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from functools import partial
from typing import TYPE_CHECKING

from meshlet.api.endpoints import Endpoint
from meshlet.proto.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ChunkedFramer,
    LocalProtocolError,
    RequestHead,
    ResponseHead,
    match_simple_response,
    parse_request,
    parse_response,
    rewrite_head,
)
from meshlet.proxy.balance import MAX_WAITERS, RESOLVE_TIMEOUT
from meshlet.proxy.errors import error_response
from meshlet.proxy.mtls import ALPN_H1, PeerIdentityError, open_upstream
from meshlet.proxy.tcp import splice

if TYPE_CHECKING:
    from meshlet.metrics.registry import HttpStats
    from meshlet.proxy.balance import EpState, Target
    from meshlet.proxy.context import ListenerCtx
    from meshlet.proxy.routing import CompiledRoute, RouteTable

__all__ = ["H1Downstream", "H1Upstream"]

log = logging.getLogger("meshlet.http1")

PIPELINE_LIMIT = 65536
REPLAY_LIMIT = 65536  # request bytes kept for a retry; a longer request is not retried
RETRY = b"<retry>"  # response_head's answer when the response is dropped for a retry
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# Client connection states.
S_HEAD = 0  # waiting for / reading a request head
S_CONNECT = 1  # head parsed, waiting for an upstream connection
S_BODY = 2  # streaming the request body upstream
S_WAIT = 3  # request sent; waiting for the response to complete
S_TUNNEL = 4  # after a 101: bytes both ways
S_CLOSED = 5
LINGER = 1.0  # seconds an error response's connection keeps draining input before close

# Reasons the client side is not being read.
P_UPSTREAM_FULL = 1
P_CONNECT = 2
P_PIPELINE = 4

# Timer kinds.
T_NONE = 0
T_IDLE = 1
T_HEAD = 2
T_RESPONSE = 3
T_STREAM = 4  # body or tunnel: fires only after an idle period with no progress


class H1Downstream(asyncio.Protocol):
    __slots__ = (
        "_deadline",
        "_seen_progress",
        "_timer",
        "_tkind",
        "add_lines",
        "body_framer",
        "body_left",
        "buf",
        "client_line",
        "ctx",
        "draining",
        "ep",
        "es",
        "line",
        "paused",
        "progress",
        "replay",
        "replay_size",
        "req",
        "req_bytes",
        "resp_latency_ms",
        "resp_started",
        "resp_timeout",
        "retried",
        "retry_on",
        "route",
        "rt",
        "started",
        "state",
        "stats",
        "target",
        "timeout_reason",
        "transport",
        "tries",
        "try_timer",
        "up",
        "waited",
    )

    def __init__(self, ctx: ListenerCtx) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf: bytes = b""
        # "meshlet-client-id: <identity>\r\n" for mTLS clients, added to each request.
        self.client_line = b""
        self.state = S_HEAD
        self.up: H1Upstream | None = None
        self.req: RequestHead | None = None
        self.req_bytes: bytes | None = None  # whole request, kept while retry is possible
        self.ep: Endpoint | None = None
        self.es: EpState | None = None  # the balancer's state of `ep`, while in flight
        self.target: Target = ctx.target
        self.line = b""  # a start line replacing the received one (router: origin form)
        self.add_lines = b""  # field lines added when the head is rewritten
        self.waited = False
        # Routes (meshlet.proxy.routing): the request's route, its table, retry state.
        self.route: CompiledRoute | None = None
        self.rt: RouteTable | None = None
        self.retry_on: frozenset[int] | None = None  # statuses that trigger a retry now
        self.tries = 0
        self.replay: list[bytes] | None = None  # the request as sent, for a retry
        self.replay_size = 0
        self.try_timer: asyncio.TimerHandle | None = None
        # To the response head: the proxy's response timeout, or the route's (which also
        # covers its retries); both ride on the connection's one lazy timer.
        self.resp_timeout = ctx.cfg.response_timeout
        self.timeout_reason = "response_timeout"
        self.body_left = 0
        self.body_framer: ChunkedFramer | None = None
        self.paused = 0
        self.resp_started = False
        self.resp_latency_ms = 0.0
        self.retried = False
        self.draining = False
        self.started = 0.0
        self.stats: HttpStats | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._tkind = T_NONE
        self.progress = 0
        self._seen_progress = -1

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.proxy.conns.add(self)
        self._arm(T_IDLE, self.ctx.cfg.idle_timeout)

    def data_received(self, data: bytes) -> None:
        ctx = self.ctx
        ctx.tcp_src.read_bytes += len(data)
        st = self.state
        if st == S_HEAD:
            if self.buf:
                self.buf += data
            else:
                self.buf = data
            self._on_head_data()
        elif st == S_BODY:
            self.progress += 1
            self._send_body(data)
        elif st in (S_WAIT, S_CONNECT):
            self.buf += data
            if len(self.buf) > PIPELINE_LIMIT:
                self._pause(P_PIPELINE)

    def eof_received(self) -> bool | None:
        if self.state == S_HEAD and not self.buf:
            return None  # idle keep-alive connection closed by the client: fine
        if self.state in (S_WAIT, S_CONNECT) or (self.state == S_BODY and self._body_unframed()):
            # Half-close after a complete request: answer it, then close.
            self.draining = True
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        prev = self.state
        self.state = S_CLOSED
        self._tkind = T_NONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.es is not None:
            self.es.pending -= 1  # the client left: no verdict on the endpoint
            self.es = None
        if self.route is not None:
            self._cancel_route_timers()
        proxy = self.ctx.proxy
        proxy.conns.discard(self)
        self.ctx.tcp_src.closed += 1
        up = self.up
        if up is not None:
            self.up = None
            up.down = None
            if prev != S_HEAD:
                up.abandon()
        proxy.conn_closed()

    def pause_writing(self) -> None:
        up = self.up
        if up is not None:
            up.transport.pause_reading()
            up.reading_paused = True

    def resume_writing(self) -> None:
        up = self.up
        if up is not None and up.reading_paused:
            up.reading_paused = False
            up.transport.resume_reading()

    # --- request side ----------------------------------------------------------------

    def _on_head_data(self) -> None:
        ctx = self.ctx
        cfg = ctx.cfg
        try:
            req = parse_request(
                self.buf, cfg.max_header_bytes, cfg.max_request_line_bytes, ctx.strip_mesh,
                ctx.router is not None,
            )
        except LocalProtocolError as e:
            self._reject(e.status, e.reason)
            return
        if req is None:
            if self._tkind != T_HEAD:
                self._arm(T_HEAD, cfg.header_read_timeout)
            return
        target = ctx.target
        router = ctx.router
        if router is not None:
            if req.method == b"CONNECT":
                self._tunnel(req)
                return
            try:
                target, self.line, self.add_lines = router.route(req)
            except LocalProtocolError as e:
                self._reject(e.status, e.reason)
                return
        rt = target.routes
        route = None
        if rt is not None:
            route = rt.match(req)
            if route is not None:
                if self.waited and route.backends:
                    target = self.target  # the backend drawn before waiting for it
                elif route.cum:
                    svc = route.backend()
                    if svc:  # traffic split: another service
                        from meshlet.proxy.routing import backend_target  # routes only

                        target = backend_target(target, svc, ctx.proxy.lookup)
                if route.add_lines or route.drop:
                    req.drop = req.drop | route.drop
                    self.add_lines += route.add_lines
                    req.needs_rewrite = True
        self.target = target
        if target.pending and not self.waited:
            self._wait_target(target)
            return
        self.waited = False
        self.req = req
        self.started = ctx.loop.time()
        if route is not None:
            self._begin_route(route, rt)
        elif self.route is not None:
            self._end_route()
        ep = ctx.fixed
        if ep is None:
            es = target.choose()
            if es is not None:
                es.pending += 1
                self.es = es
                ep = es.ep
        # Outbound to a meshed endpoint: the metrics say tls="true" (mtls.open_upstream).
        sctx = ctx.meshed if (ep is not None and ep.identity and ctx.meshed) else ctx
        st = sctx.by_host.get(req.host) or sctx.http_stats(req.host)
        self.stats = st
        st.requests += 1
        rest = self.buf
        end = req.end
        self.buf = b""
        self.resp_started = False
        self.retried = False
        if ep is None:
            self._respond_error(503, "no_endpoints")
            return
        self.ep = ep
        body = req.body
        if body == BODY_NONE and not req.needs_rewrite and not self.draining:
            # The common case: a bodiless request forwarded as received.
            if len(rest) > end:
                self.buf = rest[end:]
                head = req.raw
            else:
                head = rest
            if self.client_line:
                head = head[:-2] + self.client_line + b"\r\n"
            self.req_bytes = head
            self.body_left = 0
            self._arm(T_RESPONSE, self.resp_timeout, self.started)
            idle = ctx.pool.idle.get(ep.key)
            if idle:
                up = idle.pop()
                self.up = up
                up.down = self
                up.begin(req.method, req.upgrade is not None)
                up.transport.write(head)
                ctx.tcp_dst.write_bytes += len(head)
                self.state = S_WAIT
                if len(self.buf) > PIPELINE_LIMIT:
                    self._pause(P_PIPELINE)
                return
        else:
            if self.draining:
                req.close = True
            # The head (maybe rewritten) and the body bytes that came with it.
            if req.needs_rewrite or req.version == 10:
                head = rewrite_head(req, ctx.strip_mesh, keep_upgrade=req.upgrade is not None,
                                    add=self.add_lines, line=self.line)
                self.line = self.add_lines = b""
                if req.version == 10:
                    req.close = True
            else:
                head = req.raw
            if self.client_line:
                head = head[:-2] + self.client_line + b"\r\n"
            if req.close:
                self.draining = True  # answer this one, then close
            if body == BODY_NONE:
                self.body_left = 0
                if len(rest) > end:
                    self.buf = rest[end:]
                self.req_bytes = head
                self._arm(T_RESPONSE, self.resp_timeout)
            else:
                self.req_bytes = None
                if body == BODY_LENGTH:
                    self.body_left = req.content_length
                else:
                    self.body_framer = ChunkedFramer()
                self._arm(T_STREAM, cfg.idle_timeout)
                if self.retry_on is not None:
                    self.replay = []  # filled as the request goes out (`_sent`)
                    self.replay_size = 0
            pooled = ctx.pool.get(ep.key)
            if pooled is not None:
                self._attach(pooled)
                self._start_exchange(head, rest, end)
                return
        self.state = S_CONNECT
        self._pause(P_CONNECT)
        if body != BODY_NONE:
            self.buf = rest[end:]
        ctx.loop.create_task(self._connect(ep, head))

    def _tunnel(self, req: RequestHead) -> None:
        """CONNECT on the HTTP proxy listener: answer 200, then treat the connection as
        one to an outbound listener for the destination (`meshlet.proxy.router`)."""
        ctx = self.ctx
        router = ctx.router
        assert router is not None
        try:
            host, port = router.tunnel(req)
        except LocalProtocolError as e:
            self._reject(e.status, e.reason)
            return
        from meshlet.proxy.listener import Accepted
        from meshlet.proxy.transparent import OutboundDestinations

        proxy = ctx.proxy
        dests = proxy.tunnels
        if dests is None:
            dests = proxy.tunnels = OutboundDestinations(proxy)
        tctx = dests.ctx_for_dst(host, port)
        rest = self.buf[req.end:]
        self.buf = b""
        t = self.transport
        t.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        # This connection ends here as an HTTP/1 one; the tunnel counts it anew.
        self.state = S_CLOSED
        self._tkind = T_NONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proxy.conns.discard(self)
        ctx.tcp_src.closed += 1
        proxy.conn_closed()
        acc = Accepted(tctx)
        t.set_protocol(acc)
        acc.connection_made(t)
        if rest and not t.is_closing():
            acc.data_received(rest)

    # --- routes: timeouts and retries -------------------------------------------------

    def _begin_route(self, route: CompiledRoute, rt: RouteTable | None) -> None:
        # Per request on routed destinations: kept to plain attribute work.
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        self.route = route
        self.rt = rt
        self.tries = 0
        self.replay = None
        timeout = route.timeout
        if timeout:
            self.resp_timeout = timeout
            self.timeout_reason = "request_timeout"
        elif self.resp_timeout != self.ctx.cfg.response_timeout:
            self.resp_timeout = self.ctx.cfg.response_timeout
            self.timeout_reason = "response_timeout"
        retry_on = route.retry_on
        if retry_on is not None and rt is not None:
            self.retry_on = retry_on
            rt.budget.deposit(self.started)
        else:
            self.retry_on = None
        if route.per_try:
            self.try_timer = self.ctx.loop.call_later(route.per_try, self._on_try_timeout)

    def _end_route(self) -> None:
        self._cancel_route_timers()
        self.resp_timeout = self.ctx.cfg.response_timeout
        self.timeout_reason = "response_timeout"
        self.route = None
        self.rt = None
        self.retry_on = None
        self.replay = None

    def _arm_try(self) -> None:
        route = self.route
        if route is not None and route.route.retry is not None and \
                route.route.retry.per_try_timeout:
            if self.try_timer is not None:
                self.try_timer.cancel()
            self.try_timer = self.ctx.loop.call_later(route.route.retry.per_try_timeout,
                                                      self._on_try_timeout)

    def _cancel_route_timers(self) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None

    def _keep(self, data: bytes) -> None:
        """Keep what was sent, for a retry (up to REPLAY_LIMIT: beyond, no retry)."""
        replay = self.replay
        assert replay is not None
        self.replay_size += len(data)
        if self.replay_size > REPLAY_LIMIT:
            self.replay = None
            self.retry_on = None
        else:
            replay.append(data)

    def _may_retry(self, reason: str) -> bool:
        """Whether this exchange may be tried again now (route, attempts, whole request
        sent and kept, nothing sent to the client); takes it from the budget."""
        route = self.route
        if route is None or route.route.retry is None or self.resp_started \
                or self.state != S_WAIT or self.rt is None or self.ctx.proxy.draining:
            return False
        if self.req_bytes is None and (self.replay is None or self.req is None
                                       or self.req.body == BODY_NONE):
            return False
        if self.tries >= route.route.retry.attempts:
            return False
        labels = (("authority", self.target.name), ("route", route.route.name))
        if not self.rt.budget.try_withdraw(self.ctx.loop.time()):
            self.ctx.metrics.counter("retry_budget_exhausted_total", "Retries not made "
                                     "because the retry budget was spent.", labels)
            return False
        self.ctx.metrics.counter("request_retries_total", "Requests sent again, by route "
                                 "and reason.", (*labels, ("reason", reason)))
        return True

    def _retry(self) -> None:
        """Drop the current try (its connection is closed) and send the request again to
        another endpoint after a jittered backoff."""
        route = self.route
        assert route is not None and route.route.retry is not None
        self.tries += 1
        up = self.up
        if up is not None:
            self.up = None
            up.down = None
            up.abandon()
        self._settle(True)
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        self.state = S_CONNECT
        self._pause(P_CONNECT)
        delay = route.route.retry.backoff * (2 ** (self.tries - 1)) * random.uniform(0.5, 1.5)
        self.ctx.loop.call_later(delay, self._resend)

    def _resend(self) -> None:
        if self.state != S_CONNECT or self.transport.is_closing():
            return
        target = self.target
        es = target.choose(exclude=self.ep) or target.choose()
        if es is None:
            self._respond_error(503, "no_endpoints")
            return
        es.pending += 1
        self.es = es
        ep = self.ep = es.ep
        data = self.req_bytes if self.req_bytes is not None else b"".join(self.replay or ())
        self._arm_try()
        pooled = self.ctx.pool.get(ep.key)
        if pooled is not None:
            self._attach(pooled)
            self._unpause(P_CONNECT)
            pooled.transport.write(data)
            self.ctx.tcp_dst.write_bytes += len(data)
            self.state = S_WAIT
            return
        self.ctx.loop.create_task(self._connect(ep, data, whole=True))

    def _on_try_timeout(self) -> None:
        self.try_timer = None
        if self.resp_started or self.state in (S_CLOSED, S_HEAD):
            return
        if self._may_retry("per_try_timeout"):
            self._retry()
        else:
            self._respond_error(504, "per_try_timeout")

    def _settle(self, failed: bool, now: float = 0.0) -> None:
        """Tell the balancer how the request to `es` went (once per pick)."""
        es = self.es
        if es is not None:
            self.es = None
            if not now:
                now = self.ctx.loop.time()
            self.target.observe(es, now - self.started, now, failed)

    def _wait_target(self, target: Target) -> None:
        """A destination discovery has not answered for yet: hold the request (reading
        paused) until it does, or until the resolve timeout; then take it up again."""
        if target.waiters >= MAX_WAITERS:
            self.ctx.metrics.counter("http_queue_full_total", "Requests refused because "
                                     "too many were waiting for an endpoint.",
                                     (("authority", target.name),))
            self._respond_error(503, "queue_full")
            return
        self.state = S_CONNECT
        self._pause(P_CONNECT)

        async def wait() -> None:
            target.waiters += 1
            try:
                await target.wait_ready(RESOLVE_TIMEOUT)
            finally:
                target.waiters -= 1
            if self.state != S_CONNECT:
                return
            self.state = S_HEAD
            self.waited = True
            self._unpause(P_CONNECT)
            self._on_head_data()

        self.ctx.loop.create_task(wait())

    def _attach(self, up: H1Upstream) -> None:
        self.up = up
        up.down = self
        up.begin(self.req.method if self.req is not None else b"GET",
                 self.req is not None and self.req.upgrade is not None)

    def _start_exchange(self, head: bytes, rest: bytes, end: int) -> None:
        """Send the head and whatever body bytes came with it (`rest[end:]`)."""
        up = self.up
        assert up is not None and self.req is not None
        req = self.req
        if req.body != BODY_NONE and head is req.raw and len(rest) > end:
            # One write for head and body: split off only what belongs to the next request.
            self.state = S_BODY
            n = self._body_span(rest, end)
            if n < 0:
                return
            out = rest[:n] if n < len(rest) else rest
            up.transport.write(out)
            self.ctx.tcp_dst.write_bytes += n
            if self.replay is not None:
                self._keep(out)
            self._after_body_chunk(rest, n)
            return
        self._send_head(head, rest[end:] if len(rest) > end else b"")

    def _send_head(self, head: bytes, body: bytes) -> None:
        """Write the head, then the body bytes (for BODY_NONE, `body` is pipelined)."""
        up = self.up
        assert up is not None and self.req is not None
        up.transport.write(head)
        self.ctx.tcp_dst.write_bytes += len(head)
        if self.replay is not None:
            self._keep(head)
        if self.req.body == BODY_NONE:
            self.state = S_WAIT
            if body:
                self.buf = body
            if len(self.buf) > PIPELINE_LIMIT:
                self._pause(P_PIPELINE)
            return
        self.state = S_BODY
        if body:
            self._send_body(body)
        elif self._body_unframed():
            self._body_complete()

    def _body_span(self, data: bytes, start: int) -> int:
        """How far into `data` (from `start`) the current request body reaches; -1 after
        an error has been handled."""
        if self.body_framer is None:
            take = min(self.body_left, len(data) - start)
            self.body_left -= take
            return start + take
        try:
            return self.body_framer.feed(data, start)
        except LocalProtocolError as e:
            self._abort_exchange(e.status, e.reason)
            return -1

    def _body_unframed(self) -> bool:
        return (self.body_framer is None and self.body_left == 0) or (
            self.body_framer is not None and self.body_framer.done
        )

    def _send_body(self, data: bytes) -> None:
        up = self.up
        n = self._body_span(data, 0)
        if n < 0 or up is None:
            return
        if n:
            out = data if n == len(data) else data[:n]
            up.transport.write(out)
            self.ctx.tcp_dst.write_bytes += n
            if self.replay is not None:
                self._keep(out)
        self._after_body_chunk(data, n)

    def _after_body_chunk(self, data: bytes, n: int) -> None:
        if self._body_unframed():
            if n < len(data):
                self.buf += data[n:]
                if len(self.buf) > PIPELINE_LIMIT:
                    self._pause(P_PIPELINE)
            self._body_complete()

    def _body_complete(self) -> None:
        self.body_framer = None
        if self.state == S_BODY:
            self.state = S_WAIT
            if not self.resp_started:
                self._arm(T_RESPONSE, self.resp_timeout)

    async def _connect(self, ep: Endpoint, head: bytes, whole: bool = False) -> None:
        """Connect to `ep` (or another endpoint if it fails) and send `head` (`whole`: it
        is the entire request, a retry's replay)."""
        ctx = self.ctx
        target = self.target
        attempts = min(3, max(1, len(target.endpoints())))
        reason = "connect_failed"
        status = 502
        up: H1Upstream | None = None
        for attempt in range(attempts):
            try:
                uctx = ctx.meshed if (ep.identity and ctx.meshed) else ctx
                _t, up = await open_upstream(ctx, ep, partial(H1Upstream, uctx, ep), ALPN_H1)
                break
            except TimeoutError:
                status, reason = 504, "connect_timeout"
            except PeerIdentityError as e:
                status, reason = 502, "peer_identity_mismatch"
                log.warning("refusing %s: %s", ep.addr, e)
            except OSError as e:
                status = 502
                reason = _errno_reason(e, "connect")
            log.debug("connect to %s failed: %s", ep.addr, reason)
            if ctx.fixed is not None:
                ctx.proxy.app_unreachable(reason)
            self._settle(True)
            if attempt + 1 < attempts:
                es = target.choose(exclude=ep)
                if es is None:
                    break
                es.pending += 1
                self.es = es
                ep = self.ep = es.ep
        if up is not None and ctx.fixed is not None and ctx.proxy.app_down is not None:
            ctx.proxy.app_reachable()
        if up is None or self.state != S_CONNECT or self.transport.is_closing():
            if up is not None:
                up.close_idle()
            elif self.state == S_CONNECT:
                self._respond_error(status, reason)
            return
        self._attach(up)
        self._unpause(P_CONNECT)
        if whole:
            up.transport.write(head)
            ctx.tcp_dst.write_bytes += len(head)
            self.state = S_WAIT
            return
        buf, self.buf = self.buf, b""
        self._send_head(head, buf)

    # --- response side (called by H1Upstream) -----------------------------------------

    def response_head(self, resp: ResponseHead) -> bytes | None:
        """The bytes to send the client for this head (None: send the original)."""
        req = self.req
        assert req is not None
        status = resp.status
        if status < 200 and status != 101:
            return rewrite_head(resp, False) if resp.needs_rewrite else None
        if self.route is not None:
            retry_on = self.retry_on
            if retry_on is not None and status in retry_on and \
                    self._may_retry(f"status_{status}"):
                self._retry()
                return RETRY
            self._cancel_route_timers()
        st = self.stats
        if st is not None:
            ms = self.resp_latency_ms = (self.ctx.loop.time() - self.started) * 1000.0
            st.response(status, ms)
        if self.es is not None:
            self._settle(status >= 500)
        self.resp_started = True
        if status == 101:
            self._tkind = T_NONE  # tunnels, like opaque TCP, have no idle timeout
            return rewrite_head(resp, False, keep_upgrade=True) if resp.needs_rewrite else None
        self._arm(T_STREAM, self.ctx.cfg.idle_timeout)
        close = req.close or self.draining or resp.body == BODY_UNTIL_CLOSE
        if close:
            self.draining = True
            return rewrite_head(resp, False, add=b"connection: close\r\n")
        if resp.needs_rewrite:
            return rewrite_head(resp, False)
        return None

    def retract_response(self, resp: ResponseHead | None) -> None:
        """Un-count a response head that will not reach the client after all."""
        st = self.stats
        if st is not None and resp is not None:
            st.retract(resp.status, self.resp_latency_ms)

    def response_done(self, reusable: bool, now: float = 0.0) -> None:
        """The response has been forwarded whole (`now`: loop time, if known)."""
        up = self.up
        self.up = None
        if not now:
            now = self.ctx.loop.time()
        if up is not None:
            up.down = None
            if reusable and self.state == S_WAIT:
                up.release(now)
            else:
                up.close_idle()
        if self.state != S_WAIT or self.draining or self.ctx.proxy.draining:
            # Closing by request, by shutdown, or answered before the request body ended
            # (then the next request's start is unknown).
            self.state = S_CLOSED
            self._tkind = T_NONE
            self.transport.close()
            return
        self.req = None
        self.state = S_HEAD
        if self.paused:
            self._unpause(P_PIPELINE)
        if self.buf:
            self._on_head_data()
        else:
            self._arm(T_IDLE, self.ctx.cfg.idle_timeout, now)

    def start_tunnel(self, up: H1Upstream, to_client: bytes) -> None:
        """After a 101: both connections become a byte pipe (`meshlet.proxy.tcp`), which
        from now on owns them, their accounting and their half-closes."""
        self.state = S_TUNNEL
        self._tkind = T_NONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.up = None
        up.down = None
        up.state = up.U_TUNNEL
        self.ctx.proxy.conns.discard(self)
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()
        to_up, self.buf = self.buf, b""
        splice(self.ctx, self.transport, up.transport, to_up, to_client)

    def upstream_lost(self, up: H1Upstream, got_bytes: bool, exc: Exception | None) -> None:
        """The upstream connection closed before the response was complete."""
        self.up = None
        if self.state == S_CLOSED:
            return
        req = self.req
        refused = isinstance(exc, ConnectionRefusedError)  # a mux stream not processed
        if (
            not got_bytes
            and (up.reused or refused)
            and not self.retried
            and req is not None
            and self.req_bytes is not None
            and (req.method in _IDEMPOTENT or refused)
        ):
            # A pooled connection the server closed as we wrote, or a stream the peer
            # refused (RFC 9113 8.7: not processed): safe to send again.
            self.retried = True
            self.state = S_CONNECT
            self._pause(P_CONNECT)
            assert self.ep is not None
            self.ctx.loop.create_task(self._connect(self.ep, self.req_bytes))
            return
        if self.resp_started:
            self.transport.abort()
            return
        reason = _errno_reason(exc, "upstream") if exc is not None else "upstream_closed"
        if self.route is not None and self._may_retry(reason):
            self._retry()
            return
        self._respond_error(502, reason)

    def upstream_error(self, status: int, reason: str) -> None:
        """The upstream sent something we refuse (framing): never pass it on."""
        self.up = None
        if self.resp_started:
            self.transport.abort()
        else:
            self._respond_error(status, reason)

    # --- errors, pausing, timers ------------------------------------------------------

    def _reject(self, status: int, reason: str) -> None:
        """A malformed request: answer and close; nothing is forwarded."""
        self.ctx.metrics.counter(
            "http_request_errors_total", "Requests refused as malformed, by reason.",
            (("direction", self.ctx.direction), ("reason", reason)),
        )
        self._respond_error(status, reason)

    def _respond_error(self, status: int, reason: str) -> None:
        if self.es is not None:
            self._settle(status >= 500)
        if self.route is not None:
            self._cancel_route_timers()
        if self.state == S_CLOSED:
            return
        if self.req is not None and self.stats is not None:
            self.stats.response(status, (self.ctx.loop.time() - self.started) * 1000.0)
        up = self.up
        if up is not None:
            self.up = None
            up.down = None
            up.abandon()
        self.state = S_CLOSED
        self._tkind = T_NONE
        data = error_response(status, reason)
        self.transport.write(data)
        self.ctx.tcp_src.write_bytes += len(data)
        self._linger_close()

    def _linger_close(self) -> None:
        """Close after an error response without losing it (RFC 9112 section 9.6): send
        FIN first, then read and drop what the client still sends for up to `LINGER`
        seconds. Closing with unread input makes the kernel answer with a reset, which
        can destroy the response before the client reads it."""
        t = self.transport
        try:
            if not t.can_write_eof():
                t.close()
                return
            t.write_eof()
            t.resume_reading()
        except (OSError, RuntimeError):
            t.close()
            return
        self.ctx.loop.call_later(LINGER, t.close)

    def _abort_exchange(self, status: int, reason: str) -> None:
        """A malformed request body: with a response under way, the only answer left
        is to cut the connection."""
        if not self.resp_started:
            self._reject(status, reason)
            return
        self.ctx.metrics.counter(
            "http_request_errors_total", "Requests refused as malformed, by reason.",
            (("direction", self.ctx.direction), ("reason", reason)),
        )
        up = self.up
        if up is not None:
            up.abandon()
        self.state = S_CLOSED
        self.transport.abort()

    def _pause(self, why: int) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= why

    def _unpause(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and self.state != S_CLOSED:
                self.transport.resume_reading()

    def upstream_paused(self) -> None:
        self._pause(P_UPSTREAM_FULL)

    def upstream_resumed(self) -> None:
        self._unpause(P_UPSTREAM_FULL)

    def _arm(self, kind: int, delay: float, now: float = 0.0) -> None:
        loop = self.ctx.loop
        when = (now or loop.time()) + delay
        self._tkind = kind
        self._deadline = when
        self._seen_progress = self.progress
        t = self._timer
        if t is None:
            self._timer = loop.call_at(when, self._on_timer)
        elif when < t.when():
            t.cancel()
            self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._tkind
        if kind == T_NONE or self.state == S_CLOSED:
            return
        loop = self.ctx.loop
        now = loop.time()
        if kind == T_STREAM and self.progress != self._seen_progress:
            self._seen_progress = self.progress
            self._deadline = now + self.ctx.cfg.idle_timeout
        if now < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timer)
            return
        if kind == T_IDLE or (kind == T_HEAD and not self.buf):
            self.state = S_CLOSED
            self.transport.close()
        elif kind == T_HEAD:
            self._reject(408, "request_header_timeout")
        elif kind == T_RESPONSE and not self.resp_started:
            self._respond_error(504, self.timeout_reason)
        else:
            self.state = S_CLOSED
            up = self.up
            if up is not None:
                up.abandon()
            self.transport.abort()

    def shutdown(self) -> None:
        """Graceful shutdown: close now if idle, else after the current response."""
        self.draining = True
        if self.state == S_HEAD and not self.buf:
            self.state = S_CLOSED
            self.transport.close()


def _errno_reason(exc: BaseException | None, where: str) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"{where}_refused"
    if isinstance(exc, ConnectionResetError):
        return f"{where}_reset"
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno)).lower()
        return f"{where}_{name}"
    return f"{where}_failed"


class H1Upstream(asyncio.Protocol):
    """One connection to an upstream endpoint; pooled between exchanges."""

    __slots__ = (
        "_framer",
        "body_left",
        "buf",
        "ctx",
        "down",
        "ep",
        "got_bytes",
        "head",
        "idle_since",
        "key",
        "method",
        "reading_paused",
        "reused",
        "state",
        "transport",
        "upgrading",
    )

    # States
    U_IDLE = 0
    U_HEAD = 1
    U_BODY = 2
    U_TUNNEL = 3
    U_CLOSED = 4

    def __init__(self, ctx: ListenerCtx, ep: Endpoint) -> None:
        self.ctx = ctx
        self.ep = ep
        self.key = ep.key
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.down: H1Downstream | None = None
        self.buf = b""
        self.state = self.U_IDLE
        self.head: ResponseHead | None = None
        self.body_left = 0
        self._framer: ChunkedFramer | None = None
        self.method = b"GET"
        self.upgrading = False
        self.got_bytes = False
        self.reused = False
        self.reading_paused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ctx.tcp_dst.opened += 1

    def begin(self, method: bytes, upgrading: bool) -> None:
        self.state = self.U_HEAD
        self.method = method
        self.upgrading = upgrading
        self.got_bytes = False
        self.head = None

    def reusable(self) -> bool:
        h = self.head
        return self.state == self.U_IDLE and h is not None and not h.close and not self.buf

    def release(self, now: float) -> None:
        self.reused = True
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self.ctx.pool.put(self.key, self, now)

    def close_idle(self) -> None:
        self.state = self.U_CLOSED
        self.down = None
        self.transport.close()

    def abandon(self) -> None:
        """The client went away mid-exchange: this connection's state is unknown."""
        self.state = self.U_CLOSED
        self.down = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        ctx = self.ctx
        ctx.tcp_dst.read_bytes += len(data)
        st = self.state
        down = self.down
        if down is None or st == self.U_IDLE or st == self.U_CLOSED:
            # Bytes nobody asked for (or after the response): the connection is unusable.
            self.abandon()
            ctx.pool.discard(self.key, self)
            return
        self.got_bytes = True
        if st == self.U_BODY:
            down.progress += 1
            self._body(data, 0, down)
            return
        if self.buf:
            self._heads(self.buf + data, down)
            return
        if self.method != b"HEAD" and down.state == S_WAIT and not down.draining:
            # `draining` is also set when the request asked to close.
            simple = match_simple_response(data)
            if simple is not None and (down.retry_on is None or simple not in down.retry_on):
                # The common case: a whole response with a length, forwarded as received.
                down.transport.write(data)
                ctx.tcp_src.write_bytes += len(data)
                self.state = self.U_IDLE
                down.resp_started = True
                now = ctx.loop.time()
                stats = down.stats
                if stats is not None:
                    stats.response(simple, (now - down.started) * 1000.0)
                if down.es is not None:
                    down._settle(simple >= 500, now)
                down.response_done(True, now)
                return
        try:
            resp = parse_response(data, self.method, self.upgrading)
        except LocalProtocolError as e:
            self._refuse(down, e)
            return
        self._heads(data, down, resp)

    def _refuse(self, down: H1Downstream, e: LocalProtocolError) -> None:
        """A malformed response (head or body): counted, and the client gets a 502."""
        ctx = self.ctx
        self.abandon()
        ctx.metrics.counter(
            "http_response_errors_total",
            "Upstream responses refused as malformed, by reason.",
            (("direction", ctx.direction), ("reason", e.reason)),
        )
        down.upstream_error(502, e.reason)

    def _heads(self, buf: bytes, down: H1Downstream, parsed: ResponseHead | None = None) -> None:
        self.buf = b""
        first = parsed is not None
        while True:
            try:
                if first:
                    resp: ResponseHead | None = parsed
                    first = False
                else:
                    resp = parse_response(buf, self.method, self.upgrading)
            except LocalProtocolError as e:
                self._refuse(down, e)
                return
            if resp is None:
                self.buf = buf
                return
            status = resp.status
            out = down.response_head(resp)
            if out is RETRY:
                return  # the client side has dropped this connection and tries again
            end = resp.end
            if status < 200 and status != 101:
                # Interim (100 Continue, 103 Early Hints): pass on to 1.1 clients only.
                req = down.req
                if req is not None and req.version == 11:
                    self._write_down(down, out if out is not None else resp.raw)
                buf = buf[end:]
                if not buf:
                    return
                continue
            self.head = resp
            if status == 101:
                if not self.upgrading:
                    self.abandon()
                    down.upstream_error(502, "unexpected_switching_protocols")
                    return
                self._write_down(down, out if out is not None else resp.raw)
                down.start_tunnel(self, buf[end:])
                return
            body = resp.body
            if body == BODY_NONE:
                self._write_down(down, out if out is not None else resp.raw)
                if len(buf) > end:
                    self.buf = buf[end:]  # extra bytes: not reusable
                self._done(down)
                return
            self.state = self.U_BODY
            if body == BODY_LENGTH:
                self.body_left = resp.content_length
                self._framer = None
            elif body == BODY_CHUNKED:
                self._framer = ChunkedFramer()
            else:
                self._framer = None
                self.body_left = -1
            # The head goes out with the first body bytes, once they have been checked:
            # a body that breaks framing at once still gets the client a clean 502.
            self._body(buf, end, down, out if out is not None else b"")
            return

    def _body(self, data: bytes, start: int, down: H1Downstream, head: bytes | None = None
              ) -> None:
        """Forward the body bytes in `data[start:]`. `head` is the unsent head: b"" when
        it is the original one, `data[:start]`; None when it has been sent already."""
        n = len(data)
        if self._framer is not None:
            try:
                end = self._framer.feed(data, start)
            except LocalProtocolError as e:
                if head is not None:
                    # Nothing sent yet: the client gets a 502 instead of this response.
                    down.resp_started = False
                    down.retract_response(self.head)
                self._refuse(down, e)
                return
            done = self._framer.done
        elif self.body_left >= 0:
            take = min(self.body_left, n - start)
            self.body_left -= take
            end = start + take
            done = self.body_left == 0
        else:
            end = n
            done = False
        if head == b"":
            start = 0  # the original head is data[:start]: one write for both
        elif head is not None:
            self._write_down(down, head)
        if end > start:
            self._write_down(down, data if (start == 0 and end == n) else data[start:end])
        if done:
            if end < n:
                self.buf = data[end:]  # bytes past the response: not reusable
            self._framer = None
            self._done(down)

    def _write_down(self, down: H1Downstream, data: bytes) -> None:
        down.transport.write(data)
        self.ctx.tcp_src.write_bytes += len(data)

    def _done(self, down: H1Downstream) -> None:
        self.state = self.U_IDLE
        down.response_done(self.reusable())

    def eof_received(self) -> bool | None:
        if self.state == self.U_BODY and self.body_left == -1 and self._framer is None:
            down = self.down
            self.state = self.U_IDLE
            self.head = None  # read-until-close: never reusable
            if down is not None:
                down.response_done(False)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        st = self.state
        self.state = self.U_CLOSED
        self.ctx.tcp_dst.closed += 1
        down = self.down
        self.down = None
        if down is not None and st != self.U_IDLE:
            down.upstream_lost(self, self.got_bytes, exc)
        elif down is None and st == self.U_IDLE:
            self.ctx.pool.discard(self.key, self)

    def pause_writing(self) -> None:
        down = self.down
        if down is not None:
            down.upstream_paused()

    def resume_writing(self) -> None:
        down = self.down
        if down is not None:
            down.upstream_resumed()
