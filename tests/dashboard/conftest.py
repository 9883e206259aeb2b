"""Fixtures for the dashboard tests.

- `dashboard_cluster(...)`: an async context manager for tests that run on one loop
  (`taskcore.testing.run`): a scheduler with its dashboard, and workers, all in this loop.
- `LiveCluster`: the same in a background thread's loop, for the browser and proxy tests,
  whose Playwright (sync API) and Client own the main thread.
- `browser`: one headless Chromium per test module (launching costs ~0.7 s).
- `PageWatch`: what a page logged, threw, requested and got back.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import pytest
import uvloop

from taskcore.testing import cluster, import_required, require

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def taskcore_logs_at_info():
    """The schedulers here log at INFO, as `core-scheduler` does by default, so the logs
    page and API have INFO records to show (a LogBuffer keeps what the process logs)."""
    import logging

    lg = logging.getLogger("taskcore")
    level = lg.level
    lg.setLevel(logging.INFO)
    yield
    lg.setLevel(level)


@contextlib.asynccontextmanager
async def dashboard_cluster(n_workers=2, prefix="", nthreads=1, worker_kwargs=None,
                            **scheduler_kwargs):
    """`async with dashboard_cluster() as (scheduler, workers, dashboard):`."""
    kw = {"dashboard_address": "127.0.0.1:0", "dashboard_prefix": prefix, **scheduler_kwargs}
    async with cluster(n_workers=n_workers, nthreads=nthreads, scheduler_kwargs=kw,
                       worker_kwargs=worker_kwargs) as (s, ws):
        await asyncio.wait_for(s.dashboard.ready.wait(), 10)
        yield s, ws, s.dashboard


class LiveCluster:
    """A scheduler with its dashboard and `n_workers` workers on a uvloop loop in a
    background thread. `url` is the dashboard's base (ending in the prefix and "/")."""

    def __init__(self, n_workers=2, prefix="", nthreads=1):
        self.n_workers = n_workers
        self.prefix = prefix
        self.nthreads = nthreads
        self.scheduler = self.dashboard = self.loop = None
        self._stop = None
        self._started = threading.Event()
        self._error = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard.port}{self.dashboard.prefix}/"

    @property
    def address(self) -> str:
        return self.scheduler.address

    def call(self, fn, timeout=10):
        """Run `fn()` on the cluster's loop (where the scheduler's state lives)."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, name="dashboard-test-cluster",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the test cluster did not start within 30 s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self):
        try:
            uvloop.run(self._main())
        except BaseException as e:     # noqa: BLE001 - handed to the main thread
            self._error = e
            self._started.set()

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with dashboard_cluster(self.n_workers, self.prefix, self.nthreads) as (s, ws, d):
            self.scheduler, self.workers, self.dashboard = s, ws, d
            self._started.set()
            await self._stop.wait()

    def __exit__(self, *exc):
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def browser():
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = import_required("playwright.sync_api", "pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    d = Path(os.environ.get("TASKCORE_SCREENSHOT_DIR") or REPO / "build" / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


class PageWatch:
    """Collects a page's console errors, uncaught exceptions, requests, failed responses
    and WebSockets (with the frames each received)."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.bad_responses: list[str] = []
        self.websockets: list = []
        self.frames: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("requestfailed", lambda r: self.errors.append(
            f"request failed: {r.url} {r.failure}"))
        page.on("response", self._response)
        page.on("websocket", self._websocket)

    def _console(self, msg):
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def _response(self, resp):
        if resp.status >= 400:
            self.bad_responses.append(f"{resp.status} {resp.url}")

    def _websocket(self, ws):
        self.websockets.append(ws.url)
        ws.on("framereceived", lambda payload: self.frames.append(ws.url))

    def assert_clean(self):
        assert not self.errors, self.errors
        assert not self.bad_responses, self.bad_responses
