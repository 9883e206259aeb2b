"""SpecCluster with real servers: heterogeneous worker groups, and a dead worker replaced."""
import os
import signal
import time

from taskcore import Client
from taskcore.deploy.local import LocalCluster


def where_am_i(_):
    from taskcore import get_worker

    return str(get_worker().name)


def test_worker_groups_are_heterogeneous_and_scale_on_their_own():
    with LocalCluster(n_workers=8, threads_per_worker=1, processes=False,
                      memory_limit="256MiB") as cluster, Client(cluster) as client:
        cluster.add_worker_group("big", n=2, memory_limit="2GiB", resources={"BIG": 1})
        client.wait_for_workers(10, timeout=20)
        info = client.scheduler_info()["workers"].values()
        big = sorted(str(w["name"]) for w in info if w["resources"].get("BIG"))
        assert big == ["big-0", "big-1"]
        assert all(w["memory_limit"] == 2 * 2**30 for w in info if str(w["name"]) in big)
        assert sum(w["memory_limit"] == 256 * 2**20 for w in info) == 8
        # Work that needs the BIG resource runs only on the big group.
        ran_on = set(client.gather([client.submit(where_am_i, i, resources={"BIG": 1})
                                    for i in range(10)]))
        assert ran_on <= {"big-0", "big-1"}
        # Each group scales on its own.
        cluster.scale(4)
        assert cluster._planned_workers() == 4 and cluster._planned_workers("big") == 2
        cluster.scale(3, worker_group="big")
        assert cluster._planned_workers() == 4 and cluster._planned_workers("big") == 3
        assert sorted(n for n in cluster.workers if isinstance(n, str)) == [
            "big-0", "big-1", "big-2"]
        assert "workers=7" in repr(cluster)
        cluster.remove_worker_group("big")
        assert len(cluster.workers) == 4 and "big" not in cluster.worker_groups
        client.wait_for_workers(4, timeout=20)
        assert sum(client.gather(client.map(lambda x: x + 1, range(20)))) == 210


def test_a_worker_process_that_dies_is_replaced():
    with LocalCluster(n_workers=2, threads_per_worker=1, worker_class="process",
                      memory_limit="400MB") as cluster, Client(cluster) as client:
        victim = cluster.workers[1]
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (cluster.workers.get(1) not in (None, victim)
                   and cluster.workers[1].status == "running"):
            assert time.monotonic() < deadline, cluster.get_logs()["Cluster"]
            time.sleep(0.05)
        assert cluster.workers[1].pid != victim.pid
        assert sorted(cluster.worker_spec) == [0, 1]
        client.wait_for_workers(2, timeout=20)
        assert sum(client.gather(client.map(lambda x: x * 2, range(10)))) == 90
        logs = cluster.get_logs()
        assert any("exited unexpectedly" in line for line in logs["Cluster"])
        # Each source has its own buffer: the in-process scheduler's too (records at the
        # scheduler logger's level and above).
        assert {"Cluster", "Scheduler", "0", "1"} <= set(logs)
