"""The Client: the dask.distributed user API on top of taskcore's scheduler.

Threads and loops
    A synchronous Client runs its comm on a background uvloop thread
    (`LoopRunner`) and blocks the caller in `sync()`. An asynchronous Client
    (`asynchronous=True`) uses the caller's running loop and every method
    returns an awaitable.

Hot path
    Compiled, in `core/client_dispatch.pyx` (`ClientHotPath`, `FutureBase`,
    `FutureState`): `submit`/`map` build task records in the caller's thread and
    queue them for the loop (which is woken only when the outbox goes from empty
    to non-empty); a blocking `result()` writes its own queued submit to the
    socket before it waits (the comm sink's `write_now`). Small results come back
    inline with the scheduler's `keys-in-memory` message, so `result()` usually
    needs no second round trip; large ones are fetched straight from the worker
    that holds them.

Messages (client -> scheduler)
    register-client, update-graph, release-keys, fire-and-forget,
    retry, close-client, rpc {reqid, method, args}
Messages (scheduler -> client)
    keys-in-memory [op, keys, data] (positional; docs/contracts.md),
    task-erred {key, exception, traceback},
    key-cancelled {keys}, key-lost {keys}, reply {reqid, result | error},
    forwarded-logs {worker, records} (forward_logging.py),
    pubsub-msg (coordination/pubsub.py), event {topic, event} (subscribe_topic)
Workers, directly: get-data; actor-execute / actor-attribute (actors.py)

Also here, each a thin call to the scheduler: plugins and upload_file (plugins.py),
get_executor (executor.py), metadata, replicate/rebalance, structured events, actors
(`submit(cls, actor=True)`, actors.py).

Diagnostics (docs/diagnostics.md): get_task_stream, profile, get_versions,
get_worker_logs, get_scheduler_logs, forward_logging; rpcs answered by the
scheduler's SchedulerDiagnostics (scheduler_diagnostics.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import sys
import threading
import uuid
from collections.abc import Iterator

from taskcore import futures as _futures
from taskcore.core.messages import decode_key_report
from taskcore.core.protocol import PROTOCOL_ERROR
from taskcore.core.client_dispatch import (ClientHotPath, func_token as _func_token,
                                           funcname as _funcname, tokenize as _tokenize)
from taskcore.core.serialize import Serialized, serialize_obj
from taskcore.errors import CommClosedError
from taskcore.futures import default_client  # noqa: F401 (public here too)
from taskcore.futures import (ERROR, FINISHED, PENDING, Future, RemoteTraceback,
                              _futures_in)
from taskcore.transports import connect
from taskcore.utils import LoopRunner, gc_paused

logger = logging.getLogger("taskcore.client")

_default_lock = threading.Lock()
_NATIVE = (int, float, str, bytes, bool, type(None))


class _DaskImportHook:
    """A meta-path finder that runs once: after `import dask`, install the default client."""

    _installed = None

    @classmethod
    def install(cls, client):
        if cls._installed is None:
            cls._installed = cls()
            sys.meta_path.insert(0, cls._installed)

    def find_spec(self, name, path=None, target=None):
        if name != "dask":
            return None
        sys.meta_path.remove(self)
        type(self)._installed = None
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            client = _futures._current_default()
            if client is not None and client.status == "running" and client._set_as_default:
                client._install_dask_scheduler()

        loader.exec_module = exec_module
        return spec


# dask.distributed Client options that have no effect here: accepted, so that code
# written for dask runs unchanged. Any other unknown option is an error.
_DASK_ONLY_OPTIONS = frozenset({"heartbeat_interval", "serializers", "deserializers",
                                "extensions"})


class _ClientDispatch(ClientHotPath):
    """The compiled client path with its hook: every message from the scheduler
    but keys-in-memory goes to the Client."""

    def handle_other(self, msg):
        self.client._handle_other(msg)



_SKIPPED = object()
_NO_DEFAULT = object()        # get_dataset without a default


def _rebuild(x, table):
    """`x` with each Future replaced by its value in `table` (futures missing from it, the
    skipped ones, are left out). A module-level function, not a closure: a nested function
    that calls itself is a reference cycle, and it kept the gathered futures (and their
    data on the workers) alive until Python's cycle collector ran."""
    t = type(x)
    if t is Future:
        return table.get(x.key, _SKIPPED)
    if t in (list, tuple):
        out = [y for y in [_rebuild(v, table) for v in x] if y is not _SKIPPED]
        return out if t is list else tuple(out)
    if t is dict:
        out = {}
        for k, v in x.items():
            v = _rebuild(v, table)
            if v is not _SKIPPED:
                out[k] = v
        return out
    if t in (set, frozenset):
        return t([y for y in [_rebuild(v, table) for v in x] if y is not _SKIPPED])
    if hasattr(x, "__iter__") and not isinstance(x, (str, bytes)) and isinstance(x, Iterator):
        return [_rebuild(v, table) for v in x]
    return x

def _to_wire(value):
    """Metadata as the scheduler keeps it: dicts as dicts (so paths reach into them),
    every other value pickled (opaque to the scheduler)."""
    if type(value) is dict:
        return {k: _to_wire(v) for k, v in value.items()}
    return serialize_obj(value)


def _from_wire(value):
    if type(value) is dict:
        return {k: _from_wire(v) for k, v in value.items()}
    return value.deserialize() if isinstance(value, Serialized) else value


class Client:
    """Connect to a taskcore scheduler and run work on its cluster.

    `Client(address | cluster | scheduler_file=..., asynchronous=False, timeout=10,
    name=None, security=None, set_as_default=True)`
    """

    def __init__(self, address=None, loop=None, timeout=10, set_as_default=True,
                 scheduler_file=None, security=None, asynchronous=False, name=None,
                 direct_to_workers=None, connection_limit=512, token=None, **kwargs):
        # The compiled half (core/client_dispatch.pyx): reference counts, future
        # states, the outbox and the lock live there; the attributes below alias them.
        self._uid = uuid.uuid4().hex[:12]
        self._hot = _ClientDispatch(self, asynchronous, self.RELEASE_DELAY)
        self._runner = None
        unknown = sorted(set(kwargs) - _DASK_ONLY_OPTIONS)
        if unknown:
            raise TypeError(f"Client got unknown options: {unknown}")
        self._hot.future_type = Future
        self.asynchronous = asynchronous
        self.timeout = timeout
        self.security = security
        self.token = token            # else the Security's, else TASKCORE_TOKEN (security.py)
        self.name = name
        self.id = f"{name or 'Client'}-{uuid.uuid4()}"
        self.cluster = None
        self._set_as_default = set_as_default
        if address is not None and not isinstance(address, str):
            self.cluster = address
            address = address.scheduler_address
            if security is None:
                self.security = getattr(self.cluster, "security", None)
        if address is None and scheduler_file is not None:
            address = self._read_scheduler_file(scheduler_file, timeout)
        if address is None:
            raise ValueError("Client needs a scheduler address, a cluster, or scheduler_file=")
        self.address = address
        self._states: dict = self._hot.states
        self._refcount: dict = self._hot.refcount
        self._lock = self._hot.lock
        self._reqids = itertools.count(1)
        self._replies: dict = {}
        self._worker_comms: dict = {}
        self._reconnecting = None     # the task reconnecting after a lost scheduler
        self._worker_locks: dict = {}
        self.scheduler_info_cache = {}
        self._forwarding: dict = {}       # logger name -> level, asked by forward_logging
        self._previous_dask_scheduler = None
        self._dask_scheduler = None       # what _install_dask_scheduler put into dask.config
        self._runner = None
        if asynchronous:
            self.loop = loop
            self._started = None
        else:
            self._runner = LoopRunner.shared()
            self.loop = self._runner.loop
            try:
                self._runner.run_sync(self._start, timeout=timeout + 5)
            except BaseException:
                self._runner.release()
                self._runner = None
                raise

    @staticmethod
    def _read_scheduler_file(path, timeout):
        import json
        import os
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(path) as f:
                    return json.load(f)["address"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"scheduler file {path} did not appear within {timeout} s "
                                       f"(exists: {os.path.exists(path)})")
                time.sleep(0.05)

    # -- lifecycle --------------------------------------------------------------------
    def __await__(self):
        async def start():
            if self.status != "running":
                self.loop = asyncio.get_running_loop()
                await self._start()
            return self

        return start().__await__()

    async def _start(self):
        self.loop = asyncio.get_running_loop()
        await self._connect()
        self.status = "running"
        if self._set_as_default:
            with _default_lock:
                _futures._set_default_client(self)
            self._install_dask_scheduler()
        return self

    async def _connect(self):
        """Connect and register (at start, and again after a lost scheduler)."""
        opts = {"security": self.security} if self.security is not None else {}
        comm = await connect(self.address, timeout=self.timeout, role="client", token=self.token,
                             **opts)
        try:
            comm.send({"op": "register-client", "client": self.id})
            reply = await asyncio.wait_for(comm.read(), self.timeout)
        except BaseException:
            comm.abort()
            raise
        if not isinstance(reply, dict) or reply.get("op") != "registered":
            comm.abort()
            raise ConnectionError(f"scheduler {self.address} refused the client: {reply!r}")
        self.scheduler_info_cache = reply.get("info", {})
        self.comm = comm
        comm.set_message_handler(self._hot.handle)
        if not self.asynchronous and hasattr(comm, "allow_write_now"):
            # result() in a caller's thread writes its own submit (ClientHotPath).
            comm.allow_write_now()
        comm.on_close = self._on_comm_closed

    def _install_dask_scheduler(self):
        """Make this client dask's default scheduler (restored on close).

        Importing dask costs ~0.5 s, so a client created before dask is
        imported installs itself when dask gets imported (one-shot import hook).
        """
        if sys.modules.get("dask") is None:      # not imported (or blocked: None)
            _DaskImportHook.install(self)
            return
        if self._dask_scheduler is not None:
            return
        import dask

        self._previous_dask_scheduler = dask.config.get("scheduler", None)
        if self.asynchronous:
            # dask.compute() blocks: an asynchronous client installs a scheduler that
            # refuses to block its own loop (and works from other threads).
            from taskcore.dask_integration import AsyncClientScheduler

            self._dask_scheduler = AsyncClientScheduler(self)
        else:
            self._dask_scheduler = self.get
        dask.config.set(scheduler=self._dask_scheduler)
        from taskcore.dask_integration import acquire_dask_defaults

        acquire_dask_defaults()       # dataframe shuffles: "tasks", not local-disk partd

    def _restore_dask_scheduler(self):
        installed, self._dask_scheduler = self._dask_scheduler, None
        dask = sys.modules.get("dask")
        if installed is None or dask is None:
            return
        from taskcore.dask_integration import release_dask_defaults

        release_dask_defaults()
        if dask.config.get("scheduler", None) == installed:
            # Skip schedulers of clients closed since: with two clients closed in
            # creation order, the second must not restore the first (closed) one.
            prev = self._previous_dask_scheduler
            for _ in range(100):
                owner = getattr(prev, "__self__", None) or getattr(prev, "client", None)
                if not isinstance(owner, Client) or owner.status != "closed":
                    break
                prev = owner._previous_dask_scheduler
            dask.config.set(scheduler=prev)

    def _on_comm_closed(self, comm):
        """The scheduler is gone (crashed, restarted, unreachable): a new one knows none of
        our keys, so every Future still waiting, and every result held by the cluster,
        fails now with this error instead of hanging; results already here stay. Then
        reconnect to the same address for up to `reconnect_timeout` seconds (a scheduler
        restarted by Kubernetes, say); Futures made after that are new work."""
        if self.status in ("closing", "closed") or comm is not self.comm:
            return
        logger.warning("lost connection to scheduler %s; reconnecting", self.address)
        self.status = "disconnected"
        why, self._dropped_because = getattr(self, "_dropped_because", None), None
        why = f" (it closed the connection: {why})" if why else ""
        exc = CommClosedError(
            f"lost connection to the scheduler at {self.address}{why}: work in flight and "
            f"results held by the cluster are gone; submit again once reconnected")
        for fut in list(self._replies.values()):
            if not fut.done():
                fut.set_exception(exc)
        self._hot.forget_all(exc)
        for c in self._worker_comms.values():
            c.abort()
        self._worker_comms.clear()
        if self.reconnect_timeout and self.loop is not None:
            self._reconnecting = self.loop.create_task(self._reconnect())

    async def _reconnect(self):
        deadline = self.loop.time() + self.reconnect_timeout
        delay = 0.1
        while self.status == "disconnected":
            try:
                await self._connect()
            except (OSError, CommClosedError, ConnectionError, asyncio.TimeoutError) as e:
                if self.loop.time() > deadline:
                    logger.error("could not reconnect to %s in %s s (%r); closing the client",
                                 self.address, self.reconnect_timeout, e)
                    await self._close()
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self.status != "disconnected":     # closed meanwhile
                self.comm.abort()
                return
            self.status = "running"
            logger.info("reconnected to %s", self.address)
            self._hot.flush_outbox()               # submitted while disconnected
            for name, level in self._forwarding.items():   # a new scheduler knows none
                self.comm.send({"op": "rpc", "reqid": next(self._reqids),
                                "method": "forward_logging",
                                "args": {"logger_name": name, "level": level}})

    def sync(self, fn, *args, timeout=None, **kwargs):
        """Run coroutine function `fn` on the client's loop; return an awaitable if asynchronous."""
        if self.asynchronous:
            return fn(*args, **kwargs)
        if self._runner is None:
            raise RuntimeError("this client is closed")
        return self._runner.run_sync(fn, *args, timeout=timeout, **kwargs)

    def close(self, timeout=None):
        if self.asynchronous:
            return self._close()
        if self._runner is None:
            return
        if self._runner.in_loop_thread():
            # On the loop's own thread (the last reference dropped by a loop callback,
            # so __del__ runs here): waiting on the loop would deadlock, so abort.
            self._abort_on_loop()
            return
        try:
            self._runner.run_sync(self._close, timeout=timeout or self.timeout)
        finally:
            self._runner.release()
            self._runner = None

    def _abort_on_loop(self):
        """Close without waiting, on the loop thread: drop the connections at once and
        let go of the loop (its thread stops by itself if no other client uses it)."""
        self.status = "closed"
        for comm in self._worker_comms.values():
            comm.abort()
        self._worker_comms.clear()
        if self.comm is not None:
            self.comm.abort()
        with _default_lock:
            if _futures._current_default() is self:
                _futures._set_default_client(None)
        self._restore_dask_scheduler()
        runner, self._runner = self._runner, None
        runner.release()

    async def _close(self, fast=False):
        if self.status == "closed":
            return
        self.status = "closing"
        task, self._reconnecting = self._reconnecting, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for comm in self._worker_comms.values():
            comm.abort()
        self._worker_comms.clear()
        if self.comm is not None and not self.comm.closed:
            try:
                if self._forwarding:
                    # Workers stop forwarding now rather than at their next batch (when
                    # the scheduler finds this client gone); the reply is not awaited.
                    self._forwarding.clear()
                    self.comm.send({"op": "rpc", "reqid": next(self._reqids),
                                    "method": "unforward_logging",
                                    "args": {"everything": True}})
                self.comm.send({"op": "close-client"})
                await asyncio.wait_for(self.comm.close(), 5)
            except Exception:
                self.comm.abort()
        self.status = "closed"
        # Requests still waiting (a Lock.acquire, an Event.wait) end now, not never.
        replies, self._replies = self._replies, {}
        for fut in replies.values():
            if not fut.done():
                fut.set_exception(CommClosedError(f"the client {self.id} was closed"))
        with _default_lock:
            if _futures._current_default() is self:
                _futures._set_default_client(None)
        self._restore_dask_scheduler()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        if self.status != "running":
            await self
        return self

    async def __aexit__(self, *exc):
        await self._close()

    def __del__(self):
        if self.status == "running" and self._runner is not None:
            try:
                self.close(timeout=2)
            except Exception:
                pass

    def _workers_summary(self):
        """(workers, threads, memory bytes): asked of the scheduler by a running sync
        client (briefly), else from what it last said."""
        if self.status == "running" and not self.asynchronous and self._runner is not None \
                and not self._runner.in_loop_thread():
            try:
                self.scheduler_info_cache = self.sync(self._rpc, "scheduler_info", timeout=2)
            except Exception:
                pass
        workers = (self.scheduler_info_cache or {}).get("workers") or {}
        return (len(workers), sum(int(w.get("nthreads") or 0) for w in workers.values()),
                sum(int(w.get("memory_limit") or 0) for w in workers.values()))

    def __repr__(self):
        from taskcore.utils import format_bytes

        if self.status not in ("running", "disconnected"):
            return f"<Client: {self.address!r} status={self.status}>"
        n, threads, memory = self._workers_summary()
        return (f"<Client: {self.address!r} processes={n} threads={threads}, "
                f"memory={format_bytes(memory)}>")

    def _repr_html_(self):
        import html

        from taskcore.utils import format_bytes

        link = self.dashboard_link
        dash = (f'<br>dashboard: <a href="{html.escape(link)}" target="_blank">'
                f'{html.escape(link)}</a>' if link else "")
        n, threads, memory = self._workers_summary()
        return (f"<div><b>taskcore Client</b> {html.escape(self.id)}<br>scheduler: "
                f"{html.escape(str(self.address))}<br>status: {self.status}{dash}"
                f"<br>workers: {n}<br>threads: {threads}<br>memory: "
                f"{html.escape(format_bytes(memory))}</div>")

    @property
    def dashboard_link(self):
        """The dashboard's status page as this process reaches it, or None when the
        scheduler serves none. A client made from a cluster asks the cluster, which knows
        the tunnel or port-forward in between; otherwise the link is made from what the
        scheduler reported at registration, with the host this client connected to
        (the template: `taskcore/dashboard/link.py`, `TASKCORE_DASHBOARD_LINK`)."""
        if self.cluster is not None:
            return self.cluster.dashboard_link
        from taskcore.dashboard.link import link_from_info
        from taskcore.transports.addressing import get_address_host, parse_address

        info = getattr(self, "scheduler_info_cache", None) or {}
        reach = None
        if self.address and parse_address(self.address)[0] != "inproc":
            reach = get_address_host(self.address)
        return link_from_info(info, reach_host=reach)

    # -- sending from any thread -----------------------------------------------------
    def _send_threadsafe(self, msg):
        self._hot.enqueue(msg)

    def _in_loop(self):
        # The non-raising variant: outside the loop thread (every sync submit)
        # get_running_loop() would build and raise a RuntimeError each time.
        return asyncio._get_running_loop() is self.loop

    # The compiled half keeps these; Future and the hot path read them there.
    @property
    def status(self):
        return self._hot.status

    @status.setter
    def status(self, value):
        self._hot.status = value

    @property
    def loop(self):
        return self._hot.loop

    @loop.setter
    def loop(self, value):
        self._hot.loop = value

    @property
    def comm(self):
        return self._hot.comm

    @comm.setter
    def comm(self, value):
        self._hot.comm = value

    RELEASE_DELAY = 0.02      # seconds releases are collected before they go out
    reconnect_timeout = 60.0  # seconds to keep trying after losing the scheduler (0: never)

    # -- incoming messages (on the loop) -------------------------------------------
    def _handle_other(self, msg):
        """Every message but the positional keys-in-memory (ClientHotPath.handle)."""
        report = decode_key_report(msg)                 # core/messages.pyx
        if report is not None:
            self._key_report(*report)
            return
        op = msg.get("op")
        if op == "reply":
            fut = self._replies.pop(msg["reqid"], None)
            if fut is not None and not fut.done():
                if "error" in msg:
                    fut.set_exception(self._as_exception(msg["error"]))
                else:
                    fut.set_result(msg.get("result"))
        elif op == "scheduler-closing":
            logger.info("scheduler %s is closing", self.address)
        elif op == PROTOCOL_ERROR:
            # The scheduler is about to drop us: something we sent broke a wire limit.
            self._dropped_because = str(msg.get("reason"))
            logger.error("scheduler %s closes the connection: %s", self.address,
                         self._dropped_because)
        elif op == "forwarded-logs":
            from taskcore.forward_logging import reemit

            reemit(msg.get("worker"), msg.get("records") or [])
        elif op == "pubsub-msg":
            from taskcore.coordination.pubsub import deliver

            deliver(self, msg)
        elif op == "event":
            handler = self.__dict__.get("_topic_handlers", {}).get(msg.get("topic"))
            if handler is not None:
                try:
                    r = handler(tuple(msg["event"]))
                    if asyncio.iscoroutine(r):
                        self.loop.create_task(r)
                except Exception:
                    logger.exception("event handler for topic %r failed", msg.get("topic"))
        else:
            logger.warning("client received unknown message op %r", op)

    def _key_report(self, op, keys, exception, traceback, reason):
        """What the scheduler tells about keys: erred, cancelled or lost."""
        for k in keys:
            st = self._states.get(k)
            if st is None:
                continue
            if op == "task-erred":
                st.set_error(exception, traceback)
            elif op == "key-cancelled":
                if st.status == ERROR and (k in self.__dict__.get("_lost_actors", ()) or
                                           k in self.__dict__.get("_actor_keys", ())):
                    continue            # it erred already: its worker died (actors.py)
                st.cancel(reason)
            elif st.status == FINISHED:          # key-lost: recomputed, wait again
                if self.__dict__.get("_actor_keys"):
                    from taskcore.actors import actor_lost

                    if actor_lost(self, k):     # an actor is never rebuilt empty
                        continue
                st.reset()

    @staticmethod
    def _as_exception(err):
        if isinstance(err, Serialized):
            err = err.deserialize()
        if isinstance(err, BaseException):
            return err
        return RuntimeError(str(err))

    def _materialize_exception(self, st):
        exc = st.exception
        if isinstance(exc, Serialized):
            try:
                exc = exc.deserialize()
            except Exception as e:
                exc = RuntimeError(f"task {st.key!r} failed, and its exception could not be "
                                   f"deserialized here: {e!r}")
            st.exception = exc
        if not isinstance(exc, BaseException):
            exc = RuntimeError(str(exc))
            st.exception = exc
        tb = getattr(exc, "__taskcore_traceback__", None) or st.traceback
        if isinstance(tb, str) and exc.__cause__ is None:
            exc.__cause__ = RemoteTraceback(tb)
            exc.__taskcore_traceback__ = tb
        return exc

    async def _rpc(self, method, **args):
        if self.comm is None or self.comm.closed:
            raise CommClosedError(f"not connected to the scheduler at {self.address}")
        reqid = next(self._reqids)
        fut = self.loop.create_future()
        self._replies[reqid] = fut
        self.comm.send({"op": "rpc", "reqid": reqid, "method": method, "args": args})
        return await fut

    # -- building tasks --------------------------------------------------------------
    def _make_task(self, func, args, kwargs, key, pure, fser=None, ftok=None):
        """One task record's parts: (key, run spec, dependency keys)."""
        return self._hot.make_task(func, tuple(args), kwargs, key, pure, fser, ftok)

    @staticmethod
    def _task_options(workers, resources, retries, priority, allow_other_workers, annotations=None):
        opts = {}
        if workers is not None:
            opts["workers"] = [workers] if isinstance(workers, str) else list(workers)
            opts["allow_other_workers"] = bool(allow_other_workers)
        if resources:
            opts["resources"] = dict(resources)
        if retries:
            opts["retries"] = int(retries)
        if priority:
            opts["priority"] = priority
        if annotations:
            opts["annotations"] = annotations
        return opts or None

    # -- public API: submitting --------------------------------------------------------
    def submit(self, func, *args, key=None, workers=None, resources=None, retries=None,
               priority=0, fifo_timeout="100 ms", allow_other_workers=False, actor=False,
               actors=False, pure=True, **kwargs):
        """Run func(*args, **kwargs) on the cluster; returns a Future."""
        if not callable(func):
            raise TypeError(f"First argument to submit must be callable, got {func!r}")
        if workers is None and not resources and not retries and not priority:
            opts = None
        else:
            opts = self._task_options(workers, resources, retries, priority, allow_other_workers)
        if actor or actors:
            from taskcore.actors import submit_actor        # taskcore/actors.py

            return submit_actor(self, func, args, kwargs, key, opts)
        return self._hot.submit_call(func, args, kwargs, key, pure, opts)

    def map(self, func, *iterables, key=None, workers=None, retries=None, resources=None,
            priority=0, allow_other_workers=False, fifo_timeout="100 ms", actor=False,
            actors=False, pure=True, batch_size=None, **kwargs):
        """Map func over iterables; returns a list of Futures."""
        if not callable(func):
            raise TypeError(f"First argument to map must be callable, got {func!r}")
        if not iterables:
            raise TypeError("map needs at least one iterable")
        if actor or actors:
            if key is not None and not isinstance(key, (list, tuple)):
                raise ValueError("map(..., actors=True) takes a list of keys or none")
            keys = list(key) if key is not None else [None] * len(list(zip(*iterables)))
            return [self.submit(func, *args, key=k, workers=workers, resources=resources,
                                retries=retries, priority=priority,
                                allow_other_workers=allow_other_workers, actor=True, **kwargs)
                    for args, k in zip(zip(*iterables), keys)]
        arglists = list(zip(*iterables))
        if isinstance(key, (list, tuple)):
            keys = list(key)
            if len(keys) != len(arglists):
                raise ValueError("map: key list must match the number of inputs")
        else:
            keys = [None] * len(arglists)
        prefix = key if isinstance(key, str) else _funcname(func)
        make_task = self._hot.make_task
        fser = self._hot.wire_function(func)
        if type(fser) is bytes and len(arglists) > 1:
            # One object for all the tasks: the message writes it once, and the scheduler
            # keeps one copy instead of a bytes object per task.
            fser = Serialized(1, [fser])               # kind 1: a pickle
        ftok = _func_token(func)
        opts = self._task_options(workers, resources, retries, priority, allow_other_workers)
        records = []
        out_keys = []
        seen = set()
        # Building many records allocates many small containers, which would
        # trigger several cyclic-GC passes for nothing (none are cycles).
        with gc_paused():
            for args, k in zip(arglists, keys):
                if k is None:
                    tok = _tokenize(ftok, args, kwargs) if pure else self._hot.unique()
                    k = f"{prefix}-{tok}"
                k, spec, deps = make_task(func, args, kwargs, k, pure, fser, ftok)
                out_keys.append(k)
                if k not in seen:
                    seen.add(k)
                    records.append([k, spec, deps, opts])
            return self._hot.submit(records, out_keys)

    # -- public API: collecting --------------------------------------------------------
    def gather(self, futures, errors="raise", direct=None, asynchronous=None):
        """Results of futures, in the same nested structure (lists, tuples, dicts)."""
        if errors not in ("raise", "skip"):
            raise ValueError("errors must be 'raise' or 'skip'")
        if self.asynchronous or asynchronous:
            return self._gather_struct(futures, errors)
        return self.sync(self._gather_struct, futures, errors)

    async def _gather_struct(self, obj, errors="raise"):
        fs = list(dict.fromkeys(_futures_in(obj)))
        values = await self._gather(fs, errors)
        table = {f.key: v for f, v in zip(fs, values)}
        if isinstance(obj, Future):
            v = table.get(obj.key, _SKIPPED)
            if v is _SKIPPED:
                raise KeyError(obj.key)
            return v
        return _rebuild(obj, table)

    async def _gather(self, futures, errors="raise"):
        """Values for a flat list of futures (skipped ones are left out when errors='skip')."""
        for f in futures:
            if f._state.status == PENDING:
                await f._state.wait()
        out = {}
        need = []
        for f in futures:
            st = f._state
            if st.status == ERROR or st.exception is not None and st.status != FINISHED:
                if errors == "raise":
                    if st.status == ERROR:
                        raise self._materialize_exception(st)
                    raise st.exception
                continue
            if st.has_data:
                d = st.data
                if isinstance(d, Serialized):
                    d = d.deserialize()
                    st.data = d
                out[f.key] = d
            else:
                need.append(f)
        if need:
            fetched, failed = await self._fetch([f.key for f in need])
            for f in need:
                if f.key in fetched:
                    out[f.key] = fetched[f.key]
                elif errors == "raise":
                    if f.key in failed:      # e.g. a result that cannot be serialized
                        raise TypeError(failed[f.key])
                    raise KeyError(f"could not gather {f.key!r}")
        return [out[f.key] for f in futures if f.key in out]

    async def _fetch(self, keys, attempts=5):
        """Get values for keys straight from the workers holding them: ({key:
        value}, {key: why a worker could not send it})."""
        result = {}
        failed = {}
        missing = list(keys)
        for attempt in range(attempts):
            who_has = await self._rpc("who_has", keys=missing)
            by_worker = {}
            lost = []
            for k in missing:
                holders = who_has.get(k) or []
                if not holders:
                    lost.append(k)
                else:
                    by_worker.setdefault(holders[attempt % len(holders)], []).append(k)
            await asyncio.gather(*[self._get_from_worker(w, ks, result, failed)
                                   for w, ks in by_worker.items()])
            missing = [k for k in missing if k not in result and k not in failed]
            if not missing:
                return result, failed
            # Data lost with a worker is recomputed by the scheduler; wait for it.
            for k in missing:
                st = self._states.get(k)
                if st is not None and st.status == PENDING:
                    await st.wait()
            await asyncio.sleep(0.05 * (attempt + 1))
        return result, failed

    async def _worker_comm(self, address):
        comm = self._worker_comms.get(address)
        if comm is None or comm.closed:
            opts = {"security": self.security} if self.security is not None else {}
            comm = await connect(address, timeout=self.timeout, role="client", token=self.token,
                                 retry_refused=False, **opts)
            self._worker_comms[address] = comm
        return comm

    async def _get_from_worker(self, address, keys, result, failed):
        lock = self._worker_locks.setdefault(address, asyncio.Lock())
        async with lock:
            try:
                comm = await self._worker_comm(address)
                await comm.write({"op": "get-data", "keys": keys, "who": self.id})
                reply = await comm.read()
            except (OSError, CommClosedError) as e:
                logger.info("gather from %s failed: %s", address, e)
                c = self._worker_comms.pop(address, None)
                if c is not None:
                    c.abort()
                return
        data = reply.get("data", {})
        for k, v in data.items():
            if isinstance(v, Serialized):
                v = v.deserialize()
            result[k] = v
        failed.update(reply.get("errors") or {})

    # -- public API: data ----------------------------------------------------------------
    def scatter(self, data, workers=None, broadcast=False, direct=None, hash=True, timeout=None):
        """Move local data into the cluster; returns futures of the same shape."""
        return self.sync(self._scatter, data, workers, broadcast, hash)

    async def _scatter(self, data, workers=None, broadcast=False, hash=True):
        if isinstance(data, dict):
            items = list(data.items())
            keyed = True
        elif isinstance(data, (list, tuple, set, frozenset)):
            items = [(None, v) for v in data]
            keyed = False
        else:
            items = [(None, data)]
            keyed = None
        payload = {}
        keys = []
        for k, v in items:
            s = serialize_obj(v)
            if k is None:
                if hash:
                    h = hashlib.md5()
                    for frame in s.frames:
                        h.update(frame)
                    k = f"{type(v).__name__}-{h.hexdigest()}"
                else:
                    k = f"{type(v).__name__}-{uuid.uuid4().hex}"
            payload[k] = s
            keys.append(k)
        if isinstance(workers, str):
            workers = [workers]
        # Referenced before the request goes out: a release of the same key still
        # waiting in the outbox (scattered, dropped, scattered again) is then held back
        # rather than sent after the scheduler registered the new copy.
        futures = [Future(k, self) for k in keys]
        await self._rpc("scatter", data=payload, client=self.id,
                                 workers=list(workers) if workers else None,
                                 broadcast=bool(broadcast))
        for f in futures:
            if f._state.status == PENDING:
                f._state.finish(None, False, None)
        if keyed:
            return dict(zip([k for k, _ in items], futures))
        if keyed is None:
            return futures[0]
        return type(data)(futures) if not isinstance(data, (set, frozenset)) else futures

    def cancel(self, futures, asynchronous=None, force=False):
        """Stop computing these futures and release them (on every client with force=True)."""
        return self.sync(self._cancel, futures, force)

    async def _cancel(self, futures, force=False):
        fs = _futures_in(futures)
        keys = [f.key for f in fs]
        await self._rpc("cancel", keys=keys, client=self.id, force=bool(force))
        for f in fs:
            if not f.done() or f.status == FINISHED:
                f._state.cancel()

    def retry(self, futures, asynchronous=None):
        """Rerun erred futures."""
        return self.sync(self._retry, futures)

    async def _retry(self, futures):
        fs = _futures_in(futures)
        for f in fs:
            if f._state.status == ERROR:
                f._state.reset()
        await self._rpc("retry", keys=[f.key for f in fs], client=self.id)

    # -- public API: cluster ---------------------------------------------------------------
    def who_has(self, futures=None):
        # futures_of: persisted collections too, as dask takes them
        keys = None if futures is None else [f.key for f in _futures.futures_of(futures)]
        return self.sync(self._rpc, "who_has", keys=keys)

    def has_what(self, workers=None):
        return self.sync(self._rpc, "has_what", workers=workers)

    def nthreads(self, workers=None):
        return self.sync(self._rpc, "nthreads", workers=workers)

    ncores = nthreads

    def scheduler_info(self):
        return self.sync(self._rpc, "scheduler_info")

    def wait_for_workers(self, n_workers=1, timeout=None):
        return self.sync(self._rpc, "wait_for_workers", n=n_workers, timeout=timeout)

    def run(self, function, *args, workers=None, wait=True, nanny=False, on_error="raise",
            **kwargs):
        """Run function(*args, **kwargs) on every worker (or `workers`); {address: result}.
        `wait=False` returns None (the call is still made and its outcome dropped)."""
        if nanny:
            raise NotImplementedError("run(..., nanny=True) is not supported: nannies run no "
                                      "user functions here (use a NannyPlugin)")
        if on_error not in ("raise", "return", "ignore"):
            raise ValueError(f"on_error must be 'raise', 'return' or 'ignore', got {on_error!r}")
        out = self.sync(self._run, function, args, kwargs, workers, on_error)
        return out if wait else None

    async def _run(self, function, args, kwargs, workers, on_error):
        if isinstance(workers, str):
            workers = [workers]
        results = await self._rpc("run", func=serialize_obj((function, args, kwargs)),
                                  workers=workers)
        out = {}
        for addr, (status, value) in results.items():
            if isinstance(value, Serialized):
                value = value.deserialize()
            if status == "error":
                if on_error == "raise":
                    raise value
                if on_error == "ignore":
                    continue
            out[addr] = value
        return out

    def run_on_scheduler(self, function, *args, **kwargs):
        """Run function on the scheduler process; `scheduler=` is passed if it accepts one."""
        return self.sync(self._run_on_scheduler, function, args, kwargs)

    async def _run_on_scheduler(self, function, args, kwargs):
        res = await self._rpc("run_on_scheduler", func=serialize_obj((function, args, kwargs)))
        status, value = res
        if isinstance(value, Serialized):
            value = value.deserialize()
        if status == "error":
            raise value
        return value

    def restart(self, timeout=60, wait_for_workers=True):
        """Restart every worker (through its nanny); all futures are cancelled."""
        return self.sync(self._restart, timeout, wait_for_workers)

    async def _restart(self, timeout=60, wait_for_workers=True):
        n = await self._rpc("restart", timeout=timeout)
        for st in list(self._states.values()):
            if st.status in (PENDING, FINISHED):
                st.cancel("the cluster was restarted")
        if wait_for_workers and n:
            await self._rpc("wait_for_workers", n=n, timeout=timeout)
        return self

    def shutdown(self):
        """Shut down the scheduler and its workers, then close this client."""
        return self.sync(self._shutdown) if self.asynchronous else self._shutdown_sync()

    def _shutdown_sync(self):
        try:
            self.sync(self._shutdown)
        finally:
            self.close()

    async def _shutdown(self):
        try:
            await self._rpc("shutdown")
        except CommClosedError:
            pass
        if self.asynchronous:
            await self._close()

    # -- diagnostics (docs/diagnostics.md) -----------------------------------------------
    def get_task_stream(self, start=None, stop=None, count=None, plot=False,
                        filename="task-stream.html", bokeh_resources=None):
        """Recorded tasks as dask's dicts: key, worker, status, startstops, prefix.

        `start`/`stop`: wall-clock times, or durations ago like "60s"; `count`: how
        many (the latest, or from `start`). `plot=True` returns (data, Figure) (an
        inline SVG); `plot="save"` also writes it to `filename`. For the tasks of one
        block, use the `taskcore.get_task_stream()` context manager."""
        return self.sync(self._get_task_stream, start, stop, count, plot, filename)

    async def _get_task_stream(self, start=None, stop=None, count=None, plot=False,
                               filename="task-stream.html"):
        from taskcore.task_stream import plot_result, rows_to_dicts

        reply = await self._rpc("task_stream", start=start, stop=stop, count=count)
        return plot_result(rows_to_dicts(reply["rows"]), plot, filename)

    def profile(self, key=None, start=None, stop=None, workers=None, merge_workers=True,
                plot=False, filename=None, server=False, scheduler=False):
        """The workers' sampled call tree (dask's dict shape) for [start, stop].

        `key`: only tasks of this key prefix ("inc", or a key); `server=True`: the
        workers' event-loop threads (where tiny tasks run inline) instead of their
        task threads; `merge_workers=False`: {worker: tree}. `plot=True` returns
        (tree, Figure) (a flame graph as inline SVG); `filename` also writes it."""
        if scheduler:
            raise NotImplementedError("profiling the scheduler is not supported: its "
                                      "event loop is not sampled (profile its process with "
                                      "py-spy or `run_on_scheduler(cProfile...)`)")
        return self.sync(self._profile, key, start, stop, workers, merge_workers, plot,
                         filename, server)

    async def _profile(self, key=None, start=None, stop=None, workers=None,
                       merge_workers=True, plot=False, filename=None, server=False):
        from taskcore import profile

        if isinstance(workers, str):
            workers = [workers]
        rows = await self._rpc("profile", key=key, start=start, stop=stop,
                               workers=list(workers) if workers is not None else None,
                               merge_workers=bool(merge_workers), server=bool(server))
        if merge_workers:
            state = profile.unflatten(rows)
        else:
            state = {w: profile.unflatten(r) for w, r in rows.items()}
        if filename:
            plot = True
        if not plot:
            return state
        from taskcore.plots import Figure, flame_graph_svg

        tree = state if merge_workers else profile.merge(*state.values())
        fig = Figure(flame_graph_svg(tree, profile.DEFAULT_INTERVAL), "taskcore profile")
        if filename:
            fig.save(filename)
        return state, fig

    def get_versions(self, check=False, packages=None):
        """{"scheduler", "workers": {address: ...}, "client"}, each {"host", "packages"}.

        `check=True` raises ValueError, with a table, when taskcore, python, cloudpickle,
        msgpack or one of `packages` differ between the client, the scheduler and any
        worker."""
        return self.sync(self._get_versions, check, packages)

    async def _get_versions(self, check=False, packages=None):
        from taskcore import versions

        packages = versions._package_list(packages)
        client = versions.get_versions(packages)
        remote = await self._rpc("versions", packages=packages)
        result = {"scheduler": remote["scheduler"], "workers": remote["workers"],
                  "client": client}
        if check:
            rows = versions.mismatches(client, remote["scheduler"], remote["workers"],
                                       packages)
            if rows:
                raise ValueError(versions.error_message(rows))
        return result

    def get_worker_logs(self, n=None, workers=None, nanny=False):
        """{worker address: [(level, message), ...]}, newest last (the last `n`)."""
        if isinstance(workers, str):
            workers = [workers]
        return self.sync(self._rpc, "worker_logs", n=n,
                         workers=list(workers) if workers is not None else None,
                         nanny=bool(nanny))

    def get_scheduler_logs(self, n=None):
        """[(level, message), ...] of the scheduler, newest last (the last `n`)."""
        return self.sync(self._rpc, "scheduler_logs", n=n)

    def forward_logging(self, logger_name=None, level=logging.NOTSET):
        """Re-emit here the log records that task code emits on any worker (now or later)
        for logger `logger_name` (None: the root, so all) at `level` or above: each is
        handled by this process's logger of the same name, with `record.worker` set.
        Records arrive in batches (every 0.1 s). Stops with `unforward_logging` or
        when this client closes."""
        from taskcore.forward_logging import logger_key, parse_level

        name, level = logger_key(logger_name), parse_level(level)
        self._forwarding[name] = level
        return self.sync(self._rpc, "forward_logging", logger_name=name, level=level)

    def unforward_logging(self, logger_name=None):
        """Stop forwarding `logger_name` (None: the root)."""
        from taskcore.forward_logging import logger_key

        name = logger_key(logger_name)
        self._forwarding.pop(name, None)
        return self.sync(self._rpc, "unforward_logging", logger_name=name)

    # -- plugins and code shipping (taskcore/plugins.py) -------------------------------
    def register_plugin(self, plugin, name=None, idempotent=None):
        """Register a SchedulerPlugin, WorkerPlugin or NannyPlugin (by its type) on the
        cluster's current and future members. A plugin of the same name is replaced
        (torn down first) unless `idempotent` (or the plugin's `idempotent` attribute),
        which keeps the one registered. Returns {address: {"status": "OK"}} for worker
        and nanny plugins; the first member's error is raised."""
        from taskcore.plugins import plugin_kind, plugin_name

        kind = plugin_kind(plugin)
        name = plugin_name(plugin, name)
        if idempotent is None:
            idempotent = bool(getattr(plugin, "idempotent", False))
        return self.sync(self._register_plugin, kind, plugin, name, bool(idempotent))

    async def _register_plugin(self, kind, plugin, name, idempotent):
        ser = serialize_obj(plugin)
        replies = await self._rpc(f"register_{kind}_plugin", plugin=ser, name=name,
                                  idempotent=idempotent)
        if kind != "scheduler":
            self._raise_member_errors(replies, f"plugin {name!r}")
        return replies

    @staticmethod
    def _raise_member_errors(replies, what):
        for addr, r in (replies or {}).items():
            if isinstance(r, dict) and r.get("status") == "error":
                exc = r.get("exception")
                try:
                    exc = exc.deserialize() if isinstance(exc, Serialized) else exc
                except Exception:
                    exc = None
                if not isinstance(exc, BaseException):
                    exc = RuntimeError(r.get("text") or "unknown error")
                try:
                    exc.add_note(f"(raised by {what} on {addr})")
                except AttributeError:
                    pass
                raise exc

    def register_worker_plugin(self, plugin=None, name=None, nanny=None, **kwargs):
        """The older form of `register_plugin` (deprecated in dask, working here): any
        object with `setup(worker)` is a worker plugin; `nanny=True` or a NannyPlugin: a
        nanny plugin."""
        import warnings

        from taskcore.plugins import NannyPlugin, SchedulerPlugin, plugin_name

        if kwargs:
            raise TypeError(f"register_worker_plugin got unknown options: {sorted(kwargs)}")
        if plugin is None:
            raise TypeError("register_worker_plugin needs a plugin")
        warnings.warn("register_worker_plugin is deprecated: use register_plugin",
                      DeprecationWarning, stacklevel=2)
        if isinstance(plugin, SchedulerPlugin):
            raise TypeError("a SchedulerPlugin goes to register_plugin")
        kind = "nanny" if nanny or isinstance(plugin, NannyPlugin) else "worker"
        name = plugin_name(plugin, name)
        return self.sync(self._register_plugin, kind, plugin, name,
                         bool(getattr(plugin, "idempotent", False)))

    def unregister_worker_plugin(self, name, nanny=None):
        """Tear down and forget the worker (nanny=True: nanny) plugin `name`; ValueError
        if there is none."""
        kind = "nanny" if nanny else "worker"
        return self.sync(self._rpc, f"unregister_{kind}_plugin", name=name)

    def register_scheduler_plugin(self, plugin, name=None, idempotent=None):
        """A SchedulerPlugin (dask's older form): as `register_plugin`."""
        from taskcore.plugins import SchedulerPlugin

        if not isinstance(plugin, SchedulerPlugin):
            raise TypeError(f"expected a SchedulerPlugin, got {type(plugin).__name__}")
        return self.register_plugin(plugin, name=name, idempotent=idempotent)

    def unregister_scheduler_plugin(self, name):
        """Close and forget the scheduler plugin `name`; ValueError if there is none."""
        return self.sync(self._rpc, "unregister_scheduler_plugin", name=name)

    def upload_file(self, filename, load=True):
        """Send a .py, .egg, .zip or .whl file to every worker, now and joining later
        (and restarted ones), into its directory and onto its sys.path; `load` imports
        it there (or reloads it). An error on a worker (an import failing) is raised
        with the worker's address."""
        import os

        if not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"upload_file takes a file path, got {type(filename).__name__}")
        filename = os.fspath(filename)
        if not filename.endswith((".py", ".egg", ".zip", ".whl")):
            raise ValueError(f"upload_file sends .py, .egg, .zip or .whl files, not {filename!r}")
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"upload_file: no file {filename!r}")
        from taskcore.plugins import UploadFile

        plugin = UploadFile(filename, load=load)
        return self.sync(self._register_plugin, "worker", plugin, plugin.name, False)

    # -- executor, metadata, moving data -----------------------------------------------
    def get_executor(self, **kwargs):
        """A concurrent.futures.Executor whose tasks run on this cluster; `kwargs`
        (workers, resources, retries, pure, ...) go to each submit."""
        from taskcore.executor import ClientExecutor

        return ClientExecutor(self, **kwargs)

    def futures_of(self, futures):
        """The Futures inside `futures` (collections, containers)."""
        return _futures.futures_of(futures)

    def set_metadata(self, key, value):
        """Store `value` in the scheduler's metadata at `key` (a list: a path into
        nested dicts)."""
        keys = list(key) if isinstance(key, (list, tuple)) else [key]
        if not keys:
            raise ValueError("set_metadata needs a key")
        return self.sync(self._rpc, "set_metadata", keys=keys, value=_to_wire(value))

    def get_metadata(self, key, default=_NO_DEFAULT):
        """The metadata at `key` (a path); KeyError if absent and no `default`."""
        keys = list(key) if isinstance(key, (list, tuple)) else [key]
        return self.sync(self._get_metadata, keys, default)

    async def _get_metadata(self, keys, default):
        r = await self._rpc("get_metadata", keys=keys)
        if not r.get("found"):
            if default is _NO_DEFAULT:
                raise KeyError(keys[-1] if keys else keys)
            return default
        return _from_wire(r.get("value"))

    def replicate(self, futures, n=None, workers=None, branching_factor=2):
        """Copy the futures' data to `n` workers (all of `workers` by default); the
        copies are real replicas: who_has shows them and they keep the data when
        another holder leaves."""
        return self.sync(self._replicate, futures, n, workers)

    async def _replicate(self, futures, n=None, workers=None):
        fs = _futures.futures_of(futures)
        await _futures._wait(fs)
        if isinstance(workers, str):
            workers = [workers]
        return await self._rpc("replicate", keys=[f.key for f in fs], n=n,
                               workers=list(workers) if workers is not None else None)

    def rebalance(self, futures=None, workers=None):
        """Move data between workers (all, or `workers`) so each holds about the same
        bytes: only `futures`' data when given. Every copy is made before the old holder
        drops its own. {"moved": n, "failed": m}."""
        return self.sync(self._rebalance, futures, workers)

    async def _rebalance(self, futures=None, workers=None):
        keys = None
        if futures is not None:
            fs = _futures.futures_of(futures)
            await _futures._wait(fs)
            keys = [f.key for f in fs]
        if isinstance(workers, str):
            workers = [workers]
        return await self._rpc("rebalance", keys=keys,
                               workers=list(workers) if workers is not None else None)

    # -- structured events ----------------------------------------------------------------
    def log_event(self, topic, msg):
        """Record an event (msgpack-able `msg`) under `topic` (or a list of topics) on the
        scheduler; subscribers get it as it arrives."""
        return self.sync(self._rpc, "log_event", topic=topic, msg=msg)

    def get_events(self, topic=None):
        """[(time, msg)] of `topic`, or {topic: [...]} of every topic."""
        out = self.sync(self._rpc, "get_events", topic=topic)
        if topic is not None:
            return tuple(tuple(e) for e in out)
        return {t: tuple(tuple(e) for e in v) for t, v in out.items()}

    def subscribe_topic(self, topic, handler):
        """Call `handler((time, msg))` (on the client's loop; a coroutine function is
        run as a task) for each event logged under `topic` from now on."""
        if not callable(handler):
            raise TypeError(f"subscribe_topic needs a callable handler, got {handler!r}")
        self.__dict__.setdefault("_topic_handlers", {})[topic] = handler
        return self.sync(self._rpc, "subscribe_topic", topic=topic, client=self.id)

    def unsubscribe_topic(self, topic):
        self.__dict__.setdefault("_topic_handlers", {}).pop(topic, None)
        return self.sync(self._rpc, "unsubscribe_topic", topic=topic, client=self.id)

    # -- more of the cluster ------------------------------------------------------------
    def processing(self, workers=None):
        """{worker: [keys it is running or has queued]}."""
        if isinstance(workers, str):
            workers = [workers]
        return self.sync(self._rpc, "processing", workers=workers)

    def nbytes(self, keys=None, summary=True):
        """Bytes of the results in memory: {key prefix: bytes} (`summary`), else {key:
        bytes}; all keys, or `keys` (keys or Futures)."""
        if keys is not None:
            keys = [k.key if isinstance(k, Future) else k for k in keys]
        return self.sync(self._rpc, "nbytes", keys=keys, summary=bool(summary))

    def story(self, *keys_or_stimuli, on_error="raise"):
        """The scheduler's recent transitions of these keys (or caused by these stimulus
        ids): [(key, start, finish, stimulus_id, worker)]."""
        keys = [k.key if isinstance(k, Future) else k for k in keys_or_stimuli]
        return [tuple(r) for r in self.sync(self._rpc, "story", keys=keys)]

    def retire_workers(self, workers=None, close_workers=True, **kwargs):
        """Retire workers gracefully (their unique data moves to the others first);
        {address: worker info} of those retired."""
        if isinstance(workers, str):
            workers = [workers]
        return self.sync(self._retire_workers, workers, kwargs.get("n", 0))

    async def _retire_workers(self, workers, n):
        info = (await self._rpc("scheduler_info")).get("workers") or {}
        retired = await self._rpc("retire_workers", workers=workers, n=n)
        return {w: info.get(w, {}) for w in retired}

    def restart_workers(self, workers, timeout=60, raise_for_error=True):
        """Restart these workers through their nannies; {address: "OK" or the reason}.
        `raise_for_error`: a worker that could not be restarted is an error."""
        if isinstance(workers, str):
            workers = [workers]
        out = self.sync(self._rpc, "restart_workers", workers=list(workers), timeout=timeout)
        bad = {w: r for w, r in out.items() if r != "OK"}
        if bad and raise_for_error:
            raise RuntimeError(f"could not restart workers: {bad}")
        return out

    def write_scheduler_file(self, scheduler_file):
        """Write the scheduler's address as a scheduler file (`Client(scheduler_file=)`)."""
        from taskcore.scheduler import write_scheduler_file

        write_scheduler_file(scheduler_file, self.address)

    def register_worker_callbacks(self, setup=None):
        """Run `setup(dask_worker=...)` on every worker, now and on those that join
        later (dask's older form of a worker plugin)."""
        from taskcore.plugins import WorkerSetup

        if not callable(setup):
            raise TypeError(f"register_worker_callbacks needs a callable, got {setup!r}")
        plugin = WorkerSetup(setup)
        return self.sync(self._register_plugin, "worker", plugin, plugin.name, False)

    @staticmethod
    def collections_to_dsk(collections, *args, **kwargs):
        """dask's graph of the collections (as dask.base.collections_to_dsk, which dask
        2025.1 replaced by expressions: then the optimized expression's graph)."""
        try:
            from dask.base import collections_to_dsk
        except ImportError:
            from dask.base import collections_to_expr

            optimize_graph = args[0] if args else kwargs.get("optimize_graph", True)
            expr = collections_to_expr(collections, optimize_graph)
            return dict((expr.optimize() if optimize_graph else expr).__dask_graph__())
        return collections_to_dsk(collections, *args, **kwargs)

    def as_current(self):
        """`with client.as_current():` this client is the default meanwhile."""
        import contextlib

        @contextlib.contextmanager
        def current():
            with _default_lock:
                previous = _futures._current_default()
                _futures._set_default_client(self)
            try:
                yield self
            finally:
                with _default_lock:
                    _futures._set_default_client(previous)

        return current()

    @classmethod
    def current(cls, allow_global=True):
        """The current client: in a task, the worker's; else the default one."""
        from taskcore.task_context import get_client

        if not allow_global:
            raise ValueError("taskcore keeps one default client: use allow_global=True")
        return get_client()

    # -- published datasets (taskcore/coordination/datasets.py) ------------------------
    def publish_dataset(self, *args, name=None, override=False, **kwargs):
        """Publish named values for every client of the cluster: `publish_dataset(x,
        name="x")` or `publish_dataset(x=x, y=y)`. Futures inside are kept alive until
        unpublished; an existing name is a KeyError unless `override=True`."""
        datasets = dict(kwargs)
        if args:
            if name is None:
                raise ValueError("publish_dataset with positional values needs name=")
            if len(args) != 1:
                raise ValueError("publish_dataset takes one positional value with name=")
            datasets[name] = args[0]
        elif name is not None:
            raise ValueError("publish_dataset(name=...) needs the value as its argument")
        if not datasets:
            raise ValueError("publish_dataset needs something to publish")
        from taskcore.coordination import datasets as _datasets

        return self.sync(_datasets.publish, self, datasets, override)

    def get_dataset(self, name, default=_NO_DEFAULT, **kwargs):
        """The dataset published as `name`, its Futures bound to this client; KeyError
        when there is none, unless `default` is given."""
        from taskcore.coordination import datasets as _datasets

        if default is _NO_DEFAULT:
            return self.sync(_datasets.get, self, name)
        return self.sync(_datasets.get, self, name, default)

    def list_datasets(self, **kwargs):
        """The names of the published datasets."""
        from taskcore.coordination import datasets as _datasets

        return self.sync(_datasets.list_names, self)

    def unpublish_dataset(self, name, **kwargs):
        """Remove a dataset (its Futures are released); KeyError when there is none."""
        from taskcore.coordination import datasets as _datasets

        return self.sync(_datasets.unpublish, self, name)

    @property
    def datasets(self):
        """The published datasets as a mapping: `client.datasets["x"]`, `del ...`."""
        from taskcore.coordination.datasets import Datasets

        return Datasets(self)

    # -- dask integration (the dask scheduler protocol) -------------------------------
    def get(self, dsk, keys, **kwargs):
        from taskcore.dask_integration import client_get

        return client_get(self, dsk, keys, **kwargs)

    def compute(self, collections, sync=False, optimize_graph=True, progress=False, **kwargs):
        from taskcore.dask_integration import client_compute

        return client_compute(self, collections, sync=sync, optimize_graph=optimize_graph,
                              progress=progress, **kwargs)

    def persist(self, collections, optimize_graph=True, progress=False, **kwargs):
        from taskcore.dask_integration import client_persist

        return client_persist(self, collections, optimize_graph=optimize_graph,
                              progress=progress, **kwargs)

