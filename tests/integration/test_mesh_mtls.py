"""Two meshed proxies and a control plane: mTLS between them, identities verified both
ways, the client's identity given to the app, inbound authorization. Real processes."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

from helpers import (
    TD,
    Control,
    HttpBackend,
    ProxyProcess,
    http_request,
    metric,
    raw_exchange,
)

WEB = f"spiffe://{TD}/ns/default/sa/web"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"


def _env(control: Control, tmp: Path, account: str, **more: str) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "anchors.pem").write_bytes(control.anchors)
    (tmp / "token").write_text(control.token("default", account))
    return {
        "MESHLET_CONTROL_ADDR": f"127.0.0.1:{control.port}",
        "MESHLET_TRUST_ANCHORS": str(tmp / "anchors.pem"),
        "MESHLET_IDENTITY": f"spiffe://{TD}/ns/default/sa/{account}",
        "MESHLET_JOIN_TOKEN_FILE": str(tmp / "token"),
        **more,
    }


def _endpoints(port: int, identity: str) -> str:
    return (f"services:\n  - name: web\n    port: 80\n    endpoints:\n"
            f"      - addr: 127.0.0.1:{port}\n        identity: {identity}\n")


def test_mtls_between_proxies(control: Control, backend: HttpBackend, tmp_path: Path) -> None:
    with ProxyProcess(app=backend.port, ready_timeout=15,
                      env=_env(control, tmp_path / "b", "web",
                               MESHLET_INBOUND_POLICY="all-authenticated")) as b:
        assert b.inbound_port is not None
        with ProxyProcess(outbound={"web:80": ""}, endpoints=_endpoints(b.inbound_port, WEB),
                          ready_timeout=15, env=_env(control, tmp_path / "a", "client")) as a:
            port = a.outbound["web:80"]
            r = http_request(port, path="/anything",
                             headers=[("meshlet-client-id", "spiffe://evil/ns/x/sa/y")])
            assert r.status == 200, r
            seen = json.loads(r.body)
            ids = [v for k, v in seen["headers"] if k.lower() == "meshlet-client-id"]
            assert ids == [CLIENT]  # verified identity only; the forged one was stripped
            r2 = http_request(port, path="/anything")  # pooled mTLS connection reused
            assert r2.status == 200
            # The client side's golden metrics say the requests went over mTLS.
            assert metric(a.metrics(), "request_total", direction="outbound",
                          tls="true") == 2
            m = b.metrics()
            assert metric(m, "inbound_authz_allow_total", client_id=CLIENT) >= 1
            # Both requests rode one pooled mTLS connection; the golden metrics say TLS
            # and whose.
            assert metric(m, "tcp_open_total", direction="inbound", peer="src",
                          tls="true", client_id=CLIENT) == 1
            assert metric(m, "response_total", direction="inbound", tls="true",
                          client_id=CLIENT, status_code="200") == 2

        # A plaintext client is not authenticated: 403 from the all-authenticated port.
        raw = raw_exchange(b.inbound_port, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 403"), raw[:80]
        assert b"meshlet-proxy-error: unauthorized_all-authenticated" in raw
        assert metric(b.metrics(), "inbound_authz_deny_total", client_id="") >= 1


def test_wrong_peer_identity_is_refused(control: Control, backend: HttpBackend,
                                        tmp_path: Path) -> None:
    with ProxyProcess(app=backend.port, ready_timeout=15,
                      env=_env(control, tmp_path / "b", "web")) as b:
        assert b.inbound_port is not None
        expected = f"spiffe://{TD}/ns/default/sa/payments"
        with ProxyProcess(outbound={"web:80": ""},
                          endpoints=_endpoints(b.inbound_port, expected),
                          ready_timeout=15, env=_env(control, tmp_path / "a", "client")) as a:
            mark = backend.mark()
            r = http_request(a.outbound["web:80"], path="/anything")
            assert r.status == 502, r
            assert r.header("meshlet-proxy-error") == "peer_identity_mismatch"
            assert backend.received(mark) == b""  # nothing reached the app


def test_opaque_tcp_over_mtls(control: Control, tmp_path: Path) -> None:
    from helpers import TcpServer

    with TcpServer(mode="banner", banner=b"220 db ready\r\n") as db, \
            ProxyProcess(app=db.port, ready_timeout=15,
                         env=_env(control, tmp_path / "b", "web",
                                  MESHLET_OPAQUE_PORTS=str(db.port),
                                  MESHLET_INBOUND_POLICY="all-authenticated")) as b:
            assert b.inbound_port is not None
            eps = _endpoints(b.inbound_port, WEB).replace("name: web\n    port: 80",
                                                          "name: db\n    port: 5432")
            with ProxyProcess(outbound={"db:5432": "/opaque"}, endpoints=eps,
                              ready_timeout=15,
                              env=_env(control, tmp_path / "a", "client")) as a:
                with socket.create_connection(("127.0.0.1", a.outbound["db:5432"]),
                                              timeout=10) as s:
                    got = b""
                    while b"\r\n" not in got:
                        got += s.recv(100)
                    assert got == b"220 db ready\r\n"  # the server spoke first, via mTLS
                    s.sendall(b"ping\n")
                    echo = b""
                    while len(echo) < 5:
                        echo += s.recv(100)
                    assert echo == b"ping\n"
                m = b.metrics()
                assert metric(m, "inbound_authz_allow_total", client_id=CLIENT) == 1
                assert metric(m, "tcp_open_total", direction="inbound", peer="src",
                              tls="true") == 1


def _client_ctx(control: Control, tmp: Path, chain: bytes | None, key: bytes | None,
                max_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
                ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=control.anchors.decode())
    ctx.check_hostname = False
    ctx.maximum_version = max_version
    ctx.set_alpn_protocols(["meshlet/h1"])
    if chain is not None and key is not None:
        (tmp / "c.pem").write_bytes(chain)
        (tmp / "k.pem").write_bytes(key)
        ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return ctx


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _try(port: int, ctx: ssl.SSLContext) -> bytes | None:
    """The response to one request over TLS, or None if the TLS session failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /anything HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            # TLS 1.3: a client may finish its side before the server checks the client
            # certificate; a refusal then shows as a close with no response.
            return out or None
    except (ssl.SSLError, OSError):
        return None


def test_bad_client_certificates_are_refused(control: Control, backend: HttpBackend,
                                             tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from meshlet.identity.ca import CertificateAuthority, bundle_pem, make_csr, new_key
    from meshlet.identity.spiffe import Identity

    ca = CertificateAuthority.load(TD, control.state / "ca")
    client = Identity(TD, "default", "client")
    good_key = new_key()
    good = bundle_pem(ca.sign_csr(make_csr(good_key, client), client))
    foreign_ca = CertificateAuthority.create(TD)
    f_key = new_key()
    foreign = bundle_pem(foreign_ca.sign_csr(make_csr(f_key, client), client))
    e_key = new_key()
    now = dt.datetime.now(dt.UTC)
    expired_leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([]))
        .issuer_name(ca.issuer.subject).public_key(e_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=2))
        .not_valid_after(now - dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(client.uri)]), critical=True)
        .sign(ca.issuer_key, hashes.SHA256())
    )
    expired = bundle_pem([expired_leaf, ca.issuer])

    with ProxyProcess(app=backend.port, ready_timeout=15,
                      env=_env(control, tmp_path / "b", "web")) as b:
        port = b.inbound_port
        assert port is not None
        ok = _try(port, _client_ctx(control, tmp_path, good, _key_pem(good_key)))
        assert ok is not None and ok.startswith(b"HTTP/1.1 200"), ok
        mark = backend.mark()
        bad = {
            "no client cert": _client_ctx(control, tmp_path, None, None),
            "another CA": _client_ctx(control, tmp_path, foreign, _key_pem(f_key)),
            "expired": _client_ctx(control, tmp_path, expired, _key_pem(e_key)),
            "TLS 1.2 only": _client_ctx(control, tmp_path, good, _key_pem(good_key),
                                        ssl.TLSVersion.TLSv1_2),
        }
        for what, ctx in bad.items():
            assert _try(port, ctx) is None, what
        assert backend.received(mark) == b""  # none of them reached the app
        # Others are unaffected.
        again = _try(port, _client_ctx(control, tmp_path, good, _key_pem(good_key)))
        assert again is not None and again.startswith(b"HTTP/1.1 200")
        m = b.metrics()
        assert metric(m, "inbound_tls_handshake_errors_total", direction="inbound") == 4
        # Logged once per peer per minute, not once per failure.
        assert b.stderr().count("mesh TLS handshake from 127.0.0.1 failed") == 1


def test_the_apps_own_tls_passes_through(control: Control, tmp_path: Path) -> None:
    """TLS that is not the mesh's (no meshlet ALPN) reaches the app untouched: the client
    completes its handshake with the app's certificate, not the proxy's."""
    import threading

    from meshlet.identity.ca import CertificateAuthority, bundle_pem
    from meshlet.identity.spiffe import Identity

    app_ca = CertificateAuthority.create("app.example")
    key, chain = app_ca.server_chain(Identity("app.example", "app", "tls"), ["app.local"], [])
    (tmp_path / "app.crt").write_bytes(bundle_pem(chain))
    (tmp_path / "app.key").write_bytes(_key_pem(key))
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "app.crt", tmp_path / "app.key")
    lsock = socket.create_server(("127.0.0.1", 0))
    app_port = lsock.getsockname()[1]

    def serve() -> None:
        with lsock:
            conn, _ = lsock.accept()
            with sctx.wrap_socket(conn, server_side=True) as t:
                t.sendall(b"app says: " + t.recv(100))

    threading.Thread(target=serve, daemon=True).start()
    with ProxyProcess(app=app_port, ready_timeout=15,
                      env=_env(control, tmp_path / "b", "web")) as b:
        assert b.inbound_port is not None
        cctx = ssl.create_default_context(cadata=app_ca.bundle().decode())
        cctx.set_alpn_protocols(["http/1.1"])
        with socket.create_connection(("127.0.0.1", b.inbound_port), timeout=10) as raw, \
                cctx.wrap_socket(raw, server_hostname="app.local") as s:
            s.sendall(b"hello")
            assert s.recv(100) == b"app says: hello"


def test_certificate_rotation_under_load(backend: HttpBackend, tmp_path: Path) -> None:
    """Both proxies renew short-lived certificates while requests flow: none fails, and
    new mTLS connections made after the renewals still verify."""
    import time

    from helpers import eventually, start_control

    gen = start_control(tmp_path / "control", lifetime="10s")
    control = next(gen)
    try:
        with ProxyProcess(app=backend.port, ready_timeout=15,
                          env=_env(control, tmp_path / "b", "web",
                                   MESHLET_INBOUND_POLICY="all-authenticated",
                                   MESHLET_POOL_IDLE_TIMEOUT="1s")) as b:
            assert b.inbound_port is not None
            with ProxyProcess(outbound={"web:80": ""},
                              endpoints=_endpoints(b.inbound_port, WEB), ready_timeout=15,
                              env=_env(control, tmp_path / "a", "client",
                                       MESHLET_POOL_IDLE_TIMEOUT="1s")) as a:
                port = a.outbound["web:80"]
                statuses: dict[int, int] = {}
                deadline = time.monotonic() + 9.0  # past 70 % of 10 s, for both proxies
                n = 0
                while time.monotonic() < deadline:
                    r = http_request(port, path="/anything")
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    n += 1
                    if n % 50 == 0:
                        time.sleep(1.2)  # let pooled connections idle out: new handshakes
                assert statuses == {200: n}, statuses
                for p in (a, b):
                    eventually(lambda p=p: metric(p.metrics(), "identity_cert_refresh_total",
                                                  result="ok") >= 2, timeout=10)
                r = http_request(port, path="/anything")
                assert r.status == 200
                assert metric(b.metrics(), "tcp_open_total", direction="inbound",
                              peer="src", tls="true") >= 2
    finally:
        next(gen, None)


def test_openssl_s_client_sees_tls13_only_and_a_required_client_cert(
    control: Control, backend: HttpBackend, tmp_path: Path
) -> None:
    """The scan an operator would run (sslscan/testssl.sh drive `openssl s_client`; they
    send no ALPN, so their TLS goes to the app by design). With the mesh ALPN:
    TLS 1.2 is refused; TLS 1.3 needs a client certificate from the mesh."""
    import subprocess

    with ProxyProcess(app=backend.port, ready_timeout=15,
                      env=_env(control, tmp_path / "b", "web")) as b:
        target = f"127.0.0.1:{b.inbound_port}"
        anchors = tmp_path / "b" / "anchors.pem"

        def s_client(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                ["openssl", "s_client", "-connect", target, "-alpn", "meshlet/h1",
                 "-CAfile", str(anchors), *args],
                input=b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
                capture_output=True,
                timeout=30)

        tls12 = s_client("-tls1_2")
        assert b"Cipher is (NONE)" in tls12.stdout or tls12.returncode != 0
        assert b"HTTP/1.1" not in tls12.stdout
        for v in ("-ssl3", "-tls1", "-tls1_1"):
            old = s_client(v)
            assert b"HTTP/1.1" not in old.stdout, v
        no_cert = s_client("-tls1_3")
        out = no_cert.stdout + no_cert.stderr
        assert b"TLSv1.3" in out  # the handshake is TLS 1.3 ...
        assert b"HTTP/1.1 200" not in out  # ... and nothing is served without a cert
        # The same client with a mesh certificate is served: the refusal above was the
        # missing client certificate, nothing else.
        from meshlet.identity.ca import CertificateAuthority, bundle_pem, make_csr, new_key
        from meshlet.identity.spiffe import Identity

        ca = CertificateAuthority.load(TD, control.state / "ca")
        key = new_key()
        ident = Identity(TD, "default", "client")
        (tmp_path / "c.pem").write_bytes(bundle_pem(ca.sign_csr(make_csr(key, ident), ident)))
        (tmp_path / "k.pem").write_bytes(_key_pem(key))
        with_cert = s_client("-tls1_3", "-cert", str(tmp_path / "c.pem"), "-cert_chain",
                             str(tmp_path / "c.pem"),
                             "-key", str(tmp_path / "k.pem"), "-ign_eof")
        assert b"HTTP/1.1 200" in with_cert.stdout, with_cert.stdout[-500:]
