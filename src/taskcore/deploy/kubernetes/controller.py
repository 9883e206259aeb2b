"""The controller: watch, compare (reconcile.plan), act. One piece of code, two homes.

`Controller` runs in the operator (`core-kube-operator`, every TaskcoreCluster
in a namespace or in all of them, skipping the ones a client reconciles
itself) or embedded in a `KubeCluster`'s process (its one cluster only, when
no operator is installed).

Theory of operation:
- Two watches (TaskcoreClusters; pods labelled managed-by=taskcore), each a
  list followed by a watch from the list's resourceVersion, resumed from the
  last event's version, and relisted on 410 Gone. An event marks its cluster
  dirty; a resync marks all dirty every `resync` seconds, as a safety net.
- One task per cluster takes dirty marks and reconciles: read the cluster and
  its children fresh, ask the scheduler for its workers (one RPC), compute
  `plan`, carry out the actions. Per-cluster tasks mean one cluster is never
  reconciled twice at once, and a slow or failing cluster does not hold up
  the others. Failures back off exponentially (up to 30 s) per cluster.
- Every write that could race (spec replicas from adaptive scaling; status)
  is a PUT with the resourceVersion it was computed from; a 409 Conflict
  means "someone else moved first": reread and recompute.
- Retirement runs in the background: the pods are marked retiring (so the
  plan neither counts nor replaces them), the scheduler retires the workers
  (their data moves), then the pods are deleted.
- Adaptive groups: every `interval` the scheduler's target is split among
  the groups (`split_target`) and each group's `AdaptiveCounter` decides its
  replicas, written to the spec like a manual scale.
- Credentials: a cluster whose spec.security names a Secret runs over tls://
  (and/or with a token); the controller talks to its scheduler with the
  credentials read from that Secret (credentials.SecretCredentials: the
  operator needs `get` on secrets), or with the Security `security_for` gives
  (the embedded controller: the KubeCluster's own).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import weakref

from taskcore.deploy.cluster import scheduler_rpc
from taskcore.deploy.kubernetes import resources as r
from taskcore.deploy.kubernetes.api import ApiError, KubeAPI
from taskcore.deploy.kubernetes.credentials import SecretCredentials
from taskcore.deploy.kubernetes.reconcile import (AdaptiveCounter, Create, Delete, DeleteCluster,
                                                  Observed, Retire, SetStatus, plan,
                                                  scheduler_address_of, split_target)

logger = logging.getLogger("taskcore.deploy.kubernetes")

__all__ = ["Controller", "scheduler_view"]


# In the scheduler's process: when each scheduler was last seen busy by scheduler_view.
_busy_seen: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def scheduler_view(scheduler, target_duration: float = 5.0) -> dict:
    """Runs inside the scheduler: its workers by name, whether it is busy, how long it has
    been idle, the adaptive target.

    The idle time is measured here, on the scheduler's clock, from the later of its last
    client arriving or leaving (`_last_activity`) and the last view that found it busy. So a
    view the controller could not get (an RPC lost under load, a controller restarted, an
    operator that took over) does not restart the count, and a client that came and went
    between two views still counts."""
    state = scheduler.state
    workers = {}
    for address, info in state.worker_info().items():
        workers[str(info.get("name"))] = {"address": address,
                                          "processing": int(info.get("processing") or 0),
                                          "nbytes": int(info.get("nbytes") or 0)}
    busy = bool(scheduler.clients) or any(state.processing().values())
    now = time.monotonic()
    if busy:
        _busy_seen[scheduler] = now
    since = max(_busy_seen.get(scheduler, 0.0), float(getattr(scheduler, "_last_activity", 0.0)))
    return {"workers": workers, "busy": busy, "idle_for": 0.0 if busy else now - since,
            "clients": len(scheduler.clients),
            "target": int(state.adaptive_target(float(target_duration)))}


class Controller:
    """Reconciles TaskcoreClusters; see the module doc.

    `namespace=None` watches all namespaces. `only=<name>` reconciles one cluster
    (the embedded mode; the operator takes all that are not labelled embedded).
    `async address_for(cluster) -> str | None` overrides where the scheduler is reached
    from here (a port-forward, for a client outside the cluster), and
    `async security_for(cluster) -> Security | None` the credentials it is reached with
    (default: read from the Secret that the resource's spec.security names).
    """

    def __init__(self, api: KubeAPI, namespace: str | None = None, only: str | None = None,
                 identity: str | None = None, address_for=None, resync: float = 5.0,
                 retire_timeout: float = 60.0, security_for=None):
        self.api = api
        self.namespace = namespace
        self.only = only
        self.identity = identity or f"{'embedded' if only else 'operator'}/" \
                                    f"{socket.gethostname()}/{os.getpid()}"
        self.address_for = address_for
        self.security_for = security_for
        self._credentials = SecretCredentials(api)
        self.resync = resync
        self.retire_timeout = retire_timeout
        self._dirty: dict = {}        # (ns, name) -> asyncio.Event
        self._workers: dict = {}      # (ns, name) -> task
        self._retiring: dict = {}     # (ns, name) -> set of pod names
        self._idle_since: dict = {}   # (ns, name) -> first idle view (older schedulers only)
        self._last_view: dict = {}    # (ns, name) -> the last scheduler view, for diagnostics
        self._counters: dict = {}     # (ns, name, group) -> AdaptiveCounter
        self._last_adapt: dict = {}
        self._next_tick: dict = {}    # (ns, name) -> seconds until its adaptive groups tick
        self._tasks: set = set()
        self._stopped = asyncio.Event()
        self.reconciles = 0
        self.errors = 0

    # -- lifetime -----------------------------------------------------------------------------
    async def start(self):
        for coro in (self._watch_clusters(), self._watch_pods(), self._resync_loop()):
            self._spawn(coro)
        return self

    async def stop(self):
        self._stopped.set()
        tasks = list(self._tasks) + list(self._workers.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._credentials.clear()

    def _spawn(self, coro):
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _mine(self, obj) -> bool:
        name = obj["metadata"]["name"]
        labels = obj["metadata"].get("labels") or {}
        if self.only is not None:
            return name == self.only
        return labels.get(r.LABEL_CONTROLLER) != "embedded"

    def mark(self, ns: str, name: str):
        key = (ns, name)
        ev = self._dirty.get(key)
        if ev is None:
            ev = self._dirty[key] = asyncio.Event()
        ev.set()
        if key not in self._workers or self._workers[key].done():
            self._workers[key] = asyncio.ensure_future(self._cluster_worker(key))

    # -- watches ----------------------------------------------------------------------------------
    async def _watch(self, kind, on_event, label_selector=None):
        backoff = 1.0
        rv = None
        while not self._stopped.is_set():
            try:
                if rv is None:
                    if kind == r.KIND:
                        listing = await self.api.list_clusters(self.namespace, label_selector)
                    else:
                        listing = await self.api.pod_listing(self.namespace, label_selector)
                    rv = listing["metadata"]["resourceVersion"]
                    for obj in listing["items"]:
                        on_event("ADDED", obj)
                async for typ, obj in self.api.watch(kind, self.namespace, rv, label_selector):
                    if typ == "ERROR":
                        raise ApiError(int(obj.get("code", 500)), obj.get("reason", ""),
                                       obj.get("message", ""))
                    rv = obj["metadata"].get("resourceVersion") or rv
                    on_event(typ, obj)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.status == 410:
                    rv = None          # too old: relist
                    continue
                logger.warning("watch of %s failed: %s; retrying in %.0f s", kind, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception as e:
                logger.warning("watch of %s failed: %r; retrying in %.0f s", kind, e, backoff)
                rv = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _watch_clusters(self):
        def on_event(typ, obj):
            ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
            if typ == "DELETED":
                self._forget((ns, name))
            elif self._mine(obj):
                self.mark(ns, name)
        await self._watch(r.KIND, on_event)

    async def _watch_pods(self):
        selector = f"{r.LABEL_MANAGED}={r.MANAGED_BY}"
        if self.only is not None:
            selector += f",{r.LABEL_CLUSTER}={self.only}"

        def on_event(typ, obj):
            cluster = (obj["metadata"].get("labels") or {}).get(r.LABEL_CLUSTER)
            key = (obj["metadata"]["namespace"], cluster)
            if cluster and key in self._dirty:
                self.mark(*key)
        await self._watch("Pod", on_event, selector)

    async def _resync_loop(self):
        while not self._stopped.is_set():
            await asyncio.sleep(self.resync)
            for key in list(self._dirty):
                self.mark(*key)

    def _forget(self, key):
        self._dirty.pop(key, None)
        task = self._workers.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._retiring.pop(key, None)
        self._idle_since.pop(key, None)
        self._last_view.pop(key, None)
        self._credentials.drop(*key)
        for k in [k for k in self._counters if k[:2] == key]:
            del self._counters[k]

    # -- one cluster ---------------------------------------------------------------------------
    async def _cluster_worker(self, key):
        backoff = 0.5
        ev = self._dirty[key]
        while not self._stopped.is_set():
            await ev.wait()
            ev.clear()
            try:
                gone = await self.reconcile(*key)
                backoff = 0.5
                if gone:
                    self._forget(key)
                    return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.errors += 1
                logger.warning("reconciling %s/%s failed: %r; retrying in %.1f s", *key, e,
                               backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                ev.set()
                continue
            # Adaptive groups tick on their own clock: come back at the next interval.
            interval = self._next_tick.pop(key, None)
            if interval is not None:
                self._spawn(self._mark_later(key, interval))

    async def _mark_later(self, key, delay):
        await asyncio.sleep(delay)
        if key in self._dirty:
            self.mark(*key)

    async def reconcile(self, ns: str, name: str) -> bool:
        """One pass over one cluster. Returns True when the cluster no longer exists."""
        self.reconciles += 1
        try:
            cluster = await self.api.get_cluster(ns, name)
        except ApiError as e:
            if e.status == 404:
                return True
            raise
        if not self._mine(cluster):
            return True
        deployment, service, pods = await self.api.children(ns, name)
        key = (ns, name)
        view = await self._scheduler_view(cluster, service, key)
        idle_for = self._idle_for(key, view)
        if view is not None:
            cluster = await self._adapt(ns, cluster, view)
        obs = Observed(cluster=cluster, deployment=deployment, service=service, pods=pods,
                       scheduler_workers=None if view is None else view["workers"],
                       retiring=frozenset(self._retiring.get(key, ())), idle_for=idle_for,
                       controller=self.identity)
        for action in plan(obs):
            await self._act(ns, cluster, action, view)
            if isinstance(action, DeleteCluster):
                return True
        return False

    def _idle_for(self, key, view) -> float:
        """Seconds the scheduler has been idle: its own count (scheduler_view). Unknown (no
        view) counts as 0 for this pass, without restarting anything. A scheduler that does
        not count (an older taskcore in the scheduler's image) is timed here, between views
        that find it idle."""
        if view is None:
            return 0.0
        if view.get("idle_for") is not None:
            return float(view["idle_for"])
        if view["busy"]:
            self._idle_since.pop(key, None)
            return 0.0
        return time.monotonic() - self._idle_since.setdefault(key, time.monotonic())

    def last_view(self, ns: str, name: str) -> dict | None:
        """The last scheduler view of a cluster (`at`: time.time(), and `view` or `error`):
        what the controller knew, for diagnostics."""
        return self._last_view.get((ns, name))

    async def _address(self, cluster, service) -> str | None:
        """The scheduler's address as seen from this process."""
        if self.address_for is not None:
            return await self.address_for(cluster)
        return scheduler_address_of(service, r.comm_protocol(cluster))

    async def _security(self, cluster):
        """The credentials the scheduler is reached with from here (None: plain tcp://)."""
        if self.security_for is not None:
            return await self.security_for(cluster)
        return await self._credentials.security_for(cluster)

    async def _scheduler_view(self, cluster, service, key) -> dict | None:
        view = error = None
        try:
            view = await self._ask_scheduler(cluster, service)
        except Exception as e:
            error = repr(e)
            logger.debug("scheduler of %s not reachable: %r", cluster["metadata"]["name"], e)
            self._credentials.drop(*key)      # read the Secret again next time
        self._last_view[key] = {"at": time.time(), "view": view, "error": error}
        return view

    async def _ask_scheduler(self, cluster, service) -> dict | None:
        address = await self._address(cluster, service)
        if address is None or (cluster.get("status") or {}).get("phase") != "Running":
            return None
        from taskcore.core.serialize import Serialized, serialize_obj

        durations = [float(g["adapt"].get("targetDuration", 5)) for g in
                     cluster["spec"].get("workerGroups") or [] if g.get("adapt")]
        status, value = await scheduler_rpc(
            address, "run_on_scheduler",
            {"func": serialize_obj((scheduler_view, (), {"target_duration": min(
                durations, default=5.0)}))}, security=await self._security(cluster), timeout=5)
        if isinstance(value, Serialized):
            value = value.deserialize()
        if status != "ok":
            raise RuntimeError(f"scheduler_view failed on the scheduler: {value!r}")
        return value

    async def _adapt(self, ns, cluster, view) -> dict:
        groups = cluster["spec"].get("workerGroups") or []
        adaptive = [g for g in groups if g.get("adapt")]
        if not adaptive:
            return cluster
        name = cluster["metadata"]["name"]
        key = (ns, name)
        interval = min(float(g["adapt"].get("interval", 1.0)) for g in adaptive)
        self._next_tick[key] = interval
        now = time.monotonic()
        if now - self._last_adapt.get(key, 0.0) < interval * 0.9:
            return cluster
        self._last_adapt[key] = now
        desired = split_target(groups, view["target"])
        changes = {}
        for g in adaptive:
            counter = self._counters.setdefault((ns, name, g["name"]), AdaptiveCounter())
            new = counter.step(desired[g["name"]], int(g.get("replicas", 0)),
                               int(g["adapt"].get("waitCount", 3)))
            if new is not None:
                changes[g["name"]] = new
        if not changes:
            return cluster
        logger.info("%s/%s: adaptive scaling %s", ns, name, changes)
        return await set_replicas(self.api, ns, name, changes, keep_adapt=True, current=cluster)

    async def _act(self, ns, cluster, action, view):
        name = cluster["metadata"]["name"]
        if isinstance(action, Create):
            await self.api.create(ns, action.kind, action.manifest)
        elif isinstance(action, Delete):
            logger.info("%s/%s: deleting %s %s: %s", ns, name, action.kind, action.name,
                        action.reason)
            await self.api.delete(ns, action.kind, action.name)
        elif isinstance(action, Retire):
            key = (ns, name)
            self._retiring.setdefault(key, set()).update(action.pods)
            self._spawn(self._retire(key, action.pods, view))
        elif isinstance(action, SetStatus):
            body = dict(cluster, status=dict(cluster.get("status") or {}, **action.status))
            try:
                await self.api.replace_cluster_status(ns, body)
            except ApiError as e:
                if e.status != 409:
                    raise
                self.mark(ns, name)   # changed under us: recompute from the new version
        elif isinstance(action, DeleteCluster):
            logger.info("%s/%s: deleting the cluster: %s", ns, name, action.reason)
            await self.api.delete_cluster(ns, name)

    async def _retire(self, key, pods, view):
        ns, name = key
        try:
            cluster = await self.api.get_cluster(ns, name)
            _, service, _ = await self.api.children(ns, name)
            address = await self._address(cluster, service)
            known = (view or {}).get("workers") or {}
            addresses = [known[p]["address"] for p in pods if p in known]
            if address and addresses:
                logger.info("%s/%s: retiring %s", ns, name, list(pods))
                await scheduler_rpc(address, "retire_workers", {"workers": addresses},
                                    security=await self._security(cluster),
                                    timeout=self.retire_timeout)
        except Exception as e:
            # Deleting anyway loses nothing for good: the scheduler recomputes what it lost.
            logger.warning("%s/%s: retiring %s failed (deleting them anyway): %r", ns, name,
                           list(pods), e)
        finally:
            try:
                for p in pods:
                    await self.api.delete(ns, "Pod", p)
            finally:
                self._retiring.get(key, set()).difference_update(pods)
                if key in self._dirty:
                    self.mark(*key)


async def set_replicas(api: KubeAPI, ns: str, name: str, changes: dict, keep_adapt: bool,
                       current: dict | None = None, adapt: dict | None = None) -> dict:
    """Set `replicas` of worker groups ({group: n}) with a resourceVersion-checked PUT,
    rereading on conflict. A manual scale (`keep_adapt=False`) also ends the group's
    adaptive mode; `adapt={group: bounds}` sets bounds instead."""
    def edit(cluster):
        groups = cluster["spec"].get("workerGroups") or []
        names = {g["name"] for g in groups}
        unknown = (set(changes) | set(adapt or {})) - names
        if unknown:
            raise ValueError(f"no worker group {sorted(unknown)} in {name} "
                             f"(groups: {sorted(names)})")
        for g in groups:
            if g["name"] in changes:
                g["replicas"] = int(changes[g["name"]])
                if not keep_adapt:
                    g.pop("adapt", None)
            if adapt and g["name"] in adapt:
                if adapt[g["name"]] is None:
                    g.pop("adapt", None)
                else:
                    g["adapt"] = adapt[g["name"]]

    out = await api.update_cluster(ns, name, edit, current=current)
    if out is None:
        raise ApiError(404, "NotFound", f"{r.KIND} {ns}/{name} does not exist")
    return out
