"""Pick a free local TCP port that the kernel will not hand out on its own.

Binding port 0 returns a port from the ephemeral range, the same range the kernel
uses for the source port of every outgoing connection. A port learnt that way and
bound a moment later by another process can already be taken by some unrelated
client socket ("Address already in use"). Ports are therefore chosen at random
below the ephemeral range (read from /proc), checked by binding, and never handed
out twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading

__all__ = ["free_port"]

_LOW = 10000
_lock = threading.Lock()
_given: set[int] = set()
_rng = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that was free a moment ago and lies outside the kernel's
    ephemeral range (falls back to binding port 0 when that range leaves no room)."""
    high = _ephemeral_low() - 1
    if high - _LOW >= 1000:
        with _lock:
            for _ in range(200):
                port = _rng.randint(_LOW, high)
                if port not in _given and _bindable(host, port):
                    _given.add(port)
                    return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
