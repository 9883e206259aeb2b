"""Job queues: clusters whose workers, and optionally scheduler, are batch jobs.

Each batch system is one module: its `BatchSystem` subclass (system.py) and a
three-line cluster class on the generic `JobQueueCluster` (cluster.py):
slurm.py, sge.py, oar.py, pbs.py (PBS Pro, Torque, Moab), lsf.py,
htcondor.py, flux.py; job scripts and the job members are in
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
    "SGE": "taskcore.deploy.jobqueue.sge",
    "SGECluster": "taskcore.deploy.jobqueue.sge",
    "OAR": "taskcore.deploy.jobqueue.oar",
    "OARCluster": "taskcore.deploy.jobqueue.oar",
    "PBS": "taskcore.deploy.jobqueue.pbs",
    "PBSCluster": "taskcore.deploy.jobqueue.pbs",
    "Torque": "taskcore.deploy.jobqueue.pbs",
    "TorqueCluster": "taskcore.deploy.jobqueue.pbs",
    "Moab": "taskcore.deploy.jobqueue.pbs",
    "MoabCluster": "taskcore.deploy.jobqueue.pbs",
    "LSF": "taskcore.deploy.jobqueue.lsf",
    "LSFCluster": "taskcore.deploy.jobqueue.lsf",
    "HTCondor": "taskcore.deploy.jobqueue.htcondor",
    "HTCondorCluster": "taskcore.deploy.jobqueue.htcondor",
    "Flux": "taskcore.deploy.jobqueue.flux",
    "FluxCluster": "taskcore.deploy.jobqueue.flux",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
