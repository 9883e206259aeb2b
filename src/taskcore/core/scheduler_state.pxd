# cython: language_level=3
"""Table of contents of the scheduler's state machine (see scheduler_state.pyx
for the theory of operation).

Layout of this file:

  1. C enums: task states, worker status, stimulus kinds
  2. Records: PrefixState, ClientState, WorkerState, TaskState
     (invariants are written next to the attributes they constrain)
  3. Stimuli (events in): one slotted cdef class per event
  4. Instructions (out): one slotted cdef class per instruction
  5. SchedulerState

Stimuli (events in)                      Instructions (out)
-------------------------------------    ------------------------------------------
UpdateGraph        client submits graph  ComputeTask      worker: run this task
TaskFinished       worker: task done     FreeKeys         worker: drop these tasks
TaskErred          worker: task raised                    (cancel if running, drop
TaskLongRunning    task seceded
AddWorker          worker joined                          the replica if in memory)
RemoveWorker       worker left/died      StealRequest     victim: give this task up
WorkerHeartbeat    worker metrics        AcquireReplicas  worker: fetch these keys
ClientWantsKeys    client holds futures                   from their holders
ClientReleasesKeys client drops futures  KeyInMemory      clients: result is ready
ClientRemoved      client disconnected   TaskErredReport  clients: task failed
Cancel             client cancels        KeyLost          clients: data lost, will
Retry              client retries erred                   be recomputed
BalanceTick        periodic stealing     TaskCancelled    clients: key cancelled
StealResponse      victim's answer       TaskRetried      clients: erred key retried
MissingData        holder lacks replica  KeyForgotten     clients: key unknown
AddKeys            worker holds replicas WorkersRetiring  server: these workers are
UpdateData         scatter                                being retired (poll
ReleaseWorkerData  worker dropped data                    can_close(address))
RetireWorkers      graceful retirement
"""
cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport int64_t
from libcpp.set cimport set as cpp_set
from libcpp.utility cimport pair
from libcpp.vector cimport vector


# --------------------------------------------------------------------------
# 1. Enums
# --------------------------------------------------------------------------

# TaskStateCode (anonymous so the values index C arrays directly)
cdef enum:
    TS_RELEASED = 0     # known, not scheduled, no data anywhere
    TS_WAITING = 1      # needed; some dependencies not yet in memory
    TS_QUEUED = 2       # ready; waits for a worker slot (root tasks) or for
                        # free resources (resource-restricted tasks)
    TS_NO_WORKER = 3    # ready; no connected worker satisfies its restrictions
    TS_PROCESSING = 4   # sent to ``processing_on``
    TS_MEMORY = 5       # at least one replica in ``who_has``
    TS_ERRED = 6        # failed (itself, or blamed on a dependency)
    TS_FORGOTTEN = 7    # removed from the state; terminal
    N_TASK_STATES = 8
    NO_REC = -1         # "no pending recommendation" marker

# WorkerStatus
cdef enum:
    WS_RUNNING = 0      # receives new tasks
    WS_CLOSING = 1      # being retired: keeps its tasks, gets no new ones
    WS_CLOSED = 2       # removed; any record still pointing here is stale
    WS_PAUSED = 3       # over its memory pause threshold: keeps its tasks and serves its
                        # data, gets no new tasks; its queued ones may be stolen

# StimulusKind
cdef enum:
    EV_UPDATE_GRAPH = 1
    EV_TASK_FINISHED
    EV_TASK_ERRED
    EV_ADD_WORKER
    EV_REMOVE_WORKER
    EV_HEARTBEAT
    EV_CLIENT_WANTS
    EV_CLIENT_RELEASES
    EV_CLIENT_REMOVED
    EV_CANCEL
    EV_RETRY
    EV_BALANCE
    EV_STEAL_RESPONSE
    EV_MISSING_DATA
    EV_ADD_KEYS
    EV_UPDATE_DATA
    EV_RELEASE_WORKER_DATA
    EV_RETIRE_WORKERS
    EV_LONG_RUNNING
    EV_TASKS_FINISHED

# Ordering key of the ready queues: ((-user priority, graph generation),
# (rank inside the graph, task id)); the smallest runs first.
ctypedef pair[pair[int64_t, int64_t], pair[int64_t, int64_t]] QueueKey


# --------------------------------------------------------------------------
# 2. Records
# --------------------------------------------------------------------------

@cython.final
cdef class PrefixState:
    """Timing statistics shared by all tasks whose key has the same prefix."""
    cdef readonly str name
    cdef readonly double duration_average   # < 0 while unknown
    cdef readonly Py_ssize_t n_durations
    cdef Py_ssize_t counts[8]               # live tasks of this prefix per state
    cdef readonly int64_t n_done            # ever finished computing (processing -> memory)

    cdef void add_duration(self, double duration) noexcept


@cython.final
cdef class ClientState:
    cdef readonly str client_id
    cdef tuple _as_clients                  # cached (client_id,)
    # Ordered set (dict -> None) of the tasks this client holds futures for.
    # Invariant: ts in cs.wants  <=>  cs in ts.who_wants
    cdef readonly dict wants


@cython.final
cdef class WorkerState:
    cdef readonly Py_ssize_t id             # never reused
    cdef readonly str address
    cdef readonly object name               # defaults to the address
    cdef readonly int nthreads
    cdef readonly int64_t memory_limit      # 0 = unknown / unlimited
    cdef readonly dict resources            # {name: total amount}
    cdef readonly dict used_resources       # {name: amount held by processing tasks}
    # Processing tasks: an intrusive doubly linked list through
    # TaskState._proc_prev/_proc_next (a task is processing on at most one
    # worker), so assigning and finishing cost no dict operations.
    # Invariant: ts in the list <=> ts.state == processing and ts.processing_on is ws
    cdef TaskState _proc_head
    cdef TaskState _proc_tail
    cdef readonly Py_ssize_t n_processing
    # Processing tasks that seceded (long-running: they wait on other tasks
    # and hold no thread).  Each adds one slot while it lasts and adds nothing
    # to occupancy.  Invariant: slots == base slots + n_long_running.
    cdef readonly Py_ssize_t n_long_running    # Ordered set (dict -> None).
    # Invariant: ts in ws.has_what <=> ws holds a replica of ts
    cdef readonly dict has_what
    cdef readonly double occupancy          # sum of est_duration over processing
    cdef readonly int64_t nbytes            # sum of nbytes over has_what
    # Root-task slots: ceil(nthreads * worker_saturation), at least 1.
    cdef readonly Py_ssize_t slots
    cdef int status                         # WorkerStatus
    # Invariant: _is_idle <=> SchedulerState._is_open(self) (running, and a
    # slot free or only a tiny backlog of known-short tasks)
    #            <=> SchedulerState._idle[_idle_pos] is ws
    cdef bint _is_idle
    cdef Py_ssize_t _idle_pos               # index in SchedulerState._idle, or -1
    cdef readonly double last_seen
    cdef readonly object metrics
    cdef int _incoming                      # steals in flight towards this worker
    cdef int _outgoing                      # steals in flight away from it
    cdef int64_t _tally                     # scratch: bytes held (placement)
    cdef int64_t _mark                      # scratch stamp for _tally
    cdef list _free_ids                     # FreeKeys batched in this stimulus
    cdef list _free_keys
    cdef tuple _as_holders                  # cached (address,): no allocation
                                            # for the common single-holder case


# Not tracked by the cyclic GC (@cython.no_gc on the class in the .pyx): a
# scheduler holds millions of long-lived TaskStates and GC passes over them
# cost more than the state machine itself (measured: 2.8 -> 5-8 us per task).
# Its lists are untracked as well.  The reference cycles (dependencies <->
# dependents, self-blame, processing_on <-> the worker's processing list) are
# broken explicitly: on forget, and by SchedulerState's __dealloc__ (which is
# why SchedulerState is no_gc_clear).
@cython.final
cdef class TaskState:
    cdef readonly Py_ssize_t id             # never reused; the wire id
    cdef object _id_obj                     # id as a Python int, boxed once
    cdef readonly object key
    cdef readonly object run_spec           # opaque, never inspected
    cdef readonly int state                 # TaskStateCode
    cdef readonly list dependencies         # [TaskState], fixed at submission
    # Dependents, possibly with forgotten entries (skipped, compacted lazily).
    cdef list dependents
    cdef readonly Py_ssize_t n_dependents   # live (not forgotten) dependents
    # Number of dependents in waiting/queued/no-worker/processing: those that
    # still need this task's data.  "needed" == n_waiters > 0 or who_wants.
    cdef readonly Py_ssize_t n_waiters
    # Only meaningful in state waiting: dependencies not in memory (> 0).
    cdef readonly Py_ssize_t n_waiting_on
    # None (nobody), one ClientState (the common case: no allocation), or
    # {ClientState: None} for two or more clients.
    cdef object who_wants
    # Replicas: the first in ``holder`` (no allocation for the common single
    # replica), any others in ``more_holders``.  holder set <=> memory.
    cdef WorkerState holder
    cdef list more_holders
    cdef WorkerState processing_on          # set <=> state == processing
    cdef TaskState _proc_prev               # links of processing_on's list
    cdef TaskState _proc_next
    cdef bint _seceded                      # long-running (see WorkerState)
    cdef readonly int64_t nbytes
    cdef readonly object typename
    cdef int64_t prio_user                  # -(user priority): smaller first
    cdef int64_t prio_gen                   # graph generation
    cdef int64_t prio_rank                  # order inside its graph
    cdef PrefixState prefix
    cdef double est_duration                # estimate charged to occupancy
    cdef frozenset worker_restrictions      # addresses or names, or None
    cdef bint loose_restrictions            # allow_other_workers
    cdef dict resources                     # {name: amount} or None
    cdef readonly int retries               # retries left
    cdef readonly int suspicious            # workers that died running it
    cdef readonly object annotations
    cdef readonly object exception          # set on the task that failed
    cdef readonly object traceback
    cdef TaskState exception_blame          # set <=> erred (or doomed)
    cdef object _fatal                      # permanent error (missing deps)
    cdef bint _pure_data                    # scattered: cannot be recomputed
    cdef bint _in_constrained               # in the restricted queue (resources /
                                            # workers=), not the root queue
    cdef int _rec_target                    # pending recommendation or NO_REC
    cdef WorkerState _steal_thief           # steal request in flight
    cdef object _dep_keys                   # scratch during UpdateGraph
    cdef int64_t _mark                      # scratch stamp (dedupe)

    cdef inline bint _needed(self) noexcept


# --------------------------------------------------------------------------
# 3. Stimuli
# --------------------------------------------------------------------------

cdef class Stimulus:
    cdef readonly str stimulus_id
    cdef int kind                           # StimulusKind

@cython.final
cdef class UpdateGraph(Stimulus):
    cdef readonly str client
    # The graph's tasks as columns (one entry per task, in submission order):
    cdef readonly list task_keys
    cdef readonly list specs                # run specs, opaque
    cdef readonly list deps                 # dependency keys (a list/tuple, or None)
    cdef readonly list ranks                # priority inside the graph, or None for all
    cdef readonly list keys                 # keys the client wants
    cdef readonly object workers            # {key: address/name or collection}
    cdef readonly object allow_other_workers  # bool or collection of keys
    cdef readonly object resources          # {key: {resource: amount}}
    cdef readonly object retries            # int or {key: int}
    cdef readonly object annotations        # {key: dict}
    cdef readonly int64_t priority          # user priority: higher runs first

@cython.final
cdef class TaskFinished(Stimulus):
    cdef readonly str worker
    cdef readonly Py_ssize_t task_id        # -1: look up by key
    cdef readonly object key
    cdef readonly int64_t nbytes
    cdef readonly object typename
    cdef readonly double duration           # < 0: unknown
    # The result, when it rode along with the report (an opaque payload of
    # core/messages.pyx, passed on untouched in KeyInMemory.data), else None.
    cdef readonly object data

@cython.final
cdef class TasksFinished(Stimulus):
    # One report of several finished tasks by one worker: parallel columns,
    # handled as one stimulus (one drain of the recommendations).
    cdef readonly str worker
    cdef readonly list task_ids
    cdef readonly list nbytes
    cdef readonly list typenames
    cdef readonly list durations
    cdef readonly list data                 # payloads or None; see TaskFinished.data

@cython.final
cdef class TaskLongRunning(Stimulus):
    cdef readonly str worker
    cdef readonly Py_ssize_t task_id
    cdef readonly object key

@cython.final
cdef class TaskErred(Stimulus):
    cdef readonly str worker
    cdef readonly Py_ssize_t task_id
    cdef readonly object key
    cdef readonly object exception
    cdef readonly object traceback

@cython.final
cdef class AddWorker(Stimulus):
    cdef readonly str address
    cdef readonly int nthreads
    cdef readonly int64_t memory_limit
    cdef readonly dict resources
    cdef readonly object name
    cdef readonly double now

@cython.final
cdef class RemoveWorker(Stimulus):
    cdef readonly str address
    cdef readonly bint safe                 # expected exit: no suspicion counted
    cdef readonly double now
    cdef readonly str reason                # why it died, if known (the nanny's words), or None

@cython.final
cdef class WorkerHeartbeat(Stimulus):
    cdef readonly str address
    cdef readonly object metrics
    cdef readonly double now

@cython.final
cdef class ClientWantsKeys(Stimulus):
    cdef readonly str client
    cdef readonly list keys

@cython.final
cdef class ClientReleasesKeys(Stimulus):
    cdef readonly str client
    cdef readonly list keys

@cython.final
cdef class ClientRemoved(Stimulus):
    cdef readonly str client

@cython.final
cdef class Cancel(Stimulus):
    cdef readonly str client
    cdef readonly list keys
    cdef readonly bint force

@cython.final
cdef class Retry(Stimulus):
    cdef readonly str client
    cdef readonly list keys

@cython.final
cdef class BalanceTick(Stimulus):
    cdef readonly double now

@cython.final
cdef class StealResponse(Stimulus):
    cdef readonly str victim
    cdef readonly Py_ssize_t task_id
    cdef readonly object key
    cdef readonly object state              # the victim's state for the task

@cython.final
cdef class MissingData(Stimulus):
    cdef readonly object key
    cdef readonly str holder                # worker that should have had it
    cdef readonly str reporter              # worker that tried to fetch it

@cython.final
cdef class AddKeys(Stimulus):
    cdef readonly str worker
    cdef readonly list keys

@cython.final
cdef class UpdateData(Stimulus):
    cdef readonly str client                # may be None: nobody wants them
    cdef readonly dict who_has              # {key: [addresses]}
    cdef readonly dict nbytes               # {key: int}

@cython.final
cdef class ReleaseWorkerData(Stimulus):
    cdef readonly str worker
    cdef readonly list keys

@cython.final
cdef class RetireWorkers(Stimulus):
    cdef readonly list workers              # addresses, or None: pick n
    cdef readonly Py_ssize_t n


# --------------------------------------------------------------------------
# 4. Instructions
# --------------------------------------------------------------------------

cdef class Instruction:
    cdef readonly str stimulus_id

@cython.final
cdef class ComputeTask(Instruction):
    cdef readonly str worker
    cdef readonly Py_ssize_t task_id
    cdef readonly object key
    cdef readonly object run_spec
    cdef int64_t _p0, _p1, _p2              # priority; see .priority
    # ((dep_id, dep_key, nbytes, (holder addresses, ...)), ...)
    cdef readonly tuple dependencies
    cdef readonly dict resources
    cdef readonly object annotations
    cdef readonly double duration           # estimated seconds

@cython.final
cdef class FreeKeys(Instruction):
    cdef readonly str worker
    cdef readonly list task_ids
    cdef readonly list keys

@cython.final
cdef class StealRequest(Instruction):
    cdef readonly str worker                # the victim
    cdef readonly Py_ssize_t task_id
    cdef readonly object key

@cython.final
cdef class AcquireReplicas(Instruction):
    cdef readonly str worker
    cdef readonly list who_has              # [(id, key, nbytes, (holders, ...))]

@cython.final
cdef class KeyInMemory(Instruction):
    cdef readonly tuple clients             # client ids
    cdef readonly object key
    cdef readonly Py_ssize_t task_id
    cdef readonly int64_t nbytes
    cdef readonly object typename
    cdef readonly object data               # TaskFinished.data of the report, or None

@cython.final
cdef class TaskErredReport(Instruction):
    cdef readonly tuple clients             # client ids
    cdef readonly object key
    cdef readonly object exception
    cdef readonly object traceback
    cdef readonly object blame_key          # the task that actually failed

@cython.final
cdef class KeyLost(Instruction):
    cdef readonly tuple clients             # client ids
    cdef readonly object key

@cython.final
cdef class TaskCancelled(Instruction):
    cdef readonly tuple clients             # client ids
    cdef readonly object key

@cython.final
cdef class TaskRetried(Instruction):
    cdef readonly tuple clients             # client ids
    cdef readonly object key

@cython.final
cdef class KeyForgotten(Instruction):
    cdef readonly tuple clients             # client ids
    cdef readonly object key

@cython.final
cdef class WorkersRetiring(Instruction):
    cdef readonly list workers
    cdef readonly Py_ssize_t n_replicas     # replicas asked to move


# --------------------------------------------------------------------------
# 5. SchedulerState
# --------------------------------------------------------------------------

@cython.final
cdef class SchedulerState:
    # configuration (constructor arguments; never read from global config)
    cdef readonly bint validate
    cdef readonly int allowed_failures
    cdef readonly double worker_saturation
    cdef readonly double bandwidth
    cdef readonly double unknown_task_duration
    cdef readonly bint work_stealing
    cdef readonly double steal_ratio
    cdef readonly Py_ssize_t transition_log_length
    cdef bint _queuing                      # worker_saturation is finite
    # Seconds of learned work per thread a worker may hold beyond its slots
    # (see SchedulerState._is_open); 0 turns the allowance off.
    cdef readonly double tiny_task_backlog
    cdef WorkerState _last_root             # co-assignment of roots (see _decide)
    cdef WorkerState _sibling_to            # set while _place_sibling places a root

    # tasks: the key -> id mapping is the only place keys are hashed
    cdef readonly dict tasks                # key -> TaskState
    cdef dict _by_id                        # id -> TaskState
    cdef Py_ssize_t _next_task_id
    cdef int64_t _generation
    cdef dict _prefixes                     # prefix name -> PrefixState
    cdef PrefixState _last_prefix           # cache: consecutive keys share it
    cdef Py_ssize_t _counts[8]              # tasks per state

    # workers
    cdef readonly dict workers              # address -> WorkerState
    cdef dict _names                        # name -> WorkerState
    cdef list _running                      # status RUNNING, by id
    # Idle workers (see WorkerState._is_idle), borrowed references: a worker
    # leaves this vector before it leaves self.workers.  A vector with
    # swap-removal instead of a dict: workers cross the slot limit on almost
    # every task.
    cdef vector[PyObject*] _idle
    cdef vector[PyObject*] _scratch         # _pick: holders (borrowed)
    cdef dict _addresses_by_id              # every worker ever, for story()
    cdef Py_ssize_t _next_worker_id
    cdef int64_t _stamp

    # clients
    cdef readonly dict clients              # client id -> ClientState
    cdef ClientState _faf                   # the "fire-and-forget" client, if any

    # ready containers
    # Queued root tasks: a binary min-heap with lazy deletion.  A task that
    # leaves the queue other than by being popped leaves a stale entry,
    # skipped when popped (an entry is live iff its task is still queued in
    # the root queue; duplicates of one task carry the same key, so any of
    # them may place it).  The heap is rebuilt when stale entries dominate.
    # A heap instead of a std::set: no node allocation per task.
    cdef vector[QueueKey] _root_heap
    cdef Py_ssize_t _n_root_queued          # tasks in the root queue (live)
    cdef cpp_set[QueueKey] _constrained_queue  # queued restricted tasks
    cdef bint _filling                      # inside _fill_slots: roots may be placed
    cdef bint _constrained_dirty            # resources freed / workers changed
    cdef dict _unrunnable                   # {TaskState: None} in no-worker
    cdef dict _steals                       # {TaskState: thief} in flight

    # the current stimulus
    # Stack of tasks with a pending recommendation (their _rec_target).  Owned
    # references (Py_INCREF on push, Py_DECREF on pop): a C++ vector does not
    # reallocate the way a Python list does when it empties and refills.
    cdef vector[PyObject*] _recs
    cdef list _out                          # instructions emitted
    cdef list _free_dirty                   # workers with batched FreeKeys
    cdef str _stimulus_id
    cdef WorkerState _ctx_worker            # processing -> memory: who computed it
    cdef list _ctx_holders                  # released -> memory: scatter holders
    cdef object _ctx_data                   # processing -> memory: the inline result
    cdef WorkerState _decided               # output of _decide()
    cdef WorkerState _best                  # _pick/_consider scratch
    cdef double _best_cost
    cdef double _best_load

    # bounded transition log (ring buffer)
    cdef list _log_keys
    cdef list _log_stimuli
    cdef vector[int] _log_start
    cdef vector[int] _log_finish
    cdef vector[Py_ssize_t] _log_worker
    cdef Py_ssize_t _log_pos
    cdef Py_ssize_t _log_len
    cdef readonly int64_t n_transitions

    # task stream: the last task_stream_length computed tasks (ring buffer, see
    # _stream_record); read by task_stream() for the dashboard and get_task_stream
    cdef readonly Py_ssize_t task_stream_length
    cdef list _stream_keys
    cdef list _stream_workers                 # addresses (str)
    cdef vector[double] _stream_stop          # wall clock when the result was reported
    cdef vector[double] _stream_duration      # as the worker measured it
    cdef vector[char] _stream_erred
    cdef readonly int64_t task_stream_total   # tasks ever recorded

    # the one way in: handle_stimulus(*stimuli) calls this for each stimulus,
    # and compiled callers (core/scheduler_dispatch.pyx) call it directly
    cpdef list handle(self, Stimulus ev)

    # stimulus plumbing (private: only handle() runs them)
    cdef inline void _begin(self, str stimulus_id)
    cdef list _end(self)
    cdef int _dispatch_event(self, Stimulus ev) except -1
    cdef int _drain(self) except -1
    cdef inline void _rec(self, TaskState ts, int target) noexcept
    cdef int _transition(self, TaskState ts, int finish) except -1
    cdef int _transition1(self, TaskState ts, int finish) except -1
    cdef void _log(self, TaskState ts, int start) noexcept
    cdef int _fill_slots(self) except -1

    # handlers
    cdef void _stream_record(self, TaskState ts, WorkerState ws, double duration,
                             bint erred) noexcept
    cdef int _task_finished(self, WorkerState ws, TaskState ts, int64_t nbytes,
                            object typename, double duration, object data) except -1
    cdef int _finished(self, TaskFinished ev) except -1
    cdef int _tasks_finished(self, TasksFinished ev) except -1
    cdef int _erred(self, TaskErred ev) except -1
    cdef int _finished_by_id(self, str worker, object task_id, int64_t nbytes, object typename,
                             double duration, object data) except -1
    cdef int _task_erred(self, WorkerState ws, TaskState ts, object exception,
                         object traceback) except -1
    cdef int _task_long_running(self, WorkerState ws, TaskState ts) except -1
    cdef int _update_graph(self, UpdateGraph ev) except -1
    cdef int _add_worker(self, AddWorker ev) except -1
    cdef int _remove_worker(self, RemoveWorker ev) except -1
    cdef int _client_wants(self, str client, list keys) except -1
    cdef int _client_wants_cs(self, ClientState cs, list keys) except -1
    cdef int _client_releases(self, str client, list keys) except -1
    cdef int _client_removed(self, str client) except -1
    cdef int _cancel(self, Cancel ev) except -1
    cdef int _retry(self, Retry ev) except -1
    cdef int _balance(self, BalanceTick ev) except -1
    cdef int _steal_response(self, StealResponse ev) except -1
    cdef int _missing_data(self, MissingData ev) except -1
    cdef int _add_keys(self, AddKeys ev) except -1
    cdef int _update_data(self, UpdateData ev) except -1
    cdef int _release_worker_data(self, ReleaseWorkerData ev) except -1
    cdef int _worker_paused(self, WorkerState ws, bint paused) except -1
    cdef int _retire_workers(self, RetireWorkers ev) except -1

    # helpers used by the transition functions
    cdef TaskState _task_from(self, Py_ssize_t task_id, object key)
    cdef TaskState _alloc_task(self, object key, object run_spec)
    cdef void _register_task(self, TaskState ts)
    cdef TaskState _new_task(self, object key, object run_spec)
    cdef PrefixState _prefix_of(self, object key)
    cdef ClientState _client(self, str client)
    cdef void _add_want(self, ClientState cs, TaskState ts) noexcept
    cdef void _drop_want(self, ClientState cs, TaskState ts) noexcept
    cdef void _maybe_release(self, TaskState ts) noexcept
    cdef void _after_released(self, TaskState ts) noexcept
    cdef void _release_dependencies(self, TaskState ts) noexcept
    cdef void _dependency_arrived(self, TaskState ts) noexcept
    cdef int _decide(self, TaskState ts) except -1
    cdef int _decide_restricted(self, TaskState ts) except -1
    cdef WorkerState _pick(self, TaskState ts, list candidates)
    cdef inline void _consider(self, WorkerState ws, int64_t total, int64_t stamp) noexcept
    cdef WorkerState _best_idle(self)
    cdef int _dispatch(self, TaskState ts) except -1
    cdef void _leave_ready_containers(self, TaskState ts) noexcept
    cdef void _compact_root_heap(self)
    cdef int _add_to_processing(self, TaskState ts, WorkerState ws) except -1
    cdef WorkerState _exit_processing(self, TaskState ts)
    cdef bint _is_open(self, WorkerState ws) noexcept
    cdef int _place_sibling(self, TaskState ts) except -1
    cdef void _update_idle(self, WorkerState ws) noexcept
    cdef void _add_replica(self, TaskState ts, WorkerState ws) noexcept
    cdef void _remove_replica(self, TaskState ts, WorkerState ws) noexcept
    cdef void _clear_steal(self, TaskState ts) noexcept
    cdef void _rebuild_running(self)
    cdef int _evacuate(self, list tasks, bint exclude_closing) except -1

    # emitting
    cdef void _emit_free(self, WorkerState ws, TaskState ts) noexcept
    cdef void _flush_frees(self, WorkerState ws) noexcept
    cdef void _emit_to_worker(self, WorkerState ws, Instruction instr) noexcept
    cdef tuple _client_ids(self, TaskState ts)
    cdef void _report_memory(self, TaskState ts, object data)
    cdef void _report_erred(self, TaskState ts, tuple clients)

    cdef int _validate_task(self, TaskState ts) except -1


