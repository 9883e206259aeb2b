"""Future, as_completed, wait and fire_and_forget: the client-side view of remote keys.

A `Future` is a handle on one key. All futures of a client for the same key
share one `FutureState`, which the client updates from scheduler messages on
its event loop. Callers in other threads wait on a C lock of their own (sync
API), coroutines on an asyncio future created on the client's loop (async
API). FutureState and Future's base are compiled (core/client_dispatch.pyx):
a submit -> result round trip goes through them several times. When the last Future of a key is released or garbage-collected the
client tells the scheduler, which forgets the key unless another client
still wants it.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from collections import namedtuple

from taskcore.core import messages
from taskcore.core.client_dispatch import (CANCELLED, ERROR, FINISHED, LOST, NOT_READY,
                                           PENDING, FutureBase, FutureState)

__all__ = ["PENDING", "FINISHED", "ERROR", "CANCELLED", "LOST", "Future", "FutureState",
           "RemoteTraceback", "wait", "as_completed", "fire_and_forget", "ALL_COMPLETED",
           "FIRST_COMPLETED", "FIRST_EXCEPTION", "DoneAndNotDone", "default_client",
           "futures_of", "bound_to"]

_default_client = None


def default_client(c=None):
    """The current default Client (the last one created with set_as_default=True)."""
    if c is not None:
        return c
    if _default_client is None or _default_client.status == "closed":
        raise ValueError("No clients found. Start a Client first: Client(LocalCluster()) "
                         "or Client('tcp://scheduler:port')")
    return _default_client


def _set_default_client(client):
    """Make `client` the default (None: no default). Called by the Client."""
    global _default_client
    _default_client = client


def _current_default():
    return _default_client


_unpickling = threading.local()


class bound_to:
    """`with bound_to(client):` Futures unpickled in this thread meanwhile belong to
    `client` (a value handed out by the scheduler's coordination primitives), not
    to the default client."""

    def __init__(self, client):
        self.client = client

    def __enter__(self):
        self.previous = getattr(_unpickling, "client", None)
        _unpickling.client = self.client
        return self.client

    def __exit__(self, *exc):
        _unpickling.client = self.previous


def _future_from_key(key):
    return Future(key, getattr(_unpickling, "client", None))


class Future(FutureBase):
    """A remote key. Awaitable, picklable into tasks (arrives there as its data)."""

    __slots__ = ()

    def __init__(self, key, client=None, state=None):
        self._bind(key, default_client(client), state)

    # -- results ----------------------------------------------------------------
    # result(timeout) is FutureBase's: it returns a result that came back inline
    # and calls this for everything else.
    def _result_slow(self, timeout):
        if self.client.asynchronous:
            return self._result()
        return self.client.sync(self._result, timeout=timeout)

    async def _result(self, raiseit=True):
        v = self._inline_result()
        if v is not NOT_READY:
            return v
        st = self._state
        await st.wait()
        v = self._inline_result()
        if v is not NOT_READY:
            return v
        if st.status == ERROR:
            exc = self.client._materialize_exception(st)
            if raiseit:
                raise exc
            return exc
        if st.status == CANCELLED or st.status == LOST:
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
        if self._state.status == CANCELLED or self._state.status == LOST:
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

    def __reduce__(self):
        # Pickled by the client into task arguments it is replaced by a TaskRef
        # before this ever runs; pickled anywhere else, it becomes a Future of the
        # unpickling process's default client.
        return (_future_from_key, (self.key,))

    def __repr__(self):
        return f"<Future: {self.status}, key: {self.key!r}>"

    __hash__ = FutureBase.__hash__
    __eq__ = FutureBase.__eq__


class RemoteTraceback(Exception):
    """Carries the worker-side traceback text; chained as the __cause__ of a task's exception."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return "\n\nRemote traceback (most recent call last):\n" + self.text


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
        client._send_threadsafe(messages.fire_and_forget(list(keys)))


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


def futures_of(obj):
    """The taskcore Futures inside obj: futures, containers of them, persisted collections."""
    out = []
    seen = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        t = type(x)
        if t is Future:
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
        elif t in (list, tuple, set, frozenset):
            stack.extend(x)
        elif t is dict:
            stack.extend(x.values())
        elif hasattr(x, "__dask_graph__") and callable(getattr(x, "__dask_graph__", None)):
            try:
                g = x.__dask_graph__()
            except Exception:
                continue
            if g is None:
                continue
            for v in g.values():
                if type(v) is Future:
                    stack.append(v)
                elif type(getattr(v, "value", None)) is Future:
                    stack.append(v.value)
    out.reverse()
    return out
