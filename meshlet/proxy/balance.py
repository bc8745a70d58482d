"""Where a connection or request goes: a fixed address, or a service's endpoints.

Rules:
1. `pick()` is a pure decision on the current endpoint list; it does no I/O.
2. Endpoint lists are replaced whole (`update`), never edited in place, so a pick never
   sees a half-applied change.
3. Weights are honoured (weight 0 drains an endpoint); among endpoints, each request
   goes to the less loaded of two drawn by weight (`Balancer`: P2C over peak-EWMA).
"""

from __future__ import annotations

import abc
import random
from bisect import bisect_right
from itertools import accumulate
from math import exp as _exp
from math import inf as _inf
from math import log as _log
from time import monotonic as _monotonic
from typing import TYPE_CHECKING

from meshlet.api.endpoints import Endpoint, EndpointSet

if TYPE_CHECKING:
    from meshlet.proxy.routing import RouteTable

_LOG1 = [_log(k + 1) for k in range(256)]  # log(in flight + 1), for picks

__all__ = ["MAX_WAITERS", "RESOLVE_TIMEOUT", "Balancer", "EpState", "Fixed", "Target"]

# How long a request waits for discovery's first answer, or for an endpoint when a
# destination has none (then 503): the fail-fast timeout.
RESOLVE_TIMEOUT = 3.0
MAX_WAITERS = 1000  # per destination; more get 503 at once (load is shed, not queued)


class EpState:
    """What the balancer knows of one endpoint: its latency estimate, requests in flight,
    and failure accrual."""

    __slots__ = ("cost", "ejected_until", "ejections", "ep", "fails", "lcost", "pending",
                 "probing", "stamp")

    def __init__(self, ep: Endpoint, default_rtt: float) -> None:
        self.ep = ep
        self.cost = default_rtt  # peak-EWMA of the time to the response head, seconds
        self.stamp = 0.0  # when `cost` was last updated (0: never)
        # log(cost) + stamp / decay: the decayed cost's log, plus now / decay. Picks
        # compare these (plus log(in flight + 1)): no clock and no exp per request.
        self.lcost = 0.0
        self.pending = 0  # requests in flight
        self.fails = 0  # consecutive failures
        self.ejections = 0  # consecutive ejections (backoff exponent)
        self.ejected_until = 0.0
        self.probing = False  # back from ejection: the next result decides


class Target(abc.ABC):
    """Base: something that picks an endpoint."""

    __slots__ = ("name", "opaque", "pending", "routes", "unresolved", "waiters")

    def __init__(self, name: str, opaque: bool) -> None:
        self.name = name
        self.opaque = opaque
        # True while there is no usable endpoint and waiting may bring one
        # (`meshlet.proxy.discovery.Destination`); `unresolved`: discovery has not
        # answered at all yet, so even whether the target is opaque is unknown.
        self.pending = False
        self.unresolved = False
        self.waiters = 0  # requests waiting for an endpoint (bounded: MAX_WAITERS)
        self.routes: RouteTable | None = None  # HTTP routes, from discovery

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

    def choose(self, exclude: Endpoint | None = None) -> EpState | None:
        """Like `pick`, with the endpoint's balancer state (for `observe`)."""
        ep = self.pick(exclude)
        return EpState(ep, 0.0) if ep is not None else None

    def observe(self, s: EpState, rtt: float, now: float, failed: bool) -> None:
        """Feedback for a request sent to `s` (its response head, or its failure)."""
        s.pending -= 1

    def opened(self, ep: Endpoint) -> EpState | None:
        """An opaque TCP connection to `ep` is open: its state, with one more in flight
        (the caller takes it off when the connection closes)."""
        return None

    def connect_failed(self, ep: Endpoint) -> None:
        """A connection to `ep` could not be made (failure accrual)."""
        return None

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
    """Outbound: the endpoints of one service, updated from discovery.

    Each pick draws two endpoints (by weight) and takes the one with the lower load,
    `cost * (in flight + 1)`, where `cost` is a peak-EWMA of response latency: it jumps
    to a slower observation at once, moves towards faster ones with time constant
    `decay`, and, like tower's PeakEwma (linkerd2-proxy), decays towards zero while the
    endpoint is not used, so a slow endpoint is tried again now and then. An endpoint
    that never answered costs nothing until it has requests in flight (then
    `default_rtt` each): new endpoints are explored at once. With equal loads the draw
    alone decides, so weights are honoured. `consecutive_failures` failures in a row
    (connect errors, 5xx) eject an endpoint for a backoff that doubles per ejection (`eject_base` to
    `eject_max`); then it is back on probation: one failure ejects it again, one success
    restores it. Never below `min_ready` endpoints in service.
    """

    __slots__ = ("_all", "_cum", "_eps", "_live", "_states", "ejected", "version")

    default_rtt = 0.030
    decay = 10.0
    consecutive_failures = 5
    eject_base = 1.0
    eject_max = 60.0
    min_ready = 1

    def __init__(self, name: str, opaque: bool) -> None:
        super().__init__(name, opaque)
        self._eps: tuple[Endpoint, ...] = ()
        self._states: dict[tuple[str, int, str], EpState] = {}
        self._all: tuple[EpState, ...] = ()  # weight > 0
        self._live: tuple[EpState, ...] = ()  # weight > 0 and not ejected
        self._cum: list[int] | None = None
        self.ejected = 0  # how many of `_all` are ejected now
        self.version = ""

    def update(self, es: EndpointSet | None, opaque_ports: frozenset[int]) -> None:
        eps = es.endpoints if es is not None else ()
        self._eps = eps
        old = self._states
        states: dict[tuple[str, int, str], EpState] = {}
        for e in eps:
            st = old.get(e.key)
            if st is None or st.ep != e:
                prev = st
                st = EpState(e, self.default_rtt)
                if prev is not None:  # same address, new weight: keep what we learnt
                    st.cost, st.stamp, st.pending = prev.cost, prev.stamp, prev.pending
                    st.lcost = prev.lcost
            states[e.key] = st
        self._states = states
        self._all = tuple(states[e.key] for e in eps if e.weight > 0)
        self._relive(0.0)
        self.version = es.version if es is not None else ""
        if es is not None:
            port = int(self.name.rpartition(":")[2])
            self.opaque = es.opaque or port in opaque_ports

    def _relive(self, now: float) -> None:
        live = tuple(s for s in self._all if s.ejected_until <= now)
        self._live = live
        self.ejected = len(self._all) - len(live)
        weights = {s.ep.weight for s in live}
        self._cum = list(accumulate(s.ep.weight for s in live)) if len(weights) > 1 else None

    # --- picking ----------------------------------------------------------------------

    def choose(self, exclude: Endpoint | None = None) -> EpState | None:
        if self.ejected:
            self._readmit()
        live = self._live
        n = len(live)
        if n == 0:
            return None
        if n == 1:
            return live[0]
        if exclude is not None:
            return self._choose_other(exclude)
        cum = self._cum
        if cum is None:
            i = int(random.random() * n)
            j = int(random.random() * (n - 1))
            if j >= i:
                j += 1
        else:
            total = cum[-1]
            i = bisect_right(cum, random.random() * total)
            j = bisect_right(cum, random.random() * total)
            if j == i:
                j = bisect_right(cum, random.random() * total)
                if j == i:
                    return live[i]
        a = live[i]
        b = live[j]
        # cost * exp((stamp - now) / decay) * (pending + 1), compared in log form: the
        # common `- now / decay` cancels out.
        pa = a.pending
        if a.stamp:
            la = a.lcost + (_LOG1[pa] if pa < 256 else _log(pa + 1))
        elif pa:  # never answered: tried first, unless it has requests in flight
            la = _log(self.default_rtt * pa) + _monotonic() / self.decay
        else:
            la = -_inf
        pb = b.pending
        if b.stamp:
            lb = b.lcost + (_LOG1[pb] if pb < 256 else _log(pb + 1))
        elif pb:
            lb = _log(self.default_rtt * pb) + _monotonic() / self.decay
        else:
            lb = -_inf
        return b if lb < la else a

    def pick(self, exclude: Endpoint | None = None) -> Endpoint | None:
        s = self.choose(exclude)
        return s.ep if s is not None else None

    def _choose_other(self, exclude: Endpoint) -> EpState | None:
        """A retry's pick: any endpoint but `exclude`, by weight (off the hot path)."""
        others = [s for s in self._live if s.ep != exclude]
        if not others:
            return None
        cum = list(accumulate(s.ep.weight for s in others))
        return others[bisect_right(cum, random.random() * cum[-1])]

    def _readmit(self) -> None:
        now = _monotonic()
        if any(s.ejected_until and s.ejected_until <= now for s in self._all):
            for s in self._all:
                if s.ejected_until and s.ejected_until <= now:
                    s.ejected_until = 0.0
                    s.probing = True
            self._relive(now)

    # --- feedback (the HTTP path calls these) ----------------------------------------

    def observe(self, s: EpState, rtt: float, now: float, failed: bool) -> None:
        """A response head (or a failure) for a request sent to `s`."""
        s.pending -= 1
        if rtt > s.cost or not s.stamp:
            s.cost = rtt
        else:
            w = _exp((s.stamp - now) / self.decay)
            s.cost = s.cost * w + rtt * (1.0 - w)
        s.stamp = now or 1e-9
        s.lcost = _log(s.cost if s.cost > 1e-9 else 1e-9) + s.stamp / self.decay
        if failed:
            self.failure(s)
        elif s.fails or s.probing:
            s.fails = 0
            s.probing = False
            s.ejections = 0

    def opened(self, ep: Endpoint) -> EpState | None:
        s = self._states.get(ep.key)
        if s is not None:
            s.pending += 1
            if s.fails or s.probing:
                s.fails = 0
                s.probing = False
                s.ejections = 0
        return s

    def connect_failed(self, ep: Endpoint) -> None:
        s = self._states.get(ep.key)
        if s is not None:
            self.failure(s)

    def failure(self, s: EpState) -> None:
        s.fails += 1
        if s.probing or s.fails >= self.consecutive_failures:
            self._eject(s)

    def _eject(self, s: EpState) -> None:
        if s.ejected_until or s not in self._all:
            return
        if len(self._live) - 1 < self.min_ready:
            return  # never below the minimum in service
        backoff = min(self.eject_max, self.eject_base * (2 ** s.ejections))
        s.ejections += 1
        s.fails = 0
        s.probing = False
        now = _monotonic()
        s.ejected_until = now + backoff * random.uniform(0.9, 1.1)
        self._relive(now)

    def states(self) -> tuple[EpState, ...]:
        return tuple(self._states.values())

    def endpoint_views(self) -> list[dict[str, object]]:
        """Each endpoint with what the balancer knows of it (for /config)."""
        now = _monotonic()
        out: list[dict[str, object]] = []
        for e in self._eps:
            d: dict[str, object] = dict(e.to_json())
            st = self._states.get(e.key)
            if st is not None:
                d["rtt_ms"] = round(st.cost * 1000, 3) if st.stamp else None
                d["in_flight"] = st.pending
                d["state"] = ("ejected" if st.ejected_until > now else
                              "probing" if st.probing else "ready")
                if st.ejected_until > now:
                    d["ejected_for_s"] = round(st.ejected_until - now, 2)
            out.append(d)
        return out

    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._eps
