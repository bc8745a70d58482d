"""meshlet.proxy.balance: picking an endpoint of a service."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from meshlet.api.endpoints import Endpoint, EndpointSet
from meshlet.proxy.balance import Balancer, Fixed

A, B, C = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    state = random.getstate()
    random.seed(20240501)
    yield
    random.setstate(state)


def bal(*eps: Endpoint, opaque: bool = False, name: str = "web:80") -> Balancer:
    b = Balancer(name, False)
    b.update(EndpointSet(name, "7", eps, opaque=opaque), frozenset())
    return b


def test_empty_is_none() -> None:
    assert Balancer("web:80", False).pick() is None
    assert bal().pick() is None
    b = bal(A)
    b.update(None, frozenset())
    assert b.pick() is None
    assert b.endpoints() == ()
    assert b.version == ""


def test_all_weight_zero_is_none() -> None:
    assert bal(Endpoint("a", 1, 0), Endpoint("b", 1, 0)).pick() is None


def test_equal_weights_spread_evenly() -> None:
    b = bal(A, B, C)
    c = Counter(b.pick() for _ in range(9000))
    assert all(abs(c[e] - 3000) < 250 for e in (A, B, C)), c


def test_weights_honoured_statistically() -> None:
    heavy, light = Endpoint("h", 1, 3), Endpoint("l", 1, 1)
    b = bal(heavy, light)
    n = 10_000
    c = Counter(b.pick() for _ in range(n))
    assert abs(c[heavy] - 0.75 * n) < 300  # ~7 standard deviations
    assert c[heavy] + c[light] == n


def test_three_way_weights() -> None:
    eps = Endpoint("a", 1, 1), Endpoint("b", 1, 2), Endpoint("c", 1, 7)
    b = bal(*eps)
    n = 10_000
    c = Counter(b.pick() for _ in range(n))
    for ep in eps:
        assert abs(c[ep] - n * ep.weight / 10) < 350


def test_weight_zero_never_picked() -> None:
    drained = Endpoint("d", 1, 0)
    for eps in [(A, drained, B), (Endpoint("x", 1, 4), drained, Endpoint("y", 1, 1))]:
        b = bal(*eps)
        picks = {b.pick() for _ in range(2000)}
        assert drained not in picks
        assert picks == {e for e in eps if e.weight}
        assert drained in b.endpoints()  # still listed, just not picked


def test_exclude_round_robin() -> None:
    b = bal(A, B, C)
    for _ in range(20):
        assert b.pick(exclude=A) is not A
    assert bal(A).pick(exclude=A) is A  # the only one: better than nothing


def test_exclude_weighted() -> None:
    heavy, light = Endpoint("h", 1, 3), Endpoint("l", 1, 1)
    b = bal(heavy, light)
    picks = Counter(b.pick(exclude=heavy) for _ in range(1000))
    assert picks[heavy] == 0, picks


def test_update_replaces_whole_list_and_version() -> None:
    b = bal(A, B)
    assert b.version == "7"
    b.update(EndpointSet("web:80", "8", (C,)), frozenset())
    assert b.version == "8"
    assert {b.pick() for _ in range(5)} == {C}
    assert b.endpoints() == (C,)


def test_opaque_from_set_or_port() -> None:
    assert bal(A, opaque=True).opaque is True
    b = Balancer("db:5432", False)
    b.update(EndpointSet("db:5432", "1", (A,)), frozenset({5432}))
    assert b.opaque is True
    b.update(EndpointSet("db:5432", "2", (A,)), frozenset({80}))
    assert b.opaque is False


def test_fixed() -> None:
    f = Fixed("app", "127.0.0.1", 8080, False)
    ep = f.pick()
    assert ep == Endpoint("127.0.0.1", 8080)
    assert f.pick(exclude=ep) == ep
    assert f.endpoints() == (ep,)


def test_latency_aware_prefers_the_fast() -> None:
    b = bal(A, B, C)
    now = time.monotonic() - 0.5
    for _ in range(50):  # B is slow
        for e, rtt in ((A, 0.001), (B, 0.050), (C, 0.001)):
            s = b._states[e.key]
            s.pending += 1
            b.observe(s, rtt, now, False)
        now += 0.01
    c = Counter(b.pick() for _ in range(3000))
    assert c[B] == 0 and c[A] > 1000 and c[C] > 1000, c


def test_in_flight_penalty_spreads_load() -> None:
    b = bal(A, B)
    sa, sb = b._states[A.key], b._states[B.key]
    for s in (sa, sb):
        s.pending += 1
        b.observe(s, 0.001, time.monotonic(), False)
    sa.pending = 10  # A is busy: B wins every comparison
    assert {b.pick() for _ in range(50)} == {B}


def test_new_endpoints_are_tried_first() -> None:
    b = bal(A)
    s = b._states[A.key]
    s.pending += 1
    b.observe(s, 0.001, 1.0, False)
    b.update(EndpointSet("web:80", "8", (A, B)), frozenset())
    assert b._states[A.key] is s  # what was learnt about A is kept
    assert b.pick() == B  # never answered: costs nothing


def test_failure_accrual_ejects_and_probes() -> None:
    b = bal(A, B)
    s = b._states[B.key]
    for _ in range(Balancer.consecutive_failures - 1):
        b.failure(s)
    assert b.ejected == 0
    b.failure(s)
    assert b.ejected == 1
    assert {b.pick() for _ in range(100)} == {A}
    s.ejected_until = 1.0  # backoff over (monotonic time 1.0 is long past)
    assert B in {b.pick() for _ in range(100)}
    assert s.probing and b.ejected == 0
    b.failure(s)  # on probation: one failure is enough, for twice as long
    assert b.ejected == 1 and s.ejections == 2
    s.ejected_until = 1.0
    b.pick()
    s.pending += 1
    b.observe(s, 0.001, 5.0, False)  # the probe succeeded: fully back
    assert not s.probing and s.ejections == 0 and s.fails == 0


def test_never_below_min_ready() -> None:
    b = bal(A, B)
    for s in b.states():
        for _ in range(10):
            b.failure(s)
    assert b.ejected == 1  # one must stay in service
    assert b.pick() is not None


def test_tcp_connections_go_to_the_least_loaded() -> None:
    b = bal(A, B)
    for _ in range(3):
        b.opened(A)  # three open connections to A
    assert {b.pick() for _ in range(50)} == {B}
    s = b._states[B.key]
    for _ in range(Balancer.consecutive_failures):
        b.connect_failed(B)
    assert b.ejected == 1 and s.ejected_until > 0
