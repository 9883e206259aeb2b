"""dask collections on taskcore: compute, persist, get, the default scheduler.

Every result is compared with dask's synchronous scheduler on the same inputs.
Most tests share one in-process LocalCluster (2 workers x 1 thread); the
`procs` tests use subprocess workers, where functions of this module travel
by value (they cannot import it).
"""
import operator
import os
import subprocess
import sys

import cloudpickle
import pytest

from taskcore.testing import import_required  # noqa: E402

dask = import_required("dask", "the [dask] extra")
np = import_required("numpy")
pd = import_required("pandas", "the [dask] extra")
da = import_required("dask.array", "the [dask] extra")
dd = import_required("dask.dataframe", "the [dask] extra")
db = import_required("dask.bag", "the [dask] extra")

import taskcore  # noqa: E402
from taskcore import Client, Future, LocalCluster, wait  # noqa: E402
from taskcore import dask_integration as di  # noqa: E402
from taskcore.core.messages import decode_update_graph  # noqa: E402
from taskcore.testing import run, wait_until  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "src")


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def boom(x):
    raise ZeroDivisionError(f"boom on {x}")


def counted(i, path):
    # Functions of this module travel by value (a copy of its globals), so the
    # calls are counted in a file.
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i * 10


def calls(path):
    with open(path) as f:
        return sorted(int(v) for v in f.read().split())


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as c:
        yield c


@pytest.fixture
def client(cluster):
    before = dask.config.get("scheduler", None)
    with Client(cluster) as c:
        yield c
    assert dask.config.get("scheduler", None) == before


def sync(x):
    return dask.compute(x, scheduler="sync")[0]


# -- dask.array ---------------------------------------------------------------------------

def test_array_reductions_match_sync(client):
    x = da.random.RandomState(0).random_sample((400, 400), chunks=(100, 100))
    exprs = [(x + x.T).mean(axis=0).sum(), x.dot(x.T)[::7, 3:].std(), (x[:, ::2] - 1).max(axis=1),
             da.concatenate([x, x * 2], axis=0).var(axis=0), x.cumsum(axis=1)[-1]]
    got = client.gather(client.compute(exprs))
    want = dask.compute(*exprs, scheduler="sync")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w)
    # the same through the default scheduler and through dask.compute
    np.testing.assert_allclose(exprs[0].compute(), want[0])
    np.testing.assert_allclose(dask.compute(exprs[1])[0], want[1])


def test_array_graph_of_10k_tasks(client):
    # dask's sync scheduler needs ~6 s for this graph here, so the reference is numpy.
    x = da.arange(8_000, chunks=1)
    y = (x * 2 + 1).sum()
    assert client.compute(y).result() == int((np.arange(8_000) * 2 + 1).sum())
    assert di.last_timings()["tasks"] >= 10_000       # tasks sent to the scheduler


@pytest.mark.parametrize("order", ["dask", "compiled"])
def test_large_graphs_go_in_pieces_in_execution_order(client, monkeypatch, order):
    # Pieces of 7, 14, 28, 50, 50, ... tasks: every piece boundary cuts dependencies.
    # Ordered by dask.order, and by taskcore's compiled order (large graphs' default).
    monkeypatch.setitem(dask.config.config, "taskcore", {"order": order})
    monkeypatch.setattr(di, "_FIRST_PIECE", 7)
    monkeypatch.setattr(di, "_MAX_PIECE", 50)
    x = da.random.RandomState(2).random_sample((120, 120), chunks=(10, 10))
    y = x.persist()                     # in pieces too; its 144 results held
    wait(taskcore.dask_integration.futures_of(y))
    sent = []
    real = client._send_threadsafe
    monkeypatch.setattr(client, "_send_threadsafe", lambda m: (sent.append(m), real(m)))
    def exprs(y):
        return [(x + x.T).mean(axis=0).sum(), (y @ y.T)[3, ::5], da.concatenate([x, y]).std()]

    got_futures = client.compute(exprs(y))
    got = client.gather(got_futures)
    for g, w in zip(got, dask.compute(*exprs(x), scheduler="sync")):
        np.testing.assert_allclose(g, w)
    graphs = [decode_update_graph("c", m, "s") for m in sent if isinstance(m, list)]
    assert len(graphs) > 10
    held = set(dask.core.flatten(y.__dask_keys__()))
    seen = set()
    for g in graphs:                    # dependencies always come in this or an earlier piece
        keys = {rec[0] for rec in g.tasks}
        for rec in g.tasks:
            assert set(rec[2]) <= seen | keys | held, rec[0]
        seen |= keys
    # A piece wants what later pieces need of it, and the results it holds.
    results = {f.key for f in got_futures}
    later = set()
    for i in range(len(graphs) - 2, -1, -1):
        later |= {d for rec in graphs[i + 1].tasks for d in rec[2]}
        keys = {rec[0] for rec in graphs[i].tasks}
        assert set(graphs[i].keys) == keys & (later | results)
    assert set(graphs[-1].keys) == results
    releases = [m for m in sent if isinstance(m, dict) and m.get("op") == "release-keys"]
    assert len(releases) == 1 and releases[0]["keys"]
    # what the pieces held for each other is let go: only the persisted array stays
    del got, got_futures, y
    wait_until(lambda: client.run_on_scheduler(lambda scheduler: len(scheduler.state.tasks)) == 0,
               timeout=10)


def test_large_graphs_get_the_compiled_order(client, monkeypatch):
    from dask.order import order

    from taskcore.core.order import order_graph

    x = da.random.RandomState(3).random_sample((60, 60), chunks=(5, 5))
    expr = (x + x.T).sum(axis=0)
    sent = []
    real = client._send_threadsafe
    monkeypatch.setattr(client, "_send_threadsafe", lambda m: (sent.append(m), real(m)))

    def priorities():
        sent.clear()
        np.testing.assert_allclose(client.compute(expr).result(), sync(expr))
        g = decode_update_graph("c", [m for m in sent if isinstance(m, list)][-1], "s")
        return {rec[0]: rec[3] for rec in g.tasks}      # (key, spec, deps, priority)

    def same(got, want):
        # the finalize task's key is new in every compute(); the other keys are not
        common = got.keys() & want.keys()
        assert len(common) >= len(got) - 2
        return {k: got[k] for k in common} == {k: want[k] for k in common}

    dsk, _, _ = di._compute_graph([expr], True)
    ours, theirs = order_graph(dsk)[1], order(dsk)
    assert not same(ours, theirs)
    assert same(priorities(), theirs)              # a small graph: dask.order
    monkeypatch.setattr(di, "_COMPILED_ORDER_MIN", 100)
    assert same(priorities(), ours)
    monkeypatch.setattr(di, "_COMPILED_ORDER_MIN", 10**9)
    with dask.config.set({"taskcore.order": "compiled"}):
        assert same(priorities(), ours)
    with dask.config.set({"taskcore.order": "fastest"}):
        with pytest.raises(ValueError, match="taskcore.order must be one of"):
            client.compute(expr)


def test_graph_work_runs_with_the_garbage_collector_paused(client, monkeypatch):
    import gc

    seen = []
    real_graph, real_order = di._compute_graph, di._order
    monkeypatch.setattr(di, "_compute_graph",
                        lambda *a, **k: (seen.append(gc.isenabled()), real_graph(*a, **k))[1])
    monkeypatch.setattr(di, "_order", lambda *a: (seen.append(gc.isenabled()), real_order(*a))[1])
    x = da.ones((40, 40), chunks=10)
    assert client.compute((x + 1).sum()).result() == 3200
    assert seen == [False, False] and gc.isenabled()


def _spec_kinds(sent):
    specs = [rec[1] for m in sent if isinstance(m, list)
             for rec in decode_update_graph("c", m, "s").tasks]
    return specs, {kind: sum(s[0] == kind for s in specs) for kind in ("dask", "dask-t")}


def test_tasks_of_a_layer_share_one_template(client, monkeypatch):
    sent = []
    real = client._send_threadsafe
    monkeypatch.setattr(client, "_send_threadsafe", lambda m: (sent.append(m), real(m)))
    x = da.random.RandomState(5).random_sample((60, 60), chunks=(7, 7))   # edge blocks differ
    exprs = [(x + x.T).sum(axis=0), (x[::2] * 3).std(), da.concatenate([x, x[:4]]).mean()]
    want = dask.compute(*exprs, scheduler="sync")
    for got, w in zip(client.gather(client.compute(exprs)), want):
        np.testing.assert_allclose(got, w)
    specs, kinds = _spec_kinds(sent)
    records = [rec for m in sent if isinstance(m, list)
               for rec in decode_update_graph("c", m, "s").tasks]
    # Every layer is templated but the random one (each of its tasks holds its own seed
    # array) and the final tasks (not tuple keys).
    for key, spec, *_ in records:
        if isinstance(key, tuple) and not key[0].startswith("random_sample"):
            assert spec[0] == "dask-t", key
    templates = {id(s[1]) for s in specs if s[0] == "dask-t"}   # one object per template
    assert kinds["dask-t"] > 200 and len(templates) < kinds["dask-t"] / 5
    assert all(type(v) is list for s in specs if s[0] == "dask-t" for v in [s[2]])
    # the same graph without templates: every task its own pickle, the same results
    sent.clear()
    with dask.config.set({"taskcore.templates": False}):
        for got, w in zip(client.gather(client.compute(exprs)), want):
            np.testing.assert_allclose(got, w)
    _, kinds = _spec_kinds(sent)
    assert kinds["dask-t"] == 0 and kinds["dask"] > 0
    with dask.config.set({"taskcore.templates": "yes"}):
        with pytest.raises(ValueError, match="taskcore.templates must be True or False"):
            client.compute(exprs)


def test_a_layer_holding_a_future_is_pickled_task_by_task(client, monkeypatch):
    import functools

    offset = client.submit(inc, 99)                 # 100
    sent = []
    real = client._send_threadsafe
    monkeypatch.setattr(client, "_send_threadsafe", lambda m: (sent.append(m), real(m)))
    x = da.ones((8, 8), chunks=2)
    y = x.map_blocks(functools.partial(add, offset), dtype=float)
    np.testing.assert_allclose(client.compute(y).result(), np.full((8, 8), 101.0))
    specs, _ = _spec_kinds(sent)
    [g] = [decode_update_graph("c", m, "s") for m in sent if isinstance(m, list)]
    blocks = [rec for rec in g.tasks if isinstance(rec[0], tuple) and "add" in str(rec[0][0])]
    assert len(blocks) == 16
    for key, spec, deps, *_ in blocks:              # the Future is each task's dependency
        assert spec[0] == "dask" and offset.key in deps


def test_workers_unpickle_a_template_once(monkeypatch):
    from taskcore.core.dask_nodes import _CALL
    from taskcore.core.serialize import Serialized
    from taskcore.core.templates import Templater

    enc = di._Encoder(None)
    tp = Templater(di._Dep)
    node = (_CALL, add, (di._Dep("a"), 5), None, False)
    tmpl, values = tp.split("layer", node)
    payload = enc.dumps(tmpl.skeleton, [])
    copy = Serialized(payload.kind, [bytes(f) for f in payload.frames])   # a later message
    monkeypatch.setattr(di, "_TEMPLATES", {})
    monkeypatch.setattr(di, "_TEMPLATES_BY_ID", {})
    for p in (payload, payload, copy):
        assert di.execute_dask_node(p, {"a": 10}, values) == 15
    assert len(di._TEMPLATES) == 1 and len(di._TEMPLATES_BY_ID) == 2
    # the later message's equal bytes found the skeleton unpickled for the first
    assert di._TEMPLATES_BY_ID[id(copy)][1] is di._TEMPLATES_BY_ID[id(payload)][1]
    with pytest.raises(di.DaskTaskDeserializationError, match="must be a list"):
        di.execute_dask_node(payload, {"a": 10}, ("a",))
    with pytest.raises(di.DaskTaskDeserializationError, match="has hole 0 but the task"):
        di.execute_dask_node(payload, {"a": 10}, [])
    with pytest.raises(di.DaskTaskDeserializationError, match="must be serialized"):
        di.execute_dask_node(b"junk", {"a": 10}, ["a"])
    with pytest.raises(KeyError):                   # a missing dependency stays a KeyError
        di.execute_dask_node(payload, {}, values)


def test_a_failed_piece_releases_what_was_sent(client, monkeypatch):
    monkeypatch.setattr(di, "_FIRST_PIECE", 5)
    monkeypatch.setattr(di, "_MAX_PIECE", 20)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("no pickling")

    parts = [dask.delayed(inc)(i) for i in range(60)]
    last = dask.delayed(add)(parts[-1], Unpicklable())
    total = dask.delayed(sum)(parts + [last])
    with pytest.raises(TypeError, match="cannot serialize dask task"):
        client.compute(total)
    wait_until(lambda: client.run_on_scheduler(lambda scheduler: len(scheduler.state.tasks)) == 0,
               timeout=10)
    assert client.compute(dask.delayed(sum)(parts)).result() == sum(range(1, 61))


def test_array_persist_and_reuse(client):
    x = da.random.RandomState(1).random_sample((300, 300), chunks=(100, 100))
    xp = client.persist(x + 1)
    futures = taskcore.dask_integration.futures_of(xp)
    assert len(futures) == 9 and all(isinstance(f, Future) for f in futures)
    wait(futures)
    np.testing.assert_allclose(xp.sum().compute(), sync((x + 1).sum()))
    np.testing.assert_allclose(client.compute((xp.T @ xp)[0]).result(),
                               sync(((x + 1).T @ (x + 1))[0]))
    # numpy data embedded in a later graph travels with it
    np.testing.assert_allclose((xp + np.arange(300)).sum().compute(),
                               sync((x + 1 + np.arange(300)).sum()))


def test_persisted_keys_are_not_recomputed(client, tmp_path):
    path = str(tmp_path / "calls")
    open(path, "w").close()
    parts = [dask.delayed(counted)(i, path) for i in range(20)]
    total = dask.delayed(sum)(parts)
    persisted = client.persist(parts)
    wait(taskcore.dask_integration.futures_of(persisted))
    assert calls(path) == list(range(20))
    assert dask.delayed(sum)(persisted).compute() == sum(i * 10 for i in range(20))
    # the original (unpersisted) graph overlaps the persisted keys: reused too
    assert client.compute(total).result() == sum(i * 10 for i in range(20))
    assert calls(path) == list(range(20))


# -- dask.dataframe -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    n = 4000
    left = pd.DataFrame({"k": rng.integers(0, 40, n), "v": rng.normal(size=n),
                         "w": rng.integers(0, 100, n)})
    right = pd.DataFrame({"k": np.arange(40), "name": [f"n{i}" for i in range(40)],
                          "z": np.arange(40) * 1.5})
    return left, right


def _sorted(df):
    df = df.reset_index()
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_dataframe_reductions_match_sync(client, frames):
    left, _ = frames
    ddf = dd.from_pandas(left, npartitions=6)
    exprs = [ddf.v.sum(), ddf[ddf.v > 0].groupby("k").v.mean(), ddf.describe(),
             ddf.w.value_counts(), ddf.assign(u=ddf.v * ddf.w).u.cumsum()]
    got = client.gather(client.compute(exprs))
    want = dask.compute(*exprs, scheduler="sync")
    assert got[0] == pytest.approx(want[0])
    pd.testing.assert_series_equal(got[1].sort_index(), want[1].sort_index())
    pd.testing.assert_frame_equal(got[2], want[2])
    pd.testing.assert_series_equal(got[3].sort_index(), want[3].sort_index())
    pd.testing.assert_series_equal(got[4], want[4])


def test_dataframe_shuffle_groupby_apply_and_merge(client, frames):
    left, right = frames
    ddf = dd.from_pandas(left, npartitions=6)
    rdf = dd.from_pandas(right, npartitions=3)
    applied = ddf.groupby("k").apply(lambda g: g.v.sum() * 2 + len(g),
                                     meta=("x", "f8"))
    merged = ddf.merge(rdf, on="k", how="inner", shuffle_method="tasks")
    got_a, got_m = client.compute([applied, merged], sync=True)
    want_a, want_m = dask.compute(applied, merged, scheduler="sync")
    pd.testing.assert_series_equal(got_a.sort_index(), want_a.sort_index())
    pd.testing.assert_frame_equal(_sorted(got_m), _sorted(want_m))
    assert len(got_m) == len(left)


def test_dataframe_persist_reused(client, frames):
    left, _ = frames
    ddf = dd.from_pandas(left, npartitions=4)
    p = client.persist(ddf[ddf.w > 10])
    assert len(taskcore.dask_integration.futures_of(p)) == 4
    got = p.groupby("k").w.sum().compute()
    pd.testing.assert_series_equal(got.sort_index(),
                                   sync(ddf[ddf.w > 10].groupby("k").w.sum()).sort_index())
    assert len(p) == int((left.w > 10).sum())


# -- dask.bag and dask.delayed ---------------------------------------------------------------

def test_bag_matches_sync(client):
    b = db.from_sequence(range(1000), npartitions=8)
    exprs = [b.map(inc).filter(lambda v: v % 3 == 0).sum(),
             b.map(lambda v: v % 7).frequencies(),
             b.foldby(lambda v: v % 5, operator.add, 0),
             b.map(lambda v: {"a": v % 4, "b": v}).pluck("a").distinct(),
             b.map(str).topk(3)]
    got = client.compute(exprs, sync=True)
    want = dask.compute(*exprs, scheduler="sync")
    assert got[0] == want[0]
    assert sorted(got[1]) == sorted(want[1])
    assert sorted(got[2]) == sorted(want[2])
    assert sorted(got[3]) == sorted(want[3])
    assert list(got[4]) == list(want[4])


def test_delayed_graphs_match_sync(client):
    def pair(x):
        return x, x * 2

    a = [dask.delayed(inc)(i) for i in range(10)]
    b = dask.delayed(sum)(a)
    c = dask.delayed(dict)(first=a[0], nested={"x": [a[1], (a[2], 3)]})
    p, q = dask.delayed(pair, nout=2)(b)
    d = dask.delayed(add)(p, y=q)
    got = client.compute([b, c, d], sync=True)
    assert got == list(dask.compute(b, c, d, scheduler="sync"))
    assert client.compute(b).result() == 55
    # collections nested in python containers
    assert client.compute({"s": b, "l": [a[0], 5]}, sync=True) == {"s": 55, "l": [1, 5]}
    assert client.compute([b, 7], sync=True) == [55, 7]


def test_futures_inside_delayed(client):
    f = client.submit(inc, 1)
    g = client.submit(inc, 10)
    assert dask.delayed(add)(f, 10).compute() == 12
    assert dask.delayed(sum)([f, g, 100]).compute() == 113
    assert dask.delayed(lambda d: d["a"] + d["b"][0])({"a": f, "b": [g]}).compute() == 13
    assert dask.delayed(add)(f, y=g).compute() == 13
    # a future as a whole delayed value, and inside a legacy tuple graph
    assert (dask.delayed(f) + 1).compute() == 3
    assert client.get({"x": (add, f, g), "y": (inc, "x")}, "y") == 14
    # the futures stay valid and usable afterwards
    assert f.result() == 2 and g.result() == 11


def test_get_protocol_nested_keys_and_legacy_graphs(client):
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b"), "d": (sum, ["a", "b", "c"]),
           "e": "d", ("x", 0): (inc, "e"), ("x", 1): (add, ("x", 0), 10)}
    assert client.get(dsk, "d") == 6
    assert client.get(dsk, ["b", ["c", ("x", 1)]]) == [2, [3, 17]]
    assert client.get(dsk, [("x", 0), "e"]) == [7, 6]
    want = dask.get(dsk, ["d", ("x", 1)])
    assert client.get(dsk, ["d", ("x", 1)]) == list(want)
    # the task spec directly (dask >= 2024.12)
    try:
        from dask._task_spec import Alias, DataNode, Task, TaskRef
    except ImportError:
        return

    spec = {"p": DataNode("p", 5), "q": Task("q", add, TaskRef("p"), 2), "r": Alias("r", "q")}
    assert client.get(spec, ["r", "q"]) == [7, 7]


def test_large_embedded_data_travels_out_of_band(client):
    big = np.arange(500_000, dtype="f8")          # 4 MB
    frame = pd.DataFrame({"a": np.arange(200_000), "b": np.ones(200_000)})
    sent = []
    original = client._send_threadsafe

    def spy(msg):
        if type(msg) is list and msg[0] == "update-graph":
            sent.append(msg)
        return original(msg)

    client._send_threadsafe = spy
    try:
        x = dask.delayed(np.sum)(big)
        y = dask.delayed(lambda df: df.a.sum() + df.b.sum())(frame)
        assert client.compute([x, y], sync=True) == [big.sum(), frame.a.sum() + 200_000]
    finally:
        del client._send_threadsafe
    # the codec reads the message: a record is (key, run spec, deps[, priority])
    specs = [rec[1][1] for msg in sent
             for rec in decode_update_graph("c", msg, "spy").tasks]
    for s in specs:
        assert s.kind == 1 and len(s.frames[0]) < 10_000   # small header pickle ...
    sizes = sorted(f.nbytes for s in specs for f in map(memoryview, s.frames[1:]))
    assert big.nbytes in sizes                          # ... the array as its own frame
    assert frame.a.values.nbytes in sizes or frame.a.values.nbytes * 2 in sizes


def test_out_of_band_frames_per_message_are_bounded(client, monkeypatch):
    # 30 tasks, each with its own 4 KB array, and a 3 KB function all of them share:
    # out of band (a frame each) until the message holds 5 such frames, in band after.
    monkeypatch.setattr(di, "_MESSAGE_FRAME_BUDGET", 5)
    pad = "x" * 3000

    def total(a, pad=pad):
        return float(a.sum())

    arrays = [np.full(512, float(i)) for i in range(30)]
    sent = []
    real = client._send_threadsafe
    monkeypatch.setattr(client, "_send_threadsafe", lambda m: (sent.append(m), real(m)))
    parts = [dask.delayed(total)(a) for a in arrays]
    assert client.compute(dask.delayed(sum)(parts)).result() == sum(512.0 * i for i in range(30))
    specs = [rec[1][1] for m in sent if isinstance(m, list)
             for rec in decode_update_graph("c", m, "s").tasks]
    assert len(specs) == 31
    oob = [len(s.frames) - 1 for s in specs]
    assert sum(oob) == 5 and max(oob) <= 2
    # past the budget the arrays and the function's bytes are pickled in band
    assert sum(len(s.frames[0]) > 4096 + 3000 for s in specs) >= 25


def _graph_inside_a_task(n):
    from taskcore import get_client

    c = get_client()
    dsk = {("a", i): (inc, i) for i in range(n)}
    dsk["s"] = (sum, [("a", i) for i in range(n)])
    total = c.get(dsk, "s")                       # secedes while it waits
    return total + dask.delayed(sum)([dask.delayed(inc)(i) for i in range(n)]).compute(
        scheduler=c)


def test_a_callable_met_again_is_shared_unless_it_holds_a_future(client):
    import functools

    f = client.submit(inc, 10)                          # 11
    shared = functools.partial(add, 5)
    with_future = functools.partial(add, f)
    enc = di._Encoder(client)
    assert enc.func(shared) is shared                   # met once: inline
    assert isinstance(enc.func(shared), di._FnRef)      # met again: pickled once, shared
    assert enc.func(with_future) is with_future
    assert enc.func(with_future) is with_future         # a Future inside: never shared
    parts = [dask.delayed(shared)(i) for i in range(5)]
    parts += [dask.delayed(with_future)(i) for i in range(5)]
    total = client.compute(dask.delayed(sum)(parts))
    assert total.result() == sum(5 + i for i in range(5)) + sum(11 + i for i in range(5))


def test_dask_graphs_computed_inside_tasks(client):
    assert client.submit(_graph_inside_a_task, 10).result(timeout=30) == 110
    with pytest.raises(KeyError, match="not in the graph"):
        client.get({"a": 1}, "b")


# -- errors ----------------------------------------------------------------------------------

def test_errors_keep_type_and_traceback(client):
    x = dask.delayed(boom)(3)
    y = dask.delayed(inc)(x)
    with pytest.raises(ZeroDivisionError, match="boom on 3") as info:
        y.compute()
    assert "boom" in str(info.value.__cause__)           # the remote traceback text
    f = client.compute(y)
    assert isinstance(f.exception(), ZeroDivisionError)
    assert "in boom" in f.traceback()
    arr = da.ones((10, 10), chunks=5).map_blocks(lambda b: np.full_like(b, np.inf),
                                                 dtype="f8")
    assert np.isinf(arr.compute()).all()      # no error: only real exceptions err a task
    bad = da.ones((10, 10), chunks=5).map_blocks(lambda b: boom(b.shape), dtype="f8")
    with pytest.raises(ZeroDivisionError, match=r"boom on \(5, 5\)"):
        bad.sum().compute()
    # the client keeps working
    assert dask.delayed(inc)(1).compute() == 2


def test_compute_returns_futures(client):
    x = dask.delayed(inc)(1)
    f = client.compute(x)
    assert isinstance(f, Future) and f.result() == 2
    fs = client.compute([x, dask.delayed(inc)(x)])
    assert isinstance(fs, list) and [f.result() for f in fs] == [2, 3]
    assert client.compute(x, sync=True) == 2
    assert client.compute(5) == 5
    # persisting non-collections passes them through
    assert client.persist([x, 3])[1] == 3


def flaky(x, path):
    """Fails on its first call (counted in a file), then returns x."""
    with open(path, "a+") as f:
        f.seek(0)
        n = len(f.read())
        f.write(".")
    if n == 0:
        raise OSError("first call fails")
    return x


def test_annotations_and_placement_options(client, tmp_path):
    path = str(tmp_path / "flaky")
    with dask.annotate(retries=2):
        d = dask.delayed(flaky)(7, path)
    assert d.compute() == 7                       # retried after the first failure
    path2 = str(tmp_path / "flaky2")
    assert client.compute(dask.delayed(flaky)(8, path2), retries=1, sync=True) == 8
    first = sorted(client.nthreads())[0]
    parts = [dask.delayed(_on_worker)(dask_key_name=f"where-{i}") for i in range(6)]
    assert set(client.compute(parts, workers=[first], sync=True)) == {first}
    with dask.annotate(workers=[first]):
        parts = [dask.delayed(_on_worker)(dask_key_name=f"where2-{i}") for i in range(6)]
    assert set(dask.compute(*parts)) == {first}


# -- the default scheduler --------------------------------------------------------------------

def _on_worker():
    from taskcore import get_worker

    return get_worker().address


def test_default_scheduler_switch_and_restore(cluster):
    with dask.config.set(scheduler="sync"):
        c1 = Client(cluster)
        try:
            assert dask.config.get("scheduler") == c1.get
            # dataframe shuffles through tasks, not partd files on one host's disk
            assert dask.config.get("dataframe.shuffle.method") == "tasks"
            addr = dask.delayed(_on_worker)().compute()
            assert addr in c1.nthreads()
            assert dask.compute(dask.delayed(inc)(1)) == (2,)
            assert dask.persist(dask.delayed(inc)(1))[0].compute() == 2
            c2 = Client(cluster)
            assert dask.config.get("scheduler") == c2.get
            c1.close()                  # closed first: the second keeps the default
            assert dask.config.get("scheduler") == c2.get
            c2.close()                  # restores "sync", not the closed first client
            assert dask.config.get("scheduler") == "sync"
            assert dask.config.get("dataframe.shuffle.method", None) is None
        finally:
            c1.close()
        # a client that is not the default leaves dask alone
        with Client(cluster, set_as_default=False):
            assert dask.config.get("scheduler") == "sync"
        assert dask.config.get("scheduler") == "sync"


def test_default_scheduler_installed_when_dask_imported_later():
    code = """
import sys
from taskcore import Client, LocalCluster
assert "dask" not in sys.modules, "taskcore imported dask eagerly"
with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cl, Client(cl) as c:
    import dask
    assert dask.config.get("scheduler") == c.get
    assert dask.delayed(sum)([1, 2]).compute() == 3
assert dask.config.get("scheduler", None) is None
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_without_dask_only_dask_calls_fail():
    code = """
import sys
sys.modules["dask"] = None        # as if dask were not installed
from taskcore import Client, LocalCluster
with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cl, Client(cl) as c:
    assert c.submit(sum, [1, 2]).result() == 3
    try:
        c.get({"x": 1}, "x")
    except ImportError as e:
        assert "taskcore[dask]" in str(e), e
        print("ok")
"""
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- asynchronous clients ------------------------------------------------------------------------

def test_async_client():
    from taskcore.testing import cluster as acluster

    async def main():
        async with acluster(n_workers=2) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                x = da.arange(100, chunks=10)
                f = c.compute(x.sum())
                assert await f == 4950
                assert await c.get({"a": (inc, 1), "b": (inc, "a")}, ["b", "a"]) == [3, 2]
                xp = c.persist(x + 1)
                await taskcore.wait(di.futures_of(xp))
                assert await c.compute(xp.sum()) == 5050
                with pytest.raises(RuntimeError, match="await client.compute"):
                    x.sum().compute()          # blocking dask.compute on the client's loop
                # from another thread, the default scheduler works (it blocks that thread)
                import asyncio

                loop = asyncio.get_running_loop()
                v = await loop.run_in_executor(None, lambda: x.sum().compute())
                assert v == 4950

    run(main(), timeout=60)


# -- subprocess workers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def procs():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as c, \
            Client(c, set_as_default=False) as client:
        yield client


def local_scale(block, factor):
    return block * factor


def test_subprocess_workers_run_module_functions_and_lambdas(procs):
    x = da.random.RandomState(3).random_sample((200, 200), chunks=(50, 50))
    y = x.map_blocks(local_scale, 3.0).map_blocks(lambda b: b + 1)
    np.testing.assert_allclose(procs.compute(y.sum(), sync=True), sync(y.sum()))
    b = db.from_sequence(range(100), npartitions=4).map(lambda v: inc(v) * 2)
    assert procs.compute(b.sum(), sync=True) == sync(b.sum())
    ddf = dd.from_pandas(pd.DataFrame({"k": np.arange(1000) % 7, "v": np.arange(1000.0)}),
                         npartitions=4)
    got = procs.compute(ddf.groupby("k").v.apply(lambda s: s.max() - s.min(),
                                                 meta=("v", "f8")), sync=True)
    want = sync(ddf.groupby("k").v.apply(lambda s: s.max() - s.min(), meta=("v", "f8")))
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index())
    xp = procs.persist(x)
    np.testing.assert_allclose(procs.compute(xp.mean(), sync=True), sync(x.mean()))
    f = procs.submit(inc, 41)
    assert procs.compute(dask.delayed(local_scale)(f, 2), sync=True) == 84


def _lazy_records(n):
    return ({"operation": "ab"[i % 2], "count": i} for i in range(n))


def test_from_delayed_iterator(client):
    """A task whose result cannot be pickled (a generator) keeps it on its worker
    as an ordinary value; the task consuming it there runs (dask's own
    test_bag.py::test_from_delayed_iterator)."""
    from dask import delayed

    b = db.from_delayed([delayed(_lazy_records)(5) for _ in range(3)])
    got = dask.compute(b.count(), b.pluck("operation").frequencies(),
                       b.filter(lambda x: x["count"] > 2).count())
    assert got[0] == 15
    assert sorted(got[1]) == [("a", 9), ("b", 6)]
    assert got[2] == 6


def test_unpicklable_result_errs_only_on_gather(client):
    """The generator stays on the worker; only gathering it errs, naming the task."""
    import threading

    lock_fut = client.submit(threading.Lock, pure=False)
    assert client.submit(lambda lk: lk.acquire(False), lock_fut).result() is True
    with pytest.raises(TypeError, match="cannot be serialized"):
        lock_fut.result()
