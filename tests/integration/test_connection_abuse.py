"""Connection abuse against a real scheduler process while a client computes
(issue 16): resets, garbage, half messages, absurd lengths and 1,000 idle
connections. The scheduler runs with `ulimit -n 1024` (where 12,000 resets
used to exhaust it); its open files and memory must stay bounded, and the
client's work must stay on time and correct."""
import collections
import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import threading
import time

import cloudpickle
import psutil
import pytest

from taskcore import Client
from taskcore.testing import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SCHEDULER_NOFILE = 1024


def square(x):
    return x * x


def _limit_files():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (SCHEDULER_NOFILE, hard))


@pytest.fixture
def scheduler_and_worker():
    env = dict(os.environ, TASKCORE_HANDSHAKE_TIMEOUT="2", TASKCORE_STALL_TIMEOUT="2")
    sched = subprocess.Popen(
        [sys.executable, "-m", "taskcore.cli.scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard"], stdout=subprocess.PIPE, text=True, env=env, preexec_fn=_limit_files)
    worker = None
    try:
        address = json.loads(sched.stdout.readline())["address"]
        worker = subprocess.Popen(
            [sys.executable, "-m", "taskcore.cli.worker", address, "--no-nanny", "--nthreads",
             "1", "--no-dashboard"], stdout=subprocess.PIPE, text=True)
        json.loads(worker.stdout.readline())
        yield address, psutil.Process(sched.pid)
    finally:
        for p in (worker, sched):
            if p is not None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


def _endpoint(address):
    host, port = address.replace("tcp://", "").rsplit(":", 1)
    return host, int(port)


def _handshake_bytes():
    import msgpack

    from taskcore.core.wire import encode

    hs = msgpack.packb([{"op": "handshake", "protocol": 1, "role": "client",
                         "compression": [], "pickle_protocol": 5, "token": None}])
    return b"".join(bytes(x) for x in encode([hs]))


def _attack(endpoint, stop, counts, idle_sockets):
    rng = random.Random(16)
    hs = _handshake_bytes()
    half_open = collections.deque()

    def conn():
        s = socket.create_connection(endpoint, timeout=5)
        return s

    def reset(s):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    # 1,000 idle connections that never say a word (most are closed by the
    # handshake timeout; those past max_connections at once).
    for _ in range(1000):
        try:
            idle_sockets.append(conn())
            counts["idle"] += 1
        except OSError:
            counts["idle_refused"] += 1
    while not stop.is_set():
        kind = rng.choice(["reset", "reset", "reset", "garbage", "half", "absurd"])
        try:
            s = conn()
            if kind == "reset":
                reset(s)
            elif kind == "garbage":
                s.sendall(rng.randbytes(rng.randint(1, 4096)))
                reset(s)
            elif kind == "half":
                # Authenticated, then a message declaring 4 GiB and a few bytes of it;
                # left open: the stall timeout must close it.
                s.sendall(hs + struct.pack("<QQ", 1, 4 * 1024 ** 3) + b"\0" + b"x" * 100)
                half_open.append(s)
                if len(half_open) > 300:        # bounded here; the server closed them anyway
                    half_open.popleft().close()
            else:
                s.sendall(struct.pack("<QQ", 1, 2 ** 62) + b"\0")
                reset(s)
            counts[kind] += 1
        except OSError:
            counts["errors"] += 1
    idle_sockets.extend(half_open)


def test_scheduler_survives_connection_abuse(scheduler_and_worker):
    address, sched = scheduler_and_worker
    # This process opens ~1,000 sockets of its own.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    try:
        with Client(address, timeout=20) as c:
            assert c.gather(c.map(square, range(50))) == [i * i for i in range(50)]
            base_fds = sched.num_fds()
            base_rss = sched.memory_info().rss

            stop = threading.Event()
            counts = {k: 0 for k in ("idle", "idle_refused", "reset", "garbage", "half",
                                     "absurd", "errors")}
            idle = []
            attacker = threading.Thread(target=_attack, args=(_endpoint(address), stop,
                                                              counts, idle), daemon=True)
            attacker.start()
            durations, max_fds, max_rss = [], 0, 0
            deadline = time.monotonic() + 20
            batch = 0
            while time.monotonic() < deadline:
                batch += 1
                t = time.monotonic()
                xs = list(range(batch * 1000, batch * 1000 + 200))
                assert c.gather(c.map(square, xs)) == [x * x for x in xs]
                durations.append(time.monotonic() - t)
                max_fds = max(max_fds, sched.num_fds())
                max_rss = max(max_rss, sched.memory_info().rss)
            stop.set()
            attacker.join(30)
            for s in idle:
                s.close()

            assert counts["reset"] > 1000, counts
            durations.sort()
            assert durations[len(durations) // 2] < 1.0, (durations, counts)
            assert durations[-1] < 5.0, (durations, counts)
            assert max_fds < SCHEDULER_NOFILE, (max_fds, counts)
            assert max_rss - base_rss < 300 * 1024 ** 2, (max_rss, base_rss, counts)
            print("abuse:", counts, "max fds", max_fds, "rss growth MB",
                  (max_rss - base_rss) // 2 ** 20, "batch s median/max",
                  round(durations[len(durations) // 2], 3), round(durations[-1], 3))
            # Everything the attack opened is closed again, and new clients get in.
            wait_until(lambda: sched.num_fds() <= base_fds + 5, timeout=15,
                       message=f"scheduler files back near {base_fds}")
            with Client(address, timeout=10) as c2:
                assert c2.submit(square, 12).result(timeout=10) == 144
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_short_client_sessions_do_not_accumulate(scheduler_and_worker):
    """Fault 2: 1,500 short sessions took the scheduler from 36 MB to 424 MB
    (closed connections waited for the cycle collector)."""
    address, sched = scheduler_and_worker

    def sessions(n):
        for i in range(n):
            with Client(address, timeout=10, set_as_default=False) as c:
                assert c.submit(square, i).result(timeout=10) == i * i

    sessions(100)                                   # warm up: imports, caches
    before = sched.memory_info().rss
    sessions(600)
    growth = sched.memory_info().rss - before
    print("sessions: rss growth MB", growth / 2 ** 20)
    assert growth < 40 * 1024 ** 2, f"scheduler grew {growth / 2**20:.0f} MB over 600 sessions"
