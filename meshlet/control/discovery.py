"""Discovery and policy watches: the mesh file's state, streamed to subscribed proxies.

Rules:
1. A proxy subscribes to one resource per watch: the endpoints of a destination
   (`host:port`) or the inbound policy of its own workload. It may give the version it
   holds; if that is still current it gets `unchanged` and nothing else until a change.
2. Versions are content hashes, so they survive a control-plane restart.
3. A new mesh replaces the old whole; only subscribed resources are recomputed, and only
   the ones whose version changed are sent.
4. A subscriber that does not read (its write buffer above `MAX_BUFFERED`) is cut off;
   it reconnects and resumes from its version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from meshlet.api.events import (
    EVENT_NOT_FOUND,
    EVENT_SNAPSHOT,
    EVENT_UNCHANGED,
    RESOURCE_ENDPOINTS,
    event,
)
from meshlet.api.mesh import Mesh, Service, policy_json, policy_version

__all__ = ["Discovery", "Subscriber"]

log = logging.getLogger("meshlet.control")

MAX_BUFFERED = 1 << 20


class Subscriber:
    """One watch: `send(line)` writes an event; `close()` ends the stream."""

    __slots__ = ("close", "key", "send", "version")

    def __init__(self, key: tuple[str, str], version: str,
                 send: Callable[[bytes], bool], close: Callable[[], None]) -> None:
        self.key = key
        self.version = version
        self.send = send  # returns False when the subscriber is too far behind
        self.close = close


class Discovery:
    def __init__(self, mesh: Mesh, trust_domain: str) -> None:
        self.mesh = mesh
        self.trust_domain = trust_domain
        self.subs: dict[tuple[str, str], set[Subscriber]] = {}
        self.updates_sent = 0
        self.resumed_unchanged = 0  # watches resumed at a still-current version

    # --- resources ----------------------------------------------------------------------

    def resolve(self, key: tuple[str, str]) -> tuple[str, str, dict[str, Any] | None]:
        """(event type, version, data) for a resource now."""
        kind, name = key
        if kind == RESOURCE_ENDPOINTS:
            host, _, port = name.rpartition(":")
            es = self.mesh.endpoint_set(host, int(port), self.trust_domain) \
                if port.isdigit() else None
            if es is None:
                return EVENT_NOT_FOUND, "none", None
            return EVENT_SNAPSHOT, es.version, es.to_json()
        svc = self.service_for(name)
        if svc is None:
            return EVENT_NOT_FOUND, "none", None
        return EVENT_SNAPSHOT, policy_version(svc.policy), policy_json(svc.policy)

    def service_for(self, identity: str) -> Service | None:
        """The service a workload identity serves (its namespace and account)."""
        td = self.mesh.trust_domain or self.trust_domain
        for s in self.mesh.services:
            if s.identity(td) == identity and s.ports:
                return s
        return None

    # --- subscriptions ------------------------------------------------------------------

    def subscribe(self, sub: Subscriber) -> None:
        kind, version, data = self.resolve(sub.key)
        if version == sub.version and kind != EVENT_NOT_FOUND:
            self.resumed_unchanged += 1
            sub.send(event(EVENT_UNCHANGED, sub.key, version))
        else:
            sub.send(event(kind, sub.key, version, data))
        sub.version = version
        self.subs.setdefault(sub.key, set()).add(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        s = self.subs.get(sub.key)
        if s is not None:
            s.discard(sub)
            if not s:
                del self.subs[sub.key]

    def set_mesh(self, mesh: Mesh) -> int:
        """Swap in a new mesh; push what changed. Returns the number of events sent."""
        self.mesh = mesh
        sent = 0
        for key, subs in list(self.subs.items()):
            kind, version, data = self.resolve(key)
            line: bytes | None = None
            for sub in list(subs):
                if sub.version == version:
                    continue
                if line is None:
                    line = event(kind, key, version, data)
                sub.version = version
                sent += 1
                if not sub.send(line):
                    log.warning("cutting off a slow subscriber of %s", key[1])
                    self.unsubscribe(sub)
                    sub.close()
        self.updates_sent += sent
        return sent

    def status(self) -> dict[str, Any]:
        return {"services": len(self.mesh.services),
                "subscriptions": sum(len(s) for s in self.subs.values()),
                "resources_watched": len(self.subs),
                "updates_sent": self.updates_sent,
                "resumed_unchanged": self.resumed_unchanged}

    def versions(self, keys: list[tuple[str, str]]) -> dict[str, str]:
        return {f"{k}/{n}": self.resolve((k, n))[1] for k, n in keys}
