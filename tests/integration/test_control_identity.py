"""The control plane's identity service, with a real `meshlet control` process, real TLS,
curl and the proxy's own certify client."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import TD, Control

from meshlet.identity.ca import make_csr, new_key, parse_chain, uri_sans
from meshlet.identity.client import CertifyError, certify
from meshlet.identity.spiffe import Identity


def test_certify_with_a_join_token(control: Control) -> None:
    web = Identity(TD, "default", "web")
    got = asyncio.run(certify("127.0.0.1", control.port, control.anchors, web,
                              control.token("default", "web")))
    leaf, issuer = parse_chain(got.chain_pem)
    assert uri_sans(leaf) == [web.uri]
    assert leaf.public_key() == got.key.public_key()
    root = x509.load_pem_x509_certificate(got.bundle_pem)
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(root)
    assert got.bundle_pem == control.anchors


def test_csr_for_another_identity_is_refused(control: Control) -> None:
    token = control.token("default", "web")
    with pytest.raises(CertifyError, match="403"):
        asyncio.run(certify("127.0.0.1", control.port, control.anchors,
                            Identity(TD, "kube-system", "admin"), token))


def test_expired_and_forged_tokens_are_refused(control: Control, tmp_path: Path) -> None:
    web = Identity(TD, "default", "web")
    with pytest.raises(CertifyError, match="401"):
        asyncio.run(certify("127.0.0.1", control.port, control.anchors, web, "mjt1.a.b"))
    # A token from another control plane (another secret) is worthless here.
    other = Control(tmp_path / "other", control.port, control.proc)
    with pytest.raises(CertifyError, match="401"):
        asyncio.run(certify("127.0.0.1", control.port, control.anchors, web,
                            other.token("default", "web")))
    with pytest.raises(CertifyError, match="401"):
        asyncio.run(certify("127.0.0.1", control.port, control.anchors, web, None))


def test_renewal_with_the_current_certificate(control: Control, tmp_path: Path) -> None:
    web = Identity(TD, "default", "web")
    first = asyncio.run(certify("127.0.0.1", control.port, control.anchors, web,
                                control.token("default", "web")))
    crt, key = tmp_path / "web.crt", tmp_path / "web.key"
    crt.write_bytes(first.chain_pem)
    key.write_bytes(first.key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    ctx = ssl.create_default_context(cadata=control.anchors.decode())
    ctx.load_cert_chain(crt, key)
    second = asyncio.run(certify("127.0.0.1", control.port, control.anchors, web, None, ctx))
    assert parse_chain(second.chain_pem)[0].serial_number != \
        parse_chain(first.chain_pem)[0].serial_number
    # The certificate proves only its own identity.
    with pytest.raises(CertifyError, match="403"):
        asyncio.run(certify("127.0.0.1", control.port, control.anchors,
                            Identity(TD, "default", "db"), None, ctx))


def _recording_tls_relay(control: Control, tmp_path: Path) -> tuple[int, list[bytes]]:
    """A TLS server with a certificate from the mesh CA that records the plaintext it
    receives and relays it to the control plane: what a client sends, in the clear."""
    from meshlet.identity.ca import CertificateAuthority, bundle_pem

    ca = CertificateAuthority.load(TD, control.state / "ca")
    skey, chain = ca.server_chain(Identity(TD, "meshlet", "control"), [], ["127.0.0.1"])
    (tmp_path / "r.crt").write_bytes(bundle_pem(chain))
    (tmp_path / "r.key").write_bytes(skey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "r.crt", tmp_path / "r.key")
    cctx = ssl.create_default_context(cadata=control.anchors.decode())
    lsock = socket.create_server(("127.0.0.1", 0))
    recorded: list[bytes] = []

    def serve() -> None:
        with lsock:
            conn, _ = lsock.accept()
            with sctx.wrap_socket(conn, server_side=True) as tconn, cctx.wrap_socket(
                socket.create_connection(("127.0.0.1", control.port)),
                server_hostname="127.0.0.1",
            ) as up:
                tconn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data or len(data) < _wanted(data):
                    chunk = tconn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                recorded.append(data)
                up.sendall(data)
                while chunk := up.recv(65536):
                    tconn.sendall(chunk)

    threading.Thread(target=serve, daemon=True).start()
    return lsock.getsockname()[1], recorded


def _wanted(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(head) + 4


def test_no_private_key_crosses_the_wire(control: Control, tmp_path: Path) -> None:
    port, recorded = _recording_tls_relay(control, tmp_path)
    web = Identity(TD, "default", "web")
    got = asyncio.run(certify("127.0.0.1", port, control.anchors, web,
                              control.token("default", "web")))
    assert len(recorded) == 1
    sent = recorded[0]
    assert b"BEGIN CERTIFICATE REQUEST" in sent
    key_der = got.key.private_bytes(serialization.Encoding.DER,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    scalar = got.key.private_numbers().private_value.to_bytes(32, "big")
    assert b"PRIVATE KEY" not in sent
    body = json.loads(sent.partition(b"\r\n\r\n")[2])
    assert set(body) == {"csr", "token"}
    for blob in (key_der, scalar):
        assert blob not in sent
        assert blob.hex().encode() not in sent


def test_curl_and_tls13_only(control: Control, tmp_path: Path) -> None:
    anchors = tmp_path / "root.crt"
    anchors.write_bytes(control.anchors)
    body = tmp_path / "req.json"
    body.write_text(json.dumps({
        "csr": make_csr(new_key(), Identity(TD, "default", "web")).decode(),
        "token": control.token("default", "web"),
    }))
    url = f"https://127.0.0.1:{control.port}/v1/certify"
    out = subprocess.run(["curl", "-sS", "--cacert", str(anchors), "--data-binary",
                          f"@{body}", url], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "BEGIN CERTIFICATE" in json.loads(out.stdout)["chain"]
    old = subprocess.run(["curl", "-sS", "--cacert", str(anchors), "--tls-max", "1.2",
                          url], capture_output=True, timeout=30)
    assert old.returncode != 0  # TLS 1.2 handshakes are refused
    unverified = subprocess.run(["curl", "-sS", url], capture_output=True, timeout=30)
    assert unverified.returncode == 60  # not a publicly trusted certificate


def test_token_create_rejects_bad_names(control: Control) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshlet", "control", "token", "create",
         "--namespace", "Bad_NS", "--account", "web"],
        env=control.env(), capture_output=True, timeout=30)
    assert out.returncode == 64
    assert b"namespace" in out.stderr
