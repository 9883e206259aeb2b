"""Chaos: a 50,000-task graph with dependencies while workers are SIGKILLed at random.

A LocalCluster of four nanny-supervised worker processes (the scheduler in its own
process) runs a layered graph: 24,000 leaves, 23,999 tasks that each combine two
neighbouring leaves, and 2,400 sums of ten of those (50,399 tasks). It is submitted
block by block, so it runs roughly in order, and the client checks every result
against the same computation done here as it arrives, then releases it, like a
streaming consumer. All the while a background thread SIGKILLs a random worker
process every 0.5-1.5 s (about 20 kills); the nannies restart them.

What this pins down:
- results lost with a killed worker are recomputed (their released inputs too),
  tasks running on it are rescheduled, and no result is wrong, missing or reported
  twice;
- the graph completes *while* workers keep dying (the killer only stops when the
  last result has been checked);
- no task errs: `allowed_failures` is set above the most kills there can be, so no
  task can legitimately become KilledWorker (a kill adds at most one suspicion to a
  task);
- the cluster heals: every nanny runs a fresh worker, the scheduler knows exactly
  those, and once the futures are released it holds no tasks.

Only worker processes are killed (never the scheduler, never a nanny), and only once
they have lived `MIN_AGE` s. The nannies are told that a death after 0.5 s is not a
"rapid failure": their crash-loop give-up rule is not what this test is about.
The seed of the kill schedule is TASKCORE_CHAOS_SEED (default 16).
"""
import os
import random
import signal
import sys
import threading
import time

import cloudpickle
import psutil
import pytest

from taskcore import Client, LocalCluster, as_completed
from taskcore.testing import wait_until

# Worker processes cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(180)

N_WORKERS = 4
N_LEAVES = 24_000
FANIN = 10
BLOCK = 1_000               # leaves submitted per block (with what they complete)
TASK_SECONDS = 0.001        # leaves and pairs sleep this long: ~15 s of work undisturbed
KILL_INTERVAL = (0.5, 1.5)  # seconds between kills, uniformly drawn
MIN_AGE = 1.0               # only kill worker processes older than this
MAX_KILLS = 60              # a safety bound; ~20 happen
ALLOWED_FAILURES = 1_000    # > MAX_KILLS: no task can be legitimately KilledWorker
COMPUTE_TIMEOUT = 70        # s, the whole graph under chaos (~25 s)


def leaf(i, delay):
    time.sleep(delay)
    return (i * 7919) % 10007


def pair(a, b, delay):
    time.sleep(delay)
    return a * 3 + b


def total(xs):
    return sum(xs)


def build_graph(c):
    """Submit the graph block by block: BLOCK leaves, then the pairs they complete, then
    the sums of FANIN pairs those complete. Submission order is priority order, so the
    graph runs roughly block after block and only a frontier of results is held at once,
    as in a streaming pipeline. Returns (futures in submission order, {key: expected}).
    """
    leaves = [(i * 7919) % 10007 for i in range(N_LEAVES)]
    pairs = [leaves[i] * 3 + leaves[i + 1] for i in range(N_LEAVES - 1)]
    sums = [sum(pairs[i:i + FANIN]) for i in range(0, len(pairs), FANIN)]
    expected = {}
    futures = []
    delay = [TASK_SECONDS] * BLOCK

    def submit(func, argss, keys, values):
        fs = c.map(func, *argss, key=keys)
        futures.extend(fs)
        expected.update(zip(keys, values))
        return fs

    leaf_f, pair_f, sum_f = [], [], []
    for lo in range(0, N_LEAVES, BLOCK):
        hi = min(lo + BLOCK, N_LEAVES)
        leaf_f += submit(leaf, [range(lo, hi), delay[:hi - lo]],
                         [f"leaf-{i}" for i in range(lo, hi)], leaves[lo:hi])
        # the pairs whose two leaves exist now
        plo, phi = len(pair_f), len(leaf_f) - 1
        pair_f += submit(pair, [leaf_f[plo:phi], leaf_f[plo + 1:phi + 1], delay[:phi - plo]],
                         [f"pair-{i}" for i in range(plo, phi)], pairs[plo:phi])
        # the sums whose FANIN pairs (fewer for the last one) exist now
        slo = len(sum_f)
        shi = len(sums) if hi == N_LEAVES else len(pair_f) // FANIN
        sum_f += submit(total, [[pair_f[i * FANIN:(i + 1) * FANIN] for i in range(slo, shi)]],
                        [f"sum-{i}" for i in range(slo, shi)], sums[slo:shi])
    assert len(pair_f) == N_LEAVES - 1 and len(sum_f) == len(sums)
    return futures, expected


class Killer(threading.Thread):
    """SIGKILLs a random worker process of `cluster` every KILL_INTERVAL s until stopped."""

    def __init__(self, cluster, seed):
        super().__init__(name="chaos-killer", daemon=True)
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.kills = []                 # (monotonic time, pid)
        self.error = None
        self.scheduler_pid = cluster.scheduler.pid

    def victims(self):
        me = psutil.Process()
        ours = {p.pid for p in me.children(recursive=True)}
        out = []
        for nanny in list(self.cluster.workers.values()):
            pid = nanny.worker_pid
            if pid is None or pid == self.scheduler_pid or pid not in ours:
                continue
            try:
                p = psutil.Process(pid)
                if (time.time() - p.create_time() >= MIN_AGE
                        and "taskcore.cli.worker" in " ".join(p.cmdline())):
                    out.append(pid)
            except psutil.Error:
                continue
        return out

    def run(self):
        try:
            while not self.stop_event.wait(self.rng.uniform(*KILL_INTERVAL)):
                if len(self.kills) >= MAX_KILLS:
                    return
                pids = self.victims()
                if not pids:
                    continue
                pid = self.rng.choice(sorted(pids))
                assert pid != self.scheduler_pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills.append((time.monotonic(), pid))
        except BaseException as e:  # surfaced by the test
            self.error = e

    def stop(self):
        self.stop_event.set()
        self.join(10)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def test_50k_task_graph_survives_random_worker_sigkills(capsys):
    t0 = time.monotonic()
    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, dashboard_address=None,
                      memory_limit="2GiB", scheduler_kwargs={"allowed_failures": ALLOWED_FAILURES},
                      rapid_failure_seconds=0.5) as cluster, \
            Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(N_WORKERS, timeout=30)
        assert c.run_on_scheduler(
            lambda scheduler: scheduler.state.allowed_failures) == ALLOWED_FAILURES
        first_pids = {n.worker_pid for n in cluster.workers.values()}

        killer = Killer(cluster, seed=int(os.environ.get("TASKCORE_CHAOS_SEED", "16")))
        killer.start()
        checked = {}
        try:
            futures, expected = build_graph(c)
            n_tasks = len(futures)
            assert n_tasks == len(expected) >= 50_000
            t_submit = time.monotonic() - t0
            # Check every result as it arrives, then let it go (as a streaming consumer
            # would): the scheduler keeps what dependents still need, and recomputes it
            # when a kill loses it.
            ac = as_completed(futures)
            del futures
            deadline = time.monotonic() + COMPUTE_TIMEOUT
            slowest = 0.0
            while not ac.is_empty():
                batch = wait_until(lambda: ac.next_batch(block=False),
                                   timeout=max(deadline - time.monotonic(), 0.1),
                                   message=f"more results under chaos ({len(checked)} of "
                                           f"{n_tasks} checked, {len(killer.kills)} kills)")
                t = time.monotonic()
                values = c.gather(batch)
                slowest = max(slowest, time.monotonic() - t)
                for f, v in zip(batch, values):
                    assert f.key not in checked, f"{f.key} completed twice"
                    checked[f.key] = v
                del batch, values
        finally:
            killer.stop()
        t_compute = time.monotonic() - t0
        kills = len(killer.kills)

        # Every result, right.
        assert len(checked) == n_tasks
        wrong = sorted(k for k, v in checked.items() if expected[k] != v)
        assert not wrong, f"{len(wrong)} wrong results, e.g. {wrong[:5]}"

        # Chaos really happened, and while the graph was running.
        assert kills >= 8, f"only {kills} kills: the graph finished before chaos could matter"
        assert kills < ALLOWED_FAILURES
        assert {pid for _, pid in killer.kills} & first_pids

        # The cluster heals: no killed process is left, every nanny runs a new worker, and
        # those are the workers the scheduler knows.
        killed = {pid for _, pid in killer.kills}

        def state():
            live = {n.worker_address for n in cluster.workers.values()
                    if n.worker_pid is not None and n.worker_pid not in killed}
            return live, set(c.scheduler_info()["workers"])

        def running(pid):
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        def healed():
            live, known = state()
            return (len(live) == N_WORKERS and live == known
                    and not any(running(p) for p in killed))

        try:
            wait_until(healed, timeout=30, message=f"{N_WORKERS} new workers after the kills")
        except AssertionError as e:
            nannies = [(n.status.value, n.worker_pid, n.restarts, n.deaths[-2:])
                       for n in cluster.workers.values()]
            raise AssertionError(
                f"{e}: nannies' and scheduler's workers {state()}; nannies (status, worker "
                f"pid, restarts, last deaths): {nannies}") from None
        n_restarts = sum(n.restarts for n in cluster.workers.values())
        # ... and once the last future is released, the scheduler forgets every task.
        del ac, f
        wait_until(lambda: c.run_on_scheduler(lambda scheduler: len(scheduler.state.tasks)) == 0,
                   timeout=20, message="the scheduler to forget every released task")

    with capsys.disabled():
        print(f"\nchaos: {n_tasks} tasks, {kills} worker SIGKILLs, {n_restarts} nanny restarts; "
              f"submitted in {t_submit:.1f} s, all checked after {t_compute:.1f} s "
              f"(cluster start included); slowest gather {slowest:.1f} s")
    # A fetch from a just-killed peer fails at once (a refused connection means gone),
    # so no result waits out a connection timeout (it was 9-12 s here).
    assert slowest < 5, f"a gather took {slowest:.1f} s"
