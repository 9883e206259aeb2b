"""Future, as_completed, wait and fire_and_forget: the client-side view of remote keys.

A `Future` is a handle on one key. All futures of a client for the same key
share one `FutureState`, which the client updates from scheduler messages on
its event loop. Callers in other threads wait through a `threading.Event`
(sync API) or through an asyncio future created on the client's loop (async
API). When the last Future of a key is released or garbage-collected the
client tells the scheduler, which forgets the key unless another client
still wants it.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from collections import namedtuple

from taskcore.core.serialize import Serialized
from taskcore.errors import CancelledError, FutureLostError

PENDING, FINISHED, ERROR, CANCELLED, LOST = "pending", "finished", "error", "cancelled", "lost"
_event_lock = threading.Lock()
_allocate_lock = threading.Lock


class RemoteTraceback(Exception):
    """Carries the worker-side traceback text; chained as the __cause__ of a task's exception."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return "\n\nRemote traceback (most recent call last):\n" + self.text


class FutureState:
    """Shared state of one key on one client; mutated only on the client's loop."""

    __slots__ = ("key", "status", "data", "has_data", "exception", "traceback", "type",
                 "_event", "_waiters", "callbacks", "loop")

    def __init__(self, key, loop):
        self.key = key
        self.loop = loop
        self.status = PENDING
        self.data = None          # inline result (Serialized or object), if the scheduler sent it
        self.has_data = False
        self.exception = None
        self.traceback = None
        self.type = None
        self._event = None        # locks of threads blocked in wait_sync, if any
        self._waiters = None
        self.callbacks = None

    def done(self):
        return self.status != PENDING

    def _set(self, status):
        self.status = status
        if self._event is not None:
            with _event_lock:
                locks, self._event = self._event, None
            for lock in locks:
                lock.release()
        if self._waiters:
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)
            self._waiters = None
        if self.callbacks:
            cbs, self.callbacks = self.callbacks, None
            for cb in cbs:
                cb(self)

    def finish(self, data=None, has_data=False, type=None):
        self.type = type
        if has_data:
            self.data = data
            self.has_data = True
        self._set(FINISHED)

    def set_error(self, exception, traceback):
        self.exception = exception
        self.traceback = traceback
        self._set(ERROR)

    def cancel(self, reason=None):
        self.exception = CancelledError(reason or f"key {self.key!r} was cancelled")
        self._set(CANCELLED)

    def lose(self):
        self.exception = FutureLostError(f"key {self.key!r} was lost by the scheduler")
        self._set(LOST)

    def reset(self):
        """Back to pending (retry, or the scheduler recomputing a lost key)."""
        self.status = PENDING
        self.data = None
        self.has_data = False
        self.exception = None
        self.traceback = None

    async def wait(self):
        """Wait on the client's loop."""
        while self.status == PENDING:
            w = self.loop.create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(w)
            await w

    def wait_sync(self, timeout=None):
        """Wait from any thread (the loop thread must not call this).

        Each waiting thread blocks on a lock of its own that `_set` releases: one C
        lock instead of a threading.Event (a Condition and its Python code on both
        sides), which shows in a submit -> result round trip."""
        if self.status != PENDING:
            return True
        lock = _allocate_lock()
        lock.acquire()
        with _event_lock:
            if self.status != PENDING:  # finished meanwhile: nobody would release us
                return True
            if self._event is None:
                self._event = []
            self._event.append(lock)
        if lock.acquire(True, -1 if timeout is None else max(timeout, 0)):
            return True
        with _event_lock:               # timed out: withdraw
            if self._event is not None and lock in self._event:
                self._event.remove(lock)
        return self.status != PENDING

    def add_callback(self, cb):
        """cb(state) runs on the client's loop once the state is done."""
        if self.done():
            cb(self)
        else:
            if self.callbacks is None:
                self.callbacks = []
            self.callbacks.append(cb)


class Future:
    """A remote key. Awaitable, picklable into tasks (arrives there as its data)."""

    __slots__ = ("key", "client", "_state", "_released", "__weakref__")

    def __init__(self, key, client=None, state=None):
        if client is None:
            from taskcore.client import default_client

            client = default_client()
        self.key = key
        self.client = client
        # `state` given: the caller already took this Future's reference (_submit_tasks).
        self._state = state if state is not None else client._inc_ref(key)
        self._released = False

    # -- status ---------------------------------------------------------------
    @property
    def status(self):
        return self._state.status

    def done(self):
        return self._state.done()

    def cancelled(self):
        return self._state.status == CANCELLED

    # -- results --------------------------------------------------------------
    def result(self, timeout=None):
        """The task's result; re-raises the task's exception with the remote traceback."""
        client = self.client
        if client.asynchronous:
            return self._result()
        st = self._state
        if asyncio._get_running_loop() is not client.loop:    # not client._in_loop()
            # Fast path: wait in this thread and take a result that came back inline,
            # without a round trip through the client's loop thread (two fewer
            # cross-thread wake-ups per call).
            if st.status == PENDING and not st.wait_sync(timeout):
                raise TimeoutError(f"result of {self.key!r} not ready after {timeout} s")
            if st.status == FINISHED and st.has_data:
                d = st.data
                if isinstance(d, Serialized):
                    d = d.deserialize()
                    st.data = d
                return d
        return self.client.sync(self._result, timeout=timeout)

    async def _result(self, raiseit=True):
        await self._state.wait()
        st = self._state
        if st.status == ERROR:
            exc = self.client._materialize_exception(st)
            if raiseit:
                raise exc
            return exc
        if st.status in (CANCELLED, LOST):
            if raiseit:
                raise st.exception
            return st.exception
        return (await self.client._gather([self]))[0]

    def exception(self, timeout=None):
        if self.client.asynchronous:
            return self._exception()
        return self.client.sync(self._exception, timeout=timeout)

    async def _exception(self):
        await self._state.wait()
        if self._state.status == ERROR:
            return self.client._materialize_exception(self._state)
        if self._state.status in (CANCELLED, LOST):
            return self._state.exception
        return None

    def traceback(self, timeout=None):
        """The remote traceback as text, or None if the task did not err."""
        if self.client.asynchronous:
            return self._traceback()
        return self.client.sync(self._traceback, timeout=timeout)

    async def _traceback(self):
        await self._state.wait()
        if self._state.status == ERROR:
            exc = self.client._materialize_exception(self._state)
            return getattr(exc, "__taskcore_traceback__", None)
        return None

    def __await__(self):
        return self._result().__await__()

    def cancel(self, force=False):
        return self.client.cancel([self], force=force)

    def retry(self):
        return self.client.retry([self])

    def add_done_callback(self, fn):
        """Call fn(future) once done. Runs in a separate thread so fn may block on results."""

        def cb(state):
            threading.Thread(target=fn, args=(self,), daemon=True).start()

        self.client.loop.call_soon_threadsafe(self._state.add_callback, cb)

    # -- lifetime -------------------------------------------------------------
    def release(self):
        if not self._released:
            self._released = True
            self.client._dec_ref(self.key)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass

    def __reduce__(self):
        # Pickled by the client into task arguments it is replaced by a TaskRef
        # before this ever runs; pickled anywhere else, it becomes a Future of the
        # unpickling process's default client.
        return (_future_from_key, (self.key,))

    def __repr__(self):
        return f"<Future: {self.status}, key: {self.key!r}>"

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, Future) and other.key == self.key and other.client is self.client


def _future_from_key(key):
    return Future(key)


# -- waiting on many ----------------------------------------------------------------

DoneAndNotDone = namedtuple("DoneAndNotDone", ["done", "not_done"])
ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION = "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"


def _futures_in(obj):
    out = []
    if isinstance(obj, Future):
        out.append(obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            out.extend(_futures_in(x))
    elif isinstance(obj, dict):
        for x in obj.values():
            out.extend(_futures_in(x))
    return out


async def _wait(futures, timeout=None, return_when=ALL_COMPLETED):
    fs = _futures_in(futures)
    if not fs:
        return DoneAndNotDone(set(), set())
    waits = {asyncio.ensure_future(f._state.wait()): f for f in fs if not f.done()}
    if waits:
        if return_when == ALL_COMPLETED:
            when = asyncio.ALL_COMPLETED
        elif return_when == FIRST_COMPLETED:
            when = asyncio.FIRST_COMPLETED
        elif return_when == FIRST_EXCEPTION:
            when = asyncio.FIRST_EXCEPTION
        else:
            raise ValueError(f"unknown return_when {return_when!r}")
        if return_when == FIRST_EXCEPTION:
            # asyncio's FIRST_EXCEPTION looks at the waiter coroutines, which never
            # raise: watch for an erred future ourselves.
            pending = set(waits)
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while pending:
                t = None if deadline is None else max(0, deadline - loop.time())
                _, pending = await asyncio.wait(pending, timeout=t,
                                                return_when=asyncio.FIRST_COMPLETED)
                if any(f.status in (ERROR, CANCELLED, LOST) for f in fs) or t == 0:
                    break
        else:
            _, pending = await asyncio.wait(waits, timeout=timeout, return_when=when)
        for p in pending:
            p.cancel()
        if return_when == ALL_COMPLETED and pending:
            raise TimeoutError(f"{len(pending)} of {len(fs)} futures not done after {timeout} s")
    return DoneAndNotDone({f for f in fs if f.done()}, {f for f in fs if not f.done()})


def wait(futures, timeout=None, return_when=ALL_COMPLETED):
    """Wait until futures finish (or one finishes, or one errs). Returns (done, not_done)."""
    fs = _futures_in(futures)
    if not fs:
        return DoneAndNotDone(set(), set())
    client = fs[0].client
    if client.asynchronous:
        return _wait(futures, timeout, return_when)
    return client.sync(_wait, futures, timeout, return_when)


def fire_and_forget(obj):
    """Compute these futures even after every Future object for them is released."""
    fs = _futures_in(obj)
    by_client = collections.defaultdict(list)
    for f in fs:
        by_client[f.client].append(f.key)
    for client, keys in by_client.items():
        client._send_threadsafe({"op": "fire-and-forget", "keys": keys})


class as_completed:
    """Iterate over futures in the order they finish.

    `with_results=True` yields (future, result) pairs; `raise_errors=False` yields
    erred futures' exceptions instead of raising. Supports `add`, `update`,
    `batches()`, `count()`, `is_empty()` and `async for`.
    """

    def __init__(self, futures=None, loop=None, with_results=False, raise_errors=True):
        self.with_results = with_results
        self.raise_errors = raise_errors
        self._lock = threading.Lock()
        self._queue = collections.deque()
        self._cond = threading.Condition(self._lock)
        self._pending = set()
        self._client = None
        self._async_event = None
        if futures:
            self.update(futures)

    def _notify(self, future):
        with self._lock:
            self._pending.discard(future)
            self._queue.append(future)
            self._cond.notify_all()
            ev = self._async_event
        if ev is not None:
            self._client.loop.call_soon_threadsafe(ev.set)

    def add(self, future):
        self._client = future.client
        with self._lock:
            self._pending.add(future)

        def cb(state, future=future):
            self._notify(future)

        future.client.loop.call_soon_threadsafe(future._state.add_callback, cb)

    def update(self, futures):
        for f in futures:
            self.add(f)

    def count(self):
        with self._lock:
            return len(self._pending) + len(self._queue)

    def is_empty(self):
        return self.count() == 0

    def has_ready(self):
        with self._lock:
            return bool(self._queue)

    def _item(self, future):
        if not self.with_results:
            return future
        if future.status == ERROR or future.status in (CANCELLED, LOST):
            if self.raise_errors:
                future.result()  # raises
            return future, future.exception()
        return future, future.result()

    def __iter__(self):
        return self

    def __next__(self):
        with self._cond:
            while not self._queue:
                if not self._pending:
                    raise StopIteration
                self._cond.wait(0.1)
            f = self._queue.popleft()
        return self._item(f)

    def next_batch(self, block=True):
        with self._cond:
            while block and not self._queue and self._pending:
                self._cond.wait(0.1)
            batch = list(self._queue)
            self._queue.clear()
        return [self._item(f) for f in batch]

    def batches(self):
        while True:
            with self._lock:
                if not self._queue and not self._pending:
                    return
            batch = self.next_batch(block=True)
            if batch:
                yield batch

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            with self._lock:
                if self._queue:
                    f = self._queue.popleft()
                    break
                if not self._pending:
                    raise StopAsyncIteration
                if self._async_event is None:
                    self._async_event = asyncio.Event()
                ev = self._async_event
                ev.clear()
            await ev.wait()
        if not self.with_results:
            return f
        if f.status in (ERROR, CANCELLED, LOST):
            exc = await f._exception()
            if self.raise_errors:
                raise exc
            return f, exc
        return f, await f._result()
