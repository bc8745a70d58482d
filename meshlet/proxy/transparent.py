"""Transparent mode: where a redirected connection was going, and its context.

`meshlet init` redirects a pod's TCP to the proxy (nat REDIRECT); the kernel remembers
each connection's original destination, read here with SO_ORIGINAL_DST.

Rules:
1. Inbound: a connection for port P goes to P on localhost (the app), with P's
   protocol hint (opaque ports skip detection). A connection made to the inbound port
   itself (not redirected) goes to `MESHLET_APP_ADDR` if set, else it is refused.
2. Outbound: a connection for IP:PORT goes to the destination discovery names for it
   (a mesh service's address, or one workload's: balanced, mTLS); discovery's
   `not_found` sends it on unmeshed to IP:PORT itself. Without a control plane every
   destination is passed through as it is.
3. A destination that is one of this proxy's own listeners is refused: a redirect
   loop (rules that do not exclude the proxy's own traffic) must not spin.
4. One context per destination, cached (bounded: past `MAX_DESTINATIONS` the cache
   starts over), so per-connection work is one getsockopt and one dict lookup.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from meshlet.proxy.balance import Fixed, Target
from meshlet.proxy.context import ListenerCtx

if TYPE_CHECKING:
    from meshlet.proxy.server import Proxy

__all__ = ["InboundPorts", "OutboundDestinations", "original_dst"]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number
MAX_DESTINATIONS = 10000
_LOOPBACK = frozenset(("127.0.0.1", "::1", "0.0.0.0", "::"))


def original_dst(sock: Any) -> tuple[str, int] | None:
    """The (host, port) a redirected connection was sent to; None when the kernel has no
    record (no NAT on it: a direct connection)."""
    try:
        if sock.family == socket.AF_INET6:
            try:
                raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
                return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(
                    raw[2:4], "big")
            except OSError:
                pass  # an IPv4 client on a dual-stack socket: asked below
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
    except OSError:
        return None


class InboundPorts:
    """Inbound contexts per original destination port (plain, and mTLS when meshed)."""

    __slots__ = ("by_port", "fixed", "meshed", "own", "proxy")

    def __init__(self, proxy: Proxy, fixed: tuple[ListenerCtx, ListenerCtx | None] | None,
                 meshed: bool) -> None:
        self.proxy = proxy
        self.fixed = fixed  # for direct connections, when MESHLET_APP_ADDR is set
        self.meshed = meshed
        self.own: set[int] = set()  # this proxy's listening ports
        self.by_port: dict[int, tuple[ListenerCtx, ListenerCtx | None]] = {}

    def get(self, sock: Any) -> tuple[ListenerCtx, ListenerCtx | None] | None:
        dst = original_dst(sock)
        if dst is None or dst[1] in self.own:
            # Not redirected, or redirected to ourselves: only an explicit app will do.
            if dst is not None and dst[1] != sock.getsockname()[1]:
                return None  # another of our ports: a loop
            return self.fixed
        port = dst[1]
        pair = self.by_port.get(port)
        if pair is None:
            proxy = self.proxy
            target: Target = Fixed(f"127.0.0.1:{port}", "127.0.0.1", port,
                                   port in proxy.cfg.opaque_ports)
            plain = ListenerCtx(proxy, "inbound", target, None, strip_mesh=True)
            tls: ListenerCtx | None = None
            if self.meshed:
                plain.set_tls("not_provided_by_remote")
                tls = ListenerCtx(proxy, "inbound", target, None, strip_mesh=True)
                tls.set_tls("true")
            pair = (plain, tls)
            if len(self.by_port) >= MAX_DESTINATIONS:
                self.by_port.clear()
            self.by_port[port] = pair
        return pair

    def ctx_for(self, sock: Any) -> ListenerCtx | None:
        pair = self.get(sock)
        return pair[0] if pair is not None else None


class OutboundDestinations:
    """Outbound contexts per original destination IP:PORT."""

    __slots__ = ("by_dst", "own", "proxy")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.own: set[int] = set()
        self.by_dst: dict[tuple[str, int], ListenerCtx] = {}

    def ctx_for(self, sock: Any) -> ListenerCtx | None:
        dst = original_dst(sock)
        if dst is None:
            return None  # a direct connection to the outbound port: nowhere to go
        host, port = dst
        if port in self.own and (host in _LOOPBACK or host == sock.getsockname()[0]):
            return None
        return self.ctx_for_dst(host, port)

    def ctx_for_dst(self, host: str, port: int) -> ListenerCtx:
        """The context of connections for `host:port` (also CONNECT tunnels)."""
        dst = (host, port)
        proxy = self.proxy
        disc = proxy.discovery
        ctx = self.by_dst.get(dst)
        target: Target
        if disc is not None:
            # Asked every time: it keeps the destination watched, and a destination
            # discovery forgot (idle) and made anew must not be served from a stale one.
            target = disc.destination(host, port)
            if ctx is not None and ctx.target is target:
                return ctx
        elif ctx is not None:
            return ctx
        else:
            target = Fixed(f"{host}:{port}", host, port, port in proxy.cfg.opaque_ports)
        ctx = ListenerCtx(proxy, "outbound", target, None, strip_mesh=False)
        if proxy.identity is not None:
            ctx.set_tls("no_identity")
            ctx.meshed = ListenerCtx(proxy, "outbound", target, None, strip_mesh=False)
            ctx.meshed.set_tls("true")
        if len(self.by_dst) >= MAX_DESTINATIONS:
            self.by_dst.clear()
        self.by_dst[dst] = ctx
        return ctx
