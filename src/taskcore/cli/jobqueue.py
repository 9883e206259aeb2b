"""`core-jobqueue`: a job-queue cluster from the command line, or just its job script.

    core-jobqueue slurm --cores 2 --memory 2GiB --jobs 4 --queue debug --walltime 01:00:00
    core-jobqueue slurm --cores 2 --memory 2GiB --jobs 4 --scheduler-in-job --detach
    core-jobqueue script slurm --cores 2 --memory 2GiB --job-extra-directive=--exclusive

`core-jobqueue SYSTEM ...` starts the cluster (the scheduler here, or in its own
job with `--scheduler-in-job`), submits `--jobs` worker jobs, and once the
batch system accepted them (or they are held by `--max-jobs-queued`) prints
one JSON line on stdout:
    {"event": "ready", "role": "cluster", "address": <scheduler>, "pid": ...,
     "name": ..., "system": "slurm", "jobs": N, "detached": false}
and a line for people on stderr. SIGINT or SIGTERM closes the cluster (every
job is cancelled) and exits 0. `--detach` (with `--scheduler-in-job`) lets go
of the cluster, prints the ready line and exits, leaving every job running:
`core-clusters` lists it, `core-clusters close NAME` stops it. A value that
starts with '-' goes after '=': `--job-directives-skip=--mem`.

`core-jobqueue script SYSTEM ...` prints the worker job script those options
make (the site config file applies, as for the cluster) and submits nothing.

Security: TLS by default, with throwaway credentials made for this run (the
ready line's "security" names their local files, for clients on this machine;
the jobs read a private copy under --shared-directory; all removed on exit),
or the `--tls-*` files given; `--token-file` (or TASKCORE_TOKEN) adds a shared
token, which reaches the jobs through a private file, never a command line.
`--no-tls` runs plain tcp:// (a warning says that anyone who can reach the
scheduler can run code, unless a token is set). `--detach` runs over tcp://
(detached clusters have no TLS yet). `script` shows the TLS form (placeholder
paths) unless given `--no-tls`.

Exit status 1: the cluster could not start (the batch system's message is
shown); 2: bad options. Job options have dask-jobqueue's names and meanings
(deploy/jobqueue/cluster.py); unset ones come from the site config file.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys

from taskcore.cli.common import (add_logging_options, add_tls_options, announce, bytes_type,
                                 count_type, duration_type, start_unless_stopped,
                                 Parser, port_type, positive_int, remove_shutdown_signals,
                                 resources_type, run_cli, cluster_security_from_args,
                                 shutdown_event)

logger = logging.getLogger("taskcore.cli.jobqueue")
PROG = "core-jobqueue"

# Batch system name -> its cluster class ("module:Class"), imported only when used.
SYSTEMS = {
    "slurm": "taskcore.deploy.jobqueue.slurm:SLURMCluster",
    "sge": "taskcore.deploy.jobqueue.sge:SGECluster",
    "oar": "taskcore.deploy.jobqueue.oar:OARCluster",
    "pbs": "taskcore.deploy.jobqueue.pbs:PBSCluster",
    "torque": "taskcore.deploy.jobqueue.pbs:TorqueCluster",
    "moab": "taskcore.deploy.jobqueue.pbs:MoabCluster",
    "lsf": "taskcore.deploy.jobqueue.lsf:LSFCluster",
    "htcondor": "taskcore.deploy.jobqueue.htcondor:HTCondorCluster",
    "flux": "taskcore.deploy.jobqueue.flux:FluxCluster",
}
SCRIPT_SCHEDULER = "tcp://SCHEDULER:8786"  # stands in for the address in `script` output
SCRIPT_SCHEDULER_TLS = "tls://SCHEDULER:8786"
SCRIPT_CLUSTER = "CLUSTER"  # stands in for the cluster's credentials directory's name


class _Parser(Parser):
    def error(self, message):
        if message.endswith("expected one argument"):
            # `--job-directives-skip --mem`: argparse takes --mem for an option.
            message += " (a value that starts with '-' goes after '=', like " \
                       "--job-directives-skip=--mem)"
        super().error(message)


def cluster_class(system: str):
    module, name = SYSTEMS[system].split(":")
    return getattr(importlib.import_module(module), name)


def _option_type(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _walltime_type(text: str) -> str:
    from taskcore.deploy.jobqueue.job import parse_walltime

    try:
        parse_walltime(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text  # JobScript writes it in the batch system's own form


# argparse dest -> job option (the cluster's keyword argument); see add_job_options.
JOB_ARGS = {
    "cores": "cores", "memory": "memory", "processes": "processes", "queue": "queue",
    "account": "account", "walltime": "walltime", "job_name": "job_name",
    "job_extra_directive": "job_extra_directives", "job_directives_skip": "job_directives_skip",
    "job_script_prologue": "job_script_prologue", "job_cpu": "job_cpu", "job_mem": "job_mem",
    "interface": "interface", "local_directory": "local_directory",
    "log_directory": "log_directory", "python": "python", "shebang": "shebang",
    "worker_extra_arg": "worker_extra_args", "death_timeout": "death_timeout",
    "walltime_margin": "walltime_margin", "lifetime_stagger": "lifetime_stagger",
    "nanny": "nanny", "resources": "resources", "gpus": "gpus",
    "device_memory_limit": "device_memory_limit",
}


def add_job_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job options (per job; unset ones come from the site config)")
    g.add_argument("--cores", type=positive_int, default=None, help="cores per job")
    g.add_argument("--memory", type=bytes_type, default=None, help="memory per job, like 4GiB")
    g.add_argument("--processes", type=positive_int, default=None,
                   help="worker processes per job (default 1); they share cores and memory")
    g.add_argument("--queue", default=None, help="queue (SLURM partition)")
    g.add_argument("--account", default=None, help="account to charge")
    g.add_argument("--walltime", type=_walltime_type, default=None,
                   help="job time limit, like 01:00:00 or 90m; workers retire before it")
    g.add_argument("--job-name", default=None, help="job name (default taskcore-worker)")
    g.add_argument("--job-extra-directive", action="append", default=None, metavar="DIRECTIVE",
                   help="extra header line, like =--exclusive (repeatable)")
    g.add_argument("--job-directives-skip", action="append", default=None, metavar="TEXT",
                   help="drop header lines containing TEXT, like =--mem (repeatable)")
    g.add_argument("--job-script-prologue", action="append", default=None, metavar="LINE",
                   help="shell line run before the worker, like 'module load x' (repeatable)")
    g.add_argument("--job-cpu", type=positive_int, default=None,
                   help="CPUs to request (default --cores)")
    g.add_argument("--job-mem", default=None, help="memory to request, as the batch system "
                                                   "writes it (default from --memory)")
    g.add_argument("--interface", default=None,
                   help="network interface for the workers (and a local scheduler)")
    g.add_argument("--local-directory", default=None, metavar="PATH",
                   help="workers' scratch directory on the compute nodes")
    g.add_argument("--log-directory", default=None, metavar="PATH",
                   help="where the jobs' output files go")
    g.add_argument("--python", default=None, metavar="PATH",
                   help="Python on the compute nodes (default: this one)")
    g.add_argument("--shebang", default=None, help="first line of the script")
    g.add_argument("--worker-extra-arg", action="append", default=None, metavar="ARG",
                   help="extra core-worker argument (repeatable; --worker-extra-arg=--x)")
    g.add_argument("--death-timeout", type=duration_type, default=None, metavar="DURATION",
                   help="workers exit when the scheduler is unreachable this long")
    g.add_argument("--walltime-margin", type=duration_type, default=None, metavar="DURATION",
                   help="workers retire this long before the walltime (default auto)")
    g.add_argument("--lifetime-stagger", type=duration_type, default=None, metavar="DURATION",
                   help="spread the workers' retirement by up to this much (default auto)")
    g.add_argument("--nanny", action=argparse.BooleanOptionalAction, default=None,
                   help="run each worker under a nanny (default yes)")
    g.add_argument("--resources", type=resources_type, default=None,
                   help='abstract resources per worker, like "GPU=2"')
    g.add_argument("--gpus", type=positive_int, default=None,
                   help="GPUs per job: the job runs core-cuda-worker, one worker per GPU")
    g.add_argument("--device-memory-limit", default=None, metavar="BYTES",
                   help="with --gpus: each GPU worker's device memory limit (like 30GB, 0.8)")
    g.add_argument("--option", action="append", type=_option_type, default=None,
                   metavar="KEY=VALUE", dest="system_option",
                   help="a job option of this batch system's own, like resource_spec=... "
                        "(SGE, PBS), lsf_units=MB (LSF), disk=2GiB (HTCondor); VALUE is "
                        "read as JSON when it parses, else as text (repeatable)")


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster options")
    g.add_argument("--jobs", type=count_type, default=1, help="worker jobs to submit (default 1)")
    g.add_argument("--scheduler-in-job", action="store_true",
                   help="run the scheduler in its own job too (needed for --detach)")
    g.add_argument("--scheduler-port", type=port_type, default=None,
                   help="scheduler port (default: any free port)")
    g.add_argument("--shared-directory", default=None, metavar="PATH",
                   help="directory shared with the compute nodes, for the scheduler file "
                        "(--scheduler-in-job)")
    g.add_argument("--max-jobs-queued", type=positive_int, default=None, metavar="N",
                   help="hold jobs here while N are queued and not running")
    g.add_argument("--max-jobs-running", type=positive_int, default=None, metavar="N",
                   help="hold jobs here while N are queued or running")
    g.add_argument("--poll-interval", type=duration_type, default=None, metavar="DURATION",
                   help="how often job states are polled (default 2s)")
    g.add_argument("--submit-option", action="append", default=None, metavar="ARG",
                   help="extra submit command argument (repeatable; --submit-option=--x)")
    g.add_argument("--name", default=None, help="cluster name (for the registry)")
    g.add_argument("--detach", action="store_true",
                   help="exit once the jobs are submitted and leave the cluster running "
                        "(needs --scheduler-in-job; plain tcp://)")
    g.add_argument("--no-tls", action="store_true",
                   help="plain tcp:// instead of TLS with temporary credentials (the default); "
                        "anyone who can reach the scheduler can then run code, unless a token "
                        "is set")


def build_parser() -> Parser:
    p = _Parser(prog=PROG, description="Start a taskcore cluster on a batch system, or print "
                                      "its job script.")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join([*SYSTEMS, "script"]) + "}",
                           required=True)
    for system in SYSTEMS:
        sp = sub.add_parser(system, help=f"start a cluster of {system} jobs",
                            description=f"Start a cluster of {system} jobs; Ctrl-C closes it.")
        add_job_options(sp)
        add_cluster_options(sp)
        add_tls_options(sp)
        add_logging_options(sp, default="warning")
    script = sub.add_parser("script", help="print a worker job script; submits nothing",
                            description="Print the worker job script; submits nothing.")
    systems = script.add_subparsers(dest="system", metavar="{" + ",".join(SYSTEMS) + "}",
                                    required=True)
    for system in SYSTEMS:
        sp = systems.add_parser(system, help=f"a {system} job script")
        add_job_options(sp)
        sp.add_argument("--scheduler-address", default=None, metavar="ADDRESS",
                        help=f"scheduler address to write in (default {SCRIPT_SCHEDULER_TLS}, "
                             f"with --no-tls {SCRIPT_SCHEDULER})")
        sp.add_argument("--worker-name", default="0", metavar="NAME",
                        help="worker name to write in (default 0, the first job's)")
        sp.add_argument("--no-tls", action="store_true",
                        help="the script of a plain tcp:// cluster (default: TLS, the "
                             "credentials' paths shown with CLUSTER for the directory's name)")
        sp.set_defaults(log_level="warning")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "script":
        args.system = args.command
        if args.detach and not args.scheduler_in_job:
            parser.error("--detach needs --scheduler-in-job: a scheduler in this process "
                         "cannot outlive it")
        args.security = cluster_security_from_args(parser, args)
        if args.name is not None:
            from taskcore.deploy import registry

            try:
                registry.check_name(args.name)
            except ValueError as e:
                parser.error(str(e))
    elif args.scheduler_address is None:
        args.scheduler_address = SCRIPT_SCHEDULER if args.no_tls else SCRIPT_SCHEDULER_TLS
    args.job = {opt: getattr(args, dest) for dest, opt in JOB_ARGS.items()
                if getattr(args, dest) is not None}
    args.job.update(dict(args.system_option or []))
    # Every job option checked now, with the site config applied, before anything starts.
    try:
        args.job_script = job_script(args.system, args.job,
                                     tls=args.command == "script" and not args.no_tls)
        # Rendered once too: some options fail only there (a header template's unknown
        # field, lsf_units, a line break HTCondor cannot write).
        args.job_script.worker_script(SCRIPT_SCHEDULER, "0")
    except (TypeError, ValueError, OSError) as e:  # OSError: a named config file is missing
        parser.error(str(e))
    return args


def job_script(system: str, job: dict, tls: bool = False):
    """The JobScript these options make: defaults < site config file < `job`. `tls`: with
    the credentials a default (TLS) cluster gives its jobs, their directory's name shown
    as CLUSTER (a real cluster names it after itself, plus a random suffix)."""
    from taskcore.deploy.jobqueue.config import config_path

    cls = cluster_class(system)
    try:
        security = None
        if tls:
            from taskcore.deploy.jobqueue.cluster import (CREDENTIAL_FILES, CREDENTIALS_SUBDIR,
                                                          DEFAULT_SHARED_DIRECTORY)
            from taskcore.deploy.jobqueue.job import JobCredentials

            shared = cls.resolve_options({}, job).get("shared_directory")
            d = os.path.join(os.path.abspath(os.path.expanduser(
                shared or DEFAULT_SHARED_DIRECTORY)), CREDENTIALS_SUBDIR, SCRIPT_CLUSTER)
            security = JobCredentials(*(os.path.join(d, f) for f in CREDENTIAL_FILES))
        return cls.job_script_template(security=security, **job)
    except ValueError as e:
        if "cores= and memory=" not in str(e):
            raise
        raise ValueError(f"--cores and --memory are needed (or cores and memory in the "
                         f"[{cls.config_name}] table of {config_path()})") from None


def cluster_kwargs(args) -> dict:
    kw = dict(args.job)
    kw.update(scheduler="job" if args.scheduler_in_job else None,
              shared_directory=args.shared_directory, max_jobs_queued=args.max_jobs_queued,
              max_jobs_running=args.max_jobs_running, poll_interval=args.poll_interval,
              submit_options=args.submit_option, name=args.name)
    if args.scheduler_port is not None:
        kw["scheduler_options"] = {"port": args.scheduler_port}
    kw = {k: v for k, v in kw.items() if v is not None}
    # Jobs, not workers: the constructor's n_workers counts workers (processes per job).
    kw["n_workers"] = args.jobs * args.job_script.processes
    security = args.security  # the --tls-* files and/or a token; None: temporary TLS
    if security is None and args.no_tls:
        security = False
    return dict(kw, security=security, shutdown_on_close=not args.detach, asynchronous=True)


async def run(args) -> int:
    if args.command == "script":
        sys.stdout.write(args.job_script.worker_script(args.scheduler_address, args.worker_name))
        sys.stdout.flush()
        return 0
    loop = asyncio.get_running_loop()
    stop = shutdown_event("closing the cluster")
    stopper = asyncio.ensure_future(stop.wait())
    cluster = None
    try:
        try:
            cluster = cluster_class(args.system)(**cluster_kwargs(args))
        except (TypeError, ValueError) as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
        # Started here, not in the constructor: a signal during start-up (a scheduler job
        # waiting in the queue) still ends in a clean close.
        started, error = await start_unless_stopped(cluster._start_once(), stopper)
        if not started:
            return 0
        if error is not None:
            sys.stderr.write(f"{PROG}: error: could not start the cluster: "
                             f"{_describe(error)}\n")
            return 1
        name, address, jobs = cluster.name, cluster.scheduler_address, len(cluster.jobs)
        if args.detach:
            # close() only lets go here (shutdown_on_close=False): the jobs run on, and the
            # registry entry that `core-clusters` and `from_name` read is written.
            detaching, cluster = cluster, None
            try:
                await asyncio.wait_for(detaching.close(), 120)
            except Exception as e:
                sys.stderr.write(f"{PROG}: error: could not detach from {name}: {e!r}; "
                                 f"`core-clusters close {name}` stops what runs\n")
                return 1
        fields = {}
        sec = None if args.detach else cluster.security
        if sec is not None and sec.enabled:
            # Clients on this machine connect with these (Security(**ready["security"])).
            fields["security"] = {"ca_file": sec.ca_file, "cert_file": sec.cert_file,
                                  "key_file": sec.key_file}
        announce("cluster", address, name=name, system=args.system, jobs=jobs,
                 detached=args.detach, **fields)
        if fields:
            sys.stderr.write(f"{PROG}: TLS credentials for clients: {fields['security']}\n")
        if args.detach:
            sys.stderr.write(f"{PROG}: cluster {name} left running, scheduler at {address}; "
                             f"stop it with `core-clusters close {name}`\n")
            return 0
        sys.stderr.write(f"{PROG}: cluster {name}, scheduler at {address}, {jobs} "
                         f"{args.system} job(s) requested; Ctrl-C to stop\n")
        sys.stderr.flush()
        await stopper
        return 0
    finally:
        stopper.cancel()
        if cluster is not None:
            try:  # cancels every job
                await asyncio.wait_for(cluster.close(), 120)
            except Exception as e:
                sys.stderr.write(f"{PROG}: error while closing: {e!r}\n")
        remove_shutdown_signals(loop)


def _describe(e: BaseException) -> str:
    from taskcore.deploy.jobqueue.system import BatchCommandError
    from taskcore.process import ProcessStartError

    return str(e) if isinstance(e, (BatchCommandError, ProcessStartError, OSError)) else repr(e)


def main(argv=None):
    run_cli(parse_args, run, argv)


if __name__ == "__main__":
    main()
