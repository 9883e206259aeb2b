"""Option parsing and process plumbing shared by `core-scheduler` and `core-worker`.

Every option is validated by argparse `type=` functions, so a bad value exits
with status 2 and one clear line on stderr before anything starts. A started
process reports readiness with exactly one JSON line on stdout (`announce`);
everything else, logs included, goes to stderr, so launchers never have to
scrape logs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

from taskcore.utils import (parse_bytes, parse_resources, parse_timedelta, read_json_file)

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `core-worker: error: <message>` and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# argparse types: each raises ArgumentTypeError with the reason, which argparse prints
# ---------------------------------------------------------------------------------------------

def memory_limit_type(text: str):
    """`auto`, `0`/`none` (no limit), a fraction like `0.5`, or a size like `4GiB`."""
    t = text.strip().lower()
    if t in ("auto", "none", "0"):
        return t
    try:
        f = float(t)
    except ValueError:
        f = None
    if f is not None and 0 < f <= 1:
        return f
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; use 'auto' or a size like '4GiB'") from None


def bytes_type(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resources_type(text: str) -> dict:
    try:
        return parse_resources(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (expected like \"GPU=2,MEM=10e9\")") from None


def duration_type(text: str) -> float:
    try:
        return parse_timedelta(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def address_type(text: str) -> str:
    """A full scheduler address: `tcp://host:port` (a bare `host:port` means tcp)."""
    from taskcore.transports.addressing import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(text)
        if scheme in ("tcp", "tls"):
            host, port = parse_host_port(loc)
            if not host:
                raise ValueError(f"no host in address {text!r}")
            if port == 0:
                raise ValueError(f"port 0 is not a scheduler address: {text!r}")
        elif scheme == "inproc":
            raise ValueError(f"{text!r}: inproc:// only works inside one process")
        else:
            from taskcore.transports.registry import get_backend

            get_backend(scheme)  # unknown schemes raise AddressError, a ValueError
            if not loc:
                raise ValueError(f"empty location in {text!r}")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid address: {e}") from None
    return text if "://" in text else f"tcp://{text}"


def port_type(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} out of range (0-65535; 0 = any free port)")
    return port


def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
    return n


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def count_type(text: str) -> int:
    """A count that may be zero (jobs, workers)."""
    return _int_at_least(text, 0, "a number >= 0")


async def start_unless_stopped(start, stopper):
    """Await the coroutine `start` unless `stopper` (a shutdown signal's future) ends first.

    Returns (started, error): (False, None) when a signal came first (the start is
    cancelled, and whatever it holds is released by its own cancellation handling);
    (True, exception) when the start failed; (True, None) when it succeeded. The CLIs
    that start servers or clusters share it, so Ctrl-C during a slow start is a clean exit.
    """
    task = asyncio.ensure_future(start)
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False, None
    return True, task.exception()


async def scheduler_address_unless_stopped(args, stopper, prog: str):
    """The workers' scheduler: `args.address`, or the one `--scheduler-file` names, waited
    for (at most `--death-timeout`) unless `stopper` ends first. Returns (address, None),
    or (None, the exit code: 0 when stopped, 1 when the file never came)."""
    if args.address is not None:
        return args.address, None
    waiter = asyncio.ensure_future(wait_for_scheduler_file(args.scheduler_file,
                                                           timeout=args.death_timeout))
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not waiter.done():
        waiter.cancel()
        return None, 0
    try:
        return waiter.result(), None
    except TimeoutError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return None, 1


def log_level_type(text: str) -> str:
    t = text.strip().lower()
    if t not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}; one of {', '.join(LOG_LEVELS)}")
    return t


# ---------------------------------------------------------------------------------------------
# Option groups
# ---------------------------------------------------------------------------------------------

def add_worker_options(parser: argparse.ArgumentParser, workers: str = "the worker") -> None:
    """The options core-worker and core-cuda-worker share, from --local-directory on;
    `workers` names what they apply to in the help ("the worker", "the workers")."""
    p = parser
    p.add_argument("--local-directory", default=None, metavar="PATH",
                   help="scratch directory for spilled data")
    p.add_argument("--lifetime", type=duration_type, default=None, metavar="DURATION",
                   help=f"close {workers} gracefully after this long, like 1h")
    p.add_argument("--lifetime-stagger", type=duration_type, default=None, metavar="DURATION",
                   help="randomize --lifetime by up to this much, so workers do not all leave "
                        "together")
    p.add_argument("--death-timeout", type=duration_type, default=None, metavar="DURATION",
                   help="exit when the scheduler has been unreachable this long")
    p.add_argument("--protocol", default=None, choices=["tcp", "tls", "ucx"],
                   help="transport (default: the scheduler address's scheme)")
    p.add_argument("--host", default=None, help="address to listen on")
    p.add_argument("--interface", default=None,
                   help="network interface name (like eth0 or ib0) whose IP to listen on")


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TLS (mutual authentication; all three are needed for tls://)")
    g.add_argument("--tls-ca-file", metavar="PATH", help="CA certificate (PEM) that signed peers")
    g.add_argument("--tls-cert", metavar="PATH", help="this process's certificate (PEM)")
    g.add_argument("--tls-key", metavar="PATH", help="this process's private key (PEM)")
    a = parser.add_argument_group(
        "Authentication (a shared token; TASKCORE_TOKEN in the environment is used "
        "when neither option is given)")
    a.add_argument("--token-file", metavar="PATH",
                   help="file holding the shared token (its first line)")
    a.add_argument("--token", metavar="TOKEN",
                   help="the shared token itself (visible to other users in `ps`: prefer "
                        "--token-file or TASKCORE_TOKEN)")


def add_logging_options(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument("--log-level", type=log_level_type, default=default,
                        help=f"stderr log level: {', '.join(LOG_LEVELS)} (default {default})")


def _token_from_args(parser, args):
    token, path = getattr(args, "token", None), getattr(args, "token_file", None)
    if token is not None and path is not None:
        parser.error("give --token or --token-file, not both")
    if path is not None:
        try:
            with open(path) as f:
                token = f.readline().strip()
        except OSError as e:
            parser.error(f"--token-file: {e}")
        if not token:
            parser.error(f"--token-file {path} is empty")
    if token is not None and not token:
        parser.error("--token is empty")
    return token


def security_from_args(parser, args):
    """A `Security` from the TLS and token options, None without any; a partial TLS
    set is an error."""
    token = _token_from_args(parser, args)
    given = {k: getattr(args, k) for k in ("tls_ca_file", "tls_cert", "tls_key")}
    if not any(given.values()):
        if token is None:
            return None
        from taskcore.security import Security

        return Security(token=token)
    missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if not v]
    if missing:
        parser.error(f"TLS needs --tls-ca-file, --tls-cert and --tls-key; missing {', '.join(missing)}")
    from taskcore.security import Security

    try:
        return Security(ca_file=given["tls_ca_file"], cert_file=given["tls_cert"],
                        key_file=given["tls_key"], require_encryption=True, token=token)
    except (OSError, ValueError) as e:
        parser.error(str(e))


def cluster_security_from_args(parser, args):
    """`security_from_args` for the cluster CLIs (core-ssh, core-jobqueue): their TLS is
    on by default (temporary credentials), `--no-tls` turns it off, and a detached
    cluster takes no credentials yet."""
    security = security_from_args(parser, args)
    if security is not None and security.enabled and args.no_tls:
        parser.error("give --no-tls or the --tls-* files, not both")
    if security is not None and args.detach:
        parser.error("--detach does not support --tls-*, --token or --token-file yet "
                     "(a detached cluster runs over plain tcp://)")
    return security


def resolve_protocol(parser, protocol, security):
    """`--protocol` wins; otherwise tls when TLS credentials are given, else tcp."""
    tls = security is not None and security.enabled
    if protocol is None:
        return "tls" if tls else "tcp"
    protocol = protocol.lower().rstrip(":/")
    if protocol == "tls" and not tls:
        parser.error("--protocol tls needs --tls-ca-file, --tls-cert and --tls-key")
    return protocol


def resolve_worker_args(parser, args) -> None:
    """What core-worker and core-cuda-worker decide alike from their arguments: exactly one
    of ADDRESS and --scheduler-file, the credentials, the protocol (the address's scheme
    unless given), the host from --interface, and the hidden --worker-options JSON as
    `args.extra` (the keywords a nanny hands its worker)."""
    if (args.address is None) == (args.scheduler_file is None):
        parser.error("give the scheduler ADDRESS or --scheduler-file (exactly one)")
    args.security = security_from_args(parser, args)
    if args.protocol is None and args.address is not None:
        from taskcore.transports.addressing import parse_address

        scheme = parse_address(args.address)[0]
        args.protocol = scheme if scheme in ("tcp", "tls", "ucx") else None
    args.protocol = resolve_protocol(parser, args.protocol, args.security)
    if args.host and args.interface:
        parser.error("give --host or --interface, not both")
    if args.interface:
        from taskcore.utils import get_ip_interface

        try:
            args.host = get_ip_interface(args.interface)
        except ValueError as e:
            parser.error(str(e))
    args.extra = {}
    if args.worker_options:
        try:
            args.extra = json.loads(args.worker_options)
        except ValueError as e:
            parser.error(f"--worker-options is not valid JSON: {e}")
        if not isinstance(args.extra, dict):
            parser.error("--worker-options must be a JSON object")


def setup_logging(level: str = "info") -> None:
    """Send taskcore's logs to stderr at `level`. stdout stays reserved for the ready line."""
    logger = logging.getLogger("taskcore")
    logger.setLevel(getattr(logging, level.upper()))
    # Replace a handler from an earlier call (tests call main() repeatedly in one process).
    for h in list(logger.handlers):
        if getattr(h, "_taskcore_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler._taskcore_cli = True
    logger.addHandler(handler)
    logger.propagate = False


# ---------------------------------------------------------------------------------------------
# Process plumbing
# ---------------------------------------------------------------------------------------------

def announce(role: str, address: str, **fields) -> dict:
    """Print the one JSON ready line on stdout and flush it (launchers block on it)."""
    msg = {"event": "ready", "role": role, "address": address, "pid": os.getpid(), **fields}
    sys.stdout.write(json.dumps(msg, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return msg


def install_shutdown_signals(loop: asyncio.AbstractEventLoop, on_signal) -> None:
    """Call `on_signal(signum)` on SIGTERM and SIGINT (on the loop, so it may start tasks)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals
            pass


def shutdown_event(what: str = "shutting down") -> asyncio.Event:
    """An Event set by the first SIGTERM or SIGINT (installed before start-up, so a
    signal during start-up still ends in a clean exit)."""
    stop = asyncio.Event()

    def on_signal(sig):
        logging.getLogger("taskcore.cli").info("received %s; %s", getattr(sig, "name", sig),
                                               what)
        stop.set()

    install_shutdown_signals(asyncio.get_running_loop(), on_signal)
    return stop


def run_cli(parse_args, run, argv=None):
    """The shared `main`: parse, set up logging, run `run(args)` on uvloop, exit with its code."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    import uvloop

    try:
        code = uvloop.run(run(args))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        code = 0
    sys.exit(code)


def remove_shutdown_signals(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.remove_signal_handler(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass


async def wait_for_scheduler_file(path: str, timeout: float | None = None,
                                  interval: float = 0.1) -> str:
    """Wait until `path` holds `{"address": ...}` and return the address."""
    deadline = None if timeout is None else time.monotonic() + timeout
    logged = False
    while True:
        try:
            data = read_json_file(path)
        except (ValueError, OSError):
            data = None  # a half-written file from a non-atomic writer: try again
        if isinstance(data, dict) and isinstance(data.get("address"), str):
            return data["address"]
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"scheduler file {path} did not appear within {timeout} s")
        if not logged:
            logging.getLogger("taskcore.cli").info("waiting for scheduler file %s", path)
            logged = True
        await asyncio.sleep(interval)


def exit_with_error(prog: str, message: str, code: int = 1):
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)
