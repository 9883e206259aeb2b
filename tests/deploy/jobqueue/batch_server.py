"""What the tests' real batch systems (slurm_server.py, sge_server.py, oar_server.py) share.

Each server class says what it is called, its error class, why it cannot run
here (`missing()`), how to start its daemons (`_start`), how to stop them
(`stop`) and how to list jobs (`jobs`); this base makes a failed start leave
nothing running and waits for the queue to empty.
"""
import subprocess
import time


class BatchServer:
    label = "batch system"
    error = RuntimeError
    idle_poll = 0.1  # s between looks at the queue

    def missing(self) -> list:
        """Why this system cannot run here (empty when it can)."""
        return []

    def check_can_run(self):
        missing = self.missing()
        if missing:
            raise self.error(f"cannot run {self.label} here, missing: " + "; ".join(missing))

    def start(self, timeout=30.0):
        self.check_can_run()
        return self._start_or_stop(timeout)

    def _start_or_stop(self, timeout):
        """Start; on any failure stop what did start, then raise."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop(cancel=False)
            raise
        return self

    def force_delete(self, job_ids) -> bool:
        """The last resort for jobs a plain cancel left behind; True when it tried."""
        return False

    def clean_up_after_test(self, settle):
        """Cancel what a test left: ([(job, state)] it left, [(job, state)] still there).
        A job that ended just now may stay listed for `settle` s: not a leak."""
        self.wait_idle(settle, raise_=False)
        leaked = self.cancel_all()
        left = self.wait_idle(30, raise_=False)
        if left and self.force_delete([job for job, _ in left]):
            left = self.wait_idle(10, raise_=False)
        return leaked, left

    def run(self, *cmd, check=True, timeout=30, **kwargs):
        """A command of this system, with `env` (default: this server's); the
        CompletedProcess (text), or this system's error when it fails and `check`."""
        proc = subprocess.run(cmd, env=kwargs.pop("env", getattr(self, "env", None)),
                              capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise self.error(f"{' '.join(cmd)} failed ({proc.returncode}): "
                             f"{proc.stdout.strip()} {proc.stderr.strip()}".rstrip())
        return proc

    def settled(self) -> bool:
        """Besides an empty queue, whatever else idle means (SLURM: the node is idle)."""
        return True

    def idle_detail(self) -> str:
        return ""

    def wait_idle(self, timeout=30.0, raise_=True):
        """Wait until no job is listed. Returns [] then; after `timeout` raises this
        system's error, or (raise_=False) returns what is left."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.jobs()
            if not left and self.settled():
                return []
            if time.monotonic() > deadline:
                if raise_:
                    raise self.error(f"{self.label} not idle after {timeout} s: jobs "
                                     f"{left}{self.idle_detail()}")
                return left
            time.sleep(self.idle_poll)
