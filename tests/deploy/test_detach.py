"""Clusters that outlive the Python process that made them, and `from_name` from another.

The creating code runs in a subprocess that exits; the test process (a new
process) reconnects by name, computes, scales, and shuts the cluster down.
Every PID the registry ever named must be gone at the end (the conftest's
safety net also checks).
"""
import json
import subprocess
import sys
import textwrap

import pytest

from taskcore import Client
from taskcore.deploy import registry
from taskcore.deploy.launcher import is_alive
from taskcore.deploy.local import LocalCluster
from taskcore.testing import import_required


def run_python(code, timeout=60):
    """Run `code` in a fresh interpreter (inheriting our env, registry dir included)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def all_pids(name):
    entry = registry.load(name)
    recs = [entry["scheduler"]] + [w["record"] for w in entry["workers"].values()]
    return [(r["launch"]["pid"], r["launch"]["pid_start"]) for r in recs] + \
           [(r["launch"]["child_pid"], r["launch"]["child_start"]) for r in recs]


def test_detached_local_cluster_survives_its_process_and_reconnects(cluster_registry):
    out = run_python("""
        from taskcore import Client, LocalCluster
        c = LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="400MB",
                         shutdown_on_close=False, name="det-local")
        with Client(c) as client:
            x = client.submit(lambda: 21 * 2).result()
        print(c.scheduler_address, x)
        # no close(): the interpreter exits, the cluster stays
    """)
    address, x = out.split()
    assert x == "42"
    pids = all_pids("det-local")
    assert all(is_alive(p, s) for p, s in pids)
    [info] = registry.list_clusters()
    assert info["name"] == "det-local" and info["status"] == "running"
    assert info["detached"] and info["manager_pid"] is None and info["workers"] == 1

    # A second process reconnects, scales to 2, and detaches again (close() keeps it running).
    run_python("""
        from taskcore import Client, LocalCluster
        c = LocalCluster.from_name("det-local")
        c.scale(2)
        c.wait_for_workers(2, timeout=30)
        with Client(c) as client:
            assert sum(client.gather(client.map(lambda i: i + 1, range(10)))) == 55
        c.close()
    """)
    assert registry.list_clusters()[0]["workers"] == 2
    pids = all_pids("det-local")

    # And this process takes over and shuts it down for good.
    cluster = LocalCluster.from_name("det-local")
    try:
        assert cluster.scheduler_address == address and len(cluster.workers) == 2
        assert "det-local" in repr(cluster)
        with Client(cluster) as client:
            assert client.submit(lambda: "still here").result(timeout=20) == "still here"
        logs = cluster.get_logs()
        assert {"Cluster", "Scheduler", "0", "1"} <= set(logs)
        assert any('"event": "launched"' in line for line in logs["Scheduler"])
    finally:
        cluster.shutdown()
    assert not any(is_alive(p, s) for p, s in pids)
    assert registry.list_clusters() == []
    assert not (cluster_registry / "det-local.logs").exists()


def test_a_dead_recorded_worker_is_replaced_on_reconnect(cluster_registry):
    c = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="400MB",
                     shutdown_on_close=False, name="det-dead")
    victim = c.workers[1]
    c.close()  # detach
    import os
    import signal

    os.kill(victim.launch["pid"], signal.SIGKILL)  # its supervisor: the worker follows
    os.kill(victim.launch["child_pid"], signal.SIGKILL)
    import time

    deadline = time.monotonic() + 10
    while any(is_alive(p, s) for p, s in victim.pids):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cluster = LocalCluster.from_name("det-dead", shutdown_on_close=True)
    try:
        assert sorted(cluster.workers) == [0, 1]
        assert cluster.workers[1].launch["child_pid"] != victim.launch["child_pid"]
        cluster.wait_for_workers(2, timeout=30)
        assert any("is gone" in line for line in cluster.get_logs()["Cluster"])
    finally:
        cluster.close()
    assert registry.list_clusters() == []


def test_from_name_errors(cluster_registry):
    with pytest.raises(registry.ClusterNotFound, match="no cluster named 'nope'"):
        LocalCluster.from_name("nope")
    with LocalCluster(n_workers=0, name="attached-one") as c:
        [info] = registry.list_clusters()
        assert info["name"] == "attached-one" and not info["detached"]
        with pytest.raises(RuntimeError, match="not made with shutdown_on_close=False"):
            LocalCluster.from_name("attached-one")
        import_required("asyncssh", "SSH tests need the [ssh] extra")
        from taskcore.deploy.ssh import SSHCluster

        entry = registry.load("attached-one")
        registry.save(dict(entry, name="fake-detached", detached=True))
        with pytest.raises(TypeError, match="is a LocalCluster, not a SSHCluster"):
            SSHCluster.from_name("fake-detached")
        registry.remove("fake-detached")
    assert registry.list_clusters() == []
    with pytest.raises(ValueError, match="invalid cluster name"):
        LocalCluster(shutdown_on_close=False, name="bad name/with slash", processes=True)
    with pytest.raises(ValueError, match="processes=True"):
        LocalCluster(shutdown_on_close=False, processes=False)


def test_stale_entries_are_reported_and_pruned(cluster_registry):
    registry.save({"name": "ghost", "cls": "taskcore.deploy.local.LocalCluster",
                   "detached": False, "manager_pid": 999999999, "host": __import__(
                       "socket").gethostname(), "scheduler_address": "tcp://127.0.0.1:1",
                   "workers": {}, "config": {}})
    [info] = registry.list_clusters()
    assert info["status"] == "dead"
    out = subprocess.run([sys.executable, "-m", "taskcore.cli.clusters", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)[0]["name"] == "ghost"
    out = subprocess.run([sys.executable, "-m", "taskcore.cli.clusters", "prune"],
                         capture_output=True, text=True, check=True).stdout
    assert "removed ghost" in out
    assert registry.list_clusters() == []


def test_core_clusters_lists_and_closes_a_detached_cluster(cluster_registry):
    c = LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="400MB",
                     shutdown_on_close=False, name="det-cli")
    c.close()
    pids = all_pids("det-cli")
    out = subprocess.run([sys.executable, "-m", "taskcore.cli.clusters"], capture_output=True,
                         text=True, check=True).stdout
    assert "det-cli" in out and "running" in out and "LocalCluster" in out
    proc = subprocess.run([sys.executable, "-m", "taskcore.cli.clusters", "close", "det-cli"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "closed det-cli" in proc.stdout
    assert not any(is_alive(p, s) for p, s in pids)
    proc = subprocess.run([sys.executable, "-m", "taskcore.cli.clusters", "close", "det-cli"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no cluster named 'det-cli'" in proc.stderr


def test_detached_ssh_cluster_survives_its_process_and_reconnects(sshd, ssh_cluster_kwargs):
    import_required("asyncssh", "SSH tests need the [ssh] extra")
    from taskcore.deploy.ssh import SSHCluster

    out = run_python(f"""
        from taskcore.deploy.ssh import SSHCluster
        c = SSHCluster(["127.0.0.1", "127.0.0.1"], connect_options={sshd.connect_options()!r},
                       worker_options={{"nthreads": 1, "memory_limit": "400MB"}},
                       shutdown_on_close=False, name="det-ssh", **{ssh_cluster_kwargs!r})
        print(c.scheduler_address)
    """)
    address = out.strip()
    pids = all_pids("det-ssh")
    assert all(is_alive(p, s) for p, s in pids)
    [info] = registry.list_clusters()
    assert info["status"] == "running" and info["cls"].endswith("SSHCluster")

    cluster = SSHCluster.from_name("det-ssh")
    try:
        assert cluster.scheduler_address == address
        cluster.scale(2)
        cluster.add_worker_group("big", n=1, memory_limit="600MB")
        cluster.wait_for_workers(3, timeout=30)
        cluster.close()  # detach again: the group travels through the registry
        cluster = SSHCluster.from_name("det-ssh")
        assert cluster.worker_groups["big"]["options"]["memory_limit"] == "600MB"
        assert cluster.worker_spec["big-0"]["worker_group"] == "big"
        cluster.scale(2, worker_group="big")
        cluster.wait_for_workers(4, timeout=30)
        assert sorted(map(str, cluster.workers)) == ["0", "1", "big-0", "big-1"]
        with Client(cluster) as client:
            assert sum(client.gather(client.map(lambda i: i * 3, range(10)))) == 135
        logs = cluster.get_logs()
        assert "Scheduler" in logs and "1" in logs and "big-1" in logs
        pids = all_pids("det-ssh")
    finally:
        cluster.shutdown()
    assert not any(is_alive(p, s) for p, s in pids)
    assert registry.list_clusters() == []
