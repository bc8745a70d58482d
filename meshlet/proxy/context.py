"""What every connection on one listener shares: direction, target, limits, metrics.

One `ListenerCtx` per listener; connections hold a reference to it and look nothing
up per request beyond what the request itself decides (its authority's stats).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from meshlet.api.endpoints import Endpoint
from meshlet.config import ProxyConfig
from meshlet.metrics.registry import HttpStats, Metrics, TcpStats
from meshlet.proxy.balance import Fixed, Target
from meshlet.proxy.pool import Pool

if TYPE_CHECKING:
    from meshlet.proxy.http1 import H1Upstream
    from meshlet.proxy.router import Router
    from meshlet.proxy.server import Proxy
    from meshlet.proxy.transparent import InboundPorts, OutboundDestinations

__all__ = ["ListenerCtx"]


class ListenerCtx:
    __slots__ = (
        "_clients",
        "app_tls",
        "authority",
        "by_host",
        "cfg",
        "client_id",
        "direction",
        "fixed",
        "loop",
        "meshed",
        "metrics",
        "orig",
        "pool",
        "proxy",
        "router",
        "strip_mesh",
        "target",
        "tcp_dst",
        "tcp_src",
        "tls",
    )

    def __init__(
        self,
        proxy: Proxy,
        direction: str,
        target: Target,
        authority: str | None,
        strip_mesh: bool,
    ) -> None:
        self.proxy = proxy
        self.loop: asyncio.AbstractEventLoop = proxy.loop
        self.cfg: ProxyConfig = proxy.cfg
        self.pool: Pool[H1Upstream] = proxy.pool
        self.metrics: Metrics = proxy.metrics
        self.direction = direction
        self.target = target
        # The one endpoint of a fixed target (inbound), so requests skip the pick.
        self.fixed: Endpoint | None = target.pick() if isinstance(target, Fixed) else None
        # Inbound to an app that serves TLS itself (MESHLET_APP_TLS): spoken to over TLS.
        self.app_tls = proxy.cfg.app_tls and direction == "inbound" and self.fixed is not None
        self.authority = authority  # fixed label (outbound: the service), else per Host
        self.strip_mesh = strip_mesh
        # Plaintext until the identity issue lands; the label says why it is not TLS.
        self.tls = "disabled"
        self.tcp_src: TcpStats = self.metrics.tcp(direction, "src", self.tls)
        self.tcp_dst: TcpStats = self.metrics.tcp(direction, "dst", self.tls)
        self.by_host: dict[bytes, HttpStats] = {}
        self.client_id = ""
        self._clients: dict[str, ListenerCtx] = {}
        # Outbound on a meshed proxy: the context counting mTLS connections to peers.
        self.meshed: ListenerCtx | None = None
        # The outbound HTTP proxy listener: picks a target per request (else None).
        self.router: Router | None = None
        # Transparent mode: each connection's context comes from its original
        # destination (`meshlet.proxy.transparent`); this one is only the listener's.
        self.orig: InboundPorts | OutboundDestinations | None = None

    def count_refused(self) -> None:
        """A connection closed at accept: a limit was reached, or shutting down."""
        self.metrics.counter("tcp_refused_total", "Connections closed at accept because a "
                             "limit was reached or the proxy is shutting down.",
                             (("direction", self.direction),))

    def count_no_destination(self) -> None:
        """Transparent mode: a connection with no original destination to go to (made
        to the listener directly, or redirected back to this proxy: a loop)."""
        self.metrics.counter("tcp_no_destination_total", "Transparent-mode connections "
                             "closed at accept: made to a proxy port directly, or a "
                             "redirect loop.", (("direction", self.direction),))

    def count_detect_timeout(self) -> None:
        self.metrics.counter("protocol_detect_timeout_total", "Connections that sent too "
                             "little to detect a protocol in time and were proxied as "
                             "opaque TCP.", (("direction", self.direction),))

    def set_tls(self, label: str, client_id: str = "") -> None:
        """The `tls` label of this context's connections ("true", or why not), and for
        mTLS the client's identity (`client_id` label)."""
        self.tls = label
        self.client_id = client_id
        self.tcp_src = self.metrics.tcp(self.direction, "src", label, client_id)
        self.tcp_dst = self.metrics.tcp(self.direction, "dst", label, client_id)
        self.by_host.clear()

    def for_client(self, client_id: str) -> ListenerCtx:
        """A context like this one whose metrics carry `client_id` (kept per identity,
        bounded: past 1,000 identities they share one)."""
        ctx = self._clients.get(client_id)
        if ctx is None:
            if len(self._clients) >= 1000:
                client_id = "overflow"
                ctx = self._clients.get(client_id)
            if ctx is None:
                ctx = ListenerCtx(self.proxy, self.direction, self.target, self.authority,
                                  self.strip_mesh)
                ctx.router = self.router
                ctx.set_tls(self.tls, client_id)
                self._clients[client_id] = ctx
        return ctx

    def http_stats(self, host: bytes) -> HttpStats:
        st = self.by_host.get(host)
        if st is None:
            label = self.authority
            if label is None:
                label = host.decode("latin-1")
            st = self.metrics.http(self.direction, label, self.tls, self.client_id)
            if len(self.by_host) < 4096:
                self.by_host[host] = st
        return st
