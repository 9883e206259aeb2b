"""KubeCluster: a taskcore cluster on Kubernetes, as a TaskcoreCluster resource.

The cluster's desired state lives in the resource, not in this object: this
class writes the resource (create, scale, adapt, add a group, delete) and
reads its status; a controller (controller.py) makes the pods match. That is
why KubeCluster derives from `Cluster` and not from `SpecCluster`: there is no
client-side spec of members to reconcile, and a cluster keeps being reconciled
(dead pods replaced, adaptive scaling) while no client is connected, when an
operator runs.

Who reconciles (`controller=`):
- "operator": `core-kube-operator` runs in the cluster; we wait for it to claim
  the resource (its `status.controller`), or fail after `operator_timeout`.
- "embedded": a Controller runs in this process, for this cluster only (the
  resource is labelled so an operator leaves it alone). Needs no operator,
  only the CRD installed and rights on pods, services and deployments in the
  namespace.
- "auto" (default): "operator" if one claims the resource within
  `operator_timeout` seconds, else "embedded".

Reaching the scheduler: in a pod, through the Service's cluster IP. Outside,
per `scheduler_service_type`: a NodePort on the node's address, a
LoadBalancer's ingress, or for ClusterIP a port-forward through the API server
when the cluster IP does not answer (`port_forward_cluster_ip=None`), always
(True) or never (False). The dashboard (port 8787 of the scheduler pod, the
Service's port named "dashboard") is reached the same way, with a port-forward
of its own where the scheduler's comm has one: `dashboard_link` is that.

Security (`security=`), as for SSHCluster: None (the default) makes throwaway
TLS credentials (`Security.temporary()`) and the cluster runs over tls://; a
`Security` is used as given (tls:// with its files, tcp:// with only a token);
False is plain tcp:// (with a warning, unless TASKCORE_TOKEN is set here). The
credentials go into a Secret `<name>-credentials-<random>` (the CA, certificate
and key under cert-manager's key names, and a token if there is one), made
before the resource and then owned by it, so Kubernetes deletes it with the
cluster. The resource names it in `spec.security`; resources.py mounts it
read-only into every pod and points the `--tls-*` options at the mount, and a
token reaches the containers as TASKCORE_TOKEN from the Secret, never in an
argument. `cluster.security` is what clients here use (`Client(cluster)` takes
it; through a port-forward too: TLS runs end to end). Connecting to an existing
cluster (`from_name`) reads the credentials back from the Secret into a private
temporary directory here, removed when this handle closes (at exit, when it
detaches: clients of this process may still need them).
"""
from __future__ import annotations

import asyncio
import atexit
import copy
import logging
import shutil
import time

from taskcore.deploy.cluster import Cluster, tcp_answers
from taskcore.deploy.kubernetes import resources as r
from taskcore.deploy.kubernetes import credentials as creds
from taskcore.deploy.kubernetes.api import ApiError, PortForward, connect_api, in_cluster
from taskcore.deploy.kubernetes.controller import Controller, set_replicas
from taskcore.deploy.kubernetes.reconcile import pod_problem, scheduler_address_of
from taskcore.security import Security, cluster_credentials

logger = logging.getLogger("taskcore.deploy.kubernetes")

__all__ = ["KubeCluster", "KubeClusterError"]

CREATE_MODES = ("create_or_connect", "create_only", "connect_only")
CONTROLLERS = ("auto", "operator", "embedded")


class KubeClusterError(RuntimeError):
    """The cluster could not start: a pod cannot run, or it took too long."""


def _load_spec(custom) -> dict:
    if isinstance(custom, dict):
        return copy.deepcopy(custom)
    import yaml

    with open(custom) as f:
        return yaml.safe_load(f)


class KubeCluster(Cluster):
    """A taskcore cluster on Kubernetes; see the module doc.

    `KubeCluster(name=None, namespace=None, image=..., n_workers=3, resources=None,
    env=None, worker_command=None, scheduler_service_type="ClusterIP",
    port_forward_cluster_ip=None, custom_cluster_spec=None, shutdown_on_close=True,
    idle_timeout=0, controller="auto", create_mode="create_or_connect",
    startup_timeout=300, operator_timeout=3, kubeconfig=None, context=None,
    nthreads=None, security=None, gpus=None, device_memory_limit=None,
    asynchronous=False)`.

    `gpus=1`: the default worker group is GPU workers, one GPU per pod (see
    `make_worker_spec`); `add_worker_group(..., gpus=1)` adds a GPU group beside CPU ones.

    `security`: None (the default) runs the cluster over tls:// with temporary
    credentials, kept in a Secret the resource owns; a `Security` is used as given;
    False is plain tcp://. See the module doc.
    """

    backend = "kubernetes"

    def __init__(self, name: str | None = None, namespace: str | None = None,
                 image: str = r.DEFAULT_IMAGE, n_workers: int = 3, resources: dict | None = None,
                 env=None, worker_command=None,
                 scheduler_service_type: str = "ClusterIP",
                 port_forward_cluster_ip: bool | None = None, custom_cluster_spec=None,
                 shutdown_on_close: bool = True, idle_timeout: float = 0,
                 controller: str = "auto", create_mode: str = "create_or_connect",
                 startup_timeout: float = 300, operator_timeout: float = 3.0,
                 kubeconfig: str | None = None, context: str | None = None,
                 nthreads: int | None = None, security=None, gpus: int | None = None,
                 device_memory_limit=None, asynchronous: bool = False):
        if security is not None and security is not False and not isinstance(security,
                                                                               Security):
            raise TypeError(f"security must be None (temporary TLS credentials), a Security or "
                            f"False (plain tcp), got {security!r}")
        if controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}, got {controller!r}")
        if create_mode not in CREATE_MODES:
            raise ValueError(f"create_mode must be one of {CREATE_MODES}, got {create_mode!r}")
        if custom_cluster_spec is not None:
            spec = _load_spec(custom_cluster_spec)
            if spec.get("kind") != r.KIND:
                raise ValueError(f"custom_cluster_spec must be a {r.KIND} resource, got kind "
                                 f"{spec.get('kind')!r}")
            name = name or (spec.get("metadata") or {}).get("name")
        else:
            spec = None
        if name is None:
            import uuid

            name = f"taskcore-{uuid.uuid4().hex[:8]}"
        if spec is None and create_mode != "connect_only":
            spec = r.make_cluster_spec(name, image=image, n_workers=n_workers,
                                       resources=resources, env=env,
                                       worker_command=worker_command,
                                       scheduler_service_type=scheduler_service_type,
                                       idle_timeout=idle_timeout, nthreads=nthreads,
                                       gpus=gpus, device_memory_limit=device_memory_limit)
        if spec is not None:
            spec.setdefault("metadata", {})["name"] = name
            r.validate_cluster(spec)
        self.namespace = namespace
        self.port_forward_cluster_ip = port_forward_cluster_ip
        self.controller_mode = controller
        self.create_mode = create_mode
        self.startup_timeout = float(startup_timeout)
        self.operator_timeout = float(operator_timeout)
        self.kubeconfig = kubeconfig
        self.context = context
        self._spec = spec
        self._api = None
        self._controller: Controller | None = None
        self._forward: PortForward | None = None
        self._dashboard_forward: PortForward | None = None
        self._dashboard_endpoint: tuple | None = None   # (host, port) of the dashboard from here
        self._address: str | None = None
        self._created_here = False
        self._resource: dict | None = None
        self._security_arg = security
        self.security = None            # what clients here use; set when started
        self._own_credentials: str | None = None   # a local directory of credentials
        self._unowned_secret: str | None = None    # a Secret made here, not yet owned
        self._detached = False
        super().__init__(asynchronous=asynchronous, name=name,
                         shutdown_on_close=shutdown_on_close)
        if not asynchronous:
            self._start_sync()

    # -- starting ------------------------------------------------------------------------------
    async def _start(self):
        self._api = await connect_api(self.kubeconfig, self.context)
        self.namespace = self.namespace or self._api.namespace
        existing = await self._get_resource()
        if existing is not None and self.create_mode == "create_only":
            raise KubeClusterError(f"a {r.KIND} named {self.name!r} already exists in "
                                   f"namespace {self.namespace!r} (create_mode='create_only')")
        if existing is None and self.create_mode == "connect_only":
            raise KubeClusterError(f"no {r.KIND} named {self.name!r} in namespace "
                                   f"{self.namespace!r}")
        if existing is None:
            await self._ensure_crd()
            body = copy.deepcopy(self._spec)
            body["metadata"]["namespace"] = self.namespace
            if self.controller_mode == "embedded":
                body["metadata"].setdefault("labels", {})[r.LABEL_CONTROLLER] = "embedded"
            await self._make_credentials(body)
            self._resource = await self._api.create_cluster(self.namespace, body)
            self._created_here = True
            self._log(logging.INFO, "%s: created %s %s/%s", self.name, r.KIND, self.namespace,
                      self.name)
            await self._own_secret()
        else:
            # Before adopting it: a failed start closes what it adopted (deletes it).
            await self._read_credentials(existing)
            self._resource = existing
            self._log(logging.INFO, "%s: connecting to the existing %s", self.name, r.KIND)
        await self._choose_controller()
        await self._wait_for_scheduler()
        self._address = await self._client_address()
        self._log(logging.INFO, "%s: scheduler at %s", self.name, self._address)
        await self._learn_dashboard()

    async def _get_resource(self) -> dict | None:
        try:
            return await self._api.get_cluster(self.namespace, self.name)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def _ensure_crd(self):
        if await self._api.crd_installed():
            return
        try:
            await self._api.install_crd()
        except ApiError as e:
            raise KubeClusterError(
                f"the {r.KIND} CustomResourceDefinition is not installed and we may not install "
                f"it ({e}); a cluster admin installs it once with "
                f"`kubectl apply -f deploy/kubernetes/crd.yaml`") from None

    # -- credentials -------------------------------------------------------------------------------
    async def _make_credentials(self, body):
        """A new cluster's credentials: `self.security` for clients here, and a Secret named
        in the resource's spec.security for its pods (none for plain tcp:// without a
        token, which gets the one warning)."""
        if r.cluster_security(body) is not None:
            return await self._read_credentials(body)     # a custom spec naming its Secret
        security, token, self._own_credentials = cluster_credentials(
            self._security_arg, self.name, lambda text: self._log(logging.WARNING, "%s", text))
        self.security = security
        tls = security is not None and security.enabled
        if not tls and token is None:
            return
        secret = r.credentials_secret(self.name, creds.tls_files(security) if tls else None,
                                      token)
        try:
            made = await self._api.create_secret(self.namespace, secret)
        except ApiError as e:
            if e.status != 403:
                raise
            raise KubeClusterError(f"{self.name}: may not create the Secret that carries the "
                                   f"cluster's credentials to its pods ({e}); the Role in "
                                   f"deploy/kubernetes/user-role.yaml grants it (or give "
                                   f"security=False for plain tcp://)") from None
        self._unowned_secret = made["metadata"]["name"]
        body["spec"]["security"] = r.security_spec(self._unowned_secret, tls=tls,
                                                   token=token is not None)
        self._log(logging.INFO, "%s: credentials (%s) in Secret %s/%s", self.name,
                  " and ".join(w for w, on in (("TLS", tls), ("a token", token)) if on),
                  self.namespace, self._unowned_secret)

    async def _own_secret(self):
        """The resource now exists: make it the Secret's owner (deleted with it)."""
        name = self._unowned_secret
        if name is None:
            return
        ref = dict(r.owner_reference(self._resource))
        # Not blockOwnerDeletion: that needs the finalizers subresource of the resource
        # where OwnerReferencesPermissionEnforcement is on; foreground deletion of the
        # resource need not wait for its Secret.
        ref.pop("blockOwnerDeletion", None)
        await self._api.set_secret_owner(self.namespace, name, ref)
        self._unowned_secret = None

    async def _read_credentials(self, resource):
        """An existing cluster: the credentials clients here use, read from the Secret its
        spec.security names (a Security given is used as is)."""
        sec = r.cluster_security(resource)
        given = self._security_arg
        if isinstance(given, Security) or sec is None:
            self.security = given if isinstance(given, Security) else None
            if sec is None:
                self._log(logging.INFO, "%s: the cluster runs over plain tcp:// (its resource "
                          "has no spec.security)", self.name)
            return
        where = f"{self.namespace}/{sec['secretName']}"
        if given is False:
            raise KubeClusterError(f"{self.name} runs with the credentials in Secret {where} "
                                   f"(spec.security): security=False cannot connect to it "
                                   f"(leave security=None to read them)")
        try:
            secret = await self._api.get_secret(self.namespace, sec["secretName"])
        except ApiError as e:
            if e.status == 403:
                raise KubeClusterError(f"{self.name}: may not read Secret {where}, which holds "
                                       f"the cluster's credentials ({e}); the Role in "
                                       f"deploy/kubernetes/user-role.yaml grants it") from None
            raise
        if secret is None:
            raise KubeClusterError(f"{self.name}: Secret {where}, named by the resource's "
                                   f"spec.security, does not exist")
        try:
            self.security, self._own_credentials = creds.security_from_secret(secret, sec)
        except creds.CredentialsError as e:
            raise KubeClusterError(f"{self.name}: {e}") from None
        self._log(logging.INFO, "%s: using the credentials in Secret %s", self.name, where)

    async def _security_for(self, cluster):
        return self.security

    def _remove_local_credentials(self):
        path, self._own_credentials = self._own_credentials, None
        if not path:
            return
        if self._detached:
            # The cluster lives on: a client of this process may reconnect with these.
            atexit.register(shutil.rmtree, path, True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    async def _choose_controller(self):
        labels = self._resource["metadata"].get("labels") or {}
        if labels.get(r.LABEL_CONTROLLER) == "embedded":
            return await self._embed()
        if self.controller_mode == "embedded":
            return await self._label_embedded()
        deadline = time.monotonic() + self.operator_timeout
        while time.monotonic() < deadline:
            res = await self._get_resource()
            if res is None:
                raise KubeClusterError(f"{r.KIND} {self.name} was deleted while starting")
            self._resource = res
            owner = (res.get("status") or {}).get("controller") or ""
            if owner.startswith("operator/"):
                self._log(logging.INFO, "%s: reconciled by %s", self.name, owner)
                return
            await asyncio.sleep(0.2)
        if self.controller_mode == "operator":
            raise KubeClusterError(f"no taskcore operator claimed {self.name} within "
                                   f"{self.operator_timeout:g} s (is core-kube-operator running?)")
        await self._label_embedded()

    async def _label_embedded(self):
        def label(res):
            if ((res.get("status") or {}).get("controller") or "").startswith("operator/"):
                return False          # an operator claimed it after all
            res["metadata"].setdefault("labels", {})[r.LABEL_CONTROLLER] = "embedded"

        self._resource = await self._api.update_cluster(self.namespace, self.name, label)
        if self._resource is None:
            raise KubeClusterError(f"{r.KIND} {self.name} was deleted while starting")
        if (self._resource["metadata"].get("labels") or {}).get(r.LABEL_CONTROLLER) == "embedded":
            await self._embed()

    async def _embed(self):
        self._log(logging.INFO, "%s: no operator; reconciling in this process", self.name)
        self._controller = Controller(self._api, self.namespace, only=self.name,
                                      address_for=self._address_from_here,
                                      security_for=self._security_for, resync=2.0)
        await self._controller.start()

    async def _wait_for_scheduler(self):
        deadline = time.monotonic() + self.startup_timeout
        while True:
            res = await self._get_resource()
            if res is None:
                raise KubeClusterError(f"{r.KIND} {self.name} was deleted while starting")
            self._resource = res
            status = res.get("status") or {}
            if status.get("phase") == "Failed":
                raise KubeClusterError(f"{self.name} failed: {status.get('message')}")
            pods = await self._api.list_pods(self.namespace, f"{r.LABEL_CLUSTER}={self.name}")
            for pod in pods:
                problem = pod_problem(pod)
                if problem:
                    raise KubeClusterError(await self._explain(pod, problem))
            if status.get("phase") == "Running" and status.get("schedulerAddress"):
                return
            if time.monotonic() > deadline:
                phases = {p["metadata"]["name"]: (p.get("status") or {}).get("phase")
                          for p in pods}
                raise KubeClusterError(f"{self.name}: the scheduler was not running after "
                                       f"{self.startup_timeout:g} s (pods: {phases}; "
                                       f"status: {status})")
            await asyncio.sleep(0.25)

    async def _explain(self, pod, problem) -> str:
        name = pod["metadata"]["name"]
        container = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("name")
        logs = await self._api.pod_log(self.namespace, name, container, tail_lines=20)
        if not logs.strip():
            logs = await self._api.pod_log(self.namespace, name, container, tail_lines=20,
                                           previous=True)
        tail = "\n".join("    " + line for line in logs.rstrip().splitlines()[-20:])
        return f"{self.name} cannot start: {problem}" + (
            f"\n  last log lines of {name}:\n{tail}" if tail else "")

    # -- where the scheduler is, seen from here --------------------------------------------------
    async def _client_address(self) -> str:
        svc = await self._api.get_service(self.namespace, r.scheduler_name(self.name))
        protocol = r.comm_protocol(self._resource)
        inner = scheduler_address_of(svc, protocol)
        if in_cluster():
            return inner
        kind = (svc.get("spec") or {}).get("type", "ClusterIP")
        port = next(p for p in svc["spec"]["ports"] if p.get("name") == "tcp-comm")
        if kind == "NodePort":
            return f"{protocol}://{await self._node_address()}:{port['nodePort']}"
        if kind == "LoadBalancer":
            return protocol + "://" + (await self._load_balancer_address(port)).split("://")[1]
        if self.port_forward_cluster_ip is False:
            return inner
        if self.port_forward_cluster_ip is None and await tcp_answers(
                *inner.split("://", 1)[1].rsplit(":", 1)):
            return inner
        self._forward = PortForward(self._api, self.namespace, self._scheduler_pod,
                                    r.SCHEDULER_PORT)
        # The forward carries bytes: TLS runs end to end, from here to the scheduler.
        address = protocol + "://" + (await self._forward.start()).split("://", 1)[1]
        self._log(logging.INFO, "%s: port-forwarding %s to the scheduler pod", self.name,
                  address)
        return address

    # -- where the dashboard is, seen from here -------------------------------------------------
    async def _open_dashboard_route(self, info):
        """Reach the dashboard the way the scheduler is reached: the Service's "dashboard"
        port (its cluster IP in a pod, its node port, its load balancer), else a second
        port-forward to the scheduler pod (when the comm goes through one, the cluster IP
        does not answer, or the Service has no dashboard port: a custom spec)."""
        svc = await self._api.get_service(self.namespace, r.scheduler_name(self.name))
        spec = svc.get("spec") or {}
        port = next((p for p in spec.get("ports") or [] if p.get("name") == "dashboard"), None)
        ip = spec.get("clusterIP")
        if port is not None:
            kind = spec.get("type", "ClusterIP")
            if in_cluster() and ip and ip != "None":
                self._dashboard_endpoint = (ip, port["port"])
                return
            if kind == "NodePort":
                self._dashboard_endpoint = (await self._node_address(), port["nodePort"])
                return
            if kind == "LoadBalancer":
                host = (await self._load_balancer_address(port)).split("://", 1)[1]
                self._dashboard_endpoint = (host.rsplit(":", 1)[0].strip("[]"), port["port"])
                return
            if ip and ip != "None" and self._forward is None and (
                    self.port_forward_cluster_ip is False
                    or (self.port_forward_cluster_ip is None
                        and await tcp_answers(ip, port["port"]))):
                self._dashboard_endpoint = (ip, port["port"])
                return
        if in_cluster() or self.port_forward_cluster_ip is False:
            return          # the pod's own address, as the scheduler reported it
        self._dashboard_forward = PortForward(self._api, self.namespace, self._scheduler_pod,
                                              int(info["dashboard_port"]))
        address = await self._dashboard_forward.start()
        host, local = address.split("://", 1)[1].rsplit(":", 1)
        self._dashboard_endpoint = (host, int(local))
        self._log(logging.INFO, "%s: port-forwarding %s to the scheduler pod's dashboard",
                  self.name, address)

    def _dashboard_route(self, info):
        if self._dashboard_endpoint is None:
            return info, info.get("dashboard_host")
        host, port = self._dashboard_endpoint
        return {**info, "dashboard_host": host, "dashboard_port": port}, host

    async def _close_dashboard_route(self):
        self._dashboard_endpoint = None
        forward, self._dashboard_forward = self._dashboard_forward, None
        if forward is not None:
            await forward.close()

    async def _address_from_here(self, cluster) -> str | None:
        if self._address is not None:
            return self._address
        svc = await self._api.get_service(self.namespace, r.scheduler_name(self.name))
        return scheduler_address_of(svc, r.comm_protocol(cluster))

    async def _scheduler_pod(self) -> str | None:
        pods = await self._api.list_pods(
            self.namespace, f"{r.LABEL_CLUSTER}={self.name},{r.LABEL_COMPONENT}=scheduler")
        for p in pods:
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in (p.get("status") or {}).get("conditions") or [])
            if ready and not p["metadata"].get("deletionTimestamp"):
                return p["metadata"]["name"]
        return None

    async def _node_address(self) -> str:
        pods = await self._api.list_pods(
            self.namespace, f"{r.LABEL_CLUSTER}={self.name},{r.LABEL_COMPONENT}=scheduler")
        for p in pods:
            host = (p.get("status") or {}).get("hostIP")
            if host:
                return host
        raise KubeClusterError(f"{self.name}: the scheduler pod has no node address yet")

    async def _load_balancer_address(self, port) -> str:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            svc = await self._api.get_service(self.namespace, r.scheduler_name(self.name))
            for ing in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
                host = ing.get("ip") or ing.get("hostname")
                if host:
                    return f"tcp://{host}:{port['port']}"
            await asyncio.sleep(0.5)
        raise KubeClusterError(f"{self.name}: the LoadBalancer got no address in "
                               f"{self.startup_timeout:g} s")

    @property
    def scheduler_address(self) -> str | None:
        return self._address

    # -- scaling ---------------------------------------------------------------------------------
    def scale(self, n: int | None = None, worker_group: str = r.DEFAULT_GROUP, **kwargs):
        """Set the number of workers of one group (ends that group's adaptive mode).
        Scaling down retires the chosen workers through the scheduler before their pods go."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        return self.sync(self._scale, n, worker_group=worker_group)

    async def _scale(self, n, worker_group=r.DEFAULT_GROUP, **kwargs):
        if n is None or int(n) < 0:
            raise ValueError(f"n must be a number of workers >= 0, got {n!r}")
        self._resource = await set_replicas(self._api, self.namespace, self.name,
                                            {worker_group: int(n)}, keep_adapt=False)

    async def _scale_down(self, workers):
        """Retire these workers (pod names): their groups shrink by as many, and exactly
        these go (marked for the controller, which retires them through the scheduler,
        data first, like any scale-down). Waits until their pods are gone."""
        pods = {p["metadata"]["name"]: p for p in await self._api.list_pods(
            self.namespace, f"{r.LABEL_CLUSTER}={self.name},{r.LABEL_COMPONENT}=worker")}
        unknown = [w for w in workers if w not in pods]
        if unknown:
            raise ValueError(f"{self.name} has no worker pods {unknown}")
        counts: dict = {}
        for w in workers:
            await self._api.annotate_pod(self.namespace, w, {r.ANNOTATION_RETIRE: "requested"})
            g = pods[w]["metadata"]["labels"].get(r.LABEL_GROUP)
            counts[g] = counts.get(g, 0) + 1
        res = await self._get_resource()
        current = {g["name"]: int(g.get("replicas", 0)) for g in res["spec"]["workerGroups"]}
        self._resource = await set_replicas(
            self._api, self.namespace, self.name,
            {g: max(0, current.get(g, 0) - c) for g, c in counts.items() if g in current},
            keep_adapt=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = {p["metadata"]["name"] for p in await self._api.list_pods(
                self.namespace, f"{r.LABEL_CLUSTER}={self.name},{r.LABEL_COMPONENT}=worker")}
            if not left & set(workers):
                return
            await asyncio.sleep(0.25)
        raise KubeClusterError(f"{self.name}: workers {sorted(set(workers) & left)} were not "
                               f"retired within 120 s")

    def adapt(self, minimum: int = 0, maximum: int | None = None, worker_group: str =
              r.DEFAULT_GROUP, target_duration: float = 5.0, wait_count: int = 3,
              interval: float = 1.0):
        """Let the controller scale this group between `minimum` and `maximum` by load.
        Other groups are not touched; `scale(n, worker_group)` ends it."""
        if minimum < 0 or (maximum is not None and maximum < minimum):
            raise ValueError(f"need 0 <= minimum <= maximum, got {minimum}..{maximum}")
        bounds = {"minimum": int(minimum), "targetDuration": float(target_duration),
                  "waitCount": int(wait_count), "interval": float(interval)}
        if maximum is not None:
            bounds["maximum"] = int(maximum)

        async def _adapt():
            self._resource = await set_replicas(self._api, self.namespace, self.name, {},
                                                keep_adapt=True, adapt={worker_group: bounds})
            return bounds
        return self.sync(_adapt)

    def add_worker_group(self, name: str, n_workers: int = 3, image: str | None = None,
                         resources: dict | None = None, env=None, worker_command=None,
                         custom_spec: dict | None = None, gpus: int | None = None,
                         device_memory_limit=None):
        """Add a worker group (`make_worker_spec` arguments, or a whole group spec)."""
        container = self._resource["spec"]["workerGroups"][0]["spec"]["containers"][0] \
            if self._resource["spec"].get("workerGroups") else {}
        group = copy.deepcopy(custom_spec) if custom_spec is not None else r.make_worker_spec(
            image=image or container.get("image", r.DEFAULT_IMAGE), n_workers=n_workers,
            resources=resources, env=env, worker_command=worker_command, name=name, gpus=gpus,
            device_memory_limit=device_memory_limit)
        group["name"] = name
        return self.sync(self._edit_groups, lambda groups: groups + [group]
                         if all(g["name"] != name for g in groups) else _exists(name))

    def delete_worker_group(self, name: str):
        """Remove a worker group; its workers are retired first."""
        return self.sync(self._edit_groups, lambda groups: [g for g in groups if g["name"] != name]
                         if any(g["name"] == name for g in groups) else _missing(name))

    async def _edit_groups(self, edit):
        def change(res):
            res["spec"]["workerGroups"] = edit(res["spec"].get("workerGroups") or [])
            r.validate_cluster(res)

        res = await self._api.update_cluster(self.namespace, self.name, change)
        if res is None:
            raise KubeClusterError(f"{r.KIND} {self.name} no longer exists")
        self._resource = res

    # -- introspection ----------------------------------------------------------------------------
    def _count_workers(self) -> int:
        groups = ((self._resource or {}).get("status") or {}).get("groups") or {}
        return sum(int(g.get("ready", 0)) for g in groups.values())

    def _planned_workers(self, worker_group=None) -> int:
        groups = (self._resource or {}).get("spec", {}).get("workerGroups") or []
        return sum(int(g.get("replicas", 0)) for g in groups
                   if worker_group is None or g["name"] == worker_group)

    def _summary(self) -> dict:
        return {"workers": self._count_workers(), "threads": None, "memory": None}

    def _extra_summary(self) -> list:
        res = self._resource or {}
        out = [("namespace", self.namespace)]
        for g in (res.get("spec") or {}).get("workerGroups") or []:
            adapt = g.get("adapt")
            out.append((f"group {g['name']}", f"{g.get('replicas', 0)} replicas" + (
                f", adapting {adapt.get('minimum', 0)}..{adapt.get('maximum', 'inf')}"
                if adapt else "")))
        if self._controller is not None:
            out.append(("controller", "embedded"))
        sec = r.cluster_security(res) if res else None
        if sec is not None:
            out.append(("security", f"{'tls://' if sec['tls'] else 'tcp://'}"
                                    f"{', token' if sec['token'] else ''}, Secret "
                                    f"{sec['secretName']}"))
        elif res:
            out.append(("security", "plain tcp://"))
        return out

    async def _gather_logs(self, cluster, scheduler, workers):
        out = await super()._gather_logs(cluster, scheduler, workers)
        for pod in await self._api.list_pods(self.namespace, f"{r.LABEL_CLUSTER}={self.name}"):
            comp = pod["metadata"]["labels"].get(r.LABEL_COMPONENT)
            if (comp == "scheduler" and scheduler) or (comp == "worker" and workers):
                name = pod["metadata"]["name"]
                out[name] = await self._api.pod_log(self.namespace, name,
                                                    "scheduler" if comp == "scheduler"
                                                    else "worker")
        return out

    def refresh(self):
        """Reread the resource (status: phase, workers per group)."""
        async def _refresh():
            self._resource = await self._get_resource()
            return self._resource
        return self.sync(_refresh)

    # -- closing ---------------------------------------------------------------------------------
    async def _close(self):
        """Delete the resource; Kubernetes' garbage collector deletes the rest. Waits
        (bounded) until no pod of the cluster is left."""
        if self._api is None:
            return
        await self._stop_local()
        if self._unowned_secret is not None:       # a start that failed before owning it
            try:
                await self._api.delete_secret(self.namespace, self._unowned_secret)
                self._unowned_secret = None
            except ApiError as e:
                self._log(logging.WARNING, "%s: could not delete Secret %s: %s", self.name,
                          self._unowned_secret, e)
        if self._resource is not None or self._created_here:
            await self._api.delete_cluster(self.namespace, self.name)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pods = await self._api.list_pods(self.namespace,
                                                 f"{r.LABEL_CLUSTER}={self.name}")
                if not pods:
                    break
                await asyncio.sleep(0.25)
            else:
                self._log(logging.WARNING, "%s: pods still terminating after 60 s", self.name)
        self._remove_local_credentials()       # no process of the cluster is left

    async def _detach(self):
        """Leave the cluster running. Without an operator it is no longer reconciled until a
        client reconnects (`from_name`); dropping our label lets an operator take it over.
        Its Secret stays with it, for whoever connects next."""
        self._detached = True
        await self._stop_local()

        def unlabel(res):
            if (res["metadata"].get("labels") or {}).pop(r.LABEL_CONTROLLER, None) is None:
                return False

        try:
            await self._api.update_cluster(self.namespace, self.name, unlabel)
        except ApiError as e:
            self._log(logging.WARNING, "%s: could not hand over to an operator: %s",
                      self.name, e)

    async def _stop_local(self):
        if self._controller is not None:
            await self._controller.stop()
            self._controller = None
        if self._forward is not None:
            await self._forward.close()
            self._forward = None

    async def _release(self):
        if self._api is not None:
            await self._api.close()
            self._api = None
        self._remove_local_credentials()

    # -- reconnecting ------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, namespace: str | None = None, asynchronous: bool = False,
                  shutdown_on_close: bool = False, **kwargs):
        """Connect to the running TaskcoreCluster `name` (the API server is the registry).
        `close()` then detaches again unless `shutdown_on_close=True`. Its credentials are
        read from the Secret its spec.security names, unless `security=` gives them."""
        return cls(name=name, namespace=namespace, create_mode="connect_only",
                   shutdown_on_close=shutdown_on_close, asynchronous=asynchronous,
                   controller=kwargs.pop("controller", "auto"), **kwargs)

    @classmethod
    def _from_registry(cls, entry, asynchronous=False, shutdown_on_close=False, **kwargs):
        return cls.from_name(entry["name"], namespace=entry.get("namespace"),
                             asynchronous=asynchronous, shutdown_on_close=shutdown_on_close,
                             **kwargs)


def _exists(name):
    raise ValueError(f"worker group {name!r} already exists")


def _missing(name):
    raise ValueError(f"no worker group {name!r}")
