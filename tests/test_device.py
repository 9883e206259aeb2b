"""taskcore.device: which objects are GPU objects, the frames and views it makes, and how
the runtime is chosen (TASKCORE_DEVICE_RUNTIME, then CuPy, Numba, RMM). There is no GPU
here: the stand-in runtime (tests/gpu_standin/device_runtime.py) plays the device."""
import os
import subprocess
import sys

import numpy as np
import pytest

import taskcore.device as device
from gpu_standin.device_runtime import StandinDeviceArray, StandinOutOfMemoryError, runtime
from taskcore.device import (DeviceArray, DeviceFrame, DeviceRuntimeUnavailable,
                             family_for_type, is_device_buffer)
from taskcore.testing import import_required

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def fresh_runtime(monkeypatch):
    monkeypatch.delenv(device.ENV_RUNTIME, raising=False)
    device._reset_runtime()
    runtime.capacity = None
    yield
    runtime.capacity = None
    device._reset_runtime()


class CPUTensorLike:
    """Like a CPU torch tensor: its type has the attribute, the instance refuses it."""

    @property
    def __cuda_array_interface__(self):
        raise AttributeError("Can't get __cuda_array_interface__ on non-CUDA tensor")


def test_is_device_buffer():
    d = runtime.alloc(16)
    assert is_device_buffer(d) and is_device_buffer(DeviceFrame(d, d.ptr, 16))
    assert not is_device_buffer(np.ones(3)) and not is_device_buffer(b"x")
    assert not is_device_buffer(CPUTensorLike())


def test_device_frame_and_array_views_share_memory():
    d = runtime.array(np.arange(12, dtype="f4").reshape(3, 4))
    f = DeviceFrame(d, d.ptr, d.nbytes)
    assert f.__cuda_array_interface__["data"] == (d.ptr, False) and len(f) == 48
    assert "stream" not in f.__cuda_array_interface__
    assert DeviceFrame(d, d.ptr, 48, stream=1).__cuda_array_interface__["stream"] == 1
    v = DeviceArray(d, d.ptr, (4, 3), "<f4", (4, 16))     # the transpose, by strides
    assert v.nbytes == 48
    back = runtime.asarray(v)
    np.testing.assert_array_equal(back.get(), np.arange(12, dtype="f4").reshape(3, 4).T)


def test_contiguity_from_strides():
    c = device._contiguity
    assert c([3, 4], "<f8", None) == "C"
    assert c([3, 4], "<f8", (32, 8)) == "C"
    assert c([3, 4], "<f8", (8, 24)) == "F"
    assert c([3, 4], "<f8", (64, 8)) is None
    assert c([1, 4], "<f8", (999, 8)) == "C"         # a length-1 axis has any stride
    assert c([0, 4], "<f8", (8, 8)) == "C"


def test_family_for_type():
    assert family_for_type(np.ndarray) is None and family_for_type(int) is None
    assert family_for_type(StandinDeviceArray).name == "cuda"     # generic: CAI
    assert family_for_type(CPUTensorLike).name == "cuda"
    assert not family_for_type(CPUTensorLike).claims(CPUTensorLike())
    assert set(device.FAMILIES) == {"cupy", "numba", "torch", "cuda"}


def test_the_environment_names_the_runtime(monkeypatch):
    monkeypatch.setenv(device.ENV_RUNTIME, "gpu_standin.device_runtime:runtime")
    assert device.device_runtime() is runtime
    assert device.device_runtime() is runtime          # chosen once
    device._reset_runtime()
    monkeypatch.setenv(device.ENV_RUNTIME, "gpu_standin.device_runtime:StandinRuntime")
    rt = device.device_runtime()                       # a class: instantiated
    assert rt is not runtime and rt.name == "standin"


@pytest.mark.parametrize("spec, error, match", [
    ("nocolon", ValueError, "module:attr"),
    ("no_such_module_xyz:rt", DeviceRuntimeUnavailable, "cannot be loaded"),
    ("gpu_standin.device_runtime:nothing", DeviceRuntimeUnavailable, "cannot be loaded"),
    ("gpu_standin.device_runtime:np", TypeError, "not a device runtime"),
])
def test_bad_runtime_names(monkeypatch, spec, error, match):
    monkeypatch.setenv(device.ENV_RUNTIME, spec)
    with pytest.raises(error, match=match):
        device.device_runtime()


def test_runtime_order_cupy_numba_rmm(monkeypatch):
    made = []

    def fake(name, available):
        def init(self):
            if not available:
                raise ImportError(f"No module named {name!r}")
            made.append(name)
        return init

    monkeypatch.setattr(device.CupyRuntime, "__init__", fake("cupy", False))
    monkeypatch.setattr(device.NumbaRuntime, "__init__", fake("numba", True))
    monkeypatch.setattr(device.RMMRuntime, "__init__", fake("rmm", True))
    assert isinstance(device.device_runtime(), device.NumbaRuntime) and made == ["numba"]
    device._reset_runtime()
    monkeypatch.setattr(device.NumbaRuntime, "__init__", fake("numba", False))
    assert isinstance(device.device_runtime(), device.RMMRuntime)
    device._reset_runtime()
    monkeypatch.setattr(device.RMMRuntime, "__init__", fake("rmm", False))
    with pytest.raises(DeviceRuntimeUnavailable, match="no CUDA runtime"):
        device.device_runtime()


def test_the_rmm_runtime_views_without_a_gpu():
    import_required("rmm", "rmm comes with the ucx extra")
    rt = device.RMMRuntime()
    d = runtime.alloc(64)
    v = rt.asarray(d)
    assert isinstance(v, DeviceArray) and v.ptr == d.ptr and v.nbytes == 64
    assert rt.asarray(v) is v and rt.ascontiguousarray(v) is v
    strided = DeviceArray(d, d.ptr, (4,), "|u1", (16,))
    with pytest.raises(TypeError, match="needs cupy or numba"):
        rt.ascontiguousarray(strided)
    assert rt.nbytes(strided) == 4


def test_the_standin_counts_copies_and_runs_out_of_memory():
    runtime.reset_counts()
    a = runtime.array(np.arange(100.))
    assert runtime.counts["h2d"] == 1
    host = runtime.to_host(a)
    assert runtime.counts["d2h"] == 1 and bytes(host) == np.arange(100.).tobytes()
    runtime.capacity = runtime.used + 1000
    with pytest.raises(StandinOutOfMemoryError, match="Out of memory allocating 8,000 bytes"):
        runtime.alloc(8000)
    used = runtime.used
    b = runtime.alloc(800)
    assert runtime.used == used + 800
    del b                                   # memory comes back with the last reference
    assert runtime.used == used
    with pytest.raises(ValueError, match="not stand-in device memory"):
        runtime.to_host(DeviceArray(None, 16, (4,), "|u1"))


def test_worker_processes_get_the_runtime_from_the_environment():
    env = dict(os.environ, TASKCORE_DEVICE_RUNTIME="gpu_standin.device_runtime:runtime",
               PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    code = ("from taskcore.device import device_runtime; "
            "import gpu_standin.device_runtime as s; "
            "print(device_runtime().name, device_runtime() is s.runtime)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["standin", "True"], out.stderr
