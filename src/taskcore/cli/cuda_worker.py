"""`core-cuda-worker`: one worker per GPU of this machine, each under its own nanny.

    core-cuda-worker tcp://10.0.0.5:8786
    core-cuda-worker tcp://10.0.0.5:8786 --cuda-visible-devices 0,1 --rmm-pool-size 20GB
    core-cuda-worker --scheduler-file /shared/scheduler.json --device-memory-limit 0.8

Like `dask-cuda-worker`: the devices are CUDA_VISIBLE_DEVICES (the option, else the
environment, else every GPU; indexes, GPU-/MIG- UUIDs); each worker sees its own
device first, is pinned to the CPUs near it (within this process's allowed CPUs),
and offers the resource GPU=1 (see taskcore/deploy/cuda.py). With --name, workers
are named as core-worker names its processes: NAME for one device, else NAME-0,
NAME-1... in device order. The options are core-worker's where they make sense
(`taskcore.process.cuda_worker_cli_args` writes them), plus the GPU ones.

Prints one JSON line on stdout once every worker is up:
    {"event": "ready", "role": "worker", "address": <first worker>, "workers": [...], ...}
Exits 0 after SIGTERM/SIGINT or when every worker has finished on its own; 1 when
there is no usable GPU or a worker cannot start; 2 on bad options (an unknown
device included).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from taskcore.cli.common import (Parser, add_logging_options, add_tls_options, add_worker_options,
                                 address_type, announce, memory_limit_type, positive_int,
                                 remove_shutdown_signals, resolve_worker_args, resources_type,
                                 run_cli, scheduler_address_unless_stopped, shutdown_event,
                                 start_unless_stopped)

logger = logging.getLogger("taskcore.cli.cuda_worker")
PROG = "core-cuda-worker"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Run one taskcore worker per GPU, connected to a "
                                      "scheduler.")
    p.add_argument("address", nargs="?", type=address_type, default=None, metavar="ADDRESS",
                   help="scheduler address, like tcp://10.0.0.5:8786")
    p.add_argument("--scheduler-file", default=None, metavar="PATH",
                   help="read the scheduler address from this JSON file (waits for it)")
    p.add_argument("--cuda-visible-devices", default=None, metavar="DEVICES",
                   help="devices to use, like 0,1 or GPU-<uuid>,MIG-<uuid> (default: "
                        "$CUDA_VISIBLE_DEVICES, else every GPU)")
    p.add_argument("--nthreads", type=positive_int, default=1, help="threads per worker (1)")
    p.add_argument("--memory-limit", type=memory_limit_type, default="auto",
                   help="host memory per worker: 'auto' (this machine's memory split among "
                        "the GPU workers), a size like 16GiB, a fraction, or 0 for none")
    p.add_argument("--device-memory-limit", default="auto", metavar="LIMIT",
                   help="device memory held as results before spilling to host: 'auto' "
                        "(0.8 of the device), a fraction of it, a size like 30GB, or none")
    p.add_argument("--rmm-pool-size", default=None, metavar="SIZE",
                   help="an RMM memory pool per worker: a size like 20GB or a fraction of "
                        "the device (needs rmm)")
    p.add_argument("--rmm-managed-memory", action="store_true",
                   help="RMM on CUDA managed memory (needs rmm)")
    p.add_argument("--name", default=None,
                   help="worker name (suffixed -0, -1... with several devices)")
    p.add_argument("--resources", type=resources_type, default=None,
                   help='more abstract resources per worker, like "MEM=10e9" (GPU=1 is added)')
    add_worker_options(p, "the workers")
    p.add_argument("--dashboard", dest="dashboard", action=argparse.BooleanOptionalAction,
                   default=True, help="serve /metrics on a free port per worker")
    p.add_argument("--worker-options", default=None, help=argparse.SUPPRESS)
    add_tls_options(p)
    add_logging_options(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_worker_args(parser, args)
    if args.extra:
        # GPU options that a launcher could only pass as JSON are ours, not the workers'.
        for key in ("rmm_pool_size", "rmm_managed_memory", "device_memory_limit"):
            if key in args.extra:
                value = args.extra.pop(key)
                if key == "rmm_managed_memory":
                    args.rmm_managed_memory = bool(value) or args.rmm_managed_memory
                elif value is not None:
                    setattr(args, key, value)
    from taskcore import nvml
    from taskcore.deploy import cuda

    try:
        cuda.parse_cuda_visible_devices(args.cuda_visible_devices)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    try:
        args.devices = cuda.visible_devices(args.cuda_visible_devices)
    except (nvml.NVMLUnavailable, nvml.NVMLDeviceError) as e:
        parser.exit(1, f"{PROG}: error: {e}\n")
    except ValueError as e:
        parser.error(str(e))
    if args.memory_limit in ("none", "0"):
        args.memory_limit = None
    try:
        cuda._check_rmm(args.rmm_pool_size, args.rmm_managed_memory)
    except ImportError as e:
        parser.exit(1, f"{PROG}: error: {e}\n")
    try:  # sizes against each device now: a bad one is a usage error, before anything starts
        for d in args.devices:
            cuda._device_bytes("--device-memory-limit", args.device_memory_limit, d,
                               cuda.DEFAULT_DEVICE_MEMORY_FRACTION)
            cuda._device_bytes("--rmm-pool-size", args.rmm_pool_size, d, None)
    except ValueError as e:
        parser.error(str(e))
    return args


def _make_worker(args, address):
    from taskcore.deploy.cuda import CUDAWorker

    common = dict(death_timeout=args.death_timeout, lifetime=args.lifetime,
                  protocol=args.protocol, log_level=args.log_level, **args.extra)
    optional = dict(local_directory=args.local_directory, host=args.host,
                    security=args.security, lifetime_stagger=args.lifetime_stagger)
    common.update({k: v for k, v in optional.items() if v is not None})
    if not args.dashboard:
        common["dashboard_address"] = None
    return CUDAWorker(address, name=args.name, CUDA_VISIBLE_DEVICES=args.devices,
                      threads_per_worker=args.nthreads, memory_limit=args.memory_limit,
                      device_memory_limit=args.device_memory_limit,
                      rmm_pool_size=args.rmm_pool_size,
                      rmm_managed_memory=args.rmm_managed_memory, resources=args.resources,
                      **common)


async def run(args) -> int:
    loop = asyncio.get_running_loop()
    stop = shutdown_event("shutting down")
    stopper = asyncio.ensure_future(stop.wait())
    worker = None
    try:
        address, code = await scheduler_address_unless_stopped(args, stopper, PROG)
        if address is None:
            return code
        try:
            worker = _make_worker(args, address)
        except (TypeError, ValueError) as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
        started, e = await start_unless_stopped(worker.start(), stopper)
        if not started:
            return 0
        if e is not None:
            sys.stderr.write(f"{PROG}: error: could not start worker: {e}\n")
            return 1
        workers = worker.describe()
        first = workers[0]
        announce("worker", first["address"], name=first["name"], nanny=first["nanny"],
                 worker_pid=first["worker_pid"], workers=workers)
        done = asyncio.ensure_future(worker.finished())
        await asyncio.wait({done, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            logger.info("all workers finished on their own")
        done.cancel()
        return 0
    finally:
        stopper.cancel()
        if worker is not None:
            try:
                await asyncio.wait_for(worker.close(), 60)
            except Exception as e:
                logger.warning("closing the workers failed: %r", e)
        remove_shutdown_signals(loop)


def main(argv=None):
    run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
