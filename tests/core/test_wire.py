"""Frame header encoding and the incremental decoder (no sockets)."""
import random
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import numpy as np

from taskcore.core.wire import (FrameDecoder, Limits, RecvBuffer, encode, encode_header,
                                recv_pool_stats, set_recv_pool_limit)
from taskcore.errors import ProtocolError

# Sizes come from hypothesis, contents from a cheap pattern: large random
# binaries would exhaust hypothesis's entropy budget without finding more bugs.
frame_st = st.builds(lambda n, seed: bytes((seed + i) % 251 for i in range(n)) if n < 400
                     else bytes([seed % 256]) * n,
                     st.integers(0, 300) | st.integers(70_000, 90_000), st.integers(0, 255))
frames_st = st.lists(frame_st, min_size=1, max_size=5)


def wire_bytes(messages, flags=None):
    return b"".join(b"".join(bytes(x) for x in encode(m, flags)) for m in messages)


def as_bytes(out):
    return [([bytes(f) for f in frames], flags) for frames, flags in out]


def test_header_layout():
    h = encode_header([b"abc", b""], [0, 1])
    assert h == struct.pack("<QQQ", 2, 3, 0) + bytes([0, 1])


@given(st.lists(frames_st, min_size=1, max_size=4), st.data())
def test_random_chunkings(messages, data):
    blob = wire_bytes(messages)
    dec = FrameDecoder()
    out = []
    pos = 0
    while pos < len(blob):
        n = data.draw(st.integers(1, max(1, len(blob) - pos)))
        out += dec.feed(blob[pos:pos + n])
        pos += n
    assert as_bytes(out) == [(m, None) for m in messages]
    assert dec.buffered == 0


def test_byte_by_byte():
    messages = [[b"x" * 10, b"y" * 100_000], [b""], [b"z"]]
    blob = wire_bytes(messages)
    dec = FrameDecoder()
    out = []
    for i in range(len(blob)):
        out += dec.feed(blob[i:i + 1])
    assert as_bytes(out) == [(m, None) for m in messages]


def test_many_messages_in_one_read():
    messages = [[str(i).encode()] for i in range(5000)]
    dec = FrameDecoder()
    assert as_bytes(dec.feed(wire_bytes(messages))) == [(m, None) for m in messages]


def test_large_frame_read_in_place():
    """A big frame gets one final-size buffer; get_buffer returns views into it."""
    big = bytes(range(256)) * 4096  # 1 MiB
    blob = wire_bytes([[b"head", big]])
    dec = FrameDecoder()
    first = len(blob) - len(big) + 1000
    assert dec.feed(blob[:first]) == []
    buf = dec.get_buffer(-1)
    assert len(buf) == len(big) - 1000  # exactly the rest of that frame
    buf[:] = blob[first:]
    (frames, flags), = dec.buffer_updated(len(buf))
    assert isinstance(frames[1], RecvBuffer) and bytes(memoryview(frames[1])) == big


def test_large_frame_buffers_are_recycled():
    """Memory of a released large frame is reused by the next one (already faulted in)."""
    # An empty pool: blocks earlier tests left in it would be taken first, and a full one
    # would not keep this test's block.
    limit = recv_pool_stats()["limit"]
    set_recv_pool_limit(0)
    set_recv_pool_limit(limit)
    big = b"z" * (3 << 20)
    blob = wire_bytes([[big]])
    (frames, _), = FrameDecoder().feed(blob)
    first = memoryview(frames[0])
    addr = np.frombuffer(first, dtype="u1").ctypes.data
    first.release()
    del frames
    before = recv_pool_stats()["free_blocks"]
    assert before >= 1
    (frames, _), = FrameDecoder().feed(blob)
    again = np.frombuffer(memoryview(frames[0]), dtype="u1")
    assert again.ctypes.data == addr and bytes(again[:3]) == b"zzz"
    assert recv_pool_stats()["free_blocks"] == before - 1


def test_small_frames_are_plain_bytes():
    (frames, _), = FrameDecoder().feed(wire_bytes([[b"a" * 100, b"b" * 100_000]]))
    assert type(frames[0]) is bytes and type(frames[1]) in (bytes, bytearray)


def test_flags_reported():
    dec = FrameDecoder()
    (frames, flags), = dec.feed(wire_bytes([[b"a", b"b"]], flags=[0, 1]))
    assert flags == [0, 1]


@pytest.mark.parametrize("blob, match", [
    (struct.pack("<Q", 0), "0 frames"),
    (struct.pack("<Q", 10**9), "above the limit"),
    (struct.pack("<QQ", 1, 2**62) + b"\0", "max_frame_size"),
    (struct.pack("<QQQ", 2, 2**30, 2**30) + b"\0\0", "max_message_size"),
    (struct.pack("<QQ", 1, 1) + b"\x07" + b"a", "unknown compression flag 7"),
])
def test_malformed_headers(blob, match):
    dec = FrameDecoder(Limits(max_frames=100, max_frame_size=2**31, max_message_size=2**30 + 5))
    with pytest.raises(ProtocolError, match=match):
        dec.feed(blob)
    with pytest.raises(ProtocolError):
        dec.get_buffer(-1)  # broken decoders stay broken


def test_limits_checked_before_allocation():
    # A header claiming 1 TiB must fail before anything is allocated.
    dec = FrameDecoder(Limits(max_frame_size=2**20))
    with pytest.raises(ProtocolError):
        dec.feed(struct.pack("<QQ", 1, 2**40) + b"\0")


def test_decoder_random_garbage_never_crashes():
    rng = random.Random(0)
    for _ in range(2000):
        dec = FrameDecoder(Limits(max_frames=64, max_frame_size=1 << 20, max_message_size=1 << 21))
        blob = rng.randbytes(rng.randint(0, 200))
        try:
            dec.feed(blob)
        except ProtocolError:
            pass
