"""Benchmarks for the worker's task-state machine (taskcore.core.worker_state).

Run: PYTHONPATH=src .venv/bin/pytest -q benchmarks/test_bench_worker_state.py --benchmark-only
Pinned (repeatable within ~3%): prefix with ``taskset -c 1``.

Each benchmark drives the machine the way the worker server does (build the
event objects, call handle_stimulus, act on the instructions) with no I/O, and
reports microseconds per task.  The same-run baseline is a plain-Python,
dict-based loop doing the minimal equivalent bookkeeping (priority heap, slots,
per-peer fetch batching, byte counts; no story, no validation, no cancellation
paths), driven by the same harness with tuples instead of event objects.
``extra_info`` holds ``us_per_task``, ``baseline_us_per_task`` and
``ratio_to_python`` (ours / baseline, best of interleaved rounds, so machine
noise mostly cancels).  Target: <= 1.5 us per independent task.
"""
import heapq
import os
import time
from collections import defaultdict

import pytest

from taskcore.core.worker_state import (
    ComputeTask,
    Execute,
    ExecuteSuccess,
    FreeKeys,
    GatherDep,
    GatherDepSuccess,
    WorkerState,
)

QUICK = os.environ.get("TASKCORE_BENCH_QUICK", "") not in ("", "0")
N = 20_000 if QUICK else 100_000
BATCH = 1_000          # ComputeTasks per handle_stimulus (one scheduler batch)
NTHREADS = 8
PEERS = [f"tcp://10.0.0.{i}:9000" for i in range(2, 10)]
SPEC = object()        # opaque run_spec
ROUNDS = 2 if QUICK else 5


# ---------------------------------------------------------------------------
# The plain-Python baseline
# ---------------------------------------------------------------------------
class PyWorker:
    """Minimal dict-based equivalent: events and instructions are tuples."""

    def __init__(self, nthreads, max_transfers=4, max_transfer_bytes=50_000_000):
        self.tasks = {}
        self.ready = []
        self.seq = 0
        self.nthreads = nthreads
        self.executing = 0
        self.memory_bytes = 0
        self.data_needed = defaultdict(list)    # peer -> [ids]
        self.in_flight = {}                      # peer -> [ids]
        self.max_transfers = max_transfers
        self.max_transfer_bytes = max_transfer_bytes

    def handle(self, events):
        out = []
        tasks = self.tasks
        for ev in events:
            kind = ev[0]
            if kind == "compute":
                _, tid, key, spec, prio, who_has = ev
                waiting = 0
                deps = []
                if who_has:
                    for dep_id, dep_key, nbytes, holders in who_has:
                        dep = tasks.get(dep_id)
                        if dep is None:
                            dep = tasks[dep_id] = {"state": "released", "key": dep_key,
                                                   "nbytes": nbytes, "dependents": set(),
                                                   "prio": prio}
                        dep["dependents"].add(tid)
                        deps.append(dep_id)
                        if dep["state"] != "memory":
                            waiting += 1
                            if dep["state"] == "released":
                                dep["state"] = "fetch"
                                for h in holders:
                                    self.data_needed[h].append(dep_id)
                ts = tasks[tid] = {"state": "waiting", "key": key, "spec": spec, "prio": prio,
                                   "deps": deps, "waiting": waiting, "dependents": set(),
                                   "nbytes": -1}
                if not waiting:
                    self._ready(tid, ts)
            elif kind == "success":
                _, tid, nbytes, typ, start, stop = ev
                ts = tasks[tid]
                self.executing -= 1
                self._memory(tid, ts, nbytes)
                out.append(("task-finished", tid, ts["key"], nbytes, typ, start, stop))
            elif kind == "gather-success":
                _, worker, data = ev
                ids = self.in_flight.pop(worker)
                for tid in ids:
                    self._memory(tid, tasks[tid], data[tid])
                out.append(("add-keys", ids))
            elif kind == "free":
                for tid in ev[1]:
                    ts = tasks.pop(tid, None)
                    if ts is not None and ts["state"] == "memory":
                        self.memory_bytes -= ts["nbytes"]
                        out.append(("drop", tid, ts["key"]))
                        out.append(("release-worker-data", tid))
        # transfers: one per peer, batched up to the message budget
        for peer in list(self.data_needed):
            if len(self.in_flight) >= self.max_transfers:
                break
            if peer in self.in_flight:
                continue
            ids, total = [], 0
            for tid in self.data_needed.pop(peer):
                ts = tasks.get(tid)
                if ts is None or ts["state"] != "fetch":
                    continue
                if total and total + ts["nbytes"] > self.max_transfer_bytes:
                    self.data_needed[peer].append(tid)
                    continue
                ts["state"] = "flight"
                ids.append(tid)
                total += ts["nbytes"]
            if ids:
                self.in_flight[peer] = ids
                out.append(("gather", peer, ids, [tasks[i]["key"] for i in ids], total))
        # execution slots
        while self.executing < self.nthreads and self.ready:
            _, _, tid = heapq.heappop(self.ready)
            ts = tasks[tid]
            ts["state"] = "executing"
            self.executing += 1
            out.append(("execute", tid, ts["key"], ts["spec"]))
        return out

    def _ready(self, tid, ts):
        ts["state"] = "ready"
        self.seq += 1
        heapq.heappush(self.ready, (ts["prio"], self.seq, tid))

    def _memory(self, tid, ts, nbytes):
        ts["state"] = "memory"
        ts["nbytes"] = nbytes
        self.memory_bytes += nbytes
        for d in ts["dependents"]:
            dt = self.tasks[d]
            if dt["state"] == "waiting":
                dt["waiting"] -= 1
                if not dt["waiting"]:
                    self._ready(d, dt)


# ---------------------------------------------------------------------------
# Harnesses: the same loop for both, as the worker server would run it
# ---------------------------------------------------------------------------
def run_independent_ours(n=N):
    ws = WorkerState(NTHREADS)
    hs = ws.handle_stimulus
    for b in range(0, n, BATCH):
        instrs = hs(*[ComputeTask(i, i, SPEC, (0, b, i), "compute") for i in range(b, b + BATCH)])
        while True:
            done = [ExecuteSuccess(i.id, 8, "int", 0.0, 1.0, "done")
                    for i in instrs if type(i) is Execute]
            if not done:
                break
            instrs = hs(*done)
    assert ws.in_memory_count == n
    return ws


def run_independent_python(n=N):
    w = PyWorker(NTHREADS)
    hs = w.handle
    for b in range(0, n, BATCH):
        instrs = hs([("compute", i, i, SPEC, (0, b, i), None) for i in range(b, b + BATCH)])
        while True:
            done = [("success", i[1], 8, "int", 0.0, 1.0) for i in instrs if i[0] == "execute"]
            if not done:
                break
            instrs = hs(done)
    assert len(w.tasks) == n
    return w


def _chain_events(b, make_compute):
    # task i depends on task i - n (computed on a peer); peers round-robin
    return [make_compute(i, N + i, 1000, PEERS[i % len(PEERS)]) for i in range(b, b + BATCH)]


def run_chain_ours(n=N):
    """Each task needs one input computed on one of 8 peers: fetch it (batched
    per peer), run the task, then the scheduler frees the fetched input."""
    ws = WorkerState(NTHREADS)
    hs = ws.handle_stimulus

    def mk(i, dep, nbytes, peer):
        return ComputeTask(i, i, SPEC, (0, i), "compute", [(dep, dep, nbytes, [peer])])

    for b in range(0, n, BATCH):
        instrs = hs(*_chain_events(b, mk))
        while instrs:
            events = []
            for i in instrs:
                t = type(i)
                if t is GatherDep:
                    events.append(GatherDepSuccess(i.worker, dict.fromkeys(i.ids, 1000), "got"))
                elif t is Execute:
                    events.append(ExecuteSuccess(i.id, 8, "int", 0.0, 1.0, "done"))
            if not events:
                break
            instrs = hs(*events)
        hs(FreeKeys(range(N + b, N + b + BATCH), "free"))
    assert ws.in_memory_count == n, ws.task_counts
    return ws


def run_chain_python(n=N):
    w = PyWorker(NTHREADS)
    hs = w.handle

    def mk(i, dep, nbytes, peer):
        return ("compute", i, i, SPEC, (0, i), [(dep, dep, nbytes, [peer])])

    for b in range(0, n, BATCH):
        instrs = hs(_chain_events(b, mk))
        while instrs:
            events = []
            for i in instrs:
                if i[0] == "gather":
                    events.append(("gather-success", i[1], dict.fromkeys(i[2], 1000)))
                elif i[0] == "execute":
                    events.append(("success", i[1], 8, "int", 0.0, 1.0))
            if not events:
                break
            instrs = hs(events)
        hs([("free", range(N + b, N + b + BATCH))])
    return w


def _best(func, rounds):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best


def _record(benchmark, ours, baseline, n=N):
    if not getattr(benchmark, "stats", None):   # --benchmark-disable
        return
    # interleave to spread machine noise evenly over both
    o = b = float("inf")
    for _ in range(ROUNDS):
        o = min(o, _best(ours, 1))
        b = min(b, _best(baseline, 1))
    benchmark.extra_info["tasks"] = n
    benchmark.extra_info["us_per_task"] = round(o / n * 1e6, 3)
    benchmark.extra_info["baseline_us_per_task"] = round(b / n * 1e6, 3)
    benchmark.extra_info["ratio_to_python"] = round(o / b, 2)


def test_independent_tasks(benchmark):
    """ComputeTask → Execute → ExecuteSuccess → TaskFinishedMsg, 100,000 tasks
    in batches of 1,000, 8 slots."""
    ws = benchmark.pedantic(run_independent_ours, rounds=ROUNDS, iterations=1)
    assert ws.memory_bytes == 8 * N
    _record(benchmark, run_independent_ours, run_independent_python)


def test_chain_with_fetched_dependencies(benchmark):
    """Each task fetches its one input from a peer (8 peers, batched), runs,
    then the input is freed: ComputeTask → GatherDep → GatherDepSuccess →
    Execute → ExecuteSuccess → FreeKeys."""
    ws = benchmark.pedantic(run_chain_ours, rounds=ROUNDS, iterations=1)
    assert ws.transfers_in_flight == 0
    _record(benchmark, run_chain_ours, run_chain_python)


def test_machine_only_independent(benchmark):
    """The machine alone: events built beforehand, so this is handle_stimulus
    and nothing else (the harness above also pays for building events)."""
    n = N
    computes = [ComputeTask(i, i, SPEC, (0, i), "compute") for i in range(n)]
    successes = [ExecuteSuccess(i, 8, "int", 0.0, 1.0, "done") for i in range(n)]

    def run():
        ws = WorkerState(NTHREADS)
        hs = ws.handle_stimulus
        for b in range(0, n, BATCH):
            hs(*computes[b:b + BATCH])
            # FIFO priority: tasks run in id order, NTHREADS at a time
            for k in range(b, b + BATCH, NTHREADS):
                hs(*successes[k:k + NTHREADS])
        assert ws.in_memory_count == n
        return ws

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    if getattr(benchmark, "stats", None):
        benchmark.extra_info["us_per_task"] = round(benchmark.stats.stats.min / n * 1e6, 3)


@pytest.mark.parametrize("story_size", [0, 100_000])
def test_story_cost(benchmark, story_size):
    """What the bounded story costs per task (5 records per task)."""
    def run():
        ws = WorkerState(NTHREADS, story_size=story_size)
        hs = ws.handle_stimulus
        for b in range(0, N, BATCH):
            instrs = hs(*[ComputeTask(i, i, SPEC, (0, i), "c") for i in range(b, b + BATCH)])
            while True:
                done = [ExecuteSuccess(i.id, 8, "int", 0.0, 1.0, "d")
                        for i in instrs if type(i) is Execute]
                if not done:
                    break
                instrs = hs(*done)
        return ws

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    if getattr(benchmark, "stats", None):
        benchmark.extra_info["us_per_task"] = round(benchmark.stats.stats.min / N * 1e6, 3)
