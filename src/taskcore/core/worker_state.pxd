# distutils: language = c++
"""The worker's task-state machine: table of contents.

Read this file first; `worker_state.pyx` starts with the theory of operation.

Layout
------
1. C helpers: the priority-queue item and heap functions (C++ `<algorithm>`),
   the story ring record, a resource need.
2. Enums: task states and transition actions (the transition table itself is
   data, built at import time in the .pyx from `_TABLE_SPEC`).
3. `TaskState`, `PeerState`: typed per-task / per-peer records.
4. Events (stimuli, in) and instructions (out): slotted cdef classes.
5. `WorkerState`: the machine.

Events (in)                                   Instructions (out)
-------------------------------------------   -------------------------------------------
ComputeTask(id, key, run_spec, priority, ...)  Execute(id, key, run_spec)
FreeKeys(ids)                                  GatherDep(worker, ids, keys, total_nbytes)
RemoveReplicas(ids)                            RetryBusyWorkerLater(worker)
AcquireReplicas(who_has)                       DropData(id, key)            [server: del data[key]]
UpdateData(data, report)                       TaskFinishedMsg(id, key, nbytes, type_name, start, stop)
ExecuteSuccess(id, nbytes, type_name, ...)     TaskErredMsg(id, key, exception, traceback, start, stop)
ExecuteFailure(id, exception, traceback, ...)  ReleaseWorkerDataMsg(id, key)
RescheduleEvent(id)                            MissingDataMsg(id, key, errant_worker)
SecedeEvent(id)                                RequestRefreshWhoHas(ids)
GatherDepSuccess(worker, data)                 StealResponseMsg(id, key, state)
GatherDepBusy(worker)                          AddKeysMsg(ids)
GatherDepNetworkFailure(worker)                RescheduleMsg(id, key)
GatherDepFailure(worker, exception, traceback) LongRunningMsg(id, key)
StealRequest(id)
PauseEvent() / UnpauseEvent()
RetryBusyWorker(worker)
FindMissing()          (periodic: re-ask where missing keys are)
FindMissingResult(who_has)
RemoveWorker(worker)   (a peer left the cluster)

Instructions whose class name ends in `Msg` (and RequestRefreshWhoHas) go to
the scheduler; the others are executed by the worker server itself.
"""
cimport cython
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libcpp.vector cimport vector
from libcpp.unordered_map cimport unordered_map
from cpython.ref cimport PyObject


# ---------------------------------------------------------------------------
# 1. C helpers
# ---------------------------------------------------------------------------
cdef extern from *:
    """
    #include <cstdint>
    #include <vector>
    #include <algorithm>

    /* One entry of a priority queue (ready, constrained, per-peer fetch).
       p0..p3: the scheduler's priority tuple (missing trailing elements are
       INT64_MIN so that a shorter tuple sorts first, as Python tuples do);
       seq: unique enqueue number, the tie-break (FIFO) and the staleness
       check (an entry is live only while TaskState.queue_seq == seq). */
    struct TCQItem { int64_t p0, p1, p2, p3, seq, id; };

    static inline bool tcq_before(const TCQItem& a, const TCQItem& b) {
        if (a.p0 != b.p0) return a.p0 < b.p0;
        if (a.p1 != b.p1) return a.p1 < b.p1;
        if (a.p2 != b.p2) return a.p2 < b.p2;
        if (a.p3 != b.p3) return a.p3 < b.p3;
        return a.seq < b.seq;
    }
    /* std heaps are max-heaps on `less`: invert so the earliest runs first */
    struct TCQAfter {
        bool operator()(const TCQItem& a, const TCQItem& b) const { return tcq_before(b, a); }
    };
    static inline void tcq_push(std::vector<TCQItem>* h, const TCQItem& it) {
        h->push_back(it);
        std::push_heap(h->begin(), h->end(), TCQAfter());
    }
    static inline void tcq_pop(std::vector<TCQItem>* h) {
        std::pop_heap(h->begin(), h->end(), TCQAfter());
        h->pop_back();
    }
    static inline void tcq_heapify(std::vector<TCQItem>* h) {
        std::make_heap(h->begin(), h->end(), TCQAfter());
    }
    """
    ctypedef struct TCQItem:
        int64_t p0
        int64_t p1
        int64_t p2
        int64_t p3
        int64_t seq
        int64_t id
    bint tcq_before(const TCQItem& a, const TCQItem& b) nogil
    void tcq_push(vector[TCQItem]* h, const TCQItem& it) nogil
    void tcq_pop(vector[TCQItem]* h) nogil
    void tcq_heapify(vector[TCQItem]* h) nogil


# One story record.  key/stim are owned references (INCREF on write, DECREF
# on overwrite and in WorkerState.__dealloc__): a C ring is invisible to the
# garbage collector, so a 100,000-record story costs full collections nothing.
ctypedef struct StoryRec:
    int64_t id
    PyObject* key
    PyObject* stim      # stimulus_id
    uint8_t kind        # STORY_TRANSITION or STORY_EVENT
    uint8_t a           # start state, or event code
    uint8_t b           # finish state


ctypedef struct ResNeed:
    int idx             # index into WorkerState._res_names
    double amount


# A pending recommendation: (task id, target state).  Ids, not pointers: a
# task forgotten before its recommendation is processed is simply skipped.
ctypedef struct Rec:
    int64_t id
    int target


# ---------------------------------------------------------------------------
# 2. Enums
# ---------------------------------------------------------------------------
cdef enum:
    # task states (TaskState._state)
    S_RELEASED = 0
    S_WAITING = 1
    S_FETCH = 2
    S_FLIGHT = 3
    S_READY = 4
    S_CONSTRAINED = 5       # ready, but needs resources (separate queue)
    S_EXECUTING = 6
    S_LONG_RUNNING = 7      # seceded: still running, slot given back
    S_MEMORY = 8
    S_ERROR = 9
    S_CANCELLED = 10        # released while executing/flight; `previous` says which
    S_RESUMED = 11          # cancelled, then wanted again (`next`: fetch or waiting)
    S_MISSING = 12
    S_FORGOTTEN = 13        # terminal pseudo-state: removed from the machine
    S_RESCHEDULED = 14      # target-only pseudo-state: ends in released
    N_STATES = 15

cdef enum:
    # transition actions (values of the table)
    T_ILLEGAL = 0
    T_NOOP
    T_RELEASED_WAITING
    T_FETCH             # generic: → fetch (or missing without holders)
    T_TO_MISSING
    T_TO_MEMORY
    T_TO_ERROR
    T_RELEASE
    T_VIA_RELEASED      # start → released (kept) → fetch
    T_WAITING_READY
    T_READY_EXECUTING
    T_FETCH_FLIGHT
    T_CANCEL            # executing / long-running / flight → cancelled
    T_SECEDE
    T_RESCHEDULE
    T_RESUME_FETCH      # executing / long-running → resumed(fetch)
    T_RESUME_WAITING    # flight → resumed(waiting)
    T_FLIGHT_FETCH
    T_CANCELLED_RELEASED
    T_CANCELLED_WAITING
    T_CANCELLED_FETCH
    T_RESUMED_RELEASED
    T_RESUMED_WAITING
    T_RESUMED_FETCH
    T_MISSING_FETCH
    T_FORGET
    N_ACTIONS

cdef enum:
    STORY_TRANSITION = 0
    STORY_EVENT = 1

# slot values of TaskState.slot
cdef enum:
    SLOT_NONE = 0
    SLOT_EXECUTING = 1      # holds one of the nthreads execution slots
    SLOT_SECEDED = 2        # thread still running, slot given back (secede)


# ---------------------------------------------------------------------------
# 3. Per-task and per-peer records
# ---------------------------------------------------------------------------
@cython.final
cdef class PeerState:
    """A peer worker we may fetch from.  Invariants:
    - `has_what` holds exactly the TaskStates whose `who_has` lists this peer;
    - `transfer` is None, or the tasks of our one outstanding GatherDep from it
      (each has coming_from is self, or is no longer in a flight-like state);
    - `heap` is a lazy priority queue of fetch candidates: stale entries
      (task left fetch, re-entered with a new queue_seq, or lost this holder)
      are skipped when popped and compacted when the heap outgrows the
      number of fetch tasks."""
    cdef readonly object address
    cdef readonly object host
    cdef readonly bint local              # same host as this worker
    cdef readonly bint busy               # said "busy"; wait for RetryBusyWorker
    cdef readonly int busy_count          # times it said busy (ranking: least busy first)
    cdef readonly int64_t index           # creation order (deterministic rotation)
    cdef set has_what                     # {TaskState}
    cdef list transfer                    # [TaskState] of the outstanding GatherDep, or None
    cdef readonly int64_t transfer_nbytes
    cdef vector[TCQItem] heap
    cdef bint pending                     # listed in WorkerState._fetch_peers


@cython.final
cdef class TaskState:
    """One task known to this worker.  Integers inside; `key` is carried for
    stories and for the server's data store.

    Dependency links: `dependencies` is the list given by the last ComputeTask;
    while it is not None, this task is in every dependency's `dependents`.
    Links are dropped when the task reaches memory/error or is released, so a
    non-empty `dependents` always means "still needed here".
    """
    cdef readonly int64_t id
    cdef readonly object key
    cdef public object run_spec           # opaque
    cdef readonly object annotations
    cdef readonly object resource_restrictions
    cdef readonly object exception        # opaque (error state / TaskErredMsg)
    cdef readonly object traceback
    cdef readonly object type_name
    cdef readonly double start
    cdef readonly double stop
    cdef readonly int64_t nbytes          # -1: unknown
    cdef uint8_t _state
    cdef uint8_t _previous                # cancelled/resumed: executing, long-running or flight
    cdef uint8_t _next                    # resumed: fetch or waiting
    cdef uint8_t slot                     # SLOT_*: is a thread running it?
    cdef bint done                        # the thread / transfer came back (transient)
    cdef bint has_priority
    cdef bint free_requested              # FreeKeys arrived while dependents still need it
    cdef bint replica_wanted              # AcquireReplicas asked for it
    cdef bint scatter_pending             # UpdateData arrived while in progress
    cdef bint res_held                    # resources acquired (released on execute done)
    cdef bint impossible                  # needs resources this worker lacks
    cdef int waiting_count                # dependencies not in memory (state waiting)
    cdef int64_t p0, p1, p2, p3           # priority as C key (see TCQItem); the
    cdef uint8_t plen                     # tuple is rebuilt on demand (property)
    cdef int64_t queue_seq                # live queue entry number
    cdef list dependencies                # [TaskState] or None
    cdef set dependents                   # {TaskState} or None
    cdef list who_has                     # [PeerState] or None
    cdef PeerState coming_from            # peer of the outstanding transfer, or None
    cdef vector[ResNeed] res_needs


# ---------------------------------------------------------------------------
# 4. Events and instructions (fields are documented in the .pyx / .pyi)
# ---------------------------------------------------------------------------
# Events and instructions are values made from wire data; they cannot form
# reference cycles, so they are not GC-tracked (no_gc): at 100,000s per second
# GC tracking would cost more than the objects themselves.  The few that may
# carry live exceptions/tracebacks are still safe: the base is untracked,
# so pass serialized (opaque) exceptions, as the server does.
@cython.no_gc
cdef class StateMachineEvent:
    cdef readonly object stimulus_id

@cython.no_gc
cdef class Instruction:
    cdef readonly object stimulus_id

# The events and instructions of a tiny task's path, declared here for
# worker_dispatch.pyx's typed access (the others are declared in the .pyx).
@cython.no_gc
@cython.final
cdef class ComputeTask(StateMachineEvent):
    cdef readonly int64_t id
    cdef readonly object key
    cdef readonly object run_spec
    cdef readonly object priority
    cdef readonly object who_has
    cdef readonly object resource_restrictions
    cdef readonly object annotations

@cython.no_gc
@cython.final
cdef class ExecuteSuccess(StateMachineEvent):
    cdef readonly int64_t id
    cdef readonly int64_t nbytes
    cdef readonly object type_name
    cdef readonly double start
    cdef readonly double stop

@cython.no_gc
@cython.final
cdef class Execute(Instruction):
    cdef readonly int64_t id
    cdef readonly object key
    cdef readonly object run_spec

@cython.no_gc
@cython.final
cdef class DropData(Instruction):
    cdef readonly int64_t id
    cdef readonly object key

@cython.no_gc
@cython.final
cdef class TaskFinishedMsg(Instruction):
    cdef readonly int64_t id
    cdef readonly object key
    cdef readonly int64_t nbytes
    cdef readonly object type_name
    cdef readonly double start
    cdef readonly double stop

@cython.no_gc
@cython.final
cdef class ReleaseWorkerDataMsg(Instruction):
    cdef readonly int64_t id
    cdef readonly object key

# ---------------------------------------------------------------------------
# 5. The machine
# ---------------------------------------------------------------------------
@cython.final
cdef class WorkerState:
    # configuration
    cdef readonly int nthreads
    cdef readonly object address
    cdef readonly object host
    cdef readonly bint validate
    cdef readonly int64_t max_transfer_bytes       # per GatherDep (first key may exceed)
    cdef readonly int max_concurrent_transfers     # outstanding GatherDeps
    cdef readonly int64_t max_in_flight_bytes      # across all transfers
    cdef readonly int64_t default_nbytes           # size assumed when unknown
    cdef readonly int64_t max_transitions          # per handle_stimulus call (loop guard)

    # state
    cdef unordered_map[int64_t, PyObject*] _tasks  # owns one reference per task
    cdef vector[Rec] _recs
    cdef size_t _rec_head
    cdef vector[TCQItem] _ready
    cdef vector[TCQItem] _constrained
    cdef dict _peers                               # address → PeerState
    cdef dict _fetch_peers                         # PeerState → None, peers with fetch entries
    cdef set _missing                              # {TaskState} in state missing
    cdef int64_t _counts[N_STATES]
    cdef readonly bint paused
    cdef readonly int64_t memory_bytes
    cdef readonly int64_t in_flight_bytes
    cdef readonly int transfers_in_flight
    cdef readonly int executing_count              # threads holding a slot
    cdef readonly int long_running_count           # seceded threads still running
    cdef readonly int64_t transition_count
    cdef int64_t _seq
    cdef int64_t _peer_counter
    cdef uint64_t _rr

    # resources
    cdef dict _res_index
    cdef list _res_names
    cdef vector[double] _res_total
    cdef vector[double] _res_avail

    # per-call scratch
    cdef list _instructions
    cdef object _stim
    cdef list _add_keys
    cdef list _refresh
    cdef PeerState _gather_peer
    cdef int64_t _call_transitions

    # story (bounded ring)
    cdef vector[StoryRec] _story
    cdef size_t _story_pos
    cdef size_t _story_len
    cdef readonly size_t story_size

    # --- internals -------------------------------------------------------
    cdef TaskState _get(self, int64_t tid)
    cdef TaskState _ensure_task(self, int64_t tid, object key)
    cdef int _set_state(self, TaskState ts, int new) except -1
    cdef int _record(self, TaskState ts, uint8_t kind, uint8_t a, uint8_t b) except -1
    cdef int _log_event(self, TaskState ts, int code) except -1
    cdef int _push_rec(self, TaskState ts, int target) except -1
    cdef int _process_recs(self) except -1
    cdef int _transition(self, TaskState ts, int finish, bint keep) except -1
    cdef int _emit(self, object instr) except -1
    cdef PeerState _get_peer(self, object address)
    cdef int _set_who_has(self, TaskState ts, object holders) except -1
    cdef int _remove_holder(self, TaskState ts, PeerState peer) except -1
    cdef int _maybe_drop_peer(self, PeerState peer) except -1
    cdef int _drop_peer_holdings(self, PeerState peer) except -1
    cdef int _push_fetch_entries(self, TaskState ts, PeerState only) except -1
    cdef int _set_priority(self, TaskState ts, object priority) except -1
    cdef int _set_resources(self, TaskState ts, object restrictions) except -1
    cdef bint _resources_ok(self, TaskState ts)
    cdef int _release_resources(self, TaskState ts) except -1
    # transition bodies
    cdef int _t_released_waiting(self, TaskState ts) except -1
    cdef int _t_fetch(self, TaskState ts) except -1
    cdef int _t_to_missing(self, TaskState ts) except -1
    cdef int _t_to_memory(self, TaskState ts) except -1
    cdef int _t_to_error(self, TaskState ts) except -1
    cdef int _t_release(self, TaskState ts, bint forget) except -1
    cdef int _t_waiting_ready(self, TaskState ts) except -1
    cdef int _t_ready_executing(self, TaskState ts) except -1
    cdef int _t_fetch_flight(self, TaskState ts) except -1
    cdef int _t_secede(self, TaskState ts) except -1
    cdef int _t_back_to_running(self, TaskState ts) except -1
    cdef int _unlink_dependencies(self, TaskState ts) except -1
    cdef int _maybe_forget(self, TaskState ts) except -1
    # scheduling
    cdef int _ensure_computing(self) except -1
    cdef int _ensure_communicating(self) except -1
    cdef TaskState _peek_queue(self, vector[TCQItem]* heap, int state)
    cdef TaskState _live_fetch(self, PeerState peer, TCQItem* item)
    cdef int _compact_heap(self, PeerState peer) except -1
    cdef PeerState _select_peer(self)
    cdef bint _start_transfer(self, PeerState peer) except -1
    cdef list _transfer_done(self, object worker)
    cdef int _flight_failed(self, list tasks, int code) except -1
    cdef TaskState _execute_done(self, int64_t tid)
    # handlers
    cpdef list handle_events(self, list events)
    cdef int _dispatch(self, object ev) except -1
    cdef int _handle_compute(self, object ev) except -1
    cdef int _handle_free_keys(self, object ev) except -1
    cdef int _handle_remove_replicas(self, object ev) except -1
    cdef int _handle_acquire_replicas(self, object ev) except -1
    cdef int _handle_update_data(self, object ev) except -1
    cdef int _handle_execute_success(self, object ev) except -1
    cdef int _handle_execute_failure(self, object ev) except -1
    cdef int _handle_reschedule(self, object ev) except -1
    cdef int _handle_secede(self, object ev) except -1
    cdef int _handle_gather_success(self, object ev) except -1
    cdef int _handle_gather_busy(self, object ev) except -1
    cdef int _handle_gather_network_failure(self, object ev) except -1
    cdef int _handle_gather_failure(self, object ev) except -1
    cdef int _handle_steal(self, object ev) except -1
    cdef int _handle_find_missing(self, object ev) except -1
    cdef int _handle_find_missing_result(self, object ev) except -1
    cdef int _handle_remove_worker(self, object ev) except -1
    cdef int _handle_retry_busy(self, object ev) except -1
    # validation
    cdef int _validate_task(self, TaskState ts, bint settled) except -1
    cdef int _fail(self, TaskState ts, str msg) except -1
