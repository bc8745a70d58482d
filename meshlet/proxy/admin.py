"""The admin server: /metrics, /live, /ready, /shutdown, /config.

Rules:
1. It listens apart from the data path (default 127.0.0.1:4191) and shares its strict
   request parser; bodies are not accepted.
2. POST /shutdown is honoured only from a loopback address.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from meshlet.config import Addr
from meshlet.proto.http1 import LocalProtocolError, parse_request
from meshlet.proxy.errors import error_response

if TYPE_CHECKING:
    from meshlet.proxy.server import Proxy

__all__ = ["start_admin"]


def _response(status: int, body: bytes, ctype: bytes = b"text/plain; charset=utf-8",
              close: bool = False) -> bytes:
    phrase = {200: b"OK", 202: b"Accepted", 403: b"Forbidden", 404: b"Not Found",
              405: b"Method Not Allowed", 503: b"Service Unavailable"}.get(status, b"OK")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
            % (status, phrase, ctype, len(body), b"connection: close\r\n" if close else b"")
            ) + body


class _Admin(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = b""
        self.busy = False  # a /ready probe is under way: answer in order after it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while self.buf and not self.transport.is_closing():
            try:
                req = parse_request(self.buf, 16384, 4096)
            except LocalProtocolError as e:
                self.transport.write(error_response(e.status, e.reason))
                self.transport.close()
                return
            if req is None:
                return
            if req.body != 0 and req.content_length:
                self.transport.write(error_response(400, "admin_body_not_accepted"))
                self.transport.close()
                return
            self.buf = self.buf[req.end:]
            if req.target.split(b"?", 1)[0] == b"/ready":
                self.busy = True
                self.proxy.loop.create_task(self._ready(req.close))
                return
            self.transport.write(self._handle(req.method, req.target))
            if req.close:
                self.transport.close()
                return

    def _handle(self, method: bytes, target: bytes) -> bytes:
        proxy = self.proxy
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            return _response(200, proxy.metrics.render().encode(),
                             b"text/plain; version=0.0.4; charset=utf-8")
        if path == b"/live":
            return _response(200, b"live\n")
        if path == b"/config":
            import json  # only when asked: `json` costs an idle proxy ~150 KB RSS

            body = json.dumps(proxy.config_view(), indent=2).encode() + b"\n"
            return _response(200, body, b"application/json")
        if path == b"/shutdown":
            if method != b"POST":
                return _response(405, b"use POST\n")
            peer = self.transport.get_extra_info("peername")
            host = peer[0] if peer else ""
            import ipaddress  # only here: not loaded by every proxy

            try:
                loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                return _response(403, b"shutdown is allowed from localhost only\n")
            proxy.begin_shutdown()
            return _response(202, b"shutting down\n", close=True)
        return _response(404, b"not found: /metrics /live /ready /config /shutdown\n")


    async def _ready(self, close: bool) -> None:
        why = await self.proxy.not_ready_reason()
        if self.transport.is_closing():
            return
        if why is None:
            self.transport.write(_response(200, b"ready\n"))
        else:
            self.transport.write(_response(503, f"not ready: {why}\n".encode()))
        self.busy = False
        if close:
            self.transport.close()
        else:
            self._process()


async def start_admin(proxy: Proxy, addr: Addr) -> asyncio.AbstractServer:
    from meshlet.proxy.server import bind

    return await proxy.loop.create_server(lambda: _Admin(proxy), sock=bind(addr, 64))
