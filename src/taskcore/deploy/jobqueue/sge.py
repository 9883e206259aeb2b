"""Grid Engine (SGE, Son of Grid Engine, UGE): `qsub`, `qstat -xml`, `qdel`, and `SGECluster`.

dask-jobqueue's SGE parameter `resource_spec` (for example "h_vmem=4G,m_mem_free=4G")
becomes one `-l` line; without it no memory request is written, since Grid Engine
sites name their memory complexes differently. The walltime is `-l h_rt=`.
`gpus=N` asks for `-l gpu=N`, the complex most sites define for GPUs (a site
with another name skips it with `job_directives_skip=["gpu="]` and writes its own).
`qsub -w v` checks a script against the configuration without queueing it.
Grid Engine ignores the `#!` line and starts a login shell (`-S /bin/bash`
here), which may reset PATH: the worker's Python is always an absolute path.
A job in an error state (`Eqw`) stays queued until deleted: it counts as
failed and is deleted.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from taskcore.deploy.jobqueue.cluster import JobQueueCluster
from taskcore.deploy.jobqueue.system import BatchSystem, JobState

__all__ = ["SGE", "SGECluster"]


class SGE(BatchSystem):
    name = "SGE"
    directive_prefix = "#$"
    submit_command = "qsub"
    cancel_command = "qdel"
    job_id_pattern = r"^\s*(\d+)(?:\.\S+)?\s*$"
    job_options = {"resource_spec": None}
    header_template = "\n".join([
        "#$ -N {job_name}",
        "#$ -q {queue}",
        "#$ -P {account}",
        "#$ -l {resource_spec}",
        "#$ -l h_rt={walltime}",
        "#$ -l gpu={gpus}",
        "#$ -cwd",
        "#$ -j y",
        "#$ -V",
        "#$ -S /bin/bash",
    ])
    log_template = "#$ -o {log_directory}/$JOB_NAME-$JOB_ID.out"
    lingering_states = frozenset({"Eqw", "Ehqw", "EhRqw"})  # sge_status(5): error states

    def fields(self, script):
        return {"resource_spec": script.system_options.get("resource_spec")}

    def submit_argv(self, script_path):
        return ["qsub", "-terse", *self.submit_options, script_path]

    def test_argv(self, script_path):
        return ["qsub", "-w", "v", *self.submit_options, script_path]

    def status_argv(self, job_ids):
        return ["qstat", "-xml", "-u", self.user()]

    def parse_status(self, out):
        if not out.strip():
            return {}
        seen = {}
        for job in ET.fromstring(out).iter("job_list"):
            job_id = (job.findtext("JB_job_number") or "").strip()
            native = (job.findtext("state") or "").strip()
            if "E" in native:
                state = JobState.failed
            elif "d" in native:
                state = JobState.running  # being deleted: gone soon
            elif set(native) & set("rtsST"):  # running, transferring, suspended
                state = JobState.running
            else:  # qw, hqw, ...
                state = JobState.pending
            seen[job_id] = (state, native, None)
        return seen


class SGECluster(JobQueueCluster):
    """Workers as Grid Engine jobs (dask-jobqueue's SGECluster parameters)."""

    backend = "sge"
    system_class = SGE
    config_name = "sge"
