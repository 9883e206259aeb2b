"""`DashboardServer`: the scheduler's HTTP dashboard, JSON API and Prometheus /metrics.

It runs in the scheduler's own event loop, so everything it does there is quick and
bounded (see api.py). Starting it costs the scheduler a socket bind: `start()` binds and
listens, then returns; the HTTP stack (aiohttp, ~250 ms to import) is imported in an
executor thread and the app comes up in a background task. A request that arrives
meanwhile waits in the listen backlog and is answered once `ready` is set.
"""
from __future__ import annotations

import asyncio
import importlib
import logging

from taskcore.dashboard.api import PrefixProgress
from taskcore.dashboard.binding import bind_socket, parse_address
from taskcore.dashboard.link import format_link, normalize_prefix
from taskcore.dashboard.loop_delay import LoopDelay

logger = logging.getLogger("taskcore.dashboard")


class DashboardServer:
    """`DashboardServer(scheduler, ":8787", prefix="/a/b")`; `await start()`; `await close()`.

    After start: `host`, `port` (the real port, which differs from the requested one when
    that was taken), `prefix`, `ready` (set once requests are served), `link`.
    """

    def __init__(self, scheduler, address: str = ":8787", prefix: str = "",
                 interval: float = 0.5):
        self.scheduler = scheduler
        self.address = address
        self._want_host, self._want_port = parse_address(address)   # bad input fails here
        self.prefix = normalize_prefix(prefix)
        if any(c in self.prefix for c in "?#%{} \\"):
            raise ValueError(f"dashboard prefix {prefix!r}: only path characters are allowed")
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        self.interval = interval
        self.host: str | None = None
        self.port: int | None = None
        self.ready = asyncio.Event()
        self.loop_delay = LoopDelay()
        self.progress = PrefixProgress()
        self.error: BaseException | None = None
        self.closing = False
        self._sock = None
        self._runner = None
        self._handlers = None
        self._serving = None
        self._closed = None

    @property
    def log_buffer(self):
        """The scheduler's taskcore.logs.LogBuffer (the logs page is empty without one)."""
        return getattr(self.scheduler, "log_buffer", None)

    @property
    def link(self) -> str | None:
        """The status page's URL on this machine (wildcard hosts become 127.0.0.1)."""
        if self.port is None:
            return None
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return format_link(host, self.port, self.prefix, template="{scheme}://{host}:{port}"
                                                                  "{prefix}/status")

    async def start(self) -> "DashboardServer":
        if self._sock is not None or self.closing:
            return self
        self._sock = bind_socket(self._want_host, self._want_port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.loop_delay.start()
        self._serving = asyncio.get_running_loop().create_task(self._serve())
        return self

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # the import runs in a thread, so the scheduler's loop keeps serving meanwhile
            routes = await loop.run_in_executor(None, importlib.import_module,
                                                "taskcore.dashboard.routes")
            self._runner, self._handlers = await routes.start_app(self, self._sock)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.error = e
            logger.exception("the dashboard on port %s failed to start", self.port)
            return
        self.ready.set()
        logger.info("dashboard at %s", self.link)

    async def close(self) -> None:
        """Stop serving; live-update sockets are closed at once. Idempotent."""
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closed)

    async def _close(self) -> None:
        self.closing = True
        self.loop_delay.stop()
        if self._serving is not None and not self._serving.done():
            self._serving.cancel()
            try:
                await self._serving
            except asyncio.CancelledError:
                pass
        if self._handlers is not None:
            await self._handlers.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._sock is not None:
            self._sock.close()
        self.ready.clear()
