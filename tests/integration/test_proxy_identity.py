"""A proxy with a control plane: certified before ready, renewed with its certificate,
kept through a control-plane outage while valid. Real processes, real TLS."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from helpers import (
    TD,
    Control,
    HttpBackend,
    ProxyProcess,
    eventually,
    http_request,
    metric,
    start_control,
)


def _identity_env(control: Control, tmp_path: Path, account: str = "web",
                  token: str | None = None) -> tuple[dict[str, str], Path]:
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(control.anchors)
    token_file = tmp_path / "token"
    token_file.write_text(token if token is not None else control.token("default", account))
    return {
        "MESHLET_CONTROL_ADDR": f"127.0.0.1:{control.port}",
        "MESHLET_TRUST_ANCHORS": str(anchors),
        "MESHLET_IDENTITY": f"spiffe://{TD}/ns/default/sa/{account}",
        "MESHLET_JOIN_TOKEN_FILE": str(token_file),
    }, token_file


def _config(p: ProxyProcess) -> dict:  # type: ignore[type-arg]
    return json.loads(http_request(p.admin_port, path="/config").body)  # type: ignore[no-any-return]


def test_proxy_is_ready_once_certified(control: Control, backend: HttpBackend,
                                       tmp_path: Path) -> None:
    env, _ = _identity_env(control, tmp_path)
    with ProxyProcess(app=backend.port, env=env, ready_timeout=15) as p:
        cfg = _config(p)
        assert cfg["mode"] == "meshed"
        assert cfg["identity"]["identity"] == f"spiffe://{TD}/ns/default/sa/web"
        assert cfg["identity"]["valid"] is True
        m = p.metrics()
        assert metric(m, "identity_cert_valid") == 1
        expiry = metric(m, "identity_cert_expiration_timestamp_seconds")
        assert time.time() + 23 * 3600 < expiry < time.time() + 24 * 3600 + 120
        assert http_request(p.inbound_port, path="/").status == 200


def test_a_bad_token_keeps_the_proxy_not_ready(control: Control, backend: HttpBackend,
                                               tmp_path: Path) -> None:
    env, _ = _identity_env(control, tmp_path, token="mjt1.forged.token")
    p = ProxyProcess(app=backend.port, env=env)
    penv = p.env()
    log = tmp_path / "proxy.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "meshlet", "proxy"], env=penv,
                                stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    try:
        def refused() -> bool:
            try:
                cfg = json.loads(http_request(p.admin_port, path="/config").body)
            except (OSError, EOFError, ValueError):
                return False
            return "401" in (cfg["identity"]["last_error"] or "")

        eventually(refused, timeout=15)
        assert http_request(p.admin_port, path="/ready").status == 503
        time.sleep(1.5)  # retries go on with backoff; it stays not ready
        assert http_request(p.admin_port, path="/ready").status == 503
        text = log.read_text()
        assert text.count("cannot get a certificate") == 1  # logged once per streak
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_renewal_uses_the_certificate_and_survives_an_outage(
    backend: HttpBackend, tmp_path: Path
) -> None:
    state = tmp_path / "control"
    with contextlib.ExitStack() as stack:
        gen = start_control(state, lifetime="10s")
        control = next(gen)
        stack.callback(lambda: next(gen, None))
        env, token_file = _identity_env(control, tmp_path)
        p = stack.enter_context(ProxyProcess(app=backend.port, env=env, ready_timeout=15))
        first = _config(p)["identity"]["not_after"]
        token_file.unlink()  # from now on only the certificate can prove the identity

        def renewed() -> bool:
            return _config(p)["identity"]["not_after"] != first

        eventually(renewed, timeout=15)
        assert metric(p.metrics(), "identity_cert_refresh_total", result="ok") >= 2
        assert http_request(p.admin_port, path="/ready").status == 200

        # The control plane goes away: the proxy keeps its certificate while valid,
        # counts its failures, then is not ready once the certificate has expired.
        next(gen, None)
        eventually(lambda: metric(p.metrics(), "identity_cert_refresh_total",
                                  result="failure") >= 1, timeout=15)
        eventually(lambda: http_request(p.admin_port, path="/ready").status == 503,
                   timeout=15)
        assert metric(p.metrics(), "identity_cert_valid") == 0
        assert "cannot get a certificate" in p.stderr()
