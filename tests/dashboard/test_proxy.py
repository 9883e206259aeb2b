"""The dashboard behind a real nginx that forwards `/some/prefix/`, seen in Chromium: every
page and asset loads through the proxy, live updates arrive through it, and no request,
WebSocket or link leaves the prefix."""
import os
import sys
import time
import urllib.error
import urllib.request

import cloudpickle
import pytest

from taskcore.client import Client
from taskcore.testing import require, wait_until

from .conftest import LiveCluster, PageWatch
from .nginx import NGINX, Nginx

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PREFIX = "/some/prefix"


def slow_step(x, delay=0.05):
    time.sleep(delay)
    return x + 1


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    require(os.path.exists(NGINX), f"{NGINX} is not installed (apt-get install nginx)")
    with LiveCluster(n_workers=2, prefix=PREFIX) as live, \
            Nginx(tmp_path_factory.mktemp("nginx"), live.dashboard.port, PREFIX) as proxy:
        yield live, proxy


def http(url):
    """(status, headers, body) without following redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_plain_http_through_the_proxy(proxied):
    live, proxy = proxied
    status, headers, _ = http(proxy.url)
    assert (status, headers["Location"]) == (302, "status")
    assert http(proxy.url + "api/v1/health")[::2] == (200, b"ok")
    status, _, body = http(proxy.url + "metrics")
    assert status == 200 and b"taskcore_scheduler_workers 2.0" in body
    status, _, body = http(proxy.url + "proxy/worker/w0/metrics")
    assert status == 200 and b"taskcore_worker_" in body
    # nginx forwards only the prefix
    assert http(f"http://127.0.0.1:{proxy.port}/status")[0] == 404


def test_every_page_loads_through_the_proxy_and_stays_inside_the_prefix(proxied, browser):
    live, proxy = proxied
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    watch = PageWatch(page)
    http_base = proxy.url
    ws_base = "ws://" + http_base.split("://", 1)[1]
    try:
        with Client(live.address) as client:
            page.goto(http_base)                                 # redirected to status
            assert page.url == http_base + "status"
            page.wait_for_selector("#workers-table tbody tr[data-worker]", timeout=10_000)
            # live updates arrive through the proxy's WebSocket: the bar moves
            futures = client.map(slow_step, range(30))
            wait_until(lambda: page.evaluate(
                "() => { const r = document.querySelector('.prow[data-prefix=\"slow_step\"]');"
                " return r && r.getAttribute('aria-valuenow') === '30'; }"),
                timeout=20, message="the progress bar to reach 30 through the proxy")
            client.gather(futures)
            frames = len(watch.frames)
            assert frames >= 2

            hrefs = set()
            for name in ["workers", "graph", "logs", "status"]:
                page.click(f"nav a[href='{name}']")             # the links themselves work
                page.wait_for_url(http_base + name)
                page.wait_for_selector("#live.on", timeout=10_000)
                hrefs |= set(page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)"))
            page.goto(http_base + "workers")
            page.wait_for_selector("#workers-table a[href]", timeout=10_000)
            hrefs |= set(page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)"))
            for f in futures:
                f.release()
    finally:
        context.close()

    watch.assert_clean()
    assert len(watch.frames) > frames                     # every page got its updates
    assert watch.requests and all(u.startswith(http_base) for u in watch.requests), \
        [u for u in watch.requests if not u.startswith(http_base)]
    assert len(watch.websockets) >= 5
    assert all(u.startswith(ws_base + "api/v1/stream?page=") for u in watch.websockets), \
        watch.websockets
    assert hrefs and all(h.startswith(http_base) for h in hrefs), hrefs
    assert http_base + "proxy/worker/w0/metrics" in hrefs
    # every asset the pages use was among the requests, and answered (no 4xx/5xx above)
    for asset in ["static/dashboard.css", "static/common.js", "static/status.js",
                  "static/workers.js", "static/graph.js", "static/logs.js", "static/favicon.svg",
                  "api/v1/task-stream?limit=5000"]:
        assert http_base + asset in watch.requests, asset
