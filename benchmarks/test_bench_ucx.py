"""ucx:// beside tcp://: a 200 MB numpy array moved worker -> worker, same run.

| benchmark                           | baseline                               | target    |
|-------------------------------------|----------------------------------------|-----------|
| 200 MB array worker -> worker (ucx) | the same transfer over tcp://          | reported  |

Each protocol gets its own LocalCluster: a scheduler and two single-threaded workers,
each a process of its own. A round makes
a fresh array on worker a (not timed), then times a task on worker b that needs
it: the fetch plus a few milliseconds of scheduling. UCX runs on its tcp
transport (`UCX_TLS=tcp`, 1 MB segments) unless the environment says otherwise;
without a GPU or RDMA NIC it cannot beat a well-driven socket by much.
"""
import contextlib
import os
import sys
import time

import cloudpickle
import numpy as np
import pytest

from conftest import QUICK

from taskcore.testing import import_required

cloudpickle.register_pickle_by_value(sys.modules[__name__])

NBYTES = (50 if QUICK else 200) * 2**20
ROUNDS = 3 if QUICK else 5

def _make(nbytes, seed):
    return np.full(nbytes // 8, float(seed))


def _touch(x):
    return float(x[0] + x[-1]), x.nbytes


@contextlib.contextmanager
def transfer(protocol):
    """`(setup, fetch)`: setup makes a fresh array on worker a and returns fetch's args;
    fetch runs a task on worker b that needs it (the timed part)."""
    from taskcore.client import Client
    from taskcore.deploy.local import LocalCluster
    from taskcore.futures import wait

    seeds = iter(range(1, 1_000_000))
    with LocalCluster(n_workers=2, threads_per_worker=1, protocol=protocol,
                      dashboard_address=None) as cluster:
        with Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            a, b = sorted(client.scheduler_info()["workers"])

            def setup():
                seed = next(seeds)
                x = client.submit(_make, NBYTES, seed, workers=[a], pure=False)
                wait([x], timeout=120)
                return (x, seed), {}

            def fetch(x, seed):
                y = client.submit(_touch, x, workers=[b], pure=False)
                assert y.result(timeout=120) == (2.0 * seed, NBYTES)

            fetch(*setup()[0])                      # warm both ends up
            yield setup, fetch


def test_array_worker_to_worker_ucx_vs_tcp(benchmark):
    import_required("ucxx", "pip install 'taskcore[ucx]'")
    os.environ.setdefault("UCX_TLS", "tcp")         # this process's client speaks ucx:// too
    with transfer("tcp") as (setup, fetch):         # the baseline, closed before ucx runs
        times = []
        for _ in range(ROUNDS):
            args, _ = setup()
            t0 = time.perf_counter()
            fetch(*args)
            times.append(time.perf_counter() - t0)
        tcp_best = min(times)
    with transfer("ucx") as (setup, fetch):
        benchmark.pedantic(fetch, setup=setup, rounds=ROUNDS, iterations=1)
    ucx_best = benchmark.stats.stats.min
    benchmark.extra_info.update(
        ucx_gb_s=NBYTES / ucx_best / 1e9, tcp_gb_s=NBYTES / tcp_best / 1e9,
        ratio=tcp_best / ucx_best, mbytes=NBYTES / 2**20,
        baseline="the same transfer over tcp:// (own scheduler and workers)",
        target="reported")
