# cython: language_level=3, boundscheck=False, wraparound=False
"""Task templates: one pickle per shape of dask task, a few values per task.

Why: the tasks of one dask layer differ only in their keys, their block indexes and
the odd constant (an edge block's shape), yet each was a pickle of its own: ~7 µs of
client CPU per task to pickle a 600-byte stream (Python `__reduce__` calls for the
encoder's markers and function references), ~4 µs on the worker to unpickle it, and
those bytes held by the scheduler for every task (docs/scale-profile.md).

What it does: `Templater.split(prefix, encoded)` takes one task's encoded node (the
plain tuples of `taskcore.dask_integration`) and returns `(Template, values)`: the
template is the node with every varying position replaced by a `Hole`, pickled
once by the caller and shared by the layer's tasks (one object on the wire per
message, and in the scheduler); `values` are what fills the holes for this task,
msgpack-native (str, bytes, int, float, bool, None, and flat tuples of those), so
the wire carries them without pickling. `fill(skeleton, values, data)` rebuilds the
node on the worker, with each dependency's value read from `data`.

How a template learns its holes: the first task of a layer is taken as it is
(every scalar a constant, every dependency a hole). A later task that differs only
in scalars *generalizes* it: the positions that differ become holes, and a new
template is made. One that differs in structure, or holds a different object where
the template holds one by identity (a function, a dtype), starts a new template.
A layer gets at most `budget` templates; past that its tasks are pickled one by
one, as before (per-task objects such as arrays in a `from_array` graph never
repeat, and would only cost walks).
"""

from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.math cimport signbit

cdef int OK = 0
cdef int GENERALIZE = 1     # differs only in scalars: a more general template fits
cdef int FAIL = 2           # differs in structure or in an object kept by identity

cdef enum:
    N_TUPLE = 0
    N_LIST = 1
    N_DICT = 2
    N_SLICE = 3         # items: start, stop, step (dask's getitem tasks hold slices)

cdef object _FAILED = object()      # merge(): the task does not fit the template


cdef class Hole:
    """A varying position of a template: values[index], or the value of the
    dependency whose key is values[index] (dep)."""
    cdef readonly Py_ssize_t index
    cdef readonly bint dep

    def __init__(self, Py_ssize_t index, bint dep):
        self.index = index
        self.dep = dep

    def __reduce__(self):
        return (Hole, (self.index, self.dep))

    def __repr__(self):
        return f"Hole({self.index}{', dep' if self.dep else ''})"


cdef class Node:
    """A tuple, list, dict or slice of a template that has holes inside."""
    cdef readonly int kind
    cdef readonly tuple items
    cdef readonly tuple keys            # dict keys (N_DICT), else None

    def __init__(self, int kind, tuple items, keys=None):
        self.kind = kind
        self.items = items
        self.keys = keys

    def __reduce__(self):
        return (Node, (self.kind, self.items, self.keys))

    def __repr__(self):
        return f"Node({('tuple', 'list', 'dict', 'slice')[self.kind]}, {self.items!r}, {self.keys!r})"


cdef class Template:
    """One shape of task: `skeleton` (the node with holes), `n_values`, and the
    caller's `payload` (its pickle, made once and shared by every task of the
    shape)."""
    cdef readonly object skeleton
    cdef readonly Py_ssize_t n_values
    cdef public object payload

    def __init__(self, skeleton, Py_ssize_t n_values):
        self.skeleton = skeleton
        self.n_values = n_values
        self.payload = None


# -- scalars ---------------------------------------------------------------------------

cdef inline bint _scalar(object x):
    """A value msgpack carries as itself (an int within 64 bits)."""
    cdef type t = type(x)
    cdef int overflow = 0
    if t is str or t is float or t is bytes or t is bool or x is None:
        return True
    if t is int:
        PyLong_AsLongLongAndOverflow(x, &overflow)
        if overflow == 0:
            return True
        # msgpack also carries unsigned 64-bit ints
        return overflow > 0 and x < 18446744073709551616
    return False


cdef bint _scalar_like(object x):
    """A scalar, or a flat tuple of scalars (a dask key, a block index, a shape):
    one hole for the whole tuple."""
    if type(x) is tuple:
        for y in <tuple>x:
            if not _scalar(y):
                return False
        return True
    return _scalar(x)


cdef bint _same(object x, object c):
    """x and c are equal scalar-likes of the same types (1, 1.0 and True differ)."""
    cdef Py_ssize_t i, n
    if x is c:
        return True
    if type(x) is not type(c):
        return False
    if type(x) is tuple:
        n = len(<tuple>x)
        if n != len(<tuple>c):
            return False
        for i in range(n):
            if not _same((<tuple>x)[i], (<tuple>c)[i]):
                return False
        return True
    if type(x) is float:            # -0.0 == 0.0, but a task may tell them apart
        return x == c and signbit(<double>x) == signbit(<double>c)
    return x == c


# -- the split ---------------------------------------------------------------------------

cdef class _Layer:
    cdef list templates                # most recently used first
    cdef int made                      # templates made for this layer
    cdef bint disabled

    def __cinit__(self):
        self.templates = []


cdef class Templater:
    """Splits encoded dask nodes into shared templates and per-task values; one per
    submitted graph. `dep_type` is the encoder's dependency marker (its `key`
    attribute is the dependency's key)."""
    cdef type dep_type
    cdef int budget
    cdef dict layers                   # prefix -> _Layer
    cdef readonly Py_ssize_t templates_made

    def __init__(self, type dep_type, int budget=8):
        self.dep_type = dep_type
        self.budget = budget
        self.layers = {}
        self.templates_made = 0

    cpdef object split(self, object prefix, object encoded):
        """(Template, values) for one task, or None when its layer is not templated.
        A Template whose payload is None is new: the caller pickles its skeleton
        (or calls `disable(prefix)` when it cannot be shared)."""
        cdef _Layer layer = self._layer(prefix)
        cdef list values
        cdef int r
        cdef Py_ssize_t i, n, near = -1
        cdef Template tmpl
        cdef object sk = _FAILED
        if layer.disabled:
            return None
        # A layer may have a few shapes (a reduction's edge blocks combine fewer
        # inputs): try each, most recently used first.
        n = len(layer.templates)
        for i in range(n):
            tmpl = <Template>layer.templates[i]
            values = []
            r = self._match(encoded, tmpl.skeleton, values)
            if r == OK:
                if i:
                    del layer.templates[i]
                    layer.templates.insert(0, tmpl)
                return tmpl, values
            if r == GENERALIZE and near < 0:
                near = i
        if layer.made >= self.budget:
            self.disable(prefix)
            return None
        if near >= 0:
            sk = self._merge((<Template>layer.templates[near]).skeleton, encoded)
            if sk is not _FAILED:
                del layer.templates[near]       # the general one replaces it
        if sk is _FAILED:
            sk = self._build(encoded)
        layer.made += 1
        self.templates_made += 1
        counter = [0]
        sk = _number(sk, counter)
        tmpl = Template(sk, counter[0])
        layer.templates.insert(0, tmpl)
        values = []
        if self._match(encoded, sk, values) != OK:      # cannot happen: sk was made from it
            raise AssertionError(f"template does not fit the task it was made from: {sk!r}")
        return tmpl, values

    def disable(self, prefix):
        """Stop templating this layer (its template could not be pickled on its own)."""
        cdef _Layer layer = self._layer(prefix)
        layer.disabled = True
        layer.templates = []

    cdef _Layer _layer(self, object prefix):
        cdef _Layer layer = self.layers.get(prefix)
        if layer is None:
            layer = _Layer()
            self.layers[prefix] = layer
        return layer

    cdef int _match(self, object x, object sk, list values) except -1:
        """Append x's values for the holes of sk; OK, GENERALIZE or FAIL."""
        cdef type t = type(sk)
        cdef Node node
        cdef Py_ssize_t i, n
        cdef int r, worst = OK
        if t is Hole:
            if (<Hole>sk).dep:
                if type(x) is self.dep_type:
                    values.append(x.key)
                    return OK
                return FAIL
            if _scalar_like(x):
                values.append(x)
                return OK
            return FAIL
        if t is Node:
            node = <Node>sk
            items = node.items
            n = len(items)
            if node.kind == N_TUPLE or node.kind == N_LIST:
                if type(x) is not (tuple if node.kind == N_TUPLE else list) or len(x) != n:
                    return FAIL
                return self._match_all(x, items, values)
            if node.kind == N_SLICE:
                if type(x) is not slice:
                    return FAIL
                return self._match_all((x.start, x.stop, x.step), items, values)
            if type(x) is not dict or len(<dict>x) != n:
                return FAIL
            i = 0
            for k, v in (<dict>x).items():
                if not _same(k, node.keys[i]):
                    return FAIL
                r = self._match(v, items[i], values)
                if r == FAIL:
                    return FAIL
                worst = max(worst, r)
                i += 1
            return worst
        return self._match_constant(x, sk)

    cdef int _match_all(self, object xs, tuple items, list values) except -1:
        cdef Py_ssize_t i
        cdef int r, worst = OK
        for i in range(len(items)):
            r = self._match(xs[i], items[i], values)
            if r == FAIL:
                return FAIL
            worst = max(worst, r)
        return worst

    cdef int _match_constant(self, object x, object c) except -1:
        cdef Py_ssize_t i, n
        cdef int r, worst = OK
        if x is c:
            return OK
        if _scalar_like(c):
            if _scalar_like(x):
                return OK if _same(x, c) else GENERALIZE
            return FAIL
        t = type(c)
        if t is slice:
            if type(x) is not slice:
                return FAIL
            return self._match_constant((x.start, x.stop, x.step), (c.start, c.stop, c.step))
        if t is tuple or t is list:
            if type(x) is not t or len(x) != len(c):
                return FAIL
            n = len(c)
            for i in range(n):
                r = self._match_constant(x[i], c[i])
                if r == FAIL:
                    return FAIL
                worst = max(worst, r)
            return worst
        if t is dict:
            if type(x) is not dict or len(<dict>x) != len(<dict>c):
                return FAIL
            for (k, v), (ck, cv) in zip((<dict>x).items(), (<dict>c).items()):
                if not _same(k, ck):
                    return FAIL
                r = self._match_constant(v, cv)
                if r == FAIL:
                    return FAIL
                worst = max(worst, r)
            return worst
        return FAIL

    cdef object _build(self, object x):
        """A fresh skeleton for x: dependencies are holes, everything else constant
        (kept as x's own objects where no hole is inside)."""
        t = type(x)
        if t is self.dep_type:
            return Hole(0, True)
        if t is tuple or t is list:
            if t is tuple and _scalar_like(x):
                return x
            items = [self._build(y) for y in x]
            return _container(x, N_TUPLE if t is tuple else N_LIST, items, None)
        if t is dict:
            keys = tuple(x)
            for k in keys:
                if not _scalar_like(k):
                    return x
            items = [self._build(y) for y in (<dict>x).values()]
            return _container(x, N_DICT, items, keys)
        return x

    cdef object _merge(self, object sk, object x):
        """sk generalized to fit x too (positions whose scalars differ become holes),
        or _FAILED."""
        cdef type t = type(sk)
        cdef Node node
        cdef list items
        if t is Hole:
            if (<Hole>sk).dep:
                return sk if type(x) is self.dep_type else _FAILED
            return sk if _scalar_like(x) else _FAILED
        if t is Node:
            node = <Node>sk
            if node.kind == N_SLICE:
                if type(x) is not slice:
                    return _FAILED
                xs = [x.start, x.stop, x.step]
            elif node.kind == N_DICT:
                if type(x) is not dict or len(<dict>x) != len(node.items):
                    return _FAILED
                xs = list((<dict>x).values())
                for k, nk in zip(<dict>x, node.keys):
                    if not _same(k, nk):
                        return _FAILED
            else:
                if type(x) is not (tuple if node.kind == N_TUPLE else list) \
                        or len(x) != len(node.items):
                    return _FAILED
                xs = list(x)
            items = []
            for c, y in zip(node.items, xs):
                m = self._merge(c, y)
                if m is _FAILED:
                    return _FAILED
                items.append(m)
            return Node(node.kind, tuple(items), node.keys)
        # a constant
        if x is sk:
            return sk
        if _scalar_like(sk):
            if not _scalar_like(x):
                return _FAILED
            return sk if _same(x, sk) else Hole(0, False)
        if t is slice:
            if type(x) is not slice:
                return _FAILED
            items = []
            for c, y in zip((sk.start, sk.stop, sk.step), (x.start, x.stop, x.step)):
                m = self._merge(c, y)
                if m is _FAILED:
                    return _FAILED
                items.append(m)
            if items[0] is sk.start and items[1] is sk.stop and items[2] is sk.step:
                return sk
            return Node(N_SLICE, tuple(items), None)
        if t is tuple or t is list:
            if type(x) is not t or len(x) != len(sk):
                return _FAILED
            items = []
            for c, y in zip(sk, x):
                m = self._merge(c, y)
                if m is _FAILED:
                    return _FAILED
                items.append(m)
            return _container(sk, N_TUPLE if t is tuple else N_LIST, items, None)
        if t is dict:
            if type(x) is not dict or len(<dict>x) != len(<dict>sk):
                return _FAILED
            for k, ck in zip(<dict>x, <dict>sk):
                if not _same(k, ck):
                    return _FAILED
            items = []
            for c, y in zip((<dict>sk).values(), (<dict>x).values()):
                m = self._merge(c, y)
                if m is _FAILED:
                    return _FAILED
                items.append(m)
            return _container(sk, N_DICT, items, tuple(sk))
        return _FAILED


cdef object _container(object original, int kind, list items, object keys):
    """original itself when no item changed (no hole inside), else a Node."""
    cdef Py_ssize_t i = 0
    if kind == N_DICT:
        for v in (<dict>original).values():
            if items[i] is not v:
                return Node(kind, tuple(items), keys)
            i += 1
        return original
    for v in original:
        if items[i] is not v:
            return Node(kind, tuple(items), keys)
        i += 1
    return original


cdef object _number(object sk, list counter):
    """sk with its holes numbered in walk order (the order `_match` appends values)."""
    cdef type t = type(sk)
    cdef Node node
    if t is Hole:
        h = Hole(counter[0], (<Hole>sk).dep)
        counter[0] += 1
        return h
    if t is Node:
        node = <Node>sk
        return Node(node.kind, tuple([_number(c, counter) for c in node.items]), node.keys)
    return sk


# -- the worker's side ---------------------------------------------------------------------

cpdef object fill(object sk, list values, object data):
    """The node of one task: sk with its holes filled from values; a dependency
    hole reads its value from data (a KeyError when it is missing)."""
    cdef type t = type(sk)
    cdef Node node
    cdef Hole h
    if t is Hole:
        h = <Hole>sk
        if h.index >= len(values):
            raise ValueError(f"a task template has hole {h.index} but the task carries "
                             f"{len(values)} values")
        if h.dep:
            return data[values[h.index]]
        return values[h.index]
    if t is Node:
        node = <Node>sk
        if node.kind == N_TUPLE:
            return tuple([fill(c, values, data) for c in node.items])
        if node.kind == N_LIST:
            return [fill(c, values, data) for c in node.items]
        if node.kind == N_SLICE:
            return slice(fill(node.items[0], values, data), fill(node.items[1], values, data),
                         fill(node.items[2], values, data))
        return {k: fill(c, values, data) for k, c in zip(node.keys, node.items)}
    return sk
