"""A real single-node SLURM (Debian's slurm-wlm 22.05) for the job-queue tests.

`SlurmServer` runs its own munged, slurmctld and slurmd, each in the foreground as a
child of this process and ended by its PID (never by name), with a private
configuration in a temporary directory: `slurm.conf` (point `SLURM_CONF` at it, see
`env`), state, spool, pid and log files, and munged's own socket. Nothing under /etc is
read except /etc/munge/munge.key, and nothing there is written. Ports are picked
free, so two servers (two test sessions) can run on one machine.

What the configuration gives (measured on Debian 12, 2 cores, slurm-wlm 22.05.8):

- One node, `hostname -s`, at 127.0.0.1, claiming `CPUS` (8) CPUs and `REAL_MEMORY`
  (16000) MB whatever the machine has: `SlurmdParameters=config_overrides` (without it
  slurmd registers the real 2 CPUs and the node goes INVALID_REG, "Low socket*core*thread
  count, Low CPUs"). `SelectTypeParameters=CR_Core`: CPUs are consumed, memory is not,
  so `--mem` up to 16000M is accepted and never makes a job wait (with CR_Core_Memory
  a job without `--mem` takes the whole node's memory and jobs run one at a time);
  `--mem` above it is refused at submission.
- Partitions `debug` (default), `bigmem` and `restricted`, all on that node.
  `restricted` admits only account `acct-ok`. SLURM cannot check that itself without
  slurmdbd: `AllowAccounts=` then leaves every job of the partition pending for ever
  ("Job's account not known, so it can't use this partition"), and with
  EnforcePartLimits=ALL it refuses every job, the allowed account too. So a job_submit
  Lua script (`JobSubmitPlugins=lua`) refuses other accounts at submission, with
  SLURM's own error ("Invalid account or account/partition combination specified").
  Accounts are not checked anywhere else (`--account=anything` runs in `debug`).
- `EnforcePartLimits=ALL`: impossible requests fail at submission instead of pending.
- Two GPUs as SLURM generic resources (`GresTypes=gpu`, `Gres=gpu:2`), so `--gres=gpu:N`
  is scheduled, counted and refused past 2 by SLURM itself, and the job gets
  `CUDA_VISIBLE_DEVICES` from its gres plugin. There is no GPU: gres.conf names two
  device files of our own (`dev/nvidia0`, `dev/nvidia1`, character devices with
  /dev/null's numbers), which is all SLURM needs to number and hand out the devices.
- Fast scheduling; `MinJobAge` 30 s (finished jobs stay visible to `squeue --states=all`
  30 to about 40 s); `OverTimeLimit=0`, `KillWait=5`. slurmctld checks time limits only
  every 30 s, so a `--time=1` job ends 60 to 90 s after it starts (TIMEOUT).
- No accounting: `sacct` fails ("Slurm accounting storage is disabled", exit 1).
- `proctrack/linuxproc`: a daemonized (double-forked) process escapes `scancel`.
"""
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from .batch_server import BatchServer

MUNGED = "/usr/sbin/munged"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGE_KEY = "/etc/munge/munge.key"
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "srun", "munge", "unmunge", "setpriv")

CPUS = 8
REAL_MEMORY = 16000  # MB
GPUS = 2             # gres/gpu on the node, backed by device files of our own
PARTITIONS = ("debug", "bigmem", "restricted")
ALLOWED_ACCOUNT = "acct-ok"  # the only account partition "restricted" admits

# squeue's states of a job that is not finished (queued, running or on its way there).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT",
                 "STOPPED", "RESV_DEL_HOLD"}

JOB_SUBMIT_LUA = """\
-- Written by tests/deploy/jobqueue/slurm_server.py. Without slurmdbd SLURM knows no
-- accounts, so AllowAccounts cannot work: partition "restricted" admits only account
-- @ALLOWED@, checked here at submission.
function slurm_job_submit(job_desc, part_list, submit_uid)
    for p in string.gmatch(job_desc.partition or "", "[^,]+") do
        if p == "restricted" and job_desc.account ~= "@ALLOWED@" then
            slurm.log_user("Invalid account %s for partition restricted (allowed: @ALLOWED@)",
                           tostring(job_desc.account))
            return slurm.ESLURM_INVALID_ACCOUNT
        end
    end
    return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    return slurm.SUCCESS
end
"""


class SlurmError(RuntimeError):
    pass


def missing_components():
    """Why a SlurmServer cannot run here (a list of reasons; empty when it can)."""
    out = []
    if os.geteuid() != 0:
        out.append("root (slurmd and munged run as root and munge)")
    for path in (MUNGED, SLURMCTLD, SLURMD):
        if not os.access(path, os.X_OK):
            out.append(f"{path} (apt packages slurm-wlm, munge: scripts/system-deps.sh)")
    for name in CLIENTS:
        if shutil.which(name) is None:
            out.append(f"{name} on PATH")
    if not os.path.exists(MUNGE_KEY):
        out.append(f"{MUNGE_KEY} (scripts/system-deps.sh creates it)")
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines=25):
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  ({path.name}: {e})"
    return "\n".join(f"  {line}" for line in text[-lines:]) or f"  ({path.name} is empty)"


class SlurmServer(BatchServer):
    """A private single-node SLURM: `start()`, `stop()`, `env`, `jobs()`, `wait_idle()`.

    `env` is os.environ plus SLURM_CONF, for the subprocesses (sbatch, squeue, ...) that
    must talk to this cluster; jobs inherit it (sbatch's default `--export=ALL`).
    """

    label = "SLURM"
    error = SlurmError
    missing = staticmethod(missing_components)

    def settled(self):
        return self.node_states() == ["idle"]

    def idle_detail(self):
        return f", node {self.node_states()}"

    def __init__(self, directory=None, cpus=CPUS, real_memory=REAL_MEMORY, min_job_age=30,
                 kill_wait=5):
        self._own_dir = directory is None
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="tc-slurm-"))
        self.cpus = cpus
        self.real_memory = real_memory
        self.min_job_age = min_job_age
        self.kill_wait = kill_wait
        self.hostname = socket.gethostname().split(".")[0]  # `hostname -s`
        self.cluster = "tc" + uuid.uuid4().hex[:6]
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.ctld_port = self.slurmd_port = None
        self.procs = {}  # name -> Popen, in start order

    # -- configuration ---------------------------------------------------------------------

    def _config(self):
        d, h = self.dir, self.hostname
        lines = [
            f"ClusterName={self.cluster}",
            f"SlurmctldHost={h}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "GresTypes=gpu",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "JobSubmitPlugins=lua",
            "EnforcePartLimits=ALL",
            f"MinJobAge={self.min_job_age}",
            "OverTimeLimit=0",
            f"KillWait={self.kill_wait}",
            "InactiveLimit=0",
            # The node claims what the tests want, not what the machine has.
            "SlurmdParameters=config_overrides",
            f"NodeName={h} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory}"
            f" Gres=gpu:{GPUS} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "PartitionName=bigmem Nodes=ALL MaxTime=INFINITE State=UP",
            "PartitionName=restricted Nodes=ALL MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    @property
    def env(self):
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- lifecycle -------------------------------------------------------------------------

    def _start(self, timeout):
        # munged (as user munge) must reach its socket: every directory on the way 0755.
        os.chmod(self.dir, 0o755)
        for sub in ("state", "spool", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir / "munge", "munge", "munge")
        os.chmod(self.dir / "munge", 0o755)
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self._gpu_devices()
        self.conf.write_text(self._config())
        (self.dir / "job_submit.lua").write_text(  # next to slurm.conf: where SLURM looks
            JOB_SUBMIT_LUA.replace("@ALLOWED@", ALLOWED_ACCOUNT))

        m = self.dir / "munge"
        self._spawn("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                               MUNGED, "-F", f"--socket={self.munge_socket}",
                               f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}", f"--key-file={MUNGE_KEY}"])
        self._wait(self._munge_ok, 10, "munged to answer")
        self._spawn("slurmctld", [SLURMCTLD, "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [SLURMD, "-D", "-f", str(self.conf), "-N", self.hostname])
        self._wait(lambda: self.node_states() == ["idle"], timeout, "the node to be idle")

    def _gpu_devices(self):
        """gres.conf (next to slurm.conf) and the device files it names; see the module doc."""
        dev = self.dir / "dev"
        dev.mkdir(exist_ok=True)
        for i in range(GPUS):
            path = dev / f"nvidia{i}"
            if not path.exists():
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (self.dir / "gres.conf").write_text(f"Name=gpu File={dev}/nvidia[0-{GPUS - 1}]\n")

    def _spawn(self, name, cmd):
        out = open(self.dir / f"{name}.out", "wb")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, env=self.env)
        finally:
            out.close()

    def _munge_ok(self):
        sock = f"--socket={self.munge_socket}"
        cred = subprocess.run(["munge", "-n", sock], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge", sock], input=cred.stdout, capture_output=True,
                              timeout=10).returncode == 0

    def _wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise SlurmError(f"waiting for {what}: exited {dead}\n{self.logs()}")
            try:
                if predicate():
                    return
            except (subprocess.SubprocessError, SlurmError):
                pass
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout} s waiting for {what}\n"
                                 f"sinfo: {self.run('sinfo', check=False).stdout.strip()!r}\n"
                                 f"{self.logs()}")
            time.sleep(0.1)

    def logs(self, lines=25):
        """The tails of the daemons' logs (for error messages)."""
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out"):
            if (self.dir / name).exists():
                out.append(f"--- {self.dir / name} (last {lines} lines)\n{_tail(self.dir / name, lines)}")
        return "\n".join(out)

    def stop(self, cancel=True, timeout=15.0):
        """Cancel every job (`cancel`), wait (bounded) until squeue shows none, then end
        slurmd, slurmctld and munged by PID (SIGTERM, SIGKILL after 10 s). Returns the
        jobs squeue still showed after the wait ([] normally): their processes may have
        outlived the daemons (slurmstepd is not a child of slurmd)."""
        left = []
        ctld = self.procs.get("slurmctld")
        try:
            if cancel and ctld is not None and ctld.poll() is None:
                try:
                    self.cancel_all()
                    left = self.wait_idle(timeout, raise_=False)
                except (SlurmError, subprocess.SubprocessError):
                    pass
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                p = self.procs.pop(name, None)
                if p is None:
                    continue
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(10)
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        return left

    # -- commands --------------------------------------------------------------------------

    def sbatch(self, *args, **kwargs):
        """`sbatch --parsable ARGS`: the job id (a string)."""
        return self.run("sbatch", "--parsable", *args, **kwargs).stdout.strip().split(";")[0]

    def node_states(self):
        return self.run("sinfo", "-h", "-o", "%t", timeout=10).stdout.split()

    def jobs(self, all_states=False):
        """[(jobid, state)] from squeue: jobs not finished yet; with `all_states`, also
        those that ended less than MinJobAge (30 s) ago (COMPLETED, CANCELLED, FAILED,
        TIMEOUT, ...)."""
        args = ["squeue", "-h", "-o", "%i %T"] + (["--states=all"] if all_states else [])
        out = self.run(*args, timeout=10).stdout
        return [tuple(line.split(None, 1)) for line in out.splitlines() if line.strip()]

    def cancel_all(self):
        """scancel every job this cluster has not finished; returns their [(jobid, state)]."""
        jobs = self.jobs()
        if jobs:
            self.run("scancel", *[j for j, _ in jobs], check=False, timeout=10)
        return jobs
