"""Adaptive: grow and shrink a cluster with its load, without flapping and without losing data.

Theory of operation
-------------------
Every `interval` the policy asks the scheduler for one recommendation
(`adaptive_recommendation`, run inside the scheduler, one round trip):

- `target`: `SchedulerState.adaptive_target(target_duration)`, the workers
  needed to finish the queued and processing work in about `target_duration`
  and to hold the data in memory at no more than 60% of the memory limits;
- each worker's name, number of processing tasks and bytes held, and the
  order in which closing them is cheapest (`workers_to_close`: idle first,
  then least data).

The target is clamped to `[minimum, maximum]` and compared with the *plan*
(workers in the spec, including those still starting, so a slow start never
triggers a second scale-up). Then:

- target > plan: scale up at once (one event, to the target);
- target == plan: nothing, and all scale-down counters reset;
- target < plan: the cheapest `plan - target` workers that are **idle** (no
  processing task) become candidates. A candidate is closed only once it has
  been a candidate `wait_count` ticks in a row; any tick where it is not (it
  got work, or the target rose) resets its count. That hysteresis is what
  stops flapping on bursty load: a worker must stay surplus and idle for
  `wait_count * interval` seconds before it goes.

Closing goes through the cluster's normal scale-down: the worker's name
leaves the spec, the scheduler retires it (its unique results move to other
workers first), then the process is closed. Busy workers are never picked,
so no running task is thrown away either.

Well-defined interactions: `cluster.adapt()` again replaces the running
policy (the counters start over); a manual `scale`/`scale_up` of the group
it manages, or any `scale_down`, ends adaptive mode (scaling another worker
group does not); `adaptive.stop()` ends it and keeps the current workers.
A detached cluster stops adapting when its manager detaches.

Every decision is recorded in `log` (a bounded deque of dicts) and counted
in `scale_ups` / `scale_downs`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time

from taskcore.utils import parse_timedelta

logger = logging.getLogger("taskcore.deploy.adaptive")

__all__ = ["Adaptive", "adaptive_recommendation"]


def adaptive_recommendation(scheduler, target_duration: float = 5.0) -> dict:
    """Runs inside the scheduler's process: the target and each worker's closing cost."""
    state = scheduler.state
    target = int(state.adaptive_target(float(target_duration)))
    info = state.worker_info()
    order = list(state.workers_to_close(len(info)))
    workers = {a: {"name": None if i.get("name") is None else str(i.get("name")),
                   "processing": int(i.get("processing") or 0),
                   "nbytes": int(i.get("nbytes") or 0),
                   "status": i.get("status")} for a, i in info.items()}
    return {"target": target, "order": order, "workers": workers}


class Adaptive:
    """An adaptive scaling policy for one cluster; see the module doc.

    `Adaptive(cluster, minimum=0, maximum=inf, target_duration="5s", wait_count=3,
    interval="1s", worker_group=None)`; usually made by `cluster.adapt(...)`.
    `minimum_cores`/`maximum_cores`/`minimum_memory`/`maximum_memory` are turned into
    worker counts with the cluster's worker template.
    """

    def __init__(self, cluster, minimum: int = 0, maximum: float = math.inf,
                 target_duration="5s", wait_count: int = 3, interval="1s",
                 worker_group=None, minimum_cores=None, maximum_cores=None,
                 minimum_memory=None, maximum_memory=None, log_capacity: int = 1000):
        self.cluster = cluster
        self.worker_group = worker_group
        if minimum_cores is not None:
            minimum = max(minimum, cluster._target_from(cores=minimum_cores,
                                                        worker_group=worker_group))
        if minimum_memory is not None:
            minimum = max(minimum, cluster._target_from(memory=minimum_memory,
                                                        worker_group=worker_group))
        if maximum_cores is not None:
            maximum = min(maximum, cluster._target_from(cores=maximum_cores,
                                                        worker_group=worker_group))
        if maximum_memory is not None:
            maximum = min(maximum, cluster._target_from(memory=maximum_memory,
                                                        worker_group=worker_group))
        if minimum is None or minimum < 0:
            raise ValueError(f"minimum must be >= 0, got {minimum}")
        if maximum is None or maximum < minimum:
            raise ValueError(f"maximum ({maximum}) must be >= minimum ({minimum})")
        if int(wait_count) < 1:
            raise ValueError(f"wait_count must be >= 1, got {wait_count}")
        self.minimum = int(minimum)
        self.maximum = maximum if maximum == math.inf else int(maximum)
        self.target_duration = parse_timedelta(target_duration)
        self.interval = parse_timedelta(interval)
        if not self.interval or self.interval <= 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.wait_count = int(wait_count)
        self.log: collections.deque = collections.deque(maxlen=log_capacity)
        self.scale_ups = 0
        self.scale_downs = 0
        self.last_target: int | None = None
        self.status = "created"
        self._close_counts: dict = {}
        self._task: asyncio.Task | None = None
        self._stopped = False

    def __repr__(self):
        return (f"<Adaptive {self.status} minimum={self.minimum} maximum={self.maximum} "
                f"target={self.last_target} ups={self.scale_ups} downs={self.scale_downs}>")

    # -- lifecycle (on the cluster's loop) ------------------------------------------------------
    def _start_now(self):
        self.status = "running"
        self._task = asyncio.ensure_future(self._run())

    def _stop_now(self):
        self._stopped = True
        self.status = "stopped"
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def stop(self):
        """End adaptive mode; the workers running now stay."""
        cluster = self.cluster
        if cluster.adaptive is self:
            cluster.adaptive = None
        runner = getattr(cluster, "_runner", None)
        if cluster.asynchronous or runner is None or not runner.running:
            self._stop_now()
        else:
            runner.call_soon(self._stop_now)

    async def _run(self):
        while not self._stopped:
            try:
                await self.adapt()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # The scheduler may be busy or briefly unreachable: try again next tick.
                self._record("error", error=repr(e))
                logger.warning("adaptive step for %s failed: %r", self.cluster.name, e)
            await asyncio.sleep(self.interval)

    # -- one step -------------------------------------------------------------------------------
    async def recommendation(self) -> dict:
        rec = await self.cluster._scheduler_call(adaptive_recommendation,
                                                 target_duration=self.target_duration)
        target = max(self.minimum, min(rec["target"], self.maximum))
        return dict(rec, target=int(target), raw_target=rec["target"])

    async def adapt(self):
        """One decision: scale up, count down, or nothing. Returns what was done."""
        cluster = self.cluster
        rec = await self.recommendation()
        if self._stopped:
            return "stopped"
        target = rec["target"]
        self.last_target = target
        plan = cluster._planned_workers(self.worker_group)
        if target > plan:
            self._close_counts.clear()
            self.scale_ups += 1
            self._record("up", before=plan, after=target, raw=rec["raw_target"])
            cluster._log(logging.INFO, "%s: adaptive scale up %d -> %d", cluster.name, plan,
                         target)
            await cluster._scale(target, worker_group=self.worker_group)
            return "up"
        if target == plan:
            self._close_counts.clear()
            return "same"
        candidates = self._idle_candidates(rec, plan - target)
        for c in candidates:
            self._close_counts[c] = self._close_counts.get(c, 0) + 1
        for c in list(self._close_counts):
            if c not in candidates:
                del self._close_counts[c]
        firm = [c for c in candidates if self._close_counts[c] >= self.wait_count]
        if not firm:
            return "wait"
        for c in firm:
            self._close_counts.pop(c, None)
        self.scale_downs += 1
        self._record("down", before=plan, after=plan - cluster._worker_count(firm),
                     workers=[str(c) for c in firm], raw=rec["raw_target"])
        cluster._log(logging.INFO, "%s: adaptive scale down %d -> %d (closing %s)",
                     cluster.name, plan, target, [str(c) for c in firm])
        await cluster._scale_down(firm)
        return "down"

    def _idle_candidates(self, rec, excess: int) -> list:
        """Spec names of up to `excess` workers, cheapest first, whose workers are all idle."""
        cluster = self.cluster
        by_name = cluster._spec_names_by_worker_name()
        busy = set()
        seen = []
        for addr in rec["order"]:
            w = rec["workers"].get(addr) or {}
            spec_name = by_name.get(w.get("name"))
            if spec_name is None:
                continue
            if (cluster.worker_spec.get(spec_name) or {}).get("worker_group") != self.worker_group:
                continue
            if w.get("processing"):
                busy.add(spec_name)
            if spec_name not in seen:
                seen.append(spec_name)
        out = []
        count = 0
        for n in seen:
            if n in busy:
                continue
            size = cluster._worker_count([n])
            if count + size > excess:
                continue
            out.append(n)
            count += size
        return out

    def _record(self, action, **fields):
        self.log.append(dict(time=time.time(), action=action, **fields))
