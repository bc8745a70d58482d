"""HTTP routes of a service: matches, timeouts, retries, header changes, traffic split.

In the mesh file, under a service (in the spirit of Gateway API's HTTPRoute):

    routes:
      - name: reviews-api
        match:                       # any of these (omitted: every request)
          - path: {prefix: /api}     # or {exact: /x}, {regex: "/items/[0-9]+"}
            method: GET
            headers: {x-canary: "1"} # exact values, names case-insensitive
        timeout: 2s                  # request -> response head, retries included (504)
        retry:                       # present: the route is retryable
          statuses: [502, 503]       # and connection failures, always
          attempts: 2                # retries at most (after the first try)
          per_try_timeout: 500ms     # a try with no response head by then is retried (504)
          backoff: 25ms              # base of the jittered exponential backoff
        request_headers: {set: {x-env: prod}, add: {x-via: mesh}, remove: [x-debug]}
        backends:                    # traffic split (omitted: the service itself)
          - {service: reviews, weight: 90}
          - {service: reviews-v2, weight: 10}   # another service of the mesh; its port:
                                                 # `service: NAME:PORT`, default this one
    retry_budget: {ratio: 0.2, min_per_second: 10, window: 10s}   # service-wide

The first route whose match fits a request is its route. Routes travel with the service's
endpoints in the discovery stream (`EndpointSet.routes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Backend", "Match", "RetryBudgetSpec", "RetryPolicy", "Route", "routes_from_json",
           "routes_to_json"]


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    path_kind: str = ""  # "", exact, prefix, regex
    path: str = ""
    method: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, value)


@dataclasses.dataclass(frozen=True, slots=True)
class Backend:
    service: str  # NAME or NAME:PORT; "" is the route's own service
    weight: int = 1


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    statuses: frozenset[int] = frozenset()
    attempts: int = 2
    per_try_timeout: float = 0.0  # 0: none
    backoff: float = 0.025


@dataclasses.dataclass(frozen=True, slots=True)
class RetryBudgetSpec:
    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    name: str
    matches: tuple[Match, ...] = ()
    timeout: float = 0.0  # 0: the proxy's response timeout
    retry: RetryPolicy | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    backends: tuple[Backend, ...] = ()


def routes_to_json(routes: tuple[Route, ...], budget: RetryBudgetSpec | None
                   ) -> dict[str, Any]:
    def m(x: Match) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if x.path_kind:
            d["path"] = {x.path_kind: x.path}
        if x.method:
            d["method"] = x.method
        if x.headers:
            d["headers"] = dict(x.headers)
        return d

    out = []
    for r in routes:
        d: dict[str, Any] = {"name": r.name, "match": [m(x) for x in r.matches]}
        if r.timeout:
            d["timeout"] = r.timeout
        if r.retry is not None:
            d["retry"] = {"statuses": sorted(r.retry.statuses), "attempts": r.retry.attempts,
                          "per_try_timeout": r.retry.per_try_timeout,
                          "backoff": r.retry.backoff}
        if r.set_headers or r.add_headers or r.remove_headers:
            d["request_headers"] = {"set": dict(r.set_headers), "add": dict(r.add_headers),
                                    "remove": list(r.remove_headers)}
        if r.backends:
            d["backends"] = [{"service": b.service, "weight": b.weight} for b in r.backends]
        out.append(d)
    res: dict[str, Any] = {"routes": out}
    if budget is not None:
        res["retry_budget"] = {"ratio": budget.ratio, "min_per_second": budget.min_per_second,
                               "window": budget.window}
    return res


def routes_from_json(d: dict[str, Any]) -> tuple[tuple[Route, ...], RetryBudgetSpec | None]:
    """The inverse of `routes_to_json` (input from the control plane: trusted shape)."""
    routes = []
    for r in d.get("routes") or []:
        matches = []
        for x in r.get("match") or []:
            kind, path = next(iter((x.get("path") or {"": ""}).items()))
            matches.append(Match(kind, path, x.get("method", ""),
                                 tuple((k.lower(), v) for k, v in
                                       (x.get("headers") or {}).items())))
        rp = r.get("retry")
        retry = RetryPolicy(frozenset(rp.get("statuses", ())), int(rp.get("attempts", 2)),
                            float(rp.get("per_try_timeout", 0.0)),
                            float(rp.get("backoff", 0.025))) if rp else None
        rh = r.get("request_headers") or {}
        routes.append(Route(
            str(r["name"]), tuple(matches), float(r.get("timeout", 0.0)), retry,
            tuple((k, v) for k, v in (rh.get("set") or {}).items()),
            tuple((k, v) for k, v in (rh.get("add") or {}).items()),
            tuple(rh.get("remove") or ()),
            tuple(Backend(b["service"], int(b.get("weight", 1)))
                  for b in r.get("backends") or [])))
    b = d.get("retry_budget")
    budget = RetryBudgetSpec(float(b["ratio"]), float(b["min_per_second"]),
                             float(b["window"])) if b else None
    return tuple(routes), budget
