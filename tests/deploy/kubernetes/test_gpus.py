"""GPU worker groups on Kubernetes, against the stand-in (standin/) playing a node with two
`nvidia.com/gpu` (its emulated NVIDIA device plugin) and NVML answered by the GPU stand-in
(tests/gpu_standin): the pod spec a GPU group makes, CPU and GPU groups in one cluster,
each GPU pod given its own device, and a GPU pod that cannot fit left Pending with the
scheduler's reason."""
import os
import sys

import cloudpickle
import kubernetes_validate
import pytest

from taskcore import Client
from taskcore.deploy.kubernetes import KubeCluster, make_worker_spec
from taskcore.deploy.kubernetes import resources as r
from taskcore.testing import wait_until

from .conftest import _stop, pod_env
from .standin import StandinKubernetes
from .test_kube_cluster import assert_all_gone, worker_pods

pytestmark = pytest.mark.timeout(240)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

STANDIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "gpu_standin")


@pytest.fixture
def gpu_kube(tmp_path, monkeypatch):
    k = StandinKubernetes(tmp_path, pod_env=pod_env(), gpus=2)
    k.start()
    monkeypatch.setenv("KUBECONFIG", k.kubeconfig)
    yield k
    _stop(k)


def test_a_gpu_group_pod_spec():
    group = make_worker_spec(name="gpu", n_workers=2, gpus=1, device_memory_limit="20GB",
                             resources={"cpu": "4", "memory": "16Gi"})
    c = group["spec"]["containers"][0]
    assert c["command"] == ["core-cuda-worker"]
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert "nvidia.com/gpu" not in c["resources"]["requests"]     # limits imply requests
    assert c["args"][-2:] == ["--device-memory-limit", "20GB"]
    assert group["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": group["spec"]}
    kubernetes_validate.validate(pod, "1.30", strict=True)
    cpu = make_worker_spec(name="cpu")
    assert cpu["spec"]["containers"][0]["command"] == ["core-worker"]
    assert "tolerations" not in cpu["spec"]
    for bad in (2, 0, True, "1"):
        with pytest.raises(ValueError, match="one GPU per worker pod"):
            make_worker_spec(gpus=bad)
    with pytest.raises(ValueError, match="needs gpus=1"):
        make_worker_spec(device_memory_limit="1GB")


def _gpu_view():
    from taskcore import get_worker
    w = get_worker()
    return w.name, os.environ.get("CUDA_VISIBLE_DEVICES"), dict(w.resources)


def test_cpu_and_gpu_groups_each_gpu_pod_gets_its_own_device(gpu_kube):
    kube = gpu_kube
    env = {"PYTHONPATH": os.pathsep.join([STANDIN, pod_env()["PYTHONPATH"]]),
           "TASKCORE_NVML_STANDIN": "dgx-a100-8"}
    with KubeCluster(name="mixed", n_workers=1, controller="embedded", nthreads=1,
                     startup_timeout=120) as cluster:
        cluster.add_worker_group("gpu", n_workers=2, gpus=1, env=env)
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=90)
            gpu_pods = worker_pods(kube, "mixed", group="gpu")
            assert len(gpu_pods) == 2
            views = [client.submit(_gpu_view, workers=[a], pure=False).result(60)
                     for a, w in client.scheduler_info()["workers"].items()
                     if w["resources"].get("GPU")]
            # The device plugin gave each pod one device; the worker is named after its
            # pod (the unit that scales and retires) and offers GPU=1.
            assert sorted(v[1] for v in views) == ["0", "1"]
            assert sorted(v[0] for v in views) == sorted(gpu_pods)
            assert all(v[2] == {"GPU": 1} for v in views)
            # A third GPU pod does not fit the node: Pending, with the scheduler's reason.
            cluster.scale(3, worker_group="gpu")

            def pending():
                return [p for p in kube.pods("default")
                        if (p["metadata"].get("labels") or {}).get(r.LABEL_GROUP) == "gpu"
                        and (p.get("status") or {}).get("phase") == "Pending"
                        and any(c.get("reason") == "Unschedulable"
                                for c in (p.get("status") or {}).get("conditions") or [])]
            wait_until(pending, 60, "the third GPU pod to be Unschedulable")
            cond = [c for c in pending()[0]["status"]["conditions"]
                    if c["type"] == "PodScheduled"][0]
            assert "Insufficient nvidia.com/gpu" in cond["message"]
            # Freed GPUs are handed out again: scale the group down, the Pending pod is
            # deleted first or gets a device; either way two GPU workers remain.
            cluster.scale(2, worker_group="gpu")
            wait_until(lambda: not pending(), 60, "no GPU pod left Pending")
            assert sum(client.gather(client.map(len, ["ab", "c"], resources={"GPU": 1}))) == 3
            # The CPU group was never touched by the GPU group's scaling.
            assert len(worker_pods(kube, "mixed", group=r.DEFAULT_GROUP)) == 1
    assert_all_gone(kube, "mixed")
