"""Fuzzing a live listener's handshake over raw sockets (hypothesis, fixed budget).

One real listener (`taskcore.transports.listen` on tcp://127.0.0.1:0, with an auth
token, a short handshake timeout and a short stall timeout) runs on its own uvloop
thread for the whole test. Each example opens a raw socket and sends one of:
- arbitrary bytes, or bytes that look like another protocol (HTTP, TLS);
- a handshake with fuzzed fields (types, values, missing or extra keys, wrong token,
  wrong version), properly framed, sometimes followed by more messages, garbage or half
  a message;
- a valid handshake's bytes with flips, cuts and insertions;
in pieces, then leaves in one of four ways: half-close (EOF), close, reset (RST), or
stays connected. Then:
- the server has closed the connection (or, if the peer stays, has closed it within its
  timeouts, or has accepted a handshake that was acceptable: a connection is never left
  neither refused nor served);
- the listener's `comms` set drains back to empty, and no task of the listener's loop
  died with an unhandled exception;
- a well-behaved client still connects, completes the handshake and is echoed.
At the end the listener's process holds no more open files than before.
"""
import asyncio
import os
import socket
import struct
import threading
import time

import msgpack
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskcore.core.serialize import dumps, loads
from taskcore.core.wire import FrameDecoder, encode
from taskcore.errors import ProtocolError
from taskcore.testing import echo_listener, wait_until
from taskcore.transports import PROTOCOL_VERSION, connect
from taskcore.transports.policy import ConnectionPolicy

EXAMPLES = int(os.environ.get("TASKCORE_HANDSHAKE_FUZZ_EXAMPLES", "400"))
TOKEN = "fuzz-token-0123456789"
HANDSHAKE_TIMEOUT = 0.3
STALL_TIMEOUT = 0.4
PEER_WAIT = 3.0          # how long a peer that stays waits for the server to act

fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------------ the listener

class Server:
    """A token-protected echo listener on its own uvloop thread."""

    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.errors = []
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(
            f"{ctx.get('message')}: {ctx.get('exception')!r}"))
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-listener",
                                       daemon=True)
        self.thread.start()
        self.listener = self.call(self._start())
        self.address = self.listener.contact_address
        host, port = self.address.replace("tcp://", "").rsplit(":", 1)
        self.host_port = (host, int(port))

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self):
        policy = ConnectionPolicy(handshake_timeout=HANDSHAKE_TIMEOUT,
                                  stall_timeout=STALL_TIMEOUT)
        return await echo_listener(token=TOKEN, policy=policy)

    async def _good_client(self, payload):
        comm = await connect(self.address, timeout=5, token=TOKEN)
        try:
            await comm.write(payload)
            return await asyncio.wait_for(comm.read(), 5)
        finally:
            await comm.close()

    def check_good_client(self, i):
        payload = {"i": i, "t": (1, "x"), "b": b"\x00" * 10}
        assert self.call(self._good_client(payload), 15) == payload

    def open_comms(self):
        return list(self.listener.comms)

    def close(self):
        self.call(self.listener.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ------------------------------------------------------------------------------ inputs

def frame(*frames):
    return b"".join(bytes(x) for x in encode(list(frames)))


def batch(*msgs):
    """The wire bytes of one message carrying `msgs`, as a taskcore comm sends it."""
    return frame(*dumps(list(msgs)))


def valid_handshake(**changes):
    hs = {"op": "handshake", "protocol": PROTOCOL_VERSION, "role": "fuzz", "compression": [],
          "pickle_protocol": 5, "token": TOKEN}
    hs.update(changes)
    return hs


VALID = batch(valid_handshake())

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=30) | st.binary(max_size=30))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
FIELDS = ["op", "protocol", "role", "compression", "pickle_protocol", "token"]


@st.composite
def fuzzed_handshakes(draw):
    hs = valid_handshake()
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        action = draw(st.sampled_from(["value", "value", "drop"]))
        if action == "drop":
            del hs[field]
        else:
            hs[field] = draw(st.sampled_from([None, "handshake", PROTOCOL_VERSION, TOKEN,
                                              TOKEN + "x", "", ["lz4"]]) | values)
    for _ in range(draw(st.integers(0, 2))):
        hs[draw(st.text(max_size=10))] = draw(values)
    shape = draw(st.sampled_from(["batch", "batch", "bare", "msgpack", "msgpack-bare",
                                  "two"]))
    if shape == "batch":
        return batch(hs)
    if shape == "bare":
        return frame(*dumps(hs))
    if shape == "msgpack":
        return frame(msgpack.packb([hs], use_bin_type=True))
    if shape == "msgpack-bare":
        return frame(msgpack.packb(hs, use_bin_type=True))
    return batch(hs, valid_handshake())


@st.composite
def mutated_valid(draw):
    blob = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        j = draw(st.integers(0, len(blob) - 1))
        op = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            blob[j] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            blob[j] = draw(st.sampled_from([0, 1, 0x7f, 0x80, 0xc1, 0xff]))
        elif op == "cut":
            del blob[j:j + draw(st.integers(1, 40))]
        else:
            blob[j:j] = draw(st.binary(min_size=1, max_size=12))
    return bytes(blob)


followups = st.sampled_from([
    b"",
    batch({"op": "echo", "x": 1}),
    batch({"op": "echo", "x": 1}) + batch([1, 2, 3]),
    struct.pack("<QQ", 1, 4 * 1024 ** 3) + b"\0" + b"x" * 10,     # half of a huge message
    struct.pack("<Q", 3)[:5],                                       # half of a header
    b"\xff" * 40,
    struct.pack("<QQ", 1, 1) + b"\x09" + b"a",                      # unknown compression flag
    frame(b"\xc1\xc1"),                                              # not msgpack
    frame(msgpack.packb({"not": "a list"})),
]) | st.binary(max_size=64)

foreign = st.sampled_from([
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40,     # a TLS ClientHello
    b"", b"\x00" * 8, struct.pack("<Q", 2**63), struct.pack("<QQ", 1, 2**62) + b"\0",
])

blobs = st.one_of(
    st.binary(max_size=300),
    foreign,
    st.tuples(fuzzed_handshakes(), followups).map(lambda t: t[0] + t[1]),
    st.tuples(mutated_valid(), followups).map(lambda t: t[0] + t[1]),
    followups.map(lambda f: VALID + f),
)
modes = st.sampled_from(["eof", "eof", "close", "reset", "stay"])
cuts = st.lists(st.integers(1, 64), max_size=6)


# ----------------------------------------------------------------------------- a peer

def read_until_closed(sock, seconds, until=None):
    """(bytes received, closed by the server?) within `seconds`, or as soon as
    `until(bytes received)` is true."""
    sock.settimeout(0.05)
    got = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return bytes(got), True
        if not chunk:
            return bytes(got), True
        got += chunk
        if until is not None and until(bytes(got)):
            break
    return bytes(got), False


def server_said(data):
    """The messages the server sent, as far as they decode."""
    out = []
    try:
        for frames, _ in FrameDecoder().feed(data):
            out.extend(loads(frames))
    except ProtocolError:
        pass
    return out


def accepted(data):
    return any(isinstance(m, dict) and m.get("op") == "handshake" for m in server_said(data))


def play(server, blob, pieces, mode):
    sock = socket.create_connection(server.host_port, timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        pos = 0
        for n in list(pieces) + [len(blob)]:
            if pos >= len(blob):
                break
            try:
                sock.sendall(blob[pos:pos + n])
            except (ConnectionResetError, BrokenPipeError):
                break                                    # the server already hung up: fine
            pos += n
        if mode == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if mode == "close":
            return
        if mode == "eof":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            data, closed = read_until_closed(sock, 10)
            assert closed, f"the server kept a half-closed connection open for 10 s " \
                           f"(it sent {server_said(data)})"
            return
        # "stay": the server must act by itself: refuse and close, or accept (answer with
        # its handshake); a connection it does neither is a connection lost to it.
        data, closed = read_until_closed(sock, PEER_WAIT, until=accepted)
        assert closed or accepted(data), (
            f"a connection was neither refused nor served: after {PEER_WAIT} s the server "
            f"had closed nothing and said {server_said(data)!r}")
    finally:
        sock.close()


# ------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def _fds():
    return len(os.listdir("/proc/self/fd"))


def test_handshake_fuzz_listener_survives(server):
    fds_before = _fds()
    counter = [0]

    @fuzz
    @given(blobs, cuts, modes)
    def one(blob, pieces, mode):
        counter[0] += 1
        server.errors.clear()
        play(server, blob, pieces, mode)
        wait_until(lambda: not server.open_comms(), timeout=10,
                   message=f"the listener to drop the connection ({server.open_comms()})")
        server.check_good_client(counter[0])
        wait_until(lambda: not server.open_comms(), timeout=10,
                   message="the listener to drop the good client's connection")
        server.call(asyncio.sleep(0.01))          # let the loop report a task that died
        assert not server.errors, f"the listener's loop reported: {server.errors}"

    one()
    assert counter[0] >= min(EXAMPLES, 50)
    # Every connection's socket was closed: the process holds no more files than before.
    wait_until(lambda: _fds() <= fds_before, timeout=10,
               message=f"open files back to {fds_before} (now {_fds()})")


@pytest.mark.parametrize("compression", [5, True, 1.5])
def test_handshake_with_a_non_list_compression_field_is_refused(server, compression):
    """A handshake whose `compression` is not a list (and whose token is right) must be
    refused or served, not leave the connection hanging with a dead task."""
    server.errors.clear()
    play(server, batch(valid_handshake(compression=compression)), [], "stay")
    wait_until(lambda: not server.open_comms(), timeout=10, message="the connection dropped")
    server.call(asyncio.sleep(0.01))
    assert not server.errors, f"the listener's loop reported: {server.errors}"
