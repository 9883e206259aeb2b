"""A tour of taskcore on this machine: `python -m taskcore.demo [--quick]`.

Starts a LocalCluster sized to the machine and runs three workloads, each
with live progress bars (in a terminal):

1. 100,000 tiny tasks through `client.map`, submitted in batches;
2. a dask.array reduction, `(x + x.T).mean(axis=0).sum()` on random data;
3. a dask.dataframe groupby-aggregation on a generated time series.

For each it prints tasks per second and where the wall time went (client-side
graph work, submission, computing on the cluster, gathering the result), then
shuts the cluster down. `--quick` shrinks every size (for CI: well under 30 s).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def inc(x):
    return x + 1


def _fmt_rate(n, seconds):
    return f"{n / seconds:,.0f} tasks/s" if seconds > 0 else "n/a"


class Report:
    def __init__(self, out):
        self.out = out
        self.rows = []

    def line(self, text=""):
        print(text, file=self.out, flush=True)

    def phase(self, name, ntasks, parts):
        total = sum(parts.values())
        detail = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
        self.line(f"  {ntasks:,} tasks in {total:.2f} s = {_fmt_rate(ntasks, total)}  ({detail})")
        self.rows.append((name, ntasks, total, parts))

    def summary(self):
        self.line()
        self.line("Where the time went")
        width = max(len(r[0]) for r in self.rows)
        for name, ntasks, total, parts in self.rows:
            biggest = max(parts, key=parts.get)
            share = 100 * parts[biggest] / total if total else 0
            self.line(f"  {name.ljust(width)}  {total:6.2f} s  {_fmt_rate(ntasks, total):>18}"
                      f"   mostly {biggest} ({share:.0f}%)")
        n = sum(r[1] for r in self.rows)
        t = sum(r[2] for r in self.rows)
        self.line(f"  {'all'.ljust(width)}  {t:6.2f} s  {_fmt_rate(n, t):>18}")


def run_map(client, report, n, batch, show_progress):
    from taskcore import progress, wait

    report.line(f"\n1. {n:,} tiny tasks through client.map (batches of {batch:,})")
    t0 = time.perf_counter()
    futures = []
    for start in range(0, n, batch):
        futures.extend(client.map(inc, range(start, min(n, start + batch))))
    t1 = time.perf_counter()
    if show_progress:
        progress(futures)
    else:
        wait(futures)
    t2 = time.perf_counter()
    total = sum(client.gather(futures))
    t3 = time.perf_counter()
    expected = n * (n - 1) // 2 + n
    if total != expected:
        raise SystemExit(f"map: wrong result {total} != {expected}")
    report.phase("client.map", n, {"submit": t1 - t0, "compute": t2 - t1, "gather": t3 - t2})
    del futures


def _run_collection(client, report, name, collection, show_progress, check):
    from taskcore import progress, wait
    from taskcore.dask_integration import last_timings

    t0 = time.perf_counter()
    future = client.compute(collection)
    t1 = time.perf_counter()
    timings = last_timings()
    if show_progress:
        progress(future)           # bars for every prefix of the graph, not just the result
    else:
        wait(future)
    t2 = time.perf_counter()
    result = future.result()
    t3 = time.perf_counter()
    check(result)
    ntasks = timings.get("tasks", 0)
    graph = timings.get("graph", 0.0)
    report.phase(name, ntasks, {"dask graph": graph, "submit": max(0.0, (t1 - t0) - graph),
                                "compute": t2 - t1, "gather": t3 - t2})
    return result


def run_array(client, report, n, chunk, show_progress):
    import dask.array as da

    report.line(f"\n2. dask.array: (x + x.T).mean(axis=0).sum() with x {n:,} x {n:,} "
                f"random, chunks {chunk:,}")
    x = da.random.random((n, n), chunks=(chunk, chunk))
    y = (x + x.T).mean(axis=0).sum()

    def check(v):
        # Every column mean of x + x.T is about 1, so the sum is about n.
        if not abs(float(v) - n) < 0.05 * n:
            raise SystemExit(f"array: implausible result {v}")

    _run_collection(client, report, "dask.array", y, show_progress, check)


def run_dataframe(client, report, days, freq, show_progress):
    import dask
    import dask.dataframe  # noqa: F401  (registers the dataframe backend)

    report.line(f"\n3. dask.dataframe: groupby('name').agg(...) over {days} days of "
                f"{freq} time series")
    end = f"2000-01-{1 + days:02d}"
    df = dask.datasets.timeseries(start="2000-01-01", end=end, freq=freq, partition_freq="1D",
                                  seed=42)
    agg = df.groupby("name").agg({"x": "mean", "y": "max", "id": "count"})

    def check(v):
        if len(v) < 10 or not (v["x"].abs() < 0.2).all():
            raise SystemExit(f"dataframe: implausible result\n{v}")

    result = _run_collection(client, report, "dask.dataframe", agg, show_progress, check)
    report.line(f"  {len(result)} groups, {int(result['id'].sum()):,} rows")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m taskcore.demo", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker")
    parser.add_argument("--tasks", type=int, default=None, help="tiny tasks for client.map")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    try:
        import dask  # noqa: F401
        import pandas  # noqa: F401
    except ImportError:
        print('the demo needs dask: pip install "taskcore[dask]"', file=sys.stderr)
        return 2

    from taskcore import Client, LocalCluster

    quick = args.quick
    n_tasks = args.tasks or (20_000 if quick else 100_000)
    batch = 10_000 if quick else 25_000
    array_n, chunk = (2_000, 250) if quick else (8_000, 500)
    days, freq = (3, "10s") if quick else (30, "1s")
    show = not args.no_progress

    report = Report(sys.stdout)
    t_start = time.perf_counter()
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads) as cluster, \
            Client(cluster) as client:
        info = client.nthreads()
        report.line(f"taskcore demo{' (quick)' if quick else ''}: LocalCluster with "
                    f"{len(info)} workers x {max(info.values(), default=0)} threads on "
                    f"{os.cpu_count()} cores, scheduler {cluster.scheduler_address}")
        report.line(f"  started in {time.perf_counter() - t_start:.2f} s")
        run_map(client, report, n_tasks, batch, show)
        run_array(client, report, array_n, chunk, show)
        run_dataframe(client, report, days, freq, show)
        report.summary()
        t_close = time.perf_counter()
    report.line(f"\nCluster shut down in {time.perf_counter() - t_close:.2f} s; "
                f"demo took {time.perf_counter() - t_start:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
