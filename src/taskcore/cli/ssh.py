"""`core-ssh`: an SSHCluster from the command line, in the foreground until Ctrl-C.

    core-ssh 10.0.0.1 10.0.0.2 10.0.0.3 --nthreads 4 --ssh-username me \\
             --ssh-private-key ~/.ssh/id_ed25519 --remote-python /opt/venv/bin/python

The first host runs the scheduler, every further host one worker process
(`--nworkers` workers in it). Once all are up, one JSON line goes to stdout:
    {"event": "ready", "role": "cluster", "address": <scheduler>, "name": ..., "workers": N}
Remote logs stream to stderr, prefixed by process name and host. SIGINT or
SIGTERM closes the cluster (every remote process is killed by PID) and exits 0.
Exit status 1: the cluster could not start (the message names the host);
2: bad options. With `--detach` the processes keep running after exit
(`core-clusters` lists them; `SSHCluster.from_name(NAME)` reconnects).

Security: TLS by default, with throwaway credentials made for this run (the
ready line's "security" names their files, for clients on this machine;
removed on exit), or the `--tls-*` files given; `--token-file` (or
TASKCORE_TOKEN) adds a shared token. `--no-tls` runs plain tcp:// (a warning
says that anyone who can reach the scheduler can run code, unless a token is
set). `--detach` runs over tcp:// (detached clusters have no TLS yet).
"""
from __future__ import annotations

import asyncio
import logging
import sys

from taskcore.cli.common import (add_logging_options, add_tls_options, announce, duration_type,
                                 memory_limit_type, start_unless_stopped,
                                 Parser, port_type, positive_int, remove_shutdown_signals,
                                 run_cli, cluster_security_from_args, shutdown_event)

logger = logging.getLogger("taskcore.cli.ssh")
PROG = "core-ssh"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Start a taskcore cluster on hosts reached over SSH.")
    p.add_argument("hosts", nargs="+", metavar="HOST",
                   help="the scheduler's host, then one entry per worker process")
    p.add_argument("--nthreads", type=positive_int, default=None, help="threads per worker")
    p.add_argument("--nworkers", type=positive_int, default=1,
                   help="workers per worker host process (default 1)")
    p.add_argument("--memory-limit", type=memory_limit_type, default="auto",
                   help="per worker: 'auto', a size like 4GiB, a fraction, or 0 for none")
    p.add_argument("--worker-class", default="taskcore.Nanny",
                   choices=["taskcore.Nanny", "taskcore.Worker"],
                   help="run workers under a nanny (default) or bare")
    p.add_argument("--death-timeout", type=duration_type, default=None, metavar="DURATION",
                   help="workers exit when the scheduler is unreachable this long")
    p.add_argument("--scheduler-port", type=port_type, default=0,
                   help="scheduler port (default: any free port)")
    p.add_argument("--remote-python", default=None, metavar="PATH",
                   help="Python on the remote hosts (default python3 on their PATH)")
    p.add_argument("--remote-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every remote process (repeatable)")
    p.add_argument("--ssh-port", type=port_type, default=None, help="SSH port (default 22)")
    p.add_argument("--ssh-username", default=None, help="SSH user (default: yours)")
    p.add_argument("--ssh-private-key", action="append", default=[], metavar="PATH",
                   help="private key file (repeatable; default: your agent and ~/.ssh keys)")
    p.add_argument("--no-host-key-check", action="store_true",
                   help="do not verify host keys against known_hosts (trusted networks only)")
    p.add_argument("--connect-timeout", type=duration_type, default=15.0, metavar="DURATION",
                   help="give up on a host after this long (default 15s)")
    p.add_argument("--name", default=None, help="cluster name (for the registry)")
    p.add_argument("--detach", action="store_true",
                   help="leave the cluster running when this command exits (plain tcp://)")
    p.add_argument("--no-tls", action="store_true",
                   help="plain tcp:// instead of TLS with temporary credentials (the default); "
                        "anyone who can reach the scheduler can then run code, unless a token "
                        "is set")
    add_tls_options(p)
    add_logging_options(p, default="warning")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    env = {}
    for item in args.remote_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--remote-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    args.env = env
    args.security = cluster_security_from_args(parser, args)
    if args.name is not None:
        from taskcore.deploy import registry

        try:
            registry.check_name(args.name)
        except ValueError as e:
            parser.error(str(e))
    return args


def cluster_kwargs(args) -> dict:
    connect = {}
    if args.ssh_port is not None:
        connect["port"] = args.ssh_port
    if args.ssh_username:
        connect["username"] = args.ssh_username
    if args.ssh_private_key:
        connect["client_keys"] = list(args.ssh_private_key)
    if args.no_host_key_check:
        connect["known_hosts"] = None
    worker = {"nworkers": args.nworkers}
    if args.nthreads is not None:
        worker["nthreads"] = args.nthreads
    limit = args.memory_limit
    worker["memory_limit"] = None if limit in ("none", "0") else limit
    if args.death_timeout is not None:
        worker["death_timeout"] = args.death_timeout
    security = args.security  # the --tls-* files and/or a token; None: temporary TLS
    if security is None and args.no_tls:
        security = False
    return dict(hosts=args.hosts, connect_options=connect, worker_options=worker,
                security=security,
                scheduler_options={"port": args.scheduler_port}, worker_class=args.worker_class,
                remote_python=args.remote_python, remote_env=args.env, name=args.name,
                shutdown_on_close=not args.detach, connect_timeout=args.connect_timeout,
                forward_logs=True, log_level=args.log_level, asynchronous=True)


async def run(args) -> int:
    from taskcore.deploy.process import ProcessStartError
    from taskcore.deploy.ssh import SSHCluster

    loop = asyncio.get_running_loop()
    stop = shutdown_event("closing the cluster")
    stopper = asyncio.ensure_future(stop.wait())
    cluster = None
    try:
        try:
            cluster = SSHCluster(**cluster_kwargs(args))
        except (TypeError, ValueError, ImportError) as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
        started, e = await start_unless_stopped(cluster._start_once(), stopper)
        if not started:
            return 0
        if e is not None:
            msg = str(e) if isinstance(e, ProcessStartError) else repr(e)
            sys.stderr.write(f"{PROG}: error: could not start the cluster: {msg}\n")
            return 1
        fields = {}
        sec = cluster.security
        if sec is not None and sec.enabled:
            # Clients on this machine connect with these (Security(**ready["security"])).
            fields["security"] = {"ca_file": sec.ca_file, "cert_file": sec.cert_file,
                                  "key_file": sec.key_file}
        announce("cluster", cluster.scheduler_address, name=cluster.name,
                 workers=cluster._count_workers(), **fields)
        if fields:
            sys.stderr.write(f"{PROG}: TLS credentials for clients: "
                             f"{fields['security']}\n")
        sys.stderr.write(f"{PROG}: scheduler at {cluster.scheduler_address}, "
                         f"{cluster._count_workers()} workers; Ctrl-C to "
                         f"{'detach' if args.detach else 'stop'}\n")
        sys.stderr.flush()
        await stopper
        return 0
    finally:
        stopper.cancel()
        if cluster is not None:
            try:
                await asyncio.wait_for(cluster.close(), 120)
            except Exception as e:
                sys.stderr.write(f"{PROG}: error while closing: {e!r}\n")
        remove_shutdown_signals(loop)


def main(argv=None):
    run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()

