"""Identity: SPIFFE IDs, the CA (files, CSR signing) and join tokens. No sockets."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshlet.identity.ca import CertificateAuthority, CsrRefused, make_csr, new_key, uri_sans
from meshlet.identity.spiffe import Identity, parse_identity
from meshlet.identity.tokens import TokenError, create_token, new_secret, verify_token

TD = "cluster.local"
WEB = Identity(TD, "default", "web")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


# --- SPIFFE IDs ------------------------------------------------------------------------


def test_identity_round_trip() -> None:
    assert WEB.uri == "spiffe://cluster.local/ns/default/sa/web"
    assert parse_identity(WEB.uri) == WEB


@pytest.mark.parametrize("uri", [
    "https://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a", "spiffe://td/ns/A/sa/b",
    "spiffe://td/ns/a/sa/b/c", "spiffe://td/sa/a/ns/b", "spiffe:///ns/a/sa/b",
    "spiffe://td/ns/-a/sa/b", "spiffe://td/ns/a_b/sa/c",
])
def test_invalid_identities(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_identity(uri)


# --- the CA ----------------------------------------------------------------------------


def test_create_writes_files_with_private_keys_0600(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    created = CertificateAuthority.create(TD, d)
    for name, mode in (("root.key", 0o600), ("issuer.key", 0o600), ("root.crt", 0o644),
                       ("issuer.crt", 0o644)):
        assert stat.S_IMODE((d / name).stat().st_mode) == mode, name
    loaded = CertificateAuthority.load(TD, d)
    assert loaded.issuer == created.issuer
    assert loaded.roots == created.roots
    # load_or_create keeps what exists
    assert CertificateAuthority.load_or_create(TD, d).issuer == created.issuer


def test_load_refuses_an_issuer_from_another_root(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    CertificateAuthority.create(TD, a)
    CertificateAuthority.create(TD, b)
    (a / "issuer.crt").write_bytes((b / "issuer.crt").read_bytes())
    (a / "issuer.key").write_bytes((b / "issuer.key").read_bytes())
    with pytest.raises(ValueError, match="not signed by any root"):
        CertificateAuthority.load(TD, a)


def test_load_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    CertificateAuthority.create(TD, a)
    CertificateAuthority.create(TD, b)
    (a / "issuer.key").write_bytes((b / "issuer.key").read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        CertificateAuthority.load(TD, a)


def test_signed_workload_certificate(ca: CertificateAuthority) -> None:
    key = new_key()
    leaf, issuer = ca.sign_csr(make_csr(key, WEB), WEB, dt.timedelta(hours=24))
    assert issuer == ca.issuer
    leaf.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(ca.roots[0])
    assert uri_sans(leaf) == [WEB.uri]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert leaf.public_key() == key.public_key()
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=23) < life <= dt.timedelta(hours=24, minutes=1)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)


def test_lifetime_is_configurable(ca: CertificateAuthority) -> None:
    leaf, _ = ca.sign_csr(make_csr(new_key(), WEB), WEB, dt.timedelta(minutes=10))
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert life <= dt.timedelta(minutes=11)


def test_csr_for_another_identity_is_refused(ca: CertificateAuthority) -> None:
    other = Identity(TD, "default", "db")
    with pytest.raises(CsrRefused, match="allowed"):
        ca.sign_csr(make_csr(new_key(), other), WEB)


def test_csr_with_two_identities_is_refused(ca: CertificateAuthority) -> None:
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(WEB.uri),
            x509.UniformResourceIdentifier(Identity(TD, "kube-system", "admin").uri),
        ]), critical=True)
        .sign(key, hashes.SHA256())
    ).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRefused):
        ca.sign_csr(csr, WEB)


def test_csr_in_another_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    foreign = Identity("evil.example", "default", "web")
    with pytest.raises(CsrRefused):
        ca.sign_csr(make_csr(new_key(), foreign), foreign)


def test_rsa_csr_is_refused(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WEB.uri)]),
                       critical=True)
        .sign(key, hashes.SHA256())
    ).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRefused, match="P-256"):
        ca.sign_csr(csr, WEB)


def test_malformed_and_tampered_csrs_are_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrRefused, match="malformed"):
        ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END", WEB)
    der = x509.load_pem_x509_csr(make_csr(new_key(), WEB)).public_bytes(
        serialization.Encoding.DER)
    tampered = bytearray(der)
    tampered[-5] ^= 0x01  # inside the signature
    pem = x509.load_der_x509_csr(bytes(tampered)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRefused, match="signature"):
        ca.sign_csr(pem, WEB)


def test_bundle_may_hold_two_anchors(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    CertificateAuthority.create(TD, old)
    CertificateAuthority.create(TD, new)
    both = (old / "root.crt").read_bytes() + (new / "root.crt").read_bytes()
    (new / "root.crt").write_bytes(both)
    ca2 = CertificateAuthority.load(TD, new)
    assert len(ca2.roots) == 2
    assert ca2.bundle().count(b"BEGIN CERTIFICATE") == 2


def test_server_chain_for_the_control_plane(ca: CertificateAuthority) -> None:
    ident = Identity(TD, "meshlet", "control")
    key, (leaf, _issuer) = ca.server_chain(ident, ["localhost"], ["127.0.0.1"])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert uri_sans(leaf) == [ident.uri]
    assert leaf.public_key() == key.public_key()


# --- join tokens -----------------------------------------------------------------------


def test_token_round_trip() -> None:
    secret = new_secret()
    tok = create_token(secret, WEB, 3600, now=1000.0)
    assert verify_token(secret, tok, now=1000.0 + 3599) == WEB


def test_token_expires() -> None:
    secret = new_secret()
    tok = create_token(secret, WEB, 60, now=1000.0)
    with pytest.raises(TokenError, match="expired"):
        verify_token(secret, tok, now=1060.0)


def test_token_from_another_secret_is_refused() -> None:
    tok = create_token(new_secret(), WEB, 60)
    with pytest.raises(TokenError, match="signature"):
        verify_token(new_secret(), tok)


def test_tampered_token_claims_are_refused() -> None:
    import base64
    import json

    secret = new_secret()
    prefix, body, mac = create_token(secret, WEB, 60).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["sa"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="signature"):
        verify_token(secret, f"{prefix}.{forged}.{mac}")


@pytest.mark.parametrize("tok", ["", "abc", "mjt1.x", "mjt2.a.b", "mjt1.!!.??", "a.b.c.d"])
def test_malformed_tokens(tok: str) -> None:
    with pytest.raises(TokenError):
        verify_token(new_secret(), tok)
