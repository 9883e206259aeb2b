"""ucx:// (transports/ucx.py) over UCX's tcp transport: the comm, its wire format and
limits, and a computation between real processes.

ucxx needs no GPU here (`UCX_TLS=tcp`). Outside CI a missing ucxx skips this module;
under CI=true it fails it.
"""
import asyncio
import logging
import os
import struct
import sys
import time

os.environ.setdefault("UCX_TLS", "tcp")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from taskcore.errors import (AddressError, CommClosedError, HandshakeError,  # noqa: E402
                             ProtocolError)
from taskcore.testing import echo_listener, import_required, run  # noqa: E402
from taskcore.transports import connect, listen  # noqa: E402
from taskcore.transports.policy import ConnectionPolicy  # noqa: E402

from taskcore.transports import ucx as ucx_mod  # noqa: E402
from taskcore.transports import ucx_progress  # noqa: E402

for _k, _v in ucx_mod.ENV_DEFAULTS.items():      # as ucx:// sets them before importing ucxx
    os.environ.setdefault(_k, _v)
ucxx = import_required("ucxx", "the ucx extra: pip install 'taskcore[ucx]'")

ADDR = "ucx://127.0.0.1:0"


def _free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _wait_for(predicate, timeout=5.0, what="a condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _pair(**listen_kw):
    """A listener whose handler hands its server-side comms to a queue, and a client comm."""
    accepted = asyncio.Queue()
    hold = asyncio.Event()

    async def handler(comm):
        accepted.put_nowait(comm)
        await hold.wait()

    listener = await listen(ADDR, handler, **listen_kw)
    client = await connect(listener.contact_address)
    server = await asyncio.wait_for(accepted.get(), 5)
    return listener, client, server, hold


def test_messages_roundtrip():
    async def main():
        async with await echo_listener(ADDR) as listener:
            assert listener.contact_address.startswith("ucx://127.0.0.1:")
            assert not listener.contact_address.endswith(":0")
            comm = await connect(listener.contact_address)
            assert comm.handshake_info["op"] == "handshake"
            assert comm.compression is False
            msgs = [{"op": "x", "i": i, "t": (1, "a"), "b": b"\0" * i} for i in range(200)]
            for m in msgs:
                comm.send(m)
            assert [await comm.read() for _ in msgs] == msgs
            await comm.write({"none": None, "nested": [{"k": (1, 2.5)}]})
            assert await comm.read() == {"none": None, "nested": [{"k": (1, 2.5)}]}
            await comm.close()

    run(main())


def test_numpy_arrays_many_frames_and_large_frames():
    async def main():
        async with await echo_listener(ADDR) as listener:
            comm = await connect(listener.contact_address)
            # More frames than fit in the inline header table: the table travels apart.
            many = [np.full(10, i, dtype="i8") for i in range(ucx_mod.INLINE_FRAMES + 50)]
            await comm.write({"many": many})
            back = (await comm.read())["many"]
            assert len(back) == len(many)
            for a, b in zip(many, back):
                np.testing.assert_array_equal(a, b)
            # A pooled receive buffer (>= 1 MiB) and one past the pool's 64 MiB blocks.
            mid = np.random.random(3 * 2**17)                    # 3 MiB
            big = np.arange(80 * 2**20 // 8, dtype="f8")         # 80 MiB
            await comm.write({"mid": mid, "big": big, "empty": np.empty(0)})
            got = await comm.read()
            np.testing.assert_array_equal(got["mid"], mid)
            np.testing.assert_array_equal(got["big"], big)
            assert got["empty"].shape == (0,)
            await comm.close()

    run(main())


def test_write_waits_for_a_slow_reader():
    async def main():
        listener, client, server, hold = await _pair()
        try:
            chunk = np.ones(16 * 2**20, dtype="u1")
            await client.write({"x": chunk})          # received: fills the server's inbox
            await _wait_for(lambda: server.reading_paused, what="the reader to pause")
            second = asyncio.ensure_future(client.write({"x": chunk}))
            await asyncio.sleep(0.3)
            assert not second.done(), "write() returned while nobody was reading"
            assert client.inflight > client.high_water
            first = await server.read()
            assert first["x"].nbytes == chunk.nbytes
            await asyncio.wait_for(second, 5)
            assert (await server.read())["x"].nbytes == chunk.nbytes
        finally:
            hold.set()
            await client.close()
            await listener.stop()

    run(main())


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest.mark.parametrize("side", ["client", "server"])
def test_close_and_abort_from_either_end(side, how):
    async def main():
        listener, client, server, hold = await _pair()
        try:
            closer, other = (client, server) if side == "client" else (server, client)
            closer.send({"last": 1})
            if how == "close":
                await closer.close()
                assert await other.read() == {"last": 1}   # close sends what was queued
            else:
                closer.abort()
            assert closer.closed and closer.lost.done()
            with pytest.raises(CommClosedError):
                await asyncio.wait_for(other.read(), 5)
            assert other.closed
            await asyncio.wait_for(other.lost, 1)
            with pytest.raises(CommClosedError):
                other.send({"after": 1})
            with pytest.raises(CommClosedError):
                await closer.read()
            await _wait_for(lambda: not listener.comms, what="the listener to forget the comm")
        finally:
            hold.set()
            await listener.stop()

    run(main())


def test_refused_connect():
    async def main():
        port = _free_port()
        backend = ucx_mod.UCXBackend()
        with pytest.raises(ConnectionRefusedError):
            await backend.connect(f"127.0.0.1:{port}")
        t0 = time.monotonic()
        with pytest.raises(OSError, match="timed out connecting"):
            await connect(f"ucx://127.0.0.1:{port}", timeout=0.5)
        assert time.monotonic() - t0 < 3
        with pytest.raises(OSError, match="refused"):
            await connect(f"ucx://127.0.0.1:{port}", timeout=5, retry_refused=False)

    run(main())


def test_connect_retries_until_the_listener_is_up():
    async def main():
        port = _free_port()
        attempt = asyncio.ensure_future(connect(f"ucx://127.0.0.1:{port}", timeout=10))
        await asyncio.sleep(0.3)
        assert not attempt.done()
        async with await echo_listener(f"ucx://127.0.0.1:{port}"):
            comm = await asyncio.wait_for(attempt, 10)
            await comm.write({"hi": 1})
            assert await comm.read() == {"hi": 1}
            await comm.close()

    run(main())


def _raw_header(nframes, entries, kind=ucx_mod.KIND_DATA, magic=ucx_mod.MAGIC):
    return ucx_mod._PREFIX.pack(magic, kind, nframes) + b"".join(
        struct.pack("<QB", n, f) for n, f in entries)


@pytest.mark.parametrize("payload, fault", [
    (b"GARBAGE-NOT-A-HEADER", "bad magic"),
    (_raw_header(1, [(2**62, 0)]), "max_frame_size"),
    (_raw_header(2**31, []), "max_frames"),
    (_raw_header(1, [(10, 0x80)]), "unknown frame flags"),
])
def test_bad_header_closes_that_comm_only(payload, fault, caplog):
    async def main():
        async with await echo_listener(ADDR) as listener:
            port = int(listener.contact_address.rsplit(":", 1)[1])
            with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
                raw = await ucxx.create_endpoint("127.0.0.1", port)
                await raw.send(payload)
                await _wait_for(lambda: fault in caplog.text, what=f"a refusal naming {fault!r}")
            assert "handshake failed" in caplog.text
            await _wait_for(lambda: not listener.comms, what="the bad comm to be closed")
            raw.abort()
            # The listener keeps serving.
            comm = await connect(listener.contact_address)
            await comm.write({"still": "serving"})
            assert await comm.read() == {"still": "serving"}
            await comm.close()

    run(main())


def test_frame_larger_than_announced_is_a_protocol_error():
    async def main():
        got = asyncio.get_running_loop().create_future()

        async def handler(comm):
            try:
                await comm.read()
            except Exception as e:
                got.set_result(e)

        async with await listen(ADDR, handler, handshake=False) as listener:
            port = int(listener.contact_address.rsplit(":", 1)[1])
            raw = await ucxx.create_endpoint("127.0.0.1", port)
            await raw.send(_raw_header(1, [(8, 0)]))
            asyncio.ensure_future(raw.send(b"x" * 64))      # 64 bytes where 8 were announced
            err = await asyncio.wait_for(got, 5)
            assert isinstance(err, ProtocolError)
            assert "larger than its header announced" in str(err)
            raw.abort()

    run(main())


def test_stalled_message_is_closed():
    """A header whose frames never come holds buffers: the stall sweep closes the comm."""
    async def main():
        policy = ConnectionPolicy(stall_timeout=0.4)
        async with await echo_listener(ADDR, handshake=False, policy=policy) as listener:
            port = int(listener.contact_address.rsplit(":", 1)[1])
            raw = await ucxx.create_endpoint("127.0.0.1", port)
            await raw.send(_raw_header(1, [(100, 0)]))         # ...and no frame
            await _wait_for(lambda: listener.closed_stalled == 1, timeout=5,
                            what="the stalled comm to be closed")
            assert not listener.comms
            raw.abort()

    run(main())


def test_handshake_with_token():
    async def main():
        async with await echo_listener(ADDR, token="s3cret") as listener:
            comm = await connect(listener.contact_address, token="s3cret")
            await comm.write({"ok": 1})
            assert await comm.read() == {"ok": 1}
            await comm.close()
            with pytest.raises(HandshakeError, match="authentication failed"):
                await connect(listener.contact_address, token="wrong")
            with pytest.raises(HandshakeError, match="authentication failed"):
                await connect(listener.contact_address)

    run(main())


def test_max_connections():
    async def main():
        policy = ConnectionPolicy(max_connections=1)
        async with await echo_listener(ADDR, policy=policy) as listener:
            first = await connect(listener.contact_address)
            with pytest.raises((HandshakeError, OSError)):
                await connect(listener.contact_address, timeout=3)
            await first.write({"first": "still fine"})
            assert await first.read() == {"first": "still fine"}
            await first.close()

    run(main())


def test_bad_addresses():
    async def main():
        for bad in ("ucx://127.0.0.1", "ucx://127.0.0.1:0", "ucx://:8786", "ucx://h:port",
                    "ucx://::1:80"):
            with pytest.raises(AddressError):
                await connect(bad, timeout=1)

    run(main())


def test_missing_ucxx_names_the_extra(monkeypatch):
    monkeypatch.setattr(ucx_progress, "_ucxx", None)
    monkeypatch.setitem(sys.modules, "ucxx", None)
    with pytest.raises(ImportError, match=r"pip install 'taskcore\[ucx\]'"):
        ucx_mod.import_ucxx()


def test_loops_in_turn_and_a_loop_in_another_thread():
    """Each event loop gets its own progress driver; a client thread's loop works too."""
    import threading

    import uvloop

    async def roundtrip():
        async with await echo_listener(ADDR) as listener:
            comm = await connect(listener.contact_address)
            await comm.write({"x": np.arange(1000)})
            np.testing.assert_array_equal((await comm.read())["x"], np.arange(1000))
            await comm.close()
            return ucx_mod.progress()

    first = run(roundtrip())
    second = run(roundtrip())
    assert first is not second
    out = []
    t = threading.Thread(target=lambda: out.append(uvloop.run(roundtrip())))
    t.start()
    t.join(30)
    assert out and out[0] is not second


# -- real processes --------------------------------------------------------------------------

def _make(nbytes):
    return np.arange(nbytes // 8, dtype="f8")


def _check(x):
    n = x.size
    return int(n), float(x[0]), float(x[-1]), float(x[:: 1 << 16].sum())


import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_local_cluster_over_ucx_with_nannies():
    """`LocalCluster(protocol="ucx")`: the scheduler process, the nannies' workers and the
    client all speak ucx://; a 200 MB array moves between the worker processes."""
    from taskcore import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, protocol="ucx",
                      dashboard_address=None, env={"UCX_TLS": os.environ["UCX_TLS"]}) as cluster:
        with Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            workers = sorted(client.scheduler_info()["workers"])
            assert cluster.scheduler_address.startswith("ucx://")
            assert all(w.startswith("ucx://") for w in workers)
            total = client.submit(sum, client.map(lambda i: i * i, range(50)))
            assert total.result(timeout=30) == sum(i * i for i in range(50))
            a, b = workers
            x = client.submit(_make, 200 * 2**20, workers=[a], pure=False)
            n, first, last, _ = client.submit(_check, x, workers=[b]).result(timeout=60)
            assert (n, first, last) == (200 * 2**20 // 8, 0.0, float(200 * 2**20 // 8 - 1))


def test_sync_client_writes_its_submit_from_its_own_thread():
    """The fast-write capability: a sync client's thread that is about to block on a
    result posts its submit to UCX itself (`write_now`), and the results are right."""
    from taskcore import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, protocol="ucx",
                      dashboard_address=None) as cluster:
        with Client(cluster, set_as_default=False) as client:
            assert [client.submit(_check, _make(8 * (i + 1))).result(timeout=30)[0]
                    for i in range(20)] == list(range(1, 21))
            assert client.comm.direct_writes > 0
        with Client(cluster, asynchronous=False, set_as_default=False) as other:
            other.comm._write_now_ok = False           # a comm that does not allow it
            assert other.submit(sum, [1, 2]).result(timeout=30) == 3
            assert other.comm.direct_writes == 0
