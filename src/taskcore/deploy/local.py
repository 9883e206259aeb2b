"""LocalCluster: a scheduler and workers on this machine, as a SpecCluster.

- `processes=True` (default): the scheduler runs in this process on the
  cluster's loop (tcp://), and each worker is a separate process, under a
  Nanny (`worker_class="nanny"`, restarts and memory limits) or as a bare
  `core-worker --no-nanny` subprocess (`worker_class="process"`).
- `processes=False`: scheduler and workers all run on the cluster's loop and
  talk over inproc:// (no sockets, no pickling of the process boundary; useful
  for tests, debugging, and GIL-releasing workloads).
"""
from __future__ import annotations

import math

from taskcore.deploy.spec import SpecCluster
from taskcore.utils import cpu_count, parse_memory_limit

__all__ = ["LocalCluster", "default_sizes"]


def default_sizes(n_workers=None, threads_per_worker=None, processes=True, cores=None):
    """(n_workers, threads_per_worker) so that their product is about the CPU count.

    With processes, small machines get one single-threaded worker per core; larger
    ones a few multi-threaded workers (about sqrt(cores) of them), which keeps
    inter-worker traffic down while still escaping the GIL. Without processes
    there is one worker with all the threads.
    """
    cores = cores or cpu_count()
    if n_workers is None and threads_per_worker is None:
        if not processes:
            return 1, cores
        if cores <= 4:
            return cores, 1
        root = math.isqrt(cores - 1) + 1  # ceil(sqrt(cores))
        n = next(d for d in range(root, cores + 1) if cores % d == 0)
        return n, cores // n
    if n_workers is None:
        return max(1, cores // threads_per_worker), threads_per_worker
    if threads_per_worker is None:
        return n_workers, max(1, cores // max(n_workers, 1))
    return n_workers, threads_per_worker


class LocalCluster(SpecCluster):
    """A local cluster; see the module docstring.

    Extra keyword arguments go to every worker (Worker, Nanny or core-worker).
    `scheduler_kwargs` go to the Scheduler.
    """

    def __init__(self, n_workers: int | None = None, threads_per_worker: int | None = None,
                 processes: bool = True, memory_limit="auto", host: str = "127.0.0.1",
                 scheduler_port: int = 0, protocol: str | None = None, security=None,
                 asynchronous: bool = False, name: str | None = None,
                 worker_class: str | type = "nanny", scheduler_kwargs: dict | None = None,
                 env: dict | None = None, log_level: str = "warning", **worker_kwargs):
        if protocol is None:
            protocol = "tcp" if processes else "inproc"
            if security is not None and getattr(security, "enabled", False) and processes:
                protocol = "tls"
        protocol = protocol.rstrip(":/")
        if processes and protocol == "inproc":
            raise ValueError("processes=True needs a network protocol (tcp or tls), not inproc")
        n_workers, threads = default_sizes(n_workers, threads_per_worker, processes)
        self.processes = processes
        self.threads_per_worker = threads
        # Resolved once, here: every worker (and every scale-up) gets the same byte count.
        self.memory_limit = parse_memory_limit(memory_limit, threads)

        from taskcore.scheduler import Scheduler

        sched_opts = dict(scheduler_kwargs or {})
        sched_opts.setdefault("protocol", protocol)
        if protocol != "inproc":
            sched_opts.setdefault("host", host)
            sched_opts.setdefault("port", scheduler_port)
        if security is not None:
            sched_opts.setdefault("security", security)
        scheduler = {"cls": Scheduler, "options": sched_opts}

        opts = dict(nthreads=threads, memory_limit=self.memory_limit, **worker_kwargs)
        if security is not None:
            opts["security"] = security
        if processes:
            opts.update(protocol=protocol, host=host)
            if worker_class == "nanny":
                from taskcore.nanny import Nanny

                cls = Nanny
                opts.setdefault("log_level", log_level)
                if env:
                    opts["env"] = env
            elif worker_class == "process":
                from taskcore.deploy.process import WorkerProcess

                cls = WorkerProcess
                opts.setdefault("log_level", log_level)
                if env:
                    opts["env"] = env
            else:
                cls = worker_class
        else:
            if env:
                raise ValueError("env= needs processes=True (in-process workers share our "
                                 "environment)")
            opts["protocol"] = protocol
            if worker_class in ("nanny", "process"):
                from taskcore.worker import Worker

                cls = Worker
            else:
                cls = worker_class
        worker = {"cls": cls, "options": opts}
        workers = {i: {"cls": cls, "options": dict(opts)} for i in range(n_workers)}
        super().__init__(workers=workers, scheduler=scheduler, worker=worker,
                         asynchronous=asynchronous, name=name)

