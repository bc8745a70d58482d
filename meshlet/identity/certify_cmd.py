"""`python -m meshlet.identity.certify_cmd`: get or renew a proxy's certificate, then exit.

The proxy runs this as a short-lived child process so that it never imports the
`cryptography` package (about 11 MB of resident memory per proxy); the child makes the
key, sends only the CSR, and writes key, chain and bundle (mode 0600, write-then-rename)
into the proxy's private directory. It prints one JSON line: {"not_before", "not_after"}
in unix seconds, or {"error": "..."} with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from meshlet.identity.ca import parse_chain
from meshlet.identity.client import CertifyError, certify
from meshlet.identity.spiffe import parse_identity


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


async def _run(args: argparse.Namespace) -> dict[str, float]:
    host, _, port = args.control.rpartition(":")
    anchors = Path(args.anchors).read_bytes()
    identity = parse_identity(args.identity)
    d = Path(args.dir)
    token = None
    ctx = None
    if args.renew:
        ctx = ssl.create_default_context(cadata=anchors.decode())
        ctx.load_cert_chain(d / "chain.pem", d / "key.pem")
    else:
        token = Path(args.token_file).read_text().strip()
    got = await certify(host.strip("[]"), int(port), anchors, identity, token, ctx)
    _write(d / "key.pem", got.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _write(d / "chain.pem", got.chain_pem)
    _write(d / "bundle.pem", got.bundle_pem)
    leaf = parse_chain(got.chain_pem)[0]
    return {"not_before": leaf.not_valid_before_utc.timestamp(),
            "not_after": leaf.not_valid_after_utc.timestamp()}


def main() -> int:
    p = argparse.ArgumentParser(prog="meshlet.identity.certify_cmd")
    p.add_argument("--control", required=True)
    p.add_argument("--anchors", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--token-file")
    p.add_argument("--renew", action="store_true")
    args = p.parse_args()
    try:
        out = asyncio.run(_run(args))
    except (CertifyError, OSError, ValueError, ssl.SSLError) as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
