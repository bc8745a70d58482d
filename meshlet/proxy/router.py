"""The outbound HTTP proxy listener's routing: each request names its destination.

Apps reach services by name through this listener (`HTTP_PROXY=http://127.0.0.1:4140`):
a request in absolute form (`GET http://backend:8080/x`) or with a Host header goes to
the destination `host:port` (port 80 if none), looked up in discovery. Mesh services
get mTLS and balancing; names the mesh does not know go out unmeshed, resolved by DNS.

Rules:
1. Absolute-form requests are forwarded in origin form with `Host` set to the target's
   authority (RFC 9112 3.2.2); `Proxy-Connection` and `Proxy-Authorization` are dropped.
2. `http://` targets are routed per request; `https://` gets 400 (TLS from the app to a
   meshed service is pointless: the mesh encrypts).
3. `CONNECT host:port` opens a tunnel to that destination (how gRPC clients and others
   use `http_proxy`): after `200 Connection Established` the bytes are taken up like a
   connection to an outbound listener for `host:port` (protocol detection: HTTP/2 is
   balanced per stream, HTTP/1 per request, anything else per connection).
4. A request or tunnel for one of this proxy's own listeners is refused (400
   `proxy_loop`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from meshlet.proto.http1 import LocalProtocolError, RequestHead

if TYPE_CHECKING:
    from meshlet.proxy.balance import Target
    from meshlet.proxy.discovery import DiscoveryClient

__all__ = ["Router"]

_AUTHORITY_RE = re.compile(rb"([A-Za-z0-9](?:[-A-Za-z0-9.]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                           rb"(?::([0-9]{1,5}))?")
_DROP = frozenset((b"host", b"proxy-connection", b"proxy-authorization"))
_LOCAL = frozenset(("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"))


class Router:
    __slots__ = ("discovery", "own_ports")

    def __init__(self, discovery: DiscoveryClient) -> None:
        self.discovery = discovery
        self.own_ports: set[int] = set()

    def tunnel(self, req: RequestHead) -> tuple[str, int]:
        """The destination of a CONNECT request (authority form, a port required)."""
        m = _AUTHORITY_RE.fullmatch(req.target)
        if m is None or not m.group(2):
            raise LocalProtocolError(400, "invalid_connect_target")
        host = m.group(1).decode().strip("[]").lower()
        port = int(m.group(2))
        if not 0 < port < 65536:
            raise LocalProtocolError(400, "invalid_connect_target")
        if port in self.own_ports and host in _LOCAL:
            raise LocalProtocolError(400, "proxy_loop")
        return host, port

    def route(self, req: RequestHead) -> tuple[Target, bytes, bytes]:
        """The request's destination, and for the absolute form the start line and the
        Host line to forward it with (b"", b"": forward the head as received)."""
        t = req.target
        line = add = b""
        if t.startswith(b"/"):
            authority = req.host
        elif t[:7].lower() == b"http://":
            rest = t[7:]
            end = len(rest)
            for sep in (b"/", b"?", b"#"):
                i = rest.find(sep)
                if 0 <= i < end:
                    end = i
            authority = rest[:end].lower()
            path = rest[end:] or b"/"
            if path[:1] != b"/":
                path = b"/" + path
            if b"@" in authority:
                raise LocalProtocolError(400, "userinfo_in_target")
            req.drop = req.drop | _DROP
            line = req.method + b" " + path + (b" HTTP/1.1\r\n" if req.version == 11
                                               else b" HTTP/1.0\r\n")
            add = b"Host: " + authority + b"\r\n"
            req.target = path
            req.host = authority
            req.needs_rewrite = True
        elif req.method == b"CONNECT":
            raise LocalProtocolError(405, "connect_unsupported")
        else:
            raise LocalProtocolError(400, "unsupported_target")
        m = _AUTHORITY_RE.fullmatch(authority)
        if m is None:
            raise LocalProtocolError(400, "invalid_authority")
        host = m.group(1).decode().strip("[]")
        port = int(m.group(2)) if m.group(2) else 80
        if not 0 < port < 65536:
            raise LocalProtocolError(400, "invalid_authority")
        if port in self.own_ports and host in _LOCAL:
            raise LocalProtocolError(400, "proxy_loop")
        return self.discovery.destination(host, port), line, add
