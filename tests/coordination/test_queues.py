"""Queue: FIFO across clients and tasks, maxsize, batches, timeouts, Futures kept alive."""
import asyncio
import gc

import pytest

from taskcore import Client, Queue, get_client


def inc(x):
    return x + 1


def produce(name, n):
    q = Queue(name)                       # the worker's client, found by default
    for i in range(n):
        q.put(i)
    return n


def consume(name, n):
    q = Queue(name)
    return [q.get(timeout=5) for _ in range(n)]


def put_future(name):
    f = get_client().submit(inc, 99, pure=False)
    Queue(name).put(f)
    return f.key


def test_fifo_across_two_clients(async_pair):
    async def t(c1, c2, s, ws):
        q1, q2 = await Queue("q", client=c1), await Queue("q", client=c2)
        for i in range(5):
            await q1.put(i)
        assert await q2.qsize() == 5
        assert [await q2.get() for _ in range(2)] == [0, 1]
        assert await q2.get(batch=2) == [2, 3]
        assert await q1.get(batch=True) == [4]
        assert await q1.get(batch=True) == []
        assert await q1.qsize() == 0

    async_pair(t)


def test_get_waits_and_times_out_without_taking_anything(async_pair):
    async def t(c1, c2, s, ws):
        q1, q2 = await Queue("w", client=c1), await Queue("w", client=c2)
        with pytest.raises(TimeoutError, match="1 item.* queue 'w'"):
            await q1.get(timeout=0.1)
        getter = asyncio.ensure_future(q1.get(timeout=5))
        await asyncio.sleep(0.05)
        await q2.put("x")
        assert await getter == "x"
        # a batch waits for all of its items; timing out it takes none of them
        await q2.put(1)
        with pytest.raises(TimeoutError, match="3 item"):
            await q1.get(batch=3, timeout=0.1)
        assert await q1.qsize() == 1
        batch = asyncio.ensure_future(q1.get(batch=3, timeout=5))
        await q2.put(2)
        await asyncio.sleep(0.05)
        assert not batch.done()
        await q2.put(3)
        assert await batch == [1, 2, 3]

    async_pair(t)


def test_maxsize_blocks_put(async_pair):
    async def t(c1, c2, s, ws):
        q1 = await Queue("m", client=c1, maxsize=2)
        q2 = await Queue("m", client=c2)           # joins with the size the first chose
        await q1.put(1)
        await q1.put(2)
        with pytest.raises(TimeoutError, match="room in queue 'm' \\(maxsize 2\\)"):
            await q2.put(3, timeout=0.1)
        putter = asyncio.ensure_future(q2.put(3, timeout=5))
        await asyncio.sleep(0.05)
        assert not putter.done()
        assert await q1.get() == 1
        await putter
        assert await q1.get(batch=True) == [2, 3]
        with pytest.raises(ValueError, match="maxsize=2, not 5"):
            await Queue("m", client=c2, maxsize=5)

    async_pair(t)


def test_queued_future_outlives_its_client(sync_cluster):
    with Client(sync_cluster.address, set_as_default=False) as c:
        q = Queue("orphans", client=c)
        q.put(c.submit(inc, 1, pure=False))
        q.put([c.submit(inc, 2, pure=False)])     # futures nested in a value too
    gc.collect()
    q = Queue("orphans", client=sync_cluster.c2)
    f = q.get(timeout=5)
    [g] = q.get(timeout=5)
    assert f.client is sync_cluster.c2
    assert f.result(timeout=5) == 2 and g.result(timeout=5) == 3


def test_key_released_once_taken_and_dropped(async_pair):
    async def t(c1, c2, s, ws):
        q = await Queue("rel", client=c1)
        f = c1.submit(inc, 5)
        key = f.key
        await q.put(f)
        del f
        gc.collect()
        await asyncio.sleep(0.1)
        assert key in s.state.tasks                 # held by the queue
        g = await (await Queue("rel", client=c2)).get()
        assert await g == 6
        assert s.extensions["keys"].counts.get(key) is None   # the queue let go
        del g
        gc.collect()
        for _ in range(100):
            if key not in s.state.tasks:
                break
            await asyncio.sleep(0.02)
        assert key not in s.state.tasks

    async_pair(t)


def test_from_inside_tasks(sync_cluster):
    c1, c2 = sync_cluster.c1, sync_cluster.c2
    consumer = c1.submit(consume, "tq", 4, pure=False)
    assert c1.submit(produce, "tq", 4, pure=False).result(timeout=10) == 4
    assert consumer.result(timeout=10) == [0, 1, 2, 3]
    key = c1.submit(put_future, "tqf").result(timeout=10)
    f = Queue("tqf", client=c2).get(timeout=5)
    assert f.key == key and f.result(timeout=5) == 100


def test_bad_input(sync_cluster):
    with pytest.raises(TypeError, match="maxsize"):
        Queue("b", client=sync_cluster.c1, maxsize=-1)
    with pytest.raises(TypeError, match="batch"):
        Queue("b", client=sync_cluster.c1).get(batch=0)
