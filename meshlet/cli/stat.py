"""`meshlet stat` and `meshlet check`: the golden metrics of a running mesh, and its health.

Both read the state file `meshlet up` writes (`<state-dir>/up.json`); `stat` also takes
admin addresses directly (`--admin HOST:PORT,...`).

Rules:
1. `stat` scrapes every sidecar's (and ingress's) `/metrics` twice, `--window` seconds
   apart, and reports the difference: rates and latencies are over that window only.
   Counters that went down (a restarted proxy) count from zero, as Prometheus' `rate`.
2. Latency quantiles are interpolated within a bucket as Prometheus'
   `histogram_quantile`; replicas of one service are summed before the quantile.
3. `check` prints one line per check, ✔ or ✘ with the reason, and exits 1 if any failed.
4. An unreachable endpoint is a warning (`stat`) or a failed check (`check`), never a
   crash; every network call has a timeout.
5. Standard library only; the network modules are imported when a command runs, so the
   proxy's start-up does not pay for them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from meshlet.procs import pid_alive

if TYPE_CHECKING:
    import ssl

__all__ = [
    "DEFAULT_STATE_DIR",
    "Endpoint",
    "Row",
    "Samples",
    "Scrape",
    "StateError",
    "add_parsers",
    "aggregate",
    "counter_deltas",
    "histogram_quantile",
    "load_state",
    "parse_prometheus",
    "render_table",
    "run",
]

DEFAULT_STATE_DIR = os.path.join(".meshlet", "up")
STATE_FILE = "up.json"
HTTP_TIMEOUT = 3.0  # per request; /ready may probe the app for up to 1 s
OK, BAD = "\u2714", "\u2718"  # ✔ ✘

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs
Samples = dict[tuple[str, Labels], float]


# --- the Prometheus text format ----------------------------------------------------------


def _parse_value(text: str) -> float:
    low = text.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    return float(text)


def _parse_labels(line: str, pos: int) -> tuple[Labels, int]:
    """Labels from `line[pos]` == '{' to its '}'; returns them and the index after."""
    labels: list[tuple[str, str]] = []
    i = pos + 1
    n = len(line)
    while True:
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] == "}":
            return tuple(sorted(labels)), i + 1
        start = i
        while i < n and (line[i].isalnum() or line[i] == "_"):
            i += 1
        name = line[start:i]
        while i < n and line[i] in " \t":
            i += 1
        if not name or i >= n or line[i] != "=":
            raise ValueError(f"bad label at column {i + 1}: {line!r}")
        i += 1
        while i < n and line[i] in " \t":
            i += 1
        if i >= n or line[i] != '"':
            raise ValueError(f"bad label value at column {i + 1}: {line!r}")
        i += 1
        value: list[str] = []
        while True:
            if i >= n:
                raise ValueError(f"unterminated label value: {line!r}")
            c = line[i]
            if c == "\\":
                if i + 1 >= n:
                    raise ValueError(f"bad escape: {line!r}")
                esc = line[i + 1]
                value.append({"n": "\n", "\\": "\\", '"': '"'}.get(esc, "\\" + esc))
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                value.append(c)
                i += 1
        labels.append((name, "".join(value)))
        while i < n and line[i] in " \t":
            i += 1
        if i < n and line[i] == ",":
            i += 1
        elif i >= n or line[i] != "}":
            raise ValueError(f"expected ',' or '}}' at column {i + 1}: {line!r}")


def parse_prometheus(text: str) -> Samples:
    """Samples of a Prometheus text exposition (0.0.4), by (name, sorted labels).
    Comments and blank lines are skipped; timestamps are ignored; a malformed line
    raises ValueError naming it."""
    out: Samples = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        i = 0
        while i < len(line) and (line[i].isalnum() or line[i] in "_:"):
            i += 1
        name = line[:i]
        if not name or name[0].isdigit():
            raise ValueError(f"bad metric name: {raw!r}")
        labels: Labels = ()
        if i < len(line) and line[i] == "{":
            labels, i = _parse_labels(line, i)
        rest = line[i:].split()
        if not rest or len(rest) > 2 or (line[i:i + 1] not in (" ", "\t")):
            raise ValueError(f"bad sample: {raw!r}")
        try:
            out[(name, labels)] = _parse_value(rest[0])
        except ValueError:
            raise ValueError(f"bad sample value: {raw!r}") from None
    return out


def counter_deltas(before: Samples, after: Samples) -> Samples:
    """How much each counter of `after` grew since `before`. A series new in `after`,
    or lower than before (the process restarted), counts from zero."""
    out: Samples = {}
    for key, v in after.items():
        old = before.get(key)
        out[key] = v - old if old is not None and v >= old else v
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The q-quantile from cumulative bucket counts by upper bound (must include +Inf),
    interpolated linearly within the bucket as Prometheus does. None: no observations.
    Above the highest finite bound: that bound (as Prometheus)."""
    if not buckets or math.inf not in buckets:
        return None
    bounds = sorted(buckets)
    counts: list[float] = []
    for b in bounds:  # cumulative counts never decrease (Prometheus' ensureMonotonic)
        counts.append(max(buckets[b], counts[-1] if counts else 0.0))
    total = counts[-1]
    if total <= 0 or math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if len(bounds) < 2:
        return None
    rank = q * total
    # The first bucket reaching the rank (for q=0: the first with an observation).
    b = next((i for i in range(len(bounds) - 1) if counts[i] >= rank and counts[i] > 0),
             len(bounds) - 1)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start + (end - start) * (rank / count)


# --- the state file ------------------------------------------------------------------------


class StateError(Exception):
    """The state file is missing or malformed (the message says which and where)."""


@dataclass(frozen=True)
class Endpoint:
    """One proxy to look at: a replica's sidecar, an ingress, or a bare admin address."""

    service: str  # the row label: "reviews", "reviews.shop", "ingress/frontend", an address
    admin: str
    kind: str = "sidecar"  # sidecar | ingress | admin
    name: str = ""  # for messages: "reviews replica 0"
    identity: str | None = None
    app_addr: str | None = None
    inbound: str | None = None
    pids: tuple[tuple[str, int], ...] = ()  # ("proxy", 2), ("app", 1)
    netns: str | None = None  # `meshlet up --netns`: the replica's pod

    @property
    def title(self) -> str:
        return self.name or self.service


@dataclass(frozen=True)
class State:
    path: str
    control_addr: str | None
    anchors: str | None
    control_pid: int | None
    mesh_file: str | None
    endpoints: tuple[Endpoint, ...]
    up_pid: int | None = None  # `meshlet up` itself


def _service_label(service: str, namespace: str) -> str:
    return service if namespace in ("", "default") else f"{service}.{namespace}"


def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    v = d.get(key)
    if v is None or isinstance(v, str):
        return v
    raise StateError(f"{where}.{key}: expected a string or null, got {v!r}")


def _opt_pid(d: Mapping[str, Any], key: str, where: str) -> int | None:
    v = d.get(key)
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        return v
    raise StateError(f"{where}.{key}: expected a process id, got {v!r}")


def _req_str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = _opt_str(d, key, where)
    if not v:
        raise StateError(f"{where}.{key}: missing")
    return v


def load_state(state_dir: str) -> State:
    """Read `<state_dir>/up.json`; StateError says what is wrong with it."""
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise StateError(f"no state file at {path}: is `meshlet up` running here? "
                         f"(--state-dir names another directory)") from None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise StateError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise StateError(f"{path}: expected a JSON object")
    if doc.get("version") != 1:
        raise StateError(f"{path}: unsupported version {doc.get('version')!r} (expected 1)")
    try:
        control = doc.get("control") or {}
        if not isinstance(control, dict):
            raise StateError("control: expected an object")
        eps: list[Endpoint] = []
        replicas = doc.get("replicas")
        replicas = [] if replicas is None else replicas
        ingress = doc.get("ingress")
        ingress = [] if ingress is None else ingress
        if not isinstance(replicas, list) or not isinstance(ingress, list):
            raise StateError("replicas, ingress: expected lists")
        for i, r in enumerate(replicas):
            where = f"replicas[{i}]"
            if not isinstance(r, dict):
                raise StateError(f"{where}: expected an object")
            svc = _req_str(r, "service", where)
            ns = _opt_str(r, "namespace", where) or "default"
            pids = tuple((k, p) for k, p in (("proxy", _opt_pid(r, "proxy_pid", where)),
                                             ("app", _opt_pid(r, "app_pid", where)))
                         if p is not None)
            eps.append(Endpoint(
                service=_service_label(svc, ns), admin=_req_str(r, "admin", where),
                kind="sidecar", name=f"{_service_label(svc, ns)} replica {r.get('replica', i)}",
                identity=_opt_str(r, "identity", where),
                app_addr=_opt_str(r, "app_addr", where),
                inbound=_opt_str(r, "inbound", where), pids=pids,
                netns=_opt_str(r, "netns", where)))
        for i, g in enumerate(ingress):
            where = f"ingress[{i}]"
            if not isinstance(g, dict):
                raise StateError(f"{where}: expected an object")
            svc = _req_str(g, "service", where)
            pid = _opt_pid(g, "proxy_pid", where)
            listen = _opt_str(g, "listen", where)
            eps.append(Endpoint(
                service=f"ingress/{svc}", admin=_req_str(g, "admin", where), kind="ingress",
                name=f"ingress for {svc}" + (f" on {listen}" if listen else ""),
                inbound=listen, pids=(("proxy", pid),) if pid is not None else ()))
        return State(path=path, control_addr=_opt_str(control, "addr", "control"),
                     anchors=_opt_str(control, "anchors", "control"),
                     control_pid=_opt_pid(control, "pid", "control"),
                     mesh_file=_opt_str(doc, "mesh_file", "state"), endpoints=tuple(eps),
                     up_pid=_opt_pid(doc, "pid", "state"))
    except StateError as e:
        raise StateError(f"{path}: {e}") from None


def admin_endpoints(spec: str) -> tuple[Endpoint, ...]:
    """`HOST:PORT[,HOST:PORT...]` as endpoints labelled by their address."""
    out: list[Endpoint] = []
    for part in spec.split(","):
        addr = part.strip()
        if not addr:
            continue
        _split_addr(addr)  # validates
        out.append(Endpoint(service=addr, admin=addr, kind="admin"))
    if not out:
        raise StateError("--admin: no address given")
    return tuple(out)


def _split_addr(addr: str) -> tuple[str, int]:
    """`HOST:PORT` / `[V6]:PORT` -> (host to connect to, port); a wildcard host is
    reached on loopback."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise StateError(f"bad address {addr!r}: expected HOST:PORT")
    host = host.strip("[]")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


# --- HTTP -------------------------------------------------------------------------------


@dataclass
class HttpResult:
    status: int = 0
    body: bytes = b""
    error: str | None = None  # set: no HTTP answer (refused, timeout, TLS failure...)


def _describe(e: BaseException) -> str:
    import socket
    import ssl

    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {e.verify_message or e.reason or e}"
    if isinstance(e, ssl.SSLError):
        return f"TLS failed: {e.reason or e}"
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


def http_get(addr: str, path: str, timeout: float = HTTP_TIMEOUT,
             context: ssl.SSLContext | None = None) -> HttpResult:
    """One GET (HTTPS if `context`); no environment proxy is ever used."""
    import http.client

    try:
        host, port = _split_addr(addr)
    except StateError as e:
        return HttpResult(error=str(e))
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"accept": "*/*"})
        resp = conn.getresponse()
        return HttpResult(resp.status, resp.read())
    except (OSError, http.client.HTTPException) as e:
        return HttpResult(error=_describe(e))
    finally:
        conn.close()


def _parallel(fn: Callable[[Endpoint], Any], eps: Sequence[Endpoint]) -> list[Any]:
    if len(eps) <= 1:
        return [fn(e) for e in eps]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, len(eps))) as pool:
        return list(pool.map(fn, eps))


# --- stat ---------------------------------------------------------------------------------


@dataclass
class Scrape:
    endpoint: Endpoint
    at: float  # time.monotonic() when the answer came
    samples: Samples | None = None
    error: str | None = None


def scrape(ep: Endpoint, timeout: float = HTTP_TIMEOUT) -> Scrape:
    r = http_get(ep.admin, "/metrics", timeout)
    at = time.monotonic()
    if r.error is not None:
        return Scrape(ep, at, error=f"unreachable: {r.error}")
    if r.status != 200:
        return Scrape(ep, at, error=f"/metrics answered {r.status}")
    try:
        return Scrape(ep, at, samples=parse_prometheus(r.body.decode("utf-8", "replace")))
    except ValueError as e:
        return Scrape(ep, at, error=f"/metrics unparsable: {e}")


def scrape_all(eps: Sequence[Endpoint]) -> list[Scrape]:
    return _parallel(scrape, eps)


@dataclass
class Row:
    """Traffic of one service in one direction (outbound: to one authority) in a window."""

    service: str
    direction: str
    peer: str
    requests: float = 0.0
    tls_requests: float = 0.0
    responses: float = 0.0
    successes: float = 0.0
    rps: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    sources: set[str] = field(default_factory=set)  # admin addresses summed

    @property
    def success_pct(self) -> float | None:
        return 100.0 * self.successes / self.responses if self.responses > 0 else None

    @property
    def tls_pct(self) -> float | None:
        return 100.0 * self.tls_requests / self.requests if self.requests > 0 else None

    def latency(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)

    def to_json(self) -> dict[str, Any]:
        idle = self.requests <= 0 and self.responses <= 0
        return {
            "service": self.service, "direction": self.direction,
            "peer": None if self.peer == "-" else self.peer,
            "requests": _count(self.requests), "responses": _count(self.responses),
            "success_pct": self.success_pct,
            "rps": None if idle else self.rps,
            "p50_ms": self.latency(0.5), "p95_ms": self.latency(0.95),
            "p99_ms": self.latency(0.99),
            "tls_pct": self.tls_pct, "proxies": len(self.sources),
        }


def _count(v: float) -> float | int:
    return int(v) if v.is_integer() else v


_DIRECTION_ORDER = {"inbound": 0, "outbound": 1}


def aggregate(first: Sequence[Scrape], second: Sequence[Scrape]
              ) -> tuple[list[Row], list[str]]:
    """Rows from two scrapes of the same endpoints (in the same order), and warnings for
    the endpoints that could not be scraped both times."""
    rows: dict[tuple[str, str, str], Row] = {}
    warnings: list[str] = []

    def row(service: str, direction: str, peer: str) -> Row:
        key = (service, direction, peer)
        r = rows.get(key)
        if r is None:
            r = rows[key] = Row(service, direction, peer)
        return r

    for a, b in zip(first, second, strict=True):
        ep = b.endpoint
        if a.samples is None or b.samples is None:
            why = b.error or a.error
            warnings.append(f"{ep.title} (admin {ep.admin}): {why}")
            continue
        if ep.kind == "sidecar" and ep.inbound:  # a service that serves: always a row
            row(ep.service, "inbound", "-").sources.add(ep.admin)
        elapsed = max(b.at - a.at, 1e-6)
        for (name, labels), d in counter_deltas(a.samples, b.samples).items():
            if name not in ("request_total", "response_total", "response_latency_ms_bucket"):
                continue
            lab = dict(labels)
            direction = lab.get("direction", "")
            peer = lab.get("authority", "") if direction == "outbound" else "-"
            r = row(ep.service, direction, peer)
            r.sources.add(ep.admin)
            if name == "request_total":
                r.requests += d
                r.rps += d / elapsed
                if lab.get("tls") == "true":
                    r.tls_requests += d
            elif name == "response_total":
                r.responses += d
                if lab.get("classification") == "success":
                    r.successes += d
            else:
                try:
                    le = _parse_value(lab.get("le", ""))
                except ValueError:
                    continue
                r.buckets[le] = r.buckets.get(le, 0.0) + d
    ordered = sorted(rows.values(), key=lambda r: (
        r.service, _DIRECTION_ORDER.get(r.direction, 2), r.direction, r.peer))
    return ordered, warnings


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}ms"
    if v >= 10:
        return f"{v:.1f}ms"
    return f"{v:.2f}ms"


COLUMNS = ("SERVICE", "DIRECTION", "PEER", "SUCCESS", "RPS", "P50", "P95", "P99", "TLS")


def render_table(rows: Iterable[Row], warnings: Sequence[str]) -> str:
    cells: list[tuple[str, ...]] = [COLUMNS]
    for r in rows:
        j = r.to_json()
        cells.append((r.service, r.direction, r.peer, _pct(j["success_pct"]),
                      "-" if j["rps"] is None else f"{j['rps']:.2f}", _ms(j["p50_ms"]),
                      _ms(j["p95_ms"]), _ms(j["p99_ms"]), _pct(j["tls_pct"])))
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for c in cells:
        # Text columns left-aligned, numbers right-aligned.
        parts = [v.ljust(w) if i < 3 else v.rjust(w)
                 for i, (v, w) in enumerate(zip(c, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    if len(cells) == 1:
        lines.append("(no traffic recorded yet)")
    lines += [f"warning: {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def _stat_json(rows: Sequence[Row], warnings: Sequence[str], window: float) -> str:
    return json.dumps({"window_seconds": window, "rows": [r.to_json() for r in rows],
                       "warnings": list(warnings)})


def run_stat(eps: Sequence[Endpoint], window: float, watch: bool, as_json: bool,
             out: TextIO = sys.stdout) -> int:
    clear = watch and not as_json and out.isatty()
    try:
        before = scrape_all(eps)
        while True:
            deadline = before[0].at + window if before else time.monotonic()
            time.sleep(max(0.0, deadline - time.monotonic()))
            after = scrape_all(eps)
            rows, warnings = aggregate(before, after)
            if as_json:
                out.write(_stat_json(rows, warnings, window) + "\n")
            else:
                if clear:
                    out.write("\x1b[H\x1b[2J")
                if watch:
                    out.write(f"{time.strftime('%H:%M:%S')}  last {window:g}s  "
                              "(Ctrl-C to stop)\n")
                out.write(render_table(rows, warnings))
                if watch and not clear:
                    out.write("\n")
            out.flush()
            if not watch:
                reached = any(s.samples is not None for s in after)
                return 0 if reached else 1
            before = after
    except KeyboardInterrupt:
        return 0 if watch else 130


# --- check --------------------------------------------------------------------------------


class Report:
    """Check lines, printed as they are made."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = 0
        self.passed = 0

    def section(self, title: str) -> None:
        self.out.write(f"{title}\n")

    def ok(self, text: str) -> None:
        self.passed += 1
        self.out.write(f"  {OK} {text}\n")

    def bad(self, text: str, details: Iterable[str] = ()) -> None:
        self.failed += 1
        self.out.write(f"  {BAD} {text}\n")
        for d in details:
            self.out.write(f"      {d}\n")


def _check_pids(rep: Report, pids: Iterable[tuple[str, int]]) -> None:
    for what, pid in pids:
        if pid_alive(pid):
            rep.ok(f"{what} process {pid} is running")
        else:
            rep.bad(f"{what} process {pid} is not running")


def _json_body(r: HttpResult) -> dict[str, Any] | None:
    try:
        doc = json.loads(r.body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def check_control(rep: Report, st: State) -> None:
    rep.section(f"control plane {st.control_addr or '(none)'}")
    if st.control_pid is not None:
        _check_pids(rep, [("control plane", st.control_pid)])
    if not st.control_addr:
        rep.bad(f"no control plane address in {st.path}")
        return
    if not st.anchors:
        rep.bad(f"no trust anchors file in {st.path}: cannot verify the control plane")
        return
    import ssl

    try:
        with open(st.anchors, encoding="ascii") as f:
            ctx = ssl.create_default_context(cadata=f.read())
    except (OSError, ValueError, ssl.SSLError) as e:
        rep.bad(f"trust anchors {st.anchors} unusable: {_describe(e)}")
        return
    r = http_get(st.control_addr, "/v1/status", context=ctx)
    if r.error is not None:
        rep.bad(f"https://{st.control_addr}/v1/status: {r.error}")
        return
    doc = _json_body(r)
    if r.status != 200 or doc is None:
        rep.bad(f"/v1/status answered {r.status}: {r.body[:200].decode('utf-8', 'replace')}")
        return
    rep.ok(f"up, TLS verified against {st.anchors} (trust domain "
           f"{doc.get('trust_domain')}, {doc.get('issued', 0)} certificate(s) issued)")
    pid = doc.get("pid")
    if st.control_pid is not None and isinstance(pid, int) and pid != st.control_pid:
        rep.bad(f"served by pid {pid}, not {st.control_pid} as {st.path} says "
                "(stale state file?)")
    errors = doc.get("mesh_error")
    mesh = doc.get("mesh_file") or st.mesh_file or "the mesh file"
    if errors:
        lines = errors if isinstance(errors, list) else [str(errors)]
        rep.bad(f"the last edit of {mesh} was refused; the last good mesh stays in force:",
                [str(e) for e in lines])
    else:
        rep.ok(f"{mesh} in force ({doc.get('services', '?')} service(s))")


@dataclass
class ProxyAnswers:
    live: HttpResult
    ready: HttpResult | None = None
    config: HttpResult | None = None


def _ask_proxy(ep: Endpoint) -> ProxyAnswers:
    live = http_get(ep.admin, "/live")
    if live.error is not None:
        return ProxyAnswers(live)
    return ProxyAnswers(live, http_get(ep.admin, "/ready"), http_get(ep.admin, "/config"))


def check_proxy(rep: Report, ep: Endpoint, ans: ProxyAnswers) -> None:
    rep.section(f"{ep.title} (admin {ep.admin})")
    _check_pids(rep, ep.pids)
    live = ans.live
    if live.error is not None:
        rep.bad(f"admin {ep.admin} unreachable: {live.error}")
        return
    if live.status == 200:
        rep.ok("live")
    else:
        rep.bad(f"not live: /live answered {live.status}")
    ready = ans.ready
    assert ready is not None and ans.config is not None
    text = ready.body.decode("utf-8", "replace").strip()
    if ready.error is not None:
        rep.bad(f"/ready: {ready.error}")
    elif ready.status == 200:
        rep.ok("ready")
    else:
        rep.bad(text if text.startswith("not ready") else f"not ready ({ready.status}): {text}")
    cfg = _json_body(ans.config) if ans.config.error is None else None
    if cfg is None:
        rep.bad(f"/config: {ans.config.error or f'no JSON (status {ans.config.status})'}")
        return
    proxy_pid = dict(ep.pids).get("proxy")
    if proxy_pid is not None and isinstance(cfg.get("pid"), int) and cfg["pid"] != proxy_pid:
        rep.bad(f"admin {ep.admin} is served by pid {cfg['pid']}, not the proxy pid "
                f"{proxy_pid} the state file names (stale state file?)")
    ident = cfg.get("identity")
    if not isinstance(ident, dict):
        rep.bad("not meshed: no control plane configured (plaintext, no identity)")
    else:
        name = ident.get("identity") or ep.identity or "?"
        err = ident.get("last_error")
        if ident.get("valid"):
            note = f" (last renewal failed: {err})" if err else ""
            rep.ok(f"certified as {name} until {ident.get('not_after')}{note}")
        else:
            rep.bad(f"not certified as {name}: "
                    + (err or "no valid certificate yet")
                    + (f" (last certificate expired {ident['not_after']})"
                       if ident.get("not_after") else ""))
        if ep.identity and ident.get("identity") and ident["identity"] != ep.identity:
            rep.bad(f"proxy identity {ident['identity']} is not {ep.identity} as the "
                    "state file says")
    conf = cfg.get("config")
    transparent = isinstance(conf, dict) and conf.get("transparent") is True
    if ep.netns is not None or transparent:
        check_interception(rep, ep.netns, transparent)
    disc = cfg.get("discovery")
    if not isinstance(disc, dict):
        if isinstance(ident, dict):
            rep.ok("discovery: static endpoints file (not the control plane)")
        return
    n = len(disc.get("destinations") or {})
    if disc.get("in_sync"):
        rep.ok(f"discovery in sync with the control plane ({n} destination(s) watched)")
    else:
        problems = disc.get("problems") or []
        rep.bad("discovery out of sync with the control plane (serving the last "
                "endpoints it had):", [str(p) for p in problems])


def listening_ports(netns: str | None) -> set[int] | None:
    """TCP ports something listens on in network namespace `netns` (None: this one),
    read from /proc of a process inside it; None if that cannot be read."""
    import subprocess

    if netns is None:
        pids = [str(os.getpid())]
    else:
        try:
            r = subprocess.run(["ip", "netns", "pids", netns], capture_output=True,
                               text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if r.returncode != 0:
            return None
        pids = r.stdout.split()
        if not pids:
            return set()  # no process in it: nothing can listen
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pids[0]}/net/{name}", encoding="ascii") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 3 and cols[3] == "0A":  # TCP_LISTEN
                        ports.add(int(cols[1].rpartition(":")[2], 16))
        except OSError:
            continue
    return ports


def check_interception(rep: Report, netns: str | None, transparent: bool) -> None:
    """Rules and proxy must come together: rules redirecting to ports nothing listens
    on refuse every connection; a transparent proxy without rules is bypassed (the
    app's traffic goes out in plaintext, unseen)."""
    where = f"in {netns}" if netns else "here"
    try:
        from meshlet.netfilter.rules import NetfilterError, installed

        found = installed(netns=netns)
    except (OSError, NetfilterError) as e:
        rep.bad(f"interception rules {where} unreadable (needs root): {e}")
        return
    v4 = found.get("ipv4")
    if v4 is None or not v4.chains:
        if transparent:
            rep.bad(f"no `meshlet init` rules {where}: the transparent proxy is bypassed "
                    "(apps' traffic goes out in plaintext, without the mesh); run "
                    "`meshlet init` once the proxy is ready")
        else:
            rep.ok(f"no interception rules {where} (explicit mode)")
        return
    if not v4.complete:
        rep.bad(f"`meshlet init` rules {where} are incomplete (chains {v4.chains}, "
                f"{v4.jumps} jump(s)): run `meshlet init` again")
        return
    listening = listening_ports(netns)
    wanted = [p for p in (v4.inbound_port, v4.outbound_port) if p is not None]
    if listening is None:
        rep.bad(f"cannot tell what listens {where}")
        return
    missing = [p for p in wanted if p not in listening]
    if missing:
        rep.bad(f"rules {where} redirect TCP to port(s) {', '.join(map(str, missing))} but "
                "nothing listens there: connections are refused (start the proxy, or "
                "`meshlet init --uninstall`)")
    else:
        fams = ", ".join(f"{f} ({s.mode})" for f, s in sorted(found.items()) if s.complete)
        rep.ok(f"interception rules {where} for {fams} redirect to the proxy's ports "
               f"{' and '.join(map(str, wanted))}")


def run_check(st: State, out: TextIO = sys.stdout) -> int:
    rep = Report(out)
    # Ask every proxy at once (a /ready may take a second), print in state-file order.
    answers: list[ProxyAnswers] = _parallel(_ask_proxy, st.endpoints)
    if st.up_pid is not None:
        rep.section(f"meshlet up ({st.path})")
        _check_pids(rep, [("meshlet up", st.up_pid)])
    check_control(rep, st)
    for ep, ans in zip(st.endpoints, answers, strict=True):
        check_proxy(rep, ep, ans)
    if not st.endpoints:
        rep.bad(f"no proxies in {st.path}")
    if rep.failed:
        out.write(f"{BAD} {rep.failed} problem(s), {rep.passed} check(s) passed\n")
        return 1
    out.write(f"{OK} all {rep.passed} checks passed\n")
    return 0


# --- the commands -------------------------------------------------------------------------


def _window(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.05 <= v <= 3600:
        raise argparse.ArgumentTypeError("the window must be between 0.05 and 3600 seconds")
    return v


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "stat", help="golden metrics of the running mesh, per service",
        description="Scrape every proxy's /metrics twice, WINDOW seconds apart, and show "
        "per service and direction (outbound: per destination) the success rate, "
        "requests per second, latency percentiles and the share of mTLS requests.")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                     help=f"where `meshlet up` keeps up.json (default {DEFAULT_STATE_DIR})")
    src.add_argument("--admin", metavar="HOST:PORT[,HOST:PORT...]",
                     help="scrape these admin addresses instead of the state file's")
    s.add_argument("--window", type=_window, default=2.0, metavar="SECONDS",
                   help="time between the two scrapes (default 2)")
    s.add_argument("--watch", action="store_true", help="refresh every window until Ctrl-C")
    s.add_argument("--json", action="store_true", help="print the rows as JSON")
    c = sub.add_parser(
        "check", help="is the mesh up, certified and in sync?",
        description="Check the control plane and every proxy `meshlet up` started: one "
        "line per check; exit status 0 if all pass, 1 otherwise.")
    c.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                   help=f"where `meshlet up` keeps up.json (default {DEFAULT_STATE_DIR})")
    c.add_argument("--netns", metavar="NAME", default=None,
                   help="check only the interception (rules and proxy ports) in this "
                   "network namespace ('.': this one), without `meshlet up`")


def run(args: argparse.Namespace) -> int:
    cmd = args.command
    try:
        if cmd == "stat" and args.admin:
            eps = admin_endpoints(args.admin)
        else:
            if cmd == "check" and args.netns is not None:
                rep = Report(sys.stdout)
                ns = None if args.netns == "." else args.netns
                rep.section(f"interception in {ns or 'this network namespace'}")
                check_interception(rep, ns, True)
                return 1 if rep.failed else 0
            st = load_state(args.state_dir)
            if cmd == "check":
                return run_check(st)
            eps = st.endpoints
            if not eps:
                raise StateError(f"{st.path}: no proxies to scrape")
    except StateError as e:
        print(f"meshlet {cmd}: {e}", file=sys.stderr)
        return 1
    return run_stat(eps, args.window, args.watch, args.json)
