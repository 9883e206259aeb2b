"""A real single-node Sun Grid Engine (Debian's gridengine 8.1.9) for the job-queue tests.

`SGEServer` runs sge_qmaster and sge_execd in the foreground (`SGE_ND=1`) as children of
this process and ends them by their PIDs (never by name). Unlike the SLURM server it
cannot be private: the packages configure one cell, `default` under /var/lib/gridengine,
with its state in /var/spool/gridengine (Berkeley DB spooling) and fixed ports
(6444/6445, /etc/services). So there is one SGE per machine: `start()` refuses to run
next to an sge_qmaster or sge_execd it did not start (it never kills those), and it is
idempotent and repairs what an earlier session left behind (stale pid files, jobs of a
killed run: deleted, forcibly when the execd cannot end them). scripts/system-deps.sh
installs and pre-configures the packages.

What `start()` sets up (measured on Debian 12, 2 cores, gridengine 8.1.9):

- `$SGE_ROOT/$SGE_CELL/common/host_aliases` = "<host> localhost" (the host name resolves
  to 127.0.0.1, which resolves back to "localhost": without the alias every client gets
  "access denied" after about 1 s), and `act_qmaster` = this host (the name may differ
  from the one the package was installed under, e.g. in a container).
- Submit host and exec host <host>; global configuration `min_uid 0`, `min_gid 0`
  (root's jobs are refused otherwise) and `accounting_flush_time=00:00:00` in
  reporting_params, so `qacct -j ID` finds a job as soon as it has left qstat (with the
  package's default, flush_time 15 s, qacct lagged 5-14 s behind: code that reads exit
  statuses with qacct must retry that long on a real cluster); scheduler
  `schedule_interval 0:0:1`, `flush_submit_sec 1`, `flush_finish_sec 1`,
  `queue_sort_method seqno`.
- Queues `all.q` (8 slots, seq_no 0) and `bigmem.q` (4 slots, seq_no 10) on <host>:
  more slots than the 2 cores, so several jobs run at once; `pe_list NONE` (no parallel
  environment exists: `-pe smp 2` is refused at submission); `load_thresholds NONE` (a
  busy machine would otherwise put the queues in alarm state and jobs would wait). A job
  without `-q` goes to all.q while it has free slots (seqno sorting), then to bigmem.q.
  Everything else is the package's default: `shell /bin/sh`, `shell_start_mode
  posix_compliant` (the script's #! line is ignored: it runs under /bin/sh unless `-S`),
  the job's shell is a login shell (`-sh`, `-bash`: /etc/profile and ~/.profile run and
  reset PATH even with `-V`), no h_vmem/h_rt limits.
- The daemons run with a small environment (`DAEMON_PATH`, SGE_ROOT, SGE_CELL): a job
  inherits the execd's environment, so the test process's variables must not leak in
  (a job sees the submitter's variables only with `qsub -V` or `-v`). SGE_ND=1 does
  reach the jobs.

Timings: qmaster answers about 0.2-0.7 s after it starts, the queues are ready about
0.4 s after the execd starts (start() takes 1.1-1.6 s); a job starts 150-300 ms after
`qsub`, but qstat shows it `t` until the execd confirms it, about 1 s later (a short
job can leave qstat without ever being `r`); a finished job leaves qstat about 1 s
after it ended. `qdel` of a running
job ends it in about 1 s (it goes `dr` meanwhile), but a `qdel` that races the job's
dispatch (right after `qsub`) can take about 10 s.

Stopping: sge_execd exits about 1 s after SIGTERM, sge_qmaster 6-10 s after it. A plain
SIGKILL of the qmaster is not safe: it keeps the job-id counter (`qmaster/jobseqnum`)
in memory and writes it only at shutdown, so after SIGKILL the next session hands out
the same job ids again (measured: 78 twice; `qacct -j 78` then finds two jobs). strace
shows the shutdown: the qmaster joins its threads (one of them wakes only every
second and quits after about 5 s; `qconf -kt scheduler` first does not help), writes
jobseqnum and arseqnum, closes its Berkeley DB spool (fdatasync, close, munmap), and
then only waits 1-3 s more for idle threads before logging "controlled shutdown" and
creating `qmaster/lock` (read by sge_shadowd only). So `stop()` sends SIGTERM to both
daemons at once and SIGKILLs the qmaster as soon as it has no spool file open or
mapped any more (`_spool_closed`): a stop takes about 6 s instead of 8-10 s, and the
next start continues the job ids.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .batch_server import BatchServer

SGE_ROOT = "/var/lib/gridengine"
SGE_CELL = "default"
SPOOL = Path("/var/spool/gridengine")
QMASTER_SPOOL = SPOOL / "qmaster"
EXECD_SPOOL = SPOOL / "execd"
RUN_DIR = Path("/var/run/gridengine")
ADMIN_USER = "sgeadmin"
QMASTER = "/usr/sbin/sge_qmaster"
EXECD = "/usr/sbin/sge_execd"
GETHOSTNAME = "/usr/lib/gridengine/gethostname"
CLIENTS = ("qsub", "qstat", "qdel", "qconf", "qacct")
QMASTER_PORT = 6444

# Queue name -> (slots, seq_no). all.q is filled first (queue_sort_method seqno).
QUEUES = {"all.q": (8, 0), "bigmem.q": (4, 10)}
DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The package's queue template (`qconf -aq`), hostlist/slots/seq_no/pe_list/
# load_thresholds filled in by `_queue_conf`.
QUEUE_TEMPLATE = """\
qname                 @NAME@
hostlist              @HOST@
seq_no                @SEQ@
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               NONE
rerun                 FALSE
slots                 @SLOTS@
tmpdir                /tmp
shell                 /bin/sh
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
"""

GLOBAL_CONF = {"min_uid": "0", "min_gid": "0",
               "reporting_params": "accounting=true reporting=false flush_time=00:00:15 "
                                   "joblog=false sharelog=00:00:00 "
                                   "accounting_flush_time=00:00:00"}
SCHED_CONF = {"schedule_interval": "0:0:1", "flush_submit_sec": "1",
              "flush_finish_sec": "1", "queue_sort_method": "seqno"}


class SGEError(RuntimeError):
    pass


def _cell():
    return Path(SGE_ROOT) / SGE_CELL / "common"


def missing_components():
    """Why an SGEServer cannot run here (a list of reasons; empty when it can)."""
    out = []
    if os.geteuid() != 0:
        out.append("root (the daemons start as root and switch to sgeadmin)")
    for path in (QMASTER, EXECD):
        if not os.access(path, os.X_OK):
            out.append(f"{path} (apt packages gridengine-master, gridengine-exec: "
                       "scripts/system-deps.sh)")
    for name in CLIENTS:
        if shutil.which(name) is None:
            out.append(f"{name} on PATH (apt package gridengine-client)")
    if not (_cell() / "bootstrap").exists() or not (SPOOL / "spooldb" / "sge").exists():
        out.append(f"the cell {SGE_ROOT}/{SGE_CELL} and its spool (the packages' debconf "
                   "configuration: scripts/system-deps.sh preseeds it)")
    return out


def _tail(path: Path, lines=25):
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  ({path.name}: {e})"
    return "\n".join(f"  {line}" for line in text[-lines:]) or f"  ({path.name} is empty)"


def _live_daemon(pid_file: Path, name):
    """The PID in `pid_file` if it is a live (not zombie) process whose command is `name`."""
    try:
        pid = int(pid_file.read_text().split()[0])
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X") or name.encode() not in cmdline:
        return None
    return pid


def _spool_closed(pid):
    """True when process `pid` has no file of the Berkeley DB spool open or mapped (the
    qmaster closes it during shutdown, after writing jobseqnum)."""
    spooldb = str(SPOOL / "spooldb")
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(spooldb):
                    return False
            except OSError:
                pass
        with open(f"/proc/{pid}/maps") as f:
            return spooldb not in f.read()
    except OSError:
        return True  # gone


def _fields(text):
    """SGE's "name value" lines (continued over lines ending in a backslash) as a dict
    name -> value with its white space normalized."""
    out = {}
    for line in text.replace("\\\n", " ").splitlines():
        parts = line.split(None, 1)
        if parts and not parts[0].startswith("#"):
            out[parts[0]] = " ".join(parts[1].split()) if len(parts) > 1 else ""
    return out


def _set_fields(text, values):
    """`text` (SGE's "name value" lines) with the fields in `values` replaced."""
    for key, value in values.items():
        # A value may go on over lines ending in a backslash.
        text, n = re.subn(rf"^{re.escape(key)}[ \t]+(?:.*\\\n)*.*$",
                          lambda _: f"{key} {value}", text, flags=re.M)
        if n != 1:
            raise SGEError(f"field {key!r} not found (or twice) in:\n{text}")
    return text


class SGEServer(BatchServer):
    """The machine's single-node SGE: `start()`, `stop()`, `env`, `jobs()`, `wait_idle()`.

    `env` is os.environ plus SGE_ROOT and SGE_CELL, for the subprocesses (qsub, qstat,
    qdel, ...) that talk to it.
    """

    label = "SGE"
    error = SGEError
    missing = staticmethod(missing_components)

    def force_delete(self, job_ids):
        # a qdel that raced the job's dispatch can hang in "dr" for long
        self.run("qdel", "-f", *job_ids, check=False)
        return True

    def __init__(self, queues=None, log_dir=None):
        self.queues = dict(QUEUES if queues is None else queues)
        self._own_dir = log_dir is None
        self.dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="tc-sge-"))
        self.hostname = None
        self.procs = {}  # name -> Popen, in start order
        self.stale_jobs = []  # jobs found (and deleted) by start()

    # -- environments ----------------------------------------------------------------------

    @property
    def env(self):
        env = {**os.environ, "SGE_ROOT": SGE_ROOT, "SGE_CELL": SGE_CELL}
        env.pop("SGE_ND", None)
        return env

    def _daemon_env(self):
        return {"PATH": DAEMON_PATH, "SGE_ROOT": SGE_ROOT, "SGE_CELL": SGE_CELL,
                "SGE_ND": "1", "HOME": "/root", "LANG": "C.UTF-8"}

    # -- lifecycle -------------------------------------------------------------------------

    def _start(self, timeout):
        if self.procs:
            return  # already started by this object
        self._check_not_running()
        self._prepare()
        self._spawn("qmaster", QMASTER)
        self._wait(self._qmaster_ok, timeout, "sge_qmaster to answer")
        self.configure()
        self._spawn("execd", EXECD)
        self._wait(self.queues_ready, timeout, "the queues to be ready")
        # A killed earlier session may have left jobs (kept in the qmaster's database).
        self.stale_jobs = self.jobs()
        if self.stale_jobs:
            self.cancel_all()
            if self.wait_idle(5, raise_=False):
                self.run("qdel", "-f", *[j for j, _ in self.jobs()], check=False)
            self.wait_idle(timeout)

    def _check_not_running(self):
        """Refuse to start next to daemons someone else started; drop stale pid files."""
        qm = QMASTER_SPOOL / "qmaster.pid"
        pid = _live_daemon(qm, "sge_qmaster")
        if pid is not None:
            raise SGEError(f"an sge_qmaster not started by this server runs (pid {pid}, "
                           f"{qm}): stop it first")
        for pid_file in EXECD_SPOOL.glob("*/execd.pid"):
            pid = _live_daemon(pid_file, "sge_execd")
            if pid is not None:
                raise SGEError(f"an sge_execd not started by this server runs (pid {pid}, "
                               f"{pid_file}): stop it first")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", QMASTER_PORT)) == 0:
                raise SGEError(f"port {QMASTER_PORT} (sge_qmaster) is in use by another "
                               "process")
        for pid_file in [qm, *EXECD_SPOOL.glob("*/execd.pid")]:
            pid_file.unlink(missing_ok=True)  # stale: the daemon is gone

    def _prepare(self):
        os.chmod(self.dir, 0o755)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(RUN_DIR, ADMIN_USER, ADMIN_USER)
        env = self._daemon_env()
        try:  # the name SGE resolves this host to (as the daemons will)
            name = subprocess.run([GETHOSTNAME, "-aname"], env=env, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            name = ""
        self.hostname = name or socket.gethostname()
        self._write_if_changed(_cell() / "host_aliases", f"{self.hostname} localhost\n")
        self._write_if_changed(_cell() / "act_qmaster", f"{self.hostname}\n")

    @staticmethod
    def _write_if_changed(path: Path, text):
        try:
            if path.read_text() == text:
                return
        except OSError:
            pass
        path.write_text(text)
        os.chmod(path, 0o644)

    def _spawn(self, name, exe):
        out = open(self.dir / f"{name}.out", "ab")
        try:
            self.procs[name] = subprocess.Popen([exe], stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, cwd="/",
                                                env=self._daemon_env())
        finally:
            out.close()

    def _qmaster_ok(self):
        return self.run("qstat", "-u", "*", check=False, timeout=10).returncode == 0

    def _wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise SGEError(f"waiting for {what}: exited {dead}\n{self.logs()}")
            try:
                if predicate():
                    return
            except (subprocess.SubprocessError, SGEError, ET.ParseError):
                pass
            if time.monotonic() > deadline:
                raise SGEError(f"timed out after {timeout} s waiting for {what}\n"
                               f"{self.logs()}")
            time.sleep(0.1)

    def configure(self):
        """Submit/exec host, global and scheduler configuration, the queues. Idempotent."""
        h = self.hostname
        self.run("qconf", "-as", h, check=False)  # "already exists" when it does
        if self.run("qconf", "-se", h, check=False).returncode != 0:
            eh = self.dir / "exechost"
            eh.write_text(f"hostname {h}\nload_scaling NONE\ncomplex_values NONE\n"
                          "user_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\n"
                          "usage_scaling NONE\nreport_variables NONE\n")
            self.run("qconf", "-Ae", str(eh))
        conf = self.run("qconf", "-sconf", "global").stdout
        if any(_fields(conf).get(k) != v for k, v in GLOBAL_CONF.items()):
            # -Mconf takes the configuration's name ("global") from the file's name.
            (self.dir / "global").write_text(_set_fields(conf, GLOBAL_CONF))
            self.run("qconf", "-Mconf", str(self.dir / "global"))
        sconf = self.run("qconf", "-ssconf").stdout
        if any(_fields(sconf).get(k) != v for k, v in SCHED_CONF.items()):
            (self.dir / "sched").write_text(_set_fields(sconf, SCHED_CONF))
            self.run("qconf", "-Msconf", str(self.dir / "sched"))
        existing = self.run("qconf", "-sql", check=False).stdout.split()
        for name, (slots, seq) in self.queues.items():
            path = self.dir / f"queue-{name}"
            path.write_text(QUEUE_TEMPLATE.replace("@NAME@", name).replace("@HOST@", h)
                            .replace("@SLOTS@", str(slots)).replace("@SEQ@", str(seq)))
            self.run("qconf", "-Mq" if name in existing else "-Aq", str(path))

    def queues_ready(self):
        """Every queue of ours has its instance on this host, in no state (not u, a, d, E)."""
        root = ET.fromstring(self.run("qstat", "-f", "-xml", "-u", "*", timeout=10).stdout)
        states = {q.findtext("name"): (q.findtext("state") or "")
                  for q in root.iter("Queue-List")}
        return all(states.get(f"{q}@{self.hostname}") == "" for q in self.queues)

    def logs(self, lines=25):
        """The tails of the daemons' outputs and message files (for error messages)."""
        paths = [self.dir / "qmaster.out", self.dir / "execd.out",
                 QMASTER_SPOOL / "messages", *sorted(EXECD_SPOOL.glob("*/messages"))]
        return "\n".join(f"--- {p} (last {lines} lines)\n{_tail(p, lines)}"
                         for p in paths if p.exists())

    def stop(self, cancel=True, timeout=30.0, kill_timeout=20.0):
        """Delete every job (`cancel`), wait (bounded) until qstat shows none (forcing
        `qdel -f` on what is left), then SIGTERM sge_execd and sge_qmaster by PID, both
        at once, and wait for them: the qmaster is SIGKILLed once it has closed its
        spool (see the module's docstring), anything else after `kill_timeout`.
        Returns the jobs qstat still showed after the wait ([] normally)."""
        left = []
        qmaster = self.procs.get("qmaster")
        try:
            if cancel and qmaster is not None and qmaster.poll() is None:
                try:
                    self.cancel_all()
                    left = self.wait_idle(timeout, raise_=False)
                    if left:
                        self.run("qdel", "-f", *[j for j, _ in left], check=False)
                        self.wait_idle(5, raise_=False)
                except (SGEError, subprocess.SubprocessError, ET.ParseError):
                    pass
        finally:
            procs = {n: self.procs.pop(n) for n in ("execd", "qmaster") if n in self.procs}
            qmaster = procs.get("qmaster")
            # Only a qmaster seen with its spool open may be killed once it is closed.
            early_kill = qmaster is not None and not _spool_closed(qmaster.pid)
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + kill_timeout
            while any(p.poll() is None for p in procs.values()):
                if early_kill and qmaster.poll() is None and _spool_closed(qmaster.pid):
                    qmaster.kill()
                if time.monotonic() > deadline:
                    for p in procs.values():
                        if p.poll() is None:
                            p.kill()
                    break
                time.sleep(0.05)
            for p in procs.values():
                p.wait(10)
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
        return left

    # -- commands --------------------------------------------------------------------------

    def qsub(self, *args, **kwargs):
        """`qsub -terse ARGS`: the job id (a string)."""
        return self.run("qsub", "-terse", *args, **kwargs).stdout.strip()

    def jobs(self):
        """[(job_id, state letters)] of every user's jobs qstat knows: pending (qw, hqw,
        Eqw, ...), running (r, t, dr, ...). A finished job is gone from qstat."""
        root = ET.fromstring(self.run("qstat", "-xml", "-u", "*", timeout=10).stdout)
        return [(j.findtext("JB_job_number"), j.findtext("state"))
                for j in root.iter("job_list")]

    def cancel_all(self):
        """qdel every job qstat shows; returns their [(job_id, state)]."""
        jobs = self.jobs()
        if jobs:
            self.run("qdel", *[j for j, _ in jobs], check=False, timeout=10)
        return jobs
