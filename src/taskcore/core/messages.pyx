# distutils: language = c++
# cython: language_level=3, boundscheck=True, wraparound=False
"""The codec of the wire messages: one encoding per op, owned here.

Every message that a state machine takes (as an event) or makes (as an
instruction) is encoded and decoded in this module and nowhere else: the four
hot messages below, positional and compiled, and the rare ones, maps, at the
end of this file. Servers hand it instructions and get messages, hand it
messages and get events. (Requests and replies between the servers
themselves, such as rpc or registration, are not state-machine traffic and
stay with them.) docs/contracts.md is the specification.

Theory of operation
===================

A submit -> result round trip is four messages, and a stream of tiny tasks is
mostly these four:

    client    -> scheduler  update-graph     task columns and wanted keys
    scheduler -> worker     compute-tasks    the tasks to run there
    worker    -> scheduler  tasks-finished   what finished, with small results
    scheduler -> client     keys-in-memory   which keys are ready, with those results

Each has exactly one encoding, specified in docs/contracts.md, and this module
is the only code that builds or reads it. Receivers get typed events for the
state machines (`decode_update_graph` -> `UpdateGraph`, `decode_tasks_finished`
-> `TaskFinished`/`TasksFinished`, `decode_compute_tasks` -> the worker's
`ComputeTask`s); senders hand over the machines' typed instructions
(`batch_instructions` groups `ComputeTask` and `KeyInMemory` into one message
per peer) or add rows to a `TasksFinishedWriter`.

The messages are *positional*: a list whose first element is the op and whose
other elements are columns (parallel lists), so no map and no interned field
names are packed or unpacked per message (-10% of a round trip's instructions,
measured with callgrind). A message about one task carries that task's fields
in place of one-element columns (every list less is one less to build, pack,
unpack and free: -5% of a round trip). That specialization is private to this
module: the decoder tells the two forms apart by the type of a column (a key
is a str or a tuple, never a list), and nobody else sees either form.

Inline results. A small result rides with `tasks-finished` and is forwarded in
`keys-in-memory` as an opaque *payload* (`result_payload` makes it,
`result_sent` and `result_of` read it): an int, float or bool as itself, any other object as
a `Serialized`, and None as ``[None]``, because a bare None in the column means
"not sent: fetch it from a worker". The state machine passes the payload
through untouched (`TaskFinished.data` -> `KeyInMemory.data`).

A malformed message (wrong op, arity or column lengths) raises ValueError
naming the fault; the servers log it and drop that one message.
"""
cimport cython
from cpython.ref cimport PyObject
from taskcore.core.scheduler_state cimport (ComputeTask as ComputeInstruction, KeyInMemory,
                                            Stimulus, TaskFinished, TasksFinished, UpdateGraph,
                                            EV_TASK_FINISHED, EV_TASKS_FINISHED, EV_UPDATE_GRAPH)
from taskcore.core.worker_state cimport ComputeTask as ComputeEvent

cdef extern from "Python.h":
    PyObject* PyDict_GetItem(object d, object key)

from taskcore.core import scheduler_state as _s
from taskcore.core import worker_state as _w
from taskcore.core.serialize import serialize_obj

UPDATE_GRAPH = "update-graph"
COMPUTE_TASKS = "compute-tasks"
TASKS_FINISHED = "tasks-finished"
KEYS_IN_MEMORY = "keys-in-memory"
cdef str _UPDATE_GRAPH = UPDATE_GRAPH
cdef str _COMPUTE_TASKS = COMPUTE_TASKS
cdef str _TASKS_FINISHED = TASKS_FINISHED
cdef str _KEYS_IN_MEMORY = KEYS_IN_MEMORY


cdef inline int _check(list msg, str op, Py_ssize_t nfields) except -1:
    if len(msg) != nfields:
        raise ValueError(f"{msg[:1]}: {nfields} fields expected, got {len(msg)}")
    if msg[0] != op:
        raise ValueError(f"expected a {op!r} message, got {msg[0]!r}")
    return 0


cdef inline bint _one(object column):
    """A one-task message: its first column holds the task's field, not a list."""
    return type(column) is not list


cdef inline int _same_length(list columns, Py_ssize_t n, str op) except -1:
    for c in columns:
        if type(c) is not list or len(<list>c) != n:
            raise ValueError(f"{op}: columns of different lengths or types")
    return 0


# ---------------------------------------------------------------------------
# inline results
# ---------------------------------------------------------------------------

# result_payload(value), result_sent(payload) and result_of(payload) are
# inline functions of messages.pxd (C calls on the round trip's path).

def payload_of(value):
    """`result_payload` for Python callers."""
    return result_payload(value)


def value_of(payload):
    """(sent, value) of a payload for Python callers: (False, None) when the
    result was not sent."""
    if not result_sent(payload):
        return (False, None)
    return (True, result_of(payload))


# ---------------------------------------------------------------------------
# update-graph, one task:  ["update-graph", [key, spec, deps, options], key, priority]
# update-graph, columns:   ["update-graph", keys, specs, deps, wanted, priority,
#                           ranks, options]
# ---------------------------------------------------------------------------

cpdef list update_graph(list records, list wanted, long long priority=0):
    """The message for a graph given as records [key, run spec, dependency keys,
    options or None] and the keys the client wants: the one-task form for one
    record and one wanted key, else columns (an options map that holds only a
    priority becomes that task's rank)."""
    cdef list keys, specs, deps, ranks = None, options = None, rec
    cdef Py_ssize_t i, n = len(records)
    if n == 1 and len(wanted) == 1:
        return [_UPDATE_GRAPH, records[0], wanted[0], priority]
    keys, specs, deps = [None] * n, [None] * n, [None] * n
    for i in range(n):
        rec = <list>records[i]
        keys[i] = rec[0]
        specs[i] = rec[1]
        deps[i] = rec[2]
        opts = rec[3]
        if opts is None:
            continue
        if type(opts) is dict and len(<dict>opts) == 1 and "priority" in <dict>opts:
            if ranks is None:
                ranks = [None] * n
            ranks[i] = (<dict>opts)["priority"]
        else:
            if options is None:
                options = [None] * n
            options[i] = opts
    return [_UPDATE_GRAPH, keys, specs, deps, wanted, priority, ranks, options]


cpdef list update_graph_columns(list keys, list specs, list deps, list wanted,
                                long long priority=0, list ranks=None, list options=None):
    """The message for a graph given as columns (the dask path builds them
    directly): `ranks` (each task's priority inside the graph) and `options`
    (a map or None per task) may be None for every task."""
    return [_UPDATE_GRAPH, keys, specs, deps, wanted, priority, ranks, options]


cpdef list merge_update_graphs(list msgs):
    """Messages in order, with every run of consecutive one-task graphs without
    options or priority (a loop of `submit` calls) merged into one graph: one
    scheduler stimulus instead of one per task; the tasks keep their order,
    and so their relative priority."""
    cdef list out = [], run = None, m
    for obj in msgs:
        if (type(obj) is list and len(<list>obj) == 4 and (<list>obj)[0] == _UPDATE_GRAPH):
            m = <list>obj
            if m[3] == 0 and (<list>m[1])[3] is None:
                if run is None:
                    run = [m]
                else:
                    run.append(m)
                continue
        if run is not None:
            out.append(_merged(run))
            run = None
        out.append(obj)
    if run is not None:
        out.append(_merged(run))
    return out


cdef list _merged(list run):
    cdef list keys, specs, deps, wanted, m, rec
    if len(run) == 1:
        return run[0]
    keys, specs, deps, wanted = [], [], [], []
    for m in run:
        rec = <list>m[1]
        keys.append(rec[0])
        specs.append(rec[1])
        deps.append(rec[2])
        wanted.append(m[2])
    return [_UPDATE_GRAPH, keys, specs, deps, wanted, 0, None, None]


cpdef UpdateGraph decode_update_graph(str client, list msg, str stimulus_id):
    """The `UpdateGraph` stimulus of a client's message; per-task options
    (priority, workers, allow_other_workers, resources, retries, annotations)
    become the stimulus' mappings."""
    cdef list keys, specs, deps, wanted, ranks = None, options = None
    cdef UpdateGraph ev
    cdef Py_ssize_t i, n
    if len(msg) != 4 and len(msg) != 8:
        raise ValueError(f"{msg[:1]}: 4 fields (one task) or 8 (columns) expected, "
                         f"got {len(msg)}")
    if msg[0] != _UPDATE_GRAPH:
        raise ValueError(f"expected a {_UPDATE_GRAPH!r} message, got {msg[0]!r}")
    if len(msg) == 4:
        rec = msg[1]
        if type(rec) is not list or len(<list>rec) != 4:
            raise ValueError(f"update-graph: malformed task record {str(rec)[:100]}")
        keys, specs, deps = [(<list>rec)[0]], [(<list>rec)[1]], [(<list>rec)[2]]
        if (<list>rec)[3] is not None:
            options = [(<list>rec)[3]]
        wanted = [msg[2]]
        priority = msg[3]
    else:
        if type(msg[1]) is not list:
            raise ValueError("update-graph: the task keys must be a list")
        keys = msg[1]
        n = len(keys)
        _same_length([msg[2], msg[3]], n, "update-graph")
        specs, deps = msg[2], msg[3]
        if type(msg[4]) is not list:
            raise ValueError("update-graph: the wanted keys must be a list")
        wanted = msg[4]
        priority = msg[5]
        if msg[6] is not None:
            _same_length([msg[6]], n, "update-graph")
            ranks = msg[6]
        if msg[7] is not None:
            _same_length([msg[7]], n, "update-graph")
            options = msg[7]
    if type(priority) is not int:
        raise ValueError(f"update-graph: the priority must be an int, not {priority!r}")
    # Every field is checked here, before the state machine sees any of it: a task it
    # would reject half way would leave the keys before it registered.
    for key in wanted:
        _check_key(key, "wanted key", 0)
    n = len(keys)
    for i in range(n):
        _check_key(keys[i], "task key", 0)
        d = deps[i]
        if d is not None:
            if type(d) is not list and type(d) is not tuple:
                raise ValueError(f"update-graph: the dependencies of {str(keys[i])[:100]} "
                                 f"must be a list of keys, not {str(d)[:100]}")
            for dk in d:
                _check_key(dk, "dependency key", 0)
        if ranks is not None:
            _check_rank(keys[i], ranks[i])
    ev = UpdateGraph.__new__(UpdateGraph)
    ev.kind = EV_UPDATE_GRAPH
    ev.stimulus_id = stimulus_id
    ev.client = client
    ev.keys = wanted
    ev.priority = priority
    ev.allow_other_workers = False
    ev.retries = 0
    ev.task_keys = keys
    ev.specs = specs
    ev.deps = deps
    ev.ranks = ranks
    if options is not None:
        _with_options(ev, options)
    return ev


cdef int _check_key(object key, str what, int depth) except -1:
    """A key is a str, bytes, int or float, or a tuple of keys (dask's chunk keys)."""
    cdef type t = type(key)
    if t is str or t is bytes or t is int or t is float:
        return 0
    if t is tuple and depth < 16:
        for k in <tuple>key:
            _check_key(k, what, depth + 1)
        return 0
    raise ValueError(f"update-graph: {what} {str(key)[:100]} is not a key (a str, bytes, int "
                     "or float, or a tuple of those)")


cdef inline int _check_rank(object key, object p) except -1:
    if p is not None and type(p) is not int and type(p) is not tuple:
        raise ValueError(f"update-graph: the priority of {str(key)[:100]} must be an int or "
                         f"a tuple, not {str(p)[:100]}")
    return 0


cdef int _check_options(object key, dict opts) except -1:
    """The per-task options' types, as the state machine will use them."""
    w = opts.get("workers")
    if w is not None and type(w) is not str and not (
            type(w) in (list, tuple, set) and all(type(x) is str for x in w)):
        raise ValueError(f"update-graph: workers of {str(key)[:100]} must be a worker "
                         f"address or name, or a list of them, not {str(w)[:100]}")
    r = opts.get("resources")
    if r is not None and not (type(r) is dict and all(
            type(k) is str and type(v) in (int, float) for k, v in (<dict>r).items())):
        raise ValueError(f"update-graph: resources of {str(key)[:100]} must map names to "
                         f"numbers, not {str(r)[:100]}")
    n = opts.get("retries")
    if n is not None and (type(n) is not int or n < 0):
        raise ValueError(f"update-graph: retries of {str(key)[:100]} must be an int >= 0, "
                         f"not {n!r}")
    a = opts.get("annotations")
    if a is not None and type(a) is not dict:
        raise ValueError(f"update-graph: annotations of {str(key)[:100]} must be a map")
    _check_rank(key, opts.get("priority"))
    return 0


cdef int _with_options(UpdateGraph ev, list options) except -1:
    """Per-task options into the stimulus' mappings; a "priority" option becomes
    the task's rank."""
    cdef dict workers = {}, resources = {}, retries = {}, annotations = {}
    cdef set aow = set()
    cdef list keys = ev.task_keys
    cdef Py_ssize_t i
    for i in range(len(keys)):
        opts = options[i]
        if not opts:
            continue
        key = keys[i]
        if type(opts) is not dict:
            raise ValueError(f"update-graph: options of {key!r} must be a map")
        _check_options(key, <dict>opts)
        if "priority" in opts:
            if ev.ranks is None:
                ev.ranks = [None] * len(keys)
            ev.ranks[i] = opts["priority"]
        if "workers" in opts:
            workers[key] = opts["workers"]
            if opts.get("allow_other_workers"):
                aow.add(key)
        if "resources" in opts:
            resources[key] = opts["resources"]
        if "retries" in opts:
            retries[key] = opts["retries"]
        if "annotations" in opts:
            annotations[key] = opts["annotations"]
    ev.workers = workers or None
    ev.allow_other_workers = aow or False
    ev.resources = resources or None
    ev.retries = retries or 0
    ev.annotations = annotations or None
    return 0


# ---------------------------------------------------------------------------
# compute-tasks: ["compute-tasks", ids, keys, specs, priorities, deps(, options)]
# keys-in-memory: ["keys-in-memory", keys, payloads]
# ---------------------------------------------------------------------------

cpdef list batch_instructions(list instructions):
    """Group the scheduler's instructions for the wire, keeping their order.

    Returns a list whose items are either an instruction to carry out on its
    own, or a pair ``(compute, in_memory)`` standing for a run of consecutive
    ``ComputeTask`` and ``KeyInMemory`` instructions:

    * ``compute``: {worker address: compute-tasks message};
    * ``in_memory``: {client id: keys-in-memory message}.

    Priorities travel as [p0, p1, p2] and dependencies as [[dep id, dep key,
    nbytes, [holders]], ...] (lists, which msgpack decodes natively; tuples
    would cost an ext hook each). A task with resources or annotations adds
    the options column ([resources, annotations] per task, None for the
    others) to its worker's message.
    """
    cdef list out = []
    cdef dict compute = None
    cdef dict in_memory = None
    cdef list cols, deps
    cdef ComputeInstruction ct
    cdef KeyInMemory km
    cdef PyObject* found
    for obj in instructions:
        if type(obj) is ComputeInstruction:
            ct = <ComputeInstruction>obj
            if compute is None:
                compute = {}
                in_memory = {}
                out.append((compute, in_memory))
            if ct.dependencies:
                deps = [[d[0], d[1], d[2], list(d[3])] for d in ct.dependencies]
            else:
                deps = []
            opts = [ct.resources, ct.annotations] if ct.resources or ct.annotations else None
            found = PyDict_GetItem(compute, ct.worker)
            if found == NULL:
                cols = [_COMPUTE_TASKS, ct.task_id, ct.key, ct.run_spec,
                        [ct._p0, ct._p1, ct._p2], deps]
                if opts is not None:
                    cols.append(opts)
                compute[ct.worker] = cols
                continue
            cols = <list>found
            _to_columns(cols)
            (<list>cols[1]).append(ct.task_id)
            (<list>cols[2]).append(ct.key)
            (<list>cols[3]).append(ct.run_spec)
            (<list>cols[4]).append([ct._p0, ct._p1, ct._p2])
            (<list>cols[5]).append(deps)
            if len(cols) == 7:
                (<list>cols[6]).append(opts)
            elif opts is not None:
                cols.append([None] * (len(<list>cols[1]) - 1) + [opts])
        elif type(obj) is KeyInMemory:
            km = <KeyInMemory>obj
            if compute is None:
                compute = {}
                in_memory = {}
                out.append((compute, in_memory))
            for c in km.clients:
                found = PyDict_GetItem(in_memory, c)
                if found == NULL:
                    in_memory[c] = [_KEYS_IN_MEMORY, km.key, km.data]
                    continue
                cols = <list>found
                _to_columns(cols)
                (<list>cols[1]).append(km.key)
                (<list>cols[2]).append(km.data)
        else:
            compute = None
            out.append(obj)
    return out


cdef inline void _to_columns(list msg):
    """A one-task message (fields in place of columns) to columns, in place."""
    cdef Py_ssize_t i
    if _one(msg[1]):
        for i in range(1, len(msg)):
            msg[i] = [msg[i]]


cpdef list decode_compute_tasks(list msg):
    """The worker's `ComputeTask` events of a compute-tasks message."""
    cdef Py_ssize_t i, n, nf = len(msg)
    cdef list ids, keys, specs, prios, deps, opts
    if nf != 6 and nf != 7:
        _check(msg, _COMPUTE_TASKS, 6)
    if msg[0] != _COMPUTE_TASKS:
        _check(msg, _COMPUTE_TASKS, nf)
    if _one(msg[1]):
        return [_compute_event(msg[1], msg[2], msg[3], msg[4], msg[5],
                               msg[6] if nf == 7 else None)]
    ids = msg[1]
    n = len(ids)
    _same_length(msg[2:], n, _COMPUTE_TASKS)
    keys, specs, prios, deps = msg[2], msg[3], msg[4], msg[5]
    if nf == 7:
        opts = msg[6]
        return [_compute_event(ids[i], keys[i], specs[i], prios[i], deps[i], opts[i])
                for i in range(n)]
    return [_compute_event(ids[i], keys[i], specs[i], prios[i], deps[i], None)
            for i in range(n)]


# Events made without their Python-level __init__ (argument parsing): the
# fields are set directly, as __init__ would.
cdef ComputeEvent _compute_event(object tid, object key, object spec, object prio, object deps,
                                 object opts):
    cdef ComputeEvent ev = ComputeEvent.__new__(ComputeEvent)
    ev.id = tid
    ev.key = key
    ev.run_spec = spec
    ev.priority = prio
    ev.stimulus_id = "compute-task"
    ev.who_has = deps
    if opts is not None:
        if type(opts) is not list or len(<list>opts) != 2:
            raise ValueError(f"compute-tasks: malformed options for {key!r}")
        ev.resource_restrictions = (<list>opts)[0]
        ev.annotations = (<list>opts)[1]
    return ev


cpdef Py_ssize_t keys_in_memory_size(list msg) except -1:
    """The number of keys in a keys-in-memory message (which it validates);
    `keys_in_memory_key` and `keys_in_memory_payload` read entry i (no list
    is made for a one-key message)."""
    _check(msg, _KEYS_IN_MEMORY, 3)
    if _one(msg[1]):
        return 1
    _same_length(msg[2:], len(<list>msg[1]), _KEYS_IN_MEMORY)
    return len(<list>msg[1])


cpdef object keys_in_memory_key(list msg, Py_ssize_t i):
    return msg[1] if _one(msg[1]) else (<list>msg[1])[i]


cpdef object keys_in_memory_payload(list msg, Py_ssize_t i):
    return msg[2] if _one(msg[1]) else (<list>msg[2])[i]


def decode_keys_in_memory(list msg):
    """[(key, payload), ...] of a keys-in-memory message, for Python callers."""
    cdef Py_ssize_t i, n = keys_in_memory_size(msg)
    return [(keys_in_memory_key(msg, i), keys_in_memory_payload(msg, i)) for i in range(n)]


# ---------------------------------------------------------------------------
# tasks-finished: ["tasks-finished", ids, nbytes, types, durations, payloads]
# ---------------------------------------------------------------------------

@cython.final
cdef class TasksFinishedWriter:
    """The rows of the next tasks-finished message, as the worker collects them."""

    def __cinit__(self):
        self.n = 0

    cpdef int add(self, object tid, object nbytes, object type_name, double duration,
                  object payload) except -1:
        if self.n == 0:
            self.ids = [tid]
            self.nbytes = [nbytes]
            self.types = [type_name]
            self.durations = [duration]
            self.payloads = [payload]
        else:
            self.ids.append(tid)
            self.nbytes.append(nbytes)
            self.types.append(type_name)
            self.durations.append(duration)
            self.payloads.append(payload)
        self.n += 1
        return 0

    cpdef object take(self):
        """The message of the rows added since the last take (None if none)."""
        cdef Py_ssize_t n = self.n
        if n == 0:
            return None
        self.n = 0
        if n == 1:
            msg = [_TASKS_FINISHED, self.ids[0], self.nbytes[0], self.types[0],
                   self.durations[0], self.payloads[0]]
        else:
            msg = [_TASKS_FINISHED, self.ids, self.nbytes, self.types, self.durations,
                   self.payloads]
        self.ids = self.nbytes = self.types = self.durations = self.payloads = None
        return msg


cdef inline int _check_row(object tid, object nbytes, object duration) except -1:
    # Checked before the machine sees the report: a bad value found halfway
    # through applying a batch would leave it half applied.
    if type(tid) is not int or type(nbytes) is not int or (
            type(duration) is not float and type(duration) is not int):
        raise ValueError(f"tasks-finished: malformed row (id {tid!r}, nbytes {nbytes!r}, "
                         f"duration {duration!r})")
    return 0


cdef int _check_rows(list ids, list nbytes, list durations, Py_ssize_t n) except -1:
    cdef Py_ssize_t i
    for i in range(n):
        _check_row(ids[i], nbytes[i], durations[i])
    return 0


cpdef Stimulus decode_tasks_finished(str worker, list msg):
    """The stimulus of a worker's tasks-finished message: `TaskFinished` for
    one task, `TasksFinished` for several."""
    cdef TaskFinished ev
    cdef TasksFinished evs
    cdef Py_ssize_t n
    _check(msg, _TASKS_FINISHED, 6)
    if _one(msg[1]):
        _check_row(msg[1], msg[2], msg[4])
        ev = TaskFinished.__new__(TaskFinished)
        ev.kind = EV_TASK_FINISHED
        ev.stimulus_id = "task-finished"
        ev.worker = worker
        ev.task_id = msg[1]
        ev.nbytes = msg[2]
        ev.typename = msg[3]
        ev.duration = msg[4]
        ev.data = msg[5]
        return ev
    n = len(<list>msg[1])
    _same_length(msg[2:], n, _TASKS_FINISHED)
    _check_rows(msg[1], msg[2], msg[4], n)
    evs = TasksFinished.__new__(TasksFinished)
    evs.kind = EV_TASKS_FINISHED
    evs.stimulus_id = "task-finished"
    evs.worker = worker
    evs.task_ids = msg[1]
    evs.nbytes = msg[2]
    evs.typenames = msg[3]
    evs.durations = msg[4]
    evs.data = msg[5]
    return evs


# ---------------------------------------------------------------------------
# map messages that carry a state machine's events and instructions
# ---------------------------------------------------------------------------
# Rare messages are maps, {"op": ..., field: ...}. Those that stand for an
# event of a state machine (received) or one of its instructions (sent) are
# encoded and decoded here as well, so every message a machine takes or makes
# has its one encoding in this module. Requests and replies between servers
# (rpc, run, update-data, who-has, registration, closing) are the servers'
# own protocol and stay with them. A decoder returns None for an op it does
# not own; a missing field raises KeyError or ValueError, which the servers
# log (the message is dropped, the connection carries on).

#: The pseudo-client that holds the keys of fire_and_forget futures.
FIRE_AND_FORGET = "fire-and-forget"


def _keys(msg):
    keys = msg["keys"]
    if type(keys) is not list:
        raise ValueError(f"{msg.get('op')!r}: keys must be a list")
    return keys


# -- worker -> scheduler ----------------------------------------------------------------

def _task_erred(worker, msg, now):
    return _s.TaskErred(worker, msg["id"], msg.get("exception"), msg.get("traceback"),
                        "task-erred")


def _heartbeat(worker, msg, now):
    return _s.WorkerHeartbeat(worker, msg.get("metrics"), now, stimulus_id="heartbeat")


def _add_keys(worker, msg, now):
    return _s.AddKeys(worker, _keys(msg), stimulus_id="add-keys")


def _release_worker_data(worker, msg, now):
    return _s.ReleaseWorkerData(worker, _keys(msg), stimulus_id="release-worker-data")


def _missing_data(worker, msg, now):
    return _s.MissingData(msg["key"], msg["holder"], worker, stimulus_id="missing-data")


def _steal_response(worker, msg, now):
    return _s.StealResponse(worker, msg.get("id", -1), msg.get("state"),
                            stimulus_id="steal-response", key=msg.get("key"))


def _long_running(worker, msg, now):
    return _s.TaskLongRunning(worker, msg["id"], "long-running")


cdef dict _FROM_WORKER = {
    "task-erred": _task_erred, "heartbeat": _heartbeat, "add-keys": _add_keys,
    "release-worker-data": _release_worker_data, "missing-data": _missing_data,
    "steal-response": _steal_response, "long-running": _long_running,
}


def decode_worker_message(str worker, dict msg, double now):
    """The scheduler's stimulus for a worker's map message, or None when the op
    is not one of a state machine's (`now`: the scheduler's clock)."""
    f = _FROM_WORKER.get(msg.get("op"))
    return None if f is None else f(worker, msg, now)


# -- client -> scheduler ----------------------------------------------------------------

def decode_client_message(str client, dict msg):
    """The scheduler's stimulus for a client's map message, or None."""
    op = msg.get("op")
    if op == "release-keys":
        return _s.ClientReleasesKeys(client, _keys(msg), stimulus_id="client-releases-keys")
    if op == "fire-and-forget":
        return _s.ClientWantsKeys(FIRE_AND_FORGET, _keys(msg), stimulus_id="fire-and-forget")
    return None


def release_keys(list keys):
    return {"op": "release-keys", "keys": keys}


def fire_and_forget(list keys):
    return {"op": "fire-and-forget", "keys": keys}


# -- scheduler instructions -> messages ---------------------------------------------

def encode_scheduler_instruction(ins):
    """(to, targets, message) for a scheduler instruction that is a message:
    `to` is "worker" (targets: its address) or "clients" (targets: client ids);
    None for an instruction that is not sent (the server carries it out)."""
    t = type(ins)
    if t is _s.FreeKeys:
        return ("worker", ins.worker,
                {"op": "free-keys", "ids": ins.task_ids, "keys": ins.keys})
    if t is _s.TaskErredReport:
        return ("clients", ins.clients,
                {"op": "task-erred", "key": ins.key, "exception": ins.exception,
                 "traceback": ins.traceback})
    if t is _s.StealRequest:
        return ("worker", ins.worker, {"op": "steal-request", "id": ins.task_id, "key": ins.key})
    if t is _s.AcquireReplicas:
        return ("worker", ins.worker, {"op": "acquire-replicas", "who_has": ins.who_has})
    if t is _s.KeyLost:
        return ("clients", ins.clients, {"op": "key-lost", "keys": [ins.key]})
    if t is _s.TaskCancelled or t is _s.KeyForgotten:
        return ("clients", ins.clients, {"op": "key-cancelled", "keys": [ins.key]})
    return None


# -- scheduler -> client: what those instructions tell a client ------------------------

cdef frozenset _KEY_REPORTS = frozenset(("task-erred", "key-cancelled", "key-lost"))


def decode_key_report(dict msg):
    """(op, keys, exception, traceback, reason) of a task-erred, key-cancelled or
    key-lost message; None for any other op."""
    op = msg.get("op")
    if op not in _KEY_REPORTS:
        return None
    if op == "task-erred":
        return (op, [msg["key"]], msg.get("exception"), msg.get("traceback"), None)
    return (op, _keys(msg), None, None, msg.get("reason"))


def key_cancelled(list keys, reason=None):
    """keys-cancelled for `keys` (a restart cancels everything at once)."""
    msg = {"op": "key-cancelled", "keys": keys}
    if reason is not None:
        msg["reason"] = reason
    return msg


# -- scheduler -> worker ------------------------------------------------------------------

def decode_scheduler_message(dict msg):
    """The worker's event for a scheduler's map message, or None."""
    op = msg.get("op")
    if op == "free-keys":
        return _w.FreeKeys(msg["ids"], "free-keys")
    if op == "steal-request":
        return _w.StealRequest(msg["id"], "steal-request")
    if op == "acquire-replicas":
        return _w.AcquireReplicas(msg["who_has"], "acquire-replicas")
    if op == "remove-replicas":
        return _w.RemoveReplicas(msg["ids"], "remove-replicas")
    return None


# -- worker instructions -> messages ----------------------------------------------------

def encode_worker_instruction(ins, key_of):
    """The message to the scheduler for a worker instruction, or None for one
    the worker carries out itself. `key_of(task id)`: the key of a task."""
    t = type(ins)
    if t is _w.TaskErredMsg:
        return {"op": "task-erred", "id": ins.id, "key": ins.key,
                "exception": ins.exception, "traceback": ins.traceback}
    if t is _w.AddKeysMsg:
        return {"op": "add-keys", "keys": [key_of(i) for i in ins.ids]}
    if t is _w.MissingDataMsg:
        return {"op": "missing-data", "key": ins.key, "holder": ins.errant_worker}
    if t is _w.StealResponseMsg:
        return {"op": "steal-response", "id": ins.id, "key": ins.key, "state": ins.state}
    if t is _w.LongRunningMsg:
        return {"op": "long-running", "id": ins.id, "key": ins.key}
    if t is _w.RescheduleMsg:
        return {"op": "task-erred", "id": ins.id, "key": ins.key, "traceback": None,
                "exception": serialize_obj(RuntimeError(
                    f"task {ins.key!r} asked to be rescheduled, which taskcore does not "
                    "support"))}
    return None


def release_worker_data(list keys):
    return {"op": "release-worker-data", "keys": keys}
