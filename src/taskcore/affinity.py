"""Placing a GPU worker process before it starts: the CPUs near its GPU, its memory pool.

A cluster that starts GPU workers (deploy/cuda.py) decides this in the parent and
hands it over in the worker's environment; the worker process applies it first
thing in `main()` (`apply_from_env()`), before the event loop and the task
threads exist, because on Linux a thread inherits the affinity of the thread that
creates it:

    TASKCORE_CPU_AFFINITY=0-3,8        the CPUs, in the kernel's cpulist format
    TASKCORE_RMM_POOL_SIZE=<bytes>     an RMM memory pool of that size on the device
    TASKCORE_RMM_MANAGED_MEMORY=1      RMM on CUDA managed (unified) memory

Standard library only (RMM is imported only when a pool is asked for). Nothing
set: nothing done, at the cost of three dictionary lookups.
"""
from __future__ import annotations

import logging
import os

__all__ = ["AFFINITY_ENV", "RMM_POOL_ENV", "RMM_MANAGED_ENV", "parse_cpu_list",
           "format_cpu_list", "apply_from_env", "set_process_affinity", "init_rmm"]

AFFINITY_ENV = "TASKCORE_CPU_AFFINITY"
RMM_POOL_ENV = "TASKCORE_RMM_POOL_SIZE"
RMM_MANAGED_ENV = "TASKCORE_RMM_MANAGED_MEMORY"

logger = logging.getLogger("taskcore.affinity")


def parse_cpu_list(text: str) -> set[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8} (the format of /sys/devices/system/cpu/online)."""
    cpus: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r}: {part!r} is not N or N-M") from None
        if a < 0 or b < a:
            raise ValueError(f"bad CPU list {text!r}: {part!r} is not an increasing range")
        cpus.update(range(a, b + 1))
    if not cpus:
        raise ValueError(f"bad CPU list {text!r}: no CPUs")
    return cpus


def format_cpu_list(cpus) -> str:
    """{0, 1, 2, 3, 8} -> "0-3,8"."""
    ids = sorted(set(int(c) for c in cpus))
    out = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def set_process_affinity(cpus: set[int]) -> None:
    """Pin this process to `cpus`: every thread it has now, and (through the calling
    thread) every thread it starts later."""
    os.sched_setaffinity(0, cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:  # threads an import may already have started
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass  # it ended meanwhile


def init_rmm(pool_size: int | None, managed_memory: bool = False) -> None:
    """Make RMM allocate from a pool of `pool_size` bytes (and/or managed memory) on this
    process's device, as dask-cuda's RMMSetup does with `rmm.reinitialize`."""
    try:
        import rmm
    except ImportError as e:
        raise ImportError(f"an RMM pool was asked for ({RMM_POOL_ENV}), but rmm is not "
                          f"importable here ({e}): pip install rmm-cu12 (it comes with "
                          f"'taskcore[ucx]')") from e
    kwargs = {"pool_allocator": pool_size is not None, "managed_memory": bool(managed_memory)}
    if pool_size is not None:
        kwargs["initial_pool_size"] = int(pool_size) // 256 * 256  # RMM wants 256-byte multiples
    rmm.reinitialize(**kwargs)


def apply_from_env(environ=None) -> None:
    """Apply the placement the environment asks for (see the module doc).

    A CPU set this process may not use is a warning, not a failure: the worker runs
    unpinned. A bad value or a failing RMM is an error: the worker must not start
    with a device set up other than asked.
    """
    env = os.environ if environ is None else environ
    text = env.get(AFFINITY_ENV)
    if text:
        cpus = parse_cpu_list(text)
        try:
            set_process_affinity(cpus)
        except OSError as e:
            logger.warning("cannot pin this worker to CPUs %s (%s); it runs on %s", text, e,
                           format_cpu_list(os.sched_getaffinity(0)))
    pool = env.get(RMM_POOL_ENV)
    managed = env.get(RMM_MANAGED_ENV, "").strip().lower() in ("1", "true", "yes")
    if pool or managed:
        size = None
        if pool:
            try:
                size = int(pool)
            except ValueError:
                raise ValueError(f"{RMM_POOL_ENV}={pool!r}: expected a number of bytes") from None
        init_rmm(size, managed)
