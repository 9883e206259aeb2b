"""Event: set/clear/wait/is_set across clients and tasks, timeouts, waiters that leave."""
import asyncio
import time

from taskcore import Client, Event


def wait_in_task(name, timeout):
    return Event(name).wait(timeout)


def set_in_task(name):
    Event(name).set()
    return True


def test_set_wait_clear_across_clients(async_pair):
    async def t(c1, c2, s, ws):
        e1, e2 = Event("e", client=c1), Event("e", client=c2)
        assert await e1.is_set() is False
        assert await e2.wait(timeout=0.1) is False
        waiters = [asyncio.ensure_future(e.wait(timeout=5)) for e in (e1, e2, e2)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        await e1.set()
        assert await asyncio.gather(*waiters) == [True, True, True]
        assert await e2.is_set() and await e2.wait(timeout=0)
        await e2.clear()
        assert await e1.is_set() is False
        assert await e1.wait(timeout="50ms") is False
        assert s.extensions["event"].waiters == {}     # timed-out waiters are gone

    async_pair(t)


def test_tasks_wait_for_a_client_and_a_task_sets_it(sync_cluster):
    c1, c2 = sync_cluster.c1, sync_cluster.c2
    waiters = c1.map(wait_in_task, ["go"] * 3, [10] * 3, pure=False)
    time.sleep(0.1)
    assert not any(f.done() for f in waiters)
    Event("go", client=c2).set()
    assert c1.gather(waiters) == [True] * 3
    assert c1.submit(wait_in_task, "never", 0.1).result(timeout=10) is False
    assert c1.submit(set_in_task, "from-task").result(timeout=10)
    assert Event("from-task", client=c2).wait(timeout=1)


def test_waiter_of_a_closed_client_is_dropped(async_pair):
    async def t(c1, c2, s, ws):
        c3 = await Client(s.address, asynchronous=True, set_as_default=False)
        waiter = asyncio.ensure_future(Event("left", client=c3).wait())
        await asyncio.sleep(0.1)
        assert len(s.extensions["event"].waiters["left"]) == 1
        await c3.close()
        await asyncio.sleep(0.1)
        assert "left" not in s.extensions["event"].waiters
        assert waiter.done()
        waiter.exception()                # the client's own error: its scheduler is gone
        await Event("left", client=c1).set()   # nobody left to wake: no error

    async_pair(t)
