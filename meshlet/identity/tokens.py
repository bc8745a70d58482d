"""Join tokens: the bootstrap credential of a workload outside Kubernetes.

A token names the one identity it may claim and when it expires, and is signed by the
control plane (HMAC-SHA256 with a secret that never leaves it). Form:
`mjt1.<base64url(JSON claims)>.<base64url(MAC)>`. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from meshlet.identity.spiffe import Identity

__all__ = ["TokenError", "create_token", "new_secret", "verify_token"]

_PREFIX = "mjt1"


class TokenError(Exception):
    """The token is not valid; the message says why."""


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, msg: bytes) -> hmac.HMAC:
    h = hmac.HMAC(secret, hashes.SHA256())
    h.update(msg)
    return h


def create_token(secret: bytes, identity: Identity, ttl_s: float, now: float | None = None
                 ) -> str:
    now = time.time() if now is None else now
    claims = {
        "td": identity.trust_domain,
        "ns": identity.namespace,
        "sa": identity.account,
        "exp": int(now + ttl_s),
        "jti": secrets.token_hex(8),
    }
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{_PREFIX}.{body}".encode()
    return f"{_PREFIX}.{body}.{_b64(_mac(secret, signed).finalize())}"


def verify_token(secret: bytes, token: str, now: float | None = None) -> Identity:
    """The identity the token allows; TokenError if it is forged, malformed or expired."""
    now = time.time() if now is None else now
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != _PREFIX:
        raise TokenError("malformed token")
    try:
        mac = _unb64(parts[2])
        _mac(secret, f"{parts[0]}.{parts[1]}".encode()).verify(mac)
    except (InvalidSignature, binascii.Error, ValueError):
        raise TokenError("token signature is invalid") from None
    try:
        claims = json.loads(_unb64(parts[1]))
        identity = Identity(str(claims["td"]), str(claims["ns"]), str(claims["sa"]))
        exp = int(claims["exp"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise TokenError("malformed token claims") from None
    if now >= exp:
        raise TokenError("token expired")
    return identity
