"""Deployment: clusters that start a scheduler and workers somewhere, and the pieces they use.

Names are resolved lazily (PEP 562), so `import taskcore.deploy` stays cheap
for the CLIs and one backend does not import the others (the servers, asyncssh).
`Status`, `ProcessInterface`, `Subprocess` and `ProcessStartError` are defined
in `taskcore.process`, the layer that the nanny and deploy/ share (the nanny
imports nothing from deploy/); they are re-exported here and in the deploy
modules that used to define them.
"""
from __future__ import annotations

from taskcore.lazy import lazy_exports

_EXPORTS = {
    "Cluster": "taskcore.deploy.cluster",
    "SpecCluster": "taskcore.deploy.spec",
    "ProcessInterface": "taskcore.process",
    "Status": "taskcore.process",
    "Subprocess": "taskcore.process",
    "WorkerProcess": "taskcore.deploy.process",
    "SchedulerProcess": "taskcore.deploy.process",
    "ProcessStartError": "taskcore.process",
    "LocalCluster": "taskcore.deploy.local",
    "LocalCUDACluster": "taskcore.deploy.cuda",
    "CUDAWorker": "taskcore.deploy.cuda",
    "SSHCluster": "taskcore.deploy.ssh",
    "Adaptive": "taskcore.deploy.adaptive",
    "LaunchedProcess": "taskcore.deploy.launched",
    "list_clusters": "taskcore.deploy.registry",
    "JobQueueCluster": "taskcore.deploy.jobqueue.cluster",
    "SLURMCluster": "taskcore.deploy.jobqueue.slurm",
    "SGECluster": "taskcore.deploy.jobqueue.sge",
    "OARCluster": "taskcore.deploy.jobqueue.oar",
    "PBSCluster": "taskcore.deploy.jobqueue.pbs",
    "TorqueCluster": "taskcore.deploy.jobqueue.pbs",
    "MoabCluster": "taskcore.deploy.jobqueue.pbs",
    "LSFCluster": "taskcore.deploy.jobqueue.lsf",
    "HTCondorCluster": "taskcore.deploy.jobqueue.htcondor",
    "FluxCluster": "taskcore.deploy.jobqueue.flux",
    "KubeCluster": "taskcore.deploy.kubernetes.cluster",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
