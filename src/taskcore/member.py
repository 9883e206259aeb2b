"""ClusterMember: what a scheduler or worker handle must and may provide to a SpecCluster.

A SpecCluster (deploy/spec.py) holds one handle per scheduler and per worker
entry of its spec: an in-process server (Scheduler, Worker), a Nanny, a local
subprocess, a process started over SSH, a batch job, a pod. This module is the
whole contract between the cluster and those handles; the cluster calls
nothing else on them.

Must provide (there is no sensible default, so the base leaves them out and
`check_member` refuses a handle without them):

- ``async start()``: start it (or adopt a running one); return once it can be
  used or raise. A failed start leaves nothing running.
- ``async close()``: stop it and everything it started; idempotent.
- ``async finished()``: resolves once it has ended, closed by us or not (a
  crash, a kill, a cancelled job): that is how the cluster notices a loss.
- ``address`` (the scheduler's or the worker's contact address, None before
  start) and ``status`` (a `Status` or its string value).

May provide (the defaults below are right for a handle that runs inside this
process and cannot outlive it):

- ``role``: "scheduler" or "worker", for messages and logs.
- ``worker_names``: the names its workers register under at the scheduler
  (several for a handle that runs several workers: a multi-process job).
- ``worker_address``: where its worker listens (a nanny listens elsewhere).
- ``dashboard_info``: a scheduler's dashboard as the scheduler reported it
  (``{"dashboard_host", "dashboard_port", "dashboard_prefix"}``, the keys of its
  ready line and of its ``scheduler_info``; port 0/None: it serves none), or None
  when the handle was not told (the cluster then asks the scheduler once).
  (An in-process Scheduler is its own handle: its ``dashboard_address`` is the
  address it was asked to listen on, so the contract does not use that name.)
- ``async fetch_logs(n)``: its recent log lines, or None when it has none of
  its own (an in-process server logs to the cluster's buffer).
- ``record()``: a JSON description that lets another process adopt it (the
  cluster registry, `from_name`); None when it cannot be adopted.
- ``detach_handle()``: stop watching it and let it run on.
- ``kill()``: stop it hard, without waiting, after `close()` timed out.
- ``pending``: True while it is accepted but not yet running (a queued batch
  job); such members are reported apart from running ones.

A handle class is adopted from a record by the spec's own class, called with
``record=<what record() returned>`` among its options (see deploy/spec.py).
"""
from __future__ import annotations

__all__ = ["ClusterMember", "check_member", "REQUIRED", "DASHBOARD_KEYS", "dashboard_fields"]

REQUIRED = ("start", "close", "finished")
# What a scheduler reports about its dashboard (ready line, scheduler_info, scheduler file).
DASHBOARD_KEYS = ("dashboard_host", "dashboard_port", "dashboard_prefix")


def dashboard_fields(report) -> dict | None:
    """The dashboard keys of a scheduler's report, or None when it says nothing about a
    dashboard (a report from a scheduler older than the dashboard, or not a dict)."""
    if not isinstance(report, dict) or "dashboard_port" not in report:
        return None
    return {k: report.get(k) for k in DASHBOARD_KEYS}


class ClusterMember:
    """Base of every cluster member; the optional hooks with their defaults (module doc)."""

    role: str | None = None
    pending: bool = False

    @property
    def worker_names(self) -> list:
        name = getattr(self, "name", None)
        return [] if name is None else [name]

    @property
    def worker_address(self) -> str | None:
        return self.address

    @property
    def dashboard_info(self) -> dict | None:
        return None

    async def fetch_logs(self, n: int = 1000) -> list | None:
        return None

    def record(self) -> dict | None:
        return None

    def detach_handle(self) -> None:
        """An in-process member cannot outlive this process: it keeps running until then."""
        return None

    def kill(self) -> None:
        """An in-process member has nothing to kill beyond what close() stops."""
        return None


def check_member(handle, what: str):
    """The handle, if it is a ClusterMember with the required methods; else a clear TypeError."""
    missing = [m for m in REQUIRED if not callable(getattr(handle, m, None))]
    if not isinstance(handle, ClusterMember) or missing:
        why = (f"it lacks {', '.join(missing)}" if missing
               else "it does not derive from taskcore.member.ClusterMember")
        raise TypeError(f"{what}: {type(handle).__name__} is not a cluster member ({why}); "
                        f"see taskcore.member for what a member provides")
    return handle
