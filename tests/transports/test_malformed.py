"""Garbage on one connection closes that connection only; the listener keeps serving."""
import asyncio
import os
import struct
import time

import pytest

from taskcore.core.wire import encode
from taskcore.testing import IN_CI, echo_listener, run
from taskcore.transports import connect

import msgpack

HANDSHAKE_OK = msgpack.packb([{"op": "handshake", "protocol": 1, "role": "fuzz",
                               "compression": [], "pickle_protocol": 5, "token": None}])


def framed(*frames):
    return b"".join(bytes(x) for x in encode(list(frames)))


CORPUS = {
    "truncated header": struct.pack("<Q", 3)[:5],
    "zero frames": struct.pack("<Q", 0),
    "absurd frame count": struct.pack("<Q", 2**60),
    "absurd length": struct.pack("<QQ", 1, 2**60) + b"\0",
    "unknown compression flag": struct.pack("<QQ", 1, 3) + b"\x09" + b"abc",
    "garbage msgpack": framed(b"\xc1\xc1\xc1\xff"),
    "not a list": framed(msgpack.packb({"op": "handshake"})),
    "handshake not a dict": framed(msgpack.packb(["hello"])),
    "bad ext reference": framed(msgpack.packb([msgpack.ExtType(1, b"\x93\x05\x05\x05")])),
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "oversized handshake": struct.pack("<QQ", 1, 10**6) + b"\0" + b"a" * 100,
    "valid handshake then garbage": framed(HANDSHAKE_OK) + b"\xff" * 40,
    "valid handshake then bad flag": framed(HANDSHAKE_OK) + struct.pack("<QQ", 1, 1) + b"\x05" + b"a",
}


async def start_echo():
    return await echo_listener(handshake_timeout=2)


async def send_raw(address, blob, wait=0.2):
    host, port = address.replace("tcp://", "").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(blob)
    await writer.drain()
    writer.write_eof()  # an incomplete message must not leave the server waiting forever
    # The server must close the connection (or answer with a refusal) by itself.
    try:
        await asyncio.wait_for(reader.read(), 5)
    except asyncio.TimeoutError:
        pass
    writer.close()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_malformed_input_closes_only_that_comm(name):
    async def main():
        listener = await start_echo()
        good = await connect(listener.contact_address)
        await send_raw(listener.contact_address, CORPUS[name])
        # The established client is undisturbed ...
        await good.write({"still": "here"})
        assert await good.read() == {"still": "here"}
        # ... and new clients are still served.
        fresh = await connect(listener.contact_address)
        await fresh.write(1)
        assert await fresh.read() == 1
        await fresh.close()
        await good.close()
        await listener.stop()

    run(main())


def test_fuzz_decoder_and_handshake():
    """Bounded fuzz: random and mutated byte streams at a live listener (~60 s in CI)."""
    seconds = float(os.environ.get("TASKCORE_FUZZ_SECONDS", 60 if IN_CI else 5))
    seeds = list(CORPUS.values()) + [framed(HANDSHAKE_OK) + framed(msgpack.packb([1, 2]))]

    async def main():
        import random

        rng = random.Random(1234)
        listener = await start_echo()
        good = await connect(listener.contact_address)
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            blob = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(0, 8)):
                op = rng.random()
                if op < 0.4 and blob:
                    blob[rng.randrange(len(blob))] = rng.randrange(256)
                elif op < 0.7:
                    blob[rng.randint(0, len(blob)):rng.randint(0, len(blob))] = rng.randbytes(
                        rng.randint(0, 16))
                else:
                    blob += rng.randbytes(rng.randint(0, 64))
            await asyncio.wait_for(send_raw(listener.contact_address, bytes(blob)), 10)
            n += 1
            if n % 50 == 0:
                await good.write(n)
                assert await good.read() == n
        await good.write("end")
        assert await good.read() == "end"
        await good.close()
        await listener.stop()
        return n

    n = run(main(), timeout=seconds + 60)
    assert n > 10


def _messages(data):
    """The msgpack bodies of the wire messages in `data` (uncompressed, no buffers)."""
    out, pos = [], 0
    while pos < len(data):
        n, = struct.unpack_from("<Q", data, pos)
        lengths = struct.unpack_from(f"<{n}Q", data, pos + 8)
        pos += 8 + 9 * n
        out.append(msgpack.unpackb(data[pos:pos + lengths[0]]))
        pos += sum(lengths)
    return out


def test_a_peer_past_the_handshake_is_told_why_it_is_dropped():
    # A frame over the limit after the handshake: the listener's last message to this
    # peer says which limit, then the connection ends.
    async def main():
        lst = await start_echo()
        host, port = lst.contact_address.replace("tcp://", "").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(framed(HANDSHAKE_OK))
        hello = await asyncio.wait_for(reader.read(65536), 5)     # the handshake reply
        writer.write(struct.pack("<QQ", 1, 2**60) + b"\0")
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)           # to EOF: it closes
        writer.close()
        await lst.stop()
        return hello, rest

    hello, rest = run(main())
    assert _messages(hello)[0][0]["op"] == "handshake"
    (last,) = _messages(rest)
    assert last[0]["op"] == "protocol-error"
    assert "max_frame_size" in last[0]["reason"] and "frame 0 declares" in last[0]["reason"]
