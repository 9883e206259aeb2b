"""The worker server: scheduler messages -> WorkerState events; instructions -> actions.

The compiled `WorkerState` decides what to run, fetch and report. `Worker`
extends the compiled `WorkerDispatch` (core/worker_dispatch.pyx), which runs
the tiny-task loop and calls this class's hooks for the rest
(`handle_other_message`, `execute_other`, `run_dask_task`); this module owns
the I/O and the data:

* `data`: key -> value, the results held by this worker;
* `TaskExecutor`: `nthreads` task threads (see executor.py);
* a listener serving `get-data` to peers and clients;
* outgoing `GatherDep` transfers, one coroutine per batch, pooled comms.

Scheduler -> worker: compute-tasks (core/messages.pyx), free-keys, steal-request, acquire-replicas,
    remove-replicas, update-data (scatter), scatter-ids, run, close, plugin-add and
    plugin-remove (plugins.py; answered with a reply), and the diagnostics'
    diag-profile, diag-versions, diag-logs (answered with a reply), diag-forward-logging
Worker -> scheduler: register-worker, tasks-finished (core/messages.pyx), task-erred, add-keys,
    release-worker-data, missing-data, steal-response, heartbeat, who-has,
    reply, closing, retire, log-event, diag-forward-logs (forward_logging.py)
Peer -> worker: get-data {keys} -> {status: "OK", data: {key: Serialized}} or {status: "busy"};
    a peer on this host offers shared memory ({..., shm: token}) and large values come back
    as files in /dev/shm ({..., shm: {key: descriptor}}; shm.py);
    actor-execute, actor-attribute (actors.py) -> {status: "OK", result} or {status: "error"}
The scheduler's `registered` reply carries the WorkerPlugins, set up before the first task.

Small results ride along inside `tasks-finished` (up to `inline_result_bytes`),
so the scheduler can hand them to the client without another round trip.

Memory (worker_memory.py, spill.py): with a `memory_limit`, results are spilled to disk
least recently used first past `memory_target_fraction` of it (managed bytes) and
`memory_spill_fraction` (process memory), tasks stop starting past
`memory_pause_fraction`, and a worker paused for `memory_pause_timeout` restarts
gracefully through its nanny. `data` holds only the values in memory; get-data serves
spilled ones from disk. With a `device_memory_limit`, results that are GPU objects past it
move to host memory, least recently used first, and from there to disk (worker_memory.py).

Diagnostics (docs/diagnostics.md): a sampling profiler thread (profile.py), the last
log records (logs.py), `/metrics` for Prometheus on `dashboard_address`
(worker_metrics.py) and forwarding of the tasks' log records (forward_logging.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import time
import uuid

# Imported names, not module attributes: no attribute lookup per use on the hot path.
from taskcore.core.messages import decode_scheduler_message, encode_worker_instruction
from taskcore.core.worker_state import (
    FindMissingResult, GatherDep, GatherDepBusy, GatherDepFailure, GatherDepNetworkFailure,
    GatherDepSuccess, RequestRefreshWhoHas, RetryBusyWorker, RetryBusyWorkerLater, UpdateData,
    WorkerState,
)
from taskcore.core.serialize import Serialized, device_nbytes, nbytes as sizeof, serialize_obj
from taskcore.core.worker_dispatch import WithSpilled, WorkerDispatch, unserializable
from taskcore.task_context import get_client, get_worker, rejoin, secede  # noqa: F401 (public)
import taskcore.shm as shm
from taskcore.errors import CommClosedError, HandshakeError
from taskcore.executor import TaskExecutor
from taskcore.utils import ServerLifecycle, run_user_function, tune_gc
from taskcore.transports import connect, listen
from taskcore.transports.addressing import get_address_host, parse_address, unparse_host_port
from taskcore.utils import parse_bytes
from taskcore.worker_memory import (WorkerMemoryManager, memory_options,
                                   parse_device_memory_limit)
from taskcore.worker_metrics import WorkerCounters

logger = logging.getLogger("taskcore.worker")


def _memory_limit(limit, nthreads):
    if limit in (None, 0, "0"):
        return 0
    if limit == "auto":
        import psutil

        return int(psutil.virtual_memory().total)
    return parse_bytes(limit)


class Worker(WorkerDispatch, ServerLifecycle):
    """`Worker(scheduler_address, nthreads=1, memory_limit="auto", name=None, ...)`."""

    role = "worker"  # as a cluster member (taskcore/member.py)

    def __init__(self, scheduler_address=None, nthreads=1, memory_limit="auto", name=None,
                 resources=None, local_directory=None, death_timeout=None, lifetime=None,
                 lifetime_stagger=0, protocol=None, host=None, interface=None, security=None,
                 nanny_address=None, heartbeat_interval=0.5, listen_address=None, token=None,
                 inline_result_bytes=16_384, validate=False, scheduler_file=None,
                 connection_timeout=10, max_outgoing_transfers=16, inline_threshold=200e-6,
                 inline_budget=0.005, dashboard_address=":0", profile_interval=None,
                 memory_target_fraction=0.6, memory_spill_fraction=0.7,
                 memory_pause_fraction=0.8, memory_terminate_fraction=0.95,
                 memory_pause_timeout=60.0, memory_monitor_interval=0.1,
                 memory_max_spill=False, memory_spill_compression=True,
                 device_memory_limit=None, shm_threshold=shm.DEFAULT_THRESHOLD, **kwargs):
        if kwargs:
            raise TypeError(f"Worker got unknown options: {sorted(kwargs)}")
        if scheduler_address is None and scheduler_file is None:
            raise ValueError("Worker needs a scheduler address or scheduler_file=")
        if scheduler_address is None:
            from taskcore.client import Client

            scheduler_address = Client._read_scheduler_file(scheduler_file, connection_timeout)
        self.scheduler_address = scheduler_address
        scheme = parse_address(scheduler_address)[0]
        self.protocol = protocol or scheme
        self.nthreads = int(nthreads)
        if self.nthreads < 1:
            raise ValueError(f"nthreads must be >= 1, got {nthreads}")
        self.memory_limit = _memory_limit(memory_limit, self.nthreads)
        # Checked here, so a bad option fails in the caller (worker_memory.py).
        self._memory_opts = memory_options(
            memory_target_fraction, memory_spill_fraction, memory_pause_fraction,
            memory_terminate_fraction, memory_pause_timeout, memory_monitor_interval,
            memory_max_spill, memory_spill_compression)
        # Bytes, or 0: off. Fractions are of this process's GPU (taskcore.nvml).
        self.device_memory_limit = parse_device_memory_limit(device_memory_limit) or 0
        self.resources = dict(resources or {})
        self.name = name
        self.local_directory = local_directory
        self.death_timeout = death_timeout
        self.lifetime = lifetime
        self.lifetime_stagger = lifetime_stagger
        self.security = security
        self.nanny_address = nanny_address
        self.heartbeat_interval = heartbeat_interval
        self.token = token
        self.inline_result_bytes = inline_result_bytes
        self.connection_timeout = connection_timeout
        self.max_outgoing_transfers = max_outgoing_transfers
        self.validate = validate
        # Values of at least this many bytes go to peers on this host through /dev/shm
        # (shm.py); 0 turns it off.
        self.shm_threshold = shm.threshold_option(shm_threshold)
        self._shm = None
        if listen_address is None:
            if self.protocol == "inproc":
                listen_address = "inproc://"
            else:
                if interface:
                    host = _interface_ip(interface)
                if host is None:
                    sched_host = get_address_host(scheduler_address)
                    host = "127.0.0.1" if sched_host in ("127.0.0.1", "localhost") else "0.0.0.0"
                listen_address = f"{self.protocol}://{unparse_host_port(host, 0)}"
        self.listen_address = listen_address
        self.id = f"Worker-{uuid.uuid4()}"
        self.status = "created"
        self.state = None
        self.listener = None
        self.scheduler_comm = None
        self.executor = None
        self._peer_comms: dict = {}
        self._outgoing = 0
        self._tasks = set()
        self._closed = None
        self._client = None
        self._pending_scatter: dict = {}
        self.inline_threshold = inline_threshold
        self.inline_budget = inline_budget
        self._reqids = itertools.count(1)
        self._sched_replies: dict = {}
        self.loop = None
        # Diagnostics. `dashboard_address` None (or False) serves no /metrics;
        # `profile_interval` None takes profile.DEFAULT_INTERVAL, 0 runs no sampler.
        if dashboard_address is False:
            dashboard_address = None
        if dashboard_address is not None:
            from taskcore.worker_metrics import parse_dashboard_address

            parse_dashboard_address(dashboard_address, "127.0.0.1")  # bad input fails here
        self.dashboard_address = dashboard_address
        if profile_interval is not None and float(profile_interval) < 0:
            raise ValueError(f"profile_interval must be >= 0 seconds, got {profile_interval}")
        self.profile_interval = profile_interval
        self.counters = WorkerCounters()
        self.log_buffer = None
        self.metrics_server = None
        self.profiler = None
        self.log_forwarder = None
        self.memory_manager = WorkerMemoryManager(self, self.memory_limit, self._memory_opts,
                                                  local_directory, self.device_memory_limit)
        self.memory_manager.install()
        if self.device_memory_limit:
            # The compiled loop calls result_event through its cpdef dispatch, which finds an
            # instance attribute: only a worker with a device limit pays a Python call per
            # result to track the GPU objects among them (worker_memory.py).
            self.result_event = self._result_event_device

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def address(self):
        return self.listener.contact_address if self.listener else None

    async def start(self):
        if self.status == "running":
            return self
        self.loop = asyncio.get_running_loop()
        self._closed = self.loop.create_future()
        tune_gc()
        opts = {"security": self.security} if self.security is not None else {}
        self.listener = await listen(self.listen_address, self._handle_peer, role="worker",
                                     token=self.token, **opts)
        self._start_shm()
        if self.name is None:
            self.name = self.address
        self.executor = TaskExecutor(self.nthreads, self.loop, self.on_thread_results,
                                     name=f"taskcore-worker-{os.getpid()}")
        self._new_state()
        try:
            self._start_diagnostics()
            # The first connection waits for the scheduler as long as death_timeout
            # says (a worker started before its scheduler), not connection_timeout.
            await self._register(first_timeout=self.death_timeout)
        except BaseException:
            await self.listener.stop()
            self._close_shm()
            self.executor.shutdown()
            await self._stop_diagnostics()
            raise
        self.status = "running"
        self.memory_manager.start()
        self._spawn(self._heartbeat_loop())
        if self.lifetime:
            delay = self.lifetime + random.uniform(-1, 1) * (self.lifetime_stagger or 0)
            self._spawn(self._retire_after(max(delay, 0)))
        logger.info("worker %s (%s threads) connected to %s", self.address, self.nthreads,
                    self.scheduler_address)
        return self

    def _start_shm(self):
        """Shared memory with peers on this host (shm.py): not between inproc workers,
        which share a process, nor where /dev/shm cannot be written."""
        if not self.shm_threshold or self.protocol == "inproc":
            return
        try:
            self._shm = shm.SharedMemory(self.shm_threshold).start()
        except OSError as e:
            logger.info("no shared memory between workers (%s): %s", shm.SHM_DIR, e)

    def _close_shm(self):
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def _new_state(self):
        self.state = WorkerState(self.nthreads, self.resources or None, self.address,
                                 validate=self.validate)
        self.data.clear()
        self.small.clear()
        self.memory_manager.clear()

    async def _register(self, first_timeout=None):
        opts = {"security": self.security} if self.security is not None else {}
        timeout = self.connection_timeout if first_timeout is None else float(first_timeout)
        comm = await connect(self.scheduler_address, timeout=timeout,
                             role="worker", token=self.token, **opts)
        await comm.write({
            "op": "register-worker", "address": self.address, "name": self.name,
            "nthreads": self.nthreads, "memory_limit": self.memory_limit,
            "resources": self.resources, "pid": os.getpid(), "host": socket.gethostname(),
            "nanny": self.nanny_address, "local_directory": self.local_directory,
            "dashboard_address": self.dashboard_link,
        })
        reply = await asyncio.wait_for(comm.read(), self.connection_timeout)
        if reply.get("op") != "registered":
            await comm.close()
            raise ValueError(f"scheduler refused worker registration: {reply.get('message', reply)}")
        if reply.get("plugins"):
            # Set up before the first task is read: tasks may need them (plugins.py).
            await self._setup_plugins(reply["plugins"])
        self.scheduler_comm = comm
        comm.set_message_handler(self.on_message)
        self._spawn(self._watch_scheduler(comm))

    async def _watch_scheduler(self, comm):
        await comm.lost
        if self.status not in ("running",):
            return
        logger.warning("lost the scheduler at %s; reconnecting (death timeout %s s)",
                       self.scheduler_address, self.death_timeout)
        self.status = "reconnecting"
        self._configure_log_forwarding({})     # the next scheduler says what it wants
        loop = asyncio.get_running_loop()
        deadline = None if self.death_timeout is None else loop.time() + float(self.death_timeout)
        while self.status == "reconnecting":
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                logger.error("scheduler gone for %s s; worker exits", self.death_timeout)
                await self.close(reason="death-timeout", report=False)
                return
            try:
                # Everything held belongs to a scheduler that forgot us: start clean.
                self._new_state()
                await asyncio.wait_for(self._register(),
                                       None if remaining is None else max(remaining, 0.1))
                self.status = "running"
                logger.info("reconnected to %s", self.scheduler_address)
                return
            except (OSError, asyncio.TimeoutError, HandshakeError, CommClosedError, ValueError):
                await asyncio.sleep(0.2)

    async def close(self, reason="worker-close", report=True, timeout=5):
        if self.status in ("closing", "closed"):
            if self._closed is not None:
                await asyncio.shield(self._closed)
            return
        self.status = "closing"
        logger.info("closing worker %s: %s", self.address, reason)
        if self.scheduler_comm is not None and not self.scheduler_comm.closed:
            try:
                if report:
                    self.scheduler_comm.send({"op": "closing", "reason": reason})
                await asyncio.wait_for(self.scheduler_comm.close(), 2)
            except Exception:
                self.scheduler_comm.abort()
        if self.listener is not None:
            await self.listener.stop()
        self._close_shm()                   # early: a close cut short leaves no files
        for c in self._peer_comms.values():
            c.abort()
        if self.executor is not None:
            self.executor.shutdown()
        if getattr(self, "_plugin_host", None) is not None:
            await self._plugin_host.close()             # teardown (plugins.py)
        if getattr(self, "_actor_host", None) is not None:
            self._actor_host.close()                    # actors.py
        await self._stop_diagnostics()
        if self._client is not None:
            # get_client()'s Client is synchronous: its connections live on the shared
            # loop thread, so close it through its own API from a helper thread. (Its
            # _close() run here touched that loop's transports from this thread,
            # which crashed libuv now and then.)
            try:
                await asyncio.wait_for(
                    self.loop.run_in_executor(None, self._client.close, 5), 10)
            except Exception:
                pass
            self._client = None
        for t in list(self._tasks):
            t.cancel()
        self.memory_manager.close()
        self.status = "closed"
        if not self._closed.done():
            self._closed.set_result(None)

    async def close_gracefully(self, reason="retire"):
        """Retire: the scheduler moves data only this worker holds, then closes us."""
        if self.status != "running":
            return
        self.scheduler_comm.send({"op": "retire"})
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), 60)
        except asyncio.TimeoutError:
            await self.close(reason=reason)

    async def _retire_after(self, delay):
        await asyncio.sleep(delay)
        logger.info("lifetime of %s s reached", self.lifetime)
        await self.close_gracefully(reason="lifetime")

    async def _heartbeat_loop(self):
        import psutil

        from taskcore.worker_metrics import heartbeat_metrics

        proc = psutil.Process()
        proc.cpu_percent()              # the first call only starts the measurement
        counters = self.counters
        clock = self.loop.time
        memory = self.memory_manager
        while self.status in ("running", "reconnecting"):
            asked = clock()
            await asyncio.sleep(self.heartbeat_interval)
            # How late the timer fired: the time callbacks held the loop past it.
            counters.event_loop_delay = max(0.0, clock() - asked - self.heartbeat_interval)
            if self.status != "running":
                continue
            rss = proc.memory_info().rss
            counters.rss = rss
            counters.cpu = proc.cpu_percent()
            if not memory.enabled:
                memory.rss = rss
            metrics = {"rss": rss, "memory": self.state.memory_bytes,
                       "executing": self.state.executing_count,
                       "ready": self.state.ready_count, "in_memory": len(self.data),
                       "time": time.time()}
            metrics.update(heartbeat_metrics(self))
            try:
                self.scheduler_comm.send({"op": "heartbeat", "metrics": metrics})
            except CommClosedError:
                continue

    # -- the state machine ----------------------------------------------------------------
    def _handle(self, *events):
        """Feed events to the state machine and carry out its instructions (the
        compiled loop: `WorkerDispatch.handle`, which runs tiny tasks inline)."""
        self.handle(list(events))

    def _send_scheduler(self, msg):
        comm = self.scheduler_comm
        if comm is not None and not comm.closed:
            comm.send(msg)

    def execute_other(self, ins):
        """Hook: one instruction the compiled loop does not carry out itself (it
        has flushed its batched reports first, so the order is kept)."""
        msg = encode_worker_instruction(ins, self._key_of)     # core/messages.pyx
        t = type(ins)
        if msg is not None:
            self._send_scheduler(msg)
        elif t is GatherDep:
            self._spawn(self._gather_dep(ins.worker, ins.ids, ins.keys, ins.stimulus_id))
        elif t is RequestRefreshWhoHas:
            self._spawn(self._refresh_who_has(ins.ids))
        elif t is RetryBusyWorkerLater:
            self.loop.call_later(0.15, self._retry_busy, ins.worker)
        else:
            logger.error("unhandled worker instruction %r", ins)

    def _key_of(self, tid):
        return self.state.get_task(tid).key

    def _retry_busy(self, worker):
        if self.status == "running":
            self._handle(RetryBusyWorker(worker, "retry-busy-worker"))

    # -- scheduler messages ------------------------------------------------------------------
    def handle_other_message(self, msg):
        """Hook: every message from the scheduler but compute-tasks (which
        `WorkerDispatch.on_message`, the comm's handler, decodes itself)."""
        op = None
        try:
            ev = decode_scheduler_message(msg)                        # core/messages.pyx
            if ev is not None:
                self._handle(ev)
                return
            op = msg["op"]
            if op == "update-data":
                self._update_data(msg)
            elif op == "scatter-ids":
                self._scatter_ids(msg)
            elif op == "run":
                self._spawn(self._run_function(msg))
            elif op == "who-has-reply":
                fut = self._sched_replies.pop(msg.get("reqid"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg["who_has"])
            elif op == "close":
                self._spawn(self.close(reason=msg.get("reason", "scheduler asked"), report=False))
            elif op in ("plugin-add", "plugin-remove"):
                self._spawn(self._plugin_request(msg))
            elif op.startswith("diag-"):
                self._diag_message(msg)
            else:
                logger.warning("unknown op %r from the scheduler", op)
        except Exception:
            logger.exception("error handling %r from the scheduler", str(msg)[:200])

    # -- executing tasks --------------------------------------------------------------------
    def run_dask_task(self, node, values=None):
        """Hook: run one task of a dask graph (a `["dask", node]` run spec, or a
        `["dask-t", template, values]` one: `node` is then the template). While memory
        is managed a dependency may be spilled at any moment (this runs on a task
        thread): look them up through `WithSpilled`, which reads them back."""
        from taskcore.dask_integration import execute_dask_node

        return execute_dask_node(node, WithSpilled(self) if self.memory_managed else self.data,
                                 values)

    # -- memory (worker_memory.py) ---------------------------------------------------------------
    def memory_over_target(self):
        """Hook: managed memory passed the target; spill least recently used values."""
        self.memory_manager.over_target()

    def drop_spilled(self, key):
        """Hook: a released key was on disk."""
        self.memory_manager.drop(key)

    def load_dependency(self, key):
        """Hook: a task's dependency is not in `data`; read it back (KeyError if it is
        not spilled either)."""
        return self.memory_manager.load_dependency(key)

    def _result_event_device(self, tid, key, ok, value, start, stop, prefix=None):
        """`result_event` of a worker with a device_memory_limit: the compiled one, then
        track the result if it is a GPU object."""
        ev = WorkerDispatch.result_event(self, tid, key, ok, value, start, stop, prefix)
        if ok and self.data.get(key) is value:
            self.memory_manager.stored(key, value)
        return ev

    @property
    def paused(self):
        """True while memory pressure keeps this worker from starting tasks."""
        return bool(self.state is not None and self.state.paused)

    # -- data transfer ------------------------------------------------------------------------
    async def _peer(self, address):
        comm = self._peer_comms.get(address)
        if comm is None or comm.closed:
            opts = {"security": self.security} if self.security is not None else {}
            comm = await connect(address, timeout=self.connection_timeout, role="worker",
                                 token=self.token, retry_refused=False, **opts)
            self._peer_comms[address] = comm
        return comm

    async def _gather_dep(self, worker, ids, keys, stimulus_id):
        try:
            comm = await self._peer(worker)
            # One request in flight per pooled comm: take it out of the pool meanwhile.
            self._peer_comms.pop(worker, None)
            request = {"op": "get-data", "keys": keys, "who": self.address}
            offer = self._shm.offer(worker) if self._shm is not None else None
            if offer is not None:
                request["shm"] = offer
            await comm.write(request)
            reply = await comm.read()
            if "shm" in reply and self._shm is not None:
                reply = await self._shm.receive(worker, comm, request, reply)
            if not comm.closed:
                self._peer_comms.setdefault(worker, comm)
        except asyncio.CancelledError:
            raise
        except (OSError, CommClosedError, HandshakeError) as e:
            logger.info("fetch from %s failed: %s", worker, e)
            if self.status == "running":
                self._handle(GatherDepNetworkFailure(worker, "gather-dep-network-failure", ids))
            return
        if self.status != "running":
            return
        if reply.get("status") == "busy":
            self._handle(GatherDepBusy(worker, "gather-dep-busy", ids))
            return
        got = {}
        errors = reply.get("errors") or {}
        by_key = dict(zip(keys, ids))
        counters = self.counters
        counters.incoming_count += 1
        try:
            for k, v in reply.get("data", {}).items():
                if isinstance(v, Serialized):
                    counters.incoming_bytes += v.nbytes
                    v = v.deserialize()
                else:
                    counters.incoming_bytes += sizeof(v)
                self.data[k] = v
                if self.device_memory_limit:
                    self.memory_manager.stored(k, v)
                got[by_key[k]] = sizeof(v)
        except Exception as e:
            self._handle(GatherDepFailure(worker, serialize_obj(e), str(e),
                                             "gather-dep-failure", ids))
            return
        if errors:
            logger.warning("peer %s could not send %s", worker, errors)
        self._handle(GatherDepSuccess(worker, got, stimulus_id))

    async def _refresh_who_has(self, ids):
        keys = []
        for i in ids:
            ts = self.state.get_task(i)
            if ts is not None:
                keys.append(ts.key)
        if not keys or self.scheduler_comm is None or self.scheduler_comm.closed:
            return
        reqid = next(self._reqids)
        fut = self.loop.create_future()
        self._sched_replies[reqid] = fut
        self.scheduler_comm.send({"op": "who-has", "keys": keys, "reqid": reqid})
        try:
            who_has = await asyncio.wait_for(fut, 10)
        except (asyncio.TimeoutError, CommClosedError):
            return
        by_key = {self.state.get_task(i).key: i for i in ids if self.state.get_task(i) is not None}
        result = {by_key[k]: v for k, v in who_has.items() if k in by_key}
        if self.status == "running":
            self._handle(FindMissingResult(result, "find-missing-result"))

    async def _handle_peer(self, comm):
        """Serve get-data (peers and clients) on an incoming connection."""
        self.counters.incoming_comms += 1
        try:
            while True:
                try:
                    msg = await comm.read()
                except CommClosedError:
                    return
                if self._shm is not None:
                    # The requester is done with the previous reply: its files go.
                    self._shm.release(comm)
                op = msg.get("op") if isinstance(msg, dict) else None
                if op == "get-data":
                    await self._serve_get_data(comm, msg)
                elif op in ("actor-execute", "actor-attribute"):
                    from taskcore.actors import serve         # taskcore/actors.py

                    await serve(self, comm, msg)
                else:
                    await comm.write({"status": "error", "message": f"unknown op {op!r}"})
        finally:
            if self._shm is not None:
                self._shm.release(comm)
            self.counters.incoming_comms -= 1

    async def _serve_get_data(self, comm, msg):
        if self._outgoing >= self.max_outgoing_transfers and msg.get("who") != "client":
            await comm.write({"status": "busy"})
            return
        self._outgoing += 1
        try:
            data = {}
            errors = {}
            nbytes = 0
            store = self.data
            spilled = self.spilled
            touch = self.memory_manager.store.touch if self.memory_managed else None
            # A comm that moves device memory (ucx with a CUDA transport) takes GPU objects
            # as they are: its dumps_device sends their memory without a copy to host.
            device_comm = getattr(comm, "device_frames", False)
            for k in msg.get("keys", ()):
                if k not in store:
                    if spilled and k in spilled:
                        # On disk: its frames go out as they are (read off the loop).
                        try:
                            s = data[k] = await self.memory_manager.read_for_transfer(k)
                            nbytes += s.nbytes
                        except KeyError:
                            pass                        # released meanwhile
                        except Exception as e:
                            errors[k] = f"could not read spilled {k!r}: {type(e).__name__}: {e}"
                    continue
                if touch is not None:
                    touch(k)
                if device_comm:
                    n = device_nbytes(store[k])
                    if n >= 0:
                        data[k] = store[k]
                        nbytes += n
                        continue
                try:
                    s = data[k] = serialize_obj(store[k])
                    nbytes += s.nbytes
                except Exception as e:
                    errors[k] = unserializable(k, store[k], e)
            reply = {"status": "OK", "data": data, "errors": errors}
            if "shm" in msg and self._shm is not None:
                # Large values as files in /dev/shm when the requester shares it (shm.py).
                shared = await self._shm.export(comm, msg["shm"], data)
                if shared:
                    reply["shm"] = shared
            await comm.write(reply)
            self.counters.outgoing_count += 1
            self.counters.outgoing_bytes += nbytes
        finally:
            self._outgoing -= 1

    # -- scatter, run ----------------------------------------------------------------------------
    def _update_data(self, msg):
        nbytes = {}
        try:
            for k, v in msg["data"].items():
                if isinstance(v, Serialized):
                    v = v.deserialize()
                self._pending_scatter[k] = v
                nbytes[k] = sizeof(v)
            reply = {"op": "reply", "reqid": msg["reqid"], "nbytes": nbytes}
        except Exception as e:
            reply = {"op": "reply", "reqid": msg["reqid"], "error": serialize_obj(e)}
        self._send_scheduler(reply)

    def _scatter_ids(self, msg):
        items = []
        for k, tid in msg["ids"]:
            if k in self._pending_scatter:
                v = self._pending_scatter.pop(k)
                if k in self.spilled:
                    self.memory_manager.drop(k)     # scattered again: the old copy goes
                self.data[k] = v
                if self.device_memory_limit:
                    self.memory_manager.stored(k, v)
                items.append((tid, k, sizeof(v)))
        if items:
            self._handle(UpdateData(items, "scatter", report=False))

    async def _run_function(self, msg):
        status, result = await run_user_function(msg["func"], self, ("worker", "dask_worker"))
        reply = {"status": status, "result": result}
        reply.update(op="reply", reqid=msg["reqid"])
        self._send_scheduler(reply)

    def log_event(self, topic, msg):
        """Record a structured event on the scheduler (client.get_events); from a task
        thread or the loop."""
        self.loop.call_soon_threadsafe(self._send_scheduler,
                                       {"op": "log-event", "topic": topic, "msg": msg})

    # -- plugins (plugins.py) ------------------------------------------------------------------
    async def _setup_plugins(self, plugins):
        """The scheduler's WorkerPlugins at registration: {name: Serialized}. One that
        fails is logged; the worker still serves."""
        from taskcore import plugins as _plugins

        host = _plugins.worker_host(self)
        for name, ser in plugins.items():
            try:
                await host.add(name, ser.deserialize() if isinstance(ser, Serialized) else ser)
            except Exception:
                logger.exception("worker plugin %r failed to set up on %s", name, self.address)
        _plugins.update_worker_hook(self)

    async def _plugin_request(self, msg):
        from taskcore import plugins as _plugins

        host = _plugins.worker_host(self)
        try:
            if msg["op"] == "plugin-add":
                p = msg["plugin"]
                await host.add(msg["name"], p.deserialize() if isinstance(p, Serialized) else p)
            else:
                await host.remove(msg["name"])
            result = _plugins.outcome()
        except Exception as e:
            result = _plugins.outcome(e)
        _plugins.update_worker_hook(self)
        self._send_scheduler({"op": "reply", "reqid": msg["reqid"], "result": result})

    # -- diagnostics (docs/diagnostics.md) -------------------------------------------------------
    @property
    def dashboard_link(self):
        """The URL serving this worker's /metrics, or None."""
        srv = self.metrics_server
        if srv is None or self.listener is None:
            return None
        wildcard = srv.host in ("0.0.0.0", "::", "")
        return srv.url(get_address_host(self.address) if wildcard else srv.host)

    def _listen_host(self):
        scheme, loc = parse_address(self.listen_address)
        if scheme == "inproc" or not loc:
            return "127.0.0.1"
        host = loc.rsplit(":", 1)[0] if not loc.startswith("[") else loc[1:loc.index("]")]
        return host or "0.0.0.0"

    def _start_diagnostics(self):
        from taskcore.logs import LogBuffer
        from taskcore.profile import Sampler

        self.log_buffer = LogBuffer().attach()
        if self.dashboard_address is not None:
            from taskcore.worker_metrics import MetricsServer, parse_dashboard_address

            host, port = parse_dashboard_address(self.dashboard_address, self._listen_host())
            self.metrics_server = MetricsServer(self, host, port)
        if self.profile_interval is None or float(self.profile_interval) > 0:
            self.profiler = Sampler(self, self.profile_interval).start()
            # From a loop callback (not this coroutine): the frame below it is the one
            # running the loop, where loop-thread stacks start.
            self.loop.call_soon(self.profiler.mark_loop)

    async def _stop_diagnostics(self):
        if self.profiler is not None:
            self.profiler.stop()
        if self.log_forwarder is not None:
            self.log_forwarder.detach()
        if self.log_buffer is not None:
            self.log_buffer.detach()
        srv, self.metrics_server = self.metrics_server, None
        if srv is not None:
            # Joins the HTTP thread: not on the loop, which a scrape may be waiting on.
            await self.loop.run_in_executor(None, srv.stop)

    def _diag_message(self, msg):
        """A diagnostics request from the scheduler (scheduler_diagnostics.py)."""
        op = msg["op"]
        if op == "diag-profile":
            self._spawn(self._diag_profile(msg))
        elif op == "diag-versions":
            from taskcore.versions import get_versions

            self._diag_reply(msg, lambda: get_versions(msg.get("packages")))
        elif op == "diag-logs":
            self._diag_reply(msg, lambda: [(r[1], r[3]) for r in
                                           self.log_buffer.recent(msg.get("n"))])
        elif op == "diag-forward-logging":
            self._configure_log_forwarding(msg.get("loggers") or {})
        else:
            logger.warning("unknown diagnostics op %r from the scheduler", op)

    def _diag_reply(self, msg, compute):
        try:
            reply = {"op": "reply", "reqid": msg["reqid"], "result": compute()}
        except Exception as e:
            reply = _diag_error(msg, e)
        self._send_scheduler(reply)

    async def _diag_profile(self, msg):
        from taskcore.profile import flatten

        prof = self.profiler
        try:
            if prof is None:
                raise RuntimeError(f"worker {self.address} runs no profiler "
                                   f"(profile_interval=0)")
            # Merging an hour of cycles takes a while: off the event loop.
            tree = await self.loop.run_in_executor(
                None, lambda: prof.collect(msg.get("start"), msg.get("stop"), msg.get("key"),
                                           bool(msg.get("server"))))
            reply = {"op": "reply", "reqid": msg["reqid"], "result": flatten(tree)}
        except Exception as e:
            reply = _diag_error(msg, e)
        self._send_scheduler(reply)

    def _configure_log_forwarding(self, loggers):
        from taskcore.forward_logging import LogForwarder

        if self.log_forwarder is None:
            if not loggers:
                return
            self.log_forwarder = LogForwarder(self)
            self._spawn(self._forward_logs_loop(self.log_forwarder))
        self.log_forwarder.configure(loggers)
        if not loggers:
            self.log_forwarder = None      # its loop sends what is left and ends

    async def _forward_logs_loop(self, forwarder):
        from taskcore.forward_logging import FLUSH_INTERVAL

        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            records = forwarder.take()
            if records:
                self._send_scheduler({"op": "diag-forward-logs", "records": records})
            if forwarder is not self.log_forwarder or self.status in ("closing", "closed"):
                return

    # -- tasks calling back into the cluster -----------------------------------------------------
    def _get_client(self):
        if self._client is None or self._client.status != "running":
            from taskcore.client import Client

            self._client = Client(self.scheduler_address, security=self.security,
                                  set_as_default=False, timeout=self.connection_timeout)
        return self._client


def _diag_error(msg, exc):
    """A failed diagnostics request's reply: the scheduler relays the text (it does not
    unpickle what workers send)."""
    return {"op": "reply", "reqid": msg["reqid"], "error": serialize_obj(exc),
            "error_text": f"{type(exc).__name__}: {exc}"}


def _interface_ip(interface):
    import psutil

    addrs = psutil.net_if_addrs()
    if interface not in addrs:
        raise ValueError(f"no network interface {interface!r}; available: {sorted(addrs)}")
    for a in addrs[interface]:
        if a.family == socket.AF_INET:
            return a.address
    for a in addrs[interface]:
        if a.family == socket.AF_INET6:
            return a.address.split("%")[0]
    raise ValueError(f"interface {interface!r} has no IP address")
