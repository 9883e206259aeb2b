"""Many clients at once, and clients that come and go, against one scheduler.

A LocalCluster (scheduler and two workers, each its own process) serves:
1. 50 clients connected at the same time, 25 synchronous ones on their own threads and
   25 asynchronous ones on one event loop. Each runs rounds of work of its own (a map
   and a reduction over it, a scatter and a task on the scattered data, a dependent
   chain) plus work every client shares (the same pure keys), and checks every result.
   A barrier holds them until all 50 are connected, and the scheduler is asked then
   how many clients it has.
2. Churn: threads (sync clients) and an event loop (async clients) open a client,
   compute one small task, and close it, over and over, while a long-lived client keeps
   computing alongside; one async session in ten drops its connection with no goodbye,
   as a crashed process would, with a task or a scatter in flight.

Afterwards the scheduler must hold no task and no client record but the checker's,
and its memory and open files must not have grown with the number of sessions:
RSS and file descriptors are sampled (psutil inside the scheduler process) after a
warm-up round of churn and after each later round.
"""
import asyncio
import contextlib
import gc
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import pytest

from taskcore import Client, LocalCluster
from taskcore.testing import run, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(240)

N_SYNC = 25
N_ASYNC = 25
ROUNDS = 5
CHURN_ROUNDS = 6            # the first is the warm-up
CHURN_THREADS = 4
CHURN_PER_THREAD = 100      # sync sessions per thread per round
CHURN_ASYNC = 200           # async sessions per round (sequential, on one loop)
RSS_GROWTH_LIMIT = 10 * 2**20   # bytes, over the 3,000 sessions after the warm-up round
FD_GROWTH_LIMIT = 16


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def total(xs):
    return sum(xs)


def slow(x):
    time.sleep(0.5)
    return x


async def crash(c):
    """Drop a client's connection at once, without a goodbye, as a crashed process would
    (what was queued is written first)."""
    c.comm.flush()
    c.reconnect_timeout = 0       # and no reconnecting
    c.comm.abort()


STATES = ["released", "waiting", "queued", "no-worker", "processing", "memory", "erred",
          "forgotten"]


def scheduler_sample(scheduler):
    import psutil

    p = psutil.Process()
    some = [(ts.key, STATES[ts.state]) for ts in list(scheduler.state.tasks.values())[:5]]
    return {"rss": p.memory_info().rss, "fds": p.num_fds(), "tasks": len(scheduler.state.tasks),
            "clients": sorted(scheduler.clients), "client_records": sorted(scheduler.state.clients),
            "some_tasks": some}


def settled(checker, what, timeout=20):
    """Wait until the scheduler holds no task, no client and no client record but the
    checker's (and the fire-and-forget record); return the last sample."""
    last = {}

    def check():
        last.update(checker.run_on_scheduler(scheduler_sample))
        return (last["tasks"] == 0 and last["clients"] == [checker.id]
                and set(last["client_records"]) <= {checker.id, "fire-and-forget"})

    try:
        wait_until(check, timeout=timeout, message=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; the scheduler still has {last['tasks']} tasks (e.g. "
                             f"{last['some_tasks']}), clients {last['clients']} and client "
                             f"records {last['client_records']} (the checker is {checker.id})"
                             ) from None
    return dict(last)


def expected(i, r):
    base = 1000 * i + 100 * r
    return {"map": sum(x + 1 for x in range(base, base + 50)),
            "scatter": sum(range(i, i + 20)) + r,
            "chain": base + 10,
            "shared": list(range(1, 31))}


# ------------------------------------------------------------------------- clients' work

def sync_work(c, i, r):
    base = 1000 * i + 100 * r
    xs = c.map(inc, range(base, base + 50))
    s = c.submit(total, xs)
    # The same data every round: the same (hashed) key as the last round's, whose
    # Futures were just released.
    [data] = c.scatter([list(range(i, i + 20))])
    sc = c.submit(add, c.submit(total, data), r)
    chain = c.submit(inc, base)
    for _ in range(9):
        chain = c.submit(inc, chain)
    shared = c.map(inc, range(30))                    # same keys in every client
    try:
        got = {"map": s.result(timeout=60), "scatter": sc.result(timeout=60),
               "chain": chain.result(timeout=60), "shared": c.gather(shared)}
    except Exception as e:
        raise AssertionError(f"sync client {i}, round {r}: {type(e).__name__}: {e}") from e
    assert got == expected(i, r), (i, r, got)


async def async_work(c, i, r):
    base = 1000 * i + 100 * r
    xs = c.map(inc, range(base, base + 50))
    s = c.submit(total, xs)
    [data] = await c.scatter([list(range(i, i + 20))])
    sc = c.submit(add, c.submit(total, data), r)
    chain = c.submit(inc, base)
    for _ in range(9):
        chain = c.submit(inc, chain)
    shared = c.map(inc, range(30))
    try:
        got = {"map": await s, "scatter": await sc, "chain": await chain,
               "shared": await c.gather(shared)}
    except Exception as e:
        raise AssertionError(f"async client {i}, round {r}: {type(e).__name__}: {e}") from e
    assert got == expected(i, r), (i, r, got)


# ------------------------------------------------------------------------------- the test

@pytest.fixture
def cluster():
    # A short task stream (a bounded buffer of finished tasks) fills during the warm-up,
    # so growth after it is not the stream filling up.
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None,
                      memory_limit="2GiB", scheduler_kwargs={"task_stream_length": 1000}) as cl:
        yield cl


def test_fifty_concurrent_clients(cluster, capsys):
    addr = cluster.scheduler_address
    with Client(cluster, set_as_default=False) as checker:
        checker.wait_for_workers(2, timeout=30)
        seen = []

        def count_clients():
            seen.append(len(checker.run_on_scheduler(scheduler_sample)["clients"]))

        barrier = threading.Barrier(N_SYNC + 1, action=count_clients, timeout=60)

        def one_sync(i):
            with Client(addr, set_as_default=False) as c:
                barrier.wait()
                for r in range(ROUNDS):
                    sync_work(c, i, r)
            return i

        def async_group():
            async def one(i, connected, all_in, go):
                async with Client(addr, asynchronous=True, set_as_default=False) as c:
                    connected.append(i)
                    if len(connected) == N_ASYNC:
                        all_in.set()
                    await go.wait()
                    for r in range(ROUNDS):
                        await async_work(c, i, r)
                return i

            async def main():
                connected, all_in, go = [], asyncio.Event(), asyncio.Event()
                tasks = [asyncio.ensure_future(one(N_SYNC + i, connected, all_in, go))
                         for i in range(N_ASYNC)]
                waiter = asyncio.ensure_future(all_in.wait())
                done, _ = await asyncio.wait([waiter, *tasks],
                                             return_when=asyncio.FIRST_COMPLETED)
                if not all_in.is_set():
                    for t in done:
                        t.result()                # a client that failed to start: raise
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
                go.set()
                return await asyncio.gather(*tasks)

            return run(main(), timeout=180)

        t0 = time.monotonic()
        with ThreadPoolExecutor(N_SYNC + 1) as pool:
            group = pool.submit(async_group)
            syncs = [pool.submit(one_sync, i) for i in range(N_SYNC)]
            assert sorted(f.result(timeout=200) for f in syncs) == list(range(N_SYNC))
            assert sorted(group.result(timeout=200)) == list(range(N_SYNC, N_SYNC + N_ASYNC))
        elapsed = time.monotonic() - t0
        # All 50 (and the checker) were connected at once.
        assert seen == [N_SYNC + N_ASYNC + 1]

        settled(checker, "the scheduler to drop the 50 clients and their tasks")
    with capsys.disabled():
        print(f"\nmany clients: 50 concurrent clients x {ROUNDS} rounds in {elapsed:.1f} s")


def test_clients_connecting_and_disconnecting(cluster, capsys):
    addr = cluster.scheduler_address
    with Client(cluster, set_as_default=False) as checker:
        checker.wait_for_workers(2, timeout=30)
        sessions = [0]
        lock = threading.Lock()

        def sync_churn(t, r):
            for j in range(CHURN_PER_THREAD):
                with Client(addr, set_as_default=False) as c:
                    v = 10_000 * r + 100 * t + j
                    assert c.submit(inc, v, pure=False).result(timeout=30) == v + 1
                with lock:
                    sessions[0] += 1

        async def async_churn(r):
            for j in range(CHURN_ASYNC):
                async with Client(addr, asynchronous=True, set_as_default=False) as c:
                    f = c.submit(add, r, j, pure=False)
                    assert await f == r + j
                    if j % 20 == 7:
                        # Vanish without a goodbye, work in flight (a crashed process): the
                        # scheduler must drop this client and its task by itself.
                        c.submit(slow, j, pure=False)
                        await crash(c)
                    elif j % 20 == 17:
                        # Vanish while a scatter is in flight: the scheduler is then waiting
                        # on the worker that takes the data, and must not revive the client.
                        sc = asyncio.ensure_future(c.scatter([[r, j]]))
                        while not c._replies:       # until the scatter request is queued
                            await asyncio.sleep(0)
                        await crash(c)
                        with contextlib.suppress(Exception):
                            await sc
                with lock:
                    sessions[0] += 1

        def steady(r):
            # A long-lived client computing all along: churn must not disturb it.
            deadline = time.monotonic() + 60
            n = 0
            while not done.is_set() and time.monotonic() < deadline:
                fs = checker.map(inc, range(100 * n, 100 * n + 100), pure=False)
                assert checker.gather(fs) == list(range(100 * n + 1, 100 * n + 101))
                n += 1
            return n

        samples = []
        for r in range(CHURN_ROUNDS):
            done = threading.Event()
            with ThreadPoolExecutor(CHURN_THREADS + 2) as pool:
                st = pool.submit(steady, r)
                fs = [pool.submit(sync_churn, t, r) for t in range(CHURN_THREADS)]
                fs.append(pool.submit(run, async_churn(r), 120))
                for f in fs:
                    f.result(timeout=150)
                done.set()
                assert st.result(timeout=60) >= 1
            gc.collect()        # our side: closed clients' objects, so only the scheduler counts
            samples.append(settled(checker, f"the scheduler to forget round {r}'s clients "
                                            f"and tasks"))

        per_round = CHURN_THREADS * CHURN_PER_THREAD + CHURN_ASYNC
        assert sessions[0] == CHURN_ROUNDS * per_round
        final, warm = samples[-1], samples[0]
        growth = final["rss"] - warm["rss"]
        later = (CHURN_ROUNDS - 1) * per_round
        assert growth < RSS_GROWTH_LIMIT, (
            f"scheduler RSS grew {growth / 2**20:.1f} MiB over {later} client sessions after "
            f"warm-up: {[s['rss'] >> 20 for s in samples]} MiB")
        assert final["fds"] - warm["fds"] < FD_GROWTH_LIMIT, (
            f"scheduler open files {[s['fds'] for s in samples]}")
    with capsys.disabled():
        print(f"\nmany clients: {sessions[0]} sessions; scheduler RSS by round "
              f"{[round(s['rss'] / 2**20, 1) for s in samples]} MiB, open files "
              f"{[s['fds'] for s in samples]}")
