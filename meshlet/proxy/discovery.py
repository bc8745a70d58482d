"""The proxy's side of discovery: watches on the control plane, one per resource in use.

Rules:
1. A destination (`host:port`) is watched from its first use, not before: a proxy's
   memory grows with the destinations it talks to, not with the mesh.
2. Until the first answer, and while it has no usable endpoint, a destination is
   `pending`: requests wait (bounded by `RESOLVE_TIMEOUT`, then 503 `no_endpoints`).
   `not_found` means the mesh does not know the name: the destination becomes the name
   itself, resolved by DNS and proxied unmeshed.
3. Fail static: when the control plane is unreachable, every destination keeps its last
   good endpoints; the watch reconnects with backoff (0.25 s doubling to 10 s, jittered)
   and resumes from its version, so an unchanged resource costs one short line.
4. A watch that hears nothing (not even a heartbeat) for `SILENCE` seconds is dropped
   and reconnected. Unused destinations are forgotten after `IDLE_FORGET` seconds.
5. Watches present the proxy's mesh certificate; the control plane is verified by the
   trust anchors and its certificate's name.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from meshlet.api.endpoints import Endpoint, EndpointSet
from meshlet.api.events import (
    EVENT_HEARTBEAT,
    EVENT_NOT_FOUND,
    EVENT_SNAPSHOT,
    EVENT_UNCHANGED,
    parse_event,
)
from meshlet.proxy.balance import Balancer

if TYPE_CHECKING:
    from meshlet.proxy.server import Proxy

__all__ = ["Destination", "DiscoveryClient", "Watch"]

log = logging.getLogger("meshlet.discovery")

SILENCE = 35.0
BACKOFF_MIN = 0.25
BACKOFF_MAX = 10.0
IDLE_FORGET = 300.0
MAX_DESTINATIONS = 10_000
MAX_LINE = 1 << 20

PENDING = "pending"
MESHED = "mesh"
DNS = "dns"


class Watch:
    """One resource watched on the control plane, reconnecting until closed."""

    def __init__(self, client: DiscoveryClient, path: str,
                 on_event: Callable[[dict[str, Any]], None]) -> None:
        self.client = client
        self.path = path  # "/v1/watch/endpoints?name=web:80"
        self.on_event = on_event
        self.version = ""
        self.connected = False
        self.last_error: str | None = None
        self.reconnects = 0
        self.task = client.loop.create_task(self._run())

    def close(self) -> None:
        self.task.cancel()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            while self.client.ssl_context_ready() is False:
                await asyncio.sleep(0.1)  # not certified yet: not a failure
            try:
                await self._once()
                self.last_error = "stream ended"
            except (OSError, ssl.SSLError, ValueError, EOFError, TimeoutError,
                    asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if self.connected:
                backoff = BACKOFF_MIN
                self.connected = False
                log.warning("watch %s lost (%s); keeping the last good state, reconnecting",
                            self.path, self.last_error)
            self.reconnects += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _once(self) -> None:
        c = self.client
        ctx = c.ssl_context()
        if ctx is None:
            raise OSError("no certificate yet")
        host, port = c.proxy.cfg.control_addr.host, c.proxy.cfg.control_addr.port  # type: ignore[union-attr]
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host,
                                    limit=MAX_LINE), 10.0)
        try:
            sep = "&" if "?" in self.path else "?"
            target = f"{self.path}{sep}version={quote(self.version)}"
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
            if status != b"200":
                body = await asyncio.wait_for(reader.read(4096), 2.0)
                raise ValueError(f"control plane answered {status.decode()}: "
                                 f"{body.decode(errors='replace').strip()[:200]}")
            while True:
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), SILENCE)
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0 or size > MAX_LINE:
                    return
                chunk = await asyncio.wait_for(reader.readexactly(size + 2), SILENCE)
                for line in chunk[:-2].splitlines():
                    e = parse_event(line)
                    if e["type"] == EVENT_HEARTBEAT:
                        continue
                    if not self.connected:
                        self.connected = True
                        self.last_error = None
                    self.version = str(e.get("version", ""))
                    self.on_event(e)
        finally:
            writer.close()


class Destination(Balancer):
    """An outbound destination's endpoints, fed by its watch."""

    __slots__ = ("answered", "host", "last_used", "port", "ready", "state", "watch")

    def __init__(self, host: str, port: int, opaque: bool) -> None:
        super().__init__(f"{host}:{port}", opaque)
        self.host = host
        self.port = port
        self.state = PENDING
        self.pending = True
        self.unresolved = True
        self.ready: asyncio.Event = asyncio.Event()  # set while it has a live endpoint
        self.answered: asyncio.Event = asyncio.Event()  # set once discovery answered
        self.watch: Watch | None = None
        self.last_used = 0.0

    def update(self, es: EndpointSet | None, opaque_ports: frozenset[int]) -> None:
        super().update(es, opaque_ports)
        self.unresolved = False
        self.answered.set()
        # No usable endpoint (none ready yet, or all drained): requests wait for one,
        # up to the fail-fast timeout, instead of failing at once.
        self.pending = not self._live
        if self._live:
            self.ready.set()
        else:
            self.ready.clear()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_resolved(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.answered.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def view(self) -> dict[str, Any]:
        w = self.watch
        return {"state": self.state, "version": self.version, "opaque": self.opaque,
                "watch_connected": bool(w and w.connected),
                "watch_error": w.last_error if w else None,
                "endpoints": self.endpoint_views(),
                "routes": self.routes.views() if self.routes is not None else []}


class DiscoveryClient:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.destinations: dict[tuple[str, int], Destination] = {}
        self.policy_watch: Watch | None = None
        self._ctx: ssl.SSLContext | None = None
        self._sweeper = self.loop.create_task(self._sweep())
        proxy.metrics.gauge("discovery_destinations", "Destinations watched now.",
                            lambda: [((), float(len(self.destinations)))])

    def ssl_context_ready(self) -> bool:
        ident = self.proxy.identity
        return ident is not None and ident.valid()

    def ssl_context(self) -> ssl.SSLContext | None:
        ident = self.proxy.identity
        if ident is None or not ident.valid():
            return None
        return ident.client_context()

    def destination(self, host: str, port: int) -> Destination:
        """The destination `host:port`, watched from now on (pending until answered)."""
        key = (host.lower(), port)
        d = self.destinations.get(key)
        if d is None:
            if len(self.destinations) >= MAX_DESTINATIONS:
                self._forget(0.0)
            d = Destination(key[0], port, port in self.proxy.cfg.opaque_ports)
            self.destinations[key] = d
            d.watch = Watch(self, f"/v1/watch/endpoints?name={quote(d.name)}",
                            lambda e, d=d: self._endpoints_event(d, e))  # type: ignore[misc]
        d.last_used = self.loop.time()
        return d

    def _endpoints_event(self, d: Destination, e: dict[str, Any]) -> None:
        kind = e["type"]
        opaque_ports = self.proxy.cfg.opaque_ports
        if kind == EVENT_SNAPSHOT:
            es = EndpointSet.from_json(e["data"])
            d.update(es, opaque_ports)
            d.state = MESHED
            old = d.routes.raw if d.routes is not None else None
            if es.routes != old:
                from meshlet.proxy.routing import RouteTable

                d.routes = RouteTable(es.routes) if es.routes else None
                for b in d.routes.backend_services() if d.routes else ():
                    host, _, port = b.partition(":")
                    self.destination(host, int(port) if port else d.port)  # watch now
            log.info("destination %s: %d endpoint(s) (version %s)", d.name,
                     len(es.endpoints), es.version)
        elif kind == EVENT_NOT_FOUND:
            if d.state != DNS:
                log.info("destination %s is not in the mesh: resolved by DNS, unmeshed",
                         d.name)
            d.update(EndpointSet(d.name, "dns", (Endpoint(d.host, d.port),), False),
                     opaque_ports)
            d.state = DNS
        elif kind == EVENT_UNCHANGED and d.state == PENDING:
            log.warning("destination %s: the control plane says unchanged before any "
                        "snapshot", d.name)

    def watch_policy(self, on_policy: Callable[[dict[str, Any] | None], None]) -> None:
        def on_event(e: dict[str, Any]) -> None:
            if e["type"] == EVENT_SNAPSHOT:
                on_policy(e["data"])
            elif e["type"] == EVENT_NOT_FOUND:
                on_policy(None)

        self.policy_watch = Watch(self, "/v1/watch/policy", on_event)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(30.0)
            self._forget(IDLE_FORGET)

    def _forget(self, idle: float) -> None:
        """Stop watching destinations unused for `idle` seconds (at least the oldest
        tenth when `idle` is 0: the table is full)."""
        now = self.loop.time()
        victims = [k for k, d in self.destinations.items() if now - d.last_used > idle]
        if idle == 0.0:
            victims = sorted(self.destinations,
                             key=lambda k: self.destinations[k].last_used)[
                :max(1, len(self.destinations) // 10)]
        for k in victims:
            d = self.destinations.pop(k)
            if d.watch is not None:
                d.watch.close()

    def in_sync(self) -> tuple[bool, list[str]]:
        """Whether every watch is connected; the problems if not."""
        problems = [f"{d.name}: {d.watch.last_error or 'not connected'}"
                    for d in self.destinations.values()
                    if d.watch is not None and not d.watch.connected]
        pw = self.policy_watch
        if pw is not None and not pw.connected:
            problems.append(f"policy: {pw.last_error or 'not connected'}")
        return not problems, problems

    def view(self) -> dict[str, Any]:
        ok, problems = self.in_sync()
        return {"in_sync": ok, "problems": problems,
                "destinations": {d.name: d.view() for d in self.destinations.values()}}

    def close(self) -> None:
        self._sweeper.cancel()
        for d in self.destinations.values():
            if d.watch is not None:
                d.watch.close()
        if self.policy_watch is not None:
            self.policy_watch.close()
