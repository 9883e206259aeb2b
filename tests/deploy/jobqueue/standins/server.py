"""`StandinBatch`: one stand-in batch system (batch_standin.py) living in a directory.

    server = StandinBatch("lsf", tmp_path)
    env = server.env            # PATH (its bin/ first), TASKCORE_STANDIN_FAMILY, _DIR
    server.run("bsub", input=script)
    server.jobs()               # [(job id, native state)] of jobs queued, running or held
    server.cancel_all(); server.wait_idle(); server.kill_all()

`bin/` holds one small sh wrapper per command of the family (qsub, qstat...), each
exec'ing this interpreter on batch_standin.py with the command's name in
TASKCORE_STANDIN_TOOL and the family and state directory fixed, so the commands reach
this server whatever the caller's environment (a PBS job without -V, a runuser prefix).
Job ids are the ones the commands print (PBS "12.standin-server", Torque "12.standin",
Moab and LSF "12", HTCondor "12", Flux "ƒ2Bx...").

`kill_all()` ends every shepherd and job process group of this server (found in its job
records and, for shepherds, by their command line naming this state directory), by
process id; the fixtures call it at teardown so nothing outlives a test.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import batch_standin as program

PROGRAM = Path(program.__file__).resolve()
FAMILIES = tuple(program.FAMILIES)
CANCEL = {"pbs": ("qdel",), "torque": ("qdel",), "moab": ("canceljob",), "lsf": ("bkill",),
          "htcondor": ("condor_rm",), "flux": ("flux", "cancel")}


class StandinError(RuntimeError):
    """A stand-in command failed (run(check=True)), or jobs did not finish in time."""


class StandinBatch:
    """One stand-in batch system of `family` with its state under `directory`.

    Knobs (written into the wrappers): `history` (s finished jobs stay listed),
    `start_delay` (s a job stays queued before it starts), `kill_delay` (s between SIGTERM
    and SIGKILL), `walltime_scale` (factor on walltimes when enforcing them)."""

    def __init__(self, family, directory, *, history=None, start_delay=None, kill_delay=None,
                 walltime_scale=None):
        if family not in program.FAMILIES:
            raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
        self.family = family
        self.directory = Path(directory).resolve()
        self.bin = self.directory / "bin"
        self.state = self.directory / "state"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        self.knobs = {k: str(v) for k, v in {
            "TASKCORE_STANDIN_HISTORY": history, "TASKCORE_STANDIN_START_DELAY": start_delay,
            "TASKCORE_STANDIN_KILL_DELAY": kill_delay,
            "TASKCORE_STANDIN_WALLTIME_SCALE": walltime_scale}.items() if v is not None}
        self.tools = program.FAMILIES[family]
        for tool in self.tools:
            self._write_wrapper(tool)
        self._store = program.Store(str(self.state))

    def __repr__(self):
        return f"<StandinBatch {self.family} {self.directory}>"

    def _write_wrapper(self, tool):
        lines = ["#!/bin/sh",
                 f"# Written by {Path(__file__).name}: the {self.family} stand-in's {tool}."]
        for key, value in self.knobs.items():
            lines.append(f': "${{{key}:={value}}}"; export {key}')
        lines.append(f"TASKCORE_STANDIN_FAMILY={self.family}; export TASKCORE_STANDIN_FAMILY")
        lines.append(f"TASKCORE_STANDIN_DIR={shlex.quote(str(self.state))}; "
                     f"export TASKCORE_STANDIN_DIR")
        lines.append(f"TASKCORE_STANDIN_TOOL={tool} exec {shlex.quote(sys.executable)} -I "
                     f"{shlex.quote(str(PROGRAM))} \"$@\"")
        path = self.bin / tool
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)

    # -- environment and commands ---------------------------------------------------------------
    @property
    def env(self) -> dict:
        """What a process needs to use this batch system (its commands first on PATH)."""
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "TASKCORE_STANDIN_FAMILY": self.family,
                "TASKCORE_STANDIN_DIR": str(self.state), **self.knobs}

    def full_env(self, **extra) -> dict:
        return {**os.environ, **self.env, **extra}

    def run(self, *cmd, check=True, timeout=30, input=None, cwd=None, env=None):
        """Run one of this system's commands; the CompletedProcess (text)."""
        proc = subprocess.run([str(c) for c in cmd], env=env or self.full_env(),
                              capture_output=True, text=True, timeout=timeout,
                              input=input if input is not None else "", cwd=cwd)
        if check and proc.returncode != 0:
            raise StandinError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    # -- state ----------------------------------------------------------------------------------
    def records(self) -> list:
        with self._store.lock():
            return self._store.jobs()

    def native(self, job) -> str:
        """The job's state as this family's status command names it."""
        family = job["family"]
        if family in ("pbs", "torque"):
            return program.pbs_native(job)
        if family == "moab":
            state, _ = program.moab_state(job)
            return state or "Completed"
        if family == "lsf":
            return program.lsf_native(job)
        if family == "htcondor":
            status = program.condor_status(job)
            return {1: "Idle", 2: "Running", 3: "Removed", 5: "Held", None: "Gone"}[status]
        state = program.flux_state(job)
        return state if state != "INACTIVE" else f"INACTIVE {program.flux_result(job)}"

    def jobs(self, all_states=False) -> list:
        """[(job id, native state)] of the jobs queued, running or held in the queue; with
        `all_states`, also those still listed after they ended."""
        return [(program.job_id(j), self.native(j)) for j in self.records()
                if program.listed(j) and (all_states or program.active(j))]

    def leaks(self) -> list:
        """Jobs still queued, running or held that nobody is stopping."""
        return [(program.job_id(j), self.native(j)) for j in self.records()
                if program.active(j) and not j.get("stopping")]

    def cancel_all(self) -> list:
        """Cancel (with the family's own command) every job not finished; returns them."""
        jobs = self.jobs()
        if jobs:
            self.run(*CANCEL[self.family], *[j for j, _ in jobs], check=False, timeout=30)
        return jobs

    def wait_idle(self, timeout=30.0, raise_=True) -> list:
        """Wait until no job is queued, running or held; returns what is left."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.jobs()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if left and raise_:
            raise StandinError(f"{self.family} stand-in jobs still there after {timeout} s: {left}")
        return left

    # -- processes ------------------------------------------------------------------------------
    def shepherd_pids(self) -> list:
        """Pids of this server's shepherds (their command line names this state directory)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"--shepherd" in argv:
                i = argv.index(b"--shepherd")
                if argv[i + 1:i + 2] == [os.fsencode(str(self.state))]:
                    pids.append(int(entry))
        return pids

    def kill_all(self) -> list:
        """SIGKILL every shepherd and job process group of this server; jobs not finished are
        recorded as lost. Returns their ids."""
        killed = []
        with self._store.lock():
            for pid in self.shepherd_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for job in self._store.jobs():
                if job["state"] in ("queued", "running", "held"):
                    if job["state"] == "running":
                        program.kill_group(job.get("pgid"), job.get("pgid_token"),
                                           signal.SIGKILL)
                    job["state"] = "ended"
                    job["end_time"] = time.time()
                    job["end_reason"] = job.get("stopping") or "lost"
                    self._store.put(job)
                    killed.append(program.job_id(job))
        return killed
