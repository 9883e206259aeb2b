"""DashboardServer over real HTTP: routes, the prefix, redirects, bad parameters, the
busy-port fallback, start-up off the HTTP stack's import, live updates, prompt close."""
import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from taskcore.client import Client
from taskcore.dashboard.binding import parse_address
from taskcore.dashboard.routes import STATIC, TITLES, page_html
from taskcore.dashboard.server import DashboardServer
from taskcore.testing import run

from .conftest import dashboard_cluster

PAGES = ["status", "workers", "graph", "logs"]
API = ["info", "workers", "tasks/counts", "tasks/prefixes", "task-stream", "graph", "logs"]


def inc(x):
    return x + 1


async def get(session, url, allow_redirects=False):
    async with session.get(url, allow_redirects=allow_redirects) as r:
        return r.status, r.headers, await r.read()


@pytest.mark.parametrize("prefix", ["", "/a/b"])
def test_every_route_answers_under_the_prefix_and_nothing_outside(prefix):
    async def main():
        async with dashboard_cluster(prefix=prefix) as (s, ws, d), \
                Client(s.address, asynchronous=True) as c:
            await c.gather(c.map(inc, range(5)))
            host = f"http://127.0.0.1:{d.port}"
            base = host + prefix
            async with aiohttp.ClientSession() as h:
                for page in PAGES:
                    status, headers, body = await get(h, f"{base}/{page}")
                    assert status == 200 and headers["Content-Type"].startswith("text/html")
                    assert f'<body data-page="{page}">' in body.decode()
                for asset in ["dashboard.css", "common.js", "status.js", "favicon.svg"]:
                    status, _, body = await get(h, f"{base}/static/{asset}")
                    assert status == 200 and body == (STATIC / asset).read_bytes()
                for route in API:
                    status, headers, body = await get(h, f"{base}/api/v1/{route}")
                    assert status == 200, (route, body)
                    assert headers["Content-Type"].startswith("application/json")
                    json.loads(body)
                assert (await get(h, f"{base}/api/v1/health"))[::2] == (200, b"ok")
                status, _, body = await get(h, f"{base}/metrics")
                assert status == 200 and b"taskcore_scheduler_workers 2.0" in body

                # redirects are relative, so they stay right behind any proxy
                redirects = {f"{prefix}/": "status"}
                if prefix:
                    redirects.update({"/": "a/b/status", "/a/b": "b/status"})
                for path, location in redirects.items():
                    status, headers, _ = await get(h, host + path)
                    assert (status, headers["Location"]) == (302, location), path
                    status, _, _ = await get(h, f"{host}{path}", allow_redirects=True)
                    assert status == 200

                if prefix:
                    for path in ["/status", "/api/v1/info", "/metrics", "/static/common.js",
                                 "/api/v1/health", "/a/status"]:
                        assert (await get(h, host + path))[0] == 404, path

    run(main())


def test_pages_and_scripts_use_only_relative_references():
    for name in TITLES:
        refs = re.findall(r'(?:href|src)="([^"]*)"', page_html(name))
        assert refs, name
        for ref in refs:
            assert not ref.startswith(("/", "http:", "https:", "//")), (name, ref)
    for js in STATIC.glob("*.js"):
        text = js.read_text()
        # a string literal that starts with "/" + a letter would be an absolute path
        assert not re.search(r"""["'`]/[A-Za-z]""", text), js.name
        assert "location.origin" not in text and "location.host" not in text, js.name


def test_bad_parameters_get_400_with_a_json_error_and_big_ones_are_capped():
    async def main():
        async with dashboard_cluster(n_workers=1) as (s, ws, d):
            base = f"http://127.0.0.1:{d.port}/api/v1"
            async with aiohttp.ClientSession() as h:
                for q in ["task-stream?since=-1", "task-stream?since=x", "task-stream?limit=0",
                          "task-stream?limit=1.5", "graph?limit=abc", "graph?limit=0",
                          "logs?n=-5", "logs?n=ten", "workers?limit=none",
                          "tasks/prefixes?limit=-1", "stream", "stream?page=nope"]:
                    status, headers, body = await get(h, f"{base}/{q}")
                    assert status == 400, q
                    assert headers["Content-Type"].startswith("application/json")
                    err = json.loads(body)["error"]
                    assert "parameter" in err, (q, err)
                for q, field, cap in [("task-stream?limit=999999999", "limit", 10_000),
                                      ("logs?n=999999999", "n", 10_000),
                                      ("graph?limit=999999999", "limit", 5000),
                                      ("workers?limit=999999999", "limit", 10_000)]:
                    status, _, body = await get(h, f"{base}/{q}")
                    assert status == 200 and json.loads(body)[field] == cap, q

    run(main())


def test_parse_address():
    assert parse_address(":8787") == ("", 8787)
    assert parse_address("0.0.0.0:8787") == ("0.0.0.0", 8787)
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:8787") == ("::1", 8787)
    assert parse_address("8787") == ("", 8787)
    assert parse_address("localhost:80") == ("localhost", 80)
    for bad in ["", "host", ":", "::1:80", "[::1]80", "a:b", "1.2.3.4:70000", "[::1"]:
        with pytest.raises(ValueError, match="dashboard address"):
            parse_address(bad)
    with pytest.raises(TypeError):
        parse_address(None)


def test_binds_every_address_form():
    async def main():
        async with dashboard_cluster(n_workers=0) as (s, ws, d):
            for address, connect in [(":0", "127.0.0.1"), ("127.0.0.1:0", "127.0.0.1"),
                                     ("localhost:0", None), ("[::1]:0", "[::1]")]:
                server = DashboardServer(s, address, prefix="/z/")
                await server.start()
                try:
                    assert server.prefix == "/z" and server.port > 0
                    if address == ":0":
                        assert server.host in ("::", "0.0.0.0")
                    await asyncio.wait_for(server.ready.wait(), 10)
                    host = connect or (f"[{server.host}]" if ":" in server.host else server.host)
                    async with aiohttp.ClientSession() as h:
                        url = f"http://{host}:{server.port}/z/api/v1/health"
                        assert (await get(h, url))[::2] == (200, b"ok"), address
                finally:
                    await server.close()
            with pytest.raises(ValueError, match="prefix"):
                DashboardServer(s, ":0", prefix="/a?b")

    run(main())


def test_busy_port_falls_back_to_a_free_one_with_a_warning():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("taskcore.dashboard")
    log.addHandler(handler)

    async def main():
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            async with dashboard_cluster(n_workers=0) as (s, ws, d):
                second = DashboardServer(s, f"127.0.0.1:{port}")
                await second.start()
                try:
                    assert second.port != port and second.port > 0
                    await asyncio.wait_for(second.ready.wait(), 10)
                    async with aiohttp.ClientSession() as h:
                        url = f"http://127.0.0.1:{second.port}/api/v1/health"
                        assert (await get(h, url))[0] == 200
                finally:
                    await second.close()
                return port, second.port

    try:
        wanted, got = run(main())
    finally:
        log.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any(str(wanted) in m and str(got) in m for m in warnings), warnings


def test_start_binds_at_once_and_imports_aiohttp_afterwards():
    """In a fresh process: start() returns with the port bound before aiohttp.web is even
    imported, and a request sent at that moment waits in the backlog and is answered."""
    code = r"""
import asyncio, socket, sys, time
from taskcore.testing import run
from taskcore.scheduler import Scheduler

async def main():
    s = await Scheduler().start()
    from taskcore.dashboard.server import DashboardServer
    d = DashboardServer(s, "127.0.0.1:0")
    t0 = time.perf_counter()
    await d.start()
    took = time.perf_counter() - t0
    assert "aiohttp.web" not in sys.modules, "aiohttp.web imported on the start path"
    assert not d.ready.is_set() and d.port
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok"), answer
    assert d.ready.is_set()
    await d.close()
    await s.close()
    print("start took", took)
    assert took < 0.05, took

run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "start took" in out.stdout


def test_close_is_prompt_with_open_websockets_and_idempotent():
    async def main():
        async with dashboard_cluster(n_workers=1) as (s, ws, d):
            url = f"http://127.0.0.1:{d.port}/api/v1/stream"
            async with aiohttp.ClientSession() as h:
                socks = [await h.ws_connect(f"{url}?page={p}") for p in
                         ("status", "status", "workers", "graph", "logs")]
                for w in socks:
                    msg = await asyncio.wait_for(w.receive(), 5)
                    assert msg.type == aiohttp.WSMsgType.TEXT
                t0 = time.perf_counter()
                await d.close()
                took = time.perf_counter() - t0
                for w in socks:
                    msg = await asyncio.wait_for(w.receive(), 2)
                    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                    await w.close()
                assert took < 1.5, took
                await d.close()                                  # idempotent
                with pytest.raises(aiohttp.ClientConnectionError):
                    await get(h, f"http://127.0.0.1:{d.port}/api/v1/health")

    run(main())


def test_close_right_after_start_before_the_app_is_up():
    async def main():
        async with dashboard_cluster(n_workers=0) as (s, ws, d):
            early = DashboardServer(s, "127.0.0.1:0")
            await early.start()
            await early.close()
            assert not early.ready.is_set() and early.closing
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", early.port)
            await early.start()                     # a closed server stays closed
            assert early._serving.done()

    run(main())


def test_live_updates_build_one_snapshot_per_interval_for_all_subscribers():
    async def main():
        async with dashboard_cluster() as (s, ws, d), \
                Client(s.address, asynchronous=True) as c:
            url = f"http://127.0.0.1:{d.port}/api/v1/stream?page=status"
            async with aiohttp.ClientSession() as h:
                socks = [await h.ws_connect(url) for _ in range(4)]
                received = [[] for _ in socks]

                async def reader(i, w):
                    async for msg in w:
                        received[i].append(msg.data)

                readers = [asyncio.ensure_future(reader(i, w)) for i, w in enumerate(socks)]
                channel = d._handlers.hub.channels["status"]
                builds0 = channel.builds
                futures = c.map(inc, range(200))
                await c.gather(futures)
                t0 = time.monotonic()
                await asyncio.sleep(2.0)
                elapsed = time.monotonic() - t0
                # every subscriber got the same texts, built once per interval, not per socket
                assert all(r == received[0] for r in received[1:])
                assert channel.builds - builds0 <= elapsed / d.interval + 4
                # the task stream arrives as deltas: every computed task exactly once
                keys = []
                for text in received[0]:
                    keys += [row["key"] for row in json.loads(text)["task_stream"]["rows"]]
                assert sorted(keys) == sorted(f.key for f in futures)
                for w in socks:
                    await w.close()
                await asyncio.gather(*readers)

    run(main())


def test_worker_metrics_are_proxied_under_the_prefix():
    registry = CollectorRegistry()
    Gauge("fake_worker_thing", "a worker's own metric", registry=registry).set(42)

    async def metrics(request):
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def main():
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        worker_http = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with dashboard_cluster(prefix="/p") as (s, ws, d):
                a, b = ws
                s.workers[a.address].info["dashboard_address"] = worker_http
                s.workers[b.address].info["dashboard_address"] = "http://127.0.0.1:1"
                base = f"http://127.0.0.1:{d.port}/p"
                async with aiohttp.ClientSession() as h:
                    rows = json.loads((await get(h, f"{base}/api/v1/workers"))[2])["workers"]
                    paths = {r["address"]: r["metrics_path"] for r in rows}
                    assert paths[a.address] == "proxy/worker/w0/metrics"
                    status, _, body = await get(h, f"{base}/{paths[a.address]}")
                    assert status == 200 and b"fake_worker_thing 42.0" in body
                    # the worker's id works as well as its name
                    wid = next(r["id"] for r in rows if r["address"] == a.address)
                    status, _, body = await get(h, f"{base}/proxy/worker/{wid}/metrics")
                    assert status == 200 and b"fake_worker_thing" in body
                    status, _, body = await get(h, f"{base}/{paths[b.address]}")
                    assert status == 502 and "cannot fetch" in json.loads(body)["error"]
                    del s.workers[b.address].info["dashboard_address"]
                    status, _, body = await get(h, f"{base}/proxy/worker/w1/metrics")
                    assert status == 404 and "no metrics" in json.loads(body)["error"]
                    assert (await get(h, f"{base}/proxy/worker/nobody/metrics"))[0] == 404
        finally:
            await runner.cleanup()

    run(main())
