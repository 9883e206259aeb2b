# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The scheduler's task-state machine: events in, instructions out.

Theory of operation
===================

``SchedulerState`` is pure.  It does no I/O, reads no clock and draws no
random numbers: time arrives inside events (``now``), and every decision is a
deterministic function of the events seen so far.  The server shell
(scheduler.py) turns messages into *stimuli*, calls
``handle_stimulus(*stimuli)`` (compiled callers: ``handle(stimulus)``, the
same code path), and turns the returned *instructions* into messages.
Because nothing else touches the state, every path, failure paths included,
is testable by feeding events and matching instructions.

Vocabulary
----------
task      one node of a graph, a ``TaskState``.  Keys (str or tuples) are
          hashed exactly once, when a graph arrives; inside, and on the wire
          to workers, a task is its integer ``id`` (never reused, so a late
          report about a forgotten task can never hit a new one).
needed    a task is needed while a client wants it (``who_wants``) or while
          a dependent that has not finished needs its data (``n_waiters``).
active    the states in which a task holds its dependencies: waiting,
          queued, no-worker, processing.  ``n_waiters`` of a task counts its
          active dependents; entering/leaving an active state adjusts it.
ready     all dependencies in memory.

States (``TaskStateCode``)::

    released ──► waiting ──► processing ──► memory ──► released ──► forgotten
                    │  ▲          ▲  │                    ▲
                    ▼  │          │  ▼                    │
                  queued / no-worker           erred ─────┘ (retry)

* released   known but not scheduled; stays known while it has dependents
             (so it can be recomputed if a dependent's data is lost).
* waiting    needed; ``n_waiting_on`` dependencies are not in memory yet.
* queued     ready, but held back: a *root* task (no dependencies) waits for
             a worker slot, or a resource-restricted task waits until some
             valid worker has the resources free.  Two queues: the root queue
             (unrestricted roots, any worker will do) and the restricted
             queue (workers= / resources).
* no-worker  ready, but no connected worker satisfies its restrictions.
* processing sent to exactly one worker, ``processing_on``.
* memory     one or more replicas, ``who_has``.
* erred      failed; ``exception_blame`` names the task that raised, whose
             exception and traceback all erred dependents share.
* forgotten  removed; terminal.  A task is forgotten exactly when no client
             wants it and it has no live dependents.

Transitions are data
--------------------
``_TABLE[start][finish]`` holds a C function pointer per legal pair.  Pairs
marked in ``_VIA_RELEASED`` go through released (e.g. processing → waiting
after a lost dependency is processing → released → waiting); if the first
step already recommends a next state for the task, that recommendation wins
(it knows better, e.g. "nobody needs this any more: forget it").  Any other
pair raises ``InvalidTransition`` carrying the task's recent story.

Recommendations are the only way transitions cause other transitions.  A
transition function never calls another transition; it *recommends*
(``_rec(ts, finish)``).  Pending recommendations live on the task itself
(``_rec_target``, last one wins) plus a LIFO stack of tasks, drained
iteratively by ``_drain`` -- no recursion, so a 1,000,000-task chain is fine.
The drain applies two guards, because a recommendation can be stale by the
time it is popped: never release a needed task that still has its data, and
never forget a task that is wanted or has dependents.

Recommendation targets are waiting, processing, memory, released, erred and
forgotten.  Queued and no-worker are *outcomes*: "→ processing" asks the
placement code, which answers "this worker", "no slot/resources: queued" or
"no valid worker: no-worker".  The story records the outcome.

Placement (``_decide``)
-----------------------
* Restricted tasks (``workers=``, resources): valid workers are those whose
  address or name is listed (any worker if none is and
  ``allow_other_workers``) and whose *total* resources cover the task's
  needs.  None valid: no-worker, until a suitable worker joins.  Resources
  are also *reserved* while a task is processing, so a worker with GPU=2 is
  never sent more than two GPU=1 tasks at once; a task whose valid workers
  are all full is queued (constrained queue) until one frees up.
* Root tasks with queueing on (finite ``worker_saturation``): a root task
  goes only to a worker with fewer than
  ``slots = max(1, ceil(nthreads * worker_saturation))`` processing tasks;
  the rest stay queued in priority order and are released as slots free
  (``_fill_slots`` at the end of each stimulus).  This keeps workers from
  being flooded and memory bounded.  Restricted root tasks obey the slots
  too.  Tasks with dependencies are never held back (dask does the same):
  they free memory by consuming their inputs.
* Everything else: candidates are the workers holding dependencies (all
  running workers if none does); the winner minimises
  ``bytes_to_move / bandwidth + occupancy / nthreads`` (data locality, then
  occupancy), ties broken by processing count per thread, then worker id.
  Occupancy is the sum of estimated durations: per key-prefix averages
  learned from ``TaskFinished.duration`` (``unknown_task_duration`` until
  measured).

Stealing (``BalanceTick``)
--------------------------
Thieves are running workers with fewer processing tasks than threads;
victims have more tasks than threads.  The victim's lowest-priority
stealable tasks (unrestricted, no request in flight) are requested
(``StealRequest``) if moving their inputs to the thief costs less than
``steal_ratio`` times their estimated run time.  ``StealResponse`` with the
victim's state "ready"/"waiting"/"constrained"/"released"/None moves the task
(the victim already dropped it); "executing", "memory" etc. leave it.

Failure
-------
* Worker death: replicas on it are gone; tasks left without replicas go
  memory → released and, if still needed, are recomputed (released → waiting
  → ...); clients holding them get ``KeyLost``.  Tasks processing on it are
  rescheduled; unless the removal was ``safe``, each counts a *suspicion*, and
  a task with more than ``allowed_failures`` suspicions errs with
  ``KilledWorker``.
* ``TaskErred``: with retries left the task is rescheduled, else it errs and
  all its active dependents err with the same exception and blame.
* Unknown dependency keys in a graph: the task errs with
  ``MissingDependencyError`` (permanently: a retry reports it again).
* Scattered data (no task to recompute) that is lost errs its dependents
  with ``FutureLostError``.

Outputs and ordering
--------------------
Instructions are returned in emission order.  ``FreeKeys`` for one worker are
batched within a stimulus, but flushed before any other instruction to the
same worker, so per-worker order is always preserved (a worker never sees
"compute X" before an older "free X").

Validation
----------
With ``validate=True`` each transition checks the invariants of the task and
each stimulus ends with ``validate_state()`` (whole-state check).  The
invariants are written next to the attributes in scheduler_state.pxd.

Performance notes (measured; see benchmarks/test_bench_scheduler_state.py)
------------------------------------------------------------------------
The hot events are ``task_finished`` and the graph update.  A 100,000-task
tree reduction costs about 7,700 instructions per task in this module (graph
update included; callgrind), 2-3 us per task on this VM, about 0.3x a plain
dict-based scheduler doing the same bookkeeping.

* Records are ``@cython.final`` cdef classes with C-typed fields.  Counts
  replace per-task sets (``n_waiters``, ``n_waiting_on``).  Dependencies and
  dependents are plain lists iterated with unchecked casts; a task without
  any shares one empty list.  The first replica lives in a field
  (``holder``), only extra replicas allocate a list.  A worker's processing
  tasks form an intrusive linked list (no dict operation per assignment).
* The cyclic GC does not track TaskState, its lists, the instructions or the
  transition log: with 100,000 live tasks, GC passes cost more than the state
  machine itself (2.8 -> 5-8 us per task).  The cycles are broken explicitly
  (on forget, and in ``__dealloc__``).
* Ordered sets are dicts (insertion order keeps everything deterministic).
  The root queue is a binary heap over a C++ vector with lazy deletion (no
  allocation per task); the restricted queue, scanned in order, is a
  ``std::set``; both are keyed by C integers.  Idle workers and pending
  recommendations are C++ vectors; the transition log is a ring of C arrays
  plus two preallocated lists.
* A ready task is placed in the same step that makes it waiting (no extra
  recommendation); roots go through the queue so they leave in priority
  order.
"""

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.object cimport PyObject
from cython.operator cimport dereference as deref, preincrement as inc
from libc.math cimport ceil, isinf
from libc.stdint cimport int64_t
from libc.string cimport memcmp
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec
from libcpp.algorithm cimport make_heap, pop_heap, push_heap
from libcpp.functional cimport greater
from libcpp.set cimport set as cpp_set
from libcpp.utility cimport pair
from libcpp.vector cimport vector

from taskcore.errors import FutureLostError, KilledWorker, TaskcoreError

__all__ = [
    "SchedulerState", "TaskState", "WorkerState", "ClientState", "PrefixState",
    "InvalidTransition", "MissingDependencyError", "STATES",
    "Stimulus", "UpdateGraph", "TaskFinished", "TasksFinished", "TaskErred", "AddWorker",
    "RemoveWorker", "WorkerHeartbeat", "ClientWantsKeys", "ClientReleasesKeys",
    "ClientRemoved", "Cancel", "Retry", "BalanceTick", "StealResponse", "TaskLongRunning",
    "MissingData", "AddKeys", "UpdateData", "ReleaseWorkerData", "RetireWorkers",
    "Instruction", "ComputeTask", "FreeKeys", "StealRequest", "AcquireReplicas",
    "KeyInMemory", "TaskErredReport", "KeyLost", "TaskCancelled", "TaskRetried",
    "KeyForgotten", "WorkersRetiring",
]

#: State names, indexed by TaskStateCode.
STATES = ("released", "waiting", "queued", "no-worker", "processing", "memory",
          "erred", "forgotten")
cdef tuple _NAMES = STATES
_STATE_CODES = {name: i for i, name in enumerate(STATES)}

#: The victim's states in which a requested steal goes ahead (the victim
#: drops the task when it receives the request in one of these states).
STEALABLE_WORKER_STATES = frozenset(
    {"ready", "waiting", "constrained", "released", "fetch", None})
cdef frozenset _MOVABLE = STEALABLE_WORKER_STATES

cdef str FIRE_AND_FORGET = "fire-and-forget"
cdef tuple _EMPTY = ()

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void *op)
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    PyObject* PyDict_SetDefault(object d, object key, object default) except NULL


cdef inline list _new_list():
    """A list the cyclic GC does not track (see TaskState in the .pxd)."""
    cdef list lst = []
    PyObject_GC_UnTrack(<void*>lst)
    return lst


cdef inline list _untracked(list lst):
    PyObject_GC_UnTrack(<void*>lst)
    return lst


# Shared by every task without dependencies/dependents; never mutated (code
# that appends replaces it with a _new_list() first).
cdef list _NO_TASKS = _new_list()


# ==========================================================================
# Errors
# ==========================================================================

class InvalidTransition(TaskcoreError):
    """A transition that the table does not allow was attempted.

    This is always a bug in the state machine (or in a caller forcing a
    transition by hand); ``story`` holds the task's recent transitions.
    """

    def __init__(self, key, start, finish, story=()):
        self.key = key
        self.start = start
        self.finish = finish
        self.story = list(story)
        super().__init__(key, start, finish)

    def __str__(self):
        lines = [f"Invalid transition for task {self.key!r}: {self.start} -> {self.finish}"]
        if self.story:
            lines.append("Recent story (key, start, finish, stimulus_id, worker):")
            lines.extend(f"  {entry!r}" for entry in self.story[max(0, len(self.story) - 20):])
        else:
            lines.append("(no recorded story)")
        return "\n".join(lines)


class MissingDependencyError(TaskcoreError):
    """A submitted task depends on keys the scheduler does not know."""

    def __init__(self, key, missing):
        self.key = key
        self.missing = tuple(missing)
        super().__init__(key, self.missing)

    def __str__(self):
        if self.key in self.missing:
            return f"Task {self.key!r} depends on itself."
        return (
            f"Task {self.key!r} depends on key(s) {list(self.missing)!r} that the "
            f"scheduler does not know: they are neither part of the submitted graph "
            f"nor held in memory (released, forgotten or never submitted)."
        )


# ==========================================================================
# Records
# ==========================================================================

@cython.final
@cython.freelist(8)
cdef class PrefixState:
    def __init__(self, str name):
        cdef int i
        self.name = name
        self.duration_average = -1.0
        self.n_durations = 0
        self.n_done = 0
        for i in range(N_TASK_STATES):
            self.counts[i] = 0

    cdef void add_duration(self, double duration) noexcept:
        # Exponential moving average (weight 1/2 on the newest sample) so the
        # estimate follows drift, e.g. tasks that get slower as data grows.
        if self.n_durations == 0:
            self.duration_average = duration
        else:
            self.duration_average = 0.5 * self.duration_average + 0.5 * duration
        self.n_durations += 1

    def __repr__(self):
        return f"<PrefixState {self.name!r} avg={self.duration_average:.3g}s n={self.n_durations}>"

    def state_counts(self):
        """{state name: live tasks of this prefix in it}, with "done" (ever finished)."""
        cdef int i
        out = {_NAMES[i]: self.counts[i] for i in range(N_TASK_STATES)}
        out["done"] = self.n_done
        return out


@cython.final
cdef class ClientState:
    def __init__(self, str client_id):
        self.client_id = client_id
        self._as_clients = (client_id,)
        self.wants = {}

    def __repr__(self):
        return f"<ClientState {self.client_id!r} wants={len(self.wants)}>"


cdef inline void _proc_push(WorkerState ws, TaskState ts) noexcept:
    ts._proc_prev = ws._proc_tail
    ts._proc_next = None
    if ws._proc_tail is not None:
        ws._proc_tail._proc_next = ts
    else:
        ws._proc_head = ts
    ws._proc_tail = ts
    ws.n_processing += 1


cdef inline void _proc_unlink(WorkerState ws, TaskState ts) noexcept:
    if ts._proc_prev is not None:
        ts._proc_prev._proc_next = ts._proc_next
    else:
        ws._proc_head = ts._proc_next
    if ts._proc_next is not None:
        ts._proc_next._proc_prev = ts._proc_prev
    else:
        ws._proc_tail = ts._proc_prev
    ts._proc_prev = None
    ts._proc_next = None
    ws.n_processing -= 1


cdef inline list _proc_list(WorkerState ws):
    cdef list out = []
    cdef TaskState t = ws._proc_head
    while t is not None:
        out.append(t)
        t = t._proc_next
    return out


@cython.final
cdef class WorkerState:
    @property
    def processing(self):
        """The tasks processing here, in assignment order (a new list)."""
        return _proc_list(self)

    def __repr__(self):
        return (f"<WorkerState {self.address!r} id={self.id} nthreads={self.nthreads} "
                f"processing={self.n_processing} memory={len(self.has_what)} "
                f"status={('running', 'closing', 'closed')[self.status]}>")

    @property
    def status_name(self):
        return ("running", "closing", "closed", "paused")[self.status]


@cython.final
@cython.no_gc                                       # see TaskState in the .pxd
@cython.freelist(256)
cdef class TaskState:
    cdef inline bint _needed(self) noexcept:
        return self.n_waiters > 0 or self.who_wants is not None

    def __repr__(self):
        return f"<TaskState {self.key!r} id={self.id} {_NAMES[self.state]}>"

    # Python-level views, for tests, the dashboard and debugging.
    @property
    def state_name(self):
        return _NAMES[self.state]

    @property
    def dependent_keys(self):
        return [(<TaskState>d).key for d in self.dependents
                if (<TaskState>d).state != TS_FORGOTTEN]

    @property
    def dependency_keys(self):
        return [(<TaskState>d).key for d in self.dependencies]

    @property
    def who_has_addresses(self):
        return [(<WorkerState>w).address for w in _holder_list(self)]

    @property
    def processing_on_address(self):
        return None if self.processing_on is None else self.processing_on.address

    @property
    def wanted_by(self):
        return [(<ClientState>c).client_id for c in _wanters(self)]

    @property
    def priority(self):
        return (self.prio_user, self.prio_gen, self.prio_rank)

    @property
    def blame_key(self):
        return None if self.exception_blame is None else self.exception_blame.key

    @property
    def worker_restrictions_set(self):
        return self.worker_restrictions

    @property
    def resource_restrictions(self):
        return self.resources

    @property
    def allow_other_workers(self):
        return self.loose_restrictions

    @property
    def prefix_name(self):
        return self.prefix.name


# ==========================================================================
# Stimuli
# ==========================================================================

cdef class Stimulus:
    """Base of all events.  ``stimulus_id`` names the cause in the story."""

    def __repr__(self):
        fields = _STIMULUS_FIELDS.get(type(self), ())
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in fields)
        return f"{type(self).__name__}({inner}, stimulus_id={self.stimulus_id!r})"


cdef inline list _as_list(object x):
    if x is None:
        return []
    if type(x) is list:
        return <list>x
    return list(x)


@cython.final
cdef class UpdateGraph(Stimulus):
    """A client submits tasks.

    tasks: [(key, run_spec, dependency keys, priority)] -- the priority (an
        int, a tuple, or None for submission order) orders tasks inside the
        graph; the 4th element may be omitted. Held as columns: task_keys, specs,
        deps and ranks (None when no task has a priority); `tasks` rebuilds the
        tuples.
    keys: the keys the client wants (holds futures for).
    workers: {key: address/name or collection of them}.
    allow_other_workers: True (all restricted tasks) or a collection of keys.
    resources: {key: {resource name: amount}}.
    retries: an int for every task, or {key: int}.
    annotations: {key: dict}, passed through to ComputeTask.
    priority: user priority of the whole graph; higher runs first.
    """

    def __init__(self, str client, tasks, keys, workers=None, allow_other_workers=False,
                 resources=None, retries=0, annotations=None, int64_t priority=0,
                 str stimulus_id=""):
        self.kind = EV_UPDATE_GRAPH
        self.stimulus_id = stimulus_id
        self.client = client
        self.task_keys, self.specs, self.deps, self.ranks = [], [], [], None
        for i, t in enumerate(_as_list(tasks)):
            self.task_keys.append(t[0])
            self.specs.append(t[1])
            self.deps.append(t[2])
            p = t[3] if len(t) > 3 else None
            if p is not None and self.ranks is None:
                self.ranks = [None] * i
            if self.ranks is not None:
                self.ranks.append(p)
        self.keys = _as_list(keys)
        self.workers = workers
        self.allow_other_workers = allow_other_workers
        self.resources = resources
        self.retries = retries
        self.annotations = annotations
        self.priority = priority

    @property
    def tasks(self):
        """[(key, run_spec, dependency keys, priority)] (for plugins and tests)."""
        ranks = self.ranks if self.ranks is not None else [None] * len(self.task_keys)
        return list(zip(self.task_keys, self.specs, self.deps, ranks))


@cython.final
cdef class TaskFinished(Stimulus):
    """A worker computed a task.  Identify it by ``task_id`` or ``key``."""

    def __init__(self, str worker, Py_ssize_t task_id=-1, int64_t nbytes=0, typename=None,
                 double duration=-1.0, str stimulus_id="", key=None, data=None):
        self.kind = EV_TASK_FINISHED
        self.stimulus_id = stimulus_id
        self.worker = worker
        self.task_id = task_id
        self.key = key
        self.nbytes = nbytes
        self.typename = typename
        self.duration = duration
        self.data = data


@cython.final
cdef class TasksFinished(Stimulus):
    """A worker computed several tasks (one report): columns of equal length."""

    def __init__(self, str worker, list task_ids, list nbytes, list typenames, list durations,
                 list data=None, str stimulus_id=""):
        cdef Py_ssize_t n = len(task_ids)
        if (len(nbytes) != n or len(typenames) != n or len(durations) != n
                or (data is not None and len(data) != n)):
            raise ValueError("TasksFinished: columns of different lengths")
        self.kind = EV_TASKS_FINISHED
        self.stimulus_id = stimulus_id
        self.worker = worker
        self.task_ids = task_ids
        self.nbytes = nbytes
        self.typenames = typenames
        self.durations = durations
        self.data = data


@cython.final
cdef class TaskLongRunning(Stimulus):
    """A task seceded from the worker's thread pool: it waits on other tasks
    (``get_client()`` inside a task) and no longer occupies a thread, so it
    stops counting against the worker's slots and queued tasks can run there.
    Without this, tasks that wait on tasks they submitted deadlock once they
    fill every slot. The slot is given back when the task leaves processing."""

    def __init__(self, str worker, Py_ssize_t task_id=-1, str stimulus_id="", key=None):
        self.kind = EV_LONG_RUNNING
        self.stimulus_id = stimulus_id
        self.worker = worker
        self.task_id = task_id
        self.key = key


@cython.final
cdef class TaskErred(Stimulus):
    def __init__(self, str worker, Py_ssize_t task_id=-1, exception=None, traceback=None,
                 str stimulus_id="", key=None):
        self.kind = EV_TASK_ERRED
        self.stimulus_id = stimulus_id
        self.worker = worker
        self.task_id = task_id
        self.key = key
        self.exception = exception
        self.traceback = traceback


@cython.final
cdef class AddWorker(Stimulus):
    def __init__(self, str address, int nthreads=1, int64_t memory_limit=0, resources=None,
                 name=None, double now=0.0, str stimulus_id=""):
        self.kind = EV_ADD_WORKER
        self.stimulus_id = stimulus_id
        self.address = address
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.resources = dict(resources) if resources else {}
        self.name = address if name is None else name
        self.now = now


@cython.final
cdef class RemoveWorker(Stimulus):
    def __init__(self, str address, bint safe=False, double now=0.0, str stimulus_id="",
                 reason=None):
        self.kind = EV_REMOVE_WORKER
        self.stimulus_id = stimulus_id
        self.address = address
        self.safe = safe
        self.now = now
        self.reason = None if reason is None else str(reason)[:1000]   # a peer's words: bounded


@cython.final
cdef class WorkerHeartbeat(Stimulus):
    def __init__(self, str address, metrics=None, double now=0.0, str stimulus_id=""):
        self.kind = EV_HEARTBEAT
        self.stimulus_id = stimulus_id
        self.address = address
        self.metrics = metrics
        self.now = now


@cython.final
cdef class ClientWantsKeys(Stimulus):
    def __init__(self, str client, keys, str stimulus_id=""):
        self.kind = EV_CLIENT_WANTS
        self.stimulus_id = stimulus_id
        self.client = client
        self.keys = _as_list(keys)


@cython.final
cdef class ClientReleasesKeys(Stimulus):
    def __init__(self, str client, keys, str stimulus_id=""):
        self.kind = EV_CLIENT_RELEASES
        self.stimulus_id = stimulus_id
        self.client = client
        self.keys = _as_list(keys)


@cython.final
cdef class ClientRemoved(Stimulus):
    def __init__(self, str client, str stimulus_id=""):
        self.kind = EV_CLIENT_REMOVED
        self.stimulus_id = stimulus_id
        self.client = client


@cython.final
cdef class Cancel(Stimulus):
    def __init__(self, str client, keys, bint force=False, str stimulus_id=""):
        self.kind = EV_CANCEL
        self.stimulus_id = stimulus_id
        self.client = client
        self.keys = _as_list(keys)
        self.force = force


@cython.final
cdef class Retry(Stimulus):
    def __init__(self, str client, keys, str stimulus_id=""):
        self.kind = EV_RETRY
        self.stimulus_id = stimulus_id
        self.client = client
        self.keys = _as_list(keys)


@cython.final
cdef class BalanceTick(Stimulus):
    def __init__(self, double now=0.0, str stimulus_id=""):
        self.kind = EV_BALANCE
        self.stimulus_id = stimulus_id
        self.now = now


@cython.final
cdef class StealResponse(Stimulus):
    def __init__(self, str victim, Py_ssize_t task_id=-1, state=None, str stimulus_id="",
                 key=None):
        self.kind = EV_STEAL_RESPONSE
        self.stimulus_id = stimulus_id
        self.victim = victim
        self.task_id = task_id
        self.key = key
        self.state = state


@cython.final
cdef class MissingData(Stimulus):
    def __init__(self, key, str holder, str reporter=None, str stimulus_id=""):
        self.kind = EV_MISSING_DATA
        self.stimulus_id = stimulus_id
        self.key = key
        self.holder = holder
        self.reporter = reporter


@cython.final
cdef class AddKeys(Stimulus):
    def __init__(self, str worker, keys, str stimulus_id=""):
        self.kind = EV_ADD_KEYS
        self.stimulus_id = stimulus_id
        self.worker = worker
        self.keys = _as_list(keys)


@cython.final
cdef class UpdateData(Stimulus):
    def __init__(self, str client, who_has, nbytes=None, str stimulus_id=""):
        self.kind = EV_UPDATE_DATA
        self.stimulus_id = stimulus_id
        self.client = client
        self.who_has = dict(who_has)
        self.nbytes = dict(nbytes) if nbytes else {}


@cython.final
cdef class ReleaseWorkerData(Stimulus):
    def __init__(self, str worker, keys, str stimulus_id=""):
        self.kind = EV_RELEASE_WORKER_DATA
        self.stimulus_id = stimulus_id
        self.worker = worker
        self.keys = _as_list(keys)


@cython.final
cdef class RetireWorkers(Stimulus):
    def __init__(self, workers=None, Py_ssize_t n=0, str stimulus_id=""):
        self.kind = EV_RETIRE_WORKERS
        self.stimulus_id = stimulus_id
        self.workers = None if workers is None else _as_list(workers)
        self.n = n


_STIMULUS_FIELDS = {
    UpdateGraph: ("client", "tasks", "keys", "workers", "allow_other_workers", "resources",
                  "retries", "annotations", "priority"),
    TaskFinished: ("worker", "task_id", "key", "nbytes", "typename", "duration", "data"),
    TasksFinished: ("worker", "task_ids", "nbytes", "typenames", "durations", "data"),
    TaskErred: ("worker", "task_id", "key", "exception", "traceback"),
    TaskLongRunning: ("worker", "task_id", "key"),
    AddWorker: ("address", "nthreads", "memory_limit", "resources", "name", "now"),
    RemoveWorker: ("address", "safe", "now", "reason"),
    WorkerHeartbeat: ("address", "metrics", "now"),
    ClientWantsKeys: ("client", "keys"),
    ClientReleasesKeys: ("client", "keys"),
    ClientRemoved: ("client",),
    Cancel: ("client", "keys", "force"),
    Retry: ("client", "keys"),
    BalanceTick: ("now",),
    StealResponse: ("victim", "task_id", "key", "state"),
    MissingData: ("key", "holder", "reporter"),
    AddKeys: ("worker", "keys"),
    UpdateData: ("client", "who_has", "nbytes"),
    ReleaseWorkerData: ("worker", "keys"),
    RetireWorkers: ("workers", "n"),
}


# ==========================================================================
# Instructions
# ==========================================================================

cdef class Instruction:
    """Base of all instructions.  ``stimulus_id`` names the stimulus that caused it."""

    def _fields(self):
        return _INSTRUCTION_FIELDS.get(type(self), ())

    def to_dict(self):
        d = {f: getattr(self, f) for f in self._fields()}
        d["stimulus_id"] = self.stimulus_id
        return d

    def __repr__(self):
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields())
        return f"{type(self).__name__}({inner})"


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class ComputeTask(Instruction):
    @property
    def priority(self):
        """(-user priority, graph generation, rank in graph): smaller runs first."""
        return (self._p0, self._p1, self._p2)


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class FreeKeys(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class StealRequest(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class AcquireReplicas(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class KeyInMemory(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class TaskErredReport(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class KeyLost(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class TaskCancelled(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class TaskRetried(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class KeyForgotten(Instruction):
    pass


@cython.final
@cython.no_gc                                       # never part of a cycle; see TaskState
cdef class WorkersRetiring(Instruction):
    pass


_INSTRUCTION_FIELDS = {
    ComputeTask: ("worker", "task_id", "key", "run_spec", "priority", "dependencies",
                  "resources", "annotations", "duration"),
    FreeKeys: ("worker", "task_ids", "keys"),
    StealRequest: ("worker", "task_id", "key"),
    AcquireReplicas: ("worker", "who_has"),
    KeyInMemory: ("clients", "key", "task_id", "nbytes", "typename", "data"),
    TaskErredReport: ("clients", "key", "exception", "traceback", "blame_key"),
    KeyLost: ("clients", "key"),
    TaskCancelled: ("clients", "key"),
    TaskRetried: ("clients", "key"),
    KeyForgotten: ("clients", "key"),
    WorkersRetiring: ("workers", "n_replicas"),
}


cdef inline list _holder_list(TaskState ts):
    """The replicas as a new list (for paths that are not hot)."""
    if ts.holder is None:
        return []
    if ts.more_holders is None:
        return [ts.holder]
    return [ts.holder] + ts.more_holders


cdef inline bint _holds(TaskState ts, WorkerState ws) noexcept:
    if ts.holder is ws:
        return True
    return ts.more_holders is not None and ws in ts.more_holders


cdef inline tuple _holders(TaskState ts):
    if ts.holder is None:
        return _EMPTY
    if ts.more_holders is None or not ts.more_holders:
        return ts.holder._as_holders
    return tuple([(<WorkerState>w).address for w in _holder_list(ts)])


cdef inline tuple _dep_entry(TaskState dts):
    return (dts._id_obj, dts.key, dts.nbytes, _holders(dts))


cdef ComputeTask _compute_task(TaskState ts, WorkerState ws, str stimulus_id):
    cdef ComputeTask ct = ComputeTask.__new__(ComputeTask)
    cdef list deps = ts.dependencies
    cdef Py_ssize_t i, n = len(deps)
    ct.stimulus_id = stimulus_id
    ct.worker = ws.address
    ct.task_id = ts.id
    ct.key = ts.key
    ct.run_spec = ts.run_spec
    ct._p0 = ts.prio_user
    ct._p1 = ts.prio_gen
    ct._p2 = ts.prio_rank
    if n == 0:
        ct.dependencies = _EMPTY
    elif n == 1:
        ct.dependencies = (_dep_entry(<TaskState>deps[0]),)
    elif n == 2:
        ct.dependencies = (_dep_entry(<TaskState>deps[0]), _dep_entry(<TaskState>deps[1]))
    else:
        ct.dependencies = tuple([_dep_entry(<TaskState>deps[i]) for i in range(n)])
    ct.resources = ts.resources
    ct.annotations = ts.annotations
    ct.duration = ts.est_duration
    return ct


# ==========================================================================
# The transition table
# ==========================================================================

ctypedef int (*TransitionFn)(SchedulerState, TaskState) except -1

cdef TransitionFn _TABLE[8][8]
cdef bint _VIA_RELEASED[8][8]


cdef inline list _wanters(TaskState ts):
    """The clients that want ts, as a list (who_wants is None, one client, or a dict)."""
    cdef object ww = ts.who_wants
    if ww is None:
        return []
    if type(ww) is ClientState:
        return [ww]
    return list(<dict>ww)


cdef inline bint _is_wanted_by(TaskState ts, ClientState cs) noexcept:
    cdef object ww = ts.who_wants
    if ww is None:
        return False
    if type(ww) is ClientState:
        return ww is cs
    return cs in <dict>ww


cdef inline bint _is_active(int state) noexcept:
    return state == TS_WAITING or state == TS_QUEUED or state == TS_NO_WORKER \
        or state == TS_PROCESSING


cdef WorkerState _sibling_home(TaskState ts):
    """A worker that holds or runs a sibling of root ``ts`` (another input of one
    of its dependents) and may take ``ts``, or None.  Bounded: 4 dependents x 8
    inputs."""
    cdef Py_ssize_t i, j, ni, nj
    cdef TaskState d, dep
    cdef WorkerState ws
    if not ts.dependents:
        return None
    ni = min(len(ts.dependents), 4)
    for i in range(ni):
        d = <TaskState>ts.dependents[i]
        if not d.dependencies:
            continue
        nj = min(len(d.dependencies), 8)
        for j in range(nj):
            dep = <TaskState>d.dependencies[j]
            if dep is ts:
                continue
            if dep.state == TS_PROCESSING:
                ws = dep.processing_on
            elif dep.state == TS_MEMORY:
                ws = dep.holder
            else:
                continue
            # Open, or full by less than its slots again: a root may join its
            # sibling beyond the slots (as in _place_sibling), so the dependent
            # needs no transfer; never more than 2 x slots.
            if ws is not None and (ws._is_idle or (ws.status == WS_RUNNING and
                                                   ws.n_processing < 2 * ws.slots)):
                return ws
    return None


cdef bint _share_dependent(TaskState a, TaskState b):
    """Do a and b have a dependent in common?  (Bounded: first 8 of each.)"""
    cdef Py_ssize_t i, j, na = len(a.dependents), nb = len(b.dependents)
    if na > 8:
        na = 8
    if nb > 8:
        nb = 8
    for i in range(na):
        for j in range(nb):
            if a.dependents[i] is b.dependents[j]:
                return True
    return False


# Hard cap on the tiny-task allowance, per thread, whatever the durations say.
cdef Py_ssize_t _TINY_MAX_EXTRA = 4096


cdef int _t_released_waiting(SchedulerState s, TaskState ts) except -1:
    """The task is needed: hold its dependencies and compute the missing ones."""
    cdef list deps = ts.dependencies
    cdef Py_ssize_t i, n = len(deps), missing = 0
    cdef TaskState dts
    if not ts._needed():
        return 0                                    # stale: stays released
    if ts._fatal is not None:                       # e.g. missing dependencies
        ts.exception = ts._fatal
        ts.traceback = None
        ts.exception_blame = ts
        s._rec(ts, TS_ERRED)
        return 0
    if ts._pure_data:                               # scattered data, lost
        ts.exception = FutureLostError(
            f"The data of key {ts.key!r} was lost (its workers left or dropped it) and "
            f"it cannot be recomputed: it was scattered, not computed.")
        ts.traceback = None
        ts.exception_blame = ts
        s._rec(ts, TS_ERRED)
        return 0
    for i in range(n):
        dts = <TaskState>deps[i]
        if dts.state == TS_ERRED:
            ts.exception_blame = dts.exception_blame
            s._rec(ts, TS_ERRED)
            return 0
    for i in range(n):
        dts = <TaskState>deps[i]
        dts.n_waiters += 1
        if dts.state != TS_MEMORY:
            missing += 1
            if dts.state == TS_RELEASED:
                s._rec(dts, TS_WAITING)
    ts.n_waiting_on = missing
    ts.state = TS_WAITING
    if missing == 0:
        # Ready at once (e.g. a root task): place it in the same step rather
        # than through one more recommendation.  The story shows
        # released -> processing/queued/no-worker.
        return s._dispatch(ts)
    return 0


cdef int _t_ready_processing(SchedulerState s, TaskState ts) except -1:
    """waiting/queued/no-worker -> processing, or the outcome queued/no-worker.

    Recommendations are "last one wins", so a "place it" recommendation may
    have overwritten a more important one made earlier in the same stimulus
    (e.g. "an input was lost: start over").  Hence the preconditions are
    checked here rather than trusted."""
    cdef list deps
    cdef Py_ssize_t i
    if not ts._needed():
        s._rec(ts, TS_RELEASED)
        return 0
    if ts.state == TS_WAITING:
        if ts.n_waiting_on > 0:
            return 0                                # stale: not ready
    else:
        deps = ts.dependencies
        for i in range(len(deps)):
            if (<TaskState>deps[i]).state != TS_MEMORY:
                s._rec(ts, TS_WAITING)              # lost an input meanwhile
                return 0
    return s._dispatch(ts)


cdef int _t_active_released(SchedulerState s, TaskState ts) except -1:
    """Stop pursuing the task (cancel, lost input, reschedule)."""
    cdef WorkerState ws
    if ts.state == TS_PROCESSING:
        ws = s._exit_processing(ts)
        s._emit_free(ws, ts)                        # cancel it on the worker
    else:
        s._leave_ready_containers(ts)
    s._release_dependencies(ts)
    ts.n_waiting_on = 0
    ts.state = TS_RELEASED
    s._after_released(ts)
    return 0


cdef int _t_active_erred(SchedulerState s, TaskState ts) except -1:
    cdef WorkerState ws
    if ts.state == TS_PROCESSING:
        ws = s._exit_processing(ts)
        s._emit_free(ws, ts)                        # the worker keeps nothing
    else:
        s._leave_ready_containers(ts)
    s._release_dependencies(ts)
    ts.n_waiting_on = 0
    return _t_released_erred(s, ts)


cdef int _t_released_erred(SchedulerState s, TaskState ts) except -1:
    cdef TaskState blame = ts.exception_blame
    cdef TaskState dts
    cdef list dependents = ts.dependents
    cdef Py_ssize_t i
    if blame is None:
        raise AssertionError(f"task {ts.key!r} errs without exception_blame")
    ts.state = TS_ERRED
    if ts.who_wants is not None:
        s._report_erred(ts, s._client_ids(ts))
    for i in range(len(dependents)):
        dts = <TaskState>dependents[i]
        if _is_active(dts.state):
            dts.exception_blame = blame
            s._rec(dts, TS_ERRED)
    if s._faf is not None and _is_wanted_by(ts, s._faf):
        s._drop_want(s._faf, ts)
    if ts.who_wants is None and ts.n_dependents == 0:
        s._rec(ts, TS_FORGOTTEN)
    return 0


cdef int _t_processing_memory(SchedulerState s, TaskState ts) except -1:
    """``s._ctx_worker`` computed the task (normally ts.processing_on)."""
    cdef WorkerState ws = s._ctx_worker
    cdef WorkerState on
    if ws is None:                                  # manual transition()
        ws = ts.processing_on
    on = s._exit_processing(ts)
    if on is not ws:
        s._emit_free(on, ts)                        # a duplicate is still running
    s._add_replica(ts, ws)
    ts.state = TS_MEMORY
    ts.exception_blame = None
    if ts.who_wants is not None:
        # Before anything else this report causes: the waiting clients learn of
        # the result (and get it, if it rode along) ahead of the dependents'
        # instructions.
        s._report_memory(ts, s._ctx_data)
    s._release_dependencies(ts)
    s._dependency_arrived(ts)
    if ts.who_wants is None and ts.n_waiters == 0:
        s._rec(ts, TS_RELEASED)                     # nobody needs the result
    if ws.status == WS_CLOSING:
        s._evacuate([ts], True)
    return 0


cdef int _t_released_memory(SchedulerState s, TaskState ts) except -1:
    """Scatter: data handed to us on ``s._ctx_holders``."""
    cdef list holders = s._ctx_holders
    cdef Py_ssize_t i
    if not holders:
        raise ValueError(f"released -> memory for {ts.key!r} needs the data's holders "
                         f"(it only happens through UpdateData)")
    ts.exception_blame = None
    for i in range(len(holders)):
        s._add_replica(ts, <WorkerState>holders[i])
    ts.state = TS_MEMORY
    s._dependency_arrived(ts)
    if ts.who_wants is not None:
        s._report_memory(ts, None)
    elif ts.n_waiters == 0:
        s._rec(ts, TS_RELEASED)
    return 0


cdef int _t_memory_released(SchedulerState s, TaskState ts) except -1:
    cdef list dependents = ts.dependents
    cdef WorkerState ws
    cdef TaskState dts
    cdef Py_ssize_t i
    cdef KeyLost kl
    while ts.holder is not None:
        ws = ts.holder
        s._emit_free(ws, ts)
        s._remove_replica(ts, ws)
    ts.state = TS_RELEASED
    if ts.who_wants is not None:
        kl = KeyLost.__new__(KeyLost)
        kl.stimulus_id = s._stimulus_id
        kl.clients = s._client_ids(ts)
        kl.key = ts.key
        s._out.append(kl)
    for i in range(len(dependents)):
        dts = <TaskState>dependents[i]
        if dts.state == TS_WAITING:
            dts.n_waiting_on += 1
        elif dts.state == TS_QUEUED or dts.state == TS_NO_WORKER or dts.state == TS_PROCESSING:
            s._rec(dts, TS_WAITING)                 # lost an input: start over
    s._after_released(ts)
    return 0


cdef int _t_erred_released(SchedulerState s, TaskState ts) except -1:
    """Retry: forget the error; erred dependents that share its cause (the
    same blamed task) retry as well, so a whole erred chain comes back."""
    cdef list dependents = ts.dependents
    cdef TaskState dts
    cdef TaskState blame = ts.exception_blame
    cdef Py_ssize_t i
    cdef TaskRetried tr
    if ts.who_wants is not None:
        tr = TaskRetried.__new__(TaskRetried)
        tr.stimulus_id = s._stimulus_id
        tr.clients = s._client_ids(ts)
        tr.key = ts.key
        s._out.append(tr)
    for i in range(len(dependents)):
        dts = <TaskState>dependents[i]
        if dts.state == TS_ERRED and dts.exception_blame is blame:
            s._rec(dts, TS_WAITING)
    ts.exception = None
    ts.traceback = None
    ts.exception_blame = None
    ts.state = TS_RELEASED
    s._after_released(ts)
    return 0


cdef int _forget(SchedulerState s, TaskState ts) except -1:
    cdef list deps = ts.dependencies
    cdef TaskState dts
    cdef Py_ssize_t i
    for i in range(len(deps)):
        dts = <TaskState>deps[i]
        dts.n_dependents -= 1
        if len(dts.dependents) > 2 * dts.n_dependents + 8:
            # Compact forgotten entries; amortised O(1) per forget, so a task
            # shared by millions of dependents never costs O(n^2).
            dts.dependents = _untracked([d for d in dts.dependents
                                         if (<TaskState>d).state != TS_FORGOTTEN and d is not ts])
        if dts.n_dependents == 0 and dts.who_wants is None:
            s._rec(dts, TS_FORGOTTEN)
    ts.state = TS_FORGOTTEN
    del s.tasks[ts.key]
    del s._by_id[ts._id_obj]
    s._steals.pop(ts, None)
    # Drop what can be large and break the reference cycles (TaskState is not
    # GC-tracked).  The record may live on as a dead entry in dependents lists
    # and as the exception_blame of erred dependents (which read its
    # key/exception/traceback), so those fields stay.
    ts.run_spec = None
    ts.annotations = None
    ts.dependencies = _NO_TASKS
    ts.dependents = _NO_TASKS
    if ts.exception_blame is ts:
        ts.exception_blame = None
    ts._steal_thief = None
    return 0


cdef int _t_released_forgotten(SchedulerState s, TaskState ts) except -1:
    return _forget(s, ts)


cdef int _t_erred_forgotten(SchedulerState s, TaskState ts) except -1:
    return _forget(s, ts)


cdef void _init_table() noexcept:
    cdef int a, b
    for a in range(N_TASK_STATES):
        for b in range(N_TASK_STATES):
            _TABLE[a][b] = NULL
            _VIA_RELEASED[a][b] = False
    # direct transitions
    _TABLE[TS_RELEASED][TS_WAITING] = _t_released_waiting
    _TABLE[TS_RELEASED][TS_ERRED] = _t_released_erred
    _TABLE[TS_RELEASED][TS_MEMORY] = _t_released_memory
    _TABLE[TS_RELEASED][TS_FORGOTTEN] = _t_released_forgotten
    for a in (TS_WAITING, TS_QUEUED, TS_NO_WORKER):
        _TABLE[a][TS_PROCESSING] = _t_ready_processing
    for a in (TS_WAITING, TS_QUEUED, TS_NO_WORKER, TS_PROCESSING):
        _TABLE[a][TS_RELEASED] = _t_active_released
        _TABLE[a][TS_ERRED] = _t_active_erred
    _TABLE[TS_PROCESSING][TS_MEMORY] = _t_processing_memory
    _TABLE[TS_MEMORY][TS_RELEASED] = _t_memory_released
    _TABLE[TS_ERRED][TS_RELEASED] = _t_erred_released
    _TABLE[TS_ERRED][TS_FORGOTTEN] = _t_erred_forgotten
    # two-step transitions through released
    for a in (TS_WAITING, TS_QUEUED, TS_NO_WORKER, TS_PROCESSING, TS_MEMORY):
        _VIA_RELEASED[a][TS_FORGOTTEN] = True
    for a in (TS_QUEUED, TS_NO_WORKER, TS_PROCESSING, TS_MEMORY, TS_ERRED):
        _VIA_RELEASED[a][TS_WAITING] = True
    for a in (TS_WAITING, TS_QUEUED, TS_NO_WORKER, TS_PROCESSING, TS_ERRED):
        _VIA_RELEASED[a][TS_MEMORY] = True

_init_table()


def transition_table():
    """The legal (start, finish) pairs as names, and the ones routed via released."""
    direct = sorted((_NAMES[a], _NAMES[b]) for a in range(N_TASK_STATES)
                    for b in range(N_TASK_STATES) if _TABLE[a][b] != NULL)
    via = sorted((_NAMES[a], _NAMES[b]) for a in range(N_TASK_STATES)
                 for b in range(N_TASK_STATES) if _VIA_RELEASED[a][b])
    return direct, via


def _priority_rank_order(list prios):
    """Indices of a graph's new tasks sorted by their (non-integer) priorities."""
    def key(i):
        p = prios[i]
        if p is None:
            return ()
        return p if type(p) is tuple else (p,)
    try:
        return sorted(range(len(prios)), key=key)
    except TypeError:                               # incomparable: submission order
        return list(range(len(prios)))


def _queue_order_key(t):
    cdef TaskState ts = <TaskState>t
    return (ts.prio_user, ts.prio_gen, ts.prio_rank, ts.id)


def _steal_order(t):
    # Lowest priority first (it would run last on the victim).
    cdef TaskState ts = <TaskState>t
    return (-ts.prio_user, -ts.prio_gen, -ts.prio_rank, -ts.id)


def _victim_order(w):
    cdef WorkerState ws = <WorkerState>w
    return (-ws.occupancy / ws.nthreads, ws.id)


def _retire_order(w):
    cdef WorkerState ws = <WorkerState>w
    return (ws.nbytes, ws.n_processing, ws.id)


cdef greater[QueueKey] _QUEUE_ORDER           # min-heap: smallest key on top


cdef inline QueueKey _qkey(TaskState ts) noexcept:
    cdef QueueKey k
    k.first.first = ts.prio_user
    k.first.second = ts.prio_gen
    k.second.first = ts.prio_rank
    k.second.second = ts.id
    return k


cdef inline str _key_prefix(object key):
    """Cheap grouping of keys for duration statistics: 'inc-abc' -> 'inc',
    ('x-123', 4) -> 'x'."""
    cdef str name
    cdef Py_ssize_t i
    while type(key) is tuple and len(<tuple>key) > 0:
        key = (<tuple>key)[0]
    if type(key) is bytes:
        key = (<bytes>key).decode("utf-8", "replace")
    if type(key) is not str:
        return type(key).__name__
    name = <str>key
    i = name.find("-")
    if i > 0:
        return name[:i]
    return name


# ==========================================================================
# SchedulerState
# ==========================================================================

@cython.final
@cython.no_gc_clear                                 # __dealloc__ needs self._by_id
cdef class SchedulerState:
    """The scheduler's task-state machine.  See the module docstring."""

    def __init__(self, *, bint validate=False, int allowed_failures=2,
                 double worker_saturation=1.1, double bandwidth=100e6,
                 double unknown_task_duration=0.5, bint work_stealing=True,
                 double steal_ratio=1.0, Py_ssize_t transition_log_length=100_000,
                 double tiny_task_backlog=0.002, Py_ssize_t task_stream_length=100_000):
        cdef int i
        if worker_saturation <= 0:
            raise ValueError("worker_saturation must be > 0 (inf disables queueing)")
        if bandwidth <= 0:
            raise ValueError("bandwidth must be > 0")
        if tiny_task_backlog < 0:
            raise ValueError("tiny_task_backlog must be >= 0 (0 disables it)")
        if transition_log_length < 1:
            raise ValueError("transition_log_length must be >= 1")
        if task_stream_length < 1:
            raise ValueError("task_stream_length must be >= 1")
        self.validate = validate
        self.allowed_failures = allowed_failures
        self.worker_saturation = worker_saturation
        self._queuing = not isinf(worker_saturation)
        self.tiny_task_backlog = tiny_task_backlog
        self.bandwidth = bandwidth
        self.unknown_task_duration = unknown_task_duration
        self.work_stealing = work_stealing
        self.steal_ratio = steal_ratio
        self.transition_log_length = transition_log_length

        self.tasks = {}
        self._by_id = {}
        self._next_task_id = 0
        self._generation = 0
        self._prefixes = {}
        for i in range(N_TASK_STATES):
            self._counts[i] = 0
        self.workers = {}
        self._names = {}
        self._running = []
        self._addresses_by_id = {}
        self._next_worker_id = 0
        self._stamp = 0
        self.clients = {}
        self._constrained_dirty = False
        self._filling = False
        self._unrunnable = {}
        self._steals = {}
        self._out = []
        self._free_dirty = []
        self._stimulus_id = ""

        # Untracked: hold only keys and stimulus ids (no cycles), and a full GC
        # pass over 2 x 100,000 slots would cost more than the log itself.
        self._log_keys = _untracked([None] * transition_log_length)
        self._log_stimuli = _untracked([None] * transition_log_length)
        self._log_start.resize(transition_log_length)
        self._log_finish.resize(transition_log_length)
        self._log_worker.resize(transition_log_length)
        self._log_pos = 0
        self._log_len = 0
        self.n_transitions = 0
        self.task_stream_length = task_stream_length
        self._stream_keys = _untracked([None] * task_stream_length)
        self._stream_workers = _untracked([None] * task_stream_length)
        self._stream_stop.resize(task_stream_length)
        self._stream_duration.resize(task_stream_length)
        self._stream_erred.resize(task_stream_length)
        self.task_stream_total = 0

    def __dealloc__(self):
        # TaskState is not GC-tracked: break the cycles between tasks (and
        # between tasks and workers/clients) so everything is freed.
        cdef TaskState ts
        cdef PyObject* p
        while not self._recs.empty():
            p = self._recs.back()
            self._recs.pop_back()
            Py_DECREF(<object>p)
        if self._by_id is None:
            return
        for t in self._by_id.values():
            ts = <TaskState>t
            ts.dependencies = None
            ts.dependents = None
            ts.who_wants = None
            ts.holder = None
            ts.more_holders = None
            ts.processing_on = None
            ts._proc_prev = None
            ts._proc_next = None
            ts.exception_blame = None
            ts._steal_thief = None
        for w in self.workers.values():
            (<WorkerState>w)._proc_head = None
            (<WorkerState>w)._proc_tail = None

    # ------------------------------------------------------------------
    # Entry points
    # ------------------------------------------------------------------

    def handle_stimulus(self, *stimuli):
        """Apply each stimulus in turn; return all instructions, in order."""
        cdef list out = []
        for obj in stimuli:
            if not isinstance(obj, Stimulus):
                raise TypeError(f"not a stimulus: {obj!r}")
            out.extend(self.handle(<Stimulus>obj))
        return out

    cpdef list handle(self, Stimulus ev):
        """Apply one stimulus; return its instructions. Every stimulus, from
        `handle_stimulus` or from compiled callers, takes this one path."""
        self._begin(ev.stimulus_id)
        self._dispatch_event(ev)
        return self._end()

    cdef int _task_long_running(self, WorkerState ws, TaskState ts) except -1:
        if ts.state != TS_PROCESSING or ts.processing_on is not ws or ts._seceded:
            return 0                                # stale or repeated
        ts._seceded = True
        ws.n_long_running += 1
        ws.slots += 1
        ws.occupancy -= ts.est_duration             # it holds no thread
        if ws.occupancy < 0:
            ws.occupancy = 0.0
        ts.est_duration = 0.0
        if ts._steal_thief is not None:
            self._clear_steal(ts)                   # it is running: not stealable
        self._update_idle(ws)
        return 0

    def transition(self, key, str finish, str stimulus_id="manual-transition"):
        """Force one transition of ``key`` to ``finish`` (a state name), then
        follow the recommendations.  For tests and debugging only: it bypasses
        the guards that the events respect."""
        cdef TaskState ts = self._task_from(-1, key)
        if finish not in _STATE_CODES:
            raise ValueError(f"unknown state {finish!r}")
        if ts is None:
            raise InvalidTransition(key, "forgotten", finish, self.story(key))
        self._begin(stimulus_id)
        self._transition(ts, _STATE_CODES[finish])
        return self._end()

    # ------------------------------------------------------------------
    # Stimulus plumbing
    # ------------------------------------------------------------------

    cdef inline void _begin(self, str stimulus_id):
        self._out = []
        self._stimulus_id = stimulus_id
        if not self._recs.empty():
            self._discard_recs()

    def _discard_recs(self):
        """Only after a stimulus raised (a bug, e.g. InvalidTransition):
        drop its pending recommendations so they cannot leak into the next."""
        cdef PyObject* p
        while not self._recs.empty():
            p = self._recs.back()
            self._recs.pop_back()
            (<TaskState>p)._rec_target = NO_REC
            Py_DECREF(<object>p)

    cdef list _end(self):
        cdef list out
        cdef WorkerState ws
        cdef Py_ssize_t i
        self._drain()
        if (self._n_root_queued > 0 and not self._idle.empty()) or self._constrained_dirty:
            self._fill_slots()
        if self._free_dirty:
            for i in range(len(self._free_dirty)):
                self._flush_frees(<WorkerState>self._free_dirty[i])
            self._free_dirty = []
        if self.validate:
            self.validate_state()
        out = self._out
        self._out = []
        return out

    cdef int _dispatch_event(self, Stimulus ev) except -1:
        cdef int kind = ev.kind
        cdef WorkerHeartbeat hb
        cdef TaskState ts
        cdef object obj
        if kind == EV_UPDATE_GRAPH:
            return self._update_graph(<UpdateGraph>ev)
        elif kind == EV_ADD_WORKER:
            return self._add_worker(<AddWorker>ev)
        elif kind == EV_REMOVE_WORKER:
            return self._remove_worker(<RemoveWorker>ev)
        elif kind == EV_HEARTBEAT:
            hb = <WorkerHeartbeat>ev
            obj = self.workers.get(hb.address)
            if obj is not None:
                (<WorkerState>obj).metrics = hb.metrics
                (<WorkerState>obj).last_seen = hb.now
                if type(hb.metrics) is dict:
                    self._worker_paused(<WorkerState>obj, bool(hb.metrics.get("paused")))
            return 0
        elif kind == EV_CLIENT_WANTS:
            return self._client_wants((<ClientWantsKeys>ev).client, (<ClientWantsKeys>ev).keys)
        elif kind == EV_CLIENT_RELEASES:
            return self._client_releases((<ClientReleasesKeys>ev).client,
                                         (<ClientReleasesKeys>ev).keys)
        elif kind == EV_CLIENT_REMOVED:
            return self._client_removed((<ClientRemoved>ev).client)
        elif kind == EV_CANCEL:
            return self._cancel(<Cancel>ev)
        elif kind == EV_RETRY:
            return self._retry(<Retry>ev)
        elif kind == EV_BALANCE:
            return self._balance(<BalanceTick>ev)
        elif kind == EV_STEAL_RESPONSE:
            return self._steal_response(<StealResponse>ev)
        elif kind == EV_MISSING_DATA:
            return self._missing_data(<MissingData>ev)
        elif kind == EV_ADD_KEYS:
            return self._add_keys(<AddKeys>ev)
        elif kind == EV_UPDATE_DATA:
            return self._update_data(<UpdateData>ev)
        elif kind == EV_RELEASE_WORKER_DATA:
            return self._release_worker_data(<ReleaseWorkerData>ev)
        elif kind == EV_RETIRE_WORKERS:
            return self._retire_workers(<RetireWorkers>ev)
        elif kind == EV_TASK_FINISHED:
            return self._finished(<TaskFinished>ev)
        elif kind == EV_TASKS_FINISHED:
            return self._tasks_finished(<TasksFinished>ev)
        elif kind == EV_TASK_ERRED:
            return self._erred(<TaskErred>ev)
        elif kind == EV_LONG_RUNNING:
            obj = self.workers.get((<TaskLongRunning>ev).worker)
            ts = self._task_from((<TaskLongRunning>ev).task_id, (<TaskLongRunning>ev).key)
            if obj is not None and ts is not None:
                self._task_long_running(<WorkerState>obj, ts)
            return 0
        raise TypeError(f"unhandled stimulus {ev!r}")

    cdef int _finished(self, TaskFinished ev) except -1:
        cdef TaskState ts
        cdef object obj
        if ev.task_id >= 0:
            return self._finished_by_id(ev.worker, ev.task_id, ev.nbytes, ev.typename,
                                        ev.duration, ev.data)
        ts = self._task_from(-1, ev.key)
        obj = self.workers.get(ev.worker)
        if obj is not None:
            if ts is None:
                self._emit_unknown_free(<WorkerState>obj, -1, ev.key)
            else:
                self._task_finished(<WorkerState>obj, ts, ev.nbytes, ev.typename, ev.duration,
                                    ev.data)
        return 0

    cdef int _tasks_finished(self, TasksFinished ev) except -1:
        cdef Py_ssize_t i
        cdef list ids = ev.task_ids, nbytes = ev.nbytes, types = ev.typenames
        cdef list durations = ev.durations, data = ev.data
        for i in range(len(ids)):
            self._finished_by_id(ev.worker, ids[i], nbytes[i], types[i], durations[i],
                                 data[i] if data is not None else None)
        return 0

    cdef int _finished_by_id(self, str worker, object task_id, int64_t nbytes, object typename,
                             double duration, object data) except -1:
        """``worker`` computed task ``task_id``; ``duration`` (seconds, < 0 if
        unknown) trains the prefix's estimate."""
        cdef PyObject* wobj = PyDict_GetItem(self.workers, worker)
        cdef PyObject* tobj
        if wobj == NULL:
            return 0            # the worker was removed; its report is stale, its data gone
        tobj = PyDict_GetItem(self._by_id, task_id)
        if tobj == NULL:
            self._emit_unknown_free(<WorkerState>wobj, task_id, None)
        else:
            self._task_finished(<WorkerState>wobj, <TaskState>tobj, nbytes, typename, duration,
                                data)
        return 0

    cdef int _erred(self, TaskErred ev) except -1:
        cdef object obj = self.workers.get(ev.worker)
        cdef TaskState ts = self._task_from(ev.task_id, ev.key)
        if obj is not None and ts is not None:
            self._task_erred(<WorkerState>obj, ts, ev.exception, ev.traceback)
        return 0

    cdef inline void _rec(self, TaskState ts, int target) noexcept:
        if ts._rec_target == NO_REC:
            Py_INCREF(ts)
            self._recs.push_back(<PyObject*>ts)
        ts._rec_target = target

    cdef int _drain(self) except -1:
        cdef TaskState ts
        cdef PyObject* p
        cdef int target
        while not self._recs.empty():
            p = self._recs.back()
            self._recs.pop_back()
            ts = <TaskState>p                       # new reference...
            Py_DECREF(ts)                           # ...so drop the stack's
            target = ts._rec_target
            if target == NO_REC:
                continue                            # superseded
            ts._rec_target = NO_REC
            if ts.state == target or ts.state == TS_FORGOTTEN:
                continue
            if target == TS_FORGOTTEN:
                if ts.who_wants is not None or ts.n_dependents > 0:
                    continue                        # guard: still referenced
            elif target == TS_RELEASED:
                if ts.state == TS_ERRED or ts.state == TS_RELEASED:
                    continue
                if ts._needed() and not (ts.state == TS_MEMORY and ts.holder is None):
                    continue                        # guard: needed again
            self._transition(ts, target)
        return 0

    cdef int _transition(self, TaskState ts, int finish) except -1:
        cdef int start = ts.state
        ts._rec_target = NO_REC                     # explicit transition supersedes
        if start == finish:
            return 0
        if _TABLE[start][finish] == NULL and _VIA_RELEASED[start][finish]:
            self._transition1(ts, TS_RELEASED)
            if ts._rec_target != NO_REC or ts.state != TS_RELEASED:
                return 0                            # the released step decided
        return self._transition1(ts, finish)

    cdef int _transition1(self, TaskState ts, int finish) except -1:
        cdef int start = ts.state
        cdef TransitionFn fn = _TABLE[start][finish]
        if fn == NULL:
            raise InvalidTransition(ts.key, _NAMES[start], _NAMES[finish], self.story(ts.key))
        fn(self, ts)
        if ts.state != start:
            self._counts[start] -= 1
            self._counts[ts.state] += 1
            ts.prefix.counts[start] -= 1
            ts.prefix.counts[ts.state] += 1
            self._log(ts, start)
        if self.validate:
            self._validate_task(ts)
        return 0

    cdef void _log(self, TaskState ts, int start) noexcept:
        cdef Py_ssize_t pos = self._log_pos
        cdef Py_ssize_t wid = -1
        if ts.state == TS_PROCESSING and ts.processing_on is not None:
            wid = ts.processing_on.id
        elif ts.state == TS_MEMORY and ts.holder is not None:
            wid = ts.holder.id
        self._log_keys[pos] = ts.key
        self._log_stimuli[pos] = self._stimulus_id
        self._log_start[pos] = start
        self._log_finish[pos] = ts.state
        self._log_worker[pos] = wid
        self.n_transitions += 1
        pos += 1
        if pos == self.transition_log_length:
            pos = 0
        self._log_pos = pos
        if self._log_len < self.transition_log_length:
            self._log_len += 1

    cdef int _fill_slots(self) except -1:
        """Hand queued tasks to workers whose slots / resources freed up."""
        cdef TaskState ts
        cdef QueueKey k
        cdef list ids
        cdef cpp_set[QueueKey].iterator it
        cdef PyObject* found
        cdef int failures = 0
        self._filling = True
        try:
            while self._n_root_queued > 0 and not self._idle.empty():
                pop_heap(self._root_heap.begin(), self._root_heap.end(), _QUEUE_ORDER)
                k = self._root_heap.back()
                self._root_heap.pop_back()
                found = PyDict_GetItem(self._by_id, k.second.second)
                if found == NULL:
                    continue                        # stale: forgotten
                ts = <TaskState>found
                if ts.state != TS_QUEUED or ts._in_constrained:
                    continue                        # stale: left the queue
                self._transition(ts, TS_PROCESSING)
                if ts.state == TS_QUEUED:           # cannot happen; never spin
                    self._root_heap.push_back(k)
                    push_heap(self._root_heap.begin(), self._root_heap.end(), _QUEUE_ORDER)
                    break
                if ts.state == TS_PROCESSING:
                    self._place_sibling(ts)
        finally:
            self._filling = False
        if self._constrained_dirty:
            self._constrained_dirty = False
            ids = []
            it = self._constrained_queue.begin()
            while it != self._constrained_queue.end():
                ids.append(deref(it).second.second)
                inc(it)
            for tid in ids:
                ts = <TaskState>self._by_id[tid]
                if ts.state != TS_QUEUED:
                    continue
                self._transition(ts, TS_PROCESSING)
                if ts.state == TS_QUEUED:
                    # Bounded scan: after many misses in a row, stop; the next
                    # freed resource triggers another pass.
                    failures += 1
                    if failures >= 32:
                        break
                else:
                    failures = 0
        self._drain()
        return 0

    # ------------------------------------------------------------------
    # Handlers
    # ------------------------------------------------------------------

    cdef int _task_finished(self, WorkerState ws, TaskState ts, int64_t nbytes,
                            object typename, double duration, object data) except -1:
        cdef int state = ts.state
        if state == TS_PROCESSING:
            if duration >= 0:
                ts.prefix.add_duration(duration)
            ts.prefix.n_done += 1
            self._stream_record(ts, ws, duration, False)
            ts.nbytes = nbytes
            ts.typename = typename
            self._ctx_worker = ws
            self._ctx_data = data
            try:
                self._transition(ts, TS_MEMORY)
            finally:
                self._ctx_worker = None
                self._ctx_data = None
        elif state == TS_MEMORY:
            # Another copy was computed (e.g. a steal raced with execution).
            if not _holds(ts, ws):
                self._add_replica(ts, ws)
        else:
            # We no longer want this result (cancelled, rescheduled, ...).
            self._emit_free(ws, ts)
        return 0

    cdef void _stream_record(self, TaskState ts, WorkerState ws, double duration,
                             bint erred) noexcept:
        # One slot of the task stream per computed task: two list stores and three
        # array stores, no allocation. The stop time is when the result reached the
        # scheduler (a clock_gettime, ~20 ns); start = stop - the worker's own measure.
        cdef timespec now
        cdef Py_ssize_t pos = self.task_stream_total % self.task_stream_length
        clock_gettime(CLOCK_REALTIME, &now)
        self._stream_keys[pos] = ts.key
        self._stream_workers[pos] = ws.address
        self._stream_stop[pos] = now.tv_sec + now.tv_nsec * 1e-9
        self._stream_duration[pos] = duration if duration > 0 else 0.0
        self._stream_erred[pos] = erred
        self.task_stream_total += 1

    cdef int _task_erred(self, WorkerState ws, TaskState ts, object exception,
                         object traceback) except -1:
        if ts.state != TS_PROCESSING or ts.processing_on is not ws:
            return 0                                # stale report
        self._stream_record(ts, ws, -1.0, True)
        if ts.retries > 0:
            ts.retries -= 1
            self._rec(ts, TS_WAITING)               # via released: reschedule
            return 0
        ts.exception = exception
        ts.traceback = traceback
        ts.exception_blame = ts
        return self._transition(ts, TS_ERRED)

    cdef int _update_graph(self, UpdateGraph ev) except -1:
        cdef ClientState cs = self._client(ev.client)
        cdef dict tasks = self.tasks
        cdef list new_tasks = []
        cdef list prios = []
        cdef list keys = ev.task_keys, specs = ev.specs, dep_lists = ev.deps
        cdef list ranks = ev.ranks
        cdef TaskState ts, dts
        cdef Py_ssize_t i, j, n, first_id = self._next_task_id
        cdef int64_t gen = self._generation
        cdef int64_t uprio = -ev.priority
        cdef bint all_int = True
        cdef PyObject* found
        cdef list missing
        cdef object key, deps, dk, p, r
        n = len(keys)
        if len(specs) != n or len(dep_lists) != n or (ranks is not None and len(ranks) != n):
            raise ValueError("update-graph: the task columns differ in length")
        self._generation += 1

        # Pass 1: records for the keys we do not know yet.  Known keys keep
        # their definition (same key = same computation).
        for i in range(n):
            key = keys[i]
            ts = self._alloc_task(key, specs[i])
            if <object>PyDict_SetDefault(tasks, key, ts) is not ts:
                continue                            # known key (ts is discarded)
            self._register_task(ts)
            ts._dep_keys = dep_lists[i]
            ts.prio_user = uprio
            ts.prio_gen = gen
            p = ranks[i] if ranks is not None else None
            if p is None:
                ts.prio_rank = len(new_tasks)
            elif type(p) is int:
                ts.prio_rank = <int64_t>p
            else:
                all_int = False
            new_tasks.append(ts)
            prios.append(p)
        if not all_int:
            # Non-integer priorities (tuples): rank them once per graph.
            order = _priority_rank_order(prios)
            for j in range(len(order)):
                (<TaskState>new_tasks[<Py_ssize_t>order[j]]).prio_rank = j

        # Pass 2: link dependencies (any order inside the graph is fine).
        for i in range(len(new_tasks)):
            ts = <TaskState>new_tasks[i]
            deps = ts._dep_keys
            ts._dep_keys = None
            if not deps:
                continue
            missing = None
            for dk in deps:
                found = PyDict_GetItem(tasks, dk)
                if found == NULL or <TaskState>found is ts:
                    if missing is None:
                        missing = []
                    missing.append(dk)
                    continue
                dts = <TaskState>found
                if dts._mark == ts.id:
                    continue                        # duplicate edge
                dts._mark = ts.id
                if ts.dependencies is _NO_TASKS:
                    ts.dependencies = _new_list()
                ts.dependencies.append(dts)
                if dts.dependents is _NO_TASKS:
                    dts.dependents = _new_list()
                dts.dependents.append(ts)
                dts.n_dependents += 1
            if missing is not None:
                ts._fatal = MissingDependencyError(ts.key, missing)

        # Restrictions and options, for new tasks only.
        if ev.workers:
            for key, r in ev.workers.items():
                found = PyDict_GetItem(tasks, key)
                if found == NULL or (<TaskState>found).id < first_id or r is None:
                    continue
                (<TaskState>found).worker_restrictions = (
                    frozenset((r,)) if isinstance(r, str) else frozenset(r))
        if ev.allow_other_workers is True:
            for i in range(len(new_tasks)):
                (<TaskState>new_tasks[i]).loose_restrictions = True
        elif ev.allow_other_workers:
            for key in ev.allow_other_workers:
                found = PyDict_GetItem(tasks, key)
                if found != NULL and (<TaskState>found).id >= first_id:
                    (<TaskState>found).loose_restrictions = True
        if ev.resources:
            for key, r in ev.resources.items():
                found = PyDict_GetItem(tasks, key)
                if found != NULL and (<TaskState>found).id >= first_id and r:
                    (<TaskState>found).resources = {k: float(v) for k, v in r.items()}
        if isinstance(ev.retries, dict):
            for key, r in ev.retries.items():
                found = PyDict_GetItem(tasks, key)
                if found != NULL and (<TaskState>found).id >= first_id:
                    (<TaskState>found).retries = int(r)
        elif ev.retries:
            n = int(ev.retries)
            for i in range(len(new_tasks)):
                (<TaskState>new_tasks[i]).retries = n
        if ev.annotations:
            for key, r in ev.annotations.items():
                found = PyDict_GetItem(tasks, key)
                if found != NULL and (<TaskState>found).id >= first_id:
                    (<TaskState>found).annotations = r

        # New tasks that nobody wants and nothing depends on are dropped
        # again.  Pushed first, so they are popped last.
        for key in ev.keys:
            found = PyDict_GetItem(tasks, key)
            if found != NULL:
                (<TaskState>found)._mark = -2       # scratch: "wanted"
        for i in range(len(new_tasks)):
            ts = <TaskState>new_tasks[i]
            if ts.n_dependents == 0 and ts._mark != -2:
                self._rec(ts, TS_FORGOTTEN)
        return self._client_wants_cs(cs, ev.keys)

    cdef int _client_wants_cs(self, ClientState cs, list keys) except -1:
        cdef PyObject* found
        cdef TaskState ts
        cdef KeyInMemory km
        cdef KeyForgotten kf
        cdef list to_wait = None
        cdef Py_ssize_t i
        for key in keys:
            found = PyDict_GetItem(self.tasks, key)
            if found == NULL:
                kf = KeyForgotten.__new__(KeyForgotten)
                kf.stimulus_id = self._stimulus_id
                kf.clients = cs._as_clients
                kf.key = key
                self._out.append(kf)
                continue
            ts = <TaskState>found
            self._add_want(cs, ts)
            if ts.state == TS_MEMORY:
                km = KeyInMemory.__new__(KeyInMemory)
                km.stimulus_id = self._stimulus_id
                km.clients = cs._as_clients
                km.key = ts.key
                km.task_id = ts.id
                km.nbytes = ts.nbytes
                km.typename = ts.typename
                self._out.append(km)
            elif ts.state == TS_ERRED:
                self._report_erred(ts, cs._as_clients)
            elif ts.state == TS_RELEASED:
                if to_wait is None:
                    to_wait = []
                to_wait.append(ts)
        if to_wait is not None:
            for i in range(len(to_wait) - 1, -1, -1):
                self._rec(<TaskState>to_wait[i], TS_WAITING)
        return 0

    cdef int _client_wants(self, str client, list keys) except -1:
        return self._client_wants_cs(self._client(client), keys)

    cdef int _client_releases(self, str client, list keys) except -1:
        cdef object obj = self.clients.get(client)
        cdef ClientState cs
        cdef PyObject* found
        cdef TaskState ts
        if obj is None:
            return 0
        cs = <ClientState>obj
        for key in keys:
            found = PyDict_GetItem(self.tasks, key)
            if found == NULL:
                continue
            ts = <TaskState>found
            if _is_wanted_by(ts, cs):
                self._drop_want(cs, ts)
                self._maybe_release(ts)
        return 0

    cdef int _client_removed(self, str client) except -1:
        cdef object obj = self.clients.pop(client, None)
        cdef ClientState cs
        cdef TaskState ts
        if obj is None:
            return 0
        cs = <ClientState>obj
        if cs is self._faf:
            self._faf = None
        for t in list(cs.wants):
            ts = <TaskState>t
            self._drop_want(cs, ts)
            self._maybe_release(ts)
        return 0

    cdef int _cancel(self, Cancel ev) except -1:
        """Cancel keys for one client (force: for all clients).

        Dependents are cancelled too when nobody else keeps them (force: always);
        unwanted intermediate tasks are walked through, so a cancelled input
        also cancels this client's results computed from it."""
        cdef object obj = self.clients.get(ev.client)
        cdef ClientState cs = None if obj is None else <ClientState>obj
        cdef list stack = []
        cdef set seen = set()
        cdef TaskState ts, dts
        cdef list dropped
        cdef TaskCancelled tc
        cdef bint traverse
        if cs is None and not ev.force:
            return 0
        for key in ev.keys:
            obj = self.tasks.get(key)
            if obj is not None:
                stack.append(obj)
        stack.reverse()
        while stack:
            ts = <TaskState>stack.pop()
            if ts.state == TS_FORGOTTEN or ts.id in seen:
                continue
            seen.add(ts.id)
            dropped = []
            if ts.who_wants is None:
                traverse = True
            elif ev.force:
                dropped = _wanters(ts)
                traverse = True
            elif _is_wanted_by(ts, cs):
                dropped = [cs]
                traverse = type(ts.who_wants) is ClientState
            else:
                traverse = False
            if dropped:
                tc = TaskCancelled.__new__(TaskCancelled)
                tc.stimulus_id = self._stimulus_id
                tc.clients = tuple([(<ClientState>c).client_id for c in dropped])
                tc.key = ts.key
                self._out.append(tc)
                for c in dropped:
                    self._drop_want(<ClientState>c, ts)
            if traverse:
                for d in reversed(ts.dependents):
                    dts = <TaskState>d
                    if dts.state != TS_FORGOTTEN and dts.id not in seen:
                        stack.append(dts)
            self._maybe_release(ts)
        return 0

    cdef int _retry(self, Retry ev) except -1:
        """Retry erred keys: walk to the erred tasks that caused them (those
        without erred dependencies) and send those back to waiting; the
        erred -> released step then retries the dependents blamed on them."""
        cdef list stack = []
        cdef list roots = []
        cdef set seen = set()
        cdef TaskState ts, dts
        cdef bint has_erred_dep
        for key in ev.keys:
            obj = self.tasks.get(key)
            if obj is not None:
                stack.append(obj)
        while stack:
            ts = <TaskState>stack.pop()
            if ts.id in seen or ts.state != TS_ERRED:
                continue
            seen.add(ts.id)
            has_erred_dep = False
            for d in ts.dependencies:
                dts = <TaskState>d
                if dts.state == TS_ERRED:
                    has_erred_dep = True
                    stack.append(dts)
            if not has_erred_dep:
                roots.append(ts)
        for t in roots:
            self._rec(<TaskState>t, TS_WAITING)
        return 0

    cdef int _add_worker(self, AddWorker ev) except -1:
        cdef WorkerState ws
        if ev.address in self.workers:
            raise ValueError(f"worker {ev.address!r} is already registered")
        if ev.name != ev.address and (ev.name in self._names or ev.name in self.workers):
            raise ValueError(f"a worker named {ev.name!r} is already registered")
        if ev.nthreads < 1:
            raise ValueError(f"worker {ev.address!r}: nthreads must be >= 1")
        ws = WorkerState.__new__(WorkerState)
        ws.id = self._next_worker_id
        self._next_worker_id += 1
        ws.address = ev.address
        ws._as_holders = (ev.address,)
        ws.name = ev.name
        ws.nthreads = ev.nthreads
        ws.memory_limit = ev.memory_limit
        ws.resources = {k: float(v) for k, v in ev.resources.items()}
        ws.used_resources = {k: 0.0 for k in ws.resources}
        ws._proc_head = None
        ws._proc_tail = None
        ws.n_processing = 0
        ws.n_long_running = 0
        ws.has_what = {}
        ws.occupancy = 0.0
        ws.nbytes = 0
        if self._queuing:
            ws.slots = max(1, <Py_ssize_t>ceil(ev.nthreads * self.worker_saturation))
        else:
            ws.slots = 1 << 40
        ws.status = WS_RUNNING
        ws._is_idle = False
        ws._idle_pos = -1
        ws.last_seen = ev.now
        ws.metrics = None
        ws._incoming = 0
        ws._outgoing = 0
        ws._tally = 0
        ws._mark = -1
        ws._free_ids = None
        ws._free_keys = None
        self.workers[ws.address] = ws
        if ws.name != ws.address:
            self._names[ws.name] = ws
        self._addresses_by_id[ws.id] = ws.address
        self._rebuild_running()
        self._update_idle(ws)
        # Tasks that had no valid worker may have one now.
        for t in list(self._unrunnable):
            self._rec(<TaskState>t, TS_PROCESSING)
        self._constrained_dirty = True
        return 0

    cdef int _remove_worker(self, RemoveWorker ev) except -1:
        cdef object obj = self.workers.pop(ev.address, None)
        cdef WorkerState ws
        cdef TaskState ts
        cdef QueueKey k
        cdef cpp_set[QueueKey].iterator it
        if obj is None:
            return 0
        ws = <WorkerState>obj
        ws.status = WS_CLOSED                       # nothing is sent to it any more
        if self._names.get(ws.name) is ws:
            del self._names[ws.name]
        self._rebuild_running()
        self._update_idle(ws)
        ws._free_ids = None
        ws._free_keys = None
        # Steals towards it are void.
        for t, thief in list(self._steals.items()):
            if thief is ws:
                self._clear_steal(<TaskState>t)
        # Its replicas are gone.
        for t in list(ws.has_what):
            ts = <TaskState>t
            self._remove_replica(ts, ws)
            if ts.holder is None and ts.state == TS_MEMORY:
                self._transition(ts, TS_RELEASED)
        # What it was running is rescheduled; unless the exit was expected,
        # each task counts a suspicion and too many make it KilledWorker.
        for t in _proc_list(ws):
            ts = <TaskState>t
            if not ev.safe:
                ts.suspicious += 1
            if ts.suspicious > self.allowed_failures:
                ts.exception = KilledWorker(ts.key, ws.address, self.allowed_failures,
                                            ev.reason)
                ts.traceback = None
                ts.exception_blame = ts
                self._rec(ts, TS_ERRED)
            else:
                self._rec(ts, TS_WAITING)
        # Resource-queued tasks may have lost their last valid worker.
        it = self._constrained_queue.begin()
        while it != self._constrained_queue.end():
            k = deref(it)
            self._rec(<TaskState>self._by_id[k.second.second], TS_PROCESSING)
            inc(it)
        return 0

    cdef int _balance(self, BalanceTick ev) except -1:
        """Work stealing: move not-yet-started tasks from saturated to idle
        workers.  Only requests are emitted here; StealResponse moves."""
        cdef list thieves = []
        cdef list victims = []
        cdef WorkerState ws, thief, best
        cdef TaskState ts, dts
        cdef Py_ssize_t surplus, room, best_free, busy, i
        cdef int64_t moved
        cdef double transfer
        cdef StealRequest sr
        if not self.work_stealing or len(self._running) < 1:
            return 0
        for w in self._running:
            ws = <WorkerState>w
            busy = ws.n_processing - ws.n_long_running
            if busy + ws._incoming < ws.nthreads:
                thieves.append(ws)
            elif busy - ws._outgoing > ws.nthreads:
                victims.append(ws)
        if len(self._running) < len(self.workers):
            # Paused workers start nothing new: what waits on them may go elsewhere.
            for w in self.workers.values():
                ws = <WorkerState>w
                if (ws.status == WS_PAUSED and ws.n_processing - ws.n_long_running
                        - ws._outgoing > ws.nthreads):
                    victims.append(ws)
        if not thieves or not victims:
            return 0
        victims.sort(key=_victim_order)
        for v in victims:
            ws = <WorkerState>v
            surplus = ws.n_processing - ws.n_long_running - ws._outgoing - ws.nthreads
            # The lowest-priority tasks would run last on the victim.
            candidates = [t for t in _proc_list(ws)
                          if (<TaskState>t).worker_restrictions is None
                          and (<TaskState>t).resources is None
                          and (<TaskState>t)._steal_thief is None
                          and not (<TaskState>t)._seceded]
            candidates.sort(key=_steal_order)
            for t in candidates:
                if surplus <= 0 or not thieves:
                    break
                ts = <TaskState>t
                best = None
                best_free = -1
                for th in thieves:
                    thief = <WorkerState>th
                    room = (thief.nthreads - thief.n_processing + thief.n_long_running
                            - thief._incoming)
                    if room > best_free:
                        best_free = room
                        best = thief
                thief = best
                moved = 0
                for d in ts.dependencies:
                    dts = <TaskState>d
                    if not _holds(dts, thief):
                        moved += dts.nbytes
                transfer = moved / self.bandwidth
                if transfer > self.steal_ratio * ts.est_duration:
                    continue                        # cheaper to wait than to move data
                ts._steal_thief = thief
                self._steals[ts] = thief
                thief._incoming += 1
                ws._outgoing += 1
                surplus -= 1
                if (thief.nthreads - thief.n_processing + thief.n_long_running
                        - thief._incoming <= 0):
                    thieves.remove(thief)
                sr = StealRequest.__new__(StealRequest)
                sr.stimulus_id = self._stimulus_id
                sr.worker = ws.address
                sr.task_id = ts.id
                sr.key = ts.key
                self._emit_to_worker(ws, sr)
            if not thieves:
                break
        return 0

    cdef int _steal_response(self, StealResponse ev) except -1:
        cdef TaskState ts = self._task_from(ev.task_id, ev.key)
        cdef WorkerState thief, victim
        cdef int start
        if ts is None or ts._steal_thief is None:
            return 0                                # already settled
        thief = ts._steal_thief
        self._clear_steal(ts)
        if ts.state != TS_PROCESSING or ts.processing_on is None \
                or ts.processing_on.address != ev.victim:
            return 0                                # finished, released or moved meanwhile
        if ev.state not in _MOVABLE:
            return 0                                # it started: leave it
        victim = self._exit_processing(ts)         # the victim already dropped it
        start = ts.state
        if thief.status == WS_RUNNING:
            self._add_to_processing(ts, thief)
        else:
            self._dispatch(ts)                      # thief gone: decide again
        self._counts[start] -= 1
        self._counts[ts.state] += 1
        ts.prefix.counts[start] -= 1
        ts.prefix.counts[ts.state] += 1
        self._log(ts, start)
        if self.validate:
            self._validate_task(ts)
        return 0

    cdef int _missing_data(self, MissingData ev) except -1:
        cdef TaskState ts = self._task_from(-1, ev.key)
        cdef object obj = self.workers.get(ev.holder)
        cdef WorkerState ws
        if ts is None or obj is None:
            return 0
        ws = <WorkerState>obj
        if _holds(ts, ws):
            self._remove_replica(ts, ws)
            if ts.holder is None and ts.state == TS_MEMORY:
                self._transition(ts, TS_RELEASED)   # recompute if still needed
        return 0

    cdef int _release_worker_data(self, ReleaseWorkerData ev) except -1:
        cdef object obj = self.workers.get(ev.worker)
        cdef WorkerState ws
        cdef TaskState ts
        if obj is None:
            return 0
        ws = <WorkerState>obj
        for key in ev.keys:
            ts = self._task_from(-1, key)
            if ts is None or not _holds(ts, ws):
                continue
            self._remove_replica(ts, ws)
            if ts.holder is None and ts.state == TS_MEMORY:
                self._transition(ts, TS_RELEASED)
        return 0

    cdef int _add_keys(self, AddKeys ev) except -1:
        cdef object obj = self.workers.get(ev.worker)
        cdef WorkerState ws
        cdef TaskState ts
        if obj is None:
            return 0
        ws = <WorkerState>obj
        for key in ev.keys:
            ts = self._task_from(-1, key)
            if ts is None:
                self._emit_unknown_free(ws, -1, key)
            elif ts.state == TS_MEMORY:
                if not _holds(ts, ws):
                    self._add_replica(ts, ws)
            else:
                self._emit_free(ws, ts)             # we do not want that copy
        return 0

    cdef int _update_data(self, UpdateData ev) except -1:
        """Scatter: keys are in memory on the given workers."""
        cdef ClientState cs = None if ev.client is None else self._client(ev.client)
        cdef TaskState ts
        cdef list holders
        cdef int64_t nb
        cdef WorkerState ws
        for key, addresses in ev.who_has.items():
            holders = []
            for a in addresses:
                obj = self.workers.get(a)
                if obj is not None and obj not in holders:
                    holders.append(obj)
            if not holders:
                if cs is not None:
                    kf = KeyForgotten.__new__(KeyForgotten)
                    (<KeyForgotten>kf).stimulus_id = self._stimulus_id
                    (<KeyForgotten>kf).clients = cs._as_clients
                    (<KeyForgotten>kf).key = key
                    self._out.append(kf)
                continue
            nb = ev.nbytes.get(key, 0)
            ts = self._task_from(-1, key)
            if ts is None:
                ts = self._new_task(key, None)
                ts._pure_data = True
                ts.prio_gen = self._generation
            if cs is not None:
                self._add_want(cs, ts)
            if ts.state == TS_MEMORY:
                for w in _holder_list(ts):
                    (<WorkerState>w).nbytes += nb - ts.nbytes
                ts.nbytes = nb
                for w in holders:
                    if not _holds(ts, <WorkerState>w):
                        self._add_replica(ts, <WorkerState>w)
                if cs is not None:
                    km = KeyInMemory.__new__(KeyInMemory)
                    (<KeyInMemory>km).stimulus_id = self._stimulus_id
                    (<KeyInMemory>km).clients = cs._as_clients
                    (<KeyInMemory>km).key = ts.key
                    (<KeyInMemory>km).task_id = ts.id
                    (<KeyInMemory>km).nbytes = ts.nbytes
                    (<KeyInMemory>km).typename = ts.typename
                    self._out.append(km)
                continue
            if ts.state != TS_RELEASED:
                self._transition1(ts, TS_RELEASED)  # drop whatever was going on
                ts._rec_target = NO_REC             # the data decides, not the released step
            ts.nbytes = nb
            self._ctx_holders = holders
            self._transition1(ts, TS_MEMORY)
            self._ctx_holders = None
        self._generation += 1
        return 0

    cdef int _worker_paused(self, WorkerState ws, bint paused) except -1:
        """A heartbeat says whether the worker is paused (over its memory pause
        threshold, worker_memory.py). A paused worker leaves the running set: no new
        tasks, no root slots; stealing may take its queued tasks (see _balance)."""
        if paused and ws.status == WS_RUNNING:
            ws.status = WS_PAUSED
        elif not paused and ws.status == WS_PAUSED:
            ws.status = WS_RUNNING
            for t in list(self._unrunnable):       # they may have a worker again
                self._rec(<TaskState>t, TS_PROCESSING)
            self._constrained_dirty = True
        else:
            return 0
        self._rebuild_running()
        self._update_idle(ws)
        return 0

    cdef int _retire_workers(self, RetireWorkers ev) except -1:
        """Graceful retirement: the chosen workers get no new tasks and their
        unique data is copied to the remaining workers (AcquireReplicas).  The
        server polls can_close(address) and then sends RemoveWorker(safe=True)."""
        cdef list chosen = []
        cdef list tasks = []
        cdef WorkersRetiring wr
        cdef WorkerState ws
        cdef Py_ssize_t i, before = len(self._out)
        if ev.workers is not None:
            for a in ev.workers:
                obj = self.workers.get(a)
                if obj is not None and (<WorkerState>obj).status in (WS_RUNNING, WS_PAUSED):
                    chosen.append(obj)
        else:
            order = sorted(self._running, key=_retire_order)
            chosen = order[:max(0, ev.n)]
        # Never retire the last running workers: the data needs a home. (Paused
        # workers may go as long as a running one stays.)
        running_chosen = [w for w in chosen if (<WorkerState>w).status == WS_RUNNING]
        if len(running_chosen) >= len(self._running):
            if self._running:
                chosen.remove(running_chosen[len(running_chosen) - 1])  # no wraparound here
            else:
                chosen = []
        for w in chosen:
            ws = <WorkerState>w
            ws.status = WS_CLOSING
            self._update_idle(ws)
        self._rebuild_running()
        for w in chosen:
            tasks.extend((<WorkerState>w).has_what)
        self._evacuate(tasks, True)
        wr = WorkersRetiring.__new__(WorkersRetiring)
        wr.stimulus_id = self._stimulus_id
        wr.workers = [(<WorkerState>w).address for w in chosen]
        wr.n_replicas = 0
        for i in range(before, len(self._out)):
            instr = self._out[i]
            if type(instr) is AcquireReplicas:
                wr.n_replicas += len((<AcquireReplicas>instr).who_has)
        self._out.append(wr)
        return 0

    cdef int _evacuate(self, list tasks, bint exclude_closing) except -1:
        """Ask running workers to copy tasks whose only replicas are on closing
        workers.  Recipients are chosen by least bytes held (planned included)."""
        cdef dict plan = {}
        cdef dict planned = {}
        cdef TaskState ts
        cdef WorkerState ws, best
        cdef bint safe
        cdef AcquireReplicas ar
        if not self._running:
            return 0
        for t in tasks:
            ts = <TaskState>t
            if ts.state != TS_MEMORY:
                continue
            safe = False
            for w in _holder_list(ts):
                if (<WorkerState>w).status == WS_RUNNING:
                    safe = True
                    break
            if safe:
                continue
            best = None
            for w in self._running:
                ws = <WorkerState>w
                if best is None or ws.nbytes + planned.get(ws, 0) < \
                        best.nbytes + planned.get(best, 0):
                    best = ws
            planned[best] = planned.get(best, 0) + ts.nbytes
            plan.setdefault(best, []).append(_dep_entry(ts))
        for w, entries in plan.items():
            ar = AcquireReplicas.__new__(AcquireReplicas)
            ar.stimulus_id = self._stimulus_id
            ar.worker = (<WorkerState>w).address
            ar.who_has = entries
            self._emit_to_worker(<WorkerState>w, ar)
        return 0

    # ------------------------------------------------------------------
    # Helpers of the transitions
    # ------------------------------------------------------------------

    cdef TaskState _task_from(self, Py_ssize_t task_id, object key):
        cdef PyObject* found
        if task_id >= 0:
            found = PyDict_GetItem(self._by_id, task_id)
        else:
            try:
                found = PyDict_GetItem(self.tasks, key)
            except TypeError:                       # unhashable: cannot be ours
                return None
        if found == NULL:
            return None
        return <TaskState>found

    cdef TaskState _alloc_task(self, object key, object run_spec):
        """A fresh record, not yet registered (see _register_task)."""
        cdef TaskState ts = TaskState.__new__(TaskState)
        ts.id = self._next_task_id
        ts._id_obj = ts.id
        ts.key = key
        ts.run_spec = run_spec
        ts.state = TS_RELEASED
        ts.dependencies = _NO_TASKS
        ts.dependents = _NO_TASKS
        ts._rec_target = NO_REC
        ts._mark = -1
        return ts

    cdef void _register_task(self, TaskState ts):
        """Make ts known by id (it is already in self.tasks)."""
        self._next_task_id += 1
        ts.prefix = self._prefix_of(ts.key)
        self._by_id[ts._id_obj] = ts
        self._counts[TS_RELEASED] += 1
        ts.prefix.counts[TS_RELEASED] += 1

    cdef TaskState _new_task(self, object key, object run_spec):
        cdef TaskState ts = self._alloc_task(key, run_spec)
        self.tasks[key] = ts
        self._register_task(ts)
        return ts

    cdef PrefixState _prefix_of(self, object key):
        cdef PrefixState last = self._last_prefix
        cdef object name = key
        cdef str pname
        cdef const char* data
        cdef Py_ssize_t n
        cdef PyObject* found
        cdef PrefixState ps
        # Fast path: consecutive keys of one collection share their prefix;
        # compare bytes in place instead of slicing and hashing a new string.
        # (last.name never contains "-", so a match is the key's prefix.)
        while type(name) is tuple and len(<tuple>name) > 0:
            name = (<tuple>name)[0]
        if last is not None and type(name) is str:
            n = PyUnicode_GET_LENGTH(last.name)
            if PyUnicode_IS_COMPACT_ASCII(name) and PyUnicode_IS_COMPACT_ASCII(last.name) \
                    and PyUnicode_GET_LENGTH(name) > n:
                data = <const char*>PyUnicode_DATA(name)
                if data[n] == 45 and memcmp(data, PyUnicode_DATA(last.name), n) == 0:   # "-"
                    return last
        pname = _key_prefix(name)
        found = PyDict_GetItem(self._prefixes, pname)
        if found != NULL:
            ps = <PrefixState>found
        else:
            ps = PrefixState(pname)
            self._prefixes[pname] = ps
        self._last_prefix = ps
        return ps

    cdef ClientState _client(self, str client):
        cdef object obj = self.clients.get(client)
        if obj is None:
            obj = ClientState(client)
            self.clients[client] = obj
            if client == FIRE_AND_FORGET:
                self._faf = <ClientState>obj
        return <ClientState>obj

    cdef void _add_want(self, ClientState cs, TaskState ts) noexcept:
        cdef object ww = ts.who_wants
        if ww is None:
            ts.who_wants = cs
        elif type(ww) is ClientState:
            if ww is not cs:
                ts.who_wants = {ww: None, cs: None}
        else:
            (<dict>ww)[cs] = None
        cs.wants[ts] = None

    cdef void _drop_want(self, ClientState cs, TaskState ts) noexcept:
        cdef object ww = ts.who_wants
        if ww is cs:
            ts.who_wants = None
        elif ww is not None and type(ww) is not ClientState:
            (<dict>ww).pop(cs, None)
            if len(<dict>ww) == 1:
                ts.who_wants = next(iter(<dict>ww))   # back to the compact form
        cs.wants.pop(ts, None)

    cdef void _maybe_release(self, TaskState ts) noexcept:
        """Called when a client let go of ``ts``."""
        if ts.who_wants is not None:
            return
        if ts.n_dependents == 0:
            self._rec(ts, TS_FORGOTTEN)
        elif ts.n_waiters == 0 and ts.state != TS_RELEASED and ts.state != TS_ERRED:
            self._rec(ts, TS_RELEASED)

    cdef void _after_released(self, TaskState ts) noexcept:
        """Decide what a task that just became released does next."""
        if ts._needed():
            self._rec(ts, TS_WAITING)
        elif ts.n_dependents == 0:
            self._rec(ts, TS_FORGOTTEN)

    cdef void _release_dependencies(self, TaskState ts) noexcept:
        """``ts`` leaves the active states: it no longer needs its inputs."""
        cdef list deps = ts.dependencies
        cdef TaskState dts
        cdef Py_ssize_t i
        for i in range(len(deps)):
            dts = <TaskState>deps[i]
            dts.n_waiters -= 1
            if dts.n_waiters == 0 and dts.who_wants is None:
                self._rec(dts, TS_RELEASED)

    cdef void _dependency_arrived(self, TaskState ts) noexcept:
        """``ts`` reached memory: its waiting dependents are one step closer."""
        cdef list dependents = ts.dependents
        cdef TaskState dts
        cdef Py_ssize_t i
        for i in range(len(dependents)):
            dts = <TaskState>dependents[i]
            if dts.state == TS_WAITING:
                dts.n_waiting_on -= 1
                if dts.n_waiting_on == 0:
                    self._rec(dts, TS_PROCESSING)

    cdef int _place_sibling(self, TaskState ts) except -1:
        """The next queued root goes with ``ts`` when the two feed a common
        dependent (e.g. blocks (i, j) and (j, i) of ``x + x.T``, or the two
        inputs of a reduction step): one root beyond the slots, so that
        dependent needs no transfer. Otherwise refills alternate workers and
        split nearly every such pair."""
        cdef QueueKey k
        cdef PyObject* found
        cdef TaskState nxt
        cdef WorkerState ws = ts.processing_on
        if not ts.dependents or self._n_root_queued == 0:
            return 0
        while not self._root_heap.empty():
            k = self._root_heap.front()
            found = PyDict_GetItem(self._by_id, k.second.second)
            if found != NULL:
                nxt = <TaskState>found
                if nxt.state == TS_QUEUED and not nxt._in_constrained:
                    break
            # stale entry at the top: drop it
            pop_heap(self._root_heap.begin(), self._root_heap.end(), _QUEUE_ORDER)
            self._root_heap.pop_back()
        else:
            return 0
        if not nxt.dependents or not _share_dependent(ts, nxt):
            return 0
        pop_heap(self._root_heap.begin(), self._root_heap.end(), _QUEUE_ORDER)
        self._root_heap.pop_back()
        self._sibling_to = ws
        self._transition(nxt, TS_PROCESSING)
        self._sibling_to = None
        return 0

    cdef int _dispatch(self, TaskState ts) except -1:
        """Place a ready task: processing, or the outcome queued / no-worker."""
        cdef int outcome = self._decide(ts)
        cdef int state = ts.state
        if outcome == TS_PROCESSING:
            self._leave_ready_containers(ts)
            return self._add_to_processing(ts, self._decided)
        if outcome == state:
            return 0
        self._leave_ready_containers(ts)
        if outcome == TS_QUEUED:
            ts._in_constrained = ts.resources is not None or ts.worker_restrictions is not None
            if ts._in_constrained:
                self._constrained_queue.insert(_qkey(ts))
            else:
                self._root_heap.push_back(_qkey(ts))
                push_heap(self._root_heap.begin(), self._root_heap.end(), _QUEUE_ORDER)
                self._n_root_queued += 1
        else:
            self._unrunnable[ts] = None
        ts.state = outcome
        return 0

    cdef void _leave_ready_containers(self, TaskState ts) noexcept:
        if ts.state == TS_QUEUED:
            if ts._in_constrained:
                self._constrained_queue.erase(_qkey(ts))
            else:
                self._n_root_queued -= 1            # its heap entry is now stale
                if <Py_ssize_t>self._root_heap.size() > 2 * self._n_root_queued + 1024:
                    self._compact_root_heap()
        elif ts.state == TS_NO_WORKER:
            self._unrunnable.pop(ts, None)

    cdef void _compact_root_heap(self):
        """Drop the stale entries of the root heap (and duplicates)."""
        cdef vector[QueueKey] live
        cdef QueueKey k
        cdef PyObject* found
        cdef TaskState ts
        cdef Py_ssize_t i
        cdef set seen = set()
        for i in range(<Py_ssize_t>self._root_heap.size()):
            k = self._root_heap[i]
            found = PyDict_GetItem(self._by_id, k.second.second)
            if found == NULL:
                continue
            ts = <TaskState>found
            if ts.state == TS_QUEUED and not ts._in_constrained and ts.id not in seen:
                seen.add(ts.id)
                live.push_back(k)
        make_heap(live.begin(), live.end(), _QUEUE_ORDER)
        self._root_heap.swap(live)

    cdef int _decide(self, TaskState ts) except -1:
        cdef WorkerState ws
        self._decided = None
        if ts.worker_restrictions is not None or ts.resources is not None:
            return self._decide_restricted(ts)
        if not ts.dependencies and self._queuing:
            # Roots always pass through the queue, so they are released in
            # priority order; _fill_slots (end of stimulus) places them.
            if not self._filling:
                return TS_QUEUED
            # Co-assignment: consecutive roots (in priority order, so usually
            # neighbours in the graph, e.g. the two inputs of one reduction
            # step) stay on one worker while it is open, instead of
            # alternating workers and making every sibling pair a transfer.
            ws = self._last_root
            if self._sibling_to is not None:
                ws = self._sibling_to            # see _place_sibling
            elif (sib := _sibling_home(ts)) is not None:
                ws = sib                         # where a sibling already went
            elif ws is None or not ws._is_idle:
                ws = self._best_idle()
                if ws is None:
                    return TS_QUEUED
                self._last_root = ws
            self._decided = ws
            return TS_PROCESSING
        if not self._running:
            return TS_NO_WORKER
        self._decided = self._pick(ts, None)
        return TS_PROCESSING

    cdef int _decide_restricted(self, TaskState ts) except -1:
        cdef list valid = []
        cdef list other = []
        cdef list fit
        cdef WorkerState ws
        cdef frozenset r = ts.worker_restrictions
        cdef dict need = ts.resources
        cdef bint ok
        for w in self._running:
            ws = <WorkerState>w
            if need is not None:
                ok = True
                for name, amount in need.items():
                    if ws.resources.get(name, 0.0) < amount:
                        ok = False
                        break
                if not ok:
                    continue
            if r is None or ws.address in r or ws.name in r:
                valid.append(ws)
            else:
                other.append(ws)
        if not valid and ts.loose_restrictions:
            valid = other
        if not valid:
            return TS_NO_WORKER
        if need is not None:
            fit = []
            for w in valid:
                ws = <WorkerState>w
                ok = True
                for name, amount in need.items():
                    if ws.resources[name] - ws.used_resources.get(name, 0.0) < amount - 1e-9:
                        ok = False
                        break
                if ok:
                    fit.append(ws)
            if not fit:
                return TS_QUEUED
            valid = fit
        if self._queuing and not ts.dependencies:
            # Restricted root tasks respect the slots too.
            fit = [w for w in valid if self._is_open(<WorkerState>w)]
            if not fit:
                return TS_QUEUED
            valid = fit
        self._decided = self._pick(ts, valid)
        return TS_PROCESSING

    cdef WorkerState _pick(self, TaskState ts, list candidates):
        """Data locality, then occupancy: min bytes_to_move / bandwidth +
        occupancy / nthreads over the candidates.  None means: the running
        holders of the dependencies plus the least-loaded idle worker (so a
        cheap-to-move input does not pile work onto one worker), or all
        running workers if no holder runs.  Ties: fewer processing tasks per
        thread, then the lower worker id."""
        cdef list deps = ts.dependencies
        cdef list wh
        cdef TaskState dts
        cdef WorkerState ws, idle
        cdef Py_ssize_t i, j, n = len(deps)
        cdef int64_t total = 0, stamp
        self._stamp += 1
        stamp = self._stamp
        self._scratch.clear()
        for i in range(n):
            dts = <TaskState>deps[i]
            total += dts.nbytes
            ws = dts.holder
            wh = dts.more_holders
            j = 0
            while ws is not None:
                if ws._mark != stamp:
                    ws._mark = stamp
                    ws._tally = 0
                    if ws.status == WS_RUNNING:
                        self._scratch.push_back(<PyObject*>ws)
                ws._tally += dts.nbytes
                if wh is None or j >= len(wh):
                    break
                ws = <WorkerState>wh[j]
                j += 1
        self._best = None
        if candidates is not None:
            for i in range(len(candidates)):
                self._consider(<WorkerState>candidates[i], total, stamp)
        elif self._scratch.empty():
            for i in range(len(self._running)):
                self._consider(<WorkerState>self._running[i], total, stamp)
        else:
            for i in range(<Py_ssize_t>self._scratch.size()):
                self._consider(<WorkerState>self._scratch[i], total, stamp)
            idle = self._best_idle()
            if idle is not None and idle._mark != stamp:
                self._consider(idle, total, stamp)
        ws = self._best
        self._best = None
        return ws

    cdef inline void _consider(self, WorkerState ws, int64_t total, int64_t stamp) noexcept:
        """_pick's objective for one candidate; keeps the best in self._best."""
        cdef double cost = ws.occupancy / ws.nthreads
        cdef double load = ws.n_processing / <double>ws.nthreads
        cdef WorkerState best = self._best
        if ws._mark == stamp:
            cost += (total - ws._tally) / self.bandwidth
        else:
            cost += total / self.bandwidth
        if best is None or cost < self._best_cost or (
                cost == self._best_cost and (load < self._best_load or
                                             (load == self._best_load and ws.id < best.id))):
            self._best = ws
            self._best_cost = cost
            self._best_load = load

    cdef WorkerState _best_idle(self):
        """The idle worker with the fewest processing tasks per thread (among
        the first 64 idle workers: bounded cost on huge clusters)."""
        cdef WorkerState ws, best = None
        cdef double load, best_load = 0.0
        cdef Py_ssize_t i, n = self._idle.size()
        if n > 64:
            n = 64
        for i in range(n):
            ws = <WorkerState>self._idle[i]
            load = ws.n_processing / <double>ws.nthreads
            if best is None or load < best_load or (load == best_load and ws.id < best.id):
                best = ws
                best_load = load
        return best

    cdef int _add_to_processing(self, TaskState ts, WorkerState ws) except -1:
        cdef double d = ts.prefix.duration_average
        if d < 0:
            d = self.unknown_task_duration
        ts.processing_on = ws
        _proc_push(ws, ts)
        ts.est_duration = d
        ws.occupancy += d
        if ts.resources is not None:
            for name, amount in ts.resources.items():
                ws.used_resources[name] = ws.used_resources.get(name, 0.0) + amount
        ts.state = TS_PROCESSING
        self._update_idle(ws)
        self._emit_to_worker(ws, _compute_task(ts, ws, self._stimulus_id))
        return 0

    cdef WorkerState _exit_processing(self, TaskState ts):
        cdef WorkerState ws = ts.processing_on
        _proc_unlink(ws, ts)
        if ws.n_processing:
            ws.occupancy -= ts.est_duration
            if ws.occupancy < 0:
                ws.occupancy = 0.0
        else:
            ws.occupancy = 0.0                      # no float drift when empty
        if ts.resources is not None:
            for name, amount in ts.resources.items():
                ws.used_resources[name] = ws.used_resources[name] - amount
            self._constrained_dirty = True
        elif not self._constrained_queue.empty():
            self._constrained_dirty = True          # a slot freed: restricted roots
        if ts._steal_thief is not None:
            self._clear_steal(ts)               # needs processing_on (the victim)
        ts.processing_on = None
        if ts._seceded:
            ts._seceded = False
            ws.n_long_running -= 1
            ws.slots -= 1                           # the seceded task gave its slot back
        self._update_idle(ws)
        return ws

    cdef inline bint _is_open(self, WorkerState ws) noexcept:
        """May this worker take another root task?  Below its slots, yes.
        Beyond them, only while its processing work is known to be tiny: the
        learned durations of what it holds add up to less than
        ``tiny_task_backlog`` seconds per thread (an unknown duration counts
        as ``unknown_task_duration``, so this never applies to new prefixes).
        Two slots per worker would make a stream of microsecond tasks wait a
        scheduler round trip each (~13k/s on 2 workers); a ~2 ms backlog keeps
        memory bounded just the same, since tiny tasks make small results."""
        if ws.status != WS_RUNNING:
            return False
        if ws.n_processing < ws.slots:
            return True
        return (ws.occupancy < self.tiny_task_backlog * ws.nthreads
                and ws.n_processing < ws.slots + _TINY_MAX_EXTRA * ws.nthreads)

    cdef void _update_idle(self, WorkerState ws) noexcept:
        cdef bint idle = self._is_open(ws)
        if idle == ws._is_idle:
            return
        cdef WorkerState last
        cdef Py_ssize_t pos
        ws._is_idle = idle
        if idle:
            ws._idle_pos = self._idle.size()
            self._idle.push_back(<PyObject*>ws)
        else:
            pos = ws._idle_pos
            last = <WorkerState>self._idle.back()
            self._idle[pos] = <PyObject*>last
            last._idle_pos = pos
            self._idle.pop_back()
            ws._idle_pos = -1

    cdef void _add_replica(self, TaskState ts, WorkerState ws) noexcept:
        if ts.holder is None:
            ts.holder = ws
        else:
            if ts.more_holders is None:
                ts.more_holders = _new_list()
            ts.more_holders.append(ws)
        ws.has_what[ts] = None
        ws.nbytes += ts.nbytes

    cdef void _remove_replica(self, TaskState ts, WorkerState ws) noexcept:
        if ts.holder is ws:
            if ts.more_holders:
                ts.holder = <WorkerState>ts.more_holders.pop()
            else:
                ts.holder = None
        else:
            ts.more_holders.remove(ws)
        del ws.has_what[ts]
        ws.nbytes -= ts.nbytes

    cdef void _clear_steal(self, TaskState ts) noexcept:
        cdef WorkerState thief = ts._steal_thief
        if thief is None:
            return
        thief._incoming -= 1
        if ts.processing_on is not None:
            ts.processing_on._outgoing -= 1
        ts._steal_thief = None
        self._steals.pop(ts, None)

    cdef void _rebuild_running(self):
        self._running = [w for w in self.workers.values()
                         if (<WorkerState>w).status == WS_RUNNING]

    # ------------------------------------------------------------------
    # Emitting
    # ------------------------------------------------------------------

    cdef void _emit_free(self, WorkerState ws, TaskState ts) noexcept:
        if ws.status == WS_CLOSED:
            return
        if ws._free_ids is None:
            ws._free_ids = [ts._id_obj]
            ws._free_keys = [ts.key]
            self._free_dirty.append(ws)
        else:
            ws._free_ids.append(ts._id_obj)
            ws._free_keys.append(ts.key)

    def _emit_unknown_free(self, WorkerState ws, Py_ssize_t task_id, key):
        """FreeKeys for a task we do not know (any more): the worker drops it."""
        cdef FreeKeys fk
        self._flush_frees(ws)
        fk = FreeKeys.__new__(FreeKeys)
        fk.stimulus_id = self._stimulus_id
        fk.worker = ws.address
        fk.task_ids = [task_id]
        fk.keys = [key]
        self._out.append(fk)

    cdef void _flush_frees(self, WorkerState ws) noexcept:
        cdef FreeKeys fk
        if ws._free_ids is None:
            return
        fk = FreeKeys.__new__(FreeKeys)
        fk.stimulus_id = self._stimulus_id
        fk.worker = ws.address
        fk.task_ids = ws._free_ids
        fk.keys = ws._free_keys
        ws._free_ids = None
        ws._free_keys = None
        self._out.append(fk)

    cdef void _emit_to_worker(self, WorkerState ws, Instruction instr) noexcept:
        if ws._free_ids is not None:
            self._flush_frees(ws)                   # keep per-worker order
        self._out.append(instr)

    cdef tuple _client_ids(self, TaskState ts):
        cdef object ww = ts.who_wants
        if ww is None:
            return _EMPTY
        if type(ww) is ClientState:
            return (<ClientState>ww)._as_clients
        return tuple([(<ClientState>c).client_id for c in <dict>ww])

    cdef void _report_memory(self, TaskState ts, object data):
        cdef KeyInMemory km = KeyInMemory.__new__(KeyInMemory)
        km.stimulus_id = self._stimulus_id
        km.clients = self._client_ids(ts)
        km.key = ts.key
        km.task_id = ts.id
        km.nbytes = ts.nbytes
        km.typename = ts.typename
        km.data = data
        self._out.append(km)
        if self._faf is not None and _is_wanted_by(ts, self._faf):
            self._drop_want(self._faf, ts)
            self._maybe_release(ts)

    cdef void _report_erred(self, TaskState ts, tuple clients):
        cdef TaskErredReport te = TaskErredReport.__new__(TaskErredReport)
        cdef TaskState blame = ts.exception_blame
        te.stimulus_id = self._stimulus_id
        te.clients = clients
        te.key = ts.key
        te.exception = blame.exception
        te.traceback = blame.traceback
        te.blame_key = blame.key
        self._out.append(te)

    # ------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------

    cdef int _validate_task(self, TaskState ts) except -1:
        cdef int st = ts.state
        cdef TaskState dts
        cdef Py_ssize_t n_not_mem = 0, n_active = 0, n_live = 0
        where = f"task {ts.key!r} in state {_NAMES[st]}"
        for d in ts.dependencies:
            dts = <TaskState>d
            assert dts.state != TS_FORGOTTEN, f"{where}: dependency {dts.key!r} forgotten"
            if dts.state != TS_MEMORY:
                n_not_mem += 1
        for d in ts.dependents:
            dts = <TaskState>d
            if dts.state == TS_FORGOTTEN:
                continue
            n_live += 1
            if _is_active(dts.state):
                n_active += 1
        assert n_live == ts.n_dependents, f"{where}: n_dependents {ts.n_dependents} != {n_live}"
        assert n_active == ts.n_waiters, f"{where}: n_waiters {ts.n_waiters} != {n_active}"
        if st == TS_FORGOTTEN:
            assert ts.key not in self.tasks or self.tasks[ts.key] is not ts, where
            assert ts.who_wants is None, where
            return 0
        assert self.tasks.get(ts.key) is ts, f"{where}: not in tasks"
        assert self._by_id.get(ts.id) is ts, f"{where}: not in _by_id"
        if st != TS_PROCESSING:
            assert ts.processing_on is None, f"{where}: processing_on set"
        if st != TS_MEMORY:
            assert ts.holder is None and not ts.more_holders, \
                f"{where}: has replicas {ts.who_has_addresses}"
        if st == TS_MEMORY:
            assert ts.exception_blame is None, f"{where}: blame set"
        if st == TS_ERRED:
            assert ts.exception_blame is not None, f"{where}: no blame"
        if st == TS_WAITING:
            assert ts.n_waiting_on == n_not_mem, \
                f"{where}: n_waiting_on {ts.n_waiting_on} != {n_not_mem}"
            assert ts.n_waiting_on > 0 or ts._rec_target != NO_REC, \
                f"{where}: waiting on nothing, and nothing pending"
            for d in ts.dependencies:
                dts = <TaskState>d
                assert dts.state in (TS_WAITING, TS_QUEUED, TS_NO_WORKER, TS_PROCESSING,
                                     TS_MEMORY, TS_RELEASED), \
                    f"{where}: dependency {dts.key!r} is {_NAMES[dts.state]}"
        if st in (TS_QUEUED, TS_NO_WORKER, TS_PROCESSING):
            # (a pending recommendation may be about to fix that; validate_state
            # at the end of the stimulus, with nothing pending, is strict)
            assert n_not_mem == 0 or ts._rec_target != NO_REC, \
                f"{where}: dependencies not in memory"
        if st == TS_QUEUED and ts._in_constrained:
            assert self._constrained_queue.count(_qkey(ts)) == 1, f"{where}: not queued"
        else:
            assert self._constrained_queue.count(_qkey(ts)) == 0, f"{where}: in queue"
        # (root-heap membership is checked by validate_state: entries are lazy)
        assert (st == TS_NO_WORKER) == (ts in self._unrunnable), f"{where}: unrunnable set"
        if st == TS_PROCESSING:
            assert ts.processing_on is not None, f"{where}: no processing_on"
            assert ts._proc_prev is not None or ts.processing_on._proc_head is ts, \
                f"{where}: not in worker.processing"
        if st == TS_MEMORY:
            assert ts.holder is not None, f"{where}: no replicas"
            hl = _holder_list(ts)
            assert len(set(map(id, hl))) == len(hl), f"{where}: duplicate replicas"
            for w in hl:
                assert ts in (<WorkerState>w).has_what, f"{where}: has_what mismatch"
                assert (<WorkerState>w).status != WS_CLOSED, f"{where}: replica on closed worker"
        if ts.who_wants is not None and type(ts.who_wants) is not ClientState:
            assert len(ts.who_wants) >= 2, f"{where}: who_wants dict with < 2 clients"
        for c in _wanters(ts):
            assert ts in (<ClientState>c).wants, f"{where}: wants mismatch"
        if ts._steal_thief is not None:
            assert st == TS_PROCESSING, f"{where}: steal in flight"
            assert not ts._seceded, f"{where}: stealing a long-running task"
        if ts._seceded:
            assert st == TS_PROCESSING and ts.est_duration == 0, f"{where}: seceded"
        return 0

    def validate_state(self):
        """Check every invariant of the whole state; raises AssertionError."""
        cdef TaskState ts
        cdef WorkerState ws
        cdef Py_ssize_t counts[8]
        cdef double occ
        cdef int64_t nb
        cdef Py_ssize_t i
        for i in range(N_TASK_STATES):
            counts[i] = 0
        assert len(self.tasks) == len(self._by_id)
        for t in self.tasks.values():
            ts = <TaskState>t
            counts[ts.state] += 1
            self._validate_task(ts)
            if _is_active(ts.state) or ts.state == TS_MEMORY:
                assert ts._needed(), f"task {ts.key!r} in {_NAMES[ts.state]} but not needed"
            if ts.state == TS_WAITING:
                for d in ts.dependencies:
                    assert (<TaskState>d).state != TS_RELEASED, \
                        f"{ts.key!r} waits on released {(<TaskState>d).key!r}"
        for i in range(N_TASK_STATES - 1):
            assert counts[i] == self._counts[i], \
                f"count of {_NAMES[i]}: {self._counts[i]} != {counts[i]}"
        in_heap = set()
        for i in range(<Py_ssize_t>self._root_heap.size()):
            in_heap.add(self._root_heap[i].second.second)
        n_root = 0
        for t in self.tasks.values():
            ts = <TaskState>t
            if ts.state == TS_QUEUED and not ts._in_constrained:
                n_root += 1
                assert ts.id in in_heap, f"queued task {ts.key!r} not in the root heap"
        assert n_root == self._n_root_queued, (n_root, self._n_root_queued)
        assert self._n_root_queued + \
            <Py_ssize_t>self._constrained_queue.size() == counts[TS_QUEUED]
        assert len(self._unrunnable) == counts[TS_NO_WORKER]
        running = [w for w in self.workers.values() if (<WorkerState>w).status == WS_RUNNING]
        assert running == self._running
        for w in self.workers.values():
            ws = <WorkerState>w
            assert ws.status != WS_CLOSED
            assert self._addresses_by_id[ws.id] == ws.address
            occ = 0.0
            used = {}
            procs = _proc_list(ws)
            assert len(procs) == ws.n_processing, f"{ws.address}: n_processing"
            seceded = sum(1 for t in procs if (<TaskState>t)._seceded)
            assert seceded == ws.n_long_running, f"{ws.address}: n_long_running"
            base = (max(1, <Py_ssize_t>ceil(ws.nthreads * self.worker_saturation))
                    if self._queuing else 1 << 40)
            assert ws.slots == base + seceded, f"{ws.address}: slots {ws.slots}"
            for t in procs:
                ts = <TaskState>t
                assert ts.state == TS_PROCESSING and ts.processing_on is ws, \
                    f"{ws.address}: processing mismatch for {ts.key!r}"
                occ += ts.est_duration
                if ts.resources is not None:
                    for k, v in ts.resources.items():
                        used[k] = used.get(k, 0.0) + v
            assert abs(occ - ws.occupancy) <= 1e-6 * max(1.0, occ), \
                f"{ws.address}: occupancy {ws.occupancy} != {occ}"
            for k, v in ws.used_resources.items():
                assert abs(used.get(k, 0.0) - v) < 1e-9, f"{ws.address}: resources {k}"
                assert v <= ws.resources.get(k, 0.0) + 1e-9, f"{ws.address}: overcommitted {k}"
            nb = 0
            for t in ws.has_what:
                ts = <TaskState>t
                assert ts.state == TS_MEMORY and _holds(ts, ws), \
                    f"{ws.address}: has_what mismatch for {ts.key!r}"
                nb += ts.nbytes
            assert nb == ws.nbytes, f"{ws.address}: nbytes {ws.nbytes} != {nb}"
            assert ws._is_idle == self._is_open(ws)
            assert ws._is_idle == (ws._idle_pos >= 0)
            if ws._is_idle:
                assert <object>self._idle[ws._idle_pos] is ws
            assert ws._incoming >= 0 and ws._outgoing >= 0
        assert <Py_ssize_t>self._idle.size() == sum(1 for w in self.workers.values()
                                                    if (<WorkerState>w)._is_idle)
        if self._n_root_queued > 0:
            assert self._idle.empty(), "root tasks queued while a worker has a free slot"
        for c in self.clients.values():
            for t in (<ClientState>c).wants:
                ts = <TaskState>t
                assert _is_wanted_by(ts, <ClientState>c)
        for t, thief in self._steals.items():
            assert (<TaskState>t)._steal_thief is thief
        assert self._recs.empty(), "recommendations left after a stimulus"

    # ------------------------------------------------------------------
    # Introspection (for the server, the dashboard and tests)
    # ------------------------------------------------------------------

    def story(self, *keys_or_stimulus_ids):
        """Recent transitions touching any of the keys (or caused by any of the
        stimulus ids), oldest first: [(key, start, finish, stimulus_id, worker)]."""
        cdef Py_ssize_t i, pos, n = self._log_len, cap = self.transition_log_length
        cdef list out = []
        targets = keys_or_stimulus_ids
        start = (self._log_pos - n + cap) % cap
        for i in range(n):
            pos = (start + i) % cap
            key = self._log_keys[pos]
            sid = self._log_stimuli[pos]
            hit = False
            for t in targets:
                try:
                    if key == t or sid == t:
                        hit = True
                        break
                except Exception:
                    pass
            if hit:
                wid = self._log_worker[pos]
                out.append((key, _NAMES[self._log_start[pos]], _NAMES[self._log_finish[pos]],
                            sid, self._addresses_by_id.get(wid) if wid >= 0 else None))
        return out

    def transitions_since(self, int64_t n):
        """The transitions made after the first `n` ever (`n_transitions` counts them),
        oldest first, as many as the log still holds: [(key, start, finish, stimulus_id)].
        For SchedulerPlugin.transition hooks (plugins.py); never on the hot path."""
        cdef Py_ssize_t cap = self.transition_log_length
        cdef int64_t behind = self.n_transitions - n
        cdef Py_ssize_t i, pos, k, first
        if behind <= 0:
            return []
        k = <Py_ssize_t>min(behind, <int64_t>self._log_len)
        first = (self._log_pos - k + cap) % cap
        out = []
        for i in range(k):
            pos = (first + i) % cap
            out.append((self._log_keys[pos], _NAMES[self._log_start[pos]],
                        _NAMES[self._log_finish[pos]], self._log_stimuli[pos]))
        return out

    def get_task(self, key):
        """The TaskState of ``key`` (read-only view) or None."""
        return self._task_from(-1, key)

    def task_state(self, key):
        """State name of ``key``; 'forgotten' if unknown."""
        cdef TaskState ts = self._task_from(-1, key)
        return "forgotten" if ts is None else _NAMES[ts.state]

    def task_states(self, keys=None):
        """{key: state name} for ``keys`` (default: all)."""
        if keys is None:
            return {k: _NAMES[(<TaskState>t).state] for k, t in self.tasks.items()}
        return {k: self.task_state(k) for k in keys}

    def task_stream(self, int64_t since=0, Py_ssize_t limit=1000):
        """`(total, rows)`: `total` counts the tasks ever recorded; `rows` are the recorded
        tasks with index >= `since` still in the ring, at most the latest `limit`, oldest
        first, as `(key, worker address, start, stop, status)` (wall-clock seconds;
        status "memory" or "erred"). Pass `since=total` next time for only the new ones."""
        cdef int64_t total = self.task_stream_total
        cdef int64_t first = total - self.task_stream_length
        cdef int64_t i
        cdef Py_ssize_t pos
        cdef double stop
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if first < since:
            first = since
        if first < total - limit:
            first = total - limit
        if first < 0:
            first = 0
        rows = []
        for i in range(first, total):
            pos = i % self.task_stream_length
            stop = self._stream_stop[pos]
            rows.append((self._stream_keys[pos], self._stream_workers[pos],
                         stop - self._stream_duration[pos], stop,
                         "erred" if self._stream_erred[pos] else "memory"))
        return total, rows

    def prefix_counts(self):
        """{prefix: {state name: live tasks, ..., "done": ever finished}} for every prefix
        with live tasks or finished ones."""
        cdef PrefixState p
        cdef int i
        cdef bint live
        out = {}
        for p in self._prefixes.values():
            live = False
            for i in range(N_TASK_STATES - 1):
                if p.counts[i]:
                    live = True
            if live or p.n_done:
                out[p.name] = p.state_counts()
        return out

    def state_counts(self):
        """{state name: number of tasks} (forgotten tasks are not counted)."""
        return {_NAMES[i]: self._counts[i] for i in range(N_TASK_STATES - 1)}

    def key_of(self, Py_ssize_t task_id):
        cdef TaskState ts = self._task_from(task_id, None)
        return None if ts is None else ts.key

    def id_of(self, key):
        cdef TaskState ts = self._task_from(-1, key)
        return None if ts is None else ts.id

    def who_has(self, keys=None):
        """{key: [worker addresses]} for keys in memory (default: all)."""
        cdef TaskState ts
        out = {}
        items = self.tasks.values() if keys is None else \
            [self.tasks[k] for k in keys if k in self.tasks]
        for t in items:
            ts = <TaskState>t
            if keys is not None or ts.holder is not None:
                out[ts.key] = ts.who_has_addresses
        if keys is not None:
            for k in keys:
                out.setdefault(k, [])
        return out

    def has_what(self, workers=None):
        """{address: [keys held]}."""
        addrs = list(self.workers) if workers is None else workers
        return {a: [(<TaskState>t).key for t in (<WorkerState>self.workers[a]).has_what]
                if a in self.workers else [] for a in addrs}

    def processing(self, workers=None):
        """{address: [keys processing there]}."""
        addrs = list(self.workers) if workers is None else workers
        return {a: [(<TaskState>t).key for t in _proc_list(<WorkerState>self.workers[a])]
                if a in self.workers else [] for a in addrs}

    def occupancy(self, workers=None):
        """{address: estimated seconds of work processing there}."""
        addrs = list(self.workers) if workers is None else workers
        return {a: (<WorkerState>self.workers[a]).occupancy for a in addrs if a in self.workers}

    def nthreads(self):
        return {a: (<WorkerState>w).nthreads for a, w in self.workers.items()}

    def worker_resources(self):
        """{address: {resource: (total, in use)}}."""
        return {a: {k: (v, (<WorkerState>w).used_resources.get(k, 0.0))
                    for k, v in (<WorkerState>w).resources.items()}
                for a, w in self.workers.items()}

    def worker_info(self, address=None):
        """Summary dicts per worker (or of one worker)."""
        def info(WorkerState ws):
            return {
                "id": ws.id, "address": ws.address, "name": ws.name,
                "nthreads": ws.nthreads, "memory_limit": ws.memory_limit,
                "resources": dict(ws.resources), "used_resources": dict(ws.used_resources),
                "processing": ws.n_processing, "long_running": ws.n_long_running,
                "occupancy": ws.occupancy,
                "memory_keys": len(ws.has_what), "nbytes": ws.nbytes,
                "status": ws.status_name, "last_seen": ws.last_seen, "metrics": ws.metrics,
            }
        if address is not None:
            return info(self.workers[address])
        return {a: info(w) for a, w in self.workers.items()}

    def queued_keys(self):
        """Keys in state queued, in the order they would be released."""
        cdef cpp_set[QueueKey].iterator it
        cdef TaskState ts
        cdef Py_ssize_t i
        root = {}
        for i in range(<Py_ssize_t>self._root_heap.size()):
            ts = self._task_from(self._root_heap[i].second.second, None)
            if ts is not None and ts.state == TS_QUEUED and not ts._in_constrained:
                root[ts.id] = ts
        out = [t.key for t in sorted(root.values(), key=_queue_order_key)]
        it = self._constrained_queue.begin()
        while it != self._constrained_queue.end():
            out.append((<TaskState>self._by_id[deref(it).second.second]).key)
            inc(it)
        return out

    def unrunnable_keys(self):
        return [(<TaskState>t).key for t in self._unrunnable]

    def steals_in_flight(self):
        """{key: (victim address, thief address)}."""
        return {(<TaskState>t).key: ((<TaskState>t).processing_on_address,
                                      (<WorkerState>th).address)
                for t, th in self._steals.items()}

    def can_close(self, str address):
        """True when a retiring worker holds no data that exists nowhere else."""
        cdef WorkerState ws
        obj = self.workers.get(address)
        if obj is None:
            return True
        ws = <WorkerState>obj
        for t in ws.has_what:
            if not any((<WorkerState>w).status == WS_RUNNING for w in _holder_list(<TaskState>t)):
                return False
        return True

    def retiring_workers(self):
        return [a for a, w in self.workers.items() if (<WorkerState>w).status == WS_CLOSING]

    def stale_workers(self, double now, double timeout):
        """Addresses of workers not heard from (AddWorker/heartbeat) for > timeout s."""
        return [a for a, w in self.workers.items() if now - (<WorkerState>w).last_seen > timeout]

    def adaptive_target(self, double target_duration=5.0):
        """Number of workers wanted to finish the known work in about
        ``target_duration`` seconds, and to hold the data in memory at no more
        than 60% of the workers' memory limits.

        Work = occupancy of processing tasks + estimated durations of queued
        and no-worker tasks (per-prefix averages; ``unknown_task_duration``
        when never measured).  Threads per worker are taken from the current
        workers' average (1 if there are none).
        """
        cdef double work = 0.0, d
        cdef Py_ssize_t threads = 0, n_workers = len(self.workers), with_limit = 0
        cdef int64_t limit = 0, used = 0
        cdef WorkerState ws
        cdef TaskState ts
        pending = self.queued_keys() + self.unrunnable_keys()
        for w in self.workers.values():
            ws = <WorkerState>w
            work += ws.occupancy
            threads += ws.nthreads
            used += ws.nbytes
            if ws.memory_limit > 0:
                limit += ws.memory_limit
                with_limit += 1
        for k in pending:
            ts = <TaskState>self.tasks[k]
            d = ts.prefix.duration_average
            work += self.unknown_task_duration if d < 0 else d
        per_worker = threads / n_workers if n_workers else 1.0
        cpu = int(ceil(work / (max(target_duration, 1e-9) * per_worker)))
        if pending and cpu < 1:
            cpu = 1
        memory = 0
        if with_limit and used > 0.6 * limit:
            memory = int(ceil(used / (0.6 * limit / with_limit)))
        return max(cpu, memory)

    def workers_to_close(self, Py_ssize_t n):
        """Up to n running workers that are cheapest to close: no processing
        first, then least data held."""
        order = sorted(self._running, key=lambda w: ((<WorkerState>w).n_processing,
                                                     (<WorkerState>w).nbytes,
                                                     (<WorkerState>w).id))
        return [(<WorkerState>w).address for w in order[:max(0, n)]]

    @property
    def n_tasks(self):
        return len(self.tasks)

    def __repr__(self):
        counts = ", ".join(f"{k}={v}" for k, v in self.state_counts().items() if v)
        return f"<SchedulerState workers={len(self.workers)} tasks={len(self.tasks)} ({counts})>"
