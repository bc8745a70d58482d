"""The proxy's side of identity: make a key, ask the control plane to certify it.

The private key is made here and never leaves the process: only the CSR is sent, over
TLS 1.3 to a control plane whose certificate must chain to the mesh's trust anchors.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from meshlet.identity.ca import make_csr, new_key
from meshlet.identity.spiffe import Identity
from meshlet.proto.http1 import LocalProtocolError, parse_response

__all__ = ["Certified", "CertifyError", "certify"]


class CertifyError(Exception):
    """The control plane refused, or could not be reached; the message says which."""


@dataclass(frozen=True, slots=True)
class Certified:
    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes  # leaf first, then the issuer
    bundle_pem: bytes  # trust anchors
    not_after: str


async def certify(
    host: str,
    port: int,
    trust_anchors_pem: bytes,
    identity: Identity,
    token: str | None = None,
    client_ctx: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> Certified:
    """Get a certificate for `identity`, proving the right to it with `token` (or, to
    renew, with the mesh certificate already loaded in `client_ctx`)."""
    key = new_key()
    body = json.dumps({"csr": make_csr(key, identity).decode(), "token": token}).encode()
    ctx = client_ctx or ssl.create_default_context(cadata=trust_anchors_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    head = (f"POST /v1/certify HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), timeout)
        writer.write(head + body)
        raw = await asyncio.wait_for(_read_all(reader, 1 << 20), timeout)
        writer.close()
    except (OSError, ssl.SSLError, TimeoutError) as e:
        raise CertifyError(f"control plane {host}:{port} unreachable: {e}") from e
    try:
        resp = parse_response(raw, b"POST")
    except LocalProtocolError as e:
        raise CertifyError(f"bad response from the control plane: {e.reason}") from None
    if resp is None:
        raise CertifyError("truncated response from the control plane")
    try:
        payload = json.loads(raw[resp.end:])
    except ValueError:
        raise CertifyError("control plane answered with invalid JSON") from None
    if resp.status != 200:
        raise CertifyError(f"control plane refused ({resp.status}): {payload.get('error')}")
    return Certified(key, payload["chain"].encode(), payload["bundle"].encode(),
                     payload["not_after"])


async def _read_all(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Everything until the server closes (it answers `connection: close`), bounded."""
    out = b""
    while chunk := await reader.read(65536):
        out += chunk
        if len(out) > limit:
            raise CertifyError("response from the control plane is too large")
    return out
