"""GPU workers: one worker per NVIDIA device, with any cluster manager.

    cluster = LocalCUDACluster()                         # one worker per visible GPU
    cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES="0,1", rmm_pool_size="20GB")
    SpecCluster(workers={**cpu_specs, **cuda_worker_specs("0,1")}, scheduler=...)
    LocalCluster(n_workers=4).add_worker_group("gpu", 2, spec=cuda_worker_group("0,1"))
    SSHCluster(hosts, worker_class="taskcore.CUDAWorker", worker_options={...})
    core-cuda-worker tcp://10.0.0.5:8786 --device-memory-limit 0.8

Choosing devices. `CUDA_VISIBLE_DEVICES` (an argument, else the environment)
names the devices: NVML indexes, GPU UUIDs ("GPU-..."), MIG UUIDs ("MIG-..."),
unique UUID prefixes, or the legacy "MIG-GPU-<uuid>/<gi>/<ci>" form, each
checked against NVML (taskcore/nvml.py, the only module that asks it), so an
unknown one fails at once, naming what exists. Unset: every GPU, and for a GPU
in MIG mode each of its MIG instances (a process can use one MIG instance only,
dask-cuda #583). A GPU that NVML cannot describe is then left out with a
warning; named explicitly, it is an error.

What each worker gets (`device_worker_options`), decided where the devices are
(in the cluster's process, or in `core-cuda-worker` on the remote host):
- `CUDA_VISIBLE_DEVICES` rotated so that its own device comes first (CUDA makes
  the first one device 0), and `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so an integer
  means the same GPU to CUDA as to NVML;
- CPU affinity: NVML's CPUs for the device (the parent GPU's for a MIG
  instance), intersected with the CPUs this process may use, so a worker is
  never pinned outside a partial SLURM allocation (dask-cuda #1358); an empty
  intersection falls back to the allowed set with a warning;
- `resources={"GPU": 1}` merged with the caller's, `nthreads=threads_per_worker`,
  `memory_limit` (with "auto", this host's memory split between its GPU workers),
  `device_memory_limit` in bytes ("auto": 0.8 of the device; a fraction of it),
  and an RMM pool (`rmm_pool_size`: bytes, a size string, or a fraction of the
  device).
CPU affinity and the RMM pool travel in the worker's environment
(taskcore/affinity.py) and are applied by the worker process before its threads
start.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import warnings
from dataclasses import dataclass

from taskcore import nvml
from taskcore.affinity import (AFFINITY_ENV, RMM_MANAGED_ENV, RMM_POOL_ENV, format_cpu_list)
from taskcore.deploy.launched import LaunchedWorker
from taskcore.deploy.local import LocalCluster
from taskcore.member import ClusterMember
from taskcore.process import Status
from taskcore.utils import parse_bytes, parse_memory_limit, system_memory

__all__ = ["CUDADevice", "LocalCUDACluster", "CUDAWorker", "LaunchedCUDAWorker",
           "parse_cuda_visible_devices", "visible_devices", "rotate", "worker_cpus",
           "device_worker_options", "cuda_worker_specs", "cuda_worker_group",
           "DEFAULT_DEVICE_MEMORY_FRACTION"]

logger = logging.getLogger("taskcore.deploy.cuda")

DEFAULT_DEVICE_MEMORY_FRACTION = 0.8   # "auto": as dask-cuda's default
_UUID_ENTRY = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+$")
_LEGACY_MIG = re.compile(r"^MIG-GPU-[0-9A-Za-z-]+/\d+/\d+$")


@dataclass(frozen=True)
class CUDADevice:
    """One device a worker may own, as named in CUDA_VISIBLE_DEVICES."""
    entry: str          # as given ("0", "GPU-...", "MIG-...")
    index: int          # NVML index of the physical GPU (the parent of a MIG instance)
    uuid: str
    name: str
    total_memory: int
    mig: bool = False   # a MIG instance

    @property
    def cuda_name(self) -> str:
        """How the worker's CUDA_VISIBLE_DEVICES names it: an index as given, else the full
        UUID NVML reports (what this driver accepts, whatever prefix or legacy MIG form
        was given)."""
        return self.entry if self.entry.isdigit() else self.uuid


# -- choosing devices --------------------------------------------------------------------------
def parse_cuda_visible_devices(value=None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES (argument, else environment) as strings, checked
    for form only; None when neither says anything. Accepts "0,1", " 0 , 1 ", [0, 1],
    ("GPU-...",), 3."""
    if value is None:
        value = os.environ.get("CUDA_VISIBLE_DEVICES")
        if value is None:
            return None
    if isinstance(value, bool):
        raise TypeError(f"CUDA_VISIBLE_DEVICES must be a string, an int or a list, got {value!r}")
    if isinstance(value, int):
        items = [str(value)]
    elif isinstance(value, str):
        items = [] if not value.strip() else [x.strip() for x in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(x).strip() for x in value]
    else:
        raise TypeError(f"CUDA_VISIBLE_DEVICES must be a string, an int or a list, got {value!r}")
    for item in items:
        if item.isdigit() or _LEGACY_MIG.match(item) or _UUID_ENTRY.match(item):
            continue
        raise ValueError(f"CUDA_VISIBLE_DEVICES={value!r}: {item!r} is not a device index, "
                         f"a GPU-<uuid>, a MIG-<uuid> or MIG-GPU-<uuid>/<gi>/<ci>")
    seen = set()
    for item in items:
        key = str(int(item)) if item.isdigit() else item
        if key in seen:
            raise ValueError(f"CUDA_VISIBLE_DEVICES={value!r} names {item!r} twice")
        seen.add(key)
    return items


def _as_device(entry: str, found) -> CUDADevice:
    if isinstance(found, nvml.MigDevice):
        return CUDADevice(entry, found.parent_index, found.uuid, found.name,
                          found.total_memory, mig=True)
    return CUDADevice(entry, found.index, found.uuid, found.name, found.total_memory)


def visible_devices(value=None) -> list[CUDADevice]:
    """The devices CUDA_VISIBLE_DEVICES (argument, else environment) names, checked with
    NVML; see the module doc. nvml.NVMLUnavailable when there is no GPU, ValueError for
    an unknown or empty list, nvml.NVMLDeviceError for a named device that fails."""
    entries = parse_cuda_visible_devices(value)
    if entries is None:
        out = []
        for d in nvml.devices():
            if d.error is not None:
                warnings.warn(f"leaving out GPU {d.index}: {d.error}", RuntimeWarning,
                              stacklevel=2)
            elif d.mig_devices:
                out += [_as_device(m.uuid, m) for m in d.mig_devices]
            elif d.mig_enabled:
                warnings.warn(f"leaving out GPU {d.index} ({d.uuid}): it is in MIG mode but "
                              f"has no MIG instances", RuntimeWarning, stacklevel=2)
            else:
                out.append(_as_device(str(d.index), d))
        if not out:
            raise ValueError(f"no usable NVIDIA GPU: {nvml.describe()}")
        return out
    if not entries:
        raise ValueError("CUDA_VISIBLE_DEVICES is empty: no device for any worker")
    nvml._nvml()  # no GPU at all: say so before complaining about the first entry
    out = []
    for entry in entries:
        found = nvml.lookup(entry)
        if isinstance(found, nvml.Device) and found.mig_devices:
            warnings.warn(f"GPU {found.index} is in MIG mode: CUDA will use one of its MIG "
                          f"instances only; name them to use each: "
                          f"{', '.join(m.uuid for m in found.mig_devices)}", RuntimeWarning,
                          stacklevel=2)
        out.append(_as_device(entry, found))
    uuids = [d.uuid for d in out]
    dup = {u for u in uuids if uuids.count(u) > 1}
    if dup:
        raise ValueError(f"CUDA_VISIBLE_DEVICES={value!r} names the same device twice: "
                         f"{', '.join(sorted(dup))}")
    return out


def rotate(entries, i: int) -> list:
    """`entries` rotated so that entry `i` comes first (what worker i sees)."""
    entries = list(entries)
    if not 0 <= i < len(entries):
        raise IndexError(f"device position {i} out of range for {len(entries)} devices")
    return entries[i:] + entries[:i]


def worker_cpus(device: CUDADevice, allowed=None, ncpus: int | None = None) -> set[int]:
    """The CPUs for `device`'s worker: NVML's affinity of its GPU intersected with
    `allowed` (default: the CPUs this process may use). Never wider than `allowed`;
    an empty intersection, or NVML failing, gives `allowed` with a warning."""
    allowed = set(os.sched_getaffinity(0) if allowed is None else allowed)
    if not allowed:
        raise ValueError("allowed CPU set is empty")
    try:
        near = nvml.cpu_affinity(device.index, ncpus=max(ncpus or 0, os.cpu_count() or 1,
                                                         max(allowed) + 1))
    except nvml.NVMLDeviceError as e:
        warnings.warn(f"no CPU affinity for device {device.entry} ({e}); its worker may use "
                      f"every allowed CPU ({format_cpu_list(allowed)})", RuntimeWarning,
                      stacklevel=2)
        return allowed
    both = near & allowed
    if not both:
        warnings.warn(f"device {device.entry}: none of its CPUs ({format_cpu_list(near)}) is "
                      f"allowed to this process ({format_cpu_list(allowed)}); its worker may "
                      f"use every allowed CPU", RuntimeWarning, stacklevel=2)
        return allowed
    return both


# -- sizes ---------------------------------------------------------------------------------------
def _device_bytes(option: str, value, device: CUDADevice, auto: float | None):
    """Bytes of device memory from bytes, a size string, a fraction of the device, "auto"
    (`auto` of the device) or None/False/0 (none)."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "false", "0"):
            return None
        if text == "auto":
            if auto is None:
                raise ValueError(f"{option}='auto' is not supported")
            value = auto
        else:
            try:
                value = float(text)
            except ValueError:
                try:
                    value = parse_bytes(value)
                except ValueError as e:
                    raise ValueError(f"{option}={value!r}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{option}={value!r}: expected bytes, a size like '10GB', a fraction "
                         f"of the device's memory, 'auto' or None")
    if isinstance(value, float) and 0 < value <= 1:
        return int(device.total_memory * value)
    if value == 0:
        return None
    if value > device.total_memory:
        raise ValueError(f"{option}={value!r} is more than device {device.entry}'s "
                         f"{device.total_memory} bytes")
    return int(value)


def _host_memory(memory_limit, n_workers: int):
    """Each GPU worker's memory_limit: with "auto", this host's memory split among them."""
    if isinstance(memory_limit, str) and memory_limit.strip().lower() == "auto":
        return int(system_memory() // max(1, n_workers))
    return parse_memory_limit(memory_limit, 1)


def _check_rmm(rmm_pool_size, rmm_managed_memory):
    if rmm_pool_size is None and not rmm_managed_memory:
        return
    import importlib.util

    if importlib.util.find_spec("rmm") is None:
        raise ImportError("rmm_pool_size/rmm_managed_memory need RMM, which is not installed "
                          "here: pip install rmm-cu12 (it comes with 'taskcore[ucx]')")


# -- one worker's options ------------------------------------------------------------------------
def device_worker_options(devices: list[CUDADevice], i: int, *, threads_per_worker: int = 1,
                          memory_limit="auto", device_memory_limit="auto",
                          rmm_pool_size=None, rmm_managed_memory: bool = False,
                          resources=None, env=None, allowed_cpus=None) -> dict:
    """Options for the worker (a Nanny, a WorkerProcess) that owns `devices[i]`; see the
    module doc. The result holds nthreads, memory_limit, device_memory_limit (when not
    None), resources and env."""
    if isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int) \
            or threads_per_worker < 1:
        raise ValueError(f"threads_per_worker={threads_per_worker!r}: expected an integer >= 1")
    dev = devices[i]
    from taskcore.utils import parse_resources

    res = {"GPU": 1.0, **parse_resources(resources or {})}
    worker_env = dict(env or {})
    worker_env["CUDA_VISIBLE_DEVICES"] = ",".join(d.cuda_name for d in rotate(devices, i))
    worker_env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    worker_env[AFFINITY_ENV] = format_cpu_list(worker_cpus(dev, allowed_cpus))
    pool = _device_bytes("rmm_pool_size", rmm_pool_size, dev, None)
    if pool is not None:
        worker_env[RMM_POOL_ENV] = str(pool)
    if rmm_managed_memory:
        worker_env[RMM_MANAGED_ENV] = "1"
    opts = {"nthreads": threads_per_worker,
            "memory_limit": _host_memory(memory_limit, len(devices)),
            "resources": res, "env": worker_env}
    limit = _device_bytes("device_memory_limit", device_memory_limit, dev,
                          DEFAULT_DEVICE_MEMORY_FRACTION)
    if limit is not None:
        opts["device_memory_limit"] = limit
    return opts


def cuda_worker_specs(CUDA_VISIBLE_DEVICES=None, *, name: str = "cuda", worker_class="nanny",
                      threads_per_worker: int = 1, memory_limit="auto",
                      device_memory_limit="auto", rmm_pool_size=None,
                      rmm_managed_memory: bool = False, resources=None, env=None,
                      **worker_options) -> dict:
    """SpecCluster worker specs, one per device, named `<name>-<position>`:

        SpecCluster(scheduler=..., workers={**cpu_specs, **cuda_worker_specs("0,1")})

    `worker_class`: "nanny" (restarts, memory limits) or "process" (a bare worker
    process); further keyword arguments go to every worker as they are (protocol,
    host, death_timeout, ...). The devices are those of this machine: for other hosts
    use `SSHCluster(worker_class="taskcore.CUDAWorker")` or `core-cuda-worker` there.
    """
    _check_rmm(rmm_pool_size, rmm_managed_memory)
    cls = _worker_cls(worker_class)
    devices = visible_devices(CUDA_VISIBLE_DEVICES)
    specs = {}
    for i in range(len(devices)):
        opts = device_worker_options(
            devices, i, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
            device_memory_limit=device_memory_limit, rmm_pool_size=rmm_pool_size,
            rmm_managed_memory=rmm_managed_memory, resources=resources, env=env)
        specs[f"{name}-{i}"] = {"cls": cls, "options": {**worker_options, **opts}}
    return specs


def _worker_cls(worker_class):
    if worker_class == "nanny":
        from taskcore.nanny import Nanny

        return Nanny
    if worker_class == "process":
        from taskcore.deploy.process import WorkerProcess

        return WorkerProcess
    raise ValueError(f"GPU workers need worker_class 'nanny' or 'process' (a worker process "
                     f"with its own environment), got {worker_class!r}")


# -- core-cuda-worker: its command line, its workers in a process, launched on a host ---------
def _worker_names(name, n: int) -> list:
    """As core-worker names its processes: NAME alone for one worker, else NAME-0, NAME-1..."""
    if name is None:
        return [None] * n
    return [name] if n == 1 else [f"{name}-{i}" for i in range(n)]


def _group(n: int) -> list | None:
    """The spec "group" of a member running n workers named like `_worker_names`."""
    return [f"-{i}" for i in range(n)] if n > 1 else None


class CUDAWorker(ClusterMember):
    """One nanny and worker per device of this machine, in this process: what
    `core-cuda-worker` runs, and a cluster member standing for all its workers (a spec
    "group", see `cuda_worker_group`). Its workers are named as core-worker names its
    processes: `name` for one device, else `<name>-<position>` (0, 1, ...).

    `CUDA_VISIBLE_DEVICES` and the size options are `device_worker_options`'; the
    rest go to every Nanny (protocol, host, death_timeout, security, log_level...).
    """

    role = "worker"

    def __init__(self, scheduler_address, name=None, *, CUDA_VISIBLE_DEVICES=None,
                 nthreads: int | None = None, threads_per_worker: int = 1,
                 memory_limit="auto", device_memory_limit="auto", rmm_pool_size=None,
                 rmm_managed_memory: bool = False, resources=None, env=None, **nanny_options):
        from taskcore.nanny import Nanny

        _check_rmm(rmm_pool_size, rmm_managed_memory)
        given = CUDA_VISIBLE_DEVICES
        if isinstance(given, (list, tuple)) and given and all(isinstance(d, CUDADevice)
                                                               for d in given):
            self.devices = list(given)  # already checked (core-cuda-worker did)
        else:
            self.devices = visible_devices(given)
        self.name = name
        self.scheduler_address = scheduler_address
        self.nannies = []
        names = _worker_names(name, len(self.devices))
        for i, dev in enumerate(self.devices):
            opts = device_worker_options(
                self.devices, i, threads_per_worker=nthreads or threads_per_worker,
                memory_limit=memory_limit, device_memory_limit=device_memory_limit,
                rmm_pool_size=rmm_pool_size, rmm_managed_memory=rmm_managed_memory,
                resources=resources, env=env)
            self.nannies.append(Nanny(scheduler_address, name=names[i],
                                      **{**nanny_options, **opts}))
        self.status = Status.created

    @property
    def address(self):
        return self.nannies[0].address if self.nannies else None

    @property
    def worker_address(self):
        return self.nannies[0].worker_address if self.nannies else None

    @property
    def worker_names(self) -> list:
        return [n.name for n in self.nannies if n.name is not None]

    def describe(self) -> list[dict]:
        """Each worker: address, name, nanny, worker_pid, device."""
        out = []
        for n, d in zip(self.nannies, self.devices):
            name = n.name
            if name is None and n.process is not None and n.process.info:
                name = n.process.info.get("name")  # the name the worker chose itself
            out.append({"address": n.worker_address, "name": name, "nanny": n.address,
                        "worker_pid": n.worker_pid, "device": d.entry})
        return out

    async def start(self):
        if self.status is not Status.created:
            return self
        self.status = Status.starting
        results = await asyncio.gather(*(n.start() for n in self.nannies),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            self.status = Status.failed
            raise errors[0]
        self.status = Status.running
        return self

    def __await__(self):
        return self.start().__await__()

    async def finished(self):
        await asyncio.gather(*(n.finished() for n in self.nannies))

    async def close(self, timeout: float | None = None):
        if self.status in (Status.closed, Status.failed) and all(
                n.status in (Status.closed, Status.failed, Status.created) for n in self.nannies):
            return
        self.status = Status.closing

        async def one(n):
            try:
                await n.close(timeout=timeout)
            except Exception as e:
                logger.warning("closing %r failed: %r", n, e)
        await asyncio.gather(*(one(n) for n in self.nannies))
        self.status = Status.closed

    def kill(self) -> None:
        for n in self.nannies:
            n.kill()

    async def fetch_logs(self, n: int = 1000) -> list:
        lines = []
        for nanny in self.nannies:
            lines += await nanny.fetch_logs(n)
        return lines[-n:]

    def __repr__(self):
        return (f"<CUDAWorker {self.name!r} devices={[d.entry for d in self.devices]} "
                f"status={self.status.value}>")


def cuda_worker_group(CUDA_VISIBLE_DEVICES=None, **options) -> dict:
    """A spec for a group of GPU workers, one `CUDAWorker` member (nannies in this process):

        cluster.add_worker_group("gpu", 2, spec=cuda_worker_group("0,1"))
        SpecCluster(..., worker_groups={"gpu": cuda_worker_group("0,1")})

    Its workers are named `<entry name>-<position>`; `options` are CUDAWorker's
    (device_memory_limit, rmm_pool_size, threads_per_worker, memory_limit, resources,
    and Nanny options). The devices are checked here, so a bad list fails before
    anything starts. One entry covers every device: on one machine such a group is
    scaled to 0 or to the number of devices."""
    _check_rmm(options.get("rmm_pool_size"), options.get("rmm_managed_memory"))
    devices = visible_devices(CUDA_VISIBLE_DEVICES)
    entries = [d.entry for d in devices]
    spec = {"cls": CUDAWorker, "options": dict(options, CUDA_VISIBLE_DEVICES=entries)}
    if _group(len(entries)):
        spec["group"] = _group(len(entries))
    return spec


class LaunchedCUDAWorker(LaunchedWorker):
    """`core-cuda-worker` through the launcher (SSHCluster's GPU hosts): one process per
    host, one nanny and worker per device there, the devices found on that host.

    Options are core-worker's (`worker_cli_args`) plus CUDA_VISIBLE_DEVICES,
    device_memory_limit, rmm_pool_size and rmm_managed_memory; `memory_limit` defaults
    to "auto" (that host's memory split among its GPU workers)."""

    def __init__(self, scheduler, name=None, *, nanny: bool = True, memory_limit="auto",
                 **options):
        if not nanny:
            raise ValueError("core-cuda-worker runs every worker under its nanny")
        if "CUDA_VISIBLE_DEVICES" in options:  # checked for form here; for NVML on the host
            parse_cuda_visible_devices(options["CUDA_VISIBLE_DEVICES"])
        super().__init__(scheduler, name, nanny=True, memory_limit=memory_limit, **options)

    def _server_argv(self, **override):
        from taskcore.process import cuda_worker_cli_args

        options = {**self.worker_options, **override}
        options.pop("nworkers", None)
        devices = options.pop("CUDA_VISIBLE_DEVICES", None)
        if devices is not None:
            devices = parse_cuda_visible_devices(devices)
        return cuda_worker_cli_args(self.scheduler, name=self.name,
                                    python=self.python or self.target.python,
                                    cuda_visible_devices=devices, **options)


def launched_group(options: dict) -> list | None:
    """The spec "group" of a LaunchedCUDAWorker: known when CUDA_VISIBLE_DEVICES is given
    (otherwise the host's GPUs decide, and the entry counts as one worker until then)."""
    devices = options.get("CUDA_VISIBLE_DEVICES")
    if devices is None:
        return None
    return _group(len(parse_cuda_visible_devices(devices)))


# -- LocalCUDACluster ----------------------------------------------------------------------------
class LocalCUDACluster(LocalCluster):
    """A scheduler and one worker per GPU of this machine; see the module doc.

    `CUDA_VISIBLE_DEVICES`: the devices (default: the environment's, else every GPU).
    `n_workers`: how many of them get a worker now (default all; at most their number),
    `scale(n)` up to their number. `interface` picks the address of that network
    interface for the scheduler and the workers. `protocol="ucx"` passes through to the
    transports. `rmm_pool_size`: an RMM pool of that size in each worker (needs rmm).
    `resources` are added to each worker's `{"GPU": 1}`. Other keyword arguments are
    LocalCluster's, and the rest go to every worker.
    """

    def __init__(self, CUDA_VISIBLE_DEVICES=None, n_workers: int | None = None,
                 threads_per_worker: int = 1, memory_limit="auto", device_memory_limit="auto",
                 interface: str | None = None, protocol: str | None = None,
                 rmm_pool_size=None, rmm_managed_memory: bool = False, resources=None,
                 env: dict | None = None, host: str | None = None,
                 worker_class: str = "nanny", **kwargs):
        if kwargs.pop("processes", True) is not True:
            raise ValueError("LocalCUDACluster needs processes=True: each worker is a process "
                             "with its own CUDA_VISIBLE_DEVICES")
        if kwargs.get("shutdown_on_close", True) is not True:
            raise ValueError("LocalCUDACluster does not support shutdown_on_close=False yet")
        if worker_class not in ("nanny", "process"):
            raise ValueError(f"LocalCUDACluster needs worker_class 'nanny' or 'process', got "
                             f"{worker_class!r}")
        _check_rmm(rmm_pool_size, rmm_managed_memory)
        devices = visible_devices(CUDA_VISIBLE_DEVICES)
        if n_workers is None:
            n_workers = len(devices)
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"LocalCUDACluster(n_workers={n_workers!r}): expected an integer "
                             f">= 0")
        if n_workers > len(devices):
            raise ValueError(f"LocalCUDACluster(n_workers={n_workers}): only {len(devices)} "
                             f"device(s) visible ({', '.join(d.entry for d in devices)}); one "
                             f"worker per device")
        if interface is not None:
            if host is not None:
                raise ValueError("give host= or interface=, not both")
            from taskcore.utils import get_ip_interface

            host = get_ip_interface(interface)
        self.devices = devices
        self.interface = interface
        self._initial_workers = n_workers
        # Each device's options, made once: a worker replaced or scaled up later gets the same.
        self._device_options = [device_worker_options(
            devices, i, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
            device_memory_limit=device_memory_limit, rmm_pool_size=rmm_pool_size,
            rmm_managed_memory=rmm_managed_memory, resources=resources, env=env)
            for i in range(len(devices))]
        super().__init__(n_workers=0, threads_per_worker=threads_per_worker, processes=True,
                         memory_limit=self._device_options[0]["memory_limit"],
                         host=host or "127.0.0.1", protocol=protocol,
                         worker_class=worker_class, env=env, **kwargs)

    async def _start(self):
        self._edit_spec(self._initial_workers)  # one spec per device (_template_for)
        await super()._start()

    def _free_position(self) -> int:
        used = set(self.worker_spec) | set(self.workers)
        for i in range(len(self.devices)):
            if i not in used:
                return i
        raise ValueError(f"{self.name}: every one of its {len(self.devices)} devices has a "
                         f"worker already")

    def _template_for(self, worker_group=None) -> dict:
        spec = super()._template_for(worker_group)
        if worker_group is None:
            opts = self._device_options[self._free_position()]
            spec["options"].update(
                {k: v for k, v in opts.items() if k not in ("env", "resources")},
                env={**(spec["options"].get("env") or {}), **opts["env"]},
                resources={**(spec["options"].get("resources") or {}), **opts["resources"]})
        return spec

    def _new_worker_name(self, worker_group=None):
        if worker_group is None:
            return self._free_position()  # the same position _template_for just used
        return super()._new_worker_name(worker_group)

    async def _scale(self, n, worker_group=None, **kwargs):
        if worker_group is None:
            n = min(n, len(self.devices))  # adaptive may want more workers than devices
        await super()._scale(n, worker_group=worker_group, **kwargs)

    def _target_from(self, n=None, cores=None, memory=None, worker_group=None) -> int:
        target = super()._target_from(n, cores, memory, worker_group)
        if worker_group is None and target > len(self.devices):
            raise ValueError(f"{self.name}: cannot scale to {target} workers: "
                             f"{len(self.devices)} device(s) visible, one worker per device")
        return target
