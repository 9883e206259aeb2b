"""taskcore: a distributed task runtime with a compiled core and the dask.distributed API.

Switching from dask.distributed is one import::

    from taskcore import Client, LocalCluster

Every public name is imported on first use, so `import taskcore` (and the CLIs'
option checking) stays light.
"""

from taskcore.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "Client": "taskcore.client", "default_client": "taskcore.client",
    "Future": "taskcore.futures", "as_completed": "taskcore.futures", "wait": "taskcore.futures",
    "fire_and_forget": "taskcore.futures", "ALL_COMPLETED": "taskcore.futures",
    "FIRST_COMPLETED": "taskcore.futures", "FIRST_EXCEPTION": "taskcore.futures",
    "CancelledError": "taskcore.errors", "KilledWorker": "taskcore.errors",
    "Security": "taskcore.security",
    "get_client": "taskcore.task_context", "get_worker": "taskcore.task_context",
    "worker_client": "taskcore.task_context",
    "secede": "taskcore.task_context", "rejoin": "taskcore.task_context", "Worker": "taskcore.worker",
    "Scheduler": "taskcore.scheduler", "Nanny": "taskcore.nanny",
    "progress": "taskcore.diagnostics", "get_task_stream": "taskcore.task_stream",
    "performance_report": "taskcore.performance_report",
    "LocalCluster": "taskcore.deploy", "SpecCluster": "taskcore.deploy",
    "LocalCUDACluster": "taskcore.deploy", "CUDAWorker": "taskcore.deploy",
    "Cluster": "taskcore.deploy", "ProcessInterface": "taskcore.deploy",
    "SSHCluster": "taskcore.deploy", "Adaptive": "taskcore.deploy",
    "SLURMCluster": "taskcore.deploy", "JobQueueCluster": "taskcore.deploy",
    "SGECluster": "taskcore.deploy", "OARCluster": "taskcore.deploy",
    "PBSCluster": "taskcore.deploy", "TorqueCluster": "taskcore.deploy",
    "MoabCluster": "taskcore.deploy", "LSFCluster": "taskcore.deploy",
    "HTCondorCluster": "taskcore.deploy", "FluxCluster": "taskcore.deploy",
    "Variable": "taskcore.coordination.variable", "Queue": "taskcore.coordination.queues",
    "Lock": "taskcore.coordination.locks", "MultiLock": "taskcore.coordination.locks",
    "Semaphore": "taskcore.coordination.semaphore", "Event": "taskcore.coordination.event",
    "Pub": "taskcore.coordination.pubsub", "Sub": "taskcore.coordination.pubsub",
    "futures_of": "taskcore.futures",
    "SchedulerPlugin": "taskcore.plugins", "WorkerPlugin": "taskcore.plugins",
    "NannyPlugin": "taskcore.plugins", "UploadDirectory": "taskcore.plugins",
    "PipInstall": "taskcore.plugins", "Environ": "taskcore.plugins",
    "Actor": "taskcore.actors", "ActorFuture": "taskcore.actors",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = sorted(_LAZY)
