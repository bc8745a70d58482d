"""Inbound authorization decisions (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from meshlet.policy.authz import Policy, PolicyError, Rule, authorize, parse_policy

WEB = "spiffe://td/ns/default/sa/web"
DB = "spiffe://td/ns/data/sa/db"
OTHER_TD = "spiffe://other/ns/default/sa/web"
LOCAL = ipaddress.ip_address("10.1.2.3")
REMOTE = ipaddress.ip_address("192.0.2.7")


@pytest.mark.parametrize("default, identity, allowed", [
    ("all-unauthenticated", None, True),
    ("all-unauthenticated", WEB, True),
    ("all-authenticated", None, False),
    ("all-authenticated", WEB, True),
    ("deny", WEB, False),
    ("deny", None, False),
])
def test_defaults(default: str, identity: str | None, allowed: bool) -> None:
    d = authorize(Policy("p", default), identity, LOCAL)
    assert d.allowed is allowed and d.reason == default


def test_rules_by_identity_namespace_trust_domain_and_network() -> None:
    p = parse_policy("p", {
        "default": "deny",
        "rules": [
            {"name": "exact", "identities": [WEB]},
            {"name": "data-ns", "identities": ["spiffe://td/ns/data/*"]},
            {"name": "other-td", "identities": ["spiffe://other/*"], "networks": ["10.0.0.0/8"]},
            {"name": "lan", "networks": ["192.0.2.0/24"]},
        ],
    })
    assert authorize(p, WEB, LOCAL).reason == "exact"
    assert authorize(p, DB, LOCAL).reason == "data-ns"
    assert authorize(p, OTHER_TD, LOCAL).reason == "other-td"
    # Identity and network must both match.
    assert authorize(p, OTHER_TD, ipaddress.ip_address("172.16.0.1")).allowed is False
    # A network-only rule admits plaintext clients from that network.
    assert authorize(p, None, REMOTE).reason == "lan"
    assert authorize(p, None, LOCAL).allowed is False
    assert authorize(p, "spiffe://td/ns/default/sa/api", LOCAL).allowed is False


def test_namespace_wildcard_does_not_match_a_prefix_namespace() -> None:
    r = Rule("r", ("spiffe://td/ns/data/*",))
    assert r.matches("spiffe://td/ns/data/sa/x", None)
    assert not r.matches("spiffe://td/ns/database/sa/x", None)


def test_star_means_any_mesh_identity() -> None:
    p = parse_policy("p", {"default": "deny", "rules": [{"identities": ["*"]}]})
    assert authorize(p, WEB, None).allowed
    assert not authorize(p, None, LOCAL).allowed


def test_invalid_policies_report_every_problem() -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy("p", {
            "default": "allow-all",
            "rules": [
                {"identities": ["web"], "networks": ["10.0.0.0/33"]},
                {"name": "empty"},
                {"identities": ["spiffe://td/ns/*/sa/x"], "bogus": 1},
            ],
        })
    errs = e.value.errors
    assert any(x.startswith("default:") for x in errs)
    assert any("rules[0].identities" in x for x in errs)
    assert any("rules[0].networks" in x for x in errs)
    assert any(x.startswith("rules[1]:") for x in errs)
    assert any("rules[2]: unknown" in x for x in errs)
    assert any("rules[2].identities" in x for x in errs)
