"""A batch system as one small class: its commands, its directives, its job states.

`BatchSystem` holds everything a job queue cluster needs from SLURM, PBS,
SGE...: how to submit a script and read the job id, how to cancel, how to ask
the state of many jobs in one call, and what its states mean. A new system
is a subclass that fills in the class attributes and two parsers (see
slurm.py: about 60 lines).

One object per cluster (shared by every job of the cluster, deep copies
included) also owns:

- the **poller**: every `poll_interval` one status command for all the jobs
  the cluster knows, never one per job. Each job learns its state from it
  (`JobState`), and a job that leaves the queue, or ends in a failed state,
  is reported through its `finished()`.
- the **submission gate**: `max_jobs_queued` (jobs accepted by the batch
  system but not running yet) and `max_jobs_running` (pending plus running).
  A job that cannot be submitted yet waits here, held on our side.

Commands run as subprocesses with a timeout, in the environment of this
process (`SLURM_CONF` and the like apply); a non-zero exit raises
`BatchCommandError` carrying the system's own message.
"""
from __future__ import annotations

import abc
import asyncio
import enum
import logging
import os
import re
import shlex
import time

from taskcore.utils import parse_timedelta

logger = logging.getLogger("taskcore.deploy.jobqueue")

__all__ = ["BatchSystem", "BatchCommandError", "JobState", "JobInfo"]


def parse_walltime(value) -> float | None:
    """Seconds in a walltime: "D-HH:MM:SS", "HH:MM:SS", "MM:SS", minutes, or "90m", "1h"."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if m:
        days, *rest = m.groups()
        parts = [int(x) for x in rest if x is not None]
        if days is None:
            # sbatch's forms: MM, MM:SS, HH:MM:SS
            units = {1: [60], 2: [60, 1], 3: [3600, 60, 1]}[len(parts)]
        else:
            # D-HH, D-HH:MM, D-HH:MM:SS
            units = [3600, 60, 1][:len(parts)]
        return float(int(days or 0) * 86400 + sum(p * u for p, u in zip(parts, units)))
    try:
        seconds = parse_timedelta(text)
    except ValueError:
        seconds = None
    if seconds is None:
        raise ValueError(f"invalid walltime {value!r}: use D-HH:MM:SS, HH:MM:SS, MM:SS, minutes, "
                         f"or a duration such as '90m'")
    return seconds


class BatchCommandError(RuntimeError):
    """A batch command failed; the message carries the batch system's own words."""


class JobState(str, enum.Enum):
    """Where a job is, in the batch system's terms mapped to ours."""

    held = "held"          # waiting on our side (a site limit), not submitted yet
    pending = "pending"    # queued by the batch system
    running = "running"
    done = "done"          # ended normally
    failed = "failed"      # ended otherwise: cancelled, timed out, node failure...
    gone = "gone"          # no longer known to the batch system

    @property
    def ended(self) -> bool:
        return self in (JobState.done, JobState.failed, JobState.gone)

    def __str__(self):
        return self.value


class JobInfo:
    """What the poller knows about one job."""

    __slots__ = ("job_id", "state", "native", "reason", "since", "running_since",
                 "started_wall", "event")

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.state = JobState.pending
        self.native = None  # the batch system's own state name
        self.reason = None
        self.since = time.monotonic()
        self.running_since: float | None = None
        self.started_wall: float | None = None  # the same moment, on the wall clock (records)
        self.event = asyncio.Event()  # set on every change

    def update(self, state: JobState, native=None, reason=None) -> bool:
        if state is self.state and native == self.native and reason == self.reason:
            return False
        if state is not self.state:
            self.since = time.monotonic()
        self.state = state
        self.native = native
        self.reason = reason
        if state is JobState.running and self.running_since is None:
            self.running_since = self.since
            self.started_wall = time.time()
        self.event.set()
        self.event = asyncio.Event()
        return True


class BatchSystem(abc.ABC):
    """One batch system, as seen by one cluster; see the module doc."""

    name = "abstract"
    directive_prefix = "#"
    submit_command = "false"
    cancel_command = "false"
    # The header of a job script: one directive per line, `{field}` from JobScript's
    # values; a line whose fields are all empty is dropped (module doc of job.py).
    header_template = ""
    # Lines that name the job's output files, appended when a log directory is set.
    log_template = ""
    # Job options of this system's own (dask-jobqueue's `resource_spec` for SGE...), with
    # their defaults; they reach the header template through `fields()`.
    job_options: dict = {}
    # True: the script goes to the submit command's stdin (LSF's `bsub < script`).
    script_on_stdin = False
    # True: the batch system runs the submitted file itself when the job starts (OAR), so
    # it is kept (in the log directory, or ~/.cache/taskcore/jobqueue/scripts) until then.
    keeps_script = False
    script_mode = 0o644
    # Native states of jobs that have failed but stay listed until removed (HTCondor's
    # Held, SGE's Eqw): the job is cancelled when seen there, so it cannot linger.
    lingering_states: frozenset = frozenset()
    # The system's own state names, as `state_of` reads them; any other is a failure.
    pending_states: frozenset = frozenset()
    running_states: frozenset = frozenset()
    done_states: frozenset = frozenset()
    # The job id in the submit command's output (one group), and how to name that command.
    job_id_pattern = r"^\s*(\d+)\s*$"
    submit_label = None
    # How long (s) a job that vanished from the queue may stay unseen before we call it gone:
    # some systems drop a job from their listing for a moment while it starts.
    vanish_grace = 0.0
    MIN_POLL_SPACING = 0.25  # s between status calls, even when many wait for news

    def __init__(self, poll_interval: float = 2.0, command_timeout: float = 60,
                 max_jobs_queued: int | None = None, max_jobs_running: int | None = None,
                 submit_options: list | None = None, command_prefix: list | None = None):
        self.poll_interval = poll_interval
        # Every batch command runs behind this prefix, which must pass the words on as they
        # are (`["runuser", "-u", "me", "--"]` to submit as another user on this host). Not
        # `ssh`: a remote shell splits the words again, and the script is a local file.
        self.command_prefix = [str(a) for a in command_prefix or []]
        self._user: str | None = None
        self.command_timeout = command_timeout
        self.max_jobs_queued = max_jobs_queued
        self.max_jobs_running = max_jobs_running
        self.submit_options = list(submit_options or [])
        self.jobs: dict[str, JobInfo] = {}
        self._held = 0  # jobs waiting at the gate
        self._submitting = 0  # jobs past the gate whose submit command has not returned yet
        self._gate_changed: asyncio.Event | None = None
        self._poller: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._inflight: asyncio.Future | None = None
        self._cancel_batch: tuple | None = None  # ([job ids], future) gathering this turn
        self._missing: dict[str, float] = {}
        self.polls = 0  # status commands run (one per interval, whatever the job count)
        self.max_pending_seen = 0

    def __deepcopy__(self, memo):
        return self  # shared by every job of the cluster

    # -- what subclasses provide ----------------------------------------------------------------
    def render(self, script, command: list) -> str:
        """The text submitted for `command` (a worker or the scheduler): a shell script with
        the header by default (JobScript.shell_script); HTCondor writes a submit file."""
        return script.shell_script(command)

    def fields(self, script) -> dict:
        """Header template fields of this system's own, from a JobScript (its common fields
        and `script.system_options`); the common fields are in JobScript.fields()."""
        return {}

    def format_walltime(self, seconds: float) -> str:
        """A walltime as its directive wants it (HH:MM:SS by default)."""
        seconds = int(-(-seconds // 1))
        return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

    def parse_walltime(self, value) -> float | None:
        """Seconds in a walltime as this system's users write it (sbatch's forms, or a
        duration such as "90m", by default)."""
        return parse_walltime(value)

    def log_file_name(self, script, job_id: str) -> str:
        """The name of a job's output file in the log directory (see `log_template`)."""
        return f"{script.job_name}-{job_id}.out"

    def format_memory(self, nbytes: int) -> str:
        """A job's memory as its directive wants it (MiB, rounded up, by default)."""
        return f"{-(-int(nbytes) // 2**20)}M"

    def submit_argv(self, script_path: str) -> list:
        return [self.submit_command, *self.submit_options, script_path]

    def test_argv(self, script_path: str) -> list | None:
        """A command that validates a script without queueing it (None: no such command)."""
        return None

    def cancel_argv(self, job_ids: list) -> list:
        return [self.cancel_command, *job_ids]

    def state_of(self, native: str) -> JobState:
        """Our state for one of the system's own state names (the class's tables)."""
        if native in self.pending_states:
            return JobState.pending
        if native in self.running_states:
            return JobState.running
        if native in self.done_states:
            return JobState.done
        return JobState.failed

    @abc.abstractmethod
    def status_argv(self, job_ids: list) -> list:
        """One command that lists the states of these jobs (and may list more)."""

    def status_accepts(self, returncode: int, out: str, err: str) -> bool:
        """Whether a status command that exited with `returncode` still answered: some
        fail the whole call for one id they forgot, yet print the others."""
        return returncode == 0

    def parse_job_id(self, out: str) -> str:
        """The job id in the submit command's output: `job_id_pattern`'s group, on the last
        line that matches it (notes and warnings may come first)."""
        found = re.findall(self.job_id_pattern, out, re.M)
        if not found:
            raise ValueError(f"{self.submit_label or self.submit_command} printed no job id: "
                             f"{out!r}")
        return found[-1]

    @abc.abstractmethod
    def parse_status(self, out: str) -> dict:
        """{job_id: (JobState, native state, reason)} from the status command's output."""

    # -- records (the cluster registry stores the system with the spec) --------------------------
    def record(self) -> dict:
        return {"poll_interval": self.poll_interval, "command_timeout": self.command_timeout,
                "max_jobs_queued": self.max_jobs_queued,
                "max_jobs_running": self.max_jobs_running,
                "submit_options": self.submit_options, "command_prefix": self.command_prefix}

    @classmethod
    def from_record(cls, record, context):
        cache = context.setdefault("batch_systems", {})
        if cls not in cache:
            cache[cls] = cls(**record)
        return cache[cls]

    # -- commands -------------------------------------------------------------------------------
    async def run(self, argv: list, what: str, stdin: bytes | None = None,
                  accept=None) -> str:
        """Run one batch command; its stdout, or BatchCommandError with its stderr.
        `accept(returncode, out, err)` may let a non-zero exit through."""
        argv = self.command_prefix + [str(a) for a in argv]
        # PWD as well as the cwd: oarsub takes the job's directory from $PWD.
        env = dict(os.environ, PWD=os.getcwd())
        try:
            proc = await asyncio.create_subprocess_exec(
                *map(str, argv), env=env,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            raise BatchCommandError(f"{what}: cannot run {argv[0]!r} ({e.strerror}); is "
                                    f"{self.name} installed and on PATH?") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.command_timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise BatchCommandError(f"{what}: {shlex.join(map(str, argv))} did not answer "
                                    f"within {self.command_timeout} s") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0 and not (
                accept is not None and accept(proc.returncode, text,
                                              err.decode(errors="replace"))):
            msg = (err or out).decode(errors="replace").strip()
            raise BatchCommandError(f"{what}: {argv[0]} failed (exit status "
                                    f"{proc.returncode}): {msg}")
        return text

    async def submit(self, script_path: str) -> str:
        stdin = None
        if self.script_on_stdin:
            with open(script_path, "rb") as f:
                stdin = f.read()
        out = await self.run(self.submit_argv(script_path), "submitting a job", stdin=stdin)
        try:
            job_id = self.parse_job_id(out)
        except ValueError:
            # Submitted, but we cannot tell which job it is: nothing could ever cancel it.
            raise BatchCommandError(f"submitting a job: {self.submit_command} printed no job "
                                    f"id we can read ({out.strip()[:200]!r}); check the queue "
                                    f"for a job left behind") from None
        self.jobs[job_id] = JobInfo(job_id)
        self._note_pending()
        self._ensure_poller()
        return job_id

    async def validate(self, script_path: str) -> None:
        """Ask the batch system whether it would accept the script, queueing nothing."""
        argv = self.test_argv(script_path)
        if argv is not None:
            await self.run(argv, "checking the job script")

    async def cancel(self, job_ids: list) -> None:
        job_ids = [j for j in job_ids if j]
        if job_ids:
            await self.run(self.cancel_argv(job_ids), f"cancelling job(s) {', '.join(job_ids)}")

    async def cancel_batched(self, job_id: str) -> None:
        """Cancel one job together with every other job cancelled in the same loop turn:
        closing a cluster of 200 jobs runs one cancel command, not 200."""
        if self._cancel_batch is None:
            batch = self._cancel_batch = ([], asyncio.get_running_loop().create_future())

            async def flush():
                await asyncio.sleep(0)  # the other closers of this turn add their ids
                self._cancel_batch = None
                errors = {}
                try:
                    await self.cancel(batch[0])
                except BatchCommandError as e:
                    # Every system refuses to cancel a job that has just ended, and one
                    # such id fails the whole command: then cancel one by one, so each
                    # waiter learns about its own job only.
                    if len(batch[0]) == 1:
                        errors[batch[0][0]] = e
                    else:
                        for one in batch[0]:
                            try:
                                await self.cancel([one])
                            except BatchCommandError as e1:
                                errors[one] = e1
                except BaseException as e:
                    errors = {one: e for one in batch[0]}
                batch[1].set_result(errors)
            asyncio.ensure_future(flush())
        ids, done = self._cancel_batch
        ids.append(job_id)
        error = (await asyncio.shield(done)).get(job_id)
        if error is not None:
            raise error

    def watch(self, job_id: str) -> JobInfo:
        """Follow a job submitted elsewhere (a cluster rebuilt with from_name)."""
        info = self.jobs.get(job_id)
        if info is None:
            info = self.jobs[job_id] = JobInfo(job_id)
        self._ensure_poller()
        return info

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._missing.pop(job_id, None)
        self._wake_gate()

    def _wake_gate(self):
        event, self._gate_changed = self._gate_event(), asyncio.Event()
        event.set()

    # -- the submission gate ----------------------------------------------------------------------
    def _gate_event(self) -> asyncio.Event:
        if self._gate_changed is None:
            self._gate_changed = asyncio.Event()
        return self._gate_changed

    def counts(self) -> dict:
        out = {s.value: 0 for s in JobState}
        for info in self.jobs.values():
            out[info.state.value] += 1
        out["held"] = self._held
        return out

    def can_submit(self) -> bool:
        c = self.counts()
        pending = c["pending"] + self._submitting
        if self.max_jobs_queued is not None and pending >= self.max_jobs_queued:
            return False
        if self.max_jobs_running is not None and \
                pending + c["running"] >= self.max_jobs_running:
            return False
        return True

    def reserve(self) -> bool:
        """Take a submission slot if a site limit allows one now (then call `release`)."""
        if not self.can_submit():
            return False
        self._submitting += 1
        return True

    def release(self) -> None:
        """The reserved submission is done (the job is listed now) or failed."""
        self._submitting -= 1
        self._wake_gate()

    async def wait_for_slot(self) -> None:
        """Return once a slot is reserved (see `reserve`) without passing a site limit."""
        self._held += 1
        try:
            while not self.reserve():
                event = self._gate_event()
                self._ensure_poller()
                await event.wait()
        finally:
            self._held -= 1

    def _note_pending(self):
        self.max_pending_seen = max(self.max_pending_seen, self.counts()["pending"])

    # -- the poller -------------------------------------------------------------------------------
    def _ensure_poller(self):
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll_loop())

    def request_poll(self) -> None:
        """Poll soon (someone waits for a change, e.g. a cancel): callers share one poll."""
        self._ensure_poller()
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()

    async def _poll_loop(self):
        while self.jobs:
            if self._wake is None:
                self._wake = asyncio.Event()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except asyncio.TimeoutError:
                pass
            self._wake = None
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a slow or failing controller: ask again next time
                logger.warning("%s: polling job states failed: %s", self.name, e)
            # However many ask, the batch system gets at most one status call per spacing.
            await asyncio.sleep(min(self.poll_interval, self.MIN_POLL_SPACING))

    async def poll(self) -> None:
        """One status command for every job we follow (concurrent callers share it)."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._poll_once())
        await asyncio.shield(self._inflight)

    async def _poll_once(self) -> None:
        ids = [j for j, info in self.jobs.items() if not info.state.ended]
        if not ids:
            return
        out = await self.run(self.status_argv(ids), "polling job states",
                             accept=self.status_accepts)
        self.polls += 1
        seen = self.parse_status(out)
        now = time.monotonic()
        changed = False
        for job_id in ids:
            info = self.jobs.get(job_id)
            if info is None:
                continue
            if job_id in seen:
                self._missing.pop(job_id, None)
                state, native, reason = seen[job_id]
                changed |= info.update(state, native, reason)
            else:
                first = self._missing.setdefault(job_id, now)
                if now - first >= self.vanish_grace:
                    changed |= info.update(JobState.gone, None, "no longer in the queue")
        self._note_pending()
        if changed:
            self._wake_gate()

    async def close(self):
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None

    def user(self) -> str:
        """Who the batch commands run as: us, or whom `command_prefix` makes them run as
        (asked once, through the prefix, for the status commands' user filter)."""
        if self._user is None:
            if self.command_prefix:
                import subprocess

                try:
                    out = subprocess.run([*self.command_prefix, "id", "-un"],
                                         capture_output=True, text=True,
                                         timeout=self.command_timeout, check=True)
                    self._user = out.stdout.strip()
                except (OSError, subprocess.SubprocessError) as e:
                    raise BatchCommandError(f"cannot tell which user {self.command_prefix} "
                                            f"runs commands as: {e}") from None
            else:
                import getpass

                self._user = os.environ.get("USER") or getpass.getuser()
        return self._user
