"""Kubernetes: a taskcore cluster as a TaskcoreCluster custom resource, reconciled by one
controller that runs in the operator (`core-kube-operator`) or inside the KubeCluster's
own process. Needs the `kubernetes` extra (kubernetes_asyncio), imported on first use.

- resources.py: the resource, its CRD and its children as plain dicts;
- reconcile.py: the decisions (observed state in, actions out; no I/O);
- controller.py: watches and carries the actions out;
- api.py: the Kubernetes API calls and port-forwarding;
- cluster.py: KubeCluster, the user's handle.
"""
from __future__ import annotations

from taskcore.lazy import lazy_exports

_EXPORTS = {
    "KubeCluster": "taskcore.deploy.kubernetes.cluster",
    "KubeClusterError": "taskcore.deploy.kubernetes.cluster",
    "make_cluster_spec": "taskcore.deploy.kubernetes.resources",
    "make_worker_spec": "taskcore.deploy.kubernetes.resources",
    "crd_manifest": "taskcore.deploy.kubernetes.resources",
    "Controller": "taskcore.deploy.kubernetes.controller",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
