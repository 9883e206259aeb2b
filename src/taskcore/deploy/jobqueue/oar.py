"""OAR: `oarsub -S`, `oarstat -J`, `oardel`, and `OARCluster`.

OAR reads `#OAR` directives from an executable script (`oarsub -S`). The
resources and the walltime go in one `-l` line; dask-jobqueue's
our `oar_resource_properties` becomes `-p` (an SQL filter on resource
properties), and dask-jobqueue's `memory_per_core_property_name` adds a
`memcore>=N` filter (MiB per core) so a job lands where its memory fits, since
OAR has no memory request; "not_applicable" (dask-jobqueue's word for a site
without such a property) or None adds none.
"""
from __future__ import annotations

import json

from taskcore.deploy.jobqueue.cluster import JobQueueCluster
from taskcore.deploy.jobqueue.system import BatchSystem

__all__ = ["OAR", "OARCluster"]

_PENDING = frozenset({"Waiting", "Hold", "toLaunch", "toAckReservation", "Launching"})
_RUNNING = frozenset({"Running", "Suspended", "Resuming", "Finishing", "toError"})


class OAR(BatchSystem):
    name = "OAR"
    directive_prefix = "#OAR"
    submit_command = "oarsub"
    cancel_command = "oardel"
    job_id_pattern = r"OAR_JOB_ID=(\d+)"
    pending_states = _PENDING
    running_states = _RUNNING
    done_states = frozenset({"Terminated"})  # Error: failed
    job_options = {"oar_resource_properties": None, "memory_per_core_property_name": None}
    header_template = "\n".join([
        "#OAR -n {job_name}",
        "#OAR -q {queue}",
        "#OAR --project {account}",
        "#OAR -l {resources}",
        "#OAR -p {properties}",
    ])
    log_template = "#OAR -O {log_directory}/{job_name}-%jobid%.out\n" \
                   "#OAR -E {log_directory}/{job_name}-%jobid%.out"

    def fields(self, script):
        if script.gpus:
            # OAR's hierarchy nests: cores are counted per GPU.
            per_gpu = -(-int(script.job_cpu) // script.gpus)
            resources = f"/nodes=1/gpu={script.gpus}/core={per_gpu}"
        else:
            resources = f"/nodes=1/core={script.job_cpu}"
        if script.walltime_seconds is not None:
            resources += f",walltime={self.format_walltime(script.walltime_seconds)}"
        props = script.system_options.get("oar_resource_properties")
        mem_prop = script.system_options.get("memory_per_core_property_name")
        if mem_prop and mem_prop != "not_applicable":
            per_core = -(-script.memory // 2**20 // max(1, int(script.job_cpu)))
            cond = f"{mem_prop}>={per_core}"
            props = f"({props}) AND {cond}" if props else cond
        # Unquoted: OAR takes a directive's value to the end of the line, quotes included.
        return {"resources": resources, "properties": props or None}

    keeps_script = True  # oarsub -S records the path; the node runs that file at start
    script_mode = 0o755

    def submit_argv(self, script_path):
        return ["oarsub", *self.submit_options, "-S", script_path]

    def status_argv(self, job_ids):
        return ["oarstat", "-J", "-u", self.user()]

    def parse_status(self, out):
        if not out.strip():
            return {}
        data = json.loads(out)
        seen = {}
        for job_id, job in (data.items() if isinstance(data, dict) else ()):
            native = job.get("state", "")
            state = self.state_of(native)
            seen[str(job_id)] = (state, native, job.get("message") or None)
        return seen


class OARCluster(JobQueueCluster):
    """Workers as OAR jobs (dask-jobqueue's OARCluster parameters)."""

    backend = "oar"
    system_class = OAR
    config_name = "oar"
