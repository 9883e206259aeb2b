"""taskcore: a distributed task runtime with a compiled core and the dask.distributed API.

Switching from dask.distributed is one import::

    from taskcore import Client, LocalCluster
"""

__version__ = "0.1.0"

from taskcore.client import Client, default_client
from taskcore.errors import CancelledError, KilledWorker
from taskcore.futures import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future,
                              as_completed, fire_and_forget, wait)
from taskcore.security import Security
from taskcore.worker import get_client, get_worker, rejoin, secede


def __getattr__(name):
    # Servers and deployment classes import lazily: `import taskcore` stays light.
    if name == "Scheduler":
        from taskcore.scheduler import Scheduler

        return Scheduler
    if name == "Worker":
        from taskcore.worker import Worker

        return Worker
    if name == "Nanny":
        from taskcore.nanny import Nanny

        return Nanny
    if name == "progress":
        from taskcore.diagnostics import progress

        return progress
    if name in ("LocalCluster", "SpecCluster", "Cluster", "ProcessInterface", "SSHCluster",
                "Adaptive"):
        import taskcore.deploy as deploy

        return getattr(deploy, name)
    raise AttributeError(f"module 'taskcore' has no attribute {name!r}")


__all__ = [
    "Client", "Future", "as_completed", "wait", "fire_and_forget", "default_client",
    "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "CancelledError", "KilledWorker",
    "Security", "get_client", "get_worker", "secede", "rejoin", "Scheduler", "Worker", "Nanny",
    "LocalCluster", "SpecCluster", "Cluster", "ProcessInterface", "progress", "SSHCluster",
    "Adaptive",
]
