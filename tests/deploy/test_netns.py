"""SSHCluster across three "hosts": network namespaces with their own sshd, address and hostname.

The scheduler runs on h1 (a process in a namespace cannot reach the root
namespace's loopback, so everything talks over 10.200.0.x), workers on h1, h2
and h3. We cut h3's link in the middle of a computation, and kill h2's
worker processes; the results must still be right, and `close()` must leave
nothing running in any namespace.
"""
import os
import signal
import socket
import sys
import time

import cloudpickle

from taskcore import Client, wait
from taskcore.testing import import_required

import_required("asyncssh", "SSH tests need the [ssh] extra")

from taskcore.deploy.ssh import SSHCluster  # noqa: E402


# Workers cannot import this test module: send its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_square(x, delay=0.15):
    time.sleep(delay)
    return x * x


def test_three_hosts_survive_a_cut_link_and_killed_processes(netns_hosts, ssh_cluster_kwargs,
                                                             wait_until):
    h1, h2, h3 = netns_hosts
    cluster = SSHCluster([h1.address, h1.address, h2.address, h3.address],
                         connect_options=netns_hosts.connect_options(),
                         worker_options={"nthreads": 1, "death_timeout": 60},
                         scheduler_options={"worker_ttl": 2.0}, **ssh_cluster_kwargs)
    try:
        assert cluster.scheduler_address.startswith(f"tls://{h1.address}:")  # TLS by default
        client = Client(cluster, timeout=20)
        client.wait_for_workers(3, timeout=30)
        hostnames = client.run(socket.gethostname)
        assert sorted(hostnames.values()) == ["h1", "h2", "h3"]

        # 1. Spread: every host computes part of the work.
        futures = client.map(slow_square, range(30), delay=0.05)
        assert client.gather(futures) == [x * x for x in range(30)]
        by_host = {hostnames[w] for w, keys in client.has_what().items() if keys}
        assert by_host == {"h1", "h2", "h3"}
        del futures

        # 2. Cut h3 off in the middle of a computation.
        futures = client.map(slow_square, range(100, 160))
        wait_until(lambda: sum(f.done() for f in futures) >= 6, 20, message="some results")
        h3.cut()
        try:
            # The scheduler drops h3 after worker_ttl and recomputes what it held.
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, 20,
                       message="h3 removed by the scheduler")
            wait(futures, timeout=60)
            assert client.gather(futures) == [x * x for x in range(100, 160)]
        finally:
            h3.heal()
        del futures

        # 3. Kill h2's processes with SIGKILL mid-computation: first the worker (its nanny
        #    restarts it), then the nanny's process itself (the cluster starts a replacement
        #    on the same host, because the spec still asks for it).
        h2_handle = next(h for h in cluster.workers.values() if h.target.host == h2.address)
        futures = client.map(slow_square, range(200, 240))
        wait_until(lambda: sum(f.done() for f in futures) >= 4, 20, message="some results")
        os.kill(h2_handle.info["worker_pid"], signal.SIGKILL)
        assert client.gather(futures) == [x * x for x in range(200, 240)]
        del futures
        futures = client.map(slow_square, range(300, 340))
        wait_until(lambda: sum(f.done() for f in futures) >= 4, 20, message="some results")
        os.kill(h2_handle.pid, signal.SIGKILL)
        assert client.gather(futures) == [x * x for x in range(300, 340)]
        wait_until(lambda: any(h is not h2_handle and h.target.host == h2.address
                               and h.status == "running" for h in cluster.workers.values()),
                   30, message="a replacement worker on h2")
        client.wait_for_workers(3, timeout=30)
        assert "h2" in client.run(socket.gethostname).values()
        client.close()
    finally:
        cluster.close()
    for h in netns_hosts:
        wait_until(lambda h=h: not h.other_pids(), 15,
                   message=f"no process left in {h.name}'s namespace")
