# The worker's compiled dispatch (see worker_dispatch.pyx).
from libc.stdint cimport int64_t
from taskcore.core.messages cimport TasksFinishedWriter
from taskcore.core.protocol cimport MessageSink
from taskcore.core.worker_state cimport WorkerState

cdef class WorkerDispatch:
    cdef public WorkerState state
    cdef public dict data               # key -> value, the worker's data store
    cdef public object executor         # TaskExecutor: the task threads
    cdef public object loop
    cdef public object status
    cdef object _scheduler_comm         # see the scheduler_comm property
    cdef MessageSink sink               # the scheduler comm's write capability
    cdef public dict small              # task id -> payload of a small result to report
    cdef public dict durations          # key prefix -> average run time (s)
    cdef dict funcs                     # pickled function bytes -> function
    cdef bytes last_pickle              # the last function's pickle and the function:
    cdef object last_function           # a map's tasks skip hashing the pickle again
    cdef object last_serialized         # or its Serialized (one object per message)
    cdef public double inline_threshold        # inline tasks: average run time under this (s)
    cdef public double inline_budget           # inline tasks: at most this long per pass (s)
    cdef public Py_ssize_t inline_result_bytes # results up to this size ride along
    cdef TasksFinishedWriter out        # the next tasks-finished
    cdef list out_released              # keys for the next release-worker-data
    # Memory management (worker_memory.py sets these; all off by default):
    cdef public bint memory_managed             # touch dependencies (LRU order of `data`)
    cdef public int64_t memory_target_bytes     # managed bytes over this: memory_over_target()
    cdef public int64_t spilled_bytes           # weight of the values spilled to disk
    cdef public dict spilled                    # key -> record of a spilled value; never None

    # hooks: the server overrides these
    cpdef handle_other_message(self, object msg)
    cpdef execute_other(self, object instruction)
    cpdef run_dask_task(self, object node, object values=*)
    cpdef memory_over_target(self)
    cpdef drop_spilled(self, object key)
    cpdef object load_dependency(self, object key)

    cpdef int handle(self, list events) except -1
    cpdef list execute(self, list instructions)
    cpdef int flush_out(self) except -1
    cdef object inline_prefix(self, object key)
    cdef int record_duration(self, object p, double duration) except -1
    cpdef list run_inline(self, list inline)
    cpdef object function(self, object fser)
    cpdef object run_spec(self, object key, object spec)
    cdef tuple call_parts_slow(self, object key, object spec)
    cdef int touch_dependencies(self, int64_t tid) except -1
    cpdef object result_event(self, object tid, object key, bint ok, object value,
                              double start, double stop, object prefix=*)
