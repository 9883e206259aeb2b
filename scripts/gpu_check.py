"""The GPU checks of taskcore, for a machine with an NVIDIA GPU (none where the tests run).

Run from the repository root after the build, e.g.
    PYTHONPATH=src timeout 300 python3 scripts/gpu_check.py
Prints one JSON line per check and a summary; exits 1 if any failed (about a minute).
Needs cupy; the torch and numba checks run when those import, the ucx one when ucxx does.
Checks: the device runtime, CuPy/Torch/Numba objects through dumps/dumps_device/loads
(zero copy on the device path), device_memory_limit spilling in a worker and in
LocalCluster processes, LocalCUDACluster on the real GPU (devices, names, affinity, a
CuPy computation), and a device array between ucx:// workers."""
import asyncio
import json
import sys
import time
import traceback

import numpy as np

results = []


def check(name):
    def deco(fn):
        t0 = time.perf_counter()
        try:
            extra = fn() or {}
            results.append({"check": name, "ok": True, "s": round(time.perf_counter() - t0, 3),
                            **extra})
        except Exception as e:
            results.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                            "tb": traceback.format_exc()[-1500:]})
        print(json.dumps(results[-1]), flush=True)
        return fn
    return deco


import cupy  # noqa: E402

from taskcore.core.serialize import dumps, dumps_device, loads, nbytes, serialize_obj  # noqa
from taskcore.device import DeviceFrame, device_runtime  # noqa: E402


@check("runtime")
def _():
    rt = device_runtime()
    return {"runtime": rt.name, "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}


@check("cupy round trips (C, F, strided, 0-d, empty, 200 MB)")
def _():
    arrays = [cupy.arange(24.).reshape(4, 6), cupy.arange(24.).reshape(4, 6).T,
              cupy.arange(100.)[::3], cupy.array(2.5, dtype="f4"), cupy.zeros((0, 3)),
              cupy.random.random(25_000_000)]
    out = {}
    for a in arrays:
        for fn in (dumps, dumps_device):
            t0 = time.perf_counter()
            frames = fn([a])
            b = loads(frames)[0]
            cupy.cuda.Stream.null.synchronize()
            dt = time.perf_counter() - t0
            assert type(b) is cupy.ndarray and b.dtype == a.dtype and b.shape == a.shape
            assert bool((b == a).all()) if a.size else True
            if fn is dumps_device and a.flags.c_contiguous and a.size:
                assert isinstance(frames[1], DeviceFrame) and b.data.ptr == a.data.ptr
            if a.nbytes > 10**8:
                out[f"{fn.__name__}+loads 200MB s"] = round(dt, 4)
    assert nbytes(arrays[-1]) == 200_000_000
    return out


@check("torch cuda tensors")
def _():
    try:
        import torch
    except ImportError:
        return {"skipped": "no torch"}
    ts = [torch.arange(12., device="cuda").reshape(3, 4), torch.ones(5, device="cuda",
          dtype=torch.bfloat16), torch.arange(12., device="cuda").reshape(3, 4).t()]
    for t in ts:
        for fn in (dumps, dumps_device):
            u = loads(fn([t]))[0]
            assert u.is_cuda and u.dtype == t.dtype and torch.equal(u, t.contiguous())
    cpu = torch.arange(3.)
    assert torch.equal(loads(dumps([cpu]))[0], cpu)             # CPU tensors: pickled
    return {"torch": torch.__version__}


@check("numba device arrays")
def _():
    try:
        from numba import cuda
    except ImportError:
        return {"skipped": "no numba"}
    a = cuda.to_device(np.arange(20.).reshape(4, 5))
    for fn in (dumps, dumps_device):
        b = loads(fn([a]))[0]
        assert np.array_equal(b.copy_to_host(), a.copy_to_host())


def make(i):
    import cupy as cp
    return cp.full(32 * 2**20 // 8, float(i))          # 32 MiB each


def first(x):
    return type(x).__module__.split(".")[0], float(x[0])


@check("device_memory_limit spilling (in-process worker)")
def _():
    from taskcore import Client, wait
    from taskcore.testing import cluster

    async def main():
        kw = dict(device_memory_limit="256MiB", memory_limit="1GiB", memory_target_fraction=0.25,
                  memory_spill_fraction=False, memory_pause_fraction=False)
        async with cluster(n_workers=1, worker_kwargs=kw) as (s, (w,)):
            async with Client(s.address, asynchronous=True) as c:
                t0 = time.perf_counter()
                fs = c.map(make, range(32))                 # 1 GiB of results
                await wait(fs)
                dt = time.perf_counter() - t0
                m = w.memory_manager.metrics()
                assert m["device_bytes"] <= 256 * 2**20 and m["device_spill_count"] >= 24
                assert m["spilled_bytes"] > 0
                assert await c.submit(first, fs[0]) == ("cupy", 0.0)
                got = await c.gather(fs[:4])
                assert [float(g[-1]) for g in got] == [0.0, 1.0, 2.0, 3.0]
                return {k: m[k] for k in ("device_bytes", "device_spill_count",
                                          "device_spill_seconds", "device_host_bytes",
                                          "spilled_bytes")} | {"1GiB of results s": round(dt, 2)}
    return asyncio.run(main())


@check("device_memory_limit spilling (LocalCluster processes)")
def _():
    from taskcore import Client, LocalCluster, wait
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                      device_memory_limit="0.01", memory_limit="4GiB",
                      memory_target_fraction=0.5) as cl, Client(cl) as c:
        fs = c.map(make, range(64))                          # 2 GiB vs ~1.4 GB on an H200
        wait(fs)
        (m,) = c.run(lambda dask_worker: dask_worker.memory_manager.metrics()).values()
        assert m["device_spill_count"] > 0 and m["device_bytes"] <= m["device_memory_limit"]
        assert c.submit(first, fs[0]).result() == ("cupy", 0.0)
        return {k: m[k] for k in ("device_memory_limit", "device_bytes", "device_spill_count")}


def _device_view():
    import os

    import cupy as cp

    from taskcore import get_worker
    props = cp.cuda.runtime.getDeviceProperties(0)
    return (get_worker().name, os.environ.get("CUDA_VISIBLE_DEVICES"),
            sorted(os.sched_getaffinity(0)), props["name"].decode(),
            float(cp.arange(1000, dtype="f8").sum()))


@check("LocalCUDACluster on the real GPU")
def _():
    from taskcore import Client, LocalCUDACluster, nvml
    with LocalCUDACluster(dashboard_address=None) as cl, Client(cl) as c:
        n = nvml.device_count()
        c.wait_for_workers(len(cl.workers), timeout=60)
        views = c.run(lambda: None)                          # every worker answers
        out = c.submit(_device_view, resources={"GPU": 1}, pure=False).result(120)
        assert out[4] == 499500.0
        return {"gpus": n, "workers": len(views), "worker": out[0], "cvd": out[1],
                "cpus": len(out[2]), "device": out[3]}


def _device_array(n):
    import cupy as cp
    return cp.arange(n, dtype="f8")


def _device_sum(x):
    return type(x).__module__.split(".")[0], float(x.sum())


@check("ucx:// with device buffers between worker processes")
def _():
    import importlib.util
    if importlib.util.find_spec("ucxx") is None:
        return {"skipped": "ucxx not installed"}
    from taskcore import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, protocol="ucx",
                      dashboard_address=None) as cl, Client(cl) as c:
        c.wait_for_workers(2, timeout=60)
        a, b = sorted(c.scheduler_info()["workers"])
        n = 25 * 2**20                                       # 200 MB of f8
        x = c.submit(_device_array, n, workers=[a], pure=False)
        c.submit(len, x, workers=[a]).result(120)          # made on a, not fetched here
        t0 = time.perf_counter()
        kind, total = c.submit(_device_sum, x, workers=[b]).result(120)
        dt = time.perf_counter() - t0
        assert kind == "cupy" and total == float(n) * (n - 1) / 2
        import ucxx
        return {"transports": sorted(set(ucxx.get_active_transports())), "200MB s": round(dt, 3)}


print(json.dumps({"summary": {"ok": sum(r["ok"] for r in results), "failed":
                              [r["check"] for r in results if not r["ok"]]}}))
sys.exit(0 if all(r["ok"] for r in results) else 1)
