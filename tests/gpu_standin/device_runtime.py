"""A STAND-IN CUDA runtime for tests: there is no GPU on these machines.

`StandinDeviceArray` is not device memory. Its bytes live in host memory, but it shows
itself the only way GPU memory shows itself to taskcore: through
``__cuda_array_interface__`` (shape, typestr, strides, a data pointer), never through the
buffer protocol. So taskcore can read or fill it only through this runtime's `to_host` and
`from_host`, as it would real device memory through CuPy. The runtime

* counts what a real one would spend: allocations, host->device and device->host copies
  (`h2d`, `d2h`, with bytes) and device->device copies (`d2d`: making an array
  contiguous), so tests can tell zero-copy paths from copying ones;
* has a settable capacity (`capacity`, bytes; None: unlimited). Allocating past it raises
  `StandinOutOfMemoryError`, worded like CuPy's ``OutOfMemoryError``; memory comes back
  when the last array over an allocation is garbage collected;
* refuses pointers that are not its own allocations (a real runtime would fault).

Select it in a process with ``TASKCORE_DEVICE_RUNTIME=gpu_standin.device_runtime:runtime``
(``tests/`` on ``sys.path``), or ``taskcore.device._runtime = runtime`` in-process.
"""
from __future__ import annotations

import ctypes
import threading
import weakref

import numpy as np


class StandinOutOfMemoryError(MemoryError):
    """What the stand-in raises past its capacity (CuPy: cupy.cuda.memory.OutOfMemoryError)."""


class _Allocation:
    """One stand-in "cudaMalloc": host bytes at a fixed address."""

    __slots__ = ("buf", "ptr", "nbytes", "__weakref__")

    def __init__(self, nbytes):
        self.buf = bytearray(max(nbytes, 1))        # never resized: its address is fixed
        self.ptr = ctypes.addressof((ctypes.c_char * len(self.buf)).from_buffer(self.buf))
        self.nbytes = nbytes


class StandinDeviceArray:
    """An n-d array in stand-in device memory (see the module doc): ``shape``, ``dtype``,
    ``strides``, ``nbytes``, ``__cuda_array_interface__``; ``get()`` copies it to a numpy
    array (counted), ``.T`` and ``[...]`` give views (no copy)."""

    def __init__(self, alloc, offset, shape, dtype, strides=None, owner=None):
        self._alloc = alloc
        self._offset = offset
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._strides = None if strides is None else tuple(strides)
        self._owner = owner           # a foreign CAI object this array wraps (kept alive)

    # -- what taskcore sees ----------------------------------------------------------------
    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str,
                "data": (self._alloc.ptr + self._offset, False),
                "strides": self._strides, "version": 3}

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ptr(self):
        return self._alloc.ptr + self._offset

    # -- the stand-in's "kernels": numpy over the allocation's bytes (not counted) ---------
    def _view(self):
        return np.ndarray(self.shape, self.dtype, buffer=self._alloc.buf, offset=self._offset,
                          strides=self._strides)

    def _wrap_view(self, v):
        offset = v.__array_interface__["data"][0] - self._alloc.ptr
        strides = None if v.flags.c_contiguous else v.strides
        return StandinDeviceArray(self._alloc, offset, v.shape, v.dtype, strides, self._owner)

    @property
    def flags(self):
        return self._view().flags

    @property
    def T(self):
        return self._wrap_view(self._view().T)

    def __getitem__(self, index):
        return self._wrap_view(self._view()[index])

    def __len__(self):
        return self.shape[0]

    def get(self):
        """A host (numpy) copy, counted as a device->host copy."""
        runtime._count("d2h", self.nbytes)
        return self._view().copy()

    def __reduce__(self):
        # As CuPy pickles its arrays: a host copy, put back on the device when unpickled.
        return (_array_from_host, (self.get(),))

    def __repr__(self):
        return f"StandinDeviceArray(shape={self.shape}, dtype={self.dtype})"


def _array_from_host(a):
    return runtime.array(a)


class StandinRuntime:
    """The stand-in runtime: taskcore.device's runtime interface, plus counters."""

    name = "standin"

    def __init__(self):
        self.capacity = None
        self._lock = threading.Lock()
        self._live: dict = {}             # ptr -> weakref of its _Allocation
        self.used = 0
        self.reset_counts()

    def reset_counts(self):
        self.counts = {"alloc": 0, "h2d": 0, "d2h": 0, "d2d": 0}
        self.bytes = {"alloc": 0, "h2d": 0, "d2h": 0, "d2d": 0}

    def _count(self, what, nbytes):
        with self._lock:
            self.counts[what] += 1
            self.bytes[what] += nbytes

    # -- memory --------------------------------------------------------------------------------
    def _malloc(self, nbytes):
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        with self._lock:
            if self.capacity is not None and self.used + nbytes > self.capacity:
                raise StandinOutOfMemoryError(
                    f"Out of memory allocating {nbytes:,} bytes (allocated so far: "
                    f"{self.used:,} bytes, stand-in device capacity {self.capacity:,} bytes).")
            a = _Allocation(nbytes)
            self.used += nbytes
            self._live[a.ptr] = weakref.ref(a)
            self.counts["alloc"] += 1
            self.bytes["alloc"] += nbytes
        weakref.finalize(a, self._free, a.ptr, nbytes)
        return a

    def _free(self, ptr, nbytes):
        with self._lock:
            self.used -= nbytes
            self._live.pop(ptr, None)

    def _find(self, ptr, nbytes):
        """The live allocation holding [ptr, ptr + nbytes), and the offset in it."""
        with self._lock:
            for base, ref in self._live.items():
                a = ref()
                if a is not None and base <= ptr and ptr + nbytes <= base + len(a.buf):
                    return a, ptr - base
        raise ValueError(f"{nbytes} bytes at {ptr:#x} are not stand-in device memory "
                         f"(a real CUDA runtime would fault here)")

    # -- taskcore.device's runtime interface --------------------------------------------------
    def alloc(self, nbytes):
        return StandinDeviceArray(self._malloc(nbytes), 0, (int(nbytes),), np.uint8)

    def nbytes(self, obj):
        cai = obj.__cuda_array_interface__
        return int(np.prod(cai["shape"], dtype=np.int64)) * np.dtype(cai["typestr"]).itemsize

    def asarray(self, obj):
        """Any CAI object over stand-in memory as a StandinDeviceArray (no copy)."""
        if isinstance(obj, StandinDeviceArray):
            return obj
        cai = obj.__cuda_array_interface__
        dt = np.dtype(cai["typestr"])
        shape = tuple(cai["shape"])
        span = _span(shape, dt.itemsize, cai.get("strides"))
        alloc, offset = self._find(cai["data"][0], span)
        return StandinDeviceArray(alloc, offset, shape, dt, cai.get("strides"), owner=obj)

    def ascontiguousarray(self, a):
        a = self.asarray(a)
        if a.flags.c_contiguous or a.flags.f_contiguous:
            return a
        out = self.empty(a.shape, a.dtype)
        out._view()[...] = a._view()
        self._count("d2d", a.nbytes)
        return out

    def to_host(self, buf):
        a = self.asarray(buf)
        if not (a.flags.c_contiguous or a.flags.f_contiguous):
            raise ValueError("to_host needs a contiguous device buffer")
        out = bytearray(a.nbytes)
        if a.nbytes:
            ctypes.memmove((ctypes.c_char * a.nbytes).from_buffer(out), a.ptr, a.nbytes)
        self._count("d2h", a.nbytes)
        return out

    def from_host(self, buf):
        mv = memoryview(buf).cast("B")
        a = self.alloc(mv.nbytes)
        if mv.nbytes:
            a._view()[:] = np.frombuffer(mv, dtype=np.uint8)
        self._count("h2d", mv.nbytes)
        return a

    def synchronize(self):
        """Nothing is ever queued on the stand-in: copies are done when they return."""

    # -- conveniences for tests (like cupy.empty / cupy.asarray(numpy)) ------------------------
    def empty(self, shape, dtype):
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return StandinDeviceArray(self._malloc(int(np.prod(shape, dtype=np.int64)) * dt.itemsize),
                                  0, shape, dt)

    def array(self, host):
        """A device copy of a numpy array (counted as host->device)."""
        host = np.asarray(host)
        if not host.flags.c_contiguous:
            host = host.copy(order="C")         # (ascontiguousarray makes 0-d arrays 1-d)
        out = self.empty(host.shape, host.dtype)
        out._view()[...] = host
        self._count("h2d", host.nbytes)
        return out


def _span(shape, item, strides):
    if not shape or 0 in shape:
        return 0 if 0 in shape else item
    if strides is None:
        return int(np.prod(shape, dtype=np.int64)) * item
    return sum((s - 1) * abs(st) for s, st in zip(shape, strides)) + item


runtime = StandinRuntime()
