"""A local stand-in of Kubernetes for taskcore's tests (no real kube-apiserver can run on the
test machines): an API server the unmodified kubernetes_asyncio client talks to, its object
store, the controllers, a kube-proxy and a kubelet that runs pods as local processes.
Start one with `StandinKubernetes` (harness.py)."""
from .harness import StandinKubernetes

__all__ = ["StandinKubernetes"]
