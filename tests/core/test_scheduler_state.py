"""SchedulerState: events in, instructions out.  No I/O anywhere; every test
runs with validate=True, so each transition checks the task's invariants and
each stimulus ends with a whole-state check."""
import math

import pytest

from taskcore.core.scheduler_state import (
    AcquireReplicas,
    AddKeys,
    AddWorker,
    BalanceTick,
    Cancel,
    ClientReleasesKeys,
    ClientRemoved,
    ClientWantsKeys,
    ComputeTask,
    FreeKeys,
    InvalidTransition,
    KeyForgotten,
    KeyInMemory,
    KeyLost,
    MissingData,
    MissingDependencyError,
    ReleaseWorkerData,
    RemoveWorker,
    RetireWorkers,
    Retry,
    SchedulerState,
    StealRequest,
    StealResponse,
    TaskCancelled,
    TaskErred,
    TaskErredReport,
    TaskFinished,
    TasksFinished,
    TaskLongRunning,
    TaskRetried,
    UpdateData,
    UpdateGraph,
    WorkerHeartbeat,
    WorkersRetiring,
    transition_table,
)
from taskcore.errors import FutureLostError, KilledWorker


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def of(out, cls):
    return [i for i in out if type(i) is cls]


def computes(out):
    return of(out, ComputeTask)


def freed(out):
    """{worker: [keys]} over all FreeKeys instructions."""
    res = {}
    for i in of(out, FreeKeys):
        res.setdefault(i.worker, []).extend(i.keys)
    return res


def new_state(**kwargs):
    kwargs.setdefault("validate", True)
    return SchedulerState(**kwargs)


def add_workers(s, *specs):
    """specs: addresses, or (address, nthreads) / (address, nthreads, resources)."""
    out = []
    for spec in specs:
        if isinstance(spec, str):
            spec = (spec, 1)
        addr, nthreads, *rest = spec
        res = rest[0] if rest else None
        out += s.handle_stimulus(AddWorker(addr, nthreads=nthreads, resources=res,
                                           memory_limit=1_000_000, stimulus_id=f"add-{addr}"))
    return out


def submit(s, tasks, keys, client="c1", sid="ug", **kw):
    return s.handle_stimulus(UpdateGraph(client, tasks, keys, stimulus_id=sid, **kw))


def finished(s, worker, task_id, nbytes=0, typename=None, duration=-1.0, stimulus_id="",
             data=None):
    """`worker` computed task `task_id`: the TaskFinished stimulus, handled."""
    return s.handle_stimulus(TaskFinished(worker, task_id=task_id, nbytes=nbytes,
                                          typename=typename, duration=duration,
                                          stimulus_id=stimulus_id, key=None, data=data))


def finished_many(s, worker, task_ids, nbytes, typenames, durations, stimulus_id="", data=None):
    """One report of several finished tasks: the TasksFinished stimulus, handled."""
    return s.handle_stimulus(TasksFinished(worker, task_ids, nbytes, typenames, durations,
                                           data=data, stimulus_id=stimulus_id))


def erred(s, worker, task_id, exception, traceback=None, stimulus_id=""):
    return s.handle_stimulus(TaskErred(worker, task_id, exception, traceback, stimulus_id))


def long_running(s, worker, task_id, stimulus_id="long-running"):
    return s.handle_stimulus(TaskLongRunning(worker, task_id, stimulus_id))


def finish(s, ct, nbytes=8, duration=0.01, sid=None):
    return finished(s, ct.worker, ct.task_id, nbytes, "int", duration,
                           sid or f"fin-{ct.key}")


def run_all(s, out, nbytes=8, on_step=None):
    """Finish every ComputeTask (FIFO) until nothing is left to run.
    Returns all instructions produced along the way."""
    pending = computes(out)
    everything = list(out)
    while pending:
        ct = pending.pop(0)
        # Skip tasks that were moved/cancelled meanwhile.
        ts = s.get_task(ct.key)
        if ts is None or ts.state_name != "processing" or ts.processing_on_address != ct.worker:
            continue
        res = finish(s, ct, nbytes=nbytes)
        everything += res
        pending += computes(res)
        if on_step is not None:
            on_step(s, res)
    return everything


def tree_graph(n_leaves, prefix="t"):
    tasks = []
    level = [f"{prefix}leaf-{i}" for i in range(n_leaves)]
    tasks += [(k, f"load-{i}", [], i) for i, k in enumerate(level)]
    p = n_leaves
    depth = 0
    while len(level) > 1:
        nxt = []
        for j in range(0, len(level) - 1, 2):
            k = f"{prefix}sum{depth}-{j}"
            tasks.append((k, "add", [level[j], level[j + 1]], p))
            p += 1
            nxt.append(k)
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
        depth += 1
    return tasks, level[0]


# --------------------------------------------------------------------------
# basics
# --------------------------------------------------------------------------

def test_transition_table_is_data():
    direct, via = transition_table()
    assert ("released", "waiting") in direct
    assert ("processing", "memory") in direct
    assert ("memory", "processing") not in direct and ("memory", "processing") not in via
    assert ("processing", "waiting") in via
    assert all(start != "forgotten" for start, _ in direct + via)


def test_single_task_to_memory_and_forgotten():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "run-x", [], 0)], ["x"])
    [ct] = computes(out)
    assert (ct.worker, ct.key, ct.run_spec, ct.dependencies) == ("w1", "x", "run-x", ())
    assert ct.stimulus_id == "ug"
    assert ct.task_id == s.id_of("x") and s.key_of(ct.task_id) == "x"
    assert s.task_state("x") == "processing"
    assert s.processing() == {"w1": ["x"]}

    out = finished(s, "w1", ct.task_id, 123, "int", 0.5, "fin")
    [km] = of(out, KeyInMemory)
    assert (km.clients, km.key, km.nbytes, km.typename) == (("c1",), "x", 123, "int")
    assert s.task_state("x") == "memory"
    assert s.who_has(["x"]) == {"x": ["w1"]}
    assert s.has_what() == {"w1": ["x"]}
    assert s.get_task("x").prefix_name == "x"

    out = s.handle_stimulus(ClientReleasesKeys("c1", ["x"], stimulus_id="rel"))
    assert freed(out) == {"w1": ["x"]}
    assert s.task_state("x") == "forgotten"
    assert s.tasks == {}
    # A ready task is placed in the same step as released -> waiting; root
    # tasks pass through the queue, so they go out in priority order.
    assert [e[1:3] for e in s.story("x")] == [
        ("released", "queued"), ("queued", "processing"),
        ("processing", "memory"), ("memory", "released"), ("released", "forgotten")]


def test_diamond():
    s = new_state()
    add_workers(s, ("w1", 2), ("w2", 2))
    tasks = [("a", "fa", [], 0), ("b", "fb", ["a"], 1), ("c", "fc", ["a"], 2),
             ("d", "fd", ["b", "c"], 3)]
    out = submit(s, tasks, ["d"])
    [ct_a] = computes(out)
    assert ct_a.key == "a"
    out = finish(s, ct_a, nbytes=1000)
    cts = computes(out)
    assert sorted(c.key for c in cts) == ["b", "c"]
    for c in cts:
        assert c.dependencies == ((s.id_of("a"), "a", 1000, (ct_a.worker,)),)
    # b stays with its input; c would queue behind b there (0.5 s estimated)
    # while moving 1000 bytes costs 10 us: it goes to the idle worker.
    assert cts[0].worker == ct_a.worker and cts[1].worker != ct_a.worker
    assert s.task_state("d") == "waiting"
    out1 = finish(s, cts[0])
    assert not computes(out1)
    out2 = finish(s, cts[1])
    [ct_d] = computes(out2)
    assert {dep[1] for dep in ct_d.dependencies} == {"b", "c"}
    # a is released once both its dependents finished
    assert s.task_state("a") == "released"
    assert "a" in freed(out2).get(ct_a.worker, [])
    out = finish(s, ct_d)
    assert of(out, KeyInMemory)[0].key == "d"
    assert sorted(sum(freed(out).values(), [])) == ["b", "c"]
    assert s.state_counts()["memory"] == 1
    s.handle_stimulus(ClientReleasesKeys("c1", ["d"]))
    assert s.tasks == {}


def test_tree_reduction_completes_and_frees_intermediates():
    s = new_state()
    add_workers(s, ("w1", 2), ("w2", 2))
    tasks, root = tree_graph(64)
    out = submit(s, tasks, [root])
    everything = run_all(s, out)
    assert s.task_state(root) == "memory"
    counts = s.state_counts()
    assert counts["memory"] == 1 and counts["released"] == len(tasks) - 1
    n_freed = sum(len(v) for v in freed(everything).values())
    assert n_freed == len(tasks) - 1
    assert len(computes(everything)) == len(tasks)
    s.handle_stimulus(ClientReleasesKeys("c1", [root]))
    assert s.tasks == {} and s.has_what() == {"w1": [], "w2": []}


def test_dependency_on_key_from_earlier_graph():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0)], ["x"])
    finish(s, computes(out)[0], nbytes=50)
    out = submit(s, [("y", "g", ["x"], 0)], ["y"], sid="ug2")
    [ct] = computes(out)
    assert ct.dependencies == ((s.id_of("x"), "x", 50, ("w1",)),)
    finish(s, ct)
    assert s.task_state("y") == "memory" and s.task_state("x") == "memory"


def test_resubmitting_known_key_keeps_definition_and_adds_want():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f1", [], 0)], ["x"], client="c1")
    finish(s, computes(out)[0])
    out = submit(s, [("x", "f2", [], 0)], ["x"], client="c2", sid="again")
    assert not computes(out)
    [km] = of(out, KeyInMemory)
    assert km.clients == ("c2",)
    assert s.get_task("x").run_spec == "f1"
    assert sorted(s.get_task("x").wanted_by) == ["c1", "c2"]


def test_unknown_dependency_errs_task_and_dependents():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("a", "f", ["ghost", "gone"], 0), ("b", "g", ["a"], 1)], ["a", "b"])
    assert not computes(out)
    reports = {r.key: r for r in of(out, TaskErredReport)}
    assert set(reports) == {"a", "b"}
    exc = reports["a"].exception
    assert isinstance(exc, MissingDependencyError)
    assert exc.missing == ("ghost", "gone") and "ghost" in str(exc)
    assert reports["b"].exception is exc and reports["b"].blame_key == "a"
    assert s.task_state("a") == "erred" and s.task_state("b") == "erred"
    # A retry cannot conjure the missing key: the same error comes back.
    out = s.handle_stimulus(Retry("c1", ["b"]))
    assert s.task_state("b") == "erred"
    assert any(isinstance(r.exception, MissingDependencyError) for r in of(out, TaskErredReport))


def test_unwanted_unneeded_tasks_are_dropped():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("a", "f", [], 0), ("orphan", "f", [], 1), ("b", "g", ["a"], 2)], ["b"])
    assert s.task_state("orphan") == "forgotten"
    assert [c.key for c in computes(out)] == ["a"]


def test_client_wants_unknown_key_is_reported():
    s = new_state()
    out = s.handle_stimulus(ClientWantsKeys("c1", ["nope"]))
    [kf] = of(out, KeyForgotten)
    assert (kf.clients, kf.key) == (("c1",), "nope")


def test_tuple_keys_and_priorities():
    s = new_state()
    add_workers(s, "w1")
    # tuple keys; tuple priorities are ranked inside the graph
    tasks = [(("x", 2), "f", [], (0, 2)), (("x", 0), "f", [], (0, 0)), (("x", 1), "f", [], (0, 1))]
    out = submit(s, tasks, [t[0] for t in tasks])
    keys = [c.key for c in computes(out)]    # one thread: ceil(1 * 1.1) = 2 slots
    assert keys == [("x", 0), ("x", 1)]
    assert s.queued_keys() == [("x", 2)]
    assert s.get_task(("x", 0)).prefix_name == "x"


def test_user_priority_orders_graphs():
    s = new_state(worker_saturation=1.0)
    out = submit(s, [("low", "f", [], 0)], ["low"], priority=0, sid="g1")
    out += submit(s, [("high", "f", [], 0)], ["high"], priority=10, sid="g2")
    assert s.queued_keys() == ["high", "low"]
    out = add_workers(s, "w1")
    assert [c.key for c in computes(out)] == ["high"]
    assert computes(out)[0].priority[0] == -10


# --------------------------------------------------------------------------
# root-task queueing
# --------------------------------------------------------------------------

def test_wide_map_respects_saturation():
    s = new_state(worker_saturation=1.1)
    add_workers(s, ("w1", 2), ("w2", 2))
    slots = math.ceil(2 * 1.1)
    tasks = [(f"inc-{i}", "inc", [], i) for i in range(200)]
    out = submit(s, tasks, [t[0] for t in tasks])
    cts = computes(out)
    assert len(cts) == 2 * slots
    assert s.state_counts()["queued"] == 200 - 2 * slots
    # the highest-priority tasks go first
    assert sorted(c.key for c in cts) == sorted(f"inc-{i}" for i in range(2 * slots))
    seen_max = []

    def check(st, res):
        procs = st.processing()
        seen_max.append(max(len(v) for v in procs.values()))
        assert all(len(v) <= slots for v in procs.values()), procs

    run_all(s, out, on_step=check)
    assert max(seen_max) == slots
    assert s.state_counts()["memory"] == 200


def test_queue_released_in_priority_order():
    s = new_state(worker_saturation=1.0)
    add_workers(s, "w1")
    tasks = [(f"t-{i}", "f", [], 100 - i) for i in range(10)]  # t-9 has the best priority
    out = submit(s, tasks, [t[0] for t in tasks])
    order = [c.key for c in computes(out)]
    pending = computes(out)
    while pending:
        res = finish(s, pending.pop(0))
        pending += computes(res)
        order += [c.key for c in computes(res)]
    assert order == [f"t-{i}" for i in range(9, -1, -1)]


def test_queueing_disabled_sends_everything():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, ("w1", 2), ("w2", 2))
    tasks = [(f"inc-{i}", "inc", [], i) for i in range(40)]
    out = submit(s, tasks, [t[0] for t in tasks])
    cts = computes(out)
    assert len(cts) == 40
    per = {w: sum(1 for c in cts if c.worker == w) for w in ("w1", "w2")}
    assert per == {"w1": 20, "w2": 20}


def test_tiny_task_backlog_beyond_slots():
    """Once a prefix is known to take microseconds, a worker holds up to
    `tiny_task_backlog` seconds of it per thread beyond its slots; unknown or
    slow prefixes still get only the slots."""
    s = new_state(tiny_task_backlog=0.001)
    add_workers(s, ("w1", 1))
    tasks = [(f"inc-{i}", "inc", [], i) for i in range(2000)]
    out = submit(s, tasks, [t[0] for t in tasks])
    first = computes(out)
    assert len(first) == 2                                # unknown duration: the slots
    out = finished_many(s, "w1", [c.task_id for c in first], [8, 8], ["int", "int"],
                           [1e-6, 1e-6], "fin")
    assert len(of(out, KeyInMemory)) == 2
    cts = computes(out)
    # 1 ms of 1 us tasks: ~1000 held at once, never the whole queue.
    assert 900 <= len(cts) <= 1100, len(cts)
    assert s.state_counts()["queued"] == 2000 - 2 - len(cts)
    # A slow prefix only gets the slots, even on a worker open for tiny ones.
    slow = [(f"slow-{i}", "f", [], -1) for i in range(10)]
    assert not computes(submit(s, slow, [t[0] for t in slow], sid="ug2"))
    s2 = new_state(tiny_task_backlog=0)                   # 0 turns it off
    add_workers(s2, ("w1", 1))
    out = submit(s2, tasks, [t[0] for t in tasks])
    first = computes(out)
    out = finished_many(s2, "w1", [c.task_id for c in first], [8, 8], ["int", "int"],
                            [1e-6, 1e-6], "fin")
    assert len(computes(out)) == 2
    with pytest.raises(ValueError, match="different lengths"):
        finished_many(s2, "w1", [1, 2], [8], ["int"], [0.1], "bad")
    with pytest.raises(ValueError, match="tiny_task_backlog"):
        new_state(tiny_task_backlog=-1)


def test_sibling_roots_go_to_one_worker():
    """Two roots feeding one dependent are placed together even with one slot per
    worker, so the dependent needs no transfer; unrelated roots still spread."""
    s = new_state(worker_saturation=1.0)
    add_workers(s, ("w1", 1), ("w2", 1))
    tasks = [(f"a-{i}", "f", [], i) for i in range(4)]
    tasks += [("d-0", "g", ["a-0", "a-1"], 10), ("d-1", "g", ["a-2", "a-3"], 11)]
    out = submit(s, tasks, ["d-0", "d-1"])
    where = {c.key: c.worker for c in computes(out)}
    assert set(where) == {"a-0", "a-1", "a-2", "a-3"}
    assert where["a-0"] == where["a-1"] and where["a-2"] == where["a-3"]
    assert where["a-0"] != where["a-2"]
    # Lone roots (no shared dependent) keep to the slots.
    s2 = new_state(worker_saturation=1.0)
    add_workers(s2, ("w1", 1), ("w2", 1))
    lone = [(f"b-{i}", "f", [], i) for i in range(4)]
    out = submit(s2, lone, [t[0] for t in lone])
    assert sorted(c.worker for c in computes(out)) == ["w1", "w2"]


def test_root_joins_its_sibling_beyond_the_slots():
    """A root whose sibling (another input of its dependent) runs on a full worker goes
    there anyway, by at most its slots again, rather than to whichever worker freed a
    slot: the dependent then needs no transfer."""
    s = new_state(worker_saturation=1.0)
    add_workers(s, ("w1", 1), ("w2", 1))
    tasks = [(f"a-{i}", "f", [], i) for i in range(4)]
    tasks += [("d-0", "g", ["a-0", "a-2"], 10), ("d-1", "g", ["a-1", "a-3"], 11)]
    out = submit(s, tasks, ["d-0", "d-1"])
    first = {c.key: c for c in computes(out)}
    assert set(first) == {"a-0", "a-1"}
    assert first["a-0"].worker != first["a-1"].worker
    w_a0, w_a1 = first["a-0"].worker, first["a-1"].worker
    out = finish(s, first["a-1"])                 # a slot frees on a-1's worker ...
    placed = {c.key: c.worker for c in computes(out)}
    assert placed["a-2"] == w_a0                  # ... but a-2 joins a-0, its sibling
    assert placed.get("a-3", w_a1) == w_a1        # a-3 joins a-1 (in memory there)


def test_root_tasks_wait_for_first_worker():
    s = new_state()
    out = submit(s, [("a", "f", [], 0), ("b", "f", [], 1)], ["a", "b"])
    assert not computes(out) and s.state_counts()["queued"] == 2
    out = add_workers(s, ("w1", 1))
    assert [c.key for c in computes(out)] == ["a", "b"]   # ceil(1 * 1.1) = 2 slots


def test_non_root_without_workers_is_no_worker_until_one_joins():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("a", "f", [], 0), ("b", "g", ["a"], 1)], ["b"])
    finish(s, computes(out)[0])
    # b was sent to w1; w1 dies; no worker left: a is lost, b waits, a queued
    s.handle_stimulus(RemoveWorker("w1", safe=True))
    assert s.task_state("a") == "queued" and s.task_state("b") == "waiting"
    out = add_workers(s, "w2")
    out = run_all(s, out)
    assert s.task_state("b") == "memory"


# --------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------

def test_chain_follows_data():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, "w1", "w2")
    tasks = [("c0", "f", [], 0)] + [(f"c{i}", "f", [f"c{i - 1}"], i) for i in range(1, 6)]
    out = submit(s, tasks, ["c5"])
    worker = computes(out)[0].worker
    for _ in range(6):
        [ct] = computes(out)
        assert ct.worker == worker
        out = finish(s, ct, nbytes=10_000_000)
    assert s.task_state("c5") == "memory"


def test_placement_prefers_larger_input():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, "w1", "w2")
    out = s.handle_stimulus(UpdateGraph("c", [("big", "f", [], 0)], ["big"],
                                        workers={"big": "w2"}))
    finish(s, computes(out)[0], nbytes=50_000_000)
    out = s.handle_stimulus(UpdateGraph("c", [("small", "f", [], 0)], ["small"],
                                        workers={"small": "w1"}))
    finish(s, computes(out)[0], nbytes=1000)
    out = submit(s, [("both", "g", ["big", "small"], 0)], ["both"], client="c")
    assert computes(out)[0].worker == "w2"


def test_occupancy_spreads_work_when_inputs_are_cheap_to_move():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0)], ["a"], workers={"a": "w1"})
    finish(s, computes(out)[0], nbytes=0)
    # Only w1 holds a, but moving 0 bytes is free: occupancy decides.
    tasks = [(f"d{i}", "g", ["a"], i) for i in range(10)]
    out = submit(s, tasks, [t[0] for t in tasks], sid="g2")
    per = {w: sum(1 for c in computes(out) if c.worker == w) for w in ("w1", "w2")}
    assert per == {"w1": 5, "w2": 5}
    assert s.occupancy() == {"w1": pytest.approx(2.5), "w2": pytest.approx(2.5)}


def test_learned_durations_feed_occupancy():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, "w1")
    out = submit(s, [("inc-1", "f", [], 0)], ["inc-1"])
    finished(s, "w1", computes(out)[0].task_id, 8, "int", 2.0, "f")
    out = submit(s, [("inc-2", "f", [], 0), ("inc-3", "f", [], 1)], ["inc-2", "inc-3"])
    assert [c.duration for c in computes(out)] == [2.0, 2.0]
    assert s.occupancy()["w1"] == pytest.approx(4.0)


def test_worker_restrictions_by_address_and_name():
    s = new_state()
    s.handle_stimulus(AddWorker("tcp://a:1", nthreads=1, name="alice"),
                      AddWorker("tcp://b:1", nthreads=1, name="bob"))
    out = submit(s, [("x", "f", [], 0), ("y", "f", [], 1)], ["x", "y"],
                 workers={"x": "bob", "y": ["tcp://a:1"]})
    where = {c.key: c.worker for c in computes(out)}
    assert where == {"x": "tcp://b:1", "y": "tcp://a:1"}
    assert s.get_task("x").worker_restrictions_set == frozenset({"bob"})


def test_restriction_to_absent_worker_waits_in_no_worker():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0), ("y", "f", [], 1)], ["x", "y"],
                 workers={"x": "w9", "y": "w9"}, allow_other_workers=["y"])
    assert [c.key for c in computes(out)] == ["y"]        # loose: runs on w1
    assert computes(out)[0].worker == "w1"
    assert s.task_state("x") == "no-worker"
    assert s.unrunnable_keys() == ["x"]
    out = add_workers(s, "w9")
    [ct] = computes(out)
    assert (ct.key, ct.worker) == ("x", "w9")


def test_allow_other_workers_true_means_all():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0)], ["x"], workers={"x": "nowhere"},
                 allow_other_workers=True)
    assert computes(out)[0].worker == "w1"


# --------------------------------------------------------------------------
# resources
# --------------------------------------------------------------------------

def test_resources_limit_concurrency():
    s = new_state()
    add_workers(s, ("cpu", 8), ("gpu", 4, {"GPU": 2}))
    tasks = [(f"g{i}", "f", [], i) for i in range(5)]
    out = submit(s, tasks, [t[0] for t in tasks], resources={t[0]: {"GPU": 1} for t in tasks})
    cts = computes(out)
    assert len(cts) == 2 and {c.worker for c in cts} == {"gpu"}
    assert all(c.resources == {"GPU": 1.0} for c in cts)
    assert s.state_counts()["queued"] == 3
    assert s.worker_resources()["gpu"]["GPU"] == (2.0, 2.0)
    max_seen = []

    def check(st, res):
        used, total = st.worker_resources()["gpu"]["GPU"][1], 2.0
        max_seen.append(len(st.processing()["gpu"]))
        assert used <= total and len(st.processing()["gpu"]) <= 2
        assert not st.processing()["cpu"]

    run_all(s, out, on_step=check)
    assert max(max_seen) == 2
    assert s.state_counts()["memory"] == 5


def test_resource_task_waits_for_capable_worker():
    s = new_state()
    add_workers(s, ("cpu", 4))
    out = submit(s, [("g", "f", [], 0), ("h", "f", ["g"], 1)], ["h"],
                 resources={"g": {"GPU": 1}})
    assert not computes(out)
    assert s.task_state("g") == "no-worker" and s.task_state("h") == "waiting"
    out = add_workers(s, ("small-gpu", 1, {"GPU": 0.5}))
    assert not computes(out) and s.task_state("g") == "no-worker"
    out = add_workers(s, ("gpu", 1, {"GPU": 1}))
    [ct] = computes(out)
    assert (ct.key, ct.worker) == ("g", "gpu")
    out = finish(s, ct, nbytes=10)
    [ct_h] = computes(out)                   # h is unrestricted: follows its input
    assert ct_h.worker == "gpu" and ct_h.resources is None


def test_resource_queue_falls_back_to_no_worker_when_worker_leaves():
    s = new_state()
    add_workers(s, ("gpu", 1, {"GPU": 1}))
    tasks = [(f"g{i}", "f", [], i) for i in range(3)]
    out = submit(s, tasks, [t[0] for t in tasks], resources={t[0]: {"GPU": 1} for t in tasks})
    assert len(computes(out)) == 1 and s.state_counts()["queued"] == 2
    s.handle_stimulus(RemoveWorker("gpu"))
    assert s.state_counts()["no-worker"] == 3
    out = add_workers(s, ("gpu2", 2, {"GPU": 2}))
    assert len(computes(out)) == 2


# --------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------

def test_worker_dies_while_processing():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("x", "f", [], 0)], ["x"], workers={"x": ["w1", "w2"]})
    [ct] = computes(out)
    other = "w2" if ct.worker == "w1" else "w1"
    out = s.handle_stimulus(RemoveWorker(ct.worker, stimulus_id="died"))
    [ct2] = computes(out)
    assert ct2.worker == other and ct2.key == "x"
    assert not of(out, FreeKeys)              # nothing is sent to a dead worker
    assert s.get_task("x").suspicious == 1
    # a late report from the dead worker is ignored
    assert finished(s, ct.worker, ct.task_id, 1, "int", 0.1, "late") == []
    finish(s, ct2)
    assert s.task_state("x") == "memory"


def test_safe_removal_counts_no_suspicion():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("x", "f", [], 0)], ["x"])
    ct = computes(out)[0]
    s.handle_stimulus(RemoveWorker(ct.worker, safe=True))
    assert s.get_task("x").suspicious == 0


def test_worker_dies_holding_data_dependents_recomputed():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0), ("b", "g", ["a"], 1), ("c", "h", ["b"], 2)],
                 ["b", "c"], workers={"a": "w1", "b": "w1"})
    out = finish(s, computes(out)[0])          # a on w1
    out = finish(s, computes(out)[0])          # b on w1
    [ct_c] = computes(out)
    assert ct_c.worker == "w1" and s.task_state("a") == "released"
    # w1 dies: b (wanted, in memory) is lost; c was processing there
    out = s.handle_stimulus(RemoveWorker("w1", stimulus_id="w1-died"))
    [kl] = of(out, KeyLost)
    assert kl.key == "b" and kl.clients == ("c1",)
    # restricted to w1, which is gone: a waits for w1 to come back
    assert s.task_state("a") == "no-worker"
    assert s.task_state("b") == "waiting" and s.task_state("c") == "waiting"
    out = add_workers(s, "w1")
    assert [c.key for c in computes(out)] == ["a"]
    run_all(s, out)
    assert s.task_state("c") == "memory" and s.task_state("b") == "memory"
    assert ("b", "memory", "released", "w1-died", None) in s.story("b")


def test_lost_intermediate_recomputed_chain():
    s = new_state()
    add_workers(s, "w1", "w2")
    tasks, root = tree_graph(8)
    out = submit(s, tasks, [root])
    # run until the last task is processing, then kill its worker
    pending = computes(out)
    last = None
    while pending:
        ct = pending.pop(0)
        if ct.key == root:
            last = ct
            break
        pending += computes(finish(s, ct))
    assert last is not None
    out = s.handle_stimulus(RemoveWorker(last.worker))
    out = run_all(s, out)
    assert s.task_state(root) == "memory"


def test_missing_data_holder_loses_replica():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0)], ["a"], workers={"a": "w1"})
    finish(s, computes(out)[0])
    out = submit(s, [("b", "g", ["a"], 0)], ["b"], workers={"b": "w2"}, sid="g2")
    [ct_b] = computes(out)
    assert ct_b.worker == "w2" and ct_b.dependencies[0][3] == ("w1",)
    # w2 could not fetch a from w1: the replica is gone, a is recomputed
    out = s.handle_stimulus(MissingData("a", holder="w1", reporter="w2", stimulus_id="miss"))
    assert s.task_state("b") == "waiting"
    assert freed(out) == {"w2": ["b"]}        # b is cancelled on w2 until a is back
    [kl] = of(out, KeyLost)
    assert kl.key == "a"
    [ct_a] = computes(out)
    assert ct_a.key == "a" and ct_a.worker == "w1"
    out = finish(s, ct_a)
    [ct_b2] = computes(out)
    assert ct_b2.key == "b" and ct_b2.worker == "w2"


def test_release_worker_data_and_add_keys():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0)], ["a"], workers={"a": "w1"})
    finish(s, computes(out)[0])
    s.handle_stimulus(AddKeys("w2", ["a", "unknown-key"]))
    assert sorted(s.who_has(["a"])["a"]) == ["w1", "w2"]
    s.handle_stimulus(ReleaseWorkerData("w1", ["a"]))
    assert s.who_has(["a"])["a"] == ["w2"]
    out = s.handle_stimulus(ReleaseWorkerData("w2", ["a"]))
    # last replica gone, still wanted: recompute (restricted to w1)
    assert [c.worker for c in computes(out)] == ["w1"]


def test_add_keys_for_unwanted_key_frees_it():
    s = new_state()
    add_workers(s, "w1")
    out = s.handle_stimulus(AddKeys("w1", ["stray"]))
    [fk] = of(out, FreeKeys)
    assert fk.worker == "w1" and fk.keys == ["stray"] and fk.task_ids == [-1]


def test_task_error_propagates_to_dependents():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("a", "f", [], 0), ("b", "g", ["a"], 1), ("c", "h", ["b"], 2)],
                 ["b", "c"], client="c1")
    s.handle_stimulus(ClientWantsKeys("c2", ["c"]))
    [ct] = computes(out)
    err = ZeroDivisionError("boom")
    out = erred(s, "w1", ct.task_id, err, "tb-text", "err-a")
    reports = {r.key: r for r in of(out, TaskErredReport)}
    assert set(reports) == {"b", "c"}          # a is not wanted by anyone
    for r in reports.values():
        assert r.exception is err and r.traceback == "tb-text" and r.blame_key == "a"
    assert sorted(reports["c"].clients) == ["c1", "c2"]
    assert freed(out) == {"w1": ["a"]}
    assert {k: s.task_state(k) for k in "abc"} == {"a": "erred", "b": "erred", "c": "erred"}
    assert s.get_task("c").blame_key == "a"


def test_erred_report_for_late_wanter():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("a", "f", [], 0)], ["a"])
    erred(s, "w1", computes(out)[0].task_id, ValueError("x"))
    out = s.handle_stimulus(ClientWantsKeys("c9", ["a"]))
    [r] = of(out, TaskErredReport)
    assert r.clients == ("c9",) and isinstance(r.exception, ValueError)


def test_retries():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0)], ["a"], retries=2)
    for attempt in range(2):
        [ct] = computes(out)
        out = erred(s, ct.worker, ct.task_id, RuntimeError(attempt), None, f"e{attempt}")
        assert not of(out, TaskErredReport)
        assert freed(out) == {ct.worker: ["a"]}
        assert s.task_state("a") == "processing"
    [ct] = computes(out)
    out = erred(s, ct.worker, ct.task_id, RuntimeError("final"), None, "e-final")
    [r] = of(out, TaskErredReport)
    assert str(r.exception) == "final" and s.task_state("a") == "erred"


def test_per_key_retries():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("a", "f", [], 0), ("b", "f", [], 1)], ["a", "b"], retries={"a": 1})
    assert s.get_task("a").retries == 1 and s.get_task("b").retries == 0


def test_retry_event_recomputes_erred_chain():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("a", "f", [], 0), ("b", "g", ["a"], 1), ("c", "h", ["b"], 2)],
                 ["b", "c"])
    erred(s, "w1", computes(out)[0].task_id, RuntimeError("flaky"))
    assert s.task_state("b") == "erred" and s.task_state("c") == "erred"
    assert s.get_task("c").blame_key == "a"
    out = s.handle_stimulus(Retry("c1", ["c"], stimulus_id="retry"))
    assert sorted(r.key for r in of(out, TaskRetried)) == ["b", "c"]
    [ct] = computes(out)
    assert ct.key == "a"
    assert s.task_state("b") == "waiting" and s.task_state("c") == "waiting"
    out = run_all(s, out)
    assert s.task_state("b") == "memory" and s.task_state("c") == "memory"
    assert [k.key for k in of(out, KeyInMemory)] == ["b", "c"]


def test_killed_worker_after_allowed_failures():
    s = new_state(allowed_failures=3)
    out = add_workers(s, "w0")
    out = submit(s, [("bad", "f", [], 0), ("dep", "g", ["bad"], 1)], ["dep"])
    for i in range(4):
        [ct] = computes(out)
        assert ct.key == "bad"
        out = add_workers(s, f"w{i + 1}")
        out = s.handle_stimulus(RemoveWorker(ct.worker, stimulus_id=f"death-{i}"))
        if i < 3:
            assert s.task_state("bad") == "processing", i
            assert s.get_task("bad").suspicious == i + 1
    assert s.task_state("bad") == "erred" and s.task_state("dep") == "erred"
    [r] = of(out, TaskErredReport)
    assert r.key == "dep" and r.blame_key == "bad"
    exc = r.exception
    assert isinstance(exc, KilledWorker)
    assert exc.key == "bad" and exc.last_worker == "w3" and exc.allowed_failures == 3
    assert "4 different workers" in str(exc)


def test_killed_worker_after_three_deaths():
    # allowed_failures counts the deaths that are tolerated: with 2, the third
    # worker dying while running the task makes it KilledWorker.
    s = new_state(allowed_failures=2)
    out = add_workers(s, "w0")
    out = submit(s, [("bad", "f", [], 0)], ["bad"])
    for i in range(3):
        [ct] = computes(out)
        add_workers(s, f"w{i + 1}")
        out = s.handle_stimulus(RemoveWorker(ct.worker, stimulus_id=f"death-{i}"))
    [r] = of(out, TaskErredReport)
    assert isinstance(r.exception, KilledWorker) and r.key == "bad"
    assert "3 different workers" in str(r.exception) and "w2" in str(r.exception)
    assert [e[2] for e in s.story("bad")].count("erred") == 1


def test_killed_worker_is_configurable():
    s = new_state(allowed_failures=0)
    add_workers(s, "w1", "w2")
    out = submit(s, [("x", "f", [], 0)], ["x"])
    out = s.handle_stimulus(RemoveWorker(computes(out)[0].worker))
    [r] = of(out, TaskErredReport)
    assert isinstance(r.exception, KilledWorker) and s.task_state("x") == "erred"


# --------------------------------------------------------------------------
# cancel, clients, forgetting
# --------------------------------------------------------------------------

def test_two_clients_reference_counting():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0)], ["x"], client="c1")
    s.handle_stimulus(ClientWantsKeys("c2", ["x"]))
    out = finish(s, computes(out)[0])
    assert sorted(of(out, KeyInMemory)[0].clients) == ["c1", "c2"]
    out = s.handle_stimulus(ClientReleasesKeys("c1", ["x"]))
    assert not of(out, FreeKeys) and s.task_state("x") == "memory"
    assert s.get_task("x").wanted_by == ["c2"]
    out = s.handle_stimulus(ClientReleasesKeys("c2", ["x"]))
    assert freed(out) == {"w1": ["x"]} and s.task_state("x") == "forgotten"


def test_client_removed_releases_everything():
    s = new_state()
    add_workers(s, "w1")
    tasks = [(f"k{i}", "f", [], i) for i in range(5)]
    out = run_all(s, submit(s, tasks, [t[0] for t in tasks]))
    submit(s, [("shared", "f", [], 0)], ["shared"], client="c2")
    out = s.handle_stimulus(ClientRemoved("c1"))
    assert sorted(freed(out)["w1"]) == [f"k{i}" for i in range(5)]
    assert list(s.clients) == ["c2"]
    assert set(s.tasks) == {"shared"}


def test_cancel_processing_task():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0)], ["x"])
    [ct] = computes(out)
    out = s.handle_stimulus(Cancel("c1", ["x"], stimulus_id="cancel"))
    [tc] = of(out, TaskCancelled)
    assert (tc.clients, tc.key) == (("c1",), "x")
    assert freed(out) == {"w1": ["x"]}
    assert s.task_state("x") == "forgotten"
    # the worker finishes anyway: stale, we tell it to drop the result
    out = finished(s, "w1", ct.task_id, 8, "int", 0.1, "late")
    assert of(out, FreeKeys)[0].task_ids == [ct.task_id]


def test_cancel_during_dependency_fetch():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0), ("b", "f", [], 1), ("c", "g", ["a", "b"], 2)],
                 ["c"], workers={"a": "w1", "b": "w2"})
    for ct in computes(out):
        out = finish(s, ct, nbytes=100)
    [ct_c] = computes(out)
    # c is processing: its worker is fetching the input held by the other one
    other = "w2" if ct_c.worker == "w1" else "w1"
    assert any(dep[3] == (other,) for dep in ct_c.dependencies)
    out = s.handle_stimulus(Cancel("c1", ["c"]))
    f = freed(out)
    assert "c" in f[ct_c.worker]
    assert sorted(sum(f.values(), [])) == ["a", "b", "c"]
    assert s.tasks == {}


def test_cancel_is_per_client_unless_forced():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0), ("y", "g", ["x"], 1)], ["x", "y"], client="c1")
    s.handle_stimulus(ClientWantsKeys("c2", ["x"]))
    out = s.handle_stimulus(Cancel("c1", ["x"]))
    # only c1's interest in x goes: c2 still wants x, so x keeps running and
    # c1's y (which needs x anyway) is left alone
    assert [(t.key, t.clients) for t in of(out, TaskCancelled)] == [("x", ("c1",))]
    assert s.task_state("x") == "processing" and s.task_state("y") == "waiting"
    assert s.get_task("x").wanted_by == ["c2"]
    # force: for every client, dependents included
    out = s.handle_stimulus(Cancel("c1", ["x"], force=True))
    assert [(t.key, t.clients) for t in of(out, TaskCancelled)] == [("x", ("c2",)),
                                                                   ("y", ("c1",))]
    assert s.task_state("x") == "forgotten" and s.task_state("y") == "forgotten"
    assert freed(out) == {"w1": ["x"]}


def test_cancel_by_unrelated_client_is_noop():
    s = new_state()
    add_workers(s, "w1")
    submit(s, [("x", "f", [], 0)], ["x"], client="c1")
    out = s.handle_stimulus(Cancel("c2", ["x"]))
    assert out == [] and s.task_state("x") == "processing"


def test_fire_and_forget():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0)], ["x"], client="fire-and-forget")
    out = finish(s, computes(out)[0])
    assert freed(out) == {"w1": ["x"]} and s.tasks == {}


# --------------------------------------------------------------------------
# scatter
# --------------------------------------------------------------------------

def test_scatter_then_compute_then_lose():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = s.handle_stimulus(UpdateData("c1", {"data": ["w1"]}, {"data": 4096}, stimulus_id="sc"))
    [km] = of(out, KeyInMemory)
    assert (km.key, km.nbytes) == ("data", 4096) and s.task_state("data") == "memory"
    out = submit(s, [("f", "f", ["data"], 0)], ["f"])
    assert computes(out)[0].worker == "w1"
    # w1 dies: the scattered data cannot be recomputed
    out = s.handle_stimulus(RemoveWorker("w1"))
    reports = {r.key: r for r in of(out, TaskErredReport)}
    assert set(reports) == {"data", "f"}
    assert isinstance(reports["f"].exception, FutureLostError)
    assert "scattered" in str(reports["f"].exception)
    assert s.task_state("f") == "erred"


def test_scatter_over_existing_key_and_more_replicas():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("x", "f", [], 0)], ["x"])
    [ct] = computes(out)
    out = s.handle_stimulus(UpdateData("c1", {"x": ["w2"]}, {"x": 10}))
    assert s.task_state("x") == "memory" and s.who_has(["x"]) == {"x": ["w2"]}
    assert "x" in freed(out).get(ct.worker, [])      # the computation is cancelled
    s.handle_stimulus(UpdateData("c1", {"x": ["w1"]}, {"x": 20}))
    assert sorted(s.who_has(["x"])["x"]) == ["w1", "w2"]
    assert s.worker_info("w1")["nbytes"] == 20 and s.worker_info("w2")["nbytes"] == 20


def test_scatter_to_unknown_worker():
    s = new_state()
    out = s.handle_stimulus(UpdateData("c1", {"x": ["nobody"]}))
    assert of(out, KeyForgotten)[0].key == "x" and s.tasks == {}


# --------------------------------------------------------------------------
# stealing
# --------------------------------------------------------------------------

def _saturated_pair():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, ("w1", 1))
    tasks = [(f"t{i}", "f", [], i) for i in range(6)]
    out = submit(s, tasks, [t[0] for t in tasks])
    assert {c.worker for c in computes(out)} == {"w1"}
    add_workers(s, ("w2", 2))
    return s


def test_steal_request_and_ready_response_moves_task():
    s = _saturated_pair()
    out = s.handle_stimulus(BalanceTick(now=1.0, stimulus_id="tick"))
    reqs = of(out, StealRequest)
    assert len(reqs) == 2 and {r.worker for r in reqs} == {"w1"}
    # lowest priority first: the tasks that would run last
    assert [r.key for r in reqs] == ["t5", "t4"]
    assert s.steals_in_flight()["t5"] == ("w1", "w2")
    # a second tick does not ask again: the thief's room is reserved
    assert not of(s.handle_stimulus(BalanceTick(now=2.0)), StealRequest)
    out = s.handle_stimulus(StealResponse("w1", reqs[0].task_id, "ready", stimulus_id="sr"))
    [ct] = computes(out)
    assert (ct.key, ct.worker) == ("t5", "w2")
    assert not of(out, FreeKeys)               # the victim already dropped it
    assert s.get_task("t5").processing_on_address == "w2"
    assert ("t5", "processing", "processing", "sr", "w2") in s.story("t5")


def test_steal_response_executing_leaves_task():
    s = _saturated_pair()
    reqs = of(s.handle_stimulus(BalanceTick(now=1.0)), StealRequest)
    out = s.handle_stimulus(StealResponse("w1", reqs[0].task_id, "executing"))
    assert out == []
    assert s.get_task(reqs[0].key).processing_on_address == "w1"
    assert reqs[0].key not in s.steals_in_flight()
    # finishing on the victim works normally
    finish(s, ComputeTaskLike("w1", reqs[0].task_id, reqs[0].key))
    assert s.task_state(reqs[0].key) == "memory"


def test_steal_response_after_task_finished_is_ignored():
    s = _saturated_pair()
    reqs = of(s.handle_stimulus(BalanceTick(now=1.0)), StealRequest)
    finish(s, ComputeTaskLike("w1", reqs[0].task_id, reqs[0].key))
    assert s.handle_stimulus(StealResponse("w1", reqs[0].task_id, "memory")) == []
    assert s.task_state(reqs[0].key) == "memory"


def test_steal_thief_gone_redecides():
    s = _saturated_pair()
    reqs = of(s.handle_stimulus(BalanceTick(now=1.0)), StealRequest)
    s.handle_stimulus(RemoveWorker("w2"))
    assert s.steals_in_flight() == {}
    out = s.handle_stimulus(StealResponse("w1", reqs[0].task_id, "ready"))
    assert out == []                            # request voided with the thief


def test_no_stealing_of_restricted_or_when_disabled():
    s = new_state(worker_saturation=float("inf"), work_stealing=False)
    add_workers(s, "w1")
    tasks = [(f"t{i}", "f", [], i) for i in range(4)]
    submit(s, tasks, [t[0] for t in tasks])
    add_workers(s, "w2")
    assert s.handle_stimulus(BalanceTick()) == []
    s2 = new_state(worker_saturation=float("inf"))
    add_workers(s2, "w1")
    submit(s2, tasks, [t[0] for t in tasks], workers={t[0]: "w1" for t in tasks},
           allow_other_workers=True)
    add_workers(s2, "w2")
    assert s2.handle_stimulus(BalanceTick()) == []


def test_expensive_transfer_is_not_stolen():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, ("w1", 1))
    out = submit(s, [("big", "f", [], 0)], ["big"])
    finish(s, computes(out)[0], nbytes=10**10)           # 100 s to move at 100 MB/s
    tasks = [(f"t{i}", "f", ["big"], i) for i in range(4)]
    submit(s, tasks, [t[0] for t in tasks], sid="g2")
    add_workers(s, ("w2", 1))
    assert of(s.handle_stimulus(BalanceTick()), StealRequest) == []


class ComputeTaskLike:
    def __init__(self, worker, task_id, key):
        self.worker, self.task_id, self.key = worker, task_id, key


# --------------------------------------------------------------------------
# retirement, workers, introspection
# --------------------------------------------------------------------------

def test_retire_workers_moves_unique_data():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0), ("b", "f", [], 1)], ["a", "b"],
                 workers={"a": "w1", "b": "w2"})
    run_all(s, out, nbytes=100)
    out = s.handle_stimulus(RetireWorkers(["w1"], stimulus_id="retire"))
    [ar] = of(out, AcquireReplicas)
    assert ar.worker == "w2" and [e[1] for e in ar.who_has] == ["a"]
    assert ar.who_has[0][3] == ("w1",)
    [wr] = of(out, WorkersRetiring)
    assert wr.workers == ["w1"] and wr.n_replicas == 1
    assert s.retiring_workers() == ["w1"] and not s.can_close("w1")
    # new work avoids the retiring worker
    out = submit(s, [("c", "f", [], 2)], ["c"], sid="g2")
    assert computes(out)[0].worker == "w2"
    s.handle_stimulus(AddKeys("w2", ["a"]))
    assert s.can_close("w1")
    out = s.handle_stimulus(RemoveWorker("w1", safe=True))
    assert s.task_state("a") == "memory" and s.who_has(["a"]) == {"a": ["w2"]}


def test_retire_picks_least_loaded_and_keeps_one():
    s = new_state()
    add_workers(s, "w1", "w2", "w3")
    out = submit(s, [("a", "f", [], 0)], ["a"], workers={"a": "w2"})
    run_all(s, out, nbytes=1000)
    out = s.handle_stimulus(RetireWorkers(n=5))
    [wr] = of(out, WorkersRetiring)
    assert len(wr.workers) == 2 and "w2" not in wr.workers[:1]
    assert len(s.retiring_workers()) == 2


def test_duplicate_worker_rejected():
    s = new_state()
    add_workers(s, "w1")
    with pytest.raises(ValueError, match="already registered"):
        s.handle_stimulus(AddWorker("w1"))
    with pytest.raises(ValueError):
        s.handle_stimulus(AddWorker("w2", nthreads=0))
    assert list(s.workers) == ["w1"]


def test_heartbeat_and_stale_workers():
    s = new_state()
    s.handle_stimulus(AddWorker("w1", now=10.0), AddWorker("w2", now=10.0))
    s.handle_stimulus(WorkerHeartbeat("w1", {"memory": 5}, now=100.0))
    assert s.stale_workers(now=105.0, timeout=60.0) == ["w2"]
    assert s.worker_info("w1")["metrics"] == {"memory": 5}


def test_remove_unknown_worker_is_noop():
    s = new_state()
    assert s.handle_stimulus(RemoveWorker("ghost")) == []


def test_adaptive_target():
    s = new_state(unknown_task_duration=1.0)
    assert s.adaptive_target() == 0
    tasks = [(f"t{i}", "f", [], i) for i in range(20)]
    submit(s, tasks, [t[0] for t in tasks])
    # 20 s of work with no workers (1 thread assumed), 5 s target: 4 workers
    assert s.adaptive_target(target_duration=5.0) == 4
    add_workers(s, ("w1", 2))
    # same work, 2 threads per worker now: 2 workers
    assert s.adaptive_target(target_duration=5.0) == 2
    assert s.adaptive_target(target_duration=1000.0) == 1


def test_adaptive_target_memory():
    s = new_state()
    s.handle_stimulus(AddWorker("w1", nthreads=1, memory_limit=1000))
    s.handle_stimulus(UpdateData("c", {"d": ["w1"]}, {"d": 900}))
    assert s.adaptive_target() == 2           # 900 bytes at 60% of 1000 per worker


def test_workers_to_close_and_info():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0)], ["a"], workers={"a": "w1"})
    assert s.workers_to_close(1) == ["w2"]
    info = s.worker_info()
    assert info["w1"]["processing"] == 1 and info["w2"]["processing"] == 0
    assert s.nthreads() == {"w1": 1, "w2": 1}
    assert s.task_states(["a", "zz"]) == {"a": "processing", "zz": "forgotten"}


# --------------------------------------------------------------------------
# story, invalid transitions, robustness
# --------------------------------------------------------------------------

def test_story_content():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0)], ["x"], sid="graph-1")
    finished(s, "w1", computes(out)[0].task_id, 8, "int", 0.1, "done-1")
    story = s.story("x")
    assert story[-1] == ("x", "processing", "memory", "done-1", "w1")
    assert story[0] == ("x", "released", "queued", "graph-1", None)
    # by stimulus id
    assert {e[0] for e in s.story("done-1")} == {"x"}


def test_story_log_is_bounded():
    s = new_state(transition_log_length=10)
    add_workers(s, "w1")
    tasks = [(f"t{i}", "f", [], i) for i in range(20)]
    run_all(s, submit(s, tasks, [t[0] for t in tasks]))
    everything = s.story(*[t[0] for t in tasks])
    assert len(everything) == 10
    assert everything[-1][0] == "t19"


def test_invalid_transition_raises_with_story():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0)], ["x"], sid="graph-1")
    finish(s, computes(out)[0])
    with pytest.raises(InvalidTransition) as info:
        s.transition("x", "processing")
    err = info.value
    assert (err.key, err.start, err.finish) == ("x", "memory", "processing")
    assert ("x", "queued", "processing", "graph-1", "w1") in err.story
    assert "memory -> processing" in str(err) and "graph-1" in str(err)
    with pytest.raises(InvalidTransition):
        s.transition("never-seen", "waiting")


def test_manual_transition_follows_recommendations():
    s = new_state()
    add_workers(s, "w1")
    submit(s, [("x", "f", [], 0)], ["x"])
    out = s.transition("x", "memory")          # as if w1 reported it
    assert of(out, KeyInMemory)[0].key == "x"


def test_unknown_task_finished_frees_it():
    s = new_state()
    add_workers(s, "w1")
    out = finished(s, "w1", 12345, 8, "int", 0.1, "stale")
    [fk] = of(out, FreeKeys)
    assert fk.task_ids == [12345]
    out = s.handle_stimulus(TaskFinished("w1", key="nope", stimulus_id="stale2"))
    assert of(out, FreeKeys)[0].keys == ["nope"]


def test_task_finished_by_key_and_erred_by_key():
    s = new_state()
    add_workers(s, "w1")
    submit(s, [("x", "f", [], 0), ("y", "f", [], 1)], ["x", "y"])
    out = s.handle_stimulus(TaskFinished("w1", key="x", nbytes=3),
                            TaskErred("w1", key="y", exception=KeyError("k")))
    assert s.task_state("x") == "memory" and s.task_state("y") == "erred"
    assert {type(i) for i in out} == {KeyInMemory, TaskErredReport, FreeKeys}


def test_duplicate_result_adds_replica():
    s = _saturated_pair()
    reqs = of(s.handle_stimulus(BalanceTick()), StealRequest)
    out = s.handle_stimulus(StealResponse("w1", reqs[0].task_id, "ready"))
    [ct] = computes(out)
    # the victim computed it anyway (race): accepted, the thief is told to drop it
    out = finished(s, "w1", ct.task_id, 8, "int", 0.1, "race")
    assert s.task_state(ct.key) == "memory"
    assert freed(out) == {"w2": [ct.key]}
    out = finished(s, "w2", ct.task_id, 8, "int", 0.1, "race2")
    assert sorted(s.who_has([ct.key])[ct.key]) == ["w1", "w2"]


def test_erred_report_from_wrong_worker_ignored():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("x", "f", [], 0)], ["x"], workers={"x": "w1"})
    ct = computes(out)[0]
    assert erred(s, "w2", ct.task_id, RuntimeError()) == []
    assert s.task_state("x") == "processing"


def test_handle_stimulus_type_check():
    s = new_state()
    with pytest.raises(TypeError):
        s.handle_stimulus("not an event")


def test_constructor_validation():
    with pytest.raises(ValueError):
        SchedulerState(worker_saturation=0)
    with pytest.raises(ValueError):
        SchedulerState(bandwidth=0)


def test_reprs():
    s = new_state()
    out = add_workers(s, "w1") + submit(s, [("x", "f", [], 0)], ["x"])
    assert "ComputeTask(worker='w1'" in repr(computes(out)[0])
    assert computes(out)[0].to_dict()["key"] == "x"
    assert "UpdateGraph(client='c'" in repr(UpdateGraph("c", [], []))
    assert "processing=1" in repr(s) and "<TaskState 'x'" in repr(s.get_task("x"))


# --------------------------------------------------------------------------
# more paths
# --------------------------------------------------------------------------

def test_self_dependency_is_an_error():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", ["x"], 0)], ["x"])
    [r] = of(out, TaskErredReport)
    assert isinstance(r.exception, MissingDependencyError) and "itself" in str(r.exception)


def test_missing_data_with_other_replica_keeps_task():
    s = new_state()
    add_workers(s, "w1", "w2")
    out = submit(s, [("a", "f", [], 0)], ["a"], workers={"a": "w1"})
    finish(s, computes(out)[0])
    s.handle_stimulus(AddKeys("w2", ["a"]))
    out = s.handle_stimulus(MissingData("a", holder="w1", reporter="w2"))
    assert out == [] and s.who_has(["a"]) == {"a": ["w2"]} and s.task_state("a") == "memory"


def test_resources_and_worker_restrictions_combined():
    s = new_state()
    add_workers(s, ("g1", 1, {"GPU": 1}), ("g2", 1, {"GPU": 1}), ("c1", 4))
    out = submit(s, [("x", "f", [], 0)], ["x"], workers={"x": ["g2", "c1"]},
                 resources={"x": {"GPU": 1}})
    assert computes(out)[0].worker == "g2"


def test_released_with_dependents_is_forgotten_when_they_are():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("a", "f", [], 0), ("b", "g", ["a"], 1)], ["a", "b"])
    run_all(s, out)
    s.handle_stimulus(ClientReleasesKeys("c1", ["a"]))
    assert s.task_state("a") == "released"          # b may need it again
    assert s.get_task("a").dependent_keys == ["b"]
    out = s.handle_stimulus(ClientReleasesKeys("c1", ["b"]))
    assert s.tasks == {} and freed(out) == {"w1": ["b"]}


def test_wide_fan_out_forget_compacts_dependents():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, ("w1", 8))
    n = 300                     # validate=True makes each stimulus O(tasks x degree)
    out = submit(s, [("base", "f", [], 0)], ["base"])
    finish(s, computes(out)[0], nbytes=100)
    tasks = [(f"d-{i}", "g", ["base"], i) for i in range(n)]
    out = submit(s, tasks, [t[0] for t in tasks], sid="fan")
    assert len(computes(out)) == n
    run_all(s, out)
    assert s.get_task("base").n_dependents == n
    s.handle_stimulus(ClientReleasesKeys("c1", [t[0] for t in tasks]))
    ts = s.get_task("base")
    assert ts.n_dependents == 0 and ts.dependent_keys == []
    s.handle_stimulus(ClientReleasesKeys("c1", ["base"]))
    assert s.tasks == {}


def test_multiple_stimuli_in_one_call_keep_order():
    s = new_state()
    out = s.handle_stimulus(AddWorker("w1"), UpdateGraph("c", [("x", "f", [], 0)], ["x"]),
                            TaskFinished("w1", 0, 5, "int"), ClientReleasesKeys("c", ["x"]))
    assert [type(i).__name__ for i in out] == ["ComputeTask", "KeyInMemory", "FreeKeys"]
    assert s.tasks == {}


def test_heartbeat_unknown_worker_noop():
    s = new_state()
    assert s.handle_stimulus(WorkerHeartbeat("ghost", {}, now=1.0)) == []


def test_who_has_defaults_and_processing_views():
    s = new_state()
    add_workers(s, "w1")
    out = submit(s, [("x", "f", [], 0), ("y", "f", [], 1)], ["x", "y"])
    finish(s, computes(out)[0])
    assert s.who_has() == {"x": ["w1"]}
    assert s.processing() == {"w1": ["y"]}
    assert s.has_what(["w1", "nobody"]) == {"w1": ["x"], "nobody": []}


def test_state_is_freed_when_dropped():
    """TaskState is not GC-tracked: the state breaks the cycles itself."""
    import gc
    import tracemalloc

    def workload():
        s = new_state(validate=False)
        add_workers(s, ("w1", 2), ("w2", 2))
        tasks, root = tree_graph(256)
        out = submit(s, tasks, [root, tasks[3][0]])
        s.handle_stimulus(ClientWantsKeys("c2", [root]))
        # an erred chain (self-blame), stolen/cancelled bits, scattered data
        out2 = submit(s, [("e", "f", [], 0), ("e2", "f", ["e"], 1)], ["e2"], sid="e")
        for ct in computes(out2):
            erred(s, ct.worker, ct.task_id, RuntimeError("x"))
        s.handle_stimulus(UpdateData("c1", {"data": ["w1"]}, {"data": 10}))
        run_all(s, out)
        del s

    workload()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(5):
        workload()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 200_000, grown


def test_killed_worker_message_and_pickle():
    import pickle
    exc = KilledWorker("k", "tcp://w:1", 3)
    assert pickle.loads(pickle.dumps(exc)).key == "k"
    err = pickle.loads(pickle.dumps(MissingDependencyError("a", ["b"])))
    assert err.missing == ("b",)
    inv = pickle.loads(pickle.dumps(InvalidTransition("a", "memory", "processing")))
    assert inv.start == "memory"


def test_regression_lost_input_of_resource_queued_task():
    """Found by the fuzzer: a worker leaves holding the input of a task queued
    on resources.  "Start over" (input lost) must win over "re-place it"
    (worker set changed), or the task would sit in no-worker without input."""
    s = new_state(allowed_failures=0)
    submit(s, [("a", "f", [], 0), ("b", "g", ["a"], 1)], ["b"], resources={"b": {"GPU": 1}})
    out = add_workers(s, ("w0", 2, {"GPU": 1}))
    [ct_a] = computes(out)
    out = submit(s, [("c", "f", [], 0)], ["c"], resources={"c": {"GPU": 1}}, sid="g2")
    assert computes(out)[0].key == "c"                 # holds the only GPU
    finish(s, ct_a)
    assert s.task_state("b") == "queued"               # waits for the GPU
    out = s.handle_stimulus(RemoveWorker("w0"))
    assert s.task_state("a") == "queued"               # recompute the lost input
    assert s.task_state("b") == "waiting"
    assert s.task_state("c") == "erred"                # allowed_failures=0
    out = add_workers(s, ("w1", 1, {"GPU": 1}))
    run_all(s, out)
    assert s.task_state("b") == "memory"


def test_root_queue_lazy_deletion_and_compaction():
    s = new_state(validate=False)          # O(n) validation per stimulus: too slow here
    tasks = [(f"r-{i}", "f", [], i) for i in range(3000)]
    submit(s, tasks, [t[0] for t in tasks])
    assert s.state_counts()["queued"] == 3000
    # cancel most of them one by one: stale heap entries pile up, then compact
    for i in range(0, 2900):
        s.handle_stimulus(Cancel("c1", [f"r-{i}"]))
    s.validate_state()
    assert s.queued_keys() == [f"r-{i}" for i in range(2900, 3000)]
    # resubmitted keys are queued again (new ids); at equal user priority an
    # older graph goes first
    submit(s, tasks[:5], [t[0] for t in tasks[:5]], sid="again")
    assert s.queued_keys()[-5:] == [f"r-{i}" for i in range(5)]
    out = add_workers(s, ("w1", 1))
    assert [c.key for c in computes(out)] == ["r-2900", "r-2901"]
    s.validate_state()
    run_all(s, out)
    assert s.state_counts()["memory"] == 105
    s.validate_state()


def test_long_running_task_frees_its_slot():
    """Tasks that secede (they wait on tasks they submitted) must not hold the
    slots the sub-tasks need, or the queue deadlocks."""
    s = new_state(worker_saturation=1.0)
    add_workers(s, ("w1", 2))
    out = submit(s, [("parent-0", "f", [], 0), ("parent-1", "f", [], 1)],
                 ["parent-0", "parent-1"])
    parents = computes(out)
    assert len(parents) == 2 and s.worker_info("w1")["processing"] == 2
    # the parents submit children and wait for them: no slot left
    out = submit(s, [(f"child-{i}", "g", [], i) for i in range(4)],
                 [f"child-{i}" for i in range(4)], sid="children")
    assert not computes(out) and s.state_counts()["queued"] == 4
    out0 = long_running(s, "w1", parents[0].task_id, "secede-0")
    assert [c.key for c in computes(out0)] == ["child-0"]
    out = s.handle_stimulus(TaskLongRunning("w1", parents[1].task_id, stimulus_id="secede-1"))
    assert [c.key for c in computes(out)] == ["child-1"]
    out = out0 + out
    info = s.worker_info("w1")
    assert info["long_running"] == 2 and s.workers["w1"].slots == 4
    assert s.occupancy()["w1"] == pytest.approx(2 * 0.5)   # seceded tasks hold no thread
    # a repeated report changes nothing
    assert long_running(s, "w1", parents[0].task_id) == []
    run_all(s, out)
    assert all(s.task_state(f"child-{i}") == "memory" for i in range(4))
    # the parents finish: their extra slots go away
    for p in parents:
        finish(s, p)
    assert s.workers["w1"].slots == 2 and s.worker_info("w1")["long_running"] == 0


def test_long_running_task_is_not_stolen_and_worker_death_resets():
    s = new_state(worker_saturation=float("inf"))
    add_workers(s, ("w1", 1))
    out = submit(s, [(f"t{i}", "f", [], i) for i in range(3)], ["t0", "t1", "t2"])
    cts = computes(out)
    for ct in cts:
        long_running(s, "w1", ct.task_id)
    add_workers(s, ("w2", 1))
    assert of(s.handle_stimulus(BalanceTick()), StealRequest) == []
    # stale / wrong-worker reports are ignored
    assert long_running(s, "w2", cts[0].task_id) == []
    assert long_running(s, "w1", 999) == []
    out = s.handle_stimulus(RemoveWorker("w1"))
    assert {c.worker for c in computes(out)} == {"w2"}
    assert s.worker_info("w2")["long_running"] == 0


# --------------------------------------------------------------------------
# paused workers (over their memory pause threshold: worker_memory.py)
# --------------------------------------------------------------------------

def _pause(s, worker, paused, now=10.0):
    return s.handle_stimulus(WorkerHeartbeat(worker, {"paused": paused}, now=now))


def test_paused_worker_gets_no_new_tasks_and_resumes():
    s = new_state()
    add_workers(s, "w1", "w2")
    _pause(s, "w1", True)
    assert s.worker_info("w1")["status"] == "paused"
    tasks = [(f"t{i}", "f", [], i) for i in range(4)]
    out = submit(s, tasks, [t[0] for t in tasks])
    assert {c.worker for c in computes(out)} == {"w2"}
    # Unpaused: the queued root tasks flow to it again.
    out = _pause(s, "w1", False, now=11.0)
    assert s.worker_info("w1")["status"] == "running"
    assert {c.worker for c in computes(out)} == {"w1"}


def test_queued_tasks_are_stolen_from_a_paused_worker():
    s = _saturated_pair()                  # w1 holds six tasks, w2 (2 threads) is idle
    _pause(s, "w1", True)
    reqs = of(s.handle_stimulus(BalanceTick(now=20.0)), StealRequest)
    assert reqs and {r.worker for r in reqs} == {"w1"}


def test_only_paused_worker_with_nothing_running_elsewhere_is_not_left_alone():
    s = new_state()
    add_workers(s, "w1", "w2")
    _pause(s, "w1", True)
    # A paused worker may retire while a running one stays to take its data...
    out = s.handle_stimulus(RetireWorkers(["w1"], stimulus_id="retire-paused"))
    assert of(out, WorkersRetiring)[0].workers == ["w1"]
    # ...but the last running worker may not.
    s2 = new_state()
    add_workers(s2, "w1", "w2")
    _pause(s2, "w1", True)
    out = s2.handle_stimulus(RetireWorkers(["w1", "w2"], stimulus_id="retire-all"))
    assert of(out, WorkersRetiring)[0].workers == ["w1"]
