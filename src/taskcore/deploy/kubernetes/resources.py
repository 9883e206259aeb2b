"""The TaskcoreCluster resource and the Kubernetes objects it owns, as plain dicts.

Pure functions, no I/O and no kubernetes_asyncio: what a cluster *should* look
like. The reconciler (reconcile.py) compares this with what exists; the
manifests in the repository's deploy/kubernetes/ are rendered from here
(`crd_manifest`), and a test keeps the two equal.

A TaskcoreCluster (group taskcore.dev, version v1):

    spec:
      idleTimeout: 0                # seconds without clients or work before the
                                    # cluster deletes itself; 0 = never
      security:                     # optional: credentials from a Secret (see below)
        secretName: <a Secret in the resource's namespace>
        tls: true                   # it holds ca.crt, tls.crt, tls.key: tls://
        token: false                # it holds `token`: TASKCORE_TOKEN in every container
      scheduler:
        spec: <PodSpec>             # one container, named "scheduler"
        service: <ServiceSpec>      # type ClusterIP | NodePort | LoadBalancer
      workerGroups:
        - name: default
          replicas: 2
          spec: <PodSpec>           # one container, named "worker"
          adapt: {minimum, maximum, targetDuration, waitCount, interval}   # optional
    status:                         # written by the controller only
      phase: Pending | Running | Failed
      controller, schedulerAddress, observedGeneration, message,
      dashboardAddress,             # host:port of the Service's "dashboard" port, if any
      groups: {name: {replicas, pods, ready}}

Children, all labelled `taskcore.dev/cluster=<name>` and owned (ownerReferences)
by the cluster's resource, so deleting it deletes everything:
- Deployment `<name>-scheduler` (one replica: Kubernetes recreates a dead scheduler),
- Service `<name>-scheduler` (a stable address for workers and clients),
- worker Pods `<name>-<group>-<random>`, created and deleted by the controller
  one by one (never by a ReplicaSet), so a scale-down retires the exact workers
  the scheduler chose.

The controller injects into the containers what only it knows: the pod's IP
(POD_IP), the scheduler's address (TASKCORE_SCHEDULER_ADDRESS: the Service's
cluster IP, stable while the Service lives, so no cluster DNS is needed) and
the worker's name (TASKCORE_WORKER_NAME = the pod name, so the scheduler's
worker names are pod names).

Credentials (`spec.security`): the Secret is mounted read-only (mode 0400, only
its three TLS keys) at /etc/taskcore/credentials in the scheduler's and every
worker's container, whose arguments get `--tls-ca-file/--tls-cert/--tls-key`
naming the files there; the scheduler's address is then tls://. A token reaches
the containers as TASKCORE_TOKEN through `valueFrom.secretKeyRef`: it is never
in an argument, nor in the resource. Key names are cert-manager's (a
Certificate's Secret can be named directly, if its certificate allows both
server and client authentication). KubeCluster makes the Secret
(`credentials_secret`), owned by the resource, so deleting one deletes the other.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import shlex

GROUP = "taskcore.dev"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TaskcoreCluster"
PLURAL = "taskcoreclusters"
SINGULAR = "taskcorecluster"
SHORT_NAMES = ["tcc"]

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
DEFAULT_IMAGE = "ghcr.io/taskcore/taskcore:latest"
GPU_RESOURCE = "nvidia.com/gpu"   # the NVIDIA device plugin's extended resource
DEFAULT_GROUP = "default"
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")

LABEL_CLUSTER = f"{GROUP}/cluster"
LABEL_COMPONENT = f"{GROUP}/component"
LABEL_GROUP = f"{GROUP}/worker-group"
LABEL_CONTROLLER = f"{GROUP}/controller"   # "embedded" on resources a client reconciles itself
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGED_BY = "taskcore"
ANNOTATION_TEMPLATE_HASH = f"{GROUP}/template-hash"
ANNOTATION_RETIRE = f"{GROUP}/retire"     # on a worker pod: go first at the next scale-down

# Credentials (spec.security): the Secret's keys, and where the TLS files are mounted.
SECRET_CA, SECRET_CERT, SECRET_KEY, SECRET_TOKEN = "ca.crt", "tls.crt", "tls.key", "token"
TLS_KEYS = (SECRET_CA, SECRET_CERT, SECRET_KEY)
CREDENTIALS_VOLUME = "taskcore-credentials"
CREDENTIALS_MOUNT = "/etc/taskcore/credentials"
CREDENTIALS_MODE = 0o400        # read by the container's user only (see docs/deploying.md)
TOKEN_ENV = "TASKCORE_TOKEN"    # = taskcore.security.TOKEN_ENV (no import: this module is pure)

__all__ = ["make_cluster_spec", "make_worker_spec", "crd_manifest", "scheduler_deployment",
           "scheduler_service", "worker_pod", "validate_cluster", "security_spec",
           "credentials_secret", "cluster_security", "comm_protocol"]


def _as_command(command) -> list:
    if isinstance(command, str):
        return shlex.split(command)
    return [str(c) for c in command]


def _env_list(env) -> list:
    if not env:
        return []
    if isinstance(env, dict):
        return [{"name": str(k), "value": str(v)} for k, v in env.items()]
    return [dict(e) for e in env]


def _resources(resources) -> dict:
    """`{"requests": {...}, "limits": {...}}` as given, or shorthand {"cpu": .., "memory": ..}
    meaning requests = limits."""
    if not resources:
        return {}
    if set(resources) <= {"requests", "limits"}:
        return copy.deepcopy(resources)
    flat = {k: str(v) for k, v in resources.items()}
    return {"requests": dict(flat), "limits": dict(flat)}


def make_worker_spec(image: str = DEFAULT_IMAGE, n_workers: int = 3, resources: dict | None = None,
                     env=None, worker_command=None, name: str = DEFAULT_GROUP,
                     nthreads: int | None = None, death_timeout: float = 60, gpus: int | None = None,
                     device_memory_limit=None) -> dict:
    """One worker group of a TaskcoreCluster spec: `{name, replicas, spec: PodSpec}`.

    `worker_command` (a string or list; default `core-worker`, or `core-cuda-worker` with
    `gpus`) starts the worker; the controller's variables complete it: it is called with
    the scheduler's address, `--name <pod name>` and `--host <pod IP>`.

    `gpus=1` makes a GPU group: each pod asks for one `nvidia.com/gpu` (the NVIDIA device
    plugin's resource; the container runtime then shows the pod only its GPU), tolerates
    the usual `nvidia.com/gpu` taint of GPU nodes, and runs `core-cuda-worker`, which pins
    the worker to its GPU's CPUs and advertises the `GPU=1` resource. One GPU per pod:
    the pod is the unit that scales and retires.
    """
    if int(n_workers) < 0:
        raise ValueError(f"n_workers must be >= 0, got {n_workers}")
    if gpus is not None and (isinstance(gpus, bool) or gpus != 1):
        raise ValueError(f"gpus must be 1 (one GPU per worker pod; scale with n_workers), "
                         f"got {gpus!r}")
    if device_memory_limit is not None and not gpus:
        raise ValueError("device_memory_limit= needs gpus=1")
    if worker_command is None:
        worker_command = "core-cuda-worker" if gpus else "core-worker"
    args = ["$(TASKCORE_SCHEDULER_ADDRESS)", "--name", "$(TASKCORE_WORKER_NAME)",
            "--host", "$(POD_IP)", "--death-timeout", str(death_timeout)]
    if nthreads is not None:
        args += ["--nthreads", str(int(nthreads))]
    res = _resources(resources)
    memory = (res.get("limits") or {}).get("memory")
    if memory is not None:
        args += ["--memory-limit", _quantity_bytes(memory)]
    if gpus:
        # Extended resources go in limits (requests default to them, and may not differ).
        res.setdefault("limits", {})[GPU_RESOURCE] = str(gpus)
        if device_memory_limit is not None:
            args += ["--device-memory-limit", str(device_memory_limit)]
    container = {"name": "worker", "image": image, "command": _as_command(worker_command),
                 "args": args, "env": _env_list(env)}
    if res:
        container["resources"] = res
    pod = {"containers": [container], "restartPolicy": "OnFailure",
           "terminationGracePeriodSeconds": 30}
    if gpus:
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists",
                               "effect": "NoSchedule"}]
    return {"name": name, "replicas": int(n_workers), "spec": pod}


def make_cluster_spec(name: str, image: str = DEFAULT_IMAGE, n_workers: int = 3,
                      resources: dict | None = None, env=None, worker_command=None,
                      scheduler_service_type: str = "ClusterIP", idle_timeout: float = 0,
                      scheduler_command="core-scheduler", nthreads: int | None = None,
                      gpus: int | None = None, device_memory_limit=None) -> dict:
    """A whole TaskcoreCluster resource (a dict you can edit, dump as YAML, or pass to
    `KubeCluster(custom_cluster_spec=...)`)."""
    if scheduler_service_type not in SERVICE_TYPES:
        raise ValueError(f"scheduler_service_type must be one of {SERVICE_TYPES}, "
                         f"got {scheduler_service_type!r}")
    container = {
        "name": "scheduler", "image": image, "command": _as_command(scheduler_command),
        # Every address of the pod: the Service reaches the pod's IP, while a port-forward
        # (kubectl's, or KubeCluster's own) dials localhost inside the pod. The scheduler
        # still gives the pod's IP as its address. The dashboard (":PORT" is on --host)
        # likewise.
        "args": ["--host", "0.0.0.0", "--port", str(SCHEDULER_PORT),
                 "--dashboard-address", f":{DASHBOARD_PORT}"],
        "env": _env_list(env),
        "ports": [{"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
                  {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"}],
        # Ready once it accepts connections: only then does the Service send workers to it.
        "readinessProbe": {"tcpSocket": {"port": "tcp-comm"}, "periodSeconds": 2,
                           "initialDelaySeconds": 0},
    }
    res = _resources(resources)
    if res:
        container["resources"] = res
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "idleTimeout": float(idle_timeout or 0),
            "scheduler": {
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 10},
                "service": {"type": scheduler_service_type, "ports": _service_ports()},
            },
            "workerGroups": [make_worker_spec(image=image, n_workers=n_workers,
                                              resources=resources, env=env,
                                              worker_command=worker_command, nthreads=nthreads,
                                              gpus=gpus,
                                              device_memory_limit=device_memory_limit)],
        },
    }


def _service_ports() -> list:
    """The scheduler Service's ports: its comm and its dashboard, by the container's names."""
    return [{"name": "tcp-comm", "port": SCHEDULER_PORT, "targetPort": "tcp-comm",
             "protocol": "TCP"},
            {"name": "dashboard", "port": DASHBOARD_PORT, "targetPort": "dashboard",
             "protocol": "TCP"}]


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
             "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


def _quantity_bytes(q) -> str:
    """A Kubernetes memory quantity ("4Gi", "500M", "1e9") as a byte count string."""
    s = str(q).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if s.endswith(suffix):
            return str(int(float(s[:-len(suffix)]) * _SUFFIXES[suffix]))
    return str(int(float(s)))


# -- validation -----------------------------------------------------------------------------
class ClusterSpecError(ValueError):
    """A TaskcoreCluster spec the controller cannot act on."""


def validate_cluster(obj: dict) -> None:
    """Check what the CRD schema cannot: one named container per pod spec, unique group
    names, sane adapt bounds. Raises ClusterSpecError with the offending path."""
    spec = obj.get("spec") or {}
    sched = spec.get("scheduler") or {}
    _one_container(sched.get("spec"), "spec.scheduler.spec", "scheduler")
    svc_type = (sched.get("service") or {}).get("type", "ClusterIP")
    if svc_type not in SERVICE_TYPES:
        raise ClusterSpecError(f"spec.scheduler.service.type: {svc_type!r} is not one of "
                               f"{SERVICE_TYPES}")
    _check_security(spec.get("security"))
    seen = set()
    for i, g in enumerate(spec.get("workerGroups") or []):
        where = f"spec.workerGroups[{i}]"
        name = g.get("name")
        if not name or name in seen:
            raise ClusterSpecError(f"{where}.name: missing or repeated ({name!r})")
        seen.add(name)
        if int(g.get("replicas", 0)) < 0:
            raise ClusterSpecError(f"{where}.replicas: must be >= 0")
        _one_container(g.get("spec"), f"{where}.spec", "worker")
        adapt = g.get("adapt")
        if adapt:
            lo, hi = int(adapt.get("minimum", 0)), adapt.get("maximum")
            if lo < 0 or (hi is not None and int(hi) < lo):
                raise ClusterSpecError(f"{where}.adapt: need 0 <= minimum <= maximum, got "
                                       f"{lo}..{hi}")


def _check_security(sec):
    if sec is None:
        return
    if not isinstance(sec, dict):
        raise ClusterSpecError(f"spec.security: must be an object, got {sec!r}")
    if not isinstance(sec.get("secretName"), str) or not sec["secretName"]:
        raise ClusterSpecError(f"spec.security.secretName: the name of a Secret is needed, "
                               f"got {sec.get('secretName')!r}")
    for k in ("tls", "token"):
        if not isinstance(sec.get(k, k == "tls"), bool):
            raise ClusterSpecError(f"spec.security.{k}: must be true or false")
    if not (sec.get("tls", True) or sec.get("token", False)):
        raise ClusterSpecError("spec.security: neither tls nor token: the Secret would give "
                               "nothing (drop spec.security for plain tcp://)")


def _one_container(podspec, where, name):
    containers = (podspec or {}).get("containers") or []
    if not any(c.get("name") == name for c in containers):
        raise ClusterSpecError(f"{where}.containers: needs a container named {name!r}")


# -- children --------------------------------------------------------------------------------
def cluster_labels(name: str, component: str, group: str | None = None) -> dict:
    labels = {LABEL_CLUSTER: name, LABEL_COMPONENT: component, LABEL_MANAGED: MANAGED_BY}
    if group is not None:
        labels[LABEL_GROUP] = group
    return labels


def owner_reference(owner: dict) -> dict:
    meta = owner["metadata"]
    return {"apiVersion": owner.get("apiVersion", API_VERSION), "kind": owner.get("kind", KIND),
            "name": meta["name"], "uid": meta["uid"], "controller": True,
            "blockOwnerDeletion": True}


def scheduler_name(cluster_name: str) -> str:
    return f"{cluster_name}-scheduler"


def _inject_env(container: dict, env: list) -> None:
    """Add the controller's variables first, so the user's env can refer to them with
    $(VAR); a variable the user set keeps the user's value."""
    mine = {e["name"] for e in container.get("env") or []}
    container["env"] = [e for e in env if e["name"] not in mine] + list(container.get("env") or [])


_POD_IP = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


# -- credentials -----------------------------------------------------------------------------
def security_spec(secret_name: str, tls: bool = True, token: bool = False) -> dict:
    """`spec.security` of a TaskcoreCluster: which Secret, and what it holds."""
    out = {"secretName": secret_name, "tls": bool(tls), "token": bool(token)}
    _check_security(out)
    return out


def cluster_security(cluster: dict) -> dict | None:
    """The resource's spec.security with its defaults filled in, or None."""
    sec = (cluster.get("spec") or {}).get("security")
    if not sec:
        return None
    return {"secretName": sec["secretName"], "tls": sec.get("tls", True),
            "token": sec.get("token", False)}


def comm_protocol(cluster: dict) -> str:
    """"tls" when the cluster's pods get TLS credentials (spec.security.tls), else "tcp"."""
    sec = cluster_security(cluster)
    return "tls" if sec and sec["tls"] else "tcp"


def credentials_secret(cluster_name: str, files: dict | None = None,
                       token: str | None = None) -> dict:
    """The Secret holding a cluster's credentials: `files` maps SECRET_CA, SECRET_CERT and
    SECRET_KEY to their PEM bytes (type kubernetes.io/tls), `token` the shared token.
    Labelled for the cluster and named `<cluster>-credentials-<random>` (generateName: a
    Secret left by an earlier cluster of the same name never collides); KubeCluster adds
    the owner reference once the resource exists."""
    if not files and not token:
        raise ValueError("a credentials Secret needs TLS files or a token")
    data = {}
    if files:
        missing = [k for k in TLS_KEYS if not files.get(k)]
        if missing:
            raise ValueError(f"TLS credentials need {', '.join(TLS_KEYS)}; missing "
                             f"{', '.join(missing)}")
        for k in TLS_KEYS:
            v = files[k]
            data[k] = base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode()
    if token:
        data[SECRET_TOKEN] = base64.b64encode(token.encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"generateName": f"{cluster_name}-credentials-",
                         "labels": cluster_labels(cluster_name, "credentials")},
            "type": "kubernetes.io/tls" if files else "Opaque",
            "data": data}


def _apply_security(cluster: dict, podspec: dict, container_name: str) -> None:
    """The Secret of spec.security in one pod: volume, read-only mount and --tls-* arguments
    for TLS, TASKCORE_TOKEN from the Secret for a token. Arguments already naming
    --tls-ca-file (a custom command) are left alone."""
    sec = cluster_security(cluster)
    if sec is None:
        return
    for c in podspec.get("containers") or []:
        if c.get("name") != container_name:
            continue
        if sec["tls"]:
            volumes = podspec.setdefault("volumes", [])
            if not any(v.get("name") == CREDENTIALS_VOLUME for v in volumes):
                volumes.append({"name": CREDENTIALS_VOLUME, "secret": {
                    "secretName": sec["secretName"], "defaultMode": CREDENTIALS_MODE,
                    # the TLS files only: the token is not written into the pod
                    "items": [{"key": k, "path": k} for k in TLS_KEYS]}})
            mounts = c.setdefault("volumeMounts", [])
            if not any(m.get("name") == CREDENTIALS_VOLUME for m in mounts):
                mounts.append({"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_MOUNT,
                               "readOnly": True})
            words = [str(w) for w in (c.get("command") or []) + (c.get("args") or [])]
            if not any(w.split("=", 1)[0] == "--tls-ca-file" for w in words):
                c["args"] = list(c.get("args") or []) + [
                    "--tls-ca-file", f"{CREDENTIALS_MOUNT}/{SECRET_CA}",
                    "--tls-cert", f"{CREDENTIALS_MOUNT}/{SECRET_CERT}",
                    "--tls-key", f"{CREDENTIALS_MOUNT}/{SECRET_KEY}"]
        if sec["token"]:
            _inject_env(c, [{"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {
                "name": sec["secretName"], "key": SECRET_TOKEN}}}])


def template_hash(podspec: dict) -> str:
    return hashlib.sha256(json.dumps(podspec, sort_keys=True).encode()).hexdigest()[:10]


def scheduler_deployment(cluster: dict) -> dict:
    name = cluster["metadata"]["name"]
    podspec = copy.deepcopy(cluster["spec"]["scheduler"]["spec"])
    for c in podspec["containers"]:
        if c.get("name") == "scheduler":
            _inject_env(c, [_POD_IP, {"name": "TASKCORE_CLUSTER_NAME", "value": name}])
    _apply_security(cluster, podspec, "scheduler")
    labels = cluster_labels(name, "scheduler")
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": scheduler_name(name), "labels": labels,
                     "annotations": {ANNOTATION_TEMPLATE_HASH: template_hash(podspec)},
                     "ownerReferences": [owner_reference(cluster)]},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 # A new scheduler knows nothing of the old one's state: never run two.
                 "strategy": {"type": "Recreate"},
                 "template": {"metadata": {"labels": labels}, "spec": podspec}},
    }


def scheduler_service(cluster: dict) -> dict:
    name = cluster["metadata"]["name"]
    spec = copy.deepcopy(cluster["spec"]["scheduler"].get("service") or {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("ports", _service_ports())
    spec["selector"] = cluster_labels(name, "scheduler")
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": scheduler_name(name), "labels": cluster_labels(name, "scheduler"),
                         "ownerReferences": [owner_reference(cluster)]},
            "spec": spec}


def worker_pod(cluster: dict, group: dict, scheduler_address: str) -> dict:
    name = cluster["metadata"]["name"]
    podspec = copy.deepcopy(group["spec"])
    h = template_hash(podspec)
    for c in podspec["containers"]:
        if c.get("name") == "worker":
            _inject_env(c, [
                _POD_IP,
                {"name": "TASKCORE_WORKER_NAME",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "TASKCORE_SCHEDULER_ADDRESS", "value": scheduler_address},
                {"name": "TASKCORE_WORKER_GROUP", "value": group["name"]},
                {"name": "TASKCORE_CLUSTER_NAME", "value": name},
            ])
    _apply_security(cluster, podspec, "worker")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{name}-{group['name']}-",
                         "labels": cluster_labels(name, "worker", group["name"]),
                         "annotations": {ANNOTATION_TEMPLATE_HASH: h},
                         "ownerReferences": [owner_reference(cluster)]},
            "spec": podspec}


# -- the CRD -----------------------------------------------------------------------------------
_OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_SECURITY = {"type": "object", "required": ["secretName"], "properties": {
    "secretName": {"type": "string", "minLength": 1, "maxLength": 253},
    "tls": {"type": "boolean"},
    "token": {"type": "boolean"}}}
_ADAPT = {"type": "object", "properties": {
    "minimum": {"type": "integer", "minimum": 0},
    "maximum": {"type": "integer", "minimum": 0},
    "targetDuration": {"type": "number", "minimum": 0},
    "waitCount": {"type": "integer", "minimum": 1},
    "interval": {"type": "number", "minimum": 0.1}}}


def crd_manifest() -> dict:
    """The CustomResourceDefinition of TaskcoreCluster (deploy/kubernetes/crd.yaml)."""
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object", "required": ["scheduler", "workerGroups"],
                "properties": {
                    "idleTimeout": {"type": "number", "minimum": 0},
                    "security": _SECURITY,
                    "scheduler": {"type": "object", "required": ["spec"], "properties": {
                        "spec": _OPEN, "service": _OPEN}},
                    "workerGroups": {"type": "array", "items": {
                        "type": "object", "required": ["name", "spec"], "properties": {
                            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                     "maxLength": 30},
                            "replicas": {"type": "integer", "minimum": 0},
                            "spec": _OPEN, "adapt": _ADAPT}}},
                },
            },
            "status": _OPEN,
        },
    }
    printer = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Scheduler", "type": "string", "jsonPath": ".status.schedulerAddress"},
        {"name": "Dashboard", "type": "string", "jsonPath": ".status.dashboardAddress",
         "priority": 1},
        {"name": "Controller", "type": "string", "jsonPath": ".status.controller"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP, "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "listKind": f"{KIND}List"},
            "versions": [{"name": VERSION, "served": True, "storage": True,
                          "schema": {"openAPIV3Schema": schema},
                          "subresources": {"status": {}},
                          "additionalPrinterColumns": printer}],
        },
    }
