# cython: language_level=3, boundscheck=True, wraparound=False
"""The worker's hot path, compiled: compute-tasks in, tiny tasks run inline,
tasks-finished out.

`Worker` (worker.py) owns the connections, the threads and every rare
instruction; `WorkerHotPath` owns the loop that a stream of tiny tasks goes
through: events into the `WorkerState`, its instructions carried out (an
`Execute` of a task known to be tiny runs right here, on the event loop; a
`TaskFinishedMsg` joins the columns of the next `tasks-finished`), results fed
back as events, the reports flushed once per pass. Compiled here, with the
Worker's dicts held as typed fields, it took the worker's share of a round trip
from ~71k to ~54k instructions (callgrind, benchmarks/callgrind_roundtrip.py).

Inline execution. Handing a task to a thread and its result back costs ~20 µs
of CPU in this process (GIL hand-offs and wake-ups), far more than a tiny task
itself. So a task whose key prefix runs in under `threshold` seconds on average
(an exponential average over its recent runs) runs on the event loop, for at
most `budget` seconds per pass so I/O is never starved. The first task of
every prefix runs on a thread, to be measured; a prefix whose task used
get_client(), secede() or get_worker() goes back to threads for good.
"""
cimport cython
from taskcore.core.protocol cimport StreamProtocol, check_positional
from taskcore.core.serialize cimport Serialized
from taskcore.core.worker_state cimport (ComputeTask, DropData, Execute, ExecuteSuccess,
                                         ReleaseWorkerDataMsg, TaskFinishedMsg, WorkerState)

import logging
import pickle
import time

from taskcore.core.serialize import nbytes as sizeof, serialize_obj
from taskcore.graph import substitute

NEVER_INLINE = float("inf")     # the recorded duration of a prefix that must use threads
cdef double _NEVER = NEVER_INLINE
cdef object _I64_MIN = -(1 << 63)
cdef object _U64_END = 1 << 64
cdef object _now = time.time
cdef object _monotonic = time.monotonic
cdef object _pickle_loads = pickle.loads
_logger = logging.getLogger("taskcore.worker")


class DeserializeError(Exception):
    """A task's function or arguments could not be deserialized on the worker."""


cpdef object key_prefix(object key):
    """The prefix of a key ("inc" for "inc-3f2a"): tasks sharing it share a duration estimate."""
    cdef Py_ssize_t i
    if type(key) is tuple and key:
        key = (<tuple>key)[0]
    if type(key) is str:
        i = (<str>key).find("-")
        return key if i < 0 else (<str>key)[:i]
    return key


@cython.final
cdef class WorkerHotPath:
    """See the module doc. The dicts are the Worker's own (shared, not copied)."""
    cdef WorkerState state
    cdef object worker              # the Worker: rare instructions, failures, threads
    cdef dict data                  # key -> value, the worker's data store
    cdef dict small                 # task id -> small result to report inline
    cdef dict durations             # key prefix -> average run time (s)
    cdef dict funcs                 # pickled function bytes -> function
    cdef bytes last_pickle          # the last function's pickle and the function: a
    cdef object last_function       # map's tasks skip hashing the pickle again
    cdef object task_local          # the worker module's threading.local
    cdef double threshold
    cdef double budget
    cdef Py_ssize_t result_bytes
    cdef list out_ids, out_nbytes, out_types, out_durations, out_data
    cdef list out_released

    def __init__(self, worker, state, dict data, dict small, dict durations, dict funcs,
                 task_local, double threshold, double budget, Py_ssize_t result_bytes):
        self.worker = worker
        self.state = state
        self.data = data
        self.small = small
        self.durations = durations
        self.funcs = funcs
        self.task_local = task_local
        self.threshold = threshold
        self.budget = budget
        self.result_bytes = result_bytes
        self.out_ids = None
        self.out_released = None
        self.last_pickle = None

    # -- messages -------------------------------------------------------------------
    def on_message(self, msg):
        """The scheduler comm's message handler: ["compute-tasks", ...] here, every
        other message to `Worker._scheduler_msg`. A malformed one is logged and
        dropped; the connection carries on."""
        if type(msg) is not list:
            self.worker._scheduler_msg(msg)
            return
        try:
            self.compute_tasks(<list>msg)
        except Exception:
            _logger.exception("error handling %r from the scheduler", str(msg)[:200])

    cpdef int compute_tasks(self, list msg) except -1:
        """["compute-tasks", ids, keys, specs, priorities, deps] from the scheduler;
        for one task, its id, key, spec, priority and deps in place of the columns."""
        cdef list ids, keys, specs, prios, deps
        cdef Py_ssize_t i, n
        check_positional(msg, "compute-tasks", 6)
        if type(msg[1]) is not list:                    # one task
            self.handle([_compute_task(msg[1], msg[2], msg[3], msg[4], msg[5])])
            return 0
        ids, keys, specs, prios, deps = msg[1], msg[2], msg[3], msg[4], msg[5]
        n = len(ids)
        if not (len(keys) == len(specs) == len(prios) == len(deps) == n):
            raise ValueError("compute-tasks: columns of different lengths")
        self.handle([_compute_task(ids[i], keys[i], specs[i], prios[i], deps[i])
                     for i in range(n)])
        return 0

    # -- the loop -------------------------------------------------------------------
    cpdef int handle(self, list events) except -1:
        """Feed events to the state machine and carry out its instructions; tiny
        tasks' results go straight back in, for up to `budget` seconds (the rest
        continues on the next loop iteration)."""
        cdef list inline, results
        cdef double deadline = -1.0
        instructions = self.state.handle_events(events)
        try:
            while True:
                inline = self.execute(instructions)
                if not inline:
                    return 0
                results = self.run_inline(inline)
                if deadline < 0:
                    deadline = _monotonic() + self.budget
                if _monotonic() > deadline:
                    self.worker.loop.call_soon(self.worker._on_inline_results, results)
                    return 0
                instructions = self.state.handle_events(
                    [self.result_event(r[0], r[1], r[2], r[3], r[4], r[5], r[6])
                     for r in results])
        finally:
            if self.out_ids is not None or self.out_released is not None:
                self.flush_out()

    cpdef list execute(self, list instructions):
        """Carry out instructions; return (Execute, key prefix) of those to run inline."""
        cdef list inline = []
        cdef dict small = self.small
        cdef Execute ex
        cdef TaskFinishedMsg fin
        for ins in instructions:
            t = type(ins)
            if t is Execute:
                ex = <Execute>ins
                p = self.inline_prefix(ex.key)
                if p is not None:
                    inline.append((ex, p))
                else:
                    self.worker.executor.submit(
                        ex.id, self.worker._task_callable(ex.key, ex.run_spec))
            elif t is TaskFinishedMsg:
                fin = <TaskFinishedMsg>ins
                if self.out_ids is None:
                    if self.out_released is not None:
                        self.flush_out()        # a release before a finish stays before it
                    self.out_ids = []
                    self.out_nbytes = []
                    self.out_types = []
                    self.out_durations = []
                    self.out_data = []
                tid = fin.id
                self.out_ids.append(tid)
                self.out_nbytes.append(fin.nbytes)
                self.out_types.append(fin.type_name)
                self.out_durations.append(fin.stop - fin.start)
                self.out_data.append(small.pop(tid, None) if small else None)
            elif t is ReleaseWorkerDataMsg:
                if self.out_released is None:
                    self.out_released = []
                self.out_released.append((<ReleaseWorkerDataMsg>ins).key)
            elif t is DropData:
                self.data.pop((<DropData>ins).key, None)
            else:
                if self.out_ids is not None or self.out_released is not None:
                    self.flush_out()
                self.worker._execute_one(ins)
        return inline

    cpdef int flush_out(self) except -1:
        """Send the batched reports: every task finished since the last flush as one
        `tasks-finished`, then the released keys. `handle` flushes when it returns,
        and `execute` before any other message, so the scheduler sees reports in
        the order the state machine made them."""
        ids = self.out_ids
        released = self.out_released
        self.out_ids = self.out_released = None
        comm = self.worker.scheduler_comm
        if comm is None or comm.closed:
            return 0
        if ids is not None:
            if len(ids) == 1:       # one task: its fields, not one-element columns
                msg = ["tasks-finished", ids[0], self.out_nbytes[0], self.out_types[0],
                       self.out_durations[0], self.out_data[0]]
            else:
                msg = ["tasks-finished", ids, self.out_nbytes, self.out_types,
                       self.out_durations, self.out_data]
            if isinstance(comm, StreamProtocol):
                (<StreamProtocol>comm).queue(msg)
            else:
                comm.send(msg)
        if released is not None:
            comm.send({"op": "release-worker-data", "keys": released})
        return 0

    # -- inline execution -----------------------------------------------------------
    cdef object inline_prefix(self, object key):
        """The key's prefix if its tasks run inline, else None (the prefix goes on
        with the task, to record its duration without being computed again)."""
        if not self.threshold:
            return None
        p = key_prefix(key)
        avg = self.durations.get(p)
        if avg is not None and <double>avg < self.threshold:
            return p
        return None

    cdef int record_duration(self, object p, double duration) except -1:
        avg = self.durations.get(p)
        if avg is None:
            self.durations[p] = duration
        elif <double>avg != _NEVER:
            self.durations[p] = <double>avg * 0.8 + duration * 0.2
        return 0

    cpdef list run_inline(self, list inline):
        """Run tiny tasks ((Execute, key prefix) pairs) here on the loop; return
        their results as (id, key, ok, value, start, stop, prefix). The
        thread-local flags are set once for the whole list, through this thread's
        own dict of the thread-local (item access, not the per-thread attribute
        protocol)."""
        cdef list results = []
        cdef dict local = self.task_local.__dict__
        cdef double start, stop
        cdef Execute ins
        cdef tuple item
        local["inline"] = True
        local["worker"] = self.worker
        local["interacted"] = False
        try:
            for item in inline:
                ins = <Execute>item[0]
                p = item[1]
                key = ins.key
                start = _now()
                try:
                    value = self.run_spec(key, ins.run_spec)
                    ok = True
                except BaseException as e:  # noqa: B902 - the task's error is its result
                    value = e
                    ok = False
                stop = _now()
                if local["interacted"]:
                    local["interacted"] = False
                    self.durations[p] = NEVER_INLINE
                results.append((ins.id, key, ok, value, start, stop, p))
        finally:
            local["inline"] = False
            local["worker"] = None
        return results

    cpdef object function(self, object fser):
        """The task's function, from its pickle's bytes or a Serialized (graph.py):
        unpickled once per distinct pickle (a cache of up to 1,000), since every
        task of a map carries the same one."""
        cdef type t = type(fser)
        if t is bytes:
            if self.last_pickle is not None and <bytes>fser == self.last_pickle:
                return self.last_function
            k = fser
        elif t is Serialized:
            frames = (<Serialized>fser).frames
            if len(frames) != 1 or len(frames[0]) > 65536:
                return fser.deserialize()
            k = bytes(frames[0])
        else:
            return fser                     # a function object (inproc:// keeps objects)
        f = self.funcs.get(k)
        if f is None:
            f = _pickle_loads(k) if t is bytes else fser.deserialize()
            if len(self.funcs) > 1000:
                self.funcs.clear()
            self.funcs[k] = f
        if t is bytes:
            self.last_pickle = <bytes>fser
            self.last_function = f
        return f

    cpdef object run_spec(self, object key, object spec):
        """Run one task's spec on the calling thread (which set `worker` in the
        thread-local)."""
        cdef list largs
        kind = spec[0]
        if kind == "call":
            try:
                func = self.function(spec[1])
                args, kwargs = spec[2], spec[3]
                if isinstance(args, Serialized):
                    args, kwargs = args.deserialize()
                    args = substitute(args, self.data)
                    if kwargs:
                        kwargs = substitute(kwargs, self.data)
                elif len(spec) > 4:                 # flat args; these slots hold keys
                    largs = list(args)
                    data = self.data
                    for i in spec[4]:
                        largs[i] = data[largs[i]]
                    args = largs
            except Exception as e:
                raise DeserializeError(
                    f"could not deserialize task {key!r} on worker {self.worker.address}: "
                    f"{type(e).__name__}: {e}") from e
            return func(*args, **kwargs) if kwargs else func(*args)
        if kind == "dask":
            from taskcore.dask_integration import execute_dask_node

            return execute_dask_node(spec[1], self.data)
        raise ValueError(f"unknown run spec kind {kind!r} for task {key!r}")

    cpdef object result_event(self, object tid, object key, bint ok, object value,
                              double start, double stop, object prefix=None):
        """The state-machine event for a task's outcome; the value goes to the data
        store, and a small result to the next `tasks-finished` as well."""
        self.record_duration(key_prefix(key) if prefix is None else prefix, stop - start)
        if not ok:
            return self.worker._failure(tid, key, value, start, stop)
        t = type(value)
        try:
            nb = 28 if t is int or t is float else sizeof(value)
        except Exception:
            nb = 1024
        if t is int or t is float or t is bool or value is None:
            # msgpack-native scalars ride along as themselves (None as [None]: a
            # bare None means "not sent"): no pickling here, no ext hook at the
            # client. (Huge ints do not fit msgpack; pickle those.)
            if t is not int or _I64_MIN <= value < _U64_END:
                self.small[tid] = value if value is not None else [None]
                self.data[key] = value
                return _execute_success(tid, nb, _SCALAR_NAMES[t], start, stop)
        if nb <= self.result_bytes:
            try:
                s = serialize_obj(value)
            except Exception as e:
                return self.worker._failure(tid, key, TypeError(
                    f"the result of task {key!r} (type {t.__name__}) cannot be "
                    f"serialized: {e}"), start, stop)
            if s.nbytes <= self.result_bytes:
                self.small[tid] = s
        self.data[key] = value
        return _execute_success(tid, nb, t.__name__, start, stop)


cdef dict _SCALAR_NAMES = {int: "int", float: "float", bool: "bool", type(None): "NoneType"}


# Events made here without the Python-level __init__ call (argument parsing):
# the fields are set directly, as the classes' __init__ would.
cdef ComputeTask _compute_task(object tid, object key, object spec, object prio, object deps):
    cdef ComputeTask ev = ComputeTask.__new__(ComputeTask)
    ev.id = tid
    ev.key = key
    ev.run_spec = spec
    ev.priority = prio
    ev.stimulus_id = "compute-task"
    ev.who_has = deps
    return ev


cdef ExecuteSuccess _execute_success(object tid, object nb, object type_name, double start,
                                     double stop):
    cdef ExecuteSuccess ev = ExecuteSuccess.__new__(ExecuteSuccess)
    ev.id = tid
    ev.nbytes = nb
    ev.type_name = type_name
    ev.start = start
    ev.stop = stop
    ev.stimulus_id = "execute"
    return ev
