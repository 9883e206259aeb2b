"""The manifests in deploy/kubernetes/ and the objects the controller makes, validated
offline against the Kubernetes 1.30 schemas with kubernetes-validate in strict mode
(unknown fields are errors), and the CRD file kept equal to `crd_manifest()`."""
import copy
import pathlib

import jsonschema
import pytest
import yaml

from taskcore.deploy.kubernetes import resources as r
from taskcore.testing import import_required

kubernetes_validate = import_required("kubernetes_validate")

ROOT = pathlib.Path(__file__).resolve().parents[3] / "deploy" / "kubernetes"
K8S_VERSION = "1.30"


def validate(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def docs(name):
    return [d for d in yaml.safe_load_all((ROOT / name).read_text()) if d]


@pytest.mark.parametrize("name", ["crd.yaml", "operator.yaml", "user-role.yaml"])
def test_manifest_files_are_valid(name):
    objs = docs(name)
    assert objs
    for obj in objs:
        validate(obj)


def test_crd_file_matches_the_code():
    assert docs("crd.yaml") == [r.crd_manifest()], (
        "deploy/kubernetes/crd.yaml is stale: regenerate it from "
        "taskcore.deploy.kubernetes.resources.crd_manifest()")


def test_strict_validation_catches_a_typo():
    bad = copy.deepcopy(docs("operator.yaml")[-1])
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        validate(bad)


def _schema():
    return r.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_example_cluster_fits_the_crd_and_its_pods_are_valid():
    (example,) = docs("example-cluster.yaml")
    assert example["kind"] == r.KIND
    jsonschema.validate(example, _schema())
    r.validate_cluster(dict(example, metadata=dict(example["metadata"], uid="u1")))
    _validate_children(dict(example, metadata=dict(example["metadata"], uid="u1")))


def test_example_cluster_is_what_its_comment_says_it_was_made_with():
    (example,) = docs("example-cluster.yaml")
    made = r.make_cluster_spec("example", n_workers=2, resources={"cpu": "1", "memory": "2Gi"},
                               nthreads=1)
    made["metadata"]["namespace"] = "default"
    assert example == made, "deploy/kubernetes/example-cluster.yaml is stale: regenerate it"


def test_the_scheduler_exposes_its_dashboard():
    cluster = r.make_cluster_spec("c1")
    cluster["metadata"].update(namespace="ns", uid="u1")
    (container,) = r.scheduler_deployment(cluster)["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--dashboard-address") + 1] == f":{r.DASHBOARD_PORT}"
    assert {"name": "dashboard", "containerPort": 8787, "protocol": "TCP"} in container["ports"]
    ports = {p["name"]: p for p in r.scheduler_service(cluster)["spec"]["ports"]}
    assert ports["dashboard"]["port"] == 8787 and ports["dashboard"]["targetPort"] == "dashboard"
    # A custom spec's Service without ports gets both.
    del cluster["spec"]["scheduler"]["service"]["ports"]
    assert {p["name"] for p in r.scheduler_service(cluster)["spec"]["ports"]} == {
        "tcp-comm", "dashboard"}


def _validate_children(cluster):
    validate(r.scheduler_deployment(cluster))
    svc = r.scheduler_service(cluster)
    validate(svc)
    for g in cluster["spec"]["workerGroups"]:
        pod = r.worker_pod(cluster, g, "tcp://10.0.0.1:8786")
        validate(pod)


@pytest.mark.parametrize("service_type", r.SERVICE_TYPES)
def test_made_objects_are_valid(service_type):
    spec = r.make_cluster_spec("c1", n_workers=2, resources={"cpu": "500m", "memory": "1Gi"},
                               env={"A": "1"}, scheduler_service_type=service_type,
                               idle_timeout=60, nthreads=2)
    spec["metadata"].update(namespace="ns", uid="1234")
    spec["spec"]["workerGroups"].append(r.make_worker_spec(name="big", n_workers=1,
                                                           worker_command=["core-worker"]))
    jsonschema.validate(spec, _schema())
    r.validate_cluster(spec)
    _validate_children(spec)
    # The scheduler binds every address of its pod: a port-forward dials the pod's localhost.
    sched = spec["spec"]["scheduler"]["spec"]["containers"][0]
    assert sched["args"][sched["args"].index("--host") + 1] == "0.0.0.0"
    (worker,) = [c for c in r.worker_pod(spec, spec["spec"]["workerGroups"][0], "tcp://x:1")
                 ["spec"]["containers"]]
    args = worker["args"]
    assert args[:3] == ["$(TASKCORE_SCHEDULER_ADDRESS)", "--name", "$(TASKCORE_WORKER_NAME)"]
    assert args[args.index("--memory-limit") + 1] == str(2**30)
    names = [e["name"] for e in worker["env"]]
    # the controller's variables come first, so the user's can refer to them
    assert names[:5] == ["POD_IP", "TASKCORE_WORKER_NAME", "TASKCORE_SCHEDULER_ADDRESS",
                         "TASKCORE_WORKER_GROUP", "TASKCORE_CLUSTER_NAME"]
    assert names[-1] == "A"


def test_credentials_secret_and_its_mounts_are_valid():
    """spec.security: the Secret (kubernetes.io/tls, or Opaque for a token alone), its
    read-only mount (0400, the TLS keys only) and the --tls-* arguments pointing at it in
    the scheduler and the workers, the token from the Secret, never a plain value."""
    files = {r.SECRET_CA: b"CA", r.SECRET_CERT: b"CERT", r.SECRET_KEY: b"KEY"}
    secret = r.credentials_secret("c1", files, token="s3cret")
    validate(dict(secret, metadata=dict(secret["metadata"], namespace="ns")))
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["generateName"] == "c1-credentials-"
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key", "token"}
    token_only = r.credentials_secret("c1", token="s3cret")
    validate(token_only)
    assert token_only["type"] == "Opaque" and set(token_only["data"]) == {"token"}
    with pytest.raises(ValueError, match="missing tls.key"):
        r.credentials_secret("c1", {r.SECRET_CA: b"x", r.SECRET_CERT: b"y"})

    spec = r.make_cluster_spec("c1", n_workers=1, env={"A": "1"})
    spec["metadata"].update(namespace="ns", uid="u1")
    spec["spec"]["security"] = r.security_spec("c1-credentials-abcde", tls=True, token=True)
    jsonschema.validate(spec, _schema())
    r.validate_cluster(spec)
    _validate_children(spec)
    pods = [r.scheduler_deployment(spec)["spec"]["template"]["spec"],
            r.worker_pod(spec, spec["spec"]["workerGroups"][0], "tls://x:1")["spec"]]
    for podspec in pods:
        (volume,) = podspec["volumes"]
        assert volume["secret"] == {"secretName": "c1-credentials-abcde", "defaultMode": 0o400,
                                    "items": [{"key": k, "path": k} for k in r.TLS_KEYS]}
        (c,) = podspec["containers"]
        assert c["volumeMounts"] == [{"name": volume["name"], "readOnly": True,
                                      "mountPath": "/etc/taskcore/credentials"}]
        args = c["args"]
        assert args[args.index("--tls-ca-file") + 1] == "/etc/taskcore/credentials/ca.crt"
        assert args[args.index("--tls-cert") + 1] == "/etc/taskcore/credentials/tls.crt"
        assert args[args.index("--tls-key") + 1] == "/etc/taskcore/credentials/tls.key"
        env = {e["name"]: e for e in c["env"]}
        assert env["TASKCORE_TOKEN"] == {"name": "TASKCORE_TOKEN", "valueFrom": {
            "secretKeyRef": {"name": "c1-credentials-abcde", "key": "token"}}}
        assert "s3cret" not in str(podspec)
    assert r.comm_protocol(spec) == "tls"
    # A custom command that names its own files keeps them; no spec.security: nothing added.
    spec["spec"]["workerGroups"][0]["spec"]["containers"][0]["args"] += [
        "--tls-ca-file=/mine/ca.pem"]
    worker = r.worker_pod(spec, spec["spec"]["workerGroups"][0], "tls://x:1")
    assert "--tls-cert" not in worker["spec"]["containers"][0]["args"]
    del spec["spec"]["security"]
    assert "volumes" not in r.scheduler_deployment(spec)["spec"]["template"]["spec"]
    assert r.comm_protocol(spec) == "tcp"
    for bad, match in (({"tls": True}, "secretName"),
                       ({"secretName": "s", "tls": False, "token": False}, "neither"),
                       ({"secretName": "s", "tls": "yes"}, "tls: must be")):
        spec["spec"]["security"] = bad
        with pytest.raises(r.ClusterSpecError, match=match):
            r.validate_cluster(spec)


def test_bad_specs_are_refused_with_the_path():
    spec = r.make_cluster_spec("c1")
    spec["spec"]["workerGroups"].append(copy.deepcopy(spec["spec"]["workerGroups"][0]))
    with pytest.raises(r.ClusterSpecError, match=r"workerGroups\[1\].name"):
        r.validate_cluster(spec)
    spec = r.make_cluster_spec("c1")
    spec["spec"]["scheduler"]["spec"]["containers"][0]["name"] = "other"
    with pytest.raises(r.ClusterSpecError, match="named 'scheduler'"):
        r.validate_cluster(spec)
    spec = r.make_cluster_spec("c1")
    spec["spec"]["workerGroups"][0]["adapt"] = {"minimum": 3, "maximum": 1}
    with pytest.raises(r.ClusterSpecError, match="minimum <= maximum"):
        r.validate_cluster(spec)
    with pytest.raises(ValueError, match="scheduler_service_type"):
        r.make_cluster_spec("c1", scheduler_service_type="External")
    with pytest.raises(jsonschema.ValidationError):
        bad = r.make_cluster_spec("c1")
        bad["spec"]["workerGroups"][0]["replicas"] = -1
        jsonschema.validate(bad, _schema())


def test_quantities():
    assert r._quantity_bytes("4Gi") == str(4 * 2**30)
    assert r._quantity_bytes("500M") == str(500 * 10**6)
    assert r._quantity_bytes("1e9") == str(10**9)
