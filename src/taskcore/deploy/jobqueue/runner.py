"""Batch mode: one program started as N tasks becomes a whole cluster (like dask-mpi).

    # srun -n 6 python script.py   (or the same line inside an sbatch allocation)
    from taskcore import Client
    from taskcore.deploy.jobqueue.runner import SLURMRunner

    with SLURMRunner(scheduler_file="/shared/sched.json") as runner, Client(runner) as client:
        client.wait_for_workers(4)
        print(client.submit(lambda x: x + 1, 1).result())

Theory of operation
-------------------
Every task runs the same script; its rank (SLURM_PROCID) gives its role:

- rank 0, the **scheduler**: listens on a free port, writes `scheduler_file`
  (`{"address", "pid", "run"}`) and serves;
- rank 1, the **client**: waits for the scheduler file, connects, and is the
  only rank that returns from `__enter__`: the `with` body runs here;
- ranks >= 2, one **worker** each, in the task's own process, named by its
  rank: it waits for the scheduler file and serves.

The scheduler and worker ranks never return from `__enter__`: they serve until
the cluster shuts down, then end the process with `sys.exit(0)` (so nothing
after the `with` runs on them). Rank 1's `__exit__`, normal or after an
exception, asks the scheduler to shut down; the scheduler closes every worker,
each rank exits, and `__exit__` returns once the scheduler no longer accepts
connections. An exception from the body is re-raised, so rank 1, and srun,
exit non-zero while ranks 0 and >= 2 exit 0.

Nothing may outlive the job:

- The client rank holds one connection (the *lifeline*) from `__enter__` to
  `__exit__`. If it drops while the scheduler still runs (rank 1 was killed,
  or never connected within `connect_timeout`), the scheduler closes the
  cluster itself and rank 0 exits 1: a job whose client is gone is over.
- A worker rank that loses the scheduler exits after `death_timeout` (30 s
  unless worker_options say otherwise): in batch mode the scheduler never
  comes back. A worker rank that dies is only a lost worker: its tasks are
  recomputed elsewhere, and srun does not end the other tasks.
- SIGTERM/SIGINT (scancel, the end of the walltime) close a serving rank
  cleanly. Workers run in the task's process, not under a nanny, so each rank
  is one process that SLURM tracks and signals directly.

The scheduler file carries the run (cluster, job and step ids, srun's port):
a file left by an earlier run at the same path is ignored, never connected to.

`BaseRunner` holds all of this; a launcher is a subclass that says where the
rank and the task count come from (`get_rank`, `get_size`, `get_run_id`).
"""
from __future__ import annotations

import abc
import asyncio
import logging
import os
import socket
import sys
import time

from taskcore.utils import read_json_file, write_json_atomic

logger = logging.getLogger("taskcore.deploy.jobqueue.runner")

__all__ = ["BaseRunner", "SLURMRunner", "Role"]

# The name of the client rank's lifeline connection (see the module doc), for logs.
_LIFELINE = "taskcore-runner-lifeline"


class Role:
    """What a rank does (`runner.role`)."""

    scheduler = "scheduler"
    client = "client"
    worker = "worker"


class BaseRunner(abc.ABC):
    """A cluster made of the tasks of one parallel launch; see the module doc.

    `scheduler_file`: a path every task can read (a shared file system when the
    tasks span nodes); `scheduler_options`: Scheduler keyword arguments (`host`,
    `port`, `interface`, ...); `worker_options`: Worker keyword arguments
    (`nthreads`, `memory_limit`, `death_timeout`, `resources`, ...);
    `connect_timeout`: how long ranks wait for each other at start-up.
    """

    def __init__(self, scheduler_file: str | None = None, *, scheduler_options: dict | None = None,
                 worker_options: dict | None = None, security=None,
                 connect_timeout: float = 120.0, shutdown_timeout: float = 30.0):
        self.rank = self.get_rank()
        self.size = self.get_size()
        if self.size < 3:
            raise RuntimeError(f"{type(self).__name__} needs at least 3 tasks (scheduler, client, "
                               f"one worker or more); this launch has {self.size}")
        if not 0 <= self.rank < self.size:
            raise RuntimeError(f"rank {self.rank} out of range for {self.size} tasks")
        self.role = (Role.scheduler, Role.client)[self.rank] if self.rank < 2 else Role.worker
        self.scheduler_file = os.path.abspath(scheduler_file or self.default_scheduler_file())
        self.scheduler_options = dict(scheduler_options or {})
        self.worker_options = dict(worker_options or {})
        if "scheduler_file" in self.scheduler_options or "name" in self.worker_options:
            raise TypeError("the runner sets the scheduler file and the worker names itself")
        self.security = security  # Client(runner) uses it too
        self.connect_timeout = connect_timeout
        self.shutdown_timeout = shutdown_timeout
        self.run_id = self.get_run_id()
        self.scheduler_address: str | None = None
        self._lifeline = None

    # -- what a launcher provides ---------------------------------------------------------------
    @abc.abstractmethod
    def get_rank(self) -> int:
        """This task's rank, 0 to size - 1."""

    @abc.abstractmethod
    def get_size(self) -> int:
        """How many tasks the launch started."""

    def get_run_id(self) -> str | None:
        """Names this launch in the scheduler file (None: accept any file at the path)."""
        return None

    def default_scheduler_file(self) -> str:
        return "scheduler.json"

    def __repr__(self):
        return (f"<{type(self).__name__} rank {self.rank}/{self.size} ({self.role}) "
                f"scheduler {self.scheduler_address!r}>")

    # -- the context manager ----------------------------------------------------------------------
    def __enter__(self):
        if self.role == Role.client:
            self._connect()
            return self
        # Serving ranks: run until the cluster shuts down, then end the process here, so
        # the `with` body and whatever follows it run on the client rank only.
        import uvloop

        serve = self._serve_scheduler if self.role == Role.scheduler else self._serve_worker
        try:
            code = uvloop.run(serve())
        except KeyboardInterrupt:
            code = 0
        sys.exit(code)

    def __exit__(self, exc_type, exc, tb):
        self.shutdown()
        return False  # an exception from the body goes on up

    # -- rank 1: the client -----------------------------------------------------------------------
    def _connect(self):
        from taskcore.client import Client

        deadline = time.monotonic() + self.connect_timeout
        while (address := self._read_address()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: no scheduler wrote {self.scheduler_file} "
                                   f"for run {self.run_id} within {self.connect_timeout} s")
            time.sleep(0.1)
        self.scheduler_address = address
        lifeline = Client(address, name=_LIFELINE, set_as_default=False, security=self.security)
        try:
            # Tell the scheduler which client is the lifeline, over the lifeline itself: the
            # scheduler learns its id while that connection is known to be up.
            lifeline.run_on_scheduler(_register_lifeline, lifeline.id)
        except BaseException:
            lifeline.close()
            raise
        self._lifeline = lifeline

    def shutdown(self):
        """Close the scheduler and, through it, every worker; return once it is gone."""
        lifeline, self._lifeline = self._lifeline, None
        if lifeline is None:
            return

        async def shutdown_then_close():
            try:
                await asyncio.wait_for(lifeline._rpc("shutdown"), self.shutdown_timeout)
            finally:
                # Right away, on the loop: the scheduler drops our connection ~50 ms after
                # answering, which an open client would log as a lost scheduler.
                await lifeline._close()
        try:
            lifeline.sync(shutdown_then_close)
        except Exception as e:  # the scheduler is gone already (it died, or was told)
            logger.info("shutdown request to %s: %r", self.scheduler_address, e)
        finally:
            lifeline.close()
        deadline = time.monotonic() + self.shutdown_timeout
        while _accepts_connections(self.scheduler_address):
            if time.monotonic() > deadline:
                logger.warning("scheduler %s still accepts connections %s s after shutdown",
                               self.scheduler_address, self.shutdown_timeout)
                return
            time.sleep(0.1)

    # -- rank 0: the scheduler --------------------------------------------------------------------
    async def _serve_scheduler(self) -> int:
        from taskcore.cli.common import shutdown_event
        from taskcore.scheduler import Scheduler

        stop = shutdown_event("closing the scheduler")
        opts = dict(self.scheduler_options)
        if opts.get("interface"):
            from taskcore.utils import get_ip_interface

            opts["host"] = get_ip_interface(opts.pop("interface"))
        opts.pop("interface", None)
        # All interfaces by default: the other ranks may be on other nodes. The address
        # written to the file is the contact address (this node's IP), not 0.0.0.0.
        opts.setdefault("host", "0.0.0.0")
        opts.setdefault("port", 0)
        if self.security is not None:
            opts.setdefault("security", self.security)
            opts.setdefault("protocol", "tls")
        scheduler = Scheduler(**opts)
        await scheduler.start()
        code = 0
        try:
            self.scheduler_address = scheduler.address
            write_json_atomic(self.scheduler_file, {"address": scheduler.address,
                                                    "pid": os.getpid(), "run": self.run_id})
            logger.info("rank %d: scheduler at %s", self.rank, scheduler.address)
            ends = {asyncio.ensure_future(scheduler.finished()): 0,
                    asyncio.ensure_future(stop.wait()): 0,
                    asyncio.ensure_future(self._client_gone(scheduler)): 1}
            done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            code = max(ends[t] for t in done)
            for t in ends:
                t.cancel()
        finally:
            try:
                await asyncio.wait_for(scheduler.close(), self.shutdown_timeout)
            finally:
                if self._read_address() == scheduler.address:
                    try:  # late readers must not find a dead address
                        os.unlink(self.scheduler_file)
                    except OSError:
                        pass
        return code

    async def _client_gone(self, scheduler):
        """Resolves when the client rank's lifeline is gone while the scheduler runs on."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            await asyncio.sleep(0.2)
            if scheduler.status != "running":
                continue  # closing on request: not a lost client
            lifeline = getattr(scheduler, "_runner_lifeline", None)
            if lifeline is not None and lifeline not in scheduler.clients:
                logger.error("rank %d: the client rank went away without shutting the cluster "
                             "down; closing it", self.rank)
                return
            if lifeline is None and time.monotonic() > deadline:
                logger.error("rank %d: the client rank did not connect within %s s; closing "
                             "the cluster", self.rank, self.connect_timeout)
                return

    # -- ranks >= 2: workers ----------------------------------------------------------------------
    async def _serve_worker(self) -> int:
        from taskcore.cli.common import shutdown_event
        from taskcore.worker import Worker

        stop = shutdown_event("closing the worker")
        deadline = time.monotonic() + self.connect_timeout
        while (address := self._read_address()) is None:
            if stop.is_set():
                return 0
            if time.monotonic() > deadline:
                logger.error("rank %d: no scheduler wrote %s for run %s within %s s", self.rank,
                             self.scheduler_file, self.run_id, self.connect_timeout)
                return 1
            await asyncio.sleep(0.1)
        self.scheduler_address = address
        opts = {"nthreads": self.default_nthreads(), "death_timeout": 30.0,
                **self.worker_options}
        if self.security is not None:
            opts.setdefault("security", self.security)
        worker = Worker(address, name=self.rank, **opts)
        try:
            await worker.start()  # cleans up after itself when it fails
        except Exception as e:
            logger.error("rank %d: worker could not start: %r", self.rank, e)
            return 1
        try:
            waits = [asyncio.ensure_future(worker.finished()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for t in waits:
                t.cancel()
        finally:
            await asyncio.wait_for(worker.close(), self.shutdown_timeout)
        return 0

    def default_nthreads(self) -> int:
        return 1

    # -- the scheduler file -----------------------------------------------------------------------
    def _read_address(self) -> str | None:
        """The address in the scheduler file if this run's scheduler wrote it, else None."""
        try:
            data = read_json_file(self.scheduler_file)
        except (OSError, ValueError):
            return None  # unreadable for a moment (a non-atomic copy, NFS): ask again
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            return None
        if self.run_id is not None and data.get("run") != self.run_id:
            return None  # left by an earlier run
        return data["address"]


class SLURMRunner(BaseRunner):
    """Batch mode under `srun` (see the module doc): roles from SLURM_PROCID.

    The default scheduler file is `scheduler-<SLURM_JOB_ID>.json` in the current
    directory; workers get `SLURM_CPUS_PER_TASK` threads (1 without `-c`).
    """

    def get_rank(self) -> int:
        return int(_slurm_env("SLURM_PROCID"))

    def get_size(self) -> int:
        # SLURM_STEP_NUM_TASKS is the step's own count (srun -n N inside a larger allocation).
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or _slurm_env("SLURM_NTASKS"))

    def get_run_id(self) -> str:
        # Job and step ids alone can repeat (a controller that lost its state starts again
        # at job 1); the cluster name and srun's own port make a stale file's run differ.
        env = os.environ.get
        return (f"{env('SLURM_CLUSTER_NAME', '')}:{_slurm_env('SLURM_JOB_ID')}."
                f"{_slurm_env('SLURM_STEP_ID')}:{env('SLURM_SRUN_COMM_HOST', '')}:"
                f"{env('SLURM_STEP_LAUNCHER_PORT', '')}")

    def default_scheduler_file(self) -> str:
        return f"scheduler-{_slurm_env('SLURM_JOB_ID')}.json"

    def default_nthreads(self) -> int:
        return int(os.environ.get("SLURM_CPUS_PER_TASK") or 1)


def _register_lifeline(client_id, scheduler=None):
    """Runs on the scheduler (run_on_scheduler): the client rank's lifeline is `client_id`."""
    scheduler._runner_lifeline = client_id


def _slurm_env(name: str) -> str:
    value = os.environ.get(name)
    if value:
        return value
    if os.environ.get("SLURM_JOB_ID") and not os.environ.get("SLURM_STEP_ID"):
        # The batch script itself is one task whatever `sbatch -n` said.
        raise RuntimeError(f"SLURMRunner: {name} is not set: this is the batch script of job "
                           f"{os.environ['SLURM_JOB_ID']}, not a task of a job step; start "
                           f"the program with `srun -n N python script.py` (N >= 3)")
    raise RuntimeError(f"SLURMRunner: {name} is not set: not running under SLURM; start "
                       f"the program with `srun -n N python script.py` (N >= 3)")


def _accepts_connections(address: str) -> bool:
    from taskcore.transports.addressing import parse_address, parse_host_port

    host, port = parse_host_port(parse_address(address)[1])
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
