"""Flux: `flux batch` with `#flux:` directives, `flux jobs`, `flux cancel`, and `FluxCluster`.

A job is a batch script with `#flux:` directive lines (the options of `flux
batch`). Job ids are printed in Flux's F58 form (`ƒ2Bx3...`), and `flux jobs`
is asked for the same form, so they are compared as printed. `flux batch
--dry-run` checks a script without submitting it.
"""
from __future__ import annotations


from taskcore.deploy.jobqueue.cluster import JobQueueCluster
from taskcore.deploy.jobqueue.system import BatchSystem

__all__ = ["Flux", "FluxCluster"]

class Flux(BatchSystem):
    name = "Flux"
    pending_states = frozenset({"NEW", "DEPEND", "PRIORITY", "SCHED"})
    running_states = frozenset({"RUN", "CLEANUP"})
    done_states = frozenset({"COMPLETED"})  # an INACTIVE job's result; FAILED, CANCELED...
    directive_prefix = "#flux:"
    submit_command = "flux"
    cancel_command = "flux"
    job_id_pattern = r"^\s*([ƒf][1-9A-HJ-NP-Za-km-z]+|\d+)\s*$"  # F58, or decimal
    submit_label = "flux batch"
    header_template = "\n".join([
        "#flux: --job-name={job_name}",
        "#flux: --queue={queue}",
        "#flux: --bank={account}",
        "#flux: -N 1",
        "#flux: -n 1",
        "#flux: -c {job_cpu}",
        "#flux: -g {gpus}",
        "#flux: -t {walltime}",
    ])
    log_template = "#flux: --output={log_directory}/{job_name}-{{{{id}}}}.out"

    def format_walltime(self, seconds):
        return f"{int(-(-seconds // 1))}s"  # Flux Standard Duration

    def submit_argv(self, script_path):
        return ["flux", "batch", *self.submit_options, script_path]

    def test_argv(self, script_path):
        return ["flux", "batch", "--dry-run", *self.submit_options, script_path]

    def cancel_argv(self, job_ids):
        return ["flux", "cancel", *job_ids]

    def status_argv(self, job_ids):
        return ["flux", "jobs", "-a", "-n", "--format={id.f58} {state} {result}",
                *job_ids]

    def parse_status(self, out):
        seen = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            job_id, native = parts[0], parts[1]
            result = parts[2] if len(parts) > 2 else ""
            # An inactive job is what its result says.
            state = self.state_of(result if native == "INACTIVE" else native)
            seen[job_id] = (state, result or native, None)
        return seen


class FluxCluster(JobQueueCluster):
    """Workers as Flux jobs (`flux batch`)."""

    backend = "flux"
    system_class = Flux
    config_name = "flux"
