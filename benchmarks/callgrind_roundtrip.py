"""Instructions per submit -> result round trip, in each process (valgrind callgrind).

Wall-clock round trips on this shared 2-core machine swing by +-30% between runs,
which hides a 5% change. Instruction counts repeat within ~1%, so this is how a
change to the round trip's hot path is judged (docs/benchmarks.md: profile
first). It starts a scheduler, one worker and a sync client, each under
`valgrind --tool=callgrind`, warms up, zeroes the counters, runs N sequential
`submit(inc, i).result()` and dumps; then prints instructions per round trip for
every thread that did any work.

    python benchmarks/callgrind_roundtrip.py [N]        # N defaults to 1000
    python benchmarks/callgrind_roundtrip.py 1000 --keep DIR   # keep the profiles
                                                     # (callgrind_annotate them)
    python benchmarks/callgrind_roundtrip.py 20000 --workload map    # per task of a map
    python benchmarks/callgrind_roundtrip.py 2000 --workload chain   # per task of a chain

`--workload map` (one `client.map` of N tiny tasks, gathered) and `--workload
chain` (N tasks, each depending on the previous one) count instructions per
task of those benchmarks the same way.

Needs valgrind (`apt-get install valgrind`). Not part of the pytest suite: it
takes ~30 s and measures instructions, not time.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

# Under valgrind every task looks slow, so the worker would send even `inc` to a
# thread; force the inline path a real worker takes for tiny tasks.
WORKER = """
import sys
import taskcore.worker as w
init = w.Worker.__init__
def patched(self, *a, **k):
    k["inline_threshold"] = 10.0
    init(self, *a, **k)
w.Worker.__init__ = patched
from taskcore.cli.worker import main
sys.exit(main())
"""

# Releases go out on a 20 ms timer: once per ~100 round trips at full speed, but
# valgrind slows everything ~50x, which would put a release in nearly every round
# trip. Scale the delay the same way.
CLIENT = """
import subprocess, sys, time
from taskcore import Client
Client.RELEASE_DELAY = 1.0
def inc(x):
    return x + 1
n = int(sys.argv[2])
c = Client(scheduler_file=sys.argv[1], timeout=120)
c.wait_for_workers(1, timeout=300)
def roundtrip(n):
    for i in range(n):
        c.submit(inc, i, pure=False).result()
def map_(n):
    assert c.gather(c.map(inc, range(n), pure=False))[-1] == n
def chain(n):
    x = c.submit(inc, 0, pure=False)
    for _ in range(n - 1):
        x = c.submit(inc, x, pure=False)
    assert x.result() == n
work = {"roundtrip": roundtrip, "map": map_, "chain": chain}[sys.argv[3]]
work(300)
time.sleep(0.5)
subprocess.run(["callgrind_control", "-z"], stdout=subprocess.DEVNULL, check=True)
work(n)
subprocess.run(["callgrind_control", "-d"], stdout=subprocess.DEVNULL, check=True)
c.close()
"""


def total_instructions(path):
    """The `summary:` (or `totals:`) line of a callgrind output file."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="?", type=int, default=1000)
    ap.add_argument("--keep", help="directory to keep the callgrind profiles in")
    ap.add_argument("--workload", choices=("roundtrip", "map", "chain"), default="roundtrip")
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    out = args.keep or tempfile.mkdtemp(prefix="callgrind-rt-")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    vg = ["valgrind", "--tool=callgrind", "--separate-threads=yes"]
    sfile = os.path.join(out, "scheduler.json")
    procs = []
    try:
        procs.append(subprocess.Popen(
            vg + [f"--callgrind-out-file={out}/scheduler.%p", sys.executable, "-m",
                  "taskcore.cli.scheduler", "--port", "0", "--scheduler-file", sfile,
                  "--no-dashboard"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 300
        while not os.path.exists(sfile):
            if time.monotonic() > deadline:
                sys.exit("the scheduler did not start under valgrind")
            time.sleep(0.5)
        procs.append(subprocess.Popen(
            vg + [f"--callgrind-out-file={out}/worker.%p", sys.executable, "-c", WORKER,
                  "--scheduler-file", sfile, "--nthreads", "1", "--no-nanny"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        subprocess.run(vg + [f"--callgrind-out-file={out}/client.%p", sys.executable, "-c",
                             CLIENT, sfile, str(args.n), args.workload],
                       env=env, check=True, stderr=subprocess.DEVNULL)
    finally:
        for p in reversed(procs):          # ours only, by PID: worker, then scheduler
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    # Dumps of the measured window are the "<role>.<pid>.1-<thread>" files.
    per_rt = {}
    for path in sorted(glob.glob(os.path.join(out, "*.*.1-*"))):
        role, _, thread = re.match(r"(\w+)\.(\d+)\.1-(\d+)$", os.path.basename(path)).groups()
        n = total_instructions(path) // args.n
        if n > 500:
            per_rt[f"{role} thread {int(thread)}"] = n
    per_rt["total"] = sum(per_rt.values())
    print(json.dumps(per_rt, indent=1))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
