# The worker's compiled dispatch (see worker_dispatch.pyx).
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
    cdef public double inline_threshold        # inline tasks: average run time under this (s)
    cdef public double inline_budget           # inline tasks: at most this long per pass (s)
    cdef public Py_ssize_t inline_result_bytes # results up to this size ride along
    cdef TasksFinishedWriter out        # the next tasks-finished
    cdef list out_released              # keys for the next release-worker-data

    # hooks: the server overrides these
    cpdef handle_other_message(self, object msg)
    cpdef execute_other(self, object instruction)
    cpdef run_dask_task(self, object node)

    cpdef int handle(self, list events) except -1
    cpdef list execute(self, list instructions)
    cpdef int flush_out(self) except -1
    cdef object inline_prefix(self, object key)
    cdef int record_duration(self, object p, double duration) except -1
    cpdef list run_inline(self, list inline)
    cpdef object function(self, object fser)
    cpdef object run_spec(self, object key, object spec)
    cpdef object result_event(self, object tid, object key, bint ok, object value,
                              double start, double stop, object prefix=*)
