"""The h1-mesh-mtls setup: one test CA, meshlet's control plane, and proxy pairs.

A pair is proxy A (plain HTTP/1.1 in, mutual TLS 1.3 out) and proxy B (mutual TLS 1.3 in,
plain HTTP/1.1 to nginx). Every system's certificates come from one CA made with meshlet's
own CA code: meshlet's proxies get theirs from the control plane, which is started on that
CA's directory; Envoy, HAProxy and the handshake client get theirs from files written here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.common import LOOPBACK, REPO_ROOT, BenchError, free_port, http_get, port_open
from bench.procs import Proc, run_to_completion, spawn
from bench.systems import LaunchSpec, envoy_binary, envoy_http_filter, socket_address

TRUST_DOMAIN = "bench.local"
SERVER = "web"  # proxy B's identity (the service behind it)
CLIENT = "client"  # proxy A's identity, and the handshake client's
ALPN_MESH_H1 = "meshlet/h1"
CONTROL_START_TIMEOUT = 20.0
TOKEN_TTL = "24h"  # tokens are made once per run and reused by every meshlet trial


def spiffe_uri(account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{account}"


@dataclass(frozen=True)
class Workload:
    """Files of one workload certificate: chain [leaf, issuer], key, both (HAProxy)."""

    account: str
    chain: Path
    key: Path
    pem: Path

    @property
    def uri(self) -> str:
        return spiffe_uri(self.account)


@dataclass
class Mesh:
    """The run's PKI, and meshlet's control plane (None/error when not wanted or broken)."""

    root: Path  # trust anchors (the CA's root.crt)
    workloads: dict[str, Workload]
    state_dir: Path
    control: Proc | None = None
    control_port: int | None = None
    tokens: dict[str, Path] = field(default_factory=dict)
    control_error: str | None = None


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def make_pki(mesh_dir: Path) -> Mesh:
    """One ECDSA P-256 CA (in the control plane's state dir) and the workload certificates."""
    from meshlet.identity.ca import CertificateAuthority, bundle_pem, make_csr, new_key
    from meshlet.identity.spiffe import Identity

    state = mesh_dir / "control"
    ca = CertificateAuthority.create(TRUST_DOMAIN, state / "ca")
    certs = mesh_dir / "certs"
    certs.mkdir(parents=True)
    workloads = {}
    for account in (SERVER, CLIENT):
        ident = Identity(TRUST_DOMAIN, "default", account)
        key = new_key()
        chain = bundle_pem(ca.sign_csr(make_csr(key, ident), ident))
        key_pem = _key_pem(key)
        w = Workload(
            account, certs / f"{account}.crt", certs / f"{account}.key", certs / f"{account}.pem"
        )
        w.chain.write_bytes(chain)
        w.key.write_bytes(key_pem)
        w.pem.write_bytes(chain + key_pem)
        for path in (w.key, w.pem):
            path.chmod(0o600)
        workloads[account] = w
    return Mesh(root=state / "ca" / "root.crt", workloads=workloads, state_dir=state)


def _control_env(mesh: Mesh, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "MESHLET_CONTROL_STATE_DIR": str(mesh.state_dir),
        "MESHLET_CONTROL_LISTEN_ADDR": f"{LOOPBACK}:{port}",
        "MESHLET_TRUST_DOMAIN": TRUST_DOMAIN,
    }


def start_control(mesh: Mesh, log_dir: Path) -> None:
    """Start `meshlet control` on the PKI's CA (not pinned by taskset, not measured) and
    make join tokens for `web` and `client`. A failure is kept in mesh.control_error:
    meshlet's trials then fail with it and the other systems go on."""
    port = free_port()
    env = _control_env(mesh, port)
    argv = [sys.executable, "-m", "meshlet", "control"]
    proc = spawn("meshlet-control", argv, log_dir, env=env, cwd=REPO_ROOT)
    deadline = time.monotonic() + CONTROL_START_TIMEOUT
    while not port_open(port):
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            mesh.control_error = f"meshlet control did not start; log tail:\n{proc.log_tail()}"
            return
        time.sleep(0.05)
    mesh.control, mesh.control_port = proc, port
    try:
        for account in (SERVER, CLIENT):
            argv = [sys.executable, "-m", "meshlet", "control", "token", "create"]
            argv += ["--namespace", "default", "--account", account, "--ttl", TOKEN_TTL]
            out = run_to_completion(f"token-{account}", argv, log_dir, 30, env=env, cwd=REPO_ROOT)
            token = out.strip().splitlines()[-1].strip() if out.strip() else ""
            if not token:
                raise BenchError(f"`meshlet control token create` printed nothing: {out!r}")
            path = mesh.state_dir.parent / f"{account}.token"
            path.write_text(token + "\n")
            path.chmod(0o600)
            mesh.tokens[account] = path
    except BenchError as exc:
        mesh.control_error = f"join tokens: {exc}"


# ---- pairs -----------------------------------------------------------------------


@dataclass
class Pair:
    """Launch specs of A and B, and what the handshake client must offer B."""

    a: LaunchSpec
    b: LaunchSpec
    handshake_alpn: list[str] | None
    files: dict[str, str] = field(default_factory=dict)  # extra state, e.g. stats sockets


PairBuilder = Callable[[int, Mesh, Path], Pair]


def meshlet_pair(nginx: int, mesh: Mesh, workdir: Path) -> Pair:
    if mesh.control_error or mesh.control_port is None:
        raise BenchError(mesh.control_error or "meshlet control plane is not running")
    pa, pb, aa, ab = free_port(), free_port(), free_port(), free_port()
    endpoints = workdir / "endpoints.yaml"
    endpoints.write_text(
        f"services:\n  - name: {SERVER}\n    port: 80\n    endpoints:\n"
        f"      - addr: {LOOPBACK}:{pb}\n        identity: {spiffe_uri(SERVER)}\n"
    )
    common = {
        "MESHLET_CONTROL_ADDR": f"{LOOPBACK}:{mesh.control_port}",
        "MESHLET_TRUST_ANCHORS": str(mesh.root),
    }
    env_b = {
        **common,
        "MESHLET_INBOUND_LISTEN_ADDR": f"{LOOPBACK}:{pb}",
        "MESHLET_APP_ADDR": f"{LOOPBACK}:{nginx}",
        "MESHLET_ADMIN_LISTEN_ADDR": f"{LOOPBACK}:{ab}",
        "MESHLET_IDENTITY": spiffe_uri(SERVER),
        "MESHLET_JOIN_TOKEN_FILE": str(mesh.tokens[SERVER]),
        "MESHLET_INBOUND_POLICY": "all-authenticated",
    }
    env_a = {
        **common,
        "MESHLET_INBOUND_LISTEN_ADDR": "",
        "MESHLET_OUTBOUND_LISTENERS": f"{LOOPBACK}:{pa}={SERVER}:80",
        "MESHLET_ENDPOINTS_FILE": str(endpoints),
        "MESHLET_ADMIN_LISTEN_ADDR": f"{LOOPBACK}:{aa}",
        "MESHLET_IDENTITY": spiffe_uri(CLIENT),
        "MESHLET_JOIN_TOKEN_FILE": str(mesh.tokens[CLIENT]),
    }
    argv = [sys.executable, "-m", "meshlet", "proxy"]
    return Pair(
        a=LaunchSpec(argv, pa, aa, "/ready", env=env_a, cwd=REPO_ROOT),
        b=LaunchSpec(argv, pb, ab, "/ready", env=env_b, cwd=REPO_ROOT),
        handshake_alpn=[ALPN_MESH_H1],
    )


def _envoy_tls(workload: Workload, mesh: Mesh, peer_uri: str | None) -> dict[str, Any]:
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(mesh.root)}}
    if peer_uri:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": peer_uri}}
        ]
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(workload.chain)},
                "private_key": {"filename": str(workload.key)},
            }
        ],
        "validation_context": validation,
    }


ENVOY_FINAL_STATS = r"ssl\.|5xx|cx_connect_fail|protocol_error|rq_reset"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."


def envoy_pair_config(
    side: str, listen: int, admin: int, upstream: int, mesh: Mesh
) -> dict[str, Any]:
    """Envoy A (plain in, mTLS out, checks B's SPIFFE ID) or B (mTLS in, client cert
    required, plain out to nginx)."""
    chain: dict[str, Any] = {"filters": [envoy_http_filter()]}
    cluster: dict[str, Any] = {
        "name": "backend",
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "backend",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(upstream)}}]}],
        },
    }
    if side == "a":
        cluster["transport_socket"] = {
            "name": _TLS_SOCKET,
            "typed_config": {
                "@type": _TLS_TYPES + "UpstreamTlsContext",
                "common_tls_context": _envoy_tls(
                    mesh.workloads[CLIENT], mesh, spiffe_uri(SERVER)
                ),
            },
        }
    else:
        chain["transport_socket"] = {
            "name": _TLS_SOCKET,
            "typed_config": {
                "@type": _TLS_TYPES + "DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": _envoy_tls(mesh.workloads[SERVER], mesh, None),
            },
        }
    return {
        "admin": {"address": socket_address(admin)},
        "static_resources": {
            "listeners": [
                {"name": "ingress", "address": socket_address(listen), "filter_chains": [chain]}
            ],
            "clusters": [cluster],
        },
    }


def _envoy_argv(cfg: Path, base_id: int) -> list[str]:
    return [
        envoy_binary(),
        "--concurrency",
        "1",
        "-c",
        str(cfg),
        "--disable-hot-restart",
        "--base-id",
        str(base_id),
        "--log-level",
        "warn",
    ]


def envoy_pair(nginx: int, mesh: Mesh, workdir: Path) -> Pair:
    pa, pb, aa, ab = free_port(), free_port(), free_port(), free_port()
    specs = {}
    for side, listen, admin, upstream in (("a", pa, aa, pb), ("b", pb, ab, nginx)):
        cfg = workdir / f"envoy-{side}.yaml"  # JSON is valid YAML
        cfg.write_text(json.dumps(envoy_pair_config(side, listen, admin, upstream, mesh), indent=1))
        specs[side] = LaunchSpec(_envoy_argv(cfg, admin), listen, admin, "/ready")
    return Pair(a=specs["a"], b=specs["b"], handshake_alpn=None)


def haproxy_pair_config(
    side: str, listen: int, ready: int, upstream: int, mesh: Mesh, stats_sock: Path
) -> str:
    """HAProxy A (plain in, mTLS out) or B (mTLS in, client cert required, plain out)."""
    tls = f"ca-file {mesh.root} verify required ssl-min-ver TLSv1.3"
    if side == "a":
        bind = f"{LOOPBACK}:{listen}"
        server = f"{LOOPBACK}:{upstream} ssl crt {mesh.workloads[CLIENT].pem} {tls}"
    else:
        bind = f"{LOOPBACK}:{listen} ssl crt {mesh.workloads[SERVER].pem} {tls}"
        server = f"{LOOPBACK}:{upstream}"
    return f"""global
    nbthread 1
    maxconn 4096
    stats socket {stats_sock} mode 600 level operator

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
    timeout http-keep-alive 60s

frontend ready
    bind {LOOPBACK}:{ready}
    monitor-uri /ready

frontend fe
    bind {bind}
    default_backend be

backend be
    server upstream {server}
"""


def haproxy_pair(nginx: int, mesh: Mesh, workdir: Path) -> Pair:
    pa, pb, ra, rb = free_port(), free_port(), free_port(), free_port()
    specs, files = {}, {}
    for side, listen, ready, upstream in (("a", pa, ra, pb), ("b", pb, rb, nginx)):
        cfg = workdir / f"haproxy-{side}.cfg"
        sock = workdir / f"haproxy-{side}.sock"
        cfg.write_text(haproxy_pair_config(side, listen, ready, upstream, mesh, sock))
        specs[side] = LaunchSpec(["haproxy", "-db", "-f", str(cfg)], listen, ready, "/ready")
        files[f"stats_{side}"] = str(sock)
    return Pair(a=specs["a"], b=specs["b"], handshake_alpn=None, files=files)


PAIR_BUILDERS: dict[str, PairBuilder] = {
    "meshlet": meshlet_pair,
    "envoy": envoy_pair,
    "haproxy": haproxy_pair,
}


# ---- evidence that the warm-up really went over mutual TLS ------------------------


def _get_text(port: int, path: str) -> str:
    try:
        status, body = http_get(port, path, timeout=5)
    except OSError as exc:
        raise BenchError(f"GET {path} on admin port {port} failed: {exc}") from exc
    if status != 200:
        raise BenchError(f"GET {path} on admin port {port}: status {status}")
    return body.decode(errors="replace")


def meshlet_authz_allowed(metrics: str, client_uri: str) -> float:
    """Sum of inbound_authz_allow_total samples labelled with client_id=client_uri."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("inbound_authz_allow_total{") and f'client_id="{client_uri}"' in line:
            total += float(line.rsplit(None, 1)[1])
    return total


def _envoy_handshakes(stats: str) -> int:
    return sum(int(m.group(1)) for m in re.finditer(r"\.ssl\.handshake: (\d+)", stats))


def haproxy_show_info(sock_path: str) -> dict[str, str]:
    """`show info` on a HAProxy stats socket, as a dict."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(b"show info\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def verify_mtls(system: str, pair: Pair) -> dict[str, Any]:
    """Raise BenchError unless the proxies show that the warm-up crossed mutual TLS."""
    if system == "meshlet":
        metrics = _get_text(pair.b.ready_port, "/metrics")
        allowed = meshlet_authz_allowed(metrics, spiffe_uri(CLIENT))
        if allowed <= 0:
            lines = [ln for ln in metrics.splitlines() if "authz" in ln or "tls" in ln]
            raise BenchError(
                "no mTLS evidence: proxy B's /metrics has no inbound_authz_allow_total with "
                f"client_id={spiffe_uri(CLIENT)} after warm-up; authz/tls lines: "
                f"{lines[:10]}"
            )
        return {"b_inbound_authz_allow_client": allowed}
    if system == "envoy":
        a = _envoy_handshakes(_get_text(pair.a.ready_port, "/stats?filter=ssl.handshake"))
        b = _envoy_handshakes(_get_text(pair.b.ready_port, "/stats?filter=ssl.handshake"))
        if a <= 0 or b <= 0:
            raise BenchError(f"no mTLS evidence: envoy ssl.handshake A={a}, B={b}")
        return {"a_ssl_handshakes": a, "b_ssl_handshakes": b}
    infos = {}
    for side in ("a", "b"):
        try:
            infos[side] = haproxy_show_info(pair.files[f"stats_{side}"])
        except OSError as exc:
            raise BenchError(f"haproxy {side.upper()} stats socket: {exc}") from exc
    counts = {side: int(info.get("CumSslConns", "0") or 0) for side, info in infos.items()}
    if counts["a"] <= 0 or counts["b"] <= 0:
        raise BenchError(f"no mTLS evidence: haproxy CumSslConns {counts}")
    return {f"{side}_cum_ssl_conns": n for side, n in counts.items()}


def final_state(system: str, pair: Pair) -> dict[str, Any]:
    """Counters worth keeping at the end of a trial (errors, handshakes); best effort."""
    out: dict[str, Any] = {}
    for side, spec in (("a", pair.a), ("b", pair.b)):
        try:
            if system == "meshlet":
                out[f"{side}_metrics"] = _get_text(spec.ready_port, "/metrics")
            elif system == "envoy":
                path = "/stats?filter=" + quote(ENVOY_FINAL_STATS)
                out[f"{side}_stats"] = _get_text(spec.ready_port, path)
            else:
                out[f"{side}_show_info"] = haproxy_show_info(pair.files[f"stats_{side}"])
        except (BenchError, OSError) as exc:
            out[f"{side}_error"] = str(exc)
    return out
