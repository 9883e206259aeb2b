"""The CLIs as ProcessInterfaces: `WorkerProcess` (core-worker) and `SchedulerProcess`.

Both are `Subprocess`es: launch the program, wait for its JSON ready line. The
Subprocess machinery (ready line, logs, cleanup at exit and on parent death)
and the programs' command lines live in `taskcore.process`, which the nanny
uses too without importing the deployment package; they are re-exported here,
where they used to be defined.
"""
from __future__ import annotations

from taskcore.process import (MAX_LINE, ProcessStartError, Subprocess, read_lines,
                              scheduler_cli_args, security_cli_args, worker_cli_args)
from taskcore.security import token_env
from taskcore.transports.addressing import unparse_host_port

__all__ = ["ProcessStartError", "Subprocess", "WorkerProcess", "SchedulerProcess",
           "read_lines", "worker_cli_args", "scheduler_cli_args", "security_cli_args",
           "MAX_LINE"]


class WorkerProcess(Subprocess):
    """A `core-worker --no-nanny` subprocess: a worker without a nanny (no restarts)."""

    def __init__(self, scheduler, name=None, *, env=None, startup_timeout=60, close_grace=5,
                 forward_stderr=False, log_capacity=1000, log_level="warning", **worker_options):
        args = worker_cli_args(scheduler, nanny=False, name=name, log_level=log_level,
                               **worker_options)
        env = token_env(env, worker_options.get("security"))
        super().__init__(args, env=env, name=name, role="worker", scheduler=scheduler,
                         startup_timeout=startup_timeout, close_grace=close_grace,
                         forward_stderr=forward_stderr, log_capacity=log_capacity)
        self.worker_options = worker_options


class SchedulerProcess(Subprocess):
    """A `core-scheduler` subprocess.

    `listen_socket`: a tcp socket bound and listening (its port is the scheduler's) that
    the child serves instead of binding its own, so that the scheduler's address is known
    before the child runs: `planned_address`, else None. This handle closes its copy once
    the child has started, or failed to."""

    def __init__(self, name="Scheduler", *, env=None, startup_timeout=60, close_grace=5,
                 forward_stderr=False, log_capacity=1000, log_level="warning",
                 listen_socket=None, **options):
        self.planned_address = None
        pass_fds = ()
        if listen_socket is not None:
            protocol = options.get("protocol") or "tcp"
            host, port = listen_socket.getsockname()[:2]
            self.planned_address = f"{protocol}://{unparse_host_port(host, port)}"
            options = dict(options, port=port, host=host, listen_fd=listen_socket.fileno())
            pass_fds = (listen_socket.fileno(),)
        self._listen_socket = listen_socket
        args = scheduler_cli_args(log_level=log_level, **options)
        env = token_env(env, options.get("security"))
        super().__init__(args, env=env, name=name, role="scheduler",
                         startup_timeout=startup_timeout, close_grace=close_grace,
                         forward_stderr=forward_stderr, log_capacity=log_capacity,
                         pass_fds=pass_fds)

    async def start(self):
        try:
            return await super().start()
        finally:
            if self._listen_socket is not None:
                self._listen_socket.close()       # the child has its own copy
                self._listen_socket = None
