"""The task stream: client.get_task_stream and the get_task_stream context manager."""
import sys
import time

import cloudpickle
import pytest

import taskcore
from taskcore import Client, LocalCluster
from taskcore.plots import Figure
from taskcore.task_stream import rows_to_dicts, summarize
from taskcore.testing import cluster, run

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x):
    return x + 1


def slowinc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def boom(x):
    raise ValueError(f"boom {x}")


def check_record(d):
    assert set(d) == {"key", "worker", "status", "startstops", "prefix"}
    assert d["status"] in ("memory", "erred")
    (ss,) = d["startstops"]
    assert ss["action"] == "compute" and ss["start"] <= ss["stop"]
    assert abs(ss["stop"] - time.time()) < 120


def test_rows_to_dicts_and_summary():
    rows = [("inc-ab", "tcp://w:1", 10.0, 10.5, "memory"),
            (("x-cd", 0, 1), "tcp://w:2", 11.0, 13.0, "erred"),
            ("inc-ef", "tcp://w:1", 12.0, 12.5, "memory")]
    data = rows_to_dicts(rows)
    assert data[0] == {"key": "inc-ab", "worker": "tcp://w:1", "status": "memory",
                       "startstops": [{"action": "compute", "start": 10.0, "stop": 10.5}],
                       "prefix": "inc"}
    assert data[1]["key"] == ("x-cd", 0, 1) and data[1]["prefix"] == "x"
    assert summarize(data) == [("x", 1, 2.0, 2.0, 1), ("inc", 2, 1.0, 0.5, 0)]


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False) as cl, \
            Client(cl) as c:
        yield c


def test_context_manager_collects_exactly_the_block(client):
    client.gather(client.map(inc, range(100, 150)))          # before: not in the block
    with taskcore.get_task_stream() as ts:
        futs = client.map(slowinc, range(20))
        client.gather(futs)
        bad = client.submit(boom, 1)
        with pytest.raises(ValueError):
            bad.result()
    client.gather(client.map(inc, range(200, 230)))          # after: not in the block
    keys = {d["key"] for d in ts.data}
    assert keys == {f.key for f in futs} | {bad.key}
    for d in ts.data:
        check_record(d)
    erred = [d for d in ts.data if d["status"] == "erred"]
    assert [d["key"] for d in erred] == [bad.key] and erred[0]["prefix"] == "boom"
    workers = {d["worker"] for d in ts.data}
    assert workers <= set(client.scheduler_info()["workers"])
    assert all(d["prefix"] == "slowinc" for d in ts.data if d["status"] == "memory")


def test_get_task_stream_count_start_stop_and_plot(client, tmp_path):
    t0 = time.time()
    client.gather(client.map(slowinc, range(300, 310)))
    latest = client.get_task_stream(count=3)
    assert len(latest) == 3
    assert [d["key"] for d in latest] == [d["key"] for d in client.get_task_stream()[-3:]]
    recent = client.get_task_stream(start=t0)
    assert {d["key"] for d in recent} >= {d["key"] for d in latest}
    assert all(d["startstops"][0]["stop"] >= t0 for d in recent)
    assert len(client.get_task_stream(start="600s")) >= 10
    assert client.get_task_stream(stop=t0 - 3600) == []
    assert len(client.get_task_stream(start=t0, count=2)) == 2
    data, fig = client.get_task_stream(count=5, plot=True)
    assert len(data) == 5 and isinstance(fig, Figure) and "<svg" in fig.svg
    path = tmp_path / "ts.html"
    data, fig = client.get_task_stream(count=5, plot="save", filename=str(path))
    assert "<svg" in path.read_text()
    with pytest.raises(ValueError, match="plot"):
        client.get_task_stream(plot="bokeh")
    with pytest.raises(ValueError, match="count"):
        client.get_task_stream(count=-1)


def test_context_manager_plot(client):
    with taskcore.get_task_stream(client=client, plot=True) as ts:
        client.gather(client.map(slowinc, range(400, 404)))
    assert len(ts.data) == 4
    assert isinstance(ts.figure, Figure) and ts.figure.svg.count("<rect") >= 4
    with pytest.raises(ValueError, match="plot"):
        taskcore.get_task_stream(client=client, plot="yes")


def test_async_context_manager():
    async def main():
        async with cluster(n_workers=2, nthreads=1) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                await c.gather(c.map(inc, range(10)))
                async with taskcore.get_task_stream(client=c) as ts:
                    futs = c.map(slowinc, range(5))
                    await c.gather(futs)
                assert {d["key"] for d in ts.data} == {f.key for f in futs}
                for d in ts.data:
                    check_record(d)
                assert len(await c.get_task_stream()) == 15
                with pytest.raises(RuntimeError, match="async with"):
                    with taskcore.get_task_stream(client=c):
                        pass

    run(main())


def test_block_longer_than_the_ring_warns():
    ts = taskcore.get_task_stream(client=object())
    ts._since = 10
    with pytest.warns(RuntimeWarning, match="5 tasks of this block left"):
        ts._finish({"first": 15, "rows": [("inc-1", "tcp://w:1", 1.0, 2.0, "memory")]})
    assert [d["key"] for d in ts.data] == ["inc-1"]
