"""LocalCluster with the real Scheduler and Worker (fixture `real_servers`, tests/conftest.py)."""
import asyncio
import sys

import psutil
import pytest

from taskcore import Client
from taskcore.deploy.local import LocalCluster, default_sizes
from taskcore.testing import run


@pytest.mark.parametrize("args, expected", [
    ((None, None, True, 2), (2, 1)),
    ((None, None, True, 4), (4, 1)),
    ((None, None, True, 8), (4, 2)),
    ((None, None, True, 16), (4, 4)),
    ((None, None, True, 12), (4, 3)),
    ((None, None, True, 7), (7, 1)),
    ((None, None, False, 8), (1, 8)),
    ((2, None, True, 8), (2, 4)),
    ((None, 2, True, 8), (4, 2)),
    ((3, 3, True, 2), (3, 3)),
    ((5, None, True, 2), (5, 1)),
    ((None, 4, True, 2), (1, 4)),
])
def test_default_sizes(args, expected):
    assert default_sizes(*args) == expected


def children():
    """Our taskcore processes (not the daemons other tests' session fixtures left running,
    such as OAR's and PostgreSQL's, which fork helpers of their own at any time)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "taskcore" in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    return out


def worker_pids(cluster):
    return {w.worker_pid for w in cluster.workers.values()}


@pytest.mark.usefixtures("real_servers")
def test_processes_sync_start_scale_close():
    before = children()
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="1GiB") as cluster:
        assert cluster.status == "running"
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert len(cluster.workers) == 2
        pids = worker_pids(cluster)
        assert len(pids) == 2 and pids <= children()
        for w in cluster.workers.values():
            assert w.worker_address.startswith("tcp://127.0.0.1:")
            assert w.memory_limit == min(2**30, w.memory_limit)
        # The scheduler runs in its own process too (scheduler_process defaults to True).
        assert cluster.scheduler.pid in children() - pids
        cluster.scale(3)
        assert len(cluster.workers) == 3 and len(children() - before) == 4
        cluster.scale(1)
        assert sorted(cluster.workers) == [0]
        assert len(children() - before) == 2
        cluster.wait_for_workers(1, timeout=10)
        r = repr(cluster)
        assert "LocalCluster(" in r and "workers=1" in r and "threads=1" in r
        assert cluster.scheduler_address in cluster._repr_html_()
        logs = cluster.get_logs()
        assert "Cluster" in logs and "0" in logs
    assert cluster.status == "closed"
    assert children() - before == set()


def test_scheduler_options_reach_the_state_machine(real_servers):
    Scheduler = real_servers.Scheduler
    assert Scheduler(tiny_task_backlog=0, allowed_failures=5).state.tiny_task_backlog == 0
    with pytest.raises(TypeError, match="unknown options.*bogus"):
        Scheduler(bogus=1)


def test_scheduler_in_this_process_on_request(real_servers, real_client):
    Scheduler, Client = real_servers.Scheduler, real_client
    before = children()
    with LocalCluster(n_workers=1, threads_per_worker=1, scheduler_process=False,
                      memory_limit=None) as cluster:
        assert isinstance(cluster.scheduler, Scheduler)
        assert len(children() - before) == 1          # the worker only
        with Client(cluster) as client:
            assert client.submit(lambda x: x + 1, 1).result() == 2
    assert children() - before == set()
    with pytest.raises(ValueError, match="scheduler_process"):
        LocalCluster(processes=False, scheduler_process=True)


@pytest.mark.usefixtures("real_servers")
def test_processes_with_plain_worker_processes():
    before = children()
    with LocalCluster(n_workers=1, threads_per_worker=1, worker_class="process",
                      memory_limit=None) as cluster:
        (w,) = cluster.workers.values()
        assert w.address.startswith("tcp://") and w.pid in children()
        cluster.scale(2)
        assert len(children() - before) == 3      # two workers and the scheduler
    assert children() - before == set()


@pytest.mark.usefixtures("real_servers")
def test_nanny_restarts_a_killed_worker_in_a_cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=None) as cluster:
        (nanny,) = cluster.workers.values()
        pid = nanny.worker_pid
        psutil.Process(pid).kill()
        cluster.sync(_wait_restart, nanny, pid)
        assert len(cluster.workers) == 1


async def _wait_restart(nanny, old_pid):
    for _ in range(600):
        if nanny.worker_pid not in (None, old_pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("worker was not restarted")


@pytest.mark.usefixtures("real_servers")
def test_threads_sync_inproc():
    before = children()
    with LocalCluster(processes=False, n_workers=2, threads_per_worker=1) as cluster:
        assert cluster.scheduler_address.startswith("inproc://")
        assert all(w.address.startswith("inproc://") for w in cluster.workers.values())
        cluster.scale(3)
        assert len(cluster.workers) == 3
        cluster.scale(1)
        assert len(cluster.workers) == 1
        assert children() == before  # no processes at all
    assert cluster.status == "closed"


@pytest.mark.usefixtures("real_servers")
def test_async_context_manager_and_await():
    before = children()  # session fixtures (our sshd) may be children too

    async def main():
        async with LocalCluster(processes=False, n_workers=1, asynchronous=True) as cluster:
            assert len(cluster.workers) == 1
            await cluster.scale(2)
            assert len(cluster.workers) == 2
            await cluster.wait_for_workers(2, timeout=5)
            logs = await cluster.get_logs()
            assert "Cluster" in logs
        assert cluster.status == "closed"

        cluster = await LocalCluster(processes=True, n_workers=1, threads_per_worker=1,
                                     memory_limit=None, asynchronous=True)
        try:
            assert cluster.status == "running"
            (w,) = cluster.workers.values()
            assert w.worker_pid in children()
        finally:
            await cluster.close()
        assert children() <= before
    run(main(), timeout=120)


@pytest.mark.usefixtures("real_servers")
def test_zero_workers_then_scale():
    with LocalCluster(n_workers=0, processes=False) as cluster:
        assert cluster.workers == {}
        cluster.scale(1)
        assert len(cluster.workers) == 1


@pytest.mark.usefixtures("real_servers")
def test_bad_combinations():
    with pytest.raises(ValueError, match="inproc"):
        LocalCluster(processes=True, protocol="inproc")
    with pytest.raises(ValueError, match="env"):
        LocalCluster(processes=False, env={"A": "1"})


@pytest.mark.usefixtures("real_servers")
def test_env_reaches_worker_processes():
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=None,
                      env={"TASKCORE_TEST_MARKER": "42"}) as cluster:
        (w,) = cluster.workers.values()
        assert psutil.Process(w.worker_pid).environ().get("TASKCORE_TEST_MARKER") == "42"


@pytest.mark.parametrize("processes", [True, False])
@pytest.mark.usefixtures("real_servers")
def test_client_round_trip(processes, real_client):
    """Integration with the Client (not owned by the deploy layer)."""
    with LocalCluster(processes=processes, n_workers=1, threads_per_worker=1,
                      memory_limit=None) as cluster:
        with real_client(cluster.scheduler_address) as client:
            assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2


@pytest.mark.usefixtures("real_servers")
def test_workers_start_alongside_the_scheduler_on_the_socket_bound_for_it():
    # The cluster binds the scheduler's socket and hands it over: the address is known
    # before the scheduler process is ready, so the workers start at the same time.
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="1GiB",
                      dashboard_address=None) as cluster:
        sched = cluster.scheduler
        assert sched.planned_address == cluster.scheduler_address == sched.info["address"]
        cluster.wait_for_workers(2, timeout=10)
        with Client(cluster, set_as_default=False) as c:
            assert c.submit(abs, -3).result() == 3
            # served by the scheduler process; no copy left open here
            assert c.run_on_scheduler(lambda scheduler: scheduler.listen_fd) is not None
        port = int(cluster.scheduler_address.rsplit(":", 1)[1])
        assert not [c for c in psutil.Process().net_connections("tcp")
                    if c.laddr and c.laddr.port == port and c.status == "LISTEN"]
    # a name, not an address: left to the scheduler to bind, as before
    with LocalCluster(n_workers=1, threads_per_worker=1, host="localhost",
                      dashboard_address=None) as cluster:
        assert cluster.scheduler.planned_address is None
        cluster.wait_for_workers(1, timeout=10)


def test_a_handed_over_socket_needs_one_tcp_address():
    from taskcore.scheduler import Scheduler

    with pytest.raises(ValueError, match="listen_fd"):
        Scheduler(protocol="inproc", listen_fd=3)
    with pytest.raises(ValueError, match="listen_fd"):
        Scheduler(listen_addresses=["tcp://127.0.0.1:0", "tcp://127.0.0.1:0"], listen_fd=3)


def test_a_scheduler_port_in_use_is_a_clear_error():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        before = children()
        with pytest.raises(OSError, match=f"cannot listen for the scheduler on 127.0.0.1:{port}"):
            LocalCluster(n_workers=1, scheduler_port=port, dashboard_address=None)
        assert children() - before == set()


def test_a_scheduler_that_fails_takes_the_workers_started_alongside_it():
    before = children()
    with pytest.raises(Exception, match="allowed_failures|Scheduler|scheduler"):
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                     scheduler_kwargs={"allowed_failures": "many"})
    assert children() - before == set()


def test_no_leak_when_closing_a_cluster_that_failed_to_start():
    before = children()
    with pytest.raises(Exception):
        LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=None,
                     worker_command_does_not_exist=object())
    assert children() - before == set()


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("process checks use Linux psutil semantics")


def test_spec_cluster_of_subprocesses_only():
    """Scheduler and workers all as ProcessInterfaces running the CLIs."""
    from taskcore.deploy import SchedulerProcess, SpecCluster, WorkerProcess

    before = children()
    worker = {"cls": WorkerProcess, "options": {"nthreads": 1, "memory_limit": None}}
    with SpecCluster(scheduler={"cls": SchedulerProcess, "options": {"port": 0}},
                     workers={"a": worker}, worker=worker) as cluster:
        assert cluster.scheduler.role == "scheduler"
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert cluster.workers["a"].info["role"] == "worker"
        cluster.scale(2)
        assert len(children() - before) == 3
        logs = cluster.get_logs()
        assert set(logs) >= {"Cluster", "Scheduler", "a"}
    assert children() - before == set()


@pytest.mark.usefixtures("real_servers")
def test_forgotten_cluster_is_closed_at_exit(tmp_path):
    """A script that never calls close() still leaves no worker process behind."""
    import subprocess
    import time

    script = tmp_path / "script.py"
    script.write_text(
        "from taskcore.deploy import LocalCluster\n"
        "c = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=None)\n"
        "print(' '.join(str(w.worker_pid) for w in c.workers.values()), flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    time.sleep(0.2)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


# Loose inputs are errors before anything starts (issue 16, fault 9).
@pytest.mark.parametrize("kwargs, match", [
    ({"n_workers": -1}, "n_workers=-1"),
    ({"n_workers": 1.5}, "n_workers=1.5"),
    ({"threads_per_worker": 0}, "threads_per_worker=0"),
])
def test_impossible_sizes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalCluster(dashboard_address=None, **kwargs)


def test_unknown_worker_option_is_refused():
    with pytest.raises(TypeError, match="unknown options: \\['nthread'\\]"):
        LocalCluster(n_workers=1, processes=False, nthread=2, dashboard_address=None)


def test_in_process_workers_are_not_paused_by_the_callers_memory():
    """The caller's process already holds more than these workers' limits: RSS-based
    pausing would stop them for memory none of them holds."""
    import numpy as np

    ballast = np.ones(96 * 2**20 // 8)          # resident in this (the workers') process
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      memory_limit="64MiB", dashboard_address=None) as cluster:
        with Client(cluster) as client:
            import time

            time.sleep(1.5)                      # several rounds of the memory monitor
            assert client.gather(client.map(lambda x: x + 1, range(20))) == list(range(1, 21))
            assert not any(client.run(lambda dask_worker: dask_worker.paused).values())
    del ballast
