"""device_memory_limit (worker_memory.py, spill.py): GPU results past the limit move to host
memory, least recently used first, and from there to disk under the memory limit; every one
comes back intact, as a GPU object. There is no GPU here: the results are the stand-in
runtime's device arrays (tests/gpu_standin/device_runtime.py), whose capacity makes a GPU
that runs out of memory."""
import asyncio
import os
import sys

import cloudpickle
import numpy as np
import pytest

import taskcore.device as device
from gpu_standin.device_runtime import StandinDeviceArray, runtime
from taskcore import Client, LocalCluster, wait
from taskcore.spill import DEVICE, HOST, SpillStore
from taskcore.testing import cluster, run
from taskcore.worker_memory import (DEVICE as WM_DEVICE, HOST as WM_HOST,
                                    check_device_memory_limit, parse_device_memory_limit)

# Worker processes cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
TESTS = os.path.dirname(os.path.abspath(__file__))
STANDIN = "gpu_standin.device_runtime:runtime"


@pytest.fixture(autouse=True)
def standin():
    device._reset_runtime()
    device._runtime = runtime
    runtime.capacity = None
    yield runtime
    runtime.capacity = None
    device._reset_runtime()


def make(i, mib=1):
    """A stand-in GPU array of `mib` MiB filled with i (runs in worker processes too)."""
    from gpu_standin.device_runtime import runtime as rt

    return rt.array(np.full(mib * MiB // 8, float(i)))


def kind_and_first(x):
    """What a dependent task receives: its type and first value."""
    return type(x).__name__, float(x.get()[0])


def device_metrics(dask_worker):
    return dask_worker.memory_manager.metrics()


# -- options ------------------------------------------------------------------------------------
def test_device_memory_limit_values(monkeypatch):
    p = parse_device_memory_limit
    assert p(None) is None and p(False) is None and p(0) is None and p("0") is None
    assert p("off") is None
    assert p(1000) == 1000 and p("10GB") == 10**10 and p("2 GiB") == 2 * 2**30
    import taskcore.nvml as nvml

    monkeypatch.setattr(nvml, "device_total_memory", lambda index=None: 80 * 2**30)
    assert p("auto") == int(0.8 * 80 * 2**30)
    assert p(0.5) == 40 * 2**30 and p("0.25") == 20 * 2**30
    for bad in (True, -5, "lots", [1], "-1GB", 1.5e-300j):
        with pytest.raises(ValueError, match="device_memory_limit"):
            p(bad)

    def no_gpu(index=None):
        raise RuntimeError("NVML: no NVIDIA driver")

    monkeypatch.setattr(nvml, "device_total_memory", no_gpu)
    with pytest.raises(ValueError, match="cannot be read here.*no NVIDIA driver"):
        p("auto")
    monkeypatch.setitem(sys.modules, "taskcore.nvml", None)       # taskcore.nvml missing
    with pytest.raises(ValueError, match="needs taskcore.nvml"):
        p(0.5)
    assert p("4GB") == 4 * 10**9                                   # sizes need no NVML
    assert check_device_memory_limit(0.5) == 0.5                   # form only: no NVML asked
    with pytest.raises(ValueError, match="device_memory_limit"):
        check_device_memory_limit("half")
    assert (WM_DEVICE, WM_HOST) == (DEVICE, HOST)


def test_off_by_default_and_passed_through_nanny_and_cli():
    from taskcore.cli.worker import _make_servers, parse_args
    from taskcore.nanny import Nanny
    from taskcore.worker import Worker

    w = Worker("tcp://127.0.0.1:1", memory_limit=0)
    assert w.device_memory_limit == 0 and w.memory_manager.device_limit == 0
    assert "result_event" not in w.__dict__ and w.memory_manager.store is None
    assert "device_memory_limit" not in w.memory_manager.metrics()
    w = Worker("tcp://127.0.0.1:1", memory_limit=0, device_memory_limit="64MiB")
    assert w.memory_manager.device_limit == 64 * MiB and "result_event" in w.__dict__
    assert w.memory_managed and w.memory_target_bytes == 0      # no host limit: no target
    assert w.memory_manager.metrics()["device_memory_limit"] == 64 * MiB
    with pytest.raises(ValueError, match="device_memory_limit"):
        Worker("tcp://127.0.0.1:1", device_memory_limit="lots")
    with pytest.raises(ValueError, match="device_memory_limit"):
        Nanny("tcp://127.0.0.1:1", device_memory_limit="lots")
    n = Nanny("tcp://127.0.0.1:1", device_memory_limit="auto")
    assert n._worker_options["device_memory_limit"] == "auto"     # resolved by the worker
    assert '"device_memory_limit": "auto"' in " ".join(n._command())
    args = parse_args(["tcp://127.0.0.1:1", "--device-memory-limit", "10GB", "--no-nanny"])
    (w,) = _make_servers(args, args.address)
    assert w.device_memory_limit == 10**10
    with pytest.raises(SystemExit):
        parse_args(["tcp://127.0.0.1:1", "--device-memory-limit", "lots"])


# -- the store's GPU tiers ----------------------------------------------------------------------
def test_store_moves_gpu_objects_to_host_then_disk_and_back(tmp_path):
    data = {}
    store = SpillStore(data, str(tmp_path))
    for i in range(4):
        data[f"d{i}"] = make(i)
        store.track_device(f"d{i}", MiB)
    data["h"] = np.ones(MiB // 8)                  # a host value
    assert store.device_bytes == 4 * MiB and len(store) == 0 and "d0" not in store
    runtime.reset_counts()
    n, w = store.evict_device(lambda: store.device_bytes <= 2 * MiB)
    assert (n, w) == (2, 2 * MiB) and runtime.counts["d2h"] == 2
    assert list(store.host) == ["d0", "d1"] and "d0" in store and "d0" not in data
    assert store.host_bytes == 2 * MiB and len(store) == 2 and store.spilled_bytes == 0
    # host pressure: the host tier goes to disk first, frames as they are
    n, w = store.evict(lambda: store.host_bytes == 0)
    assert (n, w) == (2, 2 * MiB) and store.spilled_bytes == 2 * MiB and not store.host
    assert len(os.listdir(store.directory)) == 2
    assert store.index["d2"].tier == DEVICE        # GPU objects in data are not written
    n, w = store.evict(lambda: False)              # everything: only the host value goes
    assert n == 1 and "h" not in data and set(data) == {"d2", "d3"}
    # reading back gives GPU objects
    value = store.unspill("d0")
    assert isinstance(value, StandinDeviceArray) and value.get()[0] == 0.0
    store.track_device("d0", MiB)
    assert store.device_bytes == 3 * MiB
    # host tier read back: frames, not a file
    store.evict_device(lambda: True)
    ser, rec = store.read_record("d0") if "d0" in store.host else store.read_record("d2")
    assert rec.tier == HOST and rec.path is None and store.device_host_reads == 1
    with pytest.raises(KeyError):
        store.read_record("d3")                    # on the device: not spilled
    for k in list(store.index):
        store.discard(k)
    assert (store.device_bytes, store.host_bytes, store.spilled_bytes, len(store)) == (0, 0, 0, 0)
    assert os.listdir(store.directory) == []
    store.close()


# -- a worker in this process -------------------------------------------------------------------
def _limits(**kw):
    """Device limit 3 MiB; host: a 3 MiB target (RSS thresholds off: pytest's RSS is not
    the worker's)."""
    return dict(device_memory_limit="3MiB", memory_limit="6MiB", memory_target_fraction=0.5,
                memory_spill_fraction=False, memory_pause_fraction=False, **kw)


def test_gpu_results_past_the_limit_go_to_host_then_disk_and_come_back_as_gpu_objects():
    async def main():
        async with cluster(n_workers=1, worker_kwargs=_limits()) as (s, (w,)):
            async with Client(s.address, asynchronous=True) as c:
                # a stand-in GPU with room for 5 MiB: 10 MiB of results fit only because
                # they leave it
                runtime.capacity = runtime.used + 5 * MiB
                fs = c.map(make, range(10))
                await wait(fs)
                mm, store = w.memory_manager, w.memory_manager.store
                m = mm.metrics()
                assert m["device_bytes"] <= 3 * MiB and m["device_count"] <= 3
                assert m["device_spill_count"] >= 7 and m["device_memory_limit"] == 3 * MiB
                assert m["managed_bytes"] <= 3 * MiB          # host tier + host values
                assert store.spilled_bytes >= 4 * MiB and m["spilled_disk_bytes"] > 0
                assert runtime.used <= runtime.capacity
                keys = [f.key for f in fs]
                tiers = [store.index[k].tier if k in store.index else None for k in keys]
                assert None not in tiers                       # every GPU result tracked
                assert tiers[-1] == DEVICE and tiers[0] != DEVICE   # least recently used left
                # the compiled loop's view agrees: RAM-managed = memory - disk - device
                assert (w.state.memory_bytes - w.spilled_bytes) == mm.managed_in_memory()
                # a task on a value on disk gets a GPU object
                assert await c.submit(kind_and_first, fs[0]) == ("StandinDeviceArray", 0.0)
                assert await c.submit(kind_and_first, fs[1]) == ("StandinDeviceArray", 1.0)
                assert w.memory_manager.metrics()["device_bytes"] <= 3 * MiB
                runtime.capacity = None                       # the client's copies, here
                got = await c.gather(fs)
                for i, g in enumerate(got):
                    assert isinstance(g, StandinDeviceArray)
                    np.testing.assert_array_equal(g.get(), np.full(MiB // 8, float(i)))
                del got
                # releasing the results forgets them in every tier
                del fs
                await wait_until_async(lambda: not w.data and not store.index)
                assert (store.device_bytes, store.host_bytes, store.spilled_bytes) == (0, 0, 0)
                assert w.spilled_bytes == 0
    run(main())


async def wait_until_async(predicate, timeout=10):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_without_a_device_limit_the_gpu_runs_out_of_memory():
    async def main():
        async with cluster(n_workers=1, worker_kwargs=dict(memory_limit=0)) as (s, (w,)):
            async with Client(s.address, asynchronous=True) as c:
                runtime.capacity = runtime.used + 5 * MiB
                fs = c.map(make, range(10))
                with pytest.raises(MemoryError, match="Out of memory"):
                    await c.gather(fs)
                assert w.memory_manager.store is None
    run(main())


def test_gpu_results_fetched_by_a_peer_from_the_host_tier():
    async def main():
        async with cluster(n_workers=2, worker_kwargs=_limits()) as (s, (a, b)):
            async with Client(s.address, asynchronous=True) as c:
                fs = c.map(make, range(6), workers=[a.address])
                await wait(fs)
                store = a.memory_manager.store
                moved = [f for f in fs if f.key in store]
                assert len(moved) >= 3 and a.memory_manager.metrics()["device_spill_count"] >= 3
                out = await c.gather([c.submit(kind_and_first, f, workers=[b.address],
                                               pure=False) for f in moved])
                assert out == [("StandinDeviceArray", float(fs.index(f))) for f in moved]
                # b tracks what it fetched, under its own limit
                assert b.memory_manager.metrics()["device_bytes"] <= 3 * MiB
    run(main())


# -- worker processes ---------------------------------------------------------------------------
def test_local_cluster_processes_spill_gpu_results():
    env = {"TASKCORE_DEVICE_RUNTIME": STANDIN,
           "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, env=env,
                      dashboard_address=None, memory_limit="8MiB", memory_target_fraction=0.5,
                      memory_spill_fraction=False, memory_pause_fraction=False,
                      memory_terminate_fraction=False, device_memory_limit="2MiB") as cl:
        with Client(cl) as c:
            fs = c.map(make, range(8))
            wait(fs)
            (m,) = c.run(device_metrics).values()
            assert m["device_memory_limit"] == 2 * MiB and m["device_bytes"] <= 2 * MiB
            assert m["device_spill_count"] >= 6 and m["spilled_bytes"] >= 2 * MiB
            assert c.submit(kind_and_first, fs[0]).result() == ("StandinDeviceArray", 0.0)
            got = c.gather(fs)
            assert [type(g) for g in got] == [StandinDeviceArray] * 8
            assert [float(g.get()[-1]) for g in got] == [float(i) for i in range(8)]
