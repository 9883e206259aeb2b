"""HTCondor: a submit description (not a shell script), `condor_q -json`, and `HTCondorCluster`.

HTCondor runs an executable with arguments, described by a submit file. The
job's shell lines (the prologue, then `exec` of the worker) become one `sh -c`
argument in HTCondor's quoting (double quotes around the arguments; single
quotes around one argument; a literal `'` or `"` doubled), so prologue lines
are joined with `; ` (write each as one shell command). `getenv = True` gives
the job the submitter's environment, as sbatch does by default.

dask-jobqueue's HTCondor parameters: `disk` (request_disk, required there,
default 1 GiB here), `submit_command_extra` and `cancel_command_extra` (extra
arguments for condor_submit / condor_rm, for example `["-name", "schedd"]`).
`job_extra_directives` are submit-file lines (`"+MyAttr = 1"`, or a dict).
A walltime becomes `allowed_job_duration`, and the workers' lifetimes follow it.
Jobs leave the queue when they end; a held job (an error) counts as failed and
is removed, so it cannot linger in the queue.
"""
from __future__ import annotations

import json
import shlex

from taskcore.deploy.jobqueue.cluster import JobQueueCluster
from taskcore.deploy.jobqueue.system import BatchSystem
from taskcore.utils import parse_bytes

__all__ = ["HTCondor", "HTCondorCluster", "condor_argument"]

_STATUS_NAMES = {1: "Idle", 2: "Running", 3: "Removed", 4: "Completed", 5: "Held",
                 6: "TransferringOutput", 7: "Suspended"}  # JobStatus codes


def condor_argument(text: str) -> str:
    """One argument in HTCondor's new argument syntax (inside the surrounding quotes)."""
    return "'" + text.replace("'", "''").replace('"', '""') + "'"


class HTCondor(BatchSystem):
    name = "HTCondor"
    pending_states = frozenset({"Idle"})
    running_states = frozenset({"Running", "TransferringOutput", "Suspended"})
    done_states = frozenset({"Completed"})  # Removed, Held (an error): failed
    directive_prefix = ""
    submit_command = "condor_submit"
    cancel_command = "condor_rm"
    job_id_pattern = r"submitted to cluster (\d+)"
    job_options = {"disk": "1GiB", "submit_command_extra": (), "cancel_command_extra": ()}
    lingering_states = frozenset({"Held"})
    header_template = "\n".join([
        "universe = vanilla",
        "batch_name = {job_name}",
        "accounting_group = {account}",
        "request_cpus = {job_cpu}",
        "request_memory = {request_memory}",
        "request_disk = {request_disk}",
        "request_gpus = {gpus}",
        "allowed_job_duration = {walltime}",
        "getenv = True",
    ])
    log_template = "\n".join([
        "output = {log_directory}/{job_name}-$(ClusterId).out",
        "error = {log_directory}/{job_name}-$(ClusterId).out",
        "log = {log_directory}/{job_name}-$(ClusterId).log",
    ])

    def __init__(self, *args, submit_command_extra=(), cancel_command_extra=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.submit_command_extra = [str(a) for a in submit_command_extra or ()]
        self.cancel_command_extra = [str(a) for a in cancel_command_extra or ()]

    def record(self):
        return dict(super().record(), submit_command_extra=self.submit_command_extra,
                    cancel_command_extra=self.cancel_command_extra)

    def fields(self, script):
        return {"request_memory": -(-script.memory // 2**20),  # MiB
                "request_disk": -(-parse_bytes(script.system_options.get("disk") or 0)
                                  // 2**10)}  # KiB

    def format_walltime(self, seconds):
        return str(int(-(-seconds // 1)))  # allowed_job_duration is in seconds

    def render(self, script, command):
        from taskcore.deploy.jobqueue.job import _shell_word

        # One `eval` per prologue line, so a comment or a trailing `&` stays in its line.
        # The submit file's arguments are one line: a line break cannot be written there.
        for text in [*script.job_script_prologue, *map(str, command)]:
            if "\n" in text or "\r" in text:
                raise ValueError(f"HTCondor: a job_script_prologue line or a worker argument "
                                 f"cannot hold a line break: {text!r}")
        lines = [f"eval {shlex.quote(line)}" for line in script.job_script_prologue]
        shell = "; ".join(lines + ["exec " + " ".join(_shell_word(str(a)) for a in command)])
        # condor_submit expands $(macro) anywhere in the file; $(DOLLAR) is a literal $.
        shell = shell.replace("$", "$(DOLLAR)")
        return "\n".join(script.header() + [
            "executable = /bin/sh",
            f'arguments = "-c {condor_argument(shell)}"',
            "queue",
        ]) + "\n"

    def submit_argv(self, script_path):
        return ["condor_submit", *self.submit_command_extra, *self.submit_options, script_path]

    def test_argv(self, script_path):
        return ["condor_submit", *self.submit_command_extra, *self.submit_options,
                "-dry-run", "/dev/null", script_path]

    def cancel_argv(self, job_ids):
        return ["condor_rm", *self.cancel_command_extra, *job_ids]

    def status_argv(self, job_ids):
        # Only the schedd/pool choice of the submit options applies to condor_q.
        where = []
        extra = self.submit_command_extra
        for i, a in enumerate(extra[:-1]):
            if a in ("-name", "-pool"):
                where += [a, extra[i + 1]]
        return ["condor_q", *where, "-json", "-attributes",
                "ClusterId,ProcId,JobStatus,HoldReason", *job_ids]

    def parse_status(self, out):
        if not out.strip():
            return {}  # condor_q -json prints nothing when no job matches
        seen = {}
        for ad in json.loads(out):
            native = _STATUS_NAMES.get(ad.get("JobStatus"), "Unknown")
            state = self.state_of(native)
            seen[str(ad.get("ClusterId"))] = (state, native, ad.get("HoldReason"))
        return seen


class HTCondorCluster(JobQueueCluster):
    """Workers as HTCondor jobs (dask-jobqueue's HTCondorCluster parameters)."""

    backend = "htcondor"
    system_class = HTCondor
    config_name = "htcondor"

    def _make_system(self, opts):
        return self.system_class(submit_command_extra=opts.get("submit_command_extra"),
                                 cancel_command_extra=opts.get("cancel_command_extra"),
                                 **self._system_kwargs(opts))
