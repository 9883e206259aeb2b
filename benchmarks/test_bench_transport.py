"""Transport benchmarks, each with its baseline measured in the same run.

| benchmark                          | baseline                              | target          |
|------------------------------------|---------------------------------------|-----------------|
| small-message round trip (tcp)     | raw uvloop echo round trip            | within 1.5x     |
| small messages one way, batched    | msgpack packb+unpackb, one process    | at least 1x     |
| 200 MB numpy array over tcp        | raw socket sendall / recv_into        | at least 85%    |
"""
import asyncio
import socket
import time

import msgpack
import numpy as np
import uvloop

from conftest import QUICK, peer

ROUNDS = 3 if QUICK else 7


def best_of(fn, rounds=ROUNDS):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_roundtrip_small_message(benchmark):
    from taskcore.transports import connect

    n = 2000 if QUICK else 10000
    msg = {"op": "ping", "id": 12345, "key": "inc-0123456789abcdef"}
    raw = msgpack.packb(msg)
    loop = uvloop.new_event_loop()
    try:
        with peer("raw-echo") as raw_port, peer("tc-echo") as tc_port:
            async def raw_setup():
                r, w = await asyncio.open_connection("127.0.0.1", raw_port)
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return r, w

            r, w = loop.run_until_complete(raw_setup())

            async def raw_rounds():
                for _ in range(n):
                    w.write(raw)
                    await r.readexactly(len(raw))

            comm = loop.run_until_complete(connect(f"tcp://127.0.0.1:{tc_port}"))

            async def tc_rounds():
                for _ in range(n):
                    comm.send(msg)
                    await comm.read()

            for warm in (raw_rounds, tc_rounds):
                loop.run_until_complete(warm())
            base = best_of(lambda: loop.run_until_complete(raw_rounds()))
            benchmark.pedantic(lambda: loop.run_until_complete(tc_rounds()), rounds=ROUNDS,
                               iterations=1)
            ours = benchmark.stats.stats.min
            benchmark.extra_info.update(
                ours_us=ours / n * 1e6, baseline_us=base / n * 1e6, ratio=ours / base,
                baseline="raw uvloop echo round trip", target="ratio <= 1.5")
            loop.run_until_complete(comm.close())
            w.close()
    finally:
        loop.close()


def test_small_messages_one_way_batched(benchmark):
    from taskcore.transports import connect

    n = 50_000 if QUICK else 200_000
    msgs = [{"op": "task-finished", "id": i, "nbytes": 28, "type": "int"} for i in range(n)]

    def baseline():
        for m in msgs:
            msgpack.unpackb(msgpack.packb(m))

    base = best_of(baseline)
    loop = uvloop.new_event_loop()
    try:
        with peer("tc-count") as port:
            comm = loop.run_until_complete(connect(f"tcp://127.0.0.1:{port}"))

            async def blast():
                send = comm.send
                for i in range(0, n, 1000):
                    for m in msgs[i:i + 1000]:
                        send(m)
                    await asyncio.sleep(0)  # one tick: one batch of 1000
                send("stop")
                got = await comm.read()
                assert got == n, got

            loop.run_until_complete(blast())
            benchmark.pedantic(lambda: loop.run_until_complete(blast()), rounds=ROUNDS,
                               iterations=1)
            ours = benchmark.stats.stats.min
            benchmark.extra_info.update(
                ours_msgs_per_s=n / ours, baseline_msgs_per_s=n / base, ratio=base / ours,
                baseline="msgpack packb+unpackb in one process", target="ratio >= 1 (rate)")
            loop.run_until_complete(comm.close())
    finally:
        loop.close()


def test_large_array_over_tcp(benchmark):
    from taskcore.transports import connect

    nbytes = (50 if QUICK else 200) * 2**20
    arr = np.random.randint(0, 255, nbytes, dtype="u1")
    view = memoryview(arr)
    with peer("raw-sink", nbytes) as raw_port:
        s = socket.create_connection(("127.0.0.1", raw_port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def raw_send():
            s.sendall(view)
            assert s.recv(1) == b"k"

        raw_send()
        base = best_of(raw_send)
        s.close()
    loop = uvloop.new_event_loop()
    try:
        with peer("tc-sink") as port:
            comm = loop.run_until_complete(connect(f"tcp://127.0.0.1:{port}"))

            async def send():
                await comm.write({"x": arr})
                assert await comm.read() == 1

            loop.run_until_complete(send())
            benchmark.pedantic(lambda: loop.run_until_complete(send()), rounds=ROUNDS,
                               iterations=1)
            ours = benchmark.stats.stats.min
            benchmark.extra_info.update(
                ours_gb_s=nbytes / ours / 1e9, baseline_gb_s=nbytes / base / 1e9,
                ratio=base / ours, baseline="raw socket sendall/recv_into",
                target="ratio >= 0.85")
            loop.run_until_complete(comm.close())
    finally:
        loop.close()
