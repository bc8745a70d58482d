"""Small shared helpers: errors, constants, sockets and HTTP probes."""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

from meshlet.ports import free_port as _free_port

MIB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
PROXY_CORE = 0
LOAD_CORE = 1
LOOPBACK = "127.0.0.1"


class BenchError(Exception):
    """A failure of one system or one step; reported, then the run goes on."""


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago (outside the
    ephemeral range, see meshlet.ports)."""
    return _free_port(LOOPBACK)


def port_open(port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on the loopback port."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET on a fresh connection; returns (status, body)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """Status of GET path, or None when the request fails."""
    try:
        return http_get(port, path, timeout)[0]
    except (OSError, http.client.HTTPException):
        return None


def sleep_until(deadline: float, step: float) -> bool:
    """Sleep one step unless the deadline has passed; False when it has."""
    now = time.monotonic()
    if now >= deadline:
        return False
    time.sleep(min(step, deadline - now))
    return True
