"""Talking to the Kubernetes API: configuration, the few calls we make, port-forwarding.

Everything kubernetes_asyncio-specific lives here, so the rest of the package
deals in plain dicts. kubernetes_asyncio is the `kubernetes` extra and is
imported on first use, with a message saying how to install it.

Configuration, in order: in-cluster (a pod's service account: the
KUBERNETES_SERVICE_HOST variable and the token mounted at
/var/run/secrets/kubernetes.io/serviceaccount, or the folder named by
TASKCORE_KUBE_SERVICEACCOUNT_DIR), else a kubeconfig file ($KUBECONFIG or
~/.kube/config, or the one passed).
"""
from __future__ import annotations

import asyncio
import logging
import os
import struct

from taskcore.deploy.kubernetes import resources as r

logger = logging.getLogger("taskcore.deploy.kubernetes")

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

__all__ = ["KubeAPI", "connect_api", "ApiError", "PortForward"]


def _kubernetes():
    try:
        import kubernetes_asyncio
        import kubernetes_asyncio.client  # noqa: F401
        import kubernetes_asyncio.config  # noqa: F401
        import kubernetes_asyncio.watch  # noqa: F401
    except ImportError as e:
        raise ImportError("taskcore's Kubernetes support needs kubernetes_asyncio: "
                          "pip install 'taskcore[kubernetes]'") from e
    return kubernetes_asyncio


class ApiError(RuntimeError):
    """A Kubernetes API call failed; `status` is the HTTP code, `reason` the Status reason."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"Kubernetes API error {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def _api_error(e) -> ApiError:
    import json

    reason, message = getattr(e, "reason", "") or "", str(getattr(e, "body", "") or e)
    try:
        body = json.loads(e.body)
        reason, message = body.get("reason", reason), body.get("message", message)
    except Exception:
        pass
    return ApiError(int(getattr(e, "status", 0) or 0), reason, message)


def in_cluster() -> bool:
    sa = os.environ.get("TASKCORE_KUBE_SERVICEACCOUNT_DIR", SERVICEACCOUNT_DIR)
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(
        os.path.join(sa, "token"))


async def connect_api(kubeconfig: str | None = None, context: str | None = None) -> "KubeAPI":
    """A KubeAPI configured in-cluster or from a kubeconfig; its default namespace set."""
    k8s = _kubernetes()
    cfg = k8s.client.Configuration()
    namespace = "default"
    if kubeconfig is None and in_cluster():
        from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

        sa = os.environ.get("TASKCORE_KUBE_SERVICEACCOUNT_DIR", SERVICEACCOUNT_DIR)
        InClusterConfigLoader(token_filename=os.path.join(sa, "token"),
                              cert_filename=os.path.join(sa, "ca.crt")).load_and_set(cfg)
        try:
            with open(os.path.join(sa, "namespace")) as f:
                namespace = f.read().strip() or namespace
        except OSError:
            pass
    else:
        # Read $KUBECONFIG now: kubernetes_asyncio reads it once, when first imported.
        kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
        paths = [os.path.expanduser(p) for p in
                 (kubeconfig or "~/.kube/config").split(os.pathsep) if p]
        if not any(os.path.exists(p) for p in paths):
            raise RuntimeError(f"no Kubernetes configuration: not in a pod, and no kubeconfig "
                               f"file at {os.pathsep.join(paths)}")
        try:
            await k8s.config.load_kube_config(config_file=kubeconfig, context=context,
                                              client_configuration=cfg)
        except Exception as e:
            raise RuntimeError(f"no Kubernetes configuration: not in a pod, and the kubeconfig "
                               f"({kubeconfig or os.environ.get('KUBECONFIG') or '~/.kube/config'}) "
                               f"could not be loaded: {e}") from e
        try:
            _, active = k8s.config.list_kube_config_contexts(config_file=kubeconfig)
            namespace = (active or {}).get("context", {}).get("namespace") or namespace
        except Exception:
            pass
    return KubeAPI(k8s.client.ApiClient(configuration=cfg), cfg, namespace)


class KubeAPI:
    """The calls the controller and KubeCluster make, on dicts, errors as ApiError."""

    def __init__(self, api_client, configuration, namespace: str):
        k8s = _kubernetes()
        self.client = api_client
        self.configuration = configuration
        self.namespace = namespace
        self.core = k8s.client.CoreV1Api(api_client)
        self.apps = k8s.client.AppsV1Api(api_client)
        self.custom = k8s.client.CustomObjectsApi(api_client)
        self.ext = k8s.client.ApiextensionsV1Api(api_client)
        self._k8s = k8s

    async def close(self):
        await self.client.close()

    async def _call(self, fn, *args, **kwargs):
        try:
            out = await fn(*args, **kwargs)
        except self._k8s.client.exceptions.ApiException as e:
            raise _api_error(e) from None
        if out is None or isinstance(out, (dict, str)):
            return out
        return self.client.sanitize_for_serialization(out)

    # -- the custom resource -------------------------------------------------------------------
    async def crd_installed(self) -> bool:
        try:
            await self._call(self.ext.read_custom_resource_definition, f"{r.PLURAL}.{r.GROUP}")
            return True
        except ApiError as e:
            if e.status in (403, 404):
                return False
            raise

    async def install_crd(self):
        try:
            await self._call(self.ext.create_custom_resource_definition, r.crd_manifest())
        except ApiError as e:
            if e.status != 409:
                raise

    async def get_cluster(self, ns: str, name: str) -> dict:
        return await self._call(self.custom.get_namespaced_custom_object,
                                r.GROUP, r.VERSION, ns, r.PLURAL, name)

    async def list_clusters(self, ns: str | None, label_selector: str | None = None) -> dict:
        kw = {"label_selector": label_selector} if label_selector else {}
        if ns is None:
            return await self._call(self.custom.list_cluster_custom_object,
                                    r.GROUP, r.VERSION, r.PLURAL, **kw)
        return await self._call(self.custom.list_namespaced_custom_object,
                                r.GROUP, r.VERSION, ns, r.PLURAL, **kw)

    async def create_cluster(self, ns: str, body: dict) -> dict:
        return await self._call(self.custom.create_namespaced_custom_object,
                                r.GROUP, r.VERSION, ns, r.PLURAL, body)

    async def replace_cluster(self, ns: str, body: dict) -> dict:
        """PUT with the body's resourceVersion: ApiError 409 if someone changed it since."""
        return await self._call(self.custom.replace_namespaced_custom_object,
                                r.GROUP, r.VERSION, ns, r.PLURAL, body["metadata"]["name"], body)

    async def update_cluster(self, ns: str, name: str, edit, current: dict | None = None,
                             attempts: int = 10) -> dict | None:
        """Read the resource (or start from `current`), `edit(obj)` it in place and PUT it
        with the resourceVersion it was read at; on 409 Conflict read and edit again. An
        `edit` returning False leaves the resource as it is. Returns the resource now, or
        None if it does not exist."""
        for _ in range(attempts):
            if current is not None:
                obj, current = current, None
            else:
                try:
                    obj = await self.get_cluster(ns, name)
                except ApiError as e:
                    if e.status == 404:
                        return None
                    raise
            if edit(obj) is False:
                return obj
            try:
                return await self.replace_cluster(ns, obj)
            except ApiError as e:
                if e.status != 409:
                    raise
        raise ApiError(409, "Conflict", f"{ns}/{name} kept changing under us "
                                        f"({attempts} attempts)")

    async def replace_cluster_status(self, ns: str, body: dict) -> dict:
        return await self._call(self.custom.replace_namespaced_custom_object_status,
                                r.GROUP, r.VERSION, ns, r.PLURAL, body["metadata"]["name"], body)

    async def delete_cluster(self, ns: str, name: str):
        try:
            await self._call(self.custom.delete_namespaced_custom_object,
                             r.GROUP, r.VERSION, ns, r.PLURAL, name)
        except ApiError as e:
            if e.status != 404:
                raise

    # -- children --------------------------------------------------------------------------
    async def children(self, ns: str, cluster: str) -> tuple:
        """(scheduler Deployment or None, scheduler Service or None, [pods]) of a cluster."""
        sel = f"{r.LABEL_CLUSTER}={cluster}"
        deps, svcs, pods = await asyncio.gather(
            self._call(self.apps.list_namespaced_deployment, ns, label_selector=sel),
            self._call(self.core.list_namespaced_service, ns, label_selector=sel),
            self._call(self.core.list_namespaced_pod, ns, label_selector=sel))
        name = r.scheduler_name(cluster)
        dep = next((d for d in deps["items"] if d["metadata"]["name"] == name), None)
        svc = next((s for s in svcs["items"] if s["metadata"]["name"] == name), None)
        return dep, svc, pods["items"]

    async def pod_listing(self, ns: str | None, label_selector: str | None = None) -> dict:
        """A PodList (with its resourceVersion) in one namespace, or in all (`ns=None`)."""
        kw = {"label_selector": label_selector} if label_selector else {}
        if ns is None:
            return await self._call(self.core.list_pod_for_all_namespaces, **kw)
        return await self._call(self.core.list_namespaced_pod, ns, **kw)

    async def list_pods(self, ns: str, label_selector: str) -> list:
        return (await self._call(self.core.list_namespaced_pod, ns,
                                 label_selector=label_selector))["items"]

    async def create(self, ns: str, kind: str, body: dict) -> dict:
        fn = {"Pod": self.core.create_namespaced_pod,
              "Service": self.core.create_namespaced_service,
              "Deployment": self.apps.create_namespaced_deployment}[kind]
        return await self._call(fn, ns, body)

    async def delete(self, ns: str, kind: str, name: str, grace: int | None = None):
        fn = {"Pod": self.core.delete_namespaced_pod,
              "Service": self.core.delete_namespaced_service,
              "Deployment": self.apps.delete_namespaced_deployment}[kind]
        kw = {} if grace is None else {"grace_period_seconds": grace}
        try:
            await self._call(fn, name, ns, **kw)
        except ApiError as e:
            if e.status != 404:
                raise

    async def annotate_pod(self, ns: str, name: str, annotations: dict):
        await self._call(self.core.patch_namespaced_pod, name, ns,
                         {"metadata": {"annotations": annotations}},
                         _content_type="application/merge-patch+json")

    # -- secrets (a cluster's credentials, credentials.py) --------------------------------------
    async def create_secret(self, ns: str, body: dict) -> dict:
        return await self._call(self.core.create_namespaced_secret, ns, body)

    async def get_secret(self, ns: str, name: str) -> dict | None:
        try:
            return await self._call(self.core.read_namespaced_secret, name, ns)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def set_secret_owner(self, ns: str, name: str, owner_reference: dict) -> dict:
        """Make `owner_reference` the Secret's only owner (a merge patch), so that the
        garbage collector deletes the Secret with its owner."""
        return await self._call(self.core.patch_namespaced_secret, name, ns,
                                {"metadata": {"ownerReferences": [owner_reference]}},
                                _content_type="application/merge-patch+json")

    async def delete_secret(self, ns: str, name: str):
        try:
            await self._call(self.core.delete_namespaced_secret, name, ns)
        except ApiError as e:
            if e.status != 404:
                raise

    async def get_service(self, ns: str, name: str) -> dict | None:
        try:
            return await self._call(self.core.read_namespaced_service, name, ns)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def pod_log(self, ns: str, name: str, container: str | None = None,
                      tail_lines: int | None = None, previous: bool = False) -> str:
        kw = {}
        if container:
            kw["container"] = container
        if tail_lines:
            kw["tail_lines"] = tail_lines
        if previous:
            kw["previous"] = True
        try:
            return await self._call(self.core.read_namespaced_pod_log, name, ns, **kw) or ""
        except ApiError as e:
            if previous or e.status in (400, 404):
                return ""
            raise

    # -- watching -------------------------------------------------------------------------------
    def watch(self, kind: str, ns: str | None, resource_version: str | None,
              label_selector: str | None = None, timeout: int = 60):
        """An async iterator of (type, object dict) events; raises ApiError (410 when the
        resourceVersion is too old, so the caller relists)."""
        k8s = self._k8s
        if kind == r.KIND:
            fn, args = ((self.custom.list_cluster_custom_object, (r.GROUP, r.VERSION, r.PLURAL))
                        if ns is None else
                        (self.custom.list_namespaced_custom_object,
                         (r.GROUP, r.VERSION, ns, r.PLURAL)))
        elif kind == "Pod":
            fn, args = ((self.core.list_pod_for_all_namespaces, ()) if ns is None else
                        (self.core.list_namespaced_pod, (ns,)))
        else:
            raise ValueError(f"cannot watch {kind}")
        kw = {"timeout_seconds": timeout}
        if resource_version:
            kw["resource_version"] = resource_version
        if label_selector:
            kw["label_selector"] = label_selector

        async def events():
            w = k8s.watch.Watch()
            try:
                async with w.stream(fn, *args, **kw) as stream:
                    async for ev in stream:
                        obj = ev["object"]
                        if not isinstance(obj, dict):
                            obj = self.client.sanitize_for_serialization(obj)
                        yield ev["type"], obj
            except k8s.client.exceptions.ApiException as e:
                raise _api_error(e) from None
            finally:
                w.stop()
        return events()


class PortForward:
    """A local TCP port forwarded to a port of a pod chosen per connection, through the API
    server (the `pods/portforward` WebSocket, as `kubectl port-forward` does). Used when the
    scheduler's Service is not reachable from where the client runs.

    `pick_pod()` is awaited for each new connection, so after the scheduler pod is
    replaced new connections go to the new one."""

    def __init__(self, api: KubeAPI, namespace: str, pick_pod, port: int):
        self.api = api
        self.namespace = namespace
        self.pick_pod = pick_pod
        self.port = port
        self.server = None
        self.local_port = None
        self._tasks: set = set()

    async def start(self, host: str = "127.0.0.1"):
        self.server = await asyncio.start_server(self._handle, host, 0)
        self.local_port = self.server.sockets[0].getsockname()[1]
        return f"tcp://{host}:{self.local_port}"

    async def close(self):
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader, writer):
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            logger.debug("port-forward connection ended: %r", e)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _forward(self, reader, writer):
        from kubernetes_asyncio.stream import WsApiClient

        pod = await self.pick_pod()
        if pod is None:
            return
        ws_client = WsApiClient(configuration=self.api.configuration)
        try:
            core = self.api._k8s.client.CoreV1Api(ws_client)
            ctx = await core.connect_get_namespaced_pod_portforward(
                pod, self.namespace, ports=str(self.port), _preload_content=False)
            async with ctx as ws:
                await self._pump(ws, reader, writer)
        finally:
            await ws_client.close()

    async def _pump(self, ws, reader, writer):
        # v4.channel.k8s.io: each frame starts with its channel byte; channel 0 carries the
        # data and channel 1 errors for the first (only) port; the first frame on each
        # channel is the port number (2 bytes, little-endian), not data.
        import aiohttp

        seen_port = set()

        async def upstream():
            # However the local side ends (EOF, or a reset: a client that closes with unread
            # data, or aborts), the WebSocket closes, and with it the pod's side: otherwise
            # the scheduler would keep a client that is gone (and never count as idle).
            try:
                while data := await reader.read(65536):
                    await ws.send_bytes(b"\x00" + data)
            except Exception as e:
                logger.debug("port-forward to %s:%d: the local side ended: %r",
                             self.namespace, self.port, e)
            await ws.close()

        up = asyncio.ensure_future(upstream())
        try:
            async for msg in ws:
                if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    break
                data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                if not data:
                    continue
                channel, payload = data[0], data[1:]
                if channel not in seen_port:
                    seen_port.add(channel)
                    if len(payload) >= 2 and struct.unpack("<H", payload[:2])[0] == self.port:
                        payload = payload[2:]
                if channel == 0 and payload:
                    writer.write(payload)
                    await writer.drain()
                elif channel == 1 and payload:
                    logger.warning("port-forward to %s:%d: %s", self.namespace, self.port,
                                   payload.decode(errors="replace"))
                    break
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
