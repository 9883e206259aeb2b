"""GPU objects through taskcore.core.serialize (EXT_DEVICE): dumps copies their memory to
host, dumps_device keeps it on the device, loads rebuilds them from either; nested in
messages, in serialize_obj, inside pickled objects; malformed device exts; sizes.

There is no GPU here: the device objects are the stand-in runtime's
(tests/gpu_standin/device_runtime.py), which counts every copy."""
import pickle
import struct

import msgpack
import numpy as np
import pytest

import taskcore.device as device
from gpu_standin.device_runtime import StandinDeviceArray, StandinOutOfMemoryError, runtime
from taskcore.core import serialize as S
from taskcore.core.serialize import (Serialize, Serialized, device_nbytes, dumps, dumps_device,
                                     loads, nbytes, serialize_obj)
from taskcore.device import DeviceFrame, DeviceRuntimeUnavailable, is_device_buffer
from taskcore.errors import ProtocolError


@pytest.fixture(autouse=True)
def standin():
    """The stand-in as this process's device runtime, with fresh counters."""
    device._reset_runtime()
    device._runtime = runtime
    runtime.capacity = None
    runtime.reset_counts()
    yield runtime
    runtime.capacity = None
    device._reset_runtime()


def dev(a):
    """A stand-in device copy of a numpy array (not counted by the tests)."""
    out = runtime.array(a)
    runtime.reset_counts()
    return out


def ptr(a):
    return a.__cuda_array_interface__["data"][0]


def same(d, host):
    assert isinstance(d, StandinDeviceArray)
    got = d.get()
    assert got.dtype == host.dtype and got.shape == host.shape
    np.testing.assert_array_equal(got, host)


ARRAYS = [
    np.arange(24, dtype="f8").reshape(4, 6),
    np.arange(24, dtype="i2").reshape(2, 3, 4),
    np.array(3.5, dtype="f4"),                  # 0-d
    np.zeros((0, 5), dtype="u1"),               # empty
    np.arange(10, dtype="c16"),
]


@pytest.mark.parametrize("host", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_dumps_copies_device_memory_to_host_once_and_loads_copies_it_back(host):
    d = dev(host)
    frames = dumps({"x": d})
    assert len(frames) == 2 and type(frames[1]) is bytearray      # host bytes: tcp, spill
    assert bytes(frames[1]) == host.tobytes()
    assert runtime.counts["d2h"] == 1 and runtime.counts["h2d"] == 0
    out = loads(frames)["x"]
    same(out, host)
    assert runtime.counts["h2d"] == 1 and ptr(out) != ptr(d)


def test_dumps_device_keeps_device_memory_and_loads_uses_it_without_a_copy():
    host = np.arange(1000, dtype="f8")
    d = dev(host)
    frames = dumps_device(["result", d, 7])
    assert type(frames[0]) is bytes
    f = frames[1]
    assert type(f) is DeviceFrame and is_device_buffer(f) and f.nbytes == host.nbytes
    assert f.__cuda_array_interface__ == {"shape": (8000,), "typestr": "|u1",
                                          "data": (ptr(d), False), "strides": None,
                                          "version": 3}
    assert runtime.counts == {"alloc": 0, "h2d": 0, "d2h": 0, "d2d": 0}   # zero copy
    out = loads(frames)
    assert out[0] == "result" and out[2] == 7
    assert ptr(out[1]) == ptr(d)                  # the same device memory
    same(out[1], host)
    assert runtime.counts["h2d"] == 0 and runtime.counts["alloc"] == 0


def test_frames_received_into_the_runtimes_own_buffers():
    # What the ucx transport does: allocate with the runtime, receive into it, loads.
    host = np.arange(64, dtype="i4").reshape(8, 8)
    frames = dumps_device({"a": dev(host)})
    received = [frames[0]]
    for f in frames[1:]:
        buf = runtime.alloc(f.nbytes)
        buf._view()[:] = np.frombuffer(runtime.to_host(f), dtype=np.uint8)  # "the wire"
        received.append(buf)
    runtime.reset_counts()
    out = loads(received)["a"]
    same(out, host)
    assert runtime.counts["h2d"] == 0 and ptr(out) == ptr(received[1])


def test_fortran_order_travels_as_is_and_non_contiguous_is_made_contiguous_once():
    host = np.arange(30, dtype="f8").reshape(5, 6)
    d = dev(host)
    frames = dumps_device([d.T, d[:, ::2]])
    assert ptr(frames[1]) == ptr(d)               # .T is F-contiguous: its own memory
    assert runtime.counts["d2d"] == 1             # the strided view: one device copy
    out = loads(frames)
    same(out[0], host.T)
    same(out[1], host[:, ::2])
    assert out[0].__cuda_array_interface__["strides"] is not None     # still F order


def test_device_objects_nested_in_messages_keep_frame_order_with_other_frames():
    a, b = np.arange(5000.), np.arange(700, dtype="i8")
    big = np.ones(100_000)                          # an out-of-band numpy frame
    payload = Serialized(1, [pickle.dumps("p")])
    msg = {"op": "get-data-reply", "data": {"k1": dev(a), ("k", 2): (dev(b), big, payload)},
           "list": [dev(a), Serialize(b"raw" * 1000)]}
    for fn in (dumps, dumps_device):
        out = loads(fn(msg))
        same(out["data"]["k1"], a)
        t = out["data"][("k", 2)]
        assert type(t) is tuple
        same(t[0], b)
        np.testing.assert_array_equal(t[1], big)
        assert t[2].frames == payload.frames
        same(out["list"][0], a)
        assert out["list"][1] == b"raw" * 1000


def test_serialize_obj_makes_host_frames_and_deserialize_gives_a_device_object():
    host = np.arange(4096, dtype="f4")
    d = dev(host)
    s = serialize_obj(d)
    assert s.kind == 0 and all(type(f) in (bytes, bytearray) for f in s.frames)
    assert runtime.counts["d2h"] == 1
    same(s.deserialize(), host)
    # lists and dicts of device objects too (results of a split, a get-data reply)
    s = serialize_obj({"parts": [d, d[:10]], "n": 2})
    assert s.kind == 0
    out = s.deserialize()
    same(out["parts"][0], host)
    same(out["parts"][1], host[:10])
    # Serialize() forces the message format as well
    same(loads(dumps([Serialize(d)]))[0], host)


class Holder:
    """A user object holding a device array: pickled, not taken apart."""

    def __init__(self, arr):
        self.arr = arr


def test_device_objects_inside_pickled_objects_use_the_librarys_pickling():
    host = np.arange(3000, dtype="f8")
    out = loads(dumps([Holder(dev(host))]))[0]
    # the stand-in pickles like CuPy: a host copy inside the pickle, back on the device
    assert isinstance(out, Holder)
    same(out.arr, host)
    assert runtime.counts["d2h"] >= 1 and runtime.counts["h2d"] >= 1


def test_nbytes_counts_device_memory():
    d = dev(np.zeros((100, 10), dtype="f8"))
    assert nbytes(d) == device_nbytes(d) == 8000
    assert device_nbytes(np.zeros(10)) == -1 and device_nbytes("x") == -1
    assert device_nbytes(b"abc") == -1 and device_nbytes(None) == -1

    class NoNbytes:
        """A generic CUDA Array Interface object without .nbytes."""

        def __init__(self, a):
            self.a = a

        @property
        def __cuda_array_interface__(self):
            return self.a.__cuda_array_interface__

    assert nbytes(NoNbytes(d)) == 8000
    same(loads(dumps([NoNbytes(d)]))[0], np.zeros((100, 10)))


def test_a_host_buffer_with_a_cuda_array_interface_stays_a_host_buffer():
    class Both(bytearray):
        @property
        def __cuda_array_interface__(self):
            raise AssertionError("never asked")

    assert not is_device_buffer(Both(b"xy"))
    assert device_nbytes(Both(b"xy")) == -1
    assert loads(dumps([Both(b"xy" * 2000)]))[0] == b"xy" * 2000


def test_masked_cuda_arrays_are_not_taken_as_device_objects():
    class Masked:
        @property
        def __cuda_array_interface__(self):
            return {"shape": (1,), "typestr": "<f8", "data": (0, False), "version": 3,
                    "mask": object()}

    assert device_nbytes(Masked()) == -1


# -- malformed device exts -------------------------------------------------------------------
def device_msg(family, header, frames, tag=0, first=1):
    tail = msgpack.packb([family, header])
    payload = struct.pack("<IIB", first, len(frames), tag) + tail
    return [msgpack.packb([msgpack.ExtType(S.EXT_DEVICE, payload)])] + list(frames)


GOOD = {"dtype": "<f8", "shape": [2], "order": "C"}


def test_a_well_formed_handmade_device_ext_loads():
    out = loads(device_msg("cuda", GOOD, [np.array([1.0, 2.0]).tobytes()]))[0]
    same(out, np.array([1.0, 2.0]))


@pytest.mark.parametrize("family, header, frames, match", [
    ("nope", GOOD, [bytes(16)], "unknown device object family"),
    ("cuda", {"dtype": "<f8", "shape": [3], "order": "C"}, [bytes(16)], "holds 16 bytes"),
    ("cuda", {"dtype": "O", "shape": [2]}, [bytes(16)], "cannot live on a GPU"),
    ("cuda", {"dtype": "nonsense", "shape": [2]}, [bytes(16)], "bad dtype"),
    ("cuda", {"dtype": 5, "shape": [2]}, [bytes(16)], "bad dtype"),
    ("cuda", {"dtype": "<f8", "shape": [-2]}, [bytes(16)], "bad shape"),
    ("cuda", {"dtype": "<f8", "shape": "2"}, [bytes(16)], "bad shape"),
    ("cuda", {"dtype": "<f8"}, [bytes(16)], "lacks"),
    ("cuda", {"dtype": "<f8", "shape": [2], "order": "Z"}, [bytes(16)], "bad order"),
    ("cuda", GOOD, [bytes(8), bytes(8)], "comes in 1 frame"),
    ("torch", GOOD, [bytes(16)], None),          # torch is not importable here: payload error
])
def test_bad_device_headers_are_protocol_errors(family, header, frames, match):
    with pytest.raises(ProtocolError, match=match):
        loads(device_msg(family, header, frames))


def test_bad_device_ext_structure_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="unknown tag"):
        loads(device_msg("cuda", GOOD, [bytes(16)], tag=3))
    with pytest.raises(ProtocolError, match="out-of-order|overlapping"):
        loads(device_msg("cuda", GOOD, [bytes(16)], first=2))
    frames = device_msg("cuda", GOOD, [bytes(16)])
    with pytest.raises(ProtocolError, match="unused frame"):
        loads(frames + [b"extra"])
    bare = struct.pack("<IIB", 1, 1, 0)
    with pytest.raises(ProtocolError, match="no \\[family, header\\]"):
        loads([msgpack.packb(msgpack.ExtType(S.EXT_DEVICE, bare)), bytes(16)])
    with pytest.raises(ProtocolError, match="not \\[family, header\\]"):
        loads([msgpack.packb(msgpack.ExtType(S.EXT_DEVICE, bare + msgpack.packb([1, 2]))),
               bytes(16)])
    with pytest.raises(ProtocolError, match="shorter than its header"):
        loads([msgpack.packb(msgpack.ExtType(S.EXT_DEVICE, b"abc"))])


def test_a_device_frame_outside_a_device_ext_is_a_protocol_error():
    d = dev(np.arange(1000.))
    frames = dumps([np.arange(1000.)])             # an out-of-band numpy frame for pickle
    frames[1] = DeviceFrame(d, ptr(d), d.nbytes)  # ... replaced by device memory
    with pytest.raises(ProtocolError, match="device memory"):
        loads(frames)
    with pytest.raises(ProtocolError, match="frame 0"):
        loads([DeviceFrame(d, ptr(d), d.nbytes)])
    with pytest.raises(ProtocolError, match="not a bytes-like object"):
        loads([dumps(1)[0], object()])


# -- runtime errors ---------------------------------------------------------------------------
def test_out_of_device_memory_while_loading(standin):
    frames = dumps([dev(np.ones(1000))])
    standin.capacity = standin.used + 100
    with pytest.raises(ProtocolError, match="Out of memory") as e:
        loads(frames)
    assert isinstance(e.value.__cause__, StandinOutOfMemoryError)
    # a Serialized (a result, a spilled value) raises the runtime's own error
    standin.capacity = None
    s = serialize_obj(dev(np.ones(1000)))
    standin.capacity = standin.used + 100
    with pytest.raises(StandinOutOfMemoryError):
        s.deserialize()


def test_no_cuda_runtime_is_a_clear_error(monkeypatch):
    frames = dumps([dev(np.ones(10))])
    device._reset_runtime()
    monkeypatch.delenv(device.ENV_RUNTIME, raising=False)

    def unavailable(self):
        raise ImportError("not here")

    for cls in (device.CupyRuntime, device.NumbaRuntime, device.RMMRuntime):
        monkeypatch.setattr(cls, "__init__", unavailable)
    with pytest.raises(ProtocolError) as e:
        loads(frames)
    assert isinstance(e.value.__cause__, DeviceRuntimeUnavailable)
    assert "no CUDA runtime (cupy, numba or rmm) is importable here" in str(e.value)
    s = Serialized(0, frames)
    with pytest.raises(DeviceRuntimeUnavailable, match="lives on a GPU"):
        s.deserialize()
