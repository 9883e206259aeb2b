"""SLURM: the batch system (sbatch, squeue, scancel) and `SLURMCluster`.

Everything SLURM-specific lives here: the header of a job script, how to read
a job id and job states, and SLURM's state names mapped to ours. The cluster
itself is the generic JobQueueCluster (deploy/jobqueue/cluster.py).
"""
from __future__ import annotations


from taskcore.deploy.jobqueue.cluster import JobQueueCluster
from taskcore.deploy.jobqueue.system import BatchSystem

__all__ = ["SLURM", "SLURMCluster"]

_PENDING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
            "RESV_DEL_HOLD", "POWER_UP_NODE"})
_RUNNING = frozenset({"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING", "SUSPENDED",
            "STOPPED"})


class SLURM(BatchSystem):
    name = "SLURM"
    directive_prefix = "#SBATCH"
    submit_command = "sbatch"
    cancel_command = "scancel"
    # `--parsable` prints "ID" or "ID;CLUSTER"; a site's sbatch wrapper may still print
    # the plain "Submitted batch job ID".
    job_id_pattern = r"^\s*(?:Submitted batch job )?(\d+)\s*(?:;.*)?$"
    pending_states = _PENDING
    running_states = _RUNNING
    done_states = frozenset({"COMPLETED"})  # others: CANCELLED, FAILED, TIMEOUT, NODE_FAIL...
    header_template = "\n".join([
        "#SBATCH -J {job_name}",
        "#SBATCH -p {queue}",
        "#SBATCH -A {account}",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task={job_cpu}",
        "#SBATCH --mem={job_mem}",
        "#SBATCH --gres=gpu:{gpus}",
        "#SBATCH -t {walltime}",
    ])
    log_template = "#SBATCH -o {log_directory}/{job_name}-%j.out"

    def submit_argv(self, script_path):
        return ["sbatch", "--parsable", *self.submit_options, script_path]

    def test_argv(self, script_path):
        return ["sbatch", "--test-only", *self.submit_options, script_path]

    def status_argv(self, job_ids):
        # All of the user's jobs in every state, filtered here: `--jobs` with an id that
        # SLURM has already purged fails the whole call.
        return ["squeue", "--noheader", "--states=all", f"--user={self.user()}",
                "--format=%i|%T|%r"]

    def parse_status(self, out):
        seen = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 2:
                continue
            job_id, native = parts[0], parts[1]
            reason = parts[2] if len(parts) > 2 and parts[2] not in ("None", "") else None
            state = self.state_of(native)
            seen[job_id] = (state, native, reason)
        return seen


class SLURMCluster(JobQueueCluster):
    """A cluster whose workers (and optionally scheduler) are SLURM jobs.

    dask-jobqueue's parameters, same names and meanings; see JobQueueCluster.
    """

    backend = "slurm"
    system_class = SLURM
    config_name = "slurm"
