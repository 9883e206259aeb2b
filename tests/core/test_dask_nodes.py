"""Dask tasks as plain tuples (core/dask_nodes.pyx): the client's walk, the worker's evaluator."""
import operator

import pytest

from taskcore.core.dask_nodes import _CALL as CALL
from taskcore.core.dask_nodes import _INNER as INNER
from taskcore.core.dask_nodes import _OPAQUE as OPAQUE
from taskcore.core.dask_nodes import _SUBGRAPH as SUBGRAPH
from taskcore.core.dask_nodes import Marker, NodeEncoder, toposort
from taskcore.testing import import_required

ts = import_required("dask._task_spec", "the [dask] extra")


class Dep:
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __repr__(self):
        return f"Dep({self.key!r})"


def encoder():
    return NodeEncoder(ts, Dep)


def test_calls_references_and_data():
    e = encoder()
    t = ts.Task("k", operator.add, ts.TaskRef("a"), 2)
    (tag, fn, args, kwargs, ev), needs = e.enc(t, None)
    assert (tag, fn, kwargs, ev, needs) == (CALL, operator.add, None, False, True)
    assert type(args[0]) is Dep and args[0].key == "a" and args[1] == 2
    # a nested call must be evaluated; keyword arguments are walked too
    t = ts.Task("k", max, ts.Task("i", abs, ts.TaskRef("a")), default=ts.TaskRef("b"))
    (tag, fn, args, kwargs, ev), _ = e.enc(t, None)
    assert ev is True and args[0][0] == CALL and kwargs["default"].key == "b"
    assert e.enc(ts.DataNode("d", [1, 2]), None) == ([1, 2], False)
    plain = ts.Task("k", len, "abc")
    assert e.enc(plain, None)[0][2] is plain.args              # no node inside: not copied


def test_aliases_scopes_and_opaque_nodes():
    e = encoder()
    e.aliases = {"alias": "target"}
    assert e.enc(ts.Alias("x", "alias"), None)[0].key == "target"
    assert e.enc(ts.TaskRef("alias"), None)[0].key == "target"
    assert e.enc(ts.TaskRef("in"), {"in"}) == ((INNER, "in"), True)

    class Other(ts.GraphNode):
        def __init__(self, key, deps):
            self.key = key
            self._dependencies = frozenset(deps)

        def substitute(self, subs, key=None):
            return Other(self.key, [subs.get(d, d) for d in self._dependencies])

    (tag, node), needs = e.enc(Other("o", ["alias"]), None)
    assert tag == OPAQUE and needs and node.dependencies == {"target"}


def test_a_fused_subgraph_is_encoded_in_topological_order():
    inner = {
        "c": ts.Task("c", operator.mul, ts.TaskRef("b"), ts.TaskRef("__bw__0")),
        "b": ts.Task("b", operator.add, ts.TaskRef("__bw__1"), 1),
    }
    t = ts.Task("c", ts._execute_subgraph, inner, "c", ("__bw__0", "__bw__1"),
                ts.TaskRef("x"), 5)
    (tag, steps, outkey, names, values), needs = encoder().enc(t, None)
    assert tag == SUBGRAPH and outkey == "c" and names == ("__bw__0", "__bw__1")
    assert [k for k, _ in steps] == ["b", "c"]
    assert steps[0][1][2] == ((INNER, "__bw__1"), 1)
    assert type(values[0]) is Dep and values[1] == 5


def test_subgraph_bindings_of_each_dask_layout():
    e = encoder()
    assert e.subgraph_bindings((("a", "b"), 1, 2)) == (("a", "b"), (1, 2))
    assert e.subgraph_bindings(({"a": 1}, {"b": 2})) == (("a", "b"), (1, 2))
    assert e.subgraph_bindings(()) == ((), ())
    assert e.subgraph_bindings((("a", "b"), 1)) is None            # an unknown layout


def test_the_function_hook_and_the_shared_table():
    class Sharing(NodeEncoder):
        def func(self, f):
            self.asked.append(f)
            return f

    e = Sharing(ts, Dep)
    e.asked = []
    ref = object()
    e.fns[id(operator.add)] = ref
    assert e.enc(ts.Task("k", operator.add, 1, 2), None)[0][1] is ref
    assert e.used == {id(ref): ref} and e.asked == []            # the table: no hook call
    assert e.enc(ts.Task("k", operator.sub, 1, 2), None)[0][1] is operator.sub
    assert e.asked == [operator.sub]
    assert encoder().func(len) is len                             # the base: inline


def test_toposort():
    class N:
        def __init__(self, *deps):
            self.dependencies = set(deps)

    g = {"d": N("b", "c"), "c": N("a"), "b": N("a", "outside"), "a": N()}
    order = toposort(g)
    assert sorted(order) == ["a", "b", "c", "d"]
    assert all(order.index(d) < order.index(k) for k in g for d in g[k].dependencies if d in g)


# -- the worker's side --------------------------------------------------------------------

def test_run_node_calls_subgraphs_and_references():
    from taskcore.core.dask_nodes import run_node

    _CALL, _INNER, _OPAQUE, _SUBGRAPH = CALL, INNER, OPAQUE, SUBGRAPH
    assert run_node((_CALL, operator.add, (1, 2), None, False), None, {}) == 3
    # evaluate_args: nested calls and keyword arguments are run first
    inner = (_CALL, operator.mul, (3, 4), None, False)
    assert run_node((_CALL, max, (inner, 5), {"key": None}, True), None, {}) == 12
    fused = (_SUBGRAPH,
             (("b", (_CALL, operator.add, ((_INNER, "n0"), 1), None, True)),
              ("c", (_CALL, operator.mul, ((_INNER, "b"), (_INNER, "n1")), None, True))),
             "c", ("n0", "n1"), (10, inner))
    assert run_node(fused, None, {}) == (10 + 1) * 12
    node = ts.Task("o", operator.sub, ts.TaskRef("x"), ts.TaskRef("y"))
    assert run_node((_OPAQUE, node), {"x": 50}, {"y": 8}) == 42     # local first, then data
    with pytest.raises(KeyError):
        run_node((_OPAQUE, node), None, {"y": 8})
    with pytest.raises(ValueError, match="unknown encoded dask node"):
        run_node((Marker("_NOPE"), 1), None, {})


def test_markers_pickle_by_name():
    import pickle

    from taskcore.core.dask_nodes import _CALL, _LEGACY

    assert pickle.loads(pickle.dumps(_CALL)) is _CALL
    assert pickle.loads(pickle.dumps((_LEGACY, 1))) == (_LEGACY, 1)
