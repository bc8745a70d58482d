"""meshlet.cli.stat: Prometheus text parsing, histogram quantiles as Prometheus computes
them, rates from two scrapes (summed over replicas), the table, and the state file."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.cli.stat import (
    Endpoint,
    Samples,
    Scrape,
    StateError,
    aggregate,
    counter_deltas,
    histogram_quantile,
    load_state,
    parse_prometheus,
    pid_alive,
    render_table,
)
from meshlet.metrics.registry import LATENCY_BUCKETS_MS, Metrics

INF = math.inf

# --- parsing ---------------------------------------------------------------------------


def test_parse_registry_output_with_hostile_label_values() -> None:
    m = Metrics()
    nasty = 'a"b\\c\nd,e}f{g="h"'
    st_ = m.http("inbound", nasty, "true", "spiffe://td/ns/a/sa/b")
    st_.requests = 3
    st_.response(200, 4.5)
    st_.response(503, 12)
    st_.response(200, 70000)
    s = parse_prometheus(m.render())
    base = (("authority", nasty), ("client_id", "spiffe://td/ns/a/sa/b"),
            ("direction", "inbound"), ("tls", "true"))
    assert s[("request_total", base)] == 3
    assert s[("response_total", tuple(sorted(
        (*base, ("status_code", "503"), ("classification", "failure")))))] == 1
    assert s[("response_latency_ms_bucket", tuple(sorted((*base, ("le", "5")))))] == 1
    assert s[("response_latency_ms_bucket", tuple(sorted((*base, ("le", "50000")))))] == 2
    assert s[("response_latency_ms_bucket", tuple(sorted((*base, ("le", "+Inf")))))] == 3
    assert s[("response_latency_ms_count", base)] == 3


def test_parse_format_details() -> None:
    text = (
        "# HELP x_total Help with } and \" in it.\n"
        "# TYPE x_total counter\n"
        "\n"
        "x_total 7\n"
        'x_total{ a = "1" , b="2",} 8 1700000000000\n'
        'up{job="p"} +Inf\n'
        "ratio -Inf\n"
        "nan_metric NaN\n"
        "sci 1.5e3\n"
    )
    s = parse_prometheus(text)
    assert s[("x_total", ())] == 7
    assert s[("x_total", (("a", "1"), ("b", "2")))] == 8  # timestamp ignored
    assert s[("up", (("job", "p"),))] == INF
    assert s[("ratio", ())] == -INF
    assert math.isnan(s[("nan_metric", ())])
    assert s[("sci", ())] == 1500


@pytest.mark.parametrize("line", [
    "x_total",  # no value
    "x_total abc",
    'x_total{a="1"',  # unterminated labels
    'x_total{a="1} 3',  # unterminated value
    "x_total{a=1} 3",  # unquoted value
    'x_total{a="1"b="2"} 3',  # no comma
    "9lives 1",
    'x_total{a="1"}3',  # no space before the value
    "x_total 1 2 3",
])
def test_parse_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError, match=r"x_total|9lives"):
        parse_prometheus(f"ok 1\n{line}\n")


# --- histogram_quantile ----------------------------------------------------------------


def test_quantile_interpolates_like_prometheus() -> None:
    # 10 observations in (1, 2]: the median is halfway through that bucket.
    assert histogram_quantile(0.5, {1: 0, 2: 10, INF: 10}) == pytest.approx(1.5)
    # The first bucket starts at 0.
    assert histogram_quantile(0.5, {10: 4, 20: 4, INF: 4}) == pytest.approx(5.0)
    # Rank 9 of 10 falls into (10, 20]: 10 + 10 * (9 - 4) / 6.
    assert histogram_quantile(0.9, {10: 4, 20: 10, INF: 10}) == pytest.approx(
        10 + 10 * 5 / 6)
    # Into +Inf: the highest finite bound.
    assert histogram_quantile(0.99, {1: 0, 2: 5, INF: 10}) == 2
    # Exactly at a bucket's cumulative count: that bucket's upper bound.
    assert histogram_quantile(0.5, {1: 5, 2: 10, INF: 10}) == pytest.approx(1.0)
    # Bucket order in the mapping does not matter; q=0 is the lowest bound's start.
    assert histogram_quantile(0.0, {INF: 3, 5: 3, 1: 0}) == pytest.approx(1.0)


def test_quantile_edge_cases() -> None:
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1: 0, INF: 0}) is None  # no observations
    assert histogram_quantile(0.5, {1: 3, 2: 3}) is None  # no +Inf bucket
    assert histogram_quantile(1.5, {1: 3, INF: 3}) == INF
    assert histogram_quantile(-0.5, {1: 3, INF: 3}) == -INF
    # Non-monotonic counts (a retracted observation) are made monotonic first.
    assert histogram_quantile(0.5, {1: 6, 2: 4, INF: 10}) == pytest.approx(
        histogram_quantile(0.5, {1: 6, 2: 6, INF: 10}))


def test_quantile_of_real_registry_histogram() -> None:
    m = Metrics()
    h = m.http("inbound", "a", "true")
    for x in [0.5] * 10 + [7.0] * 80 + [150.0] * 10:
        h.response(200, x)
    buckets = {float(v.get("le", "nan").replace("+Inf", "inf")): n
               for (name, labels), n in parse_prometheus(m.render()).items()
               if name == "response_latency_ms_bucket" for v in [dict(labels)]}
    assert set(buckets) == {*map(float, LATENCY_BUCKETS_MS), INF}
    p50 = histogram_quantile(0.5, buckets)
    p99 = histogram_quantile(0.99, buckets)
    assert p50 is not None and 5 < p50 <= 10
    assert p99 is not None and 100 < p99 <= 200


@given(st.lists(st.integers(0, 50), min_size=2, max_size=8),
       st.lists(st.floats(0, 1), min_size=2, max_size=5))
def test_quantile_is_monotonic_and_bounded(counts: list[int], qs: list[float]) -> None:
    bounds = [float(2 ** i) for i in range(len(counts) - 1)] + [INF]
    cum, total = [], 0
    for c in counts:
        total += c
        cum.append(total)
    buckets = dict(zip(bounds, cum, strict=True))
    if total == 0:
        assert histogram_quantile(0.5, buckets) is None
        return
    vals = [histogram_quantile(q, buckets) for q in sorted(qs)]
    assert all(v is not None and 0 <= v <= bounds[-2] for v in vals)
    assert vals == sorted(vals)  # type: ignore[type-var]


# --- deltas and rows -----------------------------------------------------------------------


def test_counter_deltas_growth_new_series_and_reset() -> None:
    a: Samples = {("c", (("x", "1"),)): 10.0, ("c", (("x", "2"),)): 50.0, ("gone", ()): 1.0}
    b: Samples = {("c", (("x", "1"),)): 15.0, ("c", (("x", "2"),)): 4.0, ("c", (("x", "3"),)): 2.0}
    assert counter_deltas(a, b) == {
        ("c", (("x", "1"),)): 5.0,  # grew
        ("c", (("x", "2"),)): 4.0,  # went down: restarted, counts from zero
        ("c", (("x", "3"),)): 2.0,  # new
    }


def _text(traffic: list[tuple[str, str, str, int, float]]) -> str:
    """A registry after (direction, authority, tls, status, latency) requests."""
    m = Metrics()
    for direction, authority, tls, status, lat in traffic:
        s = m.http(direction, authority, tls)
        s.requests += 1
        s.response(status, lat)
    return m.render()


def _scrape(ep: Endpoint, at: float, traffic: list[tuple[str, str, str, int, float]]
            ) -> Scrape:
    return Scrape(ep, at, samples=parse_prometheus(_text(traffic)))


WEB0 = Endpoint("web", "127.0.0.1:1", name="web replica 0", inbound="127.0.0.1:11")
WEB1 = Endpoint("web", "127.0.0.1:2", name="web replica 1", inbound="127.0.0.1:12")
CLIENT = Endpoint("client", "127.0.0.1:3", name="client replica 0")
DB = Endpoint("db", "127.0.0.1:4", name="db replica 0", inbound="127.0.0.1:14")


def test_rates_from_two_scrapes_summed_over_replicas() -> None:
    old = [("inbound", "web", "true", 200, 3.0)] * 100  # before the window: not counted
    w0 = old + [("inbound", "web", "true", 200, 3.0)] * 20 + \
        [("inbound", "web", "true", 500, 30.0)] * 5
    w1 = [("inbound", "web:80", "true", 200, 3.0)] * 15 + \
        [("inbound", "web:80", "no_tls_from_client", 200, 3.0)] * 10
    cl_old = [("outbound", "web:80", "true", 200, 4.0)] * 7
    cl = cl_old + [("outbound", "web:80", "true", 200, 4.0)] * 40 + \
        [("outbound", "db:5432", "no_identity", 200, 1.0)] * 2
    first = [_scrape(WEB0, 100.0, old), _scrape(WEB1, 100.0, []),
             _scrape(CLIENT, 100.0, cl_old), _scrape(DB, 100.0, [])]
    second = [_scrape(WEB0, 102.0, w0), _scrape(WEB1, 101.0, w1),
              _scrape(CLIENT, 102.0, cl), _scrape(DB, 102.0, [])]
    rows, warnings = aggregate(first, second)
    assert warnings == []
    by = {(r.service, r.direction, r.peer): r.to_json() for r in rows}
    assert list(by) == [("client", "outbound", "db:5432"), ("client", "outbound", "web:80"),
                        ("db", "inbound", "-"), ("web", "inbound", "-")]
    web = by[("web", "inbound", "-")]
    # Replica 0: 25 requests in 2 s; replica 1: 25 in 1 s (its own elapsed time).
    assert web["requests"] == 50
    assert web["rps"] == pytest.approx(12.5 + 25.0)
    assert web["success_pct"] == pytest.approx(100 * 45 / 50)
    assert web["tls_pct"] == pytest.approx(100 * 40 / 50)
    assert web["proxies"] == 2
    assert web["peer"] is None
    # 45 of 50 in (2, 3], 5 in (20, 30]: p50 inside (2, 3]; p99 inside (20, 30].
    assert 2 < web["p50_ms"] <= 3
    assert 20 < web["p99_ms"] <= 30
    assert web["p50_ms"] <= web["p95_ms"] <= web["p99_ms"]
    out = by[("client", "outbound", "web:80")]
    assert (out["requests"], out["rps"], out["success_pct"], out["tls_pct"]) == (
        40, 20.0, 100.0, 100.0)
    assert 3 < out["p50_ms"] <= 4
    assert by[("client", "outbound", "db:5432")]["tls_pct"] == 0.0
    # db serves but had no traffic: a row, with nothing to say.
    idle = by[("db", "inbound", "-")]
    assert (idle["rps"], idle["success_pct"], idle["p50_ms"], idle["tls_pct"]) == (
        None, None, None, None)
    table = render_table(rows, warnings).splitlines()
    assert table[0].split() == ["SERVICE", "DIRECTION", "PEER", "SUCCESS", "RPS", "P50",
                                "P95", "P99", "TLS"]
    assert table[3].split() == ["db", "inbound", "-", "-", "-", "-", "-", "-", "-"]
    cells = table[4].split()
    assert cells[:5] == ["web", "inbound", "-", "90.00%", "37.50"] and cells[-1] == "80.00%"


def test_unreachable_endpoint_is_a_warning_and_a_restart_counts_from_zero() -> None:
    traffic = [("inbound", "web", "true", 200, 1.0)] * 30
    first = [_scrape(WEB0, 0.0, traffic), Scrape(WEB1, 0.0, error="unreachable: refused")]
    second = [_scrape(WEB0, 1.0, traffic[:6]), _scrape(WEB1, 1.0, traffic)]
    rows, warnings = aggregate(first, second)
    assert warnings == ["web replica 1 (admin 127.0.0.1:2): unreachable: refused"]
    (row,) = rows
    assert row.to_json()["requests"] == 6  # replica 0 restarted: 30 -> 6 means 6 new
    assert row.sources == {"127.0.0.1:1"}
    text = render_table(rows, warnings)
    assert text.rstrip().endswith("warning: web replica 1 (admin 127.0.0.1:2): "
                                  "unreachable: refused")


def test_empty_table_says_so() -> None:
    assert "(no traffic recorded yet)" in render_table([], [])


# --- state file and pids ---------------------------------------------------------------------


def _state(tmp: Path, doc: object) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "up.json").write_text(json.dumps(doc))
    return str(tmp)


GOOD = {
    "version": 1, "pid": 99, "mesh_file": "/m.yaml", "state_dir": "/s",
    "trust_domain": "cluster.local",
    "control": {"addr": "127.0.0.1:9443", "anchors": "/s/root.crt", "pid": 123},
    "replicas": [
        {"service": "reviews", "namespace": "default", "replica": 0,
         "identity": "spiffe://cluster.local/ns/default/sa/reviews",
         "app_addr": "127.0.0.1:5001", "inbound": "127.0.0.1:5002",
         "admin": "127.0.0.1:5003", "http_proxy": "127.0.0.1:5004",
         "app_pid": 1, "proxy_pid": 2},
        {"service": "loadgen", "namespace": "shop", "replica": 0,
         "identity": "spiffe://cluster.local/ns/shop/sa/loadgen",
         "app_addr": None, "inbound": None, "admin": "127.0.0.1:5013",
         "http_proxy": "127.0.0.1:5014", "app_pid": 11, "proxy_pid": None}],
    "ingress": [{"service": "frontend", "listen": "127.0.0.1:8080",
                 "admin": "127.0.0.1:5023", "proxy_pid": 3}],
}


def test_load_state(tmp_path: Path) -> None:
    s = load_state(_state(tmp_path, GOOD))
    assert (s.control_addr, s.anchors, s.control_pid) == ("127.0.0.1:9443", "/s/root.crt", 123)
    assert s.up_pid == 99
    rev, lg, ing = s.endpoints
    assert (rev.service, rev.admin, rev.inbound, rev.pids) == (
        "reviews", "127.0.0.1:5003", "127.0.0.1:5002", (("proxy", 2), ("app", 1)))
    assert (lg.service, lg.inbound, lg.app_addr, lg.pids) == ("loadgen.shop", None, None,
                                                              (("app", 11),))
    assert (ing.service, ing.kind, ing.pids) == ("ingress/frontend", "ingress",
                                                 (("proxy", 3),))


@pytest.mark.parametrize(("doc", "message"), [
    (None, "no state file"),
    ("not json", "not valid JSON"),
    ({**GOOD, "version": 2}, "unsupported version 2"),
    ({**GOOD, "replicas": [{"service": "x"}]}, r"replicas\[0\]\.admin: missing"),
    ({**GOOD, "replicas": [{**GOOD["replicas"][0], "app_pid": "1"}]},  # type: ignore[index]
     r"replicas\[0\]\.app_pid: expected a process id"),
    ({**GOOD, "ingress": {}}, "expected lists"),
])
def test_load_state_errors(tmp_path: Path, doc: object, message: str) -> None:
    if doc is not None:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "up.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(StateError, match=message) as e:
        load_state(str(tmp_path))
    assert str(tmp_path / "up.json") in str(e.value)


def test_pid_alive() -> None:
    import os

    assert pid_alive(os.getpid())
    p = subprocess.Popen(["true"])
    p.wait()
    assert not pid_alive(p.pid)
