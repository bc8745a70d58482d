"""The proxy's workload identity: obtain a certificate, keep it fresh, say how it is.

Rules:
1. With a control plane configured, the proxy is not ready until it holds a valid
   certificate for its identity; without one it runs standalone and plaintext, and says
   so (log, /config).
2. The first certificate is bought with the join token; later ones with the current
   certificate (the control plane accepts it as proof of the same identity).
3. Renewal starts at 70 % of the lifetime, minus up to 5 % jitter so that proxies started
   together do not renew together. A failed attempt keeps the current certificate and
   retries with exponential backoff (1 s doubling to 60 s, with jitter); the failure is
   logged once per streak and counted. An expired certificate makes the proxy not ready.
4. `ssl` loads certificates only from files: key and chain live in a private directory
   (mode 0700, on tmpfs when /dev/shm exists) removed at exit.
5. The key, the CSR and the exchange with the control plane happen in a short-lived child
   (`meshlet.identity.certify_cmd`), so the proxy never loads `cryptography` (~11 MB).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import random
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshlet.identity.spiffe import parse_identity

if TYPE_CHECKING:
    from meshlet.proxy.server import Proxy

__all__ = ["IdentityError", "IdentityManager"]

log = logging.getLogger("meshlet.identity")

CERTIFY_TIMEOUT = 30.0
RENEW_AT = 0.70
JITTER = 0.05
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0


class IdentityError(Exception):
    """A certificate request failed; the message says why."""


class IdentityManager:
    def __init__(self, proxy: Proxy) -> None:
        cfg = proxy.cfg
        assert cfg.control_addr and cfg.identity and cfg.trust_anchors and cfg.join_token_file
        self.proxy = proxy
        self.identity = parse_identity(cfg.identity)
        self.control = cfg.control_addr
        self.anchors_path = Path(cfg.trust_anchors)
        self.anchors = self.anchors_path.read_bytes()
        self.token_file = Path(cfg.join_token_file)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="meshlet-identity-", dir=shm))
        self.have_cert = False
        self.not_after = 0.0  # unix time
        self.not_before = 0.0
        self.last_error: str | None = None
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._clients: dict[str, ssl.SSLContext] = {}
        self._server: ssl.SSLContext | None = None
        m = proxy.metrics
        m.gauge("identity_cert_expiration_timestamp_seconds",
                "When this proxy's certificate expires (unix time; 0: none yet).",
                lambda: [((("identity", self.identity.uri),), self.not_after)])
        m.gauge("identity_cert_valid", "1 while this proxy holds a valid certificate.",
                lambda: [((), 1.0 if self.valid() else 0.0)])

    def valid(self) -> bool:
        return self.have_cert and time.time() < self.not_after

    def start(self) -> None:
        self._task = self.proxy.loop.create_task(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        shutil.rmtree(self.dir, ignore_errors=True)

    def view(self) -> dict[str, Any]:
        return {
            "identity": self.identity.uri,
            "control_plane": str(self.control),
            "valid": self.valid(),
            "not_after": dt.datetime.fromtimestamp(self.not_after, dt.UTC).isoformat()
            if self.have_cert else None,
            "last_error": self.last_error,
        }

    # --- the refresh loop -------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._refresh()
            except (IdentityError, OSError, ValueError) as e:
                self.failures += 1
                self.proxy.metrics.counter(
                    "identity_cert_refresh_total", "Certificate requests, by result.",
                    (("result", "failure"),))
                if self.last_error is None:
                    log.error("cannot get a certificate for %s (keeping the current one "
                              "while valid; retrying with backoff): %s", self.identity, e)
                self.last_error = str(e)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            if self.last_error is not None:
                log.info("certificate for %s obtained again after %d failure(s)",
                         self.identity, self.failures)
            self.last_error = None
            self.failures = 0
            life = self.not_after - self.not_before
            renew_at = self.not_before + life * (RENEW_AT - random.uniform(0, JITTER))
            await asyncio.sleep(max(1.0, renew_at - time.time()))

    async def _refresh(self) -> None:
        argv = [sys.executable, "-m", "meshlet.identity.certify_cmd",
                "--control", str(self.control), "--anchors", str(self.anchors_path),
                "--identity", self.identity.uri, "--dir", str(self.dir)]
        argv += ["--renew"] if self.valid() else ["--token-file", str(self.token_file)]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CERTIFY_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise IdentityError("certificate request timed out") from None
        try:
            info = json.loads(out)
        except ValueError:
            info = {"error": err.decode(errors="replace").strip()[-300:] or "no answer"}
        if proc.returncode != 0 or "error" in info:
            raise IdentityError(str(info.get("error")))
        self.have_cert = True
        for ctx in (*self._clients.values(), *([self._server] if self._server else [])):
            ctx.load_cert_chain(self.dir / "chain.pem", self.dir / "key.pem")
        self.not_before = float(info["not_before"])
        self.not_after = float(info["not_after"])
        self.proxy.metrics.counter("identity_cert_refresh_total",
                                   "Certificate requests, by result.", (("result", "ok"),))
        log.info("certificate for %s valid until %s", self.identity,
                 dt.datetime.fromtimestamp(self.not_after, dt.UTC).isoformat())

    def client_context(self, alpn: str | None = None) -> ssl.SSLContext:
        """A TLS 1.3 client context presenting the current certificate. Contexts with an
        ALPN (the data path's) are cached, and get each renewed certificate."""
        ctx = self._clients.get(alpn) if alpn else None
        if ctx is None:
            ctx = ssl.create_default_context(cadata=self.anchors.decode())
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            if alpn:
                # The peer is checked by its SPIFFE ID (mtls.open_upstream), not by name.
                ctx.check_hostname = False
                ctx.set_alpn_protocols([alpn])
                self._clients[alpn] = ctx
            ctx.load_cert_chain(self.dir / "chain.pem", self.dir / "key.pem")
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 only, a client certificate from the mesh required, mesh ALPNs."""
        if self._server is None:
            from meshlet.proxy.mtls import ALPN_H1, ALPN_H2, ALPN_MUX, ALPN_TCP

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=self.anchors.decode())
            ctx.set_alpn_protocols([ALPN_H1, ALPN_TCP, ALPN_H2, ALPN_MUX])
            ctx.load_cert_chain(self.dir / "chain.pem", self.dir / "key.pem")
            self._server = ctx
        return self._server
