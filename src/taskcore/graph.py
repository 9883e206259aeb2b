"""Task payloads as the worker sees them.

A run spec is opaque to the scheduler (it never unpickles user code). The
client builds it, the worker executes it:

    ["call", func, args, kwargs]
        func is the function's pickle: its bytes when that is one frame of at
        most 64 kB (a plain msgpack bin on the wire: no ext hooks at the
        client, scheduler or worker), else a Serialized. Every task of a map
        shares it, so the function is pickled once; a map of several tasks
        sends it as one Serialized object, written once per message and kept
        once by the scheduler. args is a list of msgpack-native values or a Serialized
        (args, kwargs) tuple in which dependencies appear as TaskRef(key).
    ["call", func, args, None, refs]
        flat msgpack-native args in which the slots listed in refs hold the
        keys of dependencies, replaced by their values before the call (the
        common `submit(f, future, 1)` costs no pickling).
    ["dask", node]
        node is a Serialized dask task-spec node (`dask._task_spec`); it is
        called with a {key: value} mapping of its dependencies.
    ["dask-t", template, values]
        a task of a dask layer: the layer's shared Serialized template, whose
        holes values fill (`core/templates.pyx`), then run as a "dask" node.
"""
from __future__ import annotations


class TaskRef:
    """Placeholder for the value of another key inside a task's arguments."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return (TaskRef, (self.key,))

    def __repr__(self):
        return f"TaskRef({self.key!r})"

    def __eq__(self, other):
        return isinstance(other, TaskRef) and other.key == self.key

    def __hash__(self):
        return hash(("TaskRef", self.key))


def substitute(obj, data):
    """Replace every TaskRef in obj (nested lists, tuples, dicts, sets) by data[key]."""
    t = type(obj)
    if t is TaskRef:
        return data[obj.key]
    if t is list:
        return [substitute(x, data) for x in obj]
    if t is tuple:
        return tuple(substitute(x, data) for x in obj)
    if t is dict:
        return {k: substitute(v, data) for k, v in obj.items()}
    if t in (set, frozenset):
        return t(substitute(x, data) for x in obj)
    return obj
