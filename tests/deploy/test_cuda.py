"""GPU workers (taskcore/deploy/cuda.py) against the NVML stand-in (tests/gpu_standin:
recorded machines, no GPU needed): choosing devices, rotation, MIG, CPU affinity, sizes,
and real clusters whose worker processes see the stand-in through PYTHONPATH."""
import os
import subprocess
import sys
import warnings

import cloudpickle
import psutil
import pytest

from taskcore import Client, nvml
from taskcore.affinity import format_cpu_list, parse_cpu_list
from taskcore.testing import wait_until
from taskcore.deploy import cuda
from taskcore.deploy.cuda import (LocalCUDACluster, cuda_worker_group, cuda_worker_specs,
                                  device_worker_options, parse_cuda_visible_devices, rotate,
                                  visible_devices, worker_cpus)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

STANDIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "gpu_standin")
GiB = 2**30


@pytest.fixture
def machine(monkeypatch):
    """`machine("dgx-a100-8")`: NVML here answers from that recording, and returns the
    environment that makes worker processes see it too."""
    monkeypatch.syspath_prepend(STANDIN)
    saved = sys.modules.pop("pynvml", None)
    nvml._reset()

    def use(name):
        nvml._reset()
        monkeypatch.setenv("TASKCORE_NVML_STANDIN", name)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        path = os.environ.get("PYTHONPATH")
        return {"TASKCORE_NVML_STANDIN": name,
                "PYTHONPATH": STANDIN + (os.pathsep + path if path else "")}
    yield use
    nvml._reset()
    sys.modules.pop("pynvml", None)
    if saved is not None:
        sys.modules["pynvml"] = saved


def near(gpu):  # the dgx-a100-8 recording: GPU i is near CPUs i, i+8, ...
    return set(range(gpu, 256, 8))


# -- choosing devices ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("0,1", ["0", "1"]), (" 2 , 0 ", ["2", "0"]), ([3, 1], ["3", "1"]), (5, ["5"]),
    ("GPU-a1000001,MIG-1c9b", ["GPU-a1000001", "MIG-1c9b"]),
    ("MIG-GPU-5fd2c3e1-7a0b/1/0", ["MIG-GPU-5fd2c3e1-7a0b/1/0"]), ("", []),
])
def test_parse_forms(value, expected):
    assert parse_cuda_visible_devices(value) == expected


@pytest.mark.parametrize("value, match", [
    ("0,x", "'x' is not a device index"), ("0,,1", "'' is not a device index"),
    ("-1", "'-1' is not"), ("1,01", "names '01' twice"), (1.5, "must be a string"),
    (True, "must be a string"), ("MIG-GPU-abc/1", "'MIG-GPU-abc/1' is not"),
])
def test_parse_errors(value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        parse_cuda_visible_devices(value)


def test_parse_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2")
    assert parse_cuda_visible_devices() == ["3", "2"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert parse_cuda_visible_devices() is None


def test_rotation():
    assert rotate(["0", "1", "2", "3"], 0) == ["0", "1", "2", "3"]
    assert rotate(["0", "1", "2", "3"], 2) == ["2", "3", "0", "1"]
    assert [rotate("abc", i)[0] for i in range(3)] == ["a", "b", "c"]
    with pytest.raises(IndexError):
        rotate(["0"], 1)


def test_devices_by_index_uuid_and_environment(machine, monkeypatch):
    machine("dgx-a100-8")
    assert [d.entry for d in visible_devices()] == [str(i) for i in range(8)]
    uuid5 = nvml.device_uuid(5)
    devs = visible_devices(f"3,{uuid5}")
    assert [(d.entry, d.index) for d in devs] == [("3", 3), (uuid5, 5)]
    assert devs[0].total_memory == 80 * GiB and not devs[0].mig
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    assert [d.index for d in visible_devices()] == [6, 7]
    with pytest.raises(ValueError, match="same device twice"):
        visible_devices(f"5,{uuid5}")


def test_unknown_devices_name_what_exists(machine):
    machine("h200-1")
    with pytest.raises(ValueError, match=r"no GPU with index 1: NVML sees 1 \(0-0\)"):
        visible_devices("0,1")
    with pytest.raises(ValueError, match=r"no device 'GPU-dead'.*0: GPU-0b7e2f3a\S* NVIDIA H200"):
        visible_devices("GPU-dead")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES is empty"):
        visible_devices("")


def test_mig_devices(machine):
    machine("mig-a100")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        devs = visible_devices()  # unset: each MIG instance of GPU 0, then GPU 1
    assert [d.mig for d in devs] == [True, True, True, False]
    assert [d.index for d in devs] == [0, 0, 0, 1]
    assert devs[0].entry.startswith("MIG-1c9b") and devs[3].entry == "1"
    # The legacy form and a prefix become the full MIG UUID in the worker's environment.
    legacy = f"MIG-{nvml.device_uuid(0)}/5/0"
    devs = visible_devices(f"{legacy},MIG-3e1d")
    assert [d.uuid[:8] for d in devs] == ["MIG-2d0c", "MIG-3e1d"]
    opts = device_worker_options(devs, 1, allowed_cpus={0, 1, 40})
    assert opts["env"]["CUDA_VISIBLE_DEVICES"] == f"{devs[1].uuid},{devs[0].uuid}"
    # A MIG instance has no CPU affinity of its own: its GPU's (0-31) is used.
    assert opts["env"]["TASKCORE_CPU_AFFINITY"] == "0-1"
    assert opts["device_memory_limit"] == int(0.8 * 4864 * 2**20)  # the instance's memory
    # A GPU in MIG mode named by its index: CUDA would use one instance only; say so.
    with pytest.warns(RuntimeWarning, match="GPU 0 is in MIG mode.*MIG-1c9b"):
        visible_devices("0")


def test_a_failing_gpu(machine):
    machine("failing")
    with pytest.warns(RuntimeWarning, match="leaving out GPU 1: GPU 1: NVML says GPU is lost"):
        devs = visible_devices()
    assert [d.entry for d in devs] == ["0"]
    with pytest.raises(nvml.NVMLDeviceError, match="GPU 1: NVML says GPU is lost"):
        visible_devices("0,1")


def test_no_gpu(machine):
    machine("none")
    for value in (None, "0"):
        with pytest.raises(nvml.NVMLUnavailable, match="no NVIDIA GPU visible: NVML says"):
            visible_devices(value)
    with pytest.raises(nvml.NVMLUnavailable, match="no NVIDIA GPU visible"):
        LocalCUDACluster()


# -- CPU affinity ---------------------------------------------------------------------------------
def test_affinity_is_nvml_within_the_allowed_cpus(machine):
    machine("dgx-a100-8")
    devs = visible_devices("0,1,2")
    assert worker_cpus(devs[1], allowed=set(range(256))) == near(1)
    # A partial allocation (SLURM gave us 16 CPUs): never wider than it.
    assert worker_cpus(devs[1], allowed=set(range(16))) == {1, 9}
    assert worker_cpus(devs[2], allowed={2, 3, 10, 100}) == {2, 10}
    # Nothing of the device's in the allocation: the allocation, with a warning.
    with pytest.warns(RuntimeWarning, match="none of its CPUs .* is allowed"):
        assert worker_cpus(devs[0], allowed={1, 2, 3}) == {1, 2, 3}


def test_affinity_of_a_lost_gpu_falls_back(machine, monkeypatch):
    machine("failing")
    dev = cuda.CUDADevice("1", 1, "GPU-x", "lost", 10)
    with pytest.warns(RuntimeWarning, match="no CPU affinity for device 1"):
        assert worker_cpus(dev, allowed={0, 5}) == {0, 5}


def test_affinity_in_a_restricted_process(machine):
    """The allowed set is the process's own: restricted with sched_setaffinity (a
    partial allocation), the worker options follow it."""
    env = machine("dgx-a100-8")
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[-1]
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}});"
            "from taskcore.deploy.cuda import visible_devices, device_worker_options;"
            "import warnings; warnings.simplefilter('ignore');"
            "d = visible_devices('0,1');"
            "print(device_worker_options(d, 0)['env']['TASKCORE_CPU_AFFINITY'],"
            "      device_worker_options(d, 1)['env']['TASKCORE_CPU_AFFINITY'])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expect = [format_cpu_list(near(g) & {cpu} or {cpu}) for g in (0, 1)]
    assert out.stdout.split() == expect


def test_cpu_lists():
    assert parse_cpu_list("0-3,8, 10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert format_cpu_list({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    for bad in ("", "3-1", "a", "1-", "-2"):
        with pytest.raises(ValueError, match="bad CPU list"):
            parse_cpu_list(bad)


def test_apply_from_env_pins_every_thread():
    """What the worker process runs first (taskcore.affinity.apply_from_env), in a child:
    a thread that already exists is moved too, and new threads inherit the set."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    code = ("import os, threading, time\n"
            "ev = threading.Event(); seen = []\n"
            "def early(): ev.wait(); seen.append(os.sched_getaffinity(0))\n"
            "t = threading.Thread(target=early); t.start()\n"
            "from taskcore.affinity import apply_from_env\n"
            f"apply_from_env({{'TASKCORE_CPU_AFFINITY': '{cpu}'}})\n"
            "ev.set(); t.join()\n"
            "late = []; t2 = threading.Thread(target=lambda: late.append(os.sched_getaffinity(0)))\n"
            "t2.start(); t2.join()\n"
            "print(sorted(os.sched_getaffinity(0)), sorted(seen[0]), sorted(late[0]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"[{cpu}]"] * 3


def test_apply_from_env_rmm_errors(monkeypatch):
    from taskcore.affinity import apply_from_env

    with pytest.raises(ValueError, match="TASKCORE_RMM_POOL_SIZE='lots'"):
        apply_from_env({"TASKCORE_RMM_POOL_SIZE": "lots"})
    apply_from_env({})  # nothing asked: nothing done
    monkeypatch.setitem(sys.modules, "rmm", None)  # rmm not installed
    with pytest.raises(ImportError, match="rmm is not importable here.*pip install rmm-cu12"):
        apply_from_env({"TASKCORE_RMM_POOL_SIZE": "1000"})


def test_rmm_options_need_rmm(machine, monkeypatch):
    machine("h200-1")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "rmm" else real(name, *a))
    for call in (lambda: LocalCUDACluster(rmm_pool_size="1GB"),
                 lambda: cuda_worker_specs(rmm_managed_memory=True)):
        with pytest.raises(ImportError, match="need RMM, which is not installed"):
            call()


# -- one worker's options ---------------------------------------------------------------------------
def test_worker_options(machine, monkeypatch):
    machine("dgx-a100-8")
    monkeypatch.setattr(cuda, "system_memory", lambda: 64 * GiB)
    devs = visible_devices("4,5,6")
    opts = device_worker_options(devs, 1, threads_per_worker=2, resources={"MEM": 5},
                                 env={"A": "1", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"},
                                 device_memory_limit="30GB", rmm_pool_size=0.5,
                                 allowed_cpus=set(range(256)))
    assert opts["nthreads"] == 2
    assert opts["memory_limit"] == 64 * GiB // 3           # "auto": split among the 3
    assert opts["resources"] == {"GPU": 1.0, "MEM": 5.0}
    assert opts["device_memory_limit"] == 30 * 10**9
    env = opts["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "5,6,4" and env["A"] == "1"
    assert env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"      # the caller's choice stays
    assert parse_cpu_list(env["TASKCORE_CPU_AFFINITY"]) == near(5)
    assert int(env["TASKCORE_RMM_POOL_SIZE"]) == 40 * GiB
    auto = device_worker_options(devs, 0, allowed_cpus={0})
    assert auto["device_memory_limit"] == int(0.8 * 80 * GiB)
    assert auto["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "TASKCORE_RMM_POOL_SIZE" not in auto["env"]
    off = device_worker_options(devs, 0, allowed_cpus={0}, device_memory_limit=None,
                                memory_limit=None)
    assert "device_memory_limit" not in off and off["memory_limit"] is None
    for kw, match in ((dict(device_memory_limit="100GB"), "more than device 4"),
                      (dict(device_memory_limit="much"), "device_memory_limit='much'"),
                      (dict(rmm_pool_size="auto"), "rmm_pool_size='auto' is not supported"),
                      (dict(threads_per_worker=0), "threads_per_worker=0")):
        with pytest.raises(ValueError, match=match):
            device_worker_options(devs, 0, allowed_cpus={0}, **kw)


def test_local_cuda_cluster_refusals(machine):
    machine("h200-1")
    for kw, match in ((dict(n_workers=2), r"n_workers=2\): only 1 device"),
                      (dict(processes=False), "needs processes=True"),
                      (dict(shutdown_on_close=False), "shutdown_on_close=False"),
                      (dict(worker_class="thread"), "worker_class"),
                      (dict(host="127.0.0.1", interface="lo"), "host= or interface=")):
        with pytest.raises(ValueError, match=match):
            LocalCUDACluster(**kw)
    with pytest.raises(ValueError, match="not found; available"):
        LocalCUDACluster(interface="no-such-interface0")


# -- real clusters ----------------------------------------------------------------------------------
def probe():
    """What a worker process sees: its devices, its CPUs, its name."""
    import os

    from taskcore import get_worker
    try:
        name = get_worker().name
    except ValueError:
        name = None  # through client.run: not inside a task (run_on_workers names them)
    return {"devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cpus": sorted(os.sched_getaffinity(0)), "name": name,
            "order": os.environ.get("CUDA_DEVICE_ORDER")}


def run_on_workers(client):
    """probe() on every worker, by worker name."""
    names = {a: str(w["name"]) for a, w in client.scheduler_info()["workers"].items()}
    return {names[a]: v for a, v in client.run(probe).items()}


def our_processes():
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "taskcore" in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def expected_cpus(gpu):
    allowed = os.sched_getaffinity(0)
    return sorted(near(gpu) & allowed or allowed)


@pytest.mark.usefixtures("real_servers")
def test_local_cuda_cluster_end_to_end(machine):
    env = machine("dgx-a100-8")
    before = our_processes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a CPU set outside this machine
        cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES="0,1", memory_limit="400MB",
                                   env=env, dashboard_address=None, interface="lo")
    with cluster, Client(cluster) as client:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")  # lo's address
        assert sorted(cluster.workers) == [0, 1]
        assert cluster.worker_spec[1]["options"]["device_memory_limit"] == int(0.8 * 80 * GiB)
        client.wait_for_workers(2, timeout=30)
        info = client.scheduler_info()["workers"]
        assert all(w["resources"] == {"GPU": 1.0} for w in info.values())
        assert all(w["memory_limit"] == 400 * 10**6 for w in info.values())
        by_name = run_on_workers(client)
        seen = by_name
        assert by_name["0"]["devices"] == "0,1" and by_name["1"]["devices"] == "1,0"
        assert by_name["0"]["cpus"] == expected_cpus(0)
        assert by_name["1"]["cpus"] == expected_cpus(1)
        assert {v["order"] for v in seen.values()} == {"PCI_BUS_ID"}
        # A task that needs a GPU runs; two at once on two workers.
        futs = [client.submit(lambda x: (x, os.environ["CUDA_VISIBLE_DEVICES"][0]), i,
                              resources={"GPU": 1}, pure=False) for i in range(6)]
        got = client.gather(futs)
        assert [x for x, _ in got] == list(range(6))
        assert sum(client.gather(client.map(lambda x: x * x, range(50)))) == 40425
        # One worker per device: no more.
        with pytest.raises(ValueError, match="2 device.s. visible, one worker per device"):
            cluster.scale(3)
        cluster.scale(1)
        assert sorted(cluster.workers) == [0]
        cluster.scale(2)
        assert sorted(cluster.workers) == [0, 1]
        assert cluster.workers[1].env["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert our_processes() <= before


def test_failing_gpu_cluster_errors(machine):
    machine("failing")
    with pytest.raises(nvml.NVMLDeviceError, match="GPU 1: NVML says GPU is lost"):
        LocalCUDACluster(CUDA_VISIBLE_DEVICES="1")


@pytest.mark.usefixtures("real_servers")
def test_spec_cluster_mixing_cpu_and_gpu_workers(machine):
    from taskcore.deploy.spec import SpecCluster
    from taskcore.nanny import Nanny
    from taskcore.scheduler import Scheduler

    env = machine("h200-1")
    before = our_processes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gpu = cuda_worker_specs(env=env, memory_limit="300MB", dashboard_address=None)
    assert list(gpu) == ["cuda-0"]
    cpu = {"cpu-0": {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": "300MB",
                                               "dashboard_address": None}}}
    sched = {"cls": Scheduler, "options": {"protocol": "tcp", "host": "127.0.0.1",
                                           "port": 0, "dashboard_address": None}}
    with SpecCluster(workers={**cpu, **gpu}, scheduler=sched) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2, timeout=30)
        res = {w["name"]: w["resources"] for w in client.scheduler_info()["workers"].values()}
        assert res == {"cpu-0": {}, "cuda-0": {"GPU": 1.0}}
        where = client.submit(probe, resources={"GPU": 1}).result(timeout=30)
        assert where["name"] == "cuda-0" and where["devices"] == "0"
        assert client.submit(lambda: 7).result(timeout=30) == 7
    assert our_processes() <= before


@pytest.mark.usefixtures("real_servers")
def test_local_cluster_with_a_gpu_group(machine):
    """A CPU LocalCluster gains a GPU group (one CUDAWorker member: a nanny per device)."""
    from taskcore.deploy.local import LocalCluster

    env = machine("dgx-a100-8")
    before = our_processes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        group = cuda_worker_group("2,3", env=env, memory_limit="300MB",
                                  dashboard_address=None, device_memory_limit=None)
    assert group["group"] == ["-0", "-1"]
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="300MB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        cluster.add_worker_group("gpu", 2, spec=group)
        client.wait_for_workers(3, timeout=30)
        names = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
        assert names == ["0", "gpu-0-0", "gpu-0-1"]
        seen = run_on_workers(client)
        assert seen["gpu-0-0"]["devices"] == "2,3" and seen["gpu-0-1"]["devices"] == "3,2"
        assert seen["gpu-0-1"]["cpus"] == expected_cpus(3)
        n = len(client.gather([client.submit(probe, resources={"GPU": 1}, pure=False)
                               for _ in range(4)]))
        assert n == 4
        cluster.scale(0, worker_group="gpu")
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 1, 10, "the GPU group gone")
    assert our_processes() <= before


def test_ssh_cluster_with_a_cpu_host_and_a_gpu_host(machine, sshd, ssh_cluster_kwargs):
    """Over the real sshd (tests/deploy/conftest.py): worker_class per host mixes a CPU
    host (core-worker) and a GPU host (core-cuda-worker, one worker per device, the
    devices decided by that host's NVML: the stand-in, through remote_env)."""
    from taskcore.testing import import_required

    import_required("asyncssh", "SSH tests need the [ssh] extra")
    from taskcore.deploy.ssh import SSHCluster

    env = machine("dgx-a100-8")
    kw = dict(ssh_cluster_kwargs)
    kw["remote_env"] = {**kw["remote_env"], "TASKCORE_NVML_STANDIN": env["TASKCORE_NVML_STANDIN"],
                        "PYTHONPATH": os.pathsep.join(
                            p for p in (STANDIN, os.environ.get("PYTHONPATH"),
                                        kw["remote_env"].get("PYTHONPATH")) if p)}
    with SSHCluster(["127.0.0.1"] * 3, connect_options=sshd.connect_options(),
                    worker_class=[None, "taskcore.Nanny", "taskcore.CUDAWorker"],
                    worker_options={"nthreads": 1, "memory_limit": "300MB",
                                    "CUDA_VISIBLE_DEVICES": "0,1",
                                    "device_memory_limit": "10GB"},
                    security=False, **kw) as cluster, Client(cluster) as client:
        assert len(cluster.workers) == 2                     # two processes: three workers
        assert cluster.worker_spec[1]["group"] == ["-0", "-1"]
        client.wait_for_workers(3, timeout=30)
        info = {str(w["name"]): w for w in client.scheduler_info()["workers"].values()}
        assert sorted(info) == ["0", "1-0", "1-1"]
        assert info["0"]["resources"] == {}
        assert info["1-0"]["resources"] == info["1-1"]["resources"] == {"GPU": 1.0}
        seen = run_on_workers(client)
        assert seen["1-0"]["devices"] == "0,1" and seen["1-1"]["devices"] == "1,0"
        assert seen["1-1"]["cpus"] == expected_cpus(1)
        assert seen["0"]["devices"] is None
        assert client.submit(probe, resources={"GPU": 1}).result(timeout=30)["name"] in \
            ("1-0", "1-1")
        assert sum(client.gather(client.map(lambda x: x + 1, range(10)))) == 55
        pids = [p for h in cluster.workers.values() for p, _ in h.pids]
    from taskcore.deploy.launcher import is_alive

    wait_until(lambda: not any(is_alive(p) for p in pids), 10, "the remote workers gone")


def test_ssh_worker_class_errors():
    from taskcore.testing import import_required

    import_required("asyncssh", "SSH tests need the [ssh] extra")
    from taskcore.deploy.ssh import SSHCluster, _worker_kinds

    assert _worker_kinds("taskcore.CUDAWorker", 2) == ["cuda", "cuda"]
    assert _worker_kinds([None, "taskcore.Nanny", "cuda"], 3) == [None, "nanny", "cuda"]
    with pytest.raises(ValueError, match="a list of 2, but there are 3 hosts"):
        SSHCluster(["a", "b", "c"], worker_class=["cuda", "cuda"])
    with pytest.raises(ValueError, match="'taskcore.CUDAWorker'"):
        SSHCluster(["a", "b"], worker_class="dask_cuda.CUDAWorker")
    with pytest.raises(ValueError, match="nworkers does not apply to GPU hosts"):
        SSHCluster(["a", "b"], worker_class="taskcore.CUDAWorker",
                   worker_options={"nworkers": 2}, security=False)
