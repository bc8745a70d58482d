"""Routes on the data path: matching a request, its backend (traffic split), header
changes, and the retry budget. Pure: no I/O.

Rules:
1. Compiled once per discovery update (`RouteTable`); a request without routes pays one
   attribute check.
2. Matching looks at the request head only; header matches parse the head's fields
   lazily, once per request.
3. The retry budget (per destination) allows `min_per_second * window` retries plus
   `ratio` of the requests seen in the last `window`: a failing backend can never make
   the proxy multiply its load.
"""

from __future__ import annotations

import random
import re
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from meshlet.api.routes import RetryBudgetSpec, Route, routes_from_json

if TYPE_CHECKING:
    from meshlet.proto.http1 import RequestHead
    from meshlet.proxy.balance import Target

__all__ = ["CompiledRoute", "RetryBudget", "RouteTable", "backend_target", "head_fields"]

BUCKETS = 10
CACHE_ENTRIES = 1024  # route decisions remembered per destination
CACHE_KEY_MAX = 256  # longer "METHOD path" keys are matched every time


class RetryBudget:
    __slots__ = ("_dep", "_i", "_next", "_stamp", "_wd", "min_total", "ratio", "width")

    def __init__(self, spec: RetryBudgetSpec) -> None:
        self.ratio = spec.ratio
        self.min_total = spec.min_per_second * spec.window
        self.width = spec.window / BUCKETS
        self._dep = [0] * BUCKETS
        self._wd = [0] * BUCKETS
        self._i = 0
        self._stamp = 0.0  # start of the current bucket
        self._next = self.width  # when the current bucket ends

    def _advance(self, now: float) -> None:
        steps = int((now - self._stamp) / self.width)
        if steps <= 0:
            return
        for _ in range(min(steps, BUCKETS)):
            self._i = (self._i + 1) % BUCKETS
            self._dep[self._i] = 0
            self._wd[self._i] = 0
        self._stamp = now
        self._next = now + self.width

    def deposit(self, now: float) -> None:
        """A request that could be retried was sent."""
        if now >= self._next:
            self._advance(now)
        self._dep[self._i] += 1

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget, if there is one."""
        self._advance(now)
        allowed = self.min_total + self.ratio * sum(self._dep)
        if sum(self._wd) + 1 > allowed:
            return False
        self._wd[self._i] += 1
        return True


Cond = tuple[bytes, int, bytes, bytes, "re.Pattern[bytes] | None", tuple[tuple[bytes, bytes], ...]]
_KINDS = {"": 0, "exact": 1, "prefix": 2, "regex": 3}


class CompiledRoute:
    __slots__ = (
        "add_lines",
        "backends",
        "conds",
        "cum",
        "drop",
        "has_headers",
        "per_try",
        "retry_on",
        "route",
        "timeout",
    )

    def __init__(self, route: Route) -> None:
        self.route = route
        conds: list[Cond] = []
        for m in route.matches:
            p = m.path.encode()
            pslash = p if p.endswith(b"/") else p + b"/"
            conds.append((m.method.encode(), _KINDS[m.path_kind], p, pslash,
                          re.compile(p) if m.path_kind == "regex" else None,
                          tuple((k.encode(), v.encode()) for k, v in m.headers)))
        self.conds = tuple(conds)  # any of them (empty: every request)
        self.has_headers = any(m.headers for m in route.matches)
        self.backends = route.backends
        self.cum = list(accumulate(b.weight for b in route.backends))
        lines = [f"{k}: {v}\r\n" for k, v in (*route.set_headers, *route.add_headers)]
        self.add_lines = "".join(lines).encode("latin-1")
        self.drop = frozenset(k.lower().encode() for k, _ in route.set_headers) | \
            frozenset(k.encode() for k in route.remove_headers)
        r = route.retry
        # Retryable iff not None (statuses may be empty: connection failures only).
        self.retry_on: frozenset[int] | None = r.statuses if r is not None else None
        self.per_try = r.per_try_timeout if r is not None and r.per_try_timeout else 0.0
        self.timeout = route.timeout or 0.0

    def backend(self) -> str:
        """The backend service for this request ("": the destination itself)."""
        cum = self.cum
        if not cum:
            return ""
        i = bisect_right(cum, random.random() * cum[-1])
        return self.backends[i].service


def head_fields(raw: bytes) -> dict[bytes, bytes]:
    """The request head's fields, lower-case names, first value of each (for matching)."""
    out: dict[bytes, bytes] = {}
    for line in raw.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out.setdefault(name.lower(), value.strip(b" \t"))
    return out


class RouteTable:
    """A destination's routes, compiled; `budget` is shared by its retryable routes."""

    __slots__ = ("_cache", "_flat", "_re", "budget", "has_headers", "raw", "routes")

    def __init__(self, raw: dict[str, Any]) -> None:
        routes, spec = routes_from_json(raw)
        self.raw = raw
        self.routes = [CompiledRoute(r) for r in routes]
        self.has_headers = any(r.has_headers for r in self.routes)
        self.budget = RetryBudget(spec or RetryBudgetSpec())
        self._flat: list[tuple[int, tuple[tuple[bytes, bytes], ...]]] = []
        self._re = self._compile()
        # "METHOD path" -> the alternation's answer (index into _flat, -1: none). Only
        # method and path decide it, so it is exact; bounded in entries and key size.
        self._cache: dict[bytes, int] = {}

    def _compile(self) -> re.Pattern[bytes] | None:
        """The alternation behind `match` (None if a route's own regex has groups that
        could confuse it: then `_scan` does all the work)."""
        alts = []
        for ri, r in enumerate(self.routes):
            conds = r.conds or ((b"", 0, b"", b"", None, ()),)
            for m, kind, p, pslash, rx, hdrs in conds:
                if rx is not None and b"(?P" in rx.pattern:
                    return None
                part = re.escape(m) if m else rb"[^ ]+"
                if kind == 1:
                    part += rb" " + re.escape(p)
                elif kind == 2:
                    part += rb" (?:" + re.escape(p) + rb"|" + re.escape(pslash) + rb".*)"
                elif kind == 3 and rx is not None:
                    part += rb" (?:" + rx.pattern + rb")"
                else:
                    part += rb" .*"
                alts.append(b"(?P<c%d>%s)" % (len(self._flat), part))
                self._flat.append((ri, hdrs))
        try:
            return re.compile(b"|".join(alts), re.DOTALL) if alts else None
        except re.error:
            return None

    def match(self, req: RequestHead) -> CompiledRoute | None:
        """The first route whose conditions fit the request. One regular expression
        (an alternation of every condition's method and path, in route order) finds the
        first candidate; header conditions are then checked, and only if they fail does
        the search go on, route by route."""
        t = req.target
        q = t.find(b"?")
        path = t if q < 0 else t[:q]
        big = self._re
        if big is None:
            return self._scan(req, path, 0)
        key = req.method + b" " + path
        i = self._cache.get(key)
        if i is None:
            m = big.fullmatch(key)
            i = -1 if m is None else int(m.lastgroup[1:])  # type: ignore[index]
            if len(key) <= CACHE_KEY_MAX:
                cache = self._cache
                if len(cache) >= CACHE_ENTRIES:
                    cache.clear()
                cache[key] = i
        if i < 0:
            return None
        ri, hdrs = self._flat[i]
        if not hdrs:
            return self.routes[ri]
        fields = head_fields(req.raw)
        for k, v in hdrs:
            if fields.get(k) != v:
                return self._scan(req, path, ri)
        return self.routes[ri]

    def _scan(self, req: RequestHead, path: bytes, start: int) -> CompiledRoute | None:
        method = req.method
        fields: dict[bytes, bytes] | None = None
        for r in self.routes[start:]:
            conds = r.conds
            if not conds:
                return r
            for m, kind, p, pslash, rx, hdrs in conds:
                if m and m != method:
                    continue
                if kind == 1:
                    if path != p:
                        continue
                elif kind == 2:
                    if path != p and not path.startswith(pslash):
                        continue
                elif kind == 3 and rx is not None and rx.fullmatch(path) is None:
                    continue
                if hdrs:
                    if fields is None:
                        fields = head_fields(req.raw)
                    ok = True
                    for k, v in hdrs:
                        if fields.get(k) != v:
                            ok = False
                            break
                    if not ok:
                        continue
                return r
        return None

    def backend_services(self) -> set[str]:
        return {b.service for r in self.routes for b in r.backends if b.service}

    def views(self) -> list[dict[str, Any]]:
        return list(self.raw.get("routes") or [])


def backend_target(own: Target, service: str, lookup: Callable[[str, int], Target]
                   ) -> Target:
    """The target for a route backend `NAME[:PORT]` (the port defaults to own's)."""
    host, _, port = service.partition(":")
    p = int(port) if port else int(own.name.rpartition(":")[2])
    return lookup(host, p)

