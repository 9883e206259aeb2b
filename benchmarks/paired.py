"""Paired wall-time comparison of two source trees of taskcore (before/after a change).

Wall-clock figures on this shared 2-core machine swing by +-30%, so two runs made
minutes apart cannot tell a 5% change. Here both versions run at once: one
LocalCluster (2 workers x 1 thread) and one client per source tree, each in its
own process, and blocks of each workload alternate between them (which one goes
first alternates too), so both see the same spells. It prints, per workload,
the median of the after/before time ratios with its quartiles. Run it with the
same tree on both sides first to see the harness's own bias (an A/A control).

    python benchmarks/paired.py /path/to/old/src                   # old vs this tree
    python benchmarks/paired.py OLD_SRC NEW_SRC --rounds 80 --workloads roundtrip

Each tree must be built (its compiled modules next to their sources); a copy of
the repository at the older commit, built with scripts/build.sh, will do.
Not part of the pytest suite: it takes minutes and compares code, not systems.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

from workloads import chain, map_tasks, roundtrips, tree_reduction

HERE = os.path.dirname(os.path.abspath(__file__))


# One block of each workload (its size keeps a block around 50-100 ms).
WORKLOADS = {"roundtrip": (roundtrips, 200), "chain": (chain, 300), "map": (map_tasks, 5000),
             "tree": (tree_reduction, 2048)}


def serve():
    """One side: a cluster and a client; runs one block per workload name read on
    stdin and prints its wall time."""
    from taskcore import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster) as c:
        for fn, n in WORKLOADS.values():
            fn(c, n)                                   # warm up: inline prefixes measured
        print("ready", flush=True)
        for line in sys.stdin:
            fn, n = WORKLOADS[line.strip()]
            t0 = time.perf_counter()
            fn(c, n)
            print(time.perf_counter() - t0, flush=True)


class Side:
    def __init__(self, src):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd="/")
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            sys.exit(f"the side on {src} did not start (it said {line!r})")

    def run(self, workload):
        self.proc.stdin.write(workload + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)


def main():
    if sys.argv[1:] == ["--serve"]:
        return serve()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="the src/ folder of the version to compare against")
    ap.add_argument("new", nargs="?", default=os.path.join(os.path.dirname(HERE), "src"),
                    help="the src/ folder of the version under test (default: this tree)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    args = ap.parse_args()
    kinds = args.workloads.split(",")
    unknown = sorted(set(kinds) - set(WORKLOADS))
    if unknown:
        ap.error(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    old, new = Side(args.old), Side(args.new)
    ratios = {k: [] for k in kinds}
    try:
        for r in range(args.rounds):
            for k in kinds:
                if r % 2:
                    t_new, t_old = new.run(k), old.run(k)
                else:
                    t_old, t_new = old.run(k), new.run(k)
                ratios[k].append(t_new / t_old)
    finally:
        old.close()
        new.close()
    for k, rs in ratios.items():
        rs.sort()
        q1, q3 = rs[len(rs) // 4], rs[3 * len(rs) // 4]
        print(f"{k}: new/old time, median {statistics.median(rs):.3f} "
              f"(quartiles {q1:.3f}..{q3:.3f}, {len(rs)} pairs)")


if __name__ == "__main__":
    main()
