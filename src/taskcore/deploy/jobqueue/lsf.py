"""IBM Spectrum LSF: `bsub < script`, `bjobs -json`, `bkill`, and `LSFCluster`.

dask-jobqueue's LSF parameters: `use_stdin` (submit with `bsub < script`,
which is how bsub reads `#BSUB` directives; default True) and `lsf_units`
(the unit of `-M`, the site's LSF_UNIT_FOR_LIMITS; default "KB").
"""
from __future__ import annotations

import json
import re

from taskcore.deploy.jobqueue.cluster import JobQueueCluster
from taskcore.deploy.jobqueue.system import BatchSystem

__all__ = ["LSF", "LSFCluster"]

_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "PB": 2**50, "EB": 2**60}
_PENDING = frozenset({"PEND", "PSUSP", "WAIT", "PROV"})
_RUNNING = frozenset({"RUN", "USUSP", "SSUSP", "UNKWN", "ZOMBI"})


class LSF(BatchSystem):
    name = "LSF"
    directive_prefix = "#BSUB"
    submit_command = "bsub"
    cancel_command = "bkill"
    job_id_pattern = r"Job <(\d+)> is submitted"
    pending_states = _PENDING
    running_states = _RUNNING
    done_states = frozenset({"DONE"})  # EXIT: failed
    job_options = {"use_stdin": True, "lsf_units": "KB"}
    header_template = "\n".join([
        "#BSUB -J {job_name}",
        "#BSUB -q {queue}",
        "#BSUB -P {account}",
        "#BSUB -n {job_cpu}",
        '#BSUB -R "span[hosts=1]"',
        "#BSUB -M {memory_limit}",
        "#BSUB -W {walltime}",
        '#BSUB -gpu "num={gpus}"',
    ])
    log_template = "#BSUB -o {log_directory}/{job_name}-%J.out"

    def __init__(self, *args, use_stdin: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.script_on_stdin = use_stdin
        # `bsub FILE` runs that file when the job starts (and reads its #BSUB lines only
        # where the site sets LSB_BSUB_PARSE_SCRIPT=Y): keep it until the job ends.
        self.keeps_script = not use_stdin
        self.script_mode = 0o644 if use_stdin else 0o755

    def record(self):
        return dict(super().record(), use_stdin=self.script_on_stdin)

    def fields(self, script):
        units = str(script.system_options.get("lsf_units") or "KB").upper()
        if units in ("K", "M", "G", "T", "P", "E"):
            units += "B"
        if units not in _UNITS:
            raise ValueError(f"lsf_units must be one of {sorted(_UNITS)}, not {units!r}")
        return {"memory_limit": -(-script.memory // _UNITS[units])}

    def parse_walltime(self, value):
        # bsub -W (and dask-jobqueue's LSF walltime) is [hours:]minutes: "01:30" is 90 min.
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(:\d+)?\s*", value):
            hours, _, minutes = value.strip().rpartition(":")
            return float(int(hours or 0) * 3600 + int(minutes) * 60)
        return super().parse_walltime(value)

    def format_walltime(self, seconds):
        minutes = int(-(-seconds // 60))  # bsub -W is [hours:]minutes
        return f"{minutes // 60:02d}:{minutes % 60:02d}"

    def submit_argv(self, script_path):
        if self.script_on_stdin:
            return ["bsub", *self.submit_options]
        return ["bsub", *self.submit_options, script_path]

    def status_argv(self, job_ids):
        return ["bjobs", "-a", "-o", "jobid stat exit_reason", "-json", *job_ids]

    def status_accepts(self, returncode, out, err):
        # bjobs exits non-zero when one id is unknown ("Job <N> is not found"); the JSON
        # still holds the others, and the unknown ones carry an ERROR.
        return out.lstrip().startswith("{")

    def parse_status(self, out):
        if not out.strip():
            return {}
        seen = {}
        for rec in json.loads(out).get("RECORDS") or []:
            job_id = str(rec.get("JOBID", ""))
            if rec.get("ERROR") or not job_id:
                continue  # not found: not listed, so it counts as gone
            native = rec.get("STAT", "")
            state = self.state_of(native)
            seen[job_id] = (state, native, rec.get("EXIT_REASON") or None)
        return seen


class LSFCluster(JobQueueCluster):
    """Workers as LSF jobs (dask-jobqueue's LSFCluster parameters)."""

    backend = "lsf"
    system_class = LSF
    config_name = "lsf"

    def _make_system(self, opts):
        return self.system_class(use_stdin=bool(opts.get("use_stdin", True)),
                                 **self._system_kwargs(opts))
