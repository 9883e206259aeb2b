"""The worker's compiled tiny-task loop (core/worker_dispatch.pyx) on a real worker.

The worker, the scheduler and the client share this test's event loop (testing.cluster),
so "ran inline" is observable: an inline task runs on this very thread, a measured or
threaded one on the worker's task thread.
"""
import math
import threading

from taskcore import Client
from taskcore.testing import cluster, run
from taskcore.worker import get_worker


def where(x):
    return threading.get_ident()


def inc(x):
    return x + 1


def uses_worker(x):
    get_worker()
    return threading.get_ident()


def _with_worker(fn, **worker_kwargs):
    async def main():
        async with cluster(n_workers=1, worker_kwargs=worker_kwargs) as (s, ws):
            async with Client(s.address, asynchronous=True, set_as_default=False) as c:
                await fn(c, ws[0])

    run(main(), timeout=60)


def test_a_prefix_is_measured_on_a_thread_then_runs_inline():
    loop_thread = threading.get_ident()

    async def t(c, w):
        first = await c.submit(where, 0, pure=False)
        assert first != loop_thread                     # measured on the task thread
        assert w.durations["where"] < w.inline_threshold
        rest = await c.gather(c.map(where, range(50), pure=False))
        assert set(rest) == {loop_thread}               # then inline, on the loop

    _with_worker(t)


def test_inline_budget_spent_defers_the_rest_and_loses_nothing():
    deferred = []

    async def t(c, w):
        original = w.on_inline_results

        def spy(results):
            deferred.append(len(results))
            return original(results)

        w.on_inline_results = spy           # the compiled loop looks it up per deferral
        await c.submit(inc, 0, pure=False)   # measured on a thread first
        assert await c.gather(c.map(inc, range(500), pure=False)) == list(range(1, 501))

    _with_worker(t, inline_budget=0.0)       # every pass defers after one inline batch
    assert deferred and sum(deferred) > 0


def test_a_task_that_uses_its_worker_goes_back_to_threads_for_good():
    loop_thread = threading.get_ident()

    async def t(c, w):
        await c.submit(uses_worker, 0, pure=False)          # measured on a thread
        inline = await c.submit(uses_worker, 1, pure=False)  # tiny: runs inline, interacts
        assert inline == loop_thread
        assert math.isinf(w.durations["uses_worker"])
        later = await c.gather(c.map(uses_worker, range(2, 12), pure=False))
        assert loop_thread not in later

    _with_worker(t)


def test_small_and_scalar_results_ride_along_and_big_ones_are_fetched():
    async def t(c, w):
        await c.submit(inc, 0, pure=False)
        assert await c.submit(inc, 41, pure=False) == 42                  # [value] inline
        assert await c.submit(str, 7, pure=False) == "7"                  # small pickle
        big = await c.submit(bytes, 100_000, pure=False)                  # fetched
        assert big == bytes(100_000)

    _with_worker(t)
