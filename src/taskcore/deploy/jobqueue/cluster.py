"""JobQueueCluster: workers (and optionally the scheduler) as batch jobs, on the SpecCluster base.

One spec entry is one job (`Job`, deploy/jobqueue/job.py) running
`processes` workers; the SpecCluster machinery does the rest: scaling edits
the spec, one reconcile loop submits and cancels, a job that ends without
us (cancelled from outside, failed, its node lost) is replaced under the
same name, and `scale(jobs=N)` / `adapt(minimum_jobs=, maximum_jobs=)` count
jobs while the spec counts workers (a job of 4 processes is 4 workers).

What a job queue adds:

- **Job states, polled** (`BatchSystem`): one status command per interval
  for all jobs; `cluster.jobs`, the repr and `_repr_html_` show pending
  and running jobs apart, and pending jobs are not counted as workers.
- **Site limits**: `max_jobs_queued` and `max_jobs_running` hold jobs on
  our side until the batch system may take them.
- **Walltime without losing work**: workers retire (their data moves) at
  `walltime - walltime_margin`, and the cluster marks each job *expiring*
  (SpecCluster.expire) early enough before that for its replacement to get
  through the queue: the lead is the longest queue wait seen so far plus
  two poll intervals. The worker count does not dip in steady state.
- **The scheduler in its own job** (`scheduler="job"`): its address comes
  back through a scheduler file in `shared_directory`. With every process
  a batch job, the cluster can be detached (`shutdown_on_close=False`) and
  found again with `from_name` from any machine that shares the registry
  and reaches the scheduler.
- **The dashboard**: the scheduler serves it on port 8787 of its host (another
  free port when that one is taken; `scheduler_options={"dashboard_address":
  None}` for none), and `dashboard_link` points at the host workers reach the
  scheduler at: this machine's address, or the scheduler job's node.
- **Worker groups** (`worker_groups={"bigmem": {"queue": "bigmem", ...}}`):
  each group is its own job template (any job option overridden), scaled
  and adapted on its own.
- Bad input fails fast: before anything is submitted, every job template
  (and the scheduler's) is checked by the batch system without queueing
  (`sbatch --test-only`), so an unknown partition or account is an error
  carrying the batch system's own message, and nothing is left queued.
- **TLS by default** (`security=None`): throwaway credentials
  (`Security.temporary()`, made here in a private temporary directory; the
  cluster's `security`, so `Client(cluster)` uses them), and the scheduler and
  every job's workers speak tls://. The jobs read a copy from a directory of
  the cluster's own under `shared_directory` (which the compute nodes see),
  `<shared_directory>/tls/<cluster name>-<random>/`: made by the batch
  commands' user (through `command_prefix`, if any) under umask 077, the
  directory 0700 and each file 0600, the contents on stdin, never on a command
  line. The job scripts name the files (`--tls-*`, `--token-file`), never
  their contents, so no key or token is in a script, in the batch system's
  spool or accounting, or in `ps`. Closing removes the directory once the
  jobs are gone, and the local files. A token (`Security(token=...)`, else
  TASKCORE_TOKEN here) goes into the same directory as the file `token`.
  `security=Security(...)` is used as given (its TLS files by their paths,
  which the nodes must see; its token through the private directory);
  `security=False` is plain tcp:// (one warning unless a token is set). A
  detached cluster (`shutdown_on_close=False`) runs over tcp:// (with the
  warning) and refuses a Security.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid

from taskcore.deploy.jobqueue.config import load_section
from taskcore.deploy.jobqueue.job import (JOB_OPTIONS, Job, JobCredentials, JobScript,
                                          SchedulerJob)
from taskcore.deploy.jobqueue.system import BatchCommandError, JobState
from taskcore.dashboard.binding import dashboard_on_host
from taskcore.deploy.spec import SpecCluster
from taskcore.security import Security, cluster_credentials, plain_tcp_warning
from taskcore.utils import get_ip_interface, parse_bytes

logger = logging.getLogger("taskcore.deploy.jobqueue")

__all__ = ["JobQueueCluster"]

# Cluster parameters besides the job options (JOB_OPTIONS), also settable in the config file.
CLUSTER_OPTIONS = frozenset({
    "scheduler", "scheduler_options", "scheduler_job", "shared_directory", "max_jobs_queued",
    "max_jobs_running", "poll_interval", "submit_options", "command_prefix", "worker_groups",
    "scheduler_timeout",
})
DEFAULTS = {"processes": 1, "job_name": "taskcore-worker", "shebang": "#!/usr/bin/env bash",
            "walltime_margin": "auto", "lifetime_stagger": "auto", "poll_interval": 2.0,
            "scheduler": "local", "scheduler_timeout": 300}
_CHECK_ADDRESS = "tcp://127.0.0.1:1"  # stands in for the scheduler while checking scripts
DEFAULT_DASHBOARD = ":8787"           # core-scheduler's default, for the in-process scheduler too
DEFAULT_SHARED_DIRECTORY = os.path.join("~", ".cache", "taskcore", "jobqueue")
CREDENTIALS_SUBDIR = "tls"            # <shared_directory>/tls/<cluster>-<random>/: the jobs' copy
CREDENTIAL_FILES = ("ca.pem", "cert.pem", "key.pem")

# The jobs' credentials directory, made and removed by the batch commands' user: run as
# `[command_prefix] sh -c <this> sh OP DIR [NAME]`, a file's contents on stdin (never in
# argv). `mkdir` makes DIR (0700, umask 077; it must not exist yet: a random name);
# `write` refuses a DIR that is a link or not this user's, and writes NAME (0600; an
# existing file is not overwritten: set -C); `remove` removes DIR (a link: only the link).
_CREDENTIALS_SH = r"""
op=$1 d=$2
case $op in
mkdir)
    parent=${d%/*}
    mkdir -p -- "${parent%/*}" || exit 1
    umask 077
    mkdir -p -- "$parent" && mkdir -m 700 -- "$d" ;;
write)
    umask 077
    if [ -L "$d" ] || [ ! -d "$d" ] || [ ! -O "$d" ]; then
        echo "taskcore: $d is not a directory of $(id -un)" >&2
        exit 1
    fi
    set -C
    cat > "$d/$3" && chmod 600 -- "$d/$3" ;;
remove)
    if [ -L "$d" ]; then rm -f -- "$d"; else rm -rf -- "$d"; fi ;;
*)
    echo "taskcore: unknown operation $op" >&2
    exit 2 ;;
esac
"""


def credentials_directory(shared_directory: str | None, cluster_name: str) -> str:
    """Where a cluster's jobs find their credentials: `<shared>/tls/<name>-<random>`, the
    name made safe as one path component (the suffix keeps two clusters of one name
    apart, so neither reads or removes the other's)."""
    shared = os.path.expanduser(shared_directory or DEFAULT_SHARED_DIRECTORY)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(cluster_name)).lstrip(".")[:100] or "cluster"
    return os.path.join(os.path.abspath(shared), CREDENTIALS_SUBDIR,
                        f"{safe}-{uuid.uuid4().hex[:8]}")


class JobQueueCluster(SpecCluster):
    """Workers as batch jobs; a batch system is a subclass setting `system_class`.

    `n_workers` workers are started at once (in `ceil(n_workers / processes)`
    jobs). Job options (cores, memory, processes, queue, account, walltime,
    job_name, job_extra_directives, job_directives_skip, job_script_prologue,
    job_cpu, job_mem, interface, local_directory, log_directory, python,
    shebang, worker_extra_args, death_timeout, header_template,
    walltime_margin, lifetime_stagger, resources) have dask-jobqueue's
    meanings; unset ones come from the config file's section for this
    batch system (deploy/jobqueue/config.py). See the module doc for the rest.
    """

    system_class = None
    config_name = None

    def __init__(self, n_workers: int = 0, *, scheduler: str | None = None,
                 scheduler_options: dict | None = None, scheduler_job: dict | None = None,
                 shared_directory: str | None = None, security=None,
                 max_jobs_queued: int | None = None, max_jobs_running: int | None = None,
                 poll_interval: float | None = None, submit_options: list | None = None,
                 command_prefix: list | None = None,
                 worker_groups: dict | None = None, scheduler_timeout: float | None = None,
                 name: str | None = None,
                 asynchronous: bool = False, shutdown_on_close: bool = True,
                 close_timeout: float = 60, retire_timeout: float = 60, **job_options):
        given = dict(scheduler=scheduler, scheduler_options=scheduler_options,
                     scheduler_job=scheduler_job, shared_directory=shared_directory,
                     max_jobs_queued=max_jobs_queued, max_jobs_running=max_jobs_running,
                     poll_interval=poll_interval, submit_options=submit_options,
                     command_prefix=command_prefix,
                     worker_groups=worker_groups, scheduler_timeout=scheduler_timeout)
        opts = self.resolve_options(given, job_options)
        mode = opts["scheduler"]
        if mode not in ("local", "job"):
            raise ValueError(f"scheduler must be 'local' (in this process) or 'job' (its own "
                             f"batch job), not {mode!r}")
        if not shutdown_on_close and mode != "job":
            raise ValueError("shutdown_on_close=False needs scheduler='job': a scheduler in "
                             "this process cannot outlive it")
        _check_security(security)
        if not shutdown_on_close and isinstance(security, Security):
            raise ValueError("shutdown_on_close=False does not support TLS security yet (give "
                             "security=False, or keep the cluster attached)")
        if name is None:
            # Known now: it names the credentials directory (and the registry entry).
            name = f"{self.config_name}cluster-{uuid.uuid4().hex[:8]}"
        self._own_credentials = None      # the local directory of credentials made here
        self._credentials_dir = None      # the jobs' copy (shared_directory), when needed
        self._wrote_credentials = False   # the jobs' copy may exist: remove it at close
        self._shared_directory = os.path.expanduser(opts.get("shared_directory")
                                                    or DEFAULT_SHARED_DIRECTORY)
        self.system = self._make_system(opts)
        job = {k: v for k, v in opts.items() if k in self.option_names()}
        JobScript(self.system, **job)  # every job option checked here, in the caller
        self.security, self._token = self._resolve_security(security, not shutdown_on_close,
                                                            name)
        try:
            self._job_security = self._job_credentials(name)
            template = self._job_template(job)
            groups = {g: self._job_template(self._group_job_options(job, g, o), g)
                      for g, o in (opts.get("worker_groups") or {}).items()}
            scheduler_spec = self._scheduler_spec(mode, job, opts, name)
            per_job = template["options"]["job"].get("processes", 1)
            workers = {i: copy.deepcopy(template) for i in range(math.ceil(n_workers / per_job))}
            self._queue_waits: list = []
            self._walltime_task: asyncio.Task | None = None
            super().__init__(workers=workers, scheduler=scheduler_spec, worker=template,
                             worker_groups=groups, asynchronous=asynchronous, name=name,
                             shutdown_on_close=shutdown_on_close, close_timeout=close_timeout,
                             retire_timeout=retire_timeout)
        except BaseException:
            self._remove_local_credentials()  # a failed sync start closed everything else
            raise

    # -- security -------------------------------------------------------------------------------
    def _resolve_security(self, security, detached, name):
        """(the Security this process uses: Client(cluster), the in-process scheduler; the
        token the jobs get); see `cluster_credentials`. A detached cluster stays on plain
        tcp:// (an explicit Security was refused before this)."""
        if detached:
            logger.warning(plain_tcp_warning(name, "a detached cluster "
                                                   "(shutdown_on_close=False) runs over plain "
                                                   "tcp://"))
            return None, None
        security, token, self._own_credentials = cluster_credentials(security, name,
                                                                     logger.warning)
        return security, token

    @property
    def _tls(self) -> bool:
        return self.security is not None and self.security.enabled

    @property
    def _check_address(self) -> str:
        """Stands in for the scheduler's address in scripts written before it is known."""
        return _CHECK_ADDRESS.replace("tcp://", "tls://") if self._tls else _CHECK_ADDRESS

    def _job_credentials(self, name) -> JobCredentials | None:
        """The credentials as the jobs see them: the copies in this cluster's directory
        under shared_directory (temporary ones made here, a token), or a given Security's
        TLS files by their own paths. None: the jobs get none."""
        if not self._own_credentials and self._token is None and not self._tls:
            return None
        if self._own_credentials or self._token is not None:
            self._credentials_dir = credentials_directory(self._shared_directory, name)
        d = self._credentials_dir
        if self._own_credentials:
            ca, cert, key = (os.path.join(d, f) for f in CREDENTIAL_FILES)
        elif self._tls:
            ca, cert, key = self.security.ca_file, self.security.cert_file, \
                self.security.key_file
        else:
            ca = cert = key = None
        token_file = os.path.join(d, "token") if self._token is not None else None
        return JobCredentials(ca, cert, key, token_file)

    def _job_files(self) -> dict:
        """{file name: contents} of the jobs' credentials directory."""
        files = {}
        if self._own_credentials:
            for f in CREDENTIAL_FILES:
                with open(os.path.join(self._own_credentials, f), "rb") as fh:
                    files[f] = fh.read()
        if self._token is not None:
            files["token"] = self._token.encode() + b"\n"
        return files

    async def _credentials_op(self, op, *args, stdin=None):
        return await self.system.run(["sh", "-c", _CREDENTIALS_SH, "sh", op, *args],
                                     f"{op} {args[0]} (the jobs' credentials)", stdin=stdin)

    async def _write_job_credentials(self):
        """Write the jobs' copy of the credentials, as the batch commands' user."""
        d = self._credentials_dir
        if d is None or self._wrote_credentials:
            return
        files = self._job_files()
        try:
            await self._credentials_op("mkdir", d)
            self._wrote_credentials = True
            for f, data in files.items():
                await self._credentials_op("write", d, f, stdin=data)
        except BatchCommandError as e:
            who = ""
            if self.system.command_prefix:
                try:
                    who = f" as {self.system.user()} (command_prefix)"
                except BatchCommandError:
                    who = " as command_prefix's user"
            raise BatchCommandError(
                f"{self.name}: cannot write the jobs' TLS credentials into {d}{who}: {e}. "
                f"shared_directory must be a directory that user can write and the compute "
                f"nodes see (or give security=False for plain tcp://)") from None
        self._log(logging.INFO, "%s: the jobs' credentials are in %s", self.name, d)

    async def _remove_credentials(self):
        """Remove the jobs' credentials directory (best effort, logged), then the local
        temporary credentials."""
        try:
            if getattr(self, "_wrote_credentials", False):
                try:
                    await self._credentials_op("remove", self._credentials_dir)
                    self._wrote_credentials = False
                except Exception as e:
                    self._log(logging.WARNING, "%s: could not remove the jobs' credentials %s: "
                              "%s", self.name, self._credentials_dir, e)
        finally:
            self._remove_local_credentials()

    def _remove_local_credentials(self):
        path, self._own_credentials = getattr(self, "_own_credentials", None), None
        if path:
            shutil.rmtree(path, ignore_errors=True)

    # -- options --------------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> frozenset:
        """The job options this batch system takes: the common ones and its own."""
        return JOB_OPTIONS | frozenset(cls.system_class.job_options)

    @classmethod
    def resolve_options(cls, given: dict, job_options: dict) -> dict:
        """Every option's value: built-in defaults < the site config file < `given`
        (cluster options; None: not given) < `job_options` (only the given ones arrive,
        so an explicit None stays None: walltime_margin=None means no lifetime)."""
        if cls.system_class is None:
            raise TypeError("JobQueueCluster is abstract: use SLURMCluster or another batch "
                            "system's cluster")
        unknown = set(job_options) - cls.option_names()
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown option(s) {sorted(unknown)}; "
                            f"job options are {sorted(cls.option_names())}")
        site = load_section(cls.config_name, cls.option_names() | CLUSTER_OPTIONS)
        opts = dict(DEFAULTS)
        opts.update(site)
        opts.update({k: v for k, v in given.items() if v is not None})
        opts.update(job_options)
        if opts.get("gpus"):
            # One worker per GPU: the spec counts workers, so a job of N GPUs is N workers.
            from taskcore.deploy.jobqueue.job import _gpus

            opts["processes"] = _gpus(opts["gpus"], int(opts.get("processes") or 1))
        return opts

    @classmethod
    def job_script_template(cls, security=None, **job_options) -> JobScript:
        """The JobScript of the default worker template these options make, with the site
        config applied, without a cluster (`core-jobqueue script`); `security`: the
        job's credentials (a JobCredentials), if any."""
        opts = cls.resolve_options({}, job_options)
        return JobScript(cls.system_class(), security=security,
                         **{k: v for k, v in opts.items() if k in cls.option_names()})

    def _make_system(self, opts):
        """The batch system object; a system with settings of its own (LSF's use_stdin)
        overrides this to pass them."""
        return self.system_class(**self._system_kwargs(opts))

    @staticmethod
    def _system_kwargs(opts) -> dict:
        return dict(poll_interval=float(opts["poll_interval"]),
                    max_jobs_queued=opts.get("max_jobs_queued"),
                    max_jobs_running=opts.get("max_jobs_running"),
                    submit_options=opts.get("submit_options"),
                    command_prefix=opts.get("command_prefix"))

    @classmethod
    def _group_options(cls, group, options: dict) -> dict:
        unknown = set(options) - cls.option_names()
        if unknown:
            raise TypeError(f"{group}: unknown job option(s) {sorted(unknown)}")
        return dict(options)

    @classmethod
    def _group_job_options(cls, job: dict, group, options: dict) -> dict:
        """A worker group's job: the cluster's, with the group's options over it. A group
        that says how many GPUs (or None) also sets its workers per job, unless it gives
        `processes` itself: a CPU group of a GPU cluster is not N workers per job."""
        merged = {**job, **cls._group_options(group, options)}
        if "gpus" in options and "processes" not in options:
            merged["processes"] = options["gpus"] or 1
        return merged

    # -- specs --------------------------------------------------------------------------------------
    def _job_template(self, job: dict, group=None) -> dict:
        spec = {"cls": Job, "options": {"system": self.system, "job": job}}
        if self._job_security is not None:
            spec["options"]["security"] = self._job_security
        processes = int(job.get("gpus") or job.get("processes") or 1)
        if processes > 1:
            # core-worker names NAME-i, and so does core-cuda-worker (i: its GPU's position)
            spec["group"] = [f"-{i}" for i in range(processes)]
        return spec

    def _scheduler_spec(self, mode, job, opts, name):
        sched_opts = dict(opts.get("scheduler_options") or {})
        if self._tls:
            sched_opts.setdefault("protocol", "tls")
        if mode == "local":
            from taskcore.scheduler import Scheduler

            host = sched_opts.pop("host", None)
            interface = sched_opts.pop("interface", None) or job.get("interface")
            if host is None:
                host = get_ip_interface(interface) if interface else "0.0.0.0"
            sched_opts.setdefault("port", 0)
            # Where core-scheduler would serve it (the scheduler-in-a-job mode): 8787 on the
            # scheduler's host, so the link's host is the one workers reach the scheduler at.
            sched_opts["dashboard_address"] = dashboard_on_host(
                sched_opts.get("dashboard_address", DEFAULT_DASHBOARD), host)
            if self.security is not None:
                sched_opts.setdefault("security", self.security)
            return {"cls": Scheduler, "options": dict(sched_opts, host=host)}
        # The scheduler's job: the workers' job options, one core, no worker lifetime, and
        # whatever scheduler_job= overrides (a longer walltime, another queue...).
        sjob = {k: v for k, v in job.items()
                if k not in ("processes", "worker_extra_args", "death_timeout", "resources",
                             "gpus", "device_memory_limit")}
        sjob.update(cores=1, job_name="taskcore-scheduler", walltime_margin=None)
        sjob.update(self._group_options("scheduler_job", opts.get("scheduler_job") or {}))
        JobScript(self.system, **sjob)
        shared = self._shared_directory
        label = name or f"{self.config_name}-{os.getpid()}-{time.monotonic_ns()}"
        spec = {"cls": SchedulerJob,
                "options": {"system": self.system, "job": sjob,
                            "scheduler_file": os.path.join(shared, f"{label}.scheduler.json"),
                            "scheduler_options": sched_opts,
                            # its queue wait included: a busy site may need hours
                            "startup_timeout": float(opts["scheduler_timeout"])}}
        if self._job_security is not None:
            spec["options"]["security"] = self._job_security
        return spec

    def _group_job(self, worker_group=None) -> dict:
        return self._template(worker_group)["options"]["job"]

    def _processes(self, worker_group=None) -> int:
        job = self._group_job(worker_group)
        return int(job.get("gpus") or job.get("processes") or 1)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def _start(self):
        await self._check_scripts()
        await self._write_job_credentials()  # before any job (the scheduler's too) is queued
        await super()._start()
        self._walltime_task = asyncio.ensure_future(self._walltime_loop())

    async def _check_scripts(self, templates=None):
        """Ask the batch system to accept every job template, queueing nothing."""
        if templates is None:
            templates = [("worker", self.new_spec)] + list(self.worker_groups.items())
            if self.scheduler_spec["cls"] is SchedulerJob:
                templates.append(("scheduler", None))
        for label, spec in templates:
            if spec is None:
                opts = self.scheduler_spec["options"]
                text = JobScript(self.system, security=self._job_security,
                                 **opts["job"]).scheduler_script(
                    opts["scheduler_file"], opts["scheduler_options"])
            else:
                job = JobScript(self.system, security=self._job_security,
                                **spec["options"]["job"])
                if job.log_directory:  # some checks open the output files (condor_submit)
                    os.makedirs(job.log_directory, exist_ok=True)
                text = job.worker_script(self._check_address, "check")
            fd, path = tempfile.mkstemp(prefix="taskcore-check-", suffix=".sh")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                # readable by the user a command_prefix may switch to
                os.chmod(path, self.system.script_mode)
                await self.system.validate(path)
            except BatchCommandError as e:
                raise BatchCommandError(f"{self.name}: the {label} job would be rejected: "
                                        f"{e}") from None
            finally:
                os.unlink(path)

    async def _close(self):
        if self._walltime_task is not None:
            self._walltime_task.cancel()
        try:
            await super()._close()
        finally:
            await self._remove_credentials()  # every job is gone: nothing reads them now

    async def _detach(self):
        if self._walltime_task is not None:
            self._walltime_task.cancel()
        await super()._detach()

    async def _release(self):
        await self.system.close()
        await super()._release()

    # -- walltime ---------------------------------------------------------------------------------
    def _replacement_lead(self) -> float:
        """How long before a worker retires its replacement job should be submitted."""
        wait = max(self._queue_waits[-20:], default=0.0)
        return wait + 2 * self.system.poll_interval + 1.0

    async def _walltime_loop(self):
        seen = set()
        while True:
            await asyncio.sleep(self.system.poll_interval / 2)
            now = time.monotonic()
            for name, h in list(self.workers.items()):
                if not isinstance(h, Job) or h.running_since is None:
                    continue
                if h.job_id not in seen and h.submitted_at is not None:
                    seen.add(h.job_id)
                    self._queue_waits.append(h.running_since - h.submitted_at)
                lifetime = h.script.lifetime
                if lifetime is None or name in self._expiring or name not in self.worker_spec:
                    continue
                retire_at = h.running_since + lifetime - (h.script.lifetime_stagger or 0)
                if now >= retire_at - self._replacement_lead():
                    self.expire(name)

    # -- scaling in jobs ----------------------------------------------------------------------------
    def scale(self, n: int | None = None, jobs: int | None = None, memory=None, cores=None,
              worker_group=None):
        """Scale to `n` workers, or to `jobs` jobs (of `processes` workers each)."""
        if jobs is not None:
            if n is not None:
                raise TypeError("give n (workers) or jobs, not both")
            n = int(jobs) * self._processes(worker_group)
        return super().scale(n, cores=cores, memory=memory, worker_group=worker_group)

    def _target_from(self, n=None, cores=None, memory=None, worker_group=None) -> int:
        if n is None and (cores is not None or memory is not None):
            job = JobScript(self.system, **self._group_job(worker_group))
            jobs = (math.ceil(cores / job.cores) if cores is not None
                    else math.ceil(parse_bytes(memory) / job.memory))
            return jobs * job.processes
        return super()._target_from(n, cores, memory, worker_group)

    def adapt(self, minimum: int = 0, maximum: float = math.inf, minimum_jobs: int | None = None,
              maximum_jobs: int | None = None, worker_group=None, **kwargs):
        """Adapt between `minimum` and `maximum` workers, or `minimum_jobs`/`maximum_jobs` jobs."""
        per = self._processes(worker_group)
        if minimum_jobs is not None:
            minimum = minimum_jobs * per
        if maximum_jobs is not None:
            maximum = maximum_jobs * per
        return super().adapt(minimum=minimum, maximum=maximum, worker_group=worker_group,
                             **kwargs)

    def add_worker_group(self, name: str, n: int = 0, spec: dict | None = None, **job_options):
        """A new group of jobs: the default job options overridden by `job_options`
        (`queue="bigmem", memory="64GiB"`); checked by the batch system first."""
        if spec is not None:
            return super().add_worker_group(name, n, spec=spec)
        job = self._group_job_options(self._group_job(None), name, job_options)
        JobScript(self.system, **job)
        template = self._job_template(job)
        check = [(f"worker group {name!r}", template)]
        if self.asynchronous:
            async def add():
                await self._check_scripts(check)
                started = SpecCluster.add_worker_group(self, name, n, spec=template)
                if started is not None:
                    await started
            return asyncio.ensure_future(add())
        self.sync(self._check_scripts, check)
        return super().add_worker_group(name, n, spec=template)

    # -- what users look at -----------------------------------------------------------------------
    def job_script(self, worker_group=None) -> str:
        """The exact script the next job of this group will be submitted with."""
        job = JobScript(self.system, security=self._job_security,
                        **self._group_job(worker_group))
        name = self._peek_name(worker_group)
        return job.worker_script(self.scheduler_address or self._check_address, name)

    def _peek_name(self, worker_group=None):
        if worker_group is not None:
            i = self._next_group_name.get(worker_group, 0)
            while f"{worker_group}-{i}" in self.worker_spec or f"{worker_group}-{i}" in self.workers:
                i += 1
            return f"{worker_group}-{i}"
        i = self._next_name
        while i in self.worker_spec or i in self.workers:
            i += 1
        return i

    @property
    def jobs(self) -> dict:
        """{spec name: {"job_id", "state", "native_state", "reason", "worker_group",
        "workers"}}: `reason` is the batch system's (why a job waits, why it ended)."""
        out = {}
        for name, h in self.workers.items():
            if not isinstance(h, Job):
                continue
            info = h.info_state
            out[name] = {"job_id": h.job_id, "state": h.state.value,
                         "native_state": info.native if info is not None else None,
                         "reason": info.reason if info is not None else None,
                         "worker_group": (self.worker_spec.get(name) or {}).get("worker_group"),
                         "workers": len(h.worker_names)}
        return out

    def _job_counts(self) -> dict:
        counts = {"running": 0, "pending": 0}
        for j in self.jobs.values():
            if j["state"] == JobState.running.value:
                counts["running"] += 1
            elif j["state"] in (JobState.pending.value, JobState.held.value):
                counts["pending"] += 1
        return counts

    def _summary(self) -> dict:
        threads = memory = 0
        for name, h in self.workers.items():
            if isinstance(h, Job) and h.state is JobState.running:
                threads += h.script.cores
                memory += h.script.memory
        return {"workers": self._count_workers(), "threads": threads, "memory": memory or None}

    def _extra_summary(self) -> list:
        counts = self._job_counts()
        return [("jobs_running", counts["running"]), ("jobs_pending", counts["pending"])]

    # -- registry ---------------------------------------------------------------------------------
    def _detachable(self) -> bool:
        return not self.shutdown_on_close and self.scheduler_spec["cls"] is SchedulerJob

    def _registry_config(self):
        return {"kind": self.config_name, "system": self.system.record()}

    def _restore(self, config, **kwargs):
        context = super()._restore(config, **kwargs)
        self.security, self._token, self._job_security = None, None, None  # detached: tcp://
        self._own_credentials, self._credentials_dir, self._wrote_credentials = None, None, False
        self.system = self.system_class.from_record(config["system"], context)
        self._queue_waits = []
        self._walltime_task = None
        return context


def _check_security(security):
    if security is not None and security is not False and not isinstance(security, Security):
        raise TypeError(f"security must be None (temporary TLS credentials), a Security or "
                        f"False (plain tcp://), got {security!r}")
