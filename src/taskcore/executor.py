"""Executors: the worker's task threads (`TaskExecutor`), and the client's
`concurrent.futures.Executor` over the cluster (`ClientExecutor`, from
`client.get_executor()`).

Design (docs/design.md, measured facts): handing each task to a `ThreadPoolExecutor` with a
`call_soon_threadsafe` per result cost ~6 µs of worker CPU per task and cut
tiny-task throughput 3x. Instead, `nthreads` dedicated threads pull from one
`SimpleQueue`, and finished results go into a deque; a thread wakes the event
loop only when that deque goes from empty to non-empty, so a burst of results
costs one wake-up, and the loop drains them all in one callback.

`secede()` (called from inside a task) hands the task's slot back: a
replacement thread starts, and the seceded thread exits when its task ends.
`rejoin()` takes a slot back; the pool shrinks to `nthreads` again as threads
finish.
"""
from __future__ import annotations

import collections
import concurrent.futures   # (asyncio imports it anyway)
import queue
import threading
import time

_thread_state = threading.local()


class TaskExecutor:
    def __init__(self, nthreads, loop, on_results, name="taskcore-worker"):
        self.nthreads = nthreads
        self.loop = loop
        self.on_results = on_results
        self.name = name
        self.queue = queue.SimpleQueue()
        self.results = collections.deque()
        self.lock = threading.Lock()
        self.threads = set()
        self.active = 0          # threads counted against nthreads
        self.closed = False
        self._counter = 0
        for _ in range(nthreads):
            self._spawn()

    def _spawn(self):
        with self.lock:
            self.active += 1
            self._counter += 1
            n = self._counter
        t = threading.Thread(target=self._run, name=f"{self.name}-{n}", daemon=True)
        self.threads.add(t)
        t.start()

    def submit(self, tid, fn):
        """Run fn() on a task thread; (tid, ok, value, start, stop) reaches on_results."""
        self.queue.put((tid, fn))

    def _run(self):
        _thread_state.executor = self
        get = self.queue.get
        results = self.results
        lock = self.lock
        perf = time.time
        try:
            while True:
                item = get()
                if item is None:
                    return
                tid, fn = item
                _thread_state.seceded = False
                _thread_state.tid = tid
                start = perf()
                try:
                    value = fn()
                    ok = True
                except BaseException as e:  # noqa: B902 - the task's error is its result
                    value = e
                    ok = False
                stop = perf()
                with lock:
                    wake = not results
                    results.append((tid, ok, value, start, stop))
                # This idle thread must not keep the last result (or task) alive until its
                # next task: the worker decides when a value goes (an actor's instance
                # goes with its value, actors.py).
                value = fn = item = None
                if wake:
                    try:
                        self.loop.call_soon_threadsafe(self._drain)
                    except RuntimeError:  # loop closed: the worker is gone
                        return
                with lock:
                    if _thread_state.seceded:
                        # This thread's slot was handed to a replacement already.
                        return
                    if self.active > self.nthreads:
                        # A rejoined task made the pool too big: shrink by one.
                        self.active -= 1
                        return
        finally:
            self.threads.discard(threading.current_thread())

    def _drain(self):
        with self.lock:
            items = list(self.results)
            self.results.clear()
        if items:
            self.on_results(items)

    def secede(self):
        """Called from a task thread: stop counting against nthreads."""
        if getattr(_thread_state, "seceded", True):
            return False
        with self.lock:
            _thread_state.seceded = True
            self.active -= 1
        self._spawn()
        return True

    def rejoin(self):
        """Called from a seceded task thread: count against nthreads again."""
        if not getattr(_thread_state, "seceded", False):
            return False
        with self.lock:
            _thread_state.seceded = False
            self.active += 1
        return True

    def shutdown(self, wait=False, timeout=5):
        self.closed = True
        for _ in range(len(self.threads) + 1):
            self.queue.put(None)
        if wait:
            deadline = time.monotonic() + timeout
            for t in list(self.threads):
                t.join(max(0, deadline - time.monotonic()))


def current_task_id():
    """The task id running on this thread, or None outside task threads."""
    return getattr(_thread_state, "tid", None)


def current_executor():
    return getattr(_thread_state, "executor", None)


class ClientExecutor(concurrent.futures.Executor):
    """`client.get_executor(**kwargs)`: a `concurrent.futures.Executor` whose calls run
    on the cluster. `submit` returns a `concurrent.futures.Future` completed from the
    taskcore Future (on the client's loop); `map` yields results in order (with
    `timeout` counted from the call); `shutdown(wait=True)` waits for what was
    submitted, `cancel_futures=True` cancels what has not finished. Keyword arguments
    (workers, resources, retries, pure=False by default, ...) go to every submit."""

    def __init__(self, client, **kwargs):
        allowed = {"workers", "resources", "retries", "pure", "allow_other_workers",
                   "priority", "fifo_timeout"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"get_executor got unknown options: {unknown}")
        kwargs.setdefault("pure", False)
        self._client = client
        self._kwargs = kwargs
        self._futures = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn, *args, **kwargs):
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        tf = self._client.submit(fn, *args, **self._kwargs, **kwargs)
        cfut = concurrent.futures.Future()
        cfut.set_running_or_notify_cancel()
        with self._lock:
            self._futures.add(tf)
        client = self._client

        async def fill():
            try:
                value = await tf._result()
            except BaseException as e:          # noqa: B902 - the call's error is its outcome
                if not cfut.done():
                    cfut.set_exception(e)
            else:
                if not cfut.done():
                    cfut.set_result(value)
            finally:
                with self._lock:
                    self._futures.discard(tf)

        def start(state=None):
            client.loop.create_task(fill())

        client.loop.call_soon_threadsafe(tf._state.add_callback, start)
        cfut._taskcore_future = tf          # keeps the key wanted while cfut lives
        return cfut

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        deadline = None if timeout is None else time.monotonic() + timeout
        fs = [self.submit(fn, *args) for args in zip(*iterables)]

        def results():
            try:
                for f in fs:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    yield f.result(left)
            finally:
                for f in fs:
                    f.cancel()
        return results()

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._shutdown = True
        with self._lock:
            pending = list(self._futures)
        if cancel_futures and pending:
            self._client.cancel(pending)
        elif wait and pending:
            from taskcore.futures import wait as _wait

            _wait(pending)
