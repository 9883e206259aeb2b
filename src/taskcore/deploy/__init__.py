"""Deployment: clusters that start a scheduler and workers somewhere, and the pieces they use.

Names are resolved lazily (PEP 562): `taskcore.nanny` imports
`taskcore.deploy.process`, and `deploy.local` imports the nanny, so an eager
import here would be circular. It also keeps `import taskcore.deploy` cheap
for the CLIs.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Cluster": "taskcore.deploy.cluster",
    "SpecCluster": "taskcore.deploy.spec",
    "ProcessInterface": "taskcore.deploy.spec",
    "Status": "taskcore.deploy.spec",
    "Subprocess": "taskcore.deploy.process",
    "WorkerProcess": "taskcore.deploy.process",
    "SchedulerProcess": "taskcore.deploy.process",
    "ProcessStartError": "taskcore.deploy.process",
    "LocalCluster": "taskcore.deploy.local",
    "SSHCluster": "taskcore.deploy.ssh",
    "Adaptive": "taskcore.deploy.adaptive",
    "LaunchedProcess": "taskcore.deploy.launched",
    "list_clusters": "taskcore.deploy.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'taskcore.deploy' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
