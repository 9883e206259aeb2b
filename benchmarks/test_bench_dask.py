"""A dask.array workload through taskcore, with same-run baselines.

    x = dask.array.random.random((8000, 8000), chunks=(500, 500))
    (x + x.T).mean(axis=0).sum()

| computed on                           | baseline                             | target         |
|---------------------------------------|--------------------------------------|----------------|
| taskcore, LocalCluster(2 workers x 1) | dask.distributed LocalCluster(2, 1)  | >= 3x faster   |
| taskcore, LocalCluster(2 workers x 1) | dask threaded scheduler, 2 threads   | <= 1.3x slower |

The array is the issue's full 8000 x 8000 in quick mode too (the figures in the
README are this workload's); quick mode only runs fewer rounds. Each side's best
round is compared; the ratios are stored in `benchmark.extra_info`.
"""
import time

import pytest

from conftest import QUICK, dask_cluster

dask = pytest.importorskip("dask", reason="pip install '.[bench]' for dask")
da = pytest.importorskip("dask.array")

N = 8000
CHUNK = 500


def workload():
    x = da.random.random((N, N), chunks=(CHUNK, CHUNK))
    return (x + x.T).mean(axis=0).sum()


def _best(fn, rounds):
    best = float("inf")
    value = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def test_dask_array_reduction(benchmark, ours):
    # One collection (its random seeds are drawn when it is built), computed by all three;
    # each compute builds, optimizes and submits its graph again.
    y = workload()
    expected = float(y.compute(scheduler="threads", num_workers=2))   # also warms numpy up

    def run_ours():
        return ours.compute(y, sync=True)

    def run_threads():
        return y.compute(scheduler="threads", num_workers=2)

    rounds = 3 if QUICK else 4
    values = {}
    # dask.distributed first, then its cluster is closed: its scheduler and client
    # run in this process and would slow ours down while idle (see conftest).
    with dask_cluster() as dask_client:
        dask_client.compute(y, sync=True)                 # warm up its workers
        t_dist, values["distributed"] = _best(lambda: dask_client.compute(y, sync=True),
                                              rounds - 1)
    run_ours()                      # warm up the workers (imports, first allocations)
    # Our rounds interleave with the threaded baseline's (it runs in pedantic's untimed
    # setup before each of our rounds), so a slow spell of this shared machine hits both
    # alike; each side's best round is compared.
    times = []

    def baseline():
        t, values["threads"] = _best(run_threads, 1)
        times.append(t)

    values["ours"] = benchmark.pedantic(run_ours, setup=baseline, rounds=rounds, iterations=1)
    t_ours = benchmark.stats.stats.min
    t_threads = min(times)
    for v in values.values():
        assert v == pytest.approx(expected)
    benchmark.extra_info.update(
        array=f"{N}x{N}", chunks=CHUNK,
        ours_s=t_ours, distributed_s=t_dist, threads_s=t_threads,
        speedup_vs_distributed=t_dist / t_ours,
        ratio=t_dist / t_ours, baseline="dask.distributed LocalCluster(2, 1)",
        target="ratio >= 3; ours/threads <= 1.3",
        ours_over_threads=t_ours / t_threads,
    )
