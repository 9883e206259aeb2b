"""A listener's ConnectionPolicy: connection limit, stalled messages, handshake
time, and what a closed or reset connection leaves behind (issue 16, faults 1,
2 and 5)."""
import asyncio
import gc
import logging
import os
import socket
import struct
import weakref

import pytest

from taskcore.core.wire import FrameDecoder, Limits, encode
from taskcore.errors import HandshakeError
from taskcore.testing import echo_listener, run
from taskcore.transports import connect, listen
from taskcore.transports.policy import ConnectionPolicy
from taskcore.transports.tcp import TCPComm


def _host_port(address):
    host, port = address.replace("tcp://", "").rsplit(":", 1)
    return host, int(port)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _live_comms():
    return [o for o in gc.get_objects() if type(o) is TCPComm]


async def _echo_listener(**kw):
    return await echo_listener(**kw)


def test_policy_from_env_and_overrides(monkeypatch):
    monkeypatch.setenv("TASKCORE_MAX_CONNECTIONS", "77")
    monkeypatch.setenv("TASKCORE_STALL_TIMEOUT", "2.5")
    p = ConnectionPolicy.from_env(handshake_timeout=3)
    assert (p.max_connections, p.stall_timeout, p.handshake_timeout) == (77, 2.5, 3)
    assert p.connection_limit() == 77
    monkeypatch.setenv("TASKCORE_MAX_MESSAGE_BYTES", "lots")
    with pytest.raises(ValueError, match="TASKCORE_MAX_MESSAGE_BYTES='lots'"):
        ConnectionPolicy.from_env()
    monkeypatch.delenv("TASKCORE_MAX_MESSAGE_BYTES")
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionPolicy(max_connections=0)
    with pytest.raises(ValueError, match="stall_timeout"):
        ConnectionPolicy(stall_timeout=-1)
    with pytest.raises(TypeError, match="unknown connection policy options"):
        ConnectionPolicy.from_env(max_conections=5)


def test_default_connection_limit_leaves_room_for_own_files():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = ConnectionPolicy().connection_limit()
    assert 16 <= limit < soft


def test_max_connections_refuses_with_a_logged_reason(caplog):
    async def main():
        listener = await _echo_listener(policy=ConnectionPolicy(max_connections=3))
        comms = [await connect(listener.contact_address) for _ in range(3)]
        with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
            with pytest.raises((HandshakeError, OSError)):
                await connect(listener.contact_address, timeout=2)
        assert "max_connections" in caplog.text
        assert len(listener.comms) == 3
        # A slot frees when a connection closes, and is usable again.
        await comms.pop().close()
        await asyncio.sleep(0.05)
        again = await connect(listener.contact_address)
        await again.write("x")
        assert await again.read() == "x"
        for c in comms + [again]:
            await c.close()
        await listener.stop()

    run(main())


def test_stalled_half_message_is_closed(caplog):
    async def main():
        listener = await _echo_listener(policy=ConnectionPolicy(stall_timeout=0.5))
        good = await connect(listener.contact_address)
        # An authenticated peer declares a 4 GiB frame and sends 10 bytes of it.
        evil = await connect(listener.contact_address)
        with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
            evil.transport.write(struct.pack("<QQ", 1, 4 * 1024 ** 3) + b"\0" + b"x" * 10)
            await asyncio.wait_for(evil.lost, 5)
        assert "stall_timeout" in caplog.text
        # A connection that is merely idle between messages is left alone.
        await asyncio.sleep(0.8)
        await good.write(1)
        assert await good.read() == 1
        await good.close()
        await listener.stop()

    run(main())


def test_slow_but_moving_message_is_not_stalled():
    async def main():
        listener = await _echo_listener(policy=ConnectionPolicy(stall_timeout=0.4))
        comm = await connect(listener.contact_address)
        payload = b"y" * 200_000
        from taskcore.core.serialize import dumps

        blob = b"".join(bytes(x) for x in encode(dumps([payload])))
        for i in range(0, len(blob), len(blob) // 10):   # 1 s in all, in 0.1 s steps
            comm.transport.write(blob[i:i + len(blob) // 10])
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(comm.read(), 5) == payload
        await comm.close()
        await listener.stop()

    run(main())


def test_handshake_timeout_is_logged(caplog):
    async def main():
        listener = await _echo_listener(handshake_timeout=0.3)
        host, port = _host_port(listener.contact_address)
        with caplog.at_level(logging.WARNING, logger="taskcore.transports"):
            reader, writer = await asyncio.open_connection(host, port)
            assert await asyncio.wait_for(reader.read(), 5) == b""   # closed by the server
        writer.close()
        assert "no handshake within 0.3 s" in caplog.text
        await listener.stop()

    run(main())


def test_resets_leave_no_socket_or_comm_behind():
    """Fault 1: a reset before accept left its socket and ~256 kB behind."""
    async def main():
        listener = await _echo_listener()
        host, port = _host_port(listener.contact_address)
        before = _open_fds()

        def resets(n):
            for _ in range(n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.connect((host, port))
                s.close()

        await asyncio.get_running_loop().run_in_executor(None, resets, 500)
        await asyncio.sleep(0.5)
        assert _open_fds() <= before + 2
        assert len(listener.comms) == 0
        good = await connect(listener.contact_address)
        await good.write("ok")
        assert await good.read() == "ok"
        await good.close()
        await listener.stop()
        return listener.resets

    gc.collect()
    gc.disable()
    try:
        run(main())
        # Freed by reference counting, not by the collector.
        assert not [c for c in _live_comms() if c.closed]
    finally:
        gc.enable()


def test_closed_connections_are_freed_without_the_cycle_collector():
    """Fault 2: a handler that holds its comm made every closed comm a cycle."""
    async def main():
        class Session:                       # the usual shape: handler -> record -> comm
            def __init__(self, comm):
                self.comm = comm

            def on_message(self, msg):
                self.comm.send(msg)

        refs = []

        async def handler(comm):
            refs.append(weakref.ref(comm))
            comm.set_message_handler(Session(comm).on_message)
            await comm.lost

        listener = await listen("tcp://127.0.0.1:0", handler)
        for _ in range(50):
            c = await connect(listener.contact_address)
            await c.write("ping")
            assert await c.read() == "ping"
            c.abort()
            refs.append(weakref.ref(c))
            del c
        await asyncio.sleep(0.2)
        await listener.stop()
        return refs

    gc.collect()
    gc.disable()
    try:
        refs = run(main())
        alive = [r() for r in refs if r() is not None]
        assert not alive, f"{len(alive)} closed comms still alive without gc: {alive[:3]}"
    finally:
        gc.enable()


def test_idle_decoder_commits_little_and_grows_under_load():
    dec = FrameDecoder()
    assert dec.scratch_size == 16 * 1024
    data = b"".join(bytes(x) for x in encode([b"z" * 100])) * 10_000   # ~1.2 MB of small messages
    out = dec.feed(data)
    assert len(out) == 10_000
    assert dec.scratch_size == 256 * 1024


def test_declared_size_is_not_committed_up_front():
    """Fault 5: a declared 4 GiB frame reserved 4 GiB; memory now follows the bytes."""
    import resource

    dec = FrameDecoder(Limits(max_frame_size=8 * 1024 ** 3, max_message_size=8 * 1024 ** 3))
    header = struct.pack("<QQ", 1, 4 * 1024 ** 3) + b"\0"
    vm_before = _vm_size()
    dec.feed(header + b"a" * 1000)
    assert dec.in_message
    assert _vm_size() - vm_before < 200 * 1024 ** 2      # 64 MiB mapped, not 4 GiB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_growing_frame_arrives_intact():
    import numpy as np

    n = 150 * 1024 ** 2                                   # > 64 MiB: grows twice
    arr = np.arange(n // 8, dtype="u8")
    dec = FrameDecoder()
    blob = b"".join(bytes(x) for x in encode([memoryview(arr).cast("B")]))
    out = []
    step = 3 * 1024 ** 2 + 17                             # odd chunks across the boundaries
    for i in range(0, len(blob), step):
        out.extend(dec.feed(blob[i:i + step]))
    (frames, flags), = out
    got = np.frombuffer(frames[0], dtype="u8")
    assert got.shape == arr.shape and (got == arr).all()


def _vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_scheduler_takes_a_connection_policy():
    from taskcore.scheduler import Scheduler

    async def main():
        async with Scheduler(port=0, connection_policy=ConnectionPolicy(max_connections=2)) as s:
            assert s.listeners[0].max_connections == 2

    run(main())
