"""The control loops of the Kubernetes stand-in: what kube-scheduler, the kubelet,
kube-controller-manager and kube-proxy do, reduced to what taskcore's tests need.

Each controller reads the store's events from its own queue (an informer) and writes
through the registry, on the stand-in's event loop:

- `Kubelet`: binds new pods to the one node ("standin-node", also a Node object), gives
  each a pod IP from 127.2.0.0/16 (Linux routes all of 127/8 to loopback, so a process
  binds it without setup), runs it with a `PodRunner` (kubelet.py) and writes the status
  it reports; a pod with a deletionTimestamp is terminated with its grace period and then
  removed; a pod removed at once (grace 0) has its processes killed afterwards. Secret
  volumes and secretKeyRef variables are read from the store (kubelet.py says how).
  With `gpus=N` it also plays the NVIDIA device plugin: the node has N `nvidia.com/gpu`,
  a pod whose limits ask for more than are free stays Pending (PodScheduled False,
  Unschedulable, the scheduler's "Insufficient nvidia.com/gpu" message) until some are
  freed, and a bound pod's containers get its devices in CUDA_VISIBLE_DEVICES and
  NVIDIA_VISIBLE_DEVICES (the container runtime's isolation, which a local process lacks).
- `DeploymentController`: keeps `spec.replicas` pods of the current template. There is
  no ReplicaSet object: pods are owned by the Deployment itself (ownerReference with
  controller: true), named `{deployment}-{template hash}-{5 random}` and labelled
  `pod-template-hash` as ReplicaSet pods would be. Failed or succeeded pods are deleted
  and replaced; a template change replaces every pod at once (like strategy Recreate,
  whatever the strategy says). Status: replicas, updatedReplicas, readyReplicas,
  availableReplicas (minReadySeconds is ignored), observedGeneration, conditions.
- `GarbageCollector`: deleting an object deletes the objects whose ownerReferences name
  its uid (background propagation, cascading; `Orphan` removes those ownerReferences
  instead; `Foreground` is treated as background). An object created with owners that
  all do not exist is deleted too.
- `NamespaceController`: every namespace gets a "default" ServiceAccount and the
  "kube-root-ca.crt" ConfigMap; a terminating namespace has its contents deleted and then
  goes away.
- `ServiceController`: LoadBalancer services get `status.loadBalancer.ingress` (an IP from
  127.4.0.0/16) after about 0.2 s; Endpoints objects follow each selector's pods.
- `KubeProxy`: a TCP proxy for every service port, on clusterIP:port, 127.0.0.1:nodePort
  and the load balancer's ip:port, to the Ready endpoints in round robin (targetPort by
  number or by a container port's name). A service port without a Ready endpoint has no
  listener, so connections are refused (what iptables' REJECT looks like to a client);
  connections to a pod are closed when the pod object is removed. UDP is not proxied;
  sessionAffinity and externalTrafficPolicy are ignored.
"""
from __future__ import annotations

import abc
import asyncio
import copy
import functools
import hashlib
import ipaddress
import json
import logging
import os
import pathlib
import random

from .registry import DEPLOYMENTS, NAMESPACES, PODS, SERVICES, Registry
from .selectors import label_selector_object_matches
from .store import ApiError, Event, NotFound, now_rfc3339

GPU_RESOURCE = "nvidia.com/gpu"

log = logging.getLogger("taskcore.tests.standin.controllers")

NODE_NAME = "standin-node"
POD_NET = ipaddress.ip_network("127.2.0.0/16")
LB_NET = ipaddress.ip_network("127.4.0.0/16")
ENDPOINTS = ("", "endpoints")
SECRETS = ("", "secrets")


def _random_ip(net, taken) -> str:
    while True:
        ip = str(net[random.randrange(1, net.num_addresses - 1)])
        if ip not in taken:
            return ip


def _is_ready(pod: dict) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def _terminal(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


class Controller(abc.ABC):
    """An informer (a queue fed by the store) and a task that handles its events."""

    name = "controller"

    def __init__(self, registry: Registry):
        self.registry = registry
        self.store = registry.store
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.store.subscribe(self._queue.put_nowait)
        self._task = asyncio.create_task(self._loop(), name=f"standin {self.name}")

    async def stop(self) -> None:
        self.store.unsubscribe(self._queue.put_nowait)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        await self.resync()
        while True:
            events = [await self._queue.get()]
            while not self._queue.empty():
                events.append(self._queue.get_nowait())
            try:
                await self.handle(events)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("stand-in %s failed on a batch of events", self.name)

    async def resync(self) -> None:
        """Handle what exists when the controller starts."""

    @abc.abstractmethod
    async def handle(self, events: list[Event]) -> None:
        """React to a batch of store events."""


# ---------------------------------------------------------------------------------------------
# Kubelet (and scheduler)
# ---------------------------------------------------------------------------------------------

class Kubelet(Controller):
    name = "kubelet"

    def __init__(self, registry: Registry, *, runner_factory, base_env: dict,
                 incluster_env: dict, serviceaccount_root: pathlib.Path, token: str,
                 ca_pem: str, log_dir: pathlib.Path, image_pullable, backoff_base: float,
                 backoff_max: float, gpus: int = 0):
        super().__init__(registry)
        # The NVIDIA device plugin, emulated: the node advertises `gpus` of nvidia.com/gpu;
        # a pod is bound only when that many are free (else it stays Pending,
        # Unschedulable, with the scheduler's message), and its containers see only
        # their devices (CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES, as the NVIDIA
        # container runtime arranges). Devices are freed when the pod is gone.
        self.gpus = int(gpus)
        self.gpu_owner: dict[int, str] = {}            # device index -> pod uid
        self.runner_factory = runner_factory
        self.base_env = base_env
        self.incluster_env = incluster_env
        self.serviceaccount_root = serviceaccount_root
        self.token, self.ca_pem = token, ca_pem
        self.log_dir = log_dir
        self.image_pullable = image_pullable
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.runners: dict[str, object] = {}          # pod uid -> PodRunner
        self.pod_ips: dict[str, str] = {}
        self.names: dict[str, tuple[str, str]] = {}   # pod uid -> (namespace, name)
        self._terminations: dict[str, asyncio.Task] = {}
        self.stopping = False                         # the stand-in stops: start no pod

    # -- the interface the API server and the harness use --

    def runner(self, uid: str):
        return self.runners.get(uid)

    def runner_by_name(self, ns: str, name: str):
        pod = self.store.get(PODS, ns, name)
        if pod is None:
            raise NotFound(f'pods "{name}" not found')
        runner = self.runners.get(pod["metadata"]["uid"])
        if runner is None:
            raise LookupError(f"pod {ns}/{name} is not running on the stand-in node")
        return runner

    def pod_pids(self, namespace: str | None = None) -> dict[str, list[int]]:
        out = {}
        for uid, runner in self.runners.items():
            ns, name = self.names[uid]
            if namespace is None or ns == namespace:
                out[name] = runner.pids()
        return out

    # -- events --

    async def resync(self):
        self._register_node()
        for pod in self.store.list(PODS):
            await self._pod_changed(pod)

    async def handle(self, events):
        for ev in events:
            if ev.key != PODS:
                continue
            if ev.type == "DELETED":
                self._pod_removed(ev.obj)
            else:
                current = self.store.get(PODS, ev.namespace, ev.obj["metadata"]["name"])
                if current is not None and current["metadata"]["uid"] == ev.obj["metadata"]["uid"]:
                    await self._pod_changed(current)

    def _register_node(self):
        if self.store.exists(("", "nodes"), None, NODE_NAME):
            return
        cpus = str(os.cpu_count() or 1)
        try:
            mem_kib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
        except (ValueError, OSError):
            mem_kib = 0
        resources = {"cpu": cpus, "memory": f"{mem_kib}Ki", "pods": "110"}
        if self.gpus:
            resources[GPU_RESOURCE] = str(self.gpus)
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": NODE_NAME, "labels": {
                    "kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64"}},
                "spec": {}}
        rt = self.registry.rt(("", "nodes"))
        created = self.registry.create(rt, None, node)
        now = now_rfc3339()
        self.registry.write_status(rt.key, None, NODE_NAME, {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the stand-in kubelet is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": NODE_NAME}],
            "capacity": resources, "allocatable": resources,
            "nodeInfo": {"kubeletVersion": "v1.30.0-standin", "kubeProxyVersion":
                         "v1.30.0-standin", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "standin://1",
                         "osImage": "stand-in", "kernelVersion": os.uname().release,
                         "machineID": "", "systemUUID": "", "bootID": ""}},
            created["metadata"]["uid"])

    async def _pod_changed(self, pod: dict):
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        if not spec.get("nodeName"):
            if meta.get("deletionTimestamp"):
                return
            # The scheduler: one node; only GPUs are counted (the device plugin's resource).
            if not self._fits_gpus(pod):
                self._unschedulable(pod)
                return
            bound = copy.deepcopy(pod)
            bound["spec"]["nodeName"] = NODE_NAME
            status = bound.setdefault("status", {})
            conds = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
            status["conditions"] = conds + [{"type": "PodScheduled", "status": "True",
                                             "lastProbeTime": None,
                                             "lastTransitionTime": now_rfc3339()}]
            self.registry.put(PODS, bound)
            return
        if spec["nodeName"] != NODE_NAME:
            return
        if meta.get("deletionTimestamp"):
            if uid not in self._terminations:
                grace = meta.get("deletionGracePeriodSeconds")
                self._terminations[uid] = asyncio.create_task(
                    self._terminate(meta.get("namespace"), meta["name"], uid, grace))
            return
        if uid not in self.runners and not _terminal(pod) and not self.stopping:
            await self._start(pod)

    async def _start(self, pod: dict):
        meta = pod["metadata"]
        ns, name, uid = meta.get("namespace"), meta["name"], meta["uid"]
        ip = _random_ip(POD_NET, set(self.pod_ips.values()))
        env = self._pod_env(pod)
        try:
            devices = self._allocate_gpus(pod)
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = \
                    ",".join(map(str, devices))
            runner = self.runner_factory(
                pod, ip, node_name=NODE_NAME, host_ip="127.0.0.1", base_env=self.base_env,
                extra_env=env, log_dir=self.log_dir,
                on_status=functools.partial(self._on_status, ns, name, uid),
                image_pullable=self.image_pullable, backoff_base=self.backoff_base,
                backoff_max=self.backoff_max, secrets=self._secret)
        except Exception as e:
            # What the stand-in cannot run fails loudly rather than running differently.
            if not isinstance(e, (NotImplementedError, ValueError)):
                log.exception("stand-in kubelet: cannot run pod %s/%s", ns, name)
            status = dict(pod.get("status") or {})
            status.update(phase="Failed", reason="StandinUnsupported", message=str(e))
            self.registry.write_status(PODS, ns, name, status, uid)
            self._release_gpus(uid)
            return
        self.runners[uid] = runner
        self.pod_ips[uid] = ip
        self.names[uid] = (ns, name)
        await runner.start()

    def _secret(self, ns: str, name: str) -> dict | None:
        """What the kubelet reads for secret volumes and secretKeyRef (as the API stores
        it: `data` base64-encoded)."""
        return self.store.get(SECRETS, ns, name)

    def _on_status(self, ns, name, uid, status: dict):
        self.registry.write_status(PODS, ns, name, status, uid)

    async def _terminate(self, ns, name, uid, grace):
        try:
            runner = self.runners.get(uid)
            if runner is not None:
                await runner.terminate(grace)
            self.registry.remove_terminated_pod(ns, name, uid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stand-in kubelet: terminating pod %s/%s failed", ns, name)
        finally:
            self._terminations.pop(uid, None)

    # -- the emulated NVIDIA device plugin --

    @staticmethod
    def _gpu_request(pod: dict) -> int:
        total = 0
        for c in (pod.get("spec") or {}).get("containers") or []:
            limits = (c.get("resources") or {}).get("limits") or {}
            total += int(limits.get(GPU_RESOURCE, 0))
        return total

    def _free_gpus(self) -> list:
        return [i for i in range(self.gpus) if i not in self.gpu_owner]

    def _fits_gpus(self, pod: dict) -> bool:
        # Bound pods keep their devices until they are gone, so count the bound ones too.
        wanted = self._gpu_request(pod)
        if not wanted:
            return True
        held = sum(self._gpu_request(p) for p in self.store.list(PODS)
                   if (p.get("spec") or {}).get("nodeName") == NODE_NAME
                   and p["metadata"]["uid"] not in self.runners and not _terminal(p))
        return wanted <= len(self._free_gpus()) - held

    def _unschedulable(self, pod: dict):
        meta = pod["metadata"]
        status = dict(pod.get("status") or {})
        conds = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        message = (f"0/1 nodes are available: 1 Insufficient {GPU_RESOURCE}. preemption: "
                   f"0/1 nodes are available: 1 No preemption victims found for incoming pod.")
        if any(c.get("message") == message for c in status.get("conditions") or []):
            return
        status.update(phase="Pending", conditions=conds + [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": message, "lastProbeTime": None, "lastTransitionTime": now_rfc3339()}])
        self.registry.write_status(PODS, meta.get("namespace"), meta["name"], status,
                                   meta["uid"])

    def _allocate_gpus(self, pod: dict) -> list:
        wanted = self._gpu_request(pod)
        free = self._free_gpus()
        if wanted > len(free):      # bound elsewhere (another stand-in's choice): refuse
            raise ValueError(f"{wanted} {GPU_RESOURCE} requested, {len(free)} free")
        mine = free[:wanted]
        for i in mine:
            self.gpu_owner[i] = pod["metadata"]["uid"]
        return mine

    def _release_gpus(self, uid: str):
        freed = [i for i, owner in self.gpu_owner.items() if owner == uid]
        for i in freed:
            del self.gpu_owner[i]
        if freed:
            # Pending GPU pods may fit now: the scheduler retries them.
            for p in self.store.list(PODS):
                if not (p.get("spec") or {}).get("nodeName") and self._gpu_request(p):
                    asyncio.ensure_future(self._pod_changed(p))

    def _pod_removed(self, pod: dict):
        uid = pod["metadata"]["uid"]
        self._release_gpus(uid)
        runner = self.runners.pop(uid, None)
        self.pod_ips.pop(uid, None)
        self.names.pop(uid, None)
        if runner is not None and not runner.finished:
            # Removed at once (grace 0) or with a shortened grace: kill now.
            task = asyncio.create_task(runner.terminate(0))
            self._terminations.setdefault(f"kill-{uid}", task)
            task.add_done_callback(lambda t, k=f"kill-{uid}": self._terminations.pop(k, None))

    def _serviceaccount_dir(self, ns: str) -> pathlib.Path:
        d = self.serviceaccount_root / ns
        if not (d / "token").exists():
            d.mkdir(parents=True, exist_ok=True)
            (d / "ca.crt").write_text(self.ca_pem)
            (d / "namespace").write_text(ns)
            (d / "token").write_text(self.token)
        return d

    def _pod_env(self, pod: dict) -> dict:
        """The kubelet's variables: the API server (always), the service-account mount
        (unless automountServiceAccountToken is false on the pod, or on its service account
        when the pod does not say) and the service links of the pod's namespace."""
        spec, ns = pod.get("spec") or {}, pod["metadata"].get("namespace") or "default"
        env = {k: v for k, v in self.incluster_env.items()
               if k != "TASKCORE_KUBE_SERVICEACCOUNT_DIR"}
        mount = spec.get("automountServiceAccountToken")
        if mount is None:
            sa = self.store.get(("", "serviceaccounts"), ns, spec.get("serviceAccountName")
                                or "default")
            mount = (sa or {}).get("automountServiceAccountToken", True)
        if mount:
            env["TASKCORE_KUBE_SERVICEACCOUNT_DIR"] = str(self._serviceaccount_dir(ns))
        if spec.get("enableServiceLinks", True):
            for svc in self.store.list(SERVICES, ns):
                env.update(service_link_env(svc))
        return env

    async def stop_pods(self, grace: float, timeout: float) -> None:
        """Delete every pod (grace at most `grace`) and wait for their processes."""
        rt = self.registry.rt(PODS)
        for pod in self.store.list(PODS):
            m = pod["metadata"]
            g = min(grace, (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            try:
                self.registry.delete(rt, m.get("namespace"), m["name"],
                                     {"gracePeriodSeconds": max(0, int(g))})
            except ApiError:
                pass
        await asyncio.sleep(0)
        # Let the queued events start the terminations, then wait for them.
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if not self._terminations and all(r.finished for r in self.runners.values()):
                break
            await asyncio.sleep(0.05)
        for runner in list(self.runners.values()):
            if not runner.finished:
                await runner.terminate(0)


def service_link_env(svc: dict) -> dict:
    """The docker-link style variables a pod gets for each service of its namespace."""
    spec = svc.get("spec") or {}
    ip = spec.get("clusterIP")
    if not ip or ip == "None" or spec.get("type") == "ExternalName":
        return {}
    ports = spec.get("ports") or []
    if not ports:
        return {}
    n = svc["metadata"]["name"].upper().replace("-", "_")
    first = ports[0]
    env = {f"{n}_SERVICE_HOST": ip, f"{n}_SERVICE_PORT": str(first["port"]),
           f"{n}_PORT": f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"}
    for p in ports:
        proto = p.get("protocol", "TCP")
        if p.get("name"):
            env[f"{n}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
        pre = f"{n}_PORT_{p['port']}_{proto}"
        env[pre] = f"{proto.lower()}://{ip}:{p['port']}"
        env[f"{pre}_PROTO"] = proto.lower()
        env[f"{pre}_PORT"] = str(p["port"])
        env[f"{pre}_ADDR"] = ip
    return env


# ---------------------------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------------------------

def template_hash(template: dict) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _controller_ref(obj: dict) -> dict | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def _max_unavailable(spec: dict) -> int:
    replicas = spec.get("replicas", 1)
    value = ((spec.get("strategy") or {}).get("rollingUpdate") or {}).get("maxUnavailable", "25%")
    if isinstance(value, str) and value.endswith("%"):
        return replicas * int(value[:-1]) // 100
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class DeploymentController(Controller):
    name = "deployment controller"

    async def resync(self):
        for d in self.store.list(DEPLOYMENTS):
            self._reconcile(d["metadata"]["namespace"], d["metadata"]["name"])

    async def handle(self, events):
        keys = set()
        for ev in events:
            if ev.key == DEPLOYMENTS:
                keys.add((ev.namespace, ev.obj["metadata"]["name"]))
            elif ev.key == PODS:
                ref = _controller_ref(ev.obj)
                if ref and ref.get("kind") == "Deployment":
                    keys.add((ev.namespace, ref["name"]))
        for ns, name in sorted(keys):
            self._reconcile(ns, name)

    def _reconcile(self, ns: str, name: str) -> None:
        d = self.store.get(DEPLOYMENTS, ns, name)
        if d is None or d["metadata"].get("deletionTimestamp"):
            return
        uid, spec = d["metadata"]["uid"], d["spec"]
        pods_rt = self.registry.rt(PODS)
        want = spec.get("replicas", 1)
        h = template_hash(spec["template"])
        owned = [p for p in self.store.list(PODS, ns)
                 if (_controller_ref(p) or {}).get("uid") == uid]
        active = []
        for p in owned:
            if p["metadata"].get("deletionTimestamp"):
                continue
            stale = p["metadata"].get("labels", {}).get("pod-template-hash") != h
            if _terminal(p) or stale:
                self._delete(pods_rt, p)
            else:
                active.append(p)
        if len(active) < want:
            for _ in range(want - len(active)):
                active.append(self._create_pod(d, h))
        elif len(active) > want:
            # Like the ReplicaSet controller: unready pods go first, then the youngest.
            ranked = sorted(active, key=lambda p: (p["metadata"]["creationTimestamp"],
                                                   p["metadata"]["name"]), reverse=True)
            ranked = sorted(ranked, key=_is_ready)
            for p in ranked[:len(active) - want]:
                self._delete(pods_rt, p)
                active.remove(p)
        self._write_status(d, active)

    def _delete(self, rt, pod):
        try:
            self.registry.delete(rt, pod["metadata"]["namespace"], pod["metadata"]["name"], {})
        except NotFound:
            pass

    def _create_pod(self, d: dict, h: str) -> dict:
        meta = d["metadata"]
        template = copy.deepcopy(d["spec"]["template"])
        tmeta = template.get("metadata") or {}
        labels = dict(tmeta.get("labels") or {}, **{"pod-template-hash": h})
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": f"{meta['name']}-{h}-",
                            "labels": labels,
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": meta["name"], "uid": meta["uid"],
                                                 "controller": True,
                                                 "blockOwnerDeletion": True}]},
               "spec": template.get("spec") or {}}
        if tmeta.get("annotations"):
            pod["metadata"]["annotations"] = dict(tmeta["annotations"])
        return self.registry.create(self.registry.rt(PODS), meta["namespace"], pod)

    def _write_status(self, d: dict, active: list[dict]) -> None:
        spec = d["spec"]
        want = spec.get("replicas", 1)
        ready = sum(1 for p in active if _is_ready(p))
        old = d.get("status") or {}
        available_ok = ready >= want - _max_unavailable(spec)
        done = ready == want == len(active)
        old_conds = {c["type"]: c for c in old.get("conditions") or []}
        rs_name = f"{d['metadata']['name']}-{template_hash(spec['template'])}"

        def condition(type_, ok, reason, message):
            prev = old_conds.get(type_)
            status = "True" if ok else "False"
            if prev and prev.get("status") == status and prev.get("reason") == reason:
                return prev
            now = now_rfc3339()
            return {"type": type_, "status": status, "lastUpdateTime": now,
                    "lastTransitionTime": now, "reason": reason, "message": message}

        conditions = [
            condition("Available", available_ok,
                      "MinimumReplicasAvailable" if available_ok else "MinimumReplicasUnavailable",
                      "Deployment has minimum availability." if available_ok
                      else "Deployment does not have minimum availability."),
            condition("Progressing", True,
                      "NewReplicaSetAvailable" if done else "ReplicaSetUpdated",
                      f'ReplicaSet "{rs_name}" has successfully progressed.' if done
                      else f'ReplicaSet "{rs_name}" is progressing.'),
        ]
        status = {"observedGeneration": d["metadata"].get("generation", 1),
                  "replicas": len(active), "updatedReplicas": len(active),
                  "readyReplicas": ready, "availableReplicas": ready,
                  "conditions": conditions}
        if len(active) - ready:
            status["unavailableReplicas"] = len(active) - ready
        for k in ("readyReplicas", "availableReplicas", "updatedReplicas", "replicas"):
            if not status[k]:
                del status[k]        # a real server omits zero counts
        self.registry.write_status(DEPLOYMENTS, d["metadata"]["namespace"],
                                   d["metadata"]["name"], status, d["metadata"]["uid"])


# ---------------------------------------------------------------------------------------------
# Garbage collector
# ---------------------------------------------------------------------------------------------

class GarbageCollector(Controller):
    name = "garbage collector"

    async def handle(self, events):
        for ev in events:
            if ev.type == "DELETED":
                self._dependents_of(ev.obj["metadata"]["uid"],
                                    ev.options.get("propagationPolicy") or "Background")
            elif ev.type == "ADDED":
                self._check_owners(ev)

    def _dependents_of(self, uid: str, policy: str) -> None:
        dependents = [(rt, obj) for rt, obj in self.store.all_objects()
                      if any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences")
                             or [])]
        for rt, obj in dependents:
            meta = obj["metadata"]
            if policy == "Orphan":
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [
                    r for r in meta["ownerReferences"] if r.get("uid") != uid]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self.registry.put(rt.key, new)
                continue
            if meta.get("deletionTimestamp"):
                continue
            try:
                self.registry.delete(rt, meta.get("namespace"), meta["name"],
                                     {"propagationPolicy": "Background"})
            except ApiError:
                pass

    def _check_owners(self, ev: Event) -> None:
        refs = ev.obj["metadata"].get("ownerReferences") or []
        if refs and all(self.store.by_uid(r.get("uid", "")) is None for r in refs):
            rt = self.store.type_for(ev.key)
            meta = ev.obj["metadata"]
            try:
                self.registry.delete(rt, meta.get("namespace"), meta["name"], {})
            except ApiError:
                pass


# ---------------------------------------------------------------------------------------------
# Namespaces
# ---------------------------------------------------------------------------------------------

class NamespaceController(Controller):
    name = "namespace controller"

    def __init__(self, registry, *, ca_pem: str):
        super().__init__(registry)
        self.ca_pem = ca_pem
        self._cleanups: dict[str, asyncio.Task] = {}

    async def stop(self):
        for t in self._cleanups.values():
            t.cancel()
        await super().stop()

    async def resync(self):
        for ns in self.store.list(NAMESPACES):
            self._namespace(ns)

    async def handle(self, events):
        for ev in events:
            if ev.key == NAMESPACES and ev.type != "DELETED":
                current = self.store.get(NAMESPACES, None, ev.obj["metadata"]["name"])
                if current is not None:
                    self._namespace(current)

    def _namespace(self, ns: dict) -> None:
        name = ns["metadata"]["name"]
        if ns["metadata"].get("deletionTimestamp"):
            if name not in self._cleanups:
                self._cleanups[name] = asyncio.create_task(self._terminate(name))
            return
        for plural, body in (
                ("serviceaccounts", {"metadata": {"name": "default"}}),
                ("configmaps", {"metadata": {"name": "kube-root-ca.crt"},
                                "data": {"ca.crt": self.ca_pem}})):
            rt = self.registry.rt(("", plural))
            if not self.store.exists(rt.key, name, body["metadata"]["name"]):
                try:
                    self.registry.create(rt, name, body)
                except ApiError:
                    pass

    async def _terminate(self, name: str) -> None:
        try:
            asked = set()
            while True:
                left = [(rt, o) for rt, o in self.store.all_objects()
                        if rt is not None and rt.namespaced
                        and o["metadata"].get("namespace") == name]
                if not left:
                    break
                for rt, o in left:
                    uid = o["metadata"]["uid"]
                    if uid not in asked:
                        asked.add(uid)
                        try:
                            self.registry.delete(rt, name, o["metadata"]["name"], {})
                        except ApiError:
                            pass
                await asyncio.sleep(0.1)
            if self.store.exists(NAMESPACES, None, name):
                self.store.remove(NAMESPACES, None, name)
        finally:
            self._cleanups.pop(name, None)


# ---------------------------------------------------------------------------------------------
# Services: load balancers, endpoints, kube-proxy
# ---------------------------------------------------------------------------------------------

def _selected_pods(store, svc: dict) -> list[dict]:
    selector = (svc.get("spec") or {}).get("selector")
    if not selector:
        return []
    ns = svc["metadata"]["namespace"]
    return [p for p in store.list(PODS, ns)
            if label_selector_object_matches({"matchLabels": selector},
                                             p["metadata"].get("labels"))]


def _serving(pod: dict) -> bool:
    return (_is_ready(pod) and not pod["metadata"].get("deletionTimestamp")
            and bool((pod.get("status") or {}).get("podIP")))


def resolve_target_port(pod: dict, port: dict) -> int | None:
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


class ServiceController(Controller):
    name = "service controller"

    def __init__(self, registry):
        super().__init__(registry)
        self._pending_lb: set[str] = set()

    async def resync(self):
        for svc in self.store.list(SERVICES):
            self._service(svc)

    async def handle(self, events):
        namespaces, services = set(), set()
        for ev in events:
            if ev.key == SERVICES:
                if ev.type == "DELETED":
                    self._drop_endpoints(ev.namespace, ev.obj["metadata"]["name"])
                else:
                    services.add((ev.namespace, ev.obj["metadata"]["name"]))
            elif ev.key == PODS:
                namespaces.add(ev.namespace)
        for svc in self.store.list(SERVICES):
            key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
            if key in services or key[0] in namespaces:
                self._service(svc)

    def _service(self, svc: dict) -> None:
        spec, meta = svc["spec"], svc["metadata"]
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress")
        if spec.get("type") == "LoadBalancer":
            if not ingress and meta["uid"] not in self._pending_lb:
                self._pending_lb.add(meta["uid"])
                asyncio.get_running_loop().call_later(0.2, self._assign_lb, meta["namespace"],
                                                      meta["name"], meta["uid"])
        elif ingress:
            status = dict(svc.get("status") or {}, loadBalancer={})
            self.registry.write_status(SERVICES, meta["namespace"], meta["name"], status,
                                       meta["uid"])
        if spec.get("selector"):
            self._write_endpoints(svc)

    def _assign_lb(self, ns, name, uid):
        self._pending_lb.discard(uid)
        svc = self.store.get(SERVICES, ns, name)
        if (svc is None or svc["metadata"]["uid"] != uid
                or svc["spec"].get("type") != "LoadBalancer"):
            return
        taken = set()
        for s in self.store.list(SERVICES):
            for i in ((s.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
                taken.add(i.get("ip"))
        status = dict(svc.get("status") or {})
        status["loadBalancer"] = {"ingress": [{"ip": _random_ip(LB_NET, taken), "ipMode": "VIP"}]}
        self.registry.write_status(SERVICES, ns, name, status, uid)

    def _write_endpoints(self, svc: dict) -> None:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        ready, not_ready = [], []
        ports = None
        for pod in _selected_pods(self.store, svc):
            ip = (pod.get("status") or {}).get("podIP")
            if not ip or _terminal(pod):
                continue
            address = {"ip": ip, "nodeName": NODE_NAME,
                       "targetRef": {"kind": "Pod", "namespace": ns,
                                     "name": pod["metadata"]["name"],
                                     "uid": pod["metadata"]["uid"]}}
            (ready if _serving(pod) else not_ready).append(address)
            if ports is None:
                ports = []
                for p in svc["spec"].get("ports") or []:
                    target = resolve_target_port(pod, p)
                    if target is not None:
                        ports.append({k: v for k, v in (("name", p.get("name")),
                                                        ("port", target),
                                                        ("protocol", p.get("protocol", "TCP")))
                                      if v is not None})
        subsets = []
        if ready or not_ready:
            subset = {}
            if ready:
                subset["addresses"] = sorted(ready, key=lambda a: a["ip"])
            if not_ready:
                subset["notReadyAddresses"] = sorted(not_ready, key=lambda a: a["ip"])
            subset["ports"] = ports or []
            subsets.append(subset)
        current = self.store.get(ENDPOINTS, ns, name)
        labels = svc["metadata"].get("labels")
        if current is None:
            body = {"metadata": {"name": name, **({"labels": labels} if labels else {})}}
            if subsets:
                body["subsets"] = subsets
            try:
                self.registry.create(self.registry.rt(ENDPOINTS), ns, body)
            except ApiError:
                log.exception("stand-in: endpoints for %s/%s", ns, name)
        elif (current.get("subsets") or []) != subsets:
            new = copy.deepcopy(current)
            if subsets:
                new["subsets"] = subsets
            else:
                new.pop("subsets", None)
            self.registry.put(ENDPOINTS, new)

    def _drop_endpoints(self, ns, name):
        if self.store.exists(ENDPOINTS, ns, name):
            self.store.remove(ENDPOINTS, ns, name)


class _Port:
    """One service port's proxy: its endpoints and the listeners that serve it."""

    def __init__(self):
        self.endpoints: list[tuple[str, str, int]] = []     # (pod uid, ip, port)
        self.next = 0
        self.servers: dict[tuple[str, int], asyncio.AbstractServer] = {}


class KubeProxy(Controller):
    name = "kube-proxy"

    def __init__(self, registry):
        super().__init__(registry)
        self._ports: dict[tuple, _Port] = {}            # (ns, service, port index) -> _Port
        self._conns: dict[str, set[asyncio.Transport]] = {}   # pod uid -> client transports

    async def stop(self):
        await super().stop()
        for port in self._ports.values():
            for server in port.servers.values():
                server.close()
        self._ports.clear()
        for conns in self._conns.values():
            for t in list(conns):
                t.abort()
        self._conns.clear()

    async def resync(self):
        await self._sync_all()

    async def handle(self, events):
        gone = [ev.obj["metadata"]["uid"] for ev in events
                if ev.key == PODS and ev.type == "DELETED"]
        if any(ev.key in (PODS, SERVICES) for ev in events):
            await self._sync_all()
        for uid in gone:
            for t in list(self._conns.pop(uid, ())):
                t.abort()

    async def _sync_all(self):
        wanted = set()
        for svc in self.store.list(SERVICES):
            spec = svc["spec"]
            if spec.get("type") == "ExternalName":
                continue
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            pods = [p for p in _selected_pods(self.store, svc) if _serving(p)]
            lb = [i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {})
                  .get("ingress") or [] if i.get("ip")]
            for i, p in enumerate(spec.get("ports") or []):
                if p.get("protocol", "TCP") != "TCP":
                    continue
                key = (ns, name, i)
                wanted.add(key)
                port = self._ports.setdefault(key, _Port())
                port.endpoints = []
                for pod in sorted(pods, key=lambda x: x["metadata"]["name"]):
                    target = resolve_target_port(pod, p)
                    if target is not None:
                        port.endpoints.append((pod["metadata"]["uid"],
                                               pod["status"]["podIP"], target))
                addresses = set()
                if port.endpoints:
                    if spec.get("clusterIP") not in (None, "", "None"):
                        addresses.add((spec["clusterIP"], p["port"]))
                    if p.get("nodePort"):
                        addresses.add(("127.0.0.1", p["nodePort"]))
                    addresses |= {(ip, p["port"]) for ip in lb}
                await self._listen(port, addresses)
        for key in [k for k in self._ports if k not in wanted]:
            await self._listen(self._ports.pop(key), set())

    async def _listen(self, port: _Port, addresses: set) -> None:
        for addr in [a for a in port.servers if a not in addresses]:
            port.servers.pop(addr).close()
        for addr in addresses - set(port.servers):
            try:
                port.servers[addr] = await asyncio.start_server(
                    functools.partial(self._proxy, port), addr[0], addr[1], reuse_address=True)
            except OSError as e:
                log.warning("stand-in kube-proxy cannot listen on %s:%s: %s", *addr, e)

    async def _proxy(self, port: _Port, reader, writer) -> None:
        if not port.endpoints:
            writer.transport.abort()
            return
        uid, ip, target = port.endpoints[port.next % len(port.endpoints)]
        port.next += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(ip, target), 5)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        conns = self._conns.setdefault(uid, set())
        conns.update((writer.transport, up_writer.transport))

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (ConnectionError, OSError):
                # A reset on one side resets the other, as through a real kube-proxy (NAT
                # passes the RST on): the peer must not keep a connection that is gone.
                writer.transport.abort()
                up_writer.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                conns.discard(w.transport)
                w.close()

