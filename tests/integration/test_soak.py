"""Soak: minutes of batches on one cluster, memory flat and no task state left behind.

For TASKCORE_SOAK_SECONDS (default 120) a client runs batch after batch on a
LocalCluster (scheduler and two workers, each its own process), rotating through:
- map / gather / release of 2,000 tiny tasks;
- 1 MB numpy arrays made on the workers, moved between them, reduced, released;
- scatter, compute on the scattered data, release;
- a dask.array reduction, a dask.dataframe groupby and a dask.bag fold (each checked
  against numpy / pandas / Python here).
Every result is checked. After each batch the client lets go of everything, and the
scheduler must come back to no tasks and the workers to no stored results. After each
batch the resident memory (RSS) of the scheduler and of every worker is sampled (psutil,
inside those processes, through run_on_scheduler / run).

Memory must be flat: samples of the first WARMUP_FRACTION of the run are dropped; of the
rest, the median of the last third may exceed the median of the first third by at most
`margin` (a few MiB plus a few percent; see the constants). A leak of a few kB per task
or per batch, or of a few MB per minute, fails it.

Bounded buffers are made small so that they fill during the warm-up and their filling
is not taken for growth: the scheduler's task stream keeps 5,000 records (default
100,000, ~20-30 MB once full).
"""
import os
import statistics
import sys
import time

import cloudpickle
import pytest

from taskcore import Client, LocalCluster
from taskcore.testing import import_required, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SOAK_SECONDS = float(os.environ.get("TASKCORE_SOAK_SECONDS", "120"))
WARMUP_FRACTION = 0.25
SCHEDULER_MARGIN = (6 * 2**20, 0.05)    # bytes, fraction of the first third's median
WORKER_MARGIN = (10 * 2**20, 0.05)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SOAK_SECONDS + 240)]

np = import_required("numpy")


def inc(x):
    return x + 1


def make_array(i, n=131_072):              # 1 MiB of float64
    import numpy

    return numpy.full(n, float(i))


def array_sum(a, b):
    return float(a.sum() + b.sum())


def total(xs):
    return sum(xs)


def scheduler_probe(scheduler):
    import psutil

    return {"rss": psutil.Process().memory_info().rss, "tasks": len(scheduler.state.tasks),
            "clients": len(scheduler.state.clients)}


def worker_probe(dask_worker):
    import psutil

    return {"rss": psutil.Process().memory_info().rss, "data": len(dask_worker.data),
            "tasks": len(dask_worker.state)}


# --------------------------------------------------------------------------------- batches

def batch_map(c, k):
    fs = c.map(inc, range(k * 2000, (k + 1) * 2000), pure=False)
    assert c.gather(fs) == list(range(k * 2000 + 1, (k + 1) * 2000 + 1))
    s = c.submit(total, fs, pure=False)
    assert s.result() == sum(range(k * 2000 + 1, (k + 1) * 2000 + 1))


def batch_arrays(c, k):
    arrays = c.map(make_array, range(40), pure=False)           # 40 MiB, on both workers
    pairs = [c.submit(array_sum, arrays[i], arrays[39 - i], pure=False) for i in range(40)]
    got = c.gather(pairs)
    assert got == [131_072.0 * 39] * 40
    mid = c.gather(arrays[20])
    assert mid.shape == (131_072,) and mid[0] == 20.0


def batch_scatter(c, k):
    data = [np.full(65_536, float(k + i)) for i in range(8)]   # 512 kB each
    fs = c.scatter(data, hash=False)
    sums = c.map(lambda a: float(a.sum()), fs, pure=False)
    assert c.gather(sums) == [65_536.0 * (k + i) for i in range(8)]


def batch_dask_array(c, k):
    da = import_required("dask.array", "the [dask] extra")
    rs = da.random.RandomState(k)
    x = rs.random_sample((1200, 1200), chunks=(200, 200))
    y = (x + x.T).mean(axis=0).sum()
    xs = x.compute(scheduler="sync")                             # numpy, here
    got = c.compute(y).result()
    np.testing.assert_allclose(got, (xs + xs.T).mean(axis=0).sum())


def batch_dask_dataframe(c, k):
    pd = import_required("pandas", "the [dask] extra")
    dd = import_required("dask.dataframe", "the [dask] extra")
    rng = np.random.default_rng(k)
    df = pd.DataFrame({"g": rng.integers(0, 20, 20_000), "v": rng.normal(size=20_000)})
    ddf = dd.from_pandas(df, npartitions=8)
    got = c.compute(ddf.groupby("g").v.sum()).result().sort_index()
    want = df.groupby("g").v.sum().sort_index()
    pd.testing.assert_series_equal(got, want, check_names=False)


def batch_dask_bag(c, k):
    db = import_required("dask.bag", "the [dask] extra")
    b = db.from_sequence(range(k, k + 5000), npartitions=10)
    got = c.compute(b.map(lambda x: x * 3).filter(lambda x: x % 2 == 0).sum()).result()
    assert got == sum(x * 3 for x in range(k, k + 5000) if (x * 3) % 2 == 0)


BATCHES = [batch_map, batch_arrays, batch_scatter, batch_dask_array, batch_map,
           batch_dask_dataframe, batch_arrays, batch_dask_bag]


# ----------------------------------------------------------------------------------- test

def _flat(name, samples, margin):
    """Median of the last third after warm-up within `margin` of the first third's."""
    kept = samples[int(len(samples) * WARMUP_FRACTION):]
    third = max(1, len(kept) // 3)
    first, last = statistics.median(kept[:third]), statistics.median(kept[-third:])
    allowed = first + margin[0] + margin[1] * first
    mib = [round(s / 2**20, 1) for s in samples[::max(1, len(samples) // 12)]]
    assert last <= allowed, (
        f"{name} memory grew: median RSS {first / 2**20:.1f} MiB in the first third after "
        f"warm-up, {last / 2**20:.1f} MiB in the last (allowed {allowed / 2**20:.1f}); "
        f"samples over the run (MiB): {mib}")
    return first, last


def test_soak_memory_flat_and_no_state_left(capsys):
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None,
                      memory_limit="4GiB", scheduler_kwargs={"task_stream_length": 5000}) as cl, \
            Client(cl, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=30)
        workers = sorted(c.scheduler_info()["workers"])
        sched_rss, worker_rss = [], {w: [] for w in workers}
        counts = {}
        t0 = time.monotonic()
        k = 0
        while time.monotonic() - t0 < SOAK_SECONDS:
            batch = BATCHES[k % len(BATCHES)]
            batch(c, k)
            counts[batch.__name__] = counts.get(batch.__name__, 0) + 1
            # Everything was let go of (the batch's futures died with its frame): nothing
            # may stay behind on the scheduler or on the workers.
            wait_until(lambda: c.run_on_scheduler(scheduler_probe)["tasks"] == 0, timeout=10,
                       message=f"the scheduler to forget batch {k} ({batch.__name__})")
            wait_until(lambda: all(p["data"] == 0 and p["tasks"] == 0
                                   for p in c.run(worker_probe).values()),
                       timeout=10, message=f"the workers to drop batch {k}'s data and tasks")
            sched_rss.append(c.run_on_scheduler(scheduler_probe)["rss"])
            probes = c.run(worker_probe)
            assert sorted(probes) == workers, "a worker was replaced during the soak"
            for w, p in probes.items():
                worker_rss[w].append(p["rss"])
            k += 1
        elapsed = time.monotonic() - t0
        assert k >= 3 * len(BATCHES) or SOAK_SECONDS < 60, f"only {k} batches"
        assert c.run_on_scheduler(scheduler_probe)["clients"] <= 2   # ours (+ fire-and-forget)

        lines = []
        first, last = _flat("the scheduler's", sched_rss, SCHEDULER_MARGIN)
        lines.append(f"scheduler {first / 2**20:.1f} -> {last / 2**20:.1f} MiB")
        for w in workers:
            first, last = _flat(f"worker {w}'s", worker_rss[w], WORKER_MARGIN)
            lines.append(f"worker {first / 2**20:.1f} -> {last / 2**20:.1f} MiB")
    with capsys.disabled():
        print(f"\nsoak: {k} batches in {elapsed:.0f} s ({counts}); median RSS first -> last "
              f"third after warm-up: " + ", ".join(lines))
