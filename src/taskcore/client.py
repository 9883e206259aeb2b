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
    forwarded-logs {worker, records} (forward_logging.py)

Diagnostics (docs/diagnostics.md): get_task_stream, profile, get_versions,
get_worker_logs, get_scheduler_logs, forward_logging; rpcs answered by the
scheduler's SchedulerDiagnostics (scheduler_diagnostics.py).
"""
from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import logging
import sys
import threading
import uuid
from collections.abc import Iterator

from taskcore import futures as _futures
from taskcore.core.messages import decode_key_report
from taskcore.core.client_dispatch import (ClientHotPath, func_token as _func_token,
                                           funcname as _funcname, tokenize as _tokenize)
from taskcore.core.serialize import Serialized, serialize_obj
from taskcore.errors import CommClosedError
from taskcore.futures import default_client  # noqa: F401 (public here too)
from taskcore.futures import (ERROR, FINISHED, PENDING, Future, RemoteTraceback,
                              _futures_in)
from taskcore.transports import connect
from taskcore.utils import LoopRunner

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
        exc = CommClosedError(
            f"lost connection to the scheduler at {self.address}: work in flight and "
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

    def __repr__(self):
        return f"<Client: {self.address!r} status={self.status}>"

    def _repr_html_(self):
        import html

        link = self.dashboard_link
        dash = (f'<br>dashboard: <a href="{html.escape(link)}" target="_blank">'
                f'{html.escape(link)}</a>' if link else "")
        return (f"<div><b>taskcore Client</b> {html.escape(self.id)}<br>scheduler: "
                f"{html.escape(str(self.address))}<br>status: {self.status}{dash}</div>")

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
        elif op == "forwarded-logs":
            from taskcore.forward_logging import reemit

            reemit(msg.get("worker"), msg.get("records") or [])
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
                st.cancel(reason)
            elif st.status == FINISHED:          # key-lost: recomputed, wait again
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
        if actor or actors:
            raise NotImplementedError("actors are not supported by taskcore")
        if workers is None and not resources and not retries and not priority:
            opts = None
        else:
            opts = self._task_options(workers, resources, retries, priority, allow_other_workers)
        return self._hot.submit_call(func, args, kwargs, key, pure, opts)

    def map(self, func, *iterables, key=None, workers=None, retries=None, resources=None,
            priority=0, allow_other_workers=False, fifo_timeout="100 ms", actor=False,
            actors=False, pure=True, batch_size=None, **kwargs):
        """Map func over iterables; returns a list of Futures."""
        if not callable(func):
            raise TypeError(f"First argument to map must be callable, got {func!r}")
        if actor or actors:
            raise NotImplementedError("actors are not supported by taskcore")
        if not iterables:
            raise TypeError("map needs at least one iterable")
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
        ftok = _func_token(func)
        opts = self._task_options(workers, resources, retries, priority, allow_other_workers)
        records = []
        out_keys = []
        seen = set()
        # Building many records allocates many small containers, which would
        # trigger several cyclic-GC passes for nothing (none are cycles).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
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
        finally:
            if gc_was_enabled:
                gc.enable()

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
        keys = None if futures is None else [f.key for f in _futures_in(futures)]
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
        """Run function(*args, **kwargs) on every worker (or `workers`); {address: result}."""
        return self.sync(self._run, function, args, kwargs, workers, on_error)

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

