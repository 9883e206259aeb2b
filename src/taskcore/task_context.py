"""What a task can call while it runs on a worker: get_worker, get_client,
secede, rejoin and worker_client.

They find the running task's worker through the thread-local of task
execution (`core.worker_dispatch.task_local`), so this module needs neither
the worker nor the client module: `taskcore.worker` re-exports them, and
dask_integration uses them without importing the worker.
"""
from __future__ import annotations

import contextlib

from taskcore.core.worker_dispatch import task_local
from taskcore.core.worker_state import SecedeEvent
from taskcore.executor import current_executor, current_task_id
from taskcore.futures import default_client

__all__ = ["get_worker", "get_client", "secede", "rejoin", "worker_client"]


def get_worker():
    """The Worker running the current task (only valid inside a task)."""
    w = getattr(task_local, "worker", None)
    if w is None:
        raise ValueError("get_worker() called outside of a task")
    task_local.interacted = True
    return w


def get_client():
    """A Client connected to the current worker's scheduler (inside a task), else the default."""
    w = getattr(task_local, "worker", None)
    if w is None:
        return default_client()
    task_local.interacted = True
    if getattr(task_local, "inline", False):
        # Blocking on the cluster from the worker's own event loop would
        # deadlock it; such tasks are never inlined again, and this one fails
        # clearly instead of hanging.
        raise RuntimeError("get_client() inside a task that ran inline on the event loop; "
                           "it will run on a thread when retried")
    return w._get_client()


def secede():
    """Leave the worker's thread pool: this task stops occupying a slot (e.g. to wait on
    futures it submitted). Call rejoin() to take a slot back."""
    ex = current_executor()
    tid = current_task_id()
    task_local.interacted = True
    if ex is None or tid is None:
        raise ValueError("secede() called outside of a task thread")
    w = getattr(task_local, "worker", None)
    if ex.secede() and w is not None:
        w.loop.call_soon_threadsafe(w._handle, SecedeEvent(tid, "secede"))


def rejoin():
    """Re-enter the worker's thread pool after secede()."""
    ex = current_executor()
    if ex is None:
        raise ValueError("rejoin() called outside of a task")
    ex.rejoin()


@contextlib.contextmanager
def worker_client(timeout=None, separate_thread=True):
    """`with worker_client() as client:` inside a task: the worker's client, with the task
    seceded meanwhile, so it holds no thread slot while it waits on what it submitted
    (dask's `worker_client`; `timeout` is accepted for its signature)."""
    if getattr(task_local, "worker", None) is None:
        raise ValueError("worker_client() called outside of a task")
    client = get_client()
    if separate_thread:
        secede()
    try:
        yield client
    finally:
        if separate_thread:
            rejoin()
