"""A real single-node OAR 2.5.9 (Debian's oar-server, oar-node, oar-user, PostgreSQL 15)
for the job-queue tests.

Unlike SLURM, OAR cannot run from a private directory: its configuration is
/etc/oar/oar.conf, its state is the PostgreSQL database `oar`, and its ports are fixed
(Almighty 6666, the node's sshd 6667, PostgreSQL 5432). So there is one OAR per machine,
and `OARServer` holds a lock (/run/tc-oar/lock) for its whole life: a second test session
waits for the first one.

`start()`:
- PostgreSQL 15's `main` cluster: started as a child of this process (the `postgres`
  binary in the foreground, as user postgres) unless one is already running (then it is
  used and left running).
- /etc/oar/oar.conf: the database passwords when empty, and
  SCHEDULER_MIN_TIME_BETWEEN_2_CALLS="0" (OAR's default, 5 s, defers a scheduling asked
  for less than 5 s after the previous one to Almighty's next wake-up, up to 10 s later:
  a job submitted just after another one ended waited about 10.6 s instead of 0.5 s).
- The database `oar`: created once (`oar-database --create --db-is-local`); an existing
  one is kept (its roles get the configured passwords again if they do not match).
- oar-node's sshd (port 6667, /etc/oar/sshd_config: it runs every job, as user oar) and
  Almighty (oar-server), each a child of this process, ended by PID (Almighty with its
  process group), unless one already answers on its port (then it is used and left).
- `RESOURCES` (8) resources on host `localhost` (`oarnodesetting -a -h localhost`), with
  property `core` = 1..8 (`oarproperty -a core`: `-l /nodes=1/core=2` needs it),
  `memcore` = MEMCORE (2048, for dask-jobqueue's `#OAR -p memcore>=N`) and `cpuset`
  spread over this machine's CPUs (OAR's cgroup job manager pins each job to the
  cpusets of its resources; with the default cpuset 0 every job ran on CPU 0 only), all
  Alive. Several jobs run at once.
- Queue `debug` (priority 5) next to OAR's admin, default and besteffort.
- The user `USER` (tcoar, home /home/tcoar, /bin/bash), created when missing: OAR's
  admission rules refuse jobs from root and from user oar.
- Jobs left by an earlier session are deleted (and waited for).
Daemons that an earlier session of this module started and left running (killed test
run) are found by their pid files in /run/tc-oar, ended by PID and started again.

Pitfalls (measured): OAR's client commands wait for ever, silently, while PostgreSQL is
down (always give them a timeout). When a user's last job on the host ends, OAR deletes
every file that user owns in /tmp, /dev/shm and /var/tmp: submit from, and write into,
the user's home (`make_dir`). A job does not inherit the submitter's environment (PATH
is /usr/lib/oar/oardodo:/usr/local/bin:/usr/bin:/bin:/usr/games; its bash sources the
user's ~/.bashrc); its working directory is the submission directory. A script given with
`-S` is run from its path when the job starts: it must still exist then and be
executable. oarsub takes the job's directory from $PWD, not from its own working
directory: without PWD it fails (exit 8, "OAR_JOB_ID=" with no number), with a stale one
the job runs there (`run_as_user` sets PWD to `cwd`). An `#OAR` line's value is taken
verbatim to the end of the line, quotes included: `#OAR -p "memcore>=1024"` is refused
(SQL identifier `"memcore>=1024"`), `#OAR -p memcore>=1024` works.
"""
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from taskcore.deploy.launcher import is_alive

from .batch_server import BatchServer

USER = "tcoar"
RESOURCES = 8
MEMCORE = 2048  # property memcore (MiB per core) of every resource: `-p memcore>=N`
# Queues added next to OAR's own admin, default (the default) and besteffort.
QUEUES = {"debug": "debug,5,oar_sched_gantt_with_timesharing_and_fairsharing"}
HOST = "localhost"  # the resources' network_address

OAR_CONF = Path("/etc/oar/oar.conf")
OAR_SSHD_CONF = "/etc/oar/sshd_config"
OAR_LOG = Path("/var/log/oar.log")
ALMIGHTY = "/usr/sbin/Almighty"  # setuid wrapper: execs /usr/lib/oar/Almighty as oar
SSHD = "/usr/sbin/sshd"
PG_VERSION = "15"
POSTGRES = f"/usr/lib/postgresql/{PG_VERSION}/bin/postgres"
PG_CONF_DIR = f"/etc/postgresql/{PG_VERSION}/main"
PG_RUN_DIR = Path("/var/run/postgresql")
STATE_DIR = Path("/run/tc-oar")
SERVER_PORT, NODE_PORT, PG_PORT = 6666, 6667, 5432
CLIENTS = ("oarsub", "oarstat", "oardel", "oarnodes", "oarnodesetting", "oarproperty",
           "oar-database", "psql", "pg_isready", "runuser", "setpriv", "useradd")
PASSWORDS = {"DB_BASE_PASSWD": "tc-oar", "DB_BASE_PASSWD_RO": "tc-oar-ro"}
CONF = {"SCHEDULER_MIN_TIME_BETWEEN_2_CALLS": "0"}

# What plain `oarstat` lists (jobs not finished); a finished job is Terminated or Error
# and is listed only by `oarstat -j ID`, for ever (it stays in the database).
ACTIVE_STATES = ("Waiting", "Hold", "toLaunch", "toAckReservation", "Launching",
                 "Running", "Suspended", "Resuming", "Finishing")
FINAL_STATES = ("Terminated", "Error")


class OARError(RuntimeError):
    pass


def missing_components():
    """Why an OARServer cannot run here (a list of reasons; empty when it can)."""
    out = []
    if os.geteuid() != 0:
        out.append("root (OAR's daemons, PostgreSQL and the test user)")
    for path, pkg in ((ALMIGHTY, "oar-server"), ("/usr/lib/oar/oarexec", "oar-node"),
                      (POSTGRES, f"postgresql-{PG_VERSION}"), (SSHD, "openssh-server")):
        if not os.path.exists(path):
            out.append(f"{path} (apt package {pkg}: scripts/system-deps.sh)")
    for name in CLIENTS:
        if shutil.which(name) is None:
            out.append(f"{name} on PATH")
    if not os.path.exists(f"{PG_CONF_DIR}/postgresql.conf"):
        out.append(f"PostgreSQL cluster {PG_VERSION}/main (pg_createcluster: "
                   "scripts/system-deps.sh)")
    if not OAR_CONF.exists():
        out.append(f"{OAR_CONF} (apt package oar-common)")
    try:
        pwd.getpwnam("oar")
    except KeyError:
        out.append("user oar (created by the OAR packages)")
    return out


def _port_open(port, host="127.0.0.1"):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tail(path, lines=25):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  ({path}: {e})"
    return "\n".join(f"  {line}" for line in text[-lines:]) or f"  ({path} is empty)"


class _Daemon:
    """A daemon this process started (or an earlier session's, adopted from its pid file):
    ended by PID, or by process group when `group`."""

    def __init__(self, name, marker, group=False):
        self.name, self.marker, self.group = name, marker, group
        self.pidfile = STATE_DIR / f"{name}.pid"
        self.out = STATE_DIR / f"{name}.out"
        self.proc = None
        self.pid = None

    def start(self, cmd, **kw):
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd="/",
                                         start_new_session=True, **kw)
        self.pid = self.proc.pid
        self.pidfile.write_text(f"{self.pid}\n")

    def running(self):
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and is_alive(self.pid)

    def leftover(self):
        """The pid of this daemon left by an earlier session (pid file, process alive and
        still this daemon), or None."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if is_alive(pid) and self.marker in _cmdline(pid):
            return pid
        self.pidfile.unlink(missing_ok=True)
        return None

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        pid = self.pid
        if pid is None:
            return
        try:
            (os.killpg if self.group else os.kill)(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.running() or (self.group and self._group_left()):
            try:
                (os.killpg if self.group else os.kill)(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 5
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.proc is not None:
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                pass
        self.proc = self.pid = None
        self.pidfile.unlink(missing_ok=True)

    def _group_left(self):
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


class OARServer(BatchServer):
    """OAR on this machine, for the tests: `start()`, `stop()`, `jobs()`, `cancel_all()`,
    `wait_idle()`; `run(...)` (an OAR command as root), `run_as_user(...)`, `submit(...)`
    and `make_dir()` for the test user (`user`, `home`)."""

    label = "OAR"
    error = OARError
    idle_poll = 0.2
    missing = staticmethod(missing_components)

    def __init__(self, user=USER, resources=RESOURCES):
        self.user = user
        self.resources = resources
        self.daemons = {"postgres": _Daemon("postgres", POSTGRES),
                        "sshd": _Daemon("sshd", OAR_SSHD_CONF),
                        "almighty": _Daemon("almighty", "/usr/lib/oar/Almighty", group=True)}
        self.reused = []  # daemons found running (not ours): used, never stopped
        self._lock = None

    @property
    def home(self):
        return Path(pwd.getpwnam(self.user).pw_dir)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout=60.0, lock_timeout=300.0):
        self.check_can_run()
        STATE_DIR.mkdir(mode=0o755, exist_ok=True)
        self._take_lock(lock_timeout)  # one OAR per machine: a second session waits here
        return self._start_or_stop(timeout)

    def _take_lock(self, timeout):
        self._lock = open(STATE_DIR / "lock", "w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    raise OARError(f"another test session holds {STATE_DIR / 'lock'} "
                                   f"(OAR is one per machine) for more than {timeout} s")
                time.sleep(0.5)

    def _start(self, timeout):
        self._ensure_user()
        # Daemons an earlier session of this module left running: end them (by PID).
        for name in ("almighty", "sshd", "postgres"):
            d = self.daemons[name]
            pid = d.leftover()
            if pid is not None:
                d.pid = pid
                d.stop(signal.SIGINT if name == "postgres" else signal.SIGTERM)

        self._start_postgres(timeout)
        self._configure()
        self._ensure_database()

        if _port_open(NODE_PORT):
            self.reused.append(f"sshd on port {NODE_PORT}")
        else:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
            self.daemons["sshd"].start([SSHD, "-D", "-e", "-f", OAR_SSHD_CONF,
                                        "-o", f"PidFile={STATE_DIR / 'sshd.sshd-pid'}"])
            self._wait(lambda: _port_open(NODE_PORT), timeout, f"sshd on port {NODE_PORT}")
        if _port_open(SERVER_PORT):
            self.reused.append(f"Almighty on port {SERVER_PORT}")
        else:
            self.daemons["almighty"].start([ALMIGHTY])
            self._wait(lambda: _port_open(SERVER_PORT), timeout,
                       f"Almighty on port {SERVER_PORT}")

        self._ensure_resources()
        queues = re.findall(r"^(\S+)$", self.run("oarnotify", "-l").stdout, re.M)
        for name, spec in QUEUES.items():
            if name not in queues:
                self.run("oarnotify", "--add-queue", spec)
        # Jobs an earlier session left: delete them.
        left = self.cancel_all()
        if left:
            left = self._wait_gone(30)
        if left:
            raise OARError(f"jobs of an earlier session do not go away: {left}\n{self.logs()}")

    def _ensure_user(self):
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            subprocess.run(["useradd", "-m", "-d", f"/home/{self.user}", "-s", "/bin/bash",
                            self.user], check=True, capture_output=True, timeout=30)
            pw = pwd.getpwnam(self.user)
        home = Path(pw.pw_dir)
        if not home.is_dir():
            home.mkdir(parents=True, mode=0o755)
        st = home.stat()
        if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
            os.chown(home, pw.pw_uid, pw.pw_gid)

    def _start_postgres(self, timeout):
        if self._pg_ready():
            self.reused.append(f"PostgreSQL on port {PG_PORT}")
            return
        pw = pwd.getpwnam("postgres")
        PG_RUN_DIR.mkdir(mode=0o2775, exist_ok=True)
        os.chown(PG_RUN_DIR, pw.pw_uid, pw.pw_gid)
        self.daemons["postgres"].start(
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
             POSTGRES, "-D", PG_CONF_DIR])
        self._wait(self._pg_ready, timeout, f"PostgreSQL on port {PG_PORT}")

    def _pg_ready(self):
        return subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(PG_PORT)],
                              timeout=10).returncode == 0

    def _conf(self):
        values = {}
        for line in OAR_CONF.read_text().splitlines():
            m = re.match(r'^([A-Z_0-9]+)="?(.*?)"?\s*$', line)
            if m:
                values[m.group(1)] = m.group(2)
        return values

    def _configure(self):
        conf = self._conf()
        want = dict(CONF)
        for key, value in PASSWORDS.items():
            if not conf.get(key):
                want[key] = value
        text = original = OAR_CONF.read_text()
        for key, value in want.items():
            if conf.get(key) == value:
                continue
            line = f'{key}="{value}"'
            text, n = re.subn(rf"^{key}=.*$", line, text, flags=re.M)
            if not n:
                text = (text.rstrip("\n")
                        + f"\n# set by tests/deploy/jobqueue/oar_server.py\n{line}\n")
        if text != original:
            OAR_CONF.write_text(text)  # same inode: owner oar, mode 600 kept

    def _psql(self, sql):
        return subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-Atc", sql],
                              capture_output=True, text=True, timeout=30, cwd="/")

    def _ensure_database(self):
        conf = self._conf()
        name = conf.get("DB_BASE_NAME", "oar")
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if exists.returncode != 0:
            raise OARError(f"psql as postgres failed: {exists.stderr.strip()}")
        if exists.stdout.strip() != "1":
            r = subprocess.run(["oar-database", "--create", "--db-is-local"],
                               capture_output=True, text=True, timeout=120, cwd="/")
            if r.returncode != 0:
                raise OARError(f"oar-database --create failed ({r.returncode}):\n"
                               f"{r.stdout}{r.stderr}")
        if self._db_check():
            return
        # The database is there but the roles' passwords are not the configured ones.
        for login, passwd in (("DB_BASE_LOGIN", "DB_BASE_PASSWD"),
                              ("DB_BASE_LOGIN_RO", "DB_BASE_PASSWD_RO")):
            role, secret = conf.get(login), conf.get(passwd, "").replace("'", "''")
            if role:
                self._psql(f"ALTER ROLE \"{role}\" PASSWORD '{secret}'")
        if not self._db_check():
            r = subprocess.run(["oar-database", "--check"], capture_output=True, text=True,
                               timeout=30, cwd="/")
            raise OARError(f"the OAR database is not usable: {r.stdout}{r.stderr}")

    def _db_check(self):
        return subprocess.run(["oar-database", "--check"], capture_output=True,
                              timeout=30, cwd="/").returncode == 0

    def _cpus(self):
        return sorted(os.sched_getaffinity(0)) or [0]

    def _ensure_resources(self):
        props = self.run("oarproperty", "-l").stdout.split()
        for prop in ("core", "memcore"):
            if prop not in props:
                self.run("oarproperty", "-a", prop)
        cpus = self._cpus()
        mine = [r for r in self.nodes() if r.get("network_address") == HOST]
        for _ in range(self.resources - len(mine)):
            self.run("oarnodesetting", "-a", "-h", HOST)
        mine = sorted((r for r in self.nodes() if r.get("network_address") == HOST),
                      key=lambda r: int(r["resource_id"]))
        for i, r in enumerate(mine):
            core, cpuset = str(i + 1), str(cpus[i % len(cpus)])
            if (str(r.get("core")), str(r.get("cpuset")), str(r.get("memcore"))) != (
                    core, cpuset, str(MEMCORE)):
                self.run("oarnodesetting", "-r", str(r["resource_id"]), "-p", f"core={core}",
                         "-p", f"cpuset={cpuset}", "-p", f"memcore={MEMCORE}")
            if r.get("state") != "Alive":
                self.run("oarnodesetting", "-r", str(r["resource_id"]), "-s", "Alive")
        self._wait(lambda: sum(r.get("state") == "Alive" for r in self.nodes()
                               if r.get("network_address") == HOST) >= self.resources,
                   30, f"{self.resources} Alive resources")

    def _wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            dead = {n: d.proc.returncode for n, d in self.daemons.items()
                    if d.proc is not None and d.proc.poll() is not None}
            if dead:
                raise OARError(f"waiting for {what}: exited {dead}\n{self.logs()}")
            try:
                if predicate():
                    return
            except (subprocess.SubprocessError, OARError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise OARError(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines=25):
        """The tails of OAR's log and of the daemons' output (for error messages)."""
        out = [f"--- {OAR_LOG} (last {lines} lines)\n{_tail(OAR_LOG, lines)}"]
        for d in self.daemons.values():
            if d.out.exists():
                out.append(f"--- {d.out} (last {lines} lines)\n{_tail(d.out, lines)}")
        return "\n".join(out)

    def stop(self, cancel=True, timeout=30.0):
        """Delete every job (`cancel`) and wait (bounded) until none is listed; then end
        Almighty, the node's sshd and PostgreSQL if this server started them (by PID;
        SIGKILL after 15 s). Returns the jobs still listed after the wait ([] normally)."""
        left = []
        try:
            if cancel and _port_open(SERVER_PORT) and self._pg_ready():
                try:
                    if self.cancel_all():
                        left = self._wait_gone(timeout)
                except (OARError, subprocess.SubprocessError):
                    pass
        finally:
            for name in ("almighty", "sshd", "postgres"):
                d = self.daemons[name]
                if d.running():
                    # postgres: SIGINT is the fast shutdown (SIGTERM waits for clients).
                    d.stop(signal.SIGINT if name == "postgres" else signal.SIGTERM)
            if self._lock is not None:
                self._lock.close()
                self._lock = None
        return left

    # -- commands --------------------------------------------------------------------------

    def run(self, *cmd, **kwargs):
        """An OAR command as root, from / (OAR's clients wait for ever without the
        database: always bounded by the timeout)."""
        kwargs.setdefault("cwd", "/")
        return super().run(*cmd, **kwargs)

    def force_delete(self, job_ids):
        self.run("oardel", "--force-terminate-finishing-job", *job_ids, check=False)
        return True

    def user_env(self, **extra):
        """A login-like environment for the test user (nothing of this process's own)."""
        return {"HOME": str(self.home), "USER": self.user, "LOGNAME": self.user,
                "SHELL": "/bin/bash", "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8", **extra}

    def run_as_user(self, *cmd, check=True, timeout=30, env=None, cwd=None, **kwargs):
        """`cmd` as the test user (runuser), in `cwd` (default: its home), with
        `user_env()`, PWD=cwd, plus `env`. Returns the CompletedProcess (text)."""
        full = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self.user, "--", *cmd]
        cwd = str(cwd or self.home)
        # PWD too: oarsub takes the job's directory from $PWD, not from its cwd.
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              env=self.user_env(**{"PWD": cwd, **(env or {})}), cwd=cwd,
                              **kwargs)
        if check and proc.returncode != 0:
            raise OARError(f"{' '.join(cmd)} (as {self.user}) failed ({proc.returncode}): "
                           f"{proc.stdout.strip()} {proc.stderr.strip()}")
        return proc

    def submit(self, *args, cwd=None, **kwargs):
        """`oarsub ARGS` as the test user (from `cwd`, default its home): the job id (a
        string). A refused submission exits non-zero (and prints `OAR_JOB_ID=-5`)."""
        proc = self.run_as_user("oarsub", *args, cwd=cwd, check=False, **kwargs)
        ids = re.findall(r"^OAR_JOB_ID=(\d+)$", proc.stdout, re.M)
        if proc.returncode != 0 or len(ids) != 1:
            raise OARError(f"oarsub {' '.join(args)} failed ({proc.returncode}): "
                           f"{proc.stdout.strip()} {proc.stderr.strip()}")
        return ids[0]

    def make_dir(self, prefix="tc-"):
        """A new directory in the test user's home, owned by it (jobs write there; never
        /tmp, which OAR empties of the user's files when its last job ends)."""
        pw = pwd.getpwnam(self.user)
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=pw.pw_dir))
        os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chmod(d, 0o755)
        return d

    def _json(self, *args, timeout=30):
        out = self.run(*args, timeout=timeout).stdout.strip()
        # Nothing to list: oarstat -J prints nothing, oarnodes -J "/!\\ No nodes to display...".
        if not out or out.startswith("/!\\ No nodes to display"):
            return {}
        return json.loads(out)

    def info(self, job, full=False):
        """`oarstat -J [-f] -j JOB` as a dict (None for an unknown job). Finished jobs
        stay there, for ever."""
        return self._json("oarstat", "-J", *(["-f"] if full else []), "-j", str(job)).get(
            str(job))

    def state(self, job):
        info = self.info(job)
        return info and info["state"]

    def nodes(self):
        """The resources, from `oarnodes -J` (a list of dicts)."""
        return list(self._json("oarnodes", "-J").values())

    def jobs(self):
        """[(job_id, state)] of every job not finished (any user), from `oarstat -J`."""
        data = self._json("oarstat", "-J")
        return sorted(((k, v["state"]) for k, v in data.items()), key=lambda j: int(j[0]))

    def cancel_all(self):
        """oardel (as root) every job not finished; returns their [(job_id, state)]."""
        jobs = self.jobs()
        if jobs:
            self.run("oardel", *[j for j, _ in jobs], check=False)
        return jobs

    def _wait_gone(self, timeout):
        left = self.wait_idle(timeout, raise_=False)
        stuck = [j for j, s in left if s == "Finishing"]
        if stuck:  # OAR's last resort for a job that cannot finish
            self.run("oardel", "--force-terminate-finishing-job", *stuck, check=False)
            left = self.wait_idle(10, raise_=False)
        return left

    def python_problem(self, python=None, module="taskcore"):
        """Why the test user cannot run `python` (default: this interpreter) and import
        `module`; None when it can."""
        python = python or sys.executable
        try:
            r = self.run_as_user(python, "-c", f"import {module}", check=False)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{python} as {self.user}: {e}"
        if r.returncode == 0:
            return None
        blocked = [str(p) for p in [Path(python).resolve(), *Path(python).resolve().parents]
                   if p.is_dir() and not os.stat(p).st_mode & 0o001]
        return (f"{python} as {self.user} failed ({r.returncode}): {r.stderr.strip()[-300:]}"
                + (f"; not searchable by others: {', '.join(blocked)}" if blocked else ""))
