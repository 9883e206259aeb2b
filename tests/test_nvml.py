"""taskcore.nvml against the NVML stand-in (tests/gpu_standin/pynvml: recorded machines,
no GPU needed), and the real nvidia-ml-py on this GPU-less machine."""
import os
import sys

import pytest

from taskcore import nvml

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_standin")


@pytest.fixture
def machine(monkeypatch):
    """`machine("dgx-a100-8")`: NVML answers from that recording (the stand-in module is
    imported as `pynvml`); the real module is put back afterwards."""
    monkeypatch.syspath_prepend(STANDIN)
    saved = sys.modules.pop("pynvml", None)
    nvml._reset()

    def use(name):
        nvml._reset()
        monkeypatch.setenv("TASKCORE_NVML_STANDIN", name)
    yield use
    nvml._reset()
    sys.modules.pop("pynvml", None)
    if saved is not None:
        sys.modules["pynvml"] = saved


def test_the_standin_is_what_answers(machine):
    machine("h200-1")
    assert nvml.device_count() == 1
    import pynvml
    assert getattr(pynvml, "STANDIN", False)


def test_dgx_devices_memory_and_affinity(machine):
    machine("dgx-a100-8")
    assert nvml.device_count() == 8
    devs = nvml.devices()
    assert [d.index for d in devs] == list(range(8))
    assert all(d.error is None and not d.mig_enabled and d.name == "NVIDIA A100-SXM4-80GB"
               for d in devs)
    assert len({d.uuid for d in devs}) == 8 and all(d.uuid.startswith("GPU-") for d in devs)
    assert nvml.device_total_memory(3) == 80 * 2**30
    # GPU i is attached to NUMA node i: CPUs i, i+8, ... (256 CPUs, four 64-bit words).
    assert nvml.cpu_affinity(3, ncpus=256) == set(range(3, 256, 8))
    # A smaller mask covers the lower CPUs only, as the real call does.
    assert nvml.cpu_affinity(3, ncpus=64) == set(range(3, 64, 8))
    assert nvml.driver_version() == "550.54.15"
    assert nvml.device_uuid(2) == devs[2].uuid and nvml.device_name(2) == devs[2].name
    assert nvml.lookup("GPU-a1000002") == devs[2]
    with pytest.raises(ValueError, match="'GPU-a100' is a prefix of 8 device UUIDs"):
        nvml.lookup("GPU-a100")


def test_mig_instances(machine):
    machine("mig-a100")
    assert nvml.mig_mode(0) is True and nvml.mig_mode(1) is False
    migs = nvml.mig_devices(0)
    # Slots 0, 1 and 3 are used; the empty slot 2 (NotFound) is skipped.
    assert [m.name.split()[-1] for m in migs] == ["3g.20gb", "2g.10gb", "1g.5gb"]
    assert all(m.uuid.startswith("MIG-") and m.parent_index == 0 for m in migs)
    assert [(m.gpu_instance_id, m.compute_instance_id) for m in migs] == [(1, 0), (5, 0), (13, 0)]
    assert nvml.mig_devices(1) == []
    assert nvml.device_total_memory(migs[1].uuid) == 9728 * 2**20
    # Lookups: full UUID, unique prefix, the legacy form; errors name what exists.
    assert nvml.lookup(migs[2].uuid) == migs[2]
    assert nvml.lookup(migs[2].uuid[:8]) == migs[2]
    assert nvml.lookup(f"MIG-{migs[0].parent_uuid}/5/0") == migs[1]
    with pytest.raises(ValueError, match="has no MIG instance 9/9; it has MIG-1c9b"):
        nvml.lookup(f"MIG-{migs[0].parent_uuid}/9/9")
    with pytest.raises(ValueError, match="no device 'MIG-'"):
        nvml.lookup("MIG-")  # a prefix needs more than the kind
    with pytest.raises(ValueError, match=r"no device 'GPU-ffff'.*NVML sees 0: GPU-5fd2"):
        nvml.lookup("GPU-ffff")


def test_this_process_device_from_cuda_visible_devices(machine, monkeypatch):
    machine("mig-a100")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-3e1d,1")
    assert nvml.device_total_memory() == 4864 * 2**20
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert nvml.device_total_memory() == 40960 * 2**20
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml.device_total_memory() == 40960 * 2**20  # GPU 0 (the whole GPU)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="sees no GPU"):
        nvml.device_total_memory()


def test_a_lost_gpu_is_a_clear_error_and_the_others_stay_usable(machine):
    machine("failing")
    devs = nvml.devices()
    assert devs[0].error is None and devs[0].name == "NVIDIA H100 80GB HBM3"
    assert devs[1].error == "GPU 1: NVML says GPU is lost (NVMLError_GpuIsLost)"
    with pytest.raises(nvml.NVMLDeviceError, match="GPU 1: NVML says GPU is lost"):
        nvml.device_total_memory(1)
    with pytest.raises(nvml.NVMLDeviceError, match="GPU 1"):
        nvml.cpu_affinity(1)
    assert nvml.cpu_affinity(0, ncpus=32) == set(range(16))
    assert "1: unusable (GPU 1: NVML says GPU is lost" in nvml.describe()


def test_no_driver(machine):
    machine("none")
    for call in (nvml.device_count, nvml.devices, lambda: nvml.device_total_memory(0)):
        with pytest.raises(nvml.NVMLUnavailable,
                           match="no NVIDIA GPU visible: NVML says NVML Shared Library Not "
                                 "Found .is the NVIDIA driver installed"):
            call()


def test_bad_index(machine):
    machine("h200-1")
    with pytest.raises(ValueError, match=r"no GPU with index 4: NVML sees 1 \(0-0\)"):
        nvml.device_total_memory(4)
    with pytest.raises(ValueError, match="integer >= 0"):
        nvml.cpu_affinity(-1)


def test_the_real_nvidia_ml_py_on_a_machine_without_gpu():
    """No stand-in: the real module. On a GPU machine NVML works; here it must be the
    clear NVMLUnavailable, never another exception."""
    nvml._reset()
    try:
        import pynvml
        assert not getattr(pynvml, "STANDIN", False)
        try:
            n = nvml.device_count()
        except nvml.NVMLUnavailable as e:
            assert str(e).startswith("no NVIDIA GPU visible: NVML says ")
        else:
            assert n >= 0
    finally:
        nvml._reset()
