"""core/client_dispatch.pyx and the comm sinks of core/protocol.pyx, without I/O.

`ClientHotPath` runs here with a fake client (its `_uid`), a fake loop (records
the calls a real one would run) and a fake comm (send/flush), which `sink_of`
wraps in a CallSink; the task-building helpers are plain functions.
"""
import threading

import pytest

from taskcore.core.client_dispatch import (ClientHotPath, FutureBase, func_token, funcname,
                                           replace_futures, tokenize)
from taskcore.core.messages import decode_update_graph, update_graph
from taskcore.core.protocol import CallSink, sink_of
from taskcore.core.serialize import serialize_obj
from taskcore.graph import TaskRef


def inc(x):
    return x + 1


def add(x, y):
    return x + y


class Callable:
    def __call__(self, x):
        return x


class FakeComm:
    def __init__(self):
        self.sent = []
        self.flushes = 0
        self.closed = False

    def send(self, msg):
        self.sent.append(msg)

    def flush(self):
        self.flushes += 1


class FakeLoop:
    def __init__(self):
        self.calls = []

    def call_soon(self, fn, *args):
        self.calls.append(("soon", fn, args))

    def call_soon_threadsafe(self, fn, *args):
        self.calls.append(("threadsafe", fn, args))

    def call_later(self, delay, fn, *args):
        self.calls.append(("later", fn, args))

    def run(self):
        while self.calls:
            _, fn, args = self.calls.pop(0)
            fn(*args)


class Future(FutureBase):
    def _result_slow(self, timeout):
        return ("slow", self.key)


class FakeClient:
    def __init__(self):
        self._uid = "u1"


class Hot(ClientHotPath):
    def __init__(self, *args):
        super().__init__(*args)
        self.others = []

    def handle_other(self, msg):
        self.others.append(msg)


def make_hot(asynchronous=False):
    client = FakeClient()
    hot = Hot(client, asynchronous, 0.02)
    client._hot = hot
    hot.loop = FakeLoop()
    hot.future_type = Future
    hot.status = "running"
    hot.comm = FakeComm()
    return hot


# --------------------------------------------------------------------------
# task building
# --------------------------------------------------------------------------

def test_funcname():
    assert funcname(inc) == "inc"
    assert funcname(lambda x: x) == "lambda"
    assert funcname(Callable()) == "Callable"
    assert funcname(len) == "len"


def test_func_token():
    t = func_token(inc)
    assert t == func_token(inc) and len(t) == 16 and int(t, 16) >= 0
    assert func_token(add) != t
    f1 = lambda x: x + 1          # noqa: E731
    f2 = lambda x: x + 2          # noqa: E731
    assert func_token(f1) != func_token(f2)          # same name, different pickles

    def local(x):
        return x
    assert func_token(local) == func_token(local)


def test_tokenize():
    t = func_token(inc)
    assert tokenize(t, (1,), None) == tokenize(t, (1,), None)
    assert tokenize(t, (1,), None) == tokenize(t, (1,), {})      # no kwargs either way
    assert tokenize(t, (1,), None) != tokenize(t, (2,), None)
    assert tokenize(t, (1,), {"k": 1}) != tokenize(t, (1,), {"k": 2})
    assert tokenize(t, (1,), None) != tokenize(func_token(add), (1,), None)
    # not msgpack-able: hashed by its pickle, still deterministic
    assert tokenize(t, ({1, 2},), None) == tokenize(t, ({1, 2},), None)
    # not even picklable: a fresh token every time (never a false cache hit)
    lock = threading.Lock()
    assert tokenize(t, (lock,), None) != tokenize(t, (lock,), None)


def test_replace_futures():
    hot = make_hot()
    fa, fb = hot.submit([["a", "s", [], None], ["b", "s", [], None]], ["a", "b"])
    deps = []
    out = replace_futures([1, fa, (fb, "x"), {"k": fa, "n": 2}, {3}], deps)
    assert deps == ["a", "b", "a"]
    assert type(out) is list and out[0] == 1
    assert type(out[1]) is TaskRef and out[1].key == "a"
    assert type(out[2]) is tuple and out[2][0].key == "b" and out[2][1] == "x"
    assert out[3]["k"].key == "a" and out[3]["n"] == 2
    assert out[4] == {3}
    plain = {"a": [1, 2]}
    deps = []
    assert replace_futures(plain, deps) == plain and deps == []
    obj = object()
    assert replace_futures(obj, deps) is obj
    frozen = replace_futures(frozenset([fa]), deps)
    assert type(frozen) is frozenset and [r.key for r in frozen] == ["a"]


# --------------------------------------------------------------------------
# sinks
# --------------------------------------------------------------------------

def test_sink_of_a_python_comm_is_a_call_sink():
    comm = FakeComm()
    s = sink_of(comm)
    assert type(s) is CallSink
    comm.sink = None                                   # "no sink of its own"
    assert type(sink_of(comm)) is CallSink
    comm.sink = s                                      # a comm that provides one
    assert sink_of(comm) is s
    comm.sink = "not a sink"
    with pytest.raises(TypeError):
        sink_of(comm)
    with pytest.raises(AttributeError):
        CallSink(object())                             # a comm must have send()


# --------------------------------------------------------------------------
# ClientHotPath
# --------------------------------------------------------------------------

def test_submit_queues_one_message_and_flush_merges_a_loop_of_submits():
    hot = make_hot()
    futures = [hot.submit([[k, f"s-{k}", [], None]], [k])[0] for k in "abc"]
    assert [f.key for f in futures] == ["a", "b", "c"]
    assert all(type(f) is Future and f.status == "pending" and not f.done() for f in futures)
    assert hot.refcount == {"a": 1, "b": 1, "c": 1}
    # one wake-up of the loop for the three submits
    assert [(kind, fn) for kind, fn, _ in hot.loop.calls] == [("threadsafe", hot.flush_outbox)]
    hot.loop.run()
    [msg] = hot.comm.sent                              # one merged graph
    assert msg == ["update-graph", ["a", "b", "c"], ["s-a", "s-b", "s-c"], [[], [], []],
                   ["a", "b", "c"], 0, None, None]
    assert hot.comm.flushes == 1                       # the batch ended with flush()
    assert decode_update_graph("u", msg, "x").keys == ["a", "b", "c"]


def test_enqueue_keeps_the_order_with_submits():
    hot = make_hot()
    hot.submit([["a", "s", [], None]], ["a"])
    hot.enqueue({"op": "x"})
    hot.submit([["b", "s", [], None]], ["b"])
    hot.flush_outbox()
    assert hot.comm.sent == [update_graph([["a", "s", [], None]], ["a"]), {"op": "x"},
                             update_graph([["b", "s", [], None]], ["b"])]


def test_keys_in_memory_finishes_futures_with_their_payloads():
    hot = make_hot()
    big = serialize_obj({"v": 1})
    fs = hot.submit([[k, "s", [], None] for k in "abcde"], list("abcde"))
    hot.handle(["keys-in-memory", ["a", "b", "c", "d"], [[None], 3, big, None]])
    hot.handle(["keys-in-memory", "e", 2.5])
    hot.handle(["keys-in-memory", "unknown", 1])                 # no future: ignored
    assert all(f.done() for f in fs)
    # a sync client on another thread than its loop's: the inline result, here
    assert [f.result() for f in fs] == [None, 3, {"v": 1}, ("slow", "d"), 2.5]
    assert fs[3]._state.has_data is False                        # not sent: fetched
    assert hot.others == []


def test_other_messages_reach_the_hook():
    hot = make_hot()
    hot.handle({"op": "task-erred", "key": "a"})
    assert hot.others == [{"op": "task-erred", "key": "a"}]


def test_a_malformed_keys_in_memory_raises_value_error():
    hot = make_hot()
    with pytest.raises(ValueError, match="columns of different lengths"):
        hot.handle(["keys-in-memory", ["a", "b"], [1]])
    with pytest.raises(ValueError, match="3 fields expected"):
        hot.handle(["keys-in-memory", "a"])


def test_released_futures_go_out_as_one_release_keys_on_the_timer():
    hot = make_hot()
    fs = hot.submit([[k, "s", [], None] for k in "ab"], ["a", "b"])
    hot.loop.run()
    hot.comm.sent.clear()
    for f in fs:
        f.release()
    assert hot.refcount == {}
    assert hot.comm.sent == []                                   # not with the release
    hot.loop.run()                                               # arm, then fire the timer
    assert hot.comm.sent == [{"op": "release-keys", "keys": ["a", "b"]}]
    assert hot.states == {}


def test_a_closed_comm_or_client():
    hot = make_hot()
    hot.comm.closed = True
    hot.submit([["a", "s", [], None]], ["a"])
    hot.loop.run()
    assert hot.comm.sent == []
    hot.comm = None
    assert hot.comm is None
    assert hot.flush_outbox() == 0
    hot.status = "closed"
    with pytest.raises(RuntimeError, match="closed"):
        hot.submit([["b", "s", [], None]], ["b"])
    with pytest.raises(RuntimeError, match="closed"):
        hot.enqueue({"op": "x"})


def test_forget_all_fails_what_the_lost_scheduler_held_and_old_futures_release_nothing():
    hot = make_hot()
    pending, held, inline = hot.submit([[k, "s", [], None] for k in "abc"], ["a", "b", "c"])
    hot.states["b"]._set("finished")                     # its data is on a worker
    hot.states["c"].finish(data=5, has_data=True)        # its data came back inline
    hot.loop.run()
    hot.comm.sent.clear()
    error = ConnectionError("scheduler lost")
    failed = hot.forget_all(error)
    assert sorted(st.key for st in failed) == ["a", "b"]
    assert pending.status == held.status == "error" and pending._state.exception is error
    assert inline.status == "finished"                    # still readable here
    assert hot.states == {} and hot.refcount == {} and hot.generation == 1
    # The same key submitted again is a new reference; the old Future going away does
    # not release it.
    (again,) = hot.submit([["a", "s", [], None]], ["a"])
    assert again.status == "pending" and hot.refcount == {"a": 1}
    pending.release()
    del held
    assert hot.refcount == {"a": 1}
    hot.loop.run()
    assert not [m for m in hot.comm.sent if isinstance(m, dict)]   # no release-keys
    again.release()
    hot.loop.run()
    assert {"op": "release-keys", "keys": ["a"]} in hot.comm.sent


def test_submits_to_a_closed_comm_wait_for_the_next_one():
    hot = make_hot()
    hot.comm.closed = True
    (f,) = hot.submit([["a", "s", [], None]], ["a"])
    hot.loop.run()
    assert hot.comm.sent == []
    hot.comm = FakeComm()                                 # reconnected
    hot.flush_outbox()
    assert hot.comm.sent == [update_graph([["a", "s", [], None]], ["a"])]
    assert f.status == "pending"
