"""The proxy process: listeners, discovery state, admin server, graceful shutdown.

Rules:
1. The inbound listener forwards to the app (`MESHLET_APP_ADDR`); each outbound listener
   is bound to one service whose endpoints come from the static endpoints file (later:
   the control plane's stream of the same `EndpointSet` messages).
2. The endpoints file is re-read when it changes; a bad edit is logged and counted and
   the last good endpoints stay in force.
3. Shutdown (SIGTERM, SIGINT or POST /shutdown): stop accepting, close idle keep-alive
   connections, let in-flight exchanges finish within `shutdown_grace`, then exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Any, Protocol

from meshlet.api.endpoints import EndpointSet, EndpointsFileError
from meshlet.config import Addr, ProxyConfig
from meshlet.metrics.registry import Metrics
from meshlet.policy.authz import Policy
from meshlet.proxy.balance import Balancer, Fixed, Target
from meshlet.proxy.context import ListenerCtx
from meshlet.proxy.listener import Accepted
from meshlet.proxy.pool import Pool

if TYPE_CHECKING:
    from meshlet.proxy.discovery import DiscoveryClient
    from meshlet.proxy.http1 import H1Upstream
    from meshlet.proxy.http2 import H2Upstream
    from meshlet.proxy.identity import IdentityManager
    from meshlet.proxy.mux import MuxClient
    from meshlet.proxy.transparent import InboundPorts, OutboundDestinations

__all__ = ["Proxy", "run_proxy"]

log = logging.getLogger("meshlet.proxy")


class _Closable(Protocol):
    def close(self) -> None: ...


class Proxy:
    def __init__(self, cfg: ProxyConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.metrics = Metrics()
        self.pool: Pool[H1Upstream] = Pool(loop, cfg.pool_idle_timeout, cfg.pool_max_idle)
        self.conns: set[Any] = set()
        self.n_conns = 0
        self.draining = False
        self.ready = False
        self.servers: list[_Closable] = []
        self.policy = Policy(cfg.inbound_policy, cfg.inbound_policy)
        self.balancers: dict[str, Balancer] = {}
        self.endpoint_sets: dict[str, EndpointSet] = {}
        self.listeners: list[dict[str, str]] = []
        self.done = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._file_mtime: float | None = None
        self.identity: IdentityManager | None = None
        self.discovery: DiscoveryClient | None = None
        self.app_down: str | None = None  # why the app was unreachable last time
        self._transparent: list[InboundPorts | OutboundDestinations] = []
        # CONNECT tunnels' contexts per destination (the HTTP proxy listener).
        self.tunnels: OutboundDestinations | None = None
        # HTTP/2 upstream connections per endpoint key (`meshlet.proxy.http2`).
        self.h2pool: dict[tuple[str, int, str], list[H2Upstream]] = {}
        # HTTP/1.1 to peer proxies as streams of shared connections (meshlet.proxy.mux).
        self.muxpool: dict[tuple[str, int, str], list[MuxClient]] = {}
        self.muxconnecting: dict[tuple[str, int, str], Any] = {}
        self.no_mux: set[tuple[str, int, str]] = set()  # peers without meshlet/mux
        self._app_probe_at = -1.0
        self.metrics.gauge("pool_idle_connections", "Idle pooled upstream connections.",
                           lambda: [((), float(self.pool.idle_count()))])
        self.metrics.gauge("process_open_connections", "Client connections open now.",
                           lambda: [((), float(self.n_conns))])
        self.metrics.gauge("balancer_endpoints", "Endpoints of each outbound destination, "
                           "by state (ready, or ejected by failure accrual).",
                           self._balancer_gauge)

    def lookup(self, host: str, port: int) -> Target:
        """The target for `host:port` (a route's backend): discovery's destination, or
        with an endpoints file that file's service (empty if it has none)."""
        if self.discovery is not None:
            return self.discovery.destination(host, port)
        name = f"{host}:{port}"
        bal = self.balancers.get(name)
        if bal is None:
            bal = Balancer(name, False)
            bal.update(self.endpoint_sets.get(name), self.cfg.opaque_ports)
            self.balancers[name] = bal
        return bal

    def _balancer_gauge(self) -> list[tuple[tuple[tuple[str, str], ...], float]]:
        bals: dict[str, Balancer] = dict(self.balancers)
        if self.discovery is not None:
            for d in self.discovery.destinations.values():
                bals.setdefault(d.name, d)
        out: list[tuple[tuple[tuple[str, str], ...], float]] = []
        for name, b in sorted(bals.items()):
            n = len(b.states())
            out.append(((("authority", name), ("state", "ready")), float(n - b.ejected)))
            out.append(((("authority", name), ("state", "ejected")), float(b.ejected)))
        return out

    # --- connection accounting --------------------------------------------------------

    def conn_opened(self) -> bool:
        if self.draining or self.n_conns >= self.cfg.max_connections:
            return False
        self.n_conns += 1
        return True

    def conn_closed(self) -> None:
        self.n_conns -= 1

    # --- start ------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Listening, not draining, and (with a control plane) holding a valid cert."""
        return self.ready and (self.identity is None or self.identity.valid())

    async def not_ready_reason(self) -> str | None:
        """Why the proxy is not ready (None: ready): not started or draining, no valid
        certificate, or its app refused the last connection (then the app is probed,
        at most every 0.5 s, until it accepts one again). The app is not probed while
        connections to it succeed, so a healthy app sees no extra connections."""
        if not self.ready:
            return "shutting down" if self.draining else "starting"
        if self.identity is not None and not self.identity.valid():
            err = self.identity.last_error
            return "no valid certificate yet" + (f" ({err})" if err else "")
        app = self.cfg.app_addr
        if app is None or self.app_down is None:
            return None
        now = self.loop.time()
        if now - self._app_probe_at > 0.5:
            self._app_probe_at = now
            try:
                _r, w = await asyncio.wait_for(
                    asyncio.open_connection(app.host, app.port), 1.0)
                w.close()
                self.app_reachable()
            except TimeoutError:
                self.app_down = "timeout"
            except OSError as e:
                self.app_down = (e.strerror or str(e)).lower()
        return f"app {app} unreachable: {self.app_down}" if self.app_down else None

    def app_unreachable(self, reason: str) -> None:
        if self.app_down is None:
            log.warning("app %s unreachable (%s): not ready until it accepts connections",
                        self.cfg.app_addr, reason)
        self.app_down = reason

    def app_reachable(self) -> None:
        if self.app_down is not None:
            log.info("app %s reachable again", self.cfg.app_addr)
        self.app_down = None

    async def start(self) -> None:
        cfg = self.cfg
        # One proxy per process: the balancer's tunables are process-wide.
        Balancer.default_rtt = cfg.balancer_default_rtt
        Balancer.decay = max(cfg.balancer_decay, 0.001)
        Balancer.consecutive_failures = cfg.failure_accrual
        Balancer.eject_base = cfg.failure_backoff
        Balancer.eject_max = max(cfg.failure_backoff_max, cfg.failure_backoff)
        if cfg.control_addr is not None:
            # `cryptography` costs ~8 MB of RSS: a standalone proxy never imports it.
            from meshlet.proxy.identity import IdentityManager

            self.identity = IdentityManager(self)
            self.identity.start()
            if not cfg.endpoints_file:
                from meshlet.proxy.discovery import DiscoveryClient

                self.discovery = DiscoveryClient(self)
                if cfg.inbound_listen is not None and (cfg.app_addr is not None
                                                       or cfg.transparent):
                    self.discovery.watch_policy(self._set_policy)
        if cfg.endpoints_file:
            from meshlet.api.endpoints_file import load_endpoints_file

            self.endpoint_sets = load_endpoints_file(cfg.endpoints_file)
            self._file_mtime = _mtime(cfg.endpoints_file)
        if cfg.inbound_listen is not None and (cfg.app_addr is not None or cfg.transparent):
            await self._start_inbound(cfg.inbound_listen)
        for b in cfg.outbound:
            if self.discovery is not None:
                host, _, port = b.service.rpartition(":")
                bal: Balancer = self.discovery.destination(host, int(port))
            else:
                bal = Balancer(b.service, b.opaque)
                bal.update(self.endpoint_sets.get(b.service), cfg.opaque_ports)
            bal.opaque = bal.opaque or b.opaque
            self.balancers[b.service] = bal
            octx = ListenerCtx(self, "outbound", bal, b.service, strip_mesh=False)
            if self.identity is not None:
                octx.set_tls("no_identity")  # to endpoints discovery names no identity for
                octx.meshed = ListenerCtx(self, "outbound", bal, b.service, strip_mesh=False)
                octx.meshed.set_tls("true")
            await self._listen(b.listen, octx, b.service)
        if cfg.outbound_proxy_listen is not None and self.discovery is not None:
            from meshlet.proxy.router import Router

            router = Router(self.discovery)
            pctx = ListenerCtx(self, "outbound", Balancer("http-proxy", False), None,
                               strip_mesh=False)
            pctx.router = router
            pctx.set_tls("no_identity")
            pctx.meshed = ListenerCtx(self, "outbound", pctx.target, None, strip_mesh=False)
            pctx.meshed.router = router
            pctx.meshed.set_tls("true")
            await self._listen(cfg.outbound_proxy_listen, pctx, "(by Host: HTTP proxy)")
            router.own_ports = {int(x["listen"].rpartition(":")[2]) for x in self.listeners}
        if cfg.outbound_listen is not None:
            await self._start_transparent_outbound(cfg.outbound_listen)
        if cfg.endpoints_file:
            self.loop.create_task(self._watch_file(cfg.endpoints_file))
        from meshlet.proxy.admin import start_admin

        self.servers.append(await start_admin(self, cfg.admin_listen))
        own = {int(x["listen"].rpartition(":")[2]) for x in self.listeners}
        own.add(cfg.admin_listen.port)
        for t in self._transparent:
            t.own = own
        # Startup objects live forever: keep them out of the cyclic GC's scans, so its
        # pauses on the data path stay short.
        gc.collect()
        gc.freeze()
        _tune_malloc()
        self.ready = True
        if self.identity is None:
            log.info("meshlet proxy up: standalone, plaintext (no control plane); admin on "
                     "%s", cfg.admin_listen)
        else:
            log.info("meshlet proxy up as %s (control plane %s); ready once certified; "
                     "admin on %s", self.identity.identity, cfg.control_addr,
                     cfg.admin_listen)

    async def _start_inbound(self, listen: Addr) -> None:
        """The inbound listener: to MESHLET_APP_ADDR, or in transparent mode to each
        connection's original port on localhost (then also on IPv6 when listening on
        every IPv4 address and the host has IPv6)."""
        cfg = self.cfg
        meshed = self.identity is not None
        fixed: tuple[ListenerCtx, ListenerCtx | None] | None = None
        if cfg.app_addr is not None:
            app = cfg.app_addr
            target: Target = Fixed(str(app), app.host, app.port, app.port in cfg.opaque_ports)
            plain = ListenerCtx(self, "inbound", target, None, strip_mesh=True)
            tls = None
            if meshed:
                plain.set_tls("not_provided_by_remote")
                tls = ListenerCtx(self, "inbound", target, None, strip_mesh=True)
                tls.set_tls("true")
            fixed = (plain, tls)
            where = str(app)
        else:
            where = "(original destination port on localhost)"
            target = Fixed(where, "127.0.0.1", listen.port, False)  # never forwarded to
            plain = ListenerCtx(self, "inbound", target, None, strip_mesh=True)
            tls = ListenerCtx(self, "inbound", target, None, strip_mesh=True)
            if meshed:
                plain.set_tls("not_provided_by_remote")
                tls.set_tls("true")
        ports = None
        if cfg.transparent:
            from meshlet.proxy.transparent import InboundPorts

            ports = InboundPorts(self, fixed, meshed)
            self._transparent.append(ports)
        addrs = [listen]
        if cfg.transparent and listen.host == "0.0.0.0" and socket.has_ipv6 and _ipv6_up():
            addrs.append(Addr("::", listen.port))
        for addr in addrs:
            if not meshed:
                ctx = plain
                if ports is not None:
                    ctx = ListenerCtx(self, "inbound", plain.target, None, strip_mesh=True)
                    ctx.orig = ports
                await self._listen(addr, ctx, where, v6only=addr is not listen)
                continue
            from meshlet.proxy.mtls import PeekingListener

            assert tls is not None
            sock = bind(addr, v6only=addr is not listen)
            self.servers.append(PeekingListener(plain, tls, sock, ports))
            self._listed(plain, sock, where)

    async def _start_transparent_outbound(self, listen: Addr) -> None:
        """The transparent outbound listener: each connection to its original
        destination, as discovery names it (`meshlet.proxy.transparent`)."""
        from meshlet.proxy.transparent import OutboundDestinations

        dsts = OutboundDestinations(self)
        self._transparent.append(dsts)
        addrs = [listen]
        if listen.host == "127.0.0.1" and socket.has_ipv6 and _ipv6_up():
            addrs.append(Addr("::1", listen.port))
        for addr in addrs:
            ctx = ListenerCtx(self, "outbound", Fixed("(original destination)",
                                                      addr.host, addr.port, False),
                              None, strip_mesh=False)
            ctx.orig = dsts
            await self._listen(addr, ctx, "(original destination)", v6only=addr is not listen)

    async def _listen(self, addr: Addr, ctx: ListenerCtx, target: str,
                      v6only: bool = False) -> None:
        sock = bind(addr, v6only=v6only)
        self.servers.append(await self.loop.create_server(lambda: Accepted(ctx), sock=sock))
        self._listed(ctx, sock, target)

    def _listed(self, ctx: ListenerCtx, sock: socket.socket, target: str) -> None:
        host, port = sock.getsockname()[:2]
        self.listeners.append({"direction": ctx.direction, "listen": f"{host}:{port}",
                               "target": target, "opaque": str(ctx.target.opaque).lower(),
                               "tls": ctx.tls})
        log.info("%s listener on %s:%d -> %s", ctx.direction, host, port, target)

    def _set_policy(self, spec: dict[str, Any] | None) -> None:
        from meshlet.policy.authz import PolicyError, parse_policy

        default = self.cfg.inbound_policy
        if spec is None:
            self.policy = Policy(default, default)
            return
        try:
            self.policy = parse_policy("mesh", spec)
        except PolicyError as e:  # the control plane checked it: a version mismatch
            log.error("policy from the control plane refused, keeping %s: %s",
                      self.policy.name, e)
            return
        log.info("inbound policy: default %s, %d rule(s)", self.policy.default,
                 len(self.policy.rules))

    async def _watch_file(self, path: str) -> None:
        from meshlet.api.endpoints_file import load_endpoints_file

        while not self.draining:
            await asyncio.sleep(1.0)
            m = _mtime(path)
            if m is None or m == self._file_mtime:
                continue
            self._file_mtime = m
            try:
                sets = load_endpoints_file(path)
            except EndpointsFileError as e:
                self.metrics.counter("endpoints_file_errors_total",
                                     "Edits of the endpoints file refused as invalid.")
                log.error("endpoints file refused, keeping the last good state:\n%s", e)
                continue
            self.apply_endpoints(sets)

    def apply_endpoints(self, sets: dict[str, EndpointSet]) -> None:
        self.endpoint_sets = sets
        for name, bal in self.balancers.items():
            bal.update(sets.get(name), self.cfg.opaque_ports)
        log.info("endpoints updated: %s", ", ".join(
            f"{n}={len(s.endpoints)}" for n, s in sorted(sets.items())))

    # --- admin views ------------------------------------------------------------------

    def config_view(self) -> dict[str, Any]:
        return {
            "mode": "standalone" if self.identity is None else "meshed",
            "tls": "disabled: no control plane configured (plaintext)"
            if self.identity is None else "mTLS to meshed endpoints",
            "identity": self.identity.view() if self.identity is not None else None,
            "discovery": self.discovery.view() if self.discovery is not None else None,
            "policy": {"default": self.policy.default,
                       "rules": [r.name for r in self.policy.rules]},
            "config": self.cfg.to_json(),
            "listeners": self.listeners,
            "endpoints": {
                name: {
                    "version": bal.version,
                    "opaque": bal.opaque,
                    "endpoints": bal.endpoint_views(),
                }
                for name, bal in self.balancers.items()
            },
            # Shared mesh connections to peers (meshlet/mux): streams open on each.
            "mux": [{"peer": f"{host}:{port}", "identity": ident,
                     "streams": [len(mc.streams) for mc in conns]}
                    for (host, port, ident), conns in self.muxpool.items()],
            "no_mux": sorted(f"{h}:{p}" for h, p, _i in self.no_mux),
            "pid": os.getpid(),
        }

    # --- shutdown ---------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        if self._shutdown_task is None:
            self._shutdown_task = self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        log.info("shutting down: draining %d connection(s), grace %.1fs",
                 self.n_conns, self.cfg.shutdown_grace)
        self.draining = True
        self.ready = False
        admin = self.servers[-1] if self.servers else None
        for s in self.servers:
            if s is not admin:
                s.close()
        for c in list(self.conns):
            c.shutdown()
        deadline = self.loop.time() + self.cfg.shutdown_grace
        while self.n_conns > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        left = self.n_conns
        for c in list(self.conns):
            t = getattr(c, "transport", None)
            if t is not None:
                t.abort()
        self.pool.close_all()
        if self.discovery is not None:
            self.discovery.close()
        if self.identity is not None:
            self.identity.close()
        if admin is not None:
            admin.close()
        if left:
            log.warning("grace period over: %d connection(s) cut", left)
        log.info("shutdown complete")
        self.done.set()


def bind(addr: Addr, backlog: int = 1024, v6only: bool = False) -> socket.socket:
    """A listening socket made here rather than by the loop: uvloop resolves a host given
    to `create_server` on libuv's thread pool, which costs four threads and ~6 MB RSS."""
    family = _numeric_family(addr.host)
    if family is not None:  # an IP literal: no resolver (and no `idna` codec, ~450 KB)
        kind, proto = socket.SOCK_STREAM, 0
        sockaddr: tuple[Any, ...] = (addr.host, addr.port)
    else:
        family, kind, proto, _name, sockaddr = socket.getaddrinfo(
            addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _numeric_family(host: str) -> socket.AddressFamily | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except OSError:
            continue
    return None


def _ipv6_up() -> bool:
    """Whether this network namespace has IPv6 (a loopback ::1 to bind)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _tune_malloc() -> None:
    """Tune glibc malloc for the data path, and give start-up memory back.

    TLS reads allocate a 256 KiB buffer, then shrink it to what was read: above glibc's
    mmap threshold (128 KiB) that is an mmap, an mremap and a munmap per read, about half
    of an mTLS proxy's CPU. A fixed 1 MiB threshold keeps such buffers on the heap. Then
    the memory that start-up used and freed (imports, regex compilation) goes back to the
    OS: about 1 MB of resident memory per proxy."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


async def _main(cfg: ProxyConfig) -> int:
    loop = asyncio.get_running_loop()
    proxy = Proxy(cfg, loop)
    try:
        await proxy.start()
    except EndpointsFileError as e:
        log.error("invalid endpoints file:\n%s", e)
        return 64
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.begin_shutdown)
    await proxy.done.wait()
    return 0


def run_proxy(cfg: ProxyConfig) -> int:
    """Run the proxy until shut down; returns the exit status."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(_main(cfg))
    return uvloop.run(_main(cfg))
