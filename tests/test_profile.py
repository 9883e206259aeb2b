"""taskcore.profile: call trees, the sampler thread, and client.profile end to end."""
import asyncio
import sys
import threading
import time
import types

import pytest

from taskcore import profile
from taskcore.client import Client
from taskcore.executor import TaskExecutor
from taskcore.plots import Figure
from taskcore.testing import cluster, run


def busy_work(x, seconds=0.15):
    """CPU-bound for `seconds` (pure Python, so the sampler sees this frame)."""
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        n += 1
    return x


def other_work(x, seconds=0.15):
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    return x


def names(tree):
    """Every function name in a tree."""
    out = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        out.add(node["description"]["name"])
        stack.extend(node["children"].values())
    return out


def check_counts(node):
    """dask's invariant: a node's count >= the sum of its children's."""
    assert node["count"] >= sum(c["count"] for c in node["children"].values())
    for c in node["children"].values():
        assert c["identifier"] in node["children"]
        check_counts(c)


# -- trees ---------------------------------------------------------------------------------------

def _frames_here():
    return sys._getframe()


def test_add_stack_merge_and_flatten_round_trip():
    frames = profile._Frames()
    tree = profile.create()
    f = _frames_here()
    stack = [f.f_back, f]
    for _ in range(3):
        profile.add_stack(tree, stack, frames)
    profile.add_stack(tree, [], frames)              # compiled code only
    assert tree["count"] == 4
    check_counts(tree)
    assert {"_frames_here", "test_add_stack_merge_and_flatten_round_trip",
            "<compiled code>"} <= names(tree)
    merged = profile.merge(tree, tree, profile.create())
    assert merged["count"] == 8
    outer = [c for c in merged["children"].values()
             if c["description"]["name"].startswith("test_add_stack")][0]
    assert outer["count"] == 6
    assert next(iter(outer["children"].values()))["count"] == 6
    assert profile.unflatten(profile.flatten(merged)) == merged
    assert profile.merge() == profile.create()
    with pytest.raises(ValueError, match="different identifiers"):
        profile.merge(tree, outer)


def test_flatten_survives_trees_deeper_than_msgpack_nesting():
    from taskcore.core.serialize import serialize_obj

    node = tree = profile.create()
    for i in range(400):                              # 800 dict levels nested
        child = {"count": 1, "children": {}, "identifier": f"f{i};x.py;{i}",
                 "description": {"filename": "x.py", "name": f"f{i}", "line_number": i,
                                 "line": ""}}
        node["children"][child["identifier"]] = child
        node = child
    tree["count"] = 1
    rows = profile.flatten(tree)
    assert len(rows) == 401
    rows_back = serialize_obj(rows).deserialize()
    assert profile.unflatten([list(r) for r in rows_back]) == tree


# -- the sampler, on a real TaskExecutor ---------------------------------------------------------

class _State:
    def __init__(self, keys):
        self.keys = keys

    def get_task(self, tid):
        key = self.keys.get(tid)
        return None if key is None else types.SimpleNamespace(key=key)


def test_sampler_counts_busy_task_threads_by_prefix_and_skips_idle_ones():
    loop = asyncio.new_event_loop()
    ex = TaskExecutor(3, loop, lambda results: None)      # one thread busy, two idle
    try:
        worker = types.SimpleNamespace(executor=ex, state=_State({7: "busy_work-abc"}))
        s = profile.Sampler(worker, interval=0.005)
        ex.submit(7, lambda: busy_work(0, 0.6))
        time.sleep(0.05)
        for _ in range(20):
            s.sample()
            time.sleep(0.005)
        tree = s.collect()
        # one stack per sample: the idle threads added nothing
        assert tree["count"] == 20
        assert "busy_work" in names(tree)
        check_counts(tree)
        keyed = s.collect(key="busy_work")
        assert keyed["count"] == 20 and "busy_work" in names(keyed)
        assert s.collect(key="nothing")["count"] == 0
        # the event loop was never marked: no server samples
        assert s.collect(server=True)["count"] == 0
    finally:
        ex.shutdown(wait=True)
        loop.close()


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_sampler_cycles_and_time_ranges(loop_kind):
    import uvloop

    worker = types.SimpleNamespace(executor=None, state=None)
    s = profile.Sampler(worker, interval=0.01, cycle=1.0, history=3)
    def sample_at(t):
        # Called from a loop callback too, so the loop thread's stack is non-empty.
        s.sample(now=t)

    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        # A loop callback itself, as Worker.start arranges: the frame below it runs the loop.
        loop.call_soon_threadsafe(s.mark_loop)
        deadline = time.time() + 5
        while s.loop_base is None and time.time() < deadline:
            time.sleep(0.01)
        t0 = s.current.start
        # Samples taken from this (non-loop) thread see the loop idle: not counted.
        s.sample(now=t0 + 0.1)
        assert s.collect(server=True)["count"] == 0
        for i, t in enumerate([t0 + 0.2, t0 + 1.2, t0 + 2.2, t0 + 3.2, t0 + 4.2]):
            done = threading.Event()
            loop.call_soon_threadsafe(lambda t=t: (sample_at(t), done.set()))
            assert done.wait(5)
        # cycles: [t0, t0+1.2) [t0+1.2, t0+2.2) [t0+2.2, t0+3.2) [t0+3.2, t0+4.2) current
        assert len(s.history) == 3                     # bounded: the oldest dropped
        assert s.collect(server=True)["count"] == 4
        assert s.collect(server=True, start=t0 + 3.5)["count"] == 2
        assert s.collect(server=True, stop=t0 + 2.0)["count"] == 1
        assert s.collect(server=True, start=t0 + 10)["count"] == 1     # the current cycle
        assert "sample_at" in names(s.collect(server=True))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_sampler_rejects_bad_settings():
    w = types.SimpleNamespace(executor=None, state=None)
    with pytest.raises(ValueError, match="interval"):
        profile.Sampler(w, interval=0)
    with pytest.raises(ValueError, match="cycle"):
        profile.Sampler(w, cycle=0)


def test_key_filter():
    assert profile.key_filter(None) is None
    assert profile.key_filter("inc") == "inc"
    assert profile.key_filter("inc-3fa2") == "inc"
    assert profile.key_filter(("x-ab12", 0)) == "x"


# -- client.profile -----------------------------------------------------------------------------

def profile_test(fn, **kw):
    async def main():
        async with cluster(n_workers=2, nthreads=2,
                           worker_kwargs={"profile_interval": 0.005, **kw}) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                await fn(c, s, ws)

    run(main(), timeout=90)


def test_client_profile_tasks_prefix_workers_and_server():
    async def t(c, s, ws):
        start = time.time()
        await c.gather(c.map(busy_work, range(4)) + c.map(other_work, range(4)))
        state = await c.profile()
        assert set(state) == {"identifier", "description", "count", "children"}
        assert state["identifier"] == "root" and state["count"] > 10
        check_counts(state)
        assert {"busy_work", "other_work"} <= names(state)
        only = await c.profile(key="busy_work")
        assert "busy_work" in names(only) and "other_work" not in names(only)
        assert 0 < only["count"] < state["count"]
        full_key = (await c.profile(key="other_work-123abc"))     # a key: its prefix
        assert "other_work" in names(full_key) and "busy_work" not in names(full_key)
        per = await c.profile(merge_workers=False)
        assert set(per) == {w.address for w in ws}
        assert sum(p["count"] for p in per.values()) == state["count"]
        one = await c.profile(workers=ws[0].address, merge_workers=False)
        assert set(one) == {ws[0].address}
        # nothing of this block before it started
        assert (await c.profile(stop=start - 5))["count"] == 0
        # the event loop: tiny tasks run inline there once measured
        await c.gather(c.map(busy_work, range(10, 13), seconds=0.0))
        await c.gather(c.map(busy_work, range(20, 1_000), seconds=0.0))
        server = await c.profile(server=True)
        assert server["count"] > 0
        with pytest.raises(ValueError, match="unknown workers"):
            await c.profile(workers=["tcp://10.0.0.1:1"])

    profile_test(t)


def test_client_profile_plot_and_filename(tmp_path):
    async def t(c, s, ws):
        await c.gather(c.map(busy_work, range(2)))
        state, fig = await c.profile(plot=True)
        assert isinstance(fig, Figure) and "<svg" in fig.svg and "busy_work" in fig.svg
        path = tmp_path / "profile.html"
        state2, fig2 = await c.profile(filename=str(path))
        text = path.read_text()
        assert text.startswith("<!DOCTYPE html>") and "busy_work" in text
        with pytest.raises(NotImplementedError, match="scheduler"):
            c.profile(scheduler=True)

    profile_test(t)


def test_profile_with_sampler_off_says_so():
    async def t(c, s, ws):
        assert all(w.profiler is None for w in ws)
        with pytest.raises(RuntimeError, match="profile_interval=0"):
            await c.profile()

    profile_test(t, profile_interval=0)


def test_sync_client_profile():
    from taskcore import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      profile_interval=0.005) as cl, Client(cl) as c:
        c.gather(c.map(busy_work, range(3)))
        state = c.profile(key="busy_work")
        assert "busy_work" in names(state)
