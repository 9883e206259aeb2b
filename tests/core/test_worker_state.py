"""The worker's task-state machine, driven with events only (no I/O).

Every test runs the machine with validate=True, so each transition and each
handle_stimulus call also checks the machine's invariants.
"""
import pickle

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from taskcore.core.worker_state import (
    STATES,
    TRANSITIONS,
    AcquireReplicas,
    AddKeysMsg,
    ComputeTask,
    DropData,
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    FindMissing,
    FindMissingResult,
    FreeKeys,
    GatherDep,
    GatherDepBusy,
    GatherDepFailure,
    GatherDepNetworkFailure,
    GatherDepSuccess,
    InvalidTaskState,
    InvalidTransition,
    LongRunningMsg,
    MissingDataMsg,
    PauseEvent,
    ReleaseWorkerDataMsg,
    RemoveReplicas,
    RemoveWorker,
    RequestRefreshWhoHas,
    RescheduleEvent,
    RescheduleMsg,
    RetryBusyWorker,
    RetryBusyWorkerLater,
    SecedeEvent,
    StealRequest,
    StealResponseMsg,
    TaskErredMsg,
    TaskFinishedMsg,
    UnpauseEvent,
    UpdateData,
    WorkerState,
)
from taskcore.errors import TaskcoreError

ME = "tcp://10.0.0.1:9000"
LOCAL = "tcp://10.0.0.1:9001"  # same host as ME
A = "tcp://10.0.0.2:9000"
B = "tcp://10.0.0.3:9000"
C = "tcp://10.0.0.4:9000"
MB = 1_000_000


def make_ws(nthreads=1, **kwargs):
    kwargs.setdefault("validate", True)
    kwargs.setdefault("address", ME)
    return WorkerState(nthreads, **kwargs)


def compute(tid, deps=(), priority=(0,), resources=None, stim=None, key=None):
    """deps: iterable of (dep id, nbytes, [holders])."""
    who_has = [(d, f"k{d}", nb, list(h)) for d, nb, h in deps]
    return ComputeTask(tid, key or f"k{tid}", f"spec{tid}", priority, stim or f"compute-{tid}",
                       who_has=who_has or None, resource_restrictions=resources)


def success(tid, nbytes=8, stim=None):
    return ExecuteSuccess(tid, nbytes, "int", 1.0, 2.0, stim or f"success-{tid}")


def run_task(ws, tid, nbytes=8):
    """compute → Execute → success, as the server would (two calls)."""
    assert tid in executed(ws.handle_stimulus(compute(tid)))
    return ws.handle_stimulus(success(tid, nbytes))


def of(instrs, cls):
    return [i for i in instrs if type(i) is cls]


def executed(instrs):
    return [i.id for i in of(instrs, Execute)]


# ---------------------------------------------------------------------------
# Basics
# ---------------------------------------------------------------------------
def test_simple_compute():
    ws = make_ws()
    instrs = ws.handle_stimulus(compute(1, stim="s1"))
    assert instrs == [Execute(1, "k1", "spec1", "s1")]
    assert ws.state_of(1) == "executing"
    assert ws.executing_count == 1
    instrs = ws.handle_stimulus(ExecuteSuccess(1, 123, "int", 1.0, 2.5, "s2"))
    assert instrs == [TaskFinishedMsg(1, "k1", 123, "int", 1.0, 2.5, "s2")]
    assert ws.state_of(1) == "memory"
    assert ws.memory_bytes == 123
    assert ws.executing_count == 0
    assert ws.task_counts == {"memory": 1}
    assert ws.memory_ids == [1]
    assert ws.story("k1") == [
        ("k1", "compute-task", "s1"),
        ("k1", "released", "waiting", "s1"),
        ("k1", "waiting", "ready", "s1"),
        ("k1", "ready", "executing", "s1"),
        ("k1", "executing", "memory", "s2"),
    ]
    assert ws.story(1) == ws.story("k1") == ws.story(ws.get_task(1))


def test_compute_again_while_running_or_done():
    ws = make_ws()
    ws.handle_stimulus(compute(1))
    assert ws.handle_stimulus(compute(1)) == []          # already executing
    ws.handle_stimulus(success(1, 10))
    instrs = ws.handle_stimulus(compute(1, stim="again"))
    assert instrs == [TaskFinishedMsg.match(id=1, nbytes=10, stimulus_id="again")]


def test_tuple_keys_and_large_ids():
    ws = make_ws()
    tid = 2**40 + 7
    instrs = ws.handle_stimulus(compute(tid, key=("x", 3)))
    assert instrs == [Execute.match(id=tid, key=("x", 3))]
    ws.handle_stimulus(success(tid))
    assert ws.story(("x", 3))[0] == (("x", 3), "compute-task", f"compute-{tid}")


def test_nthreads_limit():
    ws = make_ws(nthreads=2)
    instrs = ws.handle_stimulus(compute(1), compute(2), compute(3))
    assert executed(instrs) == [1, 2]
    assert ws.ready_count == 1
    instrs = ws.handle_stimulus(success(2))
    assert executed(instrs) == [3]
    assert ws.heartbeat()["executing"] == 2


def test_priority_order_of_ready_tasks():
    ws = make_ws(nthreads=1)
    ws.handle_stimulus(compute(100, priority=(-10,)))         # occupies the slot
    ws.handle_stimulus(
        compute(1, priority=(0, 5)),
        compute(2, priority=(0, 1)),
        compute(3, priority=(-1, 9)),
        compute(4, priority=(0,)),        # shorter tuple sorts first, as in Python
        compute(5, priority=(0, 1)),      # tie with 2: FIFO
    )
    order = []
    done = 100
    while True:
        instrs = ws.handle_stimulus(success(done))
        ids = executed(instrs)
        if not ids:
            break
        order += ids
        done = ids[0]
    assert order == [3, 4, 2, 5, 1]


def test_batch_is_prioritised_before_starting():
    ws = make_ws(nthreads=1)
    instrs = ws.handle_stimulus(compute(1, priority=(5,)), compute(2, priority=(1,)))
    assert executed(instrs) == [2]


def test_priority_validation():
    ws = make_ws()
    with pytest.raises(ValueError, match="at most 4"):
        ws.handle_stimulus(compute(1, priority=(1, 2, 3, 4, 5)))
    with pytest.raises(TypeError):
        ws.handle_stimulus(compute(1, priority=("a",)))
    assert len(ws) == 0                      # rejected before any change
    ws.handle_stimulus(compute(1, priority=[3, 4]))   # any sequence of ints
    assert ws.get_task(1).priority == (3, 4)


def test_pause_unpause():
    ws = make_ws(nthreads=2)
    ws.handle_stimulus(PauseEvent("p"))
    assert ws.handle_stimulus(compute(1), compute(2, deps=[(3, 10, [A])])) == []
    assert ws.paused
    instrs = ws.handle_stimulus(UnpauseEvent("u"))
    assert executed(instrs) == [1]
    assert of(instrs, GatherDep) == [GatherDep(A, [3], ["k3"], 10, "u")]


def test_unknown_event_type():
    ws = make_ws()
    with pytest.raises(TypeError):
        ws.handle_stimulus(object())


def test_constructor_validation():
    with pytest.raises(ValueError):
        WorkerState(0)
    with pytest.raises(ValueError):
        WorkerState(1, max_concurrent_transfers=0)


# ---------------------------------------------------------------------------
# Dependencies and fetching
# ---------------------------------------------------------------------------
def test_dependencies_batched_per_peer():
    ws = make_ws()
    instrs = ws.handle_stimulus(
        compute(1, deps=[(10, 100, [A]), (11, 200, [A]), (12, 300, [B])], stim="c"))
    gathers = sorted(of(instrs, GatherDep), key=lambda g: g.worker)
    assert [(g.worker, sorted(g.ids), g.total_nbytes) for g in gathers] == [
        (A, [10, 11], 300), (B, [12], 300)]
    assert ws.state_of(1) == "waiting"
    assert ws.in_flight_bytes == 600
    assert ws.transfers_in_flight == 2
    assert ws.in_flight_workers == {A: gathers[0].ids, B: [12]}
    assert ws.get_task(1).waiting_for_data == 3

    instrs = ws.handle_stimulus(GatherDepSuccess(A, {10: 100, 11: 200}, "ga"))
    assert instrs == [AddKeysMsg([10, 11], "ga")]
    instrs = ws.handle_stimulus(GatherDepSuccess(B, {12: 300}, "gb"))
    assert instrs == [Execute(1, "k1", "spec1", "gb"), AddKeysMsg([12], "gb")]
    assert ws.dependency_keys(1) == ["k10", "k11", "k12"]
    assert ws.memory_bytes == 600
    ws.handle_stimulus(success(1))
    # fetched replicas stay until the scheduler frees them
    assert ws.memory_ids == [1, 10, 11, 12]
    instrs = ws.handle_stimulus(FreeKeys([10], "free"))
    # the scheduler asked for it: no ReleaseWorkerDataMsg back (it already knows)
    assert instrs == [DropData(10, "k10", "free")]
    assert 10 not in ws


def test_shared_dependency_fetched_once():
    ws = make_ws(nthreads=2)
    instrs = ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]), compute(2, deps=[(10, 5, [A])]))
    assert of(instrs, GatherDep) == [GatherDep.match(worker=A, ids=[10])]
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {10: 5}, "g"))
    assert sorted(executed(instrs)) == [1, 2]


def test_dependency_already_in_memory():
    ws = make_ws(nthreads=2)
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(success(1))
    instrs = ws.handle_stimulus(compute(2, deps=[(1, 8, [ME])]))
    assert executed(instrs) == [2]
    assert not of(instrs, GatherDep)


def test_local_chain_without_fetch():
    """A dependency computed here, then its dependent: no transfer at all."""
    ws = make_ws(nthreads=1)
    ws.handle_stimulus(compute(1))
    instrs = ws.handle_stimulus(success(1), compute(2, deps=[(1, 8, [ME])]))
    assert executed(instrs) == [2]


def test_max_transfer_bytes_splits_messages():
    ws = make_ws(max_transfer_bytes=50 * MB)
    instrs = ws.handle_stimulus(compute(1, deps=[(10, 30 * MB, [A]), (11, 30 * MB, [A]),
                                                 (12, 10 * MB, [A])]))
    # one transfer per peer at a time; 30 + 30 > 50 so the first message has one key
    assert of(instrs, GatherDep) == [GatherDep.match(worker=A, ids=[10], total_nbytes=30 * MB)]
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {10: 30 * MB}, "g1"))
    assert of(instrs, GatherDep) == [GatherDep.match(worker=A, ids=[11, 12], total_nbytes=40 * MB)]


def test_first_key_always_fetched_even_if_too_big():
    ws = make_ws(max_transfer_bytes=10, max_in_flight_bytes=10)
    instrs = ws.handle_stimulus(compute(1, deps=[(10, 1000, [A]), (11, 1000, [B])]))
    gathers = of(instrs, GatherDep)
    assert len(gathers) == 1 and gathers[0].total_nbytes == 1000
    # the second waits until the first is back: total in-flight budget
    assert ws.transfers_in_flight == 1
    worker = gathers[0].worker
    instrs = ws.handle_stimulus(GatherDepSuccess(worker, {gathers[0].ids[0]: 1000}, "g"))
    assert len(of(instrs, GatherDep)) == 1


def test_concurrent_transfer_limit():
    ws = make_ws(max_concurrent_transfers=2)
    deps = [(10, 1, [A]), (11, 1, [B]), (12, 1, [C]), (13, 1, [LOCAL])]
    instrs = ws.handle_stimulus(compute(1, deps=deps))
    gathers = of(instrs, GatherDep)
    assert len(gathers) == 2
    assert gathers[0].worker == LOCAL        # same-host peer first
    assert ws.transfers_in_flight == 2
    instrs = ws.handle_stimulus(GatherDepSuccess(gathers[0].worker, {gathers[0].ids[0]: 1}, "g"))
    assert len(of(instrs, GatherDep)) == 1


def test_in_flight_byte_budget():
    ws = make_ws(max_concurrent_transfers=10, max_in_flight_bytes=100)
    deps = [(10, 60, [A]), (11, 60, [B]), (12, 30, [C])]
    instrs = ws.handle_stimulus(compute(1, deps=deps))
    # 60 goes; then 60 would exceed 100; stop (in priority order, FIFO)
    assert [g.ids for g in of(instrs, GatherDep)] == [[10]]
    assert ws.in_flight_bytes == 60


def test_prefers_local_holder():
    ws = make_ws()
    instrs = ws.handle_stimulus(compute(1, deps=[(10, 1, [A, LOCAL, B])]))
    assert of(instrs, GatherDep) == [GatherDep.match(worker=LOCAL, ids=[10])]


def test_prefers_peer_with_more_keys():
    ws = make_ws(max_concurrent_transfers=1)
    instrs = ws.handle_stimulus(compute(1, deps=[(10, 1, [A, B]), (11, 1, [B])]))
    assert of(instrs, GatherDep) == [GatherDep.match(worker=B, ids=[10, 11])]


def test_ties_rotate_deterministically():
    """Equal priority, locality, busyness and batch size: round robin."""
    def run():
        ws = make_ws(max_concurrent_transfers=1)
        chosen = []
        for i in range(4):
            instrs = ws.handle_stimulus(compute(i, deps=[(100 + i, 1, [A, B])]))
            (g,) = of(instrs, GatherDep)
            chosen.append(g.worker)
            ws.handle_stimulus(GatherDepSuccess(g.worker, {100 + i: 1}, "ok"))
        return chosen

    first = run()
    assert first == run()                                 # deterministic
    assert first == [A, B, A, B]                          # and spread


def test_least_busy_peer_preferred():
    ws = make_ws(max_concurrent_transfers=1)
    instrs = ws.handle_stimulus(compute(1, deps=[(10, 1, [A, B])]))
    first = of(instrs, GatherDep)[0].worker
    other = B if first == A else A
    instrs = ws.handle_stimulus(GatherDepBusy(first, "busy"))
    assert instrs[0] == RetryBusyWorkerLater(first, "busy")
    assert of(instrs, GatherDep) == [GatherDep.match(worker=other, ids=[10])]
    ws.handle_stimulus(RetryBusyWorker(first, "retry"))
    ws.handle_stimulus(GatherDepSuccess(other, {10: 1}, "ok"))
    # next time both hold a key, the peer that was busy comes second
    instrs = ws.handle_stimulus(compute(2, deps=[(20, 1, [A, B])]))
    assert of(instrs, GatherDep)[0].worker == other


def test_network_failure_tries_another_holder():
    ws = make_ws()
    instrs = ws.handle_stimulus(compute(1, deps=[(10, 5, [A, B]), (11, 5, [A])]))
    g = of(instrs, GatherDep)
    assert [x.worker for x in g] == [A]        # A has more keys
    instrs = ws.handle_stimulus(GatherDepNetworkFailure(A, "net"))
    # 10 is fetched from B; 11 has no holder left
    assert of(instrs, GatherDep) == [GatherDep.match(worker=B, ids=[10])]
    assert of(instrs, RequestRefreshWhoHas) == [RequestRefreshWhoHas([11], "net")]
    assert ws.state_of(11) == "missing"
    assert ws.missing_ids == [11]
    assert A not in ws.has_what
    assert ("k10", "gather-network-failure", "net") in ws.story(10)


def test_all_holders_fail_then_found():
    ws = make_ws()
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    instrs = ws.handle_stimulus(GatherDepNetworkFailure(A, "net"))
    assert instrs == [RequestRefreshWhoHas([10], "net")]
    assert ws.state_of(10) == "missing"
    # the periodic poll asks again
    assert ws.handle_stimulus(FindMissing("poll")) == [RequestRefreshWhoHas([10], "poll")]
    # the scheduler does not know either
    assert ws.handle_stimulus(FindMissingResult({10: []}, "r0")) == []
    instrs = ws.handle_stimulus(FindMissingResult({10: [B]}, "r1"))
    assert instrs == [GatherDep(B, [10], ["k10"], 5, "r1")]
    instrs = ws.handle_stimulus(GatherDepSuccess(B, {10: 5}, "ok"))
    assert executed(instrs) == [1]


def test_peer_without_the_key():
    ws = make_ws()
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A, B]), (11, 5, [A])]))
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {11: 5}, "partial"))
    assert MissingDataMsg(10, "k10", A, "partial") in instrs
    assert of(instrs, GatherDep) == [GatherDep.match(worker=B, ids=[10])]
    assert ws.get_task(10).who_has == [B]


def test_peer_without_the_key_and_no_other_holder():
    ws = make_ws()
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {}, "empty"))
    assert instrs == [MissingDataMsg(10, "k10", A, "empty"), RequestRefreshWhoHas([10], "empty")]


def test_busy_peer_retried_later():
    ws = make_ws()
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    instrs = ws.handle_stimulus(GatherDepBusy(A, "busy"))
    assert instrs == [RetryBusyWorkerLater(A, "busy"), RequestRefreshWhoHas([10], "busy")]
    assert ws.state_of(10) == "fetch"
    assert ws.busy_workers == {A}
    # more keys on the busy peer wait too
    assert of(ws.handle_stimulus(compute(2, deps=[(20, 5, [A])])), GatherDep) == []
    instrs = ws.handle_stimulus(RetryBusyWorker(A, "retry"))
    assert instrs == [GatherDep(A, [10, 20], ["k10", "k20"], 10, "retry")]


def test_gather_failure_errs_the_dependency():
    ws = make_ws()
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    exc = ValueError("cannot deserialize")
    instrs = ws.handle_stimulus(GatherDepFailure(A, exc, None, "fail"))
    assert instrs == [TaskErredMsg(10, "k10", exc, None, 0.0, 0.0, "fail")]
    assert ws.state_of(10) == "error"
    assert ws.state_of(1) == "waiting"
    # the scheduler gives up on 1: both go away
    ws.handle_stimulus(FreeKeys([1], "free"))
    assert len(ws) == 0


def test_remove_worker():
    ws = make_ws(max_concurrent_transfers=1)
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A]), (11, 5, [B])]))
    assert ws.in_flight_workers.keys() == {A}
    instrs = ws.handle_stimulus(RemoveWorker(B, "gone"))
    assert instrs == [RequestRefreshWhoHas([11], "gone")]
    assert ws.state_of(11) == "missing"


def test_dependent_released_before_fetch():
    ws = make_ws(max_concurrent_transfers=1)
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A]), (11, 5, [B])]))
    instrs = ws.handle_stimulus(FreeKeys([1], "free"))
    assert instrs == []
    # 11 (fetch) is gone; 10 (flight) is cancelled until its transfer returns
    assert 11 not in ws and 1 not in ws
    assert ws.state_of(10) == "cancelled"
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {10: 5}, "late"))
    assert instrs == [DropData(10, "k10", "late")]
    assert len(ws) == 0
    assert ws.transfers_in_flight == 0 and ws.in_flight_bytes == 0


def test_cancelled_flight_needed_again():
    ws = make_ws()
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    ws.handle_stimulus(FreeKeys([1], "free"))
    assert ws.state_of(10) == "cancelled"
    instrs = ws.handle_stimulus(compute(2, deps=[(10, 5, [A])]))
    assert instrs == []                                   # still in flight
    assert ws.state_of(10) == "flight"
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {10: 5}, "g"))
    assert executed(instrs) == [2]


def test_cancelled_flight_then_compute_requested_transfer_succeeds():
    ws = make_ws()
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    ws.handle_stimulus(FreeKeys([1], "free"))
    ws.handle_stimulus(compute(10, stim="c10"))
    t = ws.get_task(10)
    assert (t.state, t.previous, t.next) == ("resumed", "flight", "waiting")
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {10: 5}, "g"))
    # the scheduler asked us to compute it; the transfer got it: report it done
    assert instrs == [TaskFinishedMsg.match(id=10, nbytes=5, stimulus_id="g")]


def test_cancelled_flight_then_compute_requested_transfer_fails():
    ws = make_ws()
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    ws.handle_stimulus(FreeKeys([1], "free"))
    ws.handle_stimulus(compute(10))
    instrs = ws.handle_stimulus(GatherDepNetworkFailure(A, "net"))
    assert executed(instrs) == [10]
    instrs = ws.handle_stimulus(success(10))
    assert of(instrs, TaskFinishedMsg)


# ---------------------------------------------------------------------------
# Errors, cancellation, resumption during execution
# ---------------------------------------------------------------------------
def test_task_error_and_retry():
    ws = make_ws()
    ws.handle_stimulus(compute(1))
    exc, tb = object(), object()
    instrs = ws.handle_stimulus(ExecuteFailure(1, exc, tb, 1.0, 2.0, "fail"))
    assert instrs == [TaskErredMsg(1, "k1", exc, tb, 1.0, 2.0, "fail")]
    assert ws.state_of(1) == "error"
    assert ws.get_task(1).exception is exc
    instrs = ws.handle_stimulus(compute(1, stim="retry"))
    assert instrs == [Execute(1, "k1", "spec1", "retry")]
    assert ws.get_task(1).exception is None


def test_cancel_during_execute_discards_result():
    ws = make_ws()
    ws.handle_stimulus(compute(1))
    assert ws.handle_stimulus(FreeKeys([1], "free")) == []
    t = ws.get_task(1)
    assert (t.state, t.previous) == ("cancelled", "executing")
    assert ws.executing_count == 1          # the thread still runs
    instrs = ws.handle_stimulus(success(1, stim="late"))
    assert instrs == [DropData(1, "k1", "late")]
    assert 1 not in ws
    assert ws.executing_count == 0
    assert ("k1", "discard-result", "late") in ws.story("k1")


def test_cancel_during_execute_failure_discarded():
    ws = make_ws()
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(FreeKeys([1], "free"))
    assert ws.handle_stimulus(ExecuteFailure(1, "e", "tb", 0.0, 1.0, "f")) == []
    assert 1 not in ws


def test_cancel_during_execute_then_rerequested():
    ws = make_ws()
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(FreeKeys([1], "free"))
    assert ws.handle_stimulus(compute(1, stim="again")) == []    # no second Execute
    assert ws.state_of(1) == "executing"
    instrs = ws.handle_stimulus(success(1, 7, stim="done"))
    assert instrs == [TaskFinishedMsg(1, "k1", 7, "int", 1.0, 2.0, "done")]


def test_executing_task_wanted_as_dependency_resumes():
    """Cancelled while running, then the scheduler says it is in memory elsewhere."""
    ws = make_ws(nthreads=2)
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(FreeKeys([1], "free"))
    instrs = ws.handle_stimulus(compute(2, deps=[(1, 8, [A])]))
    assert instrs == []
    t = ws.get_task(1)
    assert (t.state, t.previous, t.next) == ("resumed", "executing", "fetch")
    instrs = ws.handle_stimulus(success(1, stim="s"))
    assert instrs == [Execute.match(id=2), AddKeysMsg([1], "s")]


def test_resumed_execution_fails_then_fetches():
    ws = make_ws(nthreads=2)
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(FreeKeys([1], "free"))
    ws.handle_stimulus(compute(2, deps=[(1, 8, [A])]))
    instrs = ws.handle_stimulus(ExecuteFailure(1, "e", None, 0.0, 0.0, "f"))
    assert instrs == [GatherDep(A, [1], ["k1"], 8, "f")]
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {1: 8}, "g"))
    assert executed(instrs) == [2]


def test_resumed_then_released_again_then_compute():
    ws = make_ws(nthreads=2)
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(FreeKeys([1], "free"))
    ws.handle_stimulus(compute(2, deps=[(1, 8, [A])]))
    ws.handle_stimulus(FreeKeys([2], "free2"))
    assert ws.get_task(1).state == "cancelled"
    ws.handle_stimulus(compute(1, stim="again"))
    assert ws.state_of(1) == "executing"
    assert of(ws.handle_stimulus(success(1)), TaskFinishedMsg)


def test_reschedule():
    ws = make_ws()
    ws.handle_stimulus(compute(1))
    instrs = ws.handle_stimulus(RescheduleEvent(1, "r"))
    assert instrs == [RescheduleMsg(1, "k1", "r")]
    assert 1 not in ws
    assert ws.executing_count == 0


def test_duplicate_or_unknown_results_are_ignored():
    ws = make_ws()
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(success(1))
    assert ws.handle_stimulus(success(1)) == []
    assert ws.handle_stimulus(success(999)) == []
    assert ws.handle_stimulus(GatherDepSuccess(A, {5: 1}, "x")) == []
    assert ws.handle_stimulus(GatherDepBusy(A, "x")) == []
    assert ws.handle_stimulus(SecedeEvent(1, "x")) == []


# ---------------------------------------------------------------------------
# Steal requests in each state
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["waiting", "ready", "constrained", "executing", "memory",
                                   "unknown", "fetch", "long-running"])
def test_steal_request(state):
    ws = make_ws(nthreads=1, resources={"GPU": 1})
    ws.handle_stimulus(compute(100))                     # occupies the only slot
    if state == "waiting":
        ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    elif state == "ready":
        ws.handle_stimulus(compute(1))
    elif state == "constrained":
        ws.handle_stimulus(compute(1, resources={"GPU": 1}))
    elif state == "executing":
        ws.handle_stimulus(success(100), compute(1))
    elif state == "long-running":
        ws.handle_stimulus(success(100), compute(1))
        ws.handle_stimulus(SecedeEvent(1, "sec"))
    elif state == "memory":
        ws.handle_stimulus(success(100), compute(1))
        ws.handle_stimulus(success(1))
    elif state == "fetch":
        ws.handle_stimulus(compute(2, deps=[(3, 1, [A]), (1, 1, [A])]))
        ws.handle_stimulus(GatherDepBusy(A, "busy"))
    assert ws.state_of(1) == (None if state == "unknown" else state)
    instrs = ws.handle_stimulus(StealRequest(1, "steal"))
    expected_state = None if state == "unknown" else state
    assert instrs[0] == StealResponseMsg(1, None if state == "unknown" else "k1", expected_state,
                                         "steal")
    if state in ("waiting", "ready", "constrained"):
        assert 1 not in ws                                # released and forgotten
        if state == "waiting":
            assert 10 not in ws or ws.state_of(10) == "cancelled"
    elif state != "unknown":
        assert ws.state_of(1) == state


# ---------------------------------------------------------------------------
# Resources, secede
# ---------------------------------------------------------------------------
def test_resources_limit_concurrency():
    ws = make_ws(nthreads=4, resources={"GPU": 2})
    instrs = ws.handle_stimulus(*[compute(i, resources={"GPU": 1}) for i in range(1, 4)],
                                compute(9))
    assert sorted(executed(instrs)) == [1, 2, 9]
    assert ws.available_resources == {"GPU": 0.0}
    assert ws.total_resources == {"GPU": 2.0}
    assert ws.state_of(3) == "constrained"
    instrs = ws.handle_stimulus(success(9))
    assert executed(instrs) == []                         # a slot, but no GPU
    instrs = ws.handle_stimulus(success(1))
    assert executed(instrs) == [3]


def test_resources_fractional_and_multiple():
    ws = make_ws(nthreads=8, resources={"GPU": 1, "MEM": 10})
    instrs = ws.handle_stimulus(
        compute(1, resources={"GPU": 0.5, "MEM": 4}),
        compute(2, resources={"GPU": 0.5, "MEM": 4}),
        compute(3, resources={"GPU": 0.5, "MEM": 1}),
    )
    assert sorted(executed(instrs)) == [1, 2]


def test_constrained_and_ready_share_priority_order():
    ws = make_ws(nthreads=1, resources={"GPU": 1})
    ws.handle_stimulus(compute(100))
    ws.handle_stimulus(compute(1, priority=(5,)), compute(2, priority=(1,), resources={"GPU": 1}))
    assert executed(ws.handle_stimulus(success(100))) == [2]


def test_impossible_resources_err():
    ws = make_ws(nthreads=2, resources={"GPU": 1})
    instrs = ws.handle_stimulus(compute(1, resources={"GPU": 2}), compute(2, resources={"TPU": 1}))
    erred = of(instrs, TaskErredMsg)
    assert [e.id for e in erred] == [1, 2]
    assert isinstance(erred[0].exception, ValueError)
    assert ws.task_counts == {"error": 2}


def test_secede_frees_a_slot():
    ws = make_ws(nthreads=1, resources={"GPU": 2})
    ws.handle_stimulus(compute(1, resources={"GPU": 1}), compute(2))
    instrs = ws.handle_stimulus(SecedeEvent(1, "sec"))
    assert instrs == [LongRunningMsg(1, "k1", "sec"), Execute(2, "k2", "spec2", "sec")]
    assert ws.long_running_count == 1 and ws.executing_count == 1
    assert ws.available_resources == {"GPU": 1.0}         # still held by the running thread
    instrs = ws.handle_stimulus(success(1))
    assert of(instrs, TaskFinishedMsg)
    assert ws.available_resources == {"GPU": 2.0}
    assert ws.long_running_count == 0


def test_secede_while_cancelled_then_resumed():
    ws = make_ws(nthreads=1)
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(FreeKeys([1], "free"))
    assert ws.handle_stimulus(SecedeEvent(1, "sec")) == []   # the scheduler forgot it
    assert ws.get_task(1).previous == "long-running"
    instrs = ws.handle_stimulus(compute(1, stim="again"))
    assert instrs == [LongRunningMsg(1, "k1", "again")]
    assert ws.state_of(1) == "long-running"


# ---------------------------------------------------------------------------
# Release, replicas, scatter
# ---------------------------------------------------------------------------
def test_free_keys_deferred_while_dependents_need_it():
    ws = make_ws(nthreads=1)
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(compute(100), success(1))           # 100 takes the slot
    ws.handle_stimulus(compute(2, deps=[(1, 8, [ME])]))
    assert ws.state_of(2) == "ready"
    assert ws.handle_stimulus(FreeKeys([1], "free")) == []
    assert ws.state_of(1) == "memory"
    assert ("k1", "free-deferred", "free") in ws.story(1)
    ws.handle_stimulus(success(100))
    instrs = ws.handle_stimulus(success(2, stim="s2"))
    assert DropData(1, "k1", "s2") in instrs            # the deferred free, carried out
    assert not any(type(i) is ReleaseWorkerDataMsg for i in instrs)
    assert 1 not in ws


def test_remove_replicas():
    ws = make_ws(nthreads=1)
    run_task(ws, 1)
    ws.handle_stimulus(compute(100))                         # takes the slot
    ws.handle_stimulus(compute(2, deps=[(1, 8, [ME])]))     # needs 1
    assert ws.handle_stimulus(RemoveReplicas([1, 55], "rr")) == []
    ws.handle_stimulus(success(100))
    ws.handle_stimulus(success(2))
    instrs = ws.handle_stimulus(RemoveReplicas([1], "rr2"))
    assert instrs == [DropData(1, "k1", "rr2"), ReleaseWorkerDataMsg(1, "k1", "rr2")]


def test_acquire_replicas():
    ws = make_ws()
    instrs = ws.handle_stimulus(AcquireReplicas([(5, "k5", 100, [A]), (6, "k6", 1, [B])], "acq"))
    assert sorted(g.worker for g in of(instrs, GatherDep)) == [A, B]
    assert ws.get_task(5).priority == (1,)
    instrs = ws.handle_stimulus(GatherDepSuccess(A, {5: 100}, "g"))
    assert instrs == [AddKeysMsg([5], "g")]
    # a replica is not dropped because some unrelated dependent goes away
    ws.handle_stimulus(compute(7, deps=[(6, 1, [B])]), FreeKeys([7], "f"))
    assert ws.state_of(6) == "flight"
    ws.handle_stimulus(GatherDepSuccess(B, {6: 1}, "g2"))
    assert ws.state_of(6) == "memory"


def test_update_data():
    ws = make_ws()
    instrs = ws.handle_stimulus(UpdateData([(1, "k1", 10), (2, "k2", 20)], "scatter"))
    assert instrs == [AddKeysMsg([1, 2], "scatter")]
    assert ws.memory_bytes == 30
    assert ws.handle_stimulus(UpdateData([(1, "k1", 15)], "again", report=False)) == []
    assert ws.memory_bytes == 35
    # a waiting task whose dependency gets scattered runs at once...
    ws.handle_stimulus(PauseEvent("p"), compute(3, deps=[(4, 1, [A])]))
    assert ws.state_of(4) == "fetch"
    ws.handle_stimulus(UpdateData([(4, "k4", 1)], "s4"))
    assert ws.state_of(3) == "ready"
    assert executed(ws.handle_stimulus(UnpauseEvent("u"))) == [3]
    # ...unless the key is mid-transfer: then it is memory when the transfer returns
    ws.handle_stimulus(success(3))
    ws.handle_stimulus(compute(5, deps=[(6, 1, [A])]))
    assert ws.state_of(6) == "flight"
    assert ws.handle_stimulus(UpdateData([(6, "k6", 1)], "s6")) == [AddKeysMsg([6], "s6")]
    assert ws.state_of(6) == "flight" and ws.get_task(6).state == "flight"
    instrs = ws.handle_stimulus(GatherDepNetworkFailure(A, "net"))
    assert ws.state_of(6) == "memory"                     # the scattered value counts
    assert executed(instrs) == [5]


def test_update_data_while_executing():
    ws = make_ws()
    ws.handle_stimulus(compute(1))
    ws.handle_stimulus(UpdateData([(1, "k1", 10)], "scatter"))
    assert ws.state_of(1) == "executing"
    ws.handle_stimulus(ExecuteFailure(1, "e", None, 0.0, 0.0, "f"))
    assert ws.state_of(1) == "memory"                     # the scattered value counts


def test_free_memory_task():
    ws = make_ws()
    run_task(ws, 1, 50)
    instrs = ws.handle_stimulus(FreeKeys([1, 77], "free"))
    assert instrs == [DropData(1, "k1", "free")]
    assert len(ws) == 0 and ws.memory_bytes == 0


# ---------------------------------------------------------------------------
# Table, errors, story, API
# ---------------------------------------------------------------------------
def test_transition_table_is_data():
    assert TRANSITIONS[("released", "waiting")] == "released_waiting"
    assert ("memory", "executing") not in TRANSITIONS
    assert set(s for pair in TRANSITIONS for s in pair) <= set(STATES)


def test_invalid_transition_raises_with_story():
    ws = make_ws()
    ws.handle_stimulus(compute(1, stim="c"))
    ws.handle_stimulus(success(1, stim="s"))
    with pytest.raises(InvalidTransition) as info:
        ws.debug_transition(1, "executing")
    e = info.value
    assert isinstance(e, TaskcoreError)
    assert (e.key, e.start, e.finish) == ("k1", "memory", "executing")
    assert ("k1", "executing", "memory", "s") in e.story
    assert "memory -> executing" in str(e) and "'s'" in str(e)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.key, e2.start, e2.finish, e2.story) == (e.key, e.start, e.finish, e.story)


def test_debug_transition_legal():
    ws = make_ws()
    run_task(ws, 1)
    instrs = ws.debug_transition(1, "released", "dbg")
    assert instrs == [DropData(1, "k1", "dbg"), ReleaseWorkerDataMsg(1, "k1", "dbg")]
    with pytest.raises(KeyError):
        ws.debug_transition(1, "released")


def test_validation_catches_corruption():
    ws = make_ws(nthreads=2)
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A])]))
    # forcing a waiting task to executing skips ready: the validator objects
    with pytest.raises((InvalidTransition, InvalidTaskState)):
        ws.debug_transition(1, "executing")


def test_story_is_bounded():
    ws = make_ws(story_size=10)
    for i in range(20):
        run_task(ws, i)
    assert len(ws.story(*range(20))) == 10
    assert ws.story(0) == []
    ws0 = make_ws(story_size=0)
    ws0.handle_stimulus(compute(1))
    assert ws0.story(1) == []


def test_introspection():
    ws = make_ws(nthreads=1)
    ws.handle_stimulus(compute(1, deps=[(10, 5, [A, B])]), compute(2))
    assert ws.has_what == {A: {"k10"}, B: {"k10"}}
    assert ws.fetch_count == 0 and ws.get_task(10).state == "flight"
    hb = ws.heartbeat()
    assert hb["executing"] == 1 and hb["in_flight"] == 1 and hb["in_flight_bytes"] == 5
    assert set(ws.tasks) == {1, 2, 10}
    assert ws.get_task(10).coming_from in (A, B)
    assert ws.get_task(1).dependencies == [10]
    assert ws.dependency_keys(1) == ["k10"]
    assert ws.get_task(10).dependents == [1]
    assert "WorkerState" in repr(ws) and "TaskState" in repr(ws.get_task(1))
    assert ws.get_task(99) is None and ws.state_of(99) is None
    assert 10 in ws and 99 not in ws


def test_instruction_equality_repr_and_to_dict():
    a = TaskFinishedMsg(1, "k", 5, "int", 0.0, 1.0, "s")
    assert a == TaskFinishedMsg(1, "k", 5, "int", 0.0, 1.0, "s")
    assert a != TaskFinishedMsg(1, "k", 6, "int", 0.0, 1.0, "s")
    assert a != Execute(1, "k", None, "s")
    assert a == TaskFinishedMsg.match(id=1, nbytes=5)
    assert a != TaskFinishedMsg.match(id=2)
    assert "TaskFinishedMsg(id=1" in repr(a)
    assert a.to_dict() == {"op": "task-finished", "id": 1, "key": "k", "nbytes": 5,
                           "type_name": "int", "start": 0.0, "stop": 1.0, "stimulus_id": "s"}
    assert "ComputeTask(id=1" in repr(compute(1))


# ---------------------------------------------------------------------------
# Random event sequences (hypothesis), validate=True
# ---------------------------------------------------------------------------
PEERS = [A, B, LOCAL]
IDS = st.integers(0, 7)
HOLDERS = st.lists(st.sampled_from(PEERS + [ME]), max_size=3, unique=True)


class WorkerStateMachine(RuleBasedStateMachine):
    """A fake worker server: it feeds the machine random scheduler messages
    and completes the Executes and GatherDeps the machine asked for (and only
    those), the way the real server would.  validate=True checks every
    invariant after every transition and every call."""

    @initialize(nthreads=st.integers(1, 3), concurrent=st.integers(1, 2))
    def setup(self, nthreads, concurrent):
        self.ws = WorkerState(nthreads, resources={"R": 1}, address=ME, validate=True,
                              max_concurrent_transfers=concurrent, max_transfer_bytes=20,
                              max_in_flight_bytes=30, story_size=2000)
        self.running = set()        # ids with an outstanding Execute
        self.transfers = {}         # peer -> ids of the outstanding GatherDep
        self.busy = set()           # peers awaiting RetryBusyWorker
        self.n = 0

    def feed(self, *events):
        instrs = self.ws.handle_stimulus(*events)
        for i in instrs:
            if type(i) is Execute:
                assert i.id not in self.running, f"task {i.id} executed twice at once"
                self.running.add(i.id)
            elif type(i) is GatherDep:
                assert i.worker not in self.transfers, "two transfers from one peer"
                assert i.worker != ME
                self.transfers[i.worker] = i.ids
            elif type(i) is RetryBusyWorkerLater:
                self.busy.add(i.worker)
        return instrs

    def stim(self):
        self.n += 1
        return f"s{self.n}"

    @rule(tid=IDS, deps=st.lists(st.tuples(IDS, st.integers(1, 25), HOLDERS), max_size=3),
          prio=st.tuples(st.integers(-2, 2)), res=st.sampled_from([None, {"R": 1}, {"R": 3}]))
    def compute(self, tid, deps, prio, res):
        who_has = [(d, f"k{d}", nb, h) for d, nb, h in deps if d != tid]
        self.feed(ComputeTask(tid, f"k{tid}", None, prio, self.stim(), who_has=who_has,
                              resource_restrictions=res))

    @rule(ids=st.lists(IDS, max_size=3))
    def free(self, ids):
        self.feed(FreeKeys(ids, self.stim()))

    @rule(ids=st.lists(IDS, max_size=2))
    def remove_replicas(self, ids):
        self.feed(RemoveReplicas(ids, self.stim()))

    @rule(tid=IDS, holders=HOLDERS, nbytes=st.integers(1, 25))
    def acquire(self, tid, holders, nbytes):
        if holders:
            self.feed(AcquireReplicas([(tid, f"k{tid}", nbytes, holders)], self.stim()))

    @rule(tid=IDS, nbytes=st.integers(1, 25))
    def scatter(self, tid, nbytes):
        self.feed(UpdateData([(tid, f"k{tid}", nbytes)], self.stim()))

    @rule(tid=IDS)
    def steal(self, tid):
        self.feed(StealRequest(tid, self.stim()))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "fail", "reschedule", "secede"]))
    def finish_execute(self, data, outcome):
        tid = data.draw(st.sampled_from(sorted(self.running)))
        if outcome == "secede":
            self.feed(SecedeEvent(tid, self.stim()))
            return
        self.running.discard(tid)
        if outcome == "ok":
            ev = ExecuteSuccess(tid, 3, "int", 0.0, 1.0, self.stim())
        elif outcome == "fail":
            ev = ExecuteFailure(tid, "exc", "tb", 0.0, 1.0, self.stim())
        else:
            ev = RescheduleEvent(tid, self.stim())
        self.feed(ev)

    @precondition(lambda self: self.transfers)
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "ok", "partial", "busy", "net", "fail"]))
    def finish_gather(self, data, outcome):
        peer = data.draw(st.sampled_from(sorted(self.transfers)))
        ids = self.transfers.pop(peer)
        stim = self.stim()
        if outcome == "ok":
            ev = GatherDepSuccess(peer, {i: 4 for i in ids}, stim)
        elif outcome == "partial":
            got = data.draw(st.lists(st.sampled_from(ids), unique=True))
            ev = GatherDepSuccess(peer, {i: 4 for i in got}, stim)
        elif outcome == "busy":
            ev = GatherDepBusy(peer, stim)
        elif outcome == "net":
            ev = GatherDepNetworkFailure(peer, stim)
        else:
            ev = GatherDepFailure(peer, "exc", None, stim)
        self.feed(ev)

    @precondition(lambda self: self.busy)
    @rule(data=st.data())
    def retry_busy(self, data):
        peer = data.draw(st.sampled_from(sorted(self.busy)))
        self.busy.discard(peer)
        self.feed(RetryBusyWorker(peer, self.stim()))

    @rule(pause=st.booleans())
    def pause(self, pause):
        self.feed(PauseEvent(self.stim()) if pause else UnpauseEvent(self.stim()))

    @rule(tid=IDS, holders=HOLDERS)
    def who_has(self, tid, holders):
        self.feed(FindMissingResult({tid: holders}, self.stim()))

    @rule()
    def find_missing(self):
        self.feed(FindMissing(self.stim()))

    @rule(peer=st.sampled_from(PEERS))
    def remove_worker(self, peer):
        self.feed(RemoveWorker(peer, self.stim()))

    @invariant()
    def accounting(self):
        ws = self.ws
        assert ws.executing_count + ws.long_running_count == len(self.running)
        assert ws.executing_count <= ws.nthreads
        assert set(ws.in_flight_workers) == set(self.transfers)

    def teardown(self):
        # drain: complete everything, free everything; the machine must empty out
        if not hasattr(self, "ws"):
            return
        self.feed(UnpauseEvent("drain"))
        for _ in range(200):
            if self.busy:
                self.feed(RetryBusyWorker(self.busy.pop(), "drain"))
            elif self.transfers:
                peer, ids = self.transfers.popitem()
                self.feed(GatherDepSuccess(peer, {i: 4 for i in ids}, "drain"))
            elif self.running:
                self.feed(ExecuteSuccess(self.running.pop(), 3, "int", 0.0, 1.0, "drain"))
            else:
                break
        self.feed(FreeKeys(list(range(8)), "drain-free"))
        # missing keys may hold on to dependents; the scheduler frees those too
        self.feed(FreeKeys(list(self.ws.tasks), "drain-free-2"))
        for _ in range(50):
            if self.transfers:
                peer, ids = self.transfers.popitem()
                self.feed(GatherDepNetworkFailure(peer, "drain"))
            elif self.running:
                self.feed(ExecuteSuccess(self.running.pop(), 3, "int", 0.0, 1.0, "drain"))
            else:
                break
        assert len(self.ws) == 0, self.ws.tasks
        assert self.ws.memory_bytes == 0 and self.ws.in_flight_bytes == 0


TestWorkerStateMachine = WorkerStateMachine.TestCase
