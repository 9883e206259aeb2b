"""Failure handling with real processes started through the CLIs.

A SIGKILLed worker, a killed scheduler, garbage on the scheduler's port, and
many clients at once.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from taskcore.client import Client
from taskcore.errors import KilledWorker
from taskcore.testing import run

import cloudpickle

# Worker processes cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.abspath(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start(*args):
    """Start a CLI, return (process, its JSON ready line)."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=_env(), text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"{args} exited before it was ready")
    return proc, json.loads(line)


class Procs:
    def __init__(self):
        self.procs = []

    def scheduler(self, *extra):
        p, info = start("taskcore.cli.scheduler", "--port", "0", *extra)
        self.procs.append(p)
        return info["address"]

    def worker(self, address, *extra):
        p, info = start("taskcore.cli.worker", address, "--no-nanny", "--nthreads", "1", *extra)
        self.procs.append(p)
        return p, info

    def worker_nowait(self, address):
        """A worker that may die before it prints its ready line (it gets a lethal task)."""
        p = subprocess.Popen([sys.executable, "-m", "taskcore.cli.worker", address, "--no-nanny",
                              "--nthreads", "1"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=_env())
        self.procs.append(p)
        return p

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def procs():
    ps = Procs()
    yield ps
    ps.close()


def slowinc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def add(a, b):
    return a + b


def test_sigkilled_worker_mid_computation(procs):
    addr = procs.scheduler()
    victim, vinfo = procs.worker(addr)
    procs.worker(addr)
    procs.worker(addr)

    async def main():
        async with Client(addr, asynchronous=True) as c:
            await c._rpc("wait_for_workers", n=3, timeout=20)
            xs = c.map(slowinc, range(60))
            ys = [c.submit(add, xs[i], xs[i + 1]) for i in range(0, 60, 2)]
            await asyncio.sleep(0.3)  # some results exist on the victim by now
            os.kill(victim.pid, signal.SIGKILL)
            results = await asyncio.wait_for(c.gather(ys), 60)
            assert results == [(i + 1) + (i + 2) for i in range(0, 60, 2)]
            assert await c.gather(xs) == list(range(1, 61))

    run(main(), timeout=90)


def _suicide():
    os.kill(os.getpid(), signal.SIGKILL)


def test_task_that_kills_workers_becomes_killed_worker(procs):
    addr = procs.scheduler()
    for _ in range(3):  # allowed_failures=2 (default): the 3rd death ends it
        procs.worker(addr)

    async def main():
        async with Client(addr, asynchronous=True) as c:
            await c._rpc("wait_for_workers", n=3, timeout=20)
            f = c.submit(_suicide)
            with pytest.raises(KilledWorker):
                await asyncio.wait_for(f._result(), 60)
            # the scheduler still serves: a fresh worker computes
            await asyncio.get_running_loop().run_in_executor(None, procs.worker, addr)
            assert await c.submit(slowinc, 1, 0) == 2

    run(main(), timeout=120)


def test_scheduler_killed_workers_exit_within_death_timeout(procs):
    addr = procs.scheduler()
    sched = procs.procs[0]
    w, _ = procs.worker(addr, "--death-timeout", "2")
    time.sleep(0.5)
    sched.kill()
    t0 = time.monotonic()
    rc = w.wait(20)
    assert time.monotonic() - t0 < 10
    assert rc is not None


def test_garbage_on_scheduler_port_does_not_disturb_clients(procs):
    addr = procs.scheduler()
    procs.worker(addr)
    host, port = addr.replace("tcp://", "").rsplit(":", 1)

    garbage_sent = [0]

    async def garbage(stop):
        i = 0
        while not stop.is_set():
            try:
                r, w = await asyncio.open_connection(host, int(port))
                w.write(os.urandom(64) if i % 2 else b"\x01" + b"\xff" * 200)
                await w.drain()
                w.close()
            except OSError:
                pass
            i += 1
            garbage_sent[0] = i
            await asyncio.sleep(0.01)
        return i

    async def main():
        stop = asyncio.Event()
        g = asyncio.ensure_future(garbage(stop))
        async with Client(addr, asynchronous=True) as c:
            await c._rpc("wait_for_workers", n=1, timeout=20)
            # Compute for as long as it takes the garbage sender to hit the port 20 times.
            rounds = 0
            while (rounds < 5 or garbage_sent[0] < 20) and rounds < 500:
                fs = c.map(slowinc, range(100), [0] * 100, pure=False)
                assert await c.gather(fs) == list(range(1, 101))
                rounds += 1
        stop.set()
        assert await g >= 20

    run(main(), timeout=90)


def test_ten_clients_thousand_tasks_each(procs):
    addr = procs.scheduler()
    procs.worker(addr)
    procs.worker(addr)

    async def one(i):
        async with Client(addr, asynchronous=True) as c:
            fs = c.map(slowinc, range(1000), [0] * 1000, key=f"c{i}")
            return sum(await c.gather(fs))

    async def main():
        results = await asyncio.gather(*[one(i) for i in range(10)])
        assert results == [sum(range(1, 1001))] * 10

    run(main(), timeout=120)


def test_cli_workers_with_sigterm_exit_cleanly(procs):
    addr = procs.scheduler()
    w, info = procs.worker(addr)
    assert info["address"].startswith("tcp://")
    w.send_signal(signal.SIGTERM)
    assert w.wait(15) == 0
    sched = procs.procs[0]
    sched.send_signal(signal.SIGTERM)
    assert sched.wait(15) == 0


def test_scheduler_restart_client_errors_clearly_then_reconnects(procs):
    """A scheduler that dies and comes back on the same address (as Kubernetes restarts
    one behind its Service): waiting Futures fail at once with a clear error, results
    already here stay, the worker and the client reconnect, and the same keys can be
    submitted again."""
    from taskcore.errors import CommClosedError

    addr = procs.scheduler()
    port = addr.rsplit(":", 1)[1]
    procs.worker(addr, "--death-timeout", "30")
    with Client(addr, timeout=10) as c:
        c.reconnect_timeout = 30
        done = c.submit(add, 1, 2, key="done")
        assert done.result(timeout=10) == 3
        slow = c.submit(slowinc, 1, delay=3, key="slow")
        time.sleep(0.5)
        procs.procs[0].kill()
        procs.procs[0].wait()
        t0 = time.monotonic()
        with pytest.raises(CommClosedError, match="submit again once reconnected"):
            slow.result(timeout=10)
        assert time.monotonic() - t0 < 5
        assert done.result() == 3          # came back inline before: still here
        assert c.status == "disconnected"
        procs.scheduler("--port", port)
        deadline = time.monotonic() + 20
        while c.status != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.status == "running"
        c.wait_for_workers(1, timeout=20)
        again = c.submit(slowinc, 1, delay=0.01, key="slow")
        assert again.result(timeout=20) == 2
        assert c.submit(add, 2, 3, key="done").result(timeout=20) == 5
        del slow                            # an old Future's release must not free the new key
        time.sleep(0.2)
        assert again.result(timeout=5) == 2


def test_a_message_over_the_schedulers_limit_fails_with_the_limit_named():
    from taskcore import LocalCluster
    from taskcore.errors import CommClosedError
    from taskcore.transports.policy import ConnectionPolicy

    policy = ConnectionPolicy(max_message_bytes=1_000_000)
    with LocalCluster(n_workers=1, threads_per_worker=1, scheduler_process=False,
                      dashboard_address=None,
                      scheduler_kwargs={"connection_policy": policy}) as cluster, \
            Client(cluster, set_as_default=False) as c:
        assert c.submit(len, b"x" * 1000).result() == 1000
        big = c.submit(len, os.urandom(2_000_000))       # one message over 1 MB
        with pytest.raises(CommClosedError, match=r"it closed the connection: .*\(max_frame_size\)"):
            big.result(timeout=30)
        # the client reconnects; the scheduler kept serving everyone else
        deadline = time.monotonic() + 30
        while c.status != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.submit(len, b"y" * 10).result(timeout=30) == 10
