"""Inbound authorization: pure decisions, no I/O.

A `Policy` applies to one inbound port. Its rules are allow-lists; the first rule that
matches allows. A rule matches when the client's identity matches one of its identity
patterns (if it lists any) and the client's address is in one of its networks (if it
lists any). When no rule matches, the default decides:

- `all-unauthenticated`: allow everyone (plaintext clients included);
- `all-authenticated`: allow any client with a verified mesh identity;
- `deny`: allow nobody.

Identity patterns: an exact SPIFFE ID; `spiffe://<td>/ns/<ns>/*` (a namespace);
`spiffe://<td>/*` (a trust domain); `*` (any mesh identity).
A decision depends only on the connection (identity, address), so callers make it once
per connection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ipaddress is loaded only when a policy names networks
    import ipaddress

    IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["DEFAULTS", "Decision", "Policy", "PolicyError", "Rule", "authorize", "parse_policy"]

DEFAULTS = ("all-unauthenticated", "all-authenticated", "deny")


class PolicyError(ValueError):
    """A policy description is invalid; `errors` holds `field: reason` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    name: str
    identities: tuple[str, ...] = ()  # patterns; empty: any client, meshed or not
    networks: tuple[IPNetwork, ...] = ()  # empty: any address

    def matches(self, identity: str | None, addr: IPAddress | None) -> bool:
        if self.identities and (identity is None or not any(
                _identity_matches(p, identity) for p in self.identities)):
            return False
        return not self.networks or (addr is not None and any(
            addr in n for n in self.networks))


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    name: str
    default: str = "all-unauthenticated"
    rules: tuple[Rule, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # the rule that allowed, or the default that decided


def _identity_matches(pattern: str, identity: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return identity.startswith(pattern[:-1])
    return identity == pattern


def authorize(policy: Policy, identity: str | None, addr: IPAddress | None) -> Decision:
    for rule in policy.rules:
        if rule.matches(identity, addr):
            return Decision(True, rule.name)
    d = policy.default
    if d == "all-unauthenticated":
        return Decision(True, d)
    if d == "all-authenticated":
        return Decision(identity is not None, d)
    return Decision(False, d)


def _check_pattern(p: str) -> str | None:
    """Why `p` is not a valid identity pattern, or None."""
    from meshlet.identity.spiffe import parse_identity

    if p == "*":
        return None
    if p.endswith("/*"):
        # Validate the fixed part by completing it into a full identity.
        parts = p[len("spiffe://"):-2].split("/") if p.startswith("spiffe://") else []
        probe = {1: f"{p[:-2]}/ns/x/sa/x", 3: f"{p[:-2]}/sa/x"}.get(len(parts))
        if probe is None or (len(parts) == 3 and parts[1] != "ns"):
            return f"wildcard {p!r}: use spiffe://TD/* or spiffe://TD/ns/NS/*"
        p = probe
    try:
        parse_identity(p)
    except ValueError as e:
        return str(e)
    return None


def parse_policy(name: str, spec: Mapping[str, Any]) -> Policy:
    """Build a policy from its mesh-file form:
    {default: all-authenticated, rules: [{name, identities: [...], networks: [...]}]}"""
    errors: list[str] = []
    default = spec.get("default", "all-unauthenticated")
    if default not in DEFAULTS:
        errors.append(f"default: must be one of {', '.join(DEFAULTS)}, got {default!r}")
    rules = []
    raw_rules = spec.get("rules", []) or []
    if not isinstance(raw_rules, list):
        errors.append("rules: expected a list")
        raw_rules = []
    for i, r in enumerate(raw_rules):
        field = f"rules[{i}]"
        if not isinstance(r, Mapping):
            errors.append(f"{field}: expected a mapping")
            continue
        unknown = set(r) - {"name", "identities", "networks"}
        if unknown:
            errors.append(f"{field}: unknown field(s) {', '.join(sorted(unknown))}")
        ids = tuple(str(x) for x in r.get("identities", []) or [])
        for p in ids:
            problem = _check_pattern(p)
            if problem:
                errors.append(f"{field}.identities: {problem}")
        nets: list[IPNetwork] = []
        for n in r.get("networks", []) or []:
            try:
                import ipaddress

                nets.append(ipaddress.ip_network(str(n), strict=False))
            except ValueError:
                errors.append(f"{field}.networks: invalid CIDR {n!r}")
        if not ids and not nets:
            errors.append(f"{field}: needs identities or networks (else it allows all)")
        rules.append(Rule(str(r.get("name", f"rule-{i}")), ids, tuple(nets)))
    if errors:
        raise PolicyError(errors)
    return Policy(name, default, tuple(rules))
