"""GPU objects: the device runtime seam and how device arrays travel as frames.

Objects whose type exposes ``__cuda_array_interface__`` (CuPy and Numba device arrays,
PyTorch CUDA tensors, anything else speaking the CUDA Array Interface) do not go through
pickle: `serialize` (core/serialize.pyx) takes each apart with its *family* here into a
small header and its device memory as frames, and rebuilds it from those frames on the
other side. ``dumps`` copies the device frames to host (tcp, tls, inproc and the spill
files carry host bytes); ``dumps_device`` keeps them on the device for a transport that
moves device memory itself (ucx). ``loads`` accepts either kind of frame: a host frame is
copied to the device with the runtime's ``from_host``.

The runtime. Moving bytes between host and device takes a CUDA library. `device_runtime()`
picks one per process, the first of:

1. ``TASKCORE_DEVICE_RUNTIME=module:attr`` in the environment: the plug-in point, for a
   library of your own (and how the tests put their stand-in runtime, which is named as
   one, into worker processes). ``attr`` is a runtime object, or a class or function
   that makes one;
2. CuPy, 3. Numba (``numba.cuda``), 4. RMM (``rmm``, which the ``ucx`` extra brings).

A runtime has ``name`` and these methods (one small class per library below):

    alloc(nbytes)        a device buffer: exposes ``__cuda_array_interface__`` and ``nbytes``
    to_host(buf)         a host copy (memoryview or bytearray) of a contiguous device buffer
    from_host(buf)       a device copy of a host buffer
    nbytes(obj)          the bytes of a device object
    asarray(obj)         any CUDA-Array-Interface object as the runtime's own array type,
                         sharing its memory
    ascontiguousarray(a) ``a`` itself if contiguous, else a contiguous device copy
    synchronize()        (optional) wait for the device's queued work, before a transport
                         reads device memory that kernels may still be writing

Families (`family_for_type`): CuPy ndarray, Numba device array, PyTorch CUDA tensor, and a
generic ``__cuda_array_interface__`` object, rebuilt as the runtime's own array type. A
non-contiguous array is made contiguous first (one device copy); a C- or Fortran-ordered
one travels as its own memory (no copy).

Device objects nested inside a pickled object (a dict inside a user class, say) are pickled
by their library: CuPy, Numba and PyTorch copy them to host and back, which is correct but
not zero-copy. Device objects that are message values, or items of lists, tuples and dicts
that msgpack carries, go through the families here.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading

from taskcore.errors import ProtocolError

__all__ = ["DeviceFrame", "DeviceArray", "DeviceRuntimeUnavailable", "ENV_RUNTIME",
           "device_runtime", "family_for_type", "is_device_buffer", "rebuild",
           "CupyRuntime", "NumbaRuntime", "RMMRuntime"]

ENV_RUNTIME = "TASKCORE_DEVICE_RUNTIME"
_RUNTIME_METHODS = ("alloc", "to_host", "from_host", "nbytes", "asarray", "ascontiguousarray")


class DeviceRuntimeUnavailable(ImportError):
    """A GPU object must be copied or rebuilt, but no CUDA library is importable here."""


def is_device_buffer(obj) -> bool:
    """True for an object in GPU memory: it exposes ``__cuda_array_interface__`` and is
    not a host buffer (a CPU PyTorch tensor has the attribute but raises on it)."""
    if not hasattr(type(obj), "__cuda_array_interface__"):
        return False
    try:
        memoryview(obj)
        return False                    # a host buffer that also speaks CAI
    except TypeError:
        pass
    try:
        obj.__cuda_array_interface__
    except Exception:
        return False
    return True


# -- frames ---------------------------------------------------------------------------------
class DeviceFrame:
    """A flat run of device bytes (``|u1``, 1-D) over memory that ``owner`` keeps alive:
    what ``dumps_device`` puts in a frame list. Any CUDA library (and ucxx) reads it
    through ``__cuda_array_interface__`` without copying."""

    __slots__ = ("owner", "ptr", "nbytes", "stream")

    def __init__(self, owner, ptr: int, nbytes: int, stream=None):
        self.owner = owner
        self.ptr = int(ptr)
        self.nbytes = int(nbytes)
        self.stream = stream

    @property
    def __cuda_array_interface__(self):
        cai = {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
               "strides": None, "version": 3}
        if self.stream is not None:
            cai["stream"] = self.stream
        return cai

    def __len__(self):
        return self.nbytes

    def __repr__(self):
        return f"<DeviceFrame {self.nbytes} bytes at {self.ptr:#x} of {type(self.owner).__name__}>"


class DeviceArray:
    """A typed view (shape, typestr, strides) of device memory kept alive by ``owner``: how
    the families hand memory to a library's ``asarray`` (zero copy), and what the RMM
    runtime, which has no array type, returns for generic objects."""

    __slots__ = ("owner", "ptr", "shape", "typestr", "strides", "nbytes")

    def __init__(self, owner, ptr, shape, typestr, strides=None, nbytes=None):
        self.owner = owner
        self.ptr = int(ptr)
        self.shape = tuple(shape)
        self.typestr = typestr
        self.strides = strides
        self.nbytes = nbytes if nbytes is not None else _prod(shape) * _itemsize(typestr)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.typestr, "data": (self.ptr, False),
                "strides": self.strides, "version": 3}


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(typestr):
    import numpy

    return numpy.dtype(typestr).itemsize


def _cai(obj):
    return obj.__cuda_array_interface__


def _frame_of(obj, cai=None):
    """A DeviceFrame over the memory of a contiguous CAI object."""
    cai = cai or _cai(obj)
    n = _prod(cai["shape"]) * _itemsize(cai["typestr"])
    return DeviceFrame(obj, cai["data"][0], n, cai.get("stream"))


def _contiguity(shape, typestr, strides):
    """"C", "F" or None for the layout these CAI strides describe."""
    if strides is None:
        return "C"
    item = _itemsize(typestr)
    if _prod(shape) <= 1:
        return "C"
    for order, dims in (("C", reversed(range(len(shape)))), ("F", range(len(shape)))):
        expect = item
        ok = True
        for d in dims:
            if shape[d] != 1 and strides[d] != expect:
                ok = False
                break
            expect *= shape[d]
        if ok:
            return order
    return None


def _f_strides(shape, item):
    strides, step = [], item
    for s in shape:
        strides.append(step)
        step *= s
    return tuple(strides)


# -- the runtime ----------------------------------------------------------------------------
_runtime = None
_runtime_lock = threading.Lock()


def device_runtime():
    """The CUDA runtime of this process (chosen once; see the module doc)."""
    global _runtime
    rt = _runtime
    if rt is not None:
        return rt
    with _runtime_lock:
        if _runtime is None:
            _runtime = _choose_runtime()
        return _runtime


def _reset_runtime():
    """Forget the chosen runtime (tests that change the environment)."""
    global _runtime
    with _runtime_lock:
        _runtime = None


def _choose_runtime():
    spec = os.environ.get(ENV_RUNTIME)
    if spec:
        return _plugin_runtime(spec)
    for cls in (CupyRuntime, NumbaRuntime, RMMRuntime):
        try:
            return cls()
        except ImportError:
            continue
    raise DeviceRuntimeUnavailable(
        "this object lives on a GPU but no CUDA runtime (cupy, numba or rmm) is importable "
        "here: install one (pip install cupy-cuda12x, or 'taskcore[ucx]' for rmm), or name "
        f"one with {ENV_RUNTIME}=module:attr")


def _plugin_runtime(spec):
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{ENV_RUNTIME}={spec!r}: expected module:attr")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise DeviceRuntimeUnavailable(f"{ENV_RUNTIME}={spec!r} cannot be loaded: {e}") from e
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "alloc")):
        obj = obj()
    missing = [m for m in _RUNTIME_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(f"{ENV_RUNTIME}={spec!r} is not a device runtime: it lacks {missing}")
    return obj


class _Runtime:
    name = "?"

    def nbytes(self, obj):
        n = getattr(obj, "nbytes", None)
        if isinstance(n, int):
            return n
        cai = _cai(obj)
        return _prod(cai["shape"]) * _itemsize(cai["typestr"])

    def __repr__(self):
        return f"<{type(self).__name__}>"


class CupyRuntime(_Runtime):
    """CuPy: arrays are ``cupy.ndarray``; copies go through ``asnumpy``/``asarray``."""

    name = "cupy"

    def __init__(self):
        import cupy

        self.cp = cupy

    def alloc(self, nbytes):
        return self.cp.empty(int(nbytes), dtype=self.cp.uint8)

    def to_host(self, buf):
        return memoryview(self.cp.asnumpy(self.cp.asarray(buf)))

    def from_host(self, buf):
        import numpy

        return self.cp.asarray(numpy.frombuffer(buf, dtype=numpy.uint8))

    def asarray(self, obj):
        return self.cp.asarray(obj)

    def ascontiguousarray(self, a):
        return self.cp.ascontiguousarray(a)

    def synchronize(self):
        self.cp.cuda.runtime.deviceSynchronize()


class NumbaRuntime(_Runtime):
    """Numba: arrays are ``numba.cuda`` device arrays."""

    name = "numba"

    def __init__(self):
        from numba import cuda

        self.cuda = cuda

    def alloc(self, nbytes):
        import numpy

        return self.cuda.device_array(int(nbytes), dtype=numpy.uint8)

    def to_host(self, buf):
        return memoryview(self.cuda.as_cuda_array(buf).copy_to_host())

    def from_host(self, buf):
        import numpy

        return self.cuda.to_device(numpy.frombuffer(buf, dtype=numpy.uint8))

    def asarray(self, obj):
        return self.cuda.as_cuda_array(obj)

    def ascontiguousarray(self, a):
        a = self.cuda.as_cuda_array(a)
        if a.is_c_contiguous() or a.is_f_contiguous():
            return a
        out = self.cuda.device_array(a.shape, dtype=a.dtype)
        out[:] = a                      # numba's device-side assignment kernel
        return out

    def synchronize(self):
        self.cuda.synchronize()


class RMMRuntime(_Runtime):
    """RMM: buffers are ``rmm.DeviceBuffer``; it has no array type, so generic objects come
    back as `DeviceArray` views, which CuPy, Numba and PyTorch all take without a copy."""

    name = "rmm"

    def __init__(self):
        import rmm

        try:
            from rmm.pylibrmm.device_buffer import copy_ptr_to_host
        except ImportError:             # rmm before 24.12
            from rmm._lib.device_buffer import copy_ptr_to_host
        self.rmm = rmm
        self._copy_ptr_to_host = copy_ptr_to_host

    def alloc(self, nbytes):
        return self.rmm.DeviceBuffer(size=int(nbytes))

    def to_host(self, buf):
        cai = _cai(buf)
        n = _prod(cai["shape"]) * _itemsize(cai["typestr"])
        out = bytearray(n)
        if n:
            self._copy_ptr_to_host(cai["data"][0], out)
        return out

    def from_host(self, buf):
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        return self.rmm.DeviceBuffer.to_device(mv)

    def asarray(self, obj):
        if isinstance(obj, DeviceArray):
            return obj
        cai = _cai(obj)
        return DeviceArray(obj, cai["data"][0], cai["shape"], cai["typestr"], cai.get("strides"))

    def ascontiguousarray(self, a):
        cai = _cai(a)
        if _contiguity(cai["shape"], cai["typestr"], cai.get("strides")) is not None:
            return a
        raise TypeError("a non-contiguous GPU array needs cupy or numba to be made contiguous "
                        "for sending (rmm copies only flat buffers)")

    def synchronize(self):
        try:
            from rmm.pylibrmm.stream import DEFAULT_STREAM
        except ImportError:             # rmm before 24.12
            from rmm._cuda.stream import DEFAULT_STREAM
        DEFAULT_STREAM.synchronize()


# -- families -------------------------------------------------------------------------------
def _check_header(header, *fields):
    if type(header) is not dict or any(f not in header for f in fields):
        raise ProtocolError(f"device header {header!r} lacks one of {list(fields)}")
    shape = header["shape"]
    if type(shape) is not list or any(type(s) is not int or s < 0 for s in shape):
        raise ProtocolError(f"device header has a bad shape {shape!r}")
    return shape


def _dtype(typestr):
    import numpy

    if type(typestr) is not str:
        raise ProtocolError(f"device header has a bad dtype {typestr!r}")
    try:
        dt = numpy.dtype(typestr)
    except TypeError as e:
        raise ProtocolError(f"device header has a bad dtype {typestr!r}: {e}") from None
    if dt.hasobject or dt.itemsize == 0:
        raise ProtocolError(f"device header has a dtype that cannot live on a GPU: {typestr!r}")
    return dt


def _on_device(frame, nbytes):
    """A frame as device memory of exactly `nbytes`: device frames as they are, host
    frames copied to the device."""
    if hasattr(type(frame), "__cuda_array_interface__"):
        cai = _cai(frame)
        n = _prod(cai["shape"]) * _itemsize(cai["typestr"])
        buf = frame
    else:
        try:
            n = memoryview(frame).nbytes
        except TypeError:
            raise ProtocolError(f"a device frame is a {type(frame).__name__}, neither host "
                                f"nor device memory") from None
        buf = None
    if n != nbytes:
        raise ProtocolError(f"device frame holds {n} bytes, the header says {nbytes}")
    if buf is None:
        buf = device_runtime().from_host(frame)
    return buf, _cai(buf)["data"][0]


def _typed(header, frames, shape):
    """(DeviceArray view of the frame with the header's dtype, shape and order, dtype)."""
    dt = _dtype(header["dtype"])
    order = header.get("order", "C")
    if order not in ("C", "F"):
        raise ProtocolError(f"device header has a bad order {order!r}")
    if len(frames) != 1:
        raise ProtocolError(f"a device array comes in 1 frame, not {len(frames)}")
    nbytes = _prod(shape) * dt.itemsize
    buf, ptr = _on_device(frames[0], nbytes)
    strides = _f_strides(shape, dt.itemsize) if order == "F" and len(shape) > 1 else None
    return DeviceArray(buf, ptr, shape, dt.str, strides, nbytes)


class _Family:
    name = "?"

    def claims(self, obj):
        """Is this instance on the device (the type said it may be)?"""
        return True

    def nbytes(self, obj):
        n = getattr(obj, "nbytes", None)
        if isinstance(n, int):
            return n
        cai = _cai(obj)
        return _prod(cai["shape"]) * _itemsize(cai["typestr"])


class _Cupy(_Family):
    name = "cupy"

    def split(self, a):
        import cupy

        if not (a.flags.c_contiguous or a.flags.f_contiguous):
            a = cupy.ascontiguousarray(a)               # one device copy
        order = "C" if a.flags.c_contiguous else "F"
        head = {"dtype": a.dtype.str, "shape": list(a.shape), "order": order}
        return head, [DeviceFrame(a, a.data.ptr, a.nbytes)]

    def build(self, header, frames):
        import cupy

        shape = _check_header(header, "dtype", "shape")
        return cupy.asarray(_typed(header, frames, shape))


class _Numba(_Family):
    name = "numba"

    def split(self, a):
        if not (a.is_c_contiguous() or a.is_f_contiguous()):
            a = NumbaRuntime().ascontiguousarray(a)     # one device copy
        order = "C" if a.is_c_contiguous() else "F"
        head = {"dtype": a.dtype.str, "shape": list(a.shape), "order": order}
        return head, [_frame_of(a)]

    def build(self, header, frames):
        from numba import cuda

        shape = _check_header(header, "dtype", "shape")
        return cuda.as_cuda_array(_typed(header, frames, shape))


class _Torch(_Family):
    name = "torch"

    def claims(self, t):
        return bool(t.is_cuda)

    def nbytes(self, t):
        return t.numel() * t.element_size()

    def split(self, t):
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()                          # one device copy
        head = {"dtype": str(t.dtype).rpartition(".")[2], "shape": list(t.shape)}
        # data_ptr, not __cuda_array_interface__: that refuses bfloat16 and grad tensors
        return head, [DeviceFrame(t, t.data_ptr(), t.numel() * t.element_size())]

    def build(self, header, frames):
        import torch

        shape = _check_header(header, "dtype", "shape")
        dtype = getattr(torch, header["dtype"], None) if type(header["dtype"]) is str else None
        if not isinstance(dtype, torch.dtype):
            raise ProtocolError(f"device header has a bad torch dtype {header['dtype']!r}")
        if len(frames) != 1:
            raise ProtocolError(f"a device tensor comes in 1 frame, not {len(frames)}")
        nbytes = _prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf, ptr = _on_device(frames[0], nbytes)
        flat = torch.as_tensor(DeviceArray(buf, ptr, (nbytes,), "|u1"), device="cuda")
        return flat.view(dtype).reshape(shape)


class _Generic(_Family):
    """Any other CUDA Array Interface object: rebuilt as the runtime's own array type."""

    name = "cuda"

    def claims(self, obj):
        try:
            cai = _cai(obj)
        except Exception:
            return False
        return cai.get("mask") is None

    def split(self, obj):
        cai = _cai(obj)
        shape, typestr = list(cai["shape"]), cai["typestr"]
        order = _contiguity(shape, typestr, cai.get("strides"))
        if order is None:                               # one device copy
            rt = device_runtime()
            obj = rt.ascontiguousarray(rt.asarray(obj))
            cai = _cai(obj)
            order = _contiguity(shape, typestr, cai.get("strides")) or "C"
        head = {"dtype": typestr, "shape": shape, "order": order}
        return head, [_frame_of(obj, cai)]

    def build(self, header, frames):
        shape = _check_header(header, "dtype", "shape")
        return device_runtime().asarray(_typed(header, frames, shape))


FAMILIES = {f.name: f for f in (_Cupy(), _Numba(), _Torch(), _Generic())}


def family_for_type(t):
    """The family of a type whose instances may live on a GPU, or None. Looks only at
    modules already imported (an object of a library not loaded cannot exist)."""
    if not hasattr(t, "__cuda_array_interface__"):
        return None
    mods = sys.modules
    cupy = mods.get("cupy")
    if cupy is not None and issubclass(t, cupy.ndarray):
        return FAMILIES["cupy"]
    torch = mods.get("torch")
    if torch is not None and issubclass(t, torch.Tensor):
        return FAMILIES["torch"]
    devicearray = mods.get("numba.cuda.cudadrv.devicearray")
    if devicearray is not None and issubclass(t, devicearray.DeviceNDArrayBase):
        return FAMILIES["numba"]
    return FAMILIES["cuda"]


def rebuild(name, header, frames):
    """The device object of a family's header and frames (device or host buffers)."""
    fam = FAMILIES.get(name) if type(name) is str else None
    if fam is None:
        raise ProtocolError(f"unknown device object family {name!r}")
    return fam.build(header, frames)
