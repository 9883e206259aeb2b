"""Batch jobs as cluster members: the job script, a worker job, the scheduler's job.

The job script
--------------
`JobScript` turns dask-jobqueue's parameters into the exact text that is
submitted::

    <shebang>

    <header: the batch system's template, one directive per line>
    <job_extra_directives, each with the directive prefix>

    <job_script_prologue lines>
    <the command: core-worker (with its nanny) or core-scheduler>

The header template is the batch system's (`BatchSystem.header_template`),
or the site's own (`header_template=`, or the config file). Each line is
formatted with the script's fields (`job_name`, `queue`, `account`,
`walltime`, `job_cpu`, `job_mem`, `cores`, `memory`, `processes`,
`log_directory`); a line whose fields are all empty is dropped, so one
template serves jobs with and without a queue or an account. Then every
header line that contains one of `job_directives_skip` is removed.

Walltime: a worker job started with a walltime gets `--lifetime` = walltime
minus `walltime_margin`, with `lifetime_stagger`, so it retires (its data
moves to other workers) before the batch system kills it; the cluster plans
its replacement ahead of that (deploy/jobqueue/cluster.py).

The members
-----------
`Job` submits the script on `start()`, which returns once the batch system
accepted it (or holds it back while a site limit is reached: `pending`
stays True until the job runs). Its state comes from the cluster's poller
(`BatchSystem.poll`); when the job leaves the queue, `finished()` resolves.
`close()` cancels it and waits until the batch system lists it as ended.
`record()` is the job id: another process adopts the job with `record=`.

`SchedulerJob` runs `core-scheduler --scheduler-file <shared file>` as a
job; `start()` returns once that file names the scheduler's address.

Credentials
-----------
A script names credential *files*, never their contents: `--tls-ca-file`,
`--tls-cert`, `--tls-key` and `--token-file` (`JobCredentials`: the paths as
the jobs see them, in the cluster's private directory under its
`shared_directory`; deploy/jobqueue/cluster.py writes and removes it). So no
key or token is in a job script, in the batch system's copy of it, or on a
process command line; core-worker and core-scheduler read the files at start
(a nanny hands the token to its workers through their environment).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import string
import sys
import tempfile
import time

from taskcore.deploy.jobqueue.system import BatchCommandError, JobState, parse_walltime
from taskcore.process import (ProcessGone, ProcessInterface, ProcessStartError, Status,
                              cuda_worker_cli_args, scheduler_cli_args, worker_cli_args)
from taskcore.utils import parse_bytes, parse_timedelta, read_json_file

logger = logging.getLogger("taskcore.deploy.jobqueue")

__all__ = ["JobScript", "Job", "SchedulerJob", "JobCredentials", "parse_walltime",
           "JOB_OPTIONS"]

# Every option a job template accepts (dask-jobqueue's names, plus ours after the blank line).
JOB_OPTIONS = frozenset({
    "cores", "memory", "processes", "queue", "account", "walltime", "job_name",
    "job_extra_directives", "job_directives_skip", "job_script_prologue", "job_cpu",
    "job_mem", "interface", "local_directory", "log_directory", "python", "shebang",
    "worker_extra_args", "death_timeout",

    "header_template", "walltime_margin", "lifetime_stagger", "nanny", "protocol",
    "resources", "gpus", "device_memory_limit",
})


class JobCredentials:
    """Credentials as a job sees them: the paths of the TLS files and of a file holding
    the shared token, where the compute nodes read them. Only paths: the secrets never
    enter a script (see the module doc). A `Security` works in its place for its TLS
    files (their paths as given); its token is ignored here (the cluster writes it to a
    file and names that file in `token_file`)."""

    def __init__(self, ca_file=None, cert_file=None, key_file=None, token_file=None):
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.token_file = token_file

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file and self.cert_file and self.key_file)

    def __repr__(self):
        return (f"JobCredentials(ca_file={self.ca_file!r}, cert_file={self.cert_file!r}, "
                f"key_file={self.key_file!r}, token_file={self.token_file!r})")


def _credential_args(security) -> list:
    """`--token-file PATH` when the job's credentials name a token file (the TLS options
    come from security_cli_args)."""
    path = getattr(security, "token_file", None)
    return ["--token-file", path] if path else []


class _Fields(string.Formatter):
    """Collects the field names a template line uses."""

    def names(self, line: str) -> list:
        return [f for _, f, _, _ in self.parse(line) if f]


_FIELDS = _Fields()


class JobScript:
    """The text of one job script; see the module doc. Pure: no I/O, no batch system calls."""

    def __init__(self, system, *, cores=None, memory=None, processes=1, queue=None,
                 account=None, walltime=None, job_name="taskcore-worker",
                 job_extra_directives=(), job_directives_skip=(), job_script_prologue=(),
                 job_cpu=None, job_mem=None, interface=None, local_directory=None,
                 log_directory=None, python=None, shebang="#!/usr/bin/env bash",
                 worker_extra_args=(), death_timeout=None, header_template=None,
                 walltime_margin="auto", lifetime_stagger="auto", nanny=True, protocol=None,
                 resources=None, gpus=None, device_memory_limit=None, security=None,
                 **system_options):
        if cores is None or memory is None:
            raise ValueError("a job needs cores= and memory= (per job, as in dask-jobqueue)")
        unknown = set(system_options) - set(system.job_options)
        if unknown:
            raise TypeError(f"unknown job option(s) {sorted(unknown)} for {system.name}; its "
                            f"own options are {sorted(system.job_options) or 'none'}")
        self.system = system
        self.system_options = {**system.job_options, **system_options}
        self.cores = int(cores)
        self.memory = parse_bytes(memory)
        self.processes = int(processes or 1)
        self.gpus = _gpus(gpus, self.processes)
        if self.gpus:
            self.processes = self.gpus      # one worker per GPU (core-cuda-worker)
        self.device_memory_limit = device_memory_limit
        if device_memory_limit is not None and not self.gpus:
            raise ValueError("device_memory_limit= needs gpus=: it limits each GPU worker's "
                             "device memory")
        if self.cores < 1 or self.processes < 1:
            raise ValueError(f"cores ({cores}) and processes ({processes}) must be >= 1")
        if self.processes > self.cores:
            raise ValueError(f"processes={processes} > cores={cores}: every worker process "
                             f"needs at least one core")
        self.queue = queue
        self.account = account
        self.walltime = walltime
        self.walltime_seconds = system.parse_walltime(walltime)
        self.job_name = job_name
        self.job_extra_directives = _lines(job_extra_directives, "job_extra_directives")
        self.job_directives_skip = _lines(job_directives_skip, "job_directives_skip")
        self.job_script_prologue = _lines(job_script_prologue, "job_script_prologue")
        self.job_cpu = job_cpu if job_cpu is not None else self.cores
        self.job_mem = job_mem if job_mem is not None else system.format_memory(self.memory)
        self.interface = interface
        self.local_directory = local_directory
        # Expanded here: the batch system takes `-o` literally, and it is read back here.
        self.log_directory = os.path.expanduser(log_directory) if log_directory else None
        self.python = python or sys.executable
        self.shebang = shebang
        self.worker_extra_args = [str(a) for a in _lines(worker_extra_args, "worker_extra_args")]
        self.death_timeout = death_timeout
        self.header_template = header_template if header_template is not None \
            else system.header_template
        self.nanny = nanny
        self.protocol = protocol
        self.resources = resources
        # Credentials (JobCredentials, or a Security for its TLS files): their *paths* go
        # into the script, so they must be readable where the job runs (a shared file
        # system), as dask-jobqueue expects too. Never a key or a token itself.
        self.security = security
        self.lifetime, self.lifetime_stagger = self._lifetime(walltime_margin, lifetime_stagger)

    def _lifetime(self, margin, stagger):
        w = self.walltime_seconds
        if w is None or margin is None:
            return None, None
        if margin == "auto":
            margin = min(max(0.05 * w, 60.0), 0.25 * w)
        else:
            margin = parse_timedelta(margin)
        if margin <= 0:
            raise ValueError(f"walltime_margin must be positive (None: no lifetime), got "
                             f"{margin} s")
        if margin >= w:
            raise ValueError(f"walltime_margin ({margin} s) must be shorter than the walltime "
                             f"({w} s)")
        stagger = margin / 4 if stagger == "auto" else (parse_timedelta(stagger) or 0.0)
        if stagger and stagger >= margin:
            raise ValueError(f"lifetime_stagger ({stagger} s) must be shorter than "
                             f"walltime_margin ({margin} s)")
        return w - margin, stagger

    # -- rendering ------------------------------------------------------------------------------
    def fields(self) -> dict:
        return {**self.common_fields(), **self.system.fields(self)}

    def common_fields(self) -> dict:
        return {"job_name": self.job_name, "queue": self.queue, "account": self.account,
                "walltime": None if self.walltime_seconds is None
                else self.system.format_walltime(self.walltime_seconds),
                "job_cpu": self.job_cpu, "job_mem": self.job_mem,
                "cores": self.cores, "memory": self.memory, "processes": self.processes,
                "gpus": self.gpus, "log_directory": self.log_directory}

    def header(self) -> list:
        fields = self.fields()
        out = []
        templates = self.header_template.splitlines()
        if self.log_directory:
            templates += self.system.log_template.splitlines()
        for line in templates:
            if not line.strip():
                continue
            names = _FIELDS.names(line)
            unknown = [n for n in names if n not in fields]
            if unknown:
                raise ValueError(f"header template line {line!r} uses unknown field(s) "
                                 f"{unknown}; known: {sorted(fields)}")
            if names and all(_empty(fields[n]) for n in names):
                continue
            out.append(line.format_map({k: "" if _empty(v) else v for k, v in fields.items()}))
        # As in dask-jobqueue: the skip list edits the template's lines; the extra directives
        # are the user's own and always go in (skip --mem, add --mem-per-cpu).
        out = [h for h in out if not any(skip in h for skip in self.job_directives_skip)]
        prefix = self.system.directive_prefix
        return out + [d if d.startswith("#") or not prefix else f"{prefix} {d}"
                      for d in self.job_extra_directives]

    def worker_command(self, scheduler_address: str, name) -> list:
        per_worker_memory = self.memory // self.processes
        if self.gpus:
            return self._cuda_worker_command(scheduler_address, name, per_worker_memory)
        args = worker_cli_args(
            scheduler_address, nanny=self.nanny, nthreads=max(1, self.cores // self.processes),
            nworkers=self.processes if self.processes > 1 else None,
            memory_limit=per_worker_memory, name=name, resources=self.resources,
            local_directory=self.local_directory, death_timeout=self.death_timeout,
            lifetime=self.lifetime, lifetime_stagger=self.lifetime_stagger,
            protocol=self.protocol, interface=self.interface, python=self.python,
            security=self.security, log_level="info")
        return args + _credential_args(self.security) + self.worker_extra_args

    def _cuda_worker_command(self, scheduler_address, name, per_worker_memory) -> list:
        """`core-cuda-worker`: one worker per GPU the batch system gave the job (it reads
        CUDA_VISIBLE_DEVICES, which the batch system sets), named NAME-0, NAME-1, ...
        like core-worker's processes, each pinned to the CPUs nearest its GPU."""
        args = cuda_worker_cli_args(
            scheduler_address, nthreads=max(1, self.cores // self.processes),
            memory_limit=per_worker_memory, device_memory_limit=self.device_memory_limit,
            name=name, resources=self.resources, local_directory=self.local_directory,
            death_timeout=self.death_timeout, lifetime=self.lifetime,
            lifetime_stagger=self.lifetime_stagger, protocol=self.protocol,
            interface=self.interface, python=self.python, security=self.security,
            log_level="info")
        return args + _credential_args(self.security) + self.worker_extra_args

    def render(self, command: list) -> str:
        return self.system.render(self, command)

    def shell_script(self, command: list) -> str:
        lines = [self.shebang, ""] + self.header() + [""] + self.job_script_prologue
        # exec: the job's main process is the server itself, so a cancel reaches it directly
        # and nothing is left to escape the batch system's process tracking.
        lines.append("exec " + " ".join(_shell_word(str(a)) for a in command))
        return "\n".join(lines) + "\n"

    def worker_script(self, scheduler_address: str, name) -> str:
        return self.render(self.worker_command(scheduler_address, name))

    def scheduler_script(self, scheduler_file: str, options: dict) -> str:
        opts = dict(options)
        if self.interface and "interface" not in opts and "host" not in opts:
            opts["interface"] = self.interface
        host = opts.pop("host", None)
        interface = opts.pop("interface", None)
        args = scheduler_cli_args(host=host if host or interface else "0.0.0.0",
                                  scheduler_file=scheduler_file, python=self.python,
                                  security=self.security, log_level="info", **opts)
        if interface:
            args += ["--interface", interface]
        return self.render(args + _credential_args(self.security))


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _empty(value) -> bool:
    return value is None or value is False or value == ""


def _shell_word(word: str) -> str:
    """Quote one argument for the job's shell, leaving `$VAR`/`${VAR}` to expand there:
    dask-jobqueue users write `local_directory="$TMPDIR"` for a node-local directory."""
    if "$" not in word:
        return shlex.quote(word)
    return '"' + re.sub(r'(["\\`])', r"\\\1", word) + '"'


def _gpus(gpus, processes) -> int | None:
    """GPUs per job: each gets its own worker, so `processes` is 1 (unset) or equal."""
    if gpus is None or gpus is False:
        return None
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive number of GPUs per job, got {gpus!r}")
    if processes not in (1, gpus):
        raise ValueError(f"gpus={gpus} starts one worker per GPU; processes={processes} "
                         f"contradicts it (leave processes unset)")
    return gpus


def _lines(value, what) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        raise TypeError(f"{what} must be a list of strings, not one string: {value!r}")
    if isinstance(value, dict):  # HTCondor-style {key: value} directives
        return [f"{k} = {v}" for k, v in value.items()]
    return list(value)


# ---------------------------------------------------------------------------------------------
# Members
# ---------------------------------------------------------------------------------------------

class Job(ProcessInterface):
    """One worker job (with `processes` workers); see the module doc."""

    role = "worker"

    def __init__(self, scheduler=None, name=None, *, system, job: dict, record=None,
                 security=None, close_timeout: float = 30, startup_timeout: float = 120):
        super().__init__(scheduler=scheduler, name=name)
        unknown = set(job) - JOB_OPTIONS - set(system.job_options)
        if unknown:
            raise TypeError(f"unknown job option(s) {sorted(unknown)}")
        self.system = system
        self.job_options = dict(job)
        self.script = JobScript(system, security=security, **job)
        # A job adopted from a record keeps the start time its first manager saw, so its
        # walltime replacement is planned for when it really expires.
        self._started_wall = (record or {}).get("started")
        self.close_timeout = close_timeout
        self.startup_timeout = startup_timeout
        self.job_id: str | None = None
        self.info_state = None  # the poller's JobInfo once submitted
        self.submitted_at: float | None = None
        self.adopted = record is not None
        self._record = record
        self._follower: asyncio.Task | None = None
        self._held: asyncio.Task | None = None
        self._script_path: str | None = None  # a kept script file, removed when the job ends
        self._closing = False
        if record is not None:
            self.job_id = str(record["job_id"])
            if self.name is None:
                self.name = record.get("name")

    # -- state -----------------------------------------------------------------------------------
    @property
    def state(self) -> JobState:
        if self.info_state is None:
            return JobState.held
        return self.info_state.state

    @property
    def pending(self) -> bool:
        return self.state in (JobState.held, JobState.pending)

    @property
    def running_since(self) -> float | None:
        return None if self.info_state is None else self.info_state.running_since

    @property
    def worker_names(self) -> list:
        if self.script.processes > 1:
            return [f"{self.name}-{i}" for i in range(self.script.processes)]
        return [self.name]

    def _label(self):
        return f"{self.role} job {self.name!r}" + (f" ({self.job_id})" if self.job_id else "")

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name!r} job_id={self.job_id} "
                f"state={self.state.value} status={self.status.value}>")

    # -- the script --------------------------------------------------------------------------------
    def job_script(self) -> str:
        return self.script.worker_script(self.scheduler, self.name)

    @property
    def log_file(self) -> str | None:
        d = self.script.log_directory
        if not d or not self.job_id:
            return None
        return os.path.join(d, self.system.log_file_name(self.script, self.job_id))

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self):
        if self.status is not Status.created:
            return self
        self.status = Status.starting
        try:
            if self.adopted:
                await self._adopt()
            elif self.system.reserve():
                try:
                    await self._submit()
                finally:
                    self.system.release()
            else:
                # A site limit: hold the job on our side and submit it when a slot frees.
                self._held = asyncio.ensure_future(self._submit_when_allowed())
        except BaseException:
            self.status = Status.failed
            self._finished.set()
            raise
        self.status = Status.running
        return self

    async def _submit(self):
        if self.script.log_directory:
            os.makedirs(self.script.log_directory, exist_ok=True)
        text = self.job_script()
        keep = self.system.keeps_script
        directory = None
        if keep:
            # The batch system runs this very file when the job starts (OAR's `-S`): it
            # must outlive the submission, where the nodes see it, until the job ends.
            directory = self.script.log_directory or os.path.expanduser(
                os.path.join("~", ".cache", "taskcore", "jobqueue", "scripts"))
            os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"taskcore-{self.name}-", suffix=".sh", dir=directory)
        submitted = False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(path, self.system.script_mode)
            job_id = await self.system.submit(path)
            submitted = True
        except BatchCommandError as e:
            raise BatchCommandError(f"{self._label()}: {e}") from None
        finally:
            if not (keep and submitted):
                _unlink(path)
        self._script_path = path if keep else None
        self.job_id = job_id
        self.submitted_at = time.monotonic()
        self.info_state = self.system.jobs[job_id]
        self._follower = asyncio.ensure_future(self._follow())
        logger.info("%s submitted", self._label())

    async def _submit_when_allowed(self):
        try:
            await self.system.wait_for_slot()
            try:
                if self._closing:
                    return
                await self._submit()
            finally:
                self.system.release()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.error("%s: held job could not be submitted: %s", self._label(), e)
            self.status = Status.failed
            self._finished.set()

    async def _adopt(self):
        self.info_state = self.system.watch(self.job_id)
        try:
            await self.system.poll()
        except BatchCommandError as e:
            raise ProcessStartError(f"{self._label()}: {e}") from None
        if self.info_state.state.ended:
            self.system.forget(self.job_id)
            raise ProcessGone(f"{self._label()} is no longer running "
                              f"({self.info_state.reason or self.info_state.native})")
        if self._started_wall is not None and self.info_state.state is JobState.running:
            age = max(0.0, time.time() - self._started_wall)
            self.info_state.running_since = time.monotonic() - age
            self.info_state.started_wall = self._started_wall
        self._follower = asyncio.ensure_future(self._follow())

    async def _follow(self):
        """Wait for the poller to report the job ended; then this member is finished."""
        info = self.info_state
        while not info.state.ended:
            await info.event.wait()
        if not self._closing:
            self.status = Status.failed if info.state is not JobState.done else Status.closed
            logger.info("%s ended: %s%s", self._label(), info.native or info.state.value,
                        f" ({info.reason})" if info.reason else "")
            if info.native in self.system.lingering_states:
                try:  # failed, yet still queued: remove it, or it would stay forever
                    await self.system.cancel_batched(self.job_id)
                except Exception as e:
                    logger.warning("%s: could not remove it: %s", self._label(), e)
            self.system.forget(self.job_id)
        self._drop_script()
        self._finished.set()

    def _drop_script(self):
        if self._script_path is not None:
            _unlink(self._script_path)
            self._script_path = None

    async def close(self):
        if self._closing:
            await self._finished.wait()
            return
        self._closing = True
        if self.status not in (Status.closed, Status.failed):
            self.status = Status.closing
        if self._held is not None:
            self._held.cancel()
        try:
            info = self.info_state
            if self.job_id and info is not None and not info.state.ended:
                try:
                    await self.system.cancel_batched(self.job_id)
                except BatchCommandError as e:
                    # Refused: most often the job ended since the last poll. The poll below
                    # tells; a job still listed afterwards is worth a warning.
                    logger.debug("%s: cancel refused: %s", self._label(), e)
                deadline = time.monotonic() + self.close_timeout
                # Closed means gone from the queue: ask (with everyone else closing, in one
                # status call) until the batch system agrees.
                while not info.state.ended and time.monotonic() < deadline:
                    event = info.event
                    self.system.request_poll()
                    try:
                        await asyncio.wait_for(event.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass
                if not info.state.ended:
                    logger.warning("%s still listed %s s after cancelling it", self._label(),
                                   self.close_timeout)
        finally:
            if self.job_id:
                self.system.forget(self.job_id)
            if self._follower is not None:
                self._follower.cancel()
            self._drop_script()
            self.status = Status.closed
            self._finished.set()

    def kill(self):
        if self.job_id:
            asyncio.ensure_future(self.system.cancel([self.job_id]))

    def detach_handle(self):
        self._closing = True
        for t in (self._follower, self._held):
            if t is not None:
                t.cancel()
        self._finished.set()

    # -- logs and records ------------------------------------------------------------------------
    async def fetch_logs(self, n: int = 1000) -> list | None:
        path = self.log_file
        if path is None:
            return None
        try:
            with open(path, errors="replace") as f:
                return [line.rstrip("\n") for line in f.readlines()[-n:]]
        except FileNotFoundError:
            return [f"(no output yet: {path})"]

    def record(self) -> dict | None:
        if not self.job_id:
            return None
        info = self.info_state
        return {"job_id": self.job_id, "name": self.name, "role": self.role,
                "address": self.address,
                "started": info.started_wall if info is not None else None}


class SchedulerJob(Job):
    """The scheduler in its own job; its address arrives through a shared scheduler file."""

    role = "scheduler"

    def __init__(self, name="Scheduler", *, system, job: dict, scheduler_file: str,
                 scheduler_options: dict | None = None, record=None, security=None,
                 close_timeout=30, startup_timeout=300):
        super().__init__(None, name=name, system=system, job=job, record=record,
                         security=security, close_timeout=close_timeout,
                         startup_timeout=startup_timeout)
        self.scheduler_file = scheduler_file
        self.scheduler_options = dict(scheduler_options or {})
        if record is not None:
            self.address = record.get("address")
            self.scheduler_file = record.get("scheduler_file", scheduler_file)
        else:
            self.job_script()  # fail here, in the caller, on options that cannot travel

    @property
    def worker_names(self) -> list:
        return []

    def job_script(self) -> str:
        return self.script.scheduler_script(self.scheduler_file, self.scheduler_options)

    async def _submit(self):
        os.makedirs(os.path.dirname(self.scheduler_file) or ".", exist_ok=True)
        try:
            os.unlink(self.scheduler_file)  # a stale file from an earlier run must not count
        except FileNotFoundError:
            pass
        await super()._submit()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            got = read_json_file(self.scheduler_file)
            if isinstance(got, dict) and isinstance(got.get("address"), str):
                self.address = got["address"]
                return
            if self.info_state.state.ended:
                tail = await self.fetch_logs(20) or []
                await self.close()
                raise ProcessStartError(
                    f"{self._label()} ended ({self.info_state.native or 'gone'}) before it "
                    f"wrote {self.scheduler_file}" + ("; last output:\n  " + "\n  ".join(tail)
                                                      if tail else ""))
            if time.monotonic() > deadline:
                state = self.info_state.state.value
                await self.close()
                raise ProcessStartError(f"{self._label()} did not start within "
                                        f"{self.startup_timeout} s (job {state})")
            await asyncio.sleep(0.2)
            if self.info_state.state is JobState.pending:
                await asyncio.sleep(0.3)

    def record(self):
        rec = super().record()
        if rec is not None:
            rec["scheduler_file"] = self.scheduler_file
        return rec
