"""Dask collections on taskcore: `Client.compute/persist/get` and the worker's executor.

Install with ``pip install "taskcore[dask]"``. dask is imported lazily: without
it, `import taskcore` works and only the calls that need dask raise an
ImportError that names the extra.

Theory of operation
-------------------
Client side (`client_compute`, `client_persist`, `client_get`):

1. Collections become one dask expression (`collections_to_expr`, wrapped in
   `FinalizeCompute` for compute), which dask optimizes (`expr.optimize()`,
   which also runs the low-level fusion of graphs built from layers). dask
   before expressions (< 2025.1) goes through `collections_to_dsk` and each
   collection's `__dask_optimize__` instead, plus one finalize task per
   collection from `__dask_postcompute__`.
2. The materialized graph is converted to dask's task spec
   (`convert_legacy_graph`: legacy tuple tasks become `Task` nodes; dask
   before the task spec (< 2024.12) keeps tuples, run by `dask.core`) and
   ordered (`_order`: `dask.order`, or for graphs of 10,000 tasks or more
   taskcore's compiled order, `taskcore.core.order`): the rank becomes each
   task's in-graph priority, so reductions run depth-first as under dask's own
   schedulers.
3. Keys this client already holds futures for (persisted collections) are not
   sent again: they become dependencies, and the graph is culled behind them.
   Aliases nobody asked for (`Alias(k -> target)`, or a key standing for a
   future) are not tasks either: references to them point at their targets.
4. Each remaining node becomes one task of the update-graph's columns (key, run
   spec, dependencies, rank, options) in a single pass. The node is *encoded*
   (below); a task of a layer (a tuple key) is then split into its layer's
   shared template and its own values (`taskcore.core.templates`): the run spec
   `["dask-t", template, values]`, the template pickled once. Other nodes, and
   the layers that do not template (each task holding its own array, seed or
   callable), are pickled on their own with protocol 5 and a buffer callback, so
   a numpy array or a DataFrame embedded in the graph travels as out-of-band
   frames (zero copy), never inside the message header: `["dask", Serialized]`.
   `dask.annotate(retries=, workers=, resources=, allow_other_workers=)` become
   per-task options.

The encoded form is what the worker runs. Unpickling dask's `Task` objects and
evaluating them through `Task.__call__` costs more than most small tasks (a
fused task calls `dask.order` on its subgraph every time it runs), so nodes are
rewritten into plain tuples (calls, fused subgraphs in topological order, inner
references, opaque nodes: `taskcore.core.dask_nodes` lists the forms), made by its
compiled `NodeEncoder` and run by its compiled `run_node`.

References to other tasks (`TaskRef`, `Alias`) pickle as `_dep(key)`: the worker
replaces them by the dependency's value while it unpickles the task (every
dependency is in its data while the task runs); in a template they are
dependency holes, filled the same way. `DataNode`s become their value.

Functions: a task's function that is a plain function, builtin, ufunc or class
(one object shared by many tasks) is pickled once per graph with cloudpickle
(by reference when importable, by value for lambdas, closures, `__main__` and
modules registered with `cloudpickle.register_pickle_by_value`) and embedded
as `_load_fn(digest, bytes)`; a worker unpickles each digest once. Callables
made per task (partials, `toolz.Compose`) are pickled inline with the task.

Pickling takes the C pickler's fast path. A byte scan of its output finds the
rare nodes that need care: a taskcore `Future` (it becomes a dependency and
`_dep(key)`, wherever it sits, even inside a literal), or a reference to
`__main__` or a by-value module. Those are pickled again by `_NodePickler`,
which routes functions and classes through the shared function table.
"""
from __future__ import annotations

import bisect
import hashlib
import inspect
import io
import pickle
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterator, Mapping

from taskcore.core.dask_nodes import _LEGACY, Marker, NodeEncoder, run_node
from taskcore.core.messages import release_keys, update_graph_columns
from taskcore.core.serialize import Serialized
from taskcore.core.templates import Templater, fill
from taskcore.core.worker_dispatch import task_local
from taskcore.futures import CANCELLED, ERROR, LOST, Future, futures_of  # noqa: F401 (re-export)
from taskcore.utils import gc_paused

DASK_EXTRA = 'dask collections need dask: pip install "taskcore[dask]"'

_pickle_dumps = pickle.dumps
_pickle_loads = pickle.loads
_FunctionType = types.FunctionType
# Task functions pickled once per graph and shared by reference (see _Encoder.func).
_SHARED_FUNC_TYPES = frozenset({types.FunctionType, types.BuiltinFunctionType,
                                types.MethodDescriptorType, types.WrapperDescriptorType})
_MIN_OUT_OF_BAND = 2048          # same threshold as taskcore.core.serialize
# A shared function's pickle at least this large travels as a frame of its own: every
# record using it points at the one bytes object instead of copying it into its pickle
# (dask's curry of np.ones_like carries a 1.9 KB docstring into every `da.ones` task;
# out of band, the client's CPU per task of such a graph fell 43 -> 40 µs).
_FN_OUT_OF_BAND = _MIN_OUT_OF_BAND
# Out-of-band frames per message at most: past it, buffers are pickled in band. The
# wire's default limit is 1,000,000 frames per message, and a record whose frames are
# too large to ride inside frame 0 (4 KB together) adds its pickle as a frame too.
_MESSAGE_FRAME_BUDGET = 500_000


def _import_dask():
    try:
        import dask
    except ImportError as e:
        raise ImportError(DASK_EXTRA) from e
    return dask


# =============================================================================================
# Worker side: load and run an encoded node
# =============================================================================================

_tls = threading.local()         # .data: the running task's {key: value} store
_FN_CACHE: dict = {}             # digest -> function, on workers
_FN_CACHE_MAX = 4096


def _dep(key):
    """Unpickling hook: the value of dependency `key` (a TaskRef, Alias or Future)."""
    return _tls.data[key]


def _load_fn(digest, payload):
    """Unpickling hook: a task's function, unpickled once per worker process."""
    f = _FN_CACHE.get(digest)
    if f is None:
        f = _pickle_loads(payload)
        if len(_FN_CACHE) >= _FN_CACHE_MAX:
            _FN_CACHE.clear()
        _FN_CACHE[digest] = f
    return f


class DaskTaskDeserializationError(Exception):
    """A dask task could not be unpickled on the worker (missing module, version skew...)."""


_TEMPLATES_BY_ID: dict = {}      # id(payload) -> (payload, skeleton): one message's tasks
_TEMPLATES: dict = {}            # the payload's bytes -> skeleton: across messages
_TEMPLATES_MAX = 1024


def _skeleton(payload):
    """The skeleton of a task template (`core/templates.pyx`), unpickled once per
    worker process: the tasks of one message share one payload object; later
    messages carry equal bytes."""
    hit = _TEMPLATES_BY_ID.get(id(payload))
    if hit is not None and hit[0] is payload:
        return hit[1]
    if type(payload) is not Serialized:
        raise ValueError(f"a dask task template must be serialized, not {type(payload).__name__}")
    content = tuple(bytes(f) for f in payload.frames)
    sk = _TEMPLATES.get(content)
    if sk is None:
        sk = payload.deserialize()
        if len(_TEMPLATES) >= _TEMPLATES_MAX:
            _TEMPLATES.clear()
        _TEMPLATES[content] = sk
    if len(_TEMPLATES_BY_ID) >= _TEMPLATES_MAX:
        _TEMPLATES_BY_ID.clear()
    _TEMPLATES_BY_ID[id(payload)] = (payload, sk)
    return sk


def execute_dask_node(payload, data, values=None):
    """Run one dask task on a worker. `data` holds every dependency (worker guarantee).
    With `values`, payload is a template (`core/templates.pyx`) that they fill."""
    prev = getattr(_tls, "data", None)
    _tls.data = data
    try:
        try:
            if values is not None:
                if type(values) is not list:
                    raise ValueError("the values of a dask task template must be a list, "
                                     f"not {type(values).__name__}")
                obj = fill(_skeleton(payload), values, data)
            else:
                obj = payload.deserialize() if type(payload) is Serialized else payload
        except KeyError:
            raise
        except Exception as e:
            raise DaskTaskDeserializationError(
                f"could not deserialize a dask task: {type(e).__name__}: {e}") from e
        if type(obj) is tuple and obj and type(obj[0]) is Marker:
            result = run_node(obj, None, data)
        else:
            result = obj          # a DataNode's value, or an Alias resolved while loading
        if inspect.iscoroutine(result):      # an async def task function
            import asyncio

            result = asyncio.run(result)
        return result
    finally:
        _tls.data = prev


# =============================================================================================
# Client side: encode and serialize nodes
# =============================================================================================

class _Dep:
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return (_dep, (self.key,))


class _FnRef:
    __slots__ = ("digest", "payload", "counts")

    def __init__(self, digest, payload, counts):
        self.digest = digest
        self.payload = payload
        self.counts = counts     # occurrences of each _Encoder.scan name in payload

    def __reduce__(self):
        return (_load_fn, (self.digest, self.payload))


_INLINE = object()                # _Encoder.seen: a callable that is never shared
_FUTURE_MARK = b"_future_from_key"    # in a pickle that holds a taskcore Future


class _Retry(Exception):
    pass


def _ts():
    """dask._task_spec, or None for dask versions before the task spec (< 2024.12)."""
    try:
        import dask._task_spec as ts
    except ImportError:
        return None
    return ts


class _Encoder(NodeEncoder):
    """Turns graph nodes into task records; one per submitted graph (caches functions).
    The walk over dask's nodes (`enc`) is compiled (`core/dask_nodes.pyx`); this
    layer decides how functions travel (`func`) and pickles (`dumps`)."""

    def __init__(self, client):
        import cloudpickle

        NodeEncoder.__init__(self, _ts(), _Dep)
        self.client = client
        self.cloudpickle = cloudpickle
        self.keep: list = []         # the functions, so their ids stay valid
        self.seen: dict = {}         # id -> a callable met once (or _INLINE: never shared)
        # Byte strings whose presence in a plain pickle means it needs the careful
        # pickler: a taskcore Future (pickles through futures._future_from_key), or a
        # reference to __main__ or a by-value module (must travel by value).
        self.scan = [_FUTURE_MARK, b"__main__"]
        self.scan += [m.encode() for m in cloudpickle.list_registry_pickle_by_value()]
        self.message_frames = 0      # out-of-band frames in the message being built
        self.shared_types = _SHARED_FUNC_TYPES
        np = sys.modules.get("numpy")
        if np is not None:
            self.shared_types = self.shared_types | {np.ufunc}

    # -- functions: pickled once per graph ------------------------------------------------
    def func(self, f):
        """How a Task's function is embedded: shared (_FnRef) or inline.

        Plain functions, builtins and classes are usually one object for many
        tasks: pickled once, embedded as bytes (each worker unpickles them once).
        Other callables (partials, toolz curries and Composes, bound methods) are
        often made per task: the first time one is met it is pickled inline with its
        task, and only one met again in this graph (dask makes one partial or curry
        per layer) is shared, unless it holds a taskcore Future, which must stay
        visible to the node's pickler to become a dependency. Sharing a curry of
        `np.ones_like` (with its docstring) cut the client's CPU per task of an
        array graph by ~15 µs and the workers' by ~9.
        """
        if type(f) in self.shared_types or isinstance(f, type):
            return self.fn(f)
        ref = self.fns.get(id(f))
        if ref is not None:
            self.used[id(ref)] = ref
            return ref
        seen = self.seen.get(id(f))
        if seen is None:
            self.seen[id(f)] = f                # kept alive: its id stays its own
            return f
        if seen is _INLINE:
            return f
        ref = self.fn(f)
        payload = ref.payload
        if _FUTURE_MARK in (payload if type(payload) is bytes else payload.raw().tobytes()):
            del self.fns[id(f)]                 # holds a Future: inline, always
            del self.used[id(ref)]
            self.seen[id(f)] = _INLINE
            return f
        return ref

    def fn(self, f):
        ref = self.fns.get(id(f))
        if ref is None:
            try:
                b = self.cloudpickle.dumps(f, protocol=5)
            except Exception as e:
                raise TypeError(f"cannot serialize the task function {f!r}: "
                                f"{type(e).__name__}: {e}") from e
            digest = hashlib.md5(b).digest()
            if len(b) >= _FN_OUT_OF_BAND:
                ref = _FnRef(digest, pickle.PickleBuffer(b), None)
            else:
                # A function pickled by value names __main__ (or its module) inside
                # its bytes: remember how often, so the scan in dumps() skips those.
                counts = tuple(b.count(name) for name in self.scan)
                ref = _FnRef(digest, b, counts if any(counts) else None)
            self.fns[id(f)] = ref
            self.keep.append(f)
        self.used[id(ref)] = ref
        return ref

    # -- pickling -------------------------------------------------------------------------
    def dumps(self, obj, deps):
        """Serialized(obj): protocol 5, buffers out of band; Futures become dependencies."""
        frames = [None]
        room = _MESSAGE_FRAME_BUDGET - self.message_frames

        def buffer_callback(pb):
            try:
                mv = pb.raw()
            except BufferError:        # not contiguous: pickle copies it in band
                return True
            if mv.nbytes < _MIN_OUT_OF_BAND or len(frames) > room:
                return True
            frames.append(mv)
            return False

        used, self.used = self.used, {}
        try:
            data = _pickle_dumps(obj, protocol=5, buffer_callback=buffer_callback)
            # Cheap byte scans decide whether the careful (slower) pickler is needed;
            # names found only inside the embedded functions' bytes do not count.
            for i, name in enumerate(self.scan):
                n = data.count(name)
                if n:
                    for ref in used.values():
                        if ref.counts is not None:
                            n -= ref.counts[i]
                    if n > 0:
                        raise _Retry
        except Exception:
            del frames[1:]
            f = io.BytesIO()
            _NodePickler(f, self, deps, buffer_callback).dump(obj)
            data = f.getvalue()
        frames[0] = data
        self.message_frames += len(frames) - 1
        return Serialized(1, frames)


try:
    from cloudpickle.cloudpickle import _should_pickle_by_reference
except ImportError:              # a cloudpickle without the helper: a close heuristic
    def _should_pickle_by_reference(obj, name=None):
        import cloudpickle

        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", "")
        return (module not in (None, "__main__") and "<" not in qualname
                and module not in cloudpickle.list_registry_pickle_by_value())


class _NodePickler(pickle.Pickler):
    """The careful path, for nodes the plain pickle could not take as they are.

    C pickle plus one hook: a taskcore Future becomes a dependency of the task
    (`_dep(key)`), and functions and classes go through the encoder's shared
    function table (cloudpickled, by value when they are not importable by
    name: lambdas, closures, __main__, modules registered by value).
    """

    def __init__(self, file, encoder, deps, buffer_callback):
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._encoder = encoder
        self._deps = deps

    def reducer_override(self, obj):
        t = type(obj)
        if t is Future:
            _check_future(obj, self._encoder.client)
            self._deps.append(obj.key)
            return (_dep, (obj.key,))
        if t is _FunctionType or (isinstance(obj, type) and not _should_pickle_by_reference(obj)):
            if obj is _dep or obj is _load_fn:
                return NotImplemented
            return _FnRef.__reduce__(self._encoder.fn(obj))
        return NotImplemented


def _check_future(f, client):
    if f.client is not client and getattr(f.client, "address", None) != client.address:
        raise ValueError(f"{f!r} belongs to a client of another scheduler "
                         f"({f.client.address}), not {client.address}")


# =============================================================================================
# Graphs from collections
# =============================================================================================

def _flatten(x):
    if isinstance(x, list):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


def _materialize(dsk):
    """A {key: node} dict in dask's task spec from a dict, HighLevelGraph or expression."""
    if not isinstance(dsk, Mapping) and hasattr(dsk, "__dask_graph__"):
        dsk = dsk.__dask_graph__()
    if not isinstance(dsk, dict):
        from dask.utils import ensure_dict

        dsk = ensure_dict(dsk)
    ts = _ts()
    if ts is not None:
        return ts.convert_legacy_graph(dsk)
    return dict(dsk)


def _annotations_of(obj):
    """{annotation: {key: value}} set with dask.annotate(...) on obj's layers."""
    try:
        if hasattr(obj, "__dask_annotations__"):
            return dict(obj.__dask_annotations__() or {})
        layers = getattr(obj, "layers", None)
        if layers:
            out: dict = {}
            for layer in layers.values():
                for name, value in (getattr(layer, "annotations", None) or {}).items():
                    d = out.setdefault(name, {})
                    for k in layer:
                        d[k] = value(k) if callable(value) else value
            return out
    except Exception:       # annotations are best effort; never fail a computation on them
        return {}
    return {}


def _has_exprs():
    try:
        from dask.base import collections_to_expr  # noqa: F401  (dask >= 2025.1)
        from dask._expr import FinalizeCompute  # noqa: F401
    except ImportError:
        return False
    return True


def _compute_graph(collections, optimize_graph, **kwargs):
    """(graph, one output key per collection, annotations) to compute `collections`."""
    if _has_exprs():
        from dask._expr import FinalizeCompute
        from dask.base import collections_to_expr

        expr = FinalizeCompute(collections_to_expr(collections, optimize_graph)).optimize()
        keys = list(_flatten(expr.__dask_keys__()))
        return _materialize(expr), keys, _annotations_of(expr)
    # dask < 2025.1: low-level graphs, __dask_optimize__ per collection type, then
    # one finalize task per collection (its __dask_postcompute__).
    from dask.base import collections_to_dsk, tokenize

    hlg = collections_to_dsk(collections, optimize_graph, **kwargs)
    annotations = _annotations_of(hlg)
    dsk = dict(hlg)
    keys = []
    for c in collections:
        func, extra = c.__dask_postcompute__()
        ck = c.__dask_keys__()
        fkey = "finalize-" + tokenize(c)
        dsk[fkey] = (func, ck, *extra)
        keys.append(fkey)
    return _materialize(dsk), keys, annotations


def _persist_graph(collections, optimize_graph, **kwargs):
    """(graph, [output keys per collection], rebuild callables, annotations) to persist."""
    if _has_exprs():
        from dask._expr import CompositeExpr, _ExprSequence
        from dask.base import collections_to_expr

        expr = collections_to_expr(list(collections), optimize_graph)
        has_composite = any(isinstance(e, CompositeExpr) for e in (
            expr.operands if isinstance(expr, _ExprSequence) else [expr]))
        expr = expr.optimize()
        parts = list(expr.operands) if isinstance(expr, _ExprSequence) else [expr]
        keys = [list(_flatten(k)) for k in expr.__dask_keys__()]
        rebuilds = []
        for c, part in zip(collections, parts if len(parts) == len(collections)
                           else [None] * len(collections)):
            if has_composite and isinstance(part, CompositeExpr):
                from dask.base import _rebuild_composite_collection

                rebuilds.append(lambda d, c=c, part=part: _rebuild_composite_collection(
                    c, part, d, cull_to_child_keys=True))
            else:
                func, state = c.__dask_postpersist__()
                rebuilds.append(lambda d, func=func, state=state: func(d, *state))
        return _materialize(expr), keys, rebuilds, _annotations_of(expr)
    from dask.base import collections_to_dsk

    dsk = collections_to_dsk(collections, optimize_graph, **kwargs)
    keys = [list(_flatten(c.__dask_keys__())) for c in collections]
    rebuilds = []
    for c in collections:
        func, state = c.__dask_postpersist__()
        rebuilds.append(lambda d, func=func, state=state: func(d, *state))
    return _materialize(dsk), keys, rebuilds, _annotations_of(dsk)


# =============================================================================================
# Submitting a graph
# =============================================================================================

def _held(client, key):
    """True when this client holds a live future for key (its data is, or will be, there)."""
    st = client._states.get(key)
    return (st is not None and client._refcount.get(key, 0) > 0
            and st.status not in (ERROR, CANCELLED, LOST))


def _legacy_deps(all_keys, task):
    """Keys a legacy (tuple) task refers to (dask before the task spec)."""
    from dask.core import keys_in_tasks

    return keys_in_tasks(all_keys, [task], as_list=False)


def _cull(dsk, wanted, external):
    """The part of dsk that `wanted` needs, not looking behind `external` keys."""
    out = {}
    stack = [k for k in wanted if k in dsk and k not in external]
    legacy = _ts() is None
    while stack:
        k = stack.pop()
        if k in out:
            continue
        node = dsk[k]
        out[k] = node
        for d in (_legacy_deps(dsk, node) if legacy else node.dependencies):
            if d in dsk and d not in out and d not in external:
                stack.append(d)
    return out


_timings = threading.local()


def last_timings():
    """Client-side seconds spent on this thread's last dask submission, by phase.

    {"graph": dask's optimization and materialization, "order": ordering the graph,
    "encode": building and pickling the task records, "tasks": records sent}
    """
    return dict(getattr(_timings, "value", {}))


def _timed(phase, t0):
    t = time.perf_counter()
    d = getattr(_timings, "value", None)
    if d is None:
        d = _timings.value = {}
    d[phase] = t - t0
    return t


# A large graph goes to the scheduler in pieces of consecutive ranks (`_order`): the
# first small, so that work starts soon; then doubling, up to a size that keeps each
# message far below the wire's limits. Pieces of 50,000 records rather than 200,000
# cost the scheduler 17 µs of CPU per task instead of 24 (333,458 tasks): it decodes a
# whole message before its tasks run, and the kernel zeroed fresh pages for each big one.
_FIRST_PIECE = 2_000
_MAX_PIECE = 50_000


def _chunk_bounds(n):
    """The ranks at which the pieces of an n-task ordered graph start (the first at 0
    is implied); empty when it goes in one message."""
    bounds = []
    start, size = 0, _FIRST_PIECE
    while start + size < n:
        start += size
        bounds.append(start)
        size = min(2 * size, _MAX_PIECE)
    return bounds


def _frontier(dsk, prio, bounds, aliases, skipped, wanted):
    """For each piece, the keys it must want: its tasks that a later piece depends on,
    and those the caller wants (the scheduler drops at once what nobody wants)."""
    out = [set() for _ in range(len(bounds) + 1)]
    piece = bisect.bisect_right
    first = bounds[0]
    for key in wanted:
        r = prio.get(key)
        if r is not None and key not in skipped:
            out[piece(bounds, r)].add(key)
    for key, node in dsk.items():
        if key in skipped:
            continue
        r = prio[key]
        if r < first:
            continue                    # the first piece depends on no earlier one
        deps = node.dependencies
        if not deps:
            continue
        c = piece(bounds, r)
        for d in deps:
            d = aliases.get(d, d)
            rd = prio.get(d)
            if rd is not None and d not in skipped:
                cd = piece(bounds, rd)
                if cd < c:
                    out[cd].add(d)
    return out


# Graphs of at least this many tasks are ordered by taskcore's compiled order
# (`taskcore.core.order`, ~1 µs per task) rather than by dask.order (~10-30 µs per
# task in Python): above it dask.order's cost is the larger part of the wait for the
# first task. dask config "taskcore.order" chooses: "auto" (this rule), "dask" or
# "compiled", for every graph.
_COMPILED_ORDER_MIN = 10_000
_ORDER_CHOICES = ("auto", "dask", "compiled")


def _order(dsk, task_spec):
    """(keys in execution order, {key: rank}) for graph dsk: dependencies rank
    before their dependents, and running in rank order holds little in memory."""
    import dask

    how = dask.config.get("taskcore.order", "auto")
    if how not in _ORDER_CHOICES:
        raise ValueError(f"dask config taskcore.order must be one of {_ORDER_CHOICES}, "
                         f"not {how!r}")
    if task_spec and (how == "compiled" or (how == "auto" and len(dsk) >= _COMPILED_ORDER_MIN)):
        from taskcore.core.order import order_graph

        return order_graph(dsk)
    from dask.order import order

    prio = order(dsk)
    ordered = [None] * len(prio)
    for k, r in prio.items():
        ordered[r] = k
    return ordered, prio


def _templates_on():
    """dask config "taskcore.templates" (default True): the tasks of a layer share one
    pickled template and carry only their own values (`core/templates.pyx`)."""
    import dask

    on = dask.config.get("taskcore.templates", True)
    if type(on) is not bool:
        raise ValueError(f"dask config taskcore.templates must be True or False, not {on!r}")
    return on


def _template_spec(enc, templater, layer, encoded):
    """`["dask-t", template, values]` for one encoded task of a layer, or None when
    the layer is not templated (its tasks are then pickled one by one)."""
    r = templater.split(layer, encoded)
    if r is None:
        enc.used = {}
        return None
    tmpl, values = r
    if tmpl.payload is None:
        found = []
        try:
            payload = enc.dumps(tmpl.skeleton, found)
        except Exception:
            payload = None          # the task's own pickle will say what is wrong
        if payload is None or found:
            # It holds a taskcore Future, which must be a dependency of each task
            # that uses it: those tasks are pickled one by one.
            templater.disable(layer)
            return None
        tmpl.payload = payload
    else:
        enc.used = {}               # what dumps() would have reset
    return ["dask-t", tmpl.payload, values]


def submit_graph(client, dsk, wanted, *, priority=0, workers=None, allow_other_workers=False,
                 resources=None, retries=None, ordering=True, annotations=None):
    """Send graph `dsk` ({key: node}) to the scheduler; return {wanted key: Future}.

    Keys held as futures by this client are reused, not recomputed. `annotations`
    ({name: {key: value}}, from dask.annotate) become per-task options: workers,
    allow_other_workers, resources and retries are honoured by the scheduler;
    any other annotation is passed to the worker with the task. An ordered graph of
    more than `_FIRST_PIECE` tasks goes in pieces (see `_chunk_bounds`).
    """
    t0 = time.perf_counter()
    wanted = list(dict.fromkeys(wanted))
    missing = [k for k in wanted if k not in dsk and not _held(client, k)]
    if missing:
        raise KeyError(f"keys not in the graph: {missing[:5]!r}")
    with client._lock:
        held = {k for k in dsk if _held(client, k)}
    all_keys = dsk
    if held:
        dsk = _cull(dsk, wanted, held)
    ts = _ts()
    prio = ordered = None
    if ordering and len(dsk) > 1:
        ordered, prio = _order(dsk, ts is not None)
    t0 = _timed("order", t0)
    common = client._task_options(workers, resources, retries, 0, allow_other_workers)
    enc = _Encoder(client)
    templater = Templater(_Dep) if _templates_on() else None
    piece = _Piece(prio, common, annotations)
    sent = 0
    if ts is not None:
        DataNode = ts.DataNode
        Alias = ts.Alias
        # Aliases (`Alias(k -> target)`, a future standing for another key) that
        # nobody asked for are not tasks: references to them go to their targets.
        # dask graphs hold many (one per output chunk of some layers); each would
        # cost a scheduler round trip.
        wanted_set = set(wanted)
        aliases = enc.aliases
        skipped = set()             # keys that are not sent as tasks
        for key, node in dsk.items():
            t = type(node)
            if t is Alias:
                if node.target == key:
                    skipped.add(key)
                elif key not in wanted_set:
                    aliases[key] = node.target
            elif t is DataNode and type(node.value) is Future:
                _check_future(node.value, client)
                if node.value.key == key:
                    skipped.add(key)            # a persisted key: already on the cluster
                elif key not in wanted_set:
                    aliases[key] = node.value.key
        for key in aliases:
            target = aliases[key]
            while target in aliases:
                target = aliases[target]
            aliases[key] = target
        skipped.update(aliases)
        bounds = _chunk_bounds(len(ordered)) if ordered is not None else []
        frontier = _frontier(dsk, prio, bounds, aliases, skipped, wanted) if bounds else None
        next_bound = bounds[0] if bounds else None
        chunk = 0
        temporary = set()           # wanted by the pieces sent so far, not by the caller
        try:
            for key in (ordered if ordered is not None else dsk):
                if next_bound is not None and prio[key] >= next_bound:
                    # The graph goes in pieces, in execution order, so the scheduler starts
                    # on the first while the rest is encoded; each piece wants its tasks
                    # that later pieces depend on, so they are not dropped meanwhile.
                    if piece.keys:
                        client._send_threadsafe(piece.message(list(frontier[chunk]),
                                                              int(priority or 0)))
                        temporary.update(frontier[chunk])
                        sent += len(piece.keys)
                        piece = _Piece(prio, common, annotations)
                        enc.message_frames = 0
                    chunk += 1
                    next_bound = bounds[chunk] if chunk < len(bounds) else None
                if key in skipped:
                    continue
                node = dsk[key]
                t = type(node)
                deps = node.dependencies
                deps = [aliases.get(d, d) for d in deps] if aliases else list(deps)
                spec = None
                if t is DataNode and type(node.value) is Future:
                    encoded = _Dep(node.value.key)
                    deps = [node.value.key]
                else:
                    encoded = enc.enc(node, None)[0]
                    if templater is not None and type(key) is tuple:
                        spec = _template_spec(enc, templater, key[0], encoded)
                if spec is None:
                    try:
                        spec = ["dask", enc.dumps(encoded, deps)]
                    except Exception as e:
                        raise TypeError(f"cannot serialize dask task {key!r}: {e}") from e
                piece.add(key, spec, deps)
        except BaseException:
            if temporary:               # what the pieces sent so far wanted goes again
                client._send_threadsafe(release_keys(list(temporary)))
            raise
        temporary -= wanted_set
    else:
        temporary = None
        skipped = {k for k, t in dsk.items() if type(t) is Future and t.key == k}
        for key, task in dsk.items():
            if type(task) is Future and task.key == key:
                continue
            deps = list(_legacy_deps(all_keys, task))
            encoded = (_LEGACY, task, tuple(deps))
            spec = None
            if templater is not None and type(key) is tuple:
                spec = _template_spec(enc, templater, key[0], encoded)
            if spec is None:
                spec = ["dask", enc.dumps(encoded, deps)]
            piece.add(key, spec, deps)
    # Refs first, then the message: the keys cannot be released in between.
    futures = {k: Future(k, client) for k in wanted}
    if piece.keys or not held.issuperset(wanted):
        client._send_threadsafe(piece.message(list(wanted), int(priority or 0)))
    sent += len(piece.keys)
    if temporary:
        # The whole graph is there now: the pieces' own wants go, dependents keep them.
        client._send_threadsafe(release_keys(list(temporary)))
    _timed("encode", t0)
    _timings.value["tasks"] = sent
    from taskcore import diagnostics

    if ordered is not None and sent > len(wanted):
        # Execution order: progress bars then list prefixes in the order they run.
        if skipped:
            ordered = [k for k in ordered if k not in skipped]
        diagnostics.remember_graph(client, wanted, ordered)
    else:
        diagnostics.remember_graph(client, wanted, [k for k in dsk if k not in skipped])
    return futures


# =============================================================================================
# Client API
# =============================================================================================

_OPTION_ANNOTATIONS = ("workers", "allow_other_workers", "resources", "retries")


class _Piece:
    """The columns of one update-graph message: each task's key, run spec,
    dependencies, rank in the graph's order (`prio`), and options (the call's
    `common` ones and the task's annotations; the column is left out when no
    task has any)."""

    __slots__ = ("keys", "specs", "deps", "ranks", "options", "prio", "common", "annotations")

    def __init__(self, prio, common, annotations):
        self.keys, self.specs, self.deps = [], [], []
        self.ranks = [] if prio is not None else None
        self.options = [] if common or annotations else None
        self.prio, self.common, self.annotations = prio, common, annotations

    def add(self, key, spec, deps):
        self.keys.append(key)
        self.specs.append(spec)
        self.deps.append(deps)
        if self.ranks is not None:
            self.ranks.append(self.prio[key])
        if self.options is not None:
            opts = self.common
            if self.annotations:
                opts = _annotate(opts, key, self.annotations)
            self.options.append(opts)

    def message(self, wanted, priority):
        return update_graph_columns(self.keys, self.specs, self.deps, wanted, priority,
                                    self.ranks, self.options)


def _annotate(opts, key, annotations):
    """opts for one task, with its dask.annotate() values (workers, retries, ...)."""
    out = None
    for name, by_key in annotations.items():
        if key not in by_key:
            continue
        value = by_key[key]
        if out is None:
            out = dict(opts) if opts else {}
        if name == "workers":
            out["workers"] = [value] if isinstance(value, str) else list(value)
        elif name == "allow_other_workers":
            out["allow_other_workers"] = bool(value)
        elif name == "resources":
            out["resources"] = dict(value)
        elif name == "retries":
            out["retries"] = int(value)
        elif name != "priority":         # per-task user priority: not supported
            out.setdefault("annotations", {})[name] = value
    return opts if out is None else out


def _submit_kwargs(kwargs):
    """Options for submit_graph: the call's keywords, else dask.annotate()'s global ones."""
    out = {k: kwargs[k] for k in ("workers", "allow_other_workers", "resources", "retries",
                                  "priority") if kwargs.get(k) is not None}
    try:
        import dask

        for k, v in dask.get_annotations().items():
            if k in _OPTION_ANNOTATIONS or k == "priority":
                out.setdefault(k, v)
    except (ImportError, AttributeError):
        pass
    return out


def _in_worker_task():
    return getattr(task_local, "worker", None) is not None


def client_get(client, dsk, keys, sync=True, asynchronous=None, **kwargs):
    """The dask scheduler protocol: compute `keys` (nested lists) of graph `dsk`.

    A synchronous client blocks and returns the results in the structure of
    `keys`; an asynchronous client returns an awaitable (or, called from
    another thread than its loop, blocks like a synchronous one).
    """
    _import_dask()
    flat = list(_flatten(keys))
    with gc_paused():
        t0 = time.perf_counter()
        graph = _materialize(dsk)
        annotations = _annotations_of(dsk)
        _timed("graph", t0)
        futures = submit_graph(client, graph, flat, annotations=annotations,
                               **_submit_kwargs(kwargs))
        del graph

    def pack(k):
        if isinstance(k, list):
            return [pack(x) for x in k]
        return futures[k]

    packed = pack(keys)
    if not sync:
        return packed

    async def gather():
        try:
            return await client._gather_struct(packed)
        finally:
            for f in futures.values():
                f.release()

    if client.asynchronous or asynchronous:
        if client._in_loop() or asynchronous:
            return gather()
        import asyncio

        return asyncio.run_coroutine_threadsafe(gather(), client.loop).result()
    # A task that computes a graph on the cluster gives up its thread meanwhile,
    # so a cluster of one-thread workers cannot deadlock on it.
    seceded = False
    if _in_worker_task():
        from taskcore.task_context import secede

        try:
            secede()
            seceded = True
        except Exception:
            seceded = False
    try:
        return client.sync(gather)
    finally:
        if seceded:
            from taskcore.task_context import rejoin

            rejoin()


def client_compute(client, collections, sync=False, optimize_graph=True, progress=False,
                   traverse=True, **kwargs):
    """Futures for dask collections (one Future, or a list for a list); see Client.compute."""
    dask = _import_dask()
    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if traverse:
        items = [dask.delayed(a) if isinstance(a, (list, set, tuple, dict, Iterator)) else a
                 for a in items]
    variables = [a for a in items if dask.is_dask_collection(a)]
    futures = {}
    names = []
    if variables:
        opt_kw = {k: v for k, v in kwargs.items() if k not in (
            "workers", "allow_other_workers", "resources", "retries", "priority",
            "fifo_timeout", "actors", "asynchronous")}
        with gc_paused():
            t0 = time.perf_counter()
            graph, names, annotations = _compute_graph(variables, optimize_graph, **opt_kw)
            _timed("graph", t0)
            futures = submit_graph(client, graph, names, annotations=annotations,
                                   **_submit_kwargs(kwargs))
            del graph
    out = []
    i = 0
    for a in items:
        if dask.is_dask_collection(a):
            out.append(futures[names[i]])
            i += 1
        else:
            out.append(a)
    if progress and futures:
        from taskcore.diagnostics import progress as show_progress

        p = show_progress(list(futures.values()), client=client, _display=True)
        if client.asynchronous and p is not None and hasattr(p, "__await__"):
            _spawn_on_loop(client, p)
    if sync:
        return client.gather(out[0] if singleton else out)
    return out[0] if singleton else out


def client_persist(client, collections, optimize_graph=True, progress=False, **kwargs):
    """Collections backed by futures (computing in the background); see Client.persist."""
    dask = _import_dask()
    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    variables = [a for a in items if dask.is_dask_collection(a)]
    results = {}
    if variables:
        opt_kw = {k: v for k, v in kwargs.items() if k not in (
            "workers", "allow_other_workers", "resources", "retries", "priority",
            "fifo_timeout", "actors", "asynchronous")}
        with gc_paused():
            t0 = time.perf_counter()
            graph, keys, rebuilds, annotations = _persist_graph(variables, optimize_graph,
                                                                **opt_kw)
            _timed("graph", t0)
            flat = [k for ks in keys for k in ks]
            futures = submit_graph(client, graph, flat, annotations=annotations,
                                   **_submit_kwargs(kwargs))
            del graph
        for c, ks, rebuild in zip(variables, keys, rebuilds):
            results[id(c)] = rebuild({k: futures[k] for k in ks})
        if progress:
            from taskcore.diagnostics import progress as show_progress

            p = show_progress(list(futures.values()), client=client, _display=True)
            if client.asynchronous and p is not None and hasattr(p, "__await__"):
                _spawn_on_loop(client, p)
    out = [results.get(id(a), a) for a in items]
    return out[0] if singleton else out


def _spawn_on_loop(client, awaitable):
    import asyncio

    async def run():
        await awaitable

    if client._in_loop():
        task = asyncio.ensure_future(run())
        _background.add(task)
        task.add_done_callback(_background.discard)
    else:
        asyncio.run_coroutine_threadsafe(run(), client.loop)


_background: set = set()


# -- dask config while a taskcore client is dask's default scheduler -------------------------
#
# Without a dask.distributed client, dask's dataframes shuffle through partd files
# on local disk ("disk"), which only works while every worker shares this host's
# disk. While a taskcore client is dask's scheduler, shuffles default to "tasks"
# (unless the user chose a method). Counted, so nested default clients compose.

_config_lock = threading.Lock()
_config_users = 0
_config_set_by_us = False


def acquire_dask_defaults():
    """Called when a client becomes dask's default scheduler."""
    global _config_users, _config_set_by_us
    import dask

    with _config_lock:
        _config_users += 1
        if _config_users == 1 and dask.config.get("dataframe.shuffle.method", None) is None:
            dask.config.set({"dataframe.shuffle.method": "tasks"})
            _config_set_by_us = True


def release_dask_defaults():
    """Called when such a client closes."""
    global _config_users, _config_set_by_us
    dask = sys.modules.get("dask")
    with _config_lock:
        _config_users = max(0, _config_users - 1)
        if _config_users == 0 and _config_set_by_us:
            _config_set_by_us = False
            if dask is not None and dask.config.get("dataframe.shuffle.method", None) == "tasks":
                dask.config.set({"dataframe.shuffle.method": None})


class AsyncClientScheduler:
    """What an asynchronous Client installs as dask's default scheduler.

    dask.compute() is synchronous: on the client's own event loop it would
    block the loop it waits on, so there it raises and says what to do
    instead; from any other thread it runs the graph and blocks that thread.
    dask.persist() returns at once, so it works everywhere.
    """

    def __init__(self, client):
        self._client = weakref.ref(client)

    @property
    def client(self):
        return self._client()

    def __call__(self, dsk, keys, **kwargs):
        client = self._client()
        if client is None or client.status != "running":
            raise RuntimeError("the asynchronous taskcore Client behind dask's default "
                               "scheduler is closed")
        if client._in_loop():
            raise RuntimeError(
                "dask.compute()/.compute() cannot block the event loop of an asynchronous "
                "taskcore Client: use `await client.compute(collection)` (or "
                "client.gather(client.compute(...))) instead")
        return client_get(client, dsk, keys, **kwargs)

    def persist(self, collections, optimize_graph=True, **kwargs):
        return client_persist(self._client(), collections, optimize_graph=optimize_graph,
                              **kwargs)
