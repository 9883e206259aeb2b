"""The dashboard's aiohttp application: pages, static assets, the JSON API, /metrics.

Imported off the scheduler's start path (server.py imports it in an executor thread),
because `aiohttp.web` alone takes about a quarter of a second to import.

Every route lives under the prefix. Pages and assets refer to each other relatively
("static/dashboard.css", "api/v1/workers", "workers"), so the same files work at any
prefix and behind any proxy that forwards the prefix unchanged. The only answers outside
the prefix are redirects from "/" (and from the prefix without its slash) to the status
page, also relative.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from string import Template

from aiohttp import web

from taskcore.dashboard import api
from taskcore.dashboard.graph import task_graph
from taskcore.dashboard.live import PAGES, LiveHub
from taskcore.dashboard.metrics import CONTENT_TYPE, make_registry, render
from taskcore.dashboard.worker_proxy import WorkerMetricsError, WorkerMetricsFetcher

logger = logging.getLogger("taskcore.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
TITLES = {"status": "Status", "workers": "Workers", "graph": "Graph", "logs": "Logs"}


def page_html(name: str) -> str:
    """A page as served: the shell every page shares (static/page.html: the head, its
    assets and the navigation) around the page's own `static/<name>.body.html`."""
    shell = Template((STATIC / "page.html").read_text())
    return shell.substitute(title=TITLES[name], page=name,
                            body=(STATIC / f"{name}.body.html").read_text())
NO_CACHE = {"Cache-Control": "no-cache"}


class BadRequest(ValueError):
    """A query parameter that is not what the route takes (answered with 400)."""


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(obj, separators=(",", ":"), default=str),
                        status=status, content_type="application/json", headers=NO_CACHE)


def int_param(request, name: str, default: int, minimum: int = 0,
              maximum: int | None = None) -> int:
    """An integer query parameter: the default when absent, 400 when not an integer or
    below `minimum`, the cap when above `maximum` (a bounded answer, never a refusal)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"parameter {name!r} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise BadRequest(f"parameter {name!r} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        value = maximum
    return value


def limit_param(request, what: str, name: str = "limit") -> int:
    default, cap = api.LIMITS[what]
    return int_param(request, name, default, 1 if name == "limit" else 0, cap)


@web.middleware
async def errors(request, handler):
    try:
        return await handler(request)
    except BadRequest as e:
        return _json({"error": str(e)}, status=400)
    except web.HTTPException:
        raise
    except Exception as e:
        logger.exception("dashboard request %s failed", request.path)
        return _json({"error": f"{type(e).__name__}: {e}"}, status=500)


class Handlers:
    def __init__(self, server):
        self.server = server
        self.scheduler = server.scheduler
        self.hub = LiveHub(server, server.interval)
        self.registry = make_registry(server.scheduler, server.loop_delay)
        self.fetcher = WorkerMetricsFetcher()

    # -- pages -----------------------------------------------------------------------------
    def page(self, name):
        text = page_html(name)

        async def handler(request):
            return web.Response(text=text, content_type="text/html", headers=NO_CACHE)
        return handler

    @staticmethod
    def redirect(location):
        async def handler(request):
            raise web.HTTPFound(location)
        return handler

    # -- JSON API ------------------------------------------------------------------------------
    async def info(self, request):
        return _json(api.info(self.scheduler, self.server))

    async def workers(self, request):
        return _json(api.workers(self.scheduler, limit_param(request, "workers")))

    async def counts(self, request):
        return _json(api.task_counts(self.scheduler))

    async def prefixes(self, request):
        return _json(self.server.progress.rows(self.scheduler, limit_param(request, "prefixes")))

    async def task_stream(self, request):
        since = int_param(request, "since", 0, 0)
        return _json(api.task_stream(self.scheduler, since, limit_param(request, "task_stream")))

    async def graph(self, request):
        return _json(task_graph(self.scheduler, limit_param(request, "graph")))

    async def logs(self, request):
        return _json(api.logs(self.server.log_buffer, limit_param(request, "logs", "n")))

    async def health(self, request):
        return web.Response(text="ok", content_type="text/plain", headers=NO_CACHE)

    async def metrics(self, request):
        return web.Response(body=render(self.registry), headers={
            "Content-Type": CONTENT_TYPE, **NO_CACHE})

    async def worker_metrics(self, request):
        ident = request.match_info["ident"]
        peer = api.find_worker(self.scheduler, ident)
        if peer is None:
            return _json({"error": f"no worker {ident!r}"}, status=404)
        try:
            content_type, body = await self.fetcher.fetch(peer)
        except WorkerMetricsError as e:
            return _json({"error": str(e)}, status=e.status)
        return web.Response(body=body, headers={"Content-Type": content_type, **NO_CACHE})

    # -- live updates ------------------------------------------------------------------------
    async def stream(self, request):
        page = request.query.get("page")
        if page not in PAGES:
            raise BadRequest(f"parameter 'page' must be one of {sorted(PAGES)}, got {page!r}")
        if self.server.closing:
            return _json({"error": "the dashboard is closing"}, status=503)
        # no compression: the same text goes to every subscriber, and deflating it again per
        # subscriber is exactly the per-subscriber work the channel design avoids
        ws = web.WebSocketResponse(heartbeat=30.0, compress=False)
        await ws.prepare(request)
        channel = self.hub.channels[page]
        channel.subscribe(ws)
        try:
            if channel.last_sent is not None:
                await ws.send_str(channel.last_sent)
            async for _ in ws:      # the page sends nothing we act on; this waits for close
                pass
        finally:
            channel.unsubscribe(ws)
        return ws

    async def close(self):
        await self.hub.close()
        await self.fetcher.close()


def build_app(server) -> tuple[web.Application, Handlers]:
    h = Handlers(server)
    p = server.prefix
    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    r = app.router
    if p:
        r.add_get("/", h.redirect(p.lstrip("/") + "/status"))
        r.add_get(p, h.redirect(p.rsplit("/", 1)[1] + "/status"))
    r.add_get(p + "/", h.redirect("status"))
    for name in PAGES:
        r.add_get(f"{p}/{name}", h.page(name))
    r.add_static(f"{p}/static", STATIC)
    v1 = f"{p}/api/v1"
    r.add_get(f"{v1}/info", h.info)
    r.add_get(f"{v1}/workers", h.workers)
    r.add_get(f"{v1}/tasks/counts", h.counts)
    r.add_get(f"{v1}/tasks/prefixes", h.prefixes)
    r.add_get(f"{v1}/task-stream", h.task_stream)
    r.add_get(f"{v1}/graph", h.graph)
    r.add_get(f"{v1}/logs", h.logs)
    r.add_get(f"{v1}/health", h.health)
    r.add_get(f"{v1}/stream", h.stream)
    r.add_get(f"{p}/metrics", h.metrics)
    r.add_get(f"{p}/proxy/worker/{{ident}}/metrics", h.worker_metrics)
    return app, h


async def start_app(server, sock):
    """Serve `sock` (already bound and listening). Returns (runner, handlers)."""
    app, handlers = build_app(server)
    # shutdown_timeout: how long close() waits for requests in flight (a worker-metrics
    # fetch at worst); live-update sockets are closed by the hub before that
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, handlers
