"""core/scheduler_dispatch.pyx: the scheduler's compiled dispatch, without I/O.

A `SchedulerDispatch` subclass records what reaches its hooks; peers are fake comms
(send/flush/closed, which `sink_of` wraps in a CallSink), so every message the
dispatch queues is observable, in order, next to the hooks' calls.
"""
import logging


from taskcore.core.messages import (decode_compute_tasks, decode_keys_in_memory, payload_of,
                                    update_graph, value_of)
from taskcore.core.protocol import CallSink
from taskcore.core.scheduler_dispatch import Peer, Route, SchedulerDispatch
from taskcore.core.scheduler_state import (AddWorker, ClientReleasesKeys, FreeKeys,
                                           SchedulerState, TaskErred, TaskErredReport,
                                           TaskFinished, UpdateGraph)
from taskcore.core.serialize import serialize_obj
from taskcore.errors import CommClosedError

W1, W2 = "tcp://w:1", "tcp://w:2"


class FakeComm:
    """A comm written in Python: what is sent is logged (shared log: the order of
    messages and hook calls across peers)."""

    def __init__(self, name, log):
        self.name = name
        self.log = log
        self.closed = False
        self.flushes = 0

    def send(self, msg):
        if self.closed:
            raise CommClosedError(f"{self.name} is closed")
        self.log.append((self.name, msg))

    def flush(self):
        self.flushes += 1

    def sent(self):
        return [m for who, m in self.log if who == self.name]


class Server(SchedulerDispatch):
    def __init__(self, workers=(W1,), clients=("c1",), nthreads=1):
        self.state = SchedulerState(validate=True)
        self.log = []
        self.comms = {}
        for addr in workers:
            self.comms[addr] = FakeComm(addr, self.log)
            self.workers[addr] = Peer(self.comms[addr], "worker", addr)
            self.handle(AddWorker(addr, nthreads=nthreads, memory_limit=10**9,
                                  stimulus_id=f"add-{addr}"))
        for cid in clients:
            self.comms[cid] = FakeComm(cid, self.log)
            self.clients[cid] = Peer(self.comms[cid], "client", cid)
        del self.log[:]

    # recording hooks
    def handle_client_message(self, peer, msg):
        self.log.append(("client-hook", (peer.id, msg)))

    def handle_worker_message(self, peer, msg):
        self.log.append(("worker-hook", (peer.id, msg)))

    def execute_other(self, instruction):
        self.log.append(("other", instruction))

    def route(self, who):
        if who in self.workers:
            return Route(self, self.workers[who], True)
        return Route(self, self.clients[who], False)

    def sent(self, who):
        return self.comms[who].sent()


def submit(server, keys, client="c1", deps=None):
    deps = deps or {}
    recs = [[k, f"spec-{k}", list(deps.get(k, [])), None] for k in keys]
    server.route(client).handle(update_graph(recs, list(keys)))


def computed(server, worker):
    """The ComputeTask events of everything sent to `worker`, in order."""
    return [ev for m in server.sent(worker) if type(m) is list
            for ev in decode_compute_tasks(m)]


def test_peer_wraps_a_python_comm_in_a_call_sink():
    log = []
    comm = FakeComm("x", log)
    p = Peer(comm, "client", "c1")
    assert (p.comm, p.kind, p.id, p.replies, p.info, p.closing) == \
        (comm, "client", "c1", {}, {}, False)
    assert type(p.sink) is CallSink
    assert Peer(comm, "worker", W1, info={"nthreads": 2}).info == {"nthreads": 2}


def test_update_graph_from_a_client_yields_compute_tasks_to_the_worker():
    s = Server()
    submit(s, ["a"])
    [msg] = s.sent(W1)
    assert msg[0] == "compute-tasks"
    [ev] = decode_compute_tasks(msg)
    assert (ev.id, ev.key, ev.run_spec, ev.who_has) == (s.state.id_of("a"), "a", "spec-a", [])
    assert s.state.task_state("a") == "processing"
    assert s.sent("c1") == []


def test_several_tasks_go_as_one_message_per_worker():
    s = Server(workers=(W1, W2), nthreads=2)
    submit(s, [f"t-{i}" for i in range(4)])
    assert len(s.sent(W1)) == 1 and len(s.sent(W2)) <= 1
    keys = sorted(ev.key for w in (W1, W2) for ev in computed(s, w))
    assert keys == [f"t-{i}" for i in range(4)]


def test_tasks_finished_with_a_payload_yields_keys_in_memory_to_the_client():
    s = Server(clients=("c1", "c2"))
    submit(s, ["a"])
    submit(s, [], client="c2")
    s.route("c2").handle(update_graph([], ["a"]))          # c2 wants a as well
    [ev] = computed(s, W1)
    s.route(W1).handle(["tasks-finished", ev.id, 28, "int", 0.01, 42])
    assert s.sent("c1") == [["keys-in-memory", "a", 42]]
    assert s.sent("c2") == [["keys-in-memory", "a", 42]]
    assert s.state.task_state("a") == "memory" and s.state.who_has(["a"]) == {"a": [W1]}


def test_tasks_finished_columns_and_payload_kinds():
    s = Server(nthreads=4)
    submit(s, ["a", "b", "c", "d"])
    ids = {ev.key: ev.id for ev in computed(s, W1)}
    big = serialize_obj({"x": 1})
    s.route(W1).handle(["tasks-finished", [ids[k] for k in "abcd"], [16, 28, 100, 10**6],
                        ["NoneType", "int", "dict", "bytes"], [0.1] * 4,
                        [payload_of(None), 3, big, None]])
    [msg] = s.sent("c1")
    got = decode_keys_in_memory(msg)
    assert [k for k, _ in got] == ["a", "b", "c", "d"]
    assert [value_of(p) for _, p in got[:2]] == [(True, None), (True, 3)]
    assert got[2][1] is big                                   # passed through untouched
    assert value_of(got[3][1]) == (False, None)               # not sent: fetched later


def test_dependents_are_sent_after_the_client_hears():
    s = Server()
    submit(s, ["a", "b"], deps={"b": ["a"]})
    [ev_a] = computed(s, W1)
    del s.log[:]
    s.route(W1).handle(["tasks-finished", ev_a.id, 28, "int", 0.01, 1])
    assert [who for who, _ in s.log] == ["c1", W1]
    assert s.log[0][1] == ["keys-in-memory", "a", 1]
    [ev_b] = decode_compute_tasks(s.log[1][1])
    assert ev_b.key == "b" and [d[1] for d in ev_b.who_has] == ["a"]


def test_other_messages_reach_the_hooks():
    s = Server()
    s.route("c1").handle({"op": "release-keys", "keys": ["a"]})
    s.route(W1).handle({"op": "heartbeat", "metrics": {}})
    s.route(W1).handle("not a map either")
    assert s.log == [("client-hook", ("c1", {"op": "release-keys", "keys": ["a"]})),
                     ("worker-hook", (W1, {"op": "heartbeat", "metrics": {}})),
                     ("worker-hook", (W1, "not a map either"))]
    assert Route(s, s.clients["c1"], False)({"op": "x"}) is None     # __call__ too
    assert s.log[-1] == ("client-hook", ("c1", {"op": "x"}))


def test_other_instructions_reach_execute_other_in_order():
    s = Server()
    submit(s, ["a"])
    [ev] = computed(s, W1)
    s.route(W1).handle(["tasks-finished", ev.id, 28, "int", 0.01, None])
    del s.log[:]
    s.handle(ClientReleasesKeys("c1", ["a"], stimulus_id="rel"))
    [(who, ins)] = s.log
    assert who == "other" and type(ins) is FreeKeys and ins.worker == W1 and ins.keys == ["a"]


def test_execute_keeps_the_order_of_instructions():
    s = Server(nthreads=4)
    cta, ctb = s.state.handle_stimulus(UpdateGraph("c1", [("a", "fa", [], 0), ("b", "fb", [], 1)],
                                                   ["a", "b"], stimulus_id="ug"))
    s.state.handle_stimulus(TaskFinished(W1, task_id=cta.task_id, nbytes=8, typename="int",
                                         duration=0.01, stimulus_id="fin"))
    [fk] = [i for i in s.state.handle_stimulus(ClientReleasesKeys("c1", ["a"], stimulus_id="r"))
            if type(i) is FreeKeys]
    s.execute([cta, fk, ctb])
    assert [who for who, _ in s.log] == [W1, "other", W1]
    assert s.log[1][1] is fk
    assert [decode_compute_tasks(m)[0].key for who, m in s.log if who == W1] == ["a", "b"]
    assert s.execute([]) == 0 and len(s.log) == 3


def test_task_erred_report_is_left_to_the_server():
    s = Server()
    submit(s, ["a"])
    del s.log[:]
    # the worker's task-erred is a map message: the server's hook decodes it
    s.route(W1).handle({"op": "task-erred", "key": "a"})
    assert s.log == [("worker-hook", (W1, {"op": "task-erred", "key": "a"}))]
    del s.log[:]
    s.handle(TaskErred(W1, s.state.id_of("a"), ValueError("x"), "tb", "err"))
    [(who, ins)] = [e for e in s.log if e[0] == "other" and type(e[1]) is TaskErredReport]
    assert ins.key == "a" and ins.clients == ("c1",)


def test_a_malformed_message_is_logged_and_dropped(caplog):
    s = Server()
    with caplog.at_level(logging.ERROR, logger="taskcore.scheduler"):
        s.route("c1").handle(["update-graph", ["a", "f", []], "a", 0])    # short record
        s.route("c1").handle(["update-graph", 1])                          # arity
        s.route(W1).handle(["tasks-finished", [1, 2], [8], ["int"], [0.1], [None, None]])
        s.route(W1).handle(["no-such-op", 1, 2, 3, 4, 5])
    text = caplog.text
    assert "malformed task record" in text
    assert "4 fields (one task) or 8 (columns) expected, got 2" in text
    assert "tasks-finished: columns of different lengths" in text
    assert "expected a 'tasks-finished' message, got 'no-such-op'" in text
    assert "from client c1" in text and f"from worker {W1}" in text
    assert s.log == [] and s.state.tasks == {}
    # the connection and the scheduler carry on
    submit(s, ["b"])
    [ev] = computed(s, W1)
    s.route(W1).handle(["tasks-finished", ev.id, 28, "int", 0.01, 5])
    assert s.sent("c1") == [["keys-in-memory", "b", 5]]


def test_an_error_in_a_hook_is_logged_and_dropped(caplog):
    class Failing(Server):
        def handle_client_message(self, peer, msg):
            raise RuntimeError("hook failed")

    s = Failing()
    with caplog.at_level(logging.ERROR, logger="taskcore.scheduler"):
        s.route("c1").handle({"op": "anything"})
    assert "hook failed" in caplog.text
    submit(s, ["a"])
    assert len(computed(s, W1)) == 1


def test_a_tasks_finished_with_a_bad_value_is_not_half_applied(caplog):
    s = Server(nthreads=2)
    submit(s, ["a", "b", "c"], deps={"c": ["a"]})
    ids = {ev.key: ev.id for ev in computed(s, W1)}
    with caplog.at_level(logging.ERROR, logger="taskcore.scheduler"):
        s.route(W1).handle(["tasks-finished", [ids["a"], ids["b"]], [8, "x"], ["int", "int"],
                            [0.1, 0.1], [None, None]])
    # either the message is refused as a whole, or every consequence of what was
    # applied reaches the peers; the machine stays consistent
    if s.state.task_state("a") == "memory":
        assert [m[1] for m in s.sent("c1")] == ["a"]
        assert "c" in [ev.key for ev in computed(s, W1)]
    s.state.validate_state()


def test_a_closed_comm_does_not_break_the_dispatch():
    s = Server(workers=(W1,), clients=("c1", "c2"))
    s.comms[W1].closed = True                      # the worker is gone; removal follows
    submit(s, ["a"])                               # its compute-tasks is dropped quietly
    assert s.state.task_state("a") == "processing"
    assert s.sent(W1) == []
    # a closed client: its keys-in-memory is dropped, the others still get theirs
    s.comms[W1].closed = False
    s.route("c2").handle(update_graph([], ["a"]))
    s.comms["c1"].closed = True
    ev_id = s.state.id_of("a")
    s.route(W1).handle(["tasks-finished", ev_id, 8, "int", 0.01, 3])
    assert s.sent("c1") == [] and s.sent("c2") == [["keys-in-memory", "a", 3]]
    assert s.state.task_state("a") == "memory"
    # send() to a closed peer, or to none, is not an error
    assert s.send(s.clients["c1"], {"op": "x"}) == 0
    assert s.send(None, {"op": "x"}) == 0
    assert s.send(s.clients["c2"], {"op": "y"}) == 0
    assert s.sent("c2")[-1] == {"op": "y"}


def test_instructions_for_unknown_peers_are_dropped():
    s = Server(workers=(W1,), clients=())
    submit_peer = Peer(FakeComm("c9", s.log), "client", "c9")
    Route(s, submit_peer, False).handle(update_graph([["a", "f", [], None]], ["a"]))
    [ev] = computed(s, W1)
    s.route(W1).handle(["tasks-finished", ev.id, 8, "int", 0.01, 1])   # c9 is not in clients
    assert s.state.task_state("a") == "memory"
    assert [who for who, _ in s.log] == [W1]
    del s.workers[W1]                                # a worker removed from the map
    Route(s, submit_peer, False).handle(update_graph([["b", "f", [], None]], ["b"]))
    assert s.state.task_state("b") == "processing"
