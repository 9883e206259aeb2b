"""A stand-in for the `pynvml` module (nvidia-ml-py), for machines without an NVIDIA GPU.

This is NOT NVML. It answers from a machine description (a JSON file beside
this module) chosen by `TASKCORE_NVML_STANDIN` when `nvmlInit()` runs:

    dgx-a100-8   8 A100s, each near its own NUMA node's CPUs
    mig-a100     an A100 in MIG mode with three instances, and one without
    h200-1       one H200
    failing      two H100s, the second lost (NVML_ERROR_GPU_IS_LOST on every call)
    none         no driver: nvmlInit raises NVMLError_LibraryNotFound (also when unset)

Tests put `tests/gpu_standin` first on PYTHONPATH (worker processes inherit it),
so `import pynvml` finds this package instead of the real module. It keeps the
real module's names, signatures, return types (ctypes structures and arrays,
`str` names and UUIDs, `nvmlDeviceIsMigDeviceHandle` returning a `c_uint`) and
error classes (`NVMLError(value)` maps to the `NVMLError_<Name>` subclass), and
its failures: calls before `nvmlInit` raise NVMLError_Uninitialized, unknown
indexes and UUIDs NVMLError_InvalidArgument / NVMLError_NotFound, CPU affinity
of a MIG handle NVMLError_NotSupported.
"""
from __future__ import annotations

import json
import os
import string
import sys
import threading
from ctypes import Structure, c_uint, c_ulonglong

STANDIN = True  # lets a test assert that this, not the real module, was imported
_HERE = os.path.dirname(os.path.abspath(__file__))

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_DEVICE_MIG_DISABLE = 0x0
NVML_DEVICE_MIG_ENABLE = 0x1


class NVMLError(Exception):
    """As in pynvml: `NVMLError(value)` builds the subclass for that error code."""
    _valClassMapping: dict = {}
    _errcode_to_string = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
        NVML_ERROR_NOT_FOUND: "Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_TIMEOUT: "Timeout",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }

    def __new__(typ, value):
        if typ == NVMLError:
            typ = NVMLError._valClassMapping.get(value, typ)
        obj = Exception.__new__(typ)
        obj.value = value
        return obj

    def __str__(self):
        return self._errcode_to_string.get(self.value, "NVML Error with code %d" % self.value)

    def __eq__(self, other):
        return self.value == other.value

    __hash__ = Exception.__hash__


def _make_error_classes():
    module = sys.modules[__name__]
    for name in [n for n in dir(module) if n.startswith("NVML_ERROR_")]:
        cls_name = "NVMLError_" + string.capwords(name.replace("NVML_ERROR_", ""), "_").replace("_", "")
        value = getattr(module, name)

        def gen_new(val):
            def new(typ, *args):
                return NVMLError.__new__(typ, val)
            return new
        cls = type(cls_name, (NVMLError,), {"__new__": gen_new(value)})
        cls.__module__ = __name__
        setattr(module, cls_name, cls)
        NVMLError._valClassMapping[value] = cls


_make_error_classes()


def nvmlExceptionClass(nvmlErrorCode):
    if nvmlErrorCode not in NVMLError._valClassMapping:
        raise ValueError("nvmlErrorCode %s is not valid" % nvmlErrorCode)
    return NVMLError._valClassMapping[nvmlErrorCode]


class c_nvmlMemory_t(Structure):
    _fields_ = [("total", c_ulonglong), ("free", c_ulonglong), ("used", c_ulonglong)]


class c_nvmlDevice_t:
    """An opaque device handle (a ctypes pointer in the real module)."""
    __slots__ = ("_gpu", "_mig")

    def __init__(self, gpu: int, mig: int | None = None):
        self._gpu = gpu      # index of the physical GPU in the recording
        self._mig = mig      # position in its "mig_devices", or None for the GPU itself

    def __repr__(self):
        return f"<stand-in nvmlDevice gpu={self._gpu} mig={self._mig}>"


# -- the loaded machine ---------------------------------------------------------------------------
_lock = threading.Lock()
_machine: dict | None = None
_refcount = 0


def _raise(code):
    raise NVMLError(code)


def _load():
    choice = os.environ.get("TASKCORE_NVML_STANDIN", "none").strip() or "none"
    if choice == "none":
        _raise(NVML_ERROR_LIBRARY_NOT_FOUND)  # no libnvidia-ml.so.1: no driver
    path = os.path.join(_HERE, f"{choice}.json")
    if not os.path.exists(path):
        raise ValueError(f"TASKCORE_NVML_STANDIN={choice!r}: no recording {path}")
    with open(path) as f:
        return json.load(f)


def nvmlInitWithFlags(flags):
    global _machine, _refcount
    with _lock:
        if _machine is None:
            _machine = _load()
        _refcount += 1


def nvmlInit():
    nvmlInitWithFlags(0)


def nvmlShutdown():
    global _machine, _refcount
    with _lock:
        if _machine is None:
            _raise(NVML_ERROR_UNINITIALIZED)
        _refcount -= 1
        if _refcount <= 0:
            _machine, _refcount = None, 0


def _m() -> dict:
    if _machine is None:
        _raise(NVML_ERROR_UNINITIALIZED)
    return _machine


def _gpu(handle) -> dict:
    if not isinstance(handle, c_nvmlDevice_t):
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    dev = _m()["devices"][handle._gpu]
    if dev.get("error"):
        _raise(globals()[f"NVML_ERROR_{dev['error']}"])
    return dev


def _target(handle) -> dict:
    dev = _gpu(handle)
    return dev if handle._mig is None else dev["mig_devices"][handle._mig]


def _cpus(text: str) -> list:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


# -- the API --------------------------------------------------------------------------------------
def nvmlSystemGetDriverVersion():
    return _m()["driver_version"]


def nvmlDeviceGetCount():
    return len(_m()["devices"])


def nvmlDeviceGetHandleByIndex(index):
    devices = _m()["devices"]
    if not isinstance(index, int) or not 0 <= index < len(devices):
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    handle = c_nvmlDevice_t(index)
    _gpu(handle)  # a lost GPU fails here already, as the real call does
    return handle


def nvmlDeviceGetHandleByUUID(uuid):
    if isinstance(uuid, bytes):
        uuid = uuid.decode()
    for i, dev in enumerate(_m()["devices"]):
        if dev["uuid"] == uuid:
            handle = c_nvmlDevice_t(i)
            _gpu(handle)
            return handle
        for j, mig in enumerate(dev.get("mig_devices") or ()):
            if mig["uuid"] == uuid:
                handle = c_nvmlDevice_t(i, j)
                _gpu(handle)
                return handle
    _raise(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetName(handle):
    return _target(handle)["name"]


def nvmlDeviceGetUUID(handle):
    return _target(handle)["uuid"]


def nvmlDeviceGetIndex(handle):
    _gpu(handle)
    if handle._mig is not None:
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    return handle._gpu


def nvmlDeviceGetMemoryInfo(handle, version=None):
    total = _target(handle)["memory_total"]
    used = _target(handle).get("memory_used", 0)
    return c_nvmlMemory_t(total, total - used, used)


def nvmlDeviceGetCpuAffinity(handle, cpuSetSize):
    dev = _gpu(handle)
    if handle._mig is not None:
        _raise(NVML_ERROR_NOT_SUPPORTED)  # a MIG handle has no affinity of its own
    words = (c_ulonglong * cpuSetSize)()
    for cpu in _cpus(dev["cpu_affinity"]):
        if cpu // 64 < cpuSetSize:  # the real call truncates to the buffer given
            words[cpu // 64] |= 1 << (cpu % 64)
    return words


def nvmlDeviceGetMigMode(device):
    dev = _gpu(device)
    if device._mig is not None:
        _raise(NVML_ERROR_NOT_SUPPORTED)
    if "mig_mode" not in dev:
        _raise(NVML_ERROR_NOT_SUPPORTED)  # a GPU without MIG
    return list(dev["mig_mode"])


def nvmlDeviceIsMigDeviceHandle(device):
    _gpu(device)
    return c_uint(0 if device._mig is None else 1)  # a c_uint, as the real call returns


def nvmlDeviceGetMaxMigDeviceCount(device):
    dev = _gpu(device)
    if device._mig is not None:
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    return dev.get("max_mig_devices", 0)


def nvmlDeviceGetMigDeviceHandleByIndex(device, index):
    dev = _gpu(device)
    if device._mig is not None or not 0 <= index < dev.get("max_mig_devices", 0):
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    if dev.get("mig_mode", [0, 0])[0] != NVML_DEVICE_MIG_ENABLE:
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    for j, mig in enumerate(dev.get("mig_devices") or ()):
        if mig["slot"] == index:
            return c_nvmlDevice_t(device._gpu, j)
    _raise(NVML_ERROR_NOT_FOUND)  # an empty slot


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(migDevice):
    _gpu(migDevice)
    if migDevice._mig is None:
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    return c_nvmlDevice_t(migDevice._gpu)


def nvmlDeviceGetGpuInstanceId(device):
    if device._mig is None:
        _gpu(device)
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    return _target(device)["gpu_instance_id"]


def nvmlDeviceGetComputeInstanceId(device):
    if device._mig is None:
        _gpu(device)
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    return _target(device)["compute_instance_id"]
