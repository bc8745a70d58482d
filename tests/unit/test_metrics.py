"""meshlet.metrics.registry: Prometheus text exposition of the proxy's golden metrics."""

from __future__ import annotations

import math
import re

import pytest

from meshlet.metrics.registry import LATENCY_BUCKETS_MS, MAX_LABEL_SETS, Metrics

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"({_NAME})(\{{(?:{_LABEL}(?:,{_LABEL})*)?\}})? (\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_HELP = re.compile(rf"# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict checker for the text format (version 0.0.4): returns samples by name."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    seen_family: list[str] = []
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    keys: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text[:-1].split("\n"):
        assert line, "empty line"
        if line.startswith("# HELP "):
            m = _HELP.fullmatch(line)
            assert m, line
            assert m.group(1) not in helps, f"second HELP for {m.group(1)}"
            helps.add(m.group(1))
            continue
        if line.startswith("# TYPE "):
            m = _TYPE.fullmatch(line)
            assert m, line
            assert m.group(1) not in types, f"second TYPE for {m.group(1)}"
            assert m.group(1) not in samples, "TYPE after samples"
            types[m.group(1)] = m.group(2)
            seen_family.append(m.group(1))
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.fullmatch(line)
        assert m, f"bad sample line {line!r}"
        name, labels_text, value = m.groups()
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                family = name[: -len(suffix)]
        assert family in types, f"sample {name} without TYPE"
        assert family == seen_family[-1], f"{name} not grouped under its family"
        labels = {k: _unescape(v) for k, v in _LABEL_RE.findall(labels_text or "")}
        assert len(labels) == len(_LABEL_RE.findall(labels_text or "")), "duplicate label"
        key = (name, tuple(sorted(labels.items())))
        assert key not in keys, f"duplicate series {key}"
        keys.add(key)
        v = float(value)  # raises on junk
        assert not math.isnan(v)
        samples.setdefault(name, []).append((labels, v))
    return samples


def _one(samples: list[tuple[dict[str, str], float]], **want: str) -> float:
    found = [v for labels, v in samples if all(labels.get(k) == x for k, x in want.items())]
    assert len(found) == 1, (want, found)
    return found[0]


def test_empty_registry_renders_valid_text() -> None:
    s = parse_prometheus(Metrics().render())
    assert s == {}


def test_full_render_parses_and_counts() -> None:
    m = Metrics()
    st = m.http("inbound", "web:80", "true")
    assert m.http("inbound", "web:80", "true") is st
    lat = [0.5, 1, 1.0001, 3, 7, 45, 99.9, 100, 5000, 60000, 123456]
    for i, x in enumerate(lat):
        st.requests += 1
        st.response(200 if i % 3 else 503, x)
    t = m.tcp("outbound", "dst", "no_identity", "spiffe://td/ns/a/sa/b")
    t.opened, t.closed, t.read_bytes, t.write_bytes = 5, 2, 1000, 2000
    m.counter("errors_total", "Errors by reason.", (("reason", "x"),), 3)
    m.counter("errors_total", "Errors by reason.", (("reason", "x"),))
    m.counter("plain_total", "No labels.")
    m.gauge("pool_idle", "Idle.", lambda: [((("ep", "a"),), 3), ((("ep", "b"),), 0.25)])
    s = parse_prometheus(m.render())

    labels = {"direction": "inbound", "authority": "web:80", "tls": "true"}
    assert _one(s["request_total"], **labels) == len(lat)
    assert _one(s["response_total"], status_code="200", classification="success") == 7
    assert _one(s["response_total"], status_code="503", classification="failure") == 4
    assert _one(s["response_latency_ms_count"], **labels) == len(lat)
    assert _one(s["response_latency_ms_sum"], **labels) == pytest.approx(sum(lat), abs=1e-2)

    buckets = [(lb["le"], v) for lb, v in s["response_latency_ms_bucket"]]
    assert [le for le, _ in buckets] == [str(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    assert counts[-1] == len(lat)
    for le, v in buckets:
        bound = math.inf if le == "+Inf" else float(le)
        assert v == sum(1 for x in lat if x <= bound), le  # le is "less than or equal"

    tl = {"direction": "outbound", "peer": "dst", "client_id": "spiffe://td/ns/a/sa/b"}
    assert _one(s["tcp_open_total"], **tl) == 5
    assert _one(s["tcp_close_total"], **tl) == 2
    assert _one(s["tcp_open_connections"], **tl) == 3
    assert _one(s["tcp_read_bytes_total"], **tl) == 1000
    assert _one(s["tcp_write_bytes_total"], **tl) == 2000
    assert _one(s["errors_total"], reason="x") == 4
    assert s["plain_total"] == [({}, 1)]
    assert m.counter_value("errors_total", (("reason", "x"),)) == 4
    assert m.counter_value("missing_total") == 0
    assert _one(s["pool_idle"], ep="a") == 3
    assert _one(s["pool_idle"], ep="b") == 0.25


def test_count_equals_observations_per_label_set() -> None:
    m = Metrics()
    for i in range(50):
        m.http("outbound", f"svc{i % 5}", "false").response(200, i * 10.0)
    s = parse_prometheus(m.render())
    for i in range(5):
        assert _one(s["response_latency_ms_count"], authority=f"svc{i}") == 10
        inf = [v for lb, v in s["response_latency_ms_bucket"]
               if lb["authority"] == f"svc{i}" and lb["le"] == "+Inf"]
        assert inf == [10]


@pytest.mark.parametrize("value", ['a"b', "a\\b", "a\nb", 'evil"} 1\nx{y="', "\\n", "é☃"])
def test_label_values_are_escaped(value: str) -> None:
    m = Metrics()
    m.http("inbound", value, "true").requests += 1
    m.counter("c_total", "C.", (("v", value),))
    s = parse_prometheus(m.render())
    assert _one(s["request_total"], authority=value) == 1
    assert _one(s["c_total"], v=value) == 1


def test_large_gauge_values_keep_precision() -> None:
    m = Metrics()
    m.gauge("process_resident_memory_bytes", "RSS.", lambda: [((), 71_234_567)])
    s = parse_prometheus(m.render())
    assert s["process_resident_memory_bytes"] == [({}, 71_234_567)]


def test_help_text_is_escaped() -> None:
    m = Metrics()
    m.counter("c_total", "first line\nsecond \\ line")
    parse_prometheus(m.render())


def test_label_sets_bounded_with_overflow() -> None:
    m = Metrics()
    for i in range(MAX_LABEL_SETS + 500):
        m.http("inbound", f"host-{i}.example", "true").requests += 1
    # a known authority keeps its own set even after the limit
    m.http("inbound", "host-0.example", "true").requests += 1
    s = parse_prometheus(m.render())
    reqs = s["request_total"]
    assert len(reqs) <= MAX_LABEL_SETS + 1
    assert _one(reqs, authority="overflow") == 500
    assert _one(reqs, authority="host-0.example") == 2
    assert sum(v for _, v in reqs) == MAX_LABEL_SETS + 501
    # more hostile authorities do not add series
    for i in range(2000):
        m.http("outbound", f"x{i}", "false")
    assert len(parse_prometheus(m.render())["request_total"]) <= MAX_LABEL_SETS + 2
