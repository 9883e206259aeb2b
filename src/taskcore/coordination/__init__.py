"""Coordination primitives and published datasets, held by the scheduler.

One module per primitive, each with its scheduler-side extension and its user-facing
class; `extension.py` holds the plumbing they share (see docs/coordination.md).
"""
from taskcore.lazy import lazy_exports

_LAZY = {
    "Variable": "taskcore.coordination.variable", "Queue": "taskcore.coordination.queues",
    "Lock": "taskcore.coordination.locks", "MultiLock": "taskcore.coordination.locks",
    "Semaphore": "taskcore.coordination.semaphore", "Event": "taskcore.coordination.event",
    "Pub": "taskcore.coordination.pubsub", "Sub": "taskcore.coordination.pubsub",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = sorted(_LAZY)
