"""Two meshed proxies and a control plane: mTLS between them, identities verified both
ways, the client's identity given to the app, inbound authorization. Real processes."""

from __future__ import annotations

import json
from pathlib import Path

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
            m = b.metrics()
            assert metric(m, "inbound_authz_allow_total", client_id=CLIENT) >= 1
            # Both requests rode one pooled mTLS connection.
            assert metric(m, "tcp_open_total", direction="inbound", peer="src",
                          tls="true") == 1

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
