"""core/messages.pyx, the map messages that carry a state machine's events and
instructions: every op encodes to a message that decodes to the right event, the
events and instructions come from real state machines, and malformed input is
refused. No I/O."""
import pytest

from taskcore.core import messages as M
from taskcore.core import scheduler_state as S
from taskcore.core import worker_state as W
from taskcore.core.serialize import dumps, loads, serialize_obj


def wire(msg):
    return loads([bytearray(f) for f in dumps([msg])])[0]


def scheduler(*workers):
    s = S.SchedulerState(validate=True)
    for w in workers:
        s.handle_stimulus(S.AddWorker(w, nthreads=2, memory_limit=1_000_000,
                                      stimulus_id=f"add-{w}"))
    return s


def one(out, kind):
    [ins] = [i for i in out if type(i) is kind]
    return ins


def run_one(s, key="x", client="c1"):
    """Submit `key` for `client` and let its worker finish it: (ComputeTask, instructions)."""
    out = s.handle_stimulus(S.UpdateGraph(client, [(key, ["call", b"f", [], None], [])], [key],
                                          stimulus_id="ug"))
    ct = one(out, S.ComputeTask)
    out = s.handle_stimulus(S.TaskFinished(ct.worker, task_id=ct.task_id, nbytes=8,
                                           typename="int", stimulus_id="fin"))
    return ct, out


# -- scheduler instructions -> messages -> worker/client ------------------------------------

def test_free_keys_reaches_the_worker_as_its_event():
    s = scheduler("w1")
    ct, _ = run_one(s)
    out = s.handle_stimulus(S.ClientReleasesKeys("c1", ["x"], stimulus_id="rel"))
    to, target, msg = M.encode_scheduler_instruction(one(out, S.FreeKeys))
    assert (to, target) == ("worker", "w1")
    ev = M.decode_scheduler_message(wire(msg))
    assert type(ev) is W.FreeKeys and list(ev.ids) == [ct.task_id]


def test_task_erred_reaches_the_clients_and_reads_back():
    s = scheduler("w1")
    out = s.handle_stimulus(S.UpdateGraph("c1", [("x", ["call", b"f", [], None], [])], ["x"],
                                          stimulus_id="ug"))
    ct = one(out, S.ComputeTask)
    err = serialize_obj(ValueError("boom"))
    out = s.handle_stimulus(S.TaskErred("w1", ct.task_id, err, "tb-text", "err"))
    to, target, msg = M.encode_scheduler_instruction(one(out, S.TaskErredReport))
    assert to == "clients" and list(target) == ["c1"]
    op, keys, exc, tb, reason = M.decode_key_report(wire(msg))
    assert (op, keys, tb, reason) == ("task-erred", ["x"], "tb-text", None)
    assert isinstance(exc.deserialize(), ValueError)


def test_cancel_and_loss_read_back_as_key_reports():
    s = scheduler("w1")
    run_one(s, "x")
    out = s.handle_stimulus(S.RemoveWorker("w1", stimulus_id="gone"))
    to, target, msg = M.encode_scheduler_instruction(one(out, S.KeyLost))
    assert M.decode_key_report(wire(msg))[:2] == ("key-lost", ["x"])
    out = s.handle_stimulus(S.Cancel("c1", ["x"], stimulus_id="cancel"))
    cancelled = [i for i in out if type(i) in (S.TaskCancelled, S.KeyForgotten)]
    assert cancelled
    to, target, msg = M.encode_scheduler_instruction(cancelled[0])
    assert M.decode_key_report(wire(msg))[:2] == ("key-cancelled", ["x"])
    assert M.decode_key_report(M.key_cancelled(["a", "b"], "restart")) == (
        "key-cancelled", ["a", "b"], None, None, "restart")


def test_instructions_that_are_not_messages_encode_to_none():
    s = scheduler("w1")
    out = s.handle_stimulus(S.UpdateGraph("c1", [("x", ["call", b"f", [], None], [])], ["x"],
                                          stimulus_id="ug"))
    assert M.encode_scheduler_instruction(one(out, S.ComputeTask)) is None   # the hot path's
    assert M.decode_key_report({"op": "reply", "reqid": 1}) is None


def test_steal_request_reaches_the_worker():
    # All on w1 (no queueing), then an idle w2 joins: the next tick steals.
    s = S.SchedulerState(validate=True, worker_saturation=float("inf"))
    s.handle_stimulus(S.AddWorker("w1", nthreads=1, memory_limit=1_000_000, stimulus_id="a1"))
    graph = [(f"t{i}", ["call", b"f", [], None], [], i) for i in range(6)]
    s.handle_stimulus(S.UpdateGraph("c1", graph, [g[0] for g in graph], stimulus_id="ug"))
    s.handle_stimulus(S.AddWorker("w2", nthreads=2, memory_limit=1_000_000, stimulus_id="a2"))
    steals = [i for i in s.handle_stimulus(S.BalanceTick(1.0, stimulus_id="tick"))
              if type(i) is S.StealRequest]
    assert steals
    to, target, msg = M.encode_scheduler_instruction(steals[0])
    ev = M.decode_scheduler_message(wire(msg))
    assert (to, target) == ("worker", "w1")
    assert type(ev) is W.StealRequest and ev.id == steals[0].task_id


def test_worker_side_decoders_for_every_op():
    assert type(M.decode_scheduler_message({"op": "remove-replicas", "ids": [1]})) \
        is W.RemoveReplicas
    ev = M.decode_scheduler_message({"op": "acquire-replicas",
                                     "who_has": [[1, "k", 8, ["w2"]]]})
    assert type(ev) is W.AcquireReplicas
    assert M.decode_scheduler_message({"op": "run", "func": b""}) is None
    with pytest.raises(KeyError):
        M.decode_scheduler_message({"op": "free-keys"})


# -- worker instructions -> messages -> scheduler ----------------------------------------------

def _key_of(tid):
    return f"k{tid}"


@pytest.mark.parametrize("ins,kind,check", [
    (W.TaskErredMsg(3, "k3", "exc", "tb", 0.0, 1.0, "s"), S.TaskErred,
     lambda ev: (ev.task_id, ev.exception, ev.traceback) == (3, "exc", "tb")),
    (W.AddKeysMsg([1, 2], "s"), S.AddKeys, lambda ev: list(ev.keys) == ["k1", "k2"]),
    (W.MissingDataMsg(4, "k4", "tcp://w2:1", "s"), S.MissingData,
     lambda ev: (ev.key, ev.holder) == ("k4", "tcp://w2:1")),
    (W.StealResponseMsg(5, "k5", "ready", "s"), S.StealResponse,
     lambda ev: (ev.task_id, ev.state) == (5, "ready")),
    (W.LongRunningMsg(6, "k6", "s"), S.TaskLongRunning, lambda ev: ev.task_id == 6),
    (W.RescheduleMsg(7, "k7", "s"), S.TaskErred,
     lambda ev: "rescheduled" in str(ev.exception.deserialize())),
])
def test_worker_instruction_reaches_the_scheduler_as_its_stimulus(ins, kind, check):
    msg = M.encode_worker_instruction(ins, _key_of)
    ev = M.decode_worker_message("tcp://w1:1", wire(msg), 123.0)
    assert type(ev) is kind and check(ev)


def test_worker_instructions_it_carries_out_itself_encode_to_none():
    assert M.encode_worker_instruction(W.RetryBusyWorkerLater("w2", "s"), _key_of) is None


def test_heartbeat_and_released_data():
    ev = M.decode_worker_message("w1", {"op": "heartbeat", "metrics": {"rss": 1}}, 42.0)
    assert type(ev) is S.WorkerHeartbeat and ev.now == 42.0 and ev.metrics == {"rss": 1}
    ev = M.decode_worker_message("w1", wire(M.release_worker_data(["a"])), 0.0)
    assert type(ev) is S.ReleaseWorkerData and list(ev.keys) == ["a"]
    assert M.decode_worker_message("w1", {"op": "reply", "reqid": 1}, 0.0) is None


def test_client_messages():
    ev = M.decode_client_message("c1", wire(M.release_keys(["a", "b"])))
    assert type(ev) is S.ClientReleasesKeys and (ev.client, list(ev.keys)) == ("c1", ["a", "b"])
    ev = M.decode_client_message("c1", wire(M.fire_and_forget(["a"])))
    assert type(ev) is S.ClientWantsKeys and ev.client == M.FIRE_AND_FORGET
    assert M.decode_client_message("c1", {"op": "rpc"}) is None


@pytest.mark.parametrize("decode,msg", [
    (lambda m: M.decode_client_message("c1", m), {"op": "release-keys", "keys": "a"}),
    (lambda m: M.decode_worker_message("w1", m, 0.0), {"op": "add-keys", "keys": 5}),
    (lambda m: M.decode_key_report(m), {"op": "key-lost", "keys": "abc"}),
])
def test_keys_must_be_a_list(decode, msg):
    with pytest.raises(ValueError, match="keys must be a list"):
        decode(msg)


def test_missing_fields_raise():
    with pytest.raises(KeyError):
        M.decode_worker_message("w1", {"op": "task-erred"}, 0.0)
    with pytest.raises(KeyError):
        M.decode_key_report({"op": "task-erred"})
