"""SLURMCluster end to end against a real SLURM (tests/deploy/jobqueue/slurm_server.py).

The node claims 8 CPUs on this 2-core machine, so several jobs run at once;
partitions: debug (default), bigmem, restricted (account acct-ok only).
"""
import subprocess
import sys
import textwrap
import time

import cloudpickle
import psutil
import pytest

from taskcore import Client
from taskcore.deploy.jobqueue.slurm import SLURMCluster
from taskcore.deploy.jobqueue.system import BatchCommandError
from taskcore.testing import wait_until

FAST = dict(poll_interval=0.5)
# The jobs' workers cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x):
    return x + 1


def slowinc(x, delay=0.1):
    time.sleep(delay)
    return x + 1


def _server_processes(address):
    """Worker and scheduler processes that talk to this scheduler address (leftovers)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "taskcore.cli" in cmd and address.split("://")[-1] in cmd:
            out.append(p.pid)
    return out


def _partitions(slurm):
    out = slurm.run("squeue", "--noheader", "--format=%i|%P").stdout
    return sorted(line.split("|")[1] for line in out.split())


def test_scale_jobs_compute_and_close_leaves_nothing(slurm_clean, tmp_path):
    slurm = slurm_clean
    with SLURMCluster(cores=1, memory="1GiB", log_directory=str(tmp_path), **FAST) as cluster:
        cluster.scale(jobs=3)
        assert len(cluster.jobs) == 3
        cluster.wait_for_workers(3, timeout=60)
        wait_until(lambda: cluster._job_counts()["running"] == 3, 10, "3 running jobs")
        assert "jobs_running=3, jobs_pending=0" in repr(cluster)
        assert "Jobs running" in cluster._repr_html_()
        with Client(cluster) as client:
            assert sum(client.gather(client.map(inc, range(100)))) == sum(range(1, 101))
        # One status call per interval for all three jobs, not one per job.
        polls, start = cluster.system.polls, time.monotonic()
        time.sleep(2)
        assert cluster.system.polls - polls <= (time.monotonic() - start) / 0.5 + 1
        address = cluster.scheduler_address
        logs = cluster.get_logs()
        assert any("taskcore.worker" in line or "worker" in line for line in logs["0"])
        assert len(slurm.jobs()) == 3
    assert slurm.jobs() == []
    assert _server_processes(address) == []


def test_a_job_cancelled_from_outside_is_replaced_and_results_stay_right(slurm_clean):
    slurm = slurm_clean
    with SLURMCluster(cores=1, memory="1GiB", **FAST) as cluster, Client(cluster) as client:
        cluster.scale(jobs=2)
        client.wait_for_workers(2, timeout=60)
        futures = client.map(slowinc, range(40), delay=0.1)
        victim = cluster.jobs[0]["job_id"]
        time.sleep(0.5)
        slurm.run("scancel", victim)
        assert client.gather(futures) == list(range(1, 41))
        wait_until(lambda: (len(cluster.jobs) == 2 and victim not in
                        {j["job_id"] for j in cluster.jobs.values()}
                        and cluster._job_counts()["running"] == 2), 60, "a replacement job")
        assert any("exited unexpectedly" in line for line in cluster.get_logs()["Cluster"])
        client.wait_for_workers(2, timeout=60)


def test_max_jobs_queued_is_respected(slurm_clean):
    slurm = slurm_clean
    # 4 cores a job on an 8-CPU node: two jobs run, the others must wait.
    with SLURMCluster(cores=4, memory="1GiB", max_jobs_queued=2, poll_interval=0.3) as cluster:
        cluster.scale(jobs=5)
        assert len(cluster.jobs) == 5  # all five planned: three held or queued
        most = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            states = [s for _, s in slurm.jobs()]
            most = max(most, states.count("PENDING"))
            time.sleep(0.1)
        assert most == 2, most
        counts = cluster._job_counts()
        assert counts == {"running": 2, "pending": 3}, (counts, cluster.jobs)
        held = [n for n, j in cluster.jobs.items() if j["state"] == "held"]
        assert len(held) == 1 and cluster.jobs[held[0]]["job_id"] is None
        assert "jobs_pending=3" in repr(cluster)
        # A running job leaving frees a queue slot: the held job goes in.
        running = [j["job_id"] for j in cluster.jobs.values() if j["state"] == "running"]
        cluster.scale_down([n for n, j in cluster.jobs.items() if j["job_id"] == running[0]])
        wait_until(lambda: all(j["job_id"] for j in cluster.jobs.values()), 30,
               "the held job to be submitted")
        assert max(s.count("PENDING") for s in [[x for _, x in slurm.jobs()]]) <= 2


def test_walltime_retires_and_replaces_without_losing_work(slurm_clean):
    # Lifetime 40 s (+-5 s) in a one-minute walltime: the computation (about 70 s on one
    # worker) outlives two workers, and the scheduler always has one.
    with SLURMCluster(cores=1, memory="1GiB", walltime="00:01:00", walltime_margin="20s",
                      **FAST) as cluster, Client(cluster) as client:
        cluster.scale(jobs=1)
        client.wait_for_workers(1, timeout=60)
        first = cluster.jobs[0]["job_id"]
        futures = client.map(slowinc, range(140), delay=0.5)
        counts = []
        while not all(f.done() for f in futures):
            counts.append(len(client.scheduler_info()["workers"]))
            time.sleep(0.2)
        assert client.gather(futures) == list(range(1, 141))
        assert min(counts) >= 1, counts
        ids = {j["job_id"] for j in cluster.jobs.values()}
        assert first not in ids, cluster.jobs
        logs = "\n".join(cluster.get_logs()["Cluster"])
        assert "expires soon" in logs and "ended as planned" in logs


def test_processes_per_job_count_as_workers_in_scale_and_adapt(slurm_clean):
    with SLURMCluster(cores=2, memory="2GiB", processes=2, **FAST) as cluster, \
            Client(cluster) as client:
        cluster.scale(jobs=2)
        client.wait_for_workers(4, timeout=60)
        names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
        assert names == ["0-0", "0-1", "1-0", "1-1"]
        assert cluster._planned_workers() == 4
        adaptive = cluster.adapt(minimum_jobs=1, maximum_jobs=1, interval="200ms",
                                 wait_count=2)
        wait_until(lambda: len(cluster.jobs) == 1, 30, "adaptive to close one job")
        assert adaptive.minimum == 2 and adaptive.maximum == 2
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, 30, "two workers left")
        time.sleep(1.5)
        assert len(cluster.jobs) == 1 and adaptive.scale_ups == 0  # no flapping


def test_worker_groups_on_two_partitions(slurm_clean):
    slurm = slurm_clean
    with SLURMCluster(cores=1, memory="1GiB", queue="debug",
                      worker_groups={"bigmem": {"queue": "bigmem", "memory": "2GiB"}},
                      **FAST) as cluster, Client(cluster) as client:
        cluster.scale(jobs=1)
        cluster.scale(jobs=2, worker_group="bigmem")
        client.wait_for_workers(3, timeout=60)
        assert _partitions(slurm) == ["bigmem", "bigmem", "debug"]
        assert "#SBATCH -p bigmem" in cluster.job_script(worker_group="bigmem")
        assert "--mem=2048M" in cluster.job_script(worker_group="bigmem")
        cluster.adapt(minimum_jobs=1, maximum_jobs=1, worker_group="bigmem", interval="200ms",
                      wait_count=2)
        wait_until(lambda: _partitions(slurm) == ["bigmem", "debug"], 30, "bigmem down to 1 job")
        assert client.submit(inc, 1).result() == 2


def test_tls_between_scheduler_and_job_workers(slurm_clean, tmp_path):
    from taskcore.security import Security

    security = Security.temporary(directory=str(tmp_path))
    with SLURMCluster(cores=1, memory="1GiB", security=security, **FAST) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        assert "--tls-cert" in cluster.job_script()
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=60)
        with Client(cluster, security=security) as client:
            assert client.submit(inc, 41).result() == 42


def test_bad_partition_or_account_fails_fast_with_slurms_message(slurm_clean):
    slurm = slurm_clean
    start = time.monotonic()
    with pytest.raises(BatchCommandError, match="Invalid partition name specified"):
        SLURMCluster(cores=1, memory="1GiB", queue="nosuch", n_workers=2)
    with pytest.raises(BatchCommandError, match="Invalid account"):
        SLURMCluster(cores=1, memory="1GiB", queue="restricted", account="bad")
    with pytest.raises(BatchCommandError, match="scheduler job would be rejected.*partition"):
        SLURMCluster(cores=1, memory="1GiB", scheduler="job",
                     scheduler_job={"queue": "nosuch"})
    assert time.monotonic() - start < 15
    assert slurm.jobs() == []
    # the allowed account is accepted on the restricted partition
    with SLURMCluster(cores=1, memory="1GiB", queue="restricted", account="acct-ok",
                      **FAST) as cluster:
        with pytest.raises(BatchCommandError, match="worker group 'x' job would be rejected"):
            cluster.add_worker_group("x", 1, queue="nosuch")
        assert "x" not in cluster.worker_groups
    with pytest.raises(TypeError, match="unknown option"):
        SLURMCluster(cores=1, memory="1GiB", partition="debug")
    assert slurm.jobs() == []


def test_scheduler_in_its_own_job_detach_and_from_name_in_a_new_process(slurm_clean, tmp_path):
    slurm = slurm_clean
    cluster = SLURMCluster(cores=1, memory="1GiB", scheduler="job",
                           shared_directory=str(tmp_path), shutdown_on_close=False,
                           name="jq-detached", **FAST)
    try:
        assert cluster.scheduler.job_id
        cluster.scale(jobs=2)
        cluster.wait_for_workers(2, timeout=60)
        address = cluster.scheduler_address
    except BaseException:
        cluster.shutdown()
        raise
    cluster.close()  # detaches: every job keeps running
    assert len(slurm.jobs()) == 3
    code = textwrap.dedent(f"""
        from taskcore import Client
        from taskcore.deploy.jobqueue.slurm import SLURMCluster
        c = SLURMCluster.from_name("jq-detached")
        assert c.scheduler_address == {address!r}, c.scheduler_address
        assert len(c.jobs) == 2, c.jobs
        c.scale(jobs=3)
        c.wait_for_workers(3, timeout=60)
        with Client(c) as client:
            print("result", sum(client.gather(client.map(lambda x: x + 1, range(10)))))
        c.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "result 55" in out.stdout
    wait_until(lambda: slurm.jobs() == [], 30, "every job to be gone")
    assert _server_processes(address) == []
