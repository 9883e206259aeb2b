"""Lock and MultiLock: exclusion across clients and tasks, timeouts, and holders that go."""
import asyncio
import time

import pytest

from taskcore import Client, Lock, MultiLock, Variable
from taskcore.testing import wait_until


def locked_increment(i):
    """Read-modify-write of a shared counter: correct only under the lock."""
    with Lock("counter-lock"):
        v = Variable("counter")
        n = v.get(timeout=5)
        time.sleep(0.01)
        v.set(n + 1)
    return i


def acquire_and_return(name):
    return Lock(name).acquire(timeout=5)     # returns holding it: the lock outlives the task


def test_exclusion_timeout_and_release_across_clients(async_pair):
    async def t(c1, c2, s, ws):
        a, b = Lock("l", client=c1), Lock("l", client=c2)
        assert not await a.locked()
        assert await a.acquire()
        assert await b.locked()
        assert await b.acquire(timeout=0.1) is False
        assert await b.acquire(blocking=False) is False
        assert await a.acquire(timeout=0.05) is False   # not reentrant
        waiting = asyncio.ensure_future(b.acquire(timeout=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await a.release()
        assert await waiting is True
        with pytest.raises(ValueError, match="not acquired"):
            await a.release()
        await b.release()
        assert not await a.locked()
        # timed-out requests leave nothing queued
        assert s.extensions["lock"].queues == {}

    async_pair(t)


def test_context_managers(sync_cluster, async_pair):
    c1, c2 = sync_cluster.c1, sync_cluster.c2
    with Lock("cm", client=c1):
        assert Lock("cm", client=c2).locked()
    assert not Lock("cm", client=c2).locked()

    async def t(c1, c2, s, ws):
        async with Lock("acm", client=c1):
            assert await Lock("acm", client=c2).locked()
        assert not await Lock("acm", client=c2).locked()

    async_pair(t)


def test_bad_input(sync_cluster):
    with pytest.raises(ValueError, match="non-blocking acquire takes no timeout"):
        Lock("x", client=sync_cluster.c1).acquire(blocking=False, timeout=1)
    with pytest.raises(TypeError, match="non-empty string"):
        Lock(5, client=sync_cluster.c1)
    with pytest.raises(ValueError, match="num_locks must be between 1 and 2"):
        MultiLock(["x", "y"], client=sync_cluster.c1).acquire(num_locks=3)


def test_lock_of_a_closed_client_is_released(sync_cluster):
    c = Client(sync_cluster.address, set_as_default=False)
    assert Lock("orphan", client=c).acquire()
    assert not Lock("orphan", client=sync_cluster.c2).acquire(timeout=0.1)
    c.close()
    assert Lock("orphan", client=sync_cluster.c2).acquire(timeout=5)


def test_tasks_exclude_each_other(sync_cluster):
    c1 = sync_cluster.c1
    Variable("counter", client=c1).set(0)
    assert sorted(c1.gather(c1.map(locked_increment, range(8), pure=False))) == list(range(8))
    assert Variable("counter", client=c1).get() == 8


def test_lock_of_a_removed_worker_is_released(async_pair):
    async def t(c1, c2, s, ws):
        w = ws[0]
        assert await c1.submit(acquire_and_return, "wl", workers=[w.address], pure=False)
        assert await Lock("wl", client=c2).acquire(timeout=0.1) is False
        n_clients = len(s.clients)
        s._remove_worker(w.address, safe=False, reason="test")
        # released by the worker's removal, while the worker's own client is still here
        assert len(s.clients) == n_clients
        assert await Lock("wl", client=c2).acquire(timeout=2)

    async_pair(t)


def test_multilock_all_or_none_in_order(async_pair):
    async def t(c1, c2, s, ws):
        holder = MultiLock(["a"], client=c1)
        assert await holder.acquire()
        both = MultiLock(["a", "b"], client=c2)
        waiting = asyncio.ensure_future(both.acquire(timeout=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        # "b" is free but reserved by the older request: a later one does not overtake it
        late = MultiLock(["b"], client=c1)
        assert await late.acquire(blocking=False) is False
        late_wait = asyncio.ensure_future(late.acquire(timeout=5))
        await holder.release()
        assert await waiting is True
        await asyncio.sleep(0.05)
        assert not late_wait.done()
        await both.release()
        assert await late_wait is True
        await late.release()
        # num_locks: any one of the names
        one = MultiLock(["a", "b"], client=c1)
        assert await MultiLock(["a"], client=c2).acquire()
        assert await one.acquire(num_locks=1, timeout=1)
        assert await MultiLock(["b"], client=c2).acquire(timeout=0.1) is False
        await one.release()
        assert await MultiLock(["b"], client=c2).acquire(timeout=1)
        assert await Lock("a", client=c2).acquire(timeout=1)   # another namespace

    async_pair(t)


def take_multilock(names):
    return MultiLock(names).acquire(timeout=5)


def test_multilock_from_tasks_and_of_a_closed_client(sync_cluster):
    c1, c2 = sync_cluster.c1, sync_cluster.c2
    c = Client(sync_cluster.address, set_as_default=False)
    assert MultiLock(["p", "q"], client=c).acquire()
    task = c1.submit(take_multilock, ["q", "r"], pure=False)   # waits for "q"
    ext = sync_cluster.cluster.scheduler.extensions
    wait_until(lambda: "multi_lock" in ext and "r" in ext["multi_lock"].queues,
               message="the task's request")
    assert not MultiLock(["r"], client=c2).acquire(timeout=0.1)  # reserved by the task
    c.close()                                                  # releases "p" and "q"
    assert task.result(timeout=10) is True
    assert MultiLock(["p"], client=c2).acquire(timeout=1)
    assert not MultiLock(["q"], client=c2).acquire(timeout=0.1)  # the task's, still
