"""meshlet.proxy.balance: picking an endpoint of a service."""

from __future__ import annotations

import random
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
