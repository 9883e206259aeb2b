"""taskcore.progress: bars per task prefix, sync and async clients, terminal and widgets."""
import asyncio
import io
import sys
import time
import types

import cloudpickle
import pytest

import taskcore
from taskcore import Client, LocalCluster, diagnostics
from taskcore.diagnostics import key_split
from taskcore.testing import run

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x):
    return x + 1


def slow_inc(x, delay=0.002):
    time.sleep(delay)
    return x + 1


def fail(x):
    raise ValueError(f"bad {x}")


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as c, \
            Client(c) as cl:
        yield cl


def final_counts(text):
    """{prefix: last 'n/total' shown} from tqdm output."""
    import re

    out = {}
    for seg in re.split(r"[\r\n]", text):
        m = re.match(r"\s*(\S+)\s*:.*?(\d+)/(\d+)", seg)
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out


def test_key_split():
    assert key_split("inc-0123456789abcdef0123456789abcdef") == "inc"
    assert key_split(("random_sample-5a8f1d2e6c", 0, 3)) == "random_sample"
    assert key_split("mean_combine-partial-2b7e8f1a4c9d3e6f") == "mean_combine-partial"
    assert key_split("x-1-2-3") == "x"
    assert key_split(b"hello-world-1") == "hello-world"
    assert key_split("ae05086432ca935f6eba409a8ecd4896") == "data"
    assert key_split("x-abcdefab") == "x"
    assert key_split(None) == "other"
    assert key_split(("('x', 1)",)) == "x"


def test_progress_terminal_for_futures(client):
    pytest.importorskip("tqdm")
    fs = client.map(slow_inc, range(300)) + client.map(inc, range(50))
    out = io.StringIO()
    assert taskcore.progress(fs, file=out) is None       # blocks until done
    assert all(f.done() for f in fs)
    counts = final_counts(out.getvalue())
    assert counts["slow_inc"] == (300, 300)
    assert counts["inc"] == (50, 50)


def test_progress_single_bar_and_errors(client):
    pytest.importorskip("tqdm")
    fs = client.map(inc, range(20)) + [client.submit(fail, 1)]
    out = io.StringIO()
    taskcore.progress(fs, file=out, multi=False)
    text = out.getvalue()
    assert final_counts(text)["all"] == (21, 21)
    assert "1 erred" in text


def test_progress_covers_intermediate_dask_tasks(client):
    pytest.importorskip("tqdm")
    da = pytest.importorskip("dask.array")
    x = da.random.random((400, 400), chunks=(100, 100))
    y = (x + x.T).mean(axis=0).sum()
    out = io.StringIO()
    f = client.compute(y)
    ntasks = taskcore.dask_integration.last_timings()["tasks"]
    taskcore.progress(f, file=out)
    counts = final_counts(out.getvalue())
    # every task of the graph is counted under its prefix (intermediate ones learned by
    # polling the scheduler), and every bar completes
    assert {"random_sample", "mean_chunk"} <= set(counts) and len(counts) >= 4
    assert sum(total for _, total in counts.values()) == ntasks
    assert all(done == total for done, total in counts.values()), counts
    assert f.done()
    # the scheduler forgot the poll registration once everything was done
    reg = client.run_on_scheduler(
        lambda scheduler: len(getattr(scheduler, "_taskcore_progress", {})))
    assert reg == 0


def test_compute_and_persist_with_progress(client, capsys):
    pytest.importorskip("tqdm")
    dask = pytest.importorskip("dask")
    d = dask.delayed(sum)([dask.delayed(inc)(i) for i in range(10)])
    f = client.compute(d, progress=True)
    assert f.done() and f.result() == 55                 # progress blocked until done
    p = client.persist([dask.delayed(inc)(i) for i in range(5)], progress=True)
    assert all(fut.done() for fut in taskcore.dask_integration.futures_of(p))


def test_progress_of_persisted_collection(client):
    pytest.importorskip("tqdm")
    da = pytest.importorskip("dask.array")
    x = client.persist(da.ones((100, 100), chunks=(25, 25)) + 1)
    out = io.StringIO()
    taskcore.progress(x, file=out)
    counts = final_counts(out.getvalue())
    assert sum(t for _, t in counts.values()) >= 16
    assert all(done == total for done, total in counts.values())
    with pytest.raises(ValueError, match="persist it first"):
        taskcore.progress(da.ones(3, chunks=1))


def test_progress_without_tqdm_prints_summary(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    fs = client.map(inc, range(10))
    out = io.StringIO()
    taskcore.progress(fs, file=out)
    assert "inc" in out.getvalue() and "10/10" in out.getvalue()


def test_progress_async_client():
    pytest.importorskip("tqdm")
    from taskcore.testing import cluster

    async def main():
        async with cluster(n_workers=2) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                fs = c.map(slow_inc, range(100))
                out = io.StringIO()
                p = taskcore.progress(fs, file=out)
                assert asyncio.iscoroutine(p)
                await p
                assert all(f.done() for f in fs)
                assert final_counts(out.getvalue())["slow_inc"] == (100, 100)
                out2 = io.StringIO()
                fs2 = c.map(inc, range(10))
                await taskcore.progress(fs2, asynchronous=True, file=out2)
                assert final_counts(out2.getvalue())["inc"] == (10, 10)
                # compute(progress=True) on an asynchronous client does not block
                da = pytest.importorskip("dask.array")
                f = c.compute(da.ones(100, chunks=10).sum(), progress=True)
                assert await f == 100

    run(main(), timeout=60)


def test_progress_widgets(client, monkeypatch):
    """Jupyter path, with a stand-in ipywidgets module (the real one is optional)."""
    made = []

    class W:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs
            self.value = kwargs.get("value")
            self.bar_style = kwargs.get("bar_style")
            made.append(self)

    fake = types.ModuleType("ipywidgets")
    for name in ("IntProgress", "HTML", "HBox", "VBox", "Layout"):
        setattr(fake, name, type(name, (W,), {}))
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    fs = client.map(slow_inc, range(50))
    p = taskcore.progress(fs, notebook=True)
    assert isinstance(p, diagnostics.Progress)           # returns at once
    assert type(p.widget).__name__ == "VBox"
    deadline = time.time() + 20
    while p.elapsed is None and time.time() < deadline:
        time.sleep(0.05)
    bars = [w for w in made if type(w).__name__ == "IntProgress"]
    assert bars and bars[0].value == 50 and bars[0].bar_style == "success"


def test_progress_does_not_slow_the_computation(client):
    """A poll is one scheduler call per interval, not one per task."""
    pytest.importorskip("tqdm")
    da = pytest.importorskip("dask.array")
    polls = []
    real = diagnostics._Tracker.poll

    async def counting_poll(self):
        polls.append(1)
        return await real(self)

    x = da.ones((2000,), chunks=1).sum()
    diagnostics._Tracker.poll = counting_poll
    try:
        f = client.compute(x)
        taskcore.progress(f, file=io.StringIO())
    finally:
        diagnostics._Tracker.poll = real
    assert f.result() == 2000
    assert 1 <= len(polls) < 200                          # the graph has > 2,000 tasks
