"""performance_report: one self-contained HTML file of a block's work."""
import os
import re
import sys
import time

import cloudpickle
import pytest

from taskcore import Client, LocalCluster, performance_report
from taskcore.performance_report import render
from taskcore.plots import MAX_RECTS
from taskcore.testing import cluster, import_required, require, run

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def crunch(x, seconds=0.05):
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    return x


def explode(x):
    raise RuntimeError("no")


def assert_self_contained(html):
    assert "<script" not in html.lower()
    assert not re.search(r"""\b(?:src|href)\s*=""", html, re.I)
    assert "url(" not in html and "@import" not in html
    urls = set(re.findall(r"""https?://[^\s"'<>)]+""", html))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                      profile_interval=0.005) as cl, Client(cl) as c:
        yield c


def test_sync_report(client, tmp_path):
    path = tmp_path / "report.html"
    client.gather(client.map(crunch, range(100, 110)))        # before: not in the report
    with performance_report(filename=str(path)):
        client.gather(client.map(crunch, range(12)))         # REPORT-MARKER-SYNC
        client.submit(explode, 1).exception()
    html = path.read_text()
    assert_self_contained(html)
    assert html.startswith("<!DOCTYPE html>")
    # the task stream: a titled rect per task of the block (13), lanes per worker; tasks
    # of one prefix that touch at the plot's resolution share a rect ("2 tasks of crunch")
    stream = html[html.index('class="task-stream"'):]
    stream = stream[:stream.index("</svg>")]
    titled = re.findall(r"<rect [^>]*><title>([^<]*)</title>", stream)

    def n_tasks(title, prefix=""):
        merged = re.match(r"(\d+) tasks of (\w+)", title)
        if merged:
            return int(merged.group(1)) if merged.group(2).startswith(prefix) else 0
        return 1 if title.startswith(prefix) else 0

    assert sum(n_tasks(t) for t in titled) == 13
    assert sum(n_tasks(t, "crunch") for t in titled) == 12
    assert any("(erred)" in t for t in titled)
    for addr in client.scheduler_info()["workers"]:
        assert addr in stream
    # the summary table
    assert re.search(r"<td>crunch</td><td class=\"num\">12</td>", html)
    assert re.search(r"<td>explode</td><td class=\"num\">1</td>(<td[^>]*>[^<]*</td>){2}"
                     r"<td class=\"num\">1</td>", html)
    # the profile of the block as a flame graph, with the task function in it
    assert 'class="flame-graph"' in html and ">crunch<" in html
    # workers, versions, wall time, the code that ran it
    assert "Wall time" in html and "taskcore" in html and "cloudpickle" in html
    assert "REPORT-MARKER-SYNC" in html and "test_sync_report" in html
    assert os.path.basename(__file__) in html


def helper_that_reports(client, path):
    with performance_report(filename=path, stacklevel=2):
        client.gather(client.map(crunch, range(200, 203)))


def test_stacklevel_shows_the_caller(client, tmp_path):
    path = str(tmp_path / "r.html")
    helper_that_reports(client, path)                          # CALLER-MARKER
    html = open(path).read()
    assert "CALLER-MARKER" in html


def test_async_report(tmp_path):
    path = tmp_path / "async.html"

    async def main():
        async with cluster(n_workers=2, nthreads=1) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                async with performance_report(filename=str(path)):
                    await c.gather(c.map(crunch, range(5)))    # REPORT-MARKER-ASYNC
                with pytest.raises(RuntimeError, match="async with"):
                    with performance_report(filename=str(path)):
                        pass

    run(main())
    html = path.read_text()
    assert_self_contained(html)
    assert "REPORT-MARKER-ASYNC" in html
    assert len(re.findall(r"<title>crunch-", html)) == 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        performance_report(mode="bokeh")
    with pytest.raises(NotImplementedError, match="storage_options"):
        performance_report(storage_options={"anon": True})


def test_huge_block_stays_bounded():
    n = 100_000
    data = [{"key": f"p{i % 9}-{i}", "worker": f"tcp://10.0.0.{i % 8}:1", "status": "memory",
             "prefix": f"p{i % 9}",
             "startstops": [{"action": "compute", "start": i * 1e-4, "stop": i * 1e-4 + 7e-4}]}
            for i in range(n)]
    t0 = time.perf_counter()
    html = render(data=data, lost=5, start=0.0, stop=10.0,
                  code={"filename": "x.py", "lineno": 1, "code": "work()"},
                  profiles={False: "RuntimeError: none", True: "RuntimeError: none"},
                  info={"workers": {}}, versions="unavailable")
    assert time.perf_counter() - t0 < 60
    assert_self_contained(html)
    assert html.count("<rect") <= MAX_RECTS + 50
    assert len(html) < 10_000_000
    assert "5 earlier tasks" in html and "<td>p0</td>" in html


def test_report_renders_in_chromium_without_network(client, tmp_path):
    require(os.path.exists("/usr/bin/chromium"), "chromium is not installed")
    sync_api = import_required("playwright.sync_api")
    path = tmp_path / "report.html"
    with performance_report(filename=str(path), client=client):
        client.gather(client.map(crunch, range(300, 306)))
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            box = page.locator("svg.task-stream").bounding_box()
            assert box["width"] > 500 and box["height"] > 20
            # 6 tasks; tasks of one prefix that touch at the plot's resolution share a
            # rect, titled "N tasks of crunch"
            titles = page.locator("svg.task-stream rect title").all_text_contents()
            assert sum(int(m.group(1)) if (m := re.match(r"(\d+) tasks of", t)) else 1
                       for t in titles) >= 6
            assert page.locator("svg.flame-graph rect").count() >= 2
            assert page.locator("h2").all_inner_texts()[:2] == ["Task stream", "Tasks by prefix"]
        finally:
            browser.close()
    assert requests == [path.as_uri()]             # the file itself, nothing else
