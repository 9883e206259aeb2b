"""The scheduler's Prometheus metrics, read from the scheduler at scrape time.

Nothing is counted per task here: a scrape reads the state machine's own counters
(`state_counts`, `n_transitions`, `task_stream_total`, `prefix_counts`) and sums over the
workers' latest heartbeats, O(workers + prefixes). Each dashboard server has its own
`CollectorRegistry`, so several schedulers in one process never mix their numbers.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from taskcore.dashboard.api import STATES, key_str, total_comms

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_PREFIX_SERIES = 500         # per-prefix series are capped: label cardinality is memory


class SchedulerCollector:
    """A prometheus_client collector for one scheduler; `loop_delay` is a LoopDelay."""

    def __init__(self, scheduler, loop_delay=None):
        self.scheduler = scheduler
        self.loop_delay = loop_delay

    def collect(self):
        s = self.scheduler
        state = s.state
        counts = state.state_counts()
        tasks = GaugeMetricFamily("taskcore_scheduler_tasks", "Tasks per state",
                                  labels=["state"])
        for name in STATES:
            tasks.add_metric([name], counts.get(name, 0))
        yield tasks
        yield CounterMetricFamily("taskcore_scheduler_transitions",
                                  "Task state transitions made since the scheduler started",
                                  value=state.n_transitions)
        yield GaugeMetricFamily("taskcore_scheduler_workers", "Connected workers",
                                value=len(s.workers))
        yield GaugeMetricFamily("taskcore_scheduler_clients", "Connected clients",
                                value=len(s.clients))
        yield GaugeMetricFamily(
            "taskcore_scheduler_comms",
            "Open connections from workers, clients and nannies",
            value=len(s.workers) + len(s.clients) + len(getattr(s, "nannies", ()) or ()))

        nbytes = 0
        for ws in state.workers.values():
            nbytes += ws.nbytes
        spilled = 0
        transfer = {"incoming": 0, "outgoing": 0}
        worker_comms = 0
        for ws in state.workers.values():
            m = ws.metrics or {}
            spilled += m.get("spilled_bytes") or 0
            for direction in transfer:
                transfer[direction] += m.get(f"transfer_{direction}_bytes") or 0
            worker_comms += total_comms(m) or 0
        yield GaugeMetricFamily("taskcore_scheduler_memory_bytes",
                                "Bytes of task results held on workers", value=nbytes)
        yield GaugeMetricFamily("taskcore_scheduler_spilled_bytes",
                                "Bytes the workers spilled to disk (0 when they do not say)",
                                value=spilled)
        transferred = CounterMetricFamily(
            "taskcore_scheduler_transfer_bytes",
            "Bytes the connected workers moved between each other (their counters, summed)",
            labels=["direction"])
        for direction, v in transfer.items():
            transferred.add_metric([direction], v)
        yield transferred
        yield GaugeMetricFamily("taskcore_scheduler_worker_comms",
                                "Open connections the workers report (0 when they do not say)",
                                value=worker_comms)

        delay = self.loop_delay.delay if self.loop_delay is not None else 0.0
        yield GaugeMetricFamily("taskcore_scheduler_event_loop_delay_seconds",
                                "How late the scheduler's event loop woke from a 0.5 s sleep",
                                value=delay)
        yield CounterMetricFamily("taskcore_scheduler_task_stream",
                                  "Computed tasks recorded in the task stream",
                                  value=state.task_stream_total)

        done = CounterMetricFamily("taskcore_scheduler_prefix_done",
                                   "Tasks of each prefix that finished computing",
                                   labels=["prefix"])
        prefixes = state.prefix_counts()
        for name in sorted(prefixes, key=lambda p: -prefixes[p].get("done", 0))[
                :MAX_PREFIX_SERIES]:
            done.add_metric([key_str(name)], prefixes[name].get("done", 0))
        yield done


def make_registry(scheduler, loop_delay=None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(scheduler, loop_delay))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(registry)
