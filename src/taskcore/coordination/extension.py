"""The plumbing every coordination primitive shares, on both sides of the wire.

Scheduler side
    `Scheduler.extensions` maps a name to an `Extension`: the scheduler-side state of
    one primitive (variables, queues, locks, ...). Extensions are made on first use
    (`extension(scheduler, name)`), so a scheduler nobody asks for a `Variable` imports
    none of this. They are reached only through the client's `op: rpc` message, with
    `method` written "<extension>.<operation>" (`rpc_handler`), never from the task
    messages of the hot path. Each has hooks for a client leaving and a worker being
    removed, and one for the scheduler closing. All their state lives on the
    scheduler's event loop: a waiting request is a future on that loop (`waiter`), with
    its timeout a timer on the same loop that fails it; nothing polls.

Keys kept alive
    A value that holds Futures (a Future, a list of them, a persisted collection) is
    kept alive by `KeyHolder`, a client of the scheduler's state machine that lives in
    the scheduler: holding a key is a `ClientWantsKeys` for the holder's id, with a count
    per key, so a key in two queues and a variable is released when the last lets go.
    Handing a value out (`Variable.get`, `Queue.get`, `get_dataset`) makes the asking
    client want its keys in the same scheduler step, before the reply goes out, so there
    is no moment where nobody wants them; the client then asks again (`keys.want`) once
    its Futures exist, which brings it their state (a key already in memory is reported
    at once).

Client side
    `client_of`, `call` and `pack`/`unpack`: the client a primitive uses (the running
    task's worker client inside a task, else the default client), an rpc that first
    sends what the client queued before it (so a `submit` then `Variable.set(future)`
    reaches the scheduler in that order), and the one encoding of a value: its pickle,
    opaque to the scheduler, plus the keys of the Futures inside it.
"""
from __future__ import annotations

import asyncio
import importlib

__all__ = ["EXTENSIONS", "Extension", "KeyHolder", "extension", "rpc_handler", "waiter",
           "expect_name", "client_of", "call", "send", "pack", "unpack", "parse_timeout",
           "maybe_sync", "current_worker", "AcquireContext"]

#: extension name -> (module, class); the first part of an rpc method "name.operation"
EXTENSIONS = {
    "keys": ("taskcore.coordination.extension", "KeyHolder"),
    "variable": ("taskcore.coordination.variable", "VariableExtension"),
    "queue": ("taskcore.coordination.queues", "QueueExtension"),
    "lock": ("taskcore.coordination.locks", "LockExtension"),
    "multi_lock": ("taskcore.coordination.locks", "MultiLockExtension"),
    "semaphore": ("taskcore.coordination.semaphore", "SemaphoreExtension"),
    "event": ("taskcore.coordination.event", "EventExtension"),
    "pubsub": ("taskcore.coordination.pubsub", "PubSubExtension"),
    "datasets": ("taskcore.coordination.datasets", "DatasetExtension"),
}


# -- scheduler side -----------------------------------------------------------------------

def extension(scheduler, name):
    """The scheduler's extension `name`, made on first use."""
    ext = scheduler.extensions.get(name)
    if ext is None:
        try:
            module, cls = EXTENSIONS[name]
        except KeyError:
            raise ValueError(f"unknown scheduler extension {name!r}; known: "
                             f"{sorted(EXTENSIONS)}") from None
        ext = getattr(importlib.import_module(module), cls)(scheduler)
        scheduler.extensions[name] = ext
    return ext


def rpc_handler(scheduler, method):
    """The handler of rpc `method` ("variable.set") as `handler(peer, **args)`, or None
    when `method` names no extension's operation."""
    name, dot, op = method.partition(".")
    if not dot or name not in EXTENSIONS or not op.isidentifier():
        return None
    handler = getattr(extension(scheduler, name), f"rpc_{op}", None)
    if handler is None:
        return None

    def checked(peer, **args):
        # The rpc task may start after its client left (the client's removal ran first):
        # nothing may be granted to, or handed to, a client that is gone.
        if peer.kind == "client" and peer.id not in scheduler.clients:
            raise ConnectionError(f"client {peer.id} has disconnected")
        return handler(peer, **args)

    return checked


class Extension:
    """Scheduler-side state of one primitive. Subclasses define `rpc_<operation>(peer,
    **args)` methods (plain or async) and override the hooks they need."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    @property
    def keys(self) -> "KeyHolder":
        return extension(self.scheduler, "keys")

    def client_removed(self, client: str) -> None:
        """A client's connection closed: release what it held, drop its waiters."""

    def worker_removed(self, worker: str) -> None:
        """The scheduler removed a worker (closed, died, or missed its heartbeats)."""

    def restarted(self) -> None:
        """`Client.restart()` cancelled every key, those held here included."""

    def close(self) -> None:
        """The scheduler is closing: cancel timers."""


def waiter(timeout, what):
    """A future on the running loop that a grant resolves; after `timeout` seconds
    (None: never) it fails with a TimeoutError saying `what` was waited for. Whoever
    resolves it first wins: a grant checks `done()` first, so a request that timed out
    is never granted."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    if timeout is not None:
        handle = loop.call_later(timeout, _expire, fut, what, timeout)
        fut.add_done_callback(lambda _f: handle.cancel())
    return fut


def _expire(fut, what, timeout):
    if not fut.done():
        fut.set_exception(TimeoutError(f"timed out after {timeout} s waiting for {what}"))


def expect_name(name, what="name"):
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what} must be a non-empty string, got {name!r}")
    return name


def parse_timeout(timeout):
    """Seconds, or None for no limit; dask's forms ("2s", 0.5) are accepted."""
    from taskcore.utils import parse_timedelta

    try:
        return parse_timedelta(timeout)
    except ValueError as e:
        raise ValueError(f"invalid timeout {timeout!r}: {e}") from None


class KeyHolder(Extension):
    """The scheduler-side client that keeps the keys of held values alive."""

    ID = "taskcore-coordination"        # its client id in the state machine

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.counts: dict = {}

    def hold(self, keys):
        from taskcore.core.scheduler_state import ClientWantsKeys

        new = []
        for k in keys:
            n = self.counts.get(k, 0)
            if n == 0:
                new.append(k)
            self.counts[k] = n + 1
        if new:
            self.scheduler.handle(ClientWantsKeys(self.ID, new, stimulus_id="coordination-hold"))

    def release(self, keys):
        from taskcore.core.scheduler_state import ClientReleasesKeys

        gone = []
        for k in keys:
            n = self.counts.get(k, 0) - 1
            if n > 0:
                self.counts[k] = n
            else:
                self.counts.pop(k, None)
                gone.append(k)
        if gone and self.scheduler.status == "running":
            self.scheduler.handle(ClientReleasesKeys(self.ID, gone,
                                                     stimulus_id="coordination-release"))

    def restarted(self):
        # The restart's forced cancel dropped every wanter, this holder included: a key
        # held again later must be wanted anew, not counted as already held.
        self.counts.clear()

    def give(self, peer, keys):
        """`peer`'s client wants `keys` from now on (a value handed to it)."""
        from taskcore.core.scheduler_state import ClientWantsKeys

        if keys and peer.kind == "client" and peer.id in self.scheduler.clients:
            self.scheduler.handle(ClientWantsKeys(peer.id, list(keys),
                                                  stimulus_id="coordination-give"))

    def rpc_want(self, peer, keys):
        """The client made Futures for `keys` (from a value it got): it wants them, and
        learns their state (a key in memory is reported at once)."""
        self.give(peer, keys)


# -- client side ----------------------------------------------------------------------------

def client_of(client=None):
    """`client`, else the running task's worker client, else the default client."""
    if client is not None:
        return client
    from taskcore.task_context import get_client

    return get_client()


def maybe_sync(client, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` (a coroutine function) run by `client`: the result for a sync client,
    an awaitable for an asynchronous one.

    A TimeoutError of `fn` comes out as itself: `LoopRunner.run_sync`, under
    `Client.sync`, rewrites every TimeoutError into its own "operation timed out after
    None s", which would hide what was waited for."""
    if client.asynchronous:
        return fn(*args, **kwargs)
    outcome = client.sync(_capture_timeout, fn, args, kwargs)
    if isinstance(outcome, _Raised):
        raise outcome.exc
    return outcome


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


async def _capture_timeout(fn, args, kwargs):
    try:
        return await fn(*args, **kwargs)
    except TimeoutError as e:
        return _Raised(e)


async def call(client, method, **args):
    """An rpc to the scheduler, on the client's loop, after what the client queued."""
    client._hot.flush_outbox(False)
    return await client._rpc(method, **args)


def send(client, method, **args):
    """An rpc whose reply nobody waits for, queued in order with the client's other
    messages; safe from any thread."""
    client._send_threadsafe({"op": "rpc", "reqid": next(client._reqids), "method": method,
                             "args": args})


def pack(value):
    """{"value": Serialized, "keys": [...]}: the one wire form of a held value."""
    from taskcore.core.serialize import serialize_obj
    from taskcore.futures import futures_of

    keys = list(dict.fromkeys(f.key for f in futures_of(value)))
    return {"value": serialize_obj(value), "keys": keys}


def unpack(client, packed):
    """The value of `pack`'s form, its Futures bound to `client` (on its loop)."""
    from taskcore.core.serialize import Serialized
    from taskcore.futures import bound_to

    value = packed["value"]
    if isinstance(value, Serialized):
        with bound_to(client):
            value = value.deserialize()
    keys = packed.get("keys") or ()
    if keys:
        pending = [k for k in keys if (st := client._states.get(k)) is not None
                   and not st.done()]
        if pending:
            send(client, "keys.want", keys=pending)
    return value


def current_worker():
    """The address of the worker running the calling task, or None outside tasks: a
    lease or lock taken by a task is released when the scheduler removes its worker."""
    from taskcore.core.worker_dispatch import task_local

    w = getattr(task_local, "worker", None)
    return None if w is None else w.address


class AcquireContext:
    """`with` and `async with` for a primitive with `acquire()` and `release()` (Lock,
    MultiLock, Semaphore): acquire or TimeoutError on entry, release on exit."""

    def __enter__(self):
        if not self.acquire():
            raise TimeoutError(f"could not acquire {self!r}")
        return self

    def __exit__(self, *exc):
        self.release()

    async def __aenter__(self):
        if not await self.acquire():
            raise TimeoutError(f"could not acquire {self!r}")
        return self

    async def __aexit__(self, *exc):
        await self.release()
