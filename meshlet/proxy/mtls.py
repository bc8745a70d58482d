"""Mesh TLS between proxies: origination (outbound) and termination (inbound).

Rules:
1. Outbound: a connection to an endpoint whose identity discovery names, made while this
   proxy holds a valid certificate, is TLS 1.3 with our certificate; the peer's
   certificate must chain to the mesh anchors *and* carry exactly the expected SPIFFE ID,
   else the connection is dropped (`PeerIdentityError`, a 502 for HTTP). ALPN says what
   follows: `meshlet/h1` (HTTP/1.1), `meshlet/mux` (HTTP/1.1 connections as streams of one
   shared connection, `meshlet.proxy.mux`), `meshlet/h2` or `meshlet/tcp` (opaque bytes).
2. Inbound, on a meshed proxy: connections are accepted here, and the first bytes are
   *peeked* (MSG_PEEK), not read, so the chosen path still gets every byte. A ClientHello
   offering a `meshlet/` ALPN is terminated with mTLS (client certificate required);
   any other TLS (the app's own) and plaintext go the plain path, where the port's
   authorization policy decides whether an unauthenticated client may pass.
3. Authorization is decided once per connection (`meshlet.policy.authz`) and counted in
   `inbound_authz_allow_total` / `inbound_authz_deny_total`. A denied HTTP client gets a
   403 with `meshlet-proxy-error`; a denied TCP client is closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshlet.api.endpoints import Endpoint
from meshlet.policy.authz import Decision, authorize
from meshlet.proto.detect import Proto, detect
from meshlet.proto.tls_hello import MAX_HELLO, parse_client_hello
from meshlet.proxy.errors import error_response

if TYPE_CHECKING:
    from meshlet.proxy.context import ListenerCtx
    from meshlet.proxy.transparent import InboundPorts

__all__ = ["ALPN_H1", "ALPN_H2", "ALPN_MUX", "ALPN_TCP", "PeekingListener",
           "PeerIdentityError", "open_upstream"]

log = logging.getLogger("meshlet.mtls")

ALPN_H1 = "meshlet/h1"
ALPN_TCP = "meshlet/tcp"
ALPN_H2 = "meshlet/h2"
ALPN_MUX = "meshlet/mux"  # HTTP/1.1 connections as streams of one (meshlet.proxy.mux)
_MUXABLE = frozenset((ALPN_H1, ALPN_TCP))  # what may travel as a mux stream instead


class _OncePerMinute:
    """Log a peer's failures at most once a minute each: no log flood from one client."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, peer: str, msg: str, *args: Any
                 ) -> None:
        now = loop.time()
        if now - self.last.get(peer, -1e9) < 60.0:
            return
        if len(self.last) > 10000:
            self.last.clear()
        self.last[peer] = now
        log.warning(msg, *args)


_log_handshake_failure = _OncePerMinute()


class PeerIdentityError(OSError):
    """The peer proved an identity other than the one discovery named."""


def peer_identity(transport: asyncio.BaseTransport) -> str | None:
    """The SPIFFE ID of a verified TLS peer (None: no certificate, or not exactly one)."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1:
        return None
    from meshlet.identity.spiffe import parse_identity

    try:
        return parse_identity(uris[0]).uri
    except ValueError:
        return None  # signed by the mesh CA, yet no workload identity: unauthenticated


async def open_upstream(
    ctx: ListenerCtx, ep: Endpoint, factory: Callable[[], asyncio.Protocol], alpn: str
) -> tuple[asyncio.Transport, Any]:
    """Connect to `ep`: mesh TLS when it has an identity and we hold one, else plain.
    HTTP/1.1 and opaque TCP to a peer proxy become a stream of the shared connection to
    it (`meshlet.proxy.mux`) when that is possible."""
    if alpn in _MUXABLE and _mux_usable(ctx, ep):
        from meshlet.proxy.mux import open_stream  # meshed proxies only

        return await open_stream(ctx, ep, factory, alpn)
    loop = ctx.loop
    ident = ctx.proxy.identity
    if ep.identity and ident is not None and ident.valid():
        tls = ident.client_context(alpn)
        t, p = await asyncio.wait_for(
            loop.create_connection(factory, ep.host, ep.port, ssl=tls,
                                   server_hostname=ep.host,
                                   ssl_handshake_timeout=ctx.cfg.connect_timeout),
            ctx.cfg.connect_timeout,
        )
        got = peer_identity(t)
        if got != ep.identity:
            t.abort()
            raise PeerIdentityError(f"peer is {got or 'unidentified'}, expected {ep.identity}")
    elif ctx.app_tls and alpn != ALPN_TCP:
        # The app serves TLS itself (MESHLET_APP_TLS): speak it, with the protocol
        # the client used as ALPN.
        want = "h2" if alpn == ALPN_H2 else "http/1.1"
        t, p = await asyncio.wait_for(
            loop.create_connection(factory, ep.host, ep.port, ssl=_app_context(ctx, want),
                                   server_hostname=ctx.cfg.app_tls_name,
                                   ssl_handshake_timeout=ctx.cfg.connect_timeout),
            ctx.cfg.connect_timeout,
        )
        ssl_obj = t.get_extra_info("ssl_object")
        got = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        if want == "h2" and got != "h2":
            t.abort()
            raise ConnectionRefusedError(f"the app at {ep.addr} did not agree to h2 "
                                         f"(ALPN {got!r})")
    else:
        t, p = await asyncio.wait_for(
            loop.create_connection(factory, ep.host, ep.port), ctx.cfg.connect_timeout)
    if t.is_closing():
        # Reset before this coroutine resumed: its protocol heard connection_lost while
        # nobody was attached to it. Using it would wait forever: a failed connect.
        raise ConnectionResetError(f"{ep.addr} reset the connection before use")
    return t, p


_app_contexts: dict[str, ssl.SSLContext] = {}


def _app_context(ctx: ListenerCtx, alpn: str) -> ssl.SSLContext:
    """TLS to the app (MESHLET_APP_TLS), by ALPN; checked against MESHLET_APP_TLS_CA if
    set, else not checked (the app is local)."""
    c = _app_contexts.get(alpn)
    if c is None:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.minimum_version = ssl.TLSVersion.TLSv1_2
        ca = ctx.cfg.app_tls_ca
        if ca:
            c.load_verify_locations(cafile=ca)
        else:
            c.check_hostname = False
            c.verify_mode = ssl.CERT_NONE
        c.set_alpn_protocols([alpn])
        _app_contexts[alpn] = c
    return c


def _mux_usable(ctx: ListenerCtx, ep: Endpoint) -> bool:
    """Whether a connection to `ep` goes as a stream of a shared connection
    (`meshlet.proxy.mux`): a meshed endpoint, a valid certificate, mux not turned off,
    and the peer not known to lack it."""
    ident = ctx.proxy.identity
    return bool(ep.identity) and ctx.cfg.mux and ident is not None and ident.valid() \
        and ep.key not in ctx.proxy.no_mux


def _count(ctx: ListenerCtx, d: Decision, policy: str, client: str | None) -> None:
    name = "inbound_authz_allow_total" if d.allowed else "inbound_authz_deny_total"
    ctx.metrics.counter(
        name, "Inbound connections authorized (allow) or refused (deny), by policy.",
        (("policy", policy), ("reason", d.reason), ("client_id", client or "")),
    )


class PeekingListener:
    """Accepts on a meshed inbound port and routes each connection by its first bytes."""

    def __init__(self, plain: ListenerCtx, tls: ListenerCtx, sock: socket.socket,
                 ports: InboundPorts | None = None) -> None:
        self.plain = plain
        self.tls = tls
        self.sock = sock
        self.ports = ports  # transparent mode: contexts by original destination port
        self.loop = plain.loop
        self.pending = 0
        self.loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _accept(self) -> None:
        proxy = self.plain.proxy
        for _ in range(64):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            if proxy.draining or proxy.n_conns + self.pending >= proxy.cfg.max_connections:
                self.plain.count_refused()
                conn.close()
                continue
            plain, tls = self.plain, self.tls
            if self.ports is not None:
                pair = self.ports.get(conn)
                if pair is None or pair[1] is None:
                    plain.count_no_destination()
                    conn.close()
                    continue
                plain, tls = pair[0], pair[1]
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Pending(self, conn, addr[0], plain, tls)


class _Pending:
    """A connection whose first bytes are not known yet (bounded by the detect timeout)."""

    def __init__(self, lst: PeekingListener, conn: socket.socket, host: str,
                 plain: ListenerCtx, tls: ListenerCtx) -> None:
        self.lst = lst
        self.plain = plain
        self.tls = tls
        self.conn = conn
        import ipaddress  # meshed proxies only

        self.addr = ipaddress.ip_address(host.split("%")[0])
        self.seen = -1
        self.done = False
        lst.pending += 1
        loop = lst.loop
        # Even on an opaque port: mesh clients speak first (TLS). An unmeshed client of a
        # server-speaks-first app waits for the detect timeout here; such ports are better
        # left out of interception for unmeshed clients.
        loop.add_reader(conn.fileno(), self._peek)
        self.timer = loop.call_later(plain.cfg.detect_timeout, self._timeout)

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.lst.pending -= 1
            self.lst.loop.remove_reader(self.conn.fileno())
            self.timer.cancel()

    def _drop(self) -> None:
        self._finish()
        self.conn.close()

    def _timeout(self) -> None:
        self.plain.count_detect_timeout()
        self._decide(None, b"")

    def _peek(self) -> None:
        try:
            data = self.conn.recv(MAX_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop()
            return
        if not data:
            self._drop()
            return
        if data[0] != 0x16:
            self._decide(None, data)
            return
        try:
            hello = parse_client_hello(data)
        except ValueError:
            self._decide(None, data)  # not TLS after all: the plain path judges it
            return
        if hello is None:
            if len(data) == self.seen or len(data) >= MAX_HELLO:
                # Nothing new since the last look: stop polling a level-triggered fd,
                # look again shortly (a partial ClientHello is rare).
                loop = self.lst.loop
                loop.remove_reader(self.conn.fileno())
                loop.call_later(0.005, self._repoll)
            self.seen = len(data)
            return
        mesh = any(p.startswith("meshlet/") for p in hello.alpn)
        self._decide(True if mesh else None, data)

    def _repoll(self) -> None:
        if not self.done:
            self.lst.loop.add_reader(self.conn.fileno(), self._peek)

    def _decide(self, mesh_tls: bool | None, first: bytes) -> None:
        self._finish()
        self.lst.loop.create_task(self._connect(bool(mesh_tls), first))

    async def _connect(self, mesh_tls: bool, first: bytes) -> None:
        from meshlet.proxy.listener import Accepted

        lst = self.lst
        loop = lst.loop
        plain = self.plain
        proxy = plain.proxy
        policy = proxy.policy
        if not mesh_tls:
            d = authorize(policy, None, self.addr)
            _count(plain, d, policy.name, None)
            if not d.allowed:
                proto = detect(first)
                if proto is Proto.HTTP2 and proxy.conn_opened():
                    # HTTP/2 (gRPC): each request is answered 403 / PERMISSION_DENIED.
                    from meshlet.proxy.http2 import H2Downstream

                    plain.tcp_src.opened += 1
                    deny = "unauthorized_" + d.reason
                    await loop.connect_accepted_socket(
                        lambda: H2Downstream(plain, deny), self.conn)
                    return
                if proto is Proto.HTTP1:
                    self.conn.send(error_response(403, "unauthorized_" + d.reason))
                self.conn.close()
                return
            await loop.connect_accepted_socket(lambda: Accepted(plain), self.conn)
            return
        ident = proxy.identity
        if ident is None or not ident.valid():
            self.conn.close()  # no certificate to answer with
            return
        try:
            await loop.connect_accepted_socket(
                lambda: _MeshAccepted(self.tls, self.addr), self.conn,
                ssl=ident.server_context(), ssl_handshake_timeout=plain.cfg.detect_timeout)
        except (OSError, TimeoutError) as e:
            _log_handshake_failure(loop, str(self.addr), "mesh TLS handshake from %s "
                                   "failed: %s (further failures from it are counted in "
                                   "inbound_tls_handshake_errors_total, logged once a "
                                   "minute)", self.addr, e)
            plain.metrics.counter(
                "inbound_tls_handshake_errors_total", "Mesh TLS handshakes that failed.",
                (("direction", "inbound"),))
            self.conn.close()


class _MeshAccepted(asyncio.Protocol):
    """Right after the mTLS handshake: authorize, then hand over by ALPN."""

    def __init__(self, ctx: ListenerCtx, addr: Any) -> None:
        self.ctx = ctx
        self.addr = addr

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from meshlet.proxy.http1 import H1Downstream
        from meshlet.proxy.tcp import start_relay

        t: asyncio.Transport = transport  # type: ignore[assignment]
        proxy = self.ctx.proxy
        client = peer_identity(t)
        ctx = self.ctx.for_client(client) if client else self.ctx
        d = authorize(proxy.policy, client, self.addr)
        _count(ctx, d, proxy.policy.name, client)
        ssl_obj = t.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        if alpn == ALPN_MUX:
            # Counted per stream (each is a client connection), not as one here.
            if not proxy.conn_opened():
                t.abort()
                return
            from meshlet.proxy.mux import MuxServer

            mux = MuxServer(ctx, f"meshlet-client-id: {client}\r\n".encode() if client
                            else b"", None if d.allowed else "unauthorized_" + d.reason)
            t.set_protocol(mux)
            mux.connection_made(t)
            return
        if not d.allowed:
            if alpn == ALPN_H2 and proxy.conn_opened():
                from meshlet.proxy.http2 import H2Downstream

                ctx.tcp_src.opened += 1
                h2d = H2Downstream(ctx, "unauthorized_" + d.reason)
                t.set_protocol(h2d)
                h2d.connection_made(t)
                return
            if alpn == ALPN_H1:
                t.write(error_response(403, "unauthorized_" + d.reason))
            t.close()
            return
        if not proxy.conn_opened():
            t.abort()
            return
        ctx.tcp_src.opened += 1
        if alpn == ALPN_TCP:
            start_relay(ctx, t, b"")
            return
        if alpn == ALPN_H2:
            from meshlet.proxy.http2 import H2Downstream

            h2 = H2Downstream(ctx)
            h2.client_line = client.encode() if client else b""
            t.set_protocol(h2)
            h2.connection_made(t)
            return
        h = H1Downstream(ctx)
        h.client_line = f"meshlet-client-id: {client}\r\n".encode() if client else b""
        t.set_protocol(h)
        h.connection_made(t)
