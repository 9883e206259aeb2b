# distutils: language = c++
# cython: language_level=3, boundscheck=True, wraparound=False
"""The worker's compiled dispatch: compute-tasks in, tiny tasks run inline,
tasks-finished out.

`WorkerDispatch` is the base class of the `Worker` server (worker.py), in the
manner of asyncpg's protocol classes. It owns the loop that a stream of tiny
tasks goes through: compute-tasks decoded (core/messages.pyx) into events for
the `WorkerState`, its instructions carried out (an `Execute` of a task known
to be tiny runs right here, on the event loop, any other on a task thread; a
`TaskFinishedMsg` becomes a row of the next `tasks-finished`), results fed
back as events, the reports flushed once per pass through the scheduler
comm's `MessageSink`. It reaches the server only through hooks that `Worker`
overrides:

    handle_other_message(msg)     a scheduler message other than compute-tasks
    execute_other(instruction)    an instruction this loop does not carry out
    run_dask_task(node, values)   a task of a dask graph (dask_integration)

Compiled, with the worker's dicts as typed fields, this loop took the
worker's share of a round trip from ~71k to ~54k instructions (callgrind,
benchmarks/callgrind_roundtrip.py).

Results. A result is stored in `data`; a small one (`inline_result_bytes`) also
rides along with the report as a payload (messages.result_payload). A result
that cannot be serialized stays here like any other: only a transfer or a
gather of it errs, with `unserializable`'s message.

Inline execution. Handing a task to a thread and its result back costs ~20 µs
of CPU in this process (GIL hand-offs and wake-ups), far more than a tiny task
itself. So a task whose key prefix runs in under `inline_threshold` seconds on average
(an exponential average over its recent runs) runs on the event loop, for at
most `inline_budget` seconds per pass so I/O is never starved. The first task of
every prefix runs on a thread, to be measured; a prefix whose task used
get_client(), secede() or get_worker() goes back to threads for good.

Memory (worker_memory.py, spill.py). `data` stays a plain dict of the values in
memory; values spilled to disk live in the spill store, whose index is `spilled`.
This loop pays for memory management only where it is on and only in three places:
the end of `handle` compares managed bytes (`WorkerState.memory_bytes - spilled_bytes`)
with `memory_target_bytes` and calls `memory_over_target()` when over; an `Execute`
moves its dependencies to the back of `data` (`memory_managed`: the LRU order is the
dict's insertion order); a `DropData` of a spilled key calls `drop_spilled`. A
dependency missing from `data` when a task runs is caught as the KeyError it raises
(`call_parts_slow`): no test on the normal path.
"""
cimport cython
from libc.stdint cimport int64_t
from taskcore.core.messages cimport TasksFinishedWriter, decode_compute_tasks, result_payload
from taskcore.core.protocol cimport MessageSink, sink_of
from taskcore.core.serialize cimport Serialized
from taskcore.core.worker_state cimport (DropData, Execute, ExecuteSuccess,
                                         ReleaseWorkerDataMsg, TaskFinishedMsg, TaskState,
                                         WorkerState)

import logging
import pickle
import threading
import time
from traceback import format_exception as _format_exception

from taskcore.core.messages import release_worker_data
# (not `sizeof`: in a .pyx that name is the C operator)
from taskcore.core.serialize import nbytes as _nbytes, serialize_obj
from taskcore.core.worker_state import ExecuteFailure
from taskcore.graph import substitute

#: The thread-local of task execution: .worker is the WorkerDispatch (the
#: Worker) whose task runs on this thread; .inline and .interacted are set
#: around inline runs (see run_inline).
task_local = threading.local()

NEVER_INLINE = float("inf")     # the recorded duration of a prefix that must use threads
cdef double _NEVER = NEVER_INLINE
cdef object _I64_MIN = -(1 << 63)
cdef object _U64_END = 1 << 64
cdef object _now = time.time
cdef object _monotonic = time.monotonic
cdef object _pickle_loads = pickle.loads
cdef object _MISSING = object()
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


cdef class WorkerDispatch:
    """See the module doc. The base class of the `Worker` server, which sets the
    fields and overrides the hooks."""

    def __cinit__(self, *args, **kwargs):
        self.data = {}
        self.small = {}
        self.durations = {}
        self.funcs = {}
        self.last_pickle = None
        self.out = TasksFinishedWriter()
        self.out_released = None
        self.inline_threshold = 200e-6
        self.inline_budget = 0.005
        self.inline_result_bytes = 16_384
        self.spilled = {}

    # -- hooks (the server overrides these) ------------------------------------------
    cpdef handle_other_message(self, object msg):
        _logger.warning("unhandled message from the scheduler: %r", str(msg)[:200])

    cpdef execute_other(self, object instruction):
        _logger.error("unhandled worker instruction %r", instruction)

    cpdef run_dask_task(self, object node, object values=None):
        raise TypeError("this worker cannot run dask tasks")

    cpdef memory_over_target(self):
        """Managed memory is over `memory_target_bytes`: spill (worker_memory.py)."""

    cpdef drop_spilled(self, object key):
        """A spilled key was dropped (its task released): forget it on disk."""

    cpdef object load_dependency(self, object key):
        """A dependency not in `data`: read it back from disk, or raise KeyError."""
        raise KeyError(key)

    # -- the scheduler comm ------------------------------------------------------------
    @property
    def scheduler_comm(self):
        return self._scheduler_comm

    @scheduler_comm.setter
    def scheduler_comm(self, comm):
        self._scheduler_comm = comm
        self.sink = sink_of(comm) if comm is not None else None

    # -- messages -------------------------------------------------------------------
    def on_message(self, msg):
        """The scheduler comm's message handler: compute-tasks here, every other
        message to `handle_other_message`. A malformed one is logged and dropped;
        the connection carries on."""
        try:
            if type(msg) is not list:
                self.handle_other_message(msg)
            else:
                self.handle(decode_compute_tasks(<list>msg))
        except Exception:
            _logger.exception("error handling %r from the scheduler", str(msg)[:200])

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
                    deadline = _monotonic() + self.inline_budget
                if _monotonic() > deadline:
                    self.loop.call_soon(self.on_inline_results, results)
                    return 0
                instructions = self.state.handle_events(
                    [self.result_event(r[0], r[1], r[2], r[3], r[4], r[5], r[6])
                     for r in results])
        finally:
            if self.out.n or self.out_released is not None:
                self.flush_out()
            if (self.memory_target_bytes and self.state.memory_bytes - self.spilled_bytes
                    > self.memory_target_bytes):
                self.memory_over_target()

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
                if self.memory_managed:
                    self.touch_dependencies(ex.id)
                p = self.inline_prefix(ex.key)
                if p is not None:
                    inline.append((ex, p))
                else:
                    self.executor.submit(ex.id, _ThreadTask(self, ex.key, ex.run_spec))
            elif t is TaskFinishedMsg:
                fin = <TaskFinishedMsg>ins
                if self.out_released is not None:
                    self.flush_out()            # a release before a finish stays before it
                tid = fin.id
                self.out.add(tid, fin.nbytes, fin.type_name, fin.stop - fin.start,
                             small.pop(tid, None) if small else None)
            elif t is ReleaseWorkerDataMsg:
                if self.out_released is None:
                    self.out_released = []
                self.out_released.append((<ReleaseWorkerDataMsg>ins).key)
            elif t is DropData:
                key = (<DropData>ins).key
                self.data.pop(key, None)
                if self.spilled and key in self.spilled:
                    self.drop_spilled(key)
            else:
                if self.out.n or self.out_released is not None:
                    self.flush_out()
                self.execute_other(ins)
        return inline

    cpdef int flush_out(self) except -1:
        """Send the batched reports: every task finished since the last flush as one
        `tasks-finished`, then the released keys. `handle` flushes when it returns,
        and `execute` before any other instruction, so the scheduler sees reports
        in the order the state machine made them."""
        msg = self.out.take()
        released = self.out_released
        self.out_released = None
        comm = self._scheduler_comm
        if comm is None or comm.closed:
            return 0
        if msg is not None:
            self.sink.queue(msg)
        if released is not None:
            self.sink.queue(release_worker_data(released))
        return 0

    # -- results --------------------------------------------------------------------
    def on_thread_results(self, results):
        """Results from task threads, on the loop: (tid, ok, value, start, stop)."""
        if self.status in ("closing", "closed"):
            return
        events = []
        get_task = self.state.get_task
        for tid, ok, value, start, stop in results:
            ts = get_task(tid)
            if ts is not None:
                events.append(self.result_event(tid, ts.key, ok, value, start, stop))
        self.handle(events)

    def on_inline_results(self, results):
        """Deferred results of inline tasks (the inline budget ran out): like
        thread results, a task released meanwhile is dropped."""
        if self.status in ("closing", "closed"):
            return
        get_task = self.state.get_task
        self.handle([self.result_event(*r) for r in results if get_task(r[0]) is not None])

    # -- inline execution -----------------------------------------------------------
    cdef object inline_prefix(self, object key):
        """The key's prefix if its tasks run inline, else None (the prefix goes on
        with the task, to record its duration without being computed again)."""
        if not self.inline_threshold:
            return None
        p = key_prefix(key)
        avg = self.durations.get(p)
        if avg is not None and <double>avg < self.inline_threshold:
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
        cdef dict local = task_local.__dict__
        cdef double start, stop
        cdef Execute ins
        cdef tuple item
        local["inline"] = True
        local["worker"] = self
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
            if fser is self.last_serialized:
                return self.last_function
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
        # one of the two is set: last_function belongs to it
        if t is bytes:
            self.last_pickle = <bytes>fser
            self.last_serialized = None
        else:
            self.last_serialized = fser
            self.last_pickle = None
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
            except KeyError:
                # A dependency is not in memory: spilled to disk (or lost). Off the hot
                # path: the normal one pays nothing for this clause.
                func, args, kwargs = self.call_parts_slow(key, spec)
            except Exception as e:
                raise DeserializeError(
                    f"could not deserialize task {key!r} on worker {self.address}: "
                    f"{type(e).__name__}: {e}") from e
            return func(*args, **kwargs) if kwargs else func(*args)
        if kind == "dask":
            return self.run_dask_task(spec[1])
        if kind == "dask-t":                        # a template and this task's values
            return self.run_dask_task(spec[1], spec[2])
        raise ValueError(f"unknown run spec kind {kind!r} for task {key!r}")

    cdef tuple call_parts_slow(self, object key, object spec):
        """(func, args, kwargs) of a "call" spec, with dependencies that are not in
        `data` read back from disk (`load_dependency`)."""
        cdef list largs
        view = WithSpilled(self)
        try:
            func = self.function(spec[1])
            args, kwargs = spec[2], spec[3]
            if isinstance(args, Serialized):
                args, kwargs = args.deserialize()
                args = substitute(args, view)
                if kwargs:
                    kwargs = substitute(kwargs, view)
            elif len(spec) > 4:
                largs = list(args)
                for i in spec[4]:
                    largs[i] = view[largs[i]]
                args = largs
        except Exception as e:
            raise DeserializeError(
                f"could not deserialize task {key!r} on worker {self.address}: "
                f"{type(e).__name__}: {e}") from e
        return func, args, kwargs

    cdef int touch_dependencies(self, int64_t tid) except -1:
        """A task starts: its dependencies become the most recently used values."""
        cdef TaskState ts = self.state._get(tid)
        cdef dict data = self.data
        if ts is None or not ts.dependencies:
            return 0
        for d in ts.dependencies:
            k = (<TaskState>d).key
            v = data.pop(k, _MISSING)
            if v is not _MISSING:
                data[k] = v
        return 0

    cpdef object result_event(self, object tid, object key, bint ok, object value,
                              double start, double stop, object prefix=None):
        """The state-machine event for a task's outcome; the value goes to the data
        store, and a small result to the next `tasks-finished` as well."""
        self.record_duration(key_prefix(key) if prefix is None else prefix, stop - start)
        if not ok:
            return _failure(tid, value, start, stop)
        t = type(value)
        try:
            nb = 28 if t is int or t is float else _nbytes(value)
        except Exception:
            nb = 1024
        if t is int or t is float or t is bool or value is None:
            # msgpack-native scalars ride along as themselves (None as [None]: a
            # bare None means "not sent"): no pickling here, no ext hook at the
            # client. (Huge ints do not fit msgpack; pickle those.)
            if t is not int or _I64_MIN <= value < _U64_END:
                self.small[tid] = result_payload(value)
                self.data[key] = value
                return _execute_success(tid, nb, _SCALAR_NAMES[t], start, stop)
        if nb <= self.inline_result_bytes:
            # Rides along if it serializes; one that cannot (a generator, a lock)
            # stays here as any other value: only a transfer or a gather of it
            # errs (`unserializable`), and a dependent on this worker runs.
            try:
                s = serialize_obj(value)
            except Exception:
                s = None
            if s is not None and (<Serialized>s).nbytes <= self.inline_result_bytes:
                self.small[tid] = s
        self.data[key] = value
        return _execute_success(tid, nb, t.__name__, start, stop)


cdef dict _SCALAR_NAMES = {int: "int", float: "float", bool: "bool", type(None): "NoneType"}


def unserializable(key, value, exc):
    """The error for a result that cannot leave its worker (a gather or a
    transfer of it): the same words wherever it is reported."""
    return (f"the result of task {key!r} (type {type(value).__name__}) cannot be "
            f"serialized: {type(exc).__name__}: {exc}")


cdef object _failure(object tid, object exc, double start, double stop):
    """The ExecuteFailure event of a task that raised `exc`."""
    text = "".join(_format_exception(type(exc), exc, exc.__traceback__))
    try:
        s = serialize_obj(exc)
    except Exception:
        s = serialize_obj(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return ExecuteFailure(tid, s, text, start, stop, "execute-failure")


@cython.final
cdef class WithSpilled:
    """The worker's values as a mapping that reads spilled ones back from disk: what a
    task's dependencies are looked up in when one is missing from `data` (and what dask
    tasks look theirs up in while memory is managed)."""
    cdef WorkerDispatch worker

    def __init__(self, WorkerDispatch worker):
        self.worker = worker

    def __getitem__(self, key):
        v = self.worker.data.get(key, _MISSING)
        if v is _MISSING:
            return self.worker.load_dependency(key)
        return v

    def __contains__(self, key):
        return key in self.worker.data or key in self.worker.spilled

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


@cython.final
cdef class _ThreadTask:
    """A task for a task thread: runs its spec with the worker in the thread-local."""
    cdef WorkerDispatch worker
    cdef object key, spec

    def __init__(self, WorkerDispatch worker, key, spec):
        self.worker = worker
        self.key = key
        self.spec = spec

    def __call__(self):
        task_local.worker = self.worker
        try:
            return self.worker.run_spec(self.key, self.spec)
        finally:
            task_local.worker = None


# Made without the Python-level __init__ call (argument parsing): the fields
# are set directly, as the class's __init__ would.
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
