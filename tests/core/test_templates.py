"""Task templates (core/templates.pyx): split on the client, fill on the worker."""
import operator
import pickle
import random

import pytest

from taskcore.core.dask_nodes import _CALL as CALL
from taskcore.core.dask_nodes import _LEGACY as LEGACY
from taskcore.core.templates import Hole, Node, Template, Templater, fill

FN = operator.add          # a shared function: kept by identity, pickled by reference


class Dep:
    """Stands for the encoder's dependency marker: its `key` is the dependency."""
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key



def task(i, j, dep_keys, shape=(10, 10)):
    return (CALL, FN, tuple(Dep(k) for k in dep_keys), {"axis": (0, 1), "shape": shape},
            ("x", i, j), True)


def roundtrip(tp, prefix, encoded, data):
    tmpl, values = tp.split(prefix, encoded)
    sk = pickle.loads(pickle.dumps(tmpl.skeleton)) if tmpl.payload is None else tmpl.skeleton
    tmpl.payload = b"sent"
    return tmpl, values, fill(sk, values, data)


def expected(encoded, data):
    """encoded with each Dep replaced by its value (what unpickling did)."""
    t = type(encoded)
    if t is Dep:
        return data[encoded.key]
    if t in (tuple, list):
        return t(expected(x, data) for x in encoded)
    if t is dict:
        return {k: expected(v, data) for k, v in encoded.items()}
    return encoded


def test_tasks_of_a_layer_share_a_template_and_carry_their_values():
    tp = Templater(Dep)
    data = {("a", i): i * 100 for i in range(10)}
    seen = []
    for i in range(3):
        for j in range(3):
            enc = task(i, j, [("a", i), ("a", j)])
            tmpl, values, node = roundtrip(tp, "x", enc, data)
            assert node == expected(enc, data)
            seen.append(tmpl)
    # the first task is taken as is; the second generalizes its index: one template after
    assert tp.templates_made == 2
    assert seen[1] is seen[-1]
    tmpl, values = tp.split("x", task(7, 8, [("a", 3), ("a", 4)]))
    assert tmpl is seen[-1] and values == [("a", 3), ("a", 4), ("x", 7, 8)]


def test_a_differing_constant_generalizes_and_types_are_kept_apart():
    tp = Templater(Dep)
    for a, b in [(1, 1.0), (1, True), (0.0, -0.0), ("1", b"1"), (None, 0), (float("nan"), float("nan"))]:
        tp = Templater(Dep)
        first, _ = tp.split("p", (CALL, a))
        tmpl, values = tp.split("p", (CALL, b))
        assert tmpl is not first, (a, b)
        assert values == [b] or values[0] != values[0]
        assert repr(fill(tmpl.skeleton, values, {})[1]) == repr(b)
    tp = Templater(Dep)
    first, _ = tp.split("p", (CALL, 2.5, (1, 2)))
    assert tp.split("p", (CALL, 2.5, (1, 2)))[0] is first         # equal: same template


def test_a_different_object_or_structure_starts_a_new_template():
    tp = Templater(Dep)
    t1, _ = tp.split("p", (CALL, FN, 1))
    other = operator.sub
    t2, values = tp.split("p", (CALL, other, 1))          # a function kept by identity
    assert t2 is not t1 and fill(t2.skeleton, values, {})[1] is other
    t3, values = tp.split("p", (CALL, other, 1, 2))       # one more argument
    assert t3 is not t2 and values == []
    t4, values = tp.split("p", [CALL, other, 1, 2])       # a list, not a tuple
    assert t4 is not t3 and type(fill(t4.skeleton, values, {})) is list


def test_a_layer_past_its_budget_is_not_templated():
    tp = Templater(Dep, budget=3)
    results = [tp.split("p", (CALL, object())) for _ in range(5)]
    assert [r is None for r in results] == [False, False, False, True, True]
    assert tp.split("p", (CALL, FN)) is None              # stays off for that layer
    assert tp.split("q", (CALL, FN)) is not None          # other layers are not affected
    tp.disable("q")
    assert tp.split("q", (CALL, FN)) is None
    tp.disable("new")
    assert tp.split("new", (CALL, FN)) is None


def test_values_are_msgpack_scalars_only():
    tp = Templater(Dep)
    tp.split("p", (CALL, 1))
    big = 2 ** 70
    tmpl, values = tp.split("p", (CALL, big))       # too big for msgpack: kept by identity
    assert values == [] and fill(tmpl.skeleton, values, {})[1] == big
    tp = Templater(Dep)
    tp.split("p", (CALL, 2 ** 64 - 1))
    tmpl, values = tp.split("p", (CALL, 2 ** 63))         # unsigned 64 bits: a value
    assert values == [2 ** 63]
    tp = Templater(Dep)
    tp.split("p", (CALL, (1, [2])))
    tmpl, values = tp.split("p", (CALL, (1, [3])))        # nested: holes inside, not whole
    assert values == [3] and fill(tmpl.skeleton, values, {}) == (CALL, (1, [3]))


def test_dict_keys_are_part_of_the_shape():
    tp = Templater(Dep)
    t1, _ = tp.split("p", (CALL, {"a": 1, "b": 2}))
    t2, values = tp.split("p", (CALL, {"a": 1, "b": 3}))
    assert values == [3] and fill(t2.skeleton, values, {}) == (CALL, {"a": 1, "b": 3})
    t3, _ = tp.split("p", (CALL, {"a": 1, "c": 3}))
    assert t3 is not t2
    t4, _ = tp.split("p", (CALL, {"b": 3, "a": 1}))       # order differs: a new shape
    assert t4 is not t3
    k = (1, [2])                                          # an unhashable-looking key: whole
    tp.split("p", (CALL, {(1, 2): Dep("d")}))
    tmpl, values = tp.split("p", (CALL, {(1, 2): Dep("e")}))
    assert values == ["e"] and fill(tmpl.skeleton, values, {"e": k}) == (CALL, {(1, 2): k})


def test_slices_are_shapes_with_holes():
    tp = Templater(Dep)
    tp.split("p", (CALL, (slice(0, 4, 2), slice(None))))
    tmpl, values = tp.split("p", (CALL, (slice(4, 8, 2), slice(None))))
    assert values == [4, 8]
    assert fill(tmpl.skeleton, [1, 3], {}) == (CALL, (slice(1, 3, 2), slice(None)))
    assert tp.split("p", (CALL, (slice(0, 4), slice(None))))[0] is not tmpl   # step differs
    assert tp.split("p", (CALL, ((0, 4), slice(None))))[0] is not tmpl        # not a slice


def test_a_layer_keeps_a_template_per_shape():
    tp = Templater(Dep, budget=4)
    shapes = [(CALL, tuple(Dep(("d", j)) for j in range(n))) for n in (1, 2, 3)]
    made = [tp.split("p", s)[0] for s in shapes]
    for _ in range(3):
        for s, t in zip(shapes, made):
            assert tp.split("p", s)[0] is t
    assert tp.templates_made == 3


def test_legacy_tuple_tasks_template_with_their_keys_as_values():
    # dask before the task spec: (_LEGACY, (func, *args), dependency keys); the keys
    # inside are plain tuples, found by the worker in its data.
    tp = Templater(Dep)
    made = set()
    for i in range(4):
        enc = (LEGACY, (FN, ("a", i), [("b", i), 10]), (("a", i), ("b", i)))
        tmpl, values = tp.split("c", enc)
        made.add(tmpl)
        assert fill(pickle.loads(pickle.dumps(tmpl.skeleton)), values, {}) == enc
    assert len(made) == 2 and values == [("a", 3), ("b", 3), ("a", 3), ("b", 3)]


def test_fill_reports_what_is_missing():
    tp = Templater(Dep)
    tmpl, values = tp.split("p", (CALL, Dep("a"), 5))
    with pytest.raises(KeyError):
        fill(tmpl.skeleton, values, {})
    with pytest.raises(ValueError, match="has hole 0 but the task carries 0 values"):
        fill(tmpl.skeleton, [], {"a": 1})
    with pytest.raises(TypeError):
        fill(tmpl.skeleton, ("a",), {"a": 1})


def test_skeleton_parts_pickle_by_value():
    sk = Node(0, (Hole(0, True), Node(2, (Hole(1, False),), ("k",)), 3))
    back = pickle.loads(pickle.dumps(sk))
    assert repr(back) == repr(sk)
    assert fill(back, ["d", 7], {"d": "D"}) == ("D", {"k": 7}, 3)
    assert Template(sk, 2).payload is None


def _random_task(rng, depth=0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([rng.randint(0, 3), rng.choice([0.5, -0.0, 1.5]), rng.choice("ab"),
                           None, True, b"x", ("k", rng.randint(0, 2)), Dep(("d", rng.randint(0, 3))),
                           FN, slice(rng.randint(0, 2), None)])
    if r < 0.6:
        return tuple(_random_task(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    if r < 0.8:
        return [_random_task(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice("xyz"): _random_task(rng, depth + 1) for _ in range(rng.randint(0, 2))}


def test_random_tasks_fill_back_to_what_was_split():
    rng = random.Random(7)
    data = {("d", i): f"value{i}" for i in range(4)}
    for trial in range(300):
        tp = Templater(Dep, budget=rng.choice([1, 4, 100]))
        base = _random_task(rng)
        for _ in range(8):
            enc = base if rng.random() < 0.5 else _random_task(rng)
            r = tp.split("p", enc)
            if r is None:
                continue
            tmpl, values = r
            assert len(values) == tmpl.n_values
            sk = pickle.loads(pickle.dumps(tmpl.skeleton))
            assert repr(fill(sk, values, data)) == repr(expected(enc, data)), (trial, enc)
