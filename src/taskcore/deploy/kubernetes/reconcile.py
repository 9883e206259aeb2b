"""The reconciler's decisions: what exists in, what to do out. No I/O.

`plan(observed)` compares one TaskcoreCluster with its children and the
scheduler's view of its workers and returns actions as data (`Create`,
`Delete`, `Retire`, `SetStatus`, `DeleteCluster`); controller.py carries them
out. Adaptive scaling is decided here too (`split_target`, `AdaptiveCounter`).
Every rule about when a pod is made, retired or replaced lives in this module,
and tests/deploy/kubernetes/test_reconcile.py drives it with dicts alone.

The rules:
- The scheduler is a one-replica Deployment behind a Service, both made when
  missing; Kubernetes itself recreates a dead scheduler pod.
- Workers are pods per group. Fewer live pods than `replicas`: make more.
  More: the surplus goes cheapest first (pods annotated taskcore.dev/retire, the
  ones a user named in `scale_down`, before any other): pods that never got running or that
  the scheduler does not know are deleted at once (they hold nothing); the
  others are *retired* (the scheduler moves their data away, then the pod is
  deleted), idle before busy, least data first. Pods of a group no longer in
  the spec are surplus too.
- A pod that ended (Succeeded: retired or exited; Failed: crashed past its
  restart policy, evicted) is deleted and so replaced by the count rule.
- A changed pod spec rolls: a group whose pods all run and are ready gets one pod of
  the new spec, and the surplus rule then retires a pod of the old one, until none is
  left; a changed scheduler spec replaces the scheduler's Deployment.
- A group's adaptive bounds make the controller set its `replicas`; no rule
  here looks at another group's pods when deciding for one group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from taskcore.deploy.kubernetes import resources as r

__all__ = ["Observed", "Create", "Delete", "Retire", "SetStatus", "DeleteCluster", "plan",
           "pod_problem", "split_target", "AdaptiveCounter", "scheduler_address_of",
           "dashboard_address_of"]

# Container waiting reasons that will not fix themselves.
BAD_WAITING = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
               "CreateContainerError", "CreateContainerConfigError", "RunContainerError"}


@dataclass(frozen=True)
class Create:
    kind: str          # "Pod", "Service", "Deployment"
    manifest: dict


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str
    reason: str


@dataclass(frozen=True)
class Retire:
    """Retire these worker pods through the scheduler, then delete them."""
    group: str
    pods: tuple


@dataclass(frozen=True)
class SetStatus:
    status: dict


@dataclass(frozen=True)
class DeleteCluster:
    reason: str


@dataclass
class Observed:
    """Everything one reconcile of one cluster looks at."""
    cluster: dict
    deployment: dict | None = None
    service: dict | None = None
    pods: list = field(default_factory=list)
    # The scheduler's view, by worker name: {name: {"processing": n, "nbytes": b}};
    # None when the scheduler could not be asked.
    scheduler_workers: dict | None = None
    retiring: frozenset = frozenset()    # pod names whose retirement is in flight
    idle_for: float = 0.0                # seconds the scheduler has had no clients or work
    controller: str = ""


def _meta(obj, key, default=None):
    return (obj.get("metadata") or {}).get(key, default)


def _labels(obj) -> dict:
    return _meta(obj, "labels") or {}


def _phase(pod) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def _ready(pod) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def pod_problem(pod: dict) -> str | None:
    """A one-line description if this pod cannot get running by itself, else None."""
    status = pod.get("status") or {}
    name = _meta(pod, "name")
    if status.get("phase") == "Failed":
        reason = status.get("reason") or "Failed"
        message = status.get("message") or _last_termination(status) or ""
        return f"pod {name} is Failed ({reason}){': ' + message if message else ''}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in BAD_WAITING:
            last = _last_termination(status, cs)
            msg = waiting.get("message") or ""
            return (f"pod {name} is {status.get('phase', 'Pending')}, container "
                    f"{cs.get('name')} in {waiting['reason']}"
                    f"{': ' + msg if msg else ''}{'; ' + last if last else ''}"
                    f" (restarts: {cs.get('restartCount', 0)})")
    return None


def _last_termination(status, cs=None) -> str:
    for c in ([cs] if cs else status.get("containerStatuses") or []):
        term = (c.get("lastState") or {}).get("terminated") or \
            (c.get("state") or {}).get("terminated")
        if term:
            return f"last exit code {term.get('exitCode')} ({term.get('reason', '')})"
    return ""


def dashboard_address_of(service: dict | None) -> str | None:
    """<cluster IP>:<port> of the Service's "dashboard" port (inside the cluster), or None
    when it has none (a custom spec) or no cluster IP yet."""
    spec = (service or {}).get("spec") or {}
    ip = spec.get("clusterIP")
    port = next((p["port"] for p in spec.get("ports") or [] if p.get("name") == "dashboard"),
                None)
    if not ip or ip == "None" or port is None:
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def scheduler_address_of(service: dict | None, protocol: str = "tcp") -> str | None:
    """<protocol>://<cluster IP>:<port> of the scheduler's Service, once it has a cluster IP
    (`protocol`: "tls" for a cluster with TLS credentials, `resources.comm_protocol`)."""
    if not service:
        return None
    spec = service.get("spec") or {}
    ip = spec.get("clusterIP")
    ports = spec.get("ports") or []
    if not ip or ip == "None" or not ports:
        return None
    port = next((p["port"] for p in ports if p.get("name") == "tcp-comm"), ports[0]["port"])
    return f"{protocol}://{ip}:{port}"


def plan(obs: Observed) -> list:
    cluster = obs.cluster
    if _meta(cluster, "deletionTimestamp"):
        return []   # the garbage collector removes the children
    try:
        r.validate_cluster(cluster)
    except r.ClusterSpecError as e:
        return _status_if_changed(cluster, {"phase": "Failed", "message": str(e),
                                            "controller": obs.controller,
                                            "observedGeneration": _meta(cluster, "generation")})
    spec = cluster["spec"]
    actions: list = []
    if obs.service is None:
        actions.append(Create("Service", r.scheduler_service(cluster)))
    if obs.deployment is None:
        actions.append(Create("Deployment", r.scheduler_deployment(cluster)))
    elif _template(obs.deployment) != _template(r.scheduler_deployment(cluster)):
        # A new scheduler spec: the Deployment goes (its pod with it) and is made again at
        # the next pass. A new scheduler starts empty either way, as with Recreate.
        actions.append(Delete("Deployment", _meta(obs.deployment, "name"),
                              "the scheduler's spec changed"))
    idle_timeout = float(spec.get("idleTimeout") or 0)
    if idle_timeout and obs.idle_for > idle_timeout:
        return [DeleteCluster(f"idle for {obs.idle_for:.0f} s (idleTimeout {idle_timeout:g} s)")]

    address = scheduler_address_of(obs.service, r.comm_protocol(cluster))
    groups = {g["name"]: g for g in spec.get("workerGroups") or []}
    workers = [p for p in obs.pods if _labels(p).get(r.LABEL_COMPONENT) == "worker"]
    by_group: dict = {}
    for p in workers:
        by_group.setdefault(_labels(p).get(r.LABEL_GROUP), []).append(p)

    group_status = {}
    for gname in list(groups) + [g for g in by_group if g not in groups]:
        pods = by_group.get(gname, [])
        group = groups.get(gname)
        live = []
        for p in pods:
            if _meta(p, "deletionTimestamp") or _meta(p, "name") in obs.retiring:
                continue
            phase = _phase(p)
            if phase in ("Succeeded", "Failed"):
                why = pod_problem(p) or f"pod {_meta(p, 'name')} ended ({phase})"
                actions.append(Delete("Pod", _meta(p, "name"), why))
                continue
            live.append(p)
        want = int(group.get("replicas", 0)) if group is not None else 0
        current = r.template_hash(group["spec"]) if group is not None else None
        outdated = {_meta(p, "name") for p in live if _template(p) != current}
        if len(live) < want and address is not None:
            actions += [Create("Pod", r.worker_pod(cluster, group, address))
                        for _ in range(want - len(live))]
        elif len(live) > want:
            actions += _surplus(gname, live, len(live) - want, obs.scheduler_workers, outdated)
        elif outdated and address is not None and all(_ready(p) for p in live):
            # The group's pod spec changed: roll one pod at a time, a new one first (the
            # group is then one over, and the surplus rule retires an old one).
            actions.append(Create("Pod", r.worker_pod(cluster, group, address)))
        if group is not None:
            group_status[gname] = {"replicas": want, "pods": len(live),
                                   "ready": sum(1 for p in live if _ready(p))}

    sched_pods = [p for p in obs.pods if _labels(p).get(r.LABEL_COMPONENT) == "scheduler"
                  and not _meta(p, "deletionTimestamp")]
    ready = any(_ready(p) for p in sched_pods)
    problems = [m for m in (pod_problem(p) for p in obs.pods) if m]
    status = {"phase": "Running" if ready else "Pending", "controller": obs.controller,
              "schedulerAddress": address, "dashboardAddress": dashboard_address_of(obs.service),
              "groups": group_status,
              "observedGeneration": _meta(cluster, "generation"),
              "message": "; ".join(problems[:3]) if problems else ""}
    return actions + _status_if_changed(cluster, status)


def _template(obj) -> str | None:
    return (_meta(obj, "annotations") or {}).get(r.ANNOTATION_TEMPLATE_HASH)


def _surplus(group: str, live: list, excess: int, known: dict | None,
             outdated: set = frozenset()) -> list:
    """Which `excess` pods go, and how: delete the ones holding nothing, retire the rest."""
    def cost(p):
        name = _meta(p, "name")
        info = (known or {}).get(name)
        if _phase(p) != "Running" or (known is not None and info is None):
            return (0, 0, 0, name)      # not a worker the scheduler has: nothing to move
        if info is None:
            return (1, 0, 0, name)      # scheduler unreachable: no data to judge by
        return (1, int(info.get("processing", 0)), int(info.get("nbytes", 0)), name)

    def order(p):   # pods a user picked (scale_down) first, then old templates, then cheapest
        return (r.ANNOTATION_RETIRE not in (_meta(p, "annotations") or {}),
                _meta(p, "name") not in outdated, cost(p))

    chosen = sorted(live, key=order)[:excess]
    out, retire = [], []
    for p in chosen:
        if cost(p)[0] == 0:
            out.append(Delete("Pod", _meta(p, "name"), "scale down (holds no data)"))
        else:
            retire.append(_meta(p, "name"))
    if retire:
        out.append(Retire(group, tuple(retire)))
    return out


def _status_if_changed(cluster, status) -> list:
    current = cluster.get("status") or {}
    if all(current.get(k) == v for k, v in status.items()):
        return []
    return [SetStatus(status)]


# -- adaptive ------------------------------------------------------------------------------------
def split_target(groups: list, target: int) -> dict:
    """Desired replicas of each adaptive group for a cluster-wide target of `target` workers.

    Fixed groups (no `adapt`) count first; what they do not cover is handed to the
    adaptive groups in spec order: each gets its minimum, then the rest fills them in
    order up to their maximums. A function of the target alone, not of current sizes,
    so groups never chase each other; and each group is only ever set within its bounds.
    """
    fixed = sum(int(g.get("replicas", 0)) for g in groups if not g.get("adapt"))
    adaptive = [g for g in groups if g.get("adapt")]
    need = max(0, int(target) - fixed)
    out = {}
    for g in adaptive:
        lo = int(g["adapt"].get("minimum", 0))
        out[g["name"]] = lo
        need -= lo
    for g in adaptive:
        hi = g["adapt"].get("maximum")
        hi = math.inf if hi is None else int(hi)
        extra = max(0, min(need, hi - out[g["name"]]))
        out[g["name"]] += int(extra)
        need -= extra
    return out


class AdaptiveCounter:
    """Hysteresis for one group: up at once; down only after `wait_count` ticks in a row
    that all asked for fewer, to the largest of those asks (a burst resets the count)."""

    def __init__(self):
        self.below = 0
        self.peak = 0

    def step(self, desired: int, replicas: int, wait_count: int) -> int | None:
        """The new replica count, or None to leave it."""
        if desired > replicas:
            self.below = 0
            return desired
        if desired == replicas:
            self.below = 0
            return None
        self.peak = desired if self.below == 0 else max(self.peak, desired)
        self.below += 1
        if self.below >= wait_count:
            self.below = 0
            return self.peak
        return None
