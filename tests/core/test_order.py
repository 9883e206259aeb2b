"""taskcore.core.order: a valid, memory-frugal execution order, with no I/O.

Validity (a permutation, dependencies first) is checked on random graphs; the
quality on dask's own graph shapes is compared with dask.order by the peak number
of results a sequential run in rank order holds.
"""
import random

import pytest

from taskcore.core.order import order_graph
from taskcore.testing import import_required


class Node:
    """What order_graph reads of a graph node: its `.dependencies`."""

    def __init__(self, *deps):
        self.dependencies = frozenset(deps)


def graph(**edges):
    return {k: Node(*deps) for k, deps in edges.items()}


def check_valid(dsk, ordered, prio):
    assert sorted(prio.values()) == list(range(len(dsk)))
    assert ordered == sorted(dsk, key=prio.__getitem__)
    for k, node in dsk.items():
        for d in node.dependencies:
            if d in dsk:
                assert prio[d] < prio[k], (d, k)


def peak_held(dsk, prio):
    """Results held at once when the graph runs one task at a time in rank order
    (a result goes once its last dependent ran; an output counts while it runs)."""
    users = {k: 0 for k in dsk}
    for node in dsk.values():
        for d in node.dependencies:
            if d in dsk:
                users[d] += 1
    held = peak = 0
    for k in sorted(dsk, key=prio.__getitem__):
        held += 1
        peak = max(peak, held)
        for d in dsk[k].dependencies:
            if d in dsk:
                users[d] -= 1
                held -= users[d] == 0
        held -= users[k] == 0
    return peak


def test_empty_and_single():
    assert order_graph({}) == ([], {})
    assert order_graph({"a": Node()}) == (["a"], {"a": 0})


@pytest.mark.parametrize("seed", range(100))
def test_random_graphs_are_ordered_validly(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 400)
    keys = [("k", i) if i % 3 else f"k-{i}" for i in range(n)]   # str and tuple keys
    dsk = {}
    for i in range(n):
        width = rng.choice([0, 1, 1, 2, 3, 8])
        deps = {keys[j] for j in rng.sample(range(i), min(i, width))} if i else set()
        if rng.random() < 0.05:
            deps.add(("external", i))          # not in the graph: ignored
        dsk[keys[i]] = Node(*deps)
    items = list(dsk.items())
    rng.shuffle(items)                          # graph order is not topological
    dsk = dict(items)
    ordered, prio = order_graph(dsk)
    check_valid(dsk, ordered, prio)
    assert order_graph(dsk) == (ordered, prio)   # deterministic


def test_tree_reduction_runs_one_branch_at_a_time():
    # total <- p0 <- l0..l3, p1 <- l4..l7, p2 <- l8..l11
    edges = {f"l{i}": () for i in range(12)}
    for p in range(3):
        edges[f"p{p}"] = tuple(f"l{i}" for i in range(4 * p, 4 * p + 4))
    edges["total"] = ("p0", "p1", "p2")
    ordered, prio = order_graph(graph(**edges))
    assert ordered == ["l0", "l1", "l2", "l3", "p0", "l4", "l5", "l6", "l7", "p1",
                       "l8", "l9", "l10", "l11", "p2", "total"]


def test_largest_subtree_first():
    # out needs a chain of three and a single input: the chain runs first, so the
    # single input is not held while the chain runs.
    dsk = graph(a=(), b=("a",), c=("b",), single=(), out=("single", "c"))
    assert order_graph(dsk)[0] == ["a", "b", "c", "single", "out"]


def test_a_ready_dependent_that_frees_an_input_runs_at_once():
    # x and y feed two outputs' branches; once `early` is ranked, `late` (now the
    # last user of both) runs at once rather than when the walk reaches out2, after
    # out1's chain.
    dsk = graph(x=(), y=(), early=("x", "y"), late=("x", "y"), c0=(), c1=("c0",),
                c2=("c1",), filler=(), out1=("early", "c2"), out2=("filler", "late"))
    ordered, prio = order_graph(dsk)
    check_valid(dsk, ordered, prio)
    assert ordered.index("late") == ordered.index("early") + 1
    assert peak_held(dsk, prio) == 4        # 5 with late run after out1


def test_a_ready_dependent_that_frees_nothing_waits():
    # The walk reaches x through `use`; `slice` of x is wanted only by `far`, which
    # also needs a chain, and x is kept for `use2` anyway: ranking the slice right
    # after x would hold it through the chain and free nothing.
    dsk = graph(x=(), b0=(), b1=("b0",), b2=("b1",), b3=("b2",), use=("x", "b3"),
                slice=("x",), c0=(), c1=("c0",), c2=("c1",), far=("c2", "slice"),
                use2=("x",), out=("use", "far", "use2"))
    ordered, _ = order_graph(dsk)
    assert ordered.index("slice") > ordered.index("c2")


def test_after_an_output_the_walk_goes_on_from_what_is_held():
    # out1 leaves x held (b still needs it, and q, not made yet); out3 is a larger
    # output than out2 but needs none of it: out2's branch, which consumes x, comes
    # first.
    dsk = graph(x=(), a=("x",), p0=(), p1=("p0",), out1=("a", "p1"),
                c0=(), c1=("c0",), c2=("c1",), c3=("c2",), out3=("c3",),
                q=(), b=("x", "q"), out2=("b",))
    ordered, prio = order_graph(dsk)
    check_valid(dsk, ordered, prio)
    assert ordered.index("out1") < ordered.index("b") < ordered.index("out2") < ordered.index("c0")


def test_cycles_are_named():
    with pytest.raises(RuntimeError, match=r"cycle in the task graph: 'a' -> 'b' -> 'c' -> 'a'"):
        order_graph(graph(a=("c",), b=("a",), c=("b",), d=()))
    with pytest.raises(RuntimeError, match="cycle in the task graph: 'x' -> 'x'"):
        order_graph(graph(x=("x",)))
    # a cycle behind an acyclic part
    with pytest.raises(RuntimeError, match="cycle"):
        order_graph(graph(root=("p",), p=("q",), q=("p",)))


def test_wide_diamonds_do_not_overflow_sizes():
    # 60 layers, each node depending on every node of the layer below: the
    # per-path subtree sizes grow as 10**60 and must saturate, not wrap.
    dsk = {}
    for layer in range(60):
        for i in range(10):
            dsk[(layer, i)] = Node(*[(layer - 1, j) for j in range(10)] if layer else [])
    ordered, prio = order_graph(dsk)
    check_valid(dsk, ordered, prio)


def test_nodes_without_dependencies_attribute_fail_clearly():
    with pytest.raises(AttributeError):
        order_graph({"a": object()})


# -- against dask.order, on dask's graphs -------------------------------------------------

GRAPHS = ["sum", "sum-split-every-3", "x+x.T", "matmul", "rechunk", "mean-std",
          "map_overlap", "cumsum", "tsqr", "groupby", "set_index", "two outputs sharing inputs",
          "blocks sharing seven inputs", "gh-3055"]
# built as dask's own tests build them: no finalize task over the outputs
RAW = {"blocks sharing seven inputs", "gh-3055"}
# Where dask.order's own peak depends on the process's hash seed (its tie-breaks
# iterate sets of keys), the bound is looser: on cumsum it held 59-85 across seeds
# 0-7 and earlier runs, ours 65 under every seed.
SEED_DEPENDENT = {"cumsum": 1.15}


def _random_block(**inputs):
    import numpy as np

    return np.zeros((10, 10))


def dask_collections(name):
    da = import_required("dask.array", "the [dask] extra")
    dd = import_required("dask.dataframe", "the [dask] extra")
    pd = import_required("pandas", "the [dask] extra")
    x = da.ones((200, 200), chunks=10)
    y = da.random.RandomState(0).random_sample((400, 400), chunks=20)
    df = dd.from_pandas(pd.DataFrame({"a": range(20_000), "b": range(20_000)}), npartitions=200)
    return {
        "sum": lambda: [(x + 1).sum()],
        "sum-split-every-3": lambda: [(x + 1).sum(split_every=3)],
        "x+x.T": lambda: [(x + x.T).sum()],
        "matmul": lambda: [(x @ x).sum()],
        "rechunk": lambda: [x.rechunk((200, 5)).sum()],
        "mean-std": lambda: [(x - x.mean()) / x.std()],
        "map_overlap": lambda: [da.map_overlap(lambda b: b, y, depth=1).sum()],
        "cumsum": lambda: [y.cumsum(axis=0).sum()],
        "tsqr": lambda: [da.linalg.tsqr(da.ones((4000, 10), chunks=(100, 10)))[0].sum()],
        "groupby": lambda: [df.groupby(df.a % 10).b.sum()],
        "set_index": lambda: [df.set_index("b").a.sum()],
        "two outputs sharing inputs": lambda: [(x + 1).sum(), (x * 2).mean()],
        # dask's test_reduce_with_many_common_dependents: every block needs the same
        # seven small tasks; the first look-ahead rule ran each block to the end of
        # its chain once those were ranked (16 held against dask.order's 12)
        "blocks sharing seven inputs": lambda: _shared_inputs(da),
        # dask's test_gh_3055: two cumsum chains multiplied block by block; walking
        # one chain to its end before the other held 42 results (dask.order: 8)
        "gh-3055": lambda: _two_chains(da),
    }[name]()


def _two_chains(da):
    x = da.random.RandomState(0).normal(size=(20, 99), chunks=(1, None))
    for _ in range(2):
        y = (x[:, None, :] * x[:, :, None]).cumsum(axis=0)
        x = x.cumsum(axis=0)
    return [(y * x[:, None]).sum(axis=(1, 2))]


def _shared_inputs(da):
    from dask import delayed

    inputs = {f"k{i}": delayed(i, name=f"object-{i}") for i in range(7)}
    x = da.blockwise(_random_block, "yx", new_axes={"y": (10,) * 5, "x": (10,) * 5},
                     dtype=float, **inputs)
    return [x, x.sum(axis=1, split_every=20)]


@pytest.mark.parametrize("name", GRAPHS)
def test_holds_no_more_than_dask_order(name):
    from dask.order import order

    from taskcore.dask_integration import _compute_graph

    if name in RAW:
        # as dask's tests build them: unoptimized, no finalize task over the outputs
        from dask._task_spec import convert_legacy_graph
        from dask.base import collections_to_expr

        expr = collections_to_expr(dask_collections(name), optimize_graph=False).optimize()
        dsk = convert_legacy_graph(dict(expr.__dask_graph__()))
    else:
        dsk, _, _ = _compute_graph(dask_collections(name), True)
    ordered, prio = order_graph(dsk)
    check_valid(dsk, ordered, prio)
    ours, theirs = peak_held(dsk, prio), peak_held(dsk, order(dsk))
    # measured: equal on most shapes, fewer on x+x.T and cumsum, 130 vs 126 on map_overlap
    assert ours <= theirs * SEED_DEPENDENT.get(name, 1.05) + 2, (ours, theirs)
