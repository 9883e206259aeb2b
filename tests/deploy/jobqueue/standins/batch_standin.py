#!/usr/bin/env python3
"""A stand-in for the batch systems taskcore drives but cannot install here.

ONE program (standard library only) that plays, by the name it is called under, the
user commands of:

    family    commands
    pbs       qsub, qstat, qdel                   (PBS Professional / OpenPBS 2022+)
    torque    qsub, qstat, qdel                   (Torque 6)
    moab      msub, canceljob, showq              (Moab over Torque; qsub/qstat/qdel too)
    lsf       bsub, bjobs, bkill                  (IBM Spectrum LSF 10.1)
    htcondor  condor_submit, condor_q, condor_rm  (HTCondor 10+)
    flux      flux batch | jobs | cancel          (flux-core 0.50+)

The tool is `$TASKCORE_STANDIN_TOOL` (set by the wrappers tests/deploy/jobqueue/standins/
server.py writes) or else basename(argv[0]); the family is `$TASKCORE_STANDIN_FAMILY`;
the state lives in `$TASKCORE_STANDIN_DIR`: one JSON file per job under jobs/, a
counter file, spooled scripts and output under spool/, and a `lock` file. Every
command holds an exclusive flock(2) on that lock for its whole run, so the state only
changes under the lock.

The site it plays
-----------------
One execution host ("standin-node") with 8 CPUs; queues (LSF/PBS queues, Moab classes,
Flux named queues) "batch" (the default) and "bigmem". HTCondor has no queues. Memory
is accounted nowhere (as on most sites' default configuration): only CPUs make a job
wait. A job that does not fit waits in the queued state; one that can never fit waits
for ever (PBS "Can Never Run" comment, LSF PEND, HTCondor idle), except Torque, which
refuses it at submission, and Flux, whose scheduler raises an `alloc` exception.

How a job runs
--------------
Every command first runs a scheduling pass (under the lock): queued jobs that fit are
given to a detached *shepherd* (this program, `--shepherd DIR SEQ`, started in a new
session and double-forked, so the command returns at once). The shepherd waits
START_DELAY (0.3 s: a job is seen queued first, as on a real system), starts the job in
its own process group, enforces the walltime (SIGTERM to the group, SIGKILL
KILL_DELAY later), and on cancellation does the same; at the end it kills what is left
of the group, delivers the output as the real system does, records the end and runs a
scheduling pass (so queued jobs start without anyone polling).

    PBS/Torque/Moab  script run with its #! line in $HOME (Torque: -d/-w), environment
                     PBS_O_*, PBS_JOBID... only, plus the submitter's with -V or -v;
                     output spooled and copied at the end to -o/-e (a directory gets
                     <jobname>.o<seq>), -j oe joins; walltime kill writes "=>> PBS: job
                     killed: walltime N exceeded limit M" to the job's error stream.
    LSF              script from stdin (`bsub < script`, #BSUB lines parsed) or a
                     command line (run with /bin/sh -c, #BSUB in a script file NOT
                     parsed: LSB_BSUB_PARSE_SCRIPT=N, the default); submission cwd and
                     environment; -o/-oo (%J, %I) written at the end with the LSF job
                     report before the output.
    HTCondor         the executable with its arguments (new syntax), cwd = initialdir,
                     environment only with getenv; output/error written as the job
                     runs; the user log gets submit/execute/terminate/hold/abort events;
                     allowed_job_duration exceeded, or an executable that cannot be
                     run, puts the job on hold (it stays in the queue until condor_rm).
    Flux             the batch script (must start with #!) in the submission cwd with
                     the submitter's environment; --output ({{id}}) written as it runs.

Finished jobs stay visible for HISTORY seconds (PBS -x history F, Torque C, LSF
DONE/EXIT with -a); Moab and HTCondor drop them at once; Flux keeps inactive jobs.

Knobs (environment): TASKCORE_STANDIN_HISTORY (60), TASKCORE_STANDIN_START_DELAY (0.3),
TASKCORE_STANDIN_KILL_DELAY (2), TASKCORE_STANDIN_WALLTIME_SCALE (1: multiply walltimes
when enforcing them, e.g. 0.02 to run LSF's minute granularity in seconds).

Where the real tool's exact words were not found in its documentation or source, the
text here is marked APPROXIMATE next to it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import shlex
import signal
import sys
import time

# subprocess, shutil and getopt are imported where used: every status poll starts this
# program, so it starts lean.

FAMILIES = {
    "pbs": ("qsub", "qstat", "qdel"),
    "torque": ("qsub", "qstat", "qdel"),
    "moab": ("msub", "canceljob", "showq", "qsub", "qstat", "qdel"),
    "lsf": ("bsub", "bjobs", "bkill"),
    "htcondor": ("condor_submit", "condor_q", "condor_rm"),
    "flux": ("flux",),
}
QUEUES = ("batch", "bigmem")
DEFAULT_QUEUE = "batch"
TOTAL_CPUS = 8
NODE = "standin-node"
PBS_SERVER = "standin-server"      # PBS Pro job ids: N.standin-server
TORQUE_SERVER = "standin"          # Torque job ids: N.standin
LSF_CLUSTER = "standin"
SCHEDD = "standin-schedd"


def _env_float(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return float(default)


HISTORY = _env_float("TASKCORE_STANDIN_HISTORY", 60)
START_DELAY = _env_float("TASKCORE_STANDIN_START_DELAY", 0.3)
KILL_DELAY = _env_float("TASKCORE_STANDIN_KILL_DELAY", 2.0)
WALLTIME_SCALE = _env_float("TASKCORE_STANDIN_WALLTIME_SCALE", 1.0)

# Variables of this machinery that must not reach a job's environment.
PRIVATE_ENV = ("TASKCORE_STANDIN_TOOL",)


class ToolExit(Exception):
    """Stop the tool: `message` to stderr (or stdout), exit status `code`."""

    def __init__(self, message="", code=1, stdout=False):
        super().__init__(message)
        self.message = message
        self.code = code
        self.stdout = stdout


def user_name():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def user_home():
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return os.environ.get("HOME", "/")


def user_shell():
    try:
        return pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    except KeyError:
        return "/bin/sh"


def ctime(t):
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(t))


def hms(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def proc_token(pid):
    """The start time of process `pid` (a token against pid reuse); None if gone/zombie."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    rest = data[data.rindex(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    return rest[19]


def kill_group(pgid, token, sig):
    """Signal a job's process group, unless its leader's pid was reused by someone else."""
    if not pgid:
        return
    current = proc_token(pgid)
    if current is not None and token is not None and current != token:
        return
    try:
        os.killpg(int(pgid), sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_process(pid, token, sig):
    if pid and token is not None and proc_token(pid) == token:
        try:
            os.kill(int(pid), sig)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------

class Store:
    """The state directory; use every method under `lock()`."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.jobs_dir = os.path.join(self.root, "jobs")
        self.spool = os.path.join(self.root, "spool")
        os.makedirs(self.jobs_dir, exist_ok=True)
        os.makedirs(self.spool, exist_ok=True)

    @contextlib.contextmanager
    def lock(self):
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _meta_path(self):
        return os.path.join(self.root, "server.json")

    def meta(self):
        try:
            with open(self._meta_path()) as f:
                return json.load(f)
        except (OSError, ValueError):
            meta = {"next_seq": 1, "next_cluster": 1, "epoch": time.time()}
            self.put_meta(meta)
            return meta

    def put_meta(self, meta):
        _write_json(self._meta_path(), meta)

    def new_seq(self, counter="next_seq"):
        meta = self.meta()
        seq = meta.get(counter, 1)
        meta[counter] = seq + 1
        self.put_meta(meta)
        return seq

    def peek(self, counter="next_seq"):
        return self.meta().get(counter, 1)

    def path(self, seq):
        return os.path.join(self.jobs_dir, f"{int(seq):08d}.json")

    def get(self, seq):
        with open(self.path(seq)) as f:
            return json.load(f)

    def put(self, job):
        _write_json(self.path(job["seq"]), job)

    def jobs(self):
        out = []
        for name in sorted(os.listdir(self.jobs_dir)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self.jobs_dir, name)) as f:
                        out.append(json.load(f))
                except (OSError, ValueError):
                    continue
        return out


def _write_json(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Job ids
# ---------------------------------------------------------------------------------------------

F58_DIGITS = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def f58_prefix():
    """Flux prints ƒ when the locale is UTF-8 (and FLUX_F58_FORCE_ASCII is unset), else f."""
    if os.environ.get("FLUX_F58_FORCE_ASCII"):
        return "f"
    import locale

    try:
        locale.setlocale(locale.LC_CTYPE, "")
        if locale.nl_langinfo(locale.CODESET).upper().replace("-", "") == "UTF8":
            return "\u0192"
    except (locale.Error, AttributeError):
        pass
    return "f"


def f58_encode(n, prefix=None):
    """Flux's F58 (fluid.c): base58 of the 64-bit id, most significant digit first."""
    prefix = f58_prefix() if prefix is None else prefix
    if n == 0:
        return prefix + F58_DIGITS[0]
    digits = []
    while n > 0:
        n, rem = divmod(n, 58)
        digits.append(F58_DIGITS[rem])
    return prefix + "".join(reversed(digits))


def flux_decode(text):
    """A Flux job id in any form `flux` accepts here: F58 (ƒ or f), decimal, 0x hex."""
    text = text.strip()
    if text[:1] in ("\u0192", "f") and len(text) > 1 and all(c in F58_DIGITS for c in text[1:]):
        n = 0
        for c in text[1:]:
            n = n * 58 + F58_DIGITS.index(c)
        return n
    if re.fullmatch(r"\d+", text):
        return int(text)
    if re.fullmatch(r"0x[0-9a-fA-F]+", text):
        return int(text, 16)
    raise ValueError(text)


def job_id(job):
    family = job["family"]
    if family == "pbs":
        return f"{job['seq']}.{PBS_SERVER}"
    if family == "torque" or (family == "moab" and job.get("via") == "qsub"):
        return f"{job['seq']}.{TORQUE_SERVER}"
    if family == "htcondor":
        return str(job["cluster"]) if job["proc"] == 0 else f"{job['cluster']}.{job['proc']}"
    if family == "flux":
        return f58_encode(job["fluid"])
    return str(job["seq"])


# ---------------------------------------------------------------------------------------------
# Generic job lifecycle: queued -> (allocated) -> running [stopping] -> ended | held (HTCondor)
# ---------------------------------------------------------------------------------------------

def new_job(store, family, **fields):
    now = time.time()
    job = {"seq": store.new_seq(), "family": family, "state": "queued", "allocated": False,
           "submit_time": now, "user": user_name(), "queue": DEFAULT_QUEUE, "cpus": 1,
           "walltime": None, "name": "job", "hold": False, "stopping": None,
           "start_time": None, "end_time": None, "exit_code": None, "end_reason": None,
           "purged": False, "never_runs": False}
    job.update(fields)
    return job


def listed(job):
    return not job.get("purged")


def active(job):
    return job["state"] in ("queued", "running", "held")


def schedule(store):
    """Reap lost shepherds, purge old history, start the queued jobs that fit."""
    now = time.time()
    jobs = store.jobs()
    for job in jobs:
        if job["state"] in ("queued", "running") and job.get("allocated"):
            pid = job.get("shepherd_pid")
            if pid:
                alive = proc_token(pid) == job.get("shepherd_token")
            else:
                alive = now - job.get("allocated_at", now) < 30
            if not alive:
                kill_group(job.get("pgid"), job.get("pgid_token"), signal.SIGKILL)
                job["state"] = "ended"
                job["end_time"] = now
                job["end_reason"] = job.get("stopping") or "lost"
                store.put(job)
        if (job["state"] == "ended" and not job.get("purged") and job["family"] != "flux"
                and now - (job.get("end_time") or now) > HISTORY):
            job["purged"] = True
            store.put(job)
    used = sum(j["cpus"] for j in jobs
               if j["state"] == "running" or (j["state"] == "queued" and j.get("allocated")))
    for job in jobs:
        if job["state"] != "queued" or job.get("allocated") or job.get("hold"):
            continue
        if job["cpus"] <= TOTAL_CPUS - used:
            used += job["cpus"]
            job["allocated"] = True
            job["allocated_at"] = now
            store.put(job)
            spawn_shepherd(store, job["seq"])


def spawn_shepherd(store, seq):
    import subprocess

    log = open(os.path.join(store.spool, f"{seq}.shepherd.log"), "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--shepherd", store.root, str(seq)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
            start_new_session=True, cwd=store.root)
    finally:
        log.close()
    proc.wait()  # the intermediate process exits as soon as it has forked the shepherd


def request_stop(store, job, reason="cancel"):
    """Cancel a job: a queued one ends now; a running one is stopped by its shepherd."""
    if job["state"] == "queued":
        job["state"] = "ended"
        job["end_time"] = time.time()
        job["end_reason"] = reason
        store.put(job)
        if job["family"] == "htcondor":
            condor_log(job, "009", "Job was aborted.\n\tvia condor_rm (by user %s)" % job["user"])
        return
    if job["state"] == "running" and not job.get("stopping"):
        job["stopping"] = reason
        store.put(job)
        signal_process(job.get("shepherd_pid"), job.get("shepherd_token"), signal.SIGUSR1)


def shepherd(root, seq):
    """Run job `seq` to its end (see the module doc)."""
    if os.fork() > 0:
        os._exit(0)
    store = Store(root)
    me = os.getpid()
    flags = {"check": False}
    signal.signal(signal.SIGUSR1, lambda *_: flags.__setitem__("check", True))
    with store.lock():
        job = store.get(seq)
        job["shepherd_pid"] = me
        job["shepherd_token"] = proc_token(me)
        store.put(job)
    time.sleep(START_DELAY)
    files = []
    with store.lock():
        job = store.get(seq)
        if job["state"] != "queued":
            return
        run = job["run"]
        try:
            proc, files = launch(run)
        except OSError as e:
            finalize(store, job, None, None, exec_error=e)
            store.put(job)
            schedule(store)
            return
        now = time.time()
        job.update(state="running", start_time=now, pgid=proc.pid, pgid_token=proc_token(proc.pid))
        store.put(job)
        if job["family"] == "htcondor":
            condor_log(job, "001", f"Job executing on host: <127.0.0.1:9618?addrs=127.0.0.1-9618"
                                   f"&alias={NODE}>")
    start = job["start_time"]
    limit = job.get("walltime")
    deadline = start + limit * WALLTIME_SCALE if limit else None
    stopping = None
    kill_at = None
    last_check = time.monotonic()
    while True:
        rc = proc.poll()
        if rc is not None:
            break
        now = time.time()
        if flags["check"] or time.monotonic() - last_check > 0.5:
            flags["check"] = False
            last_check = time.monotonic()
            with store.lock():
                wanted = store.get(seq).get("stopping")
            if wanted and stopping is None:
                stopping = wanted
                kill_group(job["pgid"], job["pgid_token"], signal.SIGTERM)
                kill_at = time.monotonic() + KILL_DELAY
        if deadline is not None and now >= deadline and stopping is None:
            stopping = "walltime"
            with store.lock():
                j = store.get(seq)
                j["stopping"] = "walltime"
                store.put(j)
            kill_group(job["pgid"], job["pgid_token"], signal.SIGTERM)
            kill_at = time.monotonic() + KILL_DELAY
        if kill_at is not None and time.monotonic() >= kill_at:
            kill_group(job["pgid"], job["pgid_token"], signal.SIGKILL)
            kill_at = None
        time.sleep(0.05)
    # The batch system cleans up whatever the job left running in its process group.
    try:
        os.killpg(job["pgid"], signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for f in files:
        f.close()
    with store.lock():
        job = store.get(seq)
        finalize(store, job, rc, stopping or job.get("stopping"))
        store.put(job)
        schedule(store)


def launch(run):
    import subprocess

    files = []
    out = open(run["stdout"], "ab" if run.get("append_out") else "wb")
    files.append(out)
    if run.get("stderr"):
        err = open(run["stderr"], "ab" if run.get("append_err") else "wb")
        files.append(err)
    else:
        err = subprocess.STDOUT
    try:
        proc = subprocess.Popen(run["argv"], cwd=run["cwd"], env=run["env"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                close_fds=True, start_new_session=True)
    except OSError:
        for f in files:
            f.close()
        raise
    return proc, files


def finalize(store, job, rc, stopping, exec_error=None):
    now = time.time()
    job["end_time"] = now
    job["exit_code"] = rc
    job["end_reason"] = stopping or ("exec_failed" if exec_error is not None else None)
    family = job["family"]
    job["state"] = "ended"
    if family in ("pbs", "torque", "moab"):
        pbs_deliver(store, job, stopping, exec_error)
    elif family == "lsf":
        lsf_deliver(store, job, exec_error)
    elif family == "htcondor":
        condor_finalize(job, rc, stopping, exec_error)
    elif family == "flux" and exec_error is not None:
        _append(job["run"]["stdout"], f"flux-shell[0]: FATAL: task 0: start failed: "
                                      f"{job['run']['argv'][0]}: {exec_error.strerror}\n")


def _append(path, text):
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError:
        pass


def job_env(base, extra):
    env = {k: v for k, v in base.items() if k not in PRIVATE_ENV}
    env.update(extra)
    return env


def spool_script(store, seq, text):
    path = os.path.join(store.spool, f"{seq}.SC")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o700)
    return path


def script_argv(path, text, shell=None):
    """How a job script runs: by its #! line, else by `shell` (a login shell)."""
    if text.startswith("#!"):
        return [path]
    return [shell or user_shell(), path]


# ---------------------------------------------------------------------------------------------
# Option parsing helpers
# ---------------------------------------------------------------------------------------------

def glibc_getopt(prog, args, optstring):
    """getopt(3) as the C tools use it, with glibc's error messages."""
    import getopt

    try:
        return getopt.getopt(args, optstring)
    except getopt.GetoptError as e:
        opt = e.opt
        if "requires argument" in e.msg:
            raise ToolExit(f"{prog}: option requires an argument -- '{opt}'", 2)
        raise ToolExit(f"{prog}: invalid option -- '{opt}'", 2)


def parse_size(text):
    """PBS size: integer with b/kb/mb/gb/tb/pb (or w units); bytes, or None if invalid."""
    m = re.fullmatch(r"(\d+)([kmgtp]?)(b|w)?", text.strip().lower())
    if not m:
        return None
    n = int(m.group(1)) * 1024 ** " kmgtp".index(m.group(2) or " ")
    return n * (8 if m.group(3) == "w" else 1)


def parse_pbs_duration(text):
    """[[HH:]MM:]SS[.S] or seconds, as PBS walltime; None if invalid."""
    m = re.fullmatch(r"(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d*)?)", text.strip())
    if not m:
        return None
    h, mnt, s = m.groups()
    return int(h or 0) * 3600 + int(mnt or 0) * 60 + float(s)


# ---------------------------------------------------------------------------------------------
# PBS Professional, Torque, Moab
# ---------------------------------------------------------------------------------------------

PBS_OPTS = "a:A:c:C:e:fhIj:J:k:l:m:M:N:o:p:P:q:r:R:S:u:v:VW:Xz"
TORQUE_OPTS = "a:A:b:c:C:d:D:e:fF:hIj:k:K:l:L:m:M:nN:o:p:P:q:r:S:t:T:u:v:Vw:W:xXz"
PBS_RESOURCES = {"select", "place", "walltime", "ncpus", "mem", "vmem", "nodes", "host",
                 "arch", "mpiprocs", "ompthreads", "ngpus", "naccelerators", "cput", "pcput",
                 "pmem", "pvmem", "file", "software", "nice", "min_walltime", "max_walltime",
                 "preempt_targets", "vnode", "nodect", "scratch", "accelerator_model"}
TORQUE_RESOURCES = {"nodes", "ppn", "procs", "mem", "pmem", "vmem", "pvmem", "walltime", "cput",
                    "pcput", "ncpus", "file", "host", "arch", "nice", "gres", "feature",
                    "naccesspolicy", "software", "epilogue", "prologue", "other", "signal",
                    "tpn", "trl", "size", "qos", "gpus", "mppwidth", "partition",
                    "mppnppn", "neednodes", "nodeset", "opsys", "place"}


def pbs_errno_exit(errno_):
    return errno_ & 0xFF


PBSE_UNKJOBID = 15001
PBSE_BADATVAL = 15014
PBSE_UNKQUE = 15018
PBSE_UNKRESC = 15035
PBSE_HISTJOBID = 15139


class PBSRequest:
    """The attributes of one submission, from directives then the command line."""

    def __init__(self):
        self.opts = {}          # option letter -> value (last wins)
        self.resources = {}     # -l name -> value (merged; later wins)
        self.variables = []     # -v entries

    def apply(self, pairs):
        for opt, value in pairs:
            letter = opt[1:]
            if letter == "l":
                for item in _split_resources(value):
                    name, _, val = item.partition("=")
                    self.resources[name.strip()] = val.strip()
            elif letter == "v":
                self.variables += [v for v in value.split(",") if v]
            else:
                self.opts[letter] = value


def _split_resources(value):
    """`-l a=b,c=d` (commas inside quotes or select chunks with '+' kept together)."""
    return [p for p in re.split(r",(?=[A-Za-z_][\w.]*=)", value) if p]


def _pbs_flavour(family, tool):
    """Which tool's behaviour: 'pbs' (PBS Pro), 'torque', or 'moab' (msub...)."""
    if family == "pbs":
        return "pbs"
    if family == "moab" and tool in ("msub", "canceljob", "showq"):
        return "moab"
    return "torque"


def pbs_qsub(store, family, tool, args, stdin):
    flavour = _pbs_flavour(family, tool)
    prog = tool
    optstring = PBS_OPTS if flavour == "pbs" else TORQUE_OPTS
    command = None
    if flavour == "pbs" and "--" in args:
        i = args.index("--")
        args, command = args[:i], args[i + 1:]
        if not command:
            raise ToolExit(f"{prog}: no executable specified after --", 2)  # APPROXIMATE
    pairs, rest = glibc_getopt(prog, args, optstring)
    cli = PBSRequest()
    cli.apply(pairs)
    if "I" in cli.opts:
        raise ToolExit(f"{prog}: interactive jobs are not supported by this stand-in", 2)
    if "J" in cli.opts or "t" in cli.opts:
        raise ToolExit(f"{prog}: job arrays are not supported by this stand-in", 2)
    submit_cwd = os.getcwd()
    if command is not None:
        script_text = None
        script_name = os.path.basename(command[0])
    elif rest:
        path = rest[0]
        try:
            with open(path) as f:
                script_text = f.read()
        except OSError as e:
            if flavour == "pbs":
                raise ToolExit(f"{prog}: script file:: {e.strerror}", 1)  # APPROXIMATE
            raise ToolExit(f"{prog}: script file cannot be loaded - {e.strerror}", 1)  # APPROX.
        script_name = os.path.basename(path)
    else:
        script_text = stdin().decode(errors="replace")
        script_name = "STDIN"
    # Directives: #PBS (or -C PREFIX / $PBS_DPREFIX) lines before the first command line.
    prefix = cli.opts.get("C") or os.environ.get("PBS_DPREFIX") or "#PBS"
    req = PBSRequest()
    if script_text and prefix:
        for line in script_text.splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                break
            if not line.startswith(prefix):
                continue
            try:
                words = shlex.split(line[len(prefix):], comments=False)
            except ValueError:
                raise ToolExit(f"{prog}: directive error: {line}", 2)  # APPROXIMATE
            dpairs, drest = glibc_getopt(prog, words, optstring)
            req.apply(dpairs)
    # The command line overrides the directives.
    req.opts.update(cli.opts)
    req.resources.update(cli.resources)
    req.variables += cli.variables
    opts, res = req.opts, req.resources

    name = opts.get("N") or script_name
    if flavour == "pbs" and not re.fullmatch(r"[A-Za-z0-9][^\s@:]{0,235}", name):
        raise ToolExit(f"{prog}: illegal -N value", 2)
    queue = (opts.get("q") or DEFAULT_QUEUE).split("@")[0] or DEFAULT_QUEUE
    if queue not in QUEUES:
        if flavour == "pbs":
            raise ToolExit(f"{prog}: Unknown queue", pbs_errno_exit(PBSE_UNKQUE))
        if flavour == "moab":
            # APPROXIMATE: Moab's words for an unknown class were not found.
            raise ToolExit(f"ERROR:  cannot submit job - invalid class '{queue}' specified", 1)
        raise ToolExit(f"{prog}: submit error (Unknown queue MSG=requested queue not found)", 1)
    cpus, walltime = _pbs_resources(prog, flavour, res)
    if "j" in opts and opts["j"] not in ("oe", "eo", "n"):
        raise ToolExit(f"{prog}: illegal -j value", 2)

    seq_preview = store.peek()
    job = new_job(store, family, name=name, queue=queue, cpus=cpus, walltime=walltime,
                  hold="h" in opts, account=opts.get("A"))
    if flavour == "moab" or (family == "moab" and tool == "msub"):
        job["via"] = "msub"
    elif family == "moab":
        job["via"] = "qsub"
    assert job["seq"] == seq_preview
    seq = job["seq"]
    jid = job_id(job)
    home = user_home()
    # Working directory: $HOME (PBS Pro, Torque without -d/-w).
    workdir = home
    if flavour != "pbs" and (opts.get("d") or opts.get("w")):
        workdir = os.path.join(submit_cwd, opts.get("d") or opts.get("w"))
    extra = {
        "PBS_O_HOME": os.environ.get("HOME", home),
        "PBS_O_LOGNAME": os.environ.get("LOGNAME", job["user"]),
        "PBS_O_PATH": os.environ.get("PATH", ""),
        "PBS_O_SHELL": os.environ.get("SHELL", user_shell()),
        "PBS_O_HOST": NODE, "PBS_O_WORKDIR": submit_cwd, "PBS_O_QUEUE": queue,
        "PBS_O_SYSTEM": os.uname().sysname,
        # Under Moab the job runs as a Torque job: PBS_JOBID is Torque's id (N.server).
        "PBS_JOBID": jid if flavour == "pbs" else f"{seq}.{TORQUE_SERVER}", "PBS_JOBNAME": name,
        "PBS_QUEUE": queue, "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_TASKNUM": "1",
        "PBS_NODENUM": "0", "PBS_NODEFILE": os.path.join(store.spool, f"{seq}.nodes"),
    }
    for key in ("LANG", "MAIL", "TZ"):
        if key in os.environ:
            extra[f"PBS_O_{key}"] = os.environ[key]
    if flavour == "pbs":
        extra["TMPDIR"] = os.path.join(store.spool, f"pbs.{jid}")
        extra["PBS_JOBDIR"] = home
        os.makedirs(extra["TMPDIR"], exist_ok=True)
    else:
        extra.update({"PBS_SERVER": TORQUE_SERVER, "PBS_NUM_NODES": "1", "PBS_NP": str(cpus),
                      "PBS_NUM_PPN": str(cpus), "ENVIRONMENT": "BATCH", "PBS_VNODENUM": "0",
                      "PBS_O_INITDIR": workdir})
    if job.get("via") == "msub":
        extra.update({"MOAB_JOBID": jid, "MOAB_JOBNAME": name, "MOAB_CLASS": queue,
                      "MOAB_USER": job["user"], "MOAB_PROCCOUNT": str(cpus),
                      "MOAB_NODELIST": NODE, "MOAB_NODECOUNT": "1"})
    with open(extra["PBS_NODEFILE"], "w") as f:
        f.write((NODE + "\n") * cpus)
    # Environment: only what PBS gives, unless -V (all) or -v (named variables).
    if "V" in opts:
        base = dict(os.environ)
    else:
        base = {"HOME": home, "LOGNAME": job["user"], "USER": job["user"],
                "SHELL": user_shell(), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    for item in req.variables:
        key, eq, value = item.partition("=")
        if eq:
            base[key] = value
        elif key in os.environ:
            base[key] = os.environ[key]
    env = job_env(base, extra)
    join = opts.get("j", "n")
    o_path = _pbs_path(opts.get("o"), submit_cwd)
    e_path = _pbs_path(opts.get("e"), submit_cwd)
    spool_out = os.path.join(store.spool, f"{seq}.OU")
    spool_err = os.path.join(store.spool, f"{seq}.ER")
    if join == "oe":
        stdout, stderr = spool_out, None
    elif join == "eo":
        stdout, stderr = spool_err, None
    else:
        stdout, stderr = spool_out, spool_err
    if command is not None:
        argv = list(command)
    else:
        spath = spool_script(store, seq, script_text)
        shell = opts.get("S", "").split(",")[0].split("@")[0] or None  # -S path[@host],...
        argv = script_argv(spath, script_text, shell)
    job["run"] = {"argv": argv, "cwd": workdir, "env": env, "stdout": stdout, "stderr": stderr}
    job["pbs"] = {"o_path": o_path, "e_path": e_path, "join": join, "resources": res,
                  "flavour": flavour, "submit_args": " ".join(shlex.quote(a) for a in args),
                  "submit_cwd": submit_cwd, "variables": {k: extra[k] for k in extra
                                                          if k.startswith("PBS_O_")}}
    if cpus > TOTAL_CPUS:
        job["never_runs"] = True
    store.put(job)
    schedule(store)
    if "z" in opts:
        return ""
    if tool == "msub":
        return f"\n{jid}\n"
    return f"{jid}\n"


def _pbs_path(value, cwd):
    if not value:
        return None
    if ":" in value and not value.startswith("/"):
        value = value.split(":", 1)[1]
    trailing = value.endswith("/")
    path = os.path.normpath(os.path.join(cwd, value))
    return path + ("/" if trailing else "")


def _pbs_resources(prog, flavour, res):
    """(cpus, walltime seconds) from -l resources, refusing what the server would refuse."""
    known = PBS_RESOURCES if flavour == "pbs" else TORQUE_RESOURCES

    def unknown(name):
        if flavour == "pbs":
            raise ToolExit(f"{prog}: Unknown resource Resource_List.{name}",
                           pbs_errno_exit(PBSE_UNKRESC))
        if flavour == "moab":
            raise ToolExit(f"ERROR:  cannot submit job - unknown resource '{name}'", 1)  # APPROX.
        raise ToolExit(f"{prog}: submit error (Unknown resource type  Resource_List.{name})", 1)

    def illegal(name):
        if flavour == "pbs":
            raise ToolExit(f"{prog}: Illegal attribute or resource value Resource_List.{name}",
                           pbs_errno_exit(PBSE_BADATVAL))
        if flavour == "moab":
            raise ToolExit(f"ERROR:  cannot submit job - invalid value for resource '{name}'", 1)
        raise ToolExit(f"{prog}: submit error (Illegal attribute or resource value for  "
                       f"Resource_List.{name})", 1)

    cpus = None
    walltime = None
    for name, value in res.items():
        if name not in known:
            unknown(name)
        if name == "walltime":
            walltime = parse_pbs_duration(value)
            if walltime is None:
                illegal(name)
        elif name in ("mem", "vmem", "pmem", "pvmem"):
            if parse_size(value) is None:
                illegal(name)
        elif name in ("ncpus", "procs", "mpiprocs", "ompthreads", "ngpus"):
            if not re.fullmatch(r"\d+", value):
                illegal(name)
            if name in ("ncpus", "procs"):
                cpus = int(value)
        elif name == "select":
            total = 0
            for chunk in value.split("+"):
                parts = chunk.split(":")
                count = 1
                if re.fullmatch(r"\d+", parts[0]):
                    count = int(parts[0])
                    parts = parts[1:]
                ncpus = 1
                for part in parts:
                    key, eq, val = part.partition("=")
                    if not eq:
                        illegal(name)
                    if key not in known and key not in ("vntype", "aoe", "ngpus"):
                        unknown(key)
                    if key == "ncpus":
                        if not re.fullmatch(r"\d+", val):
                            illegal(name)
                        ncpus = int(val)
                    elif key == "mem" and parse_size(val) is None:
                        illegal(name)
                total += count * ncpus
            cpus = total
        elif name == "nodes":
            total = 0
            nodes_total = 0
            for spec in value.split("+"):
                parts = spec.split(":")
                count = int(parts[0]) if re.fullmatch(r"\d+", parts[0]) else 1
                ppn = 1
                for part in parts[1:]:
                    key, eq, val = part.partition("=")
                    if key == "ppn":
                        if not re.fullmatch(r"\d+", val):
                            illegal(name)
                        ppn = int(val)
                nodes_total += count
                total += count * ppn
            if flavour != "pbs" and (nodes_total > 1 or total > TOTAL_CPUS):
                msg = ("Job exceeds queue resource limits MSG=cannot locate feasible nodes "
                       "(nodes file is empty, all systems are busy, or no nodes have the "
                       "requested feature)")
                if flavour == "moab":
                    raise ToolExit(f"ERROR:  cannot submit job - {msg}", 1)  # APPROXIMATE
                raise ToolExit(f"{prog}: submit error ({msg})", 1)
            cpus = total
    return max(1, cpus or 1), walltime


def pbs_native(job):
    """The job_state letter (PBS Pro / Torque)."""
    flavour = job.get("pbs", {}).get("flavour", "pbs")
    if job["state"] == "queued":
        return "H" if job.get("hold") else "Q"
    if job["state"] == "running":
        return "E" if job.get("stopping") else "R"
    return "F" if job["family"] == "pbs" else "C"


def pbs_exit_status(job):
    if job.get("start_time") is None and job.get("exit_code") is None:
        if job.get("end_reason") == "lost":
            return -3  # JOB_EXEC_RETRY-like: the execution host was lost
        return None
    if job.get("end_reason") == "walltime" and job["family"] == "pbs":
        return -29  # JOB_EXEC_KILL_WALLTIME
    if job.get("end_reason") == "exec_failed":
        return -1   # JOB_EXEC_FAIL1
    rc = job.get("exit_code")
    if rc is None:
        return -3
    return 256 - rc if rc < 0 else rc


def pbs_deliver(store, job, stopping, exec_error):
    import shutil

    run = job["run"]
    info = job["pbs"]
    if exec_error is not None:
        _append(run["stderr"] or run["stdout"], f"{run['argv'][0]}: {exec_error.strerror}\n")
    if stopping == "walltime":
        # In the site's time (TASKCORE_STANDIN_WALLTIME_SCALE makes its clock run faster).
        elapsed = round((time.time() - (job.get("start_time") or time.time())) / WALLTIME_SCALE)
        _append(run["stderr"] or run["stdout"],
                f"=>> PBS: job killed: walltime {elapsed} exceeded limit {int(job['walltime'])}\n")
    tmpdir = run["env"].get("TMPDIR", "")
    if tmpdir.startswith(store.spool):
        shutil.rmtree(tmpdir, ignore_errors=True)  # PBS removes the job's $TMPDIR
    name, seq = job["name"], job["seq"]
    cwd = info["submit_cwd"]
    # -j oe: everything is in the output file; -j eo: in the error file.
    targets = []
    if info["join"] == "eo":
        targets.append((run["stdout"], info["e_path"], "e"))
    else:
        targets.append((run["stdout"], info["o_path"], "o"))
        if run.get("stderr"):
            targets.append((run["stderr"], info["e_path"], "e"))
    for spool, dest, kind in targets:
        if not spool or not os.path.exists(spool):
            continue
        if dest is None:
            final = os.path.join(cwd, f"{name}.{kind}{seq}")
        elif dest.endswith("/") or os.path.isdir(dest):
            final = os.path.join(dest, f"{name}.{kind}{seq}")
        else:
            final = dest
        try:
            shutil.copyfile(spool, final)
            os.unlink(spool)
        except OSError:
            # As PBS: what cannot be delivered stays in the undelivered directory.
            undelivered = os.path.join(store.root, "undelivered")
            os.makedirs(undelivered, exist_ok=True)
            shutil.move(spool, os.path.join(undelivered, f"{job_id(job)}.{kind.upper()}U"))


def _pbs_lookup(store, operand, flavour):
    """The job an operand names ("N", "N.server"); (job or None, full id)."""
    m = re.fullmatch(r"(\d+)(?:\.(.*))?", operand.strip())
    server = PBS_SERVER if flavour == "pbs" else TORQUE_SERVER
    if not m:
        return None, operand
    full = f"{m.group(1)}.{m.group(2) or server}" if flavour != "moab" else m.group(1)
    try:
        job = store.get(int(m.group(1)))
    except (OSError, ValueError):
        return None, full
    if not listed(job):
        return None, full
    return job, full


def pbs_qstat(store, family, tool, args, stdin):
    flavour = _pbs_flavour(family, tool)
    if flavour == "pbs":
        return pbs_pro_qstat(store, args)
    return torque_qstat(store, args)


def pbs_pro_qstat(store, args):
    pairs, operands = glibc_getopt("qstat", args, "ainpqrstwxu:fGHJMQEBW:T1F:D:")
    opts = dict(pairs)
    full = "-f" in opts
    history = "-x" in opts or "-H" in opts
    fmt = opts.get("-F", "").lower()
    if fmt and fmt not in ("json", "dsv"):
        raise ToolExit("usage: \nqstat [-f] [-J] [-p] [-t] [-x] [-E] [-F format | -w] [-D delim] "
                       "[ job_identifier... | destination... ]", 2)
    if fmt and not full:
        raise ToolExit("qstat: conflicting options.\nusage: \nqstat [-f] [-J] [-p] [-t] [-x] "
                       "[-E] [-F format | -w] [-D delim] [ job_identifier... | destination... ]", 2)
    jobs, failed, errors = [], 0, []
    if operands:
        for operand in operands:
            job, full_id = _pbs_lookup(store, operand, "pbs")
            if job is None:
                errors.append(f"qstat: Unknown Job Id {full_id}")
                failed = PBSE_UNKJOBID
            elif job["state"] == "ended" and not history:
                errors.append(f"qstat: {full_id} Job has finished, use -x or -H to obtain "
                              f"historical job information")
                failed = PBSE_HISTJOBID
            else:
                jobs.append(job)
    else:
        jobs = [j for j in store.jobs() if listed(j) and (history or j["state"] != "ended")]
    if fmt == "json":
        doc = {"timestamp": int(time.time()), "pbs_version": "2022.1.3", "pbs_server": PBS_SERVER}
        if jobs:
            doc["Jobs"] = {job_id(j): pbs_pro_attrs(j) for j in jobs}
        out = json.dumps(doc, indent=4, separators=(",", ":")) + "\n"
    elif full:
        out = "".join(_pbs_full_text(j) for j in jobs)
    else:
        out = _pbs_summary(jobs, f"{'Job id':<17} {'Name':<16} {'User':<16}  {'Time Use'} S Queue")
    if errors:
        sys.stdout.write(out)
        sys.stdout.flush()
        raise ToolExit("\n".join(errors), pbs_errno_exit(failed))
    return out


def _pbs_summary(jobs, header):
    if not jobs:
        return ""
    lines = [header, "-" * 17 + " " + "-" * 16 + " " + "-" * 16 + "  " + "-" * 8 + " - -----"]
    for j in jobs:
        used = "0"
        if j.get("start_time"):
            used = hms((j.get("end_time") or time.time()) - j["start_time"])
        lines.append(f"{job_id(j)[:17]:<17} {j['name'][:16]:<16} {j['user'][:16]:<16}  "
                     f"{used:>8} {pbs_native(j)} {j['queue']}")
    return "\n".join(lines) + "\n"


def _pbs_resource_list(job):
    res = dict(job["pbs"]["resources"])
    out = {}
    flavour = job["pbs"]["flavour"]
    if flavour == "pbs":
        out["ncpus"] = job["cpus"]
        out["nodect"] = 1
        out["place"] = res.get("place", "pack")
        out["select"] = res.get("select", f"1:ncpus={job['cpus']}")
    for key, value in res.items():
        if key in ("select", "place") and flavour == "pbs":
            continue
        out[key] = int(value) if re.fullmatch(r"\d+", value) else value
    if job.get("walltime") is not None:
        out["walltime"] = hms(job["walltime"])
    return out


def _pbs_default(job, kind):
    """Where PBS puts a stream without -o/-e: <submission dir>/<job name>.<o|e><seq>."""
    return os.path.join(job["pbs"]["submit_cwd"], f"{job['name']}.{kind}{job['seq']}")


def pbs_pro_attrs(job):
    """One job of `qstat -f -F json` (OpenPBS attribute names; JSON numbers typed)."""
    state = pbs_native(job)
    jid = job_id(job)
    info = job["pbs"]
    attrs = {
        "Job_Name": job["name"], "Job_Owner": f"{job['user']}@{NODE}",
        "job_state": state, "queue": job["queue"], "server": PBS_SERVER,
        "Checkpoint": "u", "ctime": ctime(job["submit_time"]),
        "Error_Path": f"{NODE}:{info['e_path'] or _pbs_default(job, 'e')}",
        "Hold_Types": "u" if job.get("hold") else "n", "Join_Path": info["join"],
        "Keep_Files": "n", "Mail_Points": "a", "mtime": ctime(time.time()),
        "Output_Path": f"{NODE}:{info['o_path'] or _pbs_default(job, 'o')}",
        "Priority": 0, "qtime": ctime(job["submit_time"]), "Rerunable": "True",
        "Resource_List": _pbs_resource_list(job), "substate": {"Q": 10, "H": 20, "R": 42,
                                                               "E": 50, "F": 92}[state],
        "Variable_List": info["variables"], "etime": ctime(job["submit_time"]),
        "Submit_arguments": info["submit_args"], "project": "_pbs_project_default",
        "Submit_Host": NODE, "run_count": 1 if job.get("start_time") else 0,
    }
    if job.get("account"):
        attrs["Account_Name"] = job["account"]
    if job.get("start_time"):
        attrs["stime"] = ctime(job["start_time"])
        attrs["exec_host"] = f"{NODE}/0*{job['cpus']}"
        attrs["exec_vnode"] = f"({NODE}:ncpus={job['cpus']})"
        attrs["jobdir"] = user_home()
        attrs["session_id"] = job.get("pgid") or 0
        used = (job.get("end_time") or time.time()) - job["start_time"]
        attrs["resources_used"] = {"cpupercent": 0, "cput": "00:00:00", "mem": "0kb",
                                   "ncpus": job["cpus"], "vmem": "0kb", "walltime": hms(used)}
    when = time.strftime("%a %b %d at %H:%M", time.localtime(job.get("start_time") or 0))
    if state in ("Q", "H"):
        if job.get("never_runs"):
            attrs["comment"] = (f"Can Never Run: Insufficient amount of resource: ncpus "
                                f"(R: {job['cpus']} A: {TOTAL_CPUS} T: {TOTAL_CPUS})")
        elif job.get("hold"):
            attrs["comment"] = "Job held by " + job["user"] + " on " + ctime(job["submit_time"])
        else:
            attrs["comment"] = (f"Not Running: Insufficient amount of resource: ncpus "
                                f"(R: {job['cpus']} A: {_free_cpus(job)} T: {TOTAL_CPUS})")
    elif state in ("R", "E"):
        attrs["comment"] = f"Job run at {when} on ({NODE}:ncpus={job['cpus']})"
    else:
        if job.get("start_time"):
            attrs["comment"] = f"Job run at {when} on ({NODE}:ncpus={job['cpus']}) and " + (
                "failed" if pbs_exit_status(job) not in (0, None) else "finished")
        else:
            attrs["comment"] = "Job deleted"  # APPROXIMATE
        status = pbs_exit_status(job)
        if status is not None:
            attrs["Exit_status"] = status
        attrs["obittime"] = ctime(job["end_time"])
    return attrs


_FREE_CACHE = {}


def _free_cpus(job):
    return _FREE_CACHE.get("free", 0)


def _pbs_full_text(job):
    lines = [f"Job Id: {job_id(job)}"]
    for key, value in pbs_pro_attrs(job).items():
        if isinstance(value, dict):
            for sub, v in value.items():
                lines.append(f"    {key}.{sub} = {v}")
        else:
            lines.append(f"    {key} = {value}")
    return "\n".join(lines) + "\n\n"


def torque_qstat(store, args):
    pairs, operands = glibc_getopt("qstat", args, "aeE1fGiMnqrsu:xQRBW:tl")
    opts = dict(pairs)
    xml = "-x" in opts
    full = "-f" in opts
    if not operands:
        jobs = [j for j in store.jobs() if listed(j)]
        docs = [_torque_xml(jobs)] if xml else [_torque_text(jobs, full)]
        return "".join(docs)
    out, errors, failed = [], [], 0
    # Torque's qstat stats, and prints, one operand at a time: with -x, one XML document
    # (<?xml ...?><Data>...</Data>) per job id given (qstat.c: run_job_mode ->
    # display_statjob for each operand).
    for operand in operands:
        job, full_id = _pbs_lookup(store, operand, "torque")
        if job is None:
            errors.append(f"qstat: Unknown Job Id Error {full_id}")
            failed = failed or PBSE_UNKJOBID
            continue
        out.append(_torque_xml([job]) if xml else _torque_text([job], full))
    text = "".join(out)
    if errors:
        sys.stdout.write(text)
        sys.stdout.flush()
        raise ToolExit("\n".join(errors), pbs_errno_exit(failed))
    return text


def torque_id(job):
    """A job's id as Torque shows it (under Moab too: N.server)."""
    return f"{job['seq']}.{TORQUE_SERVER}" if job["family"] == "moab" else job_id(job)


def torque_attrs(job):
    info = job["pbs"]
    res = _pbs_resource_list(job)
    if "nodes" in res:
        first = str(res["nodes"]).split(":")[0]
        res.setdefault("nodect", int(first) if first.isdigit() else 1)
    state = pbs_native(job)
    attrs = [("Job_Name", job["name"]), ("Job_Owner", f"{job['user']}@{NODE}"),
             ("job_state", state), ("queue", job["queue"]), ("server", TORQUE_SERVER),
             ("Checkpoint", "u"), ("ctime", str(int(job["submit_time"]))),
             ("Error_Path", f"{NODE}:{info['e_path'] or _pbs_default(job, 'e')}"),
             ("Hold_Types", "u" if job.get("hold") else "n"), ("Join_Path", info["join"]),
             ("Keep_Files", "n"), ("Mail_Points", "a"), ("mtime", str(int(time.time()))),
             ("Output_Path", f"{NODE}:{info['o_path'] or _pbs_default(job, 'o')}"),
             ("Priority", "0"),
             ("qtime", str(int(job["submit_time"]))), ("Rerunable", "True"),
             ("Resource_List", res),
             ("Variable_List", ",".join(f"{k}={v}" for k, v in info["variables"].items())),
             ("euser", job["user"]), ("queue_type", "E"), ("etime", str(int(job["submit_time"]))),
             ("submit_args", info["submit_args"]), ("fault_tolerant", "False"),
             ("job_radix", "0"), ("submit_host", NODE), ("init_work_dir", info["submit_cwd"])]
    if job.get("account"):
        attrs.append(("Account_Name", job["account"]))
    if job.get("start_time"):
        attrs += [("exec_host", f"{NODE}/0-{job['cpus'] - 1}"),
                  ("session_id", str(job.get("pgid") or 0)),
                  ("start_time", str(int(job["start_time"]))), ("start_count", "1")]
    if state == "C":
        status = pbs_exit_status(job)
        attrs.append(("exit_status", str(status if status is not None else 271)))
        attrs.append(("comp_time", str(int(job["end_time"]))))
        if job.get("start_time"):
            attrs.append(("total_runtime", f"{job['end_time'] - job['start_time']:.6f}"))
    return attrs


def _torque_xml(jobs):
    from xml.sax.saxutils import escape

    parts = []
    for job in jobs:
        parts.append("<Job>")
        parts.append(f"<Job_Id>{escape(torque_id(job))}</Job_Id>")
        for key, value in torque_attrs(job):
            if isinstance(value, dict):
                inner = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in value.items())
                parts.append(f"<{key}>{inner}</{key}>")
            else:
                parts.append(f"<{key}>{escape(str(value))}</{key}>")
        parts.append("</Job>")
    return '<?xml version="1.0"?>\n<Data>' + "".join(parts) + "</Data>\n"


def _torque_text(jobs, full):
    if full:
        out = []
        for job in jobs:
            out.append(f"Job Id: {torque_id(job)}")
            for key, value in torque_attrs(job):
                if isinstance(value, dict):
                    out += [f"    {key}.{k} = {v}" for k, v in value.items()]
                else:
                    out.append(f"    {key} = {value}")
            out.append("")
        return "\n".join(out) + ("\n" if out else "")
    if not jobs:
        return ""
    lines = ["Job ID                    Name             User            Time Use S Queue",
             "------------------------- ---------------- --------------- -------- - -----"]
    for j in jobs:
        used = "0"
        if j.get("start_time"):
            used = hms((j.get("end_time") or time.time()) - j["start_time"])
        lines.append(f"{torque_id(j):<25} {j['name'][:16]:<16} {j['user'][:15]:<15} {used:>8} "
                     f"{pbs_native(j)} {j['queue']}")
    return "\n".join(lines) + "\n"


def pbs_qdel(store, family, tool, args, stdin):
    flavour = _pbs_flavour(family, tool)
    pairs, operands = glibc_getopt("qdel", args, "W:xpm:a:c:t:b:")
    if not operands:
        raise ToolExit("usage: qdel [-W force|suppress_email=X] [-x] job_identifier...", 2)
    errors, failed = [], 0
    for operand in operands:
        job, full_id = _pbs_lookup(store, operand, "pbs" if flavour == "pbs" else "torque")
        if job is None:
            errors.append(f"qdel: Unknown Job Id {full_id}" if flavour == "pbs"
                          else f"qdel: Unknown Job Id Error {full_id}")
            failed = PBSE_UNKJOBID
        elif job["state"] == "ended":
            if flavour == "pbs":
                errors.append(f"qdel: Job has finished {full_id}")
                failed = PBSE_HISTJOBID
            else:
                errors.append(f"qdel: Invalid state for job - COMPLETE {full_id}")  # APPROX.
                failed = 15018  # Torque PBSE_BADSTATE
        else:
            request_stop(store, job, "cancel")
    if errors:
        raise ToolExit("\n".join(errors), pbs_errno_exit(failed))
    return ""


def moab_canceljob(store, family, tool, args, stdin):
    if not args:
        raise ToolExit("ERROR:  no job specified", 1)  # APPROXIMATE
    out, errors = [], []
    for operand in args:
        if operand.startswith("-"):
            continue
        job, _ = _pbs_lookup(store, operand, "moab")
        if job is None or job["state"] == "ended":
            errors.append(f"ERROR:  invalid job specified ({operand})")
            continue
        request_stop(store, job, "cancel")
        out.append(f"job '{operand}' cancelled\n")
    if errors:
        sys.stdout.write("".join(out))
        sys.stdout.flush()
        raise ToolExit("\n".join(errors), 1)
    return "".join(out)


def moab_state(job):
    if job["state"] == "queued":
        if job.get("hold"):
            return "UserHold", "blocked"
        if job.get("never_runs"):
            return "Idle", "blocked"
        return "Idle", "eligible"
    if job["state"] == "running":
        return ("Canceling" if job.get("stopping") == "cancel" else "Running"), "active"
    return None, None


def moab_showq(store, family, tool, args, stdin):
    xml = False
    filters = {}
    completed = False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--xml":
            xml = True
        elif a == "-w" and i + 1 < len(args):
            i += 1
            key, _, value = args[i].partition("=")
            filters[key] = value
        elif a in ("-u",) and i + 1 < len(args):
            i += 1
            filters["user"] = args[i]
        elif a == "-c":
            completed = True
        elif a in ("-r", "-i", "-b", "-n", "-v", "-l"):
            pass
        else:
            raise ToolExit(f"ERROR:  unexpected argument '{a}'", 1)  # APPROXIMATE
        i += 1
    sections = {"active": [], "eligible": [], "blocked": [], "completed": []}
    for job in store.jobs():
        if not listed(job):
            continue
        if filters.get("user") and job["user"] != filters["user"]:
            continue
        if filters.get("class") and job["queue"] != filters["class"]:
            continue
        if filters.get("acct") and job.get("account") != filters["acct"]:
            continue
        state, section = moab_state(job)
        if state is None:
            if completed:
                name = "Completed" if pbs_exit_status(job) == 0 else "Removed"
                sections["completed"].append((name, job))
            continue
        sections[section].append((state, job))
    used = sum(j["cpus"] for _, j in sections["active"])
    now = int(time.time())
    if xml:
        from xml.sax.saxutils import quoteattr

        parts = ['<Data><Object>queue</Object>',
                 f'<cluster LocalActiveNodes="{1 if used else 0}" LocalAllocProcs="{used}" '
                 f'LocalConfigNodes="1" LocalIdleNodes="{0 if used else 1}" '
                 f'LocalIdleProcs="{TOTAL_CPUS - used}" LocalUpNodes="1" '
                 f'LocalUpProcs="{TOTAL_CPUS}" RemoteActiveNodes="0" RemoteAllocProcs="0" '
                 f'RemoteConfigNodes="0" RemoteIdleNodes="0" RemoteIdleProcs="0" '
                 f'RemoteUpNodes="0" RemoteUpProcs="0" time="{now}"></cluster>']
        names = ["completed"] if completed else ["active", "eligible", "blocked"]
        for option in names:
            entries = sections[option]
            parts.append(f'<queue count="{len(entries)}" option="{option}">')
            for state, job in entries:
                attrs = {"Account": job.get("account") or "", "Class": job["queue"],
                         "DRMJID": f"{job['seq']}.{TORQUE_SERVER}", "GJID": str(job["seq"]),
                         "Group": job["user"], "JobID": str(job["seq"]), "JobName": job["name"],
                         "PAL": "torque", "ReqAWDuration": str(int(job.get("walltime") or 0)),
                         "ReqProcs": str(job["cpus"]), "RunPriority": "0",
                         "StartPriority": "1", "State": state,
                         "SubmissionTime": str(int(job["submit_time"])),
                         "SuspendDuration": "0", "User": job["user"]}
                if not attrs["Account"]:
                    del attrs["Account"]
                if job.get("start_time"):
                    attrs.update({"AWDuration": str(int(time.time() - job["start_time"])),
                                  "MasterHost": NODE, "StartTime": str(int(job["start_time"])),
                                  "RsvStartTime": str(int(job["start_time"])),
                                  "StatPSDed": "0.000000", "StatPSUtl": "0.000000"})
                if option == "blocked":
                    attrs["BlockReason"] = ("IdlePolicy:job %s violates idle HARD MAXPROC limit"
                                            % job["seq"] if job.get("never_runs")
                                            else "Hold:job is on hold")  # APPROXIMATE
                if option == "completed":
                    attrs["CompletionCode"] = str(pbs_exit_status(job) or 0)
                    attrs["CompletionTime"] = str(int(job["end_time"]))
                parts.append("<job " + " ".join(f"{k}={quoteattr(v)}"
                                                for k, v in sorted(attrs.items())) + "></job>")
            parts.append("</queue>")
        parts.append("</Data>")
        return "".join(parts) + "\n"
    lines = []
    for option, title in (("active", "active jobs"), ("eligible", "eligible jobs"),
                          ("blocked", "blocked jobs")):
        lines.append(f"{title}" + "-" * (35 - len(title)))
        lines.append(f"{'JOBID':<18} {'USERNAME':>10} {'STATE':>10} {'PROCS':>5} "
                     f"{'REMAINING' if option == 'active' else 'WCLIMIT':>11}  "
                     f"{'STARTTIME' if option == 'active' else 'QUEUETIME'}")
        lines.append("")
        for state, job in sections[option]:
            limit = job.get("walltime") or 0
            t = job.get("start_time") or job["submit_time"]
            lines.append(f"{job['seq']:<18} {job['user']:>10} {state:>10} {job['cpus']:>5} "
                         f"{hms(limit - (time.time() - t) if option == 'active' else limit):>11}  "
                         f"{ctime(t)}")
        lines.append("")
        count = len(sections[option])
        lines.append(f"{count} {option} job{'s' if count != 1 else ''}")
        lines.append("")
    total = sum(len(sections[k]) for k in ("active", "eligible", "blocked"))
    lines.append(f"Total jobs:  {total}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# LSF
# ---------------------------------------------------------------------------------------------

LSF_ARG_OPTS = {"-J", "-q", "-P", "-n", "-R", "-M", "-W", "-o", "-oo", "-e", "-eo", "-cwd",
                "-G", "-g", "-u", "-env", "-app", "-sla", "-m", "-L", "-E", "-Ep", "-w", "-We",
                "-c", "-F", "-D", "-S", "-T", "-v", "-p", "-C", "-b", "-t", "-k", "-a", "-ar",
                "-Jd", "-Lp", "-s", "-sp", "-U", "-i", "-is", "-outdir", "-f", "-data", "-ext",
                "-hostfile", "-gpu", "-mig", "-network", "-rnc", "-Q", "-jsdl", "-jsdl_strict",
                "-XF", "-stage", "-clusters", "-eptl", "-ptl", "-pack", "-rcacct", "-datagrp"}
LSF_FLAG_OPTS = {"-B", "-N", "-x", "-H", "-r", "-rn", "-ti", "-I", "-Ip", "-Is", "-IS", "-ISp",
                 "-ISs", "-IX", "-K", "-Zs", "-h", "-V", "-csm", "-tty", "-json", "-yaml"}
LSF_UNITS = {"": 1, "K": 1, "KB": 1, "M": 2**10, "MB": 2**10, "G": 2**20, "GB": 2**20,
             "T": 2**30, "TB": 2**30, "P": 2**40, "PB": 2**40, "E": 2**50, "EB": 2**50}


def lsf_parse(args, allow_command=True):
    """bsub's options -> (dict, command words)."""
    opts = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-") or a == "-":
            break
        if a == "--":
            i += 1
            break
        if a in LSF_FLAG_OPTS:
            opts[a] = True
            i += 1
            continue
        if a in LSF_ARG_OPTS:
            if i + 1 >= len(args):
                raise ToolExit(f"bsub: option requires an argument -- {a[1:]}\n"
                               f"Usage: bsub [options] [command [arguments]]", 255)  # APPROX.
            opts[a] = args[i + 1]
            i += 2
            continue
        raise ToolExit(f"bsub: illegal option -- {a[1:]}\n"
                       f"Usage: bsub [options] [command [arguments]]", 255)  # APPROXIMATE
    return opts, args[i:]


def lsf_bsub(store, family, tool, args, stdin):
    opts, command = lsf_parse(args)
    if opts.get("-h"):
        return "Usage: bsub [options] [command [arguments]]\n"
    if opts.get("-V"):
        raise ToolExit("IBM Spectrum LSF 10.1.0.13, Mar 04 2022", 0)
    for interactive in ("-I", "-Ip", "-Is", "-IS", "-ISp", "-ISs", "-IX", "-K"):
        if interactive in opts:
            raise ToolExit(f"bsub: {interactive} is not supported by this stand-in", 255)
    submit_cwd = os.getcwd()
    script_text = None
    if not command:
        # `bsub < script`: the script is the job; its #BSUB lines are options.
        script_text = stdin().decode(errors="replace")
        if not script_text.strip():
            raise ToolExit("No command is specified. Job not submitted.", 255)  # APPROXIMATE
        directives = {}
        for line in script_text.splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                break
            if not stripped.startswith("#BSUB"):
                continue
            try:
                words = shlex.split(stripped[len("#BSUB"):])
            except ValueError:
                raise ToolExit(f"Bad job script line: {stripped}. Job not submitted.", 255)
            dopts, drest = lsf_parse(words)
            directives.update(dopts)
        directives.update(opts)  # the command line overrides #BSUB lines
        opts = directives
    queue = opts.get("-q")
    if queue is not None:
        queue = queue.split()[0] if queue.split() else ""
        if queue not in QUEUES:
            raise ToolExit(f"{queue}: No such queue. Job not submitted.", 255)
    slots = 1
    if "-n" in opts:
        m = re.fullmatch(r"(\d+)(?:,(\d+))?", str(opts["-n"]).strip())
        if not m or int(m.group(1)) < 1:
            raise ToolExit(f"{opts['-n']}: Bad argument for option -n. Job not submitted.", 255)
        slots = int(m.group(1))
    walltime = None
    if "-W" in opts:
        m = re.fullmatch(r"(?:(\d+):)?(\d+)(?:/\S+)?", str(opts["-W"]).strip())
        if not m:
            raise ToolExit(f"{opts['-W']}: Bad RUNLIMIT specification. Job not submitted.",
                           255)  # APPROXIMATE
        walltime = (int(m.group(1) or 0) * 60 + int(m.group(2))) * 60
    if "-M" in opts:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?B?)!?", str(opts["-M"]).strip(), re.I)
        if not m or m.group(2).upper() not in LSF_UNITS:
            raise ToolExit(f"{opts['-M']}: Bad memory limit specification. Job not submitted.",
                           255)  # APPROXIMATE
    if "-R" in opts:
        text = str(opts["-R"])
        if text.count("[") != text.count("]"):
            raise ToolExit("Bad resource requirement syntax. Job not submitted.", 255)
    job = new_job(store, family, name=opts.get("-J") or (" ".join(command) if command else
                                                          script_text.splitlines()[0][:60]),
                  queue=queue or DEFAULT_QUEUE, cpus=slots, walltime=walltime,
                  hold=bool(opts.get("-H")), account=opts.get("-P"))
    seq = job["seq"]
    jid = str(seq)
    workdir = os.path.join(submit_cwd, opts["-cwd"]) if opts.get("-cwd") else submit_cwd

    def expand(path):
        if not path:
            return None
        path = path.replace("%J", jid).replace("%I", "0")
        return os.path.join(workdir, path)

    out_path = expand(opts.get("-oo") or opts.get("-o"))
    err_path = expand(opts.get("-eo") or opts.get("-e"))
    if out_path and (out_path.endswith("/") or os.path.isdir(out_path)):
        out_path = os.path.join(out_path, f"{jid}.out")
    if err_path and (err_path.endswith("/") or os.path.isdir(err_path)):
        err_path = os.path.join(err_path, f"{jid}.err")
    env_opt = str(opts.get("-env", "all"))
    if env_opt.strip().lower().startswith("none"):
        base = {"HOME": user_home(), "USER": job["user"], "LOGNAME": job["user"],
                "PATH": "/usr/local/bin:/usr/bin:/bin"}
    else:
        base = dict(os.environ)
    extra = {"LSB_JOBID": jid, "LSB_JOBNAME": job["name"], "LSB_QUEUE": job["queue"],
             "LSB_JOBINDEX": "0", "LSB_HOSTS": " ".join([NODE] * slots),
             "LSB_MCPU_HOSTS": f"{NODE} {slots}", "LSB_DJOB_NUMPROC": str(slots),
             "LSB_MAX_NUM_PROCESSORS": str(slots), "LS_SUBCWD": submit_cwd,
             "LS_EXECCWD": workdir, "LSB_BATCH_JID": jid, "LSFUSER": job["user"],
             "LSB_SUB_HOST": NODE, "LSB_EXEC_CLUSTER": LSF_CLUSTER}
    if out_path:
        extra["LSB_OUTPUTFILE"] = out_path
    if err_path:
        extra["LSB_ERRORFILE"] = err_path
    env = job_env(base, extra)
    spool_out = os.path.join(store.spool, f"{seq}.out")
    spool_err = os.path.join(store.spool, f"{seq}.err") if err_path else None
    if command:
        # `bsub command args`: LSF runs the command line with the user's shell, at run time.
        argv = ["/bin/sh", "-c", " ".join(command)]
    else:
        spath = spool_script(store, seq, script_text)
        argv = script_argv(spath, script_text, "/bin/sh")
    job["run"] = {"argv": argv, "cwd": workdir, "env": env, "stdout": spool_out,
                  "stderr": spool_err}
    job["lsf"] = {"out_path": out_path, "err_path": err_path,
                  "append_out": "-oo" not in opts, "append_err": "-eo" not in opts,
                  "command": " ".join(command) if command else script_text,
                  "submit_cwd": submit_cwd}
    if slots > TOTAL_CPUS:
        job["never_runs"] = True
    store.put(job)
    schedule(store)
    where = f"queue <{job['queue']}>" if queue else f"default queue <{job['queue']}>"
    return f"Job <{jid}> is submitted to {where}.\n"


def lsf_native(job):
    if job["state"] == "queued":
        return "PSUSP" if job.get("hold") else "PEND"
    if job["state"] == "running":
        return "RUN"
    if job.get("end_reason") is None and job.get("exit_code") == 0:
        return "DONE"
    return "EXIT"


def lsf_exit_code(job):
    rc = job.get("exit_code")
    if rc is None:
        return None
    return 128 - rc if rc < 0 else rc


def lsf_exit_reason(job):
    reason = job.get("end_reason")
    if reason == "cancel":
        return "TERM_OWNER: job killed by owner"
    if reason == "walltime":
        return "TERM_RUNLIMIT: job killed after reaching LSF run time limit"
    if reason == "lost":
        return "TERM_UNKNOWN: LSF cannot determine a termination reason"  # APPROXIMATE
    return ""


def lsf_deliver(store, job, exec_error):
    info = job["lsf"]
    run = job["run"]
    if exec_error is not None:
        _append(run["stdout"], f"{run['argv'][0]}: {exec_error.strerror}\n")
    if not info["out_path"]:
        return  # LSF would mail the output; nothing is kept
    status = lsf_native(job)
    code = lsf_exit_code(job)
    if status == "DONE":
        result = "Successfully completed."
    else:
        result = (lsf_exit_reason(job) + ".\n" if lsf_exit_reason(job) else "") + \
            (f"Exited with exit code {code}." if code is not None else "Exited.")
    started = job.get("start_time") or job["end_time"]
    report = (
        "\n------------------------------------------------------------\n"
        f"Sender: LSF System <lsfadmin@{NODE}>\n"
        f"Subject: Job {job['seq']}: <{job['name']}> in cluster <{LSF_CLUSTER}> "
        f"{'Done' if status == 'DONE' else 'Exited'}\n\n"
        f"Job <{job['name']}> was submitted from host <{NODE}> by user <{job['user']}> in "
        f"cluster <{LSF_CLUSTER}> at {ctime(job['submit_time'])}\n"
        f"Job was executed on host(s) <{job['cpus']}*{NODE}>, in queue <{job['queue']}>, as "
        f"user <{job['user']}> in cluster <{LSF_CLUSTER}> at {ctime(started)}\n"
        f"<{user_home()}> was used as the home directory.\n"
        f"<{info['submit_cwd']}> was used as the working directory.\n"
        f"Started at {ctime(started)}\n"
        f"Terminated at {ctime(job['end_time'])}\n"
        f"Results reported at {ctime(job['end_time'])}\n\n"
        "Your job looked like:\n\n"
        "------------------------------------------------------------\n"
        "# LSBATCH: User input\n"
        f"{info['command'].rstrip()}\n"
        "------------------------------------------------------------\n\n"
        f"{result}\n\n"
        "Resource usage summary:\n\n"
        f"    CPU time :                                   0.00 sec.\n"
        f"    Run time :                                   {int(job['end_time'] - started)} sec.\n"
        f"    Total Requested Memory :                     -\n\n"
        "The output (if any) follows:\n\n")
    try:
        with open(run["stdout"], "rb") as f:
            body = f.read()
    except OSError:
        body = b""
    try:
        with open(info["out_path"], "ab" if info["append_out"] else "wb") as f:
            f.write(report.encode() + body)
        if info["err_path"] and run.get("stderr") and os.path.exists(run["stderr"]):
            with open(run["stderr"], "rb") as src, \
                    open(info["err_path"], "ab" if info["append_err"] else "wb") as dst:
                dst.write(src.read())
    except OSError:
        pass


LSF_FIELDS = {"jobid": "JOBID", "id": "JOBID", "stat": "STAT", "exit_reason": "EXIT_REASON",
              "exit_code": "EXIT_CODE", "queue": "QUEUE", "job_name": "JOB_NAME",
              "name": "JOB_NAME", "user": "USER", "submit_time": "SUBMIT_TIME",
              "start_time": "START_TIME", "finish_time": "FINISH_TIME",
              "from_host": "FROM_HOST", "exec_host": "EXEC_HOST", "slots": "SLOTS",
              "nalloc_slot": "NALLOC_SLOT", "proj_name": "PROJ_NAME", "proj": "PROJ_NAME",
              "run_time": "RUN_TIME", "pend_reason": "PEND_REASON", "command": "COMMAND",
              "runtimelimit": "RUNTIMELIMIT", "min_req_proc": "MIN_REQ_PROC"}


def lsf_field(job, key):
    if key == "JOBID":
        return str(job["seq"])
    if key == "STAT":
        return lsf_native(job)
    if key == "EXIT_REASON":
        return lsf_exit_reason(job)
    if key == "EXIT_CODE":
        code = lsf_exit_code(job)
        return "" if code in (None, 0) else str(code)
    if key == "QUEUE":
        return job["queue"]
    if key == "JOB_NAME":
        return job["name"]
    if key == "USER":
        return job["user"]
    if key in ("SUBMIT_TIME", "START_TIME", "FINISH_TIME"):
        t = job.get({"SUBMIT_TIME": "submit_time", "START_TIME": "start_time",
                     "FINISH_TIME": "end_time"}[key])
        return time.strftime("%b %d %H:%M", time.localtime(t)) if t else "-"
    if key == "FROM_HOST":
        return NODE
    if key == "EXEC_HOST":
        return f"{job['cpus']}*{NODE}" if job.get("start_time") else ""
    if key in ("SLOTS", "NALLOC_SLOT", "MIN_REQ_PROC"):
        return str(job["cpus"])
    if key == "PROJ_NAME":
        return job.get("account") or "default"
    if key == "RUN_TIME":
        if not job.get("start_time"):
            return "0 second(s)"
        return f"{int((job.get('end_time') or time.time()) - job['start_time'])} second(s)"
    if key == "PEND_REASON":
        return "Job slot limit reached" if job["state"] == "queued" else ""  # APPROXIMATE
    if key == "COMMAND":
        return job["lsf"]["command"].splitlines()[0] if job["lsf"]["command"] else ""
    if key == "RUNTIMELIMIT":
        return f"{job['walltime'] / 60:.1f}/{NODE}" if job.get("walltime") else ""
    return ""


def lsf_bjobs(store, family, tool, args, stdin):
    opts = {}
    ids = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-o", "-u", "-q", "-J", "-m", "-P", "-G", "-g", "-sla", "-app", "-Jd", "-Lp"):
            if i + 1 >= len(args):
                raise ToolExit(f"bjobs: option requires an argument -- {a[1:]}", 255)
            opts[a] = args[i + 1]
            i += 2
            continue
        if a in ("-a", "-d", "-p", "-r", "-s", "-x", "-l", "-w", "-W", "-noheader", "-json",
                 "-X", "-UF", "-hms", "-A", "-aps", "-N", "-WL", "-WF", "-WP", "-psum", "-sum",
                 "-pe", "-pi", "-pei"):
            opts[a] = True
            i += 1
            continue
        if a.startswith("-"):
            raise ToolExit(f"bjobs: illegal option -- {a[1:]}\nUsage: bjobs [-h] [-V] ...",
                           255)  # APPROXIMATE
        ids.append(a)
        i += 1
    if "-json" in opts and "-noheader" in opts:
        raise ToolExit("The -json option cannot be used with -noheader.", 255)  # APPROXIMATE
    fields = None
    if "-o" in opts:
        fields = []
        for word in str(opts["-o"]).split():
            if word.startswith("delimiter="):
                continue
            name = word.split(":")[0].lower()
            if name not in LSF_FIELDS:
                raise ToolExit(f"{name}: Illegal field.", 255)  # APPROXIMATE
            fields.append(LSF_FIELDS[name])
    user = opts.get("-u", user_name())
    records, missing = [], []
    if ids:
        for text in ids:
            job = None
            if re.fullmatch(r"\d+", text):
                try:
                    job = store.get(int(text))
                except (OSError, ValueError):
                    job = None
            if job is None or not listed(job) or job["family"] != "lsf":
                missing.append(text)
                records.append(({"JOBID": text, "ERROR": f"Job <{text}> is not found"}, None))
            else:
                records.append((None, job))
    else:
        for job in store.jobs():
            if not listed(job) or (user != "all" and job["user"] != user):
                continue
            ended = job["state"] == "ended"
            if ended and not (opts.get("-a") or opts.get("-d")):
                continue
            if opts.get("-d") and not ended:
                continue
            if opts.get("-r") and lsf_native(job) != "RUN":
                continue
            if opts.get("-p") and lsf_native(job) not in ("PEND", "PSUSP"):
                continue
            records.append((None, job))
    found = [j for _, j in records if j is not None]
    # LSB_BJOBS_CONSISTENT_EXIT_CODE=N (the default): 255 only when none of the job ids
    # given exists; 0 when at least one does.
    code = 255 if ids and not found else 0
    if fields is not None and opts.get("-json"):
        recs = []
        for error, job in records:
            recs.append(error if error is not None
                        else {key: lsf_field(job, key) for key in fields})
        body = ",\n".join("    {\n" + ",\n".join(f"      {json.dumps(k)}:{json.dumps(v)}"
                                                 for k, v in rec.items()) + "\n    }"
                          for rec in recs)
        out = ('{\n  "COMMAND":"bjobs",\n  "JOBS":%d,\n  "RECORDS":[\n%s\n  ]\n}\n'
               % (len(recs), body))
        if code:
            sys.stdout.write(out)
            sys.stdout.flush()
            raise ToolExit("", code)
        return out
    lines = []
    if fields is not None:
        if not opts.get("-noheader"):
            lines.append(" ".join(fields))
        for error, job in records:
            if job is not None:
                lines.append(" ".join(lsf_field(job, k) or "-" for k in fields))
    else:
        if found and not opts.get("-noheader"):
            lines.append("JOBID   USER    STAT  QUEUE      FROM_HOST   EXEC_HOST   JOB_NAME   "
                         "SUBMIT_TIME")
        for error, job in records:
            if job is not None:
                lines.append(f"{job['seq']:<7} {job['user'][:7]:<7} {lsf_native(job):<5} "
                             f"{job['queue'][:10]:<10} {NODE[:11]:<11} "
                             f"{lsf_field(job, 'EXEC_HOST')[:11]:<11} {job['name'][:10]:<10} "
                             f"{lsf_field(job, 'SUBMIT_TIME')}")
        if not ids and not records:
            raise ToolExit("No unfinished job found", 0)
    out = "\n".join(lines) + ("\n" if lines else "")
    errors = [f"Job <{m}> is not found" for m in missing]
    if errors:
        sys.stdout.write(out)
        sys.stdout.flush()
        raise ToolExit("\n".join(errors), code)
    return out


def lsf_bkill(store, family, tool, args, stdin):
    ids = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-s", "-u", "-q", "-J", "-m", "-g", "-sla", "-app", "-stat", "-C"):
            i += 2
            continue
        if a in ("-r", "-l", "-d", "-b", "-Z"):
            i += 1
            continue
        if a.startswith("-"):
            raise ToolExit(f"bkill: illegal option -- {a[1:]}", 255)  # APPROXIMATE
        ids.append(a)
        i += 1
    if not ids:
        raise ToolExit("Job ID or one of '-m', '-u' '-q' '-J' '-g' '-sla' '-stat' and '-app' "
                       "must be specified", 255)  # APPROXIMATE
    out, errors = [], []
    targets = []
    if ids == ["0"]:
        targets = [j for j in store.jobs() if j["family"] == "lsf" and active(j)]
        if not targets:
            raise ToolExit("No unfinished job found", 255)
    for text in ids if ids != ["0"] else []:
        job = None
        if re.fullmatch(r"\d+", text):
            try:
                job = store.get(int(text))
            except (OSError, ValueError):
                job = None
        if job is None or not listed(job):
            errors.append(f"Job <{text}>: No matching job found")
        elif job["state"] == "ended":
            errors.append(f"Job <{text}>: Job has already finished")
        else:
            targets.append(job)
    for job in targets:
        request_stop(store, job, "cancel")
        out.append(f"Job <{job['seq']}> is being terminated\n")
    if errors:
        sys.stdout.write("".join(out))
        sys.stdout.flush()
        raise ToolExit("\n".join(errors), 255)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# HTCondor
# ---------------------------------------------------------------------------------------------

CONDOR_KEYS = {
    "universe", "executable", "arguments", "args", "environment", "env", "getenv", "output",
    "error", "input", "log", "log_xml", "initialdir", "initial_dir", "request_cpus",
    "request_memory", "request_disk", "request_gpus", "allowed_job_duration",
    "allowed_execute_duration", "batch_name", "accounting_group", "accounting_group_user",
    "notification", "notify_user", "should_transfer_files", "when_to_transfer_output",
    "transfer_input_files", "transfer_output_files", "transfer_executable", "requirements",
    "rank", "priority", "periodic_remove", "periodic_hold", "periodic_release",
    "on_exit_remove", "on_exit_hold", "max_retries", "job_lease_duration", "stream_output",
    "stream_error", "hold", "leave_in_queue", "coresize", "nice_user", "description",
    "docker_image", "container_image", "max_idle", "concurrency_limits", "job_max_vacate_time",
    "kill_sig", "want_graceful_removal", "max_materialize", "job_ad_information_attrs",
    "transfer_output_remaps", "preserve_relative_paths", "request_gpu_memory",
    "gpus_minimum_capability", "gpus_minimum_memory", "gpus_minimum_runtime",
    "submit_event_notes", "dagman_log", "image_size", "job_machine_attrs", "next_job_start_delay",
    "max_transfer_input_mb", "max_transfer_output_mb", "encrypt_input_files",
    "encrypt_output_files", "use_oauth_services", "run_as_owner", "load_profile",
    "job_batch_name", "cron_minute", "cron_hour", "deferral_time", "success_exit_code",
}
CONDOR_UNIVERSES = {"vanilla", "scheduler", "local", "docker", "container", "parallel", "java",
                    "vm", "grid", "standard"}
CONDOR_STATUS = {"idle": 1, "running": 2, "removed": 3, "completed": 4, "held": 5}


def condor_args(value):
    """HTCondor arguments: the new syntax (the whole in double quotes; single quotes group
    one argument, '' is a literal ', "" a literal ") or the old one (spaces separate)."""
    v = value.strip()
    if not v.startswith('"'):
        return v.split(), None
    if len(v) < 2 or not v.endswith('"'):
        return None, "missing closing double quote"  # APPROXIMATE
    inner = v[1:-1]
    args, cur, quoted, i = [], None, False, 0
    while i < len(inner):
        c = inner[i]
        if c == '"':
            if inner[i + 1:i + 2] == '"':
                cur = (cur or "") + '"'
                i += 2
                continue
            return None, "unescaped double quote"  # APPROXIMATE
        if quoted:
            if c == "'":
                if inner[i + 1:i + 2] == "'":
                    cur += "'"
                    i += 2
                    continue
                quoted = False
                i += 1
                continue
            cur += c
            i += 1
            continue
        if c == "'":
            quoted = True
            cur = cur or ""
        elif c.isspace():
            if cur is not None:
                args.append(cur)
                cur = None
        else:
            cur = (cur or "") + c
        i += 1
    if quoted:
        return None, "unterminated single quote"  # APPROXIMATE
    if cur is not None:
        args.append(cur)
    return args, None


def condor_size(text, default_unit):
    """request_memory (MiB) / request_disk (KiB): an integer with an optional K/M/G/T unit."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", str(text), re.I)
    if not m:
        return None
    factor = {"": default_unit, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
    return int(float(m.group(1)) * factor[m.group(2).upper()])


def condor_parse_submit(text, appends):
    """A submit description -> [(settings dict, custom attrs dict, count)], unused-key warnings."""
    lines = []
    pending = ""
    for raw in text.splitlines():
        if pending:
            raw = pending + raw.lstrip()
            pending = ""
        if raw.rstrip().endswith("\\"):
            pending = raw.rstrip()[:-1]
            continue
        lines.append(raw)
    settings, custom, procs, seen_queue = {}, {}, [], False
    appends = list(appends)

    def do_queue(arg):
        for extra in appends:
            apply_line(extra)
        count = 1
        if arg.strip():
            first = arg.split()[0]
            if not re.fullmatch(r"\d+", first):
                raise ToolExit(f"ERROR: queue statement '{arg.strip()}' is not supported by this "
                               f"stand-in", 1)
            count = int(first)
        procs.append((dict(settings), dict(custom), count))

    def apply_line(line):
        line = line.strip()
        if not line or line.startswith("#"):
            return
        m = re.fullmatch(r"(?i)queue\b(.*)", line)
        if m and "=" not in line.split()[0]:
            nonlocal seen_queue
            seen_queue = True
            do_queue(m.group(1))
            return
        key, eq, value = line.partition("=")
        if not eq:
            key, sep, value = line.partition(":")
            if not sep:
                raise ToolExit(f"ERROR: Parse error in submit file: '{line}'", 1)  # APPROXIMATE
        key, value = key.strip(), value.strip()
        if key.startswith("+") or key.upper().startswith("MY."):
            custom[key.lstrip("+")[3:] if key.upper().startswith("MY.") else key[1:]] = value
        else:
            settings[key.lower()] = (key, value)

    for line in lines:
        apply_line(line)
    if not seen_queue:
        # APPROXIMATE: without a queue statement nothing is submitted.
        raise ToolExit("ERROR: Submit file has no 'queue' statement: no jobs submitted", 1)
    return procs


def condor_expand(value, settings, cluster, proc, depth=0):
    def sub(m):
        name = m.group(1)
        low = name.lower()
        if low in ("clusterid", "cluster"):
            return str(cluster)
        if low in ("procid", "process"):
            return str(proc)
        if low in ("step", "row", "node"):
            return "0"
        if low == "dollar":
            return "$"
        if name.upper().startswith("ENV(") and name.endswith(")"):
            return os.environ.get(name[4:-1], "")
        if low in settings and depth < 10:
            return condor_expand(settings[low][1], settings, cluster, proc, depth + 1)
        return ""
    return re.sub(r"(?<!\$)\$\(([^()]*(?:\([^()]*\))?)\)", sub, value)


def condor_submit(store, family, tool, args, stdin):
    dry_run = None
    terse = False
    appends = []
    batch_name = None
    files = []
    i = 0
    while i < len(args):
        a = args[i]
        low = a.lower()
        if low in ("-dry-run", "-dry"):
            if i + 1 >= len(args):
                raise ToolExit("ERROR: -dry-run requires another argument", 1)  # APPROXIMATE
            dry_run = args[i + 1]
            i += 2
        elif low in ("-terse",):
            terse = True
            i += 1
        elif low in ("-name", "-pool", "-remote", "-addr", "-queue", "-maxjobs"):
            if i + 1 >= len(args):
                raise ToolExit(f"ERROR: {a} requires another argument", 1)  # APPROXIMATE
            i += 2
        elif low in ("-append", "-a"):
            if i + 1 >= len(args):
                raise ToolExit(f"ERROR: {a} requires another argument", 1)  # APPROXIMATE
            appends.append(args[i + 1])
            i += 2
        elif low == "-batch-name":
            batch_name = args[i + 1] if i + 1 < len(args) else None
            i += 2
        elif low in ("-verbose", "-debug", "-disable", "-unused", "-spool", "-v"):
            i += 1
        elif low in ("-interactive", "-i"):
            raise ToolExit("ERROR: interactive jobs are not supported by this stand-in", 1)
        elif a.startswith("-") and a != "-":
            raise ToolExit(f"ERROR: unknown option {a}", 1)  # APPROXIMATE
        else:
            files.append(a)
            i += 1
    if len(files) > 1:
        raise ToolExit("ERROR: only one submit file may be given", 1)  # APPROXIMATE
    submit_cwd = os.getcwd()
    if not files or files[0] == "-":
        text = stdin().decode(errors="replace")
    else:
        try:
            with open(files[0]) as f:
                text = f.read()
        except OSError as e:
            raise ToolExit(f"ERROR: Failed to open command file ({e.strerror})", 1)
    if batch_name:
        appends.append(f"batch_name = {batch_name}")
    procs = condor_parse_submit(text, appends)
    cluster = store.peek("next_cluster")
    warnings = []
    prepared = []
    proc_index = 0
    for settings, custom, count in procs:
        for _ in range(count):
            prepared.append(condor_prepare(settings, custom, cluster, proc_index, submit_cwd,
                                           warnings))
            proc_index += 1
    for key, (orig, value) in (procs[-1][0].items() if procs else []):
        if key not in CONDOR_KEYS:
            warnings.append(f"WARNING: the line '{orig} = {value}' was unused by condor_submit. "
                            f"Is it a typo?")
    if dry_run is not None:
        ads = "\n".join("\n".join(f"{k} = {json.dumps(v) if isinstance(v, str) else v}"
                                  for k, v in sorted(ad.items())) + "\n"
                        for ad, _run in prepared)
        if dry_run == "-":
            sys.stdout.write(ads)
        else:
            try:
                with open(dry_run, "w") as f:
                    f.write(ads)
            except OSError as e:
                raise ToolExit(f"ERROR: Failed to open {dry_run}: {e.strerror}", 1)
        out = "Dry-Run job(s)" + "." * len(prepared) + "\n"
        out += f"{len(prepared)} job(s) dry-run to cluster {cluster}.\n"
        if warnings:
            sys.stderr.write("\n".join(dict.fromkeys(warnings)) + "\n")
        return out
    cluster = store.new_seq("next_cluster")
    for proc, (ad, run) in enumerate(prepared):
        job = new_job(store, family, cluster=cluster, proc=proc, name=ad.get("JobBatchName") or
                      os.path.basename(ad["Cmd"]), queue="", cpus=ad["RequestCpus"],
                      walltime=ad.get("AllowedJobDuration"), account=ad.get("AcctGroup"),
                      hold=False)
        job["condor"] = {"ad": ad, "log": run.pop("log", None)}
        job["run"] = run
        if job["cpus"] > TOTAL_CPUS:
            job["never_runs"] = True
        store.put(job)
        condor_log(job, "000", f"Job submitted from host: <127.0.0.1:9618?addrs=127.0.0.1-9618"
                               f"&alias={NODE}&noUDP&sock=schedd_{os.getpid()}>")
    schedule(store)
    if warnings:
        sys.stderr.write("\n".join(dict.fromkeys(warnings)) + "\n")
    if terse:
        return f"{cluster}.0 - {cluster}.{len(prepared) - 1}\n"
    return (f"Submitting job(s){'.' * len(prepared)}\n"
            f"{len(prepared)} job(s) submitted to cluster {cluster}.\n")


def condor_prepare(settings, custom, cluster, proc, submit_cwd, warnings):
    def get(key, default=None):
        if key not in settings:
            return default
        return condor_expand(settings[key][1], settings, cluster, proc)

    universe = (get("universe") or "vanilla").lower()
    if universe not in CONDOR_UNIVERSES:
        raise ToolExit(f"\nERROR: I don't know about the '{universe}' universe.", 1)
    if universe not in ("vanilla", "local", "scheduler"):
        raise ToolExit(f"ERROR: the {universe} universe is not supported by this stand-in", 1)
    iwd = os.path.join(submit_cwd, get("initialdir") or get("initial_dir") or ".")
    iwd = os.path.normpath(iwd)
    if not os.path.isdir(iwd):
        raise ToolExit(f"\nERROR: No such directory: {iwd}", 1)
    executable = get("executable")
    if not executable:
        raise ToolExit("\nERROR: No 'executable' parameter was provided", 1)  # APPROXIMATE
    exe = os.path.join(iwd, executable)
    if not os.path.exists(exe):
        raise ToolExit(f"\nERROR: Executable file {exe} does not exist", 1)
    raw_args = get("arguments", get("args", ""))
    argv, error = condor_args(raw_args or "")
    if error:
        raise ToolExit(f"\nERROR: Parse error in arguments: {error}: {raw_args}", 1)  # APPROX.
    ad = {"ClusterId": cluster, "ProcId": proc, "Cmd": exe, "Iwd": iwd,
          "JobUniverse": {"vanilla": 5, "scheduler": 7, "local": 12}[universe],
          "Owner": user_name(), "User": f"{user_name()}@{NODE}", "QDate": int(time.time()),
          "Arguments": " ".join(argv), "RequestCpus": 1, "RequestMemory": 128,
          "RequestDisk": 0, "JobStatus": 1, "EnteredCurrentStatus": int(time.time())}
    cpus = get("request_cpus")
    if cpus is not None:
        if not re.fullmatch(r"\s*\d+\s*", cpus):
            raise ToolExit(f"\nERROR: request_cpus = {cpus} is not a valid integer", 1)  # APPROX.
        ad["RequestCpus"] = int(cpus)
    memory = get("request_memory")
    if memory is not None:
        mib = condor_size(memory, 2**20)
        if mib is None:
            raise ToolExit(f"\nERROR: request_memory = {memory} is not a valid quantity",
                           1)  # APPROXIMATE
        ad["RequestMemory"] = -(-mib // 2**20)
    disk = get("request_disk")
    if disk is not None:
        kib = condor_size(disk, 2**10)
        if kib is None:
            raise ToolExit(f"\nERROR: request_disk = {disk} is not a valid quantity",
                           1)  # APPROXIMATE
        ad["RequestDisk"] = -(-kib // 2**10)
    duration = get("allowed_job_duration")
    if duration is not None:
        if not re.fullmatch(r"\s*\d+\s*", duration):
            raise ToolExit(f"\nERROR: allowed_job_duration = {duration} is not an integer",
                           1)  # APPROXIMATE
        ad["AllowedJobDuration"] = int(duration)
    if get("batch_name"):
        ad["JobBatchName"] = get("batch_name")
    if get("accounting_group"):
        ad["AcctGroup"] = get("accounting_group")
        ad["AccountingGroup"] = get("accounting_group") + "." + user_name()
    for key, value in custom.items():
        value = condor_expand(value, settings, cluster, proc)
        if re.fullmatch(r"-?\d+", value):
            ad[key] = int(value)
        elif value.startswith('"') and value.endswith('"'):
            ad[key] = value[1:-1]
        elif value.lower() in ("true", "false"):
            ad[key] = value.lower() == "true"
        else:
            ad[key] = value
    getenv = (get("getenv") or "false").strip()
    if getenv.lower() in ("true", "yes", "1", "t", "y"):
        env = dict(os.environ)
    elif getenv.lower() in ("false", "no", "0", "f", "n"):
        env = {}
    else:
        # A list of variable names or patterns (HTCondor 10).
        import fnmatch

        pats = [p.strip() for p in re.split(r"[,\s]+", getenv) if p.strip()]
        env = {k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)}
    ad["GetEnv"] = bool(env) and getenv.lower() in ("true", "yes", "1", "t", "y")
    environment = get("environment", get("env"))
    if environment:
        text = environment.strip()
        if text.startswith('"') and text.endswith('"'):
            words, err = condor_args(text)
            for w in words or []:
                k, eq, v = w.partition("=")
                if eq:
                    env[k] = v
        else:
            for w in text.split(";"):
                k, eq, v = w.strip().partition("=")
                if eq:
                    env[k] = v
    scratch = os.path.join(iwd)
    extra = {"_CONDOR_SCRATCH_DIR": scratch, "_CONDOR_SLOT": "slot1_1",
             "BATCH_SYSTEM": "HTCondor", "_CONDOR_JOB_IWD": iwd,
             "OMP_NUM_THREADS": str(ad["RequestCpus"]), "TMPDIR": scratch,
             "TEMP": scratch, "TMP": scratch}
    env = job_env(env, extra)
    run = {"argv": [exe] + argv, "cwd": iwd, "env": env}
    for key, attr in (("output", "Out"), ("error", "Err")):
        value = get(key)
        if value:
            path = os.path.join(iwd, value)
            if not os.path.isdir(os.path.dirname(path) or "."):
                raise ToolExit(f"\nERROR: Can't open \"{path}\"  with flags 01101 (No such file "
                               f"or directory)", 1)
            ad[attr] = path
        else:
            ad[attr] = "/dev/null"
    run["stdout"] = ad["Out"]
    run["stderr"] = None if ad["Err"] == ad["Out"] and ad["Out"] != "/dev/null" else ad["Err"]
    log = get("log")
    if log:
        path = os.path.join(iwd, log)
        if not os.path.isdir(os.path.dirname(path) or "."):
            raise ToolExit(f"\nERROR: Invalid log file: \"{path}\" (No such file or directory)", 1)
        ad["UserLog"] = path
        run["log"] = path
    return ad, run


def condor_log(job, code, text):
    path = (job.get("condor") or {}).get("log")
    if not path:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    entry = f"{code} ({job['cluster']:03d}.{job['proc']:03d}.000) {stamp} {text}\n...\n"
    _append(path, entry)


def condor_finalize(job, rc, stopping, exec_error):
    ad = job["condor"]["ad"]
    if exec_error is not None or stopping == "walltime":
        job["state"] = "held"
        if exec_error is not None:
            reason = (f"Error from slot1_1@{NODE}: Failed to execute '{job['run']['argv'][0]}'"
                      + (f" with arguments {' '.join(job['run']['argv'][1:])}"
                         if len(job['run']['argv']) > 1 else "")
                      + f": (errno={exec_error.errno}: '{exec_error.strerror}')")
            job["condor"].update(hold_reason=reason, hold_code=6, hold_subcode=exec_error.errno)
        else:
            # condor_schedd: "The job exceeded allowed job duration of %s" (format_time_short;
            # the duration's rendering here is APPROXIMATE).
            duration = ad.get("AllowedJobDuration") or 0
            reason = f"The job exceeded allowed job duration of {hms(duration)}"
            job["condor"].update(hold_reason=reason, hold_code=46, hold_subcode=0)
        job["held_time"] = time.time()
        condor_log(job, "012", f"Job was held.\n\t{job['condor']['hold_reason']}\n\t"
                               f"Code {job['condor']['hold_code']} Subcode "
                               f"{job['condor']['hold_subcode']}")
        return
    if stopping == "cancel":
        job["condor"]["removed"] = True
        condor_log(job, "009", f"Job was aborted.\n\tvia condor_rm (by user {job['user']})")
        return
    if rc is not None and rc < 0:
        detail = f"(0) Abnormal termination (signal {-rc})"
    else:
        detail = f"(1) Normal termination (return value {rc})"
    condor_log(job, "005", f"Job terminated.\n\t{detail}")


def condor_status(job):
    if job["state"] == "queued":
        return 1
    if job["state"] == "running":
        return 3 if job.get("stopping") == "cancel" else 2
    if job["state"] == "held":
        return 5
    return None  # completed or removed: no longer in the queue


def condor_ad(job):
    ad = dict(job["condor"]["ad"])
    status = condor_status(job)
    ad["JobStatus"] = status
    if status == 5:
        ad["HoldReason"] = job["condor"]["hold_reason"]
        ad["HoldReasonCode"] = job["condor"]["hold_code"]
        ad["HoldReasonSubCode"] = job["condor"]["hold_subcode"]
    if job.get("start_time"):
        ad["JobStartDate"] = int(job["start_time"])
        ad["JobCurrentStartDate"] = int(job["start_time"])
        ad["RemoteHost"] = f"slot1_1@{NODE}"
    ad["ServerTime"] = int(time.time())
    return ad


def _condor_select(store, operands, constraint_all=False):
    """Jobs in the queue matching cluster / cluster.proc / owner operands; unmatched operands."""
    jobs = [j for j in store.jobs() if j["family"] == "htcondor" and condor_status(j) is not None]
    if not operands:
        return ([j for j in jobs if constraint_all or j["user"] == user_name()], [])
    out, unmatched = [], []
    for op in operands:
        m = re.fullmatch(r"(\d+)(?:\.(\d+))?", op)
        if m:
            hit = [j for j in jobs if j["cluster"] == int(m.group(1))
                   and (m.group(2) is None or j["proc"] == int(m.group(2)))]
        else:
            hit = [j for j in jobs if j["user"] == op]
        if not hit:
            unmatched.append(op)
        out += [j for j in hit if j not in out]
    return out, unmatched


def condor_q(store, family, tool, args, stdin):
    as_json = as_long = False
    attrs = None
    operands = []
    allusers = False
    i = 0
    while i < len(args):
        a = args[i]
        low = a.lower()
        if low == "-json":
            as_json = True
        elif low in ("-long", "-l"):
            as_long = True
        elif low in ("-attributes", "-attribute", "-attr", "-at"):
            if i + 1 >= len(args):
                raise ToolExit("Error: -attributes requires a list of attributes", 1)  # APPROX.
            attrs = [x.strip() for x in args[i + 1].split(",") if x.strip()]
            i += 1
        elif low in ("-name", "-pool", "-constraint", "-const", "-format"):
            i += 1
        elif low in ("-allusers", "-all", "-nobatch", "-batch", "-totals", "-run", "-idle",
                     "-hold", "-wide", "-nototals", "-global", "-better-analyze", "-analyze"):
            allusers = allusers or low in ("-allusers", "-all")
        elif a.startswith("-"):
            raise ToolExit(f"Error: unrecognized argument {a}", 1)  # APPROXIMATE
        else:
            operands.append(a)
        i += 1
    jobs, _unmatched = _condor_select(store, operands, allusers)
    ads = []
    for job in jobs:
        ad = condor_ad(job)
        if attrs is not None:
            ad = {k: v for k, v in ad.items() if k in attrs}
        ads.append(ad)
    if as_json:
        if not ads:
            return ""  # condor_q -json prints nothing when no job matches
        return "[\n" + ",\n".join(
            "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(ad.items()))
            + "\n}" for ad in ads) + "\n]\n"
    if as_long:
        return "".join("\n".join(f"{k} = {_classad_value(v)}" for k, v in sorted(ad.items()))
                       + "\n\n" for ad in ads)
    counts = {s: sum(1 for j in jobs if condor_status(j) == n)
              for s, n in (("idle", 1), ("running", 2), ("removed", 3), ("held", 5))}
    when = time.strftime("%m/%d/%y %H:%M:%S")
    lines = ["", f"-- Schedd: {SCHEDD} : <127.0.0.1:9618?... @ {when}",
             " ID         OWNER            SUBMITTED     RUN_TIME ST PRI SIZE CMD"]
    letters = {1: "I", 2: "R", 3: "X", 5: "H"}
    for job in jobs:
        run_time = (time.time() - job["start_time"]) if job.get("start_time") else 0
        lines.append(f"{job['cluster']:>4}.{job['proc']:<5} {job['user']:<16} "
                     f"{time.strftime('%m/%d %H:%M', time.localtime(job['submit_time']))}   "
                     f"0+{hms(run_time)} {letters[condor_status(job)]}  0    0.0 "
                     f"{os.path.basename(job['condor']['ad']['Cmd'])}")
    lines.append("")
    lines.append(f"Total for query: {len(jobs)} jobs; 0 completed, {counts['removed']} removed, "
                 f"{counts['idle']} idle, {counts['running']} running, {counts['held']} held, "
                 f"0 suspended")
    return "\n".join(lines) + "\n"


def _classad_value(v):
    if isinstance(v, bool):
        return str(v).lower()
    return json.dumps(v) if isinstance(v, str) else v


def condor_rm(store, family, tool, args, stdin):
    operands = []
    all_jobs = False
    i = 0
    while i < len(args):
        a = args[i]
        low = a.lower()
        if low in ("-name", "-pool", "-constraint", "-reason", "-addr"):
            i += 2
            continue
        if low in ("-all", "-a"):
            all_jobs = True
        elif low in ("-forcex", "-debug"):
            pass
        elif a.startswith("-"):
            raise ToolExit(f"ERROR: Unknown option {a}", 1)  # APPROXIMATE
        else:
            operands.append(a)
        i += 1
    if not operands and not all_jobs:
        raise ToolExit("Usage: condor_rm [general-opts] [restriction-list] [options]", 1)
    out, errors = [], []
    targets = []
    if all_jobs:
        targets, _ = _condor_select(store, [])
        out.append("All jobs have been marked for removal\n")
    for op in operands:
        jobs, unmatched = _condor_select(store, [op])
        if unmatched:
            if re.fullmatch(r"\d+", op):
                errors.append(f"Couldn't find/remove all jobs in cluster {op}.")
            elif re.fullmatch(r"\d+\.\d+", op):
                errors.append(f"Job {op} not found")
            else:
                errors.append(f"Couldn't find/remove all jobs of user {op}.")
            continue
        targets += jobs
        if re.fullmatch(r"\d+", op):
            out.append(f"All jobs in cluster {op} have been marked for removal\n")
        elif re.fullmatch(r"\d+\.\d+", op):
            out.append(f"Job {op} marked for removal\n")
        else:
            out.append(f'All jobs of user "{op}" have been marked for removal\n')
    for job in targets:
        if job["state"] == "held":
            job["state"] = "ended"
            job["end_reason"] = job.get("end_reason") or "removed"
            job["condor"]["removed"] = True
            job["end_time"] = job.get("end_time") or time.time()
            store.put(job)
            condor_log(job, "009", f"Job was aborted.\n\tvia condor_rm (by user {job['user']})")
        else:
            request_stop(store, job, "cancel")
    if errors:
        sys.stdout.write("".join(out))
        sys.stdout.flush()
        raise ToolExit("\n".join(errors), 1)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Flux
# ---------------------------------------------------------------------------------------------

def parse_fsd(text, bare_unit=60.0):
    """Flux Standard Duration (RFC 23): N[.N] with s, m, h or d; a bare number is `bare_unit`."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)", text.strip())
    if not m:
        return None
    unit = {"": bare_unit, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * unit


class FluxArgs:
    """argparse, as flux's commands use it (same messages), built lazily."""

    @staticmethod
    def batch_parser():
        import argparse

        p = argparse.ArgumentParser(prog="flux batch",
                                    usage="flux batch [OPTIONS...] [SCRIPT] [ARGS...]")
        add = p.add_argument
        add("-q", "--queue")
        add("-B", "--bank")
        add("-t", "--time-limit")
        add("--urgency", type=int, default=16)
        add("-v", "--verbose", action="count", default=0)
        add("--job-name")
        add("-o", "--setopt", action="append")
        add("-S", "--setattr", action="append")
        add("--add-file", action="append")
        add("--begin-time")
        add("--dependency", action="append")
        add("--requires", action="append")
        add("--env", action="append")
        add("--env-remove", action="append")
        add("--env-file", action="append")
        add("--rlimit", action="append")
        add("--input")
        add("--output")
        add("--error")
        add("-l", "--label-io", action="store_true")
        add("--flags")
        add("--dry-run", action="store_true")
        add("--debug", action="store_true")
        add("--cwd")
        add("--signal")
        add("--taskmap")
        add("-n", "--nslots", type=int)
        add("-c", "--cores-per-slot", type=int, default=1)
        add("-g", "--gpus-per-slot", type=int)
        add("-N", "--nodes", type=int)
        add("-x", "--exclusive", action="store_true")
        add("--conf", action="append")
        add("--broker-opts", action="append")
        add("--dump")
        add("--wrap", action="store_true")
        add("SCRIPT", nargs=argparse.REMAINDER)
        return p

    @staticmethod
    def jobs_parser():
        import argparse

        class FilterTrue(argparse.Action):
            def __init__(self, option_strings, dest, **kw):
                super().__init__(option_strings, dest, nargs=0, default=False)

            def __call__(self, parser, ns, values, option_string=None):
                setattr(ns, self.dest, True)
                setattr(ns, "filtered", True)

        class FilterSet(argparse.Action):
            def __call__(self, parser, ns, values, option_string=None):
                setattr(ns, "filtered", True)
                getattr(ns, self.dest).update(values.split(","))

        class Filter(argparse.Action):
            def __call__(self, parser, ns, values, option_string=None):
                setattr(ns, self.dest, values)
                setattr(ns, "filtered", True)

        p = argparse.ArgumentParser(prog="flux-jobs")
        p.add_argument("-a", action=FilterTrue)
        p.add_argument("-A", action=FilterTrue)
        p.add_argument("-c", "--count", action=Filter, type=int, default=1000)
        p.add_argument("-f", "--filter", action=FilterSet, default=set())
        p.add_argument("--since", action=Filter, default=0.0)
        p.add_argument("-n", "--no-header", action="store_true")
        p.add_argument("-u", "--user", action=Filter, default=str(os.getuid()))
        p.add_argument("--name", action=Filter)
        p.add_argument("--queue", action=Filter)
        p.add_argument("-o", "--format", default="default")
        p.add_argument("--color", choices=["never", "always", "auto"], default="auto")
        p.add_argument("-R", "--recursive", action="store_true")
        p.add_argument("-L", "--level", type=int, default=9999)
        p.add_argument("--recurse-all", action="store_true")
        p.add_argument("--threads", type=int)
        p.add_argument("--stats", action="store_true")
        p.add_argument("--stats-only", action="store_true")
        p.add_argument("--json", action="store_true")
        p.add_argument("jobids", metavar="JOBID", type=FluxJobId, nargs="*")
        p.set_defaults(filtered=False)
        return p

    @staticmethod
    def cancel_parser():
        import argparse

        p = argparse.ArgumentParser(prog="flux-cancel", usage="flux cancel [OPTIONS] [JOBID...]")
        p.add_argument("--all", action="store_true")
        p.add_argument("-n", "--dry-run", action="store_true")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("-u", "--user")
        p.add_argument("-S", "--states", action="append")
        p.add_argument("-m", "--message")
        p.add_argument("jobids", metavar="JOBID...", type=FluxJobId, nargs="*")
        return p


class FluxJobId(int):
    """A job id argument (flux.job.JobID): any accepted encoding; keeps what was typed."""

    def __new__(cls, text):
        try:
            value = flux_decode(str(text))
        except ValueError:
            raise ValueError(f"invalid JobID value: {text!r}") from None
        obj = super().__new__(cls, value)
        obj.orig = str(text)
        return obj

    @property
    def f58(self):
        return f58_encode(int(self))

    @property
    def dec(self):
        return str(int(self))

    @property
    def hex(self):
        return f"{int(self):#018x}"

    def __str__(self):
        return self.f58


FluxJobId.__name__ = "JobID"


def flux_log(prog, level, message):
    sys.stderr.write(f"{prog}: {level}: {message}\n")


def flux_tool(store, family, tool, args, stdin):
    if not args:
        raise ToolExit("usage: flux [OPTIONS] COMMAND ARGS", 1)
    sub, rest = args[0], args[1:]
    if sub == "batch":
        return flux_batch(store, rest, stdin)
    if sub == "jobs":
        return flux_jobs(store, rest)
    if sub == "cancel":
        return flux_cancel(store, rest)
    if sub == "job" and rest[:1] == ["cancel"]:
        return flux_cancel(store, rest[1:])
    raise ToolExit(f"flux: '{sub}' is not a flux command.  See 'flux --help'", 1)  # APPROX.


def flux_directives(name, text):
    """RFC 36 directives (flux.job.directives.DirectiveParser): [(lineno, args)]."""
    regex = re.compile(r"^([^\w]*)((?:flux|FLUX):)(.*)$")
    out = []
    started = disabled = False
    last = 0
    sentinel = prefix = None
    for lineno, line in enumerate(text.splitlines(True), 1):
        m = regex.match(line)
        if not m:
            if started and not disabled and not line.startswith(prefix.rstrip()) and line.strip():
                disabled = True
                last = lineno - 1
            continue
        started = True
        if disabled:
            raise ToolExit(f"flux-batch: ERROR: {name}: line {lineno}: orphan '{m.group(2)}' "
                           f"detected: directives disabled after line {last}", 1)
        if sentinel is None:
            sentinel, prefix = m.group(1) + m.group(2), m.group(1)
        elif m.group(1) + m.group(2) != sentinel:
            raise ToolExit(f"flux-batch: ERROR: {name}: line {lineno}: sentinel changed from "
                           f"'{sentinel}' to '{m.group(1) + m.group(2)}'", 1)
        value = m.group(3)
        lexer = shlex.shlex(value, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.escapedquotes = "\"'"
        try:
            words = list(lexer)
        except ValueError as e:
            raise ToolExit(f"flux-batch: ERROR: {name}: line {lineno}: {value}: {e}", 1)
        if not words:
            continue
        if not words[0].startswith("-"):
            raise ToolExit(f"flux-batch: ERROR: {name}: line {lineno}: Unknown directive: "
                           f"{value}", 1)
        out.append((lineno, words))
    return out


def flux_batch(store, argv, stdin):
    parser = FluxArgs.batch_parser()
    args = parser.parse_args(argv)  # argparse errors: usage + message, exit 2 (as flux)
    if args.SCRIPT:
        name = args.SCRIPT[0]
        if args.wrap:
            text = "#!/bin/sh\n" + " ".join(args.SCRIPT) + "\n"
        else:
            try:
                with open(name, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ToolExit(f"flux-batch: ERROR: {e.strerror}: '{name}'", 1)
            except UnicodeError:
                raise ToolExit(f"flux-batch: ERROR: {name} does not appear to be a script, "
                               f"or failed to encode as utf-8", 1)
    else:
        name = "stdin"
        text = stdin().decode("utf-8", errors="replace")
    # Directives first, then the command line on top (flux.cli.batch.parse_directive_args).
    ns = None
    for lineno, words in flux_directives(name, text):
        try:
            ns = parser.parse_args(words, namespace=ns)
        except SystemExit:
            flux_log("flux-batch", "ERROR", f"argument parsing failed at {name} line {lineno}")
            raise ToolExit("", 2)
    args = parser.parse_args(argv, namespace=ns)
    if not text.startswith("#!"):
        # APPROXIMATE: flux.job.JobspecV1.from_batch_command refuses a script without #!.
        raise ToolExit(f"flux-batch: ERROR: {args.job_name or name}: batch script must start "
                       f"with #!", 1)
    if not args.nslots:
        if not args.nodes:
            raise ToolExit("flux-batch: ERROR: Number of slots to allocate must be specified", 1)
        args.nslots = args.nodes
        args.exclusive = True
    time_limit = None
    if args.time_limit is not None:
        time_limit = parse_fsd(args.time_limit)
        if time_limit is None:
            raise ToolExit(f"flux-batch: ERROR: invalid Flux standard duration "
                           f"'{args.time_limit}'", 1)  # APPROXIMATE
    job_name = args.job_name or (args.SCRIPT[0] if args.SCRIPT else "batch")
    cpus = args.nslots * (args.cores_per_slot or 1)
    if args.exclusive and args.nodes:
        cpus = max(cpus, TOTAL_CPUS * args.nodes)
    cwd = os.path.abspath(args.cwd) if args.cwd else os.getcwd()
    output = args.output or "flux-{{id}}.out"
    jobspec = {"version": 1,
               "resources": [{"type": "slot", "count": args.nslots, "label": "task",
                              "with": [{"type": "core", "count": args.cores_per_slot or 1}]}],
               "tasks": [{"command": ["flux", "broker", "{{tmpdir}}/script"],
                          "slot": "task", "count": {"per_slot": 1}}],
               "attributes": {"system": {"duration": time_limit or 0, "cwd": cwd,
                                         "job": {"name": job_name},
                                         "shell": {"options": {"output": {"stdout": {
                                             "type": "file", "path": output}}}},
                                         "files": {"script": {"data": text}}}}}
    if args.queue:
        jobspec["attributes"]["system"]["queue"] = args.queue
    if args.bank:
        jobspec["attributes"]["system"]["bank"] = args.bank
    if args.dry_run:
        return json.dumps(jobspec, ensure_ascii=False) + "\n"
    # Submission: the job-manager validates the queue (queue.c: "'%s' is not a valid queue").
    queue = args.queue or DEFAULT_QUEUE
    if queue not in QUEUES:
        raise ToolExit(f"flux-batch: ERROR: '{queue}' is not a valid queue", 1)
    epoch = store.meta().get("epoch", time.time())
    seq = store.peek()
    fluid = (max(1, int((time.time() - epoch) * 1000)) << 24) | (seq % 1024)
    job = new_job(store, "flux", fluid=fluid, name=job_name, queue=queue, cpus=cpus,
                  walltime=time_limit, account=args.bank)
    jid = f58_encode(fluid)
    env = dict(os.environ)
    for item in args.env or []:
        k, eq, v = item.partition("=")
        if eq:
            env[k.lstrip("-")] = v
    for item in args.env_remove or []:
        env.pop(item, None)
    extra = {"FLUX_JOB_ID": jid, "FLUX_JOB_SIZE": "1", "FLUX_JOB_NNODES": "1",
             "FLUX_TASK_RANK": "0", "FLUX_TASK_LOCAL_ID": "0", "FLUX_JOB_CC": "",
             "FLUX_URI": f"local://{store.spool}/{job['seq']}.flux"}
    env = job_env(env, extra)
    env.pop("FLUX_JOB_CC")
    out_path = os.path.join(cwd, flux_template(output, jid, fluid, job_name))
    err_path = None
    if args.error:
        err_path = os.path.join(cwd, flux_template(args.error, jid, fluid, job_name))
    spath = spool_script(store, job["seq"], text)
    job["run"] = {"argv": [spath] + list(args.SCRIPT[1:]), "cwd": cwd, "env": env,
                  "stdout": out_path, "stderr": err_path}
    job["flux"] = {"jobspec_queue": queue}
    if (args.nodes or 1) > 1 or cpus > TOTAL_CPUS:
        # sched-simple raises a fatal alloc exception: the job ends at once, FAILED.
        job["state"] = "ended"
        job["end_time"] = time.time()
        job["end_reason"] = "unsatisfiable"
    store.put(job)
    schedule(store)
    return f"{jid}\n"


def flux_template(text, jid, fluid, name):
    return (text.replace("{{id}}", jid).replace("{{jobid}}", jid).replace("{{id.f58}}", jid)
            .replace("{{id.dec}}", str(fluid)).replace("{{id.hex}}", f"{fluid:#018x}")
            .replace("{{name}}", name))


def flux_state(job):
    if job["state"] == "queued":
        return "SCHED"
    if job["state"] == "running":
        return "RUN"
    return "INACTIVE"


def flux_result(job):
    if job["state"] != "ended":
        return ""
    reason = job.get("end_reason")
    if reason == "cancel":
        return "CANCELED"
    if reason == "walltime":
        return "TIMEOUT"
    if reason is None and job.get("exit_code") == 0:
        return "COMPLETED"
    return "FAILED"


class _NS:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def flux_info(job):
    state = flux_state(job)
    result = flux_result(job)
    jid = FluxJobId(f58_encode(job["fluid"]))
    runtime = 0.0
    if job.get("start_time"):
        runtime = (job.get("end_time") or time.time()) - job["start_time"]
    rc = job.get("exit_code")
    status = state if state != "INACTIVE" else result
    abbrev = {"SCHED": "S", "RUN": "R", "COMPLETED": "CD", "FAILED": "F", "CANCELED": "CA",
              "TIMEOUT": "TO"}.get(status, status[:2])
    exc_type = {"CANCELED": "cancel", "TIMEOUT": "timeout"}.get(result, "")
    if job.get("end_reason") == "unsatisfiable":
        exc_type = "alloc"
    return _NS(id=jid, state=state, state_single=state[0], result=result,
               result_abbrev={"COMPLETED": "CD", "FAILED": "F", "CANCELED": "CA",
                              "TIMEOUT": "TO"}.get(result, ""),
               status=status, status_abbrev=abbrev, name=job["name"], queue=job["queue"],
               username=job["user"], userid=os.getuid(), ntasks=1, nnodes=1,
               ncores=job["cpus"], runtime=runtime, t_submit=job["submit_time"],
               t_run=job.get("start_time") or 0.0, t_inactive=job.get("end_time") or 0.0,
               returncode="" if rc is None else (128 - rc if rc < 0 else rc),
               nodelist=NODE if job.get("start_time") else "", urgency=16, priority=16,
               success=result == "COMPLETED", waitstatus=rc,
               exception=_NS(occurred=bool(exc_type), type=exc_type, severity=0 if exc_type else "",
                             note=""), duration=job.get("walltime") or 0.0,
               annotations=_NS(), dependencies=[])


FLUX_HEADERS = {"id": "JOBID", "id.f58": "JOBID", "id.dec": "JOBID", "id.hex": "JOBID",
                "state": "STATE", "state_single": "ST", "result": "RESULT", "status": "STATUS",
                "status_abbrev": "ST", "result_abbrev": "RS", "name": "NAME", "queue": "QUEUE",
                "username": "USER", "userid": "UID", "ntasks": "NTASKS", "nnodes": "NNODES",
                "runtime": "RUNTIME", "nodelist": "NODELIST", "returncode": "RC"}


def flux_format(fmt, info):
    import string

    class Fmt(string.Formatter):
        def get_field(self, field_name, args, kwargs):
            obj = info
            for part in field_name.split("."):
                obj = getattr(obj, part)
            return obj, field_name

        def format_field(self, value, spec):
            if isinstance(value, FluxJobId) and not spec:
                return str(int(value))
            if isinstance(value, FluxJobId):
                return format(str(int(value)), spec)
            return format(value, spec)

    return Fmt().format(fmt)


def flux_jobs(store, argv):
    parser = FluxArgs.jobs_parser()
    args = parser.parse_args(argv)
    fmt = args.format
    if "{" not in fmt:
        if fmt != "default":
            raise ToolExit(f"flux-jobs: ERROR: --format: No such format {fmt}", 1)
        fmt = ("{id.f58:>12} {queue:<8.8} {username:<8.8} {name:<10.10} {status_abbrev:>2.2} "
               "{ntasks:>6} {nnodes:>6} {runtime:>8.3f} {nodelist}")
    if args.jobids and args.filtered and not args.recursive:
        flux_log("flux-jobs", "WARNING", "Filtering options ignored with jobid list")
    errors = []
    jobs = []
    if args.jobids:
        for jid in args.jobids:
            job = next((j for j in store.jobs() if j["family"] == "flux"
                        and j["fluid"] == int(jid)), None)
            if job is None:
                errors.append(f"JobID {jid.orig} unknown")
            else:
                jobs.append(job)
    else:
        filters = {f.lower() for f in args.filter}
        if args.a or args.A:
            filters |= {"pending", "running", "inactive"}
        if not filters:
            filters = {"pending", "running"}
        for job in store.jobs():
            if job["family"] != "flux":
                continue
            state = flux_state(job)
            group = {"SCHED": "pending", "RUN": "running", "INACTIVE": "inactive"}[state]
            result = flux_result(job).lower()
            if not (group in filters or state.lower() in filters or
                    (result and (result in filters
                                 or result.replace("canceled", "cancelled") in filters))):
                continue
            if args.name and job["name"] != args.name:
                continue
            if args.queue and job["queue"] != args.queue:
                continue
            jobs.append(job)
        jobs = jobs[-args.count:] if args.count else jobs
        jobs.reverse()  # newest first, as flux jobs lists
    lines = []
    if not args.no_header:
        header = re.sub(r"\{([^}:!]+)[^}]*\}",
                        lambda m: FLUX_HEADERS.get(m.group(1), m.group(1).upper()), fmt)
        lines.append(header)
    for job in jobs:
        try:
            lines.append(flux_format(fmt, flux_info(job)))
        except (AttributeError, ValueError) as e:
            raise ToolExit(f"flux-jobs: ERROR: Error in user format: {e}", 1)
    for err in errors:
        print(err, file=sys.stderr)
    return "".join(line + "\n" for line in lines)


def flux_cancel(store, argv):
    parser = FluxArgs.cancel_parser()
    args = parser.parse_args(argv)
    if args.user or args.states:
        args.all = True
    if args.jobids and args.all:
        raise ToolExit("flux-cancel: ERROR: Do not specify a list of jobids with "
                       "--all,--user,--states options", 1)
    if args.all:
        targets = [j for j in store.jobs() if j["family"] == "flux" and active(j)]
        if args.dry_run:
            sys.stderr.write(f"flux-cancel: Would cancel {len(targets)} job"
                             f"{'s' if len(targets) != 1 else ''}\n")
            return ""
        for job in targets:
            request_stop(store, job, "cancel")
        if targets:
            sys.stderr.write(f"flux-cancel: Canceled {len(targets)} job"
                             f"{'s' if len(targets) != 1 else ''} (0 errors)\n")
        elif not args.quiet:
            sys.stderr.write("flux-cancel: Matched 0 jobs\n")
        return ""
    if not args.jobids:
        raise ToolExit("flux-cancel: ERROR: No target jobs were provided", 1)
    if args.dry_run:
        n = len(args.jobids)
        sys.stderr.write(f"flux-cancel: Would cancel {n} job{'s' if n != 1 else ''}\n")
        return ""
    errors = 0
    for jid in args.jobids:
        job = next((j for j in store.jobs() if j["family"] == "flux" and j["fluid"] == int(jid)),
                   None)
        if job is None:
            flux_log("flux-cancel", "ERROR", f"{jid}: unknown job id")
            errors += 1
        elif job["state"] == "ended":
            flux_log("flux-cancel", "ERROR", f"{jid}: job is inactive")
            errors += 1
        else:
            request_stop(store, job, "cancel")
    if errors:
        raise ToolExit("", 1)
    return ""


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

TOOLS = {
    ("pbs", "qsub"): pbs_qsub, ("pbs", "qstat"): pbs_qstat, ("pbs", "qdel"): pbs_qdel,
    ("torque", "qsub"): pbs_qsub, ("torque", "qstat"): pbs_qstat, ("torque", "qdel"): pbs_qdel,
    ("moab", "msub"): pbs_qsub, ("moab", "canceljob"): moab_canceljob,
    ("moab", "showq"): moab_showq, ("moab", "qsub"): pbs_qsub, ("moab", "qstat"): pbs_qstat,
    ("moab", "qdel"): pbs_qdel,
    ("lsf", "bsub"): lsf_bsub, ("lsf", "bjobs"): lsf_bjobs, ("lsf", "bkill"): lsf_bkill,
    ("htcondor", "condor_submit"): condor_submit, ("htcondor", "condor_q"): condor_q,
    ("htcondor", "condor_rm"): condor_rm,
    ("flux", "flux"): flux_tool,
}


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) >= 4 and argv[1] == "--shepherd":
        shepherd(argv[2], int(argv[3]))
        return 0
    tool = os.environ.get("TASKCORE_STANDIN_TOOL") or os.path.basename(argv[0])
    family = os.environ.get("TASKCORE_STANDIN_FAMILY", "")
    root = os.environ.get("TASKCORE_STANDIN_DIR")
    if family not in FAMILIES:
        sys.stderr.write(f"{tool}: TASKCORE_STANDIN_FAMILY must be one of "
                         f"{', '.join(sorted(FAMILIES))} (got {family!r})\n")
        return 1
    if not root:
        sys.stderr.write(f"{tool}: TASKCORE_STANDIN_DIR is not set\n")
        return 1
    func = TOOLS.get((family, tool))
    if func is None:
        sys.stderr.write(f"{tool}: command not found\n")
        return 127
    def stdin():
        """The submit commands read a script from stdin only when given none."""
        try:
            return sys.stdin.buffer.read()
        except (OSError, ValueError, AttributeError):
            return b""
    store = Store(root)
    try:
        with store.lock():
            schedule(store)
            _FREE_CACHE["free"] = TOTAL_CPUS - sum(
                j["cpus"] for j in store.jobs()
                if j["state"] == "running" or (j["state"] == "queued" and j.get("allocated")))
            out = func(store, family, tool, argv[1:], stdin)
    except ToolExit as e:
        sys.stdout.flush()
        if e.message:
            stream = sys.stdout if e.stdout else sys.stderr
            stream.write(e.message + "\n")
            stream.flush()
        return e.code
    if out:
        sys.stdout.buffer.write(out.encode("utf-8"))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
