"""Semaphore: leases across clients and tasks, timeouts, and leases whose holder goes away
(a closed client, a removed worker, a SIGKILLed worker process, a holder that stops
refreshing)."""
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import pytest

from taskcore import Client, Event, Semaphore

# The SIGKILL test's worker process cannot import this module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   "src")


def limited(i, name, max_leases):
    with Semaphore(max_leases, name=name):
        start = time.monotonic()
        time.sleep(0.05)
        return start, time.monotonic()


def take_lease(name, lease_timeout):
    return Semaphore(1, name=name, lease_timeout=lease_timeout).acquire(timeout=5)


def take_lease_and_wait(name, event):
    sem = Semaphore(1, name=name, lease_timeout="30s")
    assert sem.acquire(timeout=5)
    Event(event).set()
    time.sleep(60)                         # killed meanwhile


def test_leases_timeouts_and_errors(async_pair):
    async def t(c1, c2, s, ws):
        a = await Semaphore(2, name="s", client=c1)
        b = await Semaphore(2, name="s", client=c2)
        assert await a.get_value() == 0
        assert await a.acquire() and await b.acquire()
        assert await b.get_value() == 2
        assert await a.acquire(timeout=0.1) is False
        waiting = asyncio.ensure_future(a.acquire(timeout=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert await b.release() is True
        assert await waiting is True
        assert await a.get_value() == 2
        await a.release()
        await a.release()
        with pytest.raises(RuntimeError, match="released too often"):
            await a.release()
        assert await b.get_value() == 0
        with pytest.raises(ValueError, match="max_leases=2, not 3"):
            await Semaphore(3, name="s", client=c2)

    async_pair(t)


def test_bad_input(sync_cluster):
    with pytest.raises(ValueError, match="max_leases"):
        Semaphore(0, client=sync_cluster.c1)
    with pytest.raises(ValueError, match="lease_timeout"):
        Semaphore(1, lease_timeout=0, client=sync_cluster.c1)


def test_tasks_never_exceed_max_leases(sync_cluster):
    c1 = sync_cluster.c1
    spans = c1.gather(c1.map(limited, range(8), name="limit2", max_leases=2, pure=False))
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    assert peak == 2                       # 4 threads, but at most 2 leases at once


def test_refreshed_lease_outlives_its_timeout_and_a_silent_one_expires(sync_cluster):
    c1, c2 = sync_cluster.c1, sync_cluster.c2
    sem = Semaphore(1, name="refresh", lease_timeout=0.5, client=c1)
    assert sem.acquire()
    time.sleep(1.2)                        # > 2 lease timeouts: kept alive by refreshes
    assert sem.get_value() == 1
    assert not Semaphore(1, name="refresh", client=c2, lease_timeout=0.5).acquire(timeout=0.1)
    # The holder hangs: it stops refreshing (its refresh timer cancelled on its loop).
    sem.refresh_interval = math.inf
    c1.loop.call_soon_threadsafe(lambda: sem._refresh_timer and sem._refresh_timer.cancel())
    other = Semaphore(1, name="refresh", client=c2, lease_timeout=0.5)
    assert other.acquire(timeout=3)        # the silent lease expired
    assert sem.release() is False          # it was no longer held
    assert other.release() is True


def test_lease_of_a_closed_client_is_released(sync_cluster):
    c = Client(sync_cluster.address, set_as_default=False)
    assert Semaphore(1, name="closing", client=c).acquire()
    c.close()
    assert Semaphore(1, name="closing", client=sync_cluster.c2).acquire(timeout=5)


def test_lease_of_a_removed_worker_is_released(async_pair):
    async def t(c1, c2, s, ws):
        w = ws[0]
        assert await c1.submit(take_lease, "removed", 30, workers=[w.address], pure=False)
        sem = await Semaphore(1, name="removed", client=c2, lease_timeout=30)
        assert await sem.get_value() == 1
        n_clients = len(s.clients)
        s._remove_worker(w.address, safe=False, reason="test")
        assert len(s.clients) == n_clients  # the worker's client is still connected
        assert await sem.get_value() == 0
        assert await sem.acquire(timeout=1)

    async_pair(t)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_lease_of_a_killed_worker_process_is_released():
    from taskcore.scheduler import Scheduler
    from taskcore.testing import run

    async def main():
        s = await Scheduler(port=0).start()
        proc = subprocess.Popen([sys.executable, "-m", "taskcore.cli.worker", s.address,
                                 "--no-nanny", "--nthreads", "1"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=_env(), text=True)
        try:
            loop = asyncio.get_running_loop()
            line = await loop.run_in_executor(None, proc.stdout.readline)
            assert json.loads(line)["address"]
            async with Client(s.address, asynchronous=True) as c:
                fut = c.submit(take_lease_and_wait, "killed", "killed-holds", pure=False)
                assert await Event("killed-holds", client=c).wait(timeout=20)
                sem = await Semaphore(1, name="killed", client=c, lease_timeout="30s")
                assert await sem.get_value() == 1
                t0 = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)
                assert await sem.acquire(timeout=10)
                assert time.monotonic() - t0 < 10   # the worker's removal, not the 30 s lease
                del fut
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            await s.close()

    run(main(), timeout=60)
