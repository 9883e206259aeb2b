"""The scheduler server: routes comm messages into SchedulerState, executes its instructions.

The compiled `SchedulerState` holds every decision; this module only does I/O.
`Scheduler` extends the compiled `SchedulerDispatch` (core/scheduler_dispatch.pyx),
which handles a round trip's messages in C and calls this class's hooks for
everything else: `handle_client_message`, `handle_worker_message` and
`execute_other`. Each received message becomes one stimulus; the instructions
that come back are turned into messages and queued on the right comms, which
flush them in one batch at the end of the current read callback (see
`core/protocol.pyx`), so a task-finished that releases ten dependents costs
one write per worker.

Peers say who they are in their first message:
    register-client  -> client messages   (see client.py for the list)
    register-worker  -> worker messages:  task-finished, task-erred, add-keys,
                        release-worker-data, missing-data, steal-response,
                        heartbeat, reply, closing
    register-nanny   -> nanny messages:   worker-died, worker-restarted, reply
    anything else    -> a one-shot request ({"op": "rpc", ...}) answered then closed

Plugins (taskcore/plugins.py): SchedulerPlugins live here and get their hooks from this
server; WorkerPlugins and NannyPlugins are kept pickled and handed to every worker
(`plugin-add`, and in the `registered` reply of a worker that joins later) and nanny.
Also here: metadata, structured events, replicate/rebalance (acquire-replicas to the
recipients, remove-replicas to the senders once the copies exist), and the actors'
keys, failed rather than run again when their worker leaves (taskcore/actors.py).

An rpc whose method is "<extension>.<operation>" goes to a coordination extension
(`self.extensions`, taskcore/coordination/): variables, queues, locks, semaphores,
events, pub/sub and published datasets, made on first use and told when a client
leaves or a worker is removed.
"""
from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import os
import socket
import time
import uuid

from taskcore.core.messages import (FIRE_AND_FORGET, decode_client_message,
                                    decode_worker_message, encode_scheduler_instruction,
                                    key_cancelled)
from taskcore.core.scheduler_dispatch import Peer, Route, SchedulerDispatch
from taskcore.core.scheduler_state import (AddWorker, BalanceTick, Cancel, ClientRemoved,
                                           RemoveWorker, Retry, RetireWorkers, SchedulerState,
                                           TaskRetried, UpdateData, WorkersRetiring)
from taskcore.core.serialize import Serialized, serialize_obj
from taskcore.errors import CommClosedError
from taskcore.logs import LogBuffer
from taskcore.scheduler_diagnostics import SchedulerDiagnostics
from taskcore.scheduler_services import SchedulerServices
from taskcore.utils import ServerLifecycle, run_user_function, tune_gc
from taskcore.transports import listen
from taskcore.transports.addressing import parse_address, unparse_host_port

logger = logging.getLogger("taskcore.scheduler")


class Scheduler(SchedulerDispatch, SchedulerDiagnostics, SchedulerServices, ServerLifecycle):
    """`Scheduler(host, port, protocol, security, idle_timeout, scheduler_file, ...)`.

    `await Scheduler(...).start()`, then `address`; `await close()`; `await finished()`.
    """

    role = "scheduler"  # as a cluster member (taskcore/member.py)

    def __init__(self, host="127.0.0.1", port=0, protocol="tcp", security=None,
                 idle_timeout=None, scheduler_file=None, listen_addresses=None,
                 worker_ttl=60.0, heartbeat_interval=0.5, balance_interval=0.1,
                 allowed_failures=2, validate=False, worker_saturation=1.1, token=None,
                 inline_result_bytes=16_384, name=None, tiny_task_backlog=0.002,
                 dashboard_address=None, dashboard_prefix="", task_stream_length=100_000,
                 connection_policy=None, listen_fd=None, **kwargs):
        if kwargs:
            raise TypeError(f"Scheduler got unknown options: {sorted(kwargs)}")
        if listen_addresses is None:
            if protocol == "inproc":
                listen_addresses = ["inproc://"]
            else:
                listen_addresses = [f"{protocol}://{unparse_host_port(host or '', port or 0)}"]
        for a in listen_addresses:
            parse_address(a)
        if listen_fd is not None and (len(listen_addresses) != 1 or parse_address(
                listen_addresses[0])[0] not in ("tcp", "tls")):
            raise ValueError("listen_fd (a listening socket handed over by the process that "
                             "started this one) needs one tcp:// or tls:// address")
        # Served instead of binding: its address was known before this process started.
        self.listen_fd = listen_fd
        self.listen_addresses = listen_addresses
        self.security = security
        self.idle_timeout = idle_timeout
        self.scheduler_file = scheduler_file
        self.worker_ttl = worker_ttl
        self.heartbeat_interval = heartbeat_interval
        self.balance_interval = balance_interval
        self.token = token
        # What peers may do (transports/policy.py); None: the defaults and TASKCORE_* env.
        self.connection_policy = connection_policy
        self.name = name
        self.id = f"Scheduler-{uuid.uuid4()}"
        self.state = SchedulerState(validate=validate, allowed_failures=allowed_failures,
                                    worker_saturation=worker_saturation,
                                    tiny_task_backlog=tiny_task_backlog,
                                    task_stream_length=task_stream_length)
        # The HTTP dashboard (taskcore/dashboard/): off unless an address is given; the
        # CLI and LocalCluster default to ":8787".
        self.dashboard_address = dashboard_address
        self.dashboard_prefix = dashboard_prefix or ""
        self.dashboard = None
        self.log_buffer = LogBuffer()
        self.listeners = []
        self.workers = {}             # address -> Peer
        self.clients = {}             # client id -> Peer
        self.nannies: dict = {}       # worker address -> Peer
        self.status = "created"
        self._reqids = itertools.count(1)
        self._worker_event = None
        self._closed = None
        self._tasks = set()
        self._last_activity = time.monotonic()
        self._stim = itertools.count(1)
        self.start_time = time.time()
        # Coordination primitives and datasets (taskcore/coordination/): name -> extension,
        # made on the first rpc that names one; reached only through `op: rpc`.
        self.extensions: dict = {}
        # Plugins (taskcore/plugins.py): SchedulerPlugins by name, live here; worker and
        # nanny plugins by name, pickled (never unpickled here), for every member that
        # registers later too.
        self.plugins: dict = {}
        self.worker_plugins: dict = {}
        self.nanny_plugins: dict = {}
        # client.set_metadata / get_metadata: a nested dict of opaque leaves.
        self.task_metadata: dict = {}
        # Structured events (client.log_event, Worker.log_event): topic -> recent
        # (time, msg); topic -> ids of the clients subscribed.
        self.events: dict = {}
        self.event_subscribers: dict = {}
        # Keys of actors (taskcore/actors.py): when the worker holding one leaves, its
        # Futures err instead of the task running again (a new, empty actor).
        self.actor_keys: set = set()

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def address(self):
        return self.listeners[0].contact_address if self.listeners else None

    @property
    def addresses(self):
        return [lst.contact_address for lst in self.listeners]

    async def start(self):
        if self.status == "running":
            return self
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        self._worker_event = asyncio.Event()
        tune_gc()
        self.log_buffer.attach()
        opts = {"security": self.security} if self.security is not None else {}
        if self.listen_fd is not None:
            opts["sock"] = socket.socket(fileno=self.listen_fd)
        for addr in self.listen_addresses:
            lst = await listen(addr, self._handle_comm, role="scheduler", token=self.token,
                               policy=self.connection_policy, **opts)
            self.listeners.append(lst)
        if self.dashboard_address is not None:
            from taskcore.dashboard.server import DashboardServer

            self.dashboard = DashboardServer(self, self.dashboard_address, self.dashboard_prefix)
            await self.dashboard.start()
        self.status = "running"
        self._spawn(self._periodic())
        if self.scheduler_file:
            write_scheduler_file(self.scheduler_file, self.address)
        logger.info("scheduler at %s", ", ".join(self.addresses))
        return self

    async def close(self, reason="scheduler-close"):
        if self.status in ("closing", "closed"):
            if self._closed is not None:
                await asyncio.shield(self._closed)
            return
        self.status = "closing"
        logger.info("closing scheduler: %s", reason)
        for peer in list(self.clients.values()):
            self.send(peer, {"op": "scheduler-closing"})
        for peer in list(self.workers.values()):
            self.send(peer, {"op": "close", "reason": reason})
        for peer in list(self.nannies.values()):
            self.send(peer, {"op": "close"})
        # Close gracefully: each comm writes what is queued (the messages above), then
        # its connection ends; a peer that does not take it within 50 ms is aborted below.
        closing = [asyncio.ensure_future(peer.comm.close()) for peer in
                   [*self.clients.values(), *self.workers.values(), *self.nannies.values()]]
        if closing:
            await asyncio.wait(closing, timeout=0.05)
            for t in closing:       # a comm already broken: its error is not news here
                t.add_done_callback(lambda t: t.cancelled() or t.exception())
        for lst in self.listeners:
            await lst.stop()
        if self.dashboard is not None:
            await self.dashboard.close()
        for peer in [*self.clients.values(), *self.workers.values(), *self.nannies.values()]:
            peer.comm.abort()
        for t in list(self._tasks):
            t.cancel()
        self._tell_extensions("close")
        for name, plugin in list(self.plugins.items()):
            try:
                from taskcore.plugins import call_hook

                await call_hook(plugin.close)
            except Exception:
                logger.exception("scheduler plugin %r failed in close", name)
        if self.scheduler_file:
            try:
                os.remove(self.scheduler_file)
            except OSError:
                pass
        self.log_buffer.detach()
        self.status = "closed"
        if not self._closed.done():
            self._closed.set_result(None)

    # -- periodic work ----------------------------------------------------------------------
    async def _periodic(self):
        last_ttl = time.monotonic()
        while self.status == "running":
            await asyncio.sleep(self.balance_interval)
            now = time.time()
            if self.state.work_stealing and len(self.workers) > 1:
                self._handle(BalanceTick(now, stimulus_id=f"balance-{now}"))
            mono = time.monotonic()
            if mono - last_ttl > 1.0:
                last_ttl = mono
                for addr in self.state.stale_workers(now, self.worker_ttl):
                    logger.warning("worker %s missed heartbeats for %s s; removing it",
                                   addr, self.worker_ttl)
                    self._remove_worker(addr, safe=False, reason="ttl")
            if self.idle_timeout:
                busy = self.clients or any(self.state.processing().values())
                if busy:
                    self._last_activity = mono
                elif mono - self._last_activity > self.idle_timeout:
                    logger.info("idle for %s s; closing", self.idle_timeout)
                    self._spawn(self.close(reason="idle-timeout"))
                    return

    # -- executing instructions --------------------------------------------------------------
    def _handle(self, *stimuli):
        for ev in stimuli:
            self.handle(ev)

    def execute_other(self, ins):
        """Hook: one instruction other than ComputeTask/KeyInMemory (those go out
        batched per peer from the compiled `execute`, in order with these)."""
        enc = encode_scheduler_instruction(ins)       # a message (core/messages.pyx)
        t = type(ins)
        if enc is not None:
            to, target, msg = enc
            if to == "worker":
                self._to_worker(target, msg)
            else:
                self._to_clients(target, msg)
        elif t is TaskRetried:
            pass  # the retrying client already reset its futures
        elif t is WorkersRetiring:
            self._spawn(self._finish_retirement(list(ins.workers)))
        else:
            logger.error("unhandled instruction %r", ins)

    def _to_worker(self, addr, msg):
        peer = self.workers.get(addr)
        if peer is not None:
            self.send(peer, msg)

    def _to_clients(self, clients, msg):
        for c in clients:
            peer = self.clients.get(c)
            if peer is not None:
                self.send(peer, msg)

    # -- connections ---------------------------------------------------------------------------
    async def _handle_comm(self, comm):
        try:
            msg = await comm.read()
        except CommClosedError:
            return
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "register-client":
            await self._serve_client(comm, msg)
        elif op == "register-worker":
            await self._serve_worker(comm, msg)
        elif op == "register-nanny":
            await self._serve_nanny(comm, msg)
        elif op == "rpc":
            peer = Peer(comm, "oneshot", None)
            self._client_rpc(peer, msg)
            await comm.lost
        else:
            logger.warning("closing connection from %s: unexpected first message %r",
                           comm.peer_address, str(msg)[:100])
            try:
                await comm.write({"op": "error", "message": f"unexpected first message op {op!r}"})
            finally:
                await comm.close()

    async def _serve_client(self, comm, msg):
        cid = msg.get("client")
        if not isinstance(cid, str) or cid in self.clients:
            await comm.write({"op": "error", "message": f"invalid or duplicate client id {cid!r}"})
            await comm.close()
            return
        peer = Peer(comm, "client", cid)
        self.clients[cid] = peer
        self._last_activity = time.monotonic()
        comm.send({"op": "registered", "info": self._info()})
        comm.set_message_handler(Route(self, peer, False).handle)
        if self.plugins:
            self._tell_plugins("add_client", scheduler=self, client=cid)
        try:
            await comm.lost
        finally:
            self.clients.pop(cid, None)
            self._last_activity = time.monotonic()
            if self.status == "running":
                self._handle(ClientRemoved(cid, stimulus_id=f"client-removed-{cid}"))
                self._tell_extensions("client_removed", cid)   # its locks, leases, waiters
                if self.plugins:
                    self._tell_plugins("remove_client", scheduler=self, client=cid)
                for subscribers in self.event_subscribers.values():
                    subscribers.discard(cid)

    async def _serve_worker(self, comm, msg):
        addr = msg.get("address")
        name = msg.get("name", addr)
        try:
            if not isinstance(addr, str):
                raise ValueError(f"worker registration without an address: {msg!r}")
            if addr in self.workers:
                raise ValueError(f"a worker at {addr} is already registered")
            if name is not None and any(p.info.get("name") == name for p in self.workers.values()):
                raise ValueError(f"a worker named {name!r} is already registered")
            resources = {str(k): float(v) for k, v in (msg.get("resources") or {}).items()}
            stimulus = AddWorker(addr, int(msg.get("nthreads", 1)),
                                 int(msg.get("memory_limit") or 0), resources, name,
                                 time.time(), stimulus_id=f"add-worker-{addr}")
        except (ValueError, TypeError) as e:
            logger.warning("refusing worker from %s: %s", comm.peer_address, e)
            await comm.write({"op": "error", "message": str(e)})
            await comm.close()
            return
        peer = Peer(comm, "worker", addr, info=dict(msg))
        self.workers[addr] = peer
        registered = {"op": "registered", "address": addr, "scheduler": self.address}
        if self.worker_plugins:
            registered["plugins"] = dict(self.worker_plugins)   # set up before any task
        comm.send(registered)
        comm.set_message_handler(Route(self, peer, True).handle)
        self._handle(stimulus)
        self._worker_event.set()
        logger.info("registered worker %s (%s threads)", addr, msg.get("nthreads"))
        self._diag_worker_added(peer)
        if self.plugins:
            self._tell_plugins("add_worker", scheduler=self, worker=addr)
        try:
            await comm.lost
        finally:
            if self.status == "running":
                self._remove_worker(addr, safe=peer.closing, reason="connection closed")

    async def _serve_nanny(self, comm, msg):
        worker = msg.get("worker")
        peer = Peer(comm, "nanny", worker, info=dict(msg))
        self.nannies[worker] = peer
        comm.set_message_handler(lambda m: self._nanny_msg(peer, m))
        if self.nanny_plugins:
            self._spawn(self._nanny_plugins_to(peer))
        try:
            await comm.lost
        finally:
            if self.nannies.get(peer.id) is peer:
                del self.nannies[peer.id]
            for fut in peer.replies.values():
                if not fut.done():
                    fut.set_exception(CommClosedError("nanny disconnected"))

    def _tell_extensions(self, hook, *args):
        """Run hook `hook` of every coordination extension in use; one that fails is
        logged and does not keep the others (or the caller) from their work."""
        for name, ext in list(self.extensions.items()):
            try:
                getattr(ext, hook)(*args)
            except Exception:
                logger.exception("coordination extension %r failed in %s", name, hook)

    def _remove_worker(self, addr, safe, reason, cause=None):
        peer = self.workers.pop(addr, None)
        if peer is None:
            return
        logger.info("removing worker %s (%s)", addr, reason)
        for fut in peer.replies.values():
            if not fut.done():
                fut.set_exception(CommClosedError(f"worker {addr} left: {reason}"))
        peer.comm.abort()
        if self.actor_keys:
            self._fail_actors_of(addr)
        self._handle(RemoveWorker(addr, safe=safe, now=time.time(),
                                  stimulus_id=f"remove-worker-{addr}-{reason}", reason=cause))
        self._tell_extensions("worker_removed", addr)     # locks and leases its tasks held
        if self.plugins:
            self._tell_plugins("remove_worker", scheduler=self, worker=addr,
                               stimulus_id=f"remove-worker-{addr}-{reason}")

    def _tell_plugins(self, hook, *args, **kwargs):
        """Call `hook` of every SchedulerPlugin; a coroutine runs as a task; one that
        fails is logged and does not keep the others from their hook."""
        for name, plugin in list(self.plugins.items()):
            fn = getattr(plugin, hook, None)
            if fn is None:
                continue
            try:
                r = fn(*args, **kwargs)
                if inspect.isawaitable(r):
                    self._spawn(r)
            except Exception:
                logger.exception("scheduler plugin %r failed in %s", name, hook)

    # -- worker messages ---------------------------------------------------------------------------
    def handle_worker_message(self, peer, msg):
        """Hook: a worker's message other than tasks-finished."""
        try:
            ev = decode_worker_message(peer.id, msg, time.time())    # core/messages.pyx
            if ev is not None:
                self.handle(ev)
                return
            op = msg["op"]
            if op == "reply":
                fut = peer.replies.pop(msg["reqid"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif op == "closing":
                peer.closing = True
            elif op == "retire":
                self._spawn(self.rpc_retire_workers(peer, workers=[peer.id]))
            elif op == "who-has":
                self.send(peer, {"op": "who-has-reply", "reqid": msg.get("reqid"),
                                  "who_has": self.state.who_has(msg["keys"])})
            elif op == "log-event":
                self.rpc_log_event(peer, msg.get("topic"), msg.get("msg"))
            elif op.startswith("diag-"):
                self._diag_worker_message(peer, msg)        # scheduler_diagnostics.py
            else:
                logger.warning("unknown op %r from worker %s", op, peer.id)
        except Exception:
            logger.exception("error handling %r from worker %s", str(msg)[:200], peer.id)

    def _nanny_msg(self, peer, msg):
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "worker-died":
            addr = msg.get("worker")
            logger.warning("nanny reports worker %s died: %s", addr, msg.get("reason"))
            if addr in self.workers:
                self._remove_worker(addr, safe=False, reason="worker died",
                                    cause=msg.get("reason"))
        elif op in ("worker-restarted", "reply"):
            fut = peer.replies.pop(msg.get("reqid", "restart"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            if op == "worker-restarted" and msg.get("worker"):
                self.nannies.pop(peer.id, None)
                peer.id = msg["worker"]
                self.nannies[peer.id] = peer
        elif op == "register-nanny":
            self.nannies.pop(peer.id, None)
            peer.id = msg.get("worker")
            self.nannies[peer.id] = peer
        else:
            logger.warning("unknown op %r from nanny", op)

    async def _nanny_request(self, peer, msg, timeout=None):
        """Send `msg` to a nanny and wait for its {"op": "reply"}; a nanny that
        answers nothing in `timeout` seconds is an error."""
        reqid = f"req-{next(self._reqids)}"
        fut = asyncio.get_running_loop().create_future()
        peer.replies[reqid] = fut
        msg["reqid"] = reqid
        self.send(peer, msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            peer.replies.pop(reqid, None)

    async def _worker_request(self, addr, msg, timeout=None):
        peer = self.workers.get(addr)
        if peer is None:
            raise CommClosedError(f"no worker {addr}")
        reqid = next(self._reqids)
        fut = asyncio.get_running_loop().create_future()
        peer.replies[reqid] = fut
        msg["reqid"] = reqid
        peer.comm.send(msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            peer.replies.pop(reqid, None)       # a timed-out request leaves nothing behind

    # -- client messages -------------------------------------------------------------------------------
    def handle_client_message(self, peer, msg):
        """Hook: a client's message other than update-graph."""
        try:
            ev = decode_client_message(peer.id, msg)                  # core/messages.pyx
            if ev is not None:
                self.handle(ev)
                return
            op = msg["op"]
            if op == "rpc":
                self._client_rpc(peer, msg)
            elif op == "close-client":
                pass  # the comm closing removes the client
            else:
                logger.warning("unknown op %r from client %s", op, peer.id)
                self.send(peer, {"op": "error", "message": f"unknown op {op!r}"})
        except Exception as e:
            logger.exception("error handling a message from client %s", peer.id)
            reqid = msg.get("reqid") if isinstance(msg, dict) else None
            if reqid is not None:
                self.send(peer, {"op": "reply", "reqid": reqid, "error": serialize_obj(e)})

    def _client_rpc(self, peer, msg):
        method = msg.get("method")
        reqid = msg.get("reqid")
        handler = getattr(self, f"rpc_{method}", None) if isinstance(method, str) else None
        if handler is None and isinstance(method, str) and "." in method:
            from taskcore.coordination.extension import rpc_handler

            handler = rpc_handler(self, method)     # "variable.set": an extension's
        if handler is None:
            self.send(peer, {"op": "reply", "reqid": reqid,
                              "error": serialize_obj(ValueError(f"unknown rpc method {method!r}"))})
            return

        async def run():
            try:
                result = handler(peer, **(msg.get("args") or {}))
                if inspect.isawaitable(result):
                    result = await result
                reply = {"op": "reply", "reqid": reqid, "result": result}
            except Exception as e:
                reply = {"op": "reply", "reqid": reqid, "error": serialize_obj(e)}
            self.send(peer, reply)

        self._spawn(run())

    # -- rpc methods (client-facing) -----------------------------------------------------------------
    def _info(self):
        d = self.dashboard
        return {"id": self.id, "address": self.address, "type": "Scheduler",
                "started": self.start_time, "workers": self.state.worker_info(),
                "dashboard_host": d.host if d is not None else None,
                "dashboard_port": d.port if d is not None else None,
                "dashboard_prefix": d.prefix if d is not None else None}

    def rpc_scheduler_info(self, peer):
        return self._info()

    def rpc_who_has(self, peer, keys=None):
        return self.state.who_has(keys)

    def rpc_has_what(self, peer, workers=None):
        return self.state.has_what(workers)

    def rpc_nthreads(self, peer, workers=None):
        n = self.state.nthreads()
        if workers is not None:
            n = {w: n[w] for w in workers if w in n}
        return n

    async def rpc_wait_for_workers(self, peer, n=1, timeout=None):
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while len(self.workers) < n:
            self._worker_event.clear()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"only {len(self.workers)} of {n} workers arrived "
                                   f"within {timeout} s")
            try:
                await asyncio.wait_for(self._worker_event.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return len(self.workers)

    def rpc_cancel(self, peer, keys, client=None, force=False):
        self._handle(Cancel(client or peer.id, list(keys), force=force, stimulus_id="cancel"))

    def rpc_retry(self, peer, keys, client=None):
        self._handle(Retry(client or peer.id, list(keys), stimulus_id="retry"))

    async def rpc_scatter(self, peer, data, client=None, workers=None, broadcast=False):
        if not self.workers:
            await self.rpc_wait_for_workers(peer, 1, timeout=30)
        candidates = [w for w in (workers or list(self.workers)) if w in self.workers]
        if not candidates:
            raise ValueError(f"none of the requested workers exist: {workers}")
        placement = {}
        if broadcast:
            for k in data:
                placement[k] = list(candidates)
        else:
            load = {w: 0 for w in candidates}
            for k, v in data.items():
                w = min(candidates, key=load.__getitem__)
                placement[k] = [w]
                load[w] += v.nbytes if isinstance(v, Serialized) else 1
        per_worker = {}
        for k, ws in placement.items():
            for w in ws:
                per_worker.setdefault(w, {})[k] = data[k]
        replies = await asyncio.gather(*[
            self._worker_request(w, {"op": "update-data", "data": d})
            for w, d in per_worker.items()])
        nbytes = {}
        for r in replies:
            nbytes.update(r.get("nbytes", {}))
        cid = client or peer.id
        self._handle(UpdateData(cid, placement, nbytes, stimulus_id="scatter"))
        if cid is not None and cid not in self.clients and self.status == "running":
            # The client left while its data travelled (UpdateData made its record anew):
            # what it scattered leaves with it, as at any disconnect.
            self._handle(ClientRemoved(cid, stimulus_id=f"client-removed-{cid}"))
        # Second phase: the workers learn the task ids the state machine assigned.
        for w, d in per_worker.items():
            p = self.workers.get(w)
            if p is not None:
                self.send(p, {"op": "scatter-ids",
                               "ids": [(k, self.state.id_of(k)) for k in d]})
        return nbytes

    async def rpc_run(self, peer, func, workers=None):
        targets = [w for w in (workers or list(self.workers)) if w in self.workers]

        async def one(w):
            try:
                r = await self._worker_request(w, {"op": "run", "func": func})
                return w, [r["status"], r.get("result")]
            except Exception as e:
                return w, ["error", serialize_obj(e)]

        return dict(await asyncio.gather(*[one(w) for w in targets]))

    async def rpc_run_on_scheduler(self, peer, func):
        return await run_user_function(func, self, ("scheduler", "dask_scheduler"))

    async def rpc_restart(self, peer, timeout=60):
        """Restart every worker through its nanny. Returns the number of workers to expect."""
        n = len(self.workers)
        clients = list(self.clients)
        # Forget everything: all futures of all clients are cancelled.
        keys = list(self.state.tasks)
        for c in clients + [FIRE_AND_FORGET]:
            self._handle(Cancel(c, keys, force=True, stimulus_id="restart"))
        self._tell_extensions("restarted")              # the keys they held are cancelled too
        if self.plugins:
            self._tell_plugins("restart", self)
        for c in clients:
            self.send(self.clients[c], key_cancelled(keys, "the cluster was restarted"))
        nannies = [self.nannies[w] for w in list(self.workers) if w in self.nannies]
        without = [w for w in self.workers if w not in self.nannies]
        for w in without:
            logger.warning("worker %s has no nanny and cannot be restarted; closing it", w)
            self.send(self.workers[w], {"op": "close", "reason": "restart"})
            n -= 1

        async def restart(nanny):
            fut = asyncio.get_running_loop().create_future()
            nanny.replies["restart"] = fut
            self.send(nanny, {"op": "restart-worker"})
            try:
                await asyncio.wait_for(fut, timeout)
            except (asyncio.TimeoutError, CommClosedError) as e:
                logger.warning("nanny for %s did not restart its worker: %s", nanny.id, e)

        await asyncio.gather(*[restart(n_) for n_ in nannies])
        return n

    async def rpc_shutdown(self, peer):
        self._spawn(self.close(reason="shutdown requested by a client"))
        return None

    async def rpc_retire_workers(self, peer, workers=None, n=0):
        """Gracefully retire workers: their unique data moves elsewhere first.

        A requested worker that cannot hand its data over (for instance the last
        one) is closed anyway; what it held is recomputed if still wanted.
        """
        self._handle(RetireWorkers(workers, n, stimulus_id="retire-workers"))
        retiring = list(self.state.retiring_workers())
        extra = [w for w in (workers or ()) if w in self.workers and w not in retiring]
        await self._finish_retirement(retiring + extra)
        return retiring + extra

    async def rpc_adaptive_target(self, peer, target_duration=5.0):
        return self.state.adaptive_target(target_duration)

    async def rpc_story(self, peer, keys):
        return [list(map(str, e)) for e in self.state.story(*keys)]

    async def _finish_retirement(self, workers, timeout=60):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = [w for w in workers if w in self.workers]
        while pending and loop.time() < deadline:
            pending = [w for w in pending if w in self.workers and not self.state.can_close(w)]
            if pending:
                await asyncio.sleep(0.05)
        for w in workers:
            peer = self.workers.get(w)
            if peer is not None:
                peer.closing = True
                self.send(peer, {"op": "close", "reason": "retired"})
                nanny = self.nannies.get(w)
                if nanny is not None:
                    self.send(nanny, {"op": "close"})


def write_scheduler_file(path, address):
    """Write {"address": ...} atomically, so readers never see a partial file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"address": address, "pid": os.getpid(), "type": "Scheduler"}, f)
    os.replace(tmp, path)
