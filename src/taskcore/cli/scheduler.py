"""`core-scheduler`: run a scheduler until SIGTERM/SIGINT (or its idle timeout).

Prints one JSON line on stdout when it listens:
    {"event": "ready", "role": "scheduler", "address": "tcp://...", "pid": ...,
     "dashboard_host": ..., "dashboard_port": ..., "dashboard_prefix": ...}
The dashboard listens on --dashboard-address (default :8787, on the scheduler's --host;
another free port when that one is taken) unless --no-dashboard.
With `--scheduler-file PATH` the same address is also written (atomically) to
PATH as `{"address": ...}`, and the file is removed again on a clean exit so
that late workers do not connect to a dead address.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from taskcore.cli.common import (add_logging_options, add_tls_options, announce, duration_type,
                                 Parser, port_type, remove_shutdown_signals, resolve_protocol,
                                 run_cli, security_from_args, shutdown_event)

logger = logging.getLogger("taskcore.cli.scheduler")
PROG = "core-scheduler"
DEFAULT_PORT = 8786
DEFAULT_DASHBOARD = ":8787"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Run a taskcore scheduler.")
    p.add_argument("--host", default=None,
                   help="interface address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--interface", default=None,
                   help="network interface name (like eth0) whose IP to listen on")
    p.add_argument("--port", type=port_type, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--protocol", default=None, choices=["tcp", "tls", "ucx"],
                   help="transport (default tcp, or tls when TLS files are given)")
    p.add_argument("--dashboard-address", default=DEFAULT_DASHBOARD, metavar="[HOST]:PORT",
                   help="where the HTTP dashboard and /metrics listen (default :8787 on "
                        "--host; another free port if that one is taken)")
    p.add_argument("--no-dashboard", action="store_true", help="serve no dashboard")
    p.add_argument("--dashboard-prefix", default="", metavar="PATH",
                   help="serve the dashboard under this path, like /proxy/scheduler, for a "
                        "reverse proxy that forwards that path unchanged")
    p.add_argument("--scheduler-file", default=None, metavar="PATH",
                   help="write {\"address\": ...} JSON here once listening")
    p.add_argument("--idle-timeout", type=duration_type, default=None, metavar="DURATION",
                   help="exit after this long without clients or work, like 1h")
    p.add_argument("--allowed-failures", type=int, default=None, metavar="N",
                   help="a task that was running on N+1 workers that died errs with "
                        "KilledWorker (default 2: the third death)")
    # Other Scheduler keyword arguments as a JSON object (set by launchers such as SSHCluster's
    # scheduler_options=; not for people).
    p.add_argument("--scheduler-options", default=None, help=argparse.SUPPRESS)
    add_tls_options(p)
    add_logging_options(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.security = security_from_args(parser, args)
    args.protocol = resolve_protocol(parser, args.protocol, args.security)
    if args.host and args.interface:
        parser.error("give --host or --interface, not both")
    if args.allowed_failures is not None and args.allowed_failures < 0:
        parser.error(f"--allowed-failures must be >= 0, got {args.allowed_failures}")
    if args.interface:
        from taskcore.utils import get_ip_interface

        try:
            args.host = get_ip_interface(args.interface)
        except ValueError as e:
            parser.error(str(e))
    if args.host is None:
        args.host = "127.0.0.1"
    args.dashboard = None
    if not args.no_dashboard:
        args.dashboard = dashboard_address(parser, args.dashboard_address, args.host)
    if args.dashboard_prefix and any(c in args.dashboard_prefix for c in "?#% \t\n"):
        parser.error(f"--dashboard-prefix must be a plain path, got {args.dashboard_prefix!r}")
    args.extra = {}
    if args.scheduler_options:
        try:
            args.extra = json.loads(args.scheduler_options)
        except ValueError as e:
            parser.error(f"--scheduler-options is not valid JSON: {e}")
        if not isinstance(args.extra, dict):
            parser.error("--scheduler-options must be a JSON object")
    return args


def dashboard_address(parser, value: str, default_host: str) -> str:
    """"host:port" from "[HOST]:PORT" or "PORT"; an empty host means the scheduler's."""
    from taskcore.dashboard.binding import dashboard_on_host

    try:
        return dashboard_on_host(value, default_host)
    except (TypeError, ValueError) as e:
        parser.error(f"--dashboard-address must be [HOST]:PORT: {e}")


async def run(args) -> int:
    from taskcore.scheduler import Scheduler
    from taskcore.utils import write_json_atomic

    loop = asyncio.get_running_loop()
    stop = shutdown_event("shutting down")
    kwargs = dict(host=args.host, port=args.port, protocol=args.protocol,
                  idle_timeout=args.idle_timeout,
                  dashboard_address=getattr(args, "dashboard", None),
                  dashboard_prefix=getattr(args, "dashboard_prefix", ""))
    if args.security is not None:
        kwargs["security"] = args.security
    if args.allowed_failures is not None:
        kwargs["allowed_failures"] = args.allowed_failures
    kwargs.update(getattr(args, "extra", None) or {})
    try:
        scheduler = Scheduler(**kwargs)
    except (TypeError, ValueError) as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        remove_shutdown_signals(loop)
        return 2
    start = asyncio.ensure_future(scheduler.start())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            await _close(scheduler)
            return 0
        if start.exception() is not None:
            e = start.exception()
            sys.stderr.write(f"{PROG}: error: could not start the scheduler: {e}\n")
            await _close(scheduler)
            return 1
        if args.scheduler_file:
            write_json_atomic(args.scheduler_file, {"address": scheduler.address,
                                                    "pid": os.getpid()})
        d = scheduler.dashboard
        announce("scheduler", scheduler.address,
                 dashboard_host=d.host if d is not None else None,
                 dashboard_port=d.port if d is not None else None,
                 dashboard_prefix=d.prefix if d is not None else None)
        logger.info("scheduler listening at %s", scheduler.address)
        finished = asyncio.ensure_future(scheduler.finished())
        await asyncio.wait({finished, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if finished.done():
            logger.info("scheduler finished on its own")
        finished.cancel()
        await _close(scheduler)
        return 0
    finally:
        stopper.cancel()
        remove_shutdown_signals(loop)
        if args.scheduler_file:
            _remove_scheduler_file(args.scheduler_file, getattr(scheduler, "address", None))


async def _close(scheduler):
    try:
        await asyncio.wait_for(scheduler.close(), 30)
    except Exception as e:
        logger.warning("closing the scheduler failed: %r", e)


def _remove_scheduler_file(path, address):
    from taskcore.utils import read_json_file

    try:
        data = read_json_file(path)
        if isinstance(data, dict) and data.get("address") == address and \
                data.get("pid") == os.getpid():
            os.unlink(path)
    except (OSError, ValueError):
        pass


def main(argv=None):
    run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
