"""The mesh CA: a root (trust anchor) and an issuer that signs workload certificates.

Rules:
1. All crypto is the `cryptography` package's; nothing is written by hand. Keys are
   ECDSA P-256, signatures ECDSA-SHA256.
2. A workload certificate carries exactly one URI SAN, the workload's SPIFFE ID (marked
   critical, subject empty, per X.509-SVID), is valid for client and server auth, and is
   short-lived (default 24 h). Its chain is [leaf, issuer]; the root is the trust anchor.
3. A CSR is signed only for the identity the caller was allowed (by a join token, or by
   the certificate it already holds); a CSR asking for any other identity, with a bad
   signature or with another key type, is refused (`CsrRefused`).
4. The trust bundle may hold several roots (during an anchor rotation).
5. On disk (`CertificateAuthority.create` / `load`): root.crt, root.key, issuer.crt,
   issuer.key in one directory; keys are written mode 0600.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlet.identity.spiffe import Identity

__all__ = [
    "CertificateAuthority",
    "CsrRefused",
    "bundle_pem",
    "make_csr",
    "new_key",
    "parse_chain",
    "uri_sans",
]

DEFAULT_LIFETIME = dt.timedelta(hours=24)
_SKEW = dt.timedelta(minutes=1)


class CsrRefused(Exception):
    """The CSR cannot be signed; the message says why (it goes back to the caller)."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> bytes:
    """A PEM CSR for `identity`, signed with `key` (which never leaves the caller)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in ext.value.get_values_for_type(x509.UniformResourceIdentifier)]


def parse_chain(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def bundle_pem(roots: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in roots)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """CAs sign certificates (and CRLs); workloads sign handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def _ca_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    signer_key: ec.EllipticCurvePrivateKey,
    signer_name: x509.Name | None,
    lifetime: dt.timedelta,
    path_length: int,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if signer_name is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), False
        )
    return builder.sign(signer_key, hashes.SHA256())


class CertificateAuthority:
    def __init__(
        self,
        trust_domain: str,
        roots: list[x509.Certificate],
        issuer: x509.Certificate,
        issuer_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.trust_domain = trust_domain
        self.roots = roots
        self.issuer = issuer
        self.issuer_key = issuer_key

    # --- creation and storage ---------------------------------------------------------

    @classmethod
    def create(cls, trust_domain: str, directory: Path | None = None) -> CertificateAuthority:
        """A new root and issuer for `trust_domain`; written to `directory` if given."""
        root_key, issuer_key = new_key(), new_key()
        root = _ca_cert(f"meshlet root CA ({trust_domain})", root_key, root_key, None,
                        dt.timedelta(days=3650), 1)
        issuer = _ca_cert(f"meshlet issuer ({trust_domain})", issuer_key, root_key,
                          root.subject, dt.timedelta(days=365), 0)
        ca = cls(trust_domain, [root], issuer, issuer_key)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            _write(directory / "root.crt", bundle_pem([root]), 0o644)
            _write(directory / "root.key", _key_pem(root_key), 0o600)
            _write(directory / "issuer.crt", bundle_pem([issuer]), 0o644)
            _write(directory / "issuer.key", _key_pem(issuer_key), 0o600)
        return ca

    @classmethod
    def load(cls, trust_domain: str, directory: Path) -> CertificateAuthority:
        """Load a CA written by `create` (or supplied by the operator: root.crt may hold
        several anchors; issuer.crt and issuer.key must chain to one of them)."""
        roots = parse_chain((directory / "root.crt").read_bytes())
        issuer = x509.load_pem_x509_certificate((directory / "issuer.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "issuer.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / 'issuer.key'}: not an ECDSA key")
        if issuer.public_key() != key.public_key():
            raise ValueError(f"{directory}: issuer.key does not match issuer.crt")
        if not any(_signed_by(issuer, r) for r in roots):
            raise ValueError(f"{directory}: issuer.crt is not signed by any root in root.crt")
        return cls(trust_domain, roots, issuer, key)

    @classmethod
    def load_or_create(cls, trust_domain: str, directory: Path) -> CertificateAuthority:
        if (directory / "issuer.key").exists():
            return cls.load(trust_domain, directory)
        return cls.create(trust_domain, directory)

    # --- issuing ----------------------------------------------------------------------

    def sign_csr(
        self, csr_pem: bytes, allowed: Identity, lifetime: dt.timedelta = DEFAULT_LIFETIME
    ) -> list[x509.Certificate]:
        """Sign a workload CSR for `allowed`; returns the chain [leaf, issuer]."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CsrRefused("malformed CSR") from None
        if not csr.is_signature_valid:
            raise CsrRefused("CSR signature is invalid")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise CsrRefused("CSR key must be ECDSA P-256")
        sans = uri_sans(csr)
        if sans != [allowed.uri]:
            raise CsrRefused(
                f"CSR asks for {', '.join(sans) or 'no identity'}; allowed: {allowed.uri}"
            )
        if allowed.trust_domain != self.trust_domain:
            raise CsrRefused(f"identity not in trust domain {self.trust_domain}")
        return [self._leaf(pub, [x509.UniformResourceIdentifier(allowed.uri)], lifetime),
                self.issuer]

    def server_chain(
        self, identity: Identity, dns_names: list[str], ips: list[str],
        lifetime: dt.timedelta = DEFAULT_LIFETIME,
    ) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
        """A key and chain for a server run by the CA's owner (the control plane)."""
        import ipaddress

        key = new_key()
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        names += [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        return key, [self._leaf(key.public_key(), names, lifetime), self.issuer]

    def _leaf(
        self, pub: ec.EllipticCurvePublicKey, names: list[x509.GeneralName],
        lifetime: dt.timedelta,
    ) -> x509.Certificate:
        now = _now()
        not_after = min(now + lifetime, self.issuer.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.issuer.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.issuer_key.public_key()),
                critical=False,
            )
            .sign(self.issuer_key, hashes.SHA256())
        )

    def bundle(self) -> bytes:
        return bundle_pem(self.roots)


def _signed_by(cert: x509.Certificate, signer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(signer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
