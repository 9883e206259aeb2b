"""`core-cuda-worker` (taskcore/cli/cuda_worker.py) as a real process, against the NVML
stand-in (tests/gpu_standin) through PYTHONPATH: errors and exit codes, and workers
joining a running scheduler."""
import json
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import psutil
import pytest

from taskcore import Client

cloudpickle.register_pickle_by_value(sys.modules[__name__])

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_standin")
PROG = [sys.executable, "-m", "taskcore.cli.cuda_worker"]


def standin_env(name):
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, TASKCORE_NVML_STANDIN=name,
               PYTHONPATH=STANDIN + (os.pathsep + path if path else ""))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_cli(args, machine="dgx-a100-8", **env):
    return subprocess.run(PROG + args, env={**standin_env(machine), **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, machine, code, message", [
    (["tcp://127.0.0.1:1", "--bogus"], "dgx-a100-8", 2, "unrecognized arguments: --bogus"),
    ([], "dgx-a100-8", 2, "give the scheduler ADDRESS or --scheduler-file"),
    (["tcp://127.0.0.1:1", "--cuda-visible-devices", "0,x"], "dgx-a100-8", 2,
     "'x' is not a device index"),
    (["tcp://127.0.0.1:1", "--cuda-visible-devices", "9"], "h200-1", 2,
     r"no GPU with index 9: NVML sees 1 \(0-0\)"),
    (["tcp://127.0.0.1:1", "--cuda-visible-devices", "GPU-beef"], "h200-1", 2,
     "no device 'GPU-beef': NVML sees 0: GPU-0b7e2f3a"),
    (["tcp://127.0.0.1:1", "--device-memory-limit", "500GB"], "h200-1", 2,
     "is more than device 0's"),
    (["tcp://127.0.0.1:1", "--nthreads", "0"], "h200-1", 2, "--nthreads"),
    (["tcp://127.0.0.1:1"], "none", 1,
     "no NVIDIA GPU visible: NVML says NVML Shared Library Not Found"),
    (["tcp://127.0.0.1:1", "--cuda-visible-devices", "0,1"], "failing", 1,
     "GPU 1: NVML says GPU is lost"),
])
def test_errors(args, machine, code, message):
    import re

    out = run_cli(args, machine)
    assert out.returncode == code, out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert out.stderr.startswith("core-cuda-worker: error:") or "usage:" in out.stderr
    assert out.stdout == ""


def probe():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES"), sorted(os.sched_getaffinity(0))


@pytest.mark.usefixtures("real_servers")
def test_workers_join_a_running_scheduler():
    from taskcore.deploy.local import LocalCluster

    with LocalCluster(n_workers=0, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        proc = subprocess.Popen(
            PROG + [cluster.scheduler_address, "--cuda-visible-devices", "3,1",
                    "--name", "g", "--memory-limit", "300MB", "--resources", "MEM=2",
                    "--no-dashboard", "--log-level", "warning"],
            env=standin_env("dgx-a100-8"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            ready = json.loads(proc.stdout.readline())
            assert ready["event"] == "ready" and ready["role"] == "worker"
            ws = ready["workers"]
            assert [(w["name"], w["device"]) for w in ws] == [("g-0", "3"), ("g-1", "1")]
            assert ready["address"] == ws[0]["address"]
            client.wait_for_workers(2, timeout=30)
            info = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
            assert sorted(info) == ["g-0", "g-1"]
            assert info["g-0"]["resources"] == {"GPU": 1.0, "MEM": 2.0}
            assert info["g-1"]["memory_limit"] == 300 * 10**6
            names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
            seen = {names[a]: v for a, v in client.run(probe).items()}
            assert {n: v[0] for n, v in seen.items()} == {"g-0": "3,1", "g-1": "1,3"}
            assert client.submit(lambda: 5, resources={"GPU": 1}).result(timeout=30) == 5
            pids = {w["worker_pid"] for w in ws} | {proc.pid}
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            err = proc.stderr.read()
        assert code == 0, err
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                  for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(psutil.pid_exists(p) and
                       psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_one_device_keeps_the_name_as_given():
    """Like core-worker: one worker is named NAME (Kubernetes names it after its pod)."""
    from taskcore.deploy.cuda import _worker_names

    assert _worker_names("pod-x", 1) == ["pod-x"]
    assert _worker_names("w", 3) == ["w-0", "w-1", "w-2"]
    assert _worker_names(None, 2) == [None, None]


def test_options_written_by_the_launchers_are_understood():
    """taskcore.process.cuda_worker_cli_args (what job queues, SSH and pods run) writes
    options this parser takes, GPU ones passed as JSON included."""
    from taskcore.cli.cuda_worker import parse_args
    from taskcore.process import cuda_worker_cli_args

    argv = cuda_worker_cli_args("tcp://127.0.0.1:8786", nthreads=2, memory_limit="auto",
                                device_memory_limit="0.5", cuda_visible_devices=["1", "0"],
                                name="w", resources={"MEM": 1}, lifetime="1h",
                                lifetime_stagger="5m", death_timeout=30, log_level="info",
                                rmm_managed_memory=False)
    assert argv[1:3] == ["-m", "taskcore.cli.cuda_worker"]
    os.environ["TASKCORE_NVML_STANDIN"] = "dgx-a100-8"
    sys.path.insert(0, STANDIN)
    saved = sys.modules.pop("pynvml", None)
    from taskcore import nvml
    nvml._reset()
    try:
        args = parse_args(argv[3:])
    finally:
        nvml._reset()
        sys.path.remove(STANDIN)
        sys.modules.pop("pynvml", None)
        if saved is not None:
            sys.modules["pynvml"] = saved
        del os.environ["TASKCORE_NVML_STANDIN"]
    assert [d.entry for d in args.devices] == ["1", "0"]
    assert args.nthreads == 2 and args.device_memory_limit == "0.5"
    assert args.lifetime == 3600 and args.lifetime_stagger == 300 and args.name == "w"
    assert args.extra == {}
