"""Fuzzing the frame decoder (core/wire.pyx) and the deserializer (core/serialize.pyx).

Every example runs in a forked helper process (`isolated`), so that a segfault, an
abort or a hang is reported as a failing example that hypothesis shrinks, instead of
taking the test run down with it: the helper reports each outcome through a pipe; when
it dies or stops answering, that example failed, and a new helper is forked. Budgets
are fixed (EXAMPLES per test, derandomized; TASKCORE_WIRE_FUZZ_EXAMPLES overrides),
whatever the hypothesis profile, so CI time does not drift (~15 s for the file).

- Arbitrary bytes, split at arbitrary points and fed the way a transport does
  (get_buffer, a partial fill, buffer_updated), never do anything but complete
  messages within the limits or raise ProtocolError, after which the decoder stays
  broken.
- Valid streams, including messages exactly at the limits and the handshake's strict
  limits switching to the connection's, round-trip under any split.
- Declared sizes over a limit are refused from the header alone, before anything is
  allocated (neither Python allocations, traced, nor mappings: the process's virtual
  size is watched).
- `loads`, and the whole receive path (decode, decompress, loads), given mutated valid
  frames, raise ProtocolError and nothing else, and never crash or hang.
"""
import faulthandler
import os
import pickle
import select
import signal
import struct
import time
import traceback

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskcore.core.serialize import (Serialize, compress_frames, decompress_frames, dumps,
                                     loads, serialize_obj)
from taskcore.core.wire import FrameDecoder, Limits, encode
from taskcore.errors import ProtocolError

EXAMPLES = int(os.environ.get("TASKCORE_WIRE_FUZZ_EXAMPLES", "600"))
CHILD_TIMEOUT = 20.0

fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------ crash isolation

class _Sandbox:
    """A forked helper process that runs examples one by one: a crash or a hang kills only
    it (it is forked again for the next example), and is reported as that example's
    outcome. Forking once, not per example, keeps an example at a pipe round trip."""

    def __init__(self):
        self.pid = None

    def _fork(self):
        to_child, from_parent = os.pipe()[::-1]
        from_child, to_parent = os.pipe()
        pid = os.fork()
        if pid == 0:                                        # the helper: never returns
            code = 0
            faulthandler.disable()     # a crash here is a result, reported by the parent
            try:
                os.close(to_child)
                os.close(from_child)
                while True:
                    request = _read_msg(from_parent)
                    if request is None:
                        break
                    fn, args = request
                    try:
                        out = ("ok", fn(*args))
                    except BaseException as e:           # noqa: B036 - reported, not handled
                        out = ("raised", type(e).__name__, str(e)[:2000],
                               "".join(traceback.format_exception(e))[-4000:])
                    _write_msg(to_parent, out)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(from_parent)
        os.close(to_parent)
        self.pid, self.to_child, self.from_child = pid, to_child, from_child

    def _reap(self, kill):
        if kill:
            os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.to_child)
        os.close(self.from_child)
        self.pid = None
        return status

    def run(self, fn, args, timeout):
        if self.pid is None:
            self._fork()
        try:
            _write_msg(self.to_child, (fn, args))
        except BrokenPipeError:
            status = self._reap(kill=False)
            return ("raised", "HelperGone", f"status {status}", "")
        out = _read_msg(self.from_child, timeout)
        if out == "timeout":
            self._reap(kill=True)
            return ("hang", timeout)
        if out is None:                                     # it died on this example
            status = self._reap(kill=False)
            if os.WIFSIGNALED(status):
                return ("signal", signal.Signals(os.WTERMSIG(status)).name)
            return ("raised", "HelperExited", f"exit status {os.waitstatus_to_exitcode(status)}",
                    "")
        return out

    def close(self):
        if self.pid is not None:
            self._reap(kill=True)


def _write_msg(fd, obj):
    data = pickle.dumps(obj)
    data = struct.pack("<Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd, n, deadline):
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "timeout"
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _read_msg(fd, timeout=None):
    deadline = None if timeout is None else time.monotonic() + timeout
    head = _read_exact(fd, 8, deadline)
    if head is None or head == "timeout":
        return head
    body = _read_exact(fd, struct.unpack("<Q", head)[0], deadline)
    if body is None or body == "timeout":
        return body
    return pickle.loads(body)


_SANDBOX = _Sandbox()


@pytest.fixture(scope="module", autouse=True)
def _sandbox_closed():
    yield
    _SANDBOX.close()


def isolated(fn, *args, timeout=CHILD_TIMEOUT):
    """Run fn(*args) (a module-level function) in the sandbox process. Returns
    ("ok", value), ("raised", exception type name, message, traceback text),
    ("signal", name) or ("hang", seconds)."""
    return _SANDBOX.run(fn, args, timeout)


def assert_ok(outcome):
    assert outcome[0] == "ok", describe(outcome)
    return outcome[1]


def describe(outcome):
    if outcome[0] == "raised":
        return f"raised {outcome[1]}: {outcome[2]}\n{outcome[3]}"
    return " ".join(map(str, outcome))


# ------------------------------------------------------------------------------- feeding

def feed_like_a_transport(dec, blob, cuts, fills):
    """Feed `blob` in the pieces `cuts` says, through get_buffer/buffer_updated, each
    read filling a `fills` fraction of what it was offered (at least one byte)."""
    out = []
    pos, i = 0, 0
    for size in list(cuts) + [len(blob)]:
        end = min(len(blob), pos + max(1, size))
        while pos < end:
            buf = dec.get_buffer(-1)
            assert len(buf) > 0, "get_buffer offered an empty buffer"
            frac = fills[i % len(fills)] if fills else 1.0
            i += 1
            k = max(1, min(end - pos, int(len(buf) * frac) or 1, len(buf)))
            buf[:k] = blob[pos:pos + k]
            del buf
            pos += k
            out.extend(dec.buffer_updated(k))
        if pos >= len(blob):
            break
    return out


def check_message(frames, flags, limits):
    assert 1 <= len(frames) <= limits.max_frames
    sizes = [memoryview(f).nbytes for f in frames]
    assert all(s <= limits.max_frame_size for s in sizes), sizes
    assert sum(sizes) <= limits.max_message_size
    assert flags is None or (len(flags) == len(frames) and set(flags) <= {0, 1}), flags


def wire(messages, flags=None):
    return b"".join(b"".join(bytes(x) for x in encode(list(m), f))
                    for m, f in zip(messages, flags or [None] * len(messages)))


# --------------------------------------------------------------------------- strategies

BIG = [2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]

limits_st = st.builds(   # mostly roomy (sampled_from favours the first), sometimes tight
    Limits,
    max_frames=st.sampled_from([1000, 64, 16, 3, 2, 1]),
    max_frame_size=st.sampled_from([1 << 32, 1 << 20, 65536, 4096, 100, 40, 8, 1, 0]),
    max_message_size=st.sampled_from([1 << 33, 1 << 20, 8192, 200, 41, 9, 1, 0]))
decoder_shape_st = st.tuples(st.sampled_from([256 * 1024, 16384, 1000, 100, 64]),   # scratch
                             st.sampled_from([65536, 4096, 100, 9, 1]))             # direct
cuts_st = st.lists(st.integers(1, 300), max_size=12)
fills_st = st.lists(st.sampled_from([1.0, 0.5, 0.1, 0.0]), max_size=6)


def weighted(usual, rare, one_in):
    """`rare` about once in `one_in` draws, else `usual` (and shrinking towards usual)."""
    return st.tuples(st.sampled_from([False] * (one_in - 1) + [True]), usual, rare).map(
        lambda t: t[2] if t[0] else t[1])


@st.composite
def plausible_message(draw):
    """A header that often passes the checks (small counts and lengths, sometimes odd
    ones), then a body that may be complete, short or too long."""
    n = draw(weighted(st.integers(1, 4), st.sampled_from([0, 5, 17, 70, 1000, 2**32, 2**63]),
                      5))
    shown = min(n, 40)
    odd = st.sampled_from([65535, 65536, 65537, 1 << 20, (1 << 20) + 1] + BIG)
    lengths = draw(st.lists(weighted(st.integers(0, 40), odd, 9), min_size=shown,
                            max_size=shown))
    flags = draw(st.lists(st.sampled_from([0] * 6 + [1] * 3 + [2, 255]), min_size=shown,
                          max_size=shown))
    need = sum(x for x in lengths if x <= 40)
    body = draw(st.binary(min_size=need, max_size=need + 8)
                | st.binary(min_size=max(0, need - 8), max_size=need))
    head = struct.pack("<Q", n) + b"".join(struct.pack("<Q", x) for x in lengths)
    return head + bytes(flags) + body


garbage_st = (st.binary(max_size=600)
              | st.lists(plausible_message(), min_size=1, max_size=4).map(b"".join)
              | st.tuples(st.lists(plausible_message(), max_size=3).map(b"".join),
                          st.binary(max_size=100)).map(b"".join))


# ----------------------------------------------------------------- 1. arbitrary input

def _decode_garbage(blob, limits, shape, cuts, fills, next_limits):
    lim = Limits(*limits)
    nxt = Limits(*next_limits) if next_limits else None
    dec = FrameDecoder(lim, scratch_size=shape[0], direct_threshold=shape[1], next_limits=nxt)
    try:
        out = feed_like_a_transport(dec, blob, cuts, fills)
    except ProtocolError:
        try:
            dec.get_buffer(-1)
        except ProtocolError:
            return "refused"
        raise AssertionError("a decoder that raised ProtocolError accepts more input")
    assert 0 <= dec.buffered <= len(blob)
    for i, (frames, flags) in enumerate(out):
        check_message(frames, flags, lim if i == 0 or nxt is None else nxt)
    return f"{len(out)} messages"


def _limits_tuple(lim):
    return (lim.max_frames, lim.max_frame_size, lim.max_message_size)


@fuzz
@given(garbage_st, limits_st, decoder_shape_st, cuts_st, fills_st,
       st.none() | limits_st)
def test_arbitrary_bytes_only_ever_raise_protocol_error(blob, limits, shape, cuts, fills,
                                                       next_limits):
    outcome = isolated(_decode_garbage, blob, _limits_tuple(limits), shape, cuts, fills,
                       _limits_tuple(next_limits) if next_limits else None)
    assert_ok(outcome)


# -------------------------------------------------------------- 2. valid streams round-trip

SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 99, 100, 101, 4095, 4096, 4097, 16383, 16384, 16385,
         65535, 65536, 65537, 200_000]
frame_st = st.builds(lambda n, seed: bytes([seed]) * n if n > 512 else
                     bytes((seed + i) % 256 for i in range(n)),
                     st.sampled_from(SIZES) | st.integers(0, 600), st.integers(0, 255))
message_st = st.lists(frame_st, min_size=1, max_size=6)


@st.composite
def streams(draw):
    messages = draw(st.lists(message_st, min_size=1, max_size=5))
    flags = [draw(st.none() | st.lists(st.integers(0, 1), min_size=len(m), max_size=len(m)))
             for m in messages]
    return messages, flags


def _exact(messages):
    """The tightest limits these messages fit in."""
    return (max(len(m) for m in messages), max(len(f) for m in messages for f in m),
            max(sum(len(f) for f in m) for m in messages))


def _roundtrip(messages, flags, shape, cuts, fills, tight, handshake):
    if handshake:
        # The handshake's strict limits fit the first message exactly; the rest of the
        # stream is read under the connection's (here: exactly fitting too, or loose).
        first = Limits(*_exact(messages[:1]))
        rest = Limits(*_exact(messages[1:])) if tight and len(messages) > 1 else Limits()
        dec = FrameDecoder(first, scratch_size=shape[0], direct_threshold=shape[1],
                           next_limits=rest)
    else:
        lim = Limits(*_exact(messages)) if tight else Limits()
        dec = FrameDecoder(lim, scratch_size=shape[0], direct_threshold=shape[1])
    out = feed_like_a_transport(dec, wire(messages, flags), cuts, fills)
    got = [([bytes(memoryview(f)) for f in frames], fl) for frames, fl in out]
    want = [(m, f if f is not None and any(f) else None) for m, f in zip(messages, flags)]
    assert got == want, "stream did not round-trip"
    assert dec.buffered == 0
    return len(got)


@fuzz
@given(streams(), decoder_shape_st, cuts_st, fills_st, st.booleans(), st.booleans())
def test_valid_streams_roundtrip_under_any_split(stream, shape, cuts, fills, tight, handshake):
    messages, flags = stream
    assert assert_ok(isolated(_roundtrip, messages, flags, shape, cuts, fills, tight,
                              handshake)) == len(messages)


def test_large_frames_roundtrip_byte_ranges():
    """The pooled (>= 1 MiB) and growing (>= 64 MiB) receive buffers, read in odd pieces."""
    big = np.arange((65 << 20) // 8, dtype="u8").tobytes()          # 65 MiB, grows by mremap
    mid = bytes(range(256)) * 4100                                   # ~1 MiB, pooled
    messages = [[b"head", mid, b""], [big], [b"tail"]]
    cuts = [3, 100_000, 7, 1 << 20, (64 << 20) - 5, 13]
    assert assert_ok(isolated(_roundtrip, messages, [None, None, [1]], (256 * 1024, 65536),
                              cuts, [1.0, 0.3], False, False, timeout=120)) == 3


# ------------------------------------------------- 3. over-limit sizes, refused before allocation

def _vm_size():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _refuse_oversized(header, limits, shape, cuts):
    import tracemalloc

    lim = Limits(*limits)
    dec = FrameDecoder(lim, scratch_size=shape[0], direct_threshold=shape[1])
    vm0 = _vm_size()
    tracemalloc.start()
    try:
        try:
            feed_like_a_transport(dec, header, cuts, [1.0])
        except ProtocolError as e:
            why = str(e)
        else:
            raise AssertionError(f"header accepted under {lim}: {dec.buffered} bytes buffered")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grew = _vm_size() - vm0
    return why, peak, grew


@st.composite
def oversized_headers(draw):
    """(header bytes, limits, the limit it breaks): exactly one limit is exceeded."""
    max_frames = draw(st.sampled_from([1, 4, 16]))
    max_frame = draw(st.sampled_from([1000, 65536, 1 << 20]))
    max_msg = draw(st.sampled_from([max_frame, 2 * max_frame, 16 * max_frame]))
    kind = draw(st.sampled_from(["max_frames", "max_frame_size", "max_message_size"]))
    if kind == "max_frames":
        n = draw(st.sampled_from([max_frames + 1, 2**20, 2**32, 2**63, 2**64 - 1]))
        return struct.pack("<Q", n) + b"\0" * 64, (max_frames, max_frame, max_msg), kind
    if kind == "max_frame_size":
        n = draw(st.integers(1, max_frames))
        bad = draw(st.integers(0, n - 1))
        size = draw(st.sampled_from([max_frame + 1, 4 * max_frame, 2**40] + BIG[-4:]))
        lengths = [size if i == bad else draw(st.integers(0, min(max_frame, max_msg // n)))
                   for i in range(n)]
    else:
        # Every frame within max_frame_size, enough of them to pass max_message_size.
        least = max_msg // max_frame + 1
        n = draw(st.integers(least, least + 3))
        max_frames = max(max_frames, n)
        lengths = [max_frame] * n
    head = struct.pack("<Q", n) + b"".join(struct.pack("<Q", x) for x in lengths) + b"\0" * n
    return head, (max_frames, max_frame, max_msg), kind


@fuzz
@given(oversized_headers(), decoder_shape_st, cuts_st)
def test_oversized_declarations_refused_before_allocation(case, shape, cuts):
    header, limits, kind = case
    why, peak, grew = assert_ok(isolated(_refuse_oversized, header, limits, shape, cuts))
    assert kind in why, f"refused for another reason than {kind}: {why}"
    # Nothing of the declared size was allocated: Python allocations stay at the
    # scratch's size, and no large mapping appeared (a 64 MiB receive mapping would).
    assert peak < 512 * 1024, f"{peak} bytes allocated while refusing {kind}"
    assert grew < 16 << 20, f"virtual size grew {grew} bytes while refusing {kind}"


def _huge_max_frames(n):
    dec = FrameDecoder(Limits(max_frames=2**62, max_frame_size=1 << 20,
                              max_message_size=1 << 20))
    try:
        out = dec.feed(struct.pack("<Q", n) + b"\0" * 56)
    except ProtocolError as e:
        return f"ProtocolError: {e}"
    return f"{len(out)} messages, {dec.buffered} bytes buffered"


@pytest.mark.parametrize("nframes", [2**60, 2**60 + 12_345])
def test_limits_too_large_for_the_header_arithmetic_are_safe(nframes):
    """`8 + 9 * nframes` (the header's size) must not overflow: either Limits refuses a
    max_frames that large, or a peer declaring that many frames is refused (or waited
    for) without reading past what it sent."""
    try:
        Limits(max_frames=2**62, max_frame_size=1 << 20, max_message_size=1 << 20)
    except ValueError:
        return                                           # refused at configuration: fine
    result = assert_ok(isolated(_huge_max_frames, nframes))
    # 64 bytes were sent: a header of that many frames cannot be complete, so nothing may
    # be parsed out of it (a message, or a "frame ... declares" complaint about a length
    # read from memory past those 64 bytes).
    assert "declares" not in result or "frames, above" in result, result
    assert result.startswith("0 messages, 64 bytes") or "ProtocolError" in result, result


# ------------------------------------------------------------- 4. loads on mutated frames

def _corpus():
    arr = np.arange(4096, dtype="<f8")
    return [
        {"op": "compute-task", "key": ("x-1", 0, 3), "priority": (0, 1, -5),
         "who_has": {"y": ["tcp://1.2.3.4:5"]}, "nbytes": {"y": 123}},
        [{"op": "task-finished", "key": "k", "nbytes": 8, "type": b"int"}, None, 1.5, True],
        {"data": Serialize(b"0123456789" * 30), "ba": Serialize(bytearray(b"z" * 3000))},
        {"array": arr, "view": arr[::2], "f": np.asfortranarray(arr.reshape(64, 64))},
        {"s": serialize_obj({"a": (1, 2), "b": [b"c"]}), "t": serialize_obj(arr)},
        {"e": ValueError("boom"), "set": {1, 2, 3}, "deep": ((((1,),),),)},
        {"mv": Serialize(memoryview(np.arange(100, dtype="i4")).cast("B").cast("i", (10, 10)))},
        [("tuple", 1, None, 2.5, b"b", "s")] * 3,
        {"big": b"q" * 20_000, "text": "ü" * 500},
    ]


CORPUS = [dumps(m) for m in _corpus()]


@st.composite
def mutated_frames(draw):
    frames = [bytearray(bytes(memoryview(f).cast("B"))) for f in draw(st.sampled_from(CORPUS))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "set", "truncate", "extend", "drop",
                                   "duplicate", "swap", "splice"]))
        i = draw(st.integers(0, len(frames) - 1))
        f = frames[i]
        if op in ("flip", "set") and f:
            j = draw(st.integers(0, len(f) - 1))
            f[j] = (f[j] ^ (1 << draw(st.integers(0, 7)))) if op == "flip" else \
                draw(st.sampled_from([0, 1, 0x7f, 0x80, 0xc1, 0xd4, 0xc7, 0xff]))
        elif op == "truncate":
            del f[draw(st.integers(0, len(f))):]
        elif op == "extend":
            f += draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and len(frames) > 1:
            frames.pop(i)
        elif op == "duplicate":
            frames.insert(i, bytearray(f))
        elif op == "swap" and len(frames) > 1:
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "splice" and f:
            j = draw(st.integers(0, len(f)))
            f[j:j] = draw(st.binary(min_size=1, max_size=8))
    kind = draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
    return kind, [bytes(f) for f in frames]


def _loads_only_protocol_errors(kind, frames):
    """loads(frames), the frames as the given type (a comm delivers bytes or bytearrays,
    a spilled or forwarded value may come as memoryviews)."""
    make = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind]
    try:
        loads([make(f) for f in frames])
    except ProtocolError:
        return "refused"
    return "accepted"


@fuzz
@given(mutated_frames())
def test_loads_mutated_frames_raise_only_protocol_error(case):
    kind, frames = case
    assert_ok(isolated(_loads_only_protocol_errors, kind, frames))


def _receive_path(blob):
    """What StreamProtocol does with bytes from a peer: decode, decompress, loads."""
    dec = FrameDecoder(Limits(max_frames=64, max_frame_size=1 << 20, max_message_size=1 << 21))
    n = 0
    try:
        for frames, flags in dec.feed(blob):
            if flags is not None:
                frames = decompress_frames(frames, flags, 1 << 20)
            loads(frames)
            n += 1
    except ProtocolError:
        return "refused"
    return f"{n} messages"


@st.composite
def mutated_wire(draw):
    msgs = draw(st.lists(st.sampled_from(_corpus()), min_size=1, max_size=3))
    blob = bytearray()
    for m in msgs:
        frames, flags = compress_frames(dumps(m), min_size=1000)
        blob += b"".join(bytes(memoryview(x).cast("B")) for x in encode(list(frames),
                                                                         list(flags)))
    for _ in range(draw(st.integers(1, 4))):
        j = draw(st.integers(0, len(blob) - 1))
        op = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            blob[j] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            blob[j] = draw(st.integers(0, 255))
        elif op == "cut":
            del blob[j:j + draw(st.integers(1, 64))]
        else:
            blob[j:j] = draw(st.binary(min_size=1, max_size=16))
    return bytes(blob)


@fuzz
@given(mutated_wire())
def test_receive_path_on_mutated_bytes_raises_only_protocol_error(blob):
    assert_ok(isolated(_receive_path, blob))


def test_isolation_reports_crashes_and_hangs():
    """The harness itself: a segfault, a hang and a foreign exception are all reported."""
    import ctypes

    assert isolated(ctypes.string_at, 0)[0] == "signal"
    assert isolated(int, "5") == ("ok", 5)                  # a new helper after the crash
    assert isolated(time.sleep, 5, timeout=0.5) == ("hang", 0.5)
    assert isolated(int, "6") == ("ok", 6)
    assert isolated(loads, 5)[:2] == ("raised", "ProtocolError")
    assert isolated(int, "x")[:2] == ("raised", "ValueError")
