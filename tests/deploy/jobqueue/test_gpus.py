"""GPU jobs: `gpus=N` on every batch system (its GPU request, one `core-cuda-worker` per
job with N workers), worker groups mixing CPU and GPU jobs, and the errors; then a
cluster of CPU and GPU jobs on the real SLURM, whose gres plugin hands each job its GPUs
(slurm_server.py), with the workers' NVML answered by the stand-in (tests/gpu_standin).
"""
import os
import sys

import cloudpickle
import pytest

from taskcore import Client
from taskcore.deploy.jobqueue.flux import Flux
from taskcore.deploy.jobqueue.htcondor import HTCondor
from taskcore.deploy.jobqueue.job import JobScript
from taskcore.deploy.jobqueue.lsf import LSF
from taskcore.deploy.jobqueue.oar import OAR
from taskcore.deploy.jobqueue.pbs import PBS, Moab, Torque
from taskcore.deploy.jobqueue.sge import SGE
from taskcore.deploy.jobqueue.slurm import SLURM, SLURMCluster

ADDRESS = "tcp://10.1.2.3:8786"
STANDIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "gpu_standin")
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def _no_site_config(tmp_path, monkeypatch):
    monkeypatch.delenv("TASKCORE_JOBQUEUE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))


# The GPU request each batch system's header carries for gpus=2 (cores=8).
GPU_LINES = [
    (SLURM, "#SBATCH --gres=gpu:2"),
    (PBS, "#PBS -l select=1:ncpus=8:ngpus=2:mem=16384mb"),
    (Torque, "#PBS -l nodes=1:ppn=8:gpus=2"),
    (Moab, "#PBS -l nodes=1:ppn=8:gpus=2"),
    (SGE, "#$ -l gpu=2"),
    (LSF, '#BSUB -gpu "num=2"'),
    (HTCondor, "request_gpus = 2"),
    (OAR, "#OAR -l /nodes=1/gpu=2/core=4"),
    (Flux, "#flux: -g 2"),
]


def _job(system, **options):
    return JobScript(system, cores=8, memory="16GiB", python="/py", **options)


@pytest.mark.parametrize("system,line", GPU_LINES, ids=[s.name for s, _ in GPU_LINES])
def test_each_system_asks_for_the_gpus(system, line):
    gpu = _job(system(), gpus=2)
    text = gpu.worker_script(ADDRESS, "w0")
    assert line in text.splitlines()
    # ... and a CPU job of the same system says nothing about GPUs.
    cpu = _job(system()).worker_script(ADDRESS, "w0")
    assert "gpu" not in cpu.lower()


def test_a_gpu_job_runs_core_cuda_worker_with_one_worker_per_gpu():
    job = _job(SLURM(), gpus=2, device_memory_limit="30GB", walltime="01:00:00",
               resources={"MEM": 1})
    assert job.processes == 2
    argv = job.worker_command(ADDRESS, "w0")
    assert argv[:3] == ["/py", "-m", "taskcore.cli.cuda_worker"]
    assert "--nanny" not in argv and "--nworkers" not in argv
    text = " ".join(argv)
    assert "--nthreads 4" in text                       # 8 cores over 2 GPUs
    assert f"--memory-limit {8 * 2**30}" in text        # 16 GiB over 2 workers
    assert "--device-memory-limit 30GB" in text
    assert "--name w0" in text and "--resources MEM=1" in text
    assert "--lifetime " in text                        # the walltime still retires them


def test_the_scheduler_job_of_a_gpu_cluster_asks_for_no_gpu():
    opts = SLURMCluster.resolve_options({}, dict(cores=4, memory="8GiB", gpus=2))
    assert opts["processes"] == 2
    sjob = {k: v for k, v in opts.items() if k in SLURMCluster.option_names()}
    for k in ("processes", "gpus", "device_memory_limit"):
        sjob.pop(k, None)
    text = JobScript(SLURM(), **dict(sjob, cores=1)).worker_script(ADDRESS, "s")
    assert "gres" not in text


@pytest.mark.parametrize("options,message", [
    (dict(gpus=0), "positive number of GPUs"),
    (dict(gpus=-1), "positive number of GPUs"),
    (dict(gpus=True), "positive number of GPUs"),
    (dict(gpus="2"), "positive number of GPUs"),
    (dict(gpus=2, processes=3), "contradicts"),
    (dict(device_memory_limit="10GB"), "needs gpus="),
    (dict(gpus=16), "every worker process needs at least one core"),
])
def test_bad_gpu_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        _job(SLURM(), **options)


def test_gpu_and_cpu_worker_groups_in_one_cluster():
    cpu = {"cores": 4, "memory": "8GiB"}
    merged = SLURMCluster._group_job_options(cpu, "gpu", {"gpus": 2, "queue": "gpu"})
    assert merged["processes"] == 2 and merged["queue"] == "gpu"
    # A CPU group of a GPU cluster is one worker per job again, unless it says otherwise.
    gpu = SLURMCluster.resolve_options({}, dict(cores=4, memory="8GiB", gpus=2))
    back = SLURMCluster._group_job_options(gpu, "cpu", {"gpus": None})
    assert back["processes"] == 1 and back["gpus"] is None
    kept = SLURMCluster._group_job_options(gpu, "cpu", {"gpus": None, "processes": 4})
    assert kept["processes"] == 4
    with pytest.raises(TypeError, match="unknown job option"):
        SLURMCluster._group_job_options(cpu, "gpu", {"gpu": 2})


def test_python_default_is_this_interpreter_for_gpu_jobs_too():
    job = JobScript(SLURM(), cores=2, memory="4GiB", gpus=1)
    assert job.worker_command(ADDRESS, "w")[0] == sys.executable


# -- on the real SLURM --------------------------------------------------------------------------

def _gpu_view():
    import os

    from taskcore import get_worker
    w = get_worker()
    return (w.name, os.environ.get("CUDA_VISIBLE_DEVICES"), dict(w.resources),
            sorted(os.sched_getaffinity(0)))


def test_cpu_and_gpu_jobs_in_one_slurm_cluster(slurm_clean, tmp_path, monkeypatch):
    # The jobs inherit this environment (sbatch --export=ALL): NVML is the stand-in's
    # 8-GPU machine, and SLURM itself picks which two of the node's GPUs a job gets.
    monkeypatch.setenv("TASKCORE_NVML_STANDIN", "dgx-a100-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [STANDIN] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with SLURMCluster(cores=2, memory="2GiB", poll_interval=0.5, log_directory=str(tmp_path),
                      worker_groups={"gpu": {"gpus": 2, "memory": "4GiB"}}) as cluster:
        script = cluster.job_script(worker_group="gpu")
        assert "#SBATCH --gres=gpu:2" in script and "taskcore.cli.cuda_worker" in script
        assert "gres" not in cluster.job_script()
        cluster.scale(1)                               # one CPU job: one worker
        cluster.scale(2, worker_group="gpu")           # one GPU job: two workers
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=90)
            info = client.scheduler_info()["workers"]
            gpu_workers = {w["name"]: a for a, w in info.items() if w["resources"].get("GPU")}
            assert len(gpu_workers) == 2
            views = {}
            for name, addr in gpu_workers.items():
                views[name] = client.submit(_gpu_view, workers=[addr], pure=False).result(60)
            job_names = sorted(views)
            assert [n.rsplit("-", 1)[1] for n in job_names] == ["0", "1"]  # NAME-0, NAME-1
            # SLURM gave the job GPUs 0 and 1; each worker sees its own first.
            assert [views[n][1] for n in job_names] == ["0,1", "1,0"]
            assert all(views[n][2] == {"GPU": 1} for n in job_names)
            # ... pinned to the CPUs NVML puts near its GPU (the recording: GPU i near
            # CPUs i, i+8, ...), within what the job may use (this machine's CPUs).
            allowed = os.sched_getaffinity(0)
            assert [views[n][3] for n in job_names] == [
                sorted({0, 8} & allowed) or sorted(allowed),
                sorted({1, 9} & allowed) or sorted(allowed)]
            # Work that needs a GPU goes to GPU workers only; the rest anywhere.
            futs = [client.submit(_gpu_view, resources={"GPU": 1}, pure=False)
                    for _ in range(6)]
            assert {f.result(60)[0] for f in futs} <= set(job_names)
        assert len(cluster.jobs) == 2
