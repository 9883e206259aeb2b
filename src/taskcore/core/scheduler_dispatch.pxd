# The scheduler's compiled dispatch (see scheduler_dispatch.pyx).
from taskcore.core.protocol cimport MessageSink
from taskcore.core.scheduler_state cimport SchedulerState, Stimulus

cdef class Peer:
    cdef public object comm
    cdef public MessageSink sink        # the comm's write capability
    cdef public str kind                # "client", "worker", "nanny", "oneshot"
    cdef public object id               # client id or worker address
    cdef public dict replies            # request id -> future
    cdef public dict info
    cdef public bint closing

cdef class SchedulerDispatch:
    cdef public SchedulerState state
    cdef public dict workers            # address -> Peer
    cdef public dict clients            # client id -> Peer
    cdef long long graphs               # update-graph stimuli handled (their ids)

    # hooks: the server overrides these
    cpdef handle_client_message(self, Peer peer, object msg)
    cpdef handle_worker_message(self, Peer peer, object msg)
    cpdef execute_other(self, object instruction)

    cpdef int handle(self, Stimulus ev) except -1
    cpdef int client_update_graph(self, str client, list msg) except -1
    cpdef int worker_tasks_finished(self, str worker, list msg) except -1
    cpdef int execute(self, list instructions) except -1
    cpdef int send(self, Peer peer, object msg) except -1
