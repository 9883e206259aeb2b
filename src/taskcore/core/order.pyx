# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A static execution order for large task graphs, in linear time (plus small sorts).

Why: `dask.order` costs ~31 µs of client CPU per task in pure Python, a third of
what a large dask graph costs the client before its first task runs
(docs/scale-profile.md). This order costs ~1 µs per task and is used above a size
threshold (`taskcore.dask_integration`); smaller graphs keep dask's.

What it computes: a rank per key, a topological order (every dependency ranks
before its dependents) that a sequential scheduler could follow with little held
in memory, the property dask.order's ranks have and the scheduler's priorities
need. Five rules, in the spirit of dask.order's own:

1. **Depth first from the outputs.** A post-order walk from an output (a task no
   other task depends on) runs a reduction tree one branch at a time: the
   leaves of the first partial result, that partial result, the next leaves...
   so a tree reduction holds one branch's inputs at a time, never a layer.
2. **Largest subtree first.** Among a task's dependencies the walk enters the one
   with the most tasks below it first (a Sethi-Ullman-like choice): the small
   ones, run last, are held for a short time. Ties go to graph order (dask
   builds blocks in index order), and so do the outputs.
3. **Finish what you started.** When a task is ranked, a dependent whose
   dependencies are now all ranked is ranked at once (and so on upwards) when that
   lets a result go: it is the last task to need one of its inputs, or the one
   input missing for a task that frees something besides it, or an input's other
   users have just been ranked (`x + x.T`: the add of (j, i) once (i, j)'s has).
4. **Go on from what is held.** When a walk ends, the next one starts from the
   most recently ranked result that still has a dependent to rank, at that
   dependent, so what is in memory is consumed before anything new is loaded;
   only when nothing is held does the next output start a walk.
5. **Fetch the partner.** When the walk ranks a task that has inputs of its own, a
   dependent of it that now waits on one more input is walked next (a detour), so
   two chains combined block by block advance together instead of one running to
   its end while its blocks wait (dask's gh-3055 graph: 42 results held without
   this rule, 9 with it, dask.order 8). A detour that reaches a task the walk is
   still expanding is given up (its tasks are left for later): finishing it would
   rank a task before that input. Not for sources: on `x + x.T` it held 29
   results instead of 22, where rule 3 already pairs the blocks.

The subtree sizes count shared tasks once per path (as dask's `ndependencies`
does), saturating rather than overflowing on wide diamonds. Keys that a node
depends on but the graph lacks (held futures culled away) are ignored. A cycle
raises RuntimeError naming it.

All work is on C arrays indexed by the keys' positions in the graph; only the
input walk (each node's `.dependencies`) and the output (a list and a dict)
touch Python objects.
"""
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memset

cdef enum:
    _SIZE_CAP = 0x7fffffff        # subtree sizes saturate here (they sort as 31-bit keys)


cdef int _cmp_u64(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0]
    cdef uint64_t y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef inline uint64_t _sort_key(int64_t size, Py_ssize_t idx) noexcept nogil:
    # Ascending order of this key = size descending, then position ascending.
    if size > _SIZE_CAP:
        size = _SIZE_CAP
    return ((<uint64_t>(_SIZE_CAP - size)) << 32) | <uint64_t>idx


cdef class _Arrays:
    """The C arrays of one ordering, freed together (also when an error unwinds)."""

    def __cinit__(self, Py_ssize_t n):
        self.n = n
        self.m = 0
        self.cap = 2 * n + 16
        self.dep_off = <Py_ssize_t*>PyMem_Malloc((n + 1) * sizeof(Py_ssize_t))
        self.dep = <Py_ssize_t*>PyMem_Malloc(self.cap * sizeof(Py_ssize_t))
        self.rdep_off = <Py_ssize_t*>PyMem_Malloc((n + 1) * sizeof(Py_ssize_t))
        self.remaining = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t) + 1)
        self.size = <int64_t*>PyMem_Malloc(n * sizeof(int64_t) + 1)
        self.unused = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t) + 1)
        self.rank = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t) + 1)
        self.seq = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t) + 1)
        self.stack = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t) + 1)
        self.cursor = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t) + 1)
        self.work = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t) + 1)
        self.held = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t) + 1)
        self.nheld = 0
        self.keys = <uint64_t*>PyMem_Malloc(n * sizeof(uint64_t) + 8)
        if (self.dep_off == NULL or self.dep == NULL or self.rdep_off == NULL
                or self.remaining == NULL or self.size == NULL or self.unused == NULL or self.rank == NULL
                or self.seq == NULL or self.stack == NULL or self.cursor == NULL
                or self.work == NULL or self.held == NULL or self.keys == NULL):
            raise MemoryError()

    cdef int push_dep(self, Py_ssize_t j) except -1:
        cdef Py_ssize_t* grown
        if self.m == self.cap:
            grown = <Py_ssize_t*>PyMem_Realloc(self.dep, 2 * self.cap * sizeof(Py_ssize_t))
            if grown == NULL:
                raise MemoryError()
            self.dep = grown
            self.cap *= 2
        self.dep[self.m] = j
        self.m += 1
        return 0

    def __dealloc__(self):
        PyMem_Free(self.dep_off)
        PyMem_Free(self.dep)
        PyMem_Free(self.rdep_off)
        PyMem_Free(self.rdep)
        PyMem_Free(self.remaining)
        PyMem_Free(self.size)
        PyMem_Free(self.unused)
        PyMem_Free(self.rank)
        PyMem_Free(self.seq)
        PyMem_Free(self.stack)
        PyMem_Free(self.cursor)
        PyMem_Free(self.work)
        PyMem_Free(self.held)
        PyMem_Free(self.keys)


cdef int _build(_Arrays a, list keys, dict dsk) except -1:
    """Dependencies (positions) from each node's `.dependencies`; dependents; sizes."""
    cdef Py_ssize_t n = a.n, i, j, e, k
    cdef dict index = {}
    cdef PyObject* found
    for i in range(n):
        index[keys[i]] = i
    for i in range(n):
        a.dep_off[i] = a.m
        for d in dsk[keys[i]].dependencies:
            found = PyDict_GetItem(index, d)
            if found != NULL:
                a.push_dep(<Py_ssize_t><object>found)
    a.dep_off[n] = a.m
    # dependents, by counting
    a.rdep = <Py_ssize_t*>PyMem_Malloc(a.m * sizeof(Py_ssize_t) + 1)
    if a.rdep == NULL:
        raise MemoryError()
    memset(a.rdep_off, 0, (n + 1) * sizeof(Py_ssize_t))
    for e in range(a.m):
        a.rdep_off[a.dep[e] + 1] += 1
    for i in range(n):
        a.rdep_off[i + 1] += a.rdep_off[i]
    for i in range(n):                       # cursor: next free slot per node
        a.cursor[i] = a.rdep_off[i]
    for i in range(n):
        for e in range(a.dep_off[i], a.dep_off[i + 1]):
            j = a.dep[e]
            a.rdep[a.cursor[j]] = i
            a.cursor[j] += 1
    # Sizes in a topological order (Kahn); what is left over lies on a cycle.
    cdef Py_ssize_t head = 0, tail = 0
    for i in range(n):
        a.remaining[i] = a.dep_off[i + 1] - a.dep_off[i]
        a.size[i] = 1
        if a.remaining[i] == 0:
            a.work[tail] = i
            tail += 1
    while head < tail:
        i = a.work[head]
        head += 1
        for e in range(a.rdep_off[i], a.rdep_off[i + 1]):
            j = a.rdep[e]
            a.size[j] += a.size[i]
            if a.size[j] > _SIZE_CAP:
                a.size[j] = _SIZE_CAP
            a.remaining[j] -= 1
            if a.remaining[j] == 0:
                a.work[tail] = j
                tail += 1
    if tail < n:
        _raise_cycle(a, keys)
    # Each node's dependencies, largest subtree first (ties: graph position).
    for i in range(n):
        k = a.dep_off[i + 1] - a.dep_off[i]
        if k > 1:
            for e in range(k):
                j = a.dep[a.dep_off[i] + e]
                a.keys[e] = _sort_key(a.size[j], j)
            qsort(a.keys, k, sizeof(uint64_t), _cmp_u64)
            for e in range(k):
                a.dep[a.dep_off[i] + e] = <Py_ssize_t>(a.keys[e] & 0xffffffff)
    return 0


cdef int _raise_cycle(_Arrays a, list keys) except -1:
    # Every node Kahn left has a dependency it left too: follow those until one repeats.
    cdef Py_ssize_t i = 0, e, steps = 0
    while a.remaining[i] == 0:
        i += 1
    for e in range(a.n):
        a.cursor[e] = -1
    while a.cursor[i] == -1:
        a.cursor[i] = steps
        steps += 1
        for e in range(a.dep_off[i], a.dep_off[i + 1]):
            if a.remaining[a.dep[e]] != 0:
                i = a.dep[e]
                break
    cycle = []
    start = i
    while True:
        cycle.append(keys[i])
        for e in range(a.dep_off[i], a.dep_off[i + 1]):
            if a.remaining[a.dep[e]] != 0 and a.cursor[a.dep[e]] != -1:
                i = a.dep[e]
                break
        if i == start:
            break
    cycle.append(keys[start])
    cycle.reverse()           # dependencies first: a -> b means b depends on a
    raise RuntimeError("cycle in the task graph: " + " -> ".join(map(repr, cycle)))


cdef inline bint _frees(_Arrays a, Py_ssize_t j, Py_ssize_t besides) noexcept:
    """Whether j is the last unranked user of one of its dependencies other than
    `besides` (-1: any)."""
    cdef Py_ssize_t e, d
    for e in range(a.dep_off[j], a.dep_off[j + 1]):
        d = a.dep[e]
        if a.unused[d] == 1 and d != besides:
            return True
    return False


cdef inline bint _worth_ranking(_Arrays a, Py_ssize_t j) noexcept:
    """Whether ranking the ready task j now lets a result go: j frees one of its
    dependencies, or j is the one input missing for a dependent that would.
    Ranking a ready dependent that frees nothing would only add a result to hold
    (the slices `map_overlap` cuts from a block for its neighbours: 4x dask.order's
    peak when every ready dependent was ranked), but the look-ahead is needed for
    `x + x.T`, whose transposed block is needed by one add that frees two blocks.
    Asking for more (that the pair free more than it adds) held 193 results on
    cumsum, against 50 with this rule and dask.order's 59-85."""
    cdef Py_ssize_t e, k
    if _frees(a, j, -1):
        return True
    for e in range(a.rdep_off[j], a.rdep_off[j + 1]):
        k = a.rdep[e]
        # k must free something besides j itself: a chain j -> k that frees only j
        # holds k's result instead of j's and gains nothing (blocks that their
        # shared inputs make ready all at once would each run to the end of their
        # chain: 16 held against dask.order's 12 in dask's
        # test_reduce_with_many_common_dependents)
        if (a.remaining[k] == 1 and a.rank[k] == -1 and a.cursor[k] == -1
                and _frees(a, k, j)):
            return True
    return False


cdef inline void _rank(_Arrays a, Py_ssize_t i, Py_ssize_t* r) noexcept:
    """Rank i, then every dependent this makes ready that the walk has not entered."""
    cdef Py_ssize_t top = 0, e, f, d, j
    a.work[top] = i
    top += 1
    while top:
        top -= 1
        i = a.work[top]
        a.rank[i] = r[0]
        a.seq[r[0]] = i
        r[0] += 1
        if a.rdep_off[i + 1] > a.rdep_off[i]:
            a.held[a.nheld] = i
            a.nheld += 1
        for e in range(a.dep_off[i], a.dep_off[i + 1]):
            d = a.dep[e]
            a.unused[d] -= 1
            if a.unused[d] == 1:
                # d's one remaining user frees it: rank that user now if it is ready
                # (x + x.T: the add of (j, i) once the add of (i, j) is ranked).
                for f in range(a.rdep_off[d], a.rdep_off[d + 1]):
                    j = a.rdep[f]
                    if a.rank[j] == -1:
                        if a.remaining[j] == 0 and a.cursor[j] == -1 and j != i:
                            a.cursor[j] = -2
                            a.work[top] = j
                            top += 1
                        break
        # pushed in reverse, so dependents are ranked in graph order
        e = a.rdep_off[i + 1]
        while e > a.rdep_off[i]:
            e -= 1
            j = a.rdep[e]
            a.remaining[j] -= 1
            if (a.remaining[j] == 0 and a.rank[j] == -1 and a.cursor[j] == -1
                    and _worth_ranking(a, j)):
                a.cursor[j] = -2          # queued: neither walked nor queued again
                a.work[top] = j
                top += 1


cdef int _walk(_Arrays a) except -1:
    cdef Py_ssize_t n = a.n, i, s, e, j, top, detour, nsinks = 0, r = 0
    for i in range(n):
        a.remaining[i] = a.dep_off[i + 1] - a.dep_off[i]
        a.rank[i] = -1
        a.unused[i] = a.rdep_off[i + 1] - a.rdep_off[i]
        a.cursor[i] = -1                      # -1: not on the walk's stack
        if a.rdep_off[i + 1] == a.rdep_off[i]:
            a.keys[nsinks] = _sort_key(a.size[i], i)
            nsinks += 1
    qsort(a.keys, nsinks, sizeof(uint64_t), _cmp_u64)
    s = 0
    while True:
        # Where the next walk starts: from what is held, if anything is (the most
        # recently ranked result with a dependent not ranked yet: walk that
        # dependent, which consumes it), else from the next output.
        i = -1
        while a.nheld:
            j = a.held[a.nheld - 1]
            if a.unused[j] == 0:
                a.nheld -= 1
                continue
            for e in range(a.rdep_off[j], a.rdep_off[j + 1]):
                if a.rank[a.rdep[e]] == -1:
                    i = a.rdep[e]
                    break
            break
        if i == -1:
            while s < nsinks and a.rank[<Py_ssize_t>(a.keys[s] & 0xffffffff)] != -1:
                s += 1
            if s == nsinks:
                break
            i = <Py_ssize_t>(a.keys[s] & 0xffffffff)
        top = 0
        a.stack[top] = i
        a.cursor[i] = a.dep_off[i]
        top += 1
        detour = -1                           # stack index of a detour's first task
        while top:
            i = a.stack[top - 1]
            if a.rank[i] != -1:               # ranked early, as a ready dependent
                top -= 1
                if top == detour:
                    detour = -1
                continue
            e = a.cursor[i]
            while e < a.dep_off[i + 1] and a.rank[a.dep[e]] != -1:
                e += 1
            if e < a.dep_off[i + 1]:
                j = a.dep[e]
                if a.cursor[j] >= 0:
                    # On the stack already: only a detour gets here (the walk itself
                    # never meets its own path: the graph has no cycle). The detour
                    # needs a task the walk has not finished: give it up.
                    while top > detour:
                        top -= 1
                        a.cursor[a.stack[top]] = -1
                    detour = -1
                    continue
                a.cursor[i] = e + 1
                a.cursor[j] = a.dep_off[j]
                a.stack[top] = j
                top += 1
                continue
            top -= 1
            if top == detour:
                detour = -1
            _rank(a, i, &r)
            if detour == -1 and a.dep_off[i + 1] > a.dep_off[i]:     # rule 5
                for e in range(a.rdep_off[i], a.rdep_off[i + 1]):
                    j = a.rdep[e]
                    if a.remaining[j] == 1 and a.rank[j] == -1 and a.cursor[j] == -1:
                        detour = top
                        a.cursor[j] = a.dep_off[j]
                        a.stack[top] = j
                        top += 1
                        break
    return 0


cpdef tuple order_graph(dict dsk):
    """(keys in execution order, {key: rank}) for a {key: node} graph.

    A node is anything with `.dependencies`, the keys it needs (dask's task-spec
    nodes); keys the graph lacks are ignored. Raises RuntimeError on a cycle.
    """
    cdef Py_ssize_t n = len(dsk), r
    if n >= 0x7fffffff:
        raise ValueError(f"graph of {n} tasks: too large to order (at most 2**31 - 1)")
    cdef list keys = list(dsk)
    cdef _Arrays a = _Arrays(n)
    _build(a, keys, dsk)
    _walk(a)
    cdef list ordered = [None] * n
    cdef dict prio = {}
    for r in range(n):
        k = keys[a.seq[r]]
        ordered[r] = k
        prio[k] = r
    return ordered, prio
