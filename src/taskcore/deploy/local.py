"""LocalCluster: a scheduler and workers on this machine, as a SpecCluster.

- `processes=True` (default): the scheduler runs in this process on the
  cluster's loop (tcp://), and each worker is a separate process, under a
  Nanny (`worker_class="nanny"`, restarts and memory limits) or as a bare
  `core-worker --no-nanny` subprocess (`worker_class="process"`).
- `processes=False`: scheduler and workers all run on the cluster's loop and
  talk over inproc:// (no sockets, no pickling of the process boundary; useful
  for tests, debugging, and GIL-releasing workloads).
- `shutdown_on_close=False` (detached): the scheduler and every worker are
  separate processes started through the launcher (deploy/launcher.py), each
  handed off to its own supervisor in its own session, with logs in
  `<registry>/<name>.logs/`. They keep running after this Python process
  exits; `LocalCluster.from_name(name)` reconnects from any process on this
  machine. Attached clusters (the default) are registered too, for
  `list_clusters()`, but stop with their process.
"""
from __future__ import annotations

import math

from taskcore.dashboard.binding import dashboard_on_host
from taskcore.deploy.spec import SpecCluster
from taskcore.utils import cpu_count, parse_memory_limit

__all__ = ["LocalCluster", "default_sizes", "dashboard_on_host"]


def _check_sizes(n_workers, threads_per_worker):
    """A clear error for impossible sizes, before anything starts."""
    for name, value, least in (("n_workers", n_workers, 0),
                               ("threads_per_worker", threads_per_worker, 1)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"LocalCluster({name}={value!r}): expected an integer >= {least}")


def _listening_socket(protocol, host, port):
    """A socket bound and listening on host:port for a scheduler process to serve, or None
    where its contact address would not be host:port (a wildcard host), or not tcp."""
    import ipaddress
    import socket

    if protocol not in ("tcp", "tls") or not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None                     # a name: left to the scheduler to resolve
    if ip.is_unspecified:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        return socket.create_server((host, port or 0), family=family, backlog=1024)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen for the scheduler on {host}:{port or 0}: "
                               f"{e.strerror}") from e


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
    `scheduler_kwargs` go to the Scheduler. `shutdown_on_close=False` detaches the
    cluster's processes from this one (see the module doc and `from_name`).
    The scheduler serves its dashboard on `dashboard_address` (":8787": port 8787 on
    `host`, another free port when that one is taken; None: no dashboard), under
    `dashboard_prefix`; `dashboard_link` says where.
    """

    backend = "local"

    def __init__(self, n_workers: int | None = None, threads_per_worker: int | None = None,
                 processes: bool = True, memory_limit="auto", host: str = "127.0.0.1",
                 scheduler_port: int = 0, protocol: str | None = None, security=None,
                 asynchronous: bool = False, name: str | None = None,
                 worker_class: str | type = "nanny", scheduler_kwargs: dict | None = None,
                 env: dict | None = None, log_level: str = "warning",
                 shutdown_on_close: bool = True, worker_groups: dict | None = None,
                 scheduler_process: bool | None = None, dashboard_address: str | None = ":8787",
                 dashboard_prefix: str = "", **worker_kwargs):
        _check_sizes(n_workers, threads_per_worker)
        if protocol is None:
            protocol = "tcp" if processes else "inproc"
            if security is not None and getattr(security, "enabled", False) and processes:
                protocol = "tls"
        protocol = protocol.rstrip(":/")
        if processes and protocol == "inproc":
            raise ValueError("processes=True needs a network protocol (tcp or tls), not inproc")
        detached = not shutdown_on_close
        if detached and not processes:
            raise ValueError("shutdown_on_close=False needs processes=True: in-process workers "
                             "cannot outlive this process")
        if detached and security is not None:
            raise ValueError("shutdown_on_close=False does not support TLS security yet")
        if detached and name is None:
            import uuid

            name = f"localcluster-{uuid.uuid4().hex[:8]}"  # known now: it names the log files
        n_workers, threads = default_sizes(n_workers, threads_per_worker, processes)
        self.processes = processes
        self.detached = detached
        self.security = security
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
        sched_opts.setdefault("dashboard_address", dashboard_on_host(dashboard_address, host))
        if dashboard_prefix:
            sched_opts.setdefault("dashboard_prefix", dashboard_prefix)
        scheduler = {"cls": Scheduler, "options": sched_opts}
        if scheduler_process is None:
            scheduler_process = processes
        if scheduler_process and not processes:
            raise ValueError("scheduler_process=True needs processes=True")
        if scheduler_process and not detached:
            from taskcore.deploy.process import SchedulerProcess

            proc_opts = dict(sched_opts, log_level=log_level)
            sock = _listening_socket(protocol, sched_opts.get("host"), sched_opts.get("port"))
            if sock is not None:
                # Bound here and handed to the scheduler process: its address is known
                # at once, so the workers start alongside it (SpecCluster._start).
                proc_opts["listen_socket"] = sock
            scheduler = {"cls": SchedulerProcess, "options": proc_opts}

        opts = dict(nthreads=threads, memory_limit=self.memory_limit, **worker_kwargs)
        if not processes:
            # In-process workers share this process's memory with the caller and with
            # each other: thresholds on the process's RSS would pause them all for
            # memory none of them holds. Spilling past the target (their own results)
            # still applies; ask for the RSS thresholds explicitly to have them.
            opts.setdefault("memory_spill_fraction", False)
            opts.setdefault("memory_pause_fraction", False)
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
        if detached:
            scheduler, cls, opts = self._detached_specs(name, sched_opts, opts, worker_class,
                                                        log_level, env)
        worker = {"cls": cls, "options": opts}
        workers = {i: {"cls": cls, "options": dict(opts)} for i in range(n_workers)}
        groups = None
        if worker_groups:
            # {group: {option overrides}}: each group copies the default worker's options.
            groups = {g: {"cls": cls, "options": {**opts, **(o or {})}}
                      for g, o in worker_groups.items()}
        super().__init__(workers=workers, scheduler=scheduler, worker=worker,
                         asynchronous=asynchronous, name=name,
                         shutdown_on_close=shutdown_on_close, worker_groups=groups)

    def _detached_specs(self, name, sched_opts, opts, worker_class, log_level, env):
        """Specs for a detached cluster: everything in launcher-supervised processes."""
        from taskcore.deploy import registry
        from taskcore.deploy.launched import LaunchedScheduler, LaunchedWorker, LocalTarget

        if worker_class not in ("nanny", "process"):
            raise ValueError("shutdown_on_close=False needs worker_class 'nanny' or 'process'")
        registry.check_name(name)
        logs = registry.log_dir(name)
        target = LocalTarget()
        sched = {k: v for k, v in sched_opts.items() if k != "security"}
        scheduler = {"cls": LaunchedScheduler,
                     "options": dict(sched, target=target, detach=True, log_level=log_level,
                                     log_file=f"{logs}/scheduler.log", env=env)}
        wopts = {k: v for k, v in opts.items() if k not in ("security", "env", "log_level")}
        wopts.update(target=target, detach=True, log_dir=logs, log_level=log_level,
                     nanny=worker_class == "nanny")
        if env:
            wopts["env"] = env
        return scheduler, LaunchedWorker, wopts

    # -- registry -------------------------------------------------------------------------------
    def _detachable(self) -> bool:
        return bool(getattr(self, "detached", False))

    def _registry_config(self):
        if not self.processes:
            return None  # inproc:// cannot be reached from another process: nothing to list
        if not self._detachable():
            return {"kind": "local", "attached": True}
        return {"kind": "local", "threads_per_worker": self.threads_per_worker,
                "memory_limit": self.memory_limit}

    def _restore(self, config, **kwargs):
        self.processes = True
        self.detached = True
        self.security = None
        self.threads_per_worker = config.get("threads_per_worker")
        self.memory_limit = config.get("memory_limit")
        return super()._restore(config, **kwargs)
