"""MESHLET_APP_TLS: an app that serves TLS itself. The inbound proxy takes h2c (gRPC) or
HTTP/1.1 from its clients and speaks h2 or HTTP/1.1 over TLS to the app, checking the
app's certificate against MESHLET_APP_TLS_CA. Real processes: grpcio, a TLS HTTP/1.1
server, curl."""

from __future__ import annotations

import datetime
import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
from helpers import ProxyProcess, metric

grpc = pytest.importorskip("grpc")


def _ca_and_cert(tmp: Path, name: str = "localhost") -> tuple[Path, Path, Path]:
    """A CA (ca.pem) and a server certificate for `name` signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test app CA {tmp.name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"


@pytest.fixture
def grpc_tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    ca, cert, key = _ca_and_cert(tmp_path / "app")

    def hello(request: bytes, context: object) -> bytes:
        return b"hello " + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"Hello": grpc.unary_unary_rpc_method_handler(hello)}),))
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port, ca
    finally:
        server.stop(0)


def test_h2c_in_h2_over_tls_to_the_app(grpc_tls_server: tuple[int, Path]) -> None:
    port, ca = grpc_tls_server
    with ProxyProcess(app=port, env={"MESHLET_APP_TLS": "true",
                                     "MESHLET_APP_TLS_CA": str(ca)}) as p:
        with grpc.insecure_channel(f"127.0.0.1:{p.inbound_port}") as ch:
            hello = ch.unary_unary("/t.T/Hello")
            for i in range(5):
                assert hello(b"n%d" % i, timeout=10) == b"hello n%d" % i
        assert metric(p.metrics(), "response_total", direction="inbound",
                      grpc_status="0") == 5


def test_a_wrong_app_certificate_is_refused(grpc_tls_server: tuple[int, Path],
                                            tmp_path: Path) -> None:
    port, _ca = grpc_tls_server
    other_ca, _c, _k = _ca_and_cert(tmp_path / "other")
    with ProxyProcess(app=port, env={"MESHLET_APP_TLS": "true",
                                     "MESHLET_APP_TLS_CA": str(other_ca)}) as p, \
            grpc.insecure_channel(f"127.0.0.1:{p.inbound_port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/t.T/Hello")(b"x", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"tls app saw {self.path}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_http1_to_a_tls_app_with_curl(tmp_path: Path) -> None:
    ca, cert, key = _ca_and_cert(tmp_path / "app")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    srv.socket = sctx.wrap_socket(srv.socket, server_side=True)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        with ProxyProcess(app=srv.server_address[1],
                          env={"MESHLET_APP_TLS": "true", "MESHLET_APP_TLS_CA": str(ca)}) as p:
            out = subprocess.run(
                ["curl", "-sS", "--noproxy", "*", "--max-time", "10",
                 f"http://127.0.0.1:{p.inbound_port}/x", f"http://127.0.0.1:{p.inbound_port}/y"],
                capture_output=True, text=True, timeout=20)
            assert out.stdout == "tls app saw /x\ntls app saw /y\n", out.stderr
    finally:
        srv.shutdown()
        srv.server_close()
