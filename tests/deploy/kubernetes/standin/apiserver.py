"""The REST front of the Kubernetes API stand-in (an aiohttp application), spoken to by the
unmodified kubernetes_asyncio client exactly as to a real kube-apiserver.

Routes: `/api/v1/...` and `/apis/{group}/{version}/...`, namespaced
(`.../namespaces/{ns}/{plural}[/{name}[/{subresource}]]`) and cluster-wide
(`.../{plural}[/{name}...]`, also the all-namespaces list and watch of a namespaced kind);
discovery (`/api`, `/apis`, `/api/v1`, `/apis/{g}[/{v}]`), `/version` and the health
endpoints. Every request but the health endpoints needs `Authorization: Bearer <token>`
(401 Status otherwise). Errors are `kind: Status` bodies with a real server's reason/code.

Subresources: `status` (every kind that has one), `scale` (Deployments), and for pods
`log` (text, also `follow=true`), `eviction` and `portforward` (WebSocket,
`v4.channel.k8s.io`: binary frames whose first byte is the channel; channel 2i carries
data for the i-th port and 2i+1 its errors; each starts with the port as 2 bytes
little-endian; one WebSocket is one TCP connection per port). `exec` and `attach` are
not supported by the stand-in (400).

A watch (`watch=true|1|True`) is a chunked stream of newline-delimited
`{"type": ..., "object": ...}`; with a resourceVersion it replays the recorded events
after it, without one (or "0") it starts with a synthetic ADDED per current object; it
ends after `timeoutSeconds`; a resourceVersion older than the history is answered with
one ERROR event carrying a 410 Expired Status, as a real server does. Bookmarks are not
sent (`allowWatchBookmarks` is accepted and ignored); a watch without `timeoutSeconds`
lasts until the client goes away or the stand-in stops.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import struct

from aiohttp import WSMsgType, web

from .registry import PODS, Registry
from .store import (ApiError, BadRequest, Expired, MethodNotAllowed, NotFound, ResourceType,
                    Unauthorized)

log = logging.getLogger("taskcore.tests.standin.apiserver")

KUBE_VERSION = {"major": "1", "minor": "30", "gitVersion": "v1.30.0-standin",
                "gitCommit": "standin", "gitTreeState": "clean", "buildDate": "",
                "goVersion": "", "compiler": "standin", "platform": "linux/amd64"}
PUBLIC = {"/healthz", "/livez", "/readyz"}
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}


def _bool(value) -> bool:
    return value in _TRUE


def _int(q, name, default=None):
    if name not in q or q[name] == "":
        return default
    try:
        return int(q[name])
    except ValueError:
        raise BadRequest(f'{name}: Invalid value: "{q[name]}": must be an integer') from None


def _json(body, status=200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


class ApiServer:
    def __init__(self, registry: Registry, *, tokens: set[str], kubelet=None):
        self.registry = registry
        self.store = registry.store
        self.tokens = set(tokens)
        self.kubelet = kubelet
        self._streams: set[asyncio.Task] = set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=3 * 1024 * 1024)
        for path in PUBLIC:
            app.router.add_get(path, self._health)
        # kubernetes_asyncio asks for "/version/" (with the slash); a real server serves both.
        app.router.add_get("/version", self._version)
        app.router.add_get("/version/", self._version)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def close_streams(self) -> None:
        """End open watches, log follows and port-forwards (the stand-in is stopping)."""
        self.store.close_watchers()
        for t in list(self._streams):
            t.cancel()

    # -- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request, handler):
        try:
            if request.path.rstrip("/") not in PUBLIC:
                auth = request.headers.get("Authorization", "")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or token.strip() not in self.tokens:
                    raise Unauthorized("Unauthorized")
            return await handler(request)
        except ApiError as e:
            return _json(e.status(), e.code)
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:          # a bug in the stand-in: say so like a server would
            log.exception("stand-in API server error on %s %s", request.method, request.path)
            return _json(ApiError(f"stand-in internal error: {e!r}").status(), 500)

    async def _health(self, request):
        return web.Response(text="ok")

    async def _version(self, request):
        return _json(KUBE_VERSION)

    async def _body(self, request, *, required=True):
        raw = await request.read()
        if not raw.strip():
            if required:
                raise BadRequest("the body of the request is empty")
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise BadRequest(f"error decoding the body: {e}") from None

    # -- routing ----------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request):
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] not in ("api", "apis"):
            raise NotFound("the server could not find the requested resource", details={})
        if parts[0] == "api":
            if len(parts) == 1:
                return self._require_get(request) or _json(self._core_versions(request))
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) == 1:
                return self._require_get(request) or _json(self._group_list())
            if len(parts) == 2:
                return self._require_get(request) or _json(self._group(parts[1]))
            group, version, rest = parts[1], parts[2], parts[3:]
        if not rest:
            return self._require_get(request) or _json(self._resource_list(group, version))
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            inner = self.store.resource_type(group, version, rest[2])
            if inner is not None and inner.namespaced:
                ns, rest = rest[1], rest[2:]
        rt = self.registry.resolve(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        if rt.namespaced and ns is None and name is not None:
            raise NotFound("the server could not find the requested resource", details={})
        if name is None:
            return await self._collection(request, rt, ns, version)
        if sub is None:
            return await self._item(request, rt, ns, name, version)
        return await self._subresource(request, rt, ns, name, version, sub)

    @staticmethod
    def _require_get(request):
        if request.method != "GET":
            raise MethodNotAllowed("the server does not allow this method on the requested "
                                   "resource")
        return None

    def _not_allowed(self, request):
        return MethodNotAllowed("the server does not allow this method on the requested resource",
                                details={})

    async def _collection(self, request, rt: ResourceType, ns, version):
        q = request.query
        if request.method == "GET":
            if _bool(q.get("watch", "")):
                return await self._watch(request, rt, ns, version)
            items, meta = self.registry.list(
                rt, ns, label_selector=q.get("labelSelector"),
                field_selector=q.get("fieldSelector"), limit=_int(q, "limit"),
                cont=q.get("continue") or None)
            items = [self.registry.present(rt, o, version, in_list=True) for o in items]
            return _json({"kind": f"{rt.kind}List", "apiVersion": rt.api_version(version),
                          "metadata": meta, "items": items})
        if request.method == "POST":
            if rt.namespaced and ns is None:
                raise self._not_allowed(request)
            obj = self.registry.create(rt, ns, await self._body(request), version)
            return _json(self.registry.present(rt, obj, version), 201)
        if request.method == "DELETE":
            if rt.namespaced and ns is None:
                raise self._not_allowed(request)
            options = self._delete_options(q, await self._body(request, required=False))
            items, _ = self.registry.list(rt, ns, label_selector=q.get("labelSelector"),
                                          field_selector=q.get("fieldSelector"))
            done = []
            for o in items:
                try:
                    body, _ = self.registry.delete(rt, ns, o["metadata"]["name"], options)
                except NotFound:
                    continue
                done.append(o if body.get("kind") == "Status" else body)
            done = [self.registry.present(rt, o, version, in_list=True) for o in done]
            return _json({"kind": f"{rt.kind}List", "apiVersion": rt.api_version(version),
                          "metadata": {"resourceVersion": str(self.store.resource_version)},
                          "items": done})
        raise self._not_allowed(request)

    async def _item(self, request, rt, ns, name, version):
        m = request.method
        if m == "GET":
            return _json(self.registry.present(rt, self.registry.get(rt, ns, name), version))
        if m == "PUT":
            obj = self.registry.replace(rt, ns, name, await self._body(request), version)
            return _json(self.registry.present(rt, obj, version))
        if m == "PATCH":
            existed = self.store.exists(rt.key, ns if rt.namespaced else None, name)
            obj = self.registry.patch(rt, ns, name, await request.read(),
                                      request.headers.get("Content-Type", ""), version,
                                      field_manager=request.query.get("fieldManager"))
            return _json(self.registry.present(rt, obj, version), 200 if existed else 201)
        if m == "DELETE":
            options = self._delete_options(request.query,
                                           await self._body(request, required=False))
            body, code = self.registry.delete(rt, ns, name, options)
            if body.get("kind") != "Status":
                body = self.registry.present(rt, body, version)
            return _json(body, code)
        raise self._not_allowed(request)

    @staticmethod
    def _delete_options(q, body) -> dict:
        options = dict(body or {})
        if "gracePeriodSeconds" in q:
            options["gracePeriodSeconds"] = _int(q, "gracePeriodSeconds")
        if "propagationPolicy" in q:
            options["propagationPolicy"] = q["propagationPolicy"]
        if "orphanDependents" in q:
            options["orphanDependents"] = _bool(q["orphanDependents"])
        return options

    async def _subresource(self, request, rt, ns, name, version, sub):
        m = request.method
        if sub == "status" and rt.has_status(version):
            if m == "GET":
                obj = self.registry.get(rt, ns, name)
            elif m == "PUT":
                obj = self.registry.replace(rt, ns, name, await self._body(request), version,
                                            subresource="status")
            elif m == "PATCH":
                obj = self.registry.patch(rt, ns, name, await request.read(),
                                          request.headers.get("Content-Type", ""), version,
                                          subresource="status",
                                          field_manager=request.query.get("fieldManager"))
            else:
                raise self._not_allowed(request)
            return _json(self.registry.present(rt, obj, version))
        if sub == "scale" and rt.scale:
            if m == "GET":
                return _json(self.registry.scale(rt, self.registry.get(rt, ns, name)))
            if m == "PUT":
                return _json(self.registry.update_scale(rt, ns, name, await self._body(request)))
            if m == "PATCH":
                return _json(self.registry.update_scale(
                    rt, ns, name, await request.read(),
                    content_type=request.headers.get("Content-Type", "")))
            raise self._not_allowed(request)
        if rt.key == PODS:
            if sub == "log" and m == "GET":
                return await self._log(request, ns, name)
            if sub == "eviction" and m == "POST":
                body, code = self.registry.evict(ns, name, await self._body(request))
                return _json(body, code)
            if sub == "portforward" and m in ("GET", "POST"):
                return await self._portforward(request, ns, name)
            if sub in ("exec", "attach"):
                raise BadRequest(f"the Kubernetes stand-in does not support pods/{sub}")
        raise NotFound("the server could not find the requested resource", details={})

    # -- watch ------------------------------------------------------------------------------

    async def _watch(self, request, rt, ns, version):
        q = request.query
        timeout = _int(q, "timeoutSeconds")
        expired = None
        try:
            watcher = self.registry.watch(rt, ns, label_selector=q.get("labelSelector"),
                                          field_selector=q.get("fieldSelector"),
                                          resource_version=q.get("resourceVersion"))
        except Expired as e:
            watcher, expired = None, e
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                       "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if watcher is None:
            await resp.write((json.dumps({"type": "ERROR", "object": expired.status()})
                              + "\n").encode())
            await resp.write_eof()
            return resp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        task = asyncio.current_task()
        self._streams.add(task)
        try:
            while True:
                wait = 5.0
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        break
                try:
                    item = await watcher.next(timeout=wait)
                except asyncio.TimeoutError:
                    # Notice a client that went away while nothing happened.
                    if request.transport is None or request.transport.is_closing():
                        break
                    continue
                if item is None:
                    break
                typ, obj = item
                obj = self.registry.present(rt, copy.deepcopy(obj), version)
                await resp.write((json.dumps({"type": typ, "object": obj}) + "\n").encode())
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            watcher.close()
            self._streams.discard(task)
        return resp

    # -- pods/log ---------------------------------------------------------------------------

    def _runner_for(self, pod: dict, container: str):
        runner = self.kubelet.runner(pod["metadata"]["uid"]) if self.kubelet else None
        if runner is None:
            raise BadRequest(f'container "{container}" in pod "{pod["metadata"]["name"]}" is '
                             "waiting to start: ContainerCreating")
        return runner

    def _pick_container(self, pod: dict, container: str | None) -> str:
        spec = pod.get("spec") or {}
        names = [c["name"] for c in spec.get("containers") or []]
        init = [c["name"] for c in spec.get("initContainers") or []]
        name = pod["metadata"]["name"]
        if not container:
            if len(names) != 1:
                raise BadRequest(f"a container name must be specified for pod {name}, choose one "
                                 f"of: [{' '.join(names)}]"
                                 + (f" or one of the init containers: [{' '.join(init)}]"
                                    if init else ""))
            return names[0]
        if container not in names + init:
            raise BadRequest(f"container {container} is not valid for pod {name}")
        return container

    @staticmethod
    def _container_running(runner, container: str) -> bool:
        status = runner.status or {}
        for cs in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses")
                                                             or []):
            if cs.get("name") == container:
                return "running" in (cs.get("state") or {})
        return False

    async def _log(self, request, ns, name):
        q = request.query
        pod = self.registry.get(self.registry.rt(PODS), ns, name)
        container = self._pick_container(pod, q.get("container"))
        runner = self._runner_for(pod, container)
        previous, timestamps = _bool(q.get("previous", "")), _bool(q.get("timestamps", ""))
        tail = _int(q, "tailLines")
        limit = _int(q, "limitBytes")
        try:
            text = runner.log(container, previous=previous, tail_lines=tail,
                              timestamps=timestamps)
        except LookupError as e:
            raise BadRequest(str(e).strip("'\"")) from None
        if limit is not None:
            text = text[:limit]
        if not _bool(q.get("follow", "")) or previous:
            return web.Response(text=text, content_type="text/plain")
        return await self._follow(request, runner, container, text, timestamps)

    async def _follow(self, request, runner, container, first: str, timestamps: bool):
        """Stream a container's log until it stops running (polling its log file)."""
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        task = asyncio.current_task()
        self._streams.add(task)
        try:
            await resp.write(first.encode())
            try:
                seen = len(runner.log(container, timestamps=timestamps))
            except LookupError:
                seen = None
            while seen is not None:
                running = self._container_running(runner, container)
                try:
                    full = runner.log(container, timestamps=timestamps)
                except LookupError:
                    break
                if len(full) > seen:
                    await resp.write(full[seen:].encode())
                    seen = len(full)
                if not running:
                    break
                await asyncio.sleep(0.1)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(task)
        return resp

    # -- pods/portforward -------------------------------------------------------------------

    async def _portforward(self, request, ns, name):
        pod = self.registry.get(self.registry.rt(PODS), ns, name)
        ports = []
        for value in request.query.getall("ports", []):
            for p in value.split(","):
                try:
                    ports.append(int(p))
                except ValueError:
                    raise BadRequest(f'invalid port "{p}"') from None
        if not ports or any(not 0 < p < 65536 for p in ports):
            raise BadRequest("query parameter \"port\" is required" if not ports
                             else "port numbers must be between 1 and 65535")
        status = pod.get("status") or {}
        pod_ip = status.get("podIP")
        if status.get("phase") != "Running" or not pod_ip:
            raise BadRequest(f"unable to upgrade connection: pod {name} is not running")
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io", "v3.channel.k8s.io",
                                              "v2.channel.k8s.io", "channel.k8s.io"))
        await ws.prepare(request)
        task = asyncio.current_task()
        self._streams.add(task)
        writers: dict[int, asyncio.StreamWriter] = {}
        pumps: list[asyncio.Task] = []

        async def pump(i: int, reader: asyncio.StreamReader):
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    await ws.send_bytes(bytes([2 * i]) + data)
            except (ConnectionError, RuntimeError):
                pass
            finally:
                await ws.close()

        try:
            for i, port in enumerate(ports):
                await ws.send_bytes(bytes([2 * i]) + struct.pack("<H", port))
                await ws.send_bytes(bytes([2 * i + 1]) + struct.pack("<H", port))
            for i, port in enumerate(ports):
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(pod_ip, port), 5)
                except (OSError, asyncio.TimeoutError) as e:
                    msg = (f"error forwarding port {port} to pod {name}, uid "
                           f"{pod['metadata']['uid']}: failed to connect to {pod_ip}:{port}: {e}")
                    await ws.send_bytes(bytes([2 * i + 1]) + msg.encode())
                    continue
                writers[i] = writer
                pumps.append(asyncio.create_task(pump(i, reader)))
            if not writers:
                await ws.close()
                return ws
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                channel, data = msg.data[0], msg.data[1:]
                writer = writers.get(channel // 2) if channel % 2 == 0 else None
                if writer is not None and data:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for w in writers.values():
                w.close()
            for p in pumps:
                p.cancel()
            self._streams.discard(task)
            await ws.close()
        return ws

    # -- discovery --------------------------------------------------------------------------

    def _core_versions(self, request):
        host = request.host
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                "serverAddress": host}]}

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rt in self.store.types():
            if rt.group:
                vs = groups.setdefault(rt.group, [])
                vs.extend(v for v in rt.versions if v not in vs)
        return groups

    def _group(self, name):
        versions = self._groups().get(name)
        if not versions:
            raise NotFound("the server could not find the requested resource", details={})
        gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": gvs,
                "preferredVersion": gvs[0]}

    def _group_list(self):
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group(g) for g in sorted(self._groups())]}

    def _resource_list(self, group, version):
        resources = []
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update",
                 "watch"]
        for rt in sorted(self.store.types(), key=lambda r: r.plural):
            if rt.group != group or version not in rt.versions:
                continue
            resources.append({"name": rt.plural, "singularName": rt.singular or rt.kind.lower(),
                              "namespaced": rt.namespaced, "kind": rt.kind, "verbs": verbs,
                              **({"shortNames": list(rt.short_names)} if rt.short_names else {})})
            subs = []
            if rt.has_status(version):
                subs.append(("status", rt.kind, ["get", "patch", "update"]))
            if rt.scale:
                subs.append(("scale", "Scale", ["get", "patch", "update"]))
            if rt.key == PODS:
                subs += [("log", "Pod", ["get"]), ("eviction", "Eviction", ["create"]),
                         ("portforward", "PodPortForwardOptions", ["create", "get"])]
            for sub, kind, v in subs:
                resources.append({"name": f"{rt.plural}/{sub}", "singularName": "",
                                  "namespaced": rt.namespaced, "kind": kind, "verbs": v})
        if not resources:
            raise NotFound("the server could not find the requested resource", details={})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}

