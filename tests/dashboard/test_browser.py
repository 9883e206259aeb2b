"""The dashboard's pages in a real headless Chromium against a real cluster: they load
without errors, show the workers, and move while a computation runs. Each page is
screenshotted into $TASKCORE_SCREENSHOT_DIR (default build/screenshots/)."""
import sys
import time

import cloudpickle
import pytest

from taskcore.client import Client
from taskcore.testing import wait_until

from .conftest import LiveCluster, PageWatch

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_step(x, delay=0.1):
    time.sleep(delay)
    return x + 1


def inc(x):
    return x + 1


def add(a, b):
    return a + b


@pytest.fixture(scope="module")
def live():
    with LiveCluster(n_workers=2, nthreads=1) as c:
        yield c


@pytest.fixture(scope="module")
def client(live):
    with Client(live.address) as c:
        yield c


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    p = context.new_page()
    watch = PageWatch(p)
    yield p, watch
    context.close()


def progress_of(page, prefix):
    """(finished, total) of the prefix's progress bar, or None while it is not shown."""
    return page.evaluate("""(prefix) => {
        const row = document.querySelector(`.prow[data-prefix="${prefix}"]`);
        return row ? [Number(row.getAttribute("aria-valuenow")),
                      Number(row.getAttribute("aria-valuemax"))] : null;
    }""", prefix)


def test_status_page_shows_workers_and_moves_with_a_computation(live, client, page,
                                                                screenshot_dir):
    p, watch = page
    p.goto(live.url + "status")
    p.wait_for_selector("#workers-table tbody tr[data-worker]", timeout=10_000)
    shown = p.eval_on_selector_all("#workers-table tbody tr[data-worker]",
                                   "rows => rows.map(r => r.children[0].textContent)")
    assert sorted(shown) == ["w0", "w1"]
    assert p.text_content("#t-workers") == "2"
    assert p.get_attribute("#live", "class") == "live on"

    futures = client.map(slow_step, range(40))        # 2 workers x 1 thread: about 2 s
    seen = []

    def moved():
        v = progress_of(p, "slow_step")
        if v is not None and (not seen or v != seen[-1]):
            seen.append(v)
        return v is not None and v[0] == 40
    wait_until(moved, timeout=20, message="the slow_step bar to reach 40")
    assert client.gather(futures) == list(range(1, 41))
    finished = [v[0] for v in seen]
    # several intermediate values: the bar moved while the work ran, never backwards
    assert len(set(finished)) >= 3 and finished == sorted(finished), seen
    assert seen[-1] == [40, 40]
    # the task stream drew the tasks: some canvas pixels carry the prefix's colour
    colour = p.evaluate("TC.prefixColor('slow_step')")
    assert p.evaluate("""(hex) => {
        const c = document.getElementById("task-stream");
        const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        const [r, g, b] = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
        for (let i = 0; i < data.length; i += 4)
            if (data[i] === r && data[i + 1] === g && data[i + 2] === b) return true;
        return false;
    }""", colour)
    assert p.text_content("#stream-legend").strip() == "slow_step"
    assert p.text_content("#states .srow[data-state='memory'] .snum") == "40"
    p.wait_for_timeout(500)                  # let the bars' CSS transitions settle
    p.screenshot(path=str(screenshot_dir / "status.png"), full_page=True)
    watch.assert_clean()
    for f in futures:
        f.release()


def test_workers_graph_and_logs_pages(live, client, page, screenshot_dir):
    p, watch = page
    # a small tree whose results are held, so the graph page has something to draw
    leaves = client.map(inc, range(16))
    level = leaves
    while len(level) > 1:
        level = [client.submit(add, a, b) for a, b in zip(level[::2], level[1::2])]
    assert level[0].result() == sum(range(1, 17))

    p.goto(live.url + "workers")
    p.wait_for_selector("#workers-table tbody tr[data-worker]", timeout=10_000)
    assert p.locator("#workers-table tbody tr[data-worker]").count() == 2
    cpu = "#workers-table tbody tr[data-worker] td:nth-child(4)"
    wait_until(lambda: "%" in p.text_content(cpu), timeout=10,
               message="the CPU column to fill in from heartbeats")
    links = p.eval_on_selector_all("#workers-table a", "as => as.map(a => a.getAttribute('href'))")
    assert sorted(links) == ["proxy/worker/w0/metrics", "proxy/worker/w1/metrics"]
    p.wait_for_timeout(500)                  # let the bars' CSS transitions settle
    p.screenshot(path=str(screenshot_dir / "workers.png"), full_page=True)

    p.goto(live.url + "graph")
    wait_until(lambda: p.text_content("#graph-hint") == "31 tasks, 30 dependencies",
               timeout=10, message="the graph of 31 tasks")
    assert p.is_hidden("#graph-banner")
    p.wait_for_timeout(500)                  # let the bars' CSS transitions settle
    p.screenshot(path=str(screenshot_dir / "graph.png"), full_page=True)

    p.goto(live.url + "logs")
    p.wait_for_selector("#logs-table tbody tr.INFO", timeout=10_000)
    messages = p.eval_on_selector_all("#logs-table td.msg", "cs => cs.map(c => c.textContent)")
    assert any(m.startswith("registered worker") for m in messages), messages[:5]
    p.wait_for_timeout(500)                  # let the bars' CSS transitions settle
    p.screenshot(path=str(screenshot_dir / "logs.png"), full_page=True)
    watch.assert_clean()
    for f in leaves + level:
        f.release()


def test_graph_page_above_the_limit_shows_prefixes(live, client, page, screenshot_dir):
    p, watch = page
    xs = client.map(inc, range(800))
    ys = client.map(add, xs, range(800))
    total = client.submit(sum, ys)
    assert total.result() == sum(range(1, 801)) + sum(range(800))
    p.goto(live.url + "graph")
    p.wait_for_selector("#graph-banner:not([hidden])", timeout=10_000)
    assert "1,601 tasks" in p.text_content("#graph-banner")
    assert p.text_content("#graph-hint") == "3 prefixes, 1,601 tasks"
    p.wait_for_timeout(300)
    p.screenshot(path=str(screenshot_dir / "graph-prefixes.png"), full_page=True)
    watch.assert_clean()
    for f in xs + ys + [total]:
        f.release()
