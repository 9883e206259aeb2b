"""Variable: set/get/delete across clients and from tasks, timeouts, Futures kept alive."""
import asyncio
import gc
import time

import pytest

from taskcore import Variable, get_client


def inc(x):
    return x + 1


def set_in_task(name, value):
    Variable(name).set(value)             # the worker's client, found by default
    return True


def get_in_task(name, timeout=None):
    return Variable(name).get(timeout=timeout)


def submit_and_hold(name):
    """From a task: submit work and leave its Future in a variable, then finish."""
    f = get_client().submit(inc, 41, pure=False)
    Variable(name).set(f)
    return f.key


async def _gone(s, key, timeout=5):
    for _ in range(int(timeout / 0.02)):
        if key not in s.state.tasks:
            return True
        await asyncio.sleep(0.02)
    return False


def test_set_get_delete_across_two_clients(async_pair):
    async def t(c1, c2, s, ws):
        await Variable("v", client=c1).set({"a": [1, 2]})
        assert await Variable("v", client=c2).get() == {"a": [1, 2]}
        await Variable("v", client=c2).set(3)
        assert await Variable("v", client=c1).get() == 3
        await Variable("v", client=c1).delete()
        with pytest.raises(TimeoutError, match="variable 'v' to be set"):
            await Variable("v", client=c2).get(timeout=0.1)
        await Variable("v", client=c1).delete()       # deleting nothing is fine

    async_pair(t)


def test_get_waits_until_another_client_sets_it(async_pair):
    async def t(c1, c2, s, ws):
        getter = asyncio.ensure_future(Variable("w", client=c1).get(timeout=5))
        await asyncio.sleep(0.1)
        assert not getter.done()
        await Variable("w", client=c2).set("hello")
        assert await getter == "hello"
        # a getter that timed out left nothing behind on the scheduler
        with pytest.raises(TimeoutError):
            await Variable("late", client=c1).get(timeout="50ms")
        assert "late" not in s.extensions["variable"].waiting

    async_pair(t)


def test_future_value_is_kept_alive_and_rebound_to_the_getter(async_pair):
    async def t(c1, c2, s, ws):
        f = c1.submit(inc, 1)
        key = f.key
        await Variable("fv", client=c1).set(f)
        del f
        gc.collect()
        await asyncio.sleep(0.1)               # c1's release went out
        assert key in s.state.tasks
        g = await Variable("fv", client=c2).get()
        assert g.client is c2 and g.key == key
        assert await g == 2
        # Overwritten and nobody else wants it: the key is released.
        await Variable("fv", client=c1).set(None)
        del g
        gc.collect()
        assert await _gone(s, key)

    async_pair(t)


def test_future_survives_the_client_that_set_it(sync_cluster):
    from taskcore import Client

    with Client(sync_cluster.address, set_as_default=False) as c:
        f = c.submit(inc, 10, pure=False)
        Variable("survivor", client=c).set(f)
    g = Variable("survivor", client=sync_cluster.c2).get(timeout=5)
    assert g.result(timeout=5) == 11


def test_from_inside_tasks(sync_cluster):
    c1, c2 = sync_cluster.c1, sync_cluster.c2
    assert c1.submit(set_in_task, "t1", [1, 2, 3]).result(timeout=10)
    assert Variable("t1", client=c2).get(timeout=5) == [1, 2, 3]
    # a task blocked in get() is woken by a client's set()
    f = c1.submit(get_in_task, "t2", 10)
    time.sleep(0.1)
    Variable("t2", client=c2).set("from c2")
    assert f.result(timeout=10) == "from c2"
    # (exception(), not result(): LoopRunner.run_sync rewrites a TimeoutError's message)
    exc = c1.submit(get_in_task, "t3", 0.1).exception(timeout=10)
    assert isinstance(exc, TimeoutError) and "variable 't3'" in str(exc)
    # a Future submitted by a task outlives the task through the variable
    key = c1.submit(submit_and_hold, "t4").result(timeout=10)
    g = Variable("t4", client=c2).get(timeout=5)
    assert g.key == key and g.result(timeout=5) == 42


def test_bad_input_fails_at_once(sync_cluster):
    with pytest.raises(TypeError, match="non-empty string"):
        Variable(3, client=sync_cluster.c1)
    with pytest.raises(ValueError, match="invalid timeout"):
        Variable("x", client=sync_cluster.c1).get(timeout="later")


def test_pickled_variable_finds_the_worker_client(sync_cluster):
    v = Variable("pickled", client=sync_cluster.c1)
    v.set(7)
    assert sync_cluster.c1.submit(lambda var: var.get(), v).result(timeout=10) == 7
