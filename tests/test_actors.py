"""Actors (taskcore/actors.py): a stateful object on one worker, used through a proxy."""
import asyncio
import os
import signal
import sys
import threading
import time

import cloudpickle
import pytest

from taskcore import Actor, ActorFuture, Client, LocalCluster
from taskcore.actors import ActorLostError
from taskcore.testing import cluster, run, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Counter:
    n = 0

    def __init__(self, start=0):
        self.n = start
        self.threads = set()

    def increment(self, by=1):
        self.threads.add(threading.current_thread().name)
        self.n += by
        return self.n

    async def ainc(self):
        await asyncio.sleep(0.01)
        self.n += 1
        return self.n

    def slow(self, delay):
        time.sleep(delay)
        return "slept"

    def fail(self):
        raise ValueError("actor method failed")

    def thread_names(self):
        return sorted(self.threads)


def use(counter, by=10):
    return counter.increment(by).result()


@pytest.fixture(scope="module")
def lc():
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                      dashboard_address=None) as lc:
        yield lc


@pytest.fixture
def c(lc):
    with Client(lc) as c:
        yield c


def test_methods_attributes_errors(c):
    f = c.submit(Counter, 5, actor=True)
    a = f.result()
    assert isinstance(a, Actor) and "Counter" in repr(a)
    fut = a.increment()
    assert isinstance(fut, ActorFuture)
    assert fut.result() == 6 and fut.done()
    assert a.n == 6                                     # an attribute: its value
    assert a.ainc().result() == 7                       # async def: on the worker's loop
    with pytest.raises(ValueError, match="actor method failed"):
        a.fail().result()
    with pytest.raises(AttributeError):
        a.no_such_attribute
    with pytest.raises(TimeoutError):
        a.slow(1.0).result(timeout=0.05)
    # Methods run one at a time, on the worker's actor thread.
    fs = [a.increment() for _ in range(50)]
    assert sorted(x.result() for x in fs)[-1] == 57
    names = a.thread_names().result()
    assert len(names) == 1 and names[0].startswith("taskcore-actor")
    assert "increment" in dir(a)


def test_actor_in_tasks_on_both_workers(c, lc):
    ws = sorted(lc.scheduler.workers)
    f = c.submit(Counter, workers=[ws[0]], actor=True)
    a = f.result()
    assert a.worker == ws[0]
    # The Future as an argument: the handle on its worker, a proxy elsewhere.
    assert c.submit(use, f, 1, workers=[ws[0]]).result() == 1
    assert c.submit(use, f, 2, workers=[ws[1]]).result() == 3
    # The proxy itself as an argument.
    assert c.submit(use, a, 3, workers=[ws[1]], pure=False).result() == 6
    assert a.n == 6


def test_two_clients(c, lc):
    f = c.submit(Counter, actor=True)
    c.publish_dataset(counter=f)
    try:
        with Client(lc, set_as_default=False) as c2:
            f2 = c2.get_dataset("counter")
            a2 = f2.result()
            assert a2.increment(5).result() == 5
        assert f.result().n == 5
    finally:
        c.unpublish_dataset("counter")


def test_map_actors_and_release(c, lc):
    fs = c.map(Counter, [1, 2, 3], actors=True)
    actors = c.gather(fs)
    assert [a.increment().result() for a in actors] == [2, 3, 4]
    def count(dask_worker):
        h = getattr(dask_worker, "_actor_host", None)
        return 0 if h is None else len([k for k in h.instances if k in keys])

    keys = {f.key for f in fs}
    assert sum(c.run(count).values()) == 3
    del fs, actors
    wait_until(lambda: sum(c.run(count).values()) == 0, message="actors released")
    with pytest.raises(TypeError, match="takes a class"):
        c.submit(len, [1], actor=True)


def test_async_client():
    async def main():
        async with cluster(n_workers=1, nthreads=2) as (s, ws):
            async with Client(s.address, asynchronous=True) as c:
                a = await c.submit(Counter, 1, actor=True)
                assert await a.increment() == 2
                assert await a.ainc() == 3
                assert await a.n == 3
                with pytest.raises(ValueError):
                    await a.fail()

    run(main(), timeout=30)


def test_worker_death_fails_calls_and_the_future():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as lc, \
            Client(lc) as c:
        f = c.submit(Counter, actor=True)
        a = f.result()
        assert a.increment().result() == 1
        c.run(lambda: os.kill(os.getpid(), signal.SIGKILL), workers=[a.worker],
              on_error="ignore")
        wait_until(lambda: a.worker not in c.scheduler_info()["workers"], timeout=20,
                   message="the actor's worker removed")
        with pytest.raises(ActorLostError, match="cannot be reached"):
            a.increment().result(timeout=10)
        with pytest.raises(ActorLostError, match="Worker holding Actor was lost"):
            f.result(timeout=10)
        # Not rebuilt empty elsewhere.
        time.sleep(0.3)
        key = f.key
        assert c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.state.task_state(key)) \
            in ("forgotten", "released")
        assert not any(c.run(lambda dask_worker: len(getattr(dask_worker, "_actor_host",
                                                             None).instances)
                             if hasattr(dask_worker, "_actor_host") else 0).values())
