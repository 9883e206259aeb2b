"""The data behind the pages (taskcore.dashboard.api and .graph) on a real scheduler, and
the graph layout on its own."""
import asyncio
import json
import logging
import time

import aiohttp

from taskcore.client import Client
from taskcore.dashboard import api
from taskcore.dashboard.graph import layers, layout, task_graph
from taskcore.testing import run

from .conftest import dashboard_cluster


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def fail(x):
    raise ValueError(x)


async def fetch(d, route):
    async with aiohttp.ClientSession() as h:
        async with h.get(f"http://127.0.0.1:{d.port}{d.prefix}/api/v1/{route}") as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_task_stream_is_recent_first_bounded_and_incremental():
    async def main():
        async with dashboard_cluster() as (s, ws, d), Client(s.address, asynchronous=True) as c:
            futures = c.map(inc, range(30))
            await c.gather(futures)
            bad = c.submit(fail, 1)
            await asyncio.wait([asyncio.ensure_future(bad.exception())])
            whole = await fetch(d, "task-stream")
            assert whole["total"] == 31 and whole["first"] == 0 and len(whole["rows"]) == 31
            assert {r["key"] for r in whole["rows"][:30]} == {f.key for f in futures}
            last = whole["rows"][-1]
            assert (last["key"], last["status"], last["prefix"]) == (bad.key, "erred", "fail")
            assert {r["worker"] for r in whole["rows"]} <= {w.address for w in ws}
            assert all(r["start"] <= r["stop"] for r in whole["rows"])

            tail = await fetch(d, "task-stream?limit=5")
            assert tail["first"] == 26 and tail["rows"] == whole["rows"][-5:]
            stops = [r["stop"] for r in tail["rows"]]
            assert stops == sorted(stops)                      # oldest first
            assert (await fetch(d, "task-stream?since=31"))["rows"] == []
            since = await fetch(d, "task-stream?since=28")
            assert since["first"] == 28 and since["rows"] == whole["rows"][28:]

    run(main())


def test_prefix_progress_counts_the_current_computation():
    async def main():
        async with dashboard_cluster() as (s, ws, d), Client(s.address, asynchronous=True) as c:
            futures = c.map(inc, range(10))
            await c.gather(futures)
            rows = {r["prefix"]: r for r in (await fetch(d, "tasks/prefixes"))["prefixes"]}
            assert rows["inc"]["finished"] == 10 and rows["inc"]["memory"] == 10
            assert rows["inc"]["total"] == 10 and rows["inc"]["live"] == 10
            for f in futures:
                f.release()
            await wait_for(lambda: not any(s.state.prefix_counts()["inc"][st]
                                           for st in api.STATES))
            rows = {r["prefix"]: r for r in (await fetch(d, "tasks/prefixes"))["prefixes"]}
            assert rows["inc"]["live"] == 0               # the dashboard saw it go idle
            futures = c.map(inc, range(100, 105))
            await c.gather(futures)
            rows = {r["prefix"]: r for r in (await fetch(d, "tasks/prefixes"))["prefixes"]}
            assert rows["inc"]["done"] == 15              # ever, as the state machine counts
            assert rows["inc"]["finished"] == 5 and rows["inc"]["total"] == 5

    run(main())


def test_counts_info_workers_and_logs():
    async def main():
        async with dashboard_cluster(prefix="/x") as (s, ws, d), \
                Client(s.address, asynchronous=True) as c:
            futures = c.map(inc, range(12))
            await c.gather(futures)
            counts = await fetch(d, "tasks/counts")
            assert counts == {"total": 12, "states": {**dict.fromkeys(api.STATES, 0),
                                                      "memory": 12}}
            info = await fetch(d, "info")
            assert (info["workers"], info["clients"], info["tasks"]) == (2, 1, 12)
            assert info["address"] == s.address and info["nthreads"] == 2
            assert info["transitions"] == s.state.n_transitions > 0
            assert info["dashboard"]["prefix"] == "/x"

            await wait_for(lambda: all(s.state.workers[w.address].metrics for w in ws))
            full = await fetch(d, "workers")
            assert full["total"] == 2 and {w["name"] for w in full["workers"]} == {"w0", "w1"}
            for w in full["workers"]:
                assert w["metrics"]["rss"] > 0 and w["nthreads"] == 1
                # each worker serves its own /metrics; the dashboard links to it through
                # a route of its own, under its prefix
                assert w["metrics_path"] == f"proxy/worker/{w['name']}/metrics"
                async with aiohttp.ClientSession() as h:
                    url = f"http://127.0.0.1:{d.port}/x/{w['metrics_path']}"
                    async with h.get(url) as r:
                        assert r.status == 200
                        assert "taskcore_worker_executing" in await r.text()
            assert sum(w["memory_keys"] for w in full["workers"]) == 12
            one = await fetch(d, "workers?limit=1")
            assert one["total"] == 2 and len(one["workers"]) == 1

            logging.getLogger("taskcore.scheduler").warning("a warning for the logs page")
            logs = (await fetch(d, "logs?n=2"))["logs"]
            assert len(logs) == 2
            assert logs[-1]["text"] == "a warning for the logs page"
            assert logs[-1]["level"] == "WARNING" and logs[-1]["logger"] == "taskcore.scheduler"
            assert logs[-1]["message"].endswith(" - WARNING - a warning for the logs page")

    run(main())


def test_small_graph_is_laid_out_in_layers_with_its_edges():
    async def main():
        async with dashboard_cluster() as (s, ws, d), Client(s.address, asynchronous=True) as c:
            a = c.submit(inc, 1, key="a")
            b = c.submit(inc, a, key="b")
            e = c.submit(add, a, b, key="e")
            await e
            g = await fetch(d, "graph")
            assert (g["kind"], g["too_large"], g["n_tasks"]) == ("tasks", False, 3)
            nodes = {n["key"]: n for n in g["nodes"]}
            assert [nodes[k]["x"] for k in "abe"] == [0, 1, 2]
            assert {n["state"] for n in g["nodes"]} == {"memory"}
            keys = [n["key"] for n in g["nodes"]]
            edges = {(keys[i], keys[j]) for i, j in g["edges"]}
            assert edges == {("a", "b"), ("a", "e"), ("b", "e")}

    run(main())


def test_graph_above_the_limit_says_so_and_shows_prefixes():
    async def main():
        # no workers: 5,000 tasks wait on the scheduler, which is where a graph is biggest
        async with dashboard_cluster(n_workers=0) as (s, ws, d), \
                Client(s.address, asynchronous=True) as c:
            xs = c.map(inc, range(5000))
            ys = c.map(add, xs, range(5000))
            await wait_for(lambda: len(s.state.tasks) == 10_000, 20)
            g = await fetch(d, "graph")
            assert g["too_large"] and g["kind"] == "prefixes"
            assert (g["n_tasks"], g["limit"]) == (10_000, 1000)
            nodes = {n["prefix"]: n for n in g["nodes"]}
            assert set(nodes) == {"inc", "add"}
            assert nodes["inc"]["count"] == nodes["add"]["count"] == 5000
            assert nodes["add"]["x"] > nodes["inc"]["x"]
            keys = [n["prefix"] for n in g["nodes"]]
            assert [(keys[i], keys[j]) for i, j in g["edges"]] == [("inc", "add")]
            # a request for more than the hard cap gets the cap, and still the prefixes
            big = await fetch(d, "graph?limit=1000000")
            assert big["limit"] == 5000 and big["too_large"]
            # the scheduler's loop stays responsive: building this answer is bounded
            t0 = time.perf_counter()
            task_graph(s, 1000)
            assert time.perf_counter() - t0 < 0.25
            del xs, ys

    run(main(), timeout=90)


def test_graph_at_the_cap_is_drawn_task_by_task():
    async def main():
        async with dashboard_cluster(n_workers=0) as (s, ws, d), \
                Client(s.address, asynchronous=True) as c:
            xs = c.map(inc, range(1000))
            await wait_for(lambda: len(s.state.tasks) == 1000, 20)
            g = await fetch(d, "graph?limit=1000")
            assert g["kind"] == "tasks" and len(g["nodes"]) == 1000 and g["edges"] == []
            # 1,000 independent tasks wrap into a block of columns, not one long line
            assert max(n["x"] for n in g["nodes"]) >= 10
            assert len({(n["x"], n["y"]) for n in g["nodes"]}) == 1000
            assert (await fetch(d, "graph?limit=999"))["too_large"]
            del xs

    run(main())


def test_layers_and_layout():
    deps = {"b": ["a"], "c": ["a"], "d": ["b", "c"], "e": []}
    assert layers(list("abcde"), deps) == {"a": 0, "e": 0, "b": 1, "c": 1, "d": 2}
    pos = layout(list("abcde"), deps)
    assert pos["d"][0] > pos["b"][0] > pos["a"][0]
    assert len(set(pos.values())) == 5
    # a cycle (possible between prefixes) terminates and places every node
    cyc = {"x": ["y"], "y": ["x"], "z": ["x"]}
    assert set(layout(list("xyz"), cyc)) == {"x", "y", "z"}
    # wide layers wrap at max_rows
    wide = layout([f"t{i}" for i in range(100)], {}, max_rows=10)
    assert {x for x, _ in wide.values()} == set(range(10))
    assert json.dumps(wide)                      # plain numbers
