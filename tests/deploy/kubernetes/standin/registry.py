"""The API semantics of the Kubernetes API stand-in, shared by the REST app (apiserver.py)
and the controllers (controllers.py): what a real kube-apiserver's registry does between
decoding a request and writing to etcd.

- create: namespace must exist (404) and not be terminating (403), `generateName`,
  defaulting of the common fields of pods, services, deployments, secrets, namespaces,
  validation (422), `metadata.generation` = 1 for kinds with a spec and custom resources,
  status dropped for kinds with a status subresource, service cluster IPs and node ports.
- update (PUT) and PATCH: resourceVersion preconditions (409), the status subresource
  (the main resource ignores `.status`, `/status` changes only `.status`), generation
  bumped when anything outside metadata and status changes, a no-op update is not written,
  immutable fields of pods, services and deployments (422). Custom resources need
  `metadata.resourceVersion` on PUT, as on a real server.
- delete: preconditions, pods deleted gracefully (deletionTimestamp, then the kubelet
  removes the object once the processes are gone), namespaces terminate (their contents are
  deleted by the namespace controller), a CRD takes its custom resources with it.
  `propagationPolicy` travels with the DELETED event to the garbage collector;
  `Foreground` is treated as `Background`. Finalizers are ignored.

Not implemented (deviations): dryRun, server-side apply's field ownership (an apply patch
is a merge patch that may create the object), admission webhooks, RBAC (objects are only
stored), resource quotas, conversion between custom resource versions (a version is just
the apiVersion written on the way out, like conversion strategy None), managedFields.
"""
from __future__ import annotations

import base64
import copy
import ipaddress
import json
import random
import socket

import yaml

from . import patch as patching
from .selectors import (label_selector_object_matches, parse_field_selector,
                        parse_label_selector, selector_string)
from .store import (ApiError, BadRequest, Conflict, Forbidden, NotFound, ResourceType, Store,
                    UnsupportedMediaType, now_rfc3339)
from .validation import (BuiltinValidator, CustomSchema, cause, invalid, label_problems,
                         name_problem)

NODE_PORT_RANGE = (30000, 32767)
SERVICE_NET = ipaddress.ip_network("127.3.0.0/16")

# The random suffix alphabet of generateName (a real server's: no vowels, no look-alikes).
_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSONPATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"

PODS = ("", "pods")
SERVICES = ("", "services")
NAMESPACES = ("", "namespaces")
DEPLOYMENTS = ("apps", "deployments")
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")


def builtin_types() -> list[ResourceType]:
    R = ResourceType
    rbac = "rbac.authorization.k8s.io"
    return [
        R("", ("v1",), "namespaces", "Namespace", namespaced=False, short_names=("ns",),
          status=True, name_rule="label"),
        R("", ("v1",), "pods", "Pod", short_names=("po",), status=True),
        R("", ("v1",), "services", "Service", short_names=("svc",), status=True,
          name_rule="dns1035"),
        R("", ("v1",), "serviceaccounts", "ServiceAccount", short_names=("sa",)),
        R("", ("v1",), "configmaps", "ConfigMap", short_names=("cm",)),
        R("", ("v1",), "secrets", "Secret"),
        R("", ("v1",), "events", "Event", short_names=("ev",)),
        R("", ("v1",), "endpoints", "Endpoints", short_names=("ep",)),
        R("", ("v1",), "nodes", "Node", namespaced=False, short_names=("no",), status=True),
        R("apps", ("v1",), "deployments", "Deployment", short_names=("deploy",), status=True,
          scale=True),
        R(rbac, ("v1",), "roles", "Role", name_rule="path"),
        R(rbac, ("v1",), "rolebindings", "RoleBinding", name_rule="path"),
        R(rbac, ("v1",), "clusterroles", "ClusterRole", namespaced=False, name_rule="path"),
        R(rbac, ("v1",), "clusterrolebindings", "ClusterRoleBinding", namespaced=False,
          name_rule="path"),
        R("apiextensions.k8s.io", ("v1",), "customresourcedefinitions",
          "CustomResourceDefinition", namespaced=False, short_names=("crd", "crds"), status=True),
        R("coordination.k8s.io", ("v1",), "leases", "Lease"),
    ]


# Kinds whose DELETE answers with the deleted object; the others answer with a Status.
_RETURNS_OBJECT = {PODS, SERVICES, NAMESPACES, CRDS}


def random_suffix(n=5) -> str:
    return "".join(random.choice(_SUFFIX) for _ in range(n))


def success_status(rt: ResourceType, obj: dict, code=200) -> dict:
    details = rt.details(obj["metadata"]["name"])
    details["uid"] = obj["metadata"]["uid"]
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": details, "code": code}


def _content(obj: dict) -> dict:
    """What metadata.generation tracks: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Registry:
    def __init__(self, store: Store):
        self.store = store
        self.validator = BuiltinValidator()
        for rt in builtin_types():
            store.register(rt)
        # A graceful pod deletion's propagationPolicy, applied when the kubelet removes it.
        self._pending_propagation: dict[str, str] = {}

    # -- lookups ----------------------------------------------------------------------------

    def resolve(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.store.resource_type(group, version, plural)
        if rt is None:
            raise NotFound("the server could not find the requested resource", details={})
        return rt

    def rt(self, key) -> ResourceType:
        return self.store.type_for(key)

    @staticmethod
    def present(rt: ResourceType, obj: dict, version: str | None = None,
                in_list: bool = False) -> dict:
        """An object as the API returns it: built-in list items carry no apiVersion and kind
        (a real server omits them), everything else carries the requested version's."""
        if in_list and not rt.custom:
            obj.pop("apiVersion", None)
            obj.pop("kind", None)
            return obj
        obj["apiVersion"] = rt.api_version(version)
        obj["kind"] = rt.kind
        return obj

    def get(self, rt: ResourceType, ns: str | None, name: str) -> dict:
        obj = self.store.get(rt.key, ns if rt.namespaced else None, name)
        if obj is None:
            raise NotFound(f'{rt.resource} "{name}" not found', details=rt.details(name))
        return obj

    def list(self, rt: ResourceType, ns: str | None, *, label_selector=None,
             field_selector=None, limit: int | None = None, cont: str | None = None):
        """(items, metadata) of a list; `limit`/`continue` page through the current state."""
        pred = self._predicate(rt, label_selector, field_selector)
        rv = self.store.resource_version
        items = [o for o in self.store.list(rt.key, ns if rt.namespaced else None) if pred(o)]
        meta = {"resourceVersion": str(rv)}
        if cont:
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(cont.encode())))
            except ValueError:
                raise BadRequest("continue key is not valid") from None
            items = [o for o in items if self._sort_key(o) > after]
        if limit and limit > 0 and len(items) > limit:
            rest = len(items) - limit
            items = items[:limit]
            token = json.dumps(list(self._sort_key(items[-1]))).encode()
            meta["continue"] = base64.urlsafe_b64encode(token).decode()
            meta["remainingItemCount"] = rest
        return items, meta

    @staticmethod
    def _sort_key(o):
        return (o["metadata"].get("namespace") or "", o["metadata"]["name"])

    def _predicate(self, rt, label_selector, field_selector):
        lp = parse_label_selector(label_selector)
        fp = parse_field_selector(field_selector, rt.key)
        return lambda o: lp(o["metadata"].get("labels")) and fp(o)

    def watch(self, rt: ResourceType, ns: str | None, *, label_selector=None,
              field_selector=None, resource_version: str | None = None):
        pred = self._predicate(rt, label_selector, field_selector)
        ns = ns if rt.namespaced else None
        if resource_version in (None, "", "0"):
            initial = [o for o in self.store.list(rt.key, ns) if pred(o)]
            return self.store.watch(rt.key, ns, pred, None, initial)
        try:
            since = int(resource_version)
        except ValueError:
            raise BadRequest(f'resourceVersion: Invalid value: "{resource_version}": '
                             "must be an integer") from None
        return self.store.watch(rt.key, ns, pred, since)

    # -- create -----------------------------------------------------------------------------

    def _typed_body(self, rt: ResourceType, body, version: str) -> dict:
        if not isinstance(body, dict):
            raise BadRequest("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        want = rt.api_version(version)
        if obj.get("kind") not in (None, "", rt.kind):
            raise BadRequest(f"the kind in the data ({obj['kind']}) does not match the expected "
                             f"kind ({rt.kind})")
        if obj.get("apiVersion") not in (None, "", want):
            raise BadRequest(f"the API version in the data ({obj['apiVersion']}) does not match "
                             f"the expected API version ({want})")
        obj["apiVersion"], obj["kind"] = want, rt.kind
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise BadRequest("metadata must be an object")
        return obj

    def _namespace_for(self, rt, ns, meta):
        if not rt.namespaced:
            meta.pop("namespace", None)
            return None
        if meta.get("namespace") and meta["namespace"] != ns:
            raise BadRequest("the namespace of the provided object does not match the namespace "
                             "sent on the request")
        meta["namespace"] = ns
        return ns

    def _require_namespace(self, rt, ns, name):
        nso = self.store.get(NAMESPACES, None, ns)
        if nso is None:
            raise NotFound(f'namespaces "{ns}" not found',
                           details={"name": ns, "kind": "namespaces"})
        if nso["metadata"].get("deletionTimestamp"):
            raise Forbidden(f'{rt.resource} "{name}" is forbidden: unable to create new content '
                            f"in namespace {ns} because it is being terminated",
                            details=rt.details(name))

    def create(self, rt: ResourceType, ns: str | None, body, version: str | None = None) -> dict:
        version = version or rt.versions[0]
        obj = self._typed_body(rt, body, version)
        meta = obj["metadata"]
        ns = self._namespace_for(rt, ns, meta)
        for k in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp",
                  "deletionGracePeriodSeconds", "generation", "selfLink", "managedFields"):
            meta.pop(k, None)
        if not meta.get("name"):
            base = meta.get("generateName")
            if not base:
                raise invalid(rt, "", [cause("metadata.name", "Required value: name or "
                                             "generateName is required", "FieldValueRequired")])
            base = base[:58]
            for _ in range(16):
                meta["name"] = base + random_suffix()
                if not self.store.exists(rt.key, ns, meta["name"]):
                    break
        if rt.namespaced:
            self._require_namespace(rt, ns, meta["name"])
        if rt.has_status(version):
            obj.pop("status", None)
        self._admit(rt, obj, None, version)
        if "spec" in obj or rt.custom:
            meta["generation"] = 1
        stored = self.store.add(rt.key, obj)
        if rt.key == CRDS:
            stored = self._crd_established(stored)
        return stored

    # -- update -----------------------------------------------------------------------------

    def replace(self, rt: ResourceType, ns: str | None, name: str, body,
                version: str | None = None, subresource: str | None = None) -> dict:
        version = version or rt.versions[0]
        obj = self._typed_body(rt, body, version)
        meta = obj["metadata"]
        if meta.get("name") and meta["name"] != name:
            raise BadRequest(f"the name of the object ({meta['name']}) does not match the name "
                             f"on the URL ({name})")
        meta["name"] = name
        ns = self._namespace_for(rt, ns, meta)
        old = self.get(rt, ns, name)
        rv = meta.get("resourceVersion")
        if not rv and rt.custom:
            raise invalid(rt, name, [cause("metadata.resourceVersion", "Invalid value: 0x0: "
                                           "must be specified for an update")])
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise self._conflict(rt, name)
        return self._update(rt, old, obj, version, subresource)

    @staticmethod
    def _conflict(rt, name) -> Conflict:
        return Conflict(f'Operation cannot be fulfilled on {rt.resource} "{name}": the object '
                        "has been modified; please apply your changes to the latest version and "
                        "try again", details=rt.details(name))

    def _update(self, rt, old: dict, new: dict, version, subresource) -> dict:
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            new["apiVersion"] = rt.api_version(version)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        else:
            meta, ometa = new["metadata"], old["metadata"]
            for k in ("uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds", "generation", "namespace"):
                if k in ometa:
                    meta[k] = ometa[k]
                else:
                    meta.pop(k, None)
            if rt.has_status(version):
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
        self._admit(rt, new, old, version, status_only=subresource == "status")
        meta = new["metadata"]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if "generation" in old["metadata"] and _content(new) != _content(old):
            meta["generation"] = old["metadata"]["generation"] + 1
        if new == old:
            return old
        return self.store.put(rt.key, new)

    def patch(self, rt: ResourceType, ns: str | None, name: str, body: bytes, content_type: str,
              version: str | None = None, subresource: str | None = None,
              field_manager: str | None = None) -> dict:
        version = version or rt.versions[0]
        ctype = (content_type or "").split(";")[0].strip().lower()
        ns = ns if rt.namespaced else None
        if ctype == APPLY:
            try:
                data = yaml.safe_load(body)
            except yaml.YAMLError as e:
                raise BadRequest(f"error decoding YAML: {e}") from None
            if not field_manager:
                raise BadRequest("PATCH requests with apply content type require fieldManager")
            if not self.store.exists(rt.key, ns, name) and subresource is None:
                if isinstance(data, dict):
                    data.setdefault("metadata", {}).setdefault("name", name)
                return self.create(rt, ns, data, version)
            ctype = MERGE
        else:
            try:
                data = json.loads(body or b"null")
            except ValueError as e:
                raise BadRequest(f"error decoding patch: {e}") from None
        old = self.get(rt, ns, name)
        target = self.present(rt, copy.deepcopy(old), version)
        if ctype == MERGE:
            if not isinstance(data, dict):
                raise BadRequest("a merge patch must be a JSON object")
            patched = patching.merge_patch(target, data)
        elif ctype == STRATEGIC:
            if rt.custom:
                raise UnsupportedMediaType(
                    "the body of the request was in an unknown format - accepted media types "
                    f"include: {JSONPATCH}, {MERGE}, {APPLY}")
            if not isinstance(data, dict):
                raise BadRequest("a strategic merge patch must be a JSON object")
            patched = patching.strategic_merge_patch(target, data)
        elif ctype == JSONPATCH:
            if not isinstance(data, list):
                raise BadRequest("json: cannot unmarshal object into Go value of type "
                                 "jsonpatch.Patch")
            try:
                patched = patching.json_patch(target, data)
            except patching.PatchError as e:
                raise ApiError(str(e), code=422, reason="Invalid") from None
        else:
            raise UnsupportedMediaType(
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {JSONPATCH}, {MERGE}, {APPLY}"
                + ("" if rt.custom else f", {STRATEGIC}"))
        if not isinstance(patched, dict):
            raise BadRequest("the patch did not produce an object")
        patched = self._typed_body(rt, patched, version)
        pmeta = patched["metadata"]
        if pmeta.get("name") != name:
            raise BadRequest("the name of the object may not be changed by a patch")
        if pmeta.get("resourceVersion") not in (None, old["metadata"]["resourceVersion"]):
            raise self._conflict(rt, name)
        return self._update(rt, old, patched, version, subresource)

    # -- scale subresource --------------------------------------------------------------------

    def scale(self, rt: ResourceType, obj: dict) -> dict:
        m = obj["metadata"]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: m[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                               "creationTimestamp") if k in m},
                "spec": {"replicas": obj["spec"].get("replicas", 0)},
                "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                           "selector": selector_string(obj["spec"].get("selector"))}}

    def update_scale(self, rt, ns, name, body, *, content_type=None) -> dict:
        """PUT (content_type None) or PATCH of autoscaling/v1 Scale."""
        old = self.get(rt, ns, name)
        if content_type is not None:
            try:
                data = json.loads(body or b"null")
            except ValueError as e:
                raise BadRequest(f"error decoding patch: {e}") from None
            current = self.scale(rt, old)
            ctype = content_type.split(";")[0].strip().lower()
            try:
                if ctype == JSONPATCH and isinstance(data, list):
                    body = patching.json_patch(current, data)
                elif ctype in (MERGE, STRATEGIC) and isinstance(data, dict):
                    body = patching.merge_patch(current, data)
                else:
                    raise BadRequest("unsupported patch for the scale subresource")
            except patching.PatchError as e:
                raise ApiError(str(e), code=422, reason="Invalid") from None
        if not isinstance(body, dict):
            raise BadRequest("the body of the request must be a JSON object")
        replicas = (body.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise invalid(rt, name, [cause("spec.replicas", f"Invalid value: {replicas}: must be "
                                           "greater than or equal to 0")])
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise self._conflict(rt, name)
        new = copy.deepcopy(old)
        new["spec"]["replicas"] = replicas
        return self.scale(rt, self._update(rt, old, new, None, None))

    # -- delete -----------------------------------------------------------------------------

    def delete(self, rt: ResourceType, ns: str | None, name: str,
               options: dict | None = None) -> tuple[dict, int]:
        """(body, HTTP code) of a DELETE."""
        options = options or {}
        ns = ns if rt.namespaced else None
        old = self.get(rt, ns, name)
        meta = old["metadata"]
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise Conflict(f"Precondition failed: UID in precondition: {pre['uid']}, UID in "
                           f"object meta: {meta['uid']}", details=rt.details(name))
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise Conflict(f"Precondition failed: ResourceVersion in precondition: "
                           f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                           f"{meta['resourceVersion']}", details=rt.details(name))
        policy = options.get("propagationPolicy")
        if policy is None:
            policy = "Orphan" if options.get("orphanDependents") else "Background"
        if policy not in ("Orphan", "Background", "Foreground"):
            raise BadRequest(f'propagationPolicy: Unsupported value: "{policy}"')

        if rt.key == PODS:
            pending = self._graceful_pod_delete(rt, old, options, policy)
            if pending is not None:
                return self.present(rt, pending), 200
        if rt.key == NAMESPACES:
            if name in ("default", "kube-system", "kube-public"):
                raise Forbidden(f'namespaces "{name}" is forbidden: this namespace may not be '
                                "deleted", details=rt.details(name))
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                new.setdefault("status", {})["phase"] = "Terminating"
                old = self.store.put(rt.key, new)
            return self.present(rt, old), 200
        if rt.key == CRDS:
            self._remove_custom_resources(old)
        removed = self.store.remove(rt.key, ns, name, {"propagationPolicy": policy})
        if rt.key in _RETURNS_OBJECT or rt.custom:
            return self.present(rt, removed), 200
        return success_status(rt, removed), 200

    def _graceful_pod_delete(self, rt, old, options, policy) -> dict | None:
        """The pod with deletionTimestamp set, or None when it goes at once: a grace period
        of 0, a pod that never reached a node, or one that has finished."""
        meta, spec = old["metadata"], old.get("spec") or {}
        grace = options.get("gracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        try:
            grace = max(0, int(grace))
        except (TypeError, ValueError):
            raise BadRequest(f"gracePeriodSeconds: Invalid value: {grace!r}") from None
        phase = (old.get("status") or {}).get("phase")
        if grace == 0 or not spec.get("nodeName") or phase in ("Succeeded", "Failed"):
            self._pending_propagation.pop(meta["uid"], None)
            return None
        current = meta.get("deletionGracePeriodSeconds")
        if meta.get("deletionTimestamp") and current is not None and grace >= current:
            return old
        new = copy.deepcopy(old)
        new["metadata"]["deletionTimestamp"] = now_rfc3339(grace)
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        self._pending_propagation[meta["uid"]] = policy
        return self.store.put(rt.key, new)

    def remove_terminated_pod(self, ns: str, name: str, uid: str) -> None:
        """The kubelet's last step of a graceful deletion: the processes are gone."""
        obj = self.store.get(PODS, ns, name)
        if obj is not None and obj["metadata"]["uid"] == uid:
            policy = self._pending_propagation.pop(uid, "Background")
            self.store.remove(PODS, ns, name, {"propagationPolicy": policy})

    def evict(self, ns: str, name: str, body) -> tuple[dict, int]:
        """policy/v1 Eviction: a graceful delete (no PodDisruptionBudgets in the stand-in)."""
        rt = self.rt(PODS)
        if not isinstance(body, dict):
            raise BadRequest("the body of the request must be a JSON object")
        if (body.get("metadata") or {}).get("name") not in (None, name):
            raise BadRequest("name in URL does not match name in Eviction object")
        self.delete(rt, ns, name, body.get("deleteOptions") or {})
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "code": 201}, 201

    # -- writes by the controllers (no validation: the stand-in trusts itself) ---------------

    def write_status(self, key, ns: str | None, name: str, status: dict,
                     uid: str | None = None) -> dict | None:
        old = self.store.get(key, ns, name)
        if old is None or (uid is not None and old["metadata"]["uid"] != uid):
            return None
        if old.get("status") == status:
            return old
        new = copy.deepcopy(old)
        new["status"] = copy.deepcopy(status)
        return self.store.put(key, new)

    def put(self, key, obj: dict) -> dict:
        """Write a changed object as is (e.g. the scheduler's spec.nodeName)."""
        return self.store.put(key, obj)

    # -- admission: defaults and checks per kind ---------------------------------------------

    def _admit(self, rt: ResourceType, obj: dict, old: dict | None, version: str,
               status_only: bool = False) -> None:
        name = obj["metadata"].get("name")
        problems = []
        if old is None:
            why = name_problem(name, rt.name_rule)
            if why:
                raise invalid(rt, name, [cause("metadata.name", why)])
        if not status_only:
            defaults = getattr(self, f"_default_{rt.plural}", None)
            if defaults is not None and not rt.custom:
                defaults(obj)
        problems += label_problems(obj["metadata"].get("labels"))
        if rt.custom:
            info = rt.custom_versions.get(version) or {}
            schema: CustomSchema | None = info.get("schema")
            if schema is not None:
                schema.prune_and_default(obj)
                problems += schema.problems(obj)
        else:
            problems += self.validator.problems(obj)
            check = getattr(self, f"_check_{rt.plural}", None)
            if check is not None and not problems:
                problems += check(obj, old, status_only)
        if problems:
            raise invalid(rt, name, problems)
        prepare = getattr(self, f"_prepare_{rt.plural}", None)
        if prepare is not None and not rt.custom and not status_only:
            prepare(rt, obj, old)

    # pods

    @staticmethod
    def _default_pod_spec(spec: dict) -> None:
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("securityContext", {})
        spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("priority", 0)
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            if not isinstance(c, dict):
                continue
            image = c.get("image") or ""
            tag = image.rsplit("/", 1)[-1]
            latest = ":" not in tag or tag.endswith(":latest")
            c.setdefault("imagePullPolicy", "Always" if latest and "@" not in tag
                         else "IfNotPresent")
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("resources", {})
            for p in c.get("ports") or []:
                if isinstance(p, dict):
                    p.setdefault("protocol", "TCP")

    def _default_pods(self, obj):
        self._default_pod_spec(obj.setdefault("spec", {}))
        if "status" not in obj:
            obj["status"] = {"phase": "Pending", "qosClass": self._qos(obj["spec"])}

    @staticmethod
    def _qos(spec) -> str:
        reqs = [(c.get("resources") or {}) for c in spec.get("containers") or []
                if isinstance(c, dict)]
        if not any(r.get("requests") or r.get("limits") for r in reqs):
            return "BestEffort"
        if all(r.get("limits") and set(r["limits"]) >= {"cpu", "memory"}
               and (r.get("requests") or r["limits"]) == r["limits"] for r in reqs):
            return "Guaranteed"
        return "Burstable"

    @staticmethod
    def _pod_spec_problems(spec: dict, prefix: str) -> list[dict]:
        out = []
        containers = spec.get("containers") or []
        if not containers:
            out.append(cause(f"{prefix}.containers", "Required value", "FieldValueRequired"))
        seen = set()
        for group in ("initContainers", "containers"):
            for i, c in enumerate(spec.get(group) or []):
                where = f"{prefix}.{group}[{i}]"
                cname = c.get("name") or ""
                why = name_problem(cname, "label")
                if why:
                    out.append(cause(f"{where}.name", why))
                elif cname in seen:
                    out.append(cause(f"{where}.name", f'Duplicate value: "{cname}"',
                                     "FieldValueDuplicate"))
                seen.add(cname)
                if not c.get("image"):
                    out.append(cause(f"{where}.image", "Required value", "FieldValueRequired"))
                for j, p in enumerate(c.get("ports") or []):
                    port = p.get("containerPort")
                    if not isinstance(port, int) or not 0 < port < 65536:
                        out.append(cause(f"{where}.ports[{j}].containerPort",
                                         f"Invalid value: {port}: must be between 1 and 65535, "
                                         "inclusive"))
        policy = spec.get("restartPolicy")
        if policy not in ("Always", "OnFailure", "Never"):
            out.append(cause(f"{prefix}.restartPolicy", f'Unsupported value: "{policy}": '
                             'supported values: "Always", "OnFailure", "Never"',
                             "FieldValueNotSupported"))
        return out

    def _check_pods(self, obj, old, status_only):
        if status_only:
            return []
        out = self._pod_spec_problems(obj["spec"], "spec")
        if old is not None and not out:
            def mutable_stripped(spec):
                spec = copy.deepcopy(spec)
                for k in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
                    spec.pop(k, None)
                for group in ("initContainers", "containers"):
                    for c in spec.get(group) or []:
                        c.pop("image", None)
                return spec
            if mutable_stripped(obj["spec"]) != mutable_stripped(old["spec"]):
                out.append(cause("spec", "Forbidden: pod updates may not change fields other "
                                 "than `spec.containers[*].image`, `spec.initContainers[*].image`"
                                 ", `spec.activeDeadlineSeconds`, `spec.tolerations` (only "
                                 "additions to existing tolerations) or "
                                 "`spec.terminationGracePeriodSeconds`", "FieldValueForbidden"))
        return out

    # deployments

    def _default_deployments(self, obj):
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            ru = strategy.setdefault("rollingUpdate", {})
            ru.setdefault("maxUnavailable", "25%")
            ru.setdefault("maxSurge", "25%")
        template = spec.setdefault("template", {})
        self._default_pod_spec(template.setdefault("spec", {}))

    def _check_deployments(self, obj, old, status_only):
        if status_only:
            return []
        spec = obj["spec"]
        out = []
        selector = spec.get("selector")
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
            out.append(cause("spec.selector", "Required value", "FieldValueRequired"))
        else:
            if not label_selector_object_matches(selector, labels):
                out.append(cause("spec.template.metadata.labels",
                                 f"Invalid value: {json.dumps(labels)}: `selector` does not "
                                 "match template `labels`"))
        if spec.get("replicas", 0) < 0:
            out.append(cause("spec.replicas", f"Invalid value: {spec['replicas']}: must be "
                             "greater than or equal to 0"))
        tspec = (spec.get("template") or {}).get("spec") or {}
        out += self._pod_spec_problems(tspec, "spec.template.spec")
        if tspec.get("restartPolicy") != "Always":
            out.append(cause("spec.template.spec.restartPolicy",
                             f'Unsupported value: "{tspec.get("restartPolicy")}": supported '
                             'values: "Always"', "FieldValueNotSupported"))
        if old is not None and old["spec"].get("selector") != selector:
            out.append(cause("spec.selector", f"Invalid value: {json.dumps(selector)}: field is "
                             "immutable"))
        out += label_problems(labels, "spec.template.metadata.labels")
        return out

    # services

    def _default_services(self, obj):
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            spec.setdefault("internalTrafficPolicy", "Cluster")
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        if spec["type"] in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
        for p in spec.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
                if "port" in p:
                    p.setdefault("targetPort", p["port"])
        obj.setdefault("status", {"loadBalancer": {}})

    def _check_services(self, obj, old, status_only):
        if status_only:
            return []
        spec, out = obj["spec"], []
        stype = spec.get("type")
        if stype not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
            out.append(cause("spec.type", f'Unsupported value: "{stype}": supported values: '
                             '"ClusterIP", "ExternalName", "LoadBalancer", "NodePort"',
                             "FieldValueNotSupported"))
        ports = spec.get("ports") or []
        if not ports and stype != "ExternalName" and spec.get("clusterIP") != "None":
            out.append(cause("spec.ports", "Required value", "FieldValueRequired"))
        names = set()
        for i, p in enumerate(ports):
            port = p.get("port")
            if not isinstance(port, int) or not 0 < port < 65536:
                out.append(cause(f"spec.ports[{i}].port", f"Invalid value: {port}: must be "
                                 "between 1 and 65535, inclusive"))
            if len(ports) > 1 and not p.get("name"):
                out.append(cause(f"spec.ports[{i}].name", "Required value", "FieldValueRequired"))
            if p.get("name") in names:
                out.append(cause(f"spec.ports[{i}].name", f'Duplicate value: "{p["name"]}"',
                                 "FieldValueDuplicate"))
            names.add(p.get("name"))
            if p.get("nodePort") and stype not in ("NodePort", "LoadBalancer") and old is None:
                out.append(cause(f"spec.ports[{i}].nodePort", "Forbidden: may not be used when "
                                 f"`type` is '{stype}'", "FieldValueForbidden"))
        out += label_problems(spec.get("selector"), "spec.selector")
        if old is not None:
            want, had = spec.get("clusterIP"), old["spec"].get("clusterIP")
            if want not in (None, "", had):
                out.append(cause("spec.clusterIP", f'Invalid value: "{want}": field is immutable'))
        return out

    def _services_in_use(self, exclude_uid=None):
        ips, node_ports = set(), set()
        for svc in self.store.list(SERVICES):
            if svc["metadata"]["uid"] == exclude_uid:
                continue
            ips.add(svc["spec"].get("clusterIP"))
            node_ports |= {p.get("nodePort") for p in svc["spec"].get("ports") or []}
        return ips, node_ports

    def _prepare_services(self, rt, obj, old):
        """Cluster IP and node ports, allocated as the real registry does on create/update."""
        spec = obj["spec"]
        name = obj["metadata"]["name"]
        ips, node_ports = self._services_in_use(old and old["metadata"]["uid"])
        if spec.get("type") == "ExternalName":
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
        elif old is not None and spec.get("clusterIP") in (None, ""):
            spec["clusterIP"] = old["spec"].get("clusterIP")
            spec["clusterIPs"] = old["spec"].get("clusterIPs", [spec["clusterIP"]])
        elif old is None:
            ip = spec.get("clusterIP")
            if ip == "None":
                pass
            elif ip:
                try:
                    in_range = ipaddress.ip_address(ip) in SERVICE_NET
                except ValueError:
                    in_range = False
                if not in_range:
                    raise invalid(rt, name, [cause("spec.clusterIP", f'Invalid value: "{ip}": '
                                  f"provided IP is not in the valid range. The range of valid "
                                  f"IPs is {SERVICE_NET}")])
                if ip in ips:
                    raise invalid(rt, name, [cause("spec.clusterIP", f'Invalid value: "{ip}": '
                                  "provided IP is already allocated")])
            else:
                hosts = SERVICE_NET.num_addresses
                while True:
                    ip = str(SERVICE_NET[random.randrange(1, hosts - 1)])
                    if ip not in ips:
                        break
                spec["clusterIP"] = ip
            spec["clusterIPs"] = [spec["clusterIP"]]
        old_ports = {(p.get("name"), p.get("port")): p.get("nodePort")
                     for p in (old or {}).get("spec", {}).get("ports") or []}
        lo, hi = NODE_PORT_RANGE
        for i, p in enumerate(spec.get("ports") or []):
            if spec.get("type") not in ("NodePort", "LoadBalancer"):
                p.pop("nodePort", None)
                continue
            np_ = p.get("nodePort") or old_ports.get((p.get("name"), p.get("port")))
            if np_:
                if not lo <= np_ <= hi:
                    raise invalid(rt, name, [cause(f"spec.ports[{i}].nodePort",
                                  f"Invalid value: {np_}: provided port is not in the valid "
                                  f"range. The range of valid ports is {lo}-{hi}")])
                if np_ in node_ports and np_ != old_ports.get((p.get("name"), p.get("port"))):
                    raise invalid(rt, name, [cause(f"spec.ports[{i}].nodePort",
                                  f"Invalid value: {np_}: provided port is already allocated")])
            else:
                for _ in range(1000):
                    np_ = random.randint(lo, hi)
                    if np_ not in node_ports and _port_free(np_):
                        break
            p["nodePort"] = np_
            node_ports.add(np_)

    # secrets, namespaces

    def _default_secrets(self, obj):
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None)
        if string_data:
            data = obj.setdefault("data", {}) or {}
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj["data"] = data

    def _default_namespaces(self, obj):
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = \
            obj["metadata"]["name"]
        status = obj.setdefault("status", {})
        status.setdefault("phase", "Active")

    # custom resource definitions

    def _check_customresourcedefinitions(self, obj, old, status_only):
        if status_only:
            return []
        spec, out = obj["spec"], []
        group, names = spec.get("group", ""), spec.get("names") or {}
        if "." not in group:
            out.append(cause("spec.group", f'Invalid value: "{group}": should be a domain with '
                             "at least one dot"))
        if obj["metadata"]["name"] != f"{names.get('plural')}.{group}":
            out.append(cause("metadata.name", f'Invalid value: "{obj["metadata"]["name"]}": '
                             "must be spec.names.plural+\".\"+spec.group"))
        versions = spec.get("versions") or []
        if sum(1 for v in versions if v.get("storage")) != 1:
            out.append(cause("spec.versions", "Invalid value: must have exactly one version "
                             "marked as storage version"))
        for i, v in enumerate(versions):
            if not ((v.get("schema") or {}).get("openAPIV3Schema")):
                out.append(cause(f"spec.versions[{i}].schema.openAPIV3Schema",
                                 "Required value: schemas are required", "FieldValueRequired"))
        if old is not None and old["spec"].get("scope") != spec.get("scope"):
            out.append(cause("spec.scope", "Invalid value: field is immutable"))
        return out

    def _crd_established(self, crd: dict) -> dict:
        """What the CRD controllers do next: serve the resource, report it Established."""
        self.register_crd(crd)
        now = now_rfc3339()
        conds = [{"type": t, "status": "True", "reason": r, "message": m,
                  "lastTransitionTime": now}
                 for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                 ("Established", "InitialNamesAccepted",
                                  "the initial names have been accepted"))]
        storage = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
        status = {"conditions": conds, "acceptedNames": crd["spec"]["names"],
                  "storedVersions": storage}
        meta = crd["metadata"]
        return self.write_status(CRDS, None, meta["name"], status, meta["uid"]) or crd

    def register_crd(self, crd: dict) -> ResourceType:
        spec = crd["spec"]
        names = spec["names"]
        served = [v for v in spec["versions"] if v.get("served", True)]
        versions = {}
        for v in served:
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            versions[v["name"]] = {"schema": CustomSchema(schema) if schema else None,
                                   "status": "status" in (v.get("subresources") or {})}
        rt = ResourceType(spec["group"], tuple(versions), names["plural"], names["kind"],
                          namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                          singular=names.get("singular") or names["kind"].lower(),
                          short_names=tuple(names.get("shortNames") or ()), custom=True,
                          custom_versions=versions)
        self.store.register(rt)
        return rt

    def _prepare_customresourcedefinitions(self, rt, obj, old):
        if old is not None:          # a changed CRD changes what is served at once
            self.register_crd(obj)

    def _remove_custom_resources(self, crd: dict) -> None:
        key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
        for obj in self.store.list(key):
            m = obj["metadata"]
            self.store.remove(key, m.get("namespace"), m["name"])
        self.store.unregister(key)
