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
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import shutil
import ssl
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from meshlet.identity.client import Certified, CertifyError, certify
from meshlet.identity.spiffe import parse_identity

if TYPE_CHECKING:
    from meshlet.proxy.server import Proxy

__all__ = ["IdentityManager"]

log = logging.getLogger("meshlet.identity")

RENEW_AT = 0.70
JITTER = 0.05
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0


class IdentityManager:
    def __init__(self, proxy: Proxy) -> None:
        cfg = proxy.cfg
        assert cfg.control_addr and cfg.identity and cfg.trust_anchors and cfg.join_token_file
        self.proxy = proxy
        self.identity = parse_identity(cfg.identity)
        self.control = cfg.control_addr
        self.anchors = Path(cfg.trust_anchors).read_bytes()
        self.token_file = Path(cfg.join_token_file)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="meshlet-identity-", dir=shm))
        self.cert: Certified | None = None
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
        return self.cert is not None and time.time() < self.not_after

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
            if self.cert else None,
            "last_error": self.last_error,
        }

    # --- the refresh loop -------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._refresh()
            except (CertifyError, OSError, ValueError) as e:
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
        host, port = self.control.host, self.control.port
        if self.cert is not None and self.valid():
            got = await certify(host, port, self.anchors, self.identity, None,
                                self.client_context())
        else:
            token = self.token_file.read_text().strip()
            got = await certify(host, port, self.anchors, self.identity, token)
        self._install(got)
        self.proxy.metrics.counter("identity_cert_refresh_total",
                                   "Certificate requests, by result.", (("result", "ok"),))
        log.info("certificate for %s valid until %s", self.identity, got.not_after)

    def _install(self, got: Certified) -> None:
        from meshlet.identity.ca import parse_chain

        leaf = parse_chain(got.chain_pem)[0]
        key_pem = got.key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        # Write-then-rename so a reader never sees half a file.
        for name, data in (("key.pem", key_pem), ("chain.pem", got.chain_pem),
                           ("bundle.pem", got.bundle_pem)):
            tmp = self.dir / (name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.dir / name)
        self.cert = got
        for ctx in (*self._clients.values(), *([self._server] if self._server else [])):
            ctx.load_cert_chain(self.dir / "chain.pem", self.dir / "key.pem")
        self.not_before = leaf.not_valid_before_utc.timestamp()
        self.not_after = leaf.not_valid_after_utc.timestamp()

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
            from meshlet.proxy.mtls import ALPN_H1, ALPN_TCP

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=self.anchors.decode())
            ctx.set_alpn_protocols([ALPN_H1, ALPN_TCP])
            ctx.load_cert_chain(self.dir / "chain.pem", self.dir / "key.pem")
            self._server = ctx
        return self._server
