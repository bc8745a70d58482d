"""Where a connection or request goes: a fixed address, or a service's endpoints.

Rules:
1. `pick()` is a pure decision on the current endpoint list; it does no I/O.
2. Endpoint lists are replaced whole (`update`), never edited in place, so a pick never
   sees a half-applied change.
3. Weights are honoured (weight 0 drains an endpoint); equal weights use round-robin.
   Latency-aware balancing replaces this with the traffic-management issue.
"""

from __future__ import annotations

import abc
import random
from bisect import bisect_right
from itertools import accumulate

from meshlet.api.endpoints import Endpoint, EndpointSet

__all__ = ["RESOLVE_TIMEOUT", "Balancer", "Fixed", "Target"]

# How long a request waits for discovery's first answer, or for an endpoint when a
# destination has none (then 503): the fail-fast timeout.
RESOLVE_TIMEOUT = 3.0


class Target(abc.ABC):
    """Base: something that picks an endpoint."""

    __slots__ = ("name", "opaque", "pending", "unresolved")

    def __init__(self, name: str, opaque: bool) -> None:
        self.name = name
        self.opaque = opaque
        # True while there is no usable endpoint and waiting may bring one
        # (`meshlet.proxy.discovery.Destination`); `unresolved`: discovery has not
        # answered at all yet, so even whether the target is opaque is unknown.
        self.pending = False
        self.unresolved = False

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until not pending (at most `timeout`); False if still pending."""
        return not self.pending

    async def wait_resolved(self, timeout: float) -> bool:
        """Wait until discovery has answered (at most `timeout`)."""
        return not self.unresolved

    @abc.abstractmethod
    def pick(self, exclude: Endpoint | None = None) -> Endpoint | None:
        """An endpoint for the next connection or request (never `exclude` if another
        is available), or None when there is none."""

    @abc.abstractmethod
    def endpoints(self) -> tuple[Endpoint, ...]:
        """All current endpoints, drained ones included."""


class Fixed(Target):
    """Inbound: always the app."""

    __slots__ = ("_ep",)

    def __init__(self, name: str, host: str, port: int, opaque: bool) -> None:
        super().__init__(name, opaque)
        self._ep = Endpoint(host, port)

    def pick(self, exclude: Endpoint | None = None) -> Endpoint | None:
        return self._ep

    def endpoints(self) -> tuple[Endpoint, ...]:
        return (self._ep,)


class Balancer(Target):
    """Outbound: the endpoints of one service, updated from discovery."""

    __slots__ = ("_cum", "_eps", "_live", "_next", "version")

    def __init__(self, name: str, opaque: bool) -> None:
        super().__init__(name, opaque)
        self._eps: tuple[Endpoint, ...] = ()
        self._live: tuple[Endpoint, ...] = ()
        self._cum: list[int] | None = None
        self._next = 0
        self.version = ""

    def update(self, es: EndpointSet | None, opaque_ports: frozenset[int]) -> None:
        eps = es.endpoints if es is not None else ()
        self._eps = eps
        live = tuple(e for e in eps if e.weight > 0)
        self._live = live
        weights = {e.weight for e in live}
        self._cum = list(accumulate(e.weight for e in live)) if len(weights) > 1 else None
        self.version = es.version if es is not None else ""
        if es is not None:
            port = int(self.name.rpartition(":")[2])
            self.opaque = es.opaque or port in opaque_ports

    def pick(self, exclude: Endpoint | None = None) -> Endpoint | None:
        live = self._live
        n = len(live)
        if n == 0:
            return None
        if exclude is not None and n > 1:
            return self._pick_other(exclude)
        cum = self._cum
        if cum is not None:
            return live[bisect_right(cum, random.random() * cum[-1])]
        i = self._next
        self._next = i + 1 if i + 1 < n else 0
        return live[i % n]

    def _pick_other(self, exclude: Endpoint) -> Endpoint | None:
        """A retry's pick: any endpoint but `exclude`, by weight (off the hot path)."""
        others = [e for e in self._live if e is not exclude and e != exclude]
        if not others:
            return None
        cum = list(accumulate(e.weight for e in others))
        return others[bisect_right(cum, random.random() * cum[-1])]

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._eps
