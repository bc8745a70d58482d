"""Workload identities: SPIFFE IDs of the form spiffe://<trust-domain>/ns/<ns>/sa/<account>.

Pure functions, no I/O. A trust domain is a DNS-like name; namespace and account follow
Kubernetes naming (lower-case alphanumerics and '-', at most 63 characters).
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["Identity", "parse_identity"]

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    trust_domain: str
    namespace: str
    account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN_RE.fullmatch(self.trust_domain):
            raise ValueError(f"invalid trust domain {self.trust_domain!r}")
        for what, v in (("namespace", self.namespace), ("account", self.account)):
            if not _NAME_RE.fullmatch(v):
                raise ValueError(f"invalid {what} {v!r} (lower-case letters, digits, '-')")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.account}"

    def __str__(self) -> str:
        return self.uri


def parse_identity(uri: str) -> Identity:
    """Parse a mesh SPIFFE ID; ValueError if it is not one."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise ValueError(f"not a SPIFFE ID: {uri!r}")
    td, _, path = uri[len(prefix):].partition("/")
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise ValueError(f"not a mesh workload identity (…/ns/N/sa/A): {uri!r}")
    return Identity(td, parts[1], parts[3])
