"""Closing a multiplexed client connection that has carried no stream for a while."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from meshlet.proxy.context import ListenerCtx

__all__ = ["IdleClose"]


class IdleClose:
    """For a connection that serves many streams (HTTP/2 from clients, mux from peers):
    after `idle_timeout` with no stream open, `shutdown()` (graceful: GOAWAY, close).
    The class using it has `ctx`, `streams`, `idle_timer` and `shutdown`."""

    __slots__ = ()

    ctx: ListenerCtx
    streams: dict[int, Any]
    idle_timer: asyncio.TimerHandle | None

    if TYPE_CHECKING:
        def shutdown(self) -> None: ...

    def _arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        # The slot is the connection class's own (this mixin has none: no __dict__).
        self.idle_timer = self.ctx.loop.call_later(  # type: ignore[misc]
            self.ctx.cfg.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self.idle_timer = None  # type: ignore[misc]
        if self.streams:
            self._arm_idle()
            return
        self.shutdown()
