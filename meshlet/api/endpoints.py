"""Discovery messages: the endpoints of a service.

`EndpointSet` is the one message that tells a proxy where a service lives. The static
endpoints file (`endpoints_file`), and later the control plane's discovery stream, both
produce it; the JSON form (`to_json`) is what travels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["API_VERSION", "Endpoint", "EndpointSet", "EndpointsFileError", "content_version"]

API_VERSION = "meshlet.dev/v1"


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1
    identity: str | None = None  # the peer's mesh identity, once mTLS lands
    key: tuple[str, int, str] = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # The pool's key: a connection verified for one identity serves only that one.
        object.__setattr__(self, "key", (self.host, self.port, self.identity or ""))

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"addr": self.addr, "weight": self.weight}
        if self.identity:
            d["identity"] = self.identity
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Endpoint:
        host, _, port = str(d["addr"]).rpartition(":")
        ident = d.get("identity")
        return cls(host.strip("[]"), int(port), int(d.get("weight", 1)),
                   str(ident) if ident else None)


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointSet:
    service: str  # "name:port"
    version: str  # opaque; equal versions mean equal content (`content_version`)
    endpoints: tuple[Endpoint, ...]
    opaque: bool = False  # protocol hint: skip detection, proxy raw TCP
    # The service's HTTP routes and retry budget (`meshlet.api.routes`, JSON form), or None.
    routes: dict[str, Any] | None = dataclasses.field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "EndpointSet",
            "service": self.service,
            "version": self.version,
            "opaque": self.opaque,
            "endpoints": [e.to_json() for e in self.endpoints],
            **({"routes": self.routes} if self.routes else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EndpointSet:
        return cls(str(d["service"]), str(d["version"]),
                   tuple(Endpoint.from_json(e) for e in d["endpoints"]),
                   bool(d.get("opaque", False)), d.get("routes"))

    @classmethod
    def make(cls, service: str, endpoints: tuple[Endpoint, ...], opaque: bool,
             routes: dict[str, Any] | None = None) -> EndpointSet:
        """A set whose version is the hash of its content."""
        content: list[Any] = [service, opaque, [e.to_json() for e in endpoints]]
        if routes:
            content.append(routes)
        return cls(service, content_version(content), endpoints, opaque, routes)


def content_version(obj: Any) -> str:
    """A version that depends only on content: a restarted control plane with the same
    mesh gives the same versions, so resuming proxies are told "unchanged"."""
    import hashlib  # not at import time: `_hashlib` costs a standalone proxy ~0.8 MB RSS
    import json

    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


class EndpointsFileError(Exception):
    """A static endpoints file was refused; `errors` has one `file:line: field: reason`
    line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
