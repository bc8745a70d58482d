"""Errors become HTTP responses here, and only here.

Every response the proxy makes up itself carries `meshlet-proxy-error: <reason>` so a
user can tell a proxy failure from an application one. Status by cause:
400 malformed, 405 unsupported method, 408 request-head timeout, 414/431 too long,
502 upstream failed (refused, reset, malformed response), 503 no endpoints,
504 timeout (connect or response).
"""

from __future__ import annotations

from http import HTTPStatus

__all__ = ["error_response"]

_CACHE: dict[tuple[int, str, bool], bytes] = {}


def error_response(status: int, reason: str, close: bool = True) -> bytes:
    """The whole response for a proxy-made error (cached: reasons are a fixed set)."""
    key = (status, reason, close)
    out = _CACHE.get(key)
    if out is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        body = f"{status} {phrase}: {reason}\n".encode()
        out = (
            f"HTTP/1.1 {status} {phrase}\r\n"
            f"content-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\n"
            f"meshlet-proxy-error: {reason}\r\n"
            + ("connection: close\r\n" if close else "")
            + "\r\n"
        ).encode() + body
        if len(_CACHE) < 256:
            _CACHE[key] = out
    return out
