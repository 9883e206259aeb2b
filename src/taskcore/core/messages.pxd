# The codec of the hot wire messages (see messages.pyx and docs/contracts.md).
from taskcore.core.scheduler_state cimport Stimulus, UpdateGraph

# inline results: value <-> payload; a bare None in a payload column means "not
# sent", so a None result travels as [None] (see messages.pyx)
cdef inline object result_payload(object value):
    return [None] if value is None else value

cdef inline bint result_sent(object payload):
    return payload is not None

cdef inline object result_of(object payload):
    return (<list>payload)[0] if type(payload) is list else payload

# client -> scheduler
cpdef list update_graph(list records, list wanted, long long priority=*)
cpdef list update_graph_columns(list keys, list specs, list deps, list wanted,
                                long long priority=*, list ranks=*, list options=*)
cpdef list merge_update_graphs(list msgs)
cpdef UpdateGraph decode_update_graph(str client, list msg, str stimulus_id)

# scheduler -> worker, scheduler -> client
cpdef list batch_instructions(list instructions)
cpdef list decode_compute_tasks(list msg)
cpdef Py_ssize_t keys_in_memory_size(list msg) except -1
cpdef object keys_in_memory_key(list msg, Py_ssize_t i)
cpdef object keys_in_memory_payload(list msg, Py_ssize_t i)

# worker -> scheduler
cdef class TasksFinishedWriter:
    cdef Py_ssize_t n
    cdef list ids, nbytes, types, durations, payloads
    cpdef int add(self, object tid, object nbytes, object type_name, double duration,
                  object payload) except -1
    cpdef object take(self)

cpdef Stimulus decode_tasks_finished(str worker, list msg)
