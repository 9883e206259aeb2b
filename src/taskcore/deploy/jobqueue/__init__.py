"""Job queues: clusters whose workers, and optionally scheduler, are batch jobs.

`SLURMCluster` (slurm.py) is the generic `JobQueueCluster` (cluster.py) with
the SLURM `BatchSystem` (system.py); job scripts and the job members are in
job.py, site defaults in config.py, the batch-mode runner in runner.py.
Names resolve lazily, so importing one batch system imports no other.
"""
from __future__ import annotations

from taskcore.lazy import lazy_exports

_EXPORTS = {
    "JobQueueCluster": "taskcore.deploy.jobqueue.cluster",
    "BatchSystem": "taskcore.deploy.jobqueue.system",
    "BatchCommandError": "taskcore.deploy.jobqueue.system",
    "JobState": "taskcore.deploy.jobqueue.system",
    "Job": "taskcore.deploy.jobqueue.job",
    "JobScript": "taskcore.deploy.jobqueue.job",
    "SchedulerJob": "taskcore.deploy.jobqueue.job",
    "SLURM": "taskcore.deploy.jobqueue.slurm",
    "SLURMCluster": "taskcore.deploy.jobqueue.slurm",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
