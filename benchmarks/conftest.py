"""Shared fixtures for benchmarks: peer processes and same-run baselines.

Every benchmark records its same-run baseline and the ratio in
`benchmark.extra_info`; `python benchmarks/compare.py` prints them as a table.
Targets are reported, not asserted: this machine is shared and noisy.
"""
import contextlib
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = os.environ.get("TASKCORE_BENCH_QUICK", "") not in ("", "0")


@contextlib.contextmanager
def peer(*args):
    """Start `_servers.py ARGS` in a subprocess; yield its port; kill it by PID."""
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_servers.py"), *map(str, args)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark peer {args} failed to start")
        yield int(line)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def quick():
    return QUICK


@pytest.fixture(scope="session")
def ours():
    """taskcore LocalCluster(2 workers x 1 thread, processes) and a client on it."""
    from taskcore import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    # Not dask's default scheduler: dask.distributed's nannies pickle dask's config.
    client = Client(cluster, set_as_default=False)
    client.wait_for_workers(2, timeout=60)
    yield client
    client.close()
    cluster.close()


@contextlib.contextmanager
def dask_cluster():
    """The baseline: dask.distributed's LocalCluster(2 workers x 1 thread, processes), and a
    client on it. Its scheduler and client run in this process, like ours: an idle one
    still costs the other ~100 us per latency-bound round trip here (GIL and wakeups), so
    each side is measured while the other's cluster is closed (ours, idle, runs its
    scheduler and workers in other processes) instead of keeping both up all session."""
    distributed = pytest.importorskip("distributed", reason="pip install '.[bench]' for dask")
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture
def dask_client():
    with dask_cluster() as client:
        yield client


def pytest_sessionstart(session):
    from taskcore.testing import stale_extensions

    stale = stale_extensions()
    if stale:
        import pytest

        pytest.exit(f"compiled modules are older than their sources {stale}: rebuild with "
                    "`scripts/build.sh` (scripts/test.sh does)", returncode=2)
