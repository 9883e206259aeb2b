"""PBS Professional, Torque and Moab: `qsub`-family batch systems, and their clusters.

They share the `#PBS` directives and `qsub`; they differ in the resource
syntax and in how to ask for job states:

- PBS Pro: `-l select=1:ncpus=N:mem=M`; `qstat -x -f -F json IDS` (JSON, with
  finished jobs kept for the server's job history).
- Torque: `-l nodes=1:ppn=N` and `-l mem=M`; `qstat -x IDS` (XML).
- Moab (over Torque): `msub` and `canceljob`; `showq --xml` (XML, active,
  eligible and blocked jobs; a job no longer listed has ended).

`gpus=N` adds `:ngpus=N` to PBS Pro's chunk and `:gpus=N` to Torque's nodes.
`resource_spec` (dask-jobqueue's name) replaces the resource line whole.
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

from taskcore.deploy.jobqueue.cluster import JobQueueCluster
from taskcore.deploy.jobqueue.system import BatchSystem, JobState

__all__ = ["PBS", "Torque", "Moab", "PBSCluster", "TorqueCluster", "MoabCluster"]



class PBS(BatchSystem):
    name = "PBS"
    # job_state letters (a finished one is done only with exit status 0)
    pending_states = frozenset("QHWTU")
    running_states = frozenset("SREB")
    done_states = frozenset("CFX")
    directive_prefix = "#PBS"
    submit_command = "qsub"
    cancel_command = "qdel"
    job_id_pattern = r"^\s*(\d+(?:\[\d*\])?(?:\.\S+)?)\s*$"  # "123.server", arrays "12[]"
    job_options = {"resource_spec": None}
    header_template = "\n".join([
        "#PBS -N {job_name}",
        "#PBS -q {queue}",
        "#PBS -A {account}",
        "#PBS -l {resource_spec}",
        "#PBS -l walltime={walltime}",
    ])
    log_template = "#PBS -o {log_directory}/\n#PBS -j oe"

    def log_file_name(self, script, job_id):
        # `-o DIR/`: PBS names the file after the job's sequence number ("123.server",
        # "Moab.123": 123).
        sequence = re.search(r"\d+", job_id).group(0)
        return f"{script.job_name}.o{sequence}"

    def format_memory(self, nbytes):
        return f"{-(-int(nbytes) // 2**20)}mb"  # PBS units are binary: 1mb = 2**20 bytes

    def fields(self, script):
        spec = script.system_options.get("resource_spec")
        if spec is None:
            spec = self.default_resource_spec(script)
        return {"resource_spec": spec}

    def default_resource_spec(self, script) -> str:
        gpus = f":ngpus={script.gpus}" if script.gpus else ""
        return f"select=1:ncpus={script.job_cpu}{gpus}:mem={script.job_mem}"

    def status_argv(self, job_ids):
        return ["qstat", "-x", "-f", "-F", "json", *job_ids]

    def status_accepts(self, returncode, out, err):
        # One id the server forgot fails the whole call, but the others are still printed.
        return returncode == 0 or "Unknown Job Id" in err

    def parse_status(self, out):
        if not out.strip():
            return {}
        jobs = json.loads(out).get("Jobs") or {}
        seen = {}
        for job_id, attrs in jobs.items():
            letter = attrs.get("job_state", "")
            state = self.state_of(letter)
            exit_status = attrs.get("Exit_status")
            if state is JobState.done and exit_status not in (None, 0):
                state = JobState.failed
            reason = attrs.get("comment")
            seen[job_id] = (state, letter, reason)
            seen.setdefault(job_id.split(".")[0], seen[job_id])  # "123" and "123.server"
        return seen


class Torque(PBS):
    name = "Torque"
    header_template = "\n".join([
        "#PBS -N {job_name}",
        "#PBS -q {queue}",
        "#PBS -A {account}",
        "#PBS -l {resource_spec}",
        "#PBS -l mem={job_mem}",
        "#PBS -l walltime={walltime}",
    ])

    def default_resource_spec(self, script):
        gpus = f":gpus={script.gpus}" if script.gpus else ""
        return f"nodes=1:ppn={script.job_cpu}{gpus}"

    def status_argv(self, job_ids):
        return ["qstat", "-x", *job_ids]

    def parse_status(self, out):
        seen = {}
        # Torque prints one `<?xml ...?><Data>...</Data>` document per job id asked.
        jobs = [job for doc in re.findall(r"<Data>.*?</Data>", out, re.S)
                for job in ET.fromstring(doc).iter("Job")]
        for job in jobs:
            job_id = (job.findtext("Job_Id") or "").strip()
            letter = (job.findtext("job_state") or "").strip()
            state = self.state_of(letter)
            exit_status = job.findtext("exit_status")
            if state is JobState.done and exit_status not in (None, "", "0"):
                state = JobState.failed
            seen[job_id] = (state, letter, job.findtext("comment"))
            seen.setdefault(job_id.split(".")[0], seen[job_id])
        return seen


class Moab(Torque):
    name = "Moab"
    pending_states = frozenset({"Idle", "Hold", "UserHold", "SystemHold", "BatchHold",
                                "Deferred", "Blocked", "Staging", "Starting", "NotQueued",
                                "Migrated"})
    running_states = frozenset({"Running", "Suspended", "Canceling"})
    done_states = frozenset({"Completed"})  # Removed, Vacated...: failed
    submit_command = "msub"
    cancel_command = "canceljob"
    # msub prints the id on a line of its own, as Moab names it ("123" or "Moab.123").
    job_id_pattern = r"^\s*((?:\S+\.)?\d+)\s*$"

    def cancel_argv(self, job_ids):
        return ["canceljob", *job_ids]

    def status_argv(self, job_ids):
        return ["showq", "--xml", "-w", f"user={self.user()}"]

    def status_accepts(self, returncode, out, err):
        return returncode == 0

    def parse_status(self, out):
        if not out.strip():
            return {}
        seen = {}
        for job in ET.fromstring(out).iter("job"):
            job_id = job.get("JobID", "")
            native = job.get("State", "")
            state = self.state_of(native)
            seen[job_id] = (state, native, job.get("BlockReason"))
            seen.setdefault(job_id.rpartition(".")[2], seen[job_id])  # "Moab.123" and "123"
        return seen


class PBSCluster(JobQueueCluster):
    """Workers as PBS Professional jobs (dask-jobqueue's PBSCluster parameters)."""

    backend = "pbs"
    system_class = PBS
    config_name = "pbs"


class TorqueCluster(JobQueueCluster):
    """Workers as Torque jobs (`-l nodes=1:ppn=N`, `qstat -x` XML)."""

    backend = "torque"
    system_class = Torque
    config_name = "torque"


class MoabCluster(JobQueueCluster):
    """Workers as Moab jobs (`msub`, `canceljob`, `showq --xml`)."""

    backend = "moab"
    system_class = Moab
    config_name = "moab"
