"""Golden metrics, kept as plain integers on the hot path and rendered at scrape time.

Rules:
1. Names follow linkerd2-proxy so existing dashboards work: `request_total`,
   `response_total`, `response_latency_ms` (linkerd's buckets), `tcp_open_total`,
   `tcp_close_total`, `tcp_open_connections`, `tcp_read_bytes_total`,
   `tcp_write_bytes_total`.
2. The hot path never formats text or builds label strings: it looks up (once per
   connection or per authority) a stats object and bumps its integer attributes.
3. Label sets are bounded: past `MAX_LABEL_SETS` new authorities share one
   `authority="overflow"` set, so hostile Host headers cannot grow memory.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

__all__ = [
    "LATENCY_BUCKETS_MS",
    "MAX_LABEL_SETS",
    "HttpStats",
    "Metrics",
    "TcpStats",
]

LATENCY_BUCKETS_MS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)
MAX_LABEL_SETS = 1000

Labels = tuple[tuple[str, str], ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _fmt(labels: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}" if inner else ""


_TCP_SERIES = (
    ("tcp_open_total", "Total count of opened connections.", "counter", "opened"),
    ("tcp_close_total", "Total count of closed connections.", "counter", "closed"),
    ("tcp_open_connections", "Number of currently-open connections.", "gauge", "open"),
    ("tcp_read_bytes_total", "Total count of bytes read from peers.", "counter", "read_bytes"),
    ("tcp_write_bytes_total", "Total count of bytes written to peers.", "counter",
     "write_bytes"),
)


class HttpStats:
    """Request/response counters and the latency histogram for one label set."""

    __slots__ = ("buckets", "grpc", "labels", "latency_count", "latency_sum", "requests",
                 "responses")

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self.requests = 0
        self.responses: dict[tuple[int, bool], int] = {}
        # gRPC responses by (HTTP status, grpc-status): classified by the grpc-status.
        self.grpc: dict[tuple[int, int], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0

    def response(self, status: int, latency_ms: float) -> None:
        key = (status, status < 500)
        r = self.responses
        r[key] = r.get(key, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
        self.latency_sum += latency_ms
        self.latency_count += 1


    def grpc_response(self, status: int, grpc_status: int, latency_ms: float) -> None:
        key = (status, grpc_status)
        g = self.grpc
        g[key] = g.get(key, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
        self.latency_sum += latency_ms
        self.latency_count += 1

    def retract(self, status: int, latency_ms: float) -> None:
        """Undo one `response` (a head counted, then replaced by a proxy error)."""
        key = (status, status < 500)
        r = self.responses
        n = r.get(key, 0) - 1
        if n > 0:
            r[key] = n
        else:
            r.pop(key, None)
        self.buckets[bisect_left(LATENCY_BUCKETS_MS, latency_ms)] -= 1
        self.latency_sum -= latency_ms
        self.latency_count -= 1


class TcpStats:
    """Connection counters for one label set (direction, peer, tls)."""

    __slots__ = ("closed", "labels", "opened", "read_bytes", "write_bytes")

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.read_bytes = 0
        self.write_bytes = 0


class Metrics:
    """The proxy's registry: stats objects by label set, plus simple counters."""

    def __init__(self) -> None:
        self._http: dict[Labels, HttpStats] = {}
        self._tcp: dict[Labels, TcpStats] = {}
        # name -> (help, {labels: value}); plain counters bumped off the hot path.
        self._counters: dict[str, tuple[str, dict[Labels, int]]] = {}
        self._gauges: dict[str, tuple[str, Callable[[], Iterable[tuple[Labels, float]]]]] = {}

    def http(self, direction: str, authority: str, tls: str, client_id: str = ""
             ) -> HttpStats:
        """Stats for one label set; `client_id`: the verified peer identity (mTLS)."""
        key: Labels = (("direction", direction), ("authority", authority), ("tls", tls))
        if client_id:
            key += (("client_id", client_id),)
        st = self._http.get(key)
        if st is None:
            if len(self._http) >= MAX_LABEL_SETS:
                return self.http(direction, "overflow", tls) if authority != "overflow" \
                    else self._new_http(key)
            st = self._new_http(key)
        return st

    def _new_http(self, key: Labels) -> HttpStats:
        st = self._http.get(key)
        if st is None:
            st = self._http[key] = HttpStats(key)
        return st

    def tcp(self, direction: str, peer: str, tls: str, client_id: str = "") -> TcpStats:
        key: Labels = (("direction", direction), ("peer", peer), ("tls", tls))
        if client_id:
            key += (("client_id", client_id),)
        st = self._tcp.get(key)
        if st is None:
            st = self._tcp[key] = TcpStats(key)
        return st

    def counter(self, name: str, help_text: str, labels: Labels = (), n: int = 1) -> None:
        entry = self._counters.get(name)
        if entry is None:
            entry = self._counters[name] = (help_text, {})
        values = entry[1]
        values[labels] = values.get(labels, 0) + n

    def counter_value(self, name: str, labels: Labels = ()) -> int:
        entry = self._counters.get(name)
        return entry[1].get(labels, 0) if entry else 0

    def gauge(
        self, name: str, help_text: str, read: Callable[[], Iterable[tuple[Labels, float]]]
    ) -> None:
        self._gauges[name] = (help_text, read)

    def render(self) -> str:
        out: list[str] = []
        w = out.append
        https = list(self._http.values())
        w("# HELP request_total Total count of HTTP requests.")
        w("# TYPE request_total counter")
        for st in https:
            w(f"request_total{_fmt(st.labels)} {st.requests}")
        w("# HELP response_total Total count of HTTP responses.")
        w("# TYPE response_total counter")
        for st in https:
            for (status, ok), n in sorted(st.responses.items()):
                labels = (*st.labels, ("status_code", str(status)),
                          ("classification", "success" if ok else "failure"))
                w(f"response_total{_fmt(labels)} {n}")
            for (status, code), n in sorted(st.grpc.items()):
                labels = (*st.labels, ("status_code", str(status)),
                          ("grpc_status", str(code)),
                          ("classification", "success" if code == 0 else "failure"))
                w(f"response_total{_fmt(labels)} {n}")
        w("# HELP response_latency_ms Elapsed times between a request's headers being "
          "received and its response's headers being sent.")
        w("# TYPE response_latency_ms histogram")
        for st in https:
            cum = 0
            for le, n in zip((*LATENCY_BUCKETS_MS, "+Inf"), st.buckets, strict=True):
                cum += n
                w(f"response_latency_ms_bucket{_fmt((*st.labels, ('le', str(le))))} {cum}")
            w(f"response_latency_ms_sum{_fmt(st.labels)} {st.latency_sum:.3f}")
            w(f"response_latency_ms_count{_fmt(st.labels)} {st.latency_count}")
        tcps = list(self._tcp.values())
        for name, help_text, kind, attr in _TCP_SERIES:
            w(f"# HELP {name} {_help(help_text)}")
            w(f"# TYPE {name} {kind}")
            for ts in tcps:
                v = ts.opened - ts.closed if attr == "open" else getattr(ts, attr)
                w(f"{name}{_fmt(ts.labels)} {v}")
        for name, (help_text, values) in sorted(self._counters.items()):
            w(f"# HELP {name} {_help(help_text)}")
            w(f"# TYPE {name} counter")
            for labels, n in values.items():
                w(f"{name}{_fmt(labels)} {n}")
        for name, (help_text, read) in sorted(self._gauges.items()):
            w(f"# HELP {name} {_help(help_text)}")
            w(f"# TYPE {name} gauge")
            for labels, v in read():
                w(f"{name}{_fmt(labels)} {_num(v)}")
        out.append("")
        return "\n".join(out)
