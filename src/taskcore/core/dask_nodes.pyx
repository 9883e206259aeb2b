# cython: language_level=3, boundscheck=False, wraparound=False
"""Dask tasks as plain tuples: the client's encoder and the worker's evaluator.

Why compiled: dask's task-spec objects are slow to walk and to run. The client's
walk from them to these tuples visited ~10 nodes per fused array task and cost
~6.5 µs of client CPU per task in Python (3.3 compiled); the worker's evaluator of
the tuples, ~6 µs per task run in Python (docs/scale-profile.md).

The forms, tagged by a `Marker` at position 0 (markers pickle by name):

    (_CALL, func, args, kwargs, evaluate_args)   func(*args, **kwargs)
    (_SUBGRAPH, ((key, encoded), ...), outkey, names, values)
                                                 a fused task, in topological order,
                                                 with `values` bound to `names` inside
    (_INNER, key)                                a key of the enclosing subgraph
    (_OPAQUE, node)                              any other GraphNode: node(values)
    (_LEGACY, task, dependency keys)             a tuple task of dask before the spec
    Dep(key)                                     another task's value (client side;
                                                 the worker sees the value itself)
    a DataNode's value, as itself

`NodeEncoder.enc(node, scope)` makes them on the client. It writes nothing itself
beyond those tuples: the Python layer (`_Encoder` in dask_integration) subclasses
it, supplies the dependency type, and overrides the hook `func(f)`, which decides
how a callable travels (shared by a digest, or inline). The encoder's table of
shared functions (`fns`, by id) is consulted here first, so a callable already
shared costs no Python call. `run_node(x, local, data)` runs one on the worker.
"""


cdef class Marker:
    """A tag at position 0 of an encoded tuple; pickles by name (a global of this
    module)."""
    cdef readonly str name

    def __init__(self, str name):
        self.name = name

    def __reduce__(self):
        return self.name

    def __repr__(self):
        return self.name


_CALL = Marker("_CALL")
_SUBGRAPH = Marker("_SUBGRAPH")
_INNER = Marker("_INNER")
_OPAQUE = Marker("_OPAQUE")
_LEGACY = Marker("_LEGACY")

# C-level references to the same objects (module globals are dict lookups)
cdef Marker CALL = _CALL, SUBGRAPH = _SUBGRAPH, INNER = _INNER, OPAQUE = _OPAQUE
cdef Marker LEGACY = _LEGACY


# -- the worker's side: running an encoded node ---------------------------------------------

cdef inline object _v(object x, object local, object data):
    if type(x) is tuple and len(<tuple>x) and type((<tuple>x)[0]) is Marker:
        return run_node(<tuple>x, local, data)
    return x


cpdef object run_node(tuple x, object local, object data):
    """The value of encoded node x; `local` holds the enclosing fused subgraph's
    values (or None), `data` the task's dependencies."""
    cdef object m = x[0]
    cdef dict scope
    if m is CALL:
        func, args, kwargs = x[1], x[2], x[3]
        if x[4]:
            args = [_v(a, local, data) for a in args]
            if kwargs:
                kwargs = {k: _v(a, local, data) for k, a in kwargs.items()}
        return func(*args, **kwargs) if kwargs else func(*args)
    if m is INNER:
        return local[x[1]]
    if m is SUBGRAPH:
        scope = {} if local is None else dict(local)
        for key, dep in zip(x[3], x[4]):
            scope[key] = _v(dep, local, data)
        for key, enc in x[1]:
            scope[key] = _v(enc, scope, data)
        return scope[x[2]]
    if m is OPAQUE:
        node = x[1]
        values = {}
        for k in node.dependencies:
            values[k] = local[k] if local is not None and k in local else data[k]
        return node(values)
    if m is LEGACY:
        from dask.core import _execute_task

        return _execute_task(x[1], {k: data[k] for k in x[2]})
    raise ValueError(f"unknown encoded dask node {m!r}")


# -- the client's side: encoding dask's nodes -------------------------------------------------

cdef class NodeEncoder:
    """The compiled part of the client's dask-node encoder; see the module doc."""
    cdef public dict fns            # id(func) -> shared function reference
    cdef public dict used           # id(ref) -> ref, for the node being encoded
    cdef public dict aliases        # alias key -> the key it stands for
    cdef public object ts           # dask._task_spec, or None before it
    cdef public object TaskRef, Alias, DataNode, GraphNode, subgraph_fn
    cdef public frozenset task_types
    cdef object _dep_type
    cdef object _Dict, _Tuple
    cdef tuple _node_types

    def __init__(self, ts, dep_type):
        """ts: dask._task_spec (or None); dep_type(key) makes a dependency
        reference."""
        self.fns = {}
        self.used = {}
        self.aliases = {}
        self.ts = ts
        self._dep_type = dep_type
        self.task_types = frozenset()
        if ts is not None:
            self.TaskRef = ts.TaskRef
            self.Alias = ts.Alias
            self.DataNode = ts.DataNode
            self.GraphNode = ts.GraphNode
            self._node_types = (ts.GraphNode, ts.TaskRef)
            self.task_types = frozenset(
                t for t in (ts.Task, getattr(ts, "List", None), getattr(ts, "Tuple", None),
                            getattr(ts, "Set", None), getattr(ts, "Dict", None))
                if t is not None and t.__call__ is ts.Task.__call__)
            self.subgraph_fn = getattr(ts, "_execute_subgraph", None)
            self._Dict = getattr(ts, "Dict", None)
            self._Tuple = getattr(ts, "Tuple", None)

    # -- the hook ----------------------------------------------------------------------
    def func(self, f):
        """How a task's callable travels; the Python layer overrides this (shared
        functions). Here: inline, with its task."""
        return f

    cdef inline object _func(self, object f):
        ref = self.fns.get(id(f))
        if ref is not None:
            self.used[id(ref)] = ref
            return ref
        return self.func(f)

    # -- the walk ----------------------------------------------------------------------
    cdef inline bint _is_node(self, object a) except -1:
        cdef type t = type(a)
        if t is str or t is int or t is float or t is tuple or a is None:
            return False
        if t is self.TaskRef or t is self.Alias or t is self.DataNode or t in self.task_types:
            return True
        return isinstance(a, self._node_types)

    cpdef tuple enc(self, object node, object scope):
        """(encoded, needs_evaluation) for a GraphNode or TaskRef."""
        cdef type t = type(node)
        cdef bint ev = False
        cdef tuple args
        cdef list out = None
        cdef Py_ssize_t i, n
        cdef dict kw2
        if t is self.TaskRef or t is self.Alias:
            k = node.key if t is self.TaskRef else node.target
            if scope is not None and k in scope:
                return (INNER, k), True
            if self.aliases:
                k = self.aliases.get(k, k)
            return self._dep_type(k), False
        if t is self.DataNode:
            return node.value, False
        if t in self.task_types:
            func = node.func
            if func is self.subgraph_fn:
                r = self._enc_subgraph(node, scope)
                if r is not None:
                    return r, True
            args = tuple(node.args)
            n = len(args)
            for i in range(n):
                a = args[i]
                if self._is_node(a):
                    if out is None:
                        out = list(args[:i])
                    e = self.enc(a, scope)
                    out.append(e[0])
                    if e[1]:
                        ev = True
                elif out is not None:
                    out.append(a)
            kwargs = node.kwargs
            if kwargs:
                kw2 = {}
                for k, a in kwargs.items():
                    if self._is_node(a):
                        e = self.enc(a, scope)
                        a = e[0]
                        if e[1]:
                            ev = True
                    kw2[k] = a
                kwargs = kw2
            else:
                kwargs = None
            return (CALL, self._func(func), args if out is None else tuple(out),
                    kwargs, ev), True
        if self.aliases and not node.dependencies.isdisjoint(self.aliases):
            node = node.substitute({k: self.aliases[k] for k in node.dependencies
                                    if k in self.aliases})
        return (OPAQUE, node), True

    cdef object _enc_subgraph(self, object node, object scope):
        cdef list steps
        args = node.args
        if len(args) < 2 or type(args[0]) is not dict:
            return None            # an unknown layout: run dask's own _execute_subgraph
        inner, outkey = args[0], args[1]
        bindings = self.subgraph_bindings(tuple(args[2:]))
        if bindings is None:
            return None
        inkeys, deps = bindings
        depvals = tuple([self.enc(a, scope)[0] if self._is_node(a) else a for a in deps])
        inner_scope = set(inner)
        inner_scope.update(inkeys)
        if scope is not None:
            inner_scope |= scope
        steps = []
        for k in toposort(inner):
            steps.append((k, self.enc(inner[k], inner_scope)[0]))
        return (SUBGRAPH, tuple(steps), outkey, inkeys, depvals)

    cdef bint _mapping(self, object m):
        return type(m) is dict or (self._Dict is not None and type(m) is self._Dict)

    cdef bint _pairs(self, object args) except -1:
        for a in args:
            if type(a) is not self._Tuple or len(a.args) != 2:
                return False
        return True

    cpdef object subgraph_bindings(self, tuple rest):
        """(names, value nodes) that a fused task binds inside its subgraph, or None.

        dask >= 2025: _execute_subgraph(inner, outkey, names, *values), names being
        placeholders such as "__dask_blockwise__0". dask 2024.12:
        _execute_subgraph(inner, outkey, inkeys, external_deps), two {name: value}
        mappings (dicts or task-spec Dicts).
        """
        if len(rest) == 2 and self._mapping(rest[0]) and self._mapping(rest[1]):
            names, values = [], []
            for m in rest:
                if type(m) is dict:
                    items = m.items()
                elif m.args and self._pairs(m.args):
                    items = [a.args for a in m.args]        # dask 2024.12: Tuple(k, v) items
                else:
                    items = zip(m.args[::2], m.args[1::2])  # later: k, v, k, v, ...
                for k, v in items:
                    names.append(k)
                    values.append(v)
            return tuple(names), tuple(values)
        if not rest:
            return (), ()
        if isinstance(rest[0], (tuple, list)) and len(rest) - 1 == len(rest[0]):
            return tuple(rest[0]), tuple(rest[1:])
        return None


cpdef list toposort(dict graph):
    """Keys of a small {key: node} graph, dependencies first."""
    cdef list out = [], stack
    cdef set done = set()
    cdef bint expanded
    for root in graph:
        if root in done:
            continue
        stack = [(root, False)]
        while stack:
            k, expanded = stack.pop()
            if k in done:
                continue
            if expanded:
                done.add(k)
                out.append(k)
                continue
            stack.append((k, True))
            for d in graph[k].dependencies:
                if d in graph and d not in done:
                    stack.append((d, False))
    return out
