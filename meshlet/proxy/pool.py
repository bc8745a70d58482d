"""Upstream HTTP/1.1 connection pools, one idle list per endpoint.

Rules:
1. Idle connections are reused last-in first-out (the warmest first), at most
   `max_idle` per endpoint; past that a released connection is closed.
2. A connection idle longer than `idle_timeout` is closed by a sweep that runs once a
   second for all pools, so the hot path sets one float per release and arms no timer.
3. A connection the peer closed while idle leaves the pool by itself (`discard`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Generic, Protocol, TypeVar

__all__ = ["Pool", "Poolable"]


class Poolable(Protocol):
    idle_since: float

    def close_idle(self) -> None: ...


C = TypeVar("C", bound=Poolable)


class Pool(Generic[C]):
    __slots__ = ("_loop", "_sweeper", "idle", "idle_timeout", "max_idle")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float, max_idle: int):
        self._loop = loop
        self.idle: dict[tuple[str, int, str], list[C]] = {}
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._sweeper: asyncio.TimerHandle | None = None

    # `idle` (endpoint key -> idle connections, warmest last) is read directly by the
    # HTTP/1 fast path; everything that changes it goes through the methods below.

    def get(self, key: tuple[str, int, str]) -> C | None:
        idle = self.idle.get(key)
        if idle:
            return idle.pop()
        return None

    def put(self, key: tuple[str, int, str], conn: C, now: float) -> None:
        idle = self.idle.get(key)
        if idle is None:
            idle = self.idle[key] = []
        if len(idle) >= self.max_idle:
            conn.close_idle()
            return
        conn.idle_since = now
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(1.0, self._sweep)

    def discard(self, key: tuple[str, int, str], conn: C) -> None:
        idle = self.idle.get(key)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def idle_count(self) -> int:
        return sum(len(v) for v in self.idle.values())

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self._loop.time() - self.idle_timeout
        left = 0
        for key, idle in list(self.idle.items()):
            # Oldest first: stop at the first one still fresh.
            n = 0
            while n < len(idle) and idle[n].idle_since <= cutoff:
                n += 1
            if n:
                stale, idle[:n] = idle[:n], []
                for c in stale:
                    c.close_idle()
            if not idle:
                del self.idle[key]
            left += len(idle)
        if left:
            self._sweeper = self._loop.call_later(1.0, self._sweep)

    def close_all(self) -> None:
        for idle in self.idle.values():
            for c in idle:
                c.close_idle()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
