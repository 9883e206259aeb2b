"""core/messages.pyx, the one codec of the four hot wire messages. No I/O.

Every op: encode -> (the wire: serialize.dumps/loads) -> decode round trips, with
one task and several, with and without options; the batching of the scheduler's
instructions (order kept, runs split by other instructions, the options column);
and every decoder's refusal of malformed input (ValueError naming the fault).

The scheduler's instructions come from a real SchedulerState (validate=True), so
the ComputeTask/KeyInMemory that the codec batches are the machine's own.
"""
import pytest

from taskcore.core import messages as M
from taskcore.core.messages import (
    TasksFinishedWriter,
    batch_instructions,
    decode_compute_tasks,
    decode_keys_in_memory,
    decode_tasks_finished,
    decode_update_graph,
    keys_in_memory_key,
    keys_in_memory_payload,
    keys_in_memory_size,
    merge_update_graphs,
    payload_of,
    update_graph,
    value_of,
)
from taskcore.core.scheduler_state import (
    AddWorker,
    ClientReleasesKeys,
    ComputeTask,
    FreeKeys,
    KeyInMemory,
    SchedulerState,
    TaskFinished,
    TasksFinished,
    UpdateGraph,
)
from taskcore.core.serialize import Serialized, dumps, loads, serialize_obj
from taskcore.core.worker_state import ComputeTask as ComputeEvent
from taskcore.core.worker_state import Execute, GatherDep, WorkerState


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def wire(msg):
    """The message after a trip over a comm: dumps, then loads from fresh buffers."""
    return loads([bytearray(f) for f in dumps(msg)])


def new_state(*workers):
    """A validating SchedulerState with workers (address, nthreads[, resources])."""
    s = SchedulerState(validate=True)
    for spec in workers:
        addr, nthreads, *rest = spec if isinstance(spec, tuple) else (spec, 4)
        s.handle_stimulus(AddWorker(addr, nthreads=nthreads, resources=rest[0] if rest else None,
                                    memory_limit=1_000_000, stimulus_id=f"add-{addr}"))
    return s


def computes(out):
    return [i for i in out if type(i) is ComputeTask]


def in_memory(out):
    return [i for i in out if type(i) is KeyInMemory]


def finished(s, ct, data=None, nbytes=8, typename="int"):
    return s.handle_stimulus(TaskFinished(ct.worker, task_id=ct.task_id, nbytes=nbytes,
                                          typename=typename, duration=0.01,
                                          stimulus_id=f"fin-{ct.key}", data=data))


def event_fields(ev):
    assert type(ev) is ComputeEvent
    return (ev.id, ev.key, ev.run_spec, ev.priority, ev.who_has, ev.resource_restrictions,
            ev.annotations)


def expected_event(ct):
    """What the worker must get for the scheduler's ComputeTask `ct`."""
    deps = [[d[0], d[1], d[2], list(d[3])] for d in ct.dependencies]
    return (ct.task_id, ct.key, ct.run_spec, list(ct.priority), deps, ct.resources,
            ct.annotations)


def only(items):
    """The (compute, in_memory) pair of a batch that is exactly one run."""
    [item] = items
    assert type(item) is tuple
    return item


def spec(x):
    return serialize_obj((abs, (x,), {}))


# --------------------------------------------------------------------------
# inline results
# --------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, 0, 1, -7, 2**63 - 1, 2.5, True, False, "text", b"b"])
def test_payload_round_trip(value):
    payload = payload_of(value)
    assert value_of(payload) == (True, value)
    assert value_of(wire([payload])[0]) == (True, value)


def test_none_result_travels_as_a_list_and_bare_none_means_not_sent():
    assert payload_of(None) == [None]
    assert value_of([None]) == (True, None)
    assert value_of(None) == (False, None)


def test_serialized_payload_is_passed_as_is():
    s = serialize_obj({"a": [1, 2, 3]})
    assert payload_of(s) is s
    sent, value = value_of(s)
    assert sent and value is s
    sent, value = value_of(wire([s])[0])
    assert sent and type(value) is Serialized and value.deserialize() == {"a": [1, 2, 3]}


# --------------------------------------------------------------------------
# update-graph
# --------------------------------------------------------------------------

def test_update_graph_one_task():
    rec = ["inc-1", spec(1), [], None]
    msg = update_graph([rec], ["inc-1"])
    assert msg == ["update-graph", rec, "inc-1", 0]          # fields, not columns
    for m in (msg, wire(msg)):
        ev = decode_update_graph("c1", m, "ug-1")
        assert type(ev) is UpdateGraph
        assert (ev.client, ev.stimulus_id, ev.keys, ev.priority) == ("c1", "ug-1", ["inc-1"], 0)
        [task] = ev.tasks
        assert task[0] == "inc-1" and task[2] == [] and len(task) == 4 and task[3] is None
        assert task[1].deserialize()[1] == (1,)
        assert (ev.workers, ev.resources, ev.annotations) == (None, None, None)
        assert ev.retries == 0 and ev.allow_other_workers is False


def test_update_graph_one_task_with_a_tuple_key():
    rec = [("x", 1), "spec", [("y", 0)], None]
    msg = update_graph([rec], [("x", 1)], priority=3)
    assert msg == ["update-graph", rec, ("x", 1), 3]
    ev = decode_update_graph("c1", wire(msg), "ug")
    assert ev.keys == [("x", 1)] and ev.priority == 3
    assert [list(t[:3]) for t in ev.tasks] == [[("x", 1), "spec", [("y", 0)]]]


def test_update_graph_several_tasks_with_deps_and_priority():
    recs = [["a", "fa", [], None], ["b", "fb", ["a"], None], ["c", "fc", ["a", "b"], None]]
    msg = update_graph(recs, ["c", "b"], priority=-5)
    assert msg == ["update-graph", ["a", "b", "c"], ["fa", "fb", "fc"], [[], ["a"], ["a", "b"]],
                   ["c", "b"], -5, None, None]                # columns
    for m in (msg, wire(msg)):
        ev = decode_update_graph("c2", m, "ug-2")
        assert ev.client == "c2" and ev.keys == ["c", "b"] and ev.priority == -5
        assert [list(t) for t in ev.tasks] == recs


def test_update_graph_several_records_one_wanted_key():
    recs = [["a", "fa", [], None], ["b", "fb", ["a"], None]]
    msg = update_graph(recs, ["b"])
    assert msg[1] == ["a", "b"] and msg[4] == ["b"]          # the columns form
    ev = decode_update_graph("c", msg, "ug")
    assert ev.keys == ["b"] and len(ev.tasks) == 2


def test_update_graph_options_become_the_stimulus_mappings():
    opts = {"priority": 7, "workers": ["w1"], "allow_other_workers": True,
            "resources": {"GPU": 1}, "retries": 2, "annotations": {"tag": "x"}}
    recs = [["a", "fa", [], None],
            ["b", "fb", ["a"], opts],
            ["c", "fc", [], {"workers": "w2"}],             # no priority: None
            ["d", "fd", [], {}]]                            # empty options: none
    msg = update_graph(recs, ["b", "c", "d"], priority=1)
    for m in (msg, wire(msg)):
        ev = decode_update_graph("c1", m, "ug")
        assert [tuple(t) for t in ev.tasks] == [("a", "fa", [], None), ("b", "fb", ["a"], 7),
                                                ("c", "fc", [], None), ("d", "fd", [], None)]
        assert ev.workers == {"b": ["w1"], "c": "w2"}
        assert ev.allow_other_workers == {"b"}
        assert ev.resources == {"b": {"GPU": 1}}
        assert ev.retries == {"b": 2}
        assert ev.annotations == {"b": {"tag": "x"}}
        assert ev.priority == 1 and ev.keys == ["b", "c", "d"]


def test_update_graph_one_task_with_options():
    rec = ["g", "fg", [], {"resources": {"GPU": 1}, "annotations": {"a": 1}}]
    msg = update_graph([rec], ["g"])
    assert msg == ["update-graph", rec, "g", 0]
    ev = decode_update_graph("c1", wire(msg), "ug")
    assert [tuple(t) for t in ev.tasks] == [("g", "fg", [], None)]
    assert ev.resources == {"g": {"GPU": 1}} and ev.annotations == {"g": {"a": 1}}
    assert ev.workers is None and ev.allow_other_workers is False and ev.retries == 0


@pytest.mark.parametrize("rec, words", [
    (["k", "f", 5, None], "dependencies of k must be a list"),
    (["k", "f", ["a", {"x": 1}], None], "dependency key"),
    ([["a", "list"], "f", [], None], "task key"),
    ([("t", ["nested list"]), "f", [], None], "task key"),
    (["k", "f", [], {"workers": 7}], "workers of k"),
    (["k", "f", [], {"resources": {"GPU": "one"}}], "resources of k"),
    (["k", "f", [], {"retries": -1}], "retries of k"),
    (["k", "f", [], {"retries": True}], "retries of k"),
    (["k", "f", [], {"annotations": [1]}], "annotations of k"),
    (["k", "f", [], {"priority": "high"}], "priority of k"),
])
def test_update_graph_rejects_malformed_records_before_the_state_machine(rec, words):
    for msg in (update_graph([rec], ["k"]), update_graph([["ok", "f", [], None], rec],
                                                         ["ok", "k"])):
        with pytest.raises(ValueError, match=words):
            decode_update_graph("c1", msg, "ug")
    with pytest.raises(ValueError, match="wanted key"):
        decode_update_graph("c1", update_graph([["ok", "f", [], None]] * 2, ["ok", ["x"]]),
                            "ug")


def test_decoded_update_graph_drives_a_real_state_machine():
    s = new_state(("w1", 2, {"GPU": 1}), ("w2", 2))
    recs = [["a", "fa", [], None],
            ["g", "fg", ["a"], {"resources": {"GPU": 1}, "annotations": {"n": 1}}],
            ["p", "fp", [], {"workers": ["w2"]}]]
    out = s.handle(decode_update_graph("c1", wire(update_graph(recs, ["g", "p"])), "ug"))
    assert {c.key for c in computes(out)} == {"a", "p"}
    assert [c.worker for c in computes(out) if c.key == "p"] == ["w2"]    # its workers
    [ct_a] = [c for c in computes(out) if c.key == "a"]
    out = finished(s, ct_a)
    [ct_g] = computes(out)
    assert (ct_g.key, ct_g.worker, ct_g.resources, ct_g.annotations) == \
        ("g", "w1", {"GPU": 1.0}, {"n": 1})


# --------------------------------------------------------------------------
# merge_update_graphs
# --------------------------------------------------------------------------

def one(key, deps=(), opts=None, priority=0):
    return update_graph([[key, f"f-{key}", list(deps), opts]], [key], priority)


def test_merge_consecutive_one_task_graphs_in_order():
    msgs = [one("a"), one("b", ["a"]), one("c")]
    before = [list(m) for m in msgs]
    [merged] = merge_update_graphs(msgs)
    assert merged == ["update-graph", ["a", "b", "c"], ["f-a", "f-b", "f-c"], [[], ["a"], []],
                      ["a", "b", "c"], 0, None, None]
    assert msgs == before                                    # the inputs are not touched
    ev = decode_update_graph("c1", wire(merged), "ug")
    assert [t[0] for t in ev.tasks] == ["a", "b", "c"] and ev.keys == ["a", "b", "c"]


def test_merge_keeps_a_lone_graph_as_it_is():
    m = one("a")
    assert merge_update_graphs([m]) == [m]
    assert merge_update_graphs([]) == []


def test_merge_does_not_merge_options_priorities_many_tasks_or_other_messages():
    with_opts = one("o", opts={"retries": 1})
    with_prio = one("p", priority=5)
    many = update_graph([["m1", "f", [], None], ["m2", "f", [], None]], ["m1", "m2"])
    other = {"op": "release-keys", "keys": ["z"]}
    msgs = [one("a"), one("b"), with_opts, one("c"), other, one("d"), one("e"),
            with_prio, many, one("f"), one("g")]
    out = merge_update_graphs(msgs)
    assert out == [
        ["update-graph", ["a", "b"], ["f-a", "f-b"], [[], []], ["a", "b"], 0, None, None],
        with_opts,
        one("c"),                                            # a run of one: as it was
        other,
        ["update-graph", ["d", "e"], ["f-d", "f-e"], [[], []], ["d", "e"], 0, None, None],
        with_prio,
        many,
        ["update-graph", ["f", "g"], ["f-f", "f-g"], [[], []], ["f", "g"], 0, None, None],
    ]
    # the merged stream asks the scheduler for the same tasks, in the same order
    keys = [k for m in out if type(m) is list
            for k in decode_update_graph("c", m, "x").keys]
    assert keys == ["a", "b", "o", "c", "d", "e", "p", "m1", "m2", "f", "g"]


# --------------------------------------------------------------------------
# compute-tasks: batch_instructions -> decode_compute_tasks
# --------------------------------------------------------------------------

def test_compute_tasks_one_task():
    s = new_state("w1")
    out = s.handle_stimulus(UpdateGraph("c1", [("a", spec(1), [], 0)], ["a"],
                                        stimulus_id="ug"))
    [ct] = computes(out)
    compute, mem = only(batch_instructions(out))
    assert mem == {}
    msg = compute["w1"]
    assert msg == ["compute-tasks", ct.task_id, "a", ct.run_spec, list(ct.priority), []]
    for m in (msg, wire(msg)):
        [ev] = decode_compute_tasks(m)
        f = event_fields(ev)
        assert f[:2] == (ct.task_id, "a") and f[3:] == (list(ct.priority), [], None, None)
        assert ev.run_spec.deserialize()[1] == (1,)


def test_compute_tasks_several_tasks_and_workers_with_deps():
    s = new_state(("w1", 2), ("w2", 2))
    tasks = [(f"r-{i}", f"fr{i}", [], i) for i in range(4)]
    out = s.handle_stimulus(UpdateGraph("c1", tasks, [t[0] for t in tasks], stimulus_id="ug"))
    cts = computes(out)
    assert len(cts) == 4 and {c.worker for c in cts} == {"w1", "w2"}
    compute, mem = only(batch_instructions(out))
    assert mem == {} and set(compute) == {"w1", "w2"}
    for w, msg in compute.items():
        mine = [c for c in cts if c.worker == w]
        assert msg[0] == "compute-tasks" and len(msg) == 6
        # columns, in order (one task alone: its fields)
        assert msg[1] == ([c.task_id for c in mine] if len(mine) > 1 else mine[0].task_id)
        assert [event_fields(e) for e in decode_compute_tasks(wire(msg))] == \
            [expected_event(c) for c in mine]
    # dependents carry their dependencies: [id, key, nbytes, [holders]]
    out = s.handle_stimulus(UpdateGraph("c1", [("x", "fx", ["r-0", "r-1"], 0),
                                               ("y", "fy", ["r-2"], 1)], ["x", "y"],
                                        stimulus_id="ug2"))
    out = []
    for c in cts:
        out += finished(s, c, nbytes=100 + int(c.key[-1]))
    deps = computes(out)
    assert {c.key for c in deps} == {"x", "y"}
    for item in batch_instructions(out):
        if type(item) is not tuple:
            continue
        for w, msg in item[0].items():
            for ev in decode_compute_tasks(wire(msg)):
                [ct] = [c for c in deps if c.task_id == ev.id]
                assert event_fields(ev) == expected_event(ct)
                assert all(type(d) is list and type(d[3]) is list for d in ev.who_has)
                assert sorted(d[1] for d in ev.who_has) == sorted(
                    d[1] for d in ct.dependencies)


def test_decoded_compute_tasks_drive_a_real_worker_state():
    s = new_state(("w1", 1), ("w2", 1))
    out = s.handle_stimulus(UpdateGraph("c1", [("a", "fa", [], 0), ("b", "fb", [], 1),
                                               ("c", "fc", ["a", "b"], 2)], ["c"],
                                        stimulus_id="ug"))
    cts = computes(out)
    out = []
    for c in cts:
        out += finished(s, c, nbytes=10)
    [ct_c] = computes(out)
    compute, _ = [i for i in batch_instructions(out) if type(i) is tuple and i[0]][0]
    [ev] = decode_compute_tasks(wire(compute[ct_c.worker]))
    holder = ct_c.dependencies[0][3][0]
    # a worker that holds neither input fetches both from their holder...
    ws = WorkerState(1, address="w9", validate=True)
    instrs = ws.handle_stimulus(ev)
    [gd] = [i for i in instrs if type(i) is GatherDep]
    assert gd.worker == holder and sorted(gd.keys) == ["a", "b"]
    assert gd.total_nbytes == 20
    assert not [i for i in instrs if type(i) is Execute]
    # ...and a task without inputs runs
    [ev] = decode_compute_tasks(wire(only(batch_instructions(cts[:1]))[0][cts[0].worker]))
    assert WorkerState(1, address="w9", validate=True).handle_stimulus(ev) == [
        Execute(cts[0].task_id, "a", "fa", "compute-task")]


def test_options_column_for_resources_and_annotations():
    s = new_state(("w1", 4, {"GPU": 2}))
    out = s.handle_stimulus(UpdateGraph(
        "c1", [("a", "fa", [], 0), ("b", "fb", [], 1), ("g", "fg", [], 2)],
        ["a", "b", "g"], resources={"g": {"GPU": 1}}, annotations={"g": {"n": 1}},
        stimulus_id="ug"))
    by_key = {c.key: c for c in computes(out)}
    a, b, g = by_key["a"], by_key["b"], by_key["g"]
    opts = [{"GPU": 1.0}, {"n": 1}]

    # one task with options: its options as the 7th field
    msg = only(batch_instructions([g]))[0]["w1"]
    assert msg == ["compute-tasks", g.task_id, "g", "fg", list(g.priority), [], opts]
    [ev] = decode_compute_tasks(wire(msg))
    assert (ev.resource_restrictions, ev.annotations) == ({"GPU": 1.0}, {"n": 1})

    # tasks without options: no options column at all
    msg = only(batch_instructions([a, b]))[0]["w1"]
    assert len(msg) == 6

    # a task with options joins a message whose earlier tasks had none
    for order in ([a, g], [a, b, g], [g, a], [a, g, b]):
        msg = only(batch_instructions(order))[0]["w1"]
        assert len(msg) == 7
        assert msg[6] == [opts if c is g else None for c in order]
        assert all(len(col) == len(order) for col in msg[1:])
        evs = decode_compute_tasks(wire(msg))
        assert [event_fields(e) for e in evs] == [expected_event(c) for c in order]


def test_batch_keeps_order_and_other_instructions_split_the_runs():
    s = new_state(("w1", 4))
    out = s.handle_stimulus(UpdateGraph("c1", [(f"t-{i}", "f", [], i) for i in range(3)],
                                        ["t-0", "t-1", "t-2"], stimulus_id="ug"))
    t0, t1, t2 = computes(out)
    out = finished(s, t0, data=42)
    [km] = in_memory(out)
    freekeys = [i for i in s.handle_stimulus(ClientReleasesKeys("c1", ["t-0"], stimulus_id="r"))
                if type(i) is FreeKeys]
    [fk] = freekeys
    items = batch_instructions([t1, fk, t2])
    assert len(items) == 3
    assert items[0] == ({"w1": ["compute-tasks", t1.task_id, "t-1", "f", list(t1.priority),
                                []]}, {})
    assert items[1] is fk
    assert items[2] == ({"w1": ["compute-tasks", t2.task_id, "t-2", "f", list(t2.priority),
                                []]}, {})
    # KeyInMemory and ComputeTask belong to one run: one message per peer
    compute, mem = only(batch_instructions([t1, km, t2]))
    assert compute["w1"][1] == [t1.task_id, t2.task_id]
    assert mem == {"c1": ["keys-in-memory", "t-0", 42]}
    # an instruction first or last stands alone, in its place
    items = batch_instructions([fk, km, fk])
    assert items[0] is fk and items[2] is fk
    assert items[1] == ({}, {"c1": ["keys-in-memory", "t-0", 42]})
    assert batch_instructions([]) == []


# --------------------------------------------------------------------------
# keys-in-memory
# --------------------------------------------------------------------------

def test_keys_in_memory_one_and_several_clients_and_payloads():
    s = new_state(("w1", 8))
    out = s.handle_stimulus(UpdateGraph("c1", [(k, "f", [], i) for i, k in enumerate("abcdef")],
                                        list("abcdef"), stimulus_id="ug"))
    s.handle_stimulus(UpdateGraph("c2", [], ["b"], stimulus_id="ug2"))
    cts = {c.key: c for c in computes(out)}
    big = serialize_obj(list(range(50)))
    payloads = {"a": payload_of(None), "b": 3, "c": 2.5, "d": True, "e": big, "f": None}
    out = []
    for k in "abcdef":
        out += finished(s, cts[k], data=payloads[k])
    kims = in_memory(out)
    assert [k.key for k in kims] == list("abcdef")
    assert [k.data for k in kims] == [payloads[k] for k in "abcdef"]   # passed through
    [kb] = [k for k in kims if k.key == "b"]
    assert sorted(kb.clients) == ["c1", "c2"]
    mem = {}
    for item in batch_instructions(out):
        if type(item) is tuple:
            for c, m in item[1].items():
                mem.setdefault(c, []).append(m)
    # c2 learns of b alone (the one-key form); c1 of all six (columns)
    assert mem["c2"] == [["keys-in-memory", "b", 3]]
    [m1] = mem["c1"]
    assert m1[1] == list("abcdef")
    for m in (m1, wire(m1)):
        assert keys_in_memory_size(m) == 6
        got = decode_keys_in_memory(m)
        assert [k for k, _ in got] == list("abcdef")
        values = [value_of(p) for _, p in got]
        assert values[:4] == [(True, None), (True, 3), (True, 2.5), (True, True)]
        assert values[4][0] and values[4][1].deserialize() == list(range(50))
        assert values[5] == (False, None)                    # not sent: fetch it
        assert [keys_in_memory_key(m, i) for i in range(6)] == list("abcdef")
        assert keys_in_memory_payload(m, 1) == 3
    m2 = wire(mem["c2"][0])
    assert keys_in_memory_size(m2) == 1
    assert (keys_in_memory_key(m2, 0), keys_in_memory_payload(m2, 0)) == ("b", 3)
    assert decode_keys_in_memory(m2) == [("b", 3)]


def test_key_in_memory_comes_before_the_dependents_work():
    """The machine emits the KeyInMemory of a finished task (with its payload)
    before the instructions for its dependents: the client hears first."""
    s = new_state(("w1", 2))
    out = s.handle_stimulus(UpdateGraph("c1", [("a", "fa", [], 0), ("b", "fb", ["a"], 1)],
                                        ["a", "b"], stimulus_id="ug"))
    [ct_a] = computes(out)
    out = finished(s, ct_a, data=[None])
    kinds = [type(i) for i in out]
    assert kinds.index(KeyInMemory) < kinds.index(ComputeTask)
    [km] = in_memory(out)
    assert km.data == [None] and km.key == "a"


# --------------------------------------------------------------------------
# tasks-finished
# --------------------------------------------------------------------------

def test_tasks_finished_writer_one_row():
    w = TasksFinishedWriter()
    assert w.take() is None
    w.add(5, 28, "int", 0.25, 41)
    msg = w.take()
    assert msg == ["tasks-finished", 5, 28, "int", 0.25, 41]
    assert w.take() is None                                   # taken: empty again
    for m in (msg, wire(msg)):
        ev = decode_tasks_finished("tcp://w:1", m)
        assert type(ev) is TaskFinished
        assert (ev.worker, ev.task_id, ev.nbytes, ev.typename, ev.duration, ev.data) == \
            ("tcp://w:1", 5, 28, "int", 0.25, 41)
        assert ev.key is None


def test_tasks_finished_writer_several_rows_and_reuse():
    w = TasksFinishedWriter()
    big = serialize_obj("x" * 100)
    rows = [(1, 28, "int", 0.5, 1), (2, 16, "NoneType", 0.0, [None]), (3, 1000, "str", 1e-6, big),
            (4, 10**6, "bytes", 2.0, None)]
    for r in rows:
        w.add(*r)
    msg = w.take()
    assert msg == ["tasks-finished", [1, 2, 3, 4], [28, 16, 1000, 10**6],
                   ["int", "NoneType", "str", "bytes"], [0.5, 0.0, 1e-6, 2.0],
                   [1, [None], big, None]]
    for m in (msg, wire(msg)):
        ev = decode_tasks_finished("w", m)
        assert type(ev) is TasksFinished and ev.worker == "w"
        assert (ev.task_ids, ev.nbytes, ev.typenames, ev.durations) == \
            ([1, 2, 3, 4], [28, 16, 1000, 10**6], ["int", "NoneType", "str", "bytes"],
             [0.5, 0.0, 1e-6, 2.0])
        assert ev.data[:2] == [1, [None]] and ev.data[3] is None
        assert ev.data[2].deserialize() == "x" * 100
    # the writer starts over after a take, and the message it gave is not touched
    w.add(9, 8, "int", 0.1, 2)
    w.add(10, 8, "int", 0.1, 3)
    assert w.take() == ["tasks-finished", [9, 10], [8, 8], ["int", "int"], [0.1, 0.1], [2, 3]]
    assert msg[1] == [1, 2, 3, 4]
    w.add(11, 8, "int", 0.1, None)
    assert w.take() == ["tasks-finished", 11, 8, "int", 0.1, None]


def test_decoded_tasks_finished_drive_a_real_state_machine():
    s = new_state(("tcp://w:1", 4))
    out = s.handle_stimulus(UpdateGraph("c1", [("a", "f", [], 0), ("b", "f", [], 1),
                                               ("c", "f", [], 2)], ["a", "b", "c"],
                                        stimulus_id="ug"))
    cts = {c.key: c for c in computes(out)}
    w = TasksFinishedWriter()
    w.add(cts["a"].task_id, 28, "int", 0.01, 7)
    out = s.handle(decode_tasks_finished("tcp://w:1", wire(w.take())))
    [km] = in_memory(out)
    assert (km.key, km.data, km.nbytes, km.typename, km.clients) == ("a", 7, 28, "int", ("c1",))
    w.add(cts["b"].task_id, 16, "NoneType", 0.01, payload_of(None))
    w.add(cts["c"].task_id, 5000, "bytes", 0.01, None)
    out = s.handle(decode_tasks_finished("tcp://w:1", wire(w.take())))
    assert [(k.key, k.data) for k in in_memory(out)] == [("b", [None]), ("c", None)]
    assert s.task_states() == {"a": "memory", "b": "memory", "c": "memory"}


# --------------------------------------------------------------------------
# malformed messages: ValueError naming the fault
# --------------------------------------------------------------------------

@pytest.mark.parametrize("msg,match", [
    (["compute-tasks", ["a", "f", [], None], "a", 0], "expected a 'update-graph' message"),
    (["update-graph", ["a", "f", [], None], "a"], "4 fields .one task. or 8 .columns. expected, got 3"),
    (["update-graph", ["a", "f", [], None], "a", 0, 1], "or 8 .columns. expected, got 5"),
    (["update-graph"], "or 8 .columns. expected, got 1"),
    (["update-graph", ["a", "f", [], None], "a", "high"], "priority must be an int"),
    (["update-graph", ("a", "f", [], None), "a", 0], "malformed task record"),
    (["update-graph", ["a", "f", []], "a", 0], "malformed task record"),
    (["update-graph", ["a", "f", [], "w1"], "a", 0], "options of 'a' must be a map"),
    (["update-graph", ["a", "f", [], None], ["a"], 0], "wanted key"),     # one task, one key
    # columns
    (["update-graph", "a", ["f"], [[]], ["a"], 0, None, None], "task keys must be a list"),
    (["update-graph", ["a", "b"], ["f"], [[], []], ["a"], 0, None, None],
     "columns of different lengths"),
    (["update-graph", ["a"], ["f"], "deps", ["a"], 0, None, None], "columns of different"),
    (["update-graph", ["a"], ["f"], [[]], "a", 0, None, None], "wanted keys must be a list"),
    (["update-graph", ["a"], ["f"], [[]], ["a"], 0.5, None, None], "priority must be an int"),
    (["update-graph", ["a"], ["f"], [[]], ["a"], 0, [1, 2], None], "columns of different"),
    (["update-graph", ["a"], ["f"], [[]], ["a"], 0, ["high"], None], "priority of a"),
    (["update-graph", ["a"], ["f"], [[]], ["a"], 0, None, [["workers"]]],
     "options of 'a' must be a map"),
    (["update-graph", ["a", "b"], ["f", "g"], [[], []], ["a"], 0, None, [{"retries": 1}]],
     "columns of different"),
    (["update-graph", ["a", "b"], ["f", "g"], [[], []], ["a"], 0, None,
      [{"retries": 1}, {"retries": "x"}]], "retries of b"),
])
def test_malformed_update_graph(msg, match):
    with pytest.raises(ValueError, match=match):
        decode_update_graph("c1", msg, "ug")


@pytest.mark.parametrize("msg,match", [
    (["tasks-finished", 1, 8, "int", 0.1, None], "expected a 'compute-tasks' message"),
    (["no-such-op", 1, 2, 3, 4, 5], "expected a 'compute-tasks' message, got 'no-such-op'"),
    (["no-such-op", 1, 2, 3, 4, 5, 6], "expected a 'compute-tasks' message"),
    (["compute-tasks", [1]], "6 fields expected, got 2"),
    (["compute-tasks", 1, "a"], "6 fields expected, got 3"),
    (["compute-tasks", 1, "a", "f", [0, 0, 0], [], None, None], "6 fields expected, got 8"),
    (["compute-tasks", [1, 2], ["a"], ["f", "g"], [[0, 0, 0]] * 2, [[], []]],
     "compute-tasks: columns of different lengths"),
    (["compute-tasks", [1, 2], ["a", "b"], ["f", "g"], [[0, 0, 0]] * 2, [[], []], [None]],
     "compute-tasks: columns of different lengths"),
    (["compute-tasks", [1], ["a"], ["f"], [[0, 0, 0]], "deps"],
     "compute-tasks: columns of different lengths or types"),
    (["compute-tasks", 1, "a", "f", [0, 0, 0], [], [{"GPU": 1}]],
     "compute-tasks: malformed options for 'a'"),
    (["compute-tasks", 1, "a", "f", [0, 0, 0], [], {"GPU": 1}],
     "compute-tasks: malformed options for 'a'"),
    (["compute-tasks", [1, 2], ["a", "b"], ["f", "g"], [[0, 0, 0]] * 2, [[], []],
      [None, "opts"]], "compute-tasks: malformed options for 'b'"),
])
def test_malformed_compute_tasks(msg, match):
    with pytest.raises(ValueError, match=match):
        decode_compute_tasks(msg)


@pytest.mark.parametrize("msg,match", [
    (["compute-tasks", 1, 8, "int", 0.1, None], "expected a 'tasks-finished' message"),
    (["no-such-op", 1, 2, 3, 4, 5], "expected a 'tasks-finished' message, got 'no-such-op'"),
    (["tasks-finished", [1]], "6 fields expected, got 2"),
    (["tasks-finished", 1, 8, "int", 0.1], "6 fields expected, got 5"),
    (["tasks-finished", [1, 2], [8], ["int"], [0.1], [None, None]],
     "tasks-finished: columns of different lengths"),
    (["tasks-finished", [1, 2], [8, 8], ["int", "int"], [0.1, 0.1], None],
     "tasks-finished: columns of different lengths or types"),
    (["tasks-finished", [1], [8], ["int"], [0.1], [None, None]],
     "tasks-finished: columns of different lengths"),
])
def test_malformed_tasks_finished(msg, match):
    with pytest.raises(ValueError, match=match):
        decode_tasks_finished("w1", msg)


@pytest.mark.parametrize("msg,match", [
    (["tasks-finished", "a", 1], "expected a 'keys-in-memory' message"),
    (["keys-in-memory", "a"], "3 fields expected, got 2"),
    (["keys-in-memory", "a", 1, 2], "3 fields expected, got 4"),
    (["keys-in-memory", ["a", "b"], [1]], "keys-in-memory: columns of different lengths"),
    (["keys-in-memory", ["a"], 1], "keys-in-memory: columns of different lengths or types"),
])
def test_malformed_keys_in_memory(msg, match):
    with pytest.raises(ValueError, match=match):
        keys_in_memory_size(msg)
    with pytest.raises(ValueError, match=match):
        decode_keys_in_memory(msg)


def test_decoders_take_lists_only():
    for decode in (lambda m: decode_update_graph("c", m, "x"), decode_compute_tasks,
                   lambda m: decode_tasks_finished("w", m), decode_keys_in_memory):
        with pytest.raises(TypeError):
            decode(("update-graph", 1, 2, 3))
