"""StreamProtocol.write_now: a thread other than the loop's writes one message to the
socket itself (a sync client's submit, just before it blocks on the result). It must
never reorder, interleave or lose bytes against the loop's own writes."""
import asyncio

import pytest

from taskcore.security import Security
from taskcore.testing import run
from taskcore.transports import connect, listen


async def _pair(scheme="tcp", **opts):
    """A connected (client comm, server comm) pair."""
    accepted = asyncio.get_running_loop().create_future()

    async def handler(comm):
        accepted.set_result(comm)
        await comm.lost

    listener = await listen(f"{scheme}://127.0.0.1:0", handler, **opts)
    comm = await connect(listener.contact_address, **opts)
    comm.allow_write_now()
    return listener, comm, await accepted


def _in_thread(fn, *args):
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_messages_from_another_thread_arrive_in_order():
    async def main():
        listener, comm, server = await _pair()
        async with listener:
            def writer():
                return [comm.send_now({"i": i}) for i in range(200)]

            assert all(await _in_thread(writer))
            assert comm.direct_writes == 200
            assert [await server.read() for _ in range(200)] == [{"i": i} for i in range(200)]
            comm.send({"i": "loop"})                  # the loop's own writes carry on
            assert await server.read() == {"i": "loop"}
            await comm.close()

    run(main())


def test_refused_while_the_loop_has_output_queued():
    async def main():
        listener, comm, server = await _pair()
        async with listener:
            comm.send({"first": 1})                   # queued, flushed later this tick
            assert comm.send_now({"second": 2}) is False
            assert await server.read() == {"first": 1}
            assert comm.send_now({"third": 3}) is True
            assert await server.read() == {"third": 3}
            big = {"blob": b"x" * 100_000}            # over write_now's size limit
            assert comm.send_now(big) is False
            await comm.close()

    run(main())


def test_a_full_socket_leaves_the_rest_to_the_loop():
    """The reader stops reading until the kernel's buffers fill: a write_now that the
    socket takes only in part leaves the rest to the loop thread, which writes it
    before anything else; every byte arrives, in order."""
    async def main():
        listener, comm, server = await _pair()
        async with listener:
            server.transport.pause_reading()
            payload = b"p" * 7000

            def writer():
                n = 0
                while comm.send_now({"i": n, "p": payload}):
                    n += 1
                    if n > 20_000:                     # pragma: no cover - buffers never fill
                        raise AssertionError("the socket never filled")
                return n

            n = await _in_thread(writer)
            assert n > 0
            comm.send({"i": "after"})                 # queued behind the unwritten rest
            server.transport.resume_reading()
            got = [await server.read() for _ in range(n)]
            assert [m["i"] for m in got] == list(range(n))
            assert all(m["p"] == payload for m in got)
            assert await server.read() == {"i": "after"}
            await comm.close()

    run(main())


def test_tls_comms_do_not_write_around_their_transport():
    sec = Security.temporary()

    async def main():
        listener, comm, server = await _pair("tls", security=sec)
        async with listener:
            assert comm.send_now({"x": 1}) is False
            comm.send({"x": 2})
            assert await server.read() == {"x": 2}
            await comm.close()

    run(main())


def test_only_comms_that_ask_write_now():
    async def main():
        listener, comm, server = await _pair()
        async with listener:
            assert server.send_now({"x": 1}) is False     # never asked
            server.send({"x": 2})
            assert await comm.read() == {"x": 2}
            await comm.close()

    run(main())


def test_closed_comm_refuses():
    async def main():
        listener, comm, server = await _pair()
        async with listener:
            await comm.close()
            assert comm.send_now({"x": 1}) is False

    run(main())


@pytest.mark.parametrize("n", [1, 50])
def test_concurrent_threads_and_loop_writes_never_interleave(n):
    """Several threads write now while the loop writes too: each message arrives whole."""
    async def main():
        listener, comm, server = await _pair()
        async with listener:
            def writer(t):
                # Once a message had to go through the loop, the rest follow it
                # there (as a client's outbox keeps them behind it).
                via_loop = False
                for i in range(n):
                    m = {"t": t, "i": i, "p": b"q" * 3000}
                    if via_loop or not comm.send_now(m):
                        via_loop = True
                        comm.loop.call_soon_threadsafe(comm.send, m)
                return n

            counts = await asyncio.gather(*[_in_thread(writer, t) for t in range(4)])
            for i in range(n):
                comm.send({"t": "loop", "i": i, "p": b"q" * 3000})
            total = sum(counts) + n
            got = [await server.read() for _ in range(total)]
            assert all(m["p"] == b"q" * 3000 for m in got)
            for t in range(4):
                assert [m["i"] for m in got if m["t"] == t] == list(range(n))
            await comm.close()

    run(main())
