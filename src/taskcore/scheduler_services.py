"""What the scheduler does for clients beyond running tasks: actors' bookkeeping,
structured events, plugins on every member, task metadata, and moving data between
workers (replicate, rebalance).

`SchedulerServices` is a mixin of `Scheduler`, like `SchedulerDiagnostics`: its
`rpc_<name>(peer, **args)` methods answer clients like the Scheduler's own. Nothing
here is on the hot path; it runs on the scheduler's event loop, only on request (and
at worker removal for actors). Plugins travel pickled and are never unpickled here,
except scheduler plugins, which run here (taskcore/plugins.py).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

from taskcore.core.scheduler_state import Cancel
from taskcore.core.serialize import Serialized, serialize_obj
from taskcore.errors import CommClosedError

logger = logging.getLogger("taskcore.scheduler")


class SchedulerServices:
    """Mixed into Scheduler; uses its `state`, `workers`, `nannies`, `clients`, `send`,
    `_handle`, `_worker_request`, `_to_worker`, `plugins` and the rest set up there."""

    # -- actors (taskcore/actors.py) -------------------------------------------------------------
    def rpc_actor_submitted(self, peer, keys):
        if len(self.actor_keys) > 10_000:            # bounded: forget released actors
            self.actor_keys = {k for k in self.actor_keys if self.state.get_task(k) is not None}
        self.actor_keys.update(keys)

    def _fail_actors_of(self, addr):
        """Before worker `addr` is removed: each actor only it holds errs for the clients
        that want it, who then let go of it, so the state machine does not run it again."""
        from taskcore.actors import ActorLostError

        lost = []
        for k in list(self.actor_keys):
            ts = self.state.get_task(k)
            if ts is None:
                self.actor_keys.discard(k)           # released: forget it here too
            elif ts.state_name == "memory" and ts.who_has_addresses == [addr]:
                lost.append((k, ts.wanted_by))
        for k, clients in lost:
            self.actor_keys.discard(k)
            exc = serialize_obj(ActorLostError(f"Worker holding Actor was lost: {k!r} "
                                               f"(worker {addr})"))
            for cid in clients:
                p = self.clients.get(cid)
                if p is not None:
                    self.send(p, {"op": "task-erred", "key": k, "exception": exc,
                                  "traceback": None})
            for cid in clients:
                self._handle(Cancel(cid, [k], force=False, stimulus_id=f"actor-lost-{addr}"))

    # -- structured events -------------------------------------------------------------------
    def rpc_log_event(self, peer, topic, msg):
        """Record `msg` under `topic` (a str, or a list of them) and send it to the clients
        subscribed to the topic. The last 100,000 per topic are kept."""
        import collections

        topics = [topic] if isinstance(topic, str) else list(topic or ())
        if not topics or not all(isinstance(t, str) for t in topics):
            raise TypeError(f"an event's topic is a str or a list of str, got {topic!r}")
        event = (time.time(), msg)
        for t in topics:
            log = self.events.get(t)
            if log is None:
                log = self.events[t] = collections.deque(maxlen=100_000)
            log.append(event)
            for cid in self.event_subscribers.get(t, ()):
                p = self.clients.get(cid)
                if p is not None:
                    self.send(p, {"op": "event", "topic": t, "event": event})

    def rpc_get_events(self, peer, topic=None):
        if topic is not None:
            return list(self.events.get(topic, ()))
        return {t: list(v) for t, v in self.events.items()}

    def rpc_subscribe_topic(self, peer, topic, client=None):
        self.event_subscribers.setdefault(topic, set()).add(client or peer.id)

    def rpc_unsubscribe_topic(self, peer, topic, client=None):
        subscribers = self.event_subscribers.get(topic)
        if subscribers is not None:
            subscribers.discard(client or peer.id)
            if not subscribers:
                del self.event_subscribers[topic]

    def rpc_processing(self, peer, workers=None):
        return self.state.processing(workers)

    def rpc_nbytes(self, peer, keys=None, summary=True):
        """{key: bytes} of keys in memory (all by default); `summary`: per key prefix."""
        out = {}
        for k in (self.state.who_has(keys) if keys is not None else self.state.who_has()):
            ts = self.state.get_task(k)
            if ts is None or ts.state_name != "memory":
                continue
            if summary:
                out[ts.prefix_name] = out.get(ts.prefix_name, 0) + max(int(ts.nbytes), 0)
            else:
                out[k] = max(int(ts.nbytes), 0)
        return out

    async def rpc_restart_workers(self, peer, workers, timeout=60):
        """Restart these workers through their nannies (their results are lost and
        recomputed when wanted). {address: "OK" or why not}."""
        async def one(addr):
            nanny = self.nannies.get(addr)
            if nanny is None:
                return addr, f"worker {addr} has no nanny: it cannot be restarted"
            fut = asyncio.get_running_loop().create_future()
            nanny.replies["restart"] = fut
            self.send(nanny, {"op": "restart-worker", "reason": "client.restart_workers"})
            try:
                reply = await asyncio.wait_for(fut, timeout)
            except (asyncio.TimeoutError, CommClosedError) as e:
                return addr, f"the nanny of {addr} did not restart it: {e!r}"
            return addr, "OK" if not reply.get("error") else reply["error"]

        return dict(await asyncio.gather(*[one(w) for w in workers]))

    # -- plugins (taskcore/plugins.py) -------------------------------------------------------------
    async def rpc_register_scheduler_plugin(self, peer, plugin, name, idempotent=False):
        from taskcore.plugins import call_hook, update_scheduler_hook

        if idempotent and name in self.plugins:
            return {"status": "OK", "skipped": True}
        obj = plugin.deserialize() if isinstance(plugin, Serialized) else plugin
        old = self.plugins.pop(name, None)
        if old is not None:
            await call_hook(old.close)
        if hasattr(obj, "start"):
            await call_hook(obj.start, self)
        self.plugins[name] = obj
        update_scheduler_hook(self)
        return {"status": "OK"}

    async def rpc_unregister_scheduler_plugin(self, peer, name):
        from taskcore.plugins import call_hook, update_scheduler_hook

        plugin = self.plugins.pop(name, None)
        if plugin is None:
            raise ValueError(f"could not find a scheduler plugin named {name!r}")
        update_scheduler_hook(self)
        if hasattr(plugin, "close"):
            await call_hook(plugin.close)
        return {"status": "OK"}

    async def rpc_register_worker_plugin(self, peer, plugin, name, idempotent=False):
        """Keep `plugin` (pickled) for workers that register later; set it up on every
        worker now. {worker: {"status": "OK"} or {"status": "error", ...}}."""
        if idempotent and name in self.worker_plugins:
            return {}
        self.worker_plugins[name] = plugin
        return await self._to_members(list(self.workers), {"op": "plugin-add", "name": name,
                                                           "plugin": plugin})

    async def rpc_unregister_worker_plugin(self, peer, name):
        if self.worker_plugins.pop(name, None) is None:
            raise ValueError(f"could not find a worker plugin named {name!r}")
        return await self._to_members(list(self.workers), {"op": "plugin-remove", "name": name})

    async def rpc_register_nanny_plugin(self, peer, plugin, name, idempotent=False):
        if idempotent and name in self.nanny_plugins:
            return {}
        self.nanny_plugins[name] = plugin
        return await self._to_members(list(self.nannies), {"op": "plugin-add", "name": name,
                                                           "plugin": plugin}, nanny=True)

    async def rpc_unregister_nanny_plugin(self, peer, name):
        if self.nanny_plugins.pop(name, None) is None:
            raise ValueError(f"could not find a nanny plugin named {name!r}")
        return await self._to_members(list(self.nannies), {"op": "plugin-remove", "name": name},
                                      nanny=True)

    async def _nanny_plugins_to(self, peer, timeout=300):
        """Every NannyPlugin to a nanny that connected: set up in order, then one restart
        of its worker if any of them asks for restarts (not one per plugin)."""
        restart = False
        for name, plugin in list(self.nanny_plugins.items()):
            try:
                r = await self._nanny_request(peer, {"op": "plugin-add", "name": name,
                                                     "plugin": plugin, "restart": False},
                                              timeout)
                restart = restart or bool((r.get("result") or {}).get("restart"))
            except Exception as e:
                logger.warning("nanny plugin %r failed on the nanny of %s: %r", name, peer.id, e)
        if restart and peer.id in self.nannies:
            self.send(peer, {"op": "restart-worker", "reason": "nanny plugins set up"})

    async def _to_members(self, addresses, msg, nanny=False, timeout=300):
        """Send `msg` to each worker (or each worker's nanny) and collect the `result`
        of their replies: {address: result}; one that left meanwhile answers an error."""
        async def one(addr):
            try:
                if nanny:
                    peer = self.nannies.get(addr)
                    if peer is None:
                        raise CommClosedError(f"no nanny for {addr}")
                    reply = await self._nanny_request(peer, dict(msg), timeout)
                else:
                    reply = await self._worker_request(addr, dict(msg), timeout)
                return addr, reply.get("result") or {"status": "OK"}
            except Exception as e:
                from taskcore.plugins import outcome

                return addr, outcome(e)

        return dict(await asyncio.gather(*[one(a) for a in addresses]))

    # -- metadata ---------------------------------------------------------------------------------
    def rpc_set_metadata(self, peer, keys, value):
        """dask's nested task metadata: keys is a path into one dict."""
        d = self.task_metadata
        for k in keys[:-1]:
            if not isinstance(d.get(k), dict):
                d[k] = {}
            d = d[k]
        d[keys[-1]] = value

    def rpc_get_metadata(self, peer, keys):
        """{"found": bool, "value": ...} at the path `keys`."""
        d = self.task_metadata
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return {"found": False}
            d = d[k]
        return {"found": True, "value": d}

    # -- moving data: replicate, rebalance ---------------------------------------------------------
    def _running_workers(self, workers=None):
        info = self.state.worker_info()
        return [w for w in (workers if workers is not None else info)
                if w in info and info[w]["status"] == "running" and w in self.workers], info

    def _nbytes(self, key):
        ts = self.state.get_task(key)
        return max(int(ts.nbytes), 0) if ts is not None else 0

    def _acquire(self, plan):
        """plan: {recipient: [(key, [holders])]} -> acquire-replicas to each recipient
        (the worker's state machine fetches them from the holders, then reports add-keys)."""
        for w, items in plan.items():
            entries = []
            for k, holders in items:
                tid = self.state.id_of(k)
                if tid is not None:
                    entries.append((tid, k, self._nbytes(k), list(holders)))
            if entries:
                self._to_worker(w, {"op": "acquire-replicas", "who_has": entries})

    async def _until_held(self, wanted, timeout):
        """Wait until each (key, worker) pair of `wanted` is a replica the scheduler
        knows (or the key or worker is gone); the pairs held."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = set(wanted)
        held = set()
        while pending:
            who_has = self.state.who_has(list({k for k, _ in pending}))
            for k, w in list(pending):
                if w in (who_has.get(k) or ()):
                    held.add((k, w))
                    pending.discard((k, w))
                elif w not in self.workers or self.state.get_task(k) is None:
                    pending.discard((k, w))
            if pending:
                if loop.time() > deadline:
                    break
                await asyncio.sleep(0.02)
        return held

    def _remove_replicas(self, removals):
        """removals: {worker: [key]}: each drops its copy, if another holder keeps one
        (the worker reports release-worker-data, and the scheduler forgets the replica)."""
        for w, keys in removals.items():
            ids = []
            who_has = self.state.who_has(keys)
            for k in keys:
                if len([h for h in who_has.get(k, ()) if h != w]) >= 1:
                    tid = self.state.id_of(k)
                    if tid is not None:
                        ids.append(tid)
            if ids:
                self._to_worker(w, {"op": "remove-replicas", "ids": ids})

    async def rpc_replicate(self, peer, keys, n=None, workers=None, timeout=60):
        """Copy each key (in memory) to `n` of `workers` (all running workers by default),
        the least loaded first; copies past `n` among them are dropped. Returns the
        number of copies made."""
        candidates, info = self._running_workers(workers)
        if not candidates:
            raise ValueError(f"no running workers among {workers}")
        n = len(candidates) if n is None else int(n)
        if n < 1:
            raise ValueError(f"replicate needs n >= 1, got {n}")
        n = min(n, len(candidates))
        load = {w: info[w]["nbytes"] for w in candidates}
        plan, removals, wanted = {}, {}, []
        who_has = self.state.who_has(keys)
        for k in keys:
            holders = [h for h in who_has.get(k) or () if h in self.workers]
            if not holders:
                continue                      # not in memory: nothing to copy
            inside = [h for h in holders if h in load]
            nb = self._nbytes(k)
            if len(inside) < n:
                for w in sorted((w for w in candidates if w not in inside),
                                key=load.__getitem__)[:n - len(inside)]:
                    plan.setdefault(w, []).append((k, holders))
                    load[w] += nb
                    wanted.append((k, w))
            elif len(inside) > n:
                for w in sorted(inside, key=load.__getitem__, reverse=True)[:len(inside) - n]:
                    removals.setdefault(w, []).append(k)
                    load[w] -= nb
        self._acquire(plan)
        held = await self._until_held(wanted, timeout)
        self._remove_replicas(removals)
        return len(held)

    async def rpc_rebalance(self, peer, keys=None, workers=None, timeout=60):
        """Even out the managed memory of `workers` (all running ones by default) by
        moving `keys` (all in memory by default): from the workers above the mean to
        those below, largest keys first, each copy made before the sender drops its
        own, so no key is ever without a holder. {"moved": n, "failed": m}."""
        candidates, info = self._running_workers(workers)
        if len(candidates) < 2:
            return {"moved": 0, "failed": 0}
        who_has = self.state.who_has(keys)
        load = {w: 0 for w in candidates}
        held = {w: [] for w in candidates}
        for k, holders in who_has.items():
            nb = self._nbytes(k)
            for h in holders:
                if h in load:
                    load[h] += nb
                    held[h].append((nb, k))
        mean = sum(load.values()) / len(load)
        plan, moves = {}, []
        for s in sorted(candidates, key=load.__getitem__, reverse=True):
            if load[s] <= mean:
                break
            for nb, k in sorted(held[s], reverse=True):
                if load[s] <= mean or nb <= 0:
                    break
                holders = who_has.get(k) or ()
                options = [w for w in candidates if w not in holders and w != s
                           and load[w] + nb <= mean + nb / 2 and load[w] + nb < load[s]]
                if not options:
                    continue
                r = min(options, key=load.__getitem__)
                plan.setdefault(r, []).append((k, [s]))
                moves.append((k, s, r))
                load[r] += nb
                load[s] -= nb
        self._acquire(plan)
        got = await self._until_held([(k, r) for k, _, r in moves], timeout)
        removals = {}
        for k, s, r in moves:
            if (k, r) in got:
                removals.setdefault(s, []).append(k)
        self._remove_replicas(removals)
        return {"moved": len(got), "failed": len(moves) - len(got)}
