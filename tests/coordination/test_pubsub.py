"""Pub/Sub: every subscriber gets every message, in order, from clients and tasks."""
import asyncio
import threading

import pytest

from taskcore import Pub, Sub


def publish(name, n):
    p = Pub(name)                          # the worker's client, found by default
    for i in range(n):
        p.put({"i": i})
    return n


def subscribe_and_collect(name, ready, n):
    from taskcore import Event

    sub = Sub(name)
    Event(ready).set()
    return [sub.get(timeout=5) for _ in range(n)]


def test_every_subscriber_gets_every_message_in_order(async_pair):
    async def t(c1, c2, s, ws):
        subs = [await Sub("news", client=c) for c in (c1, c2, c2)]
        pub = Pub("news", client=c1)
        for i in range(20):
            pub.put(i)
        for sub in subs:
            assert [await sub.get(timeout=5) for _ in range(20)] == list(range(20))
        with pytest.raises(TimeoutError, match="no message on topic 'news'"):
            await subs[0].get(timeout=0.1)
        # one subscription per client on the scheduler, counting its Subs
        assert s.extensions["pubsub"].subscribers["news"] == {c1.id: 1, c2.id: 2}

    async_pair(t)


def test_async_iteration_and_late_subscribers(async_pair):
    async def t(c1, c2, s, ws):
        pub = Pub("late", client=c2)
        pub.put("before anyone listened")
        await asyncio.sleep(0.05)
        sub = await Sub("late", client=c1)
        pub.put("a")
        pub.put("b")
        got = []
        async for msg in sub:
            got.append(msg)
            if len(got) == 2:
                break
        assert got == ["a", "b"]

    async_pair(t)


def test_tasks_publish_and_subscribe(sync_cluster):
    from taskcore import Event

    c1, c2 = sync_cluster.c1, sync_cluster.c2
    sub = Sub("from-tasks", client=c2)
    assert c1.submit(publish, "from-tasks", 5).result(timeout=10) == 5
    it = iter(sub)
    assert [next(it) for _ in range(5)] == [{"i": i} for i in range(5)]
    # a task subscribes, a client publishes
    listener = c1.submit(subscribe_and_collect, "to-task", "to-task-ready", 3, pure=False)
    assert Event("to-task-ready", client=c2).wait(timeout=10)
    p = Pub("to-task", client=c2)
    for i in range(3):
        p.put(i)
    assert listener.result(timeout=10) == [0, 1, 2]


def test_closed_sub_unsubscribes(sync_cluster):
    c1 = sync_cluster.c1
    sub = Sub("closing", client=c1)
    sched = sync_cluster.cluster.scheduler
    assert sched.extensions["pubsub"].subscribers["closing"] == {c1.id: 1}
    sub.close()
    done = threading.Event()
    for _ in range(50):
        if "closing" not in sched.extensions["pubsub"].subscribers:
            done.set()
            break
        done.wait(0.02)
    assert done.is_set()


def test_subscriptions_of_a_closed_client_are_dropped(async_pair):
    from taskcore import Client

    async def t(c1, c2, s, ws):
        c3 = await Client(s.address, asynchronous=True, set_as_default=False)
        sub = await Sub("gone", client=c3)
        assert c3.id in s.extensions["pubsub"].subscribers["gone"]
        await c3.close()
        await asyncio.sleep(0.1)
        assert "gone" not in s.extensions["pubsub"].subscribers
        Pub("gone", client=c1).put("nobody listens")     # no error, nothing sent
        del sub

    async_pair(t)
