"""Random event sequences against SchedulerState(validate=True).

Every stimulus ends with a whole-state invariant check (validate_state), and
every transition checks its task.  At the end, the cluster is healed (all
workers back, plenty of resources) and every task is run to completion:
liveness means that afterwards nothing is left waiting, queued, no-worker or
processing, and every wanted key is in memory or erred.
"""
import math
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskcore.core.scheduler_state import (
    AddKeys,
    ComputeTask,
    AddWorker,
    BalanceTick,
    Cancel,
    ClientReleasesKeys,
    ClientRemoved,
    ClientWantsKeys,
    MissingData,
    ReleaseWorkerData,
    RemoveWorker,
    RetireWorkers,
    Retry,
    SchedulerState,
    StealResponse,
    TaskErred,
    TaskFinished,
    TaskLongRunning,
    UpdateData,
    UpdateGraph,
    WorkerHeartbeat,
)

MAX_STEPS = int(os.environ.get("TASKCORE_FUZZ_STEPS", "40"))
POOL = [f"w{i}" for i in range(4)]
CLIENTS = ["c0", "c1", "fire-and-forget"]
ACTIONS = [
    "add_worker", "add_worker", "remove_worker", "submit", "submit", "submit",
    "finish", "finish", "finish", "finish", "err", "release", "wants", "cancel",
    "retry", "balance", "steal_response", "missing_data", "release_worker_data",
    "scatter", "add_keys", "client_removed", "retire", "stale_report", "heartbeat",
    "long_running",
]


class Driver:
    def __init__(self, data):
        self.data = data
        self.s = SchedulerState(
            validate=True,
            allowed_failures=data.draw(st.integers(0, 2), label="allowed_failures"),
            worker_saturation=data.draw(st.sampled_from([1.0, 1.1, 2.0, math.inf]),
                                        label="saturation"),
            tiny_task_backlog=data.draw(st.sampled_from([0.0, 0.002]), label="backlog"),
        )
        self.counter = 0
        self.ever_keys = []

    # ---- every call goes through here: check what comes out -------------

    def hs(self, *events):
        return self.check(self.s.handle_stimulus(*events))

    def tf(self, worker, task_id, nbytes, typename, duration, stimulus_id):
        return self.hs(TaskFinished(worker, task_id=task_id, nbytes=nbytes, typename=typename,
                                    duration=duration, stimulus_id=stimulus_id))

    def te(self, worker, task_id, exception, traceback, stimulus_id):
        return self.hs(TaskErred(worker, task_id, exception, traceback, stimulus_id))

    def check(self, out):
        s = self.s
        for instr in out:
            worker = getattr(instr, "worker", None)
            if worker is not None:
                assert worker in s.workers, instr            # never to a removed worker
            if type(instr) is ComputeTask:
                ts = s.get_task(instr.key)
                ws = s.workers[worker]
                # (it may already be gone again: e.g. its dependent erred in
                # the same stimulus; a FreeKeys to the same worker follows)
                if ts is not None and ts.state_name == "processing" \
                        and ts.processing_on_address == worker:
                    r = ts.worker_restrictions_set
                    if r is not None and not ts.allow_other_workers:
                        assert worker in r or ws.name in r, instr
                    for name, amount in (instr.resources or {}).items():
                        assert ws.resources.get(name, 0) >= amount, instr
        if s.worker_saturation != math.inf:
            for addr, ws in s.workers.items():
                roots = [t for t in ws.processing if not t.dependencies]
                # Beyond the slots only through the tiny-task backlog (learned
                # durations below tiny_task_backlog per thread) and sibling roots
                # (at most one per root placed in a slot), never unbounded.
                extra = 0 if s.tiny_task_backlog == 0 else 4096 * ws.nthreads
                assert len(roots) <= 2 * ws.slots + extra, (addr, len(roots), ws.slots)
                used, total = {}, ws.resources
                for t in ws.processing:
                    for k, v in (t.resource_restrictions or {}).items():
                        used[k] = used.get(k, 0) + v
                assert all(v <= total.get(k, 0) + 1e-9 for k, v in used.items()), addr
        return out

    def draw(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    def processing_pairs(self):
        return [(w, k) for w, keys in self.s.processing().items() for k in keys]

    def memory_pairs(self):
        return [(k, w) for k, ws in self.s.who_has().items() for w in ws]

    def known_keys(self):
        return list(self.s.tasks)

    # ---- actions --------------------------------------------------------

    def add_worker(self):
        free = [a for a in POOL if a not in self.s.workers]
        if not free:
            return
        addr = self.draw(st.sampled_from(free))
        res = self.draw(st.sampled_from([None, {"GPU": 1}, {"GPU": 2}]))
        self.hs(AddWorker(addr, nthreads=self.draw(st.integers(1, 3)),
                                         resources=res, name="n" + addr,
                                         memory_limit=10_000, stimulus_id="add"))

    def remove_worker(self):
        if self.s.workers:
            addr = self.draw(st.sampled_from(sorted(self.s.workers)))
            self.hs(RemoveWorker(addr, safe=self.draw(st.booleans()),
                                                stimulus_id="remove"))

    def submit(self):
        n = self.draw(st.integers(1, 5))
        existing = self.known_keys()
        new = []
        tasks = []
        for _ in range(n):
            key = f"k{self.counter}" if self.draw(st.booleans()) else ("t", self.counter)
            self.counter += 1
            pool = new + existing + ["ghost"]
            deps = self.draw(st.lists(st.sampled_from(pool), max_size=3)) if pool else []
            tasks.append((key, "run", deps, self.draw(st.integers(0, 5))))
            new.append(key)
        wanted = self.draw(st.lists(st.sampled_from(new + existing), min_size=1, max_size=4))
        restricted = self.draw(st.lists(st.sampled_from(new), max_size=2))
        workers = {k: self.draw(st.sampled_from(POOL + ["n" + POOL[0]])) for k in restricted}
        resources = {k: {"GPU": 1} for k in self.draw(st.lists(st.sampled_from(new), max_size=2))}
        self.ever_keys += new
        self.hs(UpdateGraph(
            self.draw(st.sampled_from(CLIENTS)), tasks, wanted, workers=workers,
            allow_other_workers=self.draw(st.booleans()), resources=resources,
            retries=self.draw(st.integers(0, 1)), priority=self.draw(st.integers(-1, 1)),
            stimulus_id="graph"))

    def finish(self):
        pairs = self.processing_pairs()
        if pairs:
            w, k = self.draw(st.sampled_from(pairs))
            self.tf(w, self.s.id_of(k), self.draw(st.integers(0, 5000)), "int",
                                 self.draw(st.floats(0, 2)), "finish")

    def err(self):
        pairs = self.processing_pairs()
        if pairs:
            w, k = self.draw(st.sampled_from(pairs))
            self.te(w, self.s.id_of(k), RuntimeError(k), "tb", "err")

    def release(self):
        keys = self.known_keys()
        if keys:
            self.hs(ClientReleasesKeys(
                self.draw(st.sampled_from(CLIENTS)),
                self.draw(st.lists(st.sampled_from(keys), max_size=3)), stimulus_id="release"))

    def wants(self):
        keys = self.known_keys() + ["unknown"]
        self.hs(ClientWantsKeys(
            self.draw(st.sampled_from(CLIENTS[:2])),
            self.draw(st.lists(st.sampled_from(keys), max_size=3)), stimulus_id="wants"))

    def cancel(self):
        keys = self.known_keys()
        if keys:
            self.hs(Cancel(
                self.draw(st.sampled_from(CLIENTS)),
                self.draw(st.lists(st.sampled_from(keys), max_size=2)),
                force=self.draw(st.booleans()), stimulus_id="cancel"))

    def retry(self):
        erred = [k for k, v in self.s.task_states().items() if v == "erred"]
        if erred:
            self.hs(Retry("c0", [self.draw(st.sampled_from(erred))],
                                         stimulus_id="retry"))

    def balance(self):
        self.hs(BalanceTick(now=1.0, stimulus_id="balance"))

    def steal_response(self):
        steals = self.s.steals_in_flight()
        if steals:
            key = self.draw(st.sampled_from(sorted(steals, key=repr)))
            victim = steals[key][0]
            state = self.draw(st.sampled_from(["ready", "waiting", "executing", "memory", None]))
            self.hs(StealResponse(victim, self.s.id_of(key), state,
                                                 stimulus_id="steal-response"))

    def missing_data(self):
        pairs = self.memory_pairs()
        if pairs:
            k, w = self.draw(st.sampled_from(pairs))
            self.hs(MissingData(k, w, "someone", stimulus_id="missing"))

    def release_worker_data(self):
        pairs = self.memory_pairs()
        if pairs:
            k, w = self.draw(st.sampled_from(pairs))
            self.hs(ReleaseWorkerData(w, [k], stimulus_id="rwd"))

    def scatter(self):
        if not self.s.workers:
            return
        keys = self.known_keys()
        if keys and self.draw(st.booleans()):
            key = self.draw(st.sampled_from(keys))
        else:
            key = f"data{self.counter}"
            self.counter += 1
        ws = self.draw(st.lists(st.sampled_from(sorted(self.s.workers)), min_size=1, max_size=2))
        self.hs(UpdateData(self.draw(st.sampled_from(CLIENTS[:2] + [None])),
                                          {key: ws}, {key: self.draw(st.integers(0, 100))},
                                          stimulus_id="scatter"))

    def add_keys(self):
        if self.s.workers:
            keys = self.known_keys() + ["stray"]
            self.hs(AddKeys(
                self.draw(st.sampled_from(sorted(self.s.workers))),
                self.draw(st.lists(st.sampled_from(keys), max_size=2)), stimulus_id="add-keys"))

    def client_removed(self):
        self.hs(ClientRemoved(self.draw(st.sampled_from(CLIENTS)),
                                             stimulus_id="client-removed"))

    def retire(self):
        self.hs(RetireWorkers(n=1, stimulus_id="retire"))

    def stale_report(self):
        if self.s.workers:
            w = self.draw(st.sampled_from(sorted(self.s.workers)))
            tid = self.draw(st.integers(0, self.counter + 3))
            if self.draw(st.booleans()):
                self.tf(w, tid, 1, "int", 0.1, "stale")
            else:
                self.te(w, tid, RuntimeError("stale"), None, "stale")

    def long_running(self):
        pairs = self.processing_pairs()
        if pairs:
            w, k = self.draw(st.sampled_from(pairs))
            self.hs(TaskLongRunning(w, self.s.id_of(k), "secede"))

    def heartbeat(self):
        if self.s.workers:
            w = self.draw(st.sampled_from(sorted(self.s.workers)))
            self.hs(WorkerHeartbeat(w, {"x": 1}, now=2.0))

    # ---- liveness -------------------------------------------------------

    def heal_and_drain(self):
        s = self.s
        for addr in POOL:
            if addr not in s.workers:
                self.hs(AddWorker(addr, nthreads=2, resources={"GPU": 4},
                                            name="n" + addr, stimulus_id="heal"))
        for addr in list(s.workers):
            # Retiring workers and workers without the resource: replace them,
            # or a restricted task could legitimately wait forever.
            if addr in s.retiring_workers() or "GPU" not in s.worker_resources()[addr]:
                self.hs(RemoveWorker(addr, safe=True, stimulus_id="heal"))
                self.hs(AddWorker(addr, nthreads=2, resources={"GPU": 4},
                                            name="n" + addr, stimulus_id="heal"))
        for key, (victim, _) in s.steals_in_flight().items():
            self.hs(StealResponse(victim, s.id_of(key), "executing"))
        for _ in range(10_000):
            pairs = self.processing_pairs()
            if not pairs:
                break
            w, k = pairs[0]
            self.tf(w, s.id_of(k), 10, "int", 0.01, "drain")
        counts = s.state_counts()
        assert counts["processing"] == 0
        assert counts["waiting"] == 0, s.task_states()
        assert counts["queued"] == 0, s.task_states()
        assert counts["no-worker"] == 0, s.task_states()
        for key, ts in s.tasks.items():
            if ts.wanted_by:
                assert ts.state_name in ("memory", "erred"), (key, ts.state_name)
            if ts.state_name == "memory":
                assert ts.wanted_by or ts.n_waiters, key


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_random_event_sequences(data):
    d = Driver(data)
    for _ in range(data.draw(st.integers(1, MAX_STEPS), label="steps")):
        getattr(d, data.draw(st.sampled_from(ACTIONS), label="action"))()
    d.heal_and_drain()
    # Releasing every client's keys forgets everything.
    for c in list(d.s.clients):
        d.hs(ClientRemoved(c))
    assert d.s.tasks == {}, d.s.task_states()
