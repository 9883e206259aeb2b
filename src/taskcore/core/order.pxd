# A static execution order for large task graphs (see order.pyx).
from libc.stdint cimport int64_t, uint64_t

cdef class _Arrays:
    # The C arrays of one ordering, indexed by the keys' positions in the graph.
    cdef Py_ssize_t n, m, cap
    cdef Py_ssize_t* dep_off      # dependencies of i: dep[dep_off[i]:dep_off[i + 1]]
    cdef Py_ssize_t* dep
    cdef Py_ssize_t* rdep_off     # dependents of i: rdep[rdep_off[i]:rdep_off[i + 1]]
    cdef Py_ssize_t* rdep
    cdef Py_ssize_t* remaining    # dependencies not ranked yet
    cdef int64_t* size            # tasks in the subtree below (saturating)
    cdef Py_ssize_t* unused       # dependents not ranked yet
    cdef Py_ssize_t* rank         # -1 until ranked
    cdef Py_ssize_t* seq          # rank -> position
    cdef Py_ssize_t* stack        # the walk's positions
    cdef Py_ssize_t* cursor       # the walk's next dependency per stacked position
    cdef Py_ssize_t* work         # Kahn's queue, then the eager ranking's worklist
    cdef Py_ssize_t* held         # ranked tasks with dependents, in rank order (a stack)
    cdef Py_ssize_t nheld
    cdef uint64_t* keys           # scratch for sorting

    cdef int push_dep(self, Py_ssize_t j) except -1

cpdef tuple order_graph(dict dsk)
