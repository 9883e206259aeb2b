"""Actors: a stateful object living on one worker, used remotely through a proxy
(dask.distributed's `actor.py`).

    counter = client.submit(Counter, actor=True).result()    # an Actor proxy
    counter.increment().result()                               # an ActorFuture
    counter.n                                                  # an attribute: its value

How it is built:
- `client.submit(cls, *args, actor=True)` submits a task `_NewActor(cls, key)(*args)`
  with a key of its own. On the worker it builds the instance, keeps it in the worker's
  `ActorHost` and returns a `_HostedActor`: that handle is the task's value in the
  worker's data. Pickled (sent to the client as the result, or to another worker as a
  dependency) it becomes an `Actor` proxy naming the class, the worker and the key; a
  task on the same worker gets the handle itself, which is a proxy too. When the
  scheduler releases the key the handle is dropped and the instance with it.
- A call goes straight to the worker, on a connection of the calling client's pool
  (`actor-execute` / `actor-attribute` on the worker's listener, never through the
  scheduler). Methods run one at a time on the worker's actor thread, `async def`
  methods on the worker's event loop (as in dask).
- The proxy uses the client of where it is called: in a task (or an actor's method) the
  worker's client, elsewhere the default client.
- The worker dying: calls fail with `ActorLostError`, and the actor's Future errs
  ("Worker holding Actor was lost") instead of the scheduler building a new, empty
  instance elsewhere: the client tells the scheduler which keys are actors
  (`actor_submitted`), and the scheduler, before it removes a worker, errs those only
  that worker holds and lets them go (scheduler.py `_fail_actors_of`). A client that
  hears `key-lost` for an actor does the same (`actor_lost`), for a worker removed
  before the scheduler knew the key was an actor.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import uuid

from taskcore.errors import CommClosedError

__all__ = ["Actor", "ActorFuture", "ActorLostError"]

_MISSING = object()


class ActorLostError(CommClosedError):
    """The worker holding an actor cannot be reached (it died or left)."""


# -- the proxy ---------------------------------------------------------------------------

class Actor:
    """A proxy of an actor: method calls return `ActorFuture`s, attribute reads return
    the value (an awaitable with an asynchronous client)."""

    def __init__(self, cls, address, key):
        self._cls = cls
        self._address = address
        self._key = key

    def __reduce__(self):
        return (Actor, (self._cls, self._address, self._key))

    def __repr__(self):
        return f"<Actor: {self._cls.__name__}, key={self._key}>"

    @property
    def key(self):
        return self._key

    @property
    def worker(self):
        """The address of the worker holding the actor."""
        return self._address

    def __dir__(self):
        return sorted(set(object.__dir__(self)) | {n for n in dir(self._cls)
                                                   if not n.startswith("_")})

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        # As in dask: what the class declares (methods, and attributes with a class-level
        # default). Anything else is an AttributeError here, with no remote call, so
        # probes such as `nbytes` or `__dask_graph__` never reach the worker.
        attr = getattr(self._cls, name, _MISSING)
        if attr is _MISSING:
            raise AttributeError(f"{self._cls.__name__!r} has no attribute {name!r} (an "
                                 f"actor's attributes need a class-level default)")
        if callable(attr) and not isinstance(attr, property):
            def method(*args, **kwargs):
                return self._call(name, args, kwargs)

            method.__name__ = name
            method.__doc__ = getattr(attr, "__doc__", None)
            return method
        client = _client()
        msg = {"op": "actor-attribute", "key": self._key, "attribute": name}
        if client.asynchronous and client._in_loop():
            return _request(client, self._address, self._key, msg)
        if client._in_loop():
            raise RuntimeError("reading an actor's attribute blocks: not on the client's "
                               "event loop")
        return asyncio.run_coroutine_threadsafe(
            _request(client, self._address, self._key, msg), client.loop).result()

    def _call(self, name, args, kwargs):
        from taskcore.core.serialize import serialize_obj

        client = _client()
        msg = {"op": "actor-execute", "key": self._key, "method": name,
               "args": serialize_obj((args, kwargs))}
        return ActorFuture(client, _request(client, self._address, self._key, msg))


def _client():
    from taskcore.coordination.extension import client_of

    return client_of(None)


class ActorFuture:
    """The outcome of an actor's method call: `result(timeout=None)` blocks (a sync
    client), `await` works with either kind; `done()`."""

    def __init__(self, client, coro):
        self._client = client
        if client._in_loop():
            self._task = asyncio.ensure_future(coro)
            self._cf = None
        else:
            self._task = None
            self._cf = asyncio.run_coroutine_threadsafe(coro, client.loop)

    def result(self, timeout=None):
        if self._cf is not None:
            try:
                return self._cf.result(timeout)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"the actor call did not finish within {timeout} s") from None
        if self._task.done():
            return self._task.result()
        raise RuntimeError("ActorFuture.result() would block the client's event loop: "
                           "await the ActorFuture instead")

    def done(self):
        return (self._cf or self._task).done()

    def __await__(self):
        if self._task is not None:
            return self._task.__await__()
        return asyncio.wrap_future(self._cf).__await__()

    def __repr__(self):
        return f"<ActorFuture: {'done' if self.done() else 'pending'}>"


async def _request(client, address, key, msg):
    """One request to the worker holding the actor, on a pooled connection of the
    client's (one request at a time per connection)."""
    from taskcore.transports import connect

    pool = client.__dict__.setdefault("_actor_comms", {})
    idle = pool.setdefault(address, [])
    try:
        comm = None
        while idle and comm is None:
            c = idle.pop()
            comm = None if c.closed else c
        if comm is None:
            opts = {"security": client.security} if client.security is not None else {}
            comm = await connect(address, timeout=client.timeout, role="client",
                                 token=client.token, retry_refused=False, **opts)
        await comm.write(msg)
        reply = await comm.read()
    except (OSError, CommClosedError, asyncio.TimeoutError) as e:
        if comm is not None:
            comm.abort()
        raise ActorLostError(f"the worker {address} holding actor {key!r} cannot be "
                             f"reached: {type(e).__name__}: {e}") from None
    idle.append(comm)
    if reply.get("status") == "OK":
        v = reply.get("result")
        return v.deserialize() if hasattr(v, "deserialize") else v
    exc = reply.get("exception")
    try:
        exc = exc.deserialize() if hasattr(exc, "deserialize") else exc
    except Exception:
        exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(reply.get("text") or f"actor {key!r} failed")
    raise exc


# -- the client side of submit(..., actor=True) --------------------------------------------

class _NewActor:
    """The task that builds an actor on its worker (see the module doc)."""

    def __init__(self, cls, key):
        self.cls = cls
        self.key = key

    def __call__(self, *args, **kwargs):
        from taskcore.task_context import get_worker

        worker = get_worker()
        obj = self.cls(*args, **kwargs)
        host = actor_host(worker)
        host.instances[self.key] = obj
        return _HostedActor(self.cls, worker.address, self.key, host, obj)


def submit_actor(client, cls, args, kwargs, key, opts):
    """client.submit(cls, *args, actor=True): the actor's Future."""
    if not isinstance(cls, type):
        raise TypeError(f"submit(..., actor=True) takes a class, got {cls!r}")
    if key is None:
        key = f"{cls.__name__}-{uuid.uuid4().hex}"
    fut = client._hot.submit_call(_NewActor(cls, key), args, kwargs, key, False, opts)
    client.__dict__.setdefault("_actor_keys", set()).add(key)
    # Queued after the submit: the scheduler fails the actor, rather than rebuilding
    # it, if its worker leaves.
    client._send_threadsafe({"op": "rpc", "reqid": next(client._reqids),
                             "method": "actor_submitted", "args": {"keys": [key]}})
    return fut


def actor_lost(client, key):
    """The client heard that actor `key`'s value was lost with its worker: the Future
    errs, and the scheduler is told not to build a new (empty) actor elsewhere."""
    keys = client.__dict__.get("_actor_keys")
    if not keys or key not in keys:
        return False
    st = client._states.get(key)
    if st is not None:
        st.set_error(ActorLostError(f"Worker holding Actor was lost: {key!r}"), None)
    client.comm.send({"op": "rpc", "reqid": next(client._reqids), "method": "cancel",
                      "args": {"keys": [key], "client": client.id, "force": False}})
    keys.discard(key)
    client.__dict__.setdefault("_lost_actors", set()).add(key)
    return True


# -- the worker side -------------------------------------------------------------------------

class ActorHost:
    """A worker's actors: {key: instance}, and the one thread their methods run on."""

    def __init__(self, worker):
        self.worker = worker
        self.instances: dict = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="taskcore-actor", initializer=self._thread_init)

    def _thread_init(self):
        # get_client() and get_worker() in an actor's method find this worker.
        from taskcore.core.worker_dispatch import task_local

        task_local.worker = self.worker

    def close(self):
        self.instances.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)


def actor_host(worker):
    host = getattr(worker, "_actor_host", None)
    if host is None:
        host = worker._actor_host = ActorHost(worker)
    return host


class _HostedActor(Actor):
    """The value of an actor's task in its worker's data: a proxy that also keeps the
    instance; when the worker drops it (the key released), the instance goes too."""

    def __init__(self, cls, address, key, host, obj):
        super().__init__(cls, address, key)
        self._host = host
        self._obj = obj

    def __del__(self):
        try:
            if self._host.instances.get(self._key) is self._obj:
                del self._host.instances[self._key]
        except Exception:
            pass


async def serve(worker, comm, msg):
    """A worker's answer to actor-execute / actor-attribute."""
    from taskcore.core.serialize import serialize_obj

    key = msg.get("key")
    try:
        host = actor_host(worker)
        obj = host.instances.get(key, _MISSING)
        if obj is _MISSING:
            raise KeyError(f"no actor {key!r} on worker {worker.address} (released, or the "
                           f"worker restarted)")
        if msg["op"] == "actor-attribute":
            result = getattr(obj, msg["attribute"])
        else:
            fn = getattr(obj, msg["method"])
            a = msg.get("args")
            args, kwargs = a.deserialize() if hasattr(a, "deserialize") else a
            if inspect.iscoroutinefunction(fn):
                result = await fn(*args, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(host.executor, lambda: fn(*args, **kwargs))
                if inspect.isawaitable(result):
                    result = await result
        reply = {"status": "OK", "result": serialize_obj(result)}
    except Exception as e:
        try:
            ser = serialize_obj(e)
        except Exception:
            ser = serialize_obj(RuntimeError(f"{type(e).__name__}: {e}"))
        reply = {"status": "error", "exception": ser, "text": f"{type(e).__name__}: {e}"}
    await comm.write(reply)
