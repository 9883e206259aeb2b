"""Tests for taskcore.core.serialize: round trips, zero copy, pass-through,
compression and malformed input (docs/contracts.md, "Serialization")."""
import collections
import datetime
import decimal
import functools
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest

from taskcore.testing import import_required
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from taskcore.core import serialize as S
from taskcore.core.serialize import (
    RemoteException,
    Serialize,
    Serialized,
    compress_frames,
    decompress_frames,
    dumps,
    loads,
    nbytes,
    serialize_obj,
)
from taskcore.errors import ProtocolError

ZERO_COPY_SIZE = 1 << 20  # well above the in-band threshold for pickle buffers


# ----------------------------------------------------------------- helpers


def roundtrip(msg, writable=True):
    """dumps, then loads from frames as a comm would deliver them (fresh buffers)."""
    frames = dumps(msg)
    assert isinstance(frames, list) and type(frames[0]) is bytes
    conv = bytearray if writable else bytes
    return loads([conv(f) for f in frames])


def assert_same(a, b):
    """Equal, with the same types all the way down (tuple vs list, 1 vs True)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert len(a) == len(b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_same(ka, kb)
            assert_same(va, vb)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, float):
        assert a == b or (a != a and b != b)
    else:
        assert a == b


def assert_array_same(a, b):
    assert type(b) is np.ndarray
    # exact dtype, byte order included (numpy's own pickling would turn
    # non-contiguous or datetime64 big-endian arrays native)
    assert b.shape == a.shape and b.dtype == a.dtype
    assert a.tobytes() == b.tobytes()  # exact, NaN payloads and padding included


def ref(first, count, tag, tail=b""):
    return struct.pack("<IIB", first, count, tag) + tail


def module_level_function(x):
    return x + 1


def _raise(exc):
    raise exc


class CustomError(Exception):
    pass


class BadInitError(Exception):
    """Pickles fine, but unpickling calls BadInitError(msg) and fails."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


# ---------------------------------------------------- msgpack-native values

hashable_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
hashables = st.recursive(
    hashable_leaves, lambda c: st.lists(c, max_size=3).map(tuple), max_leaves=6
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary()
)
native = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=5)
    | st.lists(c, max_size=5).map(tuple)
    | st.dictionaries(hashables, c, max_size=5),
    max_leaves=30,
)


@given(native)
def test_native_roundtrip(msg):
    assert_same(msg, roundtrip(msg))


@given(native)
def test_native_values_stay_in_frame0(msg):
    assert len(dumps(msg)) == 1


@given(st.dictionaries(hashables, native, max_size=5))
def test_tuple_keys_roundtrip(msg):
    assert_same(msg, roundtrip(msg))


def test_task_message_roundtrip():
    spec = serialize_obj((module_level_function, (1,), {}))
    # the wire's compute-tasks message (positional, core/messages.pyx): one task
    wire = ["compute-tasks", 7, ("inc-abc", 0, 1), spec, [0, 1, 5],
            [[3, ("y", 2), 8, ["tcp://a:1"]]]]
    out = roundtrip(wire)
    assert out[:3] == ["compute-tasks", 7, ("inc-abc", 0, 1)]
    assert out[4:] == [[0, 1, 5], [[3, ("y", 2), 8, ["tcp://a:1"]]]]
    func, args, kwargs = out[3].deserialize()
    assert func(*args, **kwargs) == 2
    # a map message with tuple keys and values
    msg = {
        "op": "task-info",
        "key": ("inc-abc", 0, 1),
        "priority": (0, 1, 5),
        "run_spec": spec,
        "deps": [],
        ("x", 1): {"who_has": {("y", 2): ["tcp://a:1"]}},
    }
    out = roundtrip(msg)
    assert out["key"] == ("inc-abc", 0, 1) and type(out["priority"]) is tuple
    assert out[("x", 1)] == {"who_has": {("y", 2): ["tcp://a:1"]}}
    func, args, kwargs = out["run_spec"].deserialize()
    assert func(*args, **kwargs) == 2


@given(st.integers())
def test_integers_of_any_size(n):
    assert_same([n, (n, n), {"k": n}], roundtrip([n, (n, n), {"k": n}]))


scalar_tuples = st.lists(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=300),
    max_size=40,
).map(tuple)


@given(scalar_tuples)
def test_tuple_fast_path_writes_what_msgpack_writes(t):
    # The hand-written scalar-tuple encoder must be byte-compatible with msgpack.
    frame0 = dumps(t)[0]
    ext = msgpack.unpackb(frame0)
    assert isinstance(ext, msgpack.ExtType) and ext.code == S.EXT_TUPLE
    assert ext.data == msgpack.packb(list(t), use_bin_type=True)
    assert_same(t, loads([frame0]))


@given(st.binary(max_size=60))
def test_tuple_payload_decoding_agrees_with_msgpack(payload):
    # Differential test of the scalar-tuple fast decoder against msgpack.
    frame0 = msgpack.packb(msgpack.ExtType(S.EXT_TUPLE, payload))
    try:
        expected = msgpack.unpackb(payload, strict_map_key=False, ext_hook=_no_ext)
    except Exception:
        expected = None
    if type(expected) is not list:
        with pytest.raises(ProtocolError):
            loads([frame0])
    else:
        assert_same(tuple(expected), loads([frame0]))


def _no_ext(code, data):
    raise ValueError("ext")


def test_tuple_non_canonical_encodings():
    payload = (
        b"\x97"
        + b"\xd3" + (1).to_bytes(8, "big", signed=True)  # small int as int64
        + b"\xcf" + (2).to_bytes(8, "big")  # small int as uint64
        + b"\xd0\xff"  # -1 as int8
        + b"\xca" + struct.pack(">f", 1.5)  # float32
        + b"\xda\x00\x01a"  # str16
        + b"\xc5\x00\x01b"  # bin16
        + b"\xdc\x00\x00"  # array16 (a list: generic route)
    )
    frame0 = msgpack.packb(msgpack.ExtType(S.EXT_TUPLE, payload))
    assert_same(loads([frame0]), (1, 2, -1, 1.5, "a", b"b", []))


def test_deeply_nested_tuples():
    t = ()
    for i in range(100):
        t = (t, i)  # deeper than the encoder's ext nesting: pickled below that
    assert roundtrip({"t": t})["t"] == t


@pytest.mark.parametrize(
    "obj",
    [
        collections.OrderedDict(a=1),
        collections.defaultdict(list, {"a": [1]}),
        {1, 2, 3},
        frozenset({"x"}),
        datetime.datetime(2024, 1, 2, 3, 4, 5),
        decimal.Decimal("1.5"),
        np.float64(1.5),
        np.int32(7),
        complex(1, 2),
        True.__class__,
        range(5),
    ],
    ids=lambda o: type(o).__name__,
)
def test_non_native_types_keep_their_type(obj):
    out = roundtrip({"v": obj, "t": (obj,)})
    assert type(out["v"]) is type(obj) and out["v"] == obj
    assert type(out["t"][0]) is type(obj)


def test_unserializable_object_raises_type_error():
    with pytest.raises(TypeError, match="lock"):
        dumps({"x": threading.Lock()})
    with pytest.raises(TypeError, match="lock"):
        dumps({"x": [(1, (2, threading.Lock()))]})  # inside nested packers
    with pytest.raises(TypeError, match="lock"):
        serialize_obj([threading.Lock()])
    # the reused packers are left clean
    assert roundtrip({"t": (1, (2, [3]))}) == {"t": (1, (2, [3]))}


def test_packer_survives_huge_messages():
    big = {"b": b"x" * 3_000_000}
    assert roundtrip(big) == big
    assert roundtrip(big) == big
    assert roundtrip({"small": (1,)}) == {"small": (1,)}


# ------------------------------------------------------------------ numpy

dtypes = (
    hnp.scalar_dtypes()
    | hnp.integer_dtypes(endianness=">")
    | hnp.unsigned_integer_dtypes(endianness=">")
    | hnp.floating_dtypes(endianness=">")
    | hnp.complex_number_dtypes(endianness=">")
    | hnp.datetime64_dtypes(endianness="?")
    | hnp.timedelta64_dtypes(endianness="?")
    | hnp.byte_string_dtypes()
    | hnp.unicode_string_dtypes(endianness="?")
    | hnp.array_dtypes(allow_subarrays=True)
)
views = st.sampled_from(
    [
        lambda a: a,
        lambda a: a.T,
        lambda a: a[::2],
        lambda a: a[..., ::-1],
        lambda a: a[1:],
    ]
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)),
    views,
)
def test_numpy_roundtrip(arr, view):
    a = view(arr) if arr.ndim else arr
    out = roundtrip({"a": a, "t": (a,)})
    assert_array_same(a, out["a"])
    assert_array_same(a, out["t"][0])
    assert_array_same(a, serialize_obj(a).deserialize())


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(300_000, dtype="f8")[::3],  # strided
        lambda: np.arange(300_000, dtype="i4").reshape(600, 500).T,  # F order
        lambda: np.arange(300_000, dtype=">i8"),  # big-endian
        lambda: np.zeros(100_000, dtype=[("a", "i4"), ("b", "f8", (2,))]),  # structured
        lambda: np.array(["x", None, 3], dtype=object),
        lambda: np.array(5.0),
        lambda: np.zeros((0, 5)),
    ],
    ids=["strided", "fortran", "big-endian", "structured", "object", "0-d", "empty"],
)
def test_numpy_special_arrays(make):
    a = make()
    out = roundtrip({"a": a})["a"]
    if a.dtype == object:
        assert out.tolist() == a.tolist()
    else:
        assert_array_same(a, out)


def test_numpy_zero_copy_dumps():
    a = np.random.default_rng(0).random(ZERO_COPY_SIZE // 8)
    frames = dumps({"a": a, "priority": (1, 2)})
    assert len(frames[0]) < 1000  # the data is not in frame 0
    data_frames = [f for f in frames[1:] if len(memoryview(f)) == a.nbytes]
    assert len(data_frames) == 1
    view = np.frombuffer(data_frames[0], dtype=np.uint8)
    assert np.shares_memory(view, a)
    assert view.ctypes.data == a.ctypes.data


def test_numpy_zero_copy_fortran_order():
    a = np.asfortranarray(np.ones((512, 512)))
    frames = dumps([a])
    assert any(np.shares_memory(np.frombuffer(f, np.uint8), a) for f in frames[1:])
    assert_array_same(a, loads(frames)[0])


def test_numpy_zero_copy_loads_writable():
    a = np.arange(ZERO_COPY_SIZE // 8, dtype="i8")
    frames = [bytearray(f) for f in dumps({"a": a})]
    out = loads(frames)["a"]
    np.testing.assert_array_equal(out, a)
    assert out.flags.writeable
    assert any(np.shares_memory(out, np.frombuffer(f, np.uint8)) for f in frames[1:])
    out[0] = 42  # writes land in the received buffer
    assert any(np.frombuffer(f, "i8")[:1].tolist() == [42] for f in frames[1:] if len(f) == a.nbytes)


def test_numpy_from_bytes_frames_is_readonly_view():
    a = np.arange(ZERO_COPY_SIZE // 8, dtype="i8")
    frames = [bytes(f) for f in dumps({"a": a})]
    out = loads(frames)["a"]
    assert not out.flags.writeable
    assert any(np.shares_memory(out, np.frombuffer(f, np.uint8)) for f in frames[1:])


def test_numpy_from_memoryview_slices_of_one_buffer():
    # A comm may hand over frames as views into one receive buffer.
    a = np.arange(ZERO_COPY_SIZE // 8, dtype="f8")
    frames = dumps({"a": a})
    buf = bytearray(b"".join(bytes(f) for f in frames))
    views, pos = [], 0
    for f in frames:
        n = len(memoryview(f))
        views.append(memoryview(buf)[pos:pos + n])
        pos += n
    out = loads(views)["a"]
    np.testing.assert_array_equal(out, a)
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))


@pytest.mark.parametrize("dtype", ["M8[ns]", ">m8[s]", ">f8", "c16", "V16", "S8", "U4"])
def test_numpy_zero_copy_for_any_plain_dtype(dtype):
    # numpy's own pickling copies datetime64/timedelta64 in band; we do not.
    a = np.zeros(ZERO_COPY_SIZE // 8, dtype="u8").view(np.uint8).view(dtype)
    frames = dumps({"a": a})
    assert any(np.shares_memory(np.frombuffer(f, np.uint8), a.view(np.uint8)) for f in frames[1:])
    out = loads([bytearray(f) for f in frames])["a"]
    assert_array_same(a, out)
    assert out.flags.writeable


def test_small_arrays_stay_in_band():
    frames = dumps({"a": np.arange(10)})
    assert len(frames) == 1


# ----------------------------------------------------- Serialize / buffers


@given(st.binary(max_size=5000), st.sampled_from([bytes, bytearray, memoryview]))
def test_serialize_bytes_like_keeps_type(data, kind):
    obj = kind(data)
    out = roundtrip({"x": Serialize(obj)})["x"]
    assert type(out) is kind
    assert bytes(out) == data


def test_serialize_big_bytes_is_not_copied():
    for obj in (b"x" * ZERO_COPY_SIZE, bytearray(ZERO_COPY_SIZE)):
        frames = dumps({"x": Serialize(obj)})
        assert frames[1] is obj
        assert len(frames[0]) < 100
    mv = memoryview(bytearray(ZERO_COPY_SIZE))
    frames = dumps([Serialize(mv)])
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), np.frombuffer(mv, np.uint8))


def test_serialize_bytearray_loads_returns_the_frame():
    frames = [bytearray(f) for f in dumps(Serialize(bytearray(b"abc" * 1000)))]
    assert loads(frames) is frames[1]


def test_serialize_memoryview_keeps_format_and_shape():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    out = roundtrip(Serialize(memoryview(a)))
    assert type(out) is memoryview and out.format == "i" and out.shape == (3, 4)
    assert out.tolist() == a.tolist()
    strided = memoryview(a)[::2]
    out = roundtrip(Serialize(strided))
    assert out.shape == (2, 4) and out.tolist() == a[::2].tolist()


@pytest.mark.parametrize(
    "obj", [{"a": 1}, [1, 2], "text", 5, (1, 2), np.arange(5000), collections.Counter("ab")]
)
def test_serialize_other_objects(obj):
    frames = dumps({"x": Serialize(obj)})
    assert len(frames) >= 2  # forced out of band
    out = loads(frames)["x"]
    assert type(out) is type(obj)
    if isinstance(obj, np.ndarray):
        assert_array_same(obj, out)
    else:
        assert out == obj


# ------------------------------------------------------ functions & pickle


def test_functions_lambdas_closures():
    k = 10

    def closure(x):
        return x * k

    def nested(x):
        return x - 1

    lam = lambda x: x + 100  # noqa: E731
    out = roundtrip(
        {
            "module": module_level_function,
            "lambda": lam,
            "closure": closure,
            "nested": nested,
            "partial": functools.partial(lam, 1),
            "in_tuple": (lam, closure),
        }
    )
    assert out["module"](1) == 2
    assert out["lambda"](1) == 101
    assert out["closure"](3) == 30
    assert out["nested"](3) == 2
    assert out["partial"]() == 101
    assert out["in_tuple"][0](0) == 100 and out["in_tuple"][1](1) == 10


def test_local_class_and_instance():
    class Local:
        def __init__(self, v):
            self.v = v

        def get(self):
            return self.v

    out = roundtrip({"cls": Local, "obj": Local(3)})
    assert out["obj"].get() == 3
    assert out["cls"](4).get() == 4


def test_objects_from_main_go_by_value():
    # __main__ of the sender is a different script than the receiver's.
    script = textwrap.dedent(
        """
        import pickle, sys
        from taskcore.core.serialize import dumps, serialize_obj

        def square(x):
            return x * x

        class Point:
            def __init__(self, x):
                self.x = x
            def norm(self):
                return abs(self.x)

        frames = dumps({"f": square, "cls": Point, "obj": Point(-3), "spec": serialize_obj((square, (5,), {}))})
        sys.stdout.buffer.write(pickle.dumps([bytes(f) for f in frames]))
        """
    )
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(S.__file__), "..", "..")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, env=env, timeout=60, check=True
    )
    out = loads(pickle.loads(proc.stdout))
    assert out["f"](4) == 16
    assert out["obj"].norm() == 3
    assert out["cls"](-5).norm() == 5
    func, args, _ = out["spec"].deserialize()
    assert func(*args) == 25


def test_functions_of_modules_registered_by_value_go_by_value_inside_containers(tmp_path):
    # A client.run payload is a tuple (func, args, kwargs): plain pickle would store the
    # function by reference to a module the peer cannot import.
    import cloudpickle

    (tmp_path / "helper_mod_by_value.py").write_text("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import helper_mod_by_value
        cloudpickle.register_pickle_by_value(helper_mod_by_value)
        try:
            payload = S.serialize_obj((helper_mod_by_value.triple, (2,), {}))
        finally:
            cloudpickle.unregister_pickle_by_value(helper_mod_by_value)
        plain = S.serialize_obj((helper_mod_by_value.triple, (2,), {}))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("helper_mod_by_value", None)
    func, args, _ = payload.deserialize()            # the module is gone: by value only
    assert func(*args) == 6
    with pytest.raises(ModuleNotFoundError):
        plain.deserialize()                          # not registered: by reference, as before


# -------------------------------------------------------------- exceptions

exception_types = st.sampled_from([ValueError, KeyError, RuntimeError, ZeroDivisionError, CustomError])


@given(exception_types, st.text(max_size=50))
def test_exception_roundtrip(exc_type, message):
    try:
        _raise(exc_type(message))
    except Exception as e:
        exc = e
    out = roundtrip({"exception": exc, "t": (exc,)})
    for got in (out["exception"], out["t"][0]):
        assert type(got) is exc_type
        assert got.args == (message,)
        tb = got.__taskcore_traceback__
        assert isinstance(tb, str)
        assert "_raise" in tb and exc_type.__name__ in tb


def test_exception_chain_in_traceback():
    try:
        try:
            {}["missing"]
        except KeyError as inner:
            raise ValueError("outer") from inner
    except ValueError as e:
        exc = e
    tb = roundtrip(exc).__taskcore_traceback__
    assert "KeyError" in tb and "missing" in tb and "ValueError: outer" in tb


def test_exception_unpicklable_on_sender():
    exc = ValueError(threading.Lock())  # neither pickle nor cloudpickle can carry a lock
    out = roundtrip(exc)
    assert type(out) is RemoteException
    assert out.type_name == "builtins.ValueError"
    assert "lock" in out.message
    assert "ValueError" in out.__taskcore_traceback__


def test_exception_unpicklable_on_receiver():
    try:
        _raise(BadInitError("a", "b"))
    except BadInitError as e:
        exc = e
    out = roundtrip(exc)
    if type(out) is BadInitError:
        # tblib's pickling support (installed when dask.distributed is imported
        # in the same process) rebuilds such exceptions without calling __init__.
        assert str(out) == "a/b" and "_raise" in out.__taskcore_traceback__
        return
    assert type(out) is RemoteException
    assert out.type_name.endswith("BadInitError") and out.message == "a/b"
    assert "BadInitError: a/b" in str(out) and "_raise" in out.__taskcore_traceback__
    # the stand-in itself pickles by reference
    assert pickle.loads(pickle.dumps(out)).message == "a/b"


def test_forwarded_exception_keeps_original_traceback():
    try:
        _raise(CustomError("deep"))
    except CustomError as e:
        exc = e
    once = roundtrip(exc)
    twice = roundtrip(once)
    assert twice.__taskcore_traceback__ == once.__taskcore_traceback__
    assert "_raise" in twice.__taskcore_traceback__


def test_exception_through_serialize_obj():
    try:
        _raise(KeyError("k"))
    except KeyError as e:
        s = serialize_obj(e)
    assert s.serializer == "msgpack"
    out = s.deserialize()
    assert type(out) is KeyError and "_raise" in out.__taskcore_traceback__


# ------------------------------------------------------------------ pandas


def test_pandas_roundtrip():
    pd = import_required("pandas", "the [dask] extra")
    hpd = import_required("hypothesis.extra.pandas", "the [dask] extra")

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        hpd.data_frames(
            [
                hpd.column("i", dtype=int),
                hpd.column("f", dtype=float),
                hpd.column("s", elements=st.text(max_size=5)),
            ],
            index=hpd.range_indexes(max_size=20),
        )
    )
    def check(df):
        out = roundtrip({"df": df, "s": df["f"]})
        pd.testing.assert_frame_equal(out["df"], df)
        pd.testing.assert_series_equal(out["s"], df["f"])

    check()


def test_pandas_large_frame_is_zero_copy_on_the_wire():
    pd = import_required("pandas", "the [dask] extra")
    df = pd.DataFrame({"a": np.arange(200_000, dtype="f8"), "b": np.arange(200_000)})
    frames = dumps({"df": df})
    assert len(frames[0]) < 20_000
    pd.testing.assert_frame_equal(loads(frames)["df"], df)
    assert nbytes(df) >= 3_200_000


# -------------------------------------------------------------- Serialized


def test_serialized_passthrough_copies_nothing():
    a = np.arange(ZERO_COPY_SIZE // 8, dtype="f8")
    s = serialize_obj((module_level_function, (a,), {"k": (1, 2)}))
    assert s.serializer == "pickle"
    # a client's one-task update-graph: ["update-graph", [key, run spec, deps, opts], key, 0]
    frames1 = dumps(["update-graph", ["f-1", s, [], None], "f-1", 0])
    assert all(x is y for x, y in zip(frames1[1:], s.frames))
    received = [bytearray(f) for f in frames1]  # "scheduler" receives
    msg = loads(received)
    s2 = msg[1][1]
    assert type(s2) is Serialized
    assert all(x is y for x, y in zip(s2.frames, received[1:]))
    again = dumps(msg)  # re-encoded as received: the same bytes, the same buffers
    assert all(x is y for x, y in zip(again[1:], received[1:]))
    assert again[0] == frames1[0]
    # "scheduler" forwards it in a compute-tasks message, the same frames
    frames2 = dumps(["compute-tasks", 1, "f-1", s2, [0, 1, 0], []])
    assert all(x is y for x, y in zip(frames2[1:], received[1:]))
    func, args, kwargs = loads(frames2)[3].deserialize()  # "worker"
    np.testing.assert_array_equal(args[0], a)
    assert any(np.shares_memory(args[0], np.frombuffer(f, np.uint8)) for f in received[1:])
    assert kwargs == {"k": (1, 2)} and func(1) == 2


@pytest.mark.parametrize(
    "obj,kind",
    [
        ({"a": (1, 2), "b": [None]}, "msgpack"),
        ((1, "x"), "msgpack"),
        (b"small", "msgpack"),
        (b"x" * 100_000, "msgpack"),
        (bytearray(b"y" * 100_000), "msgpack"),
        ([1, {2, 3}], "pickle"),
        (2**70, "pickle"),
        (np.arange(10), "pickle"),
    ],
    ids=repr,
)
def test_serialize_obj_kinds(obj, kind):
    s = serialize_obj(obj)
    assert s.serializer == kind and s.kind == (0 if kind == "msgpack" else 1)
    out = s.deserialize()
    assert type(out) is type(obj)
    if isinstance(obj, np.ndarray):
        assert_array_same(obj, out)
    else:
        assert out == obj
    out2 = roundtrip({"s": s})["s"].deserialize()
    assert type(out2) is type(obj)


def test_small_multi_frame_serialized_rides_inside_frame_0():
    # A pickle with small out-of-band buffers (a dask task pointing at a shared
    # function's bytes): no wire frame of its own, however many are in a message.
    fn = b"f" * 2500
    specs = [Serialized(1, [pickle.dumps(i), memoryview(fn)]) for i in range(1000)]
    frames = dumps(["batch", specs])
    assert len(frames) == 1
    out = loads(frames)[1]
    assert [s.frames for s in out] == [[pickle.dumps(i), fn] for i in range(1000)]
    assert all(type(f) is bytes for s in out for f in s.frames)
    # equal frames in a row are one object at the receiver (a scheduler holding a
    # million tasks keeps one copy of their shared function's bytes)
    assert len({id(s.frames[1]) for s in out}) == 1
    assert len({id(s.frames[0]) for s in out}) == 1000
    # the same object twice: a back-reference, as for any Serialized
    again = loads(dumps([specs[3], specs[3]]))
    assert again[0] is again[1] and again[0].frames == [pickle.dumps(3), fn]
    # too large together, too many, or not contiguous: frames of their own
    big = Serialized(1, [b"a" * 2000, b"b" * 2200])
    many = Serialized(1, [b"x"] * 9)
    strided = Serialized(1, [b"p", memoryview(b"abcdef")[::2]])
    frames = dumps([big, many, strided])
    assert len(frames) == 1 + 2 + 9 + 2
    out = loads(frames)
    assert [bytes(f) for f in out[0].frames] == [b"a" * 2000, b"b" * 2200]
    assert [bytes(f) for f in out[1].frames] == [b"x"] * 9
    assert [bytes(f) for f in out[2].frames] == [b"p", b"ace"]


def test_serialize_obj_big_bytes_zero_copy():
    data = b"z" * ZERO_COPY_SIZE
    s = serialize_obj(data)
    assert any(f is data for f in s.frames)
    assert s.nbytes >= ZERO_COPY_SIZE


def test_serialized_api():
    s = serialize_obj(np.arange(100_000))
    assert s.nbytes == sum(len(memoryview(f)) for f in s.frames)
    assert "pickle" in repr(s)
    for proto in (4, 5):
        s2 = pickle.loads(pickle.dumps(s, protocol=proto))
        assert type(s2) is Serialized
        np.testing.assert_array_equal(s2.deserialize(), np.arange(100_000))
    assert serialize_obj(s) is s
    with pytest.raises(ValueError):
        Serialized(7, [b"x"])
    with pytest.raises(ValueError):
        Serialized(0, [])
    assert not hasattr(s, "__dict__")


def test_serialized_deserialize_raises_the_user_error():
    # A run spec whose function lives in a module the worker lacks.
    s = Serialized(1, [b"cnonexistent_module_xyz\nfunc\n."])
    with pytest.raises(ModuleNotFoundError):
        s.deserialize()
    # ... while loads of a message with such a value is a ProtocolError
    frame0 = msgpack.packb(msgpack.ExtType(S.EXT_PICKLE, ref(1, 0, 0, b"cnonexistent_module_xyz\nfunc\n.")))
    with pytest.raises(ProtocolError, match="unpickle") as info:
        loads([frame0])
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


# --------------------------------------------------- threads & re-entrancy


class _Yielding:
    """Releases the GIL in the middle of dumps/loads, inviting interleaving."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        time.sleep(0)
        return (_Yielding, (self.n,))

    def __eq__(self, other):
        return type(other) is _Yielding and other.n == self.n


def test_threads_do_not_share_encoder_state():
    def work(i):
        for j in range(200):
            msg = {"i": i, "t": (i, j), "y": _Yielding(j), "a": np.full(1000, i)}
            out = roundtrip(msg)
            assert out["t"] == (i, j) and out["y"] == _Yielding(j)
            assert (out["a"] == i).all()
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


class _Reentrant:
    def __reduce__(self):
        inner = dumps({"inner": (1, 2), "a": np.arange(10_000)})  # while dumps is busy
        return (_rebuild_reentrant, ([bytes(f) for f in inner],))


def _rebuild_reentrant(frames):
    return loads(frames)  # while loads is busy


def test_reentrant_dumps_and_loads():
    out = roundtrip({"x": _Reentrant(), "t": (3, 4), "a": np.arange(20_000)})
    assert out["t"] == (3, 4)
    assert out["x"]["inner"] == (1, 2)
    np.testing.assert_array_equal(out["x"]["a"], np.arange(10_000))
    np.testing.assert_array_equal(out["a"], np.arange(20_000))


# ------------------------------------------------------------------- nbytes


def test_nbytes():
    assert nbytes(b"abc") == 3
    assert nbytes(bytearray(10)) == 10
    assert nbytes(memoryview(np.zeros(4))) == 32
    assert nbytes(np.zeros((3, 4))) == 96
    assert nbytes(np.zeros(10)[::2]) == 40
    s = serialize_obj(np.zeros(1000))
    assert nbytes(s) == s.nbytes
    assert nbytes(Serialize(b"xy")) == 2
    assert nbytes([1, 2, 3]) == sys.getsizeof([1, 2, 3])
    assert nbytes(object()) > 0


# -------------------------------------------------------------- compression


def test_compression_roundtrip():
    compressible = b"abcdefgh" * 10_000
    incompressible = os.urandom(100_000)
    small = b"a" * 100
    frames = [small, compressible, incompressible, bytearray(compressible), memoryview(compressible)]
    out, flags = compress_frames(frames)
    assert type(flags) is bytes
    assert list(flags) == [0, 1, 0, 1, 1]
    assert out[0] is small and out[2] is incompressible
    assert len(out[1]) < len(compressible) // 10
    back = decompress_frames(out, flags)
    assert [bytes(f) for f in back] == [bytes(f) for f in frames]
    assert back[0] is small


def test_compression_of_dumps_frames():
    a = np.zeros(1_000_000)
    frames = dumps({"a": a, "r": np.random.default_rng(1).random(100_000)})
    out, flags = compress_frames(frames)
    assert sum(flags) == 1  # only the zeros
    np.testing.assert_array_equal(loads(decompress_frames(out, flags))["a"], a)
    # decompressed frames are writable, like received ones
    assert loads(decompress_frames(out, flags))["a"].flags.writeable


def test_compression_min_size_and_sampling():
    data = b"q" * 50_000
    assert list(compress_frames([data], min_size=100_000)[1]) == [0]
    # compressible start, random rest: the middle sample catches it
    mixed = b"\0" * 20_000 + os.urandom(200_000)
    assert list(compress_frames([mixed])[1]) == [0]


@given(st.lists(st.binary(max_size=30_000).map(lambda b: b * 3), max_size=4))
def test_compression_roundtrip_property(frames):
    out, flags = compress_frames(frames, min_size=1000)
    assert len(out) == len(flags) == len(frames)
    assert [bytes(f) for f in decompress_frames(out, list(flags))] == frames


def test_decompress_unknown_flag():
    with pytest.raises(ProtocolError, match="unknown compression flag 7 on frame 1"):
        decompress_frames([b"a", b"b"], b"\x00\x07")
    with pytest.raises(ProtocolError, match="compression flags"):
        decompress_frames([b"a"], [300])


def test_decompress_flag_count_mismatch():
    with pytest.raises(ProtocolError, match="2 compression flags for 1 frames"):
        decompress_frames([b"a"], b"\x00\x00")


def test_decompress_oversized_claim():
    import lz4.block

    body = lz4.block.compress(b"x" * 1000, store_size=False)
    liar = struct.pack("<I", 0xFFFFFFF0) + body
    with pytest.raises(ProtocolError, match="over the limit"):
        decompress_frames([liar], b"\x01")
    # under max_size, but more than lz4 can expand that body into
    liar = struct.pack("<I", 50_000_000) + body
    with pytest.raises(ProtocolError, match="more than lz4 can produce"):
        decompress_frames([liar], b"\x01", max_size=1 << 30)
    good = lz4.block.compress(b"x" * 100_000)
    with pytest.raises(ProtocolError, match="over the limit of 1000"):
        decompress_frames([good], b"\x01", max_size=1000)
    assert bytes(decompress_frames([good], b"\x01", max_size=100_000)[0]) == b"x" * 100_000


def test_decompress_corrupt_data():
    with pytest.raises(ProtocolError, match="too short"):
        decompress_frames([b"\x01"], b"\x01")
    with pytest.raises(ProtocolError, match="corrupt lz4"):
        decompress_frames([struct.pack("<I", 100) + b"\xff" * 20], b"\x01")


# ---------------------------------------------------------- malformed input

P = msgpack.packb
X = msgpack.ExtType
VALID = dumps({"op": "x", "t": (1, 2), "s": "hello world"})[0]


def _deep_tuple_payload(levels):
    data = P([])
    for _ in range(levels):
        data = P([X(S.EXT_TUPLE, data)])
    return data


def _inline(*frames):
    """An inline-frames Serialized payload: u32 n | n x u32 length | frames."""
    return (struct.pack("<I", len(frames)) + b"".join(struct.pack("<I", len(f)) for f in frames)
            + b"".join(frames))


MALFORMED = {
    "no frames": [],
    "frames not a sequence": 5,
    "frame not bytes-like": [P([1]), 5],
    "empty frame 0": [b""],
    "garbage byte": [b"\xc1"],
    "truncated frame 0": [VALID[:-3]],
    "trailing bytes": [VALID + b"\x00"],
    "invalid utf-8": [b"\xa2\xff\xfe"],
    "huge array claim": [b"\xdd\xff\xff\xff\xff"],
    "huge str claim": [b"\xdb\xff\xff\xff\xffabc"],
    "too deep arrays": [b"\x91" * 5000 + b"\xc0"],
    "bad timestamp ext": [b"\xd4\xff\x00"],
    "unknown ext code": [P(X(99, b""))],
    "short ext header": [P(X(S.EXT_PICKLE, b"\x01\x00"))],
    "ref out of range": [P(X(S.EXT_PICKLE, ref(1, 3, 1))), b"x"],
    "ref skips a frame": [P([X(S.EXT_BUFFER, ref(2, 1, 0))]), b"a", b"b"],
    "overlapping refs": [P([X(S.EXT_BUFFER, ref(1, 1, 0)), X(S.EXT_BUFFER, ref(1, 1, 0))]), b"a"],
    "unused frames": dumps({"a": 1}) + [b"junk"],
    "buffer count": [P(X(S.EXT_BUFFER, ref(1, 2, 0))), b"a", b"b"],
    "buffer tag": [P(X(S.EXT_BUFFER, ref(1, 1, 9))), b"a"],
    "buffer trailing": [P(X(S.EXT_BUFFER, ref(1, 1, 0, b"zz"))), b"a"],
    "memoryview shape": [P(X(S.EXT_BUFFER, ref(1, 1, 2, P(["i", [3, 3]])))), b"abcd"],
    "memoryview spec": [P(X(S.EXT_BUFFER, ref(1, 1, 2, P(5)))), b"abcd"],
    "serialized no frames": [P(X(S.EXT_SERIALIZED, ref(1, 0, 0)))],
    "serialized kind": [P(X(S.EXT_SERIALIZED, ref(1, 1, 7))), b"a"],
    "inline frames: count 1": [P(X(S.EXT_SERIALIZED, ref(0, 0, 0x21, _inline(b"a"))))],
    "inline frames: count 9": [P(X(S.EXT_SERIALIZED, ref(0, 0, 0x21, _inline(*[b"a"] * 9))))],
    "inline frames: past the end": [P(X(S.EXT_SERIALIZED, ref(0, 0, 0x21,
                                                        _inline(b"ab", b"c")[:-1])))],
    "inline frames: trailing": [P(X(S.EXT_SERIALIZED, ref(0, 0, 0x21,
                                                     _inline(b"ab", b"c") + b"z")))],
    "inline frames: short": [P(X(S.EXT_SERIALIZED, ref(0, 0, 0x21, b"\x02")))],
    "inline frames: with a ref": [P(X(S.EXT_SERIALIZED, ref(1, 1, 0x21, _inline(b"a", b"b")))),
                                  b"x"],
    "pickle tag": [P(X(S.EXT_PICKLE, ref(1, 0, 5)))],
    "pickle in frame, no frames": [P(X(S.EXT_PICKLE, ref(1, 0, 1)))],
    "pickle in frame, trailing": [P(X(S.EXT_PICKLE, ref(1, 1, 1, b"x"))), pickle.dumps(1)],
    "pickle garbage inline": [P(X(S.EXT_PICKLE, ref(1, 0, 0, b"garbage")))],
    "pickle garbage frame": [P(X(S.EXT_PICKLE, ref(1, 1, 1))), b"not a pickle"],
    "tuple payload not array": [P(X(S.EXT_TUPLE, P({"a": 1})))],
    "tuple payload truncated": [P(X(S.EXT_TUPLE, b"\x93\x01"))],
    "tuple payload empty": [P(X(S.EXT_TUPLE, b""))],
    "tuple nesting too deep": [_deep_tuple_payload(200)],
    "exception payload": [P(X(S.EXT_EXCEPTION, P([1, 2])))],
    "exception payload garbage": [P(X(S.EXT_EXCEPTION, b"\xc1"))],
    "unhashable map key": [
        P({X(S.EXT_PICKLE, ref(1, 0, 0, pickle.dumps([1, 2]))): 1})
    ],
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_protocol_error(frames):
    with pytest.raises(ProtocolError) as info:
        loads(frames)
    assert str(info.value)  # names the fault


def test_malformed_messages_name_the_fault():
    with pytest.raises(ProtocolError, match="unknown msgpack ext code 99"):
        loads(MALFORMED["unknown ext code"])
    with pytest.raises(ProtocolError, match="out of range: the message has 2 frames"):
        loads(MALFORMED["ref out of range"])
    with pytest.raises(ProtocolError, match="1 unused frame"):
        loads(MALFORMED["unused frames"])
    with pytest.raises(ProtocolError, match="next unused frame is 2"):
        loads(MALFORMED["overlapping refs"])
    with pytest.raises(ProtocolError, match="frame 1 is a int"):
        loads(MALFORMED["frame not bytes-like"])
    with pytest.raises(ProtocolError, match="nested deeper"):
        loads(MALFORMED["tuple nesting too deep"])


@given(st.binary(max_size=200), st.lists(st.binary(max_size=20), max_size=3))
def test_fuzz_random_frames(frame0, rest):
    try:
        loads([frame0, *rest])
    except ProtocolError:
        pass


_FUZZ_BASE = dumps(
    {
        "t": (1, "a", (2.5, None)),
        "s": serialize_obj((1, 2)),
        "b": Serialize(b"bytes"),
        "e": ValueError("x"),
        "k": {("a", 1): [True, b"x"]},
        "p": {1, 2},
    }
)


@given(st.data())
def test_fuzz_mutated_messages(data):
    frame0 = bytearray(_FUZZ_BASE[0])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(frame0) - 1))
        frame0[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame0)))
    try:
        loads([bytes(frame0[:cut] if data.draw(st.booleans()) else frame0), *_FUZZ_BASE[1:]])
    except ProtocolError:
        pass


_FLAKY_CALLS = []


def _flaky_once(value):
    """Fails like an import raced by another thread the first time it is called."""
    _FLAKY_CALLS.append(value)
    if len(_FLAKY_CALLS) == 1:
        raise ImportError("cannot import name 'x' from partially initialized module 'y' "
                          "(most likely due to a circular import)")
    return value


class _FlakyOnLoad:
    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_flaky_once, (self.value,))


def _always_circular():
    raise ImportError("cannot import name 'x' from partially initialized module 'y' "
                      "(most likely due to a circular import)")


class _Circular:
    def __reduce__(self):
        return (_always_circular, ())


def test_an_unpickle_that_lost_an_import_race_is_loaded_again(monkeypatch):
    import taskcore.core.serialize as ser

    _FLAKY_CALLS.clear()
    assert serialize_obj(_FlakyOnLoad(7)).deserialize() == 7
    assert _FLAKY_CALLS == [7, 7]
    # a real circular import keeps failing: raised after the bounded wait
    monkeypatch.setattr(ser, "IMPORT_RACE_TIMEOUT", 0.05)
    with pytest.raises(ImportError, match="partially initialized"):
        serialize_obj(_Circular()).deserialize()
    # other import errors are not retried
    import os
    import pickle

    missing = pickle.dumps(os.getcwd, protocol=5).replace(b"\x8c\x05posix", b"\x8c\x05qqqqq")
    with pytest.raises(ModuleNotFoundError, match="qqqqq"):
        Serialized(1, [missing]).deserialize()
