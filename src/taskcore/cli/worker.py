"""`core-worker`: run one or more workers (by default each under its own nanny process).

    core-worker tcp://10.0.0.5:8786 --nthreads 4 --memory-limit 16GiB
    core-worker --scheduler-file /shared/scheduler.json --nworkers 2
    core-worker tcp://10.0.0.5:8786 --device-memory-limit 0.8    # GPU results past 80% -> host

Prints one JSON line on stdout once every worker is up:
    {"event": "ready", "role": "worker", "address": <first worker>, "name": ...,
     "pid": <this process>, "nanny": <first nanny, if any>, "workers": [{...}, ...]}
Exits 0 after SIGTERM/SIGINT, or when every worker has finished on its own
(scheduler gone past --death-timeout, --lifetime over, retired). Exits 1 when
a worker cannot start, 2 on bad options.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from taskcore.cli.common import (Parser, add_logging_options, add_tls_options, add_worker_options,
                                 address_type, announce, duration_type, memory_limit_type,
                                 positive_int, remove_shutdown_signals, resolve_worker_args,
                                 resources_type,
                                 run_cli, scheduler_address_unless_stopped, shutdown_event,
                                 start_unless_stopped)

logger = logging.getLogger("taskcore.cli.worker")
PROG = "core-worker"


def _nworkers_type(text):
    if text.strip().lower() == "auto":
        return "auto"
    return positive_int(text)


def _fraction_type(text):
    """A memory fraction of --memory-limit: a number in (0, 1], or false/0 for off."""
    from taskcore.worker_memory import parse_fraction

    try:
        f = parse_fraction("the value", text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return False if f is None else f


def _device_limit_type(text):
    """--device-memory-limit: checked here, resolved by each worker on its own GPU."""
    from taskcore.worker_memory import check_device_memory_limit

    try:
        return check_device_memory_limit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --memory-*-fraction and --memory-pause-timeout: Worker/Nanny keywords (worker_memory.py).
_MEMORY_FLAGS = ("memory_target_fraction", "memory_spill_fraction", "memory_pause_fraction",
                 "memory_terminate_fraction", "memory_pause_timeout")


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Run taskcore worker(s) connected to a scheduler.")
    p.add_argument("address", nargs="?", type=address_type, default=None, metavar="ADDRESS",
                   help="scheduler address, like tcp://10.0.0.5:8786")
    p.add_argument("--scheduler-file", default=None, metavar="PATH",
                   help="read the scheduler address from this JSON file (waits for it)")
    p.add_argument("--nthreads", type=positive_int, default=None,
                   help="threads per worker (default: CPUs / nworkers)")
    p.add_argument("--nworkers", type=_nworkers_type, default=1,
                   help="worker processes to start ('auto': one per CPU); with --no-nanny, "
                        "that many workers in this process")
    p.add_argument("--memory-limit", type=memory_limit_type, default="auto",
                   help="per worker: 'auto' (its share of RAM), a size like 4GiB, a fraction "
                        "like 0.5, or 0 for no limit")
    for what, default, help_ in (
            ("target", 0.6, "spill results to disk, least recently used first, past this "
                            "fraction of --memory-limit held as results"),
            ("spill", 0.7, "spill while the process's memory is past this fraction"),
            ("pause", 0.8, "start no new tasks while the process's memory is past this "
                           "fraction"),
            ("terminate", 0.95, "the nanny restarts the worker past this fraction")):
        p.add_argument(f"--memory-{what}-fraction", type=_fraction_type, default=None,
                       metavar="FRACTION", help=f"{help_} (default {default}; false: never)")
    p.add_argument("--memory-pause-timeout", type=duration_type, default=None,
                   metavar="DURATION", help="restart a worker paused this long, after moving "
                                            "its data to other workers (default 60s)")
    p.add_argument("--device-memory-limit", type=_device_limit_type, default=None,
                   metavar="LIMIT",
                   help="per worker: move GPU results to host memory, least recently used "
                        "first, past this much device memory: a size like 10GB, a fraction "
                        "of the GPU's memory like 0.8, 'auto' (0.8), or 0 for off (default)")
    p.add_argument("--name", default=None, help="worker name (suffixed -0, -1... with --nworkers)")
    p.add_argument("--resources", type=resources_type, default=None,
                   help='abstract resources, like "GPU=2,MEM=10e9"')
    p.add_argument("--nanny", dest="nanny", action=argparse.BooleanOptionalAction, default=True,
                   help="run each worker under a nanny process that restarts it (default)")
    add_worker_options(p)
    p.add_argument("--dashboard-address", default=":0", metavar="[HOST]:PORT",
                   help="where each worker serves /metrics for Prometheus (default ':0', any "
                        "free port on the worker's host)")
    p.add_argument("--dashboard", dest="dashboard", action=argparse.BooleanOptionalAction,
                   default=True, help="serve /metrics (--no-dashboard: do not)")
    # Set by a nanny for its child; not for people.
    p.add_argument("--nanny-address", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-options", default=None, help=argparse.SUPPRESS)
    add_tls_options(p)
    add_logging_options(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_worker_args(parser, args)
    from taskcore.utils import cpu_count

    if args.nworkers == "auto":
        args.nworkers = max(1, cpu_count() // (args.nthreads or 1))
    if args.nthreads is None:
        args.nthreads = max(1, cpu_count() // args.nworkers)
    if args.nanny and args.nanny_address:
        parser.error("--nanny-address is only for --no-nanny workers")
    if not args.dashboard:
        args.dashboard_address = None
    else:
        from taskcore.worker_metrics import parse_dashboard_address

        try:
            _, port = parse_dashboard_address(args.dashboard_address, "")
        except ValueError as e:
            parser.error(str(e))
        if port and args.nworkers > 1:
            parser.error(f"--dashboard-address with a fixed port ({port}) cannot serve "
                         f"{args.nworkers} workers; use port 0 (any free port)")
    return args


def _names(args):
    n = args.nworkers
    if args.name is None:
        return [None] * n
    return [args.name] if n == 1 else [f"{args.name}-{i}" for i in range(n)]


def _memory_bytes(args):
    from taskcore.utils import parse_memory_limit

    limit = args.memory_limit
    if limit in ("none", "0"):
        return None
    return parse_memory_limit(limit, args.nthreads)


def _make_servers(args, address):
    common = dict(nthreads=args.nthreads, memory_limit=_memory_bytes(args),
                  death_timeout=args.death_timeout, lifetime=args.lifetime,
                  protocol=args.protocol, **args.extra)
    optional = dict(resources=args.resources, local_directory=args.local_directory,
                    lifetime_stagger=args.lifetime_stagger, host=args.host,
                    security=args.security)
    common.update({k: v for k, v in optional.items() if v is not None})
    common.update({k: getattr(args, k) for k in _MEMORY_FLAGS if getattr(args, k) is not None})
    if args.device_memory_limit is not None:
        common["device_memory_limit"] = args.device_memory_limit
    common.setdefault("dashboard_address", args.dashboard_address)
    servers = []
    for name in _names(args):
        if args.nanny:
            from taskcore.nanny import Nanny

            servers.append(Nanny(address, name=name, log_level=args.log_level, **common))
        else:
            from taskcore.worker import Worker

            kw = dict(common)
            if args.nanny_address:
                kw["nanny_address"] = args.nanny_address
            servers.append(Worker(address, name=name, **kw))
    return servers


def _describe(server, nanny: bool) -> dict:
    if nanny:
        name = server.name
        if name is None and server.process is not None and server.process.info:
            name = server.process.info.get("name")  # the name the worker chose itself
        return {"address": server.worker_address, "name": name,
                "nanny": server.address, "worker_pid": server.worker_pid}
    return {"address": server.address, "name": getattr(server, "name", None)}


async def run(args) -> int:
    loop = asyncio.get_running_loop()
    stop = shutdown_event("shutting down")
    stopper = asyncio.ensure_future(stop.wait())
    servers = []
    try:
        address, code = await scheduler_address_unless_stopped(args, stopper, PROG)
        if address is None:
            return code
        try:
            servers = _make_servers(args, address)
        except (TypeError, ValueError) as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
        started, e = await start_unless_stopped(
            asyncio.gather(*(s.start() for s in servers)), stopper)
        if not started:
            return 0
        if e is not None:
            sys.stderr.write(f"{PROG}: error: could not start worker: {e}\n")
            return 1
        workers = [_describe(s, args.nanny) for s in servers]
        extra = {"name": workers[0]["name"]}
        if args.nanny:
            extra["nanny"] = workers[0]["nanny"]
            extra["worker_pid"] = workers[0]["worker_pid"]
        if len(workers) > 1:
            extra["workers"] = workers
        announce("worker", workers[0]["address"], **extra)
        # One task per server and asyncio.wait (not gather): cancelling leaves no
        # unretrieved exceptions behind.
        finishing = [asyncio.ensure_future(s.finished()) for s in servers]
        all_done = asyncio.ensure_future(asyncio.wait(finishing))
        await asyncio.wait({all_done, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if all_done.done():
            logger.info("all workers finished on their own")
        for t in (all_done, *finishing):
            t.cancel()
        return 0
    finally:
        stopper.cancel()
        await _close_all(servers)
        remove_shutdown_signals(loop)


async def _close_all(servers):
    async def close(s):
        try:
            await asyncio.wait_for(s.close(), 60)
        except Exception as e:
            logger.warning("closing %r failed: %r", s, e)

    if servers:
        await asyncio.gather(*(close(s) for s in servers))


def main(argv=None):
    # A GPU worker's CPU pinning and RMM pool come through its environment (deploy/cuda.py)
    # and must be in place before any thread starts; without those variables: nothing.
    from taskcore.affinity import apply_from_env

    apply_from_env()
    run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
