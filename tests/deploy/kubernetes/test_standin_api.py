"""The Kubernetes stand-in (standin/) as the unmodified kubernetes_asyncio client sees it:
status codes and Status bodies, resourceVersions, selectors, patches, watches, custom
resources, garbage collection, Deployments, Services through the kube-proxy stand-in,
logs, eviction, port-forwarding and in-cluster configuration.

Most tests share one stand-in (`kube_module`); each uses its own namespace.
"""
import asyncio
import contextlib
import json
import re
import sys
import time
import uuid

import aiohttp
import pytest

from taskcore.testing import import_required, run

import_required("kubernetes_asyncio")      # skips outside CI when missing, fails under CI
from kubernetes_asyncio import client, config, watch  # noqa: E402
from kubernetes_asyncio.client.rest import ApiException  # noqa: E402
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader  # noqa: E402
from kubernetes_asyncio.stream import WsApiClient  # noqa: E402

PY = sys.executable
SLEEP = ["sleep", "600"]
GENERATED = re.compile(r"^[bcdfghjklmnpqrstvwxz2456789]{5}$")


@contextlib.asynccontextmanager
async def api_client(k, ws=False):
    cfg = client.Configuration()
    await config.load_kube_config(config_file=k.kubeconfig, client_configuration=cfg)
    cls = WsApiClient if ws else client.ApiClient
    async with cls(cfg) as api:
        yield api


def status_body(exc: ApiException) -> dict:
    body = json.loads(exc.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == exc.status
    return body


async def fails(status: int, reason: str, coro):
    with pytest.raises(ApiException) as info:
        await coro
    assert info.value.status == status, info.value.body
    body = status_body(info.value)
    assert body["reason"] == reason, body
    return body


async def new_namespace(api) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


async def eventually(fn, timeout=15.0, message="a condition", interval=0.05):
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(interval)


def pod_manifest(name=None, command=SLEEP, labels=None, grace=2, **spec):
    meta = {"name": name} if name else {"generateName": "p-"}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {**meta, "labels": labels or {}},
            "spec": {"terminationGracePeriodSeconds": grace,
                     "containers": [{"name": "main", "image": "standin/python:3.11",
                                     "command": command}], **spec}}


# An HTTP server on the pod's own IP, Ready once it listens.
HTTP_CONTAINER = {
    "name": "web", "image": "standin/python:3.11",
    "command": [PY, "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
    "ports": [{"name": "http", "containerPort": 8080}],
    "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1}}


def deployment_manifest(name, replicas, container, labels=None):
    labels = labels or {"app": name}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"terminationGracePeriodSeconds": 2,
                                           "containers": [container]}}}}


async def running_pods(v1, ns, selector, n):
    async def check():
        pods = (await v1.list_namespaced_pod(ns, label_selector=selector)).items
        pods = [p for p in pods if p.metadata.deletion_timestamp is None]
        ready = [p for p in pods if p.status.phase == "Running" and any(
            c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        return ready if len(ready) == n and len(pods) == n else None
    return await eventually(check, message=f"{n} ready pods with {selector}")


# ---------------------------------------------------------------------------------------------
# Basic verbs
# ---------------------------------------------------------------------------------------------

def test_store_keeps_a_bounded_watch_history():
    """A watch may start from any resourceVersion still in the history window."""
    from .standin.registry import Registry
    from .standin.store import Expired, Store

    store = Store(history=3)
    registry = Registry(store)
    ns_rt, cm_rt = registry.rt(("", "namespaces")), registry.rt(("", "configmaps"))
    registry.create(ns_rt, None, {"metadata": {"name": "default"}})
    rvs = [int(registry.create(cm_rt, "default", {"metadata": {"name": f"c{i}"}})
               ["metadata"]["resourceVersion"]) for i in range(5)]
    assert rvs == list(range(rvs[0], rvs[0] + 5))
    w = store.watch(cm_rt.key, "default", since=rvs[1])     # events rvs[2:] are kept
    assert [w.queue.get_nowait()[1]["metadata"]["name"] for _ in range(3)] == ["c2", "c3", "c4"]
    with pytest.raises(Expired):
        store.watch(cm_rt.key, "default", since=rvs[1] - 1)
    store.compact()
    with pytest.raises(Expired):
        store.watch(cm_rt.key, "default", since=rvs[-1] - 1)
    store.watch(cm_rt.key, "default", since=rvs[-1])


def test_create_get_delete_and_error_statuses(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)
            cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="one"), data={"a": "1"})
            obj, code, _ = await v1.create_namespaced_config_map_with_http_info(ns, cm)
            assert code == 201
            assert obj.metadata.namespace == ns and obj.metadata.uid
            assert obj.metadata.creation_timestamp is not None
            assert int(obj.metadata.resource_version) > 0
            got = await v1.read_namespaced_config_map("one", ns)
            assert got.data == {"a": "1"} and got.metadata.uid == obj.metadata.uid

            body = await fails(409, "AlreadyExists", v1.create_namespaced_config_map(ns, cm))
            assert body["details"] == {"name": "one", "kind": "configmaps"}
            body = await fails(404, "NotFound", v1.read_namespaced_config_map("two", ns))
            assert body["message"] == 'configmaps "two" not found'
            body = await fails(404, "NotFound", v1.create_namespaced_config_map("missing-ns", cm))
            assert body["message"] == 'namespaces "missing-ns" not found'

            # 422: a bad name, a missing required field, an unknown field (strict schemas).
            bad = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="Not_A_Name"))
            body = await fails(422, "Invalid", v1.create_namespaced_config_map(ns, bad))
            assert body["details"]["causes"][0]["field"] == "metadata.name"
            pod = pod_manifest("noimage")
            del pod["spec"]["containers"][0]["image"]
            body = await fails(422, "Invalid", v1.create_namespaced_pod(ns, pod))
            assert {"reason": "FieldValueRequired", "message": "Required value",
                    "field": "spec.containers[0].image"} in body["details"]["causes"]
            pod = pod_manifest("typo")
            pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
            body = await fails(422, "Invalid", v1.create_namespaced_pod(ns, pod))
            assert "imagePullPolicyy" in body["message"]
            assert not (await v1.list_namespaced_pod(ns)).items

            deleted = await v1.delete_namespaced_config_map("one", ns)
            assert deleted.status == "Success" and deleted.details.name == "one"
            await fails(404, "NotFound", v1.read_namespaced_config_map("one", ns))
            await fails(404, "NotFound", v1.delete_namespaced_config_map("one", ns))

            # Built-in validators are compiled once per kind, then cheap.
            stats = kube_module.validation_stats()
            assert stats["validations"] > stats["compiles"] > 0
            assert stats["seconds"] / stats["validations"] < 0.01, stats
    run(main())


def test_generate_name_and_one_increasing_resource_version(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)
            rvs, names = [], set()
            for i in range(3):
                cm = await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(generate_name="gen-")))
                assert cm.metadata.name.startswith("gen-")
                assert GENERATED.match(cm.metadata.name[4:]), cm.metadata.name
                names.add(cm.metadata.name)
                rvs.append(int(cm.metadata.resource_version))
                secret = await v1.create_namespaced_secret(ns, client.V1Secret(
                    metadata=client.V1ObjectMeta(name=f"s{i}"), string_data={"k": "v"}))
                assert secret.data == {"k": "dg=="} and secret.type == "Opaque"
                rvs.append(int(secret.metadata.resource_version))
            assert len(names) == 3
            assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)
            lst = await v1.list_namespaced_config_map(ns)
            assert int(lst.metadata.resource_version) >= rvs[-1]
            assert {c.metadata.name for c in lst.items} == names | {"kube-root-ca.crt"}
            # A list across all namespaces includes these.
            everywhere = await v1.list_config_map_for_all_namespaces()
            assert names <= {c.metadata.name for c in everywhere.items}
            # Neither name nor generateName: 422.
            await fails(422, "Invalid", v1.create_namespaced_config_map(
                ns, client.V1ConfigMap(metadata=client.V1ObjectMeta())))
    run(main())


def test_label_and_field_selectors(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)
            labels = {"a": {"app": "x", "tier": "web", "e": ""},
                      "b": {"app": "x", "tier": "db"},
                      "c": {"app": "y"}}
            for name, lab in labels.items():
                await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(name=name, labels=lab)))

            async def names(**kw):
                return sorted(c.metadata.name for c in
                              (await v1.list_namespaced_config_map(ns, **kw)).items)
            assert await names(label_selector="app=x") == ["a", "b"]
            assert await names(label_selector="app==x,tier!=db") == ["a"]
            assert await names(label_selector="tier") == ["a", "b"]
            assert await names(label_selector="!tier,app") == ["c"]
            assert await names(label_selector="e") == ["a"]
            assert await names(label_selector="tier in (db, cache)") == ["b"]
            # notin also matches objects without the label, as on a real server.
            assert await names(label_selector="app notin (x)") == ["c", "kube-root-ca.crt"]
            assert await names(label_selector="app in (x,y),tier notin (web)") == ["b", "c"]
            assert await names(field_selector="metadata.name=b") == ["b"]
            assert await names(field_selector="metadata.name!=b,metadata.namespace=" + ns) == \
                ["a", "c", "kube-root-ca.crt"]
            await fails(400, "BadRequest", v1.list_namespaced_config_map(
                ns, label_selector="app in x"))
            body = await fails(400, "BadRequest", v1.list_namespaced_config_map(
                ns, field_selector="data.x=1"))
            assert body["message"] == "field label not supported: data.x"

            # status.phase on pods: one runs, one waits for an image that cannot be pulled.
            kube_module.set_image_missing("standin/missing:1")
            await v1.create_namespaced_pod(ns, pod_manifest("runs"))
            stuck = pod_manifest("stuck")
            stuck["spec"]["containers"][0]["image"] = "standin/missing:1"
            await v1.create_namespaced_pod(ns, stuck)

            async def by_phase():
                running = await v1.list_namespaced_pod(ns, field_selector="status.phase=Running")
                pending = await v1.list_namespaced_pod(ns, field_selector="status.phase!=Running")
                return ([p.metadata.name for p in running.items] == ["runs"]
                        and [p.metadata.name for p in pending.items] == ["stuck"])
            await eventually(by_phase, message="phase field selectors")
            stuck = await v1.read_namespaced_pod("stuck", ns)
            waiting = stuck.status.container_statuses[0].state.waiting
            assert waiting.reason in ("ErrImagePull", "ImagePullBackOff")
            nodes = await v1.list_namespaced_pod(ns, field_selector="spec.nodeName=standin-node")
            assert len(nodes.items) == 2
    run(main())


def test_merge_strategic_and_json_patches(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1, apps = client.CoreV1Api(api), client.AppsV1Api(api)
            ns = await new_namespace(api)
            await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="cm", labels={"keep": "1", "drop": "1"}),
                data={"a": "1", "b": "2"}))
            merged = await v1.patch_namespaced_config_map(
                "cm", ns, {"metadata": {"labels": {"drop": None, "new": "1"}},
                           "data": {"b": None, "c": "3"}},
                _content_type="application/merge-patch+json")
            assert merged.metadata.labels == {"keep": "1", "new": "1"}
            assert merged.data == {"a": "1", "c": "3"}
            patched = await v1.patch_namespaced_config_map("cm", ns, [
                {"op": "test", "path": "/data/a", "value": "1"},
                {"op": "replace", "path": "/data/a", "value": "10"},
                {"op": "add", "path": "/data/d~1e", "value": "4"},
                {"op": "remove", "path": "/data/c"}])
            assert patched.data == {"a": "10", "d/e": "4"}
            assert int(patched.metadata.resource_version) > int(merged.metadata.resource_version)
            await fails(422, "Invalid", v1.patch_namespaced_config_map(
                "cm", ns, [{"op": "test", "path": "/data/a", "value": "nope"}]))
            await fails(404, "NotFound", v1.patch_namespaced_config_map(
                "absent", ns, {"data": {}}, _content_type="application/merge-patch+json"))

            # A dict body goes as a strategic merge patch: env merged by name.
            container = {"name": "main", "image": "standin/python:3.11", "command": SLEEP,
                         "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
            d = deployment_manifest("sm", 0, container)
            await apps.create_namespaced_deployment(ns, d)
            out = await apps.patch_namespaced_deployment("sm", ns, {"spec": {"template": {"spec": {
                "containers": [{"name": "main", "env": [{"name": "B", "value": "20"},
                                                        {"name": "C", "value": "3"}]}]}}}})
            c = out.spec.template.spec.containers[0]
            assert c.image == "standin/python:3.11" and c.command == SLEEP
            assert [(e.name, e.value) for e in c.env] == [("A", "1"), ("B", "20"), ("C", "3")]
            assert out.metadata.generation == 2

            # The main resource ignores .status, /status changes nothing else.
            out = await apps.patch_namespaced_deployment(
                "sm", ns, {"metadata": {"labels": {"l": "1"}}, "status": {"replicas": 42}})
            assert out.metadata.labels == {"l": "1"} and out.status.replicas != 42
            assert out.metadata.generation == 2, "metadata changes keep the generation"
            out = await apps.patch_namespaced_deployment_status(
                "sm", ns, {"status": {"observedGeneration": 42}, "spec": {"replicas": 5},
                           "metadata": {"labels": {"l": "2"}}})
            assert out.status.observed_generation == 42
            assert out.spec.replicas == 0 and out.metadata.labels == {"l": "1"}
            assert out.metadata.generation == 2
    run(main())


def test_put_conflicts_and_noop_updates(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)
            cm = await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="cm"), data={"n": "0"}))
            stale = cm.metadata.resource_version
            cm.data = {"n": "1"}
            updated = await v1.replace_namespaced_config_map("cm", ns, cm)
            assert int(updated.metadata.resource_version) > int(stale)
            cm.data = {"n": "2"}          # still carries the old resourceVersion
            body = await fails(409, "Conflict", v1.replace_namespaced_config_map("cm", ns, cm))
            assert "the object has been modified" in body["message"]
            assert (await v1.read_namespaced_config_map("cm", ns)).data == {"n": "1"}
            # Writing the same content is not a change: same resourceVersion.
            again = await v1.replace_namespaced_config_map("cm", ns, updated)
            assert again.metadata.resource_version == updated.metadata.resource_version
            # Without a resourceVersion a built-in kind is updated unconditionally.
            cm.metadata.resource_version = None
            cm.data = {"n": "3"}
            assert (await v1.replace_namespaced_config_map("cm", ns, cm)).data == {"n": "3"}
            cm.metadata.name = "other"
            await fails(400, "BadRequest", v1.replace_namespaced_config_map("cm", ns, cm))
            # Preconditions on delete.
            await fails(409, "Conflict", v1.delete_namespaced_config_map(
                "cm", ns, body=client.V1DeleteOptions(
                    preconditions=client.V1Preconditions(resource_version=stale))))
    run(main())


# ---------------------------------------------------------------------------------------------
# Watches
# ---------------------------------------------------------------------------------------------

def test_watch_replays_history_and_starts_with_synthetic_added(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)
            start = (await v1.list_namespaced_config_map(ns)).metadata.resource_version
            await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="w", labels={"sel": "yes"})))
            await v1.patch_namespaced_config_map("w", ns, {"data": {"x": "1"}})
            await v1.patch_namespaced_config_map("w", ns, {"metadata": {"labels": {"sel": "no"}}})
            await v1.delete_namespaced_config_map("w", ns)

            t0 = time.monotonic()
            events = []
            async with watch.Watch() as w:
                async for ev in w.stream(v1.list_namespaced_config_map, ns,
                                         resource_version=start, timeout_seconds=1):
                    events.append((ev["type"], ev["object"].metadata.name,
                                   int(ev["object"].metadata.resource_version)))
            assert 0.9 < time.monotonic() - t0 < 5, "timeoutSeconds ends the watch"
            assert [e[:2] for e in events] == [("ADDED", "w"), ("MODIFIED", "w"),
                                               ("MODIFIED", "w"), ("DELETED", "w")]
            assert [e[2] for e in events] == sorted(e[2] for e in events)

            # With a label selector, the object that stops matching is DELETED for the watch.
            seen = []
            async with watch.Watch() as w:
                async for ev in w.stream(v1.list_namespaced_config_map, ns,
                                         label_selector="sel=yes", resource_version=start,
                                         timeout_seconds=1):
                    seen.append(ev["type"])
            assert seen == ["ADDED", "MODIFIED", "DELETED"]

            # Without a resourceVersion: synthetic ADDED for what exists, then live events.
            await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="old")))
            got = []

            async def later():
                await asyncio.sleep(0.3)
                await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(name="new")))
            task = asyncio.create_task(later())
            async with watch.Watch() as w:
                async for ev in w.stream(v1.list_namespaced_config_map, ns, timeout_seconds=2):
                    got.append((ev["type"], ev["object"].metadata.name))
                    if ev["object"].metadata.name == "new":
                        w.stop()
            await task
            assert sorted(got[:2]) == [("ADDED", "kube-root-ca.crt"), ("ADDED", "old")]
            assert got[2:] == [("ADDED", "new")]
    run(main())


def test_watch_from_a_compacted_resource_version_is_410(kube):
    async def main():
        async with api_client(kube) as api:
            v1 = client.CoreV1Api(api)
            start = (await v1.list_namespaced_config_map("default")).metadata.resource_version
            await v1.create_namespaced_config_map("default", client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="c1")))
            # Before compaction the history still answers.
            async with watch.Watch() as w:
                types = [ev["type"] async for ev in w.stream(
                    v1.list_namespaced_config_map, "default", resource_version=start,
                    timeout_seconds=1)]
            assert types == ["ADDED"]
            kube.compact()
            with pytest.raises(ApiException) as info:
                async with watch.Watch() as w:
                    async for _ in w.stream(v1.list_namespaced_config_map, "default",
                                            resource_version=start, timeout_seconds=5):
                        pass
            assert info.value.status == 410
            assert "Expired" in info.value.reason
            # A watch from the current resourceVersion is fine.
            now = (await v1.list_namespaced_config_map("default")).metadata.resource_version
            async with watch.Watch() as w:
                assert [ev async for ev in w.stream(v1.list_namespaced_config_map, "default",
                                                    resource_version=now,
                                                    timeout_seconds=1)] == []
    run(main())


# ---------------------------------------------------------------------------------------------
# Custom resources
# ---------------------------------------------------------------------------------------------

GROUP, PLURAL = "standin.taskcore.dev", "widgets"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {"group": GROUP, "scope": "Namespaced",
             "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget",
                       "shortNames": ["wg"]},
             "versions": [{
                 "name": "v1", "served": True, "storage": True,
                 "subresources": {"status": {}},
                 "schema": {"openAPIV3Schema": {
                     "type": "object",
                     "properties": {
                         "spec": {"type": "object", "required": ["size"], "properties": {
                             "size": {"type": "integer", "minimum": 0},
                             "mode": {"type": "string", "enum": ["fast", "slow"],
                                      "default": "fast"},
                             "extra": {"type": "object",
                                       "x-kubernetes-preserve-unknown-fields": True}}},
                         "status": {"type": "object", "properties": {
                             "phase": {"type": "string"}}}}}}}]}}


def test_custom_resources(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            ext, co = client.ApiextensionsV1Api(api), client.CustomObjectsApi(api)
            ns = await new_namespace(api)
            await fails(404, "NotFound", co.list_namespaced_custom_object(GROUP, "v1", ns, PLURAL))
            await ext.create_custom_resource_definition(CRD)

            async def established():
                crd = await ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
                return any(c.type == "Established" and c.status == "True"
                           for c in crd.status.conditions or [])
            await eventually(established, message="the CRD to be Established")

            body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w1"},
                    "spec": {"size": 2, "bogus": 1, "extra": {"anything": [1, 2]}},
                    "status": {"phase": "ignored on create"}}
            w = await co.create_namespaced_custom_object(GROUP, "v1", ns, PLURAL, body)
            assert w["kind"] == "Widget" and w["apiVersion"] == f"{GROUP}/v1"
            assert w["metadata"]["generation"] == 1
            # Pruned, defaulted, status dropped (status subresource), unknown kept where allowed.
            assert w["spec"] == {"size": 2, "mode": "fast", "extra": {"anything": [1, 2]}}
            assert "status" not in w

            body = await fails(422, "Invalid", co.create_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, {"apiVersion": f"{GROUP}/v1", "kind": "Widget",
                                          "metadata": {"name": "w2"},
                                          "spec": {"size": -1, "mode": "medium"}}))
            fields = {c["field"] for c in body["details"]["causes"]}
            assert fields == {"spec.size", "spec.mode"}, body
            assert body["message"].startswith(f'Widget.{GROUP} "w2" is invalid')
            await fails(422, "Invalid", co.create_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, {"apiVersion": f"{GROUP}/v1", "kind": "Widget",
                                          "metadata": {"name": "w3"}, "spec": {}}))

            merge = "application/merge-patch+json"
            w = await co.patch_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, "w1", {"spec": {"size": 3}, "status": {"phase": "x"}},
                _content_type=merge)
            assert w["spec"]["size"] == 3 and w["metadata"]["generation"] == 2
            assert "status" not in w, "the main resource ignores status"
            w = await co.patch_namespaced_custom_object_status(
                GROUP, "v1", ns, PLURAL, "w1", {"status": {"phase": "Ready"},
                                                "spec": {"size": 99}}, _content_type=merge)
            assert w["status"] == {"phase": "Ready"} and w["spec"]["size"] == 3
            assert w["metadata"]["generation"] == 2
            # kubernetes_asyncio sends a dict as application/json-patch+json unless told:
            # a real server rejects that with 400, and so does the stand-in.
            await fails(400, "BadRequest", co.patch_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, "w1", {"spec": {"size": 4}}))
            # Strategic merge patches do not apply to custom resources.
            await fails(415, "UnsupportedMediaType", co.patch_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, "w1", {"spec": {"size": 4}},
                _content_type="application/strategic-merge-patch+json"))
            # PUT of a custom resource needs the resourceVersion.
            stale = dict(w)
            no_rv = json.loads(json.dumps(w))
            del no_rv["metadata"]["resourceVersion"]
            await fails(422, "Invalid", co.replace_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, "w1", no_rv))
            w["spec"]["size"] = 5
            w = await co.replace_namespaced_custom_object(GROUP, "v1", ns, PLURAL, "w1", w)
            assert w["metadata"]["generation"] == 3 and w["status"] == {"phase": "Ready"}
            await fails(409, "Conflict", co.replace_namespaced_custom_object(
                GROUP, "v1", ns, PLURAL, "w1", stale))

            everywhere = await co.list_cluster_custom_object(GROUP, "v1", PLURAL)
            assert [i["metadata"]["name"] for i in everywhere["items"]] == ["w1"]
            assert everywhere["items"][0]["kind"] == "Widget"

            await ext.delete_custom_resource_definition(f"{PLURAL}.{GROUP}")
            await fails(404, "NotFound", co.list_namespaced_custom_object(GROUP, "v1", ns, PLURAL))
            assert not [o for o in kube_module.objects("Widget")]
    run(main())


# ---------------------------------------------------------------------------------------------
# Garbage collection, Deployments
# ---------------------------------------------------------------------------------------------

def test_owner_references_cascade_and_orphan(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)

            async def cm(name, owner=None):
                refs = None
                if owner is not None:
                    refs = [client.V1OwnerReference(api_version="v1", kind="ConfigMap",
                                                    name=owner.metadata.name,
                                                    uid=owner.metadata.uid)]
                return await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(name=name, owner_references=refs)))
            a = await cm("a")
            b = await cm("b", a)
            await cm("c", b)
            x = await cm("x")
            await cm("y", x)
            await v1.delete_namespaced_config_map("a", ns)

            async def names():
                return sorted(c.metadata.name for c in
                              (await v1.list_namespaced_config_map(ns)).items)
            await eventually(lambda: _eq(names(), ["kube-root-ca.crt", "x", "y"]),
                             message="b and c collected")
            await v1.delete_namespaced_config_map("x", ns, propagation_policy="Orphan")
            await asyncio.sleep(0.3)
            y = await v1.read_namespaced_config_map("y", ns)
            assert not y.metadata.owner_references
            # An object whose owner does not exist is collected.
            ghost = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="ghost",
                                            uid=str(uuid.uuid4()))
            await v1.create_namespaced_config_map(ns, client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="z", owner_references=[ghost])))
            await eventually(lambda: _eq(names(), ["kube-root-ca.crt", "y"]),
                             message="z collected")
    run(main())


async def _eq(coro, expected):
    return await coro == expected


def test_deployment_keeps_replicas_and_cascades(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1, apps = client.CoreV1Api(api), client.AppsV1Api(api)
            ns = await new_namespace(api)
            container = {"name": "main", "image": "standin/python:3.11", "command": SLEEP}
            d = await apps.create_namespaced_deployment(ns, deployment_manifest("dep", 2,
                                                                                container))
            pods = await running_pods(v1, ns, "app=dep", 2)
            for p in pods:
                ref = p.metadata.owner_references[0]
                assert (ref.kind, ref.name, ref.uid, ref.controller) == \
                    ("Deployment", "dep", d.metadata.uid, True)
                assert re.match(r"^dep-[0-9a-f]{10}-[bcdfghjklmnpqrstvwxz2456789]{5}$",
                                p.metadata.name)

            async def status_ok():
                s = (await apps.read_namespaced_deployment("dep", ns)).status
                return (s.ready_replicas == 2 and s.available_replicas == 2
                        and s.updated_replicas == 2 and s.observed_generation == 1
                        and any(c.type == "Available" and c.status == "True"
                                for c in s.conditions))
            await eventually(status_ok, message="deployment status")

            # A crashed container restarts in place (restartPolicy Always).
            victim = pods[0].metadata.name
            kube_module.kill_pod(ns, victim)

            async def restarted():
                p = await v1.read_namespaced_pod(victim, ns)
                cs = p.status.container_statuses[0]
                return cs.restart_count == 1 and cs.state.running is not None
            await eventually(restarted, message="the killed container to restart")

            # A deleted pod is replaced by a new one.
            await v1.delete_namespaced_pod(victim, ns)
            pods = await running_pods(v1, ns, "app=dep", 2)
            assert victim not in {p.metadata.name for p in pods}

            # An evicted pod (node pressure) stays Failed and is replaced.
            evicted = pods[0].metadata.name
            kube_module.evict(ns, evicted)
            pods = await running_pods(v1, ns, "app=dep", 2)
            assert evicted not in {p.metadata.name for p in pods}

            # The Eviction API deletes gracefully.
            target = pods[0].metadata.name
            await v1.create_namespaced_pod_eviction(target, ns, client.V1Eviction(
                metadata=client.V1ObjectMeta(name=target, namespace=ns)))
            pods = await running_pods(v1, ns, "app=dep", 2)
            assert target not in {p.metadata.name for p in pods}

            # Scale subresource.
            scale = await apps.patch_namespaced_deployment_scale("dep", ns,
                                                                 {"spec": {"replicas": 1}})
            assert scale.spec.replicas == 1 and scale.status.selector == "app=dep"
            await running_pods(v1, ns, "app=dep", 1)
            # A template change replaces every pod.
            before = {p.metadata.name for p in (await running_pods(v1, ns, "app=dep", 1))}
            await apps.patch_namespaced_deployment("dep", ns, {"spec": {"template": {
                "metadata": {"annotations": {"rev": "2"}}}}})
            after = await running_pods(v1, ns, "app=dep", 1)
            assert not before & {p.metadata.name for p in after}
            assert after[0].metadata.annotations == {"rev": "2"}

            pids = [pid for pp in kube_module.pod_pids(ns).values() for pid in pp]
            assert pids
            await apps.delete_namespaced_deployment("dep", ns)

            async def gone():
                return not (await v1.list_namespaced_pod(ns)).items
            await eventually(gone, message="the deployment's pods to be collected")
            assert not [pid for pid in pids if _alive(pid)], "the processes end first"
    run(main())


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_pod_graceful_and_immediate_deletion(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)
            # A process that ignores SIGTERM lives out its grace period of 1 s.
            stubborn = [PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                  "signal.SIG_IGN); print('up', flush=True); time.sleep(600)"]
            for name in ("graceful", "forced"):
                await v1.create_namespaced_pod(ns, pod_manifest(name, stubborn, grace=1,
                                                                labels={"del": "1"}))
            await running_pods(v1, ns, "del=1", 2)
            await eventually(lambda: _has_log(v1, ns, "graceful", "up\n"), message="started")
            pids = kube_module.wait_for(
                lambda: (lambda p: p if len(p.get("graceful", [])) == 1
                         and len(p.get("forced", [])) == 1 else None)(kube_module.pod_pids(ns)),
                message="the pods' pids")
            start = (await v1.list_namespaced_pod(ns)).metadata.resource_version
            t0 = time.monotonic()
            answer = await v1.delete_namespaced_pod("graceful", ns)
            assert answer.metadata.deletion_timestamp is not None
            assert answer.metadata.deletion_grace_period_seconds == 1
            assert (await v1.read_namespaced_pod("graceful", ns)).metadata.deletion_timestamp

            events = []
            async with watch.Watch() as w:
                async for ev in w.stream(v1.list_namespaced_pod, ns, resource_version=start,
                                         field_selector="metadata.name=graceful",
                                         timeout_seconds=10):
                    events.append((ev["type"], ev["object"].metadata.deletion_timestamp
                                   is not None))
                    if ev["type"] == "DELETED":
                        w.stop()
            took = time.monotonic() - t0
            assert events[0] == ("MODIFIED", True) and events[-1] == ("DELETED", True)
            assert 0.9 < took < 5, took
            assert not _alive(pids["graceful"][0])

            # gracePeriodSeconds=0: gone from the API at once, the process killed.
            await v1.delete_namespaced_pod("forced", ns, grace_period_seconds=0)
            await fails(404, "NotFound", v1.read_namespaced_pod("forced", ns))
            kube_module.wait_for(lambda: not _alive(pids["forced"][0]), timeout=5,
                                 message="the forced pod's process to die")
    run(main())


async def _has_log(v1, ns, name, text):
    try:
        return text in await v1.read_namespaced_pod_log(name, ns)
    except ApiException:
        return False


# ---------------------------------------------------------------------------------------------
# Services and kube-proxy
# ---------------------------------------------------------------------------------------------

async def http_get(host, port, timeout=5.0) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(f"http://{host}:{port}/") as r:
            await r.read()
            return r.status


async def closed(reader) -> bool:
    """Whether the peer ends the connection (with a FIN or a reset) before sending data."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


async def refused(host, port) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except ConnectionRefusedError:
        return True
    w.close()
    return False


def test_services_cluster_ip_node_port_load_balancer(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1, apps = client.CoreV1Api(api), client.AppsV1Api(api)
            ns = await new_namespace(api)

            def svc(name, type_, **port):
                return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                        "spec": {"type": type_, "selector": {"app": "web"},
                                 "ports": [{"name": "http", "port": 80, "targetPort": "http",
                                            **port}]}}
            cip = await v1.create_namespaced_service(ns, svc("web", "ClusterIP"))
            ip = cip.spec.cluster_ip
            assert ip.startswith("127.3.") and cip.spec.cluster_ips == [ip]
            np = await v1.create_namespaced_service(ns, svc("web-np", "NodePort"))
            node_port = np.spec.ports[0].node_port
            assert 30000 <= node_port <= 32767
            lb = await v1.create_namespaced_service(ns, svc("web-lb", "LoadBalancer"))
            assert lb.spec.ports[0].node_port and lb.status.load_balancer.ingress is None
            body = await fails(422, "Invalid", v1.create_namespaced_service(
                ns, svc("web-dup", "NodePort", nodePort=node_port)))
            assert "already allocated" in body["message"]

            # No endpoint yet: the cluster IP refuses connections.
            assert await refused(ip, 80)
            await apps.create_namespaced_deployment(ns, deployment_manifest("web", 2,
                                                                            HTTP_CONTAINER))
            pods = await running_pods(v1, ns, "app=web", 2)
            pod_ips = sorted(p.status.pod_ip for p in pods)
            assert all(p.startswith("127.2.") for p in pod_ips)

            async def endpoints():
                ep = await v1.read_namespaced_endpoints("web", ns)
                subsets = ep.subsets or []
                got = sorted(a.ip for s in subsets for a in s.addresses or [])
                return got == pod_ips and subsets[0].ports[0].port == 8080
            await eventually(endpoints, message="endpoints of the service")
            for _ in range(4):                      # round robin over both pods
                assert await eventually(lambda: _ok(http_get(ip, 80)), message="cluster IP")
            assert await http_get("127.0.0.1", node_port) == 200

            async def lb_ip():
                s = await v1.read_namespaced_service("web-lb", ns)
                ingress = s.status.load_balancer.ingress
                return ingress[0].ip if ingress else None
            lb_address = await eventually(lb_ip, timeout=5, message="load balancer ingress")
            assert lb_address.startswith("127.4.")
            assert await eventually(lambda: _ok(http_get(lb_address, 80)), message="LB")

            # An open connection through the proxy ends with its pod.
            reader, writer = await asyncio.open_connection(ip, 80)
            writer.write(b"GET / HTTP/1.1\r\n")          # incomplete: the server waits
            await writer.drain()
            # Scaled to zero: no endpoint, so connections are refused again.
            await apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 0}})
            await eventually(lambda: refused(ip, 80), message="cluster IP to refuse")
            assert await asyncio.wait_for(closed(reader), 10)
            writer.close()
            assert await refused("127.0.0.1", node_port)
            assert await refused(lb_address, 80)
    run(main())


async def _ok(coro) -> bool:
    try:
        return await coro == 200
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return False


# ---------------------------------------------------------------------------------------------
# Pod subresources: log, port-forward; in-cluster access; authentication
# ---------------------------------------------------------------------------------------------

def test_pod_log(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)
            script = ("import time\nfor i in range(5):\n    print('line', i, flush=True)\n"
                      "    time.sleep(0.1)\n")
            await v1.create_namespaced_pod(ns, pod_manifest("logger", [PY, "-c", script],
                                                            restartPolicy="Never"))
            # follow streams until the container exits.
            async def started():
                p = await v1.read_namespaced_pod("logger", ns)
                return p.status.phase in ("Running", "Succeeded")
            await eventually(started, message="the logger to start")
            followed = await v1.read_namespaced_pod_log("logger", ns, follow=True)
            assert followed == "".join(f"line {i}\n" for i in range(5))
            assert await v1.read_namespaced_pod_log("logger", ns, tail_lines=2) == \
                "line 3\nline 4\n"
            stamped = await v1.read_namespaced_pod_log("logger", ns, timestamps=True)
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z line 0$",
                            stamped.splitlines()[0])
            await fails(400, "BadRequest", v1.read_namespaced_pod_log("logger", ns,
                                                                      container="nope"))
            await fails(400, "BadRequest", v1.read_namespaced_pod_log("logger", ns,
                                                                      previous=True))
            p = await v1.read_namespaced_pod("logger", ns)
            assert p.status.phase == "Succeeded"
    run(main())


def test_port_forward_websocket(kube_module):
    async def main():
        async with api_client(kube_module) as api:
            v1 = client.CoreV1Api(api)
            ns = await new_namespace(api)
            pod = pod_manifest("web", labels={"app": "pf"})
            pod["spec"]["containers"] = [HTTP_CONTAINER]
            await v1.create_namespaced_pod(ns, pod)
            await running_pods(v1, ns, "app=pf", 1)
        async with api_client(kube_module, ws=True) as ws_api:
            v1ws = client.CoreV1Api(ws_api)
            ws_ctx = await v1ws.connect_get_namespaced_pod_portforward(
                "web", ns, ports="8080", _preload_content=False)
            async with ws_ctx as ws:
                first = [(await ws.receive_bytes(timeout=5)) for _ in range(2)]
                assert first == [b"\x00\x90\x1f", b"\x01\x90\x1f"]   # 8080, little-endian
                await ws.send_bytes(b"\x00GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while True:
                    msg = await ws.receive(timeout=5)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    assert msg.data[0] == 0
                    data += msg.data[1:]
            assert data.startswith(b"HTTP/1.0 200 OK"), data[:200]
            assert b"Directory listing" in data
            # A port nothing listens on: an error on channel 1, then the socket closes.
            ws_ctx = await v1ws.connect_get_namespaced_pod_portforward(
                "web", ns, ports="9", _preload_content=False)
            async with ws_ctx as ws:
                frames = []
                while True:
                    msg = await ws.receive(timeout=5)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    frames.append(msg.data)
            assert frames[:2] == [b"\x00\x09\x00", b"\x01\x09\x00"]
            assert frames[2][0] == 1 and b"error forwarding port 9" in frames[2]
    run(main())


def test_in_cluster_configuration(kube_module):
    async def main():
        k = kube_module
        sa = k.serviceaccount_dir
        assert (sa / "namespace").read_text() == "default"
        cfg = client.Configuration()
        InClusterConfigLoader(token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt"),
                              environ=k.incluster_env).load_and_set(cfg)
        assert cfg.host == k.url
        async with client.ApiClient(cfg) as api:
            v1 = client.CoreV1Api(api)
            names = {n.metadata.name for n in (await v1.list_namespace()).items}
            assert {"default", "kube-system"} <= names
            ns = await new_namespace(api)
            await v1.create_namespaced_service(ns, {
                "metadata": {"name": "my-svc"},
                "spec": {"selector": {"app": "none"}, "ports": [{"port": 8786}]}})
            # A pod gets the in-cluster variables and the service links, and can use them.
            script = (
                "import asyncio, os\n"
                "from kubernetes_asyncio import client\n"
                "from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader\n"
                "d = os.environ['TASKCORE_KUBE_SERVICEACCOUNT_DIR']\n"
                "print('NS', open(os.path.join(d, 'namespace')).read())\n"
                "print('SVC', os.environ['MY_SVC_SERVICE_HOST'],"
                " os.environ['MY_SVC_SERVICE_PORT'])\n"
                "async def main():\n"
                "    cfg = client.Configuration()\n"
                "    InClusterConfigLoader(os.path.join(d, 'token'), os.path.join(d, 'ca.crt'))"
                ".load_and_set(cfg)\n"
                "    async with client.ApiClient(cfg) as api:\n"
                "        me = await client.CoreV1Api(api).read_namespaced_pod("
                "os.environ['HOSTNAME'], open(os.path.join(d, 'namespace')).read())\n"
                "        print('IP', me.status.pod_ip)\n"
                "asyncio.run(main())\n")
            await v1.create_namespaced_pod(ns, pod_manifest("incluster", [PY, "-c", script],
                                                            restartPolicy="Never"))

            async def done():
                p = await v1.read_namespaced_pod("incluster", ns)
                return p if p.status.phase in ("Succeeded", "Failed") else None
            pod = await eventually(done, timeout=30, message="the in-cluster pod to finish")
            out = await v1.read_namespaced_pod_log("incluster", ns)
            assert pod.status.phase == "Succeeded", out
            svc = await v1.read_namespaced_service("my-svc", ns)
            assert f"NS {ns}" in out
            assert f"SVC {svc.spec.cluster_ip} 8786" in out
            assert f"IP {pod.status.pod_ip}" in out
            # automountServiceAccountToken: false leaves the mount out.
            env_script = "import os; print(sorted(k for k in os.environ if 'KUBE' in k))"
            await v1.create_namespaced_pod(ns, pod_manifest(
                "nomount", [PY, "-c", env_script], restartPolicy="Never",
                automountServiceAccountToken=False))

            async def printed():
                p = await v1.read_namespaced_pod("nomount", ns)
                if p.status.phase != "Succeeded":
                    return None
                return await v1.read_namespaced_pod_log("nomount", ns)
            out = await eventually(printed, message="the nomount pod")
            assert "KUBERNETES_SERVICE_HOST" in out
            assert "TASKCORE_KUBE_SERVICEACCOUNT_DIR" not in out
    run(main())


def test_authentication_and_discovery(kube_module):
    async def main():
        k = kube_module
        ssl_ctx = __import__("ssl").create_default_context(cafile=str(k.ca_file))
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with s.get(f"{k.url}/api/v1/namespaces", ssl=ssl_ctx,
                                 headers=headers) as r:
                    assert r.status == 401
                    body = await r.json()
                    assert (body["kind"], body["reason"], body["code"]) == \
                        ("Status", "Unauthorized", 401)
            async with s.get(f"{k.url}/healthz", ssl=ssl_ctx) as r:
                assert r.status == 200
        cfg = client.Configuration()
        await config.load_kube_config(config_file=k.kubeconfig, client_configuration=cfg)
        cfg.api_key = {"BearerToken": "Bearer not-the-token"}
        async with client.ApiClient(cfg) as api:
            await fails(401, "Unauthorized", client.CoreV1Api(api).list_namespace())
        async with api_client(k) as api:
            version = await client.VersionApi(api).get_code()
            assert (version.major, version.minor) == ("1", "30")
            groups = await client.ApisApi(api).get_api_versions()
            assert {"apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io"} <= \
                {g.name for g in groups.groups}
            core = await client.CoreV1Api(api).get_api_resources()
            names = {r.name for r in core.resources}
            assert {"pods", "pods/log", "pods/portforward", "services", "namespaces"} <= names
            # RBAC objects are stored (not enforced).
            rbac = client.RbacAuthorizationV1Api(api)
            role = await rbac.create_namespaced_role("default", {
                "metadata": {"name": "reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]})
            assert role.rules[0].verbs == ["get"]
            await rbac.delete_namespaced_role("reader", "default")
    run(main())
