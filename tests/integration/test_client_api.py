"""The Client API against real scheduler and worker servers (one process, tcp)."""
import asyncio
import gc
import operator
import threading
import time

import numpy as np
import pytest

from taskcore.client import Client
from taskcore.errors import CancelledError
from taskcore.futures import FIRST_COMPLETED, as_completed, fire_and_forget, wait
from taskcore.testing import cluster, run


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def slowinc(x, delay=0.05):
    time.sleep(delay)
    return x + 1


class MyError(Exception):
    pass


def fail(x):
    raise MyError(f"bad value {x}")


def client_test(fn, n_workers=2, nthreads=1, **kw):
    async def main():
        async with cluster(n_workers=n_workers, nthreads=nthreads, **kw) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                await fn(c, s, ws)

    run(main(), timeout=60)


def test_submit_map_gather():
    async def t(c, s, ws):
        f = c.submit(inc, 1)
        assert await f == 2
        assert f.done() and f.status == "finished"
        fs = c.map(inc, range(50))
        assert await c.gather(fs) == list(range(1, 51))
        # nested structures keep their shape
        out = await c.gather({"a": fs[0], "b": [fs[1], (fs[2], 7)]})
        assert out == {"a": 1, "b": [2, (3, 7)]}
        # futures as arguments arrive as their data, also nested
        g = c.submit(add, fs[0], fs[1])
        assert await g == 3
        h = c.submit(sum, [fs[0], fs[1], fs[2]])
        assert await h == 6
        # kwargs and multiple iterables
        assert await c.gather(c.map(add, [1, 2], [10, 20])) == [11, 22]
        assert await c.submit(add, 1, b=fs[3]) == 5

    client_test(t)


def test_run_spec_forms_and_merged_submits():
    """Flat args with Futures travel unpickled (slots hold keys, listed in refs);
    anything else is pickled with TaskRefs. A burst of submits, which the client
    sends as one merged graph, keeps every result and dependency right."""
    async def t(c, s, ws):
        f = c.submit(inc, 1)
        key, spec, deps = c._make_task(add, (f, 2), None, None, False)
        assert spec[2] == [f.key, 2] and spec[4] == [0] and deps == [f.key]
        key, spec, deps = c._make_task(add, (f, f), None, None, False)
        assert spec[2] == [f.key, f.key] and spec[4] == [0, 1] and deps == [f.key, f.key]
        key, spec, deps = c._make_task(sum, ([f, 1],), None, None, False)
        assert len(spec) == 4 and deps == [f.key]          # nested: pickled
        assert await c.submit(add, f, f) == 4
        x = c.submit(inc, 0)
        chain = [x]
        for _ in range(200):
            chain.append(c.submit(add, chain[-1], 1, pure=False))
        both = c.submit(add, chain[100], chain[-1], pure=False)
        assert await both == 101 + 201
        assert await c.gather(chain) == list(range(1, 202))

    client_test(t)


def test_malformed_task_columns_are_dropped_not_fatal(caplog):
    """A peer registered as a worker that sends hot-path messages with columns of
    different lengths, or of the wrong types, only gets them logged and dropped: the
    scheduler, the real workers and the client carry on."""
    from taskcore.transports import connect

    async def t(c, s, ws):
        comm = await connect(s.address, role="worker")
        comm.send({"op": "register-worker", "address": "tcp://127.0.0.1:1", "nthreads": 1,
                   "name": "impostor"})
        assert (await comm.read())["op"] == "registered"
        # ["tasks-finished", ids, nbytes, types, durations, data]
        comm.send(["tasks-finished", [1, 2], [8], ["int"], [0.1], [None, None]])
        comm.send(["tasks-finished", "nope", 3, None, [], []])
        comm.send(["tasks-finished", [1]])                 # wrong arity
        comm.send(["no-such-op", 1, 2, 3, 4, 5])
        await asyncio.sleep(0.2)
        assert "tcp://127.0.0.1:1" in s.workers           # still connected
        await comm.close()                                 # it would never run tasks
        while "tcp://127.0.0.1:1" in s.workers:
            await asyncio.sleep(0.01)
        assert await c.gather(c.map(inc, range(100), pure=False)) == list(range(1, 101))
        assert s.status == "running"

    with caplog.at_level("ERROR", logger="taskcore"):
        client_test(t)
    assert "columns of different lengths" in caplog.text
    assert "6 fields expected, got 2" in caplog.text
    assert "expected a 'tasks-finished' message, got 'no-such-op'" in caplog.text


def test_malformed_positional_messages_to_a_worker_are_logged_and_dropped(caplog):
    """The worker's side of the positional hot messages: a wrong arity, an unknown
    op or columns of different lengths is logged and dropped; the worker keeps
    computing."""
    async def t(c, s, ws):
        w = ws[0]
        handler = w.scheduler_comm.on_message      # the comm's own handler
        handler(["compute-tasks", [1]])
        handler(["compute-tasks", 1, "a"])          # the one-task form, short
        handler(["compute-tasks", [1, 2], ["a"], [None], [[0, 0, 0]], [[]]])
        handler(["no-such-op", 1, 2, 3, 4, 5])
        assert await c.gather(c.map(inc, range(20), pure=False)) == list(range(1, 21))
        assert w.status == "running"

    with caplog.at_level("ERROR", logger="taskcore"):
        client_test(t, n_workers=1)
    assert "6 fields expected, got 2" in caplog.text
    assert "6 fields expected, got 3" in caplog.text
    assert "compute-tasks: columns of different lengths" in caplog.text
    assert "expected a 'compute-tasks' message, got 'no-such-op'" in caplog.text


def test_pure_keys_dedup_and_explicit_key():
    async def t(c, s, ws):
        a = c.submit(inc, 10)
        b = c.submit(inc, 10)
        assert a.key == b.key
        d = c.submit(inc, 10, pure=False)
        assert d.key != a.key
        e = c.submit(inc, 5, key="my-key")
        assert e.key == "my-key" and await e == 6

    client_test(t)


def test_large_results_gathered_from_workers():
    async def t(c, s, ws):
        f = c.submit(np.arange, 1_000_000)
        x = await f
        assert x.sum() == np.arange(1_000_000).sum()
        # a dependent on another worker fetches it peer to peer
        g = c.submit(np.sum, f)
        assert await g == x.sum()

    client_test(t)


def test_task_errors_carry_type_and_traceback():
    async def t(c, s, ws):
        f = c.submit(fail, 3)
        with pytest.raises(MyError, match="bad value 3") as info:
            await f
        assert f.status == "error"
        exc = await f.exception()
        assert isinstance(exc, MyError)
        tb = await f.traceback()
        assert "fail" in tb and "raise MyError" in tb
        assert "raise MyError" in str(info.value.__cause__)
        # dependents err with the original exception
        g = c.submit(inc, f)
        with pytest.raises(MyError):
            await g
        # errors="skip"
        ok = c.submit(inc, 1)
        assert await c.gather([ok, f], errors="skip") == [2]

    client_test(t)


def test_unpicklable_result_and_bad_argument_err_only_that_task():
    async def t(c, s, ws):
        f = c.submit(threading.Lock)
        with pytest.raises(TypeError, match="cannot be serialized"):
            await f

        class Unloadable:
            def __reduce__(self):
                return (_explode, ())

        g = c.submit(inc, Unloadable())
        with pytest.raises(Exception, match="could not deserialize"):
            await g
        # the workers are fine
        assert await c.submit(inc, 41) == 42

    client_test(t)


def _explode():
    raise ValueError("cannot rebuild this argument")


def test_retries_and_retry():
    async def t(c, s, ws):
        counter = s.address  # unique per test run

        def flaky(path=counter):
            import builtins

            n = getattr(builtins, "_tc_flaky", 0) + 1
            builtins._tc_flaky = n
            if n < 3:
                raise MyError("try again")
            return n

        f = c.submit(flaky, retries=5, pure=False)
        assert await f >= 3

        g = c.submit(fail, 1)
        with pytest.raises(MyError):
            await g
        await c.retry([g])
        with pytest.raises(MyError):
            await g

    client_test(t, n_workers=1)


def test_cancel():
    async def t(c, s, ws):
        f = c.submit(slowinc, 1, 1.0)
        await asyncio.sleep(0.05)
        await c.cancel([f])
        assert f.cancelled()
        with pytest.raises(CancelledError):
            await f
        assert await c.submit(inc, 1) == 2

    client_test(t)


def test_scatter_and_broadcast():
    async def t(c, s, ws):
        [a, b] = await c.scatter([1, 2])
        assert await c.submit(add, a, b) == 3
        d = await c.scatter({"x": np.ones(10)})
        assert (await d["x"]).sum() == 10
        one = await c.scatter(5, workers=[ws[0].address])
        assert (await c._rpc("who_has", keys=[one.key]))[one.key] == [ws[0].address]
        bc = await c.scatter(7, broadcast=True)
        assert sorted((await c._rpc("who_has", keys=[bc.key]))[bc.key]) == sorted(
            w.address for w in ws)
        assert await c.submit(inc, bc) == 8

    client_test(t)


def test_restrictions_and_resources():
    async def t(c, s, ws):
        a = ws[0].address
        fs = c.map(inc, range(10), workers=[a])
        await c.gather(fs)
        who = await c._rpc("who_has", keys=[f.key for f in fs])
        assert all(v == [a] for v in who.values())
        g = c.submit(inc, 1, resources={"GPU": 1}, pure=False)
        assert await g == 2
        who = await c._rpc("who_has", keys=[g.key])
        assert who[g.key] == [ws[1].address]

    async def main():
        async with cluster(n_workers=0) as (s, ws):
            from taskcore.worker import Worker

            w0 = await Worker(s.address, name="w0")
            w1 = await Worker(s.address, name="w1", resources={"GPU": 2})
            try:
                async with Client(s.address, asynchronous=True) as c:
                    await t(c, s, [w0, w1])
            finally:
                await w0.close()
                await w1.close()

    run(main())


def test_cluster_inspection_and_run():
    async def t(c, s, ws):
        info = await c._rpc("scheduler_info")
        assert len(info["workers"]) == 2
        f = c.submit(inc, 1)
        await f
        who = await c._rpc("who_has", keys=[f.key])
        assert len(who[f.key]) == 1
        has = await c._rpc("has_what")
        assert f.key in sum(has.values(), [])
        assert await c._rpc("nthreads") == {w.address: 1 for w in ws}
        res = await c._run(lambda: 1 + 1, (), {}, None, "raise")
        assert res == {w.address: 2 for w in ws}
        res = await c._run(lambda dask_worker: dask_worker.address, (), {}, [ws[0].address],
                           "raise")
        assert res == {ws[0].address: ws[0].address}
        with pytest.raises(ZeroDivisionError):
            await c._run(lambda: 1 / 0, (), {}, None, "raise")
        assert await c._run_on_scheduler(lambda scheduler: scheduler.address, (), {}) == s.address
        assert await c._rpc("wait_for_workers", n=2, timeout=1) == 2

    client_test(t)


def test_reference_counting_forgets_released_keys():
    async def t(c, s, ws):
        f = c.submit(inc, 100)
        key = f.key
        await f
        assert key in s.state.tasks
        del f
        gc.collect()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if key not in s.state.tasks:
                break
        assert key not in s.state.tasks
        assert all(key not in w.data for w in ws)

    client_test(t)


def test_gathered_futures_are_released_without_the_cycle_collector():
    """Fault 3 of issue 16: gather() of a nested structure kept its futures alive in a
    reference cycle (a self-referencing closure), so their data stayed on the workers until
    Python's cycle collector ran."""
    async def t(c, s, ws):
        fs = c.map(inc, range(6))
        nested = {"a": fs[:3], "b": (fs[3], [fs[4], {"c": fs[5]}])}
        flat = await c.gather(fs)
        deep = await c.gather(nested)
        assert flat == [1, 2, 3, 4, 5, 6] and deep["b"][1][1]["c"] == 6
        keys = [f.key for f in fs]
        gc.disable()
        try:
            del fs, nested, flat, deep
            for _ in range(200):
                await asyncio.sleep(0.02)
                if not any(k in s.state.tasks for k in keys):
                    break
            assert not any(k in s.state.tasks for k in keys), "gather kept futures alive"
        finally:
            gc.enable()

    client_test(t)


def test_a_malformed_update_graph_registers_nothing():
    """Fault 4 of issue 16: a record the state machine rejected half way left its key
    registered for good, and a later, valid submit of that key from another client failed
    with a TypeError."""
    async def main():
        async with cluster() as (s, ws):
            async with Client(s.address, asynchronous=True) as bad, \
                    Client(s.address, asynchronous=True) as good:
                for msg in (["update-graph", [["victim-1", None, 5, None]], ["victim-1"], 0],
                            ["update-graph", ["victim-1", None, [{"no": "key"}], None],
                             "victim-1", 0],
                            ["update-graph", ["victim-1", None, [], {"retries": "many"}],
                             "victim-1", 0]):
                    bad.comm.send(msg)
                await asyncio.sleep(0.2)
                assert "victim-1" not in s.state.tasks
                assert await good.submit(inc, 1, key="victim-1") == 2
                assert s.status == "running"

    run(main(), timeout=60)


def test_two_clients_share_a_key():
    async def main():
        async with cluster() as (s, ws):
            async with Client(s.address, asynchronous=True) as c1, \
                    Client(s.address, asynchronous=True) as c2:
                f1 = c1.submit(inc, 7)
                f2 = c2.submit(inc, 7)
                assert f1.key == f2.key
                assert await f1 == 8 and await f2 == 8
                f1.release()
                await asyncio.sleep(0.2)
                assert f2.key in s.state.tasks  # c2 still wants it
                assert await c2.gather(f2) == 8

    run(main())


def _none():
    return None


def _true():
    return True


def test_inline_results_reach_every_waiting_client():
    """The scheduler tells the clients that want an inline result before its state
    machine runs on the report, and drops the machine's own message: every waiting
    client still gets it. Scalars travel as themselves, None as [None]."""
    async def main():
        async with cluster() as (s, ws):
            async with Client(s.address, asynchronous=True) as c1, \
                    Client(s.address, asynchronous=True) as c2:
                f1 = c1.submit(slowinc, 1, 0.3)
                f2 = c2.submit(slowinc, 1, 0.3)
                assert f1.key == f2.key
                assert await asyncio.gather(f1, f2) == [2, 2]
                assert await c1.submit(_none) is None
                assert await c1.submit(_true) is True
                assert await c2.submit(operator.truediv, 5, 2) == 2.5
                many = c1.map(inc, range(50))              # columns, not the one-task form
                assert await c1.gather(many) == list(range(1, 51))

    run(main())


def test_as_completed_and_wait():
    async def t(c, s, ws):
        fs = c.map(slowinc, [3, 1, 2], [0.3, 0.0, 0.15])
        seen = []
        async for f in as_completed(fs):
            seen.append(await f)
        assert sorted(seen) == [2, 3, 4]
        ac = as_completed(with_results=True)
        ac.update(c.map(inc, range(5)))
        ac.add(c.submit(inc, 100))
        results = []
        async for f, r in ac:
            results.append(r)
        assert sorted(results) == [1, 2, 3, 4, 5, 101]
        bad = c.submit(fail, 1)
        ac = as_completed([bad], with_results=True, raise_errors=False)
        async for f, r in ac:
            assert isinstance(r, MyError)
        fs = c.map(slowinc, [1, 2], [0.0, 1.0], pure=False)
        done, not_done = await wait(fs, return_when=FIRST_COMPLETED)
        assert len(done) >= 1
        done, not_done = await wait(fs)
        assert len(done) == 2 and not not_done

    client_test(t)


def _touch(path, delay):
    time.sleep(delay)
    with open(path, "w") as f:
        f.write("done")


def test_fire_and_forget(tmp_path):
    path = str(tmp_path / "ran")

    async def t(c, s, ws):
        import os

        f = c.submit(_touch, path, 0.2)
        key = f.key
        fire_and_forget(f)
        del f
        gc.collect()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if os.path.exists(path) and key not in s.state.tasks:
                break
        # it ran although no future was left, and was forgotten once done
        assert os.path.exists(path)
        assert key not in s.state.tasks

    client_test(t)


def test_get_client_secede_rejoin_inside_tasks():
    def fib(n):
        from taskcore.worker import get_client, rejoin, secede

        if n < 2:
            return n
        client = get_client()
        a = client.submit(fib, n - 1)
        b = client.submit(fib, n - 2)
        secede()
        result = a.result() + b.result()
        rejoin()
        return result

    async def t(c, s, ws):
        assert await c.submit(fib, 6) == 8

    client_test(t, n_workers=1, nthreads=1)


def test_worker_closes_the_client_its_tasks_used():
    """get_client() inside a task makes a synchronous Client on the shared loop thread;
    the worker closes it through its own API when it closes (its connections are not
    touched from the worker's loop) and gives its share of the loop back."""
    from taskcore.utils import LoopRunner

    def uses_client(x):
        from taskcore.worker import get_client, secede
        f = get_client().submit(inc, x)
        secede()                      # the inner task needs this worker's only thread
        return f.result()

    refs_before = LoopRunner._shared_refs if LoopRunner._shared is not None else 0

    async def t(c, s, ws):
        assert await c.submit(uses_client, 1, pure=False) == 2
        (w,) = ws
        inner = w._client
        assert inner is not None and inner.status == "running"
        await w.close()
        assert inner.status == "closed" and w._client is None

    client_test(t, n_workers=1)
    refs_after = LoopRunner._shared_refs if LoopRunner._shared is not None else 0
    assert refs_after == refs_before


def test_future_callbacks_and_sync_result_from_thread():
    async def t(c, s, ws):
        got = []
        ev = threading.Event()
        f = c.submit(inc, 1)

        def cb(fut):
            got.append(fut.key)
            ev.set()

        f.add_done_callback(cb)
        await f
        await asyncio.get_running_loop().run_in_executor(None, ev.wait, 5)
        assert got == [f.key]

    client_test(t)


def test_many_tasks_and_chain():
    async def t(c, s, ws):
        fs = c.map(inc, range(2000))
        assert sum(await c.gather(fs)) == sum(range(1, 2001))
        x = c.submit(inc, 0)
        for _ in range(100):
            x = c.submit(inc, x)
        assert await x == 101
        # a tree reduction
        level = c.map(inc, range(64))
        while len(level) > 1:
            level = [c.submit(add, level[i], level[i + 1]) for i in range(0, len(level), 2)]
        assert await level[0] == sum(range(1, 65))

    client_test(t)


def test_sync_client_api():
    """The synchronous facade (background loop thread) against a threaded cluster."""
    from taskcore.utils import LoopRunner

    runner = LoopRunner().start()
    holder = {}

    async def start():
        holder["cm"] = cluster()
        holder["s"], holder["ws"] = await holder["cm"].__aenter__()

    runner.run_sync(start)
    try:
        with Client(holder["s"].address) as c:
            f = c.submit(inc, 1)
            assert f.result(timeout=10) == 2
            # result() writes its own submit to the socket before it blocks
            # (StreamProtocol.write_now); a submit nobody waits on goes out through
            # the loop thread all the same.
            before = c.comm.direct_writes
            assert [c.submit(inc, i, pure=False).result() for i in range(5)] == [1, 2, 3, 4, 5]
            assert c.comm.direct_writes > before
            lone = c.submit(inc, 41, pure=False)
            for _ in range(500):
                if lone.done():
                    break
                time.sleep(0.01)
            assert lone.done() and lone.result() == 42
            assert c.gather(c.map(inc, range(10))) == list(range(1, 11))
            [x] = c.scatter([5])
            assert c.submit(inc, x).result() == 6
            assert c.run(lambda: 3) == {w.address: 3 for w in holder["ws"]}
            assert c.run_on_scheduler(lambda: 4) == 4
            assert len(c.scheduler_info()["workers"]) == 2
            assert c.who_has([f])[f.key]
            assert set(c.nthreads()) == {w.address for w in holder["ws"]}
            assert c.has_what()
            assert c.wait_for_workers(2, timeout=5) == 2
            # result(timeout) from several threads at once: a timeout withdraws only
            # that waiter; the others wake when the result lands.
            slow = c.submit(slowinc, 1, 0.5, pure=False)
            with pytest.raises(TimeoutError):
                slow.result(timeout=0.05)
            got = []
            waiters = [threading.Thread(target=lambda: got.append(slow.result(timeout=10)))
                       for _ in range(3)]
            for t in waiters:
                t.start()
            for t in waiters:
                t.join(15)
            assert got == [2, 2, 2] and slow.result() == 2
            with pytest.raises(MyError):
                c.submit(fail, 1).result()
            assert isinstance(c.submit(fail, 2).exception(), MyError)
            results = [r for _, r in as_completed(c.map(inc, range(5)), with_results=True)]
            assert sorted(results) == [1, 2, 3, 4, 5]
            done, _ = wait(c.map(inc, range(3)))
            assert len(done) == 3
            g = c.submit(slowinc, 1, 2.0)
            c.cancel([g])
            assert g.cancelled()
            assert f.key in repr(f) and "Client" in repr(c)
    finally:
        async def stop():
            await holder["cm"].__aexit__(None, None, None)

        runner.run_sync(stop)
        runner.stop()
