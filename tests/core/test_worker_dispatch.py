"""core/worker_dispatch.pyx: the worker's compiled loop, without I/O.

A `WorkerDispatch` subclass with a real WorkerState, a fake scheduler comm (what is
sent is recorded; `sink_of` wraps it in a CallSink), a fake executor (records what
would go to a task thread) and a fake loop (records deferred calls).
"""
import logging
import math
import pickle
import threading

import pytest

from taskcore.core.messages import decode_tasks_finished, value_of
from taskcore.core.scheduler_state import TaskFinished, TasksFinished
from taskcore.core.serialize import Serialized
from taskcore.core.worker_dispatch import (NEVER_INLINE, DeserializeError, WorkerDispatch,
                                           key_prefix, task_local, unserializable)
from taskcore.core.worker_state import FreeKeys, TaskErredMsg, WorkerState
from taskcore.errors import CommClosedError

ME = "tcp://me:1"


def inc(x):
    return x + 1


def boom(x):
    raise ZeroDivisionError(f"boom {x}")


def make_lock(x):
    return threading.Lock()


def make_gen(x):
    return (i for i in range(x))


def returns_none(x):
    return None


def touches_worker(x):
    task_local.interacted = True          # what get_worker()/get_client()/secede() do
    return x


class FakeComm:
    def __init__(self):
        self.sent = []
        self.closed = False

    def send(self, msg):
        if self.closed:
            raise CommClosedError("closed")
        self.sent.append(msg)

    def flush(self):
        pass


class FakeExecutor:
    def __init__(self):
        self.submitted = []               # (task id, callable)

    def submit(self, tid, fn):
        self.submitted.append((tid, fn))


class FakeLoop:
    def __init__(self):
        self.calls = []

    def call_soon(self, fn, *args):
        self.calls.append((fn, args))


class Worker(WorkerDispatch):
    def __init__(self, nthreads=4):
        self.address = ME
        self.state = WorkerState(nthreads, address=ME, validate=True)
        self.executor = FakeExecutor()
        self.loop = FakeLoop()
        self.status = "running"
        self.comm = FakeComm()
        self.scheduler_comm = self.comm
        self.other_messages = []
        self.other_instructions = []
        self.dask_nodes = []

    def handle_other_message(self, msg):
        self.other_messages.append(msg)

    def execute_other(self, instruction):
        self.other_instructions.append(instruction)

    def run_dask_task(self, node, values=None):
        self.dask_nodes.append(node if values is None else (node, values))
        return ("dask-result", node)

    def reports(self):
        """The tasks-finished sent, as scheduler stimuli (rows)."""
        rows = []
        for m in self.comm.sent:
            if type(m) is list:
                ev = decode_tasks_finished("w", m)
                if type(ev) is TaskFinished:
                    rows.append((ev.task_id, ev.nbytes, ev.typename, ev.data))
                else:
                    assert type(ev) is TasksFinished
                    rows += list(zip(ev.task_ids, ev.nbytes, ev.typenames, ev.data))
        return rows


def compute(tid, key, func, *args, spec=None):
    return ["compute-tasks", tid, key, spec or ["call", func, list(args), None], [0, 0, tid], []]


def compute_many(tasks):
    """tasks: (tid, key, func, arg)."""
    return ["compute-tasks", [t[0] for t in tasks], [t[1] for t in tasks],
            [["call", t[2], [t[3]], None] for t in tasks], [[0, 0, t[0]] for t in tasks],
            [[] for _ in tasks]]


def tiny(w, *prefixes):
    for p in prefixes:
        w.durations[p] = 1e-6


def test_key_prefix():
    assert key_prefix("inc-3f2a") == "inc"
    assert key_prefix("plain") == "plain"
    assert key_prefix(("inc-abc", 0, 1)) == "inc"
    assert key_prefix(5) == 5


def test_a_tiny_task_runs_inline_and_reports_its_result():
    w = Worker()
    tiny(w, "inc")
    w.on_message(compute(1, "inc-1", inc, 41))
    assert w.executor.submitted == []
    assert w.data == {"inc-1": 42}
    [msg] = w.comm.sent
    assert msg[0] == "tasks-finished" and msg[1:4] == [1, 28, "int"]
    assert msg[4] >= 0 and msg[5] == 42                     # the result rides along
    assert w.state.state_of(1) == "memory"
    assert w.durations["inc"] < w.inline_threshold


def test_several_tiny_tasks_report_in_one_message():
    w = Worker(nthreads=2)
    tiny(w, "inc", "none", "text")
    w.on_message(compute_many([(1, "inc-1", inc, 1), (2, "none-2", returns_none, 0),
                               (3, "text-3", str, 7), (4, "inc-4", inc, 2)]))
    assert w.executor.submitted == []
    [msg] = w.comm.sent                                   # all four, one message
    rows = w.reports()
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert [r[2] for r in rows] == ["int", "NoneType", "str", "int"]
    values = [value_of(r[3]) for r in rows]
    assert values[0] == (True, 2) and values[1] == (True, None) and values[3] == (True, 3)
    assert values[2][0] and type(values[2][1]) is Serialized
    assert values[2][1].deserialize() == "7"
    assert w.data == {"inc-1": 2, "none-2": None, "text-3": "7", "inc-4": 3}


def test_an_unknown_prefix_goes_to_a_thread_then_runs_inline():
    w = Worker()
    w.on_message(compute(1, "inc-1", inc, 1))
    assert w.comm.sent == [] and w.data == {}
    [(tid, fn)] = w.executor.submitted
    assert tid == 1
    value = fn()                                           # the task thread's call
    assert value == 2 and task_local.worker is None
    w.on_thread_results([(1, True, value, 100.0, 100.00001)])
    assert w.reports() == [(1, 28, "int", 2)]
    assert w.data == {"inc-1": 2}
    assert w.durations["inc"] == pytest.approx(1e-5, rel=0.1)
    # measured as tiny: the next one runs inline
    w.on_message(compute(2, "inc-2", inc, 2))
    assert len(w.executor.submitted) == 1
    assert w.reports()[-1] == (2, 28, "int", 3)


def test_a_slow_prefix_stays_on_threads():
    w = Worker()
    w.durations["inc"] = 0.5
    w.on_message(compute(1, "inc-1", inc, 1))
    assert [t for t, _ in w.executor.submitted] == [1]
    w.inline_threshold = 0                                        # inline execution off
    tiny(w, "inc")
    w.on_message(compute(2, "inc-2", inc, 1))
    assert [t for t, _ in w.executor.submitted] == [1, 2]


def test_a_pickled_function_is_unpickled_and_run():
    w = Worker()
    tiny(w, "inc")
    w.on_message(compute(1, "inc-1", None, spec=["call", pickle.dumps(inc), [4], None]))
    w.on_message(compute(2, "inc-2", None, spec=["call", pickle.dumps(inc), [5], {}]))
    assert [r[3] for r in w.reports()] == [5, 6]


def dec(x):
    return x - 1


def test_functions_as_bytes_and_as_a_shared_serialized_do_not_mix_up():
    # a map sends its function as one Serialized for every task; submits send bytes
    w = Worker()
    shared = Serialized(1, [pickle.dumps(dec)])
    assert w.function(pickle.dumps(inc)) is inc
    assert w.function(shared) is dec
    assert w.function(pickle.dumps(inc)) is inc          # not the last Serialized's
    assert w.function(shared) is dec
    assert w.function(Serialized(1, [pickle.dumps(inc)])) is inc
    assert w.function(pickle.dumps(dec)) is dec


@pytest.mark.parametrize("func,typename", [(make_lock, "lock"), (make_gen, "generator")])
def test_an_unpicklable_result_stays_and_is_reported_without_a_payload(func, typename):
    w = Worker()
    tiny(w, "make")
    w.on_message(compute(1, "make-1", func, 3))
    [(tid, nbytes, tname, payload)] = w.reports()
    assert tid == 1 and tname == typename
    assert payload is None                                 # not sent: not erred either
    assert w.state.state_of(1) == "memory"
    assert type(w.data["make-1"]).__name__ == typename
    assert w.other_instructions == []                      # no TaskErredMsg
    # only a transfer or a gather of it errs, with these words
    try:
        pickle.dumps(w.data["make-1"])
    except Exception as e:
        text = unserializable("make-1", w.data["make-1"], e)
    assert text.startswith(f"the result of task 'make-1' (type {typename}) cannot be serialized")


def test_an_unpicklable_result_of_a_thread_task_is_reported_without_a_payload():
    w = Worker()
    w.on_message(compute(1, "make-1", make_lock, 0))
    [(tid, fn)] = w.executor.submitted
    w.on_thread_results([(1, True, fn(), 1.0, 2.0)])
    [(tid, _, tname, payload)] = w.reports()
    assert (tid, tname, payload) == (1, "lock", None)
    assert w.state.state_of(1) == "memory"


def test_a_big_result_is_not_sent():
    w = Worker()
    tiny(w, "big")
    w.inline_result_bytes = 1000
    w.on_message(["compute-tasks", [1, 2], ["big-1", "big-2"],
                  [["call", bytes, [5000], None], ["call", bytes, [10], None]],
                  [[0, 0, 0], [0, 0, 1]], [[], []]])
    rows = w.reports()
    assert rows[0][0] == 1 and rows[0][3] is None                 # fetched when wanted
    assert rows[1][0] == 2 and value_of(rows[1][3])[1].deserialize() == bytes(10)
    assert w.data["big-1"] == bytes(5000)


@pytest.mark.parametrize("value,size", [(bytes(5000), 5000), ("x" * 5000, 5000),
                                        (bytearray(3000), 3000)])
def test_the_reported_nbytes_is_the_results_size(value, size):
    w = Worker()
    ev = w.result_event(1, "big-1", True, value, 1.0, 2.0)
    assert ev.nbytes >= size


def test_a_failing_task_goes_to_execute_other():
    w = Worker()
    tiny(w, "boom")
    w.on_message(compute(1, "boom-1", boom, 3))
    [ins] = w.other_instructions
    assert type(ins) is TaskErredMsg
    assert w.comm.sent == [] and "boom-1" not in w.data
    assert w.state.state_of(1) == "error"


def test_a_task_that_interacts_with_its_worker_goes_back_to_threads():
    w = Worker()
    tiny(w, "touch")
    w.on_message(compute(1, "touch-1", touches_worker, 1))
    assert w.executor.submitted == [] and w.reports()[0][3] == 1      # ran inline once
    assert math.isinf(w.durations["touch"]) and w.durations["touch"] == NEVER_INLINE
    assert getattr(task_local, "inline", False) is False
    assert getattr(task_local, "worker", None) is None
    w.on_message(compute(2, "touch-2", touches_worker, 2))
    assert [t for t, _ in w.executor.submitted] == [2]


def test_the_inline_budget_defers_the_rest_to_the_loop():
    w = Worker(nthreads=1)
    tiny(w, "inc")
    w.inline_budget = 0.0
    w.on_message(compute_many([(i, f"inc-{i}", inc, i) for i in range(1, 4)]))
    # the first pass ran inline; its results wait for the next loop iteration
    assert len(w.loop.calls) == 1
    fn, (results,) = w.loop.calls[0]
    assert fn == w.on_inline_results
    while w.loop.calls:
        fn, args = w.loop.calls.pop(0)
        fn(*args)
    assert sorted(r[0] for r in w.reports()) == [1, 2, 3]
    assert w.data == {"inc-1": 2, "inc-2": 3, "inc-3": 4}


def test_a_run_spec_of_kind_dask_calls_run_dask_task():
    w = Worker()
    tiny(w, "d")
    w.on_message(compute(1, "d-1", None, spec=["dask", {"node": 1}]))
    assert w.dask_nodes == [{"node": 1}]
    assert w.data["d-1"] == ("dask-result", {"node": 1})
    [(tid, _, tname, payload)] = w.reports()
    assert (tid, tname) == (1, "tuple")


def test_a_run_spec_of_kind_dask_t_passes_the_template_and_its_values():
    w = Worker()
    tiny(w, "d")
    w.on_message(compute(1, "d-1", None, spec=["dask-t", {"template": 1}, [("x", 0), 2.5]]))
    assert w.dask_nodes == [({"template": 1}, [("x", 0), 2.5])]
    assert w.data["d-1"] == ("dask-result", {"template": 1})


def test_the_base_class_refuses_dask_tasks_and_unknown_specs():
    class Plain(Worker):
        run_dask_task = WorkerDispatch.run_dask_task

    w = Plain()
    with pytest.raises(TypeError, match="cannot run dask tasks"):
        WorkerDispatch.run_dask_task(w, {})
    with pytest.raises(ValueError, match="unknown run spec kind 'nope'"):
        w.run_spec("k", ["nope"])
    with pytest.raises(DeserializeError, match="could not deserialize task 'k'"):
        w.run_spec("k", ["call", b"not a pickle", [], None])


def test_a_failed_deserialization_is_the_task_error():
    w = Worker()
    tiny(w, "bad")
    w.on_message(compute(1, "bad-1", None, spec=["call", b"not a pickle", [1], None]))
    [ins] = w.other_instructions
    assert type(ins) is TaskErredMsg and w.state.state_of(1) == "error"


def test_other_messages_reach_the_hook():
    w = Worker()
    w.on_message({"op": "free-keys", "ids": [1]})
    w.on_message("odd")
    assert w.other_messages == [{"op": "free-keys", "ids": [1]}, "odd"]
    assert w.comm.sent == []


def test_malformed_compute_tasks_are_logged_and_dropped(caplog):
    w = Worker()
    tiny(w, "inc")
    with caplog.at_level(logging.ERROR, logger="taskcore.worker"):
        w.on_message(["compute-tasks", [1]])
        w.on_message(["compute-tasks", [1, 2], ["a"], [None], [[0, 0, 0]], [[]]])
        w.on_message(["no-such-op", 1, 2, 3, 4, 5])
    assert "6 fields expected, got 2" in caplog.text
    assert "compute-tasks: columns of different lengths" in caplog.text
    assert "expected a 'compute-tasks' message, got 'no-such-op'" in caplog.text
    assert w.other_messages == []
    w.on_message(compute(1, "inc-1", inc, 1))                # carries on
    assert w.reports() == [(1, 28, "int", 2)]


def test_freed_data_is_dropped():
    w = Worker()
    tiny(w, "inc")
    w.on_message(compute(1, "inc-1", inc, 1))
    assert w.data == {"inc-1": 2}
    w.handle([FreeKeys([1], "free")])
    assert w.data == {}


def test_a_closed_or_missing_scheduler_comm_drops_the_reports():
    w = Worker()
    tiny(w, "inc")
    w.comm.closed = True
    w.on_message(compute(1, "inc-1", inc, 1))
    assert w.comm.sent == [] and w.data == {"inc-1": 2}
    w.scheduler_comm = None
    assert w.scheduler_comm is None
    w.on_message(compute(2, "inc-2", inc, 2))
    assert w.data["inc-2"] == 3
    comm = FakeComm()
    w.scheduler_comm = comm                                  # a new connection: new sink
    w.on_message(compute(3, "inc-3", inc, 3))
    assert comm.sent == [["tasks-finished", 3, 28, "int", comm.sent[0][4], 4]]


def test_thread_results_after_close_are_ignored():
    w = Worker()
    w.on_message(compute(1, "inc-1", inc, 1))
    [(tid, fn)] = w.executor.submitted
    w.status = "closing"
    w.on_thread_results([(1, True, fn(), 1.0, 2.0)])
    assert w.comm.sent == [] and w.data == {}
