"""Seceded (long-running) tasks give their slot back (no I/O, validate on)."""
from taskcore.core.scheduler_state import (AddWorker, ComputeTask, SchedulerState, TaskFinished,
                                           TaskLongRunning, UpdateGraph)


def computes(out):
    return [i for i in out if type(i) is ComputeTask]


def long_running(s, worker, task_id, stimulus_id="long-running"):
    return s.handle_stimulus(TaskLongRunning(worker, task_id, stimulus_id))


def finished(s, worker, task_id, nbytes, typename, duration, stimulus_id):
    return s.handle_stimulus(TaskFinished(worker, task_id=task_id, nbytes=nbytes,
                                          typename=typename, duration=duration,
                                          stimulus_id=stimulus_id))


def test_long_running_task_frees_a_slot_for_queued_tasks():
    s = SchedulerState(validate=True)  # 1 thread, saturation 1.1 -> 2 slots
    s.handle_stimulus(AddWorker("tcp://w:1", 1, 0, {}, "w", 0.0))
    out = s.handle_stimulus(UpdateGraph("c", [(f"t-{i}", None, []) for i in range(4)],
                                        [f"t-{i}" for i in range(4)]))
    first = computes(out)
    assert len(first) == 2  # the worker's slots are full; the rest is queued
    # one running task secedes (it waits on tasks it submitted): one more may run
    out = long_running(s, "tcp://w:1", first[0].task_id)
    assert len(computes(out)) == 1
    # unknown ids, other workers and repeats change nothing
    assert computes(long_running(s, "tcp://w:1", 10_000)) == []
    assert computes(long_running(s, "tcp://other:1", first[1].task_id)) == []
    assert computes(long_running(s, "tcp://w:1", first[0].task_id)) == []
    # when the long-running task finishes its extra slot goes away again
    out = finished(s, "tcp://w:1", first[0].task_id, 8, "int", 0.1, "done")
    assert computes(out) == []
    out = finished(s, "tcp://w:1", first[1].task_id, 8, "int", 0.1, "done")
    assert len(computes(out)) == 1
    assert s.task_state("t-3") in ("processing", "queued")
