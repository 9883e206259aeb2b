"""`proxy/worker/<ident>/metrics`: a worker's own /metrics, fetched by the scheduler.

A worker may serve Prometheus metrics at its own HTTP address (`dashboard_address` in its
registration, like "http://127.0.0.1:40123"). The browser cannot be sent there: behind a
reverse proxy or a tunnel only the scheduler's dashboard is reachable, and a link to
another host:port would escape the prefix. So the dashboard fetches it server side, with
a deadline and a size cap, and only ever from an address a registered worker announced.
"""
from __future__ import annotations

import aiohttp

TIMEOUT = 5.0
MAX_BYTES = 16 * 2**20


class WorkerMetricsError(Exception):
    """The worker's metrics could not be fetched; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def metrics_url(peer) -> str:
    base = (peer.info or {}).get("dashboard_address")
    if not base:
        raise WorkerMetricsError(404, f"worker {peer.id} serves no metrics (it announced no "
                                      f"dashboard_address)")
    base = str(base)
    if not base.startswith(("http://", "https://")):
        raise WorkerMetricsError(502, f"worker {peer.id} announced a dashboard_address that "
                                      f"is not an http(s) URL: {base!r}")
    return base.rstrip("/") + "/metrics"


class WorkerMetricsFetcher:
    """One client session for the server's lifetime (connections to workers are reused)."""

    def __init__(self):
        self._session = None

    async def fetch(self, peer) -> tuple[str, bytes]:
        """(content type, body) of the worker's /metrics."""
        url = metrics_url(peer)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise WorkerMetricsError(502, f"{url} answered HTTP {resp.status}")
                if (resp.content_length or 0) > MAX_BYTES:
                    raise WorkerMetricsError(502, f"{url} answered more than {MAX_BYTES} bytes")
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > MAX_BYTES:
                        raise WorkerMetricsError(502, f"{url} answered more than {MAX_BYTES} "
                                                      f"bytes")
                    chunks.append(chunk)
                return resp.headers.get("Content-Type", "text/plain"), b"".join(chunks)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise WorkerMetricsError(502, f"cannot fetch {url}: {e or type(e).__name__}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
