"""Transport behaviour shared by tcp, tls and inproc: the same tests run on each scheme."""
import asyncio
import socket

import numpy as np
import pytest

from taskcore.errors import CommClosedError, HandshakeError
from taskcore.security import Security
from taskcore.testing import echo_listener, run
from taskcore.transports import connect, listen

SCHEMES = ["tcp", "tls", "inproc"]


@pytest.fixture(scope="module")
def security():
    return Security.temporary()


def _opts(scheme, security):
    return {"security": security} if scheme == "tls" else {}


def _addr(scheme):
    return "inproc://" if scheme == "inproc" else f"{scheme}://127.0.0.1:0"


async def echo_server(scheme, security, **kw):
    return await echo_listener(_addr(scheme), **_opts(scheme, security), **kw)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_echo_roundtrip(scheme, security):
    async def main():
        async with await echo_server(scheme, security) as listener:
            assert listener.contact_address.startswith(scheme + "://")
            if scheme != "inproc":
                assert not listener.contact_address.endswith(":0")
            comm = await connect(listener.contact_address, **_opts(scheme, security))
            assert comm.peer_address == listener.contact_address or scheme != "inproc"
            msgs = [{"op": "x", "i": i, "t": (1, "a")} for i in range(100)]
            for m in msgs:
                comm.send(m)
            got = [await comm.read() for _ in msgs]
            assert got == msgs
            arr = np.arange(1_000_000, dtype="f8")
            await comm.write({"data": arr})
            back = await comm.read()
            np.testing.assert_array_equal(back["data"], arr)
            await comm.close()
            assert comm.closed
            with pytest.raises(CommClosedError):
                await comm.read()

    run(main())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_many_clients(scheme, security):
    async def main():
        async with await echo_server(scheme, security) as listener:
            async def one(i):
                c = await connect(listener.contact_address, **_opts(scheme, security))
                for j in range(20):
                    await c.write([i, j])
                    assert await c.read() == [i, j]
                await c.close()

            await asyncio.gather(*[one(i) for i in range(10)])

    run(main())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_message_handler_fast_path(scheme, security):
    async def main():
        async with await echo_server(scheme, security) as listener:
            comm = await connect(listener.contact_address, **_opts(scheme, security))
            got = []
            done = asyncio.get_running_loop().create_future()

            def handler(msg):
                got.append(msg)
                if len(got) == 1000 and not done.done():
                    done.set_result(None)

            comm.set_message_handler(handler)
            for i in range(1000):
                comm.send(i)
            await asyncio.wait_for(done, 10)
            assert got == list(range(1000))
            await comm.close()

    run(main())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_abort_and_peer_sees_close(scheme, security):
    async def main():
        closed = asyncio.get_running_loop().create_future()

        async def handler(comm):
            try:
                await comm.read()
            except CommClosedError as e:
                closed.set_result(e)

        async with await listen(_addr(scheme), handler, **_opts(scheme, security)) as listener:
            comm = await connect(listener.contact_address, **_opts(scheme, security))
            comm.abort()
            assert comm.closed
            with pytest.raises(CommClosedError):
                comm.send("x")
            assert isinstance(await asyncio.wait_for(closed, 5), CommClosedError)

    run(main())


@pytest.mark.parametrize("scheme", ["tcp", "inproc"])
def test_bad_token_refused_with_reason(scheme, security):
    async def main():
        async with await echo_server(scheme, security, token="s3cret") as listener:
            with pytest.raises(HandshakeError, match="authentication failed"):
                await connect(listener.contact_address, token="wrong")
            with pytest.raises(HandshakeError, match="authentication failed"):
                await connect(listener.contact_address)
            comm = await connect(listener.contact_address, token="s3cret")
            await comm.write("ok")
            assert await comm.read() == "ok"
            await comm.close()

    run(main())


def test_version_mismatch_refused(monkeypatch):
    from taskcore.transports import base

    async def main():
        async with await echo_server("tcp", None) as listener:
            original = base._local_handshake

            def newer_client(role, token, compression):
                msg = original(role, token, compression)
                if role == "client":  # only the connecting side speaks a future version
                    msg["protocol"] = 999
                return msg

            monkeypatch.setattr(base, "_local_handshake", newer_client)
            with pytest.raises(HandshakeError, match="protocol version mismatch"):
                await connect(listener.contact_address)

    run(main())


def test_connect_timeout_and_retry():
    async def main():
        # Nothing listens on this port: connect retries until its timeout, then says so.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(OSError, match="timed out connecting"):
            await connect(f"tcp://127.0.0.1:{port}", timeout=0.5)
        assert 0.4 < loop.time() - t0 < 3

        # A server that appears while the client is retrying is reached.
        async def start_later():
            await asyncio.sleep(0.3)
            return await echo_server_on(port)

        async def echo_server_on(port):
            async def handler(comm):
                await comm.write(await comm.read())
            return await listen(f"tcp://127.0.0.1:{port}", handler)

        task = asyncio.ensure_future(start_later())
        comm = await connect(f"tcp://127.0.0.1:{port}", timeout=5)
        await comm.write("hi")
        assert await comm.read() == "hi"
        await comm.close()
        await (await task).stop()

    run(main())


def test_tls_wrong_ca_refused(security, tmp_path):
    other = Security.temporary(directory=str(tmp_path))

    async def main():
        async with await echo_server("tls", security) as listener:
            with pytest.raises((OSError, HandshakeError)):
                await connect(listener.contact_address, timeout=1, security=other)
            # A plain tcp client talking to a TLS server is refused too.
            addr = listener.contact_address.replace("tls://", "tcp://")
            with pytest.raises((OSError, HandshakeError)):
                await connect(addr, timeout=1)
            comm = await connect(listener.contact_address, security=security)
            await comm.write(1)
            assert await comm.read() == 1
            await comm.close()

    run(main())


def test_tls_requires_security():
    from taskcore.errors import AddressError

    async def main():
        with pytest.raises(AddressError, match="Security"):
            await listen("tls://127.0.0.1:0", None)

    run(main())


def test_backpressure_slow_reader():
    """A reader that does not read makes write() wait instead of buffering without bound."""

    async def main():
        release = asyncio.Event()

        async def handler(comm):
            await release.wait()
            n = 0
            while True:
                try:
                    await comm.read()
                    n += 1
                except CommClosedError:
                    return

        async with await listen("tcp://127.0.0.1:0", handler) as listener:
            comm = await connect(listener.contact_address)
            chunk = np.zeros(1 << 20, dtype="u1")  # 1 MiB per message
            sent = 0

            async def writer():
                nonlocal sent
                for _ in range(200):
                    await comm.write({"x": chunk})
                    sent += 1

            task = asyncio.ensure_future(writer())
            await asyncio.sleep(1.0)
            # The kernel buffers some MiB and the transport up to its high-water mark;
            # after that, write() must block.
            assert sent < 100, sent
            assert comm.pending_output < 64 * 2**20
            release.set()
            await asyncio.wait_for(task, 30)
            assert sent == 200
            await comm.close()

    run(main())


def test_unknown_scheme_and_bad_address():
    from taskcore.errors import AddressError

    async def main():
        with pytest.raises(AddressError, match="unknown transport scheme"):
            await connect("carrier-pigeon://x:1")
        with pytest.raises(AddressError):
            await connect("tcp://127.0.0.1:notaport")

    run(main())
