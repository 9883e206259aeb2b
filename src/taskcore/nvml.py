"""What this machine's NVIDIA GPUs are, asked of NVML: the only module that talks to it.

NVML comes from nvidia-ml-py (`pip install 'taskcore[cuda]'`), imported on first use.
Every call is wrapped, so a machine without a GPU or driver, or a GPU that fails,
is a clear error and never a crashed worker (distributed #4965):

- `NVMLUnavailable`: nothing can be asked (nvidia-ml-py missing, no driver, NVML
  failing to start). Its message starts "no NVIDIA GPU visible: NVML says ...".
- `NVMLDeviceError`: one device's query failed (a GPU fallen off the bus answers
  NVML_ERROR_GPU_IS_LOST to everything); the message names the device and NVML's
  answer. `devices()` lists such a device with `error` set instead of raising, so
  the healthy ones stay usable.

Indexes are NVML's (PCI bus order), not CUDA ordinals inside a process's
CUDA_VISIBLE_DEVICES: deploy/cuda.py sets CUDA_DEVICE_ORDER=PCI_BUS_ID in GPU
workers so that the two agree. NVML is initialised once per process and never
shut down (initialising costs milliseconds; shutting down buys nothing).
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

__all__ = ["NVMLUnavailable", "NVMLDeviceError", "Device", "MigDevice", "device_count",
           "devices", "device", "device_uuid", "device_name", "mig_mode", "mig_devices",
           "cpu_affinity", "device_total_memory", "driver_version", "lookup"]


class NVMLUnavailable(RuntimeError):
    """NVML cannot be used here: no GPU, no driver, or no nvidia-ml-py."""


class NVMLDeviceError(RuntimeError):
    """A query about one device failed; the message names the device and NVML's answer."""


@dataclass(frozen=True)
class MigDevice:
    """A MIG instance: a slice of a GPU in MIG mode, with a UUID "MIG-..." of its own."""
    uuid: str
    name: str
    total_memory: int
    parent_index: int         # NVML index of the GPU it lives on
    parent_uuid: str
    gpu_instance_id: int
    compute_instance_id: int


@dataclass(frozen=True)
class Device:
    """A physical GPU as NVML sees it. `error` is set (and the rest may be empty) when
    NVML could not describe it."""
    index: int
    uuid: str = ""
    name: str = ""
    total_memory: int = 0
    mig_enabled: bool = False
    mig_devices: tuple = field(default=())
    error: str | None = None


_lock = threading.Lock()
_pynvml = None               # the initialised module
_unavailable: str | None = None  # why not, once known (NVML's answer does not change)


def _nvml():
    """The initialised pynvml module, or NVMLUnavailable saying why not."""
    global _pynvml, _unavailable
    if _pynvml is not None:
        return _pynvml
    with _lock:
        if _pynvml is not None:
            return _pynvml
        if _unavailable is None:
            try:
                import pynvml
            except ImportError as e:
                _unavailable = (f"no NVIDIA GPU visible: nvidia-ml-py is not installed ({e}); "
                                f"pip install 'taskcore[cuda]'")
            else:
                try:
                    pynvml.nvmlInit()
                except pynvml.NVMLError as e:
                    hint = ""
                    if isinstance(e, (pynvml.NVMLError_LibraryNotFound,
                                      pynvml.NVMLError_DriverNotLoaded)):
                        hint = " (is the NVIDIA driver installed and loaded?)"
                    _unavailable = f"no NVIDIA GPU visible: NVML says {e}{hint}"
                except OSError as e:
                    _unavailable = f"no NVIDIA GPU visible: loading NVML failed: {e}"
                else:
                    _pynvml = pynvml
                    return pynvml
        raise NVMLUnavailable(_unavailable)


def _reset():
    """Forget what was learnt (tests switch recordings of the NVML stand-in with this)."""
    global _pynvml, _unavailable
    with _lock:
        if _pynvml is not None:
            try:
                _pynvml.nvmlShutdown()
            except Exception:
                pass
        _pynvml, _unavailable = None, None


def _call(what: str, fn_name: str, *args):
    nv = _nvml()
    try:
        return getattr(nv, fn_name)(*args)
    except nv.NVMLError as e:
        raise NVMLDeviceError(f"{what}: NVML says {e} ({type(e).__name__})") from e


def _handle(index: int):
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"a GPU index is an integer >= 0, got {index!r}")
    n = device_count()
    if index >= n:
        raise ValueError(f"no GPU with index {index}: NVML sees {n} (0-{n - 1})" if n else
                         f"no GPU with index {index}: NVML sees none")
    return _call(f"GPU {index}", "nvmlDeviceGetHandleByIndex", index)


def _flag(value) -> bool:
    """NVML booleans arrive as ints or as ctypes c_uint (nvmlDeviceIsMigDeviceHandle)."""
    return bool(getattr(value, "value", value))


# -- the machine ---------------------------------------------------------------------------------
def driver_version() -> str:
    return str(_call("the driver version", "nvmlSystemGetDriverVersion"))


def device_count() -> int:
    """How many physical GPUs NVML sees (MIG instances not counted)."""
    return int(_call("the device count", "nvmlDeviceGetCount"))


def device_uuid(index: int) -> str:
    return str(_call(f"GPU {index}", "nvmlDeviceGetUUID", _handle(index)))


def device_name(index: int) -> str:
    return str(_call(f"GPU {index}", "nvmlDeviceGetName", _handle(index)))


def mig_mode(index: int) -> bool:
    """Whether GPU `index` is in MIG mode now (a GPU without MIG support: False)."""
    nv = _nvml()
    handle = _handle(index)
    try:
        current = nv.nvmlDeviceGetMigMode(handle)[0]
    except nv.NVMLError_NotSupported:
        return False
    except nv.NVMLError as e:
        raise NVMLDeviceError(f"GPU {index}: NVML says {e} ({type(e).__name__})") from e
    return current == getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1)


def mig_devices(index: int) -> list[MigDevice]:
    """The MIG instances on GPU `index` (empty when it is not in MIG mode)."""
    if not mig_mode(index):
        return []
    nv = _nvml()
    handle = _handle(index)
    parent = device_uuid(index)
    out = []
    for slot in range(int(_call(f"GPU {index}", "nvmlDeviceGetMaxMigDeviceCount", handle))):
        try:
            mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nv.NVMLError_NotFound:
            continue  # an empty slot
        except nv.NVMLError as e:
            raise NVMLDeviceError(f"GPU {index}, MIG slot {slot}: NVML says {e}") from e
        what = f"GPU {index}, MIG slot {slot}"
        out.append(MigDevice(
            uuid=str(_call(what, "nvmlDeviceGetUUID", mh)),
            name=str(_call(what, "nvmlDeviceGetName", mh)),
            total_memory=int(_call(what, "nvmlDeviceGetMemoryInfo", mh).total),
            parent_index=index, parent_uuid=parent,
            gpu_instance_id=int(_call(what, "nvmlDeviceGetGpuInstanceId", mh)),
            compute_instance_id=int(_call(what, "nvmlDeviceGetComputeInstanceId", mh))))
    return out


def device(index: int) -> Device:
    """GPU `index` described; NVMLDeviceError when NVML cannot describe it."""
    handle = _handle(index)
    what = f"GPU {index}"
    migs = tuple(mig_devices(index))
    return Device(index=index, uuid=str(_call(what, "nvmlDeviceGetUUID", handle)),
                  name=str(_call(what, "nvmlDeviceGetName", handle)),
                  total_memory=int(_call(what, "nvmlDeviceGetMemoryInfo", handle).total),
                  mig_enabled=bool(migs) or mig_mode(index), mig_devices=migs)


def devices() -> list[Device]:
    """Every GPU NVML sees, in index order; one that fails is listed with `error` set."""
    out = []
    for i in range(device_count()):
        try:
            out.append(device(i))
        except NVMLDeviceError as e:
            out.append(Device(index=i, error=str(e)))
    return out


def cpu_affinity(index: int, ncpus: int | None = None) -> set[int]:
    """The CPUs closest to GPU `index` (its NUMA node's), from NVML's bitmask.

    `ncpus`: how many CPU ids the mask covers (default: this machine's, os.cpu_count()).
    For a MIG instance ask for its parent GPU's index: MIG handles have no affinity.
    """
    ncpus = ncpus or os.cpu_count() or 1
    words = _call(f"GPU {index}", "nvmlDeviceGetCpuAffinity", _handle(index),
                  math.ceil(ncpus / 64))
    cpus = set()
    for w, word in enumerate(words):  # word w holds CPUs 64*w .. 64*w+63, lowest bit first
        word = int(word)
        while word:
            low = word & -word
            cpus.add(64 * w + low.bit_length() - 1)
            word ^= low
    return cpus


# -- finding a device by what CUDA_VISIBLE_DEVICES calls it ---------------------------------------
def lookup(entry) -> Device | MigDevice:
    """The device one CUDA_VISIBLE_DEVICES entry names: an NVML index (int or digits), a
    GPU UUID ("GPU-..."), a MIG UUID ("MIG-..."), a unique prefix of a UUID (as CUDA
    accepts), or the legacy MIG form "MIG-GPU-<uuid>/<gpu instance>/<compute instance>".
    ValueError naming what exists when nothing (or more than one device) matches."""
    text = str(entry).strip()
    if isinstance(entry, int) or text.isdigit():
        return device(int(text))
    healthy = [d for d in devices() if d.error is None]
    if text.startswith("MIG-GPU-"):
        gpu, _, rest = text[len("MIG-"):].partition("/")
        ids = rest.split("/")
        if len(ids) != 2 or not all(x.isdigit() for x in ids):
            raise ValueError(f"{text!r}: the legacy MIG form is MIG-GPU-<uuid>/<gpu instance "
                             f"id>/<compute instance id>")
        for d in healthy:
            if d.uuid == gpu:
                for m in d.mig_devices:
                    if (m.gpu_instance_id, m.compute_instance_id) == (int(ids[0]), int(ids[1])):
                        return m
                raise ValueError(f"{text!r}: GPU {d.index} ({gpu}) has no MIG instance "
                                 f"{ids[0]}/{ids[1]}; it has "
                                 f"{_describe_migs(d) or 'none (not in MIG mode)'}")
        raise ValueError(f"{text!r}: no GPU {gpu}; {describe()}")
    candidates = [(d.uuid, d) for d in healthy]
    candidates += [(m.uuid, m) for d in healthy for m in d.mig_devices]
    exact = [d for u, d in candidates if u == text]
    if exact:
        return exact[0]
    if text.startswith(("GPU-", "MIG-")) and len(text) > 4:
        found = [d for u, d in candidates if u.startswith(text)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{text!r} is a prefix of {len(found)} device UUIDs: "
                             f"{', '.join(d.uuid for d in found)}")
    failing = [d for d in devices() if d.error is not None]
    extra = "".join(f"; {d.error}" for d in failing)
    raise ValueError(f"no device {text!r}: {describe()}{extra}")


def _describe_migs(d: Device) -> str:
    return ", ".join(f"{m.uuid} ({m.gpu_instance_id}/{m.compute_instance_id}, {m.name})"
                     for m in d.mig_devices)


def describe() -> str:
    """What NVML sees, in one line, for error messages."""
    try:
        devs = devices()
    except (NVMLUnavailable, NVMLDeviceError) as e:
        return str(e)
    if not devs:
        return "NVML sees no GPU"
    parts = []
    for d in devs:
        if d.error:
            parts.append(f"{d.index}: unusable ({d.error})")
        elif d.mig_devices:
            parts.append(f"{d.index}: {d.uuid} {d.name}, MIG instances {_describe_migs(d)}")
        else:
            parts.append(f"{d.index}: {d.uuid} {d.name}")
    return "NVML sees " + "; ".join(parts)


def device_total_memory(index=None) -> int:
    """Total memory in bytes of one device (a MIG instance: its own slice).

    `index`: an NVML index, or any CUDA_VISIBLE_DEVICES entry (see `lookup`); None
    means this process's device, the first entry of its CUDA_VISIBLE_DEVICES (GPU
    0 when that is unset). Raises NVMLUnavailable (no GPU), ValueError (no such
    device) or NVMLDeviceError (NVML failed), each saying so.
    """
    if index is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            first = visible.split(",")[0].strip()
            if not first:
                raise ValueError("CUDA_VISIBLE_DEVICES is empty: this process sees no GPU")
            index = first
        else:
            index = 0
    found = lookup(index)
    return int(found.total_memory)
