# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The worker's task-state machine (sans I/O).

Theory of operation
===================

`WorkerState` is a pure function of the events it is fed: it does no I/O,
reads no clock (times arrive inside events) and uses no randomness.  The
worker server (`worker.py`) turns messages, thread-pool completions and
transfer results into *events*, calls ``handle_stimulus(*events)``, and
executes the *instructions* it gets back, in order.  Tests do the same with no
server at all.

Flow of one ``handle_stimulus`` call::

    for each event:
        handler(event)          -- updates bookkeeping, pushes recommendations
        process recommendations -- FIFO queue of (task id, target state);
                                   each one is a table-driven transition that
                                   may push more recommendations (iterative,
                                   never recursive)
    ensure_communicating()      -- fetch → flight: batch keys per peer into
                                   GatherDep instructions, within limits
    ensure_computing()          -- ready → executing: fill the free slots in
                                   priority order, honouring resources
    flush batched messages      -- one AddKeysMsg, one RequestRefreshWhoHas
    validate (validate=True)    -- full invariant check

Scheduling decisions are made once per call, after all events: a batch of
ComputeTasks is ordered by priority before anything starts, and dependencies
wanted by several tasks of the batch are fetched in one GatherDep per peer.

Identity.  The scheduler assigns integer task ids; the machine keys everything
on them (a C++ ``unordered_map<int64, TaskState>``).  The ``key`` travels with
the task only for stories and for the server's data store.

Data.  The machine never holds task *values*, only their sizes.  Convention
with the server: the server stores a value (from a thread, a peer or a
scatter) in its data store *before* feeding the event that announces it, and
deletes it when told by a ``DropData`` instruction.  So a result that arrives
for a task nobody wants any more (cancelled while running or in flight) is
discarded with ``DropData``, and releasing a task in memory emits
``DropData`` plus ``ReleaseWorkerDataMsg`` (for the scheduler).

States::

    released ──► waiting ──► ready/constrained ──► executing ──► memory
        │  ▲        (deps)                            │  ▲ secede   ▲
        │  │                                          ▼  │          │
        │  └─────── error ◄──────────────────── long-running        │
        └──► fetch ──► flight ─────────────────────────────────────►┘
               ▲  │      │ (all holders failed)
               │  ▼      ▼
               └─ missing ◄─

    cancelled(previous=executing|long-running|flight):
        released while a thread or a transfer is in progress.  We cannot stop
        it, so we wait; its result is discarded when it comes back.
    resumed(previous, next=fetch|waiting):
        a cancelled task wanted again before its thread/transfer came back.
        If the running thing succeeds, its result is kept (memory); if it
        fails, the task continues as `next` (fetch it, or compute it here).

`constrained` (ready but needing resources, kept in its own queue),
`long-running` (seceded), `cancelled`, `resumed` and the pseudo-states
`forgotten` / `rescheduled` complete the set the architecture names.

Transitions are data: ``_TABLE_SPEC`` below maps (start, finish) to an action,
compiled at import into a ``uint8[N_STATES][N_STATES]`` table.  A pair that is
not in the table raises `InvalidTransition` carrying the task's story.  A
recommendation whose target equals a resting state is a table `noop`.

Execution slots.  ``nthreads`` slots; ``executing_count`` counts threads that
hold one.  A task that secedes keeps running but gives its slot back
(``long_running_count``); its resources stay held until it finishes, because
the thread still uses them.  Ready tasks with resource restrictions wait in a
separate queue; the head of the two queues with the best priority runs first,
a constrained head only when its resources are free (head-of-line blocking
inside the constrained queue, as in dask).  A task asking for more of a
resource than this worker has in total errs at once instead of blocking the
queue forever.

Fetching.  A dependency in `fetch` sits in a lazy priority queue of every peer
that holds it.  ensure_communicating picks, among peers that are neither busy
nor already serving us a transfer, the one whose best queued task has the best
priority; ties go to a same-host peer, then the one that said "busy" least
often, then the one with more queued keys (bigger batches), then a rotating
index (deterministic round robin).  It then takes that peer's queued tasks in
priority order while they fit ``max_transfer_bytes`` (the first key of an
empty message always fits) and the total ``max_in_flight_bytes`` (ignored
only when nothing is in flight at all, to guarantee progress), and emits one
GatherDep.  At most ``max_concurrent_transfers`` are outstanding, one per
peer.  A network failure drops that peer from every task's holders and the
tasks fall back to `fetch` from other holders, or `missing` when none is left
(→ RequestRefreshWhoHas).  A peer answering without a key we asked for is
dropped as a holder of that key (→ MissingDataMsg).  A busy peer is skipped
until the server feeds RetryBusyWorker (after RetryBusyWorkerLater).

Release and forgetting.  FreeKeys on a task that local dependents still need
is deferred (``free_requested``) until the last dependent lets go.  A
released task with no dependents is forgotten (removed) immediately, unless a
thread or transfer for it is still outstanding.

Queues are lazy: leaving `ready` or `fetch` does not search the heaps; an entry
is live only while the task is still in that state and its ``queue_seq``
matches.  Per-peer fetch heaps are compacted when they outgrow the number of
fetch tasks, so they stay bounded.

Scatter (UpdateData) onto a task whose thread or transfer is still out sets
``scatter_pending``: when that comes back, whatever its outcome, the task
becomes memory (the store already holds the scattered value).

Story.  Every state change and the main events are written to a bounded ring
of C structs holding owned references to key and stimulus_id (no allocation
per record, invisible to the garbage collector).  ``story(key_or_id, ...)``
reads it back as tuples.  Successful execute/gather events are not recorded
separately: the transition they cause carries their stimulus_id.

Garbage collection.  TaskState, PeerState, events and instructions are not
GC-tracked (``no_gc``), and the containers hanging off TaskState/PeerState
are created untracked: with 100,000s of live tasks, tracking them made every
collection crawl (measured 3x slower per task).  Reference cycles among them
are broken explicitly (forget, ``__dealloc__``).  Events that may carry live
exception objects (ExecuteFailure, GatherDepFailure, TaskErredMsg) stay
tracked; TaskState.exception holds them only until the task is released.

validate=True checks the invariants of each transitioned task right after the
transition, and the whole machine at the end of each call.
"""
cimport cython
from cpython.ref cimport PyObject, Py_XINCREF, Py_XDECREF
from cython.operator cimport dereference as deref, preincrement as inc
from libc.stdint cimport int64_t, uint8_t, uint64_t, INT64_MIN
from libcpp.vector cimport vector
from libcpp.unordered_map cimport unordered_map

from taskcore.errors import TaskcoreError

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)


# Containers owned by TaskState / PeerState (dependencies, dependents, who_has,
# has_what, transfer) are created untracked by the garbage collector.  Those
# records are themselves untracked (no_gc), so the collector could never free
# a cycle through them anyway; tracking the containers would only make every
# young-generation collection walk them (measured: ~15% of a fetch-heavy run).
# Cycles are broken explicitly: on forget, and in WorkerState.__dealloc__.
cdef inline list _ulist():
    cdef list l = []
    PyObject_GC_UnTrack(<void*>l)
    return l


cdef inline set _uset():
    cdef set s = set()
    PyObject_GC_UnTrack(<void*>s)
    return s

__all__ = [
    "STATES", "TRANSITIONS", "InvalidTransition", "InvalidTaskState",
    "TaskState", "PeerState", "WorkerState",
    # events
    "StateMachineEvent", "ComputeTask", "FreeKeys", "RemoveReplicas", "AcquireReplicas",
    "UpdateData", "ExecuteSuccess", "ExecuteFailure", "RescheduleEvent", "SecedeEvent",
    "GatherDepSuccess", "GatherDepBusy", "GatherDepNetworkFailure", "GatherDepFailure",
    "StealRequest", "PauseEvent", "UnpauseEvent", "RetryBusyWorker", "FindMissing",
    "FindMissingResult", "RemoveWorker",
    # instructions
    "Instruction", "Execute", "GatherDep", "RetryBusyWorkerLater", "DropData",
    "TaskFinishedMsg", "TaskErredMsg", "ReleaseWorkerDataMsg", "MissingDataMsg",
    "RequestRefreshWhoHas", "StealResponseMsg", "AddKeysMsg", "RescheduleMsg",
    "LongRunningMsg",
]

# ---------------------------------------------------------------------------
# States and the transition table (data)
# ---------------------------------------------------------------------------
STATES = (
    "released", "waiting", "fetch", "flight", "ready", "constrained", "executing",
    "long-running", "memory", "error", "cancelled", "resumed", "missing",
    "forgotten", "rescheduled",
)
_STATE_CODE = {name: i for i, name in enumerate(STATES)}

_ACTION_CODE = {
    "noop": T_NOOP,
    "released_waiting": T_RELEASED_WAITING,
    "fetch": T_FETCH,
    "to_missing": T_TO_MISSING,
    "to_memory": T_TO_MEMORY,
    "to_error": T_TO_ERROR,
    "release": T_RELEASE,
    "via_released": T_VIA_RELEASED,
    "waiting_ready": T_WAITING_READY,
    "ready_executing": T_READY_EXECUTING,
    "fetch_flight": T_FETCH_FLIGHT,
    "cancel": T_CANCEL,
    "secede": T_SECEDE,
    "reschedule": T_RESCHEDULE,
    "resume_fetch": T_RESUME_FETCH,
    "resume_waiting": T_RESUME_WAITING,
    "flight_fetch": T_FLIGHT_FETCH,
    "cancelled_released": T_CANCELLED_RELEASED,
    "cancelled_waiting": T_CANCELLED_WAITING,
    "cancelled_fetch": T_CANCELLED_FETCH,
    "resumed_released": T_RESUMED_RELEASED,
    "resumed_waiting": T_RESUMED_WAITING,
    "resumed_fetch": T_RESUMED_FETCH,
    "missing_fetch": T_MISSING_FETCH,
    "forget": T_FORGET,
}

# start state → {finish state: action}.  Anything absent is illegal.
# In-progress states (executing, long-running, flight, cancelled, resumed) are
# only left to memory/error/rescheduled/fetch-after-failure once the thread or
# transfer has come back (TaskState.done); the handlers guarantee that.
_TABLE_SPEC = {
    "released": {
        "released": "noop", "waiting": "released_waiting", "fetch": "fetch",
        "missing": "to_missing", "memory": "to_memory", "error": "to_error",
        "forgotten": "forget",
    },
    "waiting": {
        "waiting": "noop", "ready": "waiting_ready", "released": "release",
        "memory": "to_memory", "fetch": "via_released",
    },
    "ready": {
        "ready": "noop", "waiting": "noop", "executing": "ready_executing",
        "released": "release", "memory": "to_memory", "fetch": "via_released",
    },
    "constrained": {
        "constrained": "noop", "ready": "noop", "waiting": "noop",
        "executing": "ready_executing", "released": "release",
        "memory": "to_memory", "fetch": "via_released",
    },
    "executing": {
        "executing": "noop", "waiting": "noop", "memory": "to_memory",
        "error": "to_error", "released": "cancel", "long-running": "secede",
        "rescheduled": "reschedule", "fetch": "resume_fetch",
    },
    "long-running": {
        "long-running": "noop", "waiting": "noop", "memory": "to_memory",
        "error": "to_error", "released": "cancel", "rescheduled": "reschedule",
        "fetch": "resume_fetch",
    },
    "memory": {
        "memory": "noop", "waiting": "noop", "fetch": "noop", "released": "release",
    },
    "error": {
        "error": "noop", "released": "release", "fetch": "via_released",
        "memory": "to_memory",
    },
    "fetch": {
        "fetch": "noop", "flight": "fetch_flight", "released": "release",
        "missing": "to_missing", "memory": "to_memory",
    },
    "flight": {
        "flight": "noop", "memory": "to_memory", "fetch": "flight_fetch",
        "error": "to_error", "released": "cancel", "waiting": "resume_waiting",
    },
    "cancelled": {
        "released": "cancelled_released", "waiting": "cancelled_waiting",
        "fetch": "cancelled_fetch", "long-running": "secede", "memory": "to_memory",
    },
    "resumed": {
        "released": "resumed_released", "waiting": "resumed_waiting",
        "fetch": "resumed_fetch", "long-running": "secede", "memory": "to_memory",
    },
    "missing": {
        "missing": "noop", "fetch": "missing_fetch", "released": "release",
        "memory": "to_memory",
    },
}

cdef uint8_t _TABLE[N_STATES][N_STATES]


def _build_table():
    cdef int i, j
    for i in range(N_STATES):
        for j in range(N_STATES):
            _TABLE[i][j] = T_ILLEGAL
    out = {}
    for start, row in _TABLE_SPEC.items():
        for finish, action in row.items():
            _TABLE[_STATE_CODE[start]][_STATE_CODE[finish]] = _ACTION_CODE[action]
            out[(start, finish)] = action
    return out


#: {(start, finish): action name} — the transition table, for docs and tests.
TRANSITIONS = _build_table()

# Story event codes → names
cdef enum:
    E_COMPUTE = 0
    E_FREE
    E_FREE_DEFERRED
    E_REMOVE_REPLICA
    E_ACQUIRE
    E_UPDATE
    E_EXEC_SUCCESS
    E_EXEC_FAILURE
    E_RESCHEDULE
    E_SECEDE
    E_GATHER_SUCCESS
    E_MISSING_DEP
    E_BUSY
    E_NETFAIL
    E_GATHER_FAIL
    E_STEAL
    E_WHO_HAS
    E_REMOVE_WORKER
    E_STALE
    E_DISCARD
    E_IMPOSSIBLE

_EVENT_NAMES = (
    "compute-task", "free-keys", "free-deferred", "remove-replica", "acquire-replica",
    "update-data", "execute-success", "execute-failure", "reschedule", "secede",
    "gather-success", "missing-dep", "gather-busy", "gather-network-failure",
    "gather-failure", "steal-request", "who-has-update", "remove-worker",
    "stale-result", "discard-result", "impossible-resources",
)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
class InvalidTransition(TaskcoreError):
    """A (start, finish) pair that is not in the transition table: a bug in
    the machine or an impossible sequence of events.  Carries the story."""

    def __init__(self, key, start, finish, story):
        self.key = key
        self.start = start
        self.finish = finish
        self.story = story
        super().__init__(key, start, finish, story)

    def __reduce__(self):
        return type(self), (self.key, self.start, self.finish, self.story)

    def __str__(self):
        lines = "\n    ".join(map(repr, self.story))
        return f"{self.key!r}: {self.start} -> {self.finish}\n  story:\n    {lines}"


class InvalidTaskState(TaskcoreError):
    """validate=True found a broken invariant.  Carries the story."""

    def __init__(self, key, state, message, story):
        self.key = key
        self.state = state
        self.message = message
        self.story = story
        super().__init__(key, state, message, story)

    def __reduce__(self):
        return type(self), (self.key, self.state, self.message, self.story)

    def __str__(self):
        lines = "\n    ".join(map(repr, self.story))
        return f"{self.key!r} ({self.state}): {self.message}\n  story:\n    {lines}"


# ---------------------------------------------------------------------------
# Per-task / per-peer records
# ---------------------------------------------------------------------------
@cython.freelist(1024)
@cython.no_gc
@cython.final
cdef class TaskState:
    def __repr__(self):
        s = STATES[self._state]
        if self._state == S_CANCELLED:
            s = f"cancelled({STATES[self._previous]})"
        elif self._state == S_RESUMED:
            s = f"resumed({STATES[self._previous]}->{STATES[self._next]})"
        return f"<TaskState {self.id} {self.key!r} {s}>"

    @property
    def state(self):
        return STATES[self._state]

    @property
    def priority(self):
        """The scheduler's priority tuple (rebuilt from the C key)."""
        if not self.has_priority:
            return None
        return (self.p0, self.p1, self.p2, self.p3)[:self.plen]

    @property
    def previous(self):
        return STATES[self._previous] if self._state in (S_CANCELLED, S_RESUMED) else None

    @property
    def next(self):
        return STATES[self._next] if self._state == S_RESUMED else None

    @property
    def dependencies(self):
        """Ids of the inputs (WorkerState.dependency_keys gives their keys)."""
        return [(<TaskState>d).id for d in self.dependencies] if self.dependencies else []

    @property
    def dependents(self):
        return sorted([(<TaskState>d).id for d in self.dependents]) if self.dependents else []

    @property
    def who_has(self):
        return [(<PeerState>p).address for p in self.who_has] if self.who_has else []

    @property
    def coming_from(self):
        return self.coming_from.address if self.coming_from is not None else None

    @property
    def waiting_for_data(self):
        return self.waiting_count

    @property
    def running(self):
        """True while a thread is running this task (executing or seceded)."""
        return self.slot != SLOT_NONE


@cython.no_gc
@cython.final
cdef class PeerState:
    def __repr__(self):
        return (f"<PeerState {self.address!r} holds={len(self.has_what)} "
                f"busy={self.busy} in_transfer={self.transfer is not None}>")

    @property
    def keys(self):
        return {(<TaskState>t).key for t in self.has_what}

    @property
    def in_transfer(self):
        return self.transfer is not None


cdef object _host_of(object address):
    """'tcp://10.0.0.1:8786' → '10.0.0.1'; 'inproc://host/pid/n' → 'host';
    '[::1]:1' → '::1'.  Only used to prefer same-host peers."""
    if address is None:
        return None
    cdef str a = str(address)
    cdef Py_ssize_t i = a.find("://")
    if i >= 0:
        a = a[i + 3:]
    i = a.find("/")
    if i >= 0:
        a = a[:i]
    if a.startswith("["):
        i = a.find("]")
        return a[1:i] if i > 0 else a
    i = a.rfind(":")
    if i > 0:
        return a[:i]
    return a


# ---------------------------------------------------------------------------
# Events (in).  Slotted cdef classes; every one carries stimulus_id.
# ---------------------------------------------------------------------------
@cython.no_gc
cdef class StateMachineEvent:
    """Base of every event.  Subclasses are final; dispatch is by exact type."""
    _fields = ()

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in type(self)._fields)
        return f"{type(self).__name__}({args}, stimulus_id={self.stimulus_id!r})"


@cython.no_gc
@cython.final
cdef class ComputeTask(StateMachineEvent):
    """The scheduler asks this worker to compute a task.

    who_has: iterable of (dep id, dep key, nbytes, [holder addresses]) for
    every dependency (nbytes < 0: unknown).  priority: tuple of at most four
    ints (smaller runs first).  resource_restrictions: {name: amount} or None.
    """
    _fields = ("id", "key", "run_spec", "priority", "who_has", "resource_restrictions",
               "annotations")

    def __init__(self, int64_t id, key, run_spec, priority, stimulus_id, who_has=None,
                 resource_restrictions=None, annotations=None):
        self.id = id
        self.key = key
        self.run_spec = run_spec
        self.priority = priority
        self.stimulus_id = stimulus_id
        self.who_has = who_has
        self.resource_restrictions = resource_restrictions
        self.annotations = annotations


@cython.no_gc
@cython.final
cdef class FreeKeys(StateMachineEvent):
    """The scheduler no longer needs these tasks here (release them)."""
    cdef readonly object ids
    _fields = ("ids",)

    def __init__(self, ids, stimulus_id):
        self.ids = ids
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class RemoveReplicas(StateMachineEvent):
    """Drop these replicas if they are in memory and nothing here needs them."""
    cdef readonly object ids
    _fields = ("ids",)

    def __init__(self, ids, stimulus_id):
        self.ids = ids
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class AcquireReplicas(StateMachineEvent):
    """Fetch copies (retirement / rebalance).  who_has as in ComputeTask."""
    cdef readonly object who_has
    _fields = ("who_has",)

    def __init__(self, who_has, stimulus_id):
        self.who_has = who_has
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class UpdateData(StateMachineEvent):
    """Scatter: the server has put these values in its data store.
    data: iterable of (id, key, nbytes).  report: tell the scheduler (AddKeysMsg)."""
    cdef readonly object data
    cdef readonly bint report
    _fields = ("data", "report")

    def __init__(self, data, stimulus_id, bint report=True):
        self.data = data
        self.stimulus_id = stimulus_id
        self.report = report


@cython.no_gc
@cython.final
cdef class ExecuteSuccess(StateMachineEvent):
    """A thread finished the task; the value is in the server's data store."""
    _fields = ("id", "nbytes", "type_name", "start", "stop")

    def __init__(self, int64_t id, int64_t nbytes, type_name, double start, double stop,
                 stimulus_id):
        self.id = id
        self.nbytes = nbytes
        self.type_name = type_name
        self.start = start
        self.stop = stop
        self.stimulus_id = stimulus_id


@cython.final
cdef class ExecuteFailure(StateMachineEvent):
    """The task raised.  exception/traceback are opaque (serialized by the server)."""
    cdef readonly int64_t id
    cdef readonly object exception
    cdef readonly object traceback
    cdef readonly double start
    cdef readonly double stop
    _fields = ("id", "exception", "traceback", "start", "stop")

    def __init__(self, int64_t id, exception, traceback, double start, double stop,
                 stimulus_id):
        self.id = id
        self.exception = exception
        self.traceback = traceback
        self.start = start
        self.stop = stop
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class RescheduleEvent(StateMachineEvent):
    """The task raised Reschedule: give it back to the scheduler."""
    cdef readonly int64_t id
    _fields = ("id",)

    def __init__(self, int64_t id, stimulus_id):
        self.id = id
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class SecedeEvent(StateMachineEvent):
    """The running task called secede(): it frees its slot but keeps running."""
    cdef readonly int64_t id
    _fields = ("id",)

    def __init__(self, int64_t id, stimulus_id):
        self.id = id
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class GatherDepSuccess(StateMachineEvent):
    """A GatherDep to `worker` came back.  data: {id: nbytes} of what the
    peer sent (may be fewer than asked; the values are in the data store)."""
    cdef readonly object worker
    cdef readonly object data
    _fields = ("worker", "data")

    def __init__(self, worker, data, stimulus_id):
        self.worker = worker
        self.data = data
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class GatherDepBusy(StateMachineEvent):
    """The peer said it is too busy to serve us; nothing was received."""
    cdef readonly object worker
    cdef readonly object ids
    _fields = ("worker", "ids")

    def __init__(self, worker, stimulus_id, ids=None):
        self.worker = worker
        self.stimulus_id = stimulus_id
        self.ids = ids


@cython.no_gc
@cython.final
cdef class GatherDepNetworkFailure(StateMachineEvent):
    """The transfer failed at the network level: assume the peer is gone."""
    cdef readonly object worker
    cdef readonly object ids
    _fields = ("worker", "ids")

    def __init__(self, worker, stimulus_id, ids=None):
        self.worker = worker
        self.stimulus_id = stimulus_id
        self.ids = ids


@cython.final
cdef class GatherDepFailure(StateMachineEvent):
    """The transfer failed otherwise (e.g. deserialization): the keys err."""
    cdef readonly object worker
    cdef readonly object exception
    cdef readonly object traceback
    cdef readonly object ids
    _fields = ("worker", "exception", "traceback", "ids")

    def __init__(self, worker, exception, traceback, stimulus_id, ids=None):
        self.worker = worker
        self.exception = exception
        self.traceback = traceback
        self.stimulus_id = stimulus_id
        self.ids = ids


@cython.no_gc
@cython.final
cdef class StealRequest(StateMachineEvent):
    """The scheduler wants to move the task elsewhere: answer with its state,
    and release it if it has not started (waiting, ready, constrained)."""
    cdef readonly int64_t id
    _fields = ("id",)

    def __init__(self, int64_t id, stimulus_id):
        self.id = id
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class PauseEvent(StateMachineEvent):
    """Memory pressure: start no new executions and no new transfers."""
    def __init__(self, stimulus_id):
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class UnpauseEvent(StateMachineEvent):
    def __init__(self, stimulus_id):
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class RetryBusyWorker(StateMachineEvent):
    """The server's timer after RetryBusyWorkerLater fired: try the peer again."""
    cdef readonly object worker
    _fields = ("worker",)

    def __init__(self, worker, stimulus_id):
        self.worker = worker
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class FindMissing(StateMachineEvent):
    """Periodic: ask the scheduler again where the missing keys are."""
    def __init__(self, stimulus_id):
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class FindMissingResult(StateMachineEvent):
    """The scheduler's answer: {id: [holder addresses]}."""
    cdef readonly object who_has
    _fields = ("who_has",)

    def __init__(self, who_has, stimulus_id):
        self.who_has = who_has
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class RemoveWorker(StateMachineEvent):
    """A peer left the cluster: it holds nothing any more."""
    cdef readonly object worker
    _fields = ("worker",)

    def __init__(self, worker, stimulus_id):
        self.worker = worker
        self.stimulus_id = stimulus_id


# ---------------------------------------------------------------------------
# Instructions (out)
# ---------------------------------------------------------------------------
class _InstructionMatch:
    """Partial match for tests: ``instrs == [Execute.match(id=1), ...]``."""

    def __init__(self, cls, kwargs):
        self.cls = cls
        self.kwargs = kwargs

    def __eq__(self, other):
        if type(other) is not self.cls:
            return False
        return all(getattr(other, k) == v for k, v in self.kwargs.items())

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}.match({args})"


@cython.no_gc
cdef class Instruction:
    """Base of every instruction.  `op` is set on messages to the scheduler."""
    _fields = ()
    op = None

    @classmethod
    def match(cls, **kwargs):
        return _InstructionMatch(cls, kwargs)

    def __eq__(self, other):
        if isinstance(other, _InstructionMatch):
            return other == self
        if type(other) is not type(self):
            return NotImplemented
        if self.stimulus_id != (<Instruction>other).stimulus_id:
            return False
        return all(getattr(self, f) == getattr(other, f) for f in type(self)._fields)

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in type(self)._fields)
        return f"{type(self).__name__}({args}, stimulus_id={self.stimulus_id!r})"

    def to_dict(self):
        """msgpack-able dict for messages to the scheduler ({"op": ..., ...})."""
        d = {f: getattr(self, f) for f in type(self)._fields}
        d["op"] = type(self).op
        d["stimulus_id"] = self.stimulus_id
        return d


@cython.no_gc
@cython.final
cdef class Execute(Instruction):
    """Run the task in a thread (run_spec and key included: no lookup needed)."""
    _fields = ("id", "key", "run_spec")

    def __init__(self, int64_t id, key, run_spec, stimulus_id):
        self.id = id
        self.key = key
        self.run_spec = run_spec
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class GatherDep(Instruction):
    """Fetch these keys from one peer; answer with a GatherDep* event."""
    cdef readonly object worker
    cdef readonly list ids
    cdef readonly list keys
    cdef readonly int64_t total_nbytes
    _fields = ("worker", "ids", "keys", "total_nbytes")

    def __init__(self, worker, list ids, list keys, int64_t total_nbytes, stimulus_id):
        self.worker = worker
        self.ids = ids
        self.keys = keys
        self.total_nbytes = total_nbytes
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class RetryBusyWorkerLater(Instruction):
    """Feed RetryBusyWorker(worker) after a back-off."""
    cdef readonly object worker
    _fields = ("worker",)

    def __init__(self, worker, stimulus_id):
        self.worker = worker
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class DropData(Instruction):
    """Delete `key` from the server's data store (idempotent)."""
    _fields = ("id", "key")

    def __init__(self, int64_t id, key, stimulus_id):
        self.id = id
        self.key = key
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class TaskFinishedMsg(Instruction):
    _fields = ("id", "key", "nbytes", "type_name", "start", "stop")
    op = "task-finished"

    def __init__(self, int64_t id, key, int64_t nbytes, type_name, double start, double stop,
                 stimulus_id):
        self.id = id
        self.key = key
        self.nbytes = nbytes
        self.type_name = type_name
        self.start = start
        self.stop = stop
        self.stimulus_id = stimulus_id


@cython.final
cdef class TaskErredMsg(Instruction):
    cdef readonly int64_t id
    cdef readonly object key
    cdef readonly object exception
    cdef readonly object traceback
    cdef readonly double start
    cdef readonly double stop
    _fields = ("id", "key", "exception", "traceback", "start", "stop")
    op = "task-erred"

    def __init__(self, int64_t id, key, exception, traceback, double start, double stop,
                 stimulus_id):
        self.id = id
        self.key = key
        self.exception = exception
        self.traceback = traceback
        self.start = start
        self.stop = stop
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class ReleaseWorkerDataMsg(Instruction):
    """We dropped our replica."""
    _fields = ("id", "key")
    op = "release-worker-data"

    def __init__(self, int64_t id, key, stimulus_id):
        self.id = id
        self.key = key
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class MissingDataMsg(Instruction):
    """`errant_worker` did not have the key the scheduler said it had."""
    cdef readonly int64_t id
    cdef readonly object key
    cdef readonly object errant_worker
    _fields = ("id", "key", "errant_worker")
    op = "missing-data"

    def __init__(self, int64_t id, key, errant_worker, stimulus_id):
        self.id = id
        self.key = key
        self.errant_worker = errant_worker
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class RequestRefreshWhoHas(Instruction):
    """Ask the scheduler where these keys are (answer: FindMissingResult)."""
    cdef readonly list ids
    _fields = ("ids",)
    op = "request-refresh-who-has"

    def __init__(self, list ids, stimulus_id):
        self.ids = ids
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class StealResponseMsg(Instruction):
    """state: the task's state name before the request, or None if unknown."""
    cdef readonly int64_t id
    cdef readonly object key
    cdef readonly object state
    _fields = ("id", "key", "state")
    op = "steal-response"

    def __init__(self, int64_t id, key, state, stimulus_id):
        self.id = id
        self.key = key
        self.state = state
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class AddKeysMsg(Instruction):
    """We now hold replicas of these (fetched, scattered or computed after a resume)."""
    cdef readonly list ids
    _fields = ("ids",)
    op = "add-keys"

    def __init__(self, list ids, stimulus_id):
        self.ids = ids
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class RescheduleMsg(Instruction):
    cdef readonly int64_t id
    cdef readonly object key
    _fields = ("id", "key")
    op = "reschedule"

    def __init__(self, int64_t id, key, stimulus_id):
        self.id = id
        self.key = key
        self.stimulus_id = stimulus_id


@cython.no_gc
@cython.final
cdef class LongRunningMsg(Instruction):
    cdef readonly int64_t id
    cdef readonly object key
    _fields = ("id", "key")
    op = "long-running"

    def __init__(self, int64_t id, key, stimulus_id):
        self.id = id
        self.key = key
        self.stimulus_id = stimulus_id


# Fast constructors used by the machine (skip argument parsing).
cdef inline Execute _mk_execute(TaskState ts, object stim):
    cdef Execute i = Execute.__new__(Execute)
    i.id = ts.id
    i.key = ts.key
    i.run_spec = ts.run_spec
    i.stimulus_id = stim
    return i


cdef inline TaskFinishedMsg _mk_finished(TaskState ts, object stim):
    cdef TaskFinishedMsg i = TaskFinishedMsg.__new__(TaskFinishedMsg)
    i.id = ts.id
    i.key = ts.key
    i.nbytes = ts.nbytes
    i.type_name = ts.type_name
    i.start = ts.start
    i.stop = ts.stop
    i.stimulus_id = stim
    return i


cdef inline DropData _mk_drop(TaskState ts, object stim):
    cdef DropData i = DropData.__new__(DropData)
    i.id = ts.id
    i.key = ts.key
    i.stimulus_id = stim
    return i


# ---------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------
cdef inline int _prio_cmp(const TCQItem& a, const TCQItem& b) noexcept nogil:
    """Compare scheduler priorities only (not the FIFO tie-break)."""
    if a.p0 != b.p0:
        return -1 if a.p0 < b.p0 else 1
    if a.p1 != b.p1:
        return -1 if a.p1 < b.p1 else 1
    if a.p2 != b.p2:
        return -1 if a.p2 < b.p2 else 1
    if a.p3 != b.p3:
        return -1 if a.p3 < b.p3 else 1
    return 0


cdef inline void _fill_item(TCQItem* it, TaskState ts) noexcept:
    it.p0 = ts.p0
    it.p1 = ts.p1
    it.p2 = ts.p2
    it.p3 = ts.p3
    it.seq = ts.queue_seq
    it.id = ts.id


cdef inline bint _linked_state(int st, int prev) noexcept:
    """States in which a task may hold dependency links (it needs its inputs)."""
    if (st == S_WAITING or st == S_READY or st == S_CONSTRAINED or st == S_EXECUTING
            or st == S_LONG_RUNNING or st == S_RESUMED):
        return True
    if st == S_CANCELLED:
        return prev != S_FLIGHT
    return False


cdef inline bint _in_progress(int st) noexcept:
    return (st == S_EXECUTING or st == S_LONG_RUNNING or st == S_FLIGHT
            or st == S_CANCELLED or st == S_RESUMED)


cdef int _parse_priority(object priority, int64_t* out) except -1:
    """Priority tuple (<= 4 ints) → C key; returns its length.  Raises
    before anything is mutated, so a bad message leaves no trace."""
    cdef tuple t
    cdef Py_ssize_t n, i
    if priority is None:
        priority = (0,)
    t = priority if type(priority) is tuple else tuple(priority)
    n = len(t)
    if n > 4:
        raise ValueError(f"priority {priority!r}: at most 4 elements are supported")
    for i in range(4):
        out[i] = t[i] if i < n else INT64_MIN
    return <int>n


cdef class WorkerState:
    """The worker's task-state machine.

    WorkerState(nthreads=1, resources=None, address=None, *, validate=False,
                max_transfer_bytes=50_000_000, max_concurrent_transfers=4,
                max_in_flight_bytes=256_000_000, default_nbytes=1024,
                story_size=100_000, max_transitions=10_000_000)

    resources: {name: amount} this worker offers (e.g. {"GPU": 2}).
    address: this worker's address; it is filtered out of holder lists and
    its host is used to prefer same-host peers.
    """

    def __init__(self, int nthreads=1, resources=None, address=None, *,
                 bint validate=False,
                 int64_t max_transfer_bytes=50_000_000,
                 int max_concurrent_transfers=4,
                 int64_t max_in_flight_bytes=256_000_000,
                 int64_t default_nbytes=1024,
                 Py_ssize_t story_size=100_000,
                 int64_t max_transitions=10_000_000):
        cdef int i
        if nthreads < 1:
            raise ValueError(f"nthreads must be >= 1, got {nthreads}")
        if max_concurrent_transfers < 1:
            raise ValueError("max_concurrent_transfers must be >= 1")
        if max_transfer_bytes < 1 or max_in_flight_bytes < 1:
            raise ValueError("byte limits must be positive")
        if story_size < 0:
            raise ValueError("story_size must be >= 0")
        self.nthreads = nthreads
        self.address = address
        self.host = _host_of(address)
        self.validate = validate
        self.max_transfer_bytes = max_transfer_bytes
        self.max_concurrent_transfers = max_concurrent_transfers
        self.max_in_flight_bytes = max_in_flight_bytes
        self.default_nbytes = default_nbytes
        self.max_transitions = max_transitions
        self._peers = {}
        self._fetch_peers = {}
        self._missing = _uset()
        self._res_index = {}
        self._res_names = []
        for i in range(N_STATES):
            self._counts[i] = 0
        if resources:
            for name, amount in resources.items():
                if name in self._res_index:
                    continue
                self._res_index[name] = len(self._res_names)
                self._res_names.append(name)
                self._res_total.push_back(float(amount))
                self._res_avail.push_back(float(amount))
        self._add_keys = []
        self._refresh = []
        self._stim = None
        self.story_size = story_size
        self._story.resize(story_size)      # zeroed: NULL key/stim
        self._story_pos = 0
        self._story_len = 0

    def __dealloc__(self):
        # TaskState is not GC-tracked (no_gc: 100,000s of them would make every
        # full collection crawl).  Cycles through it (dependencies <->
        # dependents, who_has <-> PeerState.has_what, opaque exceptions) are
        # broken explicitly when a task is forgotten, and here for the rest.
        cdef unordered_map[int64_t, PyObject*].iterator it = self._tasks.begin()
        cdef TaskState ts
        while it != self._tasks.end():
            ts = <TaskState>deref(it).second
            ts.dependencies = None
            ts.dependents = None
            ts.who_has = None
            ts.coming_from = None
            ts.exception = None
            ts.traceback = None
            ts.run_spec = None
            ts = None
            Py_XDECREF(deref(it).second)
            inc(it)
        self._tasks.clear()
        cdef PeerState p
        if self._peers is not None:
            for p in self._peers.values():
                p.has_what = None
                p.transfer = None
        cdef size_t k
        for k in range(self._story.size()):
            Py_XDECREF(self._story[k].key)
            Py_XDECREF(self._story[k].stim)
        self._story.clear()

    def __repr__(self):
        return (f"<WorkerState {self.address!r} tasks={self._tasks.size()} "
                f"executing={self.executing_count}/{self.nthreads} "
                f"ready={self.ready_count} memory={self._counts[S_MEMORY]}>")

    # ------------------------------------------------------------------
    # Entry point
    # ------------------------------------------------------------------
    def handle_stimulus(self, *events):
        """Feed events, get the list of instructions to execute, in order."""
        return self.handle_events(list(events))

    cpdef list handle_events(self, list events):
        """`handle_stimulus` with the events in a list (a C call from worker_dispatch)."""
        cdef list instrs = []
        cdef object ev
        self._instructions = instrs
        self._call_transitions = 0
        self._recs.clear()
        self._rec_head = 0
        for ev in events:
            self._stim = (<StateMachineEvent?>ev).stimulus_id
            self._dispatch(ev)
            if self._recs.size():
                self._process_recs()
        self._ensure_communicating()
        self._ensure_computing()
        if self._recs.size():
            self._process_recs()
        if self._add_keys:
            instrs.append(AddKeysMsg(self._add_keys, self._stim))
            self._add_keys = []
        if self._refresh:
            instrs.append(RequestRefreshWhoHas(list(dict.fromkeys(self._refresh)), self._stim))
            self._refresh = []
        self._instructions = None
        if self.validate:
            self.validate_state()
        return instrs

    cdef int _dispatch(self, object ev) except -1:
        cdef type t = type(ev)
        if t is ComputeTask:
            return self._handle_compute(ev)
        if t is ExecuteSuccess:
            return self._handle_execute_success(ev)
        if t is GatherDepSuccess:
            return self._handle_gather_success(ev)
        if t is FreeKeys:
            return self._handle_free_keys(ev)
        if t is ExecuteFailure:
            return self._handle_execute_failure(ev)
        if t is AcquireReplicas:
            return self._handle_acquire_replicas(ev)
        if t is UpdateData:
            return self._handle_update_data(ev)
        if t is RemoveReplicas:
            return self._handle_remove_replicas(ev)
        if t is StealRequest:
            return self._handle_steal(ev)
        if t is SecedeEvent:
            return self._handle_secede(ev)
        if t is RescheduleEvent:
            return self._handle_reschedule(ev)
        if t is GatherDepBusy:
            return self._handle_gather_busy(ev)
        if t is GatherDepNetworkFailure:
            return self._handle_gather_network_failure(ev)
        if t is GatherDepFailure:
            return self._handle_gather_failure(ev)
        if t is RetryBusyWorker:
            return self._handle_retry_busy(ev)
        if t is FindMissing:
            return self._handle_find_missing(ev)
        if t is FindMissingResult:
            return self._handle_find_missing_result(ev)
        if t is RemoveWorker:
            return self._handle_remove_worker(ev)
        if t is PauseEvent:
            self.paused = True
            return 0
        if t is UnpauseEvent:
            self.paused = False
            return 0
        raise TypeError(f"unknown event type {t.__name__}")

    # ------------------------------------------------------------------
    # Task map, story, recommendations
    # ------------------------------------------------------------------
    cdef TaskState _get(self, int64_t tid):
        cdef unordered_map[int64_t, PyObject*].iterator it = self._tasks.find(tid)
        if it == self._tasks.end():
            return None
        return <TaskState>deref(it).second

    cdef TaskState _ensure_task(self, int64_t tid, object key):
        cdef TaskState ts = self._get(tid)
        if ts is not None:
            return ts
        ts = TaskState.__new__(TaskState)
        ts.id = tid
        ts.key = key
        ts.nbytes = -1
        Py_XINCREF(<PyObject*>ts)
        self._tasks[tid] = <PyObject*>ts
        self._counts[S_RELEASED] += 1
        return ts

    cdef int _record(self, TaskState ts, uint8_t kind, uint8_t a, uint8_t b) except -1:
        cdef size_t i = self._story_pos
        cdef StoryRec* r = &self._story[i]
        cdef PyObject* old_key = r.key
        cdef PyObject* old_stim = r.stim
        r.id = ts.id
        r.kind = kind
        r.a = a
        r.b = b
        r.key = <PyObject*>ts.key
        r.stim = <PyObject*>self._stim
        Py_XINCREF(r.key)
        Py_XINCREF(r.stim)
        Py_XDECREF(old_key)
        Py_XDECREF(old_stim)
        i += 1
        if i == self.story_size:
            i = 0
        self._story_pos = i
        if self._story_len < self.story_size:
            self._story_len += 1
        return 0

    cdef int _log_event(self, TaskState ts, int code) except -1:
        if self.story_size:
            self._record(ts, STORY_EVENT, <uint8_t>code, 0)
        return 0

    cdef int _set_state(self, TaskState ts, int new) except -1:
        cdef int old = ts._state
        self._counts[old] -= 1
        self._counts[new] += 1
        ts._state = <uint8_t>new
        if self.story_size:
            self._record(ts, STORY_TRANSITION, <uint8_t>old, <uint8_t>new)
        return 0

    cdef int _emit(self, object instr) except -1:
        self._instructions.append(instr)
        return 0

    cdef int _push_rec(self, TaskState ts, int target) except -1:
        cdef Rec r
        r.id = ts.id
        r.target = target
        self._recs.push_back(r)
        return 0

    cdef int _process_recs(self) except -1:
        cdef Rec r
        cdef TaskState ts
        while self._rec_head < self._recs.size():
            r = self._recs[self._rec_head]
            self._rec_head += 1
            ts = self._get(r.id)
            if ts is not None:
                self._transition(ts, r.target, False)
        self._recs.clear()
        self._rec_head = 0
        return 0

    # ------------------------------------------------------------------
    # The table-driven transition
    # ------------------------------------------------------------------
    cdef int _transition(self, TaskState ts, int finish, bint keep) except -1:
        """Move `ts` towards `finish` through the table.  keep=True: a
        release must not forget the task (the caller is about to reuse it)."""
        cdef int start = ts._state
        cdef int action = _TABLE[start][finish]
        if action == T_NOOP:
            return 0
        if action == T_ILLEGAL:
            raise InvalidTransition(ts.key, STATES[start], STATES[finish], self.story(ts.id))
        self.transition_count += 1
        self._call_transitions += 1
        if self._call_transitions > self.max_transitions:
            raise InvalidTransition(ts.key, STATES[start], STATES[finish],
                                    self.story(ts.id) + [("transition limit exceeded",)])
        if action == T_RELEASED_WAITING:
            self._t_released_waiting(ts)
        elif action == T_WAITING_READY:
            self._t_waiting_ready(ts)
        elif action == T_READY_EXECUTING:
            self._t_ready_executing(ts)
        elif action == T_TO_MEMORY:
            self._t_to_memory(ts)
        elif action == T_FETCH:
            self._t_fetch(ts)
        elif action == T_FETCH_FLIGHT:
            self._t_fetch_flight(ts)
        elif action == T_RELEASE:
            self._t_release(ts, not keep)
        elif action == T_TO_ERROR:
            self._t_to_error(ts)
        elif action == T_TO_MISSING:
            self._t_to_missing(ts)
        elif action == T_VIA_RELEASED:
            self._t_release(ts, False)
            self._t_fetch(ts)
        elif action == T_FLIGHT_FETCH:
            if ts.done:
                ts.done = False
                self._t_fetch(ts)
        elif action == T_MISSING_FETCH:
            if ts.who_has:
                self._missing.discard(ts)
                self._t_fetch(ts)
        elif action == T_FORGET:
            self._maybe_forget(ts)
        elif action == T_CANCEL:
            if ts.done:
                self._t_release(ts, not keep)
            else:
                ts._previous = <uint8_t>start
                ts._next = 0
                self._set_state(ts, S_CANCELLED)
        elif action == T_SECEDE:
            self._t_secede(ts)
        elif action == T_RESCHEDULE:
            self._instructions.append(RescheduleMsg(ts.id, ts.key, self._stim))
            self._log_event(ts, E_RESCHEDULE)
            self._t_release(ts, not keep)
        elif action == T_RESUME_FETCH:
            ts._previous = <uint8_t>start
            ts._next = S_FETCH
            self._set_state(ts, S_RESUMED)
        elif action == T_RESUME_WAITING:
            ts._previous = S_FLIGHT
            ts._next = S_WAITING
            self._set_state(ts, S_RESUMED)
        elif action == T_CANCELLED_RELEASED:
            if ts.done:
                self._t_release(ts, not keep)
        elif action == T_CANCELLED_WAITING:
            if ts._previous == S_FLIGHT:
                ts._next = S_WAITING
                self._set_state(ts, S_RESUMED)
            else:
                self._t_back_to_running(ts)
        elif action == T_CANCELLED_FETCH:
            if ts._previous == S_FLIGHT:
                ts._previous = 0
                self._set_state(ts, S_FLIGHT)
            else:
                ts._next = S_FETCH
                self._set_state(ts, S_RESUMED)
        elif action == T_RESUMED_RELEASED:
            ts._next = 0
            self._set_state(ts, S_CANCELLED)
            if ts._previous == S_FLIGHT and ts.dependencies is not None:
                # it was going to be computed here after the transfer; not any more
                self._unlink_dependencies(ts)
        elif action == T_RESUMED_WAITING:
            if not ts.done:
                if ts._previous != S_FLIGHT:
                    self._t_back_to_running(ts)
                # previous == flight: already heading for waiting
            else:
                # the transfer came back without the data: compute it here
                ts.done = False
                ts._previous = 0
                ts._next = 0
                self._set_state(ts, S_RELEASED)
                self._t_released_waiting(ts)
        elif action == T_RESUMED_FETCH:
            if not ts.done:
                if ts._previous == S_FLIGHT:
                    # fetching wins again: forget the plan to compute it here
                    ts._previous = 0
                    ts._next = 0
                    if ts.dependencies is not None:
                        self._unlink_dependencies(ts)
                    self._set_state(ts, S_FLIGHT)
            else:
                # the thread failed: fetch the replica the scheduler told us about
                ts.done = False
                ts._previous = 0
                ts._next = 0
                ts.exception = None
                ts.traceback = None
                self._set_state(ts, S_RELEASED)
                if ts.dependencies is not None:
                    self._unlink_dependencies(ts)
                self._t_fetch(ts)
        else:  # pragma: no cover
            raise RuntimeError(f"unhandled transition action {action}")
        if self.validate:
            self._validate_task(ts, False)
        return 0

    # ------------------------------------------------------------------
    # Transition bodies
    # ------------------------------------------------------------------
    cdef int _t_released_waiting(self, TaskState ts) except -1:
        cdef TaskState dep
        cdef int count = 0
        cdef int ds
        if ts.impossible:
            self._log_event(ts, E_IMPOSSIBLE)
            return self._t_to_error(ts)
        if ts.dependencies is not None:
            for dep in ts.dependencies:
                if dep.dependents is None:
                    dep.dependents = _uset()
                dep.dependents.add(ts)
                ds = dep._state
                if ds != S_MEMORY:
                    count += 1
                    if ds != S_FETCH and ds != S_FLIGHT:
                        self._push_rec(dep, S_FETCH)
        ts.waiting_count = count
        self._set_state(ts, S_WAITING)
        if count == 0:
            # chained directly (bounded depth): saves a queue round trip
            self._transition(ts, S_READY, False)
        return 0

    cdef int _t_waiting_ready(self, TaskState ts) except -1:
        cdef TCQItem it
        self._seq += 1
        ts.queue_seq = self._seq
        _fill_item(&it, ts)
        if ts.res_needs.size():
            self._set_state(ts, S_CONSTRAINED)
            tcq_push(&self._constrained, it)
        else:
            self._set_state(ts, S_READY)
            tcq_push(&self._ready, it)
        return 0

    cdef int _t_ready_executing(self, TaskState ts) except -1:
        cdef size_t k
        cdef size_t n = ts.res_needs.size()
        if n:
            for k in range(n):
                self._res_avail[ts.res_needs[k].idx] -= ts.res_needs[k].amount
            ts.res_held = True
        ts.slot = SLOT_EXECUTING
        self.executing_count += 1
        self._set_state(ts, S_EXECUTING)
        self._instructions.append(_mk_execute(ts, self._stim))
        return 0

    cdef int _t_fetch(self, TaskState ts) except -1:
        if ts.who_has is None:
            return self._t_to_missing(ts)
        if not ts.has_priority:
            self._set_priority(ts, (0,))
        self._seq += 1
        ts.queue_seq = self._seq
        self._set_state(ts, S_FETCH)
        self._push_fetch_entries(ts, None)
        return 0

    cdef int _t_to_missing(self, TaskState ts) except -1:
        self._set_state(ts, S_MISSING)
        self._missing.add(ts)
        self._refresh.append(ts.id)
        return 0

    cdef int _t_to_memory(self, TaskState ts) except -1:
        cdef int st = ts._state
        cdef TaskState d
        if ts.done:
            if st == S_EXECUTING or st == S_LONG_RUNNING:
                self._instructions.append(_mk_finished(ts, self._stim))
            elif st == S_FLIGHT:
                self._add_keys.append(ts.id)
            elif st == S_RESUMED:
                if ts._previous == S_FLIGHT:
                    # the scheduler asked us to compute it; we have it
                    self._instructions.append(_mk_finished(ts, self._stim))
                else:
                    # the scheduler thinks it is elsewhere; we hold a replica too
                    self._add_keys.append(ts.id)
            # cancelled + scatter_pending: the scatter already reported it
        elif st == S_MISSING:
            self._missing.discard(ts)
        ts.done = False
        ts._previous = 0
        ts._next = 0
        ts.scatter_pending = False
        ts.replica_wanted = False
        ts.waiting_count = 0
        ts.exception = None
        ts.traceback = None
        if ts.nbytes < 0:
            ts.nbytes = self.default_nbytes
        self.memory_bytes += ts.nbytes
        self._set_state(ts, S_MEMORY)
        if ts.dependencies is not None:
            self._unlink_dependencies(ts)
        if ts.dependents:
            for d in ts.dependents:
                if d._state == S_WAITING:
                    d.waiting_count -= 1
                    if d.waiting_count == 0:
                        self._push_rec(d, S_READY)
        return 0

    cdef int _t_to_error(self, TaskState ts) except -1:
        cdef TaskErredMsg m = TaskErredMsg.__new__(TaskErredMsg)
        m.id = ts.id
        m.key = ts.key
        m.exception = ts.exception
        m.traceback = ts.traceback
        m.start = ts.start
        m.stop = ts.stop
        m.stimulus_id = self._stim
        self._instructions.append(m)
        ts.done = False
        ts._previous = 0
        ts._next = 0
        ts.scatter_pending = False
        ts.waiting_count = 0
        self._set_state(ts, S_ERROR)
        if ts.dependencies is not None:
            self._unlink_dependencies(ts)
        return 0

    cdef int _t_release(self, TaskState ts, bint forget) except -1:
        cdef int st = ts._state
        if st == S_MEMORY:
            self.memory_bytes -= ts.nbytes
            self._instructions.append(_mk_drop(ts, self._stim))
            if not ts.free_requested:               # our own decision: tell the scheduler
                self._instructions.append(ReleaseWorkerDataMsg(ts.id, ts.key, self._stim))
        elif st == S_MISSING:
            self._missing.discard(ts)
        ts.waiting_count = 0
        ts.done = False
        ts._previous = 0
        ts._next = 0
        ts.exception = None
        ts.traceback = None
        ts.free_requested = False
        ts.replica_wanted = False
        ts.scatter_pending = False
        self._set_state(ts, S_RELEASED)
        if ts.dependencies is not None:
            self._unlink_dependencies(ts)
        if forget:
            self._maybe_forget(ts)
        return 0

    cdef int _t_fetch_flight(self, TaskState ts) except -1:
        cdef PeerState peer = self._gather_peer
        ts.coming_from = peer
        peer.transfer.append(ts)
        self._set_state(ts, S_FLIGHT)
        return 0

    cdef int _t_secede(self, TaskState ts) except -1:
        if ts.slot == SLOT_EXECUTING:
            ts.slot = SLOT_SECEDED
            self.executing_count -= 1
            self.long_running_count += 1
        if ts._state == S_EXECUTING:
            self._set_state(ts, S_LONG_RUNNING)
            self._instructions.append(LongRunningMsg(ts.id, ts.key, self._stim))
        elif ts._previous == S_EXECUTING:
            # cancelled/resumed: the scheduler hears about it if it resumes
            ts._previous = S_LONG_RUNNING
            self._log_event(ts, E_SECEDE)
        return 0

    cdef int _t_back_to_running(self, TaskState ts) except -1:
        """cancelled/resumed(previous=executing|long-running) → previous: the
        scheduler wants the result of the thread that is still running."""
        cdef int prev = ts._previous
        ts._previous = 0
        ts._next = 0
        self._set_state(ts, prev)
        if prev == S_LONG_RUNNING:
            self._instructions.append(LongRunningMsg(ts.id, ts.key, self._stim))
        return 0

    cdef int _unlink_dependencies(self, TaskState ts) except -1:
        """Drop ts's links to its inputs; release inputs nobody needs any more."""
        cdef list deps = ts.dependencies
        cdef TaskState dep
        cdef int st
        ts.dependencies = None
        for dep in deps:
            if dep.dependents is not None:
                dep.dependents.discard(ts)
                if dep.dependents:
                    continue
                dep.dependents = None     # no empty, long-lived, GC-tracked sets
            st = dep._state
            if st == S_RELEASED:
                self._push_rec(dep, S_FORGOTTEN)
            elif dep.free_requested:
                self._push_rec(dep, S_RELEASED)
            elif not dep.replica_wanted and (
                    st == S_FETCH or st == S_FLIGHT or st == S_MISSING or st == S_ERROR
                    or (st == S_RESUMED and dep._next == S_FETCH)):
                # a pure dependency fetch nobody needs any more
                self._push_rec(dep, S_RELEASED)
        return 0

    cdef int _maybe_forget(self, TaskState ts) except -1:
        cdef PeerState p
        cdef unordered_map[int64_t, PyObject*].iterator it
        cdef PyObject* ptr
        if (ts._state != S_RELEASED or ts.dependents or ts.slot != SLOT_NONE
                or ts.coming_from is not None):
            return 0
        if ts.who_has is not None:
            for p in ts.who_has:
                p.has_what.discard(ts)
                self._maybe_drop_peer(p)
            ts.who_has = None
        ts.dependents = None
        self._set_state(ts, S_FORGOTTEN)
        it = self._tasks.find(ts.id)
        if it != self._tasks.end() and deref(it).second == <PyObject*>ts:
            ptr = deref(it).second
            self._tasks.erase(it)
            Py_XDECREF(ptr)   # the caller still holds `ts`
        return 0

    # ------------------------------------------------------------------
    # Priorities, resources, peers
    # ------------------------------------------------------------------
    cdef int _set_priority(self, TaskState ts, object priority) except -1:
        cdef int64_t p[4]
        cdef int n = _parse_priority(priority, p)
        ts.p0 = p[0]
        ts.p1 = p[1]
        ts.p2 = p[2]
        ts.p3 = p[3]
        ts.plen = <uint8_t>n
        ts.has_priority = True
        return 0

    cdef int _set_resources(self, TaskState ts, object restrictions) except -1:
        cdef ResNeed need
        cdef double amount
        ts.res_needs.clear()
        ts.impossible = False
        ts.resource_restrictions = restrictions
        if not restrictions:
            return 0
        for name, value in restrictions.items():
            amount = value
            if amount <= 0:
                continue
            idx = self._res_index.get(name)
            if idx is None or amount > self._res_total[<int>idx]:
                have = 0 if idx is None else self._res_total[<int>idx]
                ts.impossible = True
                ts.exception = ValueError(
                    f"task {ts.key!r} needs resource {name!r}={value} but worker "
                    f"{self.address!r} has {have} in total")
                ts.traceback = None
                continue
            need.idx = <int>idx
            need.amount = amount
            ts.res_needs.push_back(need)
        return 0

    cdef bint _resources_ok(self, TaskState ts):
        cdef size_t k
        for k in range(ts.res_needs.size()):
            if self._res_avail[ts.res_needs[k].idx] < ts.res_needs[k].amount:
                return False
        return True

    cdef int _release_resources(self, TaskState ts) except -1:
        cdef size_t k
        for k in range(ts.res_needs.size()):
            self._res_avail[ts.res_needs[k].idx] += ts.res_needs[k].amount
        ts.res_held = False
        return 0

    cdef PeerState _get_peer(self, object address):
        cdef PeerState p = self._peers.get(address)
        if p is None:
            p = PeerState.__new__(PeerState)
            p.address = address
            p.host = _host_of(address)
            p.local = self.host is not None and p.host == self.host
            p.index = self._peer_counter
            self._peer_counter += 1
            p.has_what = _uset()
            self._peers[address] = p
        return p

    cdef int _set_who_has(self, TaskState ts, object holders) except -1:
        """Replace ts's holders with the scheduler's latest view."""
        cdef list new = _ulist()
        cdef list old = ts.who_has
        cdef PeerState p
        if holders:
            for addr in holders:
                if addr == self.address:
                    continue
                p = self._get_peer(addr)
                if p not in new:
                    new.append(p)
        ts.who_has = new if new else None
        if old is not None:
            for p in old:
                if p not in new:
                    p.has_what.discard(ts)
                    self._maybe_drop_peer(p)
        for p in new:
            if old is None or p not in old:
                p.has_what.add(ts)
                if ts._state == S_FETCH:
                    self._push_fetch_entries(ts, p)
        if ts._state == S_FETCH and ts.who_has is None:
            self._push_rec(ts, S_MISSING)
        elif ts._state == S_MISSING and ts.who_has is not None:
            self._push_rec(ts, S_FETCH)
        return 0

    cdef int _remove_holder(self, TaskState ts, PeerState peer) except -1:
        if ts.who_has is not None and peer in ts.who_has:
            ts.who_has.remove(peer)
            if not ts.who_has:
                ts.who_has = None
        peer.has_what.discard(ts)
        return 0

    cdef int _maybe_drop_peer(self, PeerState peer) except -1:
        if peer.has_what or peer.transfer is not None or peer.busy:
            return 0
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
        if peer.pending:
            self._fetch_peers.pop(peer, None)
            peer.pending = False
        peer.heap.clear()
        return 0

    cdef int _drop_peer_holdings(self, PeerState peer) except -1:
        """The peer is gone (network failure, RemoveWorker): it holds nothing."""
        cdef TaskState ts
        for ts in list(peer.has_what):
            if ts.who_has is not None:
                ts.who_has.remove(peer)
                if not ts.who_has:
                    ts.who_has = None
                    if ts._state == S_FETCH:
                        self._push_rec(ts, S_MISSING)
        peer.has_what.clear()
        peer.heap.clear()
        if peer.pending:
            self._fetch_peers.pop(peer, None)
            peer.pending = False
        return 0

    cdef int _push_fetch_entries(self, TaskState ts, PeerState only) except -1:
        cdef TCQItem it
        cdef PeerState p
        _fill_item(&it, ts)
        if only is not None:
            tcq_push(&only.heap, it)
            if not only.pending:
                only.pending = True
                self._fetch_peers[only] = None
            if only.heap.size() > 64 and only.heap.size() > <size_t>(2 * self._counts[S_FETCH] + 64):
                self._compact_heap(only)
            return 0
        for p in ts.who_has:
            tcq_push(&p.heap, it)
            if not p.pending:
                p.pending = True
                self._fetch_peers[p] = None
            if p.heap.size() > 64 and p.heap.size() > <size_t>(2 * self._counts[S_FETCH] + 64):
                self._compact_heap(p)
        return 0

    cdef int _compact_heap(self, PeerState peer) except -1:
        """Drop stale entries so a peer's heap stays O(fetch tasks)."""
        cdef vector[TCQItem] keep
        cdef size_t k
        for k in range(peer.heap.size()):
            if self._live_fetch(peer, &peer.heap[k]) is not None:
                keep.push_back(peer.heap[k])
        peer.heap.swap(keep)
        tcq_heapify(&peer.heap)
        return 0

    cdef TaskState _live_fetch(self, PeerState peer, TCQItem* item):
        cdef TaskState ts = self._get(item.id)
        if (ts is None or ts._state != S_FETCH or ts.queue_seq != item.seq
                or ts.who_has is None or peer not in ts.who_has):
            return None
        return ts

    # ------------------------------------------------------------------
    # Scheduling: execution slots and transfers
    # ------------------------------------------------------------------
    cdef TaskState _peek_queue(self, vector[TCQItem]* heap, int state):
        cdef TaskState ts
        while heap.size():
            ts = self._get(deref(heap)[0].id)
            if ts is not None and ts._state == state and ts.queue_seq == deref(heap)[0].seq:
                return ts
            tcq_pop(heap)
        return None

    cdef int _ensure_computing(self) except -1:
        cdef TaskState r, c, ts
        if self.paused:
            return 0
        while self.executing_count < self.nthreads:
            r = self._peek_queue(&self._ready, S_READY)
            c = None
            if self._constrained.size():
                c = self._peek_queue(&self._constrained, S_CONSTRAINED)
            if (c is not None and self._resources_ok(c)
                    and (r is None or tcq_before(self._constrained[0], self._ready[0]))):
                tcq_pop(&self._constrained)
                ts = c
            elif r is not None:
                tcq_pop(&self._ready)
                ts = r
            else:
                break
            self._transition(ts, S_EXECUTING, False)
        return 0

    cdef int _ensure_communicating(self) except -1:
        cdef PeerState peer
        if self.paused:
            return 0
        while (self._counts[S_FETCH] > 0
               and self.transfers_in_flight < self.max_concurrent_transfers
               and self.in_flight_bytes < self.max_in_flight_bytes):
            peer = self._select_peer()
            if peer is None:
                break
            if not self._start_transfer(peer):
                break
        return 0

    cdef PeerState _select_peer(self):
        """Best peer to fetch from now (see the theory of operation)."""
        cdef PeerState p, best = None
        cdef int c
        cdef size_t nb, np
        cdef uint64_t m, r
        for p in list(self._fetch_peers):
            if p.busy or p.transfer is not None:
                continue
            while p.heap.size() and self._live_fetch(p, &p.heap[0]) is None:
                tcq_pop(&p.heap)
            if not p.heap.size():
                del self._fetch_peers[p]
                p.pending = False
                continue
            if best is None:
                best = p
                continue
            c = _prio_cmp(p.heap[0], best.heap[0])
            if c != 0:
                if c < 0:
                    best = p
                continue
            if p.local != best.local:
                if p.local:
                    best = p
                continue
            if p.busy_count != best.busy_count:
                if p.busy_count < best.busy_count:
                    best = p
                continue
            np = p.heap.size()
            nb = best.heap.size()
            if np != nb:
                if np > nb:
                    best = p
                continue
            # round robin over the ring of peer indices, starting at _rr
            m = <uint64_t>self._peer_counter
            r = self._rr % m
            if (<uint64_t>p.index + m - r) % m < (<uint64_t>best.index + m - r) % m:
                best = p
        return best

    cdef bint _start_transfer(self, PeerState peer) except -1:
        cdef list ids = []
        cdef list keys = []
        cdef int64_t total = 0
        cdef int64_t nb
        cdef TaskState ts
        cdef GatherDep g
        peer.transfer = _ulist()
        self._gather_peer = peer
        while peer.heap.size():
            ts = self._live_fetch(peer, &peer.heap[0])
            if ts is None:
                tcq_pop(&peer.heap)
                continue
            nb = ts.nbytes if ts.nbytes >= 0 else self.default_nbytes
            if total == 0:
                # the first key of a message ignores the per-message limit; it
                # ignores the total only when nothing at all is in flight
                if self.in_flight_bytes > 0 and self.in_flight_bytes + nb > self.max_in_flight_bytes:
                    break
            elif (total + nb > self.max_transfer_bytes
                  or self.in_flight_bytes + total + nb > self.max_in_flight_bytes):
                break
            tcq_pop(&peer.heap)
            self._transition(ts, S_FLIGHT, False)
            ids.append(ts.id)
            keys.append(ts.key)
            total += nb
        self._gather_peer = None
        if not ids:
            peer.transfer = None
            return False
        peer.transfer_nbytes = total
        self.in_flight_bytes += total
        self.transfers_in_flight += 1
        self._rr += 1
        g = GatherDep.__new__(GatherDep)
        g.worker = peer.address
        g.ids = ids
        g.keys = keys
        g.total_nbytes = total
        g.stimulus_id = self._stim
        self._instructions.append(g)
        return True

    cdef list _transfer_done(self, object worker):
        """Close the outstanding transfer from `worker`; mark its tasks done."""
        cdef PeerState peer = self._peers.get(worker)
        cdef list tasks
        cdef TaskState ts
        cdef int st
        if peer is None or peer.transfer is None:
            return None
        tasks = peer.transfer
        peer.transfer = None
        self.in_flight_bytes -= peer.transfer_nbytes
        peer.transfer_nbytes = 0
        self.transfers_in_flight -= 1
        for ts in tasks:
            ts.coming_from = None
            st = ts._state
            if st == S_FLIGHT or ((st == S_CANCELLED or st == S_RESUMED)
                                  and ts._previous == S_FLIGHT):
                ts.done = True
        return tasks

    cdef TaskState _execute_done(self, int64_t tid):
        """A thread came back: free its slot and resources; mark it done."""
        cdef TaskState ts = self._get(tid)
        if ts is None or ts.slot == SLOT_NONE:
            return None
        if ts.slot == SLOT_EXECUTING:
            self.executing_count -= 1
        else:
            self.long_running_count -= 1
        ts.slot = SLOT_NONE
        if ts.res_held:
            self._release_resources(ts)
        ts.done = True
        return ts

    # ------------------------------------------------------------------
    # Event handlers
    # ------------------------------------------------------------------
    cdef int _handle_compute(self, object ev) except -1:
        cdef ComputeTask e = <ComputeTask>ev
        cdef int64_t prio[4]
        cdef int plen = _parse_priority(e.priority, prio)    # may raise: before any change
        cdef TaskState ts = self._ensure_task(e.id, e.key)
        cdef TaskState dep
        cdef list deps
        cdef int st
        cdef int64_t dep_id
        if self.story_size:
            self._record(ts, STORY_EVENT, E_COMPUTE, 0)
        ts.free_requested = False
        st = ts._state
        if (st == S_WAITING or st == S_READY or st == S_CONSTRAINED
                or st == S_EXECUTING or st == S_LONG_RUNNING):
            return 0      # already on it
        if st == S_MEMORY:
            self._instructions.append(_mk_finished(ts, self._stim))
            return 0
        if st == S_FETCH or st == S_MISSING or st == S_ERROR:
            # compute instead of fetching / retry after an error
            self._transition(ts, S_RELEASED, True)
            st = S_RELEASED
        ts.run_spec = e.run_spec
        ts.p0 = prio[0]
        ts.p1 = prio[1]
        ts.p2 = prio[2]
        ts.p3 = prio[3]
        ts.plen = <uint8_t>plen
        ts.has_priority = True
        ts.annotations = e.annotations
        ts.exception = None
        ts.traceback = None
        if ts.slot != SLOT_NONE or st == S_RESUMED:
            # cancelled/resumed(executing): its thread still runs with the
            # inputs and resources it started with; resumed(flight): already
            # linked by the ComputeTask that resumed it.  Either way, keep them.
            self._transition(ts, S_WAITING, False)
            return 0
        self._set_resources(ts, e.resource_restrictions)
        if e.who_has:
            deps = _ulist()
            for item in e.who_has:
                dep_id = item[0]
                if dep_id == ts.id:
                    continue
                dep = self._ensure_task(dep_id, item[1])
                if dep.dependents is not None and ts in dep.dependents:
                    continue      # listed twice (ts has no other links yet)
                if not dep.has_priority or dep._state == S_RELEASED:
                    dep.p0 = ts.p0
                    dep.p1 = ts.p1
                    dep.p2 = ts.p2
                    dep.p3 = ts.p3
                    dep.plen = ts.plen
                    dep.has_priority = True
                if dep._state != S_MEMORY:
                    nbytes = item[2]
                    if nbytes is not None and nbytes >= 0:
                        dep.nbytes = nbytes
                    self._set_who_has(dep, item[3])
                dep.free_requested = False
                # link now, so the dependency cannot be forgotten meanwhile
                if dep.dependents is None:
                    dep.dependents = _uset()
                dep.dependents.add(ts)
                deps.append(dep)
            ts.dependencies = deps
        self._transition(ts, S_WAITING, False)
        return 0

    cdef int _handle_free_keys(self, object ev) except -1:
        cdef TaskState ts
        for tid in (<FreeKeys>ev).ids:
            ts = self._get(tid)
            if ts is None:
                continue
            self._log_event(ts, E_FREE)
            ts.replica_wanted = False
            ts.scatter_pending = False
            # The scheduler asked: it already dropped this replica, so releasing
            # it sends no ReleaseWorkerDataMsg back (see _t_release).
            ts.free_requested = True
            if ts.dependents:
                # something here still needs it: release when the last one lets go
                self._log_event(ts, E_FREE_DEFERRED)
            else:
                self._push_rec(ts, S_RELEASED)
        return 0

    cdef int _handle_remove_replicas(self, object ev) except -1:
        cdef TaskState ts
        for tid in (<RemoveReplicas>ev).ids:
            ts = self._get(tid)
            if ts is None or ts._state != S_MEMORY or ts.dependents:
                continue
            self._log_event(ts, E_REMOVE_REPLICA)
            self._push_rec(ts, S_RELEASED)
        return 0

    cdef int _handle_acquire_replicas(self, object ev) except -1:
        cdef TaskState ts
        for item in (<AcquireReplicas>ev).who_has:
            ts = self._ensure_task(item[0], item[1])
            self._log_event(ts, E_ACQUIRE)
            ts.free_requested = False
            if ts._state == S_MEMORY:
                continue
            nbytes = item[2]
            if nbytes is not None and nbytes >= 0:
                ts.nbytes = nbytes
            if not ts.has_priority:
                # after dependencies of normal-priority work, before low priority
                self._set_priority(ts, (1,))
            ts.replica_wanted = True
            self._set_who_has(ts, item[3])
            self._push_rec(ts, S_FETCH)
        return 0

    cdef int _handle_update_data(self, object ev) except -1:
        cdef UpdateData e = <UpdateData>ev
        cdef TaskState ts
        cdef int64_t nb
        cdef int st
        for item in e.data:
            ts = self._ensure_task(item[0], item[1])
            self._log_event(ts, E_UPDATE)
            nb = item[2] if item[2] is not None and item[2] >= 0 else self.default_nbytes
            ts.free_requested = False
            st = ts._state
            if _in_progress(st):
                # a thread or transfer is outstanding: become memory when it returns
                ts.scatter_pending = True
                ts.nbytes = nb
            elif st == S_MEMORY:
                self.memory_bytes += nb - ts.nbytes
                ts.nbytes = nb
            else:
                ts.nbytes = nb
                self._push_rec(ts, S_MEMORY)
            if e.report:
                self._add_keys.append(ts.id)
        return 0

    cdef int _handle_execute_success(self, object ev) except -1:
        cdef ExecuteSuccess e = <ExecuteSuccess>ev
        cdef TaskState ts = self._execute_done(e.id)
        if ts is None:
            return 0      # unknown or not running: a duplicate; nothing to undo
        ts.nbytes = e.nbytes
        ts.type_name = e.type_name
        ts.start = e.start
        ts.stop = e.stop
        # (no "execute-success" record: the transition that follows names the
        # stimulus; failures and discards are recorded)
        if ts._state == S_CANCELLED and not ts.scatter_pending:
            self._log_event(ts, E_DISCARD)
            self._instructions.append(_mk_drop(ts, self._stim))
            self._transition(ts, S_RELEASED, False)
        else:
            self._transition(ts, S_MEMORY, False)
        return 0

    cdef int _handle_execute_failure(self, object ev) except -1:
        cdef ExecuteFailure e = <ExecuteFailure>ev
        cdef TaskState ts = self._execute_done(e.id)
        cdef int st
        if ts is None:
            return 0
        ts.start = e.start
        ts.stop = e.stop
        self._log_event(ts, E_EXEC_FAILURE)
        st = ts._state
        if ts.scatter_pending:
            self._push_rec(ts, S_MEMORY)
        elif st == S_EXECUTING or st == S_LONG_RUNNING:
            ts.exception = e.exception
            ts.traceback = e.traceback
            self._push_rec(ts, S_ERROR)
        elif st == S_CANCELLED:
            self._push_rec(ts, S_RELEASED)
        else:   # resumed(→fetch): get the replica instead
            self._push_rec(ts, S_FETCH)
        return 0

    cdef int _handle_reschedule(self, object ev) except -1:
        cdef TaskState ts = self._execute_done((<RescheduleEvent>ev).id)
        cdef int st
        if ts is None:
            return 0
        st = ts._state
        if ts.scatter_pending:
            self._push_rec(ts, S_MEMORY)
        elif st == S_EXECUTING or st == S_LONG_RUNNING:
            self._push_rec(ts, S_RESCHEDULED)
        elif st == S_CANCELLED:
            self._push_rec(ts, S_RELEASED)
        else:
            self._push_rec(ts, S_FETCH)
        return 0

    cdef int _handle_secede(self, object ev) except -1:
        cdef TaskState ts = self._get((<SecedeEvent>ev).id)
        if ts is None or ts.slot != SLOT_EXECUTING:
            return 0
        self._push_rec(ts, S_LONG_RUNNING)
        return 0

    cdef int _handle_gather_success(self, object ev) except -1:
        cdef GatherDepSuccess e = <GatherDepSuccess>ev
        cdef list tasks = self._transfer_done(e.worker)
        cdef PeerState peer
        cdef TaskState ts
        cdef object data = e.data
        cdef object nb
        cdef bint received
        cdef int st
        if tasks is None:
            return 0
        peer = self._peers[e.worker]
        peer.busy_count = 0
        for ts in tasks:
            nb = data.get(ts.id) if data else None
            received = nb is not None or (data is not None and ts.id in data)
            st = ts._state
            if not ts.done:
                # unreachable by construction (tasks only leave flight when done)
                if received and st != S_MEMORY:
                    self._instructions.append(_mk_drop(ts, self._stim))
                continue
            if received and nb is not None and nb >= 0:
                ts.nbytes = nb
            if not received:
                self._log_event(ts, E_MISSING_DEP)
            if not received and st != S_CANCELLED:
                # the peer did not have it: forget that holder, tell the scheduler
                self._remove_holder(ts, peer)
                self._instructions.append(MissingDataMsg(ts.id, ts.key, e.worker, self._stim))
            if ts.scatter_pending:
                self._push_rec(ts, S_MEMORY)
            elif st == S_FLIGHT:
                self._push_rec(ts, S_MEMORY if received else S_FETCH)
            elif st == S_CANCELLED:
                if received:
                    self._log_event(ts, E_DISCARD)
                    self._instructions.append(_mk_drop(ts, self._stim))
                self._push_rec(ts, S_RELEASED)
            else:   # resumed(flight→waiting)
                self._push_rec(ts, S_MEMORY if received else S_WAITING)
        self._maybe_drop_peer(peer)
        return 0

    cdef int _flight_failed(self, list tasks, int code) except -1:
        """Common tail of busy / network failure: nothing was received."""
        cdef TaskState ts
        cdef int st
        for ts in tasks:
            if not ts.done:
                continue
            self._log_event(ts, code)
            st = ts._state
            if ts.scatter_pending:
                self._push_rec(ts, S_MEMORY)
            elif st == S_FLIGHT:
                self._push_rec(ts, S_FETCH)
            elif st == S_CANCELLED:
                self._push_rec(ts, S_RELEASED)
            else:   # resumed(flight→waiting): compute it here
                self._push_rec(ts, S_WAITING)
        return 0

    cdef int _handle_gather_busy(self, object ev) except -1:
        cdef GatherDepBusy e = <GatherDepBusy>ev
        cdef list tasks = self._transfer_done(e.worker)
        cdef PeerState peer, p
        cdef TaskState ts
        cdef bint all_busy
        if tasks is None:
            return 0
        peer = self._peers[e.worker]
        peer.busy = True
        peer.busy_count += 1
        self._instructions.append(RetryBusyWorkerLater(e.worker, self._stim))
        self._flight_failed(tasks, E_BUSY)
        for ts in tasks:
            if ts._state == S_FLIGHT and ts.who_has is not None:
                all_busy = True
                for p in ts.who_has:
                    if not p.busy:
                        all_busy = False
                        break
                if all_busy:
                    # every known holder is busy: maybe the scheduler knows more
                    self._refresh.append(ts.id)
        return 0

    cdef int _handle_gather_network_failure(self, object ev) except -1:
        cdef GatherDepNetworkFailure e = <GatherDepNetworkFailure>ev
        cdef list tasks = self._transfer_done(e.worker)
        cdef PeerState peer = self._peers.get(e.worker)
        if peer is None:
            return 0
        # assume the peer is gone: it holds nothing, for any task
        self._drop_peer_holdings(peer)
        if tasks is not None:
            self._flight_failed(tasks, E_NETFAIL)
        self._maybe_drop_peer(peer)
        return 0

    cdef int _handle_gather_failure(self, object ev) except -1:
        cdef GatherDepFailure e = <GatherDepFailure>ev
        cdef list tasks = self._transfer_done(e.worker)
        cdef TaskState ts
        cdef int st
        if tasks is None:
            return 0
        for ts in tasks:
            if not ts.done:
                continue
            self._log_event(ts, E_GATHER_FAIL)
            st = ts._state
            if ts.scatter_pending:
                self._push_rec(ts, S_MEMORY)
            elif st == S_FLIGHT:
                ts.exception = e.exception
                ts.traceback = e.traceback
                ts.start = 0.0
                ts.stop = 0.0
                self._push_rec(ts, S_ERROR)
            elif st == S_CANCELLED:
                self._push_rec(ts, S_RELEASED)
            else:
                self._push_rec(ts, S_WAITING)
        self._maybe_drop_peer(self._peers[e.worker])
        return 0

    cdef int _handle_steal(self, object ev) except -1:
        cdef StealRequest e = <StealRequest>ev
        cdef TaskState ts = self._get(e.id)
        cdef int st
        if ts is None:
            self._instructions.append(StealResponseMsg(e.id, None, None, self._stim))
            return 0
        st = ts._state
        self._log_event(ts, E_STEAL)
        self._instructions.append(StealResponseMsg(e.id, ts.key, STATES[st], self._stim))
        if st == S_WAITING or st == S_READY or st == S_CONSTRAINED:
            self._push_rec(ts, S_RELEASED)
        return 0

    cdef int _handle_find_missing(self, object ev) except -1:
        if self._missing:
            self._refresh.extend(sorted([(<TaskState>t).id for t in self._missing]))
        return 0

    cdef int _handle_find_missing_result(self, object ev) except -1:
        cdef TaskState ts
        for tid, holders in (<FindMissingResult>ev).who_has.items():
            ts = self._get(tid)
            if ts is None:
                continue
            self._log_event(ts, E_WHO_HAS)
            self._set_who_has(ts, holders)     # recommends fetch / missing
        return 0

    cdef int _handle_remove_worker(self, object ev) except -1:
        cdef PeerState peer = self._peers.get((<RemoveWorker>ev).worker)
        if peer is None:
            return 0
        self._drop_peer_holdings(peer)
        self._maybe_drop_peer(peer)
        return 0

    cdef int _handle_retry_busy(self, object ev) except -1:
        cdef PeerState peer = self._peers.get((<RetryBusyWorker>ev).worker)
        if peer is None:
            return 0
        peer.busy = False
        self._maybe_drop_peer(peer)
        return 0

    # ------------------------------------------------------------------
    # Introspection (cold path)
    # ------------------------------------------------------------------
    @property
    def tasks(self):
        """{id: TaskState} (a new dict)."""
        cdef dict out = {}
        cdef unordered_map[int64_t, PyObject*].iterator it = self._tasks.begin()
        while it != self._tasks.end():
            out[deref(it).first] = <object>deref(it).second
            inc(it)
        return out

    def get_task(self, int64_t id):
        """The TaskState for `id`, or None."""
        return self._get(id)

    def state_of(self, int64_t id):
        """State name of task `id`, or None if unknown (forgotten)."""
        cdef TaskState ts = self._get(id)
        return None if ts is None else STATES[ts._state]

    def __len__(self):
        return self._tasks.size()

    def __contains__(self, id):
        return self._get(id) is not None

    @property
    def task_counts(self):
        """{state name: number of tasks}, non-zero states only."""
        cdef int i
        return {STATES[i]: self._counts[i] for i in range(S_FORGOTTEN) if self._counts[i]}

    @property
    def ready_count(self):
        """Tasks waiting for a slot (ready + constrained)."""
        return self._counts[S_READY] + self._counts[S_CONSTRAINED]

    @property
    def fetch_count(self):
        return self._counts[S_FETCH]

    @property
    def in_memory_count(self):
        return self._counts[S_MEMORY]

    @property
    def memory_ids(self):
        cdef TaskState ts
        return sorted([ts.id for ts in self.tasks.values() if ts._state == S_MEMORY])

    @property
    def missing_ids(self):
        return sorted([(<TaskState>t).id for t in self._missing])

    @property
    def has_what(self):
        """{peer address: {keys we believe it holds}}."""
        cdef PeerState p
        return {p.address: {(<TaskState>t).key for t in p.has_what}
                for p in self._peers.values() if p.has_what}

    @property
    def peers(self):
        return dict(self._peers)

    @property
    def in_flight_workers(self):
        """{peer address: [ids of the outstanding GatherDep]}."""
        cdef PeerState p
        return {p.address: [(<TaskState>t).id for t in p.transfer]
                for p in self._peers.values() if p.transfer is not None}

    @property
    def busy_workers(self):
        cdef PeerState p
        return {p.address for p in self._peers.values() if p.busy}

    @property
    def total_resources(self):
        cdef int i
        return {self._res_names[i]: self._res_total[i] for i in range(len(self._res_names))}

    @property
    def available_resources(self):
        cdef int i
        return {self._res_names[i]: self._res_avail[i] for i in range(len(self._res_names))}

    def dependency_keys(self, int64_t id):
        """Keys of the inputs of task `id` (what Execute needs from the store)."""
        cdef TaskState ts = self._get(id)
        if ts is None or ts.dependencies is None:
            return []
        return [(<TaskState>d).key for d in ts.dependencies]

    def heartbeat(self):
        """Counters for the worker's heartbeat to the scheduler."""
        return {
            "executing": self.executing_count,
            "long_running": self.long_running_count,
            "ready": self.ready_count,
            "waiting": self._counts[S_WAITING],
            "in_memory": self._counts[S_MEMORY],
            "memory_bytes": self.memory_bytes,
            "fetch": self._counts[S_FETCH],
            "in_flight": self._counts[S_FLIGHT],
            "in_flight_bytes": self.in_flight_bytes,
            "transfers": self.transfers_in_flight,
            "missing": self._counts[S_MISSING],
            "paused": self.paused,
        }

    def story(self, *keys_or_ids):
        """Records involving these tasks (keys, int ids or TaskStates), oldest
        first: (key, start, finish, stimulus_id) for transitions and
        (key, event, stimulus_id) for events."""
        cdef set ids = set()
        cdef set keys = set()
        cdef size_t n, i, start
        cdef StoryRec r
        cdef list out = []
        for x in keys_or_ids:
            if isinstance(x, TaskState):
                ids.add((<TaskState>x).id)
            elif isinstance(x, int) and not isinstance(x, bool):
                ids.add(x)
            else:
                keys.add(x)
        if self.story_size == 0:
            return out
        start = (self._story_pos + self.story_size - self._story_len) % self.story_size
        for n in range(self._story_len):
            i = (start + n) % self.story_size
            r = self._story[i]
            key = <object>r.key
            stim = <object>r.stim if r.stim != NULL else None
            if r.id in ids or (keys and key in keys):
                if r.kind == STORY_TRANSITION:
                    out.append((key, STATES[r.a], STATES[r.b], stim))
                else:
                    out.append((key, _EVENT_NAMES[r.a], stim))
        return out

    # ------------------------------------------------------------------
    # Validation (validate=True, tests)
    # ------------------------------------------------------------------
    cdef int _fail(self, TaskState ts, str msg) except -1:
        raise InvalidTaskState(ts.key, STATES[ts._state], msg, self.story(ts.id))

    cdef int _validate_task(self, TaskState ts, bint settled) except -1:
        """Invariants of one task.  settled=False right after a transition
        (other tasks of the same call may still be moving)."""
        cdef int st = ts._state
        cdef int prev = ts._previous
        cdef int cnt
        cdef TaskState d
        cdef PeerState p
        if st == S_FORGOTTEN:
            if self._get(ts.id) is ts:
                self._fail(ts, "forgotten but still in the task map")
            return 0
        if self._get(ts.id) is not ts:
            self._fail(ts, "not in the task map")
        if ts.dependencies is not None:
            if not _linked_state(st, prev) and not (st == S_RELEASED and not settled):
                self._fail(ts, "dependency links in a state that needs no inputs")
            for d in ts.dependencies:
                if d.dependents is None or ts not in d.dependents:
                    self._fail(ts, f"not a dependent of its dependency {d.key!r}")
                if d._state == S_FORGOTTEN:
                    self._fail(ts, f"dependency {d.key!r} was forgotten")
        if ts.dependents:
            for d in ts.dependents:
                if d.dependencies is None or ts not in d.dependencies:
                    self._fail(ts, f"dependent {d.key!r} does not list it")
        if ts.who_has is not None:
            if not ts.who_has:
                self._fail(ts, "empty who_has list (must be None)")
            for p in ts.who_has:
                if ts not in p.has_what:
                    self._fail(ts, f"holder {p.address!r} does not list it")
                if self._peers.get(p.address) is not p:
                    self._fail(ts, f"holder {p.address!r} is not a known peer")
                if p.address == self.address:
                    self._fail(ts, "this worker listed as a holder")
        if (ts in self._missing) != (st == S_MISSING):
            self._fail(ts, "missing-set membership disagrees with state")
        if not _in_progress(st):
            if ts.slot != SLOT_NONE:
                self._fail(ts, "a thread runs it, but it is not executing")
            if ts.coming_from is not None:
                self._fail(ts, "a transfer carries it, but it is not in flight")
            if ts.scatter_pending:
                self._fail(ts, "scatter_pending outside an in-progress state")
        if ts.res_held and ts.slot == SLOT_NONE:
            self._fail(ts, "holds resources without a running thread")
        if settled:
            if ts.done:
                self._fail(ts, "done flag left set")
            if st == S_RELEASED and not ts.dependents:
                self._fail(ts, "released without dependents but not forgotten")
        if st == S_WAITING:
            cnt = 0
            if ts.dependencies is not None:
                for d in ts.dependencies:
                    if d._state != S_MEMORY:
                        cnt += 1
            if cnt != ts.waiting_count:
                self._fail(ts, f"waiting_count {ts.waiting_count} != {cnt} inputs not in memory")
            if settled and cnt == 0:
                self._fail(ts, "waiting with all inputs in memory")
        elif st == S_READY or st == S_CONSTRAINED:
            if ts.waiting_count:
                self._fail(ts, "ready with waiting_count")
            if ts.dependencies is not None:
                for d in ts.dependencies:
                    if d._state != S_MEMORY:
                        self._fail(ts, f"ready but input {d.key!r} is {STATES[d._state]}")
            if (st == S_CONSTRAINED) != (ts.res_needs.size() > 0):
                self._fail(ts, "constrained iff it has resource needs")
        elif st == S_EXECUTING:
            if ts.slot != SLOT_EXECUTING:
                self._fail(ts, "executing without a slot")
        elif st == S_LONG_RUNNING:
            if ts.slot != SLOT_SECEDED:
                self._fail(ts, "long-running but not seceded")
        elif st == S_MEMORY:
            if ts.nbytes < 0:
                self._fail(ts, "memory with unknown nbytes")
        elif st == S_FETCH:
            if ts.who_has is None:
                self._fail(ts, "fetch without holders")
        elif st == S_FLIGHT:
            if not ts.done and (ts.coming_from is None or ts.coming_from.transfer is None
                                or ts not in ts.coming_from.transfer):
                self._fail(ts, "flight without an outstanding transfer")
        elif st == S_MISSING:
            if ts.who_has is not None:
                self._fail(ts, "missing but has holders")
        elif st == S_CANCELLED or st == S_RESUMED:
            if st == S_CANCELLED and ts._next != 0:
                self._fail(ts, "cancelled with a next state")
            if prev == S_FLIGHT:
                if st == S_RESUMED and ts._next != S_WAITING:
                    self._fail(ts, "resumed(flight) must head for waiting")
                if not ts.done and (ts.coming_from is None or ts.coming_from.transfer is None
                                    or ts not in ts.coming_from.transfer):
                    self._fail(ts, "cancelled/resumed(flight) without a transfer")
                if ts.slot != SLOT_NONE:
                    self._fail(ts, "cancelled/resumed(flight) with a thread")
            elif prev == S_EXECUTING or prev == S_LONG_RUNNING:
                if st == S_RESUMED and ts._next != S_FETCH:
                    self._fail(ts, "resumed(executing) must head for fetch")
                if not ts.done and ts.slot != (SLOT_EXECUTING if prev == S_EXECUTING
                                               else SLOT_SECEDED):
                    self._fail(ts, "cancelled/resumed(executing) slot mismatch")
            else:
                self._fail(ts, f"bad previous state {STATES[prev]}")
        if ts.dependents and settled:
            for d in ts.dependents:
                if not _linked_state(d._state, d._previous):
                    self._fail(ts, f"dependent {d.key!r} in {STATES[d._state]} keeps a link")
        return 0

    def debug_transition(self, int64_t id, finish, stimulus_id="debug"):
        """Apply one transition by hand (tests, debugging) and return the
        instructions.  An illegal pair raises InvalidTransition."""
        cdef TaskState ts = self._get(id)
        cdef list instrs = []
        if ts is None:
            raise KeyError(id)
        self._instructions = instrs
        self._stim = stimulus_id
        self._recs.clear()
        self._rec_head = 0
        self._transition(ts, _STATE_CODE[finish], False)
        self._process_recs()
        self._instructions = None
        return instrs

    def validate_state(self):
        """Check every invariant of the machine; raise InvalidTaskState or
        AssertionError on the first broken one."""
        cdef int64_t counts[N_STATES]
        cdef int i
        cdef int64_t mem = 0
        cdef int nexec = 0, nlr = 0, ntransfers = 0
        cdef int64_t tbytes = 0
        cdef TaskState ts, t
        cdef PeerState p
        cdef size_t k
        cdef list used = [0.0] * len(self._res_names)
        cdef dict tasks = self.tasks
        for i in range(N_STATES):
            counts[i] = 0
        for ts in tasks.values():
            self._validate_task(ts, True)
            counts[ts._state] += 1
            if ts._state == S_MEMORY:
                mem += ts.nbytes
            if ts.slot == SLOT_EXECUTING:
                nexec += 1
            elif ts.slot == SLOT_SECEDED:
                nlr += 1
            if ts.res_held:
                for k in range(ts.res_needs.size()):
                    used[ts.res_needs[k].idx] += ts.res_needs[k].amount
            elif ts.slot != SLOT_NONE and ts.res_needs.size() and not ts.impossible:
                self._fail(ts, "running without its resources")
        for i in range(S_FORGOTTEN):
            assert counts[i] == self._counts[i], (
                f"count of {STATES[i]}: {self._counts[i]} recorded, {counts[i]} actual")
        assert mem == self.memory_bytes, f"memory_bytes {self.memory_bytes} != {mem}"
        assert nexec == self.executing_count, f"executing_count {self.executing_count} != {nexec}"
        assert nlr == self.long_running_count, (
            f"long_running_count {self.long_running_count} != {nlr}")
        assert self.executing_count <= self.nthreads, "more threads than slots"
        for i in range(len(self._res_names)):
            assert abs(self._res_avail[i] - (self._res_total[i] - used[i])) < 1e-9, (
                f"resource {self._res_names[i]!r}: available {self._res_avail[i]}, "
                f"total {self._res_total[i]}, used {used[i]}")
            assert self._res_avail[i] >= -1e-9, "resource over-committed"
        for addr, p in self._peers.items():
            assert p.address == addr
            if p.transfer is not None:
                ntransfers += 1
                tbytes += p.transfer_nbytes
                for t in p.transfer:
                    assert t.coming_from is p, f"{t!r} in transfer from {addr} but coming_from differs"
            for t in p.has_what:
                assert tasks.get(t.id) is t, f"{addr} holds unknown {t!r}"
                assert t.who_has is not None and p in t.who_has
            assert p.has_what or p.transfer is not None or p.busy, f"idle peer {addr} kept"
            assert p.pending == (p in self._fetch_peers)
        for p in self._fetch_peers:
            assert self._peers.get(p.address) is p, "fetch peer not in peers"
        assert ntransfers == self.transfers_in_flight, "transfer count"
        assert ntransfers <= self.max_concurrent_transfers, "too many transfers"
        assert tbytes == self.in_flight_bytes, f"in_flight_bytes {self.in_flight_bytes} != {tbytes}"
        for t in self._missing:
            assert t._state == S_MISSING and tasks.get(t.id) is t
        # queues: every ready / constrained / fetch task has a live entry
        live_ready = set()
        for k in range(self._ready.size()):
            t = tasks.get(self._ready[k].id)
            if t is not None and t._state == S_READY and t.queue_seq == self._ready[k].seq:
                live_ready.add(t.id)
        for k in range(self._constrained.size()):
            t = tasks.get(self._constrained[k].id)
            if t is not None and t._state == S_CONSTRAINED and t.queue_seq == self._constrained[k].seq:
                live_ready.add(t.id)
        for ts in tasks.values():
            if ts._state == S_READY or ts._state == S_CONSTRAINED:
                assert ts.id in live_ready, f"{ts!r} not queued"
            elif ts._state == S_FETCH:
                for p in ts.who_has:
                    assert p.pending, f"{ts!r}: holder {p.address} not scanned for fetches"
                    for k in range(p.heap.size()):
                        if self._live_fetch(p, &p.heap[k]) is ts:
                            break
                    else:
                        raise AssertionError(f"{ts!r} not queued at holder {p.address}")
        # progress: nothing runnable is left idle
        if not self.paused and self.executing_count < self.nthreads:
            assert self._counts[S_READY] == 0, "free slot while tasks are ready"
            c = self._peek_queue(&self._constrained, S_CONSTRAINED)
            assert c is None or not self._resources_ok(c), (
                "free slot and resources while a constrained task waits")
        if (not self.paused and self._counts[S_FETCH] > 0
                and self.transfers_in_flight < self.max_concurrent_transfers
                and self.in_flight_bytes == 0):
            for ts in tasks.values():
                if ts._state == S_FETCH:
                    for p in ts.who_has:
                        assert p.busy or p.transfer is not None, (
                            f"{ts!r} could be fetched from {p.address} but is not")
