# distutils: language = c++
# cython: language_level=3, boundscheck=True, wraparound=False
"""The client's hot path, compiled: `FutureBase`, `FutureState` and `ClientHotPath`.

A sync `submit(f, x).result()` crosses two threads of the client process (the
caller, which builds the task and waits, and the loop thread, which sends it
and receives the result), and callgrind put the client at ~81k of a round
trip's ~206k instructions (benchmarks/callgrind_roundtrip.py), most of it
attribute lookups and method calls on Python objects: the Future, its shared
state, the Client's dicts, its lock. Here they are C structs and C calls:

- `FutureState` (one per key per client) keeps the status and the inline
  result. A thread waiting in `wait_sync` blocks on a bare C lock of its own
  (`_Waiter`), released by `_set`, with the GIL dropped while it waits.
- `FutureBase` is the compiled half of the user's `Future` (futures.py):
  `result()` on a finished state returns the inline result without touching
  the loop thread, and before it blocks it writes its own queued submit to the
  socket (`ClientHotPath.write_pending`, through the comm sink's `write_now`).
- `ClientHotPath` holds the Client's reference counts, states, outbox and
  release queue, and does submit (references + queueing), the flush to the
  scheduler, the positional `keys-in-memory` message and the releases.
  `Client` (client.py) owns everything else and delegates these; a subclass
  there overrides the `handle_other` hook (every message but keys-in-memory).

Locking. The reference counts, the states and the outbox are shared by the
caller threads, the loop thread and any thread where a garbage collection
finalizes a Future. `RLock` guards them: a C lock that is reentrant, because
a collection may run `Future.__del__` (hence `dec_ref`) inside a critical
section of the same thread, and that drops the GIL while it waits, because
the holder may need the GIL to finish.
"""
cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (PY_LOCK_ACQUIRED, PY_LOCK_INTR, PyLockStatus, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_get_thread_ident,
                               PyThread_release_lock, PyThread_type_lock)
from taskcore.core.messages cimport (keys_in_memory_key, keys_in_memory_payload,
                                     keys_in_memory_size, merge_update_graphs, result_of,
                                     result_sent, update_graph)
from taskcore.core.protocol cimport MessageSink, sink_of
from taskcore.core.serialize cimport SER_PICKLE, Serialized, serialize_obj

import asyncio
import hashlib
import logging
import uuid
import weakref

import msgpack

from taskcore.graph import TaskRef

_logger = logging.getLogger("taskcore.client")

from taskcore.core.messages import release_keys
from taskcore.errors import CancelledError, FutureLostError

cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock lock, long long microseconds,
                                             int intr_flag) nogil

PENDING = "pending"
FINISHED = "finished"
ERROR = "error"
CANCELLED = "cancelled"
LOST = "lost"
cdef str _PENDING = PENDING
cdef str _FINISHED = FINISHED
cdef str _ERROR = ERROR
cdef str _CANCELLED = CANCELLED
cdef str _LOST = LOST

cdef object _get_running_loop = asyncio._get_running_loop

cdef extern from *:
    """
    /* An instance of type t made by its tp_new, without __init__: what
       `FutureBase.__new__(t)` does, minus the Python-level __new__ call that a
       type known only at run time would cost (~800 instructions a Future). */
    static PyObject* taskcore_new_instance(PyObject* t) {
        PyObject* args = PyTuple_New(0);
        PyObject* o;
        if (args == NULL) return NULL;
        o = ((PyTypeObject*)t)->tp_new((PyTypeObject*)t, args, NULL);
        Py_DECREF(args);
        return o;
    }
    """
    object taskcore_new_instance(object t)


# ------------------------------------------------------------------ locks

cdef int _acquire_timed(PyThread_type_lock lock, double timeout) except -1:
    """Acquire `lock` with the GIL dropped; a signal handler may interrupt the wait
    (Ctrl-C in a blocking `result()`), as in `threading.Lock.acquire`. Returns 1 when
    acquired, 0 on timeout (`timeout` < 0: none)."""
    cdef long long us = -1 if timeout < 0 else <long long>(timeout * 1e6)
    cdef PyLockStatus r
    while True:
        with nogil:
            r = PyThread_acquire_lock_timed(lock, us, 1)
        if r == PY_LOCK_INTR:
            PyErr_CheckSignals()      # raises if a handler raised (KeyboardInterrupt)
            continue                  # (a retry restarts the timeout: as CPython < 3.2)
        return r == PY_LOCK_ACQUIRED


@cython.final
cdef class RLock:
    """A reentrant lock in C (see the module doc), usable as `with lock:` from Python."""
    cdef PyThread_type_lock lock
    cdef unsigned long owner
    cdef long count

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError("cannot allocate a lock")
        self.owner = 0
        self.count = 0

    def __dealloc__(self):
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    cdef inline int acquire(self) except -1:
        cdef unsigned long me = PyThread_get_thread_ident()
        if self.count and self.owner == me:
            self.count += 1
            return 0
        if PyThread_acquire_lock_timed(self.lock, 0, 0) != PY_LOCK_ACQUIRED:
            _acquire_timed(self.lock, -1.0)
        self.owner = me
        self.count = 1
        return 0

    cdef inline void release(self):
        self.count -= 1
        if self.count == 0:
            self.owner = 0
            PyThread_release_lock(self.lock)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


@cython.final
@cython.freelist(8)
cdef class _Waiter:
    """One blocked `wait_sync` call: a C lock, taken at creation, that `_set` releases."""
    cdef PyThread_type_lock lock

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError("cannot allocate a lock")
        PyThread_acquire_lock_timed(self.lock, 0, 0)

    def __dealloc__(self):
        if self.lock != NULL:
            PyThread_free_lock(self.lock)


# ------------------------------------------------------------------ FutureState

@cython.final
cdef class FutureState:
    """Shared state of one key on one client; changed only on the client's loop."""
    cdef public object key
    cdef public str status
    cdef public object data          # inline result (Serialized or object), if sent
    cdef public bint has_data
    cdef public object exception
    cdef public object traceback
    cdef public object type
    cdef public object loop
    cdef list _event                 # _Waiters of threads blocked in wait_sync
    cdef list _waiters               # asyncio futures of coroutines in wait()
    cdef public list callbacks

    def __init__(self, key, loop):
        self.key = key
        self.loop = loop
        self.status = _PENDING
        self.has_data = False

    cpdef bint done(self):
        return self.status != _PENDING

    cpdef _set(self, str status):
        cdef list locks
        self.status = status
        if self._event is not None:
            locks, self._event = self._event, None
            for w in locks:
                PyThread_release_lock((<_Waiter>w).lock)
        if self._waiters:
            waiters, self._waiters = self._waiters, None
            for w in waiters:
                if not w.done():
                    w.set_result(None)
        if self.callbacks:
            cbs, self.callbacks = self.callbacks, None
            for cb in cbs:
                cb(self)

    cpdef finish(self, data=None, bint has_data=False, type=None):
        self.type = type
        if has_data:
            self.data = data
            self.has_data = True
        self._set(_FINISHED)

    def set_error(self, exception, traceback):
        self.exception = exception
        self.traceback = traceback
        self._set(_ERROR)

    def cancel(self, reason=None):
        self.exception = CancelledError(reason or f"key {self.key!r} was cancelled")
        self._set(_CANCELLED)

    def lose(self):
        self.exception = FutureLostError(f"key {self.key!r} was lost by the scheduler")
        self._set(_LOST)

    def reset(self):
        """Back to pending (retry, or the scheduler recomputing a lost key)."""
        self.status = _PENDING
        self.data = None
        self.has_data = False
        self.exception = None
        self.traceback = None

    async def wait(self):
        """Wait on the client's loop."""
        while self.status == _PENDING:
            w = self.loop.create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(w)
            await w

    cpdef bint wait_sync(self, timeout=None) except -1:
        """Wait from any thread but the loop's; False on timeout.

        Atomic under the GIL, without a lock of its own: `_set` runs on the loop
        thread with the GIL held and swaps `_event` out before releasing its
        waiters. The status is checked again after our waiter is in the list: if
        `_set` ran in between (a garbage collection can switch threads while the
        list is allocated), it has either released our waiter or left the status
        set for us to see."""
        cdef _Waiter w
        if self.status != _PENDING:
            return True
        w = _Waiter()
        if self._event is None:
            self._event = []
        self._event.append(w)
        if self.status != _PENDING:
            return True
        if _acquire_timed(w.lock, -1.0 if timeout is None else max(<double>timeout, 0.0)):
            return True
        if self._event is not None and w in self._event:     # timed out: withdraw
            self._event.remove(w)
        return self.status != _PENDING

    def add_callback(self, cb):
        """cb(state) runs on the client's loop once the state is done."""
        if self.done():
            cb(self)
        else:
            if self.callbacks is None:
                self.callbacks = []
            self.callbacks.append(cb)


# ------------------------------------------------------------------ FutureBase

#: What `FutureBase._try_result` returns when the result needs the client's loop.
NOT_READY = object()
cdef object _NOT_READY = NOT_READY


cdef class ClientHotPath


cdef class FutureBase:
    """The compiled half of a `Future` (futures.py, its only subclass): the handle
    on one key, its reference, and the part of `result()` that needs neither
    the client's loop nor the client."""
    cdef readonly object key
    cdef readonly object client
    cdef readonly FutureState _state
    cdef ClientHotPath _hot
    cdef bint _released
    cdef long long _generation       # the ClientHotPath generation it was made in
    cdef object __weakref__

    def _bind(self, key, client, FutureState state=None):
        """Set the handle up; `state` given: the caller already took this
        Future's reference (submit)."""
        self.key = key
        self.client = client
        self._hot = client._hot
        self._state = state if state is not None else self._hot.inc_ref(key)
        self._generation = self._hot.generation
        self._released = False

    @property
    def status(self):
        return self._state.status

    def done(self):
        return self._state.done()

    def cancelled(self):
        return self._state.status == _CANCELLED

    def result(self, timeout=None):
        """The task's result; re-raises the task's exception with the remote traceback.

        The path of a result that came back inline is here: a sync client,
        called from another thread than its loop's, waits in this thread
        (having written its own queued submit to the socket first:
        `ClientHotPath.write_pending`) and returns it. Everything else is the
        subclass's `_result_slow(timeout)` (futures.py)."""
        cdef FutureState st = self._state
        if self._hot.asynchronous or _get_running_loop() is self._hot.loop:
            return self._result_slow(timeout)
        if st.status == _PENDING:
            self._hot.write_pending()
            if not st.wait_sync(timeout):
                raise TimeoutError(f"result of {self.key!r} not ready after {timeout} s")
        if st.has_data and st.status == _FINISHED:
            return _inline_value(st)
        return self._result_slow(timeout)

    def _inline_result(self):
        """On the client's loop: the inline result if there is one, else NOT_READY;
        anything queued is written first (the caller is about to wait)."""
        cdef FutureState st = self._state
        if st.status == _PENDING:
            self._hot.write_pending()
            return _NOT_READY
        if st.has_data and st.status == _FINISHED:
            return _inline_value(st)
        return _NOT_READY

    def release(self):
        if not self._released:
            self._released = True
            if self._generation == self._hot.generation:
                self._hot.dec_ref(self.key)

    def __del__(self):
        if not self._released and self._hot is not None:
            self._released = True
            # A Future from before `forget_all` (a lost scheduler) holds no reference
            # any more: its key may have been submitted again, and that one is not ours.
            if self._generation != self._hot.generation:
                return
            try:
                self._hot.dec_ref(self.key)
            except Exception:  # interpreter shutdown
                pass

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return (isinstance(other, FutureBase) and (<FutureBase>other).key == self.key
                and (<FutureBase>other).client is self.client)


cdef object _inline_value(FutureState st):
    d = st.data
    if type(d) is Serialized:
        d = (<Serialized>d).deserialize()
        st.data = d
    return d


# ------------------------------------------------------------------ ClientHotPath

cdef class ClientHotPath:
    """The Client's shared bookkeeping and its per-round-trip work (see the module
    doc). `Client._states`, `._refcount` and `._lock` are these same objects."""
    cdef readonly object client
    cdef readonly dict states            # key -> FutureState
    cdef readonly dict refcount          # key -> number of live Futures
    cdef readonly RLock lock
    cdef list outbox                     # messages queued for the loop thread
    cdef bint outbox_scheduled           # a flush is queued on the loop
    cdef list release_pending            # keys whose last Future went
    cdef bint release_timer              # a delayed flush of releases is armed
    cdef public object loop
    cdef object _comm                    # see the comm property
    cdef MessageSink sink                # the comm's write capability
    cdef public type future_type         # futures.Future, for the handles made here
    cdef public bint asynchronous
    cdef public str status               # the Client's status
    cdef public double release_delay
    cdef object flush_cb                 # self.flush_outbox, bound once
    # building tasks
    cdef object func_cache               # function -> its wire form (weak keys)
    cdef object last_func                # the last function used, its wire form and name:
    cdef object last_wire                # a loop of submits of one function skips the
    cdef str last_name                   # weak dictionary (a Python-level lookup)
    cdef str uid                         # unique keys (pure=False): "<name>-<uid>-<n>"
    cdef long long counter
    cdef readonly long long generation   # +1 at each forget_all: older Futures hold no reference

    def __init__(self, client, bint asynchronous, double release_delay):
        self.client = client
        self.states = {}
        self.refcount = {}
        self.lock = RLock()
        self.outbox = []
        self.outbox_scheduled = False
        self.release_pending = []
        self.release_timer = False
        self.asynchronous = asynchronous
        self.status = "newly-created"
        self.release_delay = release_delay
        self.flush_cb = self.flush_outbox
        self.func_cache = weakref.WeakKeyDictionary()
        self.last_func = None
        self.uid = client._uid
        self.counter = 0

    # -- hooks (the client overrides these) --------------------------------------
    cpdef handle_other(self, object msg):
        """A message from the scheduler other than keys-in-memory."""
        _logger.warning("unhandled message from the scheduler: %r", str(msg)[:200])

    # -- the comm ---------------------------------------------------------------
    @property
    def comm(self):
        return self._comm

    @comm.setter
    def comm(self, comm):
        self._comm = comm
        self.sink = sink_of(comm) if comm is not None else None

    # -- building tasks ---------------------------------------------------------
    cpdef object wire_function(self, object func):
        """The function as a run spec carries it: its pickle's bytes when the pickle
        is one frame of at most 64 kB (a msgpack bin: no ext hooks at the client,
        the scheduler or the worker), else a Serialized. Made once per function."""
        if func is self.last_func:
            return self.last_wire
        try:
            w = self.func_cache[func]
        except (KeyError, TypeError):
            s = serialize_obj(func)
            w = s
            frames = (<Serialized>s).frames
            if ((<Serialized>s).kind == SER_PICKLE and len(frames) == 1
                    and type(frames[0]) is bytes and len(<bytes>frames[0]) <= 65536):
                w = frames[0]
            try:
                self.func_cache[func] = w
            except TypeError:
                pass
        self.last_func = func
        self.last_wire = w
        self.last_name = funcname(func)
        return w

    cdef str funcname(self, object func):
        if func is not self.last_func:
            self.wire_function(func)
        return self.last_name

    cpdef str unique(self):
        """A key suffix unique to this client (pure=False): cheaper than a uuid per task."""
        cdef long long n = self.counter
        self.counter += 1
        return f"{self.uid}-{n}"

    cpdef tuple make_task(self, object func, tuple args, object kwargs, object key, bint pure,
                          object fser=None, object ftok=None):
        """One task record's parts: (key, run spec, dependency keys); see graph.py."""
        cdef list lst, deps, refs = None
        cdef Py_ssize_t i, n
        if key is None:
            if pure:
                tok = tokenize(ftok or func_token(func), args, kwargs)
            else:
                tok = self.unique()
            key = f"{self.funcname(func)}-{tok}"
        if fser is None:
            fser = self.wire_function(func)
        if not kwargs:
            # Flat arguments of msgpack-native values and Futures need no pickling:
            # a Future's slot carries its key, and `refs` lists those slots.
            n = len(args)
            for i in range(n):
                a = args[i]
                t = type(a)
                if t is self.future_type:
                    if refs is None:
                        refs = []
                    refs.append(i)
                elif not (t is int or t is str or t is float or a is None or t is bool
                          or t is bytes):
                    break
            else:
                if refs is None:
                    return key, ["call", fser, list(args), None], []
                lst = list(args)
                deps = []
                for i in refs:
                    k = (<FutureBase>lst[i]).key
                    lst[i] = k
                    deps.append(k)
                return key, ["call", fser, lst, None, refs], deps
        deps = []
        args2 = replace_futures(args, deps)
        kwargs2 = replace_futures(kwargs, deps) if kwargs else None
        return key, ["call", fser, serialize_obj((args2, kwargs2)), None], deps

    cpdef object submit_call(self, object func, tuple args, object kwargs, object key,
                             bint pure, object opts):
        """`Client.submit` after its argument checks: one task, one Future."""
        cdef bint explicit = key is not None, existing
        key, spec, deps = self.make_task(func, args, kwargs, key, pure)
        if pure or explicit:                 # pure=False keys are new by construction
            self.lock.acquire()
            existing = key in self.states
            self.lock.release()
            if existing:
                return self.future_type(key, self.client)
        return self.submit([[key, spec, deps, opts]], [key])[0]

    # -- references -------------------------------------------------------------
    cpdef FutureState inc_ref(self, object key):
        cdef FutureState st
        self.lock.acquire()
        try:
            self.refcount[key] = self.refcount.get(key, 0) + 1
            st = self.states.get(key)
            if st is None:
                st = FutureState(key, self.loop)
                self.states[key] = st
        finally:
            self.lock.release()
        return st

    cpdef int dec_ref(self, object key) except -1:
        cdef Py_ssize_t n
        self.lock.acquire()
        try:
            n = self.refcount.get(key, 0) - 1
            if n > 0:
                self.refcount[key] = n
                return 0
            self.refcount.pop(key, None)
            if self.status != "running":
                self.states.pop(key, None)
                return 0
            self.release_pending.append(key)
            # Releases are collected for `release_delay` and go out as one message:
            # one wake-up of the scheduler (and of the workers it frees keys on)
            # for all of them, off the path of the next submit.
            if self.release_timer:
                return 0
            self.release_timer = True
        finally:
            self.lock.release()
        try:
            # Always through call_soon_threadsafe, even on the loop's own thread:
            # this runs from Future.__del__, i.e. wherever a garbage collection
            # happens, possibly inside the event loop's own C code.
            self.loop.call_soon_threadsafe(self._arm_release_timer)
        except RuntimeError:      # loop closed during interpreter shutdown
            pass
        return 0

    cpdef list forget_all(self, exception):
        """The scheduler was lost, and everything it knew with it: fail every state still
        waiting and every result not held here, and start with no keys, so keys submitted
        again are new ones. Existing Futures keep their (failed) states and, being of an
        older generation, release nothing when they go. Returns the
        states failed."""
        cdef FutureState st
        cdef list failed = []
        self.lock.acquire()
        try:
            states = list(self.states.values())
            self.generation += 1
            self.states.clear()           # in place: the Client aliases these dicts
            self.refcount.clear()
            self.release_pending = []
            self.outbox = []              # messages about the forgotten keys
        finally:
            self.lock.release()
        for st in states:
            if st.status == _PENDING or (st.status == _FINISHED and not st.has_data):
                st.set_error(exception, None)
                failed.append(st)
        return failed

    def _arm_release_timer(self):
        self.loop.call_later(self.release_delay, self._release_timer_fired)

    def _release_timer_fired(self):
        self.lock.acquire()
        try:
            self.release_timer = False
            if not self.release_pending:
                return
        finally:
            self.lock.release()
        self.flush_outbox(True)

    # -- sending ----------------------------------------------------------------
    cpdef list submit(self, list records, list wanted):
        """Queue ["update-graph", records, wanted] and return Futures for `wanted`.

        The references are taken and the message queued under one acquisition of
        the lock (a `for` loop of submits pays for each one, and the loop thread
        takes the same lock)."""
        cdef list futures = []
        cdef FutureState st
        cdef FutureBase f
        cdef Py_ssize_t n
        cdef bint schedule
        if self.status == "closed":
            raise RuntimeError("this client is closed")
        msg = update_graph(records, wanted)
        self.lock.acquire()
        try:
            for key in wanted:
                n = self.refcount.get(key, 0)
                self.refcount[key] = n + 1
                st = self.states.get(key)
                if st is None:
                    st = FutureState(key, self.loop)
                    self.states[key] = st
                f = <FutureBase>taskcore_new_instance(self.future_type)
                f.key = key
                f.client = self.client
                f._hot = self
                f._state = st
                f._generation = self.generation
                futures.append(f)
            self.outbox.append(msg)
            schedule = not self.outbox_scheduled
            self.outbox_scheduled = True
        finally:
            self.lock.release()
        if schedule:
            self.wake()
        return futures

    cpdef int enqueue(self, object msg) except -1:
        """Queue any message for the scheduler, from any thread."""
        cdef bint schedule
        if self.status == "closed":
            raise RuntimeError("this client is closed")
        self.lock.acquire()
        self.outbox.append(msg)
        schedule = not self.outbox_scheduled
        self.outbox_scheduled = True
        self.lock.release()
        if schedule:
            self.wake()
        return 0

    cdef int write_pending(self) except -1:
        """The caller is about to wait for a result: send what is queued now.

        On the loop's thread (an awaiting coroutine) that is the flush itself,
        one loop iteration early. From another thread (a blocking `result()`), if
        exactly one message is queued (a submit), this thread writes it to the
        socket itself rather than wait for the loop thread to wake up and flush
        it (see protocol.pyx, `write_now`); the lock keeps it in order with
        anything queued after it. The loop thread was woken by the submit all
        the same and finds nothing to send: a submit not followed by a blocking
        call still goes out."""
        cdef MessageSink sink = self.sink
        if not self.outbox:
            return 0
        if _get_running_loop() is self.loop:
            self.flush_outbox(False)
            return 0
        if sink is None:
            return 0
        self.lock.acquire()
        try:
            if len(self.outbox) == 1 and sink.write_now(self.outbox[0]):
                self.outbox = []
        finally:
            self.lock.release()
        return 0

    cdef int wake(self) except -1:
        if _get_running_loop() is self.loop:
            self.loop.call_soon(self.flush_cb)
        else:
            self.loop.call_soon_threadsafe(self.flush_cb)
        return 0

    cpdef int flush_outbox(self, bint releases=False) except -1:
        """Send the queued messages; with `releases`, the pending releases too.

        Releases go out on their own timer (`release_delay`), not with every
        flush: in a submit -> result loop each submit would otherwise carry the
        previous key's release, and the scheduler and the worker would handle a
        release (and a free-keys) on the critical path of every round trip."""
        cdef list msgs, release
        cdef MessageSink sink
        self.lock.acquire()
        try:
            msgs, self.outbox = self.outbox, []
            self.outbox_scheduled = False
            if releases and self.release_pending:
                # Keys re-referenced since their release was queued are kept.
                release, self.release_pending = self.release_pending, []
                release = [k for k in release if not self.refcount.get(k)]
                for k in release:
                    self.states.pop(k, None)
                if release:
                    msgs.append(release_keys(release))
        finally:
            self.lock.release()
        comm = self._comm
        if comm is None or comm.closed:
            # Kept for the next connection (a client reconnecting after a lost scheduler).
            self.lock.acquire()
            try:
                self.outbox = msgs + self.outbox
            finally:
                self.lock.release()
            return 0
        sink = self.sink
        # Inside begin/end the messages are only queued; end_batch writes them all,
        # now: this is a plain loop callback and a sync round trip waits on it.
        sink.begin_batch()
        try:
            if len(msgs) > 1:
                # A loop of submit calls: one graph, one scheduler stimulus.
                msgs = merge_update_graphs(msgs)
            for m in msgs:
                sink.queue(m)
        finally:
            sink.end_batch()
        return 0

    # -- receiving --------------------------------------------------------------
    def handle(self, msg):
        """The comm's message handler: keys-in-memory here (core/messages.pyx),
        every other message to the `handle_other` hook."""
        cdef Py_ssize_t i, n
        if type(msg) is not list:
            self.handle_other(msg)
            return
        n = keys_in_memory_size(<list>msg)
        for i in range(n):
            self.finish_key(keys_in_memory_key(<list>msg, i),
                            keys_in_memory_payload(<list>msg, i))

    cdef int finish_key(self, object key, object payload) except -1:
        cdef FutureState st = self.states.get(key)
        if st is None:
            return 0
        if result_sent(payload):
            st.finish(result_of(payload), True, None)
        else:                               # not sent: fetch it from a worker
            st.finish(None, False, None)
        return 0


# ------------------------------------------------------------------ task building

cpdef str funcname(object func):
    """The key prefix of a function's tasks."""
    name = getattr(func, "__name__", None) or type(func).__name__
    return "lambda" if name == "<lambda>" else name


cdef object _func_tokens = weakref.WeakKeyDictionary()


cpdef str func_token(object func):
    """A token for a function: its qualified name, and for lambdas, closures and
    __main__ functions (which share names) the hash of its pickle."""
    try:
        return _func_tokens[func]
    except (KeyError, TypeError):
        pass
    qual = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
    if "<lambda>" in qual or "<locals>" in qual or getattr(func, "__module__", "") == "__main__":
        import cloudpickle
        try:
            qual += hashlib.md5(cloudpickle.dumps(func)).hexdigest()
        except Exception:
            qual += uuid.uuid4().hex
    tok = hashlib.md5(qual.encode()).hexdigest()[:16]
    try:
        _func_tokens[func] = tok
    except TypeError:
        pass
    return tok


cpdef str tokenize(str func_tok, object args, object kwargs):
    """The deterministic part of a pure task's key: function token and arguments."""
    h = hashlib.md5(func_tok.encode())
    try:
        h.update(msgpack.packb((args, kwargs or None), use_bin_type=True))
    except Exception:
        import cloudpickle
        try:
            h.update(cloudpickle.dumps((args, kwargs), protocol=5))
        except Exception:
            return uuid.uuid4().hex
    return h.hexdigest()


def replace_futures(object obj, list deps):
    """Copy of `obj` with every Future replaced by a TaskRef; their keys go to deps."""
    t = type(obj)
    if isinstance(obj, FutureBase):
        deps.append((<FutureBase>obj).key)
        return TaskRef((<FutureBase>obj).key)
    if t is list or t is tuple:
        out = [replace_futures(x, deps) for x in obj]
        return out if t is list else tuple(out)
    if t is dict:
        return {k: replace_futures(v, deps) for k, v in (<dict>obj).items()}
    if t is set or t is frozenset:
        return t(replace_futures(x, deps) for x in obj)
    return obj
