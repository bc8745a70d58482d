"""The mesh file: one YAML file that declares a whole mesh (the embedded backend).

    trust_domain: demo.local            # optional; else the control plane's setting
    services:
      - name: backend                   # DNS-label; clients dial backend:8080
        namespace: default              # default "default"
        account: backend                # service account (identity); default: the name
        ports: [8080, {port: 5432, protocol: opaque}]
        opaque_ports: [6379]            # shorthand for {port, protocol: opaque}
        address: 10.213.1.5             # optional virtual IP (like a ClusterIP): transparent
                                        # proxies map connections to it to this service
        workloads:                      # where it runs (the control plane serves these)
          - address: 10.0.0.7           # HOST: reached on each service port
          - address: 127.0.0.1:41001    # HOST:PORT: one sidecar's inbound listener
            weight: 2
            ready: false                # listed but out of the pool
        meshed: true                    # false: plaintext, no identity expected
        policy:                         # inbound authorization of its workloads
          default: all-authenticated
          rules: [{name: fe, identities: ["spiffe://demo.local/ns/default/sa/frontend"]}]
        run:                            # for `meshlet up` only
          command: python examples/mesh/backend.py
          env: {GREETING: hi}
          replicas: 2
        expose: 8080                    # `meshlet up`: reachable from the host here

Rules:
1. A bad file is refused whole with `file:line: field: reason` for every problem found.
2. The parse result is immutable (`Mesh`); the control plane swaps it whole.
3. Endpoint set versions are content hashes (`EndpointSet.make`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shlex
from typing import Any

import yaml

from meshlet.api.endpoints import Endpoint, EndpointSet, EndpointsFileError, content_version
from meshlet.api.endpoints_file import Checker, compose, split_addr
from meshlet.api.routes import (
    Backend,
    Match,
    RetryBudgetSpec,
    RetryPolicy,
    Route,
    routes_to_json,
)
from meshlet.policy.authz import Policy, PolicyError, parse_policy

__all__ = ["Mesh", "MeshFileError", "PortSpec", "RunSpec", "Service", "Workload",
           "load_mesh_file", "parse_mesh_yaml", "policy_json"]

MeshFileError = EndpointsFileError

_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}")
_HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]{0,4096}")
_LABEL_DOTS_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# Framing and routing fields a route must not change (smuggling, loops).
_RESERVED = frozenset(("host", "content-length", "transfer-encoding", "connection",
                       "upgrade", "te", "trailer", "keep-alive", "expect",
                       "proxy-connection"))
PROTOCOLS = ("detect", "http", "opaque")


@dataclasses.dataclass(frozen=True, slots=True)
class PortSpec:
    port: int
    protocol: str  # detect | http | opaque


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    host: str
    port: int | None  # None: each service port on `host`
    weight: int = 1
    ready: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class RunSpec:
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    replicas: int


@dataclasses.dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    account: str
    ports: tuple[PortSpec, ...]
    workloads: tuple[Workload, ...]
    meshed: bool
    policy: Policy
    run: RunSpec | None
    expose: int | None
    line: int
    routes: tuple[Route, ...] = ()
    retry_budget: RetryBudgetSpec | None = None
    address: str | None = None  # virtual IP, normalized (`ipaddress` compressed form)
    app_tls: bool = False  # the app serves TLS: its sidecar speaks TLS to it

    @property
    def fqn(self) -> str:
        return f"{self.name}.{self.namespace}"

    def identity(self, trust_domain: str) -> str | None:
        if not self.meshed:
            return None
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.account}"

    def port(self, port: int) -> PortSpec | None:
        for p in self.ports:
            if p.port == port:
                return p
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Mesh:
    trust_domain: str | None
    services: tuple[Service, ...]
    by_name: dict[str, Service] = dataclasses.field(compare=False, repr=False)
    # Transparent mode's lookups by IP: service addresses, and workloads given as HOST.
    by_ip: dict[str, Service] = dataclasses.field(compare=False, repr=False,
                                                  default_factory=dict)
    by_workload_ip: dict[str, tuple[tuple[Service, Workload], ...]] = dataclasses.field(
        compare=False, repr=False, default_factory=dict)

    @classmethod
    def build(cls, trust_domain: str | None, services: tuple[Service, ...]) -> Mesh:
        by_name: dict[str, Service] = {}
        by_ip: dict[str, Service] = {}
        by_wip: dict[str, tuple[tuple[Service, Workload], ...]] = {}
        counts: dict[str, int] = {}
        for s in services:
            counts[s.name] = counts.get(s.name, 0) + 1
        for s in services:
            by_name[s.fqn] = s
            if counts[s.name] == 1 or s.namespace == "default":
                by_name.setdefault(s.name, s)
            if s.address is not None:
                by_ip[s.address] = s
            for w in s.workloads:
                ip = _ip(w.host) if w.port is None else None
                if ip is not None:
                    by_wip[ip] = (*by_wip.get(ip, ()), (s, w))
        return cls(trust_domain, services, by_name, by_ip, by_wip)

    def lookup(self, host: str) -> Service | None:
        """The service a destination host names: NAME, NAME.NS or NAME.NS.svc[.*], or
        the service's `address`."""
        host = host.lower().rstrip(".")
        s = self.by_name.get(host)
        if s is None and self.by_ip:
            ip = _ip(host)
            if ip is not None:
                return self.by_ip.get(ip)
        if s is None:
            parts = host.split(".")
            if len(parts) >= 3 and parts[2] == "svc":
                s = self.by_name.get(f"{parts[0]}.{parts[1]}")
        return s

    def endpoint_set(self, host: str, port: int, trust_domain: str) -> EndpointSet | None:
        """The endpoints of `host:port`, or None if the mesh does not know the name or
        the service has no such port."""
        s = self.lookup(host)
        workloads: tuple[Workload, ...] = ()
        if s is None and self.by_workload_ip:
            # One workload's own address (a pod IP): that workload alone, with its
            # service's identity, on the service that has this port.
            ip = _ip(host)
            for svc, w in self.by_workload_ip.get(ip or "", ()):
                if svc.port(port) is not None:
                    s, workloads = svc, (w,)
                    break
        if s is None:
            return None
        ps = s.port(port)
        if ps is None:
            return None
        ident = s.identity(self.trust_domain or trust_domain)
        eps = tuple(Endpoint(w.host, w.port or port, w.weight, ident)
                    for w in workloads or s.workloads if w.ready)
        routes = routes_to_json(s.routes, s.retry_budget) \
            if (s.routes or s.retry_budget) and ps.protocol != "opaque" else None
        return EndpointSet.make(f"{s.fqn}:{port}", eps, ps.protocol == "opaque", routes)


def _ip(text: str) -> str | None:
    """`text` as a normalized IP address, or None if it is not one."""
    if not text or not (text[0].isdigit() or ":" in text):
        return None
    try:
        return ipaddress.ip_address(text.strip("[]")).compressed
    except ValueError:
        return None


def policy_json(p: Policy) -> dict[str, Any]:
    return {"default": p.default, "rules": [
        {"name": r.name, "identities": list(r.identities),
         "networks": [str(n) for n in r.networks]} for r in p.rules]}


def policy_version(p: Policy) -> str:
    return content_version(policy_json(p))


def parse_mesh_yaml(text: str, path: str = "<mesh>") -> Mesh:
    c = Checker(path)
    root = compose(text, path)
    td: str | None = None
    services: list[Service] = []
    if root is not None:
        top = c.mapping(root, "(top)")
        if top is not None:
            c.unknown(top, {"trust_domain", "services"}, "(top)")
            td = c.scalar(top.get("trust_domain"), "trust_domain")
            if td is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", td):
                c.err(top["trust_domain"], "trust_domain", f"invalid trust domain {td!r}")
            snodes = top.get("services")
            if snodes is not None and not isinstance(snodes, yaml.SequenceNode):
                c.err(snodes, "services", "expected a list")
            elif snodes is not None:
                seen: dict[Any, int] = {}
                exposed: dict[Any, int] = {}
                addresses: dict[Any, int] = {}
                for i, snode in enumerate(snodes.value):
                    s = _service(c, snode, f"services[{i}]")
                    if s is None:
                        continue
                    f = f"services[{i}]"
                    _once(c, seen, s.fqn, s.line, snode, f + ".name",
                          "duplicate service {key} (first on line {line})")
                    _once(c, exposed, s.expose, s.line, snode, f + ".expose",
                          "port {key} already exposed on line {line}")
                    _once(c, addresses, s.address, s.line, snode, f + ".address",
                          "address {key} already used by the service on line {line}")
                    services.append(s)
    if c.errors:
        raise MeshFileError(c.errors)
    return Mesh.build(td, tuple(services))


def _once(c: Checker, first: dict[Any, int], key: Any, line: int, node: yaml.Node,
          field: str, message: str) -> None:
    """`key` (if set) must be unique among services: report a repeat with `message`
    ({key}, {line}: where it was first), remember the first."""
    if key is None:
        return
    if key in first:
        c.err(node, field, message.format(key=key, line=first[key]))
    else:
        first[key] = line


def _bool(c: Checker, node: yaml.Node | None, field: str, default: bool) -> bool:
    text = c.scalar(node, field)
    if text is None:
        return default
    if text.lower() in ("true", "yes", "on"):
        return True
    if text.lower() in ("false", "no", "off"):
        return False
    c.err(node, field, f"expected true or false, got {text!r}")
    return default


def _label(c: Checker, node: yaml.Node | None, field: str, default: str | None) -> str | None:
    text = c.scalar(node, field)
    if text is None:
        return default
    if not _LABEL_RE.fullmatch(text):
        c.err(node, field, f"{text!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
        return None
    return text


def _service(c: Checker, node: yaml.Node, field: str) -> Service | None:
    m = c.mapping(node, field)
    if m is None:
        return None
    c.unknown(m, {"name", "namespace", "account", "ports", "opaque_ports", "protocol",
                  "workloads", "meshed", "policy", "run", "expose", "routes",
                  "retry_budget", "address", "app_tls"}, field)
    n_before = len(c.errors)
    if "name" not in m:
        c.err(node, f"{field}.name", "required")
    name = _label(c, m.get("name"), f"{field}.name", None)
    ns = _label(c, m.get("namespace"), f"{field}.namespace", "default")
    account = _label(c, m.get("account"), f"{field}.account", name)
    proto = c.scalar(m.get("protocol"), f"{field}.protocol") or "detect"
    if proto not in PROTOCOLS:
        c.err(m.get("protocol"), f"{field}.protocol", f"must be one of {', '.join(PROTOCOLS)}")
    ports: list[PortSpec] = []
    pnode = m.get("ports")
    for j, p in enumerate(c.sequence(pnode, f"{field}.ports")):
        pf = f"{field}.ports[{j}]"
        if isinstance(p, yaml.MappingNode):
            pm = c.mapping(p, pf) or {}
            c.unknown(pm, {"port", "protocol"}, pf)
            num = c.integer(pm.get("port"), f"{pf}.port", 1, 65535)
            if "port" not in pm:
                c.err(p, f"{pf}.port", "required")
            pp = c.scalar(pm.get("protocol"), f"{pf}.protocol") or proto
            if pp not in PROTOCOLS:
                c.err(pm.get("protocol"), f"{pf}.protocol",
                      f"must be one of {', '.join(PROTOCOLS)}")
        else:
            num, pp = c.integer(p, pf, 1, 65535), proto
        if num is not None:
            if any(x.port == num for x in ports):
                c.err(p, pf, f"duplicate port {num}")
            ports.append(PortSpec(num, pp))
    onode = m.get("opaque_ports")
    for j, p in enumerate(c.sequence(onode, f"{field}.opaque_ports")):
        num = c.integer(p, f"{field}.opaque_ports[{j}]", 1, 65535)
        if num is None:
            continue
        ports = [x for x in ports if x.port != num]
        ports.append(PortSpec(num, "opaque"))
    meshed = _bool(c, m.get("meshed"), f"{field}.meshed", True)
    app_tls = _bool(c, m.get("app_tls"), f"{field}.app_tls", False)
    workloads: list[Workload] = []
    wnode = m.get("workloads")
    for j, w in enumerate(c.sequence(wnode, f"{field}.workloads")):
        wl = _workload(c, w, f"{field}.workloads[{j}]")
        if wl is not None:
            workloads.append(wl)
    if workloads and not ports:
        c.err(wnode, f"{field}.ports", "a service with workloads needs at least one port")
    policy = Policy(f"{name}.{ns}" if name else "?")
    if "policy" in m:
        policy = _policy(c, m["policy"], f"{field}.policy", policy.name)
    run = _run(c, m["run"], f"{field}.run") if "run" in m else None
    expose = c.integer(m.get("expose"), f"{field}.expose", 1, 65535)
    if expose is not None and (run is None or not ports):
        c.err(m.get("expose"), f"{field}.expose", "needs `run` and a port")
    routes: list[Route] = []
    rnode = m.get("routes")
    for j, r in enumerate(c.sequence(rnode, f"{field}.routes")):
        route = _route(c, r, f"{field}.routes[{j}]", j)
        if route is not None:
            if any(x.name == route.name for x in routes):
                c.err(r, f"{field}.routes[{j}].name", f"duplicate route {route.name}")
            routes.append(route)
    budget = _budget(c, m["retry_budget"], f"{field}.retry_budget") \
        if "retry_budget" in m else None
    address = c.scalar(m.get("address"), f"{field}.address")
    if address is not None:
        norm = _ip(address)
        if norm is None:
            c.err(m.get("address"), f"{field}.address", f"{address!r} is not an IP address")
        elif not ports:
            c.err(m.get("address"), f"{field}.address", "needs at least one port")
        address = norm
    if len(c.errors) != n_before or name is None or ns is None or account is None:
        return None
    return Service(name, ns, account, tuple(ports), tuple(workloads), meshed, policy, run,
                   expose, node.start_mark.line + 1, tuple(routes), budget, address,
                   bool(app_tls))


def _duration(c: Checker, node: yaml.Node | None, field: str, hi: float = 3600.0
              ) -> float | None:
    from meshlet.config import parse_duration

    text = c.scalar(node, field)
    if text is None:
        return None
    try:
        v = parse_duration(text)
    except ValueError as e:
        c.err(node, field, str(e))
        return None
    if not 0 < v <= hi:
        c.err(node, field, f"must be more than 0 and at most {hi:g}s")
        return None
    return v


def _route(c: Checker, node: yaml.Node, field: str, index: int) -> Route | None:
    m = c.mapping(node, field)
    if m is None:
        return None
    c.unknown(m, {"name", "match", "timeout", "retry", "request_headers", "backends"}, field)
    n_before = len(c.errors)
    name = c.scalar(m.get("name"), f"{field}.name") or f"route-{index}"
    matches: list[Match] = []
    mnode = m.get("match")
    if mnode is not None:
        items = mnode.value if isinstance(mnode, yaml.SequenceNode) else [mnode]
        for k, x in enumerate(items):
            mt = _match(c, x, f"{field}.match[{k}]")
            if mt is not None:
                matches.append(mt)
    timeout = _duration(c, m.get("timeout"), f"{field}.timeout") or 0.0
    retry = None
    if "retry" in m:
        rm = c.mapping(m["retry"], f"{field}.retry") or {}
        c.unknown(rm, {"statuses", "attempts", "per_try_timeout", "backoff"}, f"{field}.retry")
        statuses: set[int] = set()
        snode = rm.get("statuses")
        if snode is not None:
            if not isinstance(snode, yaml.SequenceNode):
                c.err(snode, f"{field}.retry.statuses", "expected a list")
            else:
                for k, x in enumerate(snode.value):
                    v = c.integer(x, f"{field}.retry.statuses[{k}]", 500, 599)
                    if v is not None:
                        statuses.add(v)
        attempts = c.integer(rm.get("attempts"), f"{field}.retry.attempts", 1, 10) \
            if "attempts" in rm else 2
        per_try = _duration(c, rm.get("per_try_timeout"), f"{field}.retry.per_try_timeout")
        backoff = _duration(c, rm.get("backoff"), f"{field}.retry.backoff", 10.0)
        retry = RetryPolicy(frozenset(statuses), attempts or 2, per_try or 0.0,
                            0.025 if backoff is None else backoff)
    sets: list[tuple[str, str]] = []
    adds: list[tuple[str, str]] = []
    removes: list[str] = []
    if "request_headers" in m:
        hf = f"{field}.request_headers"
        hm = c.mapping(m["request_headers"], hf) or {}
        c.unknown(hm, {"set", "add", "remove"}, hf)
        for kind, out in (("set", sets), ("add", adds)):
            if kind in hm:
                for hk, hv in (c.mapping(hm[kind], f"{hf}.{kind}") or {}).items():
                    val = c.scalar(hv, f"{hf}.{kind}.{hk}")
                    if not _HEADER_NAME_RE.fullmatch(hk) or hk.lower().startswith("meshlet-") \
                            or hk.lower() in _RESERVED:
                        c.err(hv, f"{hf}.{kind}.{hk}", "not a header name a route may change")
                    elif val is None or not _HEADER_VALUE_RE.fullmatch(val):
                        c.err(hv, f"{hf}.{kind}.{hk}", "invalid header value")
                    else:
                        out.append((hk, val))
        rn = hm.get("remove")
        if rn is not None:
            if not isinstance(rn, yaml.SequenceNode):
                c.err(rn, f"{hf}.remove", "expected a list")
            else:
                for x in rn.value:
                    hname = c.scalar(x, f"{hf}.remove")
                    if hname is None or not _HEADER_NAME_RE.fullmatch(hname) \
                            or hname.lower() in _RESERVED:
                        c.err(x, f"{hf}.remove",
                              f"not a header name a route may remove: {hname!r}")
                    else:
                        removes.append(hname.lower())
    backends: list[Backend] = []
    bnode = m.get("backends")
    for k, b in enumerate(c.sequence(bnode, f"{field}.backends")):
        bf = f"{field}.backends[{k}]"
        bm = c.mapping(b, bf) or {}
        c.unknown(bm, {"service", "weight"}, bf)
        svc = c.scalar(bm.get("service"), f"{bf}.service")
        if svc is None:
            c.err(b, f"{bf}.service", "required")
            continue
        host, _, port = svc.partition(":")
        if not _LABEL_DOTS_RE.fullmatch(host) or (port and not port.isdigit()):
            c.err(bm["service"], f"{bf}.service", f"{svc!r}: use NAME[.NAMESPACE][:PORT]")
            continue
        w = c.integer(bm.get("weight"), f"{bf}.weight", 0, 1_000_000) \
            if "weight" in bm else 1
        if w is not None:
            backends.append(Backend(svc, w))
        if backends and not sum(b.weight for b in backends):
            c.err(bnode, f"{field}.backends", "weights must not all be 0")
    if len(c.errors) != n_before:
        return None
    return Route(name, tuple(matches), timeout, retry, tuple(sets), tuple(adds),
                 tuple(removes), tuple(backends))


def _match(c: Checker, node: yaml.Node, field: str) -> Match | None:
    m = c.mapping(node, field)
    if m is None:
        return None
    c.unknown(m, {"path", "method", "headers"}, field)
    kind, path = "", ""
    if "path" in m:
        pm = c.mapping(m["path"], f"{field}.path") or {}
        c.unknown(pm, {"exact", "prefix", "regex"}, f"{field}.path")
        if len(pm) != 1:
            c.err(m["path"], f"{field}.path", "give one of exact, prefix, regex")
        else:
            kind, pnode = next(iter(pm.items()))
            path = c.scalar(pnode, f"{field}.path.{kind}") or ""
            if kind == "regex":
                try:
                    re.compile(path)
                except re.error as e:
                    c.err(pnode, f"{field}.path.regex", f"invalid regex: {e}")
            elif not path.startswith("/"):
                c.err(pnode, f"{field}.path.{kind}", "must start with /")
    method = c.scalar(m.get("method"), f"{field}.method") or ""
    if method and not re.fullmatch(r"[A-Z]{1,20}", method):
        c.err(m.get("method"), f"{field}.method", f"invalid method {method!r}")
    headers: list[tuple[str, str]] = []
    if "headers" in m:
        for k, v in (c.mapping(m["headers"], f"{field}.headers") or {}).items():
            val = c.scalar(v, f"{field}.headers.{k}")
            if not _HEADER_NAME_RE.fullmatch(k):
                c.err(v, f"{field}.headers.{k}", "invalid header name")
            elif val is not None:
                headers.append((k.lower(), val))
    return Match(kind, path, method, tuple(headers))


def _budget(c: Checker, node: yaml.Node, field: str) -> RetryBudgetSpec | None:
    m = c.mapping(node, field)
    if m is None:
        return None
    c.unknown(m, {"ratio", "min_per_second", "window"}, field)
    d = RetryBudgetSpec()
    ratio, mps = d.ratio, d.min_per_second
    for key in ("ratio", "min_per_second"):
        text = c.scalar(m.get(key), f"{field}.{key}")
        if text is None:
            continue
        try:
            v = float(text)
        except ValueError:
            c.err(m[key], f"{field}.{key}", f"expected a number, got {text!r}")
            continue
        if not 0 <= v <= (10.0 if key == "ratio" else 100_000):
            c.err(m[key], f"{field}.{key}", "out of range")
        elif key == "ratio":
            ratio = v
        else:
            mps = v
    window = _duration(c, m.get("window"), f"{field}.window", 600.0) or d.window
    return RetryBudgetSpec(ratio, mps, window)


def _workload(c: Checker, node: yaml.Node, field: str) -> Workload | None:
    m = c.mapping(node, field)
    if m is None:
        return None
    c.unknown(m, {"address", "weight", "ready"}, field)
    addr = c.scalar(m.get("address"), f"{field}.address")
    if addr is None:
        c.err(node, f"{field}.address", "required")
        return None
    hp = split_addr(addr)
    host, port = (hp[0], hp[1]) if hp is not None else (addr.strip("[]"), None)
    if hp is None and (not host or "/" in host or " " in host
                       or (":" in addr and not addr.startswith("["))):
        c.err(m["address"], f"{field}.address", f"invalid address {addr!r} (HOST or HOST:PORT)")
        return None
    weight = c.weight(m, field)
    if weight is None:
        return None
    ready = _bool(c, m.get("ready"), f"{field}.ready", True)
    return Workload(host, port, weight, ready)


def _policy(c: Checker, node: yaml.Node, field: str, name: str) -> Policy:
    if not isinstance(node, yaml.MappingNode):
        c.err(node, field, "expected a mapping")
        return Policy(name)
    spec = yaml.SafeLoader("").construct_object(node, deep=True)
    try:
        return parse_policy(name, spec)
    except PolicyError as e:
        for line in e.errors:
            sub, _, reason = line.partition(": ")
            c.err(_find(node, sub) or node, f"{field}.{sub}", reason)
    return Policy(name)


def _find(node: yaml.Node, path: str) -> yaml.Node | None:
    """The node at `rules[1].identities` (for error lines), best effort."""
    cur: yaml.Node | None = node
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if cur is None:
            return None
        if part.startswith("[") and isinstance(cur, yaml.SequenceNode):
            i = int(part[1:-1])
            cur = cur.value[i] if i < len(cur.value) else None
        elif isinstance(cur, yaml.MappingNode):
            cur = next((v for k, v in cur.value if getattr(k, "value", None) == part), None)
        else:
            return None
    return cur


def _run(c: Checker, node: yaml.Node, field: str) -> RunSpec | None:
    m = c.mapping(node, field)
    if m is None:
        return None
    c.unknown(m, {"command", "env", "replicas"}, field)
    cnode = m.get("command")
    command: tuple[str, ...] = ()
    if cnode is None:
        c.err(node, f"{field}.command", "required")
    elif isinstance(cnode, yaml.SequenceNode):
        command = tuple(str(c.scalar(x, f"{field}.command")) for x in cnode.value)
    else:
        text = c.scalar(cnode, f"{field}.command") or ""
        try:
            command = tuple(shlex.split(text))
        except ValueError as e:
            c.err(cnode, f"{field}.command", str(e))
    if cnode is not None and not command:
        c.err(cnode, f"{field}.command", "must not be empty")
    env: list[tuple[str, str]] = []
    enode = m.get("env")
    if enode is not None:
        em = c.mapping(enode, f"{field}.env") or {}
        for k, v in em.items():
            if not _ENV_RE.fullmatch(k):
                c.err(v, f"{field}.env.{k}", "not a valid variable name")
            val = c.scalar(v, f"{field}.env.{k}")
            if val is not None:
                env.append((k, val))
    replicas = 1
    if "replicas" in m:
        replicas = c.integer(m["replicas"], f"{field}.replicas", 1, 64) or 1
    return RunSpec(command, tuple(env), replicas)


def load_mesh_file(path: str) -> Mesh:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MeshFileError([f"{path}:1: (file): {e.strerror}"]) from None
    return parse_mesh_yaml(text, path)
